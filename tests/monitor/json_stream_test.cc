// monitor::JsonStream: values cut where QEMU's streamer cuts them (across feeds, several in one
// feed, top-level scalars), single-quoted strings rewritten, and the limits: a value nested
// deeper than kMaxNesting or longer than kMaxBytes is one error and the stream goes on.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "monitor/json_stream.h"

namespace spindle::monitor {
namespace {

std::vector<JsonStream::Piece> feed_all(JsonStream& stream,
                                        const std::vector<std::string>& chunks) {
  std::vector<JsonStream::Piece> pieces;
  for (const std::string& chunk : chunks) {
    stream.feed(chunk, [&](JsonStream::Piece piece) { pieces.push_back(std::move(piece)); });
  }
  return pieces;
}

TEST(JsonStream, CutsValuesAcrossFeedsAndWithinOne) {
  JsonStream stream;
  auto pieces = feed_all(stream, {"{\"execute\": \"a\"", ", \"id\": 1}{\"execute\"", ":\"b\"}\n"});
  ASSERT_EQ(pieces.size(), 2u);
  EXPECT_TRUE(pieces[0].ok);
  EXPECT_EQ(pieces[0].text, "{\"execute\": \"a\", \"id\": 1}");
  EXPECT_EQ(pieces[1].text, "{\"execute\":\"b\"}");
  EXPECT_FALSE(stream.in_value());
}

TEST(JsonStream, BracesInsideStringsDoNotCount) {
  JsonStream stream;
  auto pieces = feed_all(stream, {R"({"a": "}{\"]", "b": ['}']})"});
  ASSERT_EQ(pieces.size(), 1u);
  EXPECT_EQ(pieces[0].text, R"({"a": "}{\"]", "b": ["}"]})");
}

TEST(JsonStream, SingleQuotedStringsBecomeDoubleQuoted) {
  JsonStream stream;
  auto pieces = feed_all(stream, {R"({'execute': 'say "hi" it\'s'})"});
  ASSERT_EQ(pieces.size(), 1u);
  EXPECT_EQ(pieces[0].text, R"({"execute": "say \"hi\" it's"})");
}

TEST(JsonStream, TopLevelScalarsAreValuesToo) {
  JsonStream stream;
  auto pieces = feed_all(stream, {"42 \"x\" true", "\n"});
  ASSERT_EQ(pieces.size(), 3u);
  EXPECT_EQ(pieces[0].text, "42");
  EXPECT_EQ(pieces[1].text, "\"x\"");
  EXPECT_EQ(pieces[2].text, "true");
}

TEST(JsonStream, StrayClosingBracketIsAnError) {
  JsonStream stream;
  auto pieces = feed_all(stream, {"] {\"a\":1}"});
  ASSERT_EQ(pieces.size(), 2u);
  EXPECT_FALSE(pieces[0].ok);
  EXPECT_TRUE(pieces[1].ok);
}

TEST(JsonStream, TooDeepIsOneErrorAndTheStreamGoesOn) {
  JsonStream stream;
  const std::size_t depth = JsonStream::kMaxNesting + 500;
  std::string deep(depth, '[');
  deep += std::string(depth, ']');
  auto pieces = feed_all(stream, {deep, "{\"execute\":\"x\"}"});
  ASSERT_EQ(pieces.size(), 2u);
  EXPECT_FALSE(pieces[0].ok);
  EXPECT_EQ(pieces[0].error, "JSON nesting depth limit exceeded");
  EXPECT_TRUE(pieces[1].ok);
  EXPECT_EQ(pieces[1].text, "{\"execute\":\"x\"}");
}

TEST(JsonStream, TooLongIsOneErrorAndMemoryStaysBounded) {
  JsonStream stream;
  std::vector<JsonStream::Piece> pieces;
  auto collect = [&](JsonStream::Piece piece) { pieces.push_back(std::move(piece)); };
  stream.feed("{\"a\": \"", collect);
  const std::string chunk(1 << 20, 'x');
  for (std::size_t sent = 0; sent < JsonStream::kMaxBytes + (4u << 20); sent += chunk.size()) {
    stream.feed(chunk, collect);
  }
  stream.feed("\"}{\"b\":2}", collect);
  ASSERT_EQ(pieces.size(), 2u);
  EXPECT_EQ(pieces[0].error, "JSON token size limit exceeded");
  EXPECT_EQ(pieces[1].text, "{\"b\":2}");
}

}  // namespace
}  // namespace spindle::monitor
