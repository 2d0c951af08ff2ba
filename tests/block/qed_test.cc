// QED driver tests (reference/qed.md): header encoding and geometry, create (byte-identical to
// qemu-img's), open validation of hostile headers, reads of images qemu-img/qemu-io wrote
// (cluster sizes 4K..1M, table sizes 1..16, zero clusters, 3-deep raw/qed backing chains,
// sizes that are not a cluster multiple), writes through our driver checked by qemu-img check,
// convert and map, copy-on-write from backing files, zero writes, the NEED_CHECK bit, resize,
// check/repair counts against `qemu-img check --output=json`, backing-chain loops, and
// concurrent writers on two IoThreads. Tests that need qemu-img skip when it is missing.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "aio/context.h"
#include "aio/io_thread.h"
#include "base/byte_order.h"
#include "block/drivers/file.h"
#include "block/image_chain.h"
#include "block/formats/qed/create.h"
#include "block/formats/qed/format.h"
#include "block/formats/qed/qed_node.h"
#include "coro/block_on.h"
#include "coro/task.h"
#include "support/shell_command.h"
#include "support/temp_dir.h"

// The tests build CreateOptions with designated initializers that leave the rest defaulted.
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"

namespace spindle::block::qed {
namespace {

namespace fs = std::filesystem;
using Bytes = std::vector<std::byte>;
using test::CommandResult;
using test::must_run;
using test::read_file_bytes;
using test::run_command;

// --- helpers -------------------------------------------------------------------------------

void patch_file(const std::string& path, std::uint64_t offset, const void* data, std::size_t size) {
  const int fd = ::open(path.c_str(), O_WRONLY);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::pwrite(fd, data, size, static_cast<off_t>(offset)), static_cast<ssize_t>(size));
  ::close(fd);
}
void patch_le64(const std::string& path, std::uint64_t offset, std::uint64_t value) {
  std::byte bytes[8];
  base::store_le64(bytes, value);
  patch_file(path, offset, bytes, 8);
}
void patch_le32(const std::string& path, std::uint64_t offset, std::uint32_t value) {
  std::byte bytes[4];
  base::store_le32(bytes, value);
  patch_file(path, offset, bytes, 4);
}
std::uint64_t file_le64(const std::string& path, std::uint64_t offset) {
  const Bytes bytes = read_file_bytes(path);
  return base::load_le64(bytes.data() + offset);
}

Bytes pattern(std::size_t size, std::uint8_t value) { return Bytes(size, std::byte{value}); }

class QedTest : public testing::Test {
 protected:
  std::string path(const std::string& name) const { return dir_ + "/" + name; }

  template <typename T>
  T run(coro::Task<T> task) {
    return coro::block_on(*context_, std::move(task));
  }

  ChainOptions chain_options(bool read_only) {
    ChainOptions options;
    options.read_only = read_only;
    options.open_file = [](const std::string& file, bool ro) { return open_file(file, ro); };
    return options;
  }

  // Opens an image (and its backing chain) through our driver; fails the test on error.
  BlockNodeRef open_image(const std::string& name, bool read_only = false,
                          const std::string& format = "qed") {
    BlockResult<BlockNodeRef> node = run(open_image_chain(path(name), format, chain_options(read_only)));
    EXPECT_TRUE(node.ok()) << node.error().message;
    return node.ok() ? node.value() : nullptr;
  }

  BlockResult<BlockNodeRef> try_open(const std::string& name, bool read_only = false) {
    return run(open_image_chain(path(name), "qed", chain_options(read_only)));
  }

  // Creates an image through our driver.
  void create(const std::string& name, CreateOptions options) {
    base::Result<BlockNodeRef> file = open_file(path(name), FileOptions{false, false, true});
    ASSERT_TRUE(file.ok());
    const BlockError error = run(create_qed(*file.value(), options));
    ASSERT_TRUE(error.ok()) << error.message;
  }

  Bytes read_all(BlockNode& node) {
    Bytes bytes(node.size());
    EXPECT_EQ(run(node.read(0, std::span(bytes), 0)), 0);
    return bytes;
  }

  int write(BlockNode& node, std::uint64_t offset, const Bytes& data) {
    return run(node.write(offset, std::span<const std::byte>(data), 0));
  }

  int close(BlockNode& node) { return run(node.close()); }

  // `qemu-img convert -O raw` of an image, read back.
  Bytes qemu_raw(const std::string& name, const std::string& format = "qed") {
    const std::string out = path(name + ".converted.raw");
    must_run("qemu-img convert -f " + format + " -O raw '" + path(name) + "' '" + out + "'");
    Bytes bytes = read_file_bytes(out);
    fs::remove(out);
    return bytes;
  }

  std::string qemu_io(const std::string& name, const std::string& commands,
                      const std::string& format = "qed") {
    return must_run("cd '" + dir_ + "' && qemu-io -f " + format + " " + commands + " '" + name + "'");
  }

  CheckResult our_check(const std::string& name, bool repair) {
    BlockResult<QedNodeRef> node = [&] {
      base::Result<BlockNodeRef> file = open_file(path(name), !repair);
      EXPECT_TRUE(file.ok());
      OpenOptions options;
      options.read_only = !repair;
      options.repair_if_dirty = false;
      options.ignore_backing = true;
      return run(open_qed(file.value(), options));
    }();
    EXPECT_TRUE(node.ok()) << node.error().message;
    if (!node.ok()) return {};
    CheckResult result = run(node.value()->check(repair));
    if (repair) {
      EXPECT_EQ(close(*node.value()), 0);
    }
    return result;
  }

