// monitor::parse_keyval and monitor::Arguments: qemu-storage-daemon's option syntax (dotted keys,
// ",," escapes, implied keys) and the typed readers with QEMU's messages, for JSON and for
// command-line strings.
#include <gtest/gtest.h>

#include "monitor/arguments.h"
#include "monitor/keyval.h"

namespace spindle::monitor {
namespace {

TEST(Keyval, DottedKeysNestAndCommasEscape) {
  QmpResult parsed = parse_keyval("driver=qcow2,file.driver=file,file.filename=a,,b.img");
  ASSERT_TRUE(parsed.ok()) << parsed.error().desc;
  EXPECT_EQ(parsed.value(), Json::parse(R"({"driver": "qcow2",
      "file": {"driver": "file", "filename": "a,b.img"}})"));
}

TEST(Keyval, ImpliedKeyForTheFirstItem) {
  QmpResult parsed = parse_keyval("iothread,id=io0", "qom-type");
  ASSERT_TRUE(parsed.ok());
  EXPECT_EQ(parsed.value()["qom-type"], "iothread");
  EXPECT_EQ(parsed.value()["id"], "io0");
}

TEST(Keyval, Errors) {
  EXPECT_EQ(parse_keyval("driver").error().desc, "Expected '=' after parameter 'driver'");
  EXPECT_EQ(parse_keyval("a=1,a.b=2").error().desc, "Parameter 'a' used inconsistently");
  EXPECT_EQ(parse_keyval("a b=1").error().desc, "Invalid parameter 'a b'");
}

TEST(Arguments, TypedReadersWithQemuMessages) {
  const Json json = Json::parse(R"({"s": "x", "b": true, "n": 5, "o": {"k": 1}, "extra": 0})");
  Arguments args(json, false);
  EXPECT_EQ(args.string("s"), "x");
  EXPECT_EQ(args.boolean("b"), true);
  EXPECT_EQ(args.integer("n"), 5);
  std::optional<Arguments> nested = args.object("o");
  ASSERT_TRUE(nested);
  EXPECT_EQ(nested->integer("k"), 1);
  args.finish_nested(*nested);
  ASSERT_TRUE(args.finish());
  EXPECT_EQ(args.finish()->desc, "Parameter 'extra' is unexpected");

  Arguments wrong(json, false);
  EXPECT_FALSE(wrong.boolean("s"));
  EXPECT_EQ(wrong.error()->desc, "Invalid parameter type for 's', expected: boolean");
  Arguments missing(json, false);
  EXPECT_FALSE(missing.string("driver", true));
  EXPECT_EQ(missing.error()->desc, "Parameter 'driver' is missing");
  Arguments nested_missing(json, false);
  std::optional<Arguments> o = nested_missing.object("o");
  o->string("filename", true);
  nested_missing.finish_nested(*o);
  EXPECT_EQ(nested_missing.error()->desc, "Parameter 'o.filename' is missing");
  Arguments choice(json, false);
  EXPECT_FALSE(choice.choice("s", {"a", "b"}));
  EXPECT_EQ(choice.error()->desc, "Parameter 's' does not accept value 'x'");
}

TEST(Arguments, CommandLineStringsReadAsTheirTypes) {
  const Json json = Json::parse(R"({"ro": "on", "n": "12", "size": "1G", "bad": "maybe"})");
  Arguments args(json, true);
  EXPECT_EQ(args.boolean("ro"), true);
  EXPECT_EQ(args.integer("n"), 12);
  EXPECT_EQ(args.size("size"), 1ull << 30);
  EXPECT_FALSE(args.boolean("bad"));
  EXPECT_EQ(args.error()->desc, "Parameter 'bad' expects 'on' or 'off'");
}

}  // namespace
}  // namespace spindle::monitor
