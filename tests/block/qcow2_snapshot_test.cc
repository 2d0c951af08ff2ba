// qcow2 internal snapshots: the snapshot table codec (byte for byte against tables qemu-img
// 7.2 wrote, and every malformed field refused with EINVAL, never a crash), and Qcow2Node's
// create/apply/delete checked by our checker and by `qemu-img check` after every step, with
// guest contents read back, and crash-safe: the file as a crash after any write could leave
// it has no cluster referenced more often than counted.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <sstream>
#include <utility>
#include <string>
#include <vector>

#include "aio/context.h"
#include "base/byte_order.h"
#include "block/drivers/file.h"
#include "block/drivers/filter_node.h"
#include "block/formats/qcow2/check.h"
#include "block/formats/qcow2/format.h"
#include "block/formats/qcow2/qcow2_node.h"
#include "block/formats/qcow2/snapshot_table.h"
#include "coro/block_on.h"
#include "coro/task.h"
#include "support/recording_node.h"
#include "support/shell_command.h"
#include "support/qcow2_node_fixture.h"

namespace spindle::block::qcow2 {
namespace {

namespace fs = std::filesystem;
using Bytes = std::vector<std::byte>;
using test::RecordingNode;
using test::apply_event;
using test::must_run;
using test::read_file_bytes;
using test::run_command;

SnapshotEntry entry(std::string id, std::string name) {
  SnapshotEntry s;
  s.l1_table_offset = 0x30000;
  s.l1_size = 1;
  s.id = std::move(id);
  s.name = std::move(name);
  s.date_sec = 1700000000;
  s.date_nsec = 123000;
  s.vm_clock_nsec = 3'723'456'000'000ull;
  s.vm_state_size = 4096;
  s.disk_size = 1 << 20;
  s.icount = 42;
  return s;
}

Header header_for(std::uint32_t count, std::uint64_t offset = 0x10000) {
  Header h;
  h.cluster_bits = 16;
  h.size = 1 << 20;
  h.l1_size = 1;
  h.nb_snapshots = count;
  h.snapshots_offset = offset;
  return h;
}

// A file holding `table` at 0x10000.
constexpr std::uint64_t kFileSize = 0x100000;

TEST(Qcow2SnapshotTable, RoundTripsAndFramesLikeQemu) {
  std::vector<SnapshotEntry> table = {entry("1", "first"), entry("12", "a longer name")};
  table[1].icount.reset();
  table[1].unknown_extra = Bytes(8, std::byte{0x5a});
  BlockResult<Bytes> bytes = encode_snapshot_table(table);
  ASSERT_TRUE(bytes.ok()) << bytes.error().message;
  // Entry 0: 40 + 24 + 1 + 5 = 70, padded to 72; entry 1: 40 + 32 + 2 + 13 = 87.
  ASSERT_EQ(bytes.value().size(), 72u + 87u);
  EXPECT_EQ(snapshot_table_extent(bytes.value(), 2), 72u + 87u);
  EXPECT_EQ(snapshot_table_extent(std::span(bytes.value()).first(100), 2), 0u);
  EXPECT_EQ(base::load_be32(bytes.value().data() + 36), 24u);
  EXPECT_EQ(base::load_be64(bytes.value().data() + 72 + 40 + 16), ~0ull);  // no icount

  BlockResult<std::vector<SnapshotEntry>> decoded =
      decode_snapshot_table(bytes.value(), header_for(2), kFileSize, 1 << 20);
  ASSERT_TRUE(decoded.ok()) << decoded.error().message;
  ASSERT_EQ(decoded.value().size(), 2u);
  for (std::size_t i = 0; i < 2; ++i) {
    const SnapshotEntry& a = table[i];
    const SnapshotEntry& b = decoded.value()[i];
    EXPECT_EQ(a.id, b.id);
    EXPECT_EQ(a.name, b.name);
    EXPECT_EQ(a.l1_table_offset, b.l1_table_offset);
    EXPECT_EQ(a.l1_size, b.l1_size);
    EXPECT_EQ(a.date_sec, b.date_sec);
    EXPECT_EQ(a.date_nsec, b.date_nsec);
    EXPECT_EQ(a.vm_clock_nsec, b.vm_clock_nsec);
    EXPECT_EQ(a.vm_state_size, b.vm_state_size);
    EXPECT_EQ(a.disk_size, b.disk_size);
    EXPECT_EQ(a.icount, b.icount);
    EXPECT_EQ(a.unknown_extra, b.unknown_extra);
  }
  BlockResult<Bytes> again = encode_snapshot_table(decoded.value());
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again.value(), bytes.value());
}

TEST(Qcow2SnapshotTable, ShortExtraDataReadsAsQemuReadsIt) {
  // Version 2 entries written by old QEMU: no extra data; the 32-bit VM state size, the
  // image's size as the disk size, no icount.
  Bytes raw(48, std::byte{0});
  base::store_be64(raw.data(), 0x30000);
  base::store_be32(raw.data() + 8, 1);
  base::store_be16(raw.data() + 12, 1);
  base::store_be16(raw.data() + 14, 2);
  base::store_be32(raw.data() + 32, 777);
  std::memcpy(raw.data() + 40, "7ab", 3);
  BlockResult<std::vector<SnapshotEntry>> decoded =
      decode_snapshot_table(raw, header_for(1), kFileSize, 5 << 20);
  ASSERT_TRUE(decoded.ok()) << decoded.error().message;
  EXPECT_EQ(decoded.value()[0].id, "7");
  EXPECT_EQ(decoded.value()[0].name, "ab");
  EXPECT_EQ(decoded.value()[0].vm_state_size, 777u);
  EXPECT_EQ(decoded.value()[0].disk_size, 5u << 20);
  EXPECT_FALSE(decoded.value()[0].icount.has_value());
}

TEST(Qcow2SnapshotTable, RefusesMalformedTables) {
  BlockResult<Bytes> good = encode_snapshot_table({entry("1", "a"), entry("2", "b")});
  ASSERT_TRUE(good.ok());
  const Bytes bytes = good.value();
  auto decode = [&](const Bytes& b, const Header& h, std::uint64_t file_size = kFileSize) {
    return decode_snapshot_table(b, h, file_size, 1 << 20);
  };
  // Unaligned or zero table offset.
  EXPECT_EQ(decode(bytes, header_for(2, 0x10200)).error().error, EINVAL);
  EXPECT_EQ(decode(bytes, header_for(2, 0)).error().error, EINVAL);
  // Too many entries.
  EXPECT_EQ(decode(bytes, header_for(kMaxSnapshotCount + 1)).error().error, EINVAL);
  // The table starts, or runs, past the end of the file.
  EXPECT_EQ(decode(bytes, header_for(2, 0x200000)).error().error, EINVAL);
  EXPECT_EQ(decode(bytes, header_for(2), 0x10000 + 100).error().error, EINVAL);
  // More entries than the bytes hold.
  EXPECT_EQ(decode(bytes, header_for(3)).error().error, EINVAL);
  // Extra data over 1024 bytes (the extent stops there too, so readers need not read on).
  Bytes big_extra = bytes;
  base::store_be32(big_extra.data() + 36, 1025);
  EXPECT_EQ(decode(big_extra, header_for(2)).error().error, EINVAL);
  EXPECT_NE(snapshot_table_extent(big_extra, 2), 0u);
  // Name running past the bytes.
  Bytes long_name = bytes;
  base::store_be16(long_name.data() + 72 + 14, 0xffff);
  EXPECT_EQ(decode(long_name, header_for(2)).error().error, EINVAL);
  // Every prefix of a good table fails cleanly.
  for (std::size_t n = 0; n < bytes.size(); ++n) {
    const Bytes prefix(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(n));
    EXPECT_FALSE(decode(prefix, header_for(2)).ok()) << n;
  }
  // Encoding refuses what the format cannot hold.
  EXPECT_EQ(encode_snapshot_table({entry("1", std::string(70000, 'x'))}).error().error, EINVAL);
}

TEST(Qcow2SnapshotTable, ValidatesSnapshotL1Tables) {
  const Header h = header_for(1);
  SnapshotEntry s = entry("1", "a");
  EXPECT_TRUE(validate_snapshot_l1(s, h, kFileSize).ok());
  s.l1_table_offset = 0x30200;  // unaligned
  EXPECT_EQ(validate_snapshot_l1(s, h, kFileSize).error, EINVAL);
  s.l1_table_offset = 0;
  EXPECT_EQ(validate_snapshot_l1(s, h, kFileSize).error, EINVAL);
  s.l1_table_offset = kFileSize;  // outside the file
  EXPECT_EQ(validate_snapshot_l1(s, h, kFileSize).error, EINVAL);
  s = entry("1", "a");
  s.l1_size = kMaxSnapshotL1Entries + 1;
  EXPECT_EQ(validate_snapshot_l1(s, h, 1ull << 40).error, EINVAL);
  s = entry("1", "a");
  s.disk_size = 1ull << 40;  // needs more L1 entries than it has
  EXPECT_EQ(validate_snapshot_l1(s, h, kFileSize).error, EINVAL);
}

// ---- Qcow2Node, against qemu-img ----------------------------------------------------------

void write_file(const std::string& path, const Bytes& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

// qemu-img check's findings other than leaks and COPIED bits that disagree with a refcount
// (the window between writing refcounts and writing the L2 tables naming them, as in QEMU):
// a cluster referenced more often than counted, a bad table, ...
std::string harmful_findings(const std::string& output) {
  std::istringstream lines(output);
  std::string line, found;
  while (std::getline(lines, line)) {
    if (line.find("ERROR") == std::string::npos && line.find("Warning") == std::string::npos) {
      continue;
    }
    if (line.find("OFLAG_COPIED") != std::string::npos) continue;
    found += line + "\n";
  }
  return found;
}

class Qcow2SnapshotNodeTest : public test::Qcow2NodeFixture<testing::TestWithParam<std::string>> {
 protected:
  Qcow2SnapshotNodeTest() : Qcow2NodeFixture("spindle-qcow2snap") {}
  static coro::Task<int> write_pattern(BlockNodeRef node, std::uint64_t offset, std::size_t n,
                                       std::uint8_t byte) {
    Bytes data(n, std::byte{byte});
    co_return co_await node->write(offset, data, 0);
  }
  static coro::Task<int> read_back(BlockNodeRef node, std::uint64_t offset, Bytes& out) {
    co_return co_await node->read(offset, out, 0);
  }
  void expect_clean(const std::string& name) {
    const test::CommandResult r = run_command("qemu-img check " + path(name));
    EXPECT_EQ(r.exit_code, 0) << r.output;
  }
  void expect_content(const std::shared_ptr<Qcow2Node>& node, std::uint64_t offset,
                      std::size_t n, std::uint8_t byte) {
    Bytes out(n);
    ASSERT_EQ(run(read_back(node, offset, out)), 0);
    EXPECT_EQ(out, Bytes(n, std::byte{byte})) << "at " << offset;
  }

};

TEST_P(Qcow2SnapshotNodeTest, CreateApplyDeleteKeepTheImageConsistent) {
  REQUIRE_QEMU();
  must_run("qemu-img create -q -f qcow2 " + GetParam() + " " + path("s.qcow2") + " 8M");
  must_run("qemu-io -c 'write -P 0xa1 0 3M' -c 'write -c -P 0xa2 4M 64k' " + path("s.qcow2"));
  {
    auto node = open("s.qcow2");
    ASSERT_TRUE(node);
    SnapshotEntry s;
    s.name = "one";
    BlockError e = run(node->create_snapshot(s));
    ASSERT_TRUE(e.ok()) << e.message;
    e = run(node->create_snapshot(s));  // duplicate names are allowed, as in QEMU
    ASSERT_TRUE(e.ok()) << e.message;
    s.id = "1";
    EXPECT_EQ(run(node->create_snapshot(s)).error, EEXIST);
    ASSERT_EQ(run(write_pattern(node, 1 << 20, 1 << 20, 0xb1)), 0);
    ASSERT_EQ(run(node->flush()), 0);
  }
  expect_clean("s.qcow2");
  const std::string listed = must_run("qemu-img snapshot -l " + path("s.qcow2"));
  EXPECT_NE(listed.find("1         one"), std::string::npos) << listed;
  EXPECT_NE(listed.find("2         one"), std::string::npos) << listed;
  {
    auto node = open("s.qcow2");
    ASSERT_TRUE(node);
    expect_content(node, 1 << 20, 1 << 20, 0xb1);
    EXPECT_EQ(run(node->apply_snapshot("nope")).error, ENOENT);
    BlockError e = run(node->apply_snapshot("1"));
    ASSERT_TRUE(e.ok()) << e.message;
    expect_content(node, 0, 3 << 20, 0xa1);
    expect_content(node, 4 << 20, 64 << 10, 0xa2);
    // Writes after an apply copy on write: the snapshot keeps its content.
    ASSERT_EQ(run(write_pattern(node, 0, 4096, 0xc1)), 0);
    ASSERT_EQ(run(node->flush()), 0);
  }
  expect_clean("s.qcow2");
  {
    auto node = open("s.qcow2");
    ASSERT_TRUE(node);
    EXPECT_EQ(run(node->delete_snapshot("nope")).error, ENOENT);
    BlockError e = run(node->delete_snapshot("one"));
    ASSERT_TRUE(e.ok()) << e.message;
    e = run(node->delete_snapshot("one"));
    ASSERT_TRUE(e.ok()) << e.message;
    BlockResult<std::vector<SnapshotEntry>> left = run(node->snapshots());
    ASSERT_TRUE(left.ok());
    EXPECT_TRUE(left.value().empty());
    expect_content(node, 0, 4096, 0xc1);
    expect_content(node, 4096, (3 << 20) - 4096, 0xa1);
  }
  expect_clean("s.qcow2");
  // With no snapshot left every cluster is COPIED again: qemu-img check counts no errors,
  // and our checker agrees.
  const std::string header = must_run("qemu-img info " + path("s.qcow2"));
  EXPECT_EQ(header.find("Snapshot list"), std::string::npos) << header;
  auto file = open_file(path("s.qcow2"), true);
  ASSERT_TRUE(file.ok());
  auto node = open("s.qcow2", true);
  ASSERT_TRUE(node);
  const CheckReport report = run(check_image(*node->file(), node->header(), RepairMode::kNone));
  EXPECT_EQ(report.corruptions, 0u);
  EXPECT_EQ(report.leaks, 0u);
}

TEST_P(Qcow2SnapshotNodeTest, RefusesBadTablesCleanly) {
  REQUIRE_QEMU();
  must_run("qemu-img create -q -f qcow2 " + GetParam() + " " + path("b.qcow2") + " 1M");
  must_run("qemu-img snapshot -c s " + path("b.qcow2"));
  const Bytes head = read_file_bytes(path("b.qcow2"));
  const std::uint64_t table = base::load_be64(head.data() + 64);
  // A snapshot L1 table offset that is not cluster aligned.
  std::byte raw[8];
  base::store_be64(raw, 0x10200);
  const int fd = ::open(path("b.qcow2").c_str(), O_WRONLY);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::pwrite(fd, raw, 8, static_cast<off_t>(table)), 8);
  ::close(fd);
  auto node = open("b.qcow2");
  ASSERT_TRUE(node);
  EXPECT_TRUE(run(node->snapshots()).ok());  // listed, as QEMU lists it
  EXPECT_EQ(run(node->apply_snapshot("s")).error, EINVAL);
  EXPECT_EQ(run(node->delete_snapshot("s")).error, EINVAL);
  auto read_only = open("b.qcow2", true);
  SnapshotEntry s;
  s.name = "x";
  EXPECT_EQ(run(read_only->create_snapshot(s)).error, EROFS);
}

TEST_P(Qcow2SnapshotNodeTest, ACrashAtAnyPointLeavesAtWorstLeaks) {
  REQUIRE_QEMU();
  must_run("qemu-img create -q -f qcow2 " + GetParam() + " " + path("c.qcow2") + " 4M");
  must_run("qemu-io -c 'write -P 0x31 0 1M' -c 'write -P 0x32 2M 64k' " + path("c.qcow2"));
  Bytes durable = read_file_bytes(path("c.qcow2"));  // as of the last flush
  Bytes in_order = durable;
  std::size_t checked = 0;
  auto check_events = [&](RecordingNode& recorder, const char* step) {
    const std::string crash = path("crash.qcow2");
    auto check = [&](const Bytes& image, std::size_t index, const char* how) {
      write_file(crash, image);
      const test::CommandResult r = run_command("qemu-img check -f qcow2 '" + crash + "'");
      EXPECT_EQ(harmful_findings(r.output), "")
          << step << ": " << how << " crash after write " << index << "\n" << r.output;
      EXPECT_EQ(run_command("qemu-img snapshot -l '" + crash + "'").exit_code, 0);
      ++checked;
    };
    const std::vector<RecordingNode::Event> events = recorder.take_events();
    for (std::size_t i = 0; i < events.size() && !HasFailure(); ++i) {
      if (events[i].flush) {
        durable = in_order;
        continue;
      }
      apply_event(in_order, events[i]);
      check(in_order, i, "in-order");
      Bytes only_this = durable;  // of the writes since the last flush, only this one
      apply_event(only_this, events[i]);
      check(only_this, i, "reordered");
    }
    durable = in_order;
  };
  base::Result<BlockNodeRef> file = open_file(path("c.qcow2"), false);
  ASSERT_TRUE(file.ok());
  auto recorder = std::make_shared<RecordingNode>(file.value());
  BlockResult<BlockNodeRef> opened = run(open_qcow2(recorder, FormatOpenOptions{}));
  ASSERT_TRUE(opened.ok()) << opened.error().message;
  auto node = std::dynamic_pointer_cast<Qcow2Node>(opened.value());
  ASSERT_TRUE(node);
  recorder->take_events();  // opening writes nothing that matters here
  SnapshotEntry s;
  s.name = "c1";
  ASSERT_TRUE(run(node->create_snapshot(s)).ok());
  check_events(*recorder, "create");
  ASSERT_EQ(run(write_pattern(node, 0, 128 << 10, 0x41)), 0);
  ASSERT_EQ(run(node->flush()), 0);
  recorder->take_events();
  in_order = durable = read_file_bytes(path("c.qcow2"));
  ASSERT_TRUE(run(node->apply_snapshot("c1")).ok());
  check_events(*recorder, "apply");
  ASSERT_TRUE(run(node->delete_snapshot("c1")).ok());
  check_events(*recorder, "delete");
  EXPECT_GT(checked, 10u);
  expect_clean("c.qcow2");
}

std::string geometry_name(const testing::TestParamInfo<std::string>& info) {
  static const char* const kNames[] = {"c64k", "c4k", "v2", "v2c4k", "ext", "rc8"};
  return kNames[info.index];
}

INSTANTIATE_TEST_SUITE_P(Geometry, Qcow2SnapshotNodeTest,
                         testing::Values("-o cluster_size=65536", "-o cluster_size=4096",
                                         "-o compat=0.10", "-o cluster_size=4096,compat=0.10",
                                         "-o extended_l2=on,cluster_size=65536",
                                         "-o refcount_bits=8"),
                         geometry_name);

}  // namespace
}  // namespace spindle::block::qcow2