  test::TempDir temp_{"spindle-qed"};
  const std::string& dir_ = temp_.dir();
  aio::ContextRef context_ = aio::Context::create("qed-test");
};

// Extracts an integer field of `qemu-img check --output=json` (0 when omitted, as qemu-img does).
std::uint64_t json_field(const std::string& json, const std::string& field) {
  const std::string key = "\"" + field + "\":";
  const std::size_t at = json.find(key);
  if (at == std::string::npos) return 0;
  return std::stoull(json.substr(at + key.size()));
}

struct QemuCheck {
  int exit_code;
  std::string json;
};
QemuCheck qemu_check(const std::string& file, const std::string& extra = "") {
  const CommandResult result =
      run_command("qemu-img check -f qed --output=json " + extra + " '" + file + "'");
  return {result.exit_code, result.output};
}

// --- format ---------------------------------------------------------------------------------

TEST(QedFormatTest, HeaderEncodesLittleEndianAndRoundTrips) {
  Header header;
  header.cluster_size = 65536;
  header.table_size = 4;
  header.l1_table_offset = 0x10000;
  header.image_size = 0x40000000;
  header.features = kFeatureBackingFile | kFeatureBackingFormatNoProbe;
  header.backing_filename_offset = 64;
  header.backing_filename_size = 8;
  std::array<std::byte, kHeaderBytes> bytes{};
  encode_header(header, bytes);
  EXPECT_EQ(bytes[0], std::byte{'Q'});
  EXPECT_EQ(bytes[1], std::byte{'E'});
  EXPECT_EQ(bytes[2], std::byte{'D'});
  EXPECT_EQ(bytes[3], std::byte{0});
  EXPECT_EQ(bytes[6], std::byte{1});    // 0x00010000 little-endian
  EXPECT_EQ(bytes[16], std::byte{5});   // features
  EXPECT_EQ(bytes[56], std::byte{64});  // backing name offset
  const Header back = decode_header(bytes);
  EXPECT_EQ(back.cluster_size, header.cluster_size);
  EXPECT_EQ(back.l1_table_offset, header.l1_table_offset);
  EXPECT_EQ(back.image_size, header.image_size);
  EXPECT_EQ(back.features, header.features);
  EXPECT_EQ(back.backing_filename_size, 8u);
}

TEST(QedFormatTest, GeometryAndMaximumSizesWithoutOverflow) {
  const Geometry g = Geometry::make(65536, 4);
  EXPECT_EQ(g.table_entries, 32768u);
  EXPECT_EQ(g.max_image_size, 64ull << 40);  // 64 TiB
  EXPECT_EQ(g.l1_index(0x123456789ull), 2u);
  EXPECT_EQ(g.l2_index(0x123456789ull), 0x2345u);
  EXPECT_EQ(g.in_cluster(0x123456789ull), 0x6789u);
  EXPECT_EQ(Geometry::make(4096, 1).max_image_size, 1ull << 30);
  // 64M clusters, 16-cluster tables: 2^(2*27+26) overflows u64 in QEMU; we saturate.
  EXPECT_EQ(Geometry::make(64u << 20, 16).max_image_size, UINT64_MAX);
  EXPECT_EQ(Geometry::make(64u << 20, 16).l2_end(UINT64_MAX - 10), UINT64_MAX);
  EXPECT_TRUE(is_image_size_valid(g, 64ull << 40));
  EXPECT_FALSE(is_image_size_valid(g, (64ull << 40) + 512));
  EXPECT_FALSE(is_image_size_valid(g, 1000));
}

// --- create ---------------------------------------------------------------------------------

TEST_F(QedTest, CreateIsByteIdenticalToQemuImg) {
  REQUIRE_QEMU();
  must_run("qemu-img create -q -f qed '" + path("theirs.qed") + "' 1G");
  create("ours.qed", CreateOptions{.size = 1ull << 30});
  EXPECT_EQ(read_file_bytes(path("ours.qed")), read_file_bytes(path("theirs.qed")));
  EXPECT_EQ(fs::file_size(path("ours.qed")), 327680u);

  must_run("qemu-img create -q -f raw '" + path("base.raw") + "' 1M");
  must_run("cd '" + dir_ + "' && qemu-img create -q -f qed -o cluster_size=4096,table_size=2 "
           "-b base.raw -F raw theirs2.qed 1000");
  create("ours2.qed", CreateOptions{.size = 1000, .cluster_size = 4096, .table_size = 2,
                                    .backing_file = "base.raw", .backing_format = "raw"});
  EXPECT_EQ(read_file_bytes(path("ours2.qed")), read_file_bytes(path("theirs2.qed")));
  EXPECT_EQ(qemu_check(path("ours2.qed")).exit_code, 0);
}

TEST_F(QedTest, CreateRejectsInvalidOptions) {
  base::Result<BlockNodeRef> file = open_file(path("x.qed"), FileOptions{false, false, true});
  ASSERT_TRUE(file.ok());
  auto expect_error = [&](CreateOptions options) {
    const BlockError error = run(create_qed(*file.value(), options));
    EXPECT_EQ(error.error, EINVAL);
    EXPECT_FALSE(error.message.empty());
  };
  expect_error({.size = 1 << 20, .cluster_size = 3000});
  expect_error({.size = 1 << 20, .cluster_size = 2048});
  expect_error({.size = 1 << 20, .cluster_size = 128u << 20});
  expect_error({.size = 1 << 20, .table_size = 3});
  expect_error({.size = 1 << 20, .table_size = 32});
  expect_error({.size = (1ull << 30) + 512, .cluster_size = 4096, .table_size = 1});
  expect_error({.size = UINT64_MAX});
  expect_error({.size = 1 << 20, .cluster_size = 4096, .backing_file = std::string(5000, 'a')});
}

// --- reading images qemu wrote --------------------------------------------------------------

struct Layout {
  std::uint32_t cluster_size;
  std::uint32_t table_size;
};

class QedQemuImageTest : public QedTest, public testing::WithParamInterface<Layout> {};

TEST_P(QedQemuImageTest, ReadsWhatQemuIoWrote) {
  REQUIRE_QEMU();
  const auto [cluster_size, table_size] = GetParam();
  const std::uint64_t l2_span = std::uint64_t{cluster_size} * (cluster_size * table_size / 8);
  // A size that is not a cluster multiple and spans at least three L2 tables (when allowed).
  const std::uint64_t size = std::min<std::uint64_t>(l2_span * 3, 64ull << 20) + 512 * 3;
  must_run("qemu-img create -q -f qed -o cluster_size=" + std::to_string(cluster_size) +
           ",table_size=" + std::to_string(table_size) + " '" + path("a.qed") + "' " +
           std::to_string(size));
  const std::uint64_t cs = cluster_size;
  std::string commands = "-c 'write -P 0xab 0 " + std::to_string(cs + 4096) + "'";
  commands += " -c 'write -P 0x11 " + std::to_string(3 * cs + 512) + " 1024'";
  commands += " -c 'write -z " + std::to_string(5 * cs) + " " + std::to_string(2 * cs) + "'";
  commands += " -c 'write -P 0x22 " + std::to_string(size - 1024) + " 1024'";
  if (l2_span < size) {
    commands += " -c 'write -P 0x33 " + std::to_string(l2_span - 4096) + " 8192'";
  }
  if (table_size > 1) {  // QEMU cannot open table_size=1 images (reference/qed.md §5.1-A)
    qemu_io("a.qed", commands);
  }
  BlockNodeRef node = open_image("a.qed", true);
  ASSERT_TRUE(node);
  EXPECT_EQ(node->size(), size);
  const Bytes ours = read_all(*node);
  if (table_size > 1) {
    EXPECT_EQ(ours, qemu_raw("a.qed"));
    // Spot checks against the pattern, independent of convert.
    EXPECT_EQ(ours[0], std::byte{0xab});
    EXPECT_EQ(ours[cs + 4095], std::byte{0xab});
    EXPECT_EQ(ours[cs + 4096], std::byte{0});
    EXPECT_EQ(ours[3 * cs + 512], std::byte{0x11});
    EXPECT_EQ(ours[size - 1], std::byte{0x22});
  } else {
    EXPECT_EQ(ours, Bytes(size));
  }
  // block_status: cluster 0 data, cluster 5 a zero cluster, cluster 2 unallocated.
  if (table_size > 1) {
    BlockStatus status = run(node->block_status(0, cs));
    EXPECT_EQ(status.flags & (kStatusData | kStatusOffsetValid), kStatusData | kStatusOffsetValid);
    status = run(node->block_status(5 * cs, 2 * cs));
    EXPECT_EQ(status.flags & (kStatusZero | kStatusData | kStatusAllocated),
              kStatusZero | kStatusAllocated);
    EXPECT_EQ(status.bytes, 2 * cs);
    status = run(node->block_status(2 * cs, cs));
    EXPECT_EQ(status.flags & (kStatusData | kStatusAllocated), 0u);
  }
}

INSTANTIATE_TEST_SUITE_P(Layouts, QedQemuImageTest,
                         testing::Values(Layout{4096, 1}, Layout{4096, 2}, Layout{4096, 16},
                                         Layout{8192, 4}, Layout{65536, 4}, Layout{65536, 16},
                                         Layout{1 << 20, 2}, Layout{1 << 20, 16}),
                         [](const testing::TestParamInfo<Layout>& info) {
                           return "c" + std::to_string(info.param.cluster_size / 1024) + "k_t" +
                                  std::to_string(info.param.table_size);
                         });

TEST_F(QedTest, ReadsThreeLevelBackingChainsQemuWrote) {
  REQUIRE_QEMU();
  for (const char* middle_format : {"raw", "qed"}) {
    SCOPED_TRACE(middle_format);
    // base.raw <- mid.qed (-F raw) <- top.qed (-F qed); or base.qed <- mid.qed <- top.qed.
    const std::string base_format = middle_format;
    const std::string base = "base." + base_format;
    must_run("qemu-img create -q -f " + base_format + " '" + path(base) + "' 3M");
    qemu_io(base, "-c 'write -P 0x01 0 3M'", base_format);
    must_run("cd '" + dir_ + "' && qemu-img create -q -f qed -o cluster_size=4096 -b " + base +
             " -F " + base_format + " mid.qed 4M");
    qemu_io("mid.qed", "-c 'write -P 0x02 8192 8192' -c 'write -z 65536 4096' -c 'write -P 0x05 "
                       "3145728 4096'");
    must_run("cd '" + dir_ + "' && qemu-img create -q -f qed -b mid.qed -F qed top.qed 5M");
    qemu_io("top.qed", "-c 'write -P 0x03 12288 512' -c 'write -P 0x04 4194304 65536'");
    BlockNodeRef node = open_image("top.qed", true);
    ASSERT_TRUE(node);
    const Bytes ours = read_all(*node);
    EXPECT_EQ(ours, qemu_raw("top.qed"));
    EXPECT_EQ(ours[0], std::byte{0x01});
    EXPECT_EQ(ours[8192], std::byte{0x02});
    EXPECT_EQ(ours[12288], std::byte{0x03});
    EXPECT_EQ(ours[65536], std::byte{0});
    EXPECT_EQ(ours[3145728], std::byte{0x05});
    EXPECT_EQ(ours[3145728 + 4096], std::byte{0});  // past the base's end
    EXPECT_EQ(ours[4194304], std::byte{0x04});
    close(*node);
    for (const char* name : {"top.qed", "mid.qed", base.c_str()}) fs::remove(path(name));
  }
}

// replace_child("backing") (blockdev-reopen's backing): unallocated clusters read from the new
// backing node, or as zeros with none; allocated ones stay the image's own; "file" is fixed.
TEST_F(QedTest, ReplacedBackingServesUnallocatedClusters) {
  REQUIRE_QEMU();
  must_run("qemu-img create -q -f raw '" + path("one.raw") + "' 1M");
  qemu_io("one.raw", "-c 'write -P 0x11 0 1M'", "raw");
  must_run("qemu-img create -q -f raw '" + path("two.raw") + "' 1M");
  qemu_io("two.raw", "-c 'write -P 0x22 0 1M'", "raw");
  must_run("cd '" + dir_ + "' && qemu-img create -q -f qed -b one.raw -F raw top.qed 1M");
  qemu_io("top.qed", "-c 'write -P 0x33 512k 64k'");
  BlockNodeRef top = open_image("top.qed");
  ASSERT_TRUE(top);
  base::Result<BlockNodeRef> two = open_file(path("two.raw"), true);
  ASSERT_TRUE(two.ok());
  EXPECT_EQ(read_all(*top)[0], std::byte{0x11});
  EXPECT_EQ(top->replace_child("file", two.value()), -ENOTSUP);
  ASSERT_EQ(top->replace_child("backing", two.value()), 0);
  EXPECT_EQ(top->backing_node(), two.value().get());
  Bytes now = read_all(*top);
  EXPECT_EQ(now[0], std::byte{0x22});
  EXPECT_EQ(now[512 * 1024], std::byte{0x33});
  ASSERT_EQ(top->replace_child("backing", nullptr), 0);
  now = read_all(*top);
  EXPECT_EQ(now[0], std::byte{0});
  EXPECT_EQ(now[512 * 1024], std::byte{0x33});
  EXPECT_EQ(close(*top), 0);
}

// --- writing through our driver -------------------------------------------------------------

TEST_F(QedTest, OurWritesPassQemuCheckAndReadBackIdentically) {
  REQUIRE_QEMU();
  const std::uint64_t cs = 4096;
  const std::uint64_t size = 8ull << 20;  // 4K/2: one L2 table covers 4 MiB
  create("w.qed", CreateOptions{.size = size, .cluster_size = 4096, .table_size = 2});
  Bytes model(size);
  {
    BlockNodeRef node = open_image("w.qed");
    ASSERT_TRUE(node);
    auto put = [&](std::uint64_t offset, std::size_t length, std::uint8_t value) {
      const Bytes data = pattern(length, value);
      ASSERT_EQ(write(*node, offset, data), 0);
      std::memcpy(model.data() + offset, data.data(), length);
    };
    put(512, 1024, 0xa1);                      // partial cluster
    put(3 * cs, 5 * cs, 0xa2);                 // several clusters, one run
    put(4 * cs + 512, 512, 0xa3);              // in place
    put((4ull << 20) - 2048, 4096, 0xa4);      // crosses the L2 boundary
    put(size - 512, 512, 0xa5);                // last sector
    ASSERT_EQ(run(node->write_zeroes(3 * cs, cs, 0)), 0);  // allocated: zeros in place
    std::memset(model.data() + 3 * cs, 0, cs);
    ASSERT_EQ(run(node->write_zeroes(20 * cs, 3 * cs, 0)), 0);  // zero clusters
    ASSERT_EQ(run(node->write_zeroes(30 * cs + 512, 1024, 0)), 0);  // unaligned: zero data
    EXPECT_EQ(run(node->write_zeroes(40 * cs + 512, 1024, kNoFallback)), -ENOTSUP);
    EXPECT_EQ(read_all(*node), model);
    EXPECT_EQ(close(*node), 0);
  }
  const QemuCheck check = qemu_check(path("w.qed"));
  EXPECT_EQ(check.exit_code, 0) << check.json;
  EXPECT_EQ(qemu_raw("w.qed"), model);
  qemu_io("w.qed", "-c 'read -P 0xa2 " + std::to_string(4 * cs) + " 512' -c 'read -P 0xa3 " +
                       std::to_string(4 * cs + 512) + " 512'");
  // Sparse: nothing allocated where we wrote nothing; zero clusters are zero, not data.
  const std::string map = must_run("qemu-img map --output=json -f qed '" + path("w.qed") + "'");
  EXPECT_NE(map.find("\"start\": 4096, \"length\": 8192, \"depth\": 0, \"present\": false, "
                     "\"zero\": true, \"data\": false"),
            std::string::npos)
      << map;
  EXPECT_NE(map.find("\"start\": 81920, \"length\": 12288, \"depth\": 0, \"present\": true, "
                     "\"zero\": true, \"data\": false"),
            std::string::npos)
      << map;
  // Allocation is append-only after the L1 table: 4K header + 8K L1 + data + L2 tables.
  EXPECT_LT(fs::file_size(path("w.qed")), 200u * 1024);
}

TEST_F(QedTest, AllocatingWriteLayoutMatchesQemu) {
  REQUIRE_QEMU();
  // Same writes through qemu-io and through us: byte-identical files.
  create("ours.qed", CreateOptions{.size = 1ull << 30});
  BlockNodeRef node = open_image("ours.qed");
  ASSERT_TRUE(node);
  ASSERT_EQ(write(*node, 4096, pattern(4096, 0x5a)), 0);
  ASSERT_EQ(close(*node), 0);
  must_run("qemu-img create -q -f qed '" + path("theirs1.qed") + "' 1G");
  qemu_io("theirs1.qed", "-c 'write -P 0x5a 4096 4096'");
  EXPECT_EQ(read_file_bytes(path("ours.qed")), read_file_bytes(path("theirs1.qed")));
  EXPECT_EQ(fs::file_size(path("ours.qed")), 655360u);
}

// host_file_range() (the zero-copy read path) names where a range lies in the image file only
// inside one run of allocated clusters that are contiguous in the file, and only while their L2
// table is cached; everything else (unallocated or zero clusters, a run that ends or jumps
// inside the range, an uncached table) is "nowhere", so the caller reads the ordinary way.
TEST_F(QedTest, HostFileRangeOnlyInsideCachedContiguousDataRuns) {
  constexpr std::uint64_t kCluster = kDefaultClusterSize;
  create("z.qed", CreateOptions{.size = 8 << 20});
  BlockNodeRef node = open_image("z.qed");
  ASSERT_TRUE(node);
  Bytes first(4 * kCluster);
  for (std::size_t i = 0; i < first.size(); ++i) first[i] = std::byte(i * 13 + i / 4096);
  ASSERT_EQ(write(*node, 0, first), 0);  // four clusters, allocated in order
  // Two clusters allocated in reverse order: adjacent in the guest, not in the file.
  ASSERT_EQ(write(*node, 4 * 1024 * 1024 + kCluster, pattern(kCluster, 0x22)), 0);
  ASSERT_EQ(write(*node, 4 * 1024 * 1024, pattern(kCluster, 0x11)), 0);
  ASSERT_EQ(run(node->write_zeroes(6 * 1024 * 1024, kCluster, 0)), 0);

  const int fd = ::open(path("z.qed").c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  auto bytes_at = [&](const HostFileRange& range, std::size_t size) {
    Bytes got(size);
    EXPECT_EQ(::pread(fd, got.data(), size, static_cast<off_t>(range.offset)),
              static_cast<ssize_t>(size));
    return got;
  };
  const auto whole = node->host_file_range(0, first.size());
  ASSERT_TRUE(whole);
  EXPECT_EQ(bytes_at(*whole, first.size()), first);
  const auto inside = node->host_file_range(kCluster + 100, 1000);
  ASSERT_TRUE(inside);
  EXPECT_EQ(bytes_at(*inside, 1000),
            Bytes(first.begin() + kCluster + 100, first.begin() + kCluster + 1100));
  const auto second = node->host_file_range(4 * 1024 * 1024, kCluster);
  ASSERT_TRUE(second);
  EXPECT_EQ(bytes_at(*second, kCluster), pattern(kCluster, 0x11));

  EXPECT_FALSE(node->host_file_range(3 * kCluster, 2 * kCluster));  // runs into unallocated
  EXPECT_FALSE(node->host_file_range(5 * kCluster, 4096));          // unallocated
  EXPECT_FALSE(node->host_file_range(4 * 1024 * 1024, 2 * kCluster));  // not contiguous
  EXPECT_FALSE(node->host_file_range(6 * 1024 * 1024, 4096));          // a zero cluster
  EXPECT_FALSE(node->host_file_range(0, 0));

  ASSERT_EQ(close(*node), 0);
  node = open_image("z.qed");  // nothing cached: the lookup would have to read the table
  ASSERT_TRUE(node);
  EXPECT_FALSE(node->host_file_range(0, 4096));
  Bytes some(4096);
  ASSERT_EQ(run(node->read(0, std::span(some), 0)), 0);  // loads the table
  const auto cached = node->host_file_range(0, 4096);
  ASSERT_TRUE(cached);
  EXPECT_EQ(bytes_at(*cached, 4096), Bytes(first.begin(), first.begin() + 4096));
  ASSERT_EQ(close(*node), 0);
  ::close(fd);
}

TEST_F(QedTest, CopyOnWriteFromBackingFiles) {
  REQUIRE_QEMU();
  must_run("qemu-img create -q -f raw '" + path("base.raw") + "' 1000k");
  qemu_io("base.raw", "-c 'write -P 0x77 0 1000k'", "raw");
  create("ovl.qed", CreateOptions{.size = 2 << 20, .backing_file = "base.raw", .backing_format = "raw"});
  Bytes model(2 << 20);
  std::memset(model.data(), 0x77, 1000 * 1024);
  {
    BlockNodeRef node = open_image("ovl.qed");
    ASSERT_TRUE(node);
    ASSERT_EQ(write(*node, 70000 & ~511u, pattern(1024, 0x88)), 0);   // COW both sides
    std::memset(model.data() + (70000 & ~511u), 0x88, 1024);
    ASSERT_EQ(write(*node, 1000 * 1024 - 512, pattern(4096, 0x99)), 0);  // straddles base EOF
    std::memset(model.data() + 1000 * 1024 - 512, 0x99, 4096);
    ASSERT_EQ(run(node->write_zeroes(131072, 65536, 0)), 0);  // hides the backing data
    std::memset(model.data() + 131072, 0, 65536);
    EXPECT_EQ(read_all(*node), model);
    // The dirty bit is not used with a backing file.
    EXPECT_EQ(file_le64(path("ovl.qed"), 16) & kFeatureNeedCheck, 0u);
    EXPECT_EQ(close(*node), 0);
  }
  EXPECT_EQ(qemu_check(path("ovl.qed")).exit_code, 0);
  EXPECT_EQ(qemu_raw("ovl.qed"), model);
  const std::string map = must_run("qemu-img map --output=json -f qed '" + path("ovl.qed") + "'");
  EXPECT_NE(map.find("\"start\": 131072, \"length\": 65536, \"depth\": 0, \"present\": true, "
                     "\"zero\": true, \"data\": false"),
            std::string::npos)
      << map;
}

TEST_F(QedTest, NeedCheckIsSetDuringAllocationAndClearedByFlushAndClose) {
  REQUIRE_QEMU();
  create("d.qed", CreateOptions{.size = 1 << 20});
  BlockNodeRef node = open_image("d.qed");
  ASSERT_TRUE(node);
  ASSERT_EQ(write(*node, 0, pattern(512, 1)), 0);
  EXPECT_EQ(file_le64(path("d.qed"), 16) & kFeatureNeedCheck, kFeatureNeedCheck);
  ASSERT_EQ(run(node->flush()), 0);
  EXPECT_EQ(file_le64(path("d.qed"), 16) & kFeatureNeedCheck, 0u);
  ASSERT_EQ(write(*node, 65536, pattern(512, 2)), 0);
  EXPECT_EQ(file_le64(path("d.qed"), 16) & kFeatureNeedCheck, kFeatureNeedCheck);
  ASSERT_EQ(write(*node, 512, pattern(512, 3)), 0);  // in place: stays as it is
  ASSERT_EQ(close(*node), 0);
  EXPECT_EQ(file_le64(path("d.qed"), 16) & kFeatureNeedCheck, 0u);
  EXPECT_EQ(qemu_check(path("d.qed")).exit_code, 0);
}

TEST_F(QedTest, DirtyImageIsRepairedOnWritableOpenButNotReadOnly) {
  REQUIRE_QEMU();
  create("d.qed", CreateOptions{.size = 1 << 20, .cluster_size = 4096, .table_size = 2});
  qemu_io("d.qed", "-c 'write -z 0 4096' -c 'write -P 0x42 8192 4096'");
  // Simulate a crash: the zero cluster's L2 entry points past EOF, and the bit is set.
  const std::uint64_t l2 = file_le64(path("d.qed"), 4096);
  patch_le64(path("d.qed"), l2, 1ull << 30);
  patch_le64(path("d.qed"), 16, kFeatureNeedCheck);
  {
    BlockNodeRef node = open_image("d.qed", true);  // read-only: allowed, not repaired
    ASSERT_TRUE(node);
    Bytes sector(512);
    EXPECT_EQ(run(node->read(0, std::span(sector), 0)), -EIO);
    EXPECT_EQ(file_le64(path("d.qed"), 16), kFeatureNeedCheck);
  }
  BlockNodeRef node = open_image("d.qed");
  ASSERT_TRUE(node);
  EXPECT_EQ(file_le64(path("d.qed"), 16), 0u);
  EXPECT_EQ(file_le64(path("d.qed"), l2), 0u);
  Bytes data(8192);
  ASSERT_EQ(run(node->read(4096, std::span(data), 0)), 0);
  EXPECT_EQ(data[4096], std::byte{0x42});
  close(*node);
  EXPECT_EQ(qemu_check(path("d.qed")).exit_code, 0);
}

TEST_F(QedTest, ResizeGrowsOnly) {
  REQUIRE_QEMU();
  create("r.qed", CreateOptions{.size = 256 << 20});
  BlockNodeRef node = open_image("r.qed");
  ASSERT_TRUE(node);
  ASSERT_EQ(write(*node, (256 << 20) - 512, pattern(512, 9)), 0);
  EXPECT_EQ(run(node->truncate(128 << 20)), -ENOTSUP);
  EXPECT_EQ(run(node->truncate((300 << 20) + 100)), -EINVAL);
  EXPECT_EQ(run(node->truncate(64ull << 41)), -EINVAL);  // beyond 64 TiB
  EXPECT_EQ(run(node->truncate(300 << 20)), 0);
  EXPECT_EQ(node->size(), 300u << 20);
  ASSERT_EQ(write(*node, (300 << 20) - 512, pattern(512, 10)), 0);
  ASSERT_EQ(close(*node), 0);
  const std::string info = must_run("qemu-img info --output=json -f qed '" + path("r.qed") + "'");
  EXPECT_NE(info.find("\"virtual-size\": 314572800"), std::string::npos) << info;
  EXPECT_EQ(qemu_check(path("r.qed")).exit_code, 0);
  qemu_io("r.qed", "-c 'read -P 10 314572288 512' -c 'read -P 9 268434944 512'");
}

// --- bad input ------------------------------------------------------------------------------

class QedBadInputTest : public QedTest {
 protected:
  // A valid 4K/2 image of 1 MiB to corrupt.
  void SetUp() override {
    QedTest::SetUp();
    create("bad.qed", CreateOptions{.size = 1 << 20, .cluster_size = 4096, .table_size = 2});
  }
  void expect_rejected(int error, const std::string& words) {
    BlockResult<BlockNodeRef> node = try_open("bad.qed");
    ASSERT_FALSE(node.ok());
    EXPECT_EQ(node.error().error, error) << node.error().message;
    EXPECT_NE(node.error().message.find(words), std::string::npos) << node.error().message;
  }
};

TEST_F(QedBadInputTest, ValidImageOpens) { EXPECT_TRUE(try_open("bad.qed").ok()); }

TEST_F(QedBadInputTest, TruncatedHeader) {
  fs::resize_file(path("bad.qed"), 40);
  expect_rejected(EINVAL, "truncated");
  fs::resize_file(path("bad.qed"), 0);
  expect_rejected(EINVAL, "truncated");
}

TEST_F(QedBadInputTest, BadMagic) {
  patch_file(path("bad.qed"), 0, "QEF", 3);
  expect_rejected(EINVAL, "magic");
}

TEST_F(QedBadInputTest, ClusterSizeNotPowerOfTwoOrOutOfRange) {
  for (std::uint32_t size : {0u, 4095u, 6144u, 2048u, 128u << 20, 0x80000000u, 0xffffffffu}) {
    patch_le32(path("bad.qed"), 4, size);
    expect_rejected(EINVAL, "cluster size");
  }
}

TEST_F(QedBadInputTest, TableSizeOutOfRange) {
  for (std::uint32_t size : {0u, 3u, 32u, 0xffffffffu}) {
    patch_le32(path("bad.qed"), 8, size);
    expect_rejected(EINVAL, "table size");
  }
}

TEST_F(QedBadInputTest, ImageSizeInvalidOrNear2To63) {
  for (std::uint64_t size : std::initializer_list<std::uint64_t>{1000ull, (4ull << 30) + 512, 1ull << 63, (1ull << 63) - 512, UINT64_MAX}) {
    patch_le64(path("bad.qed"), 48, size);
    expect_rejected(EINVAL, "image size");
  }
}

TEST_F(QedBadInputTest, HugeGeometryDoesNotOverflow) {
  // 64M clusters with 16-cluster tables: maximum size saturates; the L1 table is past EOF.
  patch_le32(path("bad.qed"), 4, 64u << 20);
  patch_le32(path("bad.qed"), 8, 16);
  patch_le64(path("bad.qed"), 48, (1ull << 63) - (64ull << 20));
  expect_rejected(EINVAL, "L1 table offset");
}

TEST_F(QedBadInputTest, HeaderSizeInvalid) {
  patch_le32(path("bad.qed"), 12, 0);
  expect_rejected(EINVAL, "header size");
  patch_le32(path("bad.qed"), 12, 0x100000);  // * 4096 overflows 32 bits
  expect_rejected(EINVAL, "header size");
  patch_le32(path("bad.qed"), 12, 2);  // the L1 table now lies inside the header
  expect_rejected(EINVAL, "L1 table offset");
}

TEST_F(QedBadInputTest, L1TableOffsetBeyondEofOrUnaligned) {
  for (std::uint64_t offset : std::initializer_list<std::uint64_t>{0ull, 4097ull, 8192ull, 1ull << 40, UINT64_MAX - 4095}) {
    patch_le64(path("bad.qed"), 40, offset);
    expect_rejected(EINVAL, "L1 table offset");
  }
  fs::resize_file(path("bad.qed"), 8192);  // L1 table cut in half
  patch_le64(path("bad.qed"), 40, 4096);
  expect_rejected(EINVAL, "L1 table offset");
}

TEST_F(QedBadInputTest, UnknownIncompatibleFeatures) {
  patch_le64(path("bad.qed"), 16, 0x10);
  expect_rejected(ENOTSUP, "Unsupported QED features");
  patch_le64(path("bad.qed"), 16, 1ull << 63);
  expect_rejected(ENOTSUP, "Unsupported QED features");
}

TEST_F(QedBadInputTest, UnknownCompatFeaturesAreIgnoredAndAutoclearCleared) {
  patch_le64(path("bad.qed"), 24, 0xff);
  patch_le64(path("bad.qed"), 32, 0xf0);
  BlockNodeRef node = open_image("bad.qed");
  ASSERT_TRUE(node);
  EXPECT_EQ(file_le64(path("bad.qed"), 24), 0xffu);
  EXPECT_EQ(file_le64(path("bad.qed"), 32), 0u);
}

TEST_F(QedBadInputTest, BackingNameOutsideTheHeaderCluster) {
  patch_le64(path("bad.qed"), 16, kFeatureBackingFile);
  patch_le32(path("bad.qed"), 56, 4000);
  patch_le32(path("bad.qed"), 60, 200);
  expect_rejected(EINVAL, "backing file name");
  patch_le32(path("bad.qed"), 56, 0xffffffff);
  patch_le32(path("bad.qed"), 60, 0xffffffff);
  expect_rejected(EINVAL, "backing file name");
  patch_le32(path("bad.qed"), 56, 64);
  patch_le32(path("bad.qed"), 60, 0);
  expect_rejected(EINVAL, "backing file name");
}

TEST_F(QedBadInputTest, MissingBackingFile) {
  patch_le64(path("bad.qed"), 16, kFeatureBackingFile);
  patch_le32(path("bad.qed"), 56, 64);
  patch_le32(path("bad.qed"), 60, 7);
  patch_file(path("bad.qed"), 64, "nothere", 7);
  expect_rejected(ENOENT, "nothere");
}

TEST_F(QedBadInputTest, BadTableEntriesGiveIoErrorsNotCrashes) {
  {
    BlockNodeRef node = open_image("bad.qed");
    ASSERT_TRUE(node);
    ASSERT_EQ(write(*node, 0, pattern(4096, 1)), 0);
    ASSERT_EQ(close(*node), 0);
  }
  const std::uint64_t l2 = file_le64(path("bad.qed"), 4096);
  for (std::uint64_t entry : std::initializer_list<std::uint64_t>{1ull << 50, 4097ull, 2ull, 12289ull, UINT64_MAX}) {
    patch_le64(path("bad.qed"), l2, entry);
    patch_le64(path("bad.qed"), 16, 0);  // else the open would repair what the last round marked
    BlockNodeRef node = open_image("bad.qed");
    ASSERT_TRUE(node);
    Bytes sector(512);
    EXPECT_EQ(run(node->read(0, std::span(sector), 0)), -EIO) << entry;
    EXPECT_EQ(write(*node, 0, pattern(512, 2)), -EIO) << entry;
    EXPECT_EQ(file_le64(path("bad.qed"), 16), kFeatureNeedCheck) << entry;
    EXPECT_EQ(file_le64(path("bad.qed"), l2), entry);
  }
  for (std::uint64_t entry : std::initializer_list<std::uint64_t>{1ull << 50, 4097ull, 0x800ull}) {  // L1 entries
    patch_le64(path("bad.qed"), 4096, entry);
    patch_le64(path("bad.qed"), 16, 0);
    BlockNodeRef node = open_image("bad.qed");
    ASSERT_TRUE(node);
    Bytes sector(512);
    EXPECT_EQ(run(node->read(0, std::span(sector), 0)), -EIO) << entry;
  }
}

// --- table entries that point at metadata ---------------------------------------------------

// A 64 MiB 4K/2 image written by qemu-io: data at guest 0, 4K (first L2 table) and 4M (second
// L2 table). One L2 table covers 4 MiB; each table spans two clusters.
class QedMetadataPointerTest : public QedTest {
 protected:
  static constexpr std::uint64_t kCluster = 4096;
  void SetUp() override {
    QedTest::SetUp();
    if (!test::have_qemu()) GTEST_SKIP() << "qemu-img/qemu-io (qemu-utils) not installed";
    must_run("qemu-img create -q -f qed -o cluster_size=4096,table_size=2 '" + path("m.qed") +
             "' 64M");
    qemu_io("m.qed", "-c 'write -P 0xa1 0 4k' -c 'write -P 0xa2 4k 4k' -c 'write -P 0xa3 4M 4k'");
    l1_ = file_le64(path("m.qed"), 40);
    l2_ = file_le64(path("m.qed"), l1_);
    l2b_ = file_le64(path("m.qed"), l1_ + 8);
    ASSERT_NE(l2_, 0u);
    ASSERT_NE(l2b_, 0u);
  }
  // Every file byte but the feature bits (which may gain NEED_CHECK).
  Bytes file_without_features() {
    Bytes bytes = read_file_bytes(path("m.qed"));
    std::fill(bytes.begin() + 16, bytes.begin() + 24, std::byte{0});
    return bytes;
  }
  // Reading, writing and block status of guest `offset` fail with EIO, nothing is written through the pointer,
  // the image is marked NEED_CHECK and both checks call it corrupt.
  void expect_refused(std::uint64_t offset, const std::string& what) {
    SCOPED_TRACE(what);
    const Bytes before = file_without_features();
    {
      BlockNodeRef node = open_image("m.qed");
      ASSERT_TRUE(node);
      Bytes sector(512);
      EXPECT_EQ(run(node->read(offset, std::span(sector), 0)), -EIO);
      EXPECT_EQ(write(*node, offset, pattern(512, 0x5a)), -EIO);
      EXPECT_EQ(write(*node, offset, pattern(kCluster, 0x5b)), -EIO);
      EXPECT_EQ(run(node->write_zeroes(offset, kCluster, 0)), -EIO);
      const BlockStatus status = run(node->block_status(offset, kCluster));
      EXPECT_EQ(status.error, -EIO);
      EXPECT_FALSE(node->host_file_range(offset, 512));
      Bytes good(512);  // the rest of the image still reads
      EXPECT_EQ(run(node->read(8 << 20, std::span(good), 0)), 0);
      EXPECT_EQ(close(*node), 0);
    }
    EXPECT_EQ(file_without_features(), before);
    EXPECT_EQ(file_le64(path("m.qed"), 16) & kFeatureNeedCheck, kFeatureNeedCheck);
    EXPECT_EQ(our_check("m.qed", false).exit_code(), 2);
    EXPECT_EQ(qemu_check(path("m.qed")).exit_code, 2);
  }
  std::uint64_t l1_ = 0, l2_ = 0, l2b_ = 0;
};

TEST_F(QedMetadataPointerTest, DataEntryAtTheL1Table) {
  patch_le64(path("m.qed"), l2_, l1_);
  expect_refused(0, "L2[0] -> L1");
}

TEST_F(QedMetadataPointerTest, DataEntryAtItsOwnL2Table) {
  patch_le64(path("m.qed"), l2_, l2_);
  expect_refused(0, "L2[0] -> own L2");
}

TEST_F(QedMetadataPointerTest, DataEntryInsideItsOwnL2Table) {
  patch_le64(path("m.qed"), l2_ + 8, l2_ + kCluster);
  expect_refused(kCluster, "L2[1] -> second cluster of own L2");
}

TEST_F(QedMetadataPointerTest, DataEntryAtAnotherL2Table) {
  patch_le64(path("m.qed"), l2_, l2b_);
  expect_refused(0, "L2[0] -> other L2");
}

TEST_F(QedMetadataPointerTest, L1EntryAtTheL1Table) {
  patch_le64(path("m.qed"), l1_, l1_);
  expect_refused(0, "L1[0] -> L1");
}

TEST_F(QedMetadataPointerTest, TwoL1EntriesShareAnL2Table) {
  patch_le64(path("m.qed"), l1_, l2b_);
  expect_refused(0, "L1[0] -> L2 of L1[1]");
  BlockNodeRef node = open_image("m.qed", true);
  ASSERT_TRUE(node);
  Bytes sector(512);
  EXPECT_EQ(run(node->read(4 << 20, std::span(sector), 0)), -EIO);
}

TEST_F(QedMetadataPointerTest, L1EntryOverlapsAnotherL2Table) {
  patch_le64(path("m.qed"), l1_, l2b_ + kCluster);
  expect_refused(0, "L1[0] -> second cluster of L1[1]'s L2");
}

// A data entry past EOF stays an error after the file has grown past it.
TEST_F(QedMetadataPointerTest, EntryBeyondEofStaysBadAfterTheFileGrows) {
  const std::uint64_t size = fs::file_size(path("m.qed"));
  for (const bool loaded_first : {true, false}) {
    SCOPED_TRACE(loaded_first ? "L2 loaded before growth" : "L2 loaded after growth");
    patch_le64(path("m.qed"), 16, 0);
    patch_le64(path("m.qed"), l1_ + 10 * 8, 0);  // undo the last round's L2 table for 40M
    patch_le64(path("m.qed"), l2_ + 16, size + 2 * kCluster);  // guest 8K
    BlockNodeRef node = open_image("m.qed");
    ASSERT_TRUE(node);
    Bytes sector(512);
    if (loaded_first) {
      EXPECT_EQ(run(node->read(8192, std::span(sector), 0)), -EIO);
    }
    // Allocates a new L2 table and data cluster at the end: the file grows past the pointer.
    ASSERT_EQ(write(*node, 40 << 20, pattern(4 * kCluster, 0x77)), 0);
    ASSERT_GT(fs::file_size(path("m.qed")), size + 3 * kCluster);
    EXPECT_EQ(run(node->read(8192, std::span(sector), 0)), -EIO);
    EXPECT_EQ(write(*node, 8192, pattern(512, 0x5a)), -EIO);
    EXPECT_EQ(close(*node), 0);
    fs::resize_file(path("m.qed"), size);
  }
}

TEST_F(QedTest, BackingChainThatRefersToItselfIsRefused) {
  create("self.qed", CreateOptions{.size = 1 << 20, .backing_file = "self.qed", .backing_format = "qed"});
  BlockResult<BlockNodeRef> node = try_open("self.qed");
  ASSERT_FALSE(node.ok());
  EXPECT_EQ(node.error().error, ELOOP);
  EXPECT_NE(node.error().message.find("refers to itself"), std::string::npos) << node.error().message;
  // a -> b -> a, and b reached through another spelling of its path.
  create("a.qed", CreateOptions{.size = 1 << 20, .backing_file = "./sub/../b.qed", .backing_format = "qed"});
  create("b.qed", CreateOptions{.size = 1 << 20, .backing_file = dir_ + "/a.qed", .backing_format = "qed"});
  fs::create_directory(path("sub"));
  node = try_open("a.qed");
  ASSERT_FALSE(node.ok());
  EXPECT_EQ(node.error().error, ELOOP);
  // A long chain: deeper than 16 is refused.
  create("l0.qed", CreateOptions{.size = 1 << 20});
  for (int i = 1; i <= 17; ++i) {
    create("l" + std::to_string(i) + ".qed",
           CreateOptions{.size = 1 << 20, .backing_file = "l" + std::to_string(i - 1) + ".qed",
                         .backing_format = "qed"});
  }
  EXPECT_TRUE(try_open("l15.qed").ok());
  node = try_open("l17.qed");
  ASSERT_FALSE(node.ok());
  EXPECT_EQ(node.error().error, ELOOP);
  EXPECT_NE(node.error().message.find("deeper"), std::string::npos);
}

// --- check / repair -------------------------------------------------------------------------

TEST_F(QedTest, CheckCountsMatchQemuImgOnCleanAndLeakyImages) {
  REQUIRE_QEMU();
  must_run("qemu-img create -q -f qed -o cluster_size=4096,table_size=2 '" + path("c.qed") + "' 16M");
  qemu_io("c.qed", "-c 'write -P 1 0 12k' -c 'write -P 2 1M 4k' -c 'write -P 3 8k 4k' -c 'write -z 2M 8k'");
  auto compare = [&](int expected_exit) {
    const QemuCheck theirs = qemu_check(path("c.qed"));
    EXPECT_EQ(theirs.exit_code, expected_exit) << theirs.json;
    const CheckResult ours = our_check("c.qed", false);
    EXPECT_EQ(ours.exit_code(), theirs.exit_code);
    EXPECT_EQ(ours.corruptions, json_field(theirs.json, "corruptions")) << theirs.json;
    EXPECT_EQ(ours.leaks, json_field(theirs.json, "leaks")) << theirs.json;
    EXPECT_EQ(ours.check_errors, json_field(theirs.json, "check-errors")) << theirs.json;
    EXPECT_EQ(ours.total_clusters, json_field(theirs.json, "total-clusters")) << theirs.json;
    EXPECT_EQ(ours.allocated_clusters, json_field(theirs.json, "allocated-clusters")) << theirs.json;
    EXPECT_EQ(ours.fragmented_clusters, json_field(theirs.json, "fragmented-clusters")) << theirs.json;
  };
  compare(0);
  fs::resize_file(path("c.qed"), fs::file_size(path("c.qed")) + 2 * 4096);  // 2 leaked clusters
  compare(3);
  // Repair cannot reclaim leaks (QEMU neither).
  const CheckResult repaired = our_check("c.qed", true);
  EXPECT_EQ(repaired.leaks, 2u);
  EXPECT_EQ(repaired.leaks_fixed, 0u);
  compare(3);
}

TEST_F(QedTest, CheckFindsAndRepairsCorruptionsLikeQemuImg) {
  REQUIRE_QEMU();
  must_run("qemu-img create -q -f qed -o cluster_size=4096,table_size=2 '" + path("c.qed") + "' 16M");
  qemu_io("c.qed", "-c 'write -P 1 0 4k' -c 'write -z 4k 4k' -c 'write -P 2 8M 4k'");
  const std::uint64_t l2 = file_le64(path("c.qed"), 4096);
  patch_le64(path("c.qed"), l2 + 8, 1ull << 40);  // zero cluster -> offset past EOF
  const std::uint64_t l1_second = file_le64(path("c.qed"), 4096 + 16);  // 8M: L1 index 2
  ASSERT_NE(l1_second, 0u);
  {
    const QemuCheck theirs = qemu_check(path("c.qed"));
    const CheckResult ours = our_check("c.qed", false);
    EXPECT_EQ(theirs.exit_code, 2) << theirs.json;
    EXPECT_EQ(ours.exit_code(), 2);
    EXPECT_EQ(ours.corruptions, json_field(theirs.json, "corruptions"));
    EXPECT_EQ(ours.corruptions, 1u);
    EXPECT_EQ(ours.allocated_clusters, json_field(theirs.json, "allocated-clusters"));
    EXPECT_EQ(ours.fragmented_clusters, json_field(theirs.json, "fragmented-clusters"));
  }
  // A doubly referenced cluster: the second L2 table's entry points at cluster 0's data.
  const std::uint64_t data0 = file_le64(path("c.qed"), l2);
  const std::uint64_t second_l2_entry = l1_second;  // entry 0 of the second L2 table (8M)
  const std::uint64_t original = file_le64(path("c.qed"), second_l2_entry);
  patch_le64(path("c.qed"), second_l2_entry, data0);
  {
    const QemuCheck theirs = qemu_check(path("c.qed"));
    const CheckResult ours = our_check("c.qed", false);
    EXPECT_EQ(theirs.exit_code, 2) << theirs.json;
    EXPECT_EQ(ours.corruptions, json_field(theirs.json, "corruptions")) << theirs.json;
    EXPECT_EQ(ours.leaks, json_field(theirs.json, "leaks")) << theirs.json;
  }
  patch_le64(path("c.qed"), second_l2_entry, original);
  const CheckResult repaired = our_check("c.qed", true);
  EXPECT_EQ(repaired.corruptions_fixed, 1u);
  EXPECT_EQ(repaired.corruptions, 0u);
  const QemuCheck after = qemu_check(path("c.qed"));
  EXPECT_EQ(after.exit_code, 0) << after.json;
  EXPECT_EQ(our_check("c.qed", false).exit_code(), 0);
  qemu_io("c.qed", "-c 'read -P 1 0 4k' -c 'read -P 0 4k 4k' -c 'read -P 2 8M 4k'");

  // An L1 entry past EOF: "1 errors" in qemu-img, repaired by dropping it.
  patch_le64(path("c.qed"), 4096 + 16, 1ull << 40);
  EXPECT_EQ(qemu_check(path("c.qed")).exit_code, 2);
  EXPECT_EQ(our_check("c.qed", false).corruptions, 1u);
  EXPECT_EQ(our_check("c.qed", true).corruptions_fixed, 1u);
  const QemuCheck final_check = qemu_check(path("c.qed"));
  EXPECT_EQ(final_check.exit_code, 3) << final_check.json;  // the dropped table and data leak
  EXPECT_EQ(our_check("c.qed", false).leaks, json_field(final_check.json, "leaks"));
}

// --- concurrency ----------------------------------------------------------------------------

TEST_F(QedTest, ConcurrentWritersOnTwoThreadsKeepTheImageConsistent) {
  REQUIRE_QEMU();
  const std::uint64_t cs = 4096;
  const std::uint64_t size = 16ull << 20;
  create("m.qed", CreateOptions{.size = size, .cluster_size = 4096, .table_size = 2});
  BlockNodeRef node = open_image("m.qed");
  ASSERT_TRUE(node);
  aio::IoThread first("qed-a");
  aio::IoThread second("qed-b");
  constexpr int kWriters = 8;
  constexpr int kWritesEach = 40;
  // Writer w writes 1K pieces into the clusters it owns (cluster index % kWriters == w),
  // several per cluster, so allocating and in-place writes interleave across threads.
  auto writer = [&](int w) -> coro::Task<int> {
    std::mt19937 random(w);
    for (int i = 0; i < kWritesEach; ++i) {
      const std::uint64_t cluster = (random() % (size / cs / kWriters)) * kWriters + w;
      const std::uint64_t piece = random() % 4;
      Bytes data(1024, std::byte{static_cast<std::uint8_t>(w + 1)});
      const int result = co_await node->write(cluster * cs + piece * 1024,
                                              std::span<const std::byte>(data), 0);
      if (result < 0) co_return result;
      Bytes back(1024);
      const int got = co_await node->read(cluster * cs + piece * 1024, std::span(back), 0);
      if (got < 0) co_return -EIO;
      if (back != data) co_return -EILSEQ;
    }
    co_return 0;
  };
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int w = 0; w < kWriters; ++w) {
    threads.emplace_back([&, w] {
      aio::IoThread& thread = w % 2 ? first : second;
      if (coro::block_on(thread.context(), writer(w)) != 0) failures.fetch_add(1);
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(failures.load(), 0);
  const Bytes ours = read_all(*node);
  ASSERT_EQ(close(*node), 0);
  for (std::uint64_t c = 0; c < size / cs; ++c) {
    for (std::uint64_t b = 0; b < cs; b += 1024) {
      const std::byte v = ours[c * cs + b];
      ASSERT_TRUE(v == std::byte{0} || v == std::byte{static_cast<std::uint8_t>(c % kWriters + 1)});
    }
  }
  const QemuCheck check = qemu_check(path("m.qed"));
  EXPECT_EQ(check.exit_code, 0) << check.json;
  EXPECT_EQ(qemu_raw("m.qed"), ours);
}

}  // namespace
}  // namespace spindle::block::qed
