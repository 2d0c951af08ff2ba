// qcow2 persistent dirty bitmaps: the bitmap directory codec (round trip, every bound QEMU
// checks refused with EINVAL, never a crash), bitmap bits read from images qemu-img and
// qemu-io made and tracked, Qcow2Node's store/track/close checked by `qemu-img check` and by
// reading the bits back, and BitmapTracker's marking from several threads at once.
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <fstream>
#include <thread>
#include <vector>

#include "aio/context.h"
#include "aio/io_thread.h"
#include "base/byte_order.h"
#include "block/drivers/file.h"
#include "block/formats/qcow2/bitmap_directory.h"
#include "block/formats/qcow2/bitmap_tracker.h"
#include "block/formats/qcow2/qcow2_node.h"
#include "coro/block_on.h"
#include "coro/task.h"
#include "support/recording_node.h"
#include "support/shell_command.h"
#include "support/qcow2_node_fixture.h"

namespace spindle::block::qcow2 {
namespace {

using Bytes = std::vector<std::byte>;
using test::must_run;
using test::run_command;

constexpr std::uint64_t kCluster = 65536;
constexpr std::uint64_t kImage = 64ull << 20;

BitmapEntry entry(std::string name) {
  BitmapEntry e;
  e.table_offset = 0x50000;
  e.table_size = 1;
  e.flags = kBitmapFlagAuto;
  e.granularity_bits = 16;
  e.name = std::move(name);
  return e;
}

TEST(Qcow2BitmapDirectory, RoundTripsWithQemuFraming) {
  std::vector<BitmapEntry> list = {entry("b1"), entry("a longer name")};
  list[1].flags = kBitmapFlagInUse;
  list[1].granularity_bits = 20;
  BlockResult<Bytes> bytes = encode_bitmap_directory(list, kCluster, kImage);
  ASSERT_TRUE(bytes.ok()) << bytes.error().message;
  ASSERT_EQ(bytes.value().size(), 32u + 40u);  // 24 + 2 -> 32; 24 + 13 -> 40
  EXPECT_EQ(base::load_be64(bytes.value().data()), 0x50000u);
  EXPECT_EQ(static_cast<int>(bytes.value()[16]), 1);   // type: dirty tracking
  EXPECT_EQ(static_cast<int>(bytes.value()[17]), 16);  // granularity bits
  BlockResult<std::vector<BitmapEntry>> back =
      decode_bitmap_directory(bytes.value(), 2, kCluster, kImage);
  ASSERT_TRUE(back.ok()) << back.error().message;
  ASSERT_EQ(back.value().size(), 2u);
  EXPECT_EQ(back.value()[1].name, "a longer name");
  EXPECT_TRUE(back.value()[1].in_use());
  EXPECT_FALSE(back.value()[1].enabled());
  EXPECT_EQ(back.value()[1].granularity(), 1u << 20);
}

TEST(Qcow2BitmapDirectory, RefusesEveryBadField) {
  BlockResult<Bytes> good = encode_bitmap_directory({entry("b")}, kCluster, kImage);
  ASSERT_TRUE(good.ok());
  auto refused = [&](auto mutate, std::uint32_t count = 1, std::uint64_t image = kImage) {
    Bytes b = good.value();
    mutate(b);
    BlockResult<std::vector<BitmapEntry>> r = decode_bitmap_directory(b, count, kCluster, image);
    return !r.ok() && r.error().error == EINVAL;
  };
  EXPECT_TRUE(refused([](Bytes& b) { base::store_be64(b.data(), 0); }));        // table at 0
  EXPECT_TRUE(refused([](Bytes& b) { base::store_be64(b.data(), 0x50200); }));  // unaligned
  EXPECT_TRUE(refused([](Bytes& b) { base::store_be32(b.data() + 8, 0); }));    // no table
  EXPECT_TRUE(refused([](Bytes& b) { base::store_be32(b.data() + 8, 0x8000001); }));
  EXPECT_TRUE(refused([](Bytes& b) { base::store_be32(b.data() + 12, 4); }));  // reserved flag
  EXPECT_TRUE(refused([](Bytes& b) { b[16] = std::byte{2}; }));                // type
  EXPECT_TRUE(refused([](Bytes& b) { b[17] = std::byte{8}; }));                // granularity
  EXPECT_TRUE(refused([](Bytes& b) { b[17] = std::byte{32}; }));
  // One table cluster holds 512 Ki bits: too few for 1 GiB at 512 bytes a bit.
  EXPECT_TRUE(refused([](Bytes& b) { b[17] = std::byte{9}; }, 1, 1ull << 30));
  EXPECT_TRUE(refused([](Bytes& b) { base::store_be16(b.data() + 18, 1024); }));  // past end
  EXPECT_TRUE(refused([](Bytes& b) { base::store_be32(b.data() + 20, 8); }));     // extra data
  EXPECT_TRUE(refused([](Bytes& b) { base::store_be32(b.data() + 20, 0xffffffffu); }));
  EXPECT_TRUE(refused([](Bytes& b) { b.resize(20); }));  // truncated entry
  EXPECT_TRUE(refused([](Bytes& b) { b.resize(0); }));   // empty directory
  EXPECT_TRUE(refused([](Bytes&) {}, 2));                // fewer than counted
  EXPECT_TRUE(refused([&](Bytes& b) { b.insert(b.end(), b.begin(), b.end()); }, 1));  // more
  // An in-use bitmap may have a table too small (qemu keeps such bitmaps to be removed).
  EXPECT_FALSE(refused(
      [](Bytes& b) {
        b[17] = std::byte{9};
        base::store_be32(b.data() + 12, kBitmapFlagInUse);
      },
      1, 1ull << 30));
  EXPECT_TRUE(valid_bitmap_table_entry(0x60000, kCluster));
  EXPECT_TRUE(valid_bitmap_table_entry(kBitmapTableAllOnes, kCluster));
  EXPECT_FALSE(valid_bitmap_table_entry(0x60000 | kBitmapTableAllOnes, kCluster));
  EXPECT_FALSE(valid_bitmap_table_entry(0x60200, kCluster));
  EXPECT_FALSE(valid_bitmap_table_entry(1ull << 60, kCluster));
  EXPECT_FALSE(encode_bitmap_directory({entry("x"), entry("x")}, kCluster, kImage).ok());
  EXPECT_FALSE(encode_bitmap_directory({}, kCluster, kImage).ok());
}

TEST(Qcow2BitmapDirectory, NewBitmapConstraintsAsQemu) {
  EXPECT_TRUE(check_new_bitmap("b", 65536, kCluster, kImage).ok());
  EXPECT_EQ(check_new_bitmap("b", 256, kCluster, kImage).message,
            "Granularity is under minimum (512 bytes)");
  EXPECT_EQ(check_new_bitmap("b", 1ull << 32, kCluster, kImage).message,
            "Granularity exceeds maximum (2147483648 bytes)");
  EXPECT_EQ(check_new_bitmap(std::string(1024, 'n'), 65536, kCluster, kImage).message,
            "Name length exceeds maximum (1023 characters)");
  EXPECT_FALSE(check_new_bitmap("b", 512, 512, 1ull << 50).ok());  // too much space
  EXPECT_EQ(bitmap_data_bytes(kImage, 16), 128u);
  EXPECT_EQ(bitmap_table_entries(1ull << 30, 9, kCluster), 4u);
}

TEST(Qcow2BitmapTracker, ConcurrentMarksAreAllKept) {
  BitmapTracker tracker;
  std::vector<std::uint8_t> start(bitmap_data_bytes(kImage, 16), 0);
  start[0] = 0x80;  // bit 7: guest bytes [7 * 64k, 8 * 64k)
  tracker.add("b", 65536, kImage, start);
  tracker.add("coarse", 1 << 20, kImage, {});
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&tracker, t] {
      // Thread t marks every 4th 64 KiB unit from t, one at a time, so words are shared.
      for (std::uint64_t unit = static_cast<std::uint64_t>(t); unit < 1024; unit += 4) {
        if (unit % 3 == 0) tracker.mark(unit * 65536 + 100, 10);
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  const std::vector<std::uint8_t> bits = tracker.serialize(0);
  ASSERT_EQ(bits.size(), 128u);
  for (std::uint64_t unit = 0; unit < 1024; ++unit) {
    const bool set = (bits[unit / 8] >> (unit % 8)) & 1;
    EXPECT_EQ(set, unit % 3 == 0 || unit == 7) << unit;
  }
  const std::vector<std::uint8_t> coarse = tracker.serialize(1);
  ASSERT_EQ(coarse.size(), 8u);
  for (std::uint8_t b : coarse) EXPECT_EQ(b, 0xff);  // every 1 MiB unit holds a mark
  // A range spanning words; a range past the end is cut at the end.
  BitmapTracker span;
  span.add("s", 512, 1 << 20, {});
  span.mark(512 * 60, 512 * 10);
  span.mark((1 << 20) - 512, 4096);
  const std::vector<std::uint8_t> s = span.serialize(0);
  for (std::uint64_t i = 0; i < 2048; ++i) {
    EXPECT_EQ(((s[i / 8] >> (i % 8)) & 1) != 0, (i >= 60 && i < 70) || i == 2047) << i;
  }
}

class Qcow2BitmapNodeTest : public test::Qcow2NodeFixture<testing::Test> {
 protected:
  Qcow2BitmapNodeTest() : Qcow2NodeFixture("spindle-qcow2bitmap") {}
  static coro::Task<BlockResult<std::vector<std::uint8_t>>> bits_of(std::shared_ptr<Qcow2Node> n,
                                                                    std::string name) {
    BlockResult<std::vector<BitmapEntry>> dir = co_await n->bitmap_directory();
    if (!dir) co_return dir.error();
    for (const BitmapEntry& e : dir.value()) {
      if (e.name == name) co_return co_await n->read_bitmap_bits(e);
    }
    co_return BlockError{ENOENT, "no such bitmap"};
  }
  static coro::Task<int> write_then_close(std::shared_ptr<Qcow2Node> n, std::uint64_t offset,
                                          std::size_t bytes) {
    Bytes data(bytes, std::byte{0x5a});
    if (int r = co_await n->write(offset, data, 0); r < 0) co_return r;
    if (int r = co_await n->write_zeroes(offset + (2 << 20), bytes, 0); r < 0) co_return r;
    co_return co_await n->close();
  }
  static bool bit(const std::vector<std::uint8_t>& bits, std::uint64_t i) {
    return (bits[i / 8] >> (i % 8)) & 1;
  }
};

TEST_F(Qcow2BitmapNodeTest, ReadsWhatQemuTrackedAndTracksOurWrites) {
  REQUIRE_QEMU();
  must_run("qemu-img create -q -f qcow2 " + path("b.qcow2") + " 16M");
  must_run("qemu-img bitmap --add " + path("b.qcow2") + " on");
  must_run("qemu-img bitmap --add -g 1M --disable " + path("b.qcow2") + " off");
  must_run("qemu-io -c 'write 64k 4k' -c 'write 3M 1M' " + path("b.qcow2"));
  {
    std::shared_ptr<Qcow2Node> node = open("b.qcow2", true);
    ASSERT_TRUE(node);
    BlockResult<std::vector<std::uint8_t>> on = run(bits_of(node, "on"));
    ASSERT_TRUE(on.ok()) << on.error().message;
    ASSERT_EQ(on.value().size(), 32u);  // 256 bits of 64 KiB
    for (std::uint64_t i = 0; i < 256; ++i) {
      EXPECT_EQ(bit(on.value(), i), i == 1 || (i >= 48 && i < 64)) << i;
    }
    BlockResult<std::vector<std::uint8_t>> off = run(bits_of(node, "off"));
    ASSERT_TRUE(off.ok());
    EXPECT_EQ(off.value(), std::vector<std::uint8_t>(2, 0));
  }
  {
    std::shared_ptr<Qcow2Node> node = open("b.qcow2", false);
    ASSERT_TRUE(node);
    ASSERT_EQ(run(write_then_close(node, 10 << 20, 4096)), 0);
  }
  const test::CommandResult check = run_command("qemu-img check " + path("b.qcow2"));
  EXPECT_EQ(check.exit_code, 0) << check.output;
  const std::string info = must_run("qemu-img info " + path("b.qcow2"));
  EXPECT_EQ(info.find("in-use"), std::string::npos) << info;
  std::shared_ptr<Qcow2Node> node = open("b.qcow2", true);
  ASSERT_TRUE(node);
  BlockResult<std::vector<std::uint8_t>> on = run(bits_of(node, "on"));
  ASSERT_TRUE(on.ok()) << on.error().message;
  for (std::uint64_t i = 0; i < 256; ++i) {
    EXPECT_EQ(bit(on.value(), i), i == 1 || (i >= 48 && i < 64) || i == 160 || i == 192) << i;
  }
  BlockResult<std::vector<std::uint8_t>> off = run(bits_of(node, "off"));
  ASSERT_TRUE(off.ok());
  EXPECT_EQ(off.value(), std::vector<std::uint8_t>(2, 0));  // disabled: untouched
}

TEST_F(Qcow2BitmapNodeTest, KilledWriterLeavesInUse) {
  REQUIRE_QEMU();
  must_run("qemu-img create -q -f qcow2 " + path("k.qcow2") + " 4M");
  must_run("qemu-img bitmap --add " + path("k.qcow2") + " b");
  {
    std::shared_ptr<Qcow2Node> node = open("k.qcow2", false);
    ASSERT_TRUE(node);
    Bytes data(4096, std::byte{1});
    auto write = [](std::shared_ptr<Qcow2Node> n, Bytes d) -> coro::Task<int> {
      co_return co_await n->write(0, d, 0);
    };
    ASSERT_EQ(run(write(node, data)), 0);
    // Dropped without close(), as a killed process would leave it.
  }
  const std::string info = must_run("qemu-img info " + path("k.qcow2"));
  EXPECT_NE(info.find("in-use"), std::string::npos) << info;
  const test::CommandResult check = run_command("qemu-img check " + path("k.qcow2"));
  EXPECT_EQ(check.exit_code, 0) << check.output;
  std::shared_ptr<Qcow2Node> node = open("k.qcow2", true);
  ASSERT_TRUE(node);
  EXPECT_EQ(run(bits_of(node, "b")).error().error, EINVAL);  // in use: bits unusable
}

TEST_F(Qcow2BitmapNodeTest, CorruptTablesAreCleanErrors) {
  REQUIRE_QEMU();
  must_run("qemu-img create -q -f qcow2 " + path("c.qcow2") + " 4M");
  must_run("qemu-img bitmap --add " + path("c.qcow2") + " b");
  must_run("qemu-io -c 'write 0 4k' " + path("c.qcow2"));
  std::uint64_t table_offset = 0;
  {
    std::shared_ptr<Qcow2Node> node = open("c.qcow2", true);
    ASSERT_TRUE(node);
    BlockResult<std::vector<BitmapEntry>> dir = run(node->bitmap_directory());
    ASSERT_TRUE(dir.ok()) << dir.error().message;
    ASSERT_EQ(dir.value().size(), 1u);
    table_offset = dir.value()[0].table_offset;
  }
  auto patch = [&](std::uint64_t offset, std::uint64_t value) {
    std::fstream f(path("c.qcow2"), std::ios::in | std::ios::out | std::ios::binary);
    std::byte raw[8];
    base::store_be64(raw, value);
    f.seekp(static_cast<std::streamoff>(offset));
    f.write(reinterpret_cast<const char*>(raw), 8);
  };
  // As qemu, an image whose bitmap tables are bad does not open, read-only or not.
  for (const std::uint64_t bad :
       {std::uint64_t{2}, std::uint64_t{0x10200}, std::uint64_t{0x10001}, std::uint64_t{1} << 50}) {
    patch(table_offset, bad);  // reserved bit, unaligned, offset with all-ones, past the end
    for (const bool read_only : {true, false}) {
      base::Result<BlockNodeRef> file = open_file(path("c.qcow2"), read_only);
      ASSERT_TRUE(file.ok());
      FormatOpenOptions options;
      options.read_only = read_only;
      BlockResult<BlockNodeRef> opened = run(open_qcow2(file.value(), std::move(options)));
      ASSERT_FALSE(opened.ok()) << bad;
      EXPECT_EQ(opened.error().error, EINVAL);
      EXPECT_EQ(opened.error().message,
                "Could not read bitmap_table table from image for bitmap 'b': Invalid argument");
    }
  }
  // An all-ones entry without an offset is valid: every bit of its cluster is set.
  patch(table_offset, kBitmapTableAllOnes);
  std::shared_ptr<Qcow2Node> node = open("c.qcow2", true);
  ASSERT_TRUE(node);
  BlockResult<std::vector<std::uint8_t>> bits = run(bits_of(node, "b"));
  ASSERT_TRUE(bits.ok()) << bits.error().message;
  EXPECT_EQ(bits.value(), std::vector<std::uint8_t>(8, 0xff));  // 64 bits, no tail past them
}

// Four IoThreads make their first writes at once: tracking starts once (IN_USE set before any
// data is written), and every write's bits are kept.
TEST_F(Qcow2BitmapNodeTest, WritesFromFourThreadsAreAllTracked) {
  REQUIRE_QEMU();
  must_run("qemu-img create -q -f qcow2 -o cluster_size=4k " + path("m.qcow2") + " 8M");
  must_run("qemu-img bitmap --add -g 4k " + path("m.qcow2") + " b");
  std::shared_ptr<Qcow2Node> node = open("m.qcow2", false);
  ASSERT_TRUE(node);
  aio::IoThread t0("bitmap-0"), t1("bitmap-1"), t2("bitmap-2"), t3("bitmap-3");
  aio::IoThread* io_threads[] = {&t0, &t1, &t2, &t3};
  // Writer w writes 512 bytes into every 4 KiB unit u with u % 4 == w and u % 5 != 0.
  auto writer = [&](int w) -> coro::Task<int> {
    Bytes data(512, std::byte{static_cast<std::uint8_t>(w + 1)});
    for (std::uint64_t unit = static_cast<std::uint64_t>(w); unit < 2048; unit += 4) {
      if (unit % 5 == 0) continue;
      const int r = co_await node->write(unit * 4096 + 1024, std::span<const std::byte>(data), 0);
      if (r < 0) co_return r;
    }
    co_return 0;
  };
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int w = 0; w < 4; ++w) {
    threads.emplace_back([&, w] {
      if (coro::block_on(io_threads[w]->context(), writer(w)) != 0) failures.fetch_add(1);
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_NE(must_run("qemu-img info -U " + path("m.qcow2")).find("in-use"), std::string::npos);
  ASSERT_EQ(run(node->close()), 0);
  node.reset();
  const test::CommandResult check = run_command("qemu-img check " + path("m.qcow2"));
  EXPECT_EQ(check.exit_code, 0) << check.output;
  std::shared_ptr<Qcow2Node> back = open("m.qcow2", true);
  ASSERT_TRUE(back);
  BlockResult<std::vector<std::uint8_t>> bits = run(bits_of(back, "b"));
  ASSERT_TRUE(bits.ok()) << bits.error().message;
  ASSERT_EQ(bits.value().size(), 256u);
  for (std::uint64_t unit = 0; unit < 2048; ++unit) {
    EXPECT_EQ(bit(bits.value(), unit), unit % 5 != 0) << unit;
  }
}

// A crash after any write of a bitmap change (qemu-img bitmap's store, tracking's IN_USE
// marking, close's store) leaves an image qemu opens (its bitmaps well formed) and checks
// with at worst leaked clusters, whether the writes since the last flush landed in order or
// only one of them did.
TEST_F(Qcow2BitmapNodeTest, ACrashAtAnyPointLeavesAtWorstLeaks) {
  REQUIRE_QEMU();
  must_run("qemu-img create -q -f qcow2 " + path("c.qcow2") + " 8M");
  must_run("qemu-img bitmap --add " + path("c.qcow2") + " b1");
  must_run("qemu-img bitmap --add -g 1M --disable " + path("c.qcow2") + " b2");
  must_run("qemu-io -c 'write 64k 64k' -c 'write 3M 1M' " + path("c.qcow2"));
  Bytes durable = test::read_file_bytes(path("c.qcow2"));
  Bytes in_order = durable;
  std::size_t checked = 0;
  auto check_events = [&](test::RecordingNode& recorder, const char* step) {
    const std::string crash = path("crash.qcow2");
    auto check = [&](const Bytes& image, std::size_t index, const char* how) {
      {
        std::ofstream out(crash, std::ios::binary | std::ios::trunc);
        out.write(reinterpret_cast<const char*>(image.data()),
                  static_cast<std::streamsize>(image.size()));
      }
      const test::CommandResult r = run_command("qemu-img check '" + crash + "'");
      EXPECT_TRUE(r.exit_code == 0 || r.exit_code == 3)
          << step << ": " << how << " crash after write " << index << "\n"
          << r.output;
      const test::CommandResult info = run_command("qemu-img info '" + crash + "'");
      EXPECT_EQ(info.exit_code, 0) << step << ": " << how << " " << index << "\n" << info.output;
      ++checked;
    };
    const std::vector<test::RecordingNode::Event> events = recorder.take_events();
    for (std::size_t i = 0; i < events.size() && !HasFailure(); ++i) {
      if (events[i].flush) {
        durable = in_order;
        continue;
      }
      test::apply_event(in_order, events[i]);
      check(in_order, i, "in-order");
      Bytes only_this = durable;
      test::apply_event(only_this, events[i]);
      check(only_this, i, "reordered");
    }
    durable = in_order;
  };
  base::Result<BlockNodeRef> file = open_file(path("c.qcow2"), false);
  ASSERT_TRUE(file.ok());
  auto recorder = std::make_shared<test::RecordingNode>(file.value());
  BlockResult<BlockNodeRef> opened = run(open_qcow2(recorder, FormatOpenOptions{}));
  ASSERT_TRUE(opened.ok()) << opened.error().message;
  auto node = std::dynamic_pointer_cast<Qcow2Node>(opened.value());
  ASSERT_TRUE(node);
  recorder->take_events();
  // As `bitmap --clear b1 --remove b2 --add b3 (with bits)` stores it.
  std::vector<Qcow2Node::StoredBitmap> list(2);
  list[0].entry.name = "b1";
  list[0].entry.flags = kBitmapFlagAuto;
  list[0].bits = std::vector<std::uint8_t>(16, 0);
  list[1].entry.name = "b3";
  list[1].entry.granularity_bits = 12;
  list[1].entry.flags = kBitmapFlagAuto;
  list[1].bits = std::vector<std::uint8_t>(256, 0x11);
  const BlockError stored = run(node->store_bitmaps(std::move(list)));
  ASSERT_TRUE(stored.ok()) << stored.message;
  check_events(*recorder, "store");
  auto write = [](std::shared_ptr<Qcow2Node> n) -> coro::Task<int> {
    Bytes d(4096, std::byte{7});
    co_return co_await n->write(5 << 20, d, 0);
  };
  ASSERT_EQ(run(write(node)), 0);  // tracking starts: IN_USE on disk first
  check_events(*recorder, "first write");
  ASSERT_EQ(run(node->close()), 0);
  check_events(*recorder, "close");
  EXPECT_GT(checked, 10u);
  const test::CommandResult r = run_command("qemu-img check " + path("c.qcow2"));
  EXPECT_EQ(r.exit_code, 0) << r.output;
  const std::string info = must_run("qemu-img info " + path("c.qcow2"));
  EXPECT_NE(info.find("name: b3"), std::string::npos) << info;
  EXPECT_EQ(info.find("name: b2"), std::string::npos) << info;
  EXPECT_EQ(info.find("in-use"), std::string::npos) << info;
}

}  // namespace
}  // namespace spindle::block::qcow2
