// nbd::ReplyWriter: replies that become ready in one loop pass leave in one writev; a reply with
// a file tail (a zero-copy READ) splits the batch around its sendfile without reordering
// anything; replies queued while a write is in progress go in the next one; after a failed
// write every waiting and later sender learns that the peer is gone.
#include "export/nbd/reply_writer.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "aio/io_thread.h"
#include "coro/block_on.h"
#include "coro/coroutine.h"
#include "coro/event.h"
#include "coro/task.h"

namespace spindle::exports::nbd {
namespace {

// A stream that records each write call (as text) instead of writing, and can be told to fail.
class RecordingStream final : public io::ByteStream {
 public:
  coro::Task<ssize_t> read_some(void*, std::size_t) override { co_return 0; }
  coro::Task<int> writev_all(std::span<const iovec> vectors) override {
    std::string call = "writev:";
    for (const iovec& vector : vectors) {
      call.append(static_cast<const char*>(vector.iov_base), vector.iov_len).append("|");
    }
    calls.push_back(call);
    co_await coro::yield();  // a write takes a while: others queue meanwhile
    co_return fail ? -EPIPE : 0;
  }
  bool can_send_file() const noexcept override { return true; }
  coro::Task<int> send_file(int fd, std::uint64_t offset, std::uint64_t bytes) override {
    calls.push_back("file:" + std::to_string(fd) + "@" + std::to_string(offset) + "+" +
                    std::to_string(bytes));
    co_return fail ? -EPIPE : 0;
  }

  std::vector<std::string> calls;
  bool fail = false;
};

iovec text(const char* s) { return iovec{const_cast<char*>(s), std::char_traits<char>::length(s)}; }

coro::Task<void> reply(ReplyWriter& writer, io::ByteStream& stream, std::vector<iovec> parts,
                       FileRange tail, std::vector<bool>& results) {
  const bool sent = co_await writer.send(stream, parts, tail);
  results.push_back(sent);
}

TEST(ReplyWriterTest, RepliesReadyTogetherLeaveInOneWritev) {
  aio::IoThread io("reply-cork");
  ReplyWriter writer;
  RecordingStream stream;
  std::vector<bool> results;
  coro::block_on(io.context(), [](ReplyWriter& w, RecordingStream& s, std::vector<bool>& r) -> coro::Task<void> {
    coro::spawn(*aio::current_context(), reply(w, s, {text("a1"), text("a2")}, {}, r));
    coro::spawn(*aio::current_context(), reply(w, s, {text("b")}, {}, r));
    coro::spawn(*aio::current_context(), reply(w, s, {text("c")}, {}, r));
    while (r.size() < 3) co_await coro::yield();
  }(writer, stream, results));
  EXPECT_EQ(stream.calls, (std::vector<std::string>{"writev:a1|a2|b|c|"}));
  EXPECT_EQ(results, (std::vector<bool>{true, true, true}));
}

TEST(ReplyWriterTest, AFileTailSplitsTheBatchInOrder) {
  aio::IoThread io("reply-file");
  ReplyWriter writer;
  RecordingStream stream;
  std::vector<bool> results;
  coro::block_on(io.context(), [](ReplyWriter& w, RecordingStream& s, std::vector<bool>& r) -> coro::Task<void> {
    coro::spawn(*aio::current_context(), reply(w, s, {text("x")}, {}, r));
    coro::spawn(*aio::current_context(), reply(w, s, {text("read-header")}, FileRange{7, 4096, 65536}, r));
    coro::spawn(*aio::current_context(), reply(w, s, {text("y")}, {}, r));
    coro::spawn(*aio::current_context(), reply(w, s, {text("h2")}, FileRange{7, 0, 100}, r));
    while (r.size() < 4) co_await coro::yield();
    // Queued while nothing is being written: a new batch of its own.
    const iovec last[] = {text("z")};
    co_await w.send(s, last);
  }(writer, stream, results));
  EXPECT_EQ(stream.calls, (std::vector<std::string>{"writev:x|read-header|", "file:7@4096+65536",
                                                    "writev:y|h2|", "file:7@0+100", "writev:z|"}));
}

TEST(ReplyWriterTest, RepliesQueuedDuringAWriteGoInTheNext) {
  aio::IoThread io("reply-next");
  ReplyWriter writer;
  RecordingStream stream;
  std::vector<bool> results;
  coro::block_on(io.context(), [](ReplyWriter& w, RecordingStream& s, std::vector<bool>& r) -> coro::Task<void> {
    coro::spawn(*aio::current_context(), reply(w, s, {text("first")}, {}, r));
    co_await coro::yield();  // the cork
    co_await coro::yield();  // "first" is being written now
    coro::spawn(*aio::current_context(), reply(w, s, {text("second")}, {}, r));
    coro::spawn(*aio::current_context(), reply(w, s, {text("third")}, {}, r));
    while (r.size() < 3) co_await coro::yield();
  }(writer, stream, results));
  EXPECT_EQ(stream.calls, (std::vector<std::string>{"writev:first|", "writev:second|third|"}));
}

TEST(ReplyWriterTest, AFailedWriteFailsWaitingAndLaterSenders) {
  aio::IoThread io("reply-broken");
  ReplyWriter writer;
  RecordingStream stream;
  stream.fail = true;
  std::vector<bool> results;
  coro::block_on(io.context(), [](ReplyWriter& w, RecordingStream& s, std::vector<bool>& r) -> coro::Task<void> {
    coro::spawn(*aio::current_context(), reply(w, s, {text("a")}, FileRange{3, 0, 10}, r));
    coro::spawn(*aio::current_context(), reply(w, s, {text("b")}, {}, r));
    while (r.size() < 2) co_await coro::yield();
    const iovec late[] = {text("c")};
    const bool later = co_await w.send(s, late);
    r.push_back(later);
  }(writer, stream, results));
  EXPECT_TRUE(writer.broken());
  EXPECT_EQ(results, (std::vector<bool>{false, false, false}));
  // The failed writev ends it: neither the file tail nor later replies are attempted.
  EXPECT_EQ(stream.calls, (std::vector<std::string>{"writev:a|"}));
}

}  // namespace
}  // namespace spindle::exports::nbd
