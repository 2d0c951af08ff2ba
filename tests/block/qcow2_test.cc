// qcow2 driver tests (Qcow2Node, docs/interop/qcow2.rst) with qemu-img/qemu-io 7.2 as the
// oracle: images that qemu made (v2 and v3, cluster sizes 512 to 2M, refcount widths 1 to 64,
// zero clusters, deflate and zstd compressed clusters, extended L2 subclusters, backing
// chains over raw, qcow2 and QED) read byte for byte as `qemu-img convert -O raw` does;
// writes through our driver (allocating, in place, copy-on-write from a backing file, zeroes,
// discard, resize, refcount table growth, concurrent allocating writes from four IoThreads)
// leave images that `qemu-img check` finds clean and `qemu-img compare` finds equal to a raw
// model; corrupt table entries give EIO and mark the image corrupt. Tests that need qemu-img
// skip when it is missing.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <iterator>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "aio/context.h"
#include "aio/io_thread.h"
#include "base/byte_order.h"
#include "block/drivers/file.h"
#include "block/drivers/filter_node.h"
#include "block/formats/qcow2/check.h"
#include "block/formats/qcow2/compression.h"
#include "block/formats/qcow2/qcow2_node.h"
#include "block/image_chain.h"
#include "coro/block_on.h"
#include "coro/event.h"
#include "coro/sleep.h"
#include "coro/task.h"
#include "support/recording_node.h"
#include "support/shell_command.h"
#include "support/temp_dir.h"

namespace spindle::block::qcow2 {
namespace {

namespace fs = std::filesystem;
using Bytes = std::vector<std::byte>;
using test::RecordingNode;
using test::apply_event;
using test::CommandResult;
using test::must_run;
using test::read_file_bytes;
using test::run_command;

void write_file_bytes(const std::string& path, const Bytes& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

void patch_be64(const std::string& path, std::uint64_t offset, std::uint64_t value) {
  std::byte bytes[8];
  base::store_be64(bytes, value);
  const int fd = ::open(path.c_str(), O_WRONLY);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::pwrite(fd, bytes, 8, static_cast<off_t>(offset)), 8);
  ::close(fd);
}

std::uint64_t file_be64(const std::string& path, std::uint64_t offset) {
  const Bytes bytes = read_file_bytes(path);
  return base::load_be64(bytes.data() + offset);
}

Bytes pattern(std::size_t size, std::uint8_t value) { return Bytes(size, std::byte{value}); }

// Passes everything to the file; each read sleeps for a millisecond after it has the data, which
// widens the window between an allocation's copy-on-write read and its L2 update (what a test
// may race against; the outcome it asserts must not depend on the window).
class SlowReadNode final : public FilterNode {
 public:
  explicit SlowReadNode(BlockNodeRef child) : FilterNode(std::move(child)) {}
  const char* driver_name() const noexcept override { return "slow-read"; }
  coro::Task<int> read(std::uint64_t offset, std::span<std::byte> buffer,
                       std::uint32_t flags) override {
    const int result = co_await child_->read(offset, buffer, flags);
    co_await coro::sleep(std::chrono::milliseconds(1));
    co_return result;
  }
};


// Runs writer(w) for every w in [0, count) at once, each on io_threads[w] from a thread of its
// own; how many of them returned an error.
template <typename Writer>
int failures_running(aio::IoThread* const* io_threads, int count, Writer& writer) {
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int w = 0; w < count; ++w) {
    threads.emplace_back([&, w] {
      if (coro::block_on(io_threads[w]->context(), writer(w)) != 0) failures.fetch_add(1);
    });
  }
  for (auto& thread : threads) thread.join();
  return failures.load();
}
class Qcow2Test : public testing::Test {
 protected:
  std::string path(const std::string& name) const { return dir_ + "/" + name; }

  template <typename T>
  T run(coro::Task<T> task) {
    return coro::block_on(*context_, std::move(task));
  }

  // Opens `name` (relative to the test directory) and, through the backing opener, its chain:
  // qcow2 by our driver, QED by the QED chain opener, anything else as raw bytes.
  coro::Task<BlockResult<BlockNodeRef>> open_chain(std::string file_path, bool read_only,
                                                   FormatOpenOptions options) {
    base::Result<BlockNodeRef> file = open_file(file_path, read_only);
    if (!file.ok()) co_return BlockError{EIO, "cannot open " + file_path};
    options.read_only = read_only;
    const std::string directory = fs::path(file_path).parent_path().string();
    options.open_backing = [this, directory](std::string name,
                                             std::string format) -> coro::Task<BlockResult<BlockNodeRef>> {
      const std::string full = name.starts_with("/") ? name : directory + "/" + name;
      const Bytes head = read_file_bytes(full);
      const bool is_qcow2 = head.size() >= 4 && base::load_be32(head.data()) == kMagic;
      const bool is_qed = head.size() >= 4 && base::load_le32(head.data()) == 0x00444551;
      if (format == "qcow2" || (format.empty() && is_qcow2)) {
        co_return co_await open_chain(full, true, FormatOpenOptions{});
      }
      if (format == "qed" || (format.empty() && is_qed)) {
        ChainOptions chain;
        chain.read_only = true;
        chain.open_file = [](const std::string& f, bool ro) { return open_file(f, ro); };
        co_return co_await open_image_chain(full, "qed", chain);
      }
      base::Result<BlockNodeRef> raw = open_file(full, true);
      if (!raw.ok()) co_return BlockError{EIO, "cannot open " + full};
      co_return raw.value();
    };
    co_return co_await open_qcow2(file.value(), std::move(options));
  }

  BlockNodeRef open_image(const std::string& name, bool read_only = false,
                          FormatOpenOptions options = {}) {
    BlockResult<BlockNodeRef> node = try_open(name, read_only, std::move(options));
    EXPECT_TRUE(node.ok()) << node.error().message;
    return node.ok() ? node.value() : nullptr;
  }
  BlockResult<BlockNodeRef> try_open(const std::string& name, bool read_only = false,
                                     FormatOpenOptions options = {}) {
    return run(open_chain(path(name), read_only, std::move(options)));
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

  void qemu_img(const std::string& arguments) { must_run("cd '" + dir_ + "' && qemu-img " + arguments); }
  void qemu_io(const std::string& name, const std::string& commands) {
    must_run("cd '" + dir_ + "' && qemu-io -f qcow2 " + commands + " '" + name + "'");
  }
  Bytes qemu_raw(const std::string& name) {
    const std::string out = path(name + ".converted.raw");
    must_run("qemu-img convert -O raw '" + path(name) + "' '" + out + "'");
    Bytes bytes = read_file_bytes(out);
    fs::remove(out);
    return bytes;
  }
  CommandResult qemu_check(const std::string& name) {
    return run_command("qemu-img check -f qcow2 '" + path(name) + "'");
  }
  // `qemu-img compare` of the image against a raw file holding `model`.
  int qemu_compare(const std::string& name, const Bytes& model) {
    const std::string raw = path(name + ".model.raw");
    write_file_bytes(raw, model);
    const CommandResult result =
        run_command("qemu-img compare -f qcow2 -F raw '" + path(name) + "' '" + raw + "'");
    EXPECT_EQ(result.exit_code, 0) << result.output;
    fs::remove(raw);
    return result.exit_code;
  }

  // Replays `events` (writes and flushes recorded over a file that held `base`) and runs
  // qemu-img check on the file as a crash after each write could have left it: everything up to
  // the write reached the disk in order, or of the writes since the last flush only this one
  // did. Each must be clean or leak (exit 0 or 3). Returns the number of states checked.
  std::size_t check_every_crash_state(const Bytes& base,
                                      const std::vector<RecordingNode::Event>& events) {
    Bytes durable = base;  // everything before the last flush
    Bytes in_order = base;
    std::size_t checked = 0;
    const std::string crash = path("crash.qcow2");
    const auto check_state = [&](const Bytes& image, std::size_t index, const char* how) {
      write_file_bytes(crash, image);
      const CommandResult result = run_command("qemu-img check -f qcow2 '" + crash + "'");
      EXPECT_TRUE(result.exit_code == 0 || result.exit_code == 3)
          << how << " crash after event " << index << " of " << events.size() << "\n"
          << result.output;
      ++checked;
    };
    for (std::size_t i = 0; i < events.size() && !testing::Test::HasFailure(); ++i) {
      const RecordingNode::Event& event = events[i];
      if (event.flush) {
        durable = in_order;
        continue;
      }
      apply_event(in_order, event);
      check_state(in_order, i, "in-order");
      Bytes only_this = durable;
      apply_event(only_this, event);
      check_state(only_this, i, "reordered");
    }
    return checked;
  }

  // Writes a mix of data and (v3) zero clusters with qemu-io.
  void fill_with_qemu(const std::string& name, std::uint64_t cs, bool v3) {
    std::string commands = "-c 'write -P 0x11 0 " + std::to_string(cs * 3) + "'";
    commands += " -c 'write -P 0x22 " + std::to_string(cs * 5 + 512) + " 1536'";
    commands += " -c 'write -P 0x33 " + std::to_string(cs * 9) + " " + std::to_string(cs * 2) + "'";
    commands += " -c 'write -P 0x44 1M 64k'";
    if (v3) commands += " -c 'write -z " + std::to_string(cs) + " " + std::to_string(cs) + "'";
    commands += " -c 'write -P 0x55 3M 5k'";
    qemu_io(name, commands);
  }

  test::TempDir temp_{"spindle-qcow2"};
  const std::string& dir_ = temp_.dir();
  aio::ContextRef context_ = aio::Context::create("qcow2-test");
};

// --- reads of images qemu wrote --------------------------------------------------------------

struct Geometry {
  const char* compat;
  std::uint64_t cluster_size;
  int refcount_bits;
};

class Qcow2GeometryTest : public Qcow2Test, public testing::WithParamInterface<Geometry> {};

TEST_P(Qcow2GeometryTest, ReadsWhatQemuWroteAndWritesWhatQemuReads) {
  REQUIRE_QEMU();
  const Geometry g = GetParam();
  const bool v3 = std::string(g.compat) == "1.1";
  const std::uint64_t size = std::max<std::uint64_t>(8ull << 20, g.cluster_size * 12);
  qemu_img("create -q -f qcow2 -o compat=" + std::string(g.compat) +
           ",cluster_size=" + std::to_string(g.cluster_size) +
           ",refcount_bits=" + std::to_string(g.refcount_bits) + " a.qcow2 " + std::to_string(size));
  fill_with_qemu("a.qcow2", g.cluster_size, v3);
  Bytes model = qemu_raw("a.qcow2");
  ASSERT_EQ(model.size(), size);
  {
    BlockNodeRef node = open_image("a.qcow2", true);
    ASSERT_TRUE(node);
    EXPECT_EQ(node->size(), size);
    EXPECT_EQ(read_all(*node), model);
    ASSERT_EQ(close(*node), 0);
  }
  // Writes: allocating (new L2 tables too), in place, partial clusters (copy-on-write).
  BlockNodeRef node = open_image("a.qcow2");
  ASSERT_TRUE(node);
  std::mt19937 random(static_cast<unsigned>(g.cluster_size) + g.refcount_bits);
  for (int i = 0; i < 60; ++i) {
    const std::uint64_t length = 512 * (1 + random() % 24);
    const std::uint64_t offset = (random() % ((size - length) / 512)) * 512;
    const Bytes data = pattern(length, static_cast<std::uint8_t>(0x60 + i));
    ASSERT_EQ(write(*node, offset, data), 0) << offset << "+" << length;
    std::copy(data.begin(), data.end(), model.begin() + static_cast<std::ptrdiff_t>(offset));
  }
  EXPECT_EQ(read_all(*node), model);
  ASSERT_EQ(close(*node), 0);
  node.reset();
  const CommandResult check = qemu_check("a.qcow2");
  EXPECT_EQ(check.exit_code, 0) << check.output;
  qemu_compare("a.qcow2", model);
}

INSTANTIATE_TEST_SUITE_P(
    Images, Qcow2GeometryTest,
    testing::Values(Geometry{"0.10", 65536, 16}, Geometry{"0.10", 4096, 16},
                    Geometry{"1.1", 512, 16}, Geometry{"1.1", 4096, 1},
                    Geometry{"1.1", 65536, 16}, Geometry{"1.1", 65536, 64},
                    Geometry{"1.1", 2 << 20, 16}, Geometry{"1.1", 512, 64},
                    Geometry{"1.1", 4096, 64}),
    [](const testing::TestParamInfo<Geometry>& info) {
      return std::string(info.param.compat[0] == '1' ? "v3" : "v2") + "_cluster" +
             std::to_string(info.param.cluster_size) + "_refcount" +
             std::to_string(info.param.refcount_bits);
    });

TEST_F(Qcow2Test, ReadsCompressedClustersDeflateAndZstd) {
  REQUIRE_QEMU();
  Bytes source(4ull << 20);
  std::mt19937 random(7);
  for (std::size_t i = 0; i < source.size(); i += 4096) {
    // Compressible runs with some noise, and a stretch of zeros.
    const auto value = static_cast<std::uint8_t>(random() % 4);
    for (std::size_t j = 0; j < 4096; ++j) {
      source[i + j] = std::byte{static_cast<std::uint8_t>(i < (3ull << 20) ? value * (j % 7) : 0)};
    }
  }
  write_file_bytes(path("src.raw"), source);
  for (const std::string type : {"zlib", "zstd"}) {
    for (const std::string cluster : {"4096", "65536"}) {
      const std::string name = "c-" + type + "-" + cluster + ".qcow2";
      qemu_img("convert -c -O qcow2 -o compression_type=" + type + ",cluster_size=" + cluster +
               " src.raw " + name);
      BlockNodeRef node = open_image(name, true);
      ASSERT_TRUE(node);
      EXPECT_EQ(read_all(*node), source) << name;
      const BlockStatus status = run(node->block_status(0, 4096));
      EXPECT_EQ(status.error, 0);
      EXPECT_TRUE(status.flags & kStatusData) << name;
      EXPECT_FALSE(status.flags & kStatusOffsetValid) << name;
      ASSERT_EQ(close(*node), 0);
    }
  }
  // Overwriting compressed clusters (partially: copy-on-write from the decompressed data).
  const std::string name = "c-zstd-4096.qcow2";
  BlockNodeRef node = open_image(name);
  ASSERT_TRUE(node);
  const Bytes data = pattern(1000, 0xee);
  ASSERT_EQ(write(*node, 4096 * 10 + 100, data), 0);
  std::copy(data.begin(), data.end(), source.begin() + 4096 * 10 + 100);
  EXPECT_EQ(read_all(*node), source);
  ASSERT_EQ(close(*node), 0);
  node.reset();
  const CommandResult check = qemu_check(name);
  EXPECT_EQ(check.exit_code, 0) << check.output;
  qemu_compare(name, source);
}

TEST_F(Qcow2Test, ExtendedL2SubclustersReadAndWrite) {
  REQUIRE_QEMU();
  qemu_img("create -q -f raw base.raw 4M");
  must_run("qemu-io -f raw -c 'write -P 0xba 0 4M' '" + path("base.raw") + "'");
  qemu_img("create -q -f qcow2 -o extended_l2=on,cluster_size=64k -b base.raw -F raw e.qcow2");
  // Subclusters are 2K: touch some, zero some, leave others to the backing file.
  qemu_io("e.qcow2", "-c 'write -P 0x01 2048 2048' -c 'write -z 8192 4096' "
                     "-c 'write -P 0x02 65536 512' -c 'write -P 0x03 200k 70k'");
  Bytes model = qemu_raw("e.qcow2");
  BlockNodeRef node = open_image("e.qcow2");
  ASSERT_TRUE(node);
  EXPECT_EQ(read_all(*node), model);
  const BlockStatus status = run(node->block_status(0, 65536));
  EXPECT_EQ(status.error, 0);
  EXPECT_EQ(status.flags & (kStatusData | kStatusZero), 0u);  // backing shows through
  EXPECT_EQ(status.bytes, 2048u);
  // Writes into partly allocated clusters.
  for (const std::uint64_t offset : {std::uint64_t{0}, std::uint64_t{9000}, std::uint64_t{65536 + 4096},
                                     std::uint64_t{300 << 10}}) {
    const Bytes data = pattern(1536, 0x70);
    ASSERT_EQ(write(*node, offset, data), 0);
    std::copy(data.begin(), data.end(), model.begin() + static_cast<std::ptrdiff_t>(offset));
  }
  EXPECT_EQ(read_all(*node), model);
  ASSERT_EQ(close(*node), 0);
  node.reset();
  const CommandResult check = qemu_check("e.qcow2");
  EXPECT_EQ(check.exit_code, 0) << check.output;
  EXPECT_EQ(qemu_raw("e.qcow2"), model);
}

TEST_F(Qcow2Test, PreallocatedAndLazyRefcountImages) {
  REQUIRE_QEMU();
  for (const std::string options : {"preallocation=metadata", "preallocation=falloc",
                                    "lazy_refcounts=on", "compat=0.10,preallocation=metadata"}) {
    const std::string name = "p.qcow2";
    fs::remove(path(name));
    qemu_img("create -q -f qcow2 -o " + options + " " + name + " 3M");
    qemu_io(name, "-c 'write -P 0x19 100k 300k'");
    Bytes model = qemu_raw(name);
    BlockNodeRef node = open_image(name);
    ASSERT_TRUE(node) << options;
    EXPECT_EQ(read_all(*node), model) << options;
    const Bytes data = pattern(5000, 0x29);
    ASSERT_EQ(write(*node, 1 << 20, data), 0);
    std::copy(data.begin(), data.end(), model.begin() + (1 << 20));
    ASSERT_EQ(close(*node), 0);
    node.reset();
    const CommandResult check = qemu_check(name);
    EXPECT_EQ(check.exit_code, 0) << options << check.output;
    EXPECT_EQ(qemu_raw(name), model) << options;
  }
}

// --- backing chains --------------------------------------------------------------------------

TEST_F(Qcow2Test, BackingChainsOverRawQcow2AndQed) {
  REQUIRE_QEMU();
  qemu_img("create -q -f raw base.raw 6M");
  must_run("qemu-io -f raw -c 'write -P 0xa1 0 6M' '" + path("base.raw") + "'");
  qemu_img("create -q -f qed base.qed 6M");
  must_run("qemu-io -f qed -c 'write -P 0xa2 64k 3M' '" + path("base.qed") + "'");
  qemu_img("create -q -f qcow2 -b base.raw -F raw mid.qcow2 6M");
  qemu_io("mid.qcow2", "-c 'write -P 0xb1 1M 1M' -c 'write -z 3M 64k'");
  struct Case {
    std::string name;
    std::string backing;
    std::string format;
  };
  for (const Case& c : {Case{"over-raw.qcow2", "base.raw", "raw"},
                        Case{"over-qcow2.qcow2", "mid.qcow2", "qcow2"},
                        Case{"over-qed.qcow2", "base.qed", "qed"}}) {
    // Larger than the backing file: the tail reads as zeros.
    qemu_img("create -q -f qcow2 -b " + c.backing + " -F " + c.format + " " + c.name + " 8M");
    qemu_io(c.name, "-c 'write -P 0xc1 512k 100k' -c 'write -P 0xc2 5M 2M'");
    Bytes model = qemu_raw(c.name);
    BlockNodeRef node = open_image(c.name);
    ASSERT_TRUE(node) << c.name;
    ASSERT_NE(node->backing_node(), nullptr);
    EXPECT_EQ(read_all(*node), model) << c.name;
    // Copy-on-write from the backing file: partial clusters.
    for (const std::uint64_t offset : {std::uint64_t{100}, std::uint64_t{(1 << 20) + 3000},
                                       std::uint64_t{(6 << 20) - 700}}) {
      const Bytes data = pattern(1400, 0xd0);
      ASSERT_EQ(run(node->write(offset, std::span<const std::byte>(data), 0)), 0);
      std::copy(data.begin(), data.end(), model.begin() + static_cast<std::ptrdiff_t>(offset));
    }
    EXPECT_EQ(read_all(*node), model) << c.name;
    ASSERT_EQ(close(*node), 0);
    node.reset();
    const CommandResult check = qemu_check(c.name);
    EXPECT_EQ(check.exit_code, 0) << c.name << check.output;
    EXPECT_EQ(qemu_raw(c.name), model) << c.name;
  }
}

// replace_child("backing") (blockdev-reopen's backing): unallocated clusters read from the new
// backing node, or as zeros with none; allocated ones are the image's own; "file" is fixed.
TEST_F(Qcow2Test, ReplacedBackingServesUnallocatedClusters) {
  REQUIRE_QEMU();
  qemu_img("create -q -f raw one.raw 2M");
  must_run("qemu-io -f raw -c 'write -P 0x11 0 2M' '" + path("one.raw") + "'");
  qemu_img("create -q -f raw two.raw 2M");
  must_run("qemu-io -f raw -c 'write -P 0x22 0 2M' '" + path("two.raw") + "'");
  qemu_img("create -q -f qcow2 -b one.raw -F raw top.qcow2 2M");
  qemu_io("top.qcow2", "-c 'write -P 0x33 1M 64k'");
  BlockNodeRef top = open_image("top.qcow2");
  ASSERT_TRUE(top);
  auto opened_two = open_file(path("two.raw"), true);
  ASSERT_TRUE(opened_two);
  BlockNodeRef two = opened_two.value();
  const auto byte_at = [&](std::uint64_t offset) {
    Bytes one(1);
    EXPECT_EQ(run(top->read(offset, std::span(one), 0)), 0);
    return std::to_integer<int>(one[0]);
  };
  EXPECT_EQ(byte_at(0), 0x11);
  EXPECT_EQ(top->replace_child("file", two), -ENOTSUP);
  ASSERT_EQ(top->replace_child("backing", two), 0);
  EXPECT_EQ(top->backing_node(), two.get());
  EXPECT_EQ(byte_at(0), 0x22);
  EXPECT_EQ(byte_at(1 << 20), 0x33);  // allocated in the image itself
  ASSERT_EQ(top->replace_child("backing", nullptr), 0);
  EXPECT_EQ(byte_at(0), 0);
  EXPECT_EQ(byte_at(1 << 20), 0x33);
  ASSERT_EQ(close(*top), 0);
}

TEST_F(Qcow2Test, ZeroesAndDiscardHideTheBackingFile) {
  REQUIRE_QEMU();
  qemu_img("create -q -f raw base.raw 2M");
  must_run("qemu-io -f raw -c 'write -P 0xa1 0 2M' '" + path("base.raw") + "'");
  for (const std::string compat : {"1.1", "0.10"}) {
    const std::string name = "hide-" + compat + ".qcow2";
    qemu_img("create -q -f qcow2 -o compat=" + compat + " -b base.raw -F raw " + name);
    qemu_io(name, "-c 'write -P 0xb2 128k 128k'");
    Bytes model = qemu_raw(name);
    BlockNodeRef node = open_image(name);
    ASSERT_TRUE(node);
    auto zero = [&](std::uint64_t offset, std::uint64_t bytes) {
      std::fill_n(model.begin() + static_cast<std::ptrdiff_t>(offset), bytes, std::byte{0});
    };
    ASSERT_EQ(run(node->write_zeroes(64 << 10, 128 << 10, 0)), 0);  // unallocated + data
    zero(64 << 10, 128 << 10);
    ASSERT_EQ(run(node->write_zeroes(500 << 10, 1000, 0)), 0);  // partial cluster
    zero(500 << 10, 1000);
    ASSERT_EQ(run(node->write_zeroes(1 << 20, 64 << 10, kMayUnmap)), 0);
    zero(1 << 20, 64 << 10);
    ASSERT_EQ(run(node->discard(192 << 10, 64 << 10)), 0);
    if (compat == "1.1") zero(192 << 10, 64 << 10);  // v2 cannot hide the backing file
    EXPECT_EQ(read_all(*node), model) << compat;
    ASSERT_EQ(close(*node), 0);
    node.reset();
    const CommandResult check = qemu_check(name);
    EXPECT_EQ(check.exit_code, 0) << compat << check.output;
    EXPECT_EQ(qemu_raw(name), model) << compat;
  }
}

// --- writes ----------------------------------------------------------------------------------

TEST_F(Qcow2Test, ManySmallClustersGrowTheRefcountTable) {
  REQUIRE_QEMU();
  // 512-byte clusters with 64-bit refcounts: a refcount block covers 32 KiB, the first
  // refcount table cluster 2 MiB of file.
  const std::uint64_t size = 24ull << 20;
  qemu_img("create -q -f qcow2 -o cluster_size=512,refcount_bits=64 g.qcow2 " + std::to_string(size));
  Bytes model(size);
  BlockNodeRef node = open_image("g.qcow2");
  ASSERT_TRUE(node);
  const std::uint64_t table_before = file_be64(path("g.qcow2"), 48);
  for (std::uint64_t offset = 0; offset < size; offset += (1 << 20)) {
    const Bytes data = pattern(300 << 10, static_cast<std::uint8_t>(offset >> 20) + 1);
    ASSERT_EQ(write(*node, offset + 4096, data), 0);
    std::copy(data.begin(), data.end(), model.begin() + static_cast<std::ptrdiff_t>(offset + 4096));
  }
  EXPECT_EQ(read_all(*node), model);
  ASSERT_EQ(close(*node), 0);
  node.reset();
  EXPECT_NE(file_be64(path("g.qcow2"), 48), table_before);  // the table moved
  const CommandResult check = qemu_check("g.qcow2");
  EXPECT_EQ(check.exit_code, 0) << check.output;
  qemu_compare("g.qcow2", model);
}

TEST_F(Qcow2Test, ZeroesDiscardAndResize) {
  REQUIRE_QEMU();
  const std::uint64_t cs = 4096;
  qemu_img("create -q -f qcow2 -o cluster_size=4096 z.qcow2 4M");
  qemu_io("z.qcow2", "-c 'write -P 0x42 0 4M'");
  Bytes model = qemu_raw("z.qcow2");
  BlockNodeRef node = open_image("z.qcow2");
  ASSERT_TRUE(node);
  auto zero = [&](std::uint64_t offset, std::uint64_t bytes) {
    std::fill_n(model.begin() + static_cast<std::ptrdiff_t>(offset), bytes, std::byte{0});
  };
  ASSERT_EQ(run(node->write_zeroes(cs, 2 * cs, 0)), 0);
  zero(cs, 2 * cs);
  ASSERT_EQ(run(node->write_zeroes(4 * cs + 1000, cs, kMayUnmap)), 0);
  zero(4 * cs + 1000, cs);
  ASSERT_EQ(run(node->write_zeroes(8 * cs, 3 * cs, kMayUnmap)), 0);
  zero(8 * cs, 3 * cs);
  EXPECT_EQ(run(node->write_zeroes(20 * cs + 512, 512, kNoFallback)), -ENOTSUP);
  ASSERT_EQ(run(node->discard(16 * cs, 4 * cs)), 0);
  zero(16 * cs, 4 * cs);  // no backing file: discarded clusters read as zeros
  BlockStatus status = run(node->block_status(cs, cs));
  EXPECT_EQ(status.flags & kStatusZero, kStatusZero);
  EXPECT_EQ(read_all(*node), model);
  // 4M -> 32M needs more L1 entries (one L2 table covers 2M), in the same L1 cluster.
  ASSERT_EQ(run(node->truncate(32ull << 20)), 0);
  model.resize(32ull << 20);
  const Bytes data = pattern(4096, 0x77);
  ASSERT_EQ(write(*node, (32ull << 20) - 4096, data), 0);
  std::copy(data.begin(), data.end(), model.end() - 4096);
  EXPECT_EQ(read_all(*node), model);
  EXPECT_EQ(run(node->truncate(16ull << 20)), -ENOTSUP);  // data past the new end
  EXPECT_EQ(run(node->truncate(1000)), -EINVAL);
  ASSERT_EQ(close(*node), 0);
  node.reset();
  const CommandResult check = qemu_check("z.qcow2");
  EXPECT_EQ(check.exit_code, 0) << check.output;
  qemu_compare("z.qcow2", model);
}

TEST_F(Qcow2Test, ResizeMovesTheL1TableAndShrinksWhereNothingIsAllocated) {
  REQUIRE_QEMU();
  // 512-byte clusters: an L2 table covers 32 KiB, one L1 cluster 2 MiB.
  qemu_img("create -q -f qcow2 -o cluster_size=512 r.qcow2 1M");
  qemu_io("r.qcow2", "-c 'write -P 0x21 0 100k'");
  Bytes model = qemu_raw("r.qcow2");
  BlockNodeRef node = open_image("r.qcow2");
  ASSERT_TRUE(node);
  const std::uint64_t l1_before = file_be64(path("r.qcow2"), 40);
  ASSERT_EQ(run(node->truncate(16ull << 20)), 0);
  EXPECT_EQ(node->size(), 16ull << 20);
  model.resize(16ull << 20);
  const Bytes data = pattern(70000, 0x66);
  ASSERT_EQ(write(*node, (16ull << 20) - 70000 - 512, data), 0);
  std::copy(data.begin(), data.end(), model.end() - 70000 - 512);
  EXPECT_EQ(read_all(*node), model);
  EXPECT_EQ(run(node->truncate(12ull << 20)), -ENOTSUP);  // data past the new end
  ASSERT_EQ(run(node->truncate((16ull << 20) - 512)), 0);  // only unallocated past it
  model.resize((16ull << 20) - 512);
  EXPECT_EQ(read_all(*node), model);
  ASSERT_EQ(close(*node), 0);
  node.reset();
  EXPECT_NE(file_be64(path("r.qcow2"), 40), l1_before);
  const CommandResult check = qemu_check("r.qcow2");
  EXPECT_EQ(check.exit_code, 0) << check.output;
  qemu_compare("r.qcow2", model);
}

// Growing far enough moves the L1 table to clusters that need more refcount blocks than the
// refcount table has room for: the table grows while truncate holds the metadata write lock.
TEST_F(Qcow2Test, ResizeThatOutgrowsTheRefcountTable) {
  REQUIRE_QEMU();
  // 512-byte clusters: one refcount table cluster (64 blocks of 256 clusters) covers 8 MiB of
  // file; an L1 table for 32 GiB is 8 MiB.
  qemu_img("create -q -f qcow2 -o cluster_size=512 g.qcow2 1M");
  qemu_io("g.qcow2", "-c 'write -P 0x31 0 64k'");
  Bytes model = qemu_raw("g.qcow2");
  BlockNodeRef node = open_image("g.qcow2");
  ASSERT_TRUE(node);
  ASSERT_EQ(run(node->truncate(32ull << 30)), 0);
  EXPECT_EQ(node->size(), 32ull << 30);
  const Bytes data = pattern(4096, 0x67);
  ASSERT_EQ(write(*node, (32ull << 30) - 4096, data), 0);
  Bytes tail(4096);
  ASSERT_EQ(run(node->read((32ull << 30) - 4096, std::span(tail), 0)), 0);
  EXPECT_EQ(tail, data);
  Bytes head(64 << 10);
  ASSERT_EQ(run(node->read(0, std::span(head), 0)), 0);
  EXPECT_TRUE(std::equal(head.begin(), head.end(), model.begin()));
  ASSERT_EQ(close(*node), 0);
  node.reset();
  const CommandResult check = qemu_check("g.qcow2");
  EXPECT_EQ(check.exit_code, 0) << check.output;
}

TEST_F(Qcow2Test, ConcurrentAllocatingWritesFromFourThreads) {
  REQUIRE_QEMU();
  const std::uint64_t cs = 4096;
  const std::uint64_t size = 8ull << 20;
  qemu_img("create -q -f qcow2 -o cluster_size=4096 m.qcow2 " + std::to_string(size));
  BlockNodeRef node = open_image("m.qcow2");
  ASSERT_TRUE(node);
  aio::IoThread t0("qcow2-0"), t1("qcow2-1"), t2("qcow2-2"), t3("qcow2-3");
  aio::IoThread* io_threads[] = {&t0, &t1, &t2, &t3};
  constexpr int kWriters = 4;
  constexpr int kWritesEach = 150;
  // Writer w owns the 1K pieces with (piece index % 4 == w): all four write into the same
  // clusters (each allocation races with three others) of the first L2 tables.
  auto writer = [&](int w) -> coro::Task<int> {
    std::mt19937 random(w);
    for (int i = 0; i < kWritesEach; ++i) {
      const std::uint64_t cluster = random() % 600;
      const std::uint64_t offset = cluster * cs + static_cast<std::uint64_t>(w) * 1024;
      Bytes data(1024, std::byte{static_cast<std::uint8_t>(w + 1)});
      const int result = co_await node->write(offset, std::span<const std::byte>(data), 0);
      if (result < 0) co_return result;
      Bytes back(1024);
      const int got = co_await node->read(offset, std::span(back), 0);
      if (got < 0) co_return got;
      if (back != data) co_return -EILSEQ;
    }
    co_return 0;
  };
  EXPECT_EQ(failures_running(io_threads, kWriters, writer), 0);
  // The model: each writer's pieces, replayed.
  Bytes model(size);
  for (int w = 0; w < kWriters; ++w) {
    std::mt19937 random(w);
    for (int i = 0; i < kWritesEach; ++i) {
      const std::uint64_t cluster = random() % 600;
      std::fill_n(model.begin() + static_cast<std::ptrdiff_t>(cluster * cs + w * 1024), 1024,
                  std::byte{static_cast<std::uint8_t>(w + 1)});
    }
  }
  EXPECT_EQ(read_all(*node), model);
  ASSERT_EQ(close(*node), 0);
  node.reset();
  const CommandResult check = qemu_check("m.qcow2");
  EXPECT_EQ(check.exit_code, 0) << check.output;
  qemu_compare("m.qcow2", model);
}

// Extended L2: a write into an allocated subcluster of a partly allocated cluster goes in place
// (no claim) while another request allocates a different subcluster of the same cluster in
// the same host cluster; neither may lose the other's bytes. qemu-io allocates the first four
// subclusters of each cluster; writer w rewrites subcluster w of each cluster in turn and
// allocates subcluster 4 + w of it, so writers race on each cluster's allocations. Reads are
// slowed to widen the window; every write has its own pattern, so a lost one shows whatever
// the timing.
TEST_F(Qcow2Test, ConcurrentSubclusterWritesIntoPartlyAllocatedClusters) {
  REQUIRE_QEMU();
  const std::uint64_t cs = 65536;
  const std::uint64_t sc = cs / 32;
  const std::uint64_t clusters = 48;
  const std::uint64_t size = clusters * cs;
  qemu_img("create -q -f qcow2 -o extended_l2=on,cluster_size=64k x.qcow2 " +
           std::to_string(size));
  std::string commands;
  for (std::uint64_t c = 0; c < clusters; ++c) {
    commands += " -c 'write -P 0x11 " + std::to_string(c * cs) + " " + std::to_string(4 * sc) + "'";
  }
  qemu_io("x.qcow2", commands);
  Bytes model = qemu_raw("x.qcow2");
  base::Result<BlockNodeRef> file = open_file(path("x.qcow2"), false);
  ASSERT_TRUE(file.ok());
  BlockResult<BlockNodeRef> opened =
      run(open_qcow2(std::make_shared<SlowReadNode>(file.value()), FormatOpenOptions{}));
  ASSERT_TRUE(opened.ok()) << opened.error().message;
  BlockNodeRef node = opened.value();
  aio::IoThread t0("qcow2-0"), t1("qcow2-1"), t2("qcow2-2"), t3("qcow2-3");
  aio::IoThread* io_threads[] = {&t0, &t1, &t2, &t3};
  constexpr int kWriters = 4;
  auto value = [](int w, std::uint64_t c, int k) {
    return static_cast<std::uint8_t>(0x20 + w * 48 + (c * 2 + k) % 48);
  };
  auto writer = [&](int w) -> coro::Task<int> {
    for (std::uint64_t c = 0; c < clusters; ++c) {
      for (int k = 0; k < 2; ++k) {
        // k 0: in place (subcluster w is allocated); k 1: allocates subcluster 4 + w.
        const std::uint64_t offset = c * cs + (k * 4 + static_cast<std::uint64_t>(w)) * sc;
        Bytes data(sc, std::byte{value(w, c, k)});
        const int result = co_await node->write(offset, std::span<const std::byte>(data), 0);
        if (result < 0) co_return result;
      }
    }
    co_return 0;
  };
  EXPECT_EQ(failures_running(io_threads, kWriters, writer), 0);
  for (int w = 0; w < kWriters; ++w) {
    for (std::uint64_t c = 0; c < clusters; ++c) {
      for (int k = 0; k < 2; ++k) {
        const std::uint64_t offset = c * cs + (k * 4 + static_cast<std::uint64_t>(w)) * sc;
        std::fill_n(model.begin() + static_cast<std::ptrdiff_t>(offset), sc,
                    std::byte{value(w, c, k)});
      }
    }
  }
  EXPECT_EQ(read_all(*node), model);
  ASSERT_EQ(close(*node), 0);
  node.reset();
  const CommandResult check = qemu_check("x.qcow2");
  EXPECT_EQ(check.exit_code, 0) << check.output;
  qemu_compare("x.qcow2", model);
}

// Extended L2: the subcluster bitmap of guest cluster `index` of the first L2 table of the
// image file at `file` (the L1 table's first entry), and the cluster's L2 entry.
std::pair<std::uint64_t, std::uint64_t> extended_l2_entry(const std::string& file,
                                                          std::uint64_t index) {
  const Bytes bytes = read_file_bytes(file);
  const std::uint64_t l1 = base::load_be64(bytes.data() + 40);
  const std::uint64_t l2 = base::load_be64(bytes.data() + l1) & kL1OffsetMask;
  return {base::load_be64(bytes.data() + l2 + index * 16),
          base::load_be64(bytes.data() + l2 + index * 16 + 8)};
}

// Extended L2 over a backing file: an allocating write marks only the subclusters it writes
// allocated (partial ones completed from the backing file), a zero cluster's other subclusters
// stay zero, and a write into a partly allocated cluster fills its own subclusters in place.
// The same writes done by qemu-io on a copy give the same L2 entries and the same
// `qemu-img map` (host offsets included).
TEST_F(Qcow2Test, ExtendedL2WritesAllocateOnlyTheSubclustersWritten) {
  REQUIRE_QEMU();
  const std::uint64_t cs = 65536;
  const std::uint64_t sc = cs / 32;
  qemu_img("create -q -f raw base.raw 1M");
  must_run("qemu-io -f raw -c 'write -P 0xba 0 1M' '" + path("base.raw") + "'");
  qemu_img("create -q -f qcow2 -o extended_l2=on,cluster_size=64k -b base.raw -F raw e.qcow2");
  qemu_io("e.qcow2", "-c 'write -z 128k 64k' -c 'write -P 0x05 256k 2k'");
  fs::copy_file(path("e.qcow2"), path("q.qcow2"));
  struct Write {
    std::uint64_t offset, length;
    std::uint8_t value;
  };
  const Write writes[] = {
      {0, 2 * sc, 0x01},                     // subclusters 0-1 of a fresh cluster
      {cs + 3 * sc + 100, 1000, 0x02},       // inside subcluster 3: the rest from backing
      {2 * cs + 5 * sc - 10, 20, 0x03},      // across subclusters 4 and 5 of a zero cluster
      {10 * sc, 3 * sc, 0x04},               // a partly allocated cluster: in place
      {4 * cs + 300, 100, 0x06},             // allocated subcluster 0 (qemu-io), then 1 new:
      {4 * cs + sc - 50, 100, 0x07},         //   an edge inside an allocated subcluster
      {5 * cs + 31 * sc, cs + 100, 0x08},    // the last subcluster, a whole cluster, a head
  };
  Bytes model = qemu_raw("e.qcow2");
  BlockNodeRef node = open_image("e.qcow2");
  ASSERT_TRUE(node);
  std::string commands;
  for (const Write& w : writes) {
    const Bytes data = pattern(w.length, w.value);
    ASSERT_EQ(write(*node, w.offset, data), 0) << w.offset;
    std::fill_n(model.begin() + static_cast<std::ptrdiff_t>(w.offset), w.length,
                std::byte{w.value});
    commands += " -c 'write -P " + std::to_string(w.value) + " " + std::to_string(w.offset) +
                " " + std::to_string(w.length) + "'";
  }
  EXPECT_EQ(read_all(*node), model);
  // Unwritten subclusters still show the backing file, or zeros.
  BlockStatus status = run(node->block_status(2 * sc, cs - 2 * sc));
  EXPECT_EQ(status.error, 0);
  EXPECT_EQ(status.flags & (kStatusData | kStatusZero | kStatusAllocated), 0u);
  EXPECT_EQ(status.bytes, 8 * sc);  // up to the in-place write at subcluster 10
  status = run(node->block_status(2 * cs + 6 * sc, sc));
  EXPECT_EQ(status.flags & (kStatusData | kStatusZero), kStatusZero);
  ASSERT_EQ(run(node->flush()), 0);
  auto* qcow2 = dynamic_cast<Qcow2Node*>(node.get());
  ASSERT_NE(qcow2, nullptr);
  const CheckReport report = run(check_image(*qcow2->file(), qcow2->header(), RepairMode::kNone));
  EXPECT_EQ(report.exit_code(), 0);
  EXPECT_EQ(report.corruptions + report.leaks, 0u);
  ASSERT_EQ(close(*node), 0);
  node.reset();

  EXPECT_EQ(extended_l2_entry(path("e.qcow2"), 0).second, 0x3u | (0x7ull << 10));
  EXPECT_EQ(extended_l2_entry(path("e.qcow2"), 1).second, 1u << 3);
  // The zero cluster: subclusters 4 and 5 allocated, every other one still zero.
  EXPECT_EQ(extended_l2_entry(path("e.qcow2"), 2).second, 0x30u | (~0x30ull << 32));
  qemu_io("q.qcow2", commands);
  for (std::uint64_t index = 0; index < 8; ++index) {
    EXPECT_EQ(extended_l2_entry(path("e.qcow2"), index), extended_l2_entry(path("q.qcow2"), index))
        << "cluster " << index;
  }
  const CommandResult ours = run_command("qemu-img map --output=json '" + path("e.qcow2") + "'");
  const CommandResult theirs = run_command("qemu-img map --output=json '" + path("q.qcow2") + "'");
  ASSERT_EQ(ours.exit_code, 0) << ours.output;
  EXPECT_EQ(ours.output, theirs.output);
  const CommandResult check = qemu_check("e.qcow2");
  EXPECT_EQ(check.exit_code, 0) << check.output;
  EXPECT_EQ(qemu_raw("e.qcow2"), model);
}

// Extended L2: four IoThreads write into different subclusters of the same fresh clusters at
// once (partial subclusters: copy-on-write from the backing file, with reads slowed). The
// first allocates the host cluster and the others fill their subclusters in it: every write
// lands, each cluster has exactly the subclusters written allocated, and the image is clean.
TEST_F(Qcow2Test, ConcurrentWritesToSubclustersOfOneFreshCluster) {
  REQUIRE_QEMU();
  const std::uint64_t cs = 65536;
  const std::uint64_t sc = cs / 32;
  const std::uint64_t clusters = 32;
  const std::uint64_t size = clusters * cs;
  qemu_img("create -q -f raw base.raw " + std::to_string(size));
  must_run("qemu-io -f raw -c 'write -P 0xba 0 " + std::to_string(size) + "' '" +
           path("base.raw") + "'");
  qemu_img("create -q -f qcow2 -o extended_l2=on,cluster_size=64k -b base.raw -F raw c.qcow2");
  Bytes model = qemu_raw("c.qcow2");
  base::Result<BlockNodeRef> file = open_file(path("c.qcow2"), false);
  ASSERT_TRUE(file.ok());
  base::Result<BlockNodeRef> backing = open_file(path("base.raw"), true);
  ASSERT_TRUE(backing.ok());
  FormatOpenOptions options;
  BlockNodeRef slow_backing = std::make_shared<SlowReadNode>(backing.value());
  options.open_backing = [slow_backing](std::string,
                                        std::string) -> coro::Task<BlockResult<BlockNodeRef>> {
    co_return slow_backing;
  };
  BlockResult<BlockNodeRef> opened =
      run(open_qcow2(std::make_shared<SlowReadNode>(file.value()), std::move(options)));
  ASSERT_TRUE(opened.ok()) << opened.error().message;
  BlockNodeRef node = opened.value();
  constexpr int kWriters = 4;
  // Writer w's subcluster of cluster c, and the bytes it writes there (a partial subcluster).
  auto subcluster = [](int w, std::uint64_t c) {
    return (c + static_cast<std::uint64_t>(w) * 7) % 32;
  };
  auto offset = [&](int w, std::uint64_t c) { return c * cs + subcluster(w, c) * sc + 256; };
  auto value = [](int w, std::uint64_t c) {
    return static_cast<std::uint8_t>(1 + w * 50 + c % 50);
  };
  const std::uint64_t length = sc - 512;
  aio::IoThread t0("qcow2-0"), t1("qcow2-1"), t2("qcow2-2"), t3("qcow2-3");
  aio::IoThread* io_threads[] = {&t0, &t1, &t2, &t3};
  auto writer = [&](int w) -> coro::Task<int> {
    for (std::uint64_t c = 0; c < clusters; ++c) {
      Bytes data(length, std::byte{value(w, c)});
      const int result = co_await node->write(offset(w, c), std::span<const std::byte>(data), 0);
      if (result < 0) co_return result;
    }
    co_return 0;
  };
  EXPECT_EQ(failures_running(io_threads, kWriters, writer), 0);
  for (int w = 0; w < kWriters; ++w) {
    for (std::uint64_t c = 0; c < clusters; ++c) {
      std::fill_n(model.begin() + static_cast<std::ptrdiff_t>(offset(w, c)), length,
                  std::byte{value(w, c)});
    }
  }
  EXPECT_EQ(read_all(*node), model);
  ASSERT_EQ(run(node->flush()), 0);
  auto* qcow2 = dynamic_cast<Qcow2Node*>(node.get());
  ASSERT_NE(qcow2, nullptr);
  const CheckReport report = run(check_image(*qcow2->file(), qcow2->header(), RepairMode::kNone));
  EXPECT_EQ(report.exit_code(), 0);
  EXPECT_EQ(report.corruptions + report.leaks, 0u);
  EXPECT_EQ(report.allocated_clusters, clusters);
  ASSERT_EQ(close(*node), 0);
  node.reset();
  std::vector<std::uint64_t> hosts;
  for (std::uint64_t c = 0; c < clusters; ++c) {
    std::uint64_t expected = 0;
    for (int w = 0; w < kWriters; ++w) expected |= 1ull << subcluster(w, c);
    const auto [entry, bitmap] = extended_l2_entry(path("c.qcow2"), c);
    EXPECT_EQ(bitmap, expected) << "cluster " << c;
    EXPECT_NE(entry & kL2OffsetMask, 0u) << "cluster " << c;
    hosts.push_back(entry & kL2OffsetMask);
  }
  std::sort(hosts.begin(), hosts.end());
  EXPECT_EQ(std::unique(hosts.begin(), hosts.end()), hosts.end());
  const CommandResult check = qemu_check("c.qcow2");
  EXPECT_EQ(check.exit_code, 0) << check.output;
  qemu_compare("c.qcow2", model);
}

TEST_F(Qcow2Test, ACrashAtAnyPointLeavesAtWorstLeakedClusters) {
  REQUIRE_QEMU();
  // Small caches, so that write-back also happens between requests; 512-byte clusters with
  // 64-bit refcounts, so that new refcount blocks and a larger refcount table are needed.
  qemu_img("create -q -f qcow2 -o cluster_size=512,refcount_bits=64 k.qcow2 8M");
  const Bytes base = read_file_bytes(path("k.qcow2"));
  base::Result<BlockNodeRef> file = open_file(path("k.qcow2"), false);
  ASSERT_TRUE(file.ok());
  auto recorder = std::make_shared<RecordingNode>(file.value());
  FormatOpenOptions options;
  options.options["l2-cache-size"] = "1k";
  BlockResult<BlockNodeRef> opened = run(open_qcow2(recorder, options));
  ASSERT_TRUE(opened.ok()) << opened.error().message;
  BlockNodeRef node = opened.value();
  std::mt19937 random(11);
  for (int i = 0; i < 30; ++i) {
    const std::uint64_t length = 512 * (1 + random() % 16);
    const std::uint64_t offset = (random() % ((8ull << 20) / 512 - 16)) * 512;
    ASSERT_EQ(write(*node, offset, pattern(length, static_cast<std::uint8_t>(i + 1))), 0);
    if (i % 10 == 9) {
      ASSERT_EQ(run(node->flush()), 0);
    }
    if (i == 25) {
      ASSERT_EQ(run(node->discard(offset, length)), 0);
    }
  }
  ASSERT_EQ(close(*node), 0);
  node.reset();
  EXPECT_GT(check_every_crash_state(base, recorder->events()), 20u);
  const CommandResult final_check = qemu_check("k.qcow2");
  EXPECT_EQ(final_check.exit_code, 0) << final_check.output;
}

// Discarded data clusters are reused for new data once the discard is on disk (the file does
// not grow), and discard-and-rewrite rounds keep the file at its size; qemu-img check stays
// clean and the content equal to a model.
TEST_F(Qcow2Test, DiscardedDataClustersAreReusedForNewData) {
  REQUIRE_QEMU();
  const std::uint64_t size = 8ull << 20;
  qemu_img("create -q -f qcow2 r.qcow2 " + std::to_string(size));
  BlockNodeRef node = open_image("r.qcow2");
  ASSERT_TRUE(node);
  auto* qcow2 = dynamic_cast<Qcow2Node*>(node.get());
  Bytes model(size);
  const auto put = [&](std::uint64_t offset, const Bytes& data) {
    ASSERT_EQ(write(*node, offset, data), 0);
    std::copy(data.begin(), data.end(), model.begin() + static_cast<std::ptrdiff_t>(offset));
  };
  put(0, pattern(1 << 20, 1));
  ASSERT_EQ(run(node->flush()), 0);
  const std::uint64_t full = fs::file_size(path("r.qcow2"));
  ASSERT_EQ(run(node->discard(0, 1 << 20)), 0);
  std::fill_n(model.begin(), 1 << 20, std::byte{0});
  EXPECT_EQ(qcow2->quarantined_clusters() + qcow2->reusable_clusters(), 0u);  // not before
  ASSERT_EQ(run(node->flush()), 0);  // the flush that puts the discard on disk
  EXPECT_EQ(qcow2->reusable_clusters(), 16u);  // no request was running
  put(4 << 20, pattern(1 << 20, 2));  // 16 new clusters: the 16 freed ones
  EXPECT_EQ(qcow2->quarantined_clusters() + qcow2->reusable_clusters(), 0u);
  ASSERT_EQ(run(node->flush()), 0);
  EXPECT_EQ(fs::file_size(path("r.qcow2")), full);
  for (int round = 0; round < 8; ++round) {
    ASSERT_EQ(run(node->discard(4 << 20, 1 << 20)), 0);
    ASSERT_EQ(run(node->flush()), 0);
    put(4 << 20, pattern(1 << 20, static_cast<std::uint8_t>(10 + round)));
    put(7 << 20, pattern(65536, static_cast<std::uint8_t>(20 + round)));  // in place after round 0
    ASSERT_EQ(run(node->flush()), 0);
  }
  EXPECT_LE(fs::file_size(path("r.qcow2")), full + 65536);
  EXPECT_EQ(read_all(*node), model);
  ASSERT_EQ(close(*node), 0);
  node.reset();
  const CommandResult check = qemu_check("r.qcow2");
  EXPECT_EQ(check.exit_code, 0) << check.output;
  qemu_compare("r.qcow2", model);
}

// Passes everything to its child, except that while armed a read of [begin, end) waits for the
// gate to open (and says so in `waiting`).
class GateNode final : public FilterNode {
 public:
  explicit GateNode(BlockNodeRef child) : FilterNode(std::move(child)) {}
  const char* driver_name() const noexcept override { return "gate"; }
  coro::Task<int> read(std::uint64_t offset, std::span<std::byte> buffer,
                       std::uint32_t flags) override {
    if (armed.load() && offset < end && offset + buffer.size() > begin) {
      waiting.store(true);
      co_await gate.wait();
    }
    co_return co_await child_->read(offset, buffer, flags);
  }
  std::atomic<bool> armed{false}, waiting{false};
  std::uint64_t begin = 0, end = 0;
  coro::Event gate;
};

// A read that looked a cluster up before its discard keeps that cluster from being reused
// until it is done: an allocating write meanwhile goes to the end of the file; after the read
// the next one takes the freed cluster. The read returns the data from before the discard.
TEST_F(Qcow2Test, ARequestInFlightKeepsItsFreedClusterFromReuse) {
  REQUIRE_QEMU();
  qemu_img("create -q -f qcow2 g.qcow2 8M");
  base::Result<BlockNodeRef> file = open_file(path("g.qcow2"), false);
  ASSERT_TRUE(file.ok());
  auto gate = std::make_shared<GateNode>(file.value());
  BlockResult<BlockNodeRef> opened = run(open_qcow2(gate, FormatOpenOptions{}));
  ASSERT_TRUE(opened.ok()) << opened.error().message;
  BlockNodeRef node = opened.value();
  auto* qcow2 = dynamic_cast<Qcow2Node*>(node.get());
  ASSERT_EQ(write(*node, 0, pattern(65536, 0x5a)), 0);
  ASSERT_EQ(run(node->flush()), 0);
  const BlockStatus where = run(node->block_status(0, 65536));
  ASSERT_TRUE(where.flags & kStatusOffsetValid);
  const std::uint64_t host = where.file_offset;

  gate->begin = host;
  gate->end = host + 65536;
  gate->armed.store(true);
  aio::IoThread reader_thread("gate-reader");
  Bytes seen(65536);
  std::thread reader([&] {
    EXPECT_EQ(coro::block_on(reader_thread.context(), node->read(0, std::span(seen), 0)), 0);
  });
  while (!gate->waiting.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  gate->armed.store(false);

  ASSERT_EQ(run(node->discard(0, 65536)), 0);
  ASSERT_EQ(run(node->flush()), 0);
  EXPECT_EQ(qcow2->quarantined_clusters(), 1u);
  ASSERT_EQ(write(*node, 1 << 20, pattern(65536, 0x11)), 0);  // not into the held cluster
  const BlockStatus first = run(node->block_status(1 << 20, 65536));
  EXPECT_NE(first.file_offset, host);
  EXPECT_EQ(qcow2->quarantined_clusters() + qcow2->reusable_clusters(), 1u);

  gate->gate.set();
  reader.join();
  EXPECT_EQ(seen, pattern(65536, 0x5a));
  ASSERT_EQ(write(*node, 2 << 20, pattern(65536, 0x22)), 0);  // now it is reused
  const BlockStatus second = run(node->block_status(2 << 20, 65536));
  EXPECT_EQ(second.file_offset, host);
  ASSERT_EQ(close(*node), 0);
  node.reset();
  const CommandResult check = qemu_check("g.qcow2");
  EXPECT_EQ(check.exit_code, 0) << check.output;
}

// Reuse with a crash at any point: every write-out order leaves an image qemu-img check calls
// clean or leaking (never a cluster counted once and named twice, or named and counted 0).
TEST_F(Qcow2Test, ACrashWhileFreedClustersAreReusedLeavesAtWorstLeaks) {
  REQUIRE_QEMU();
  qemu_img("create -q -f qcow2 -o cluster_size=4096 u.qcow2 1M");
  const Bytes base = read_file_bytes(path("u.qcow2"));
  base::Result<BlockNodeRef> file = open_file(path("u.qcow2"), false);
  ASSERT_TRUE(file.ok());
  auto recorder = std::make_shared<RecordingNode>(file.value());
  BlockResult<BlockNodeRef> opened = run(open_qcow2(recorder, FormatOpenOptions{}));
  ASSERT_TRUE(opened.ok()) << opened.error().message;
  BlockNodeRef node = opened.value();
  auto* qcow2 = dynamic_cast<Qcow2Node*>(node.get());
  ASSERT_EQ(write(*node, 0, pattern(8 * 4096, 1)), 0);
  ASSERT_EQ(run(node->flush()), 0);
  const std::uint64_t full = fs::file_size(path("u.qcow2"));
  ASSERT_EQ(run(node->discard(2 * 4096, 4 * 4096)), 0);
  ASSERT_EQ(run(node->flush()), 0);
  ASSERT_EQ(write(*node, 64 * 4096, pattern(2 * 4096, 2)), 0);
  ASSERT_EQ(write(*node, 80 * 4096, pattern(4096, 3)), 0);
  ASSERT_EQ(run(node->flush()), 0);
  ASSERT_EQ(write(*node, 81 * 4096, pattern(4096, 4)), 0);
  EXPECT_EQ(qcow2->reusable_clusters(), 0u);  // all four taken
  ASSERT_EQ(close(*node), 0);
  node.reset();
  EXPECT_EQ(fs::file_size(path("u.qcow2")), full);

  EXPECT_GT(check_every_crash_state(base, recorder->events()), 10u);
  const CommandResult final_check = qemu_check("u.qcow2");
  EXPECT_EQ(final_check.exit_code, 0) << final_check.output;
  Bytes model(1 << 20);
  std::fill_n(model.begin(), 8 * 4096, std::byte{1});
  std::fill_n(model.begin() + 2 * 4096, 4 * 4096, std::byte{0});
  std::fill_n(model.begin() + 64 * 4096, 2 * 4096, std::byte{2});
  std::fill_n(model.begin() + 80 * 4096, 4096, std::byte{3});
  std::fill_n(model.begin() + 81 * 4096, 4096, std::byte{4});
  qemu_compare("u.qcow2", model);
}

TEST_F(Qcow2Test, ConcurrentWritersFlushesAndRefcountTableGrowth) {
  REQUIRE_QEMU();
  // 512-byte clusters, 64-bit refcounts: writers share L2 tables and refcount blocks, new
  // refcount blocks and a larger refcount table are needed while they run, and a fifth
  // coroutine flushes meanwhile; the small L2 cache forces write-back too.
  const std::uint64_t size = 16ull << 20;
  qemu_img("create -q -f qcow2 -o cluster_size=512,refcount_bits=64 w.qcow2 " + std::to_string(size));
  FormatOpenOptions options;
  options.options["l2-cache-size"] = "2k";
  const std::uint64_t table_before = file_be64(path("w.qcow2"), 48);
  BlockNodeRef node = open_image("w.qcow2", false, options);
  ASSERT_TRUE(node);
  aio::IoThread t0("qcow2-w0"), t1("qcow2-w1"), t2("qcow2-w2"), t3("qcow2-w3"), t4("qcow2-f");
  aio::IoThread* io_threads[] = {&t0, &t1, &t2, &t3, &t4};
  constexpr int kWriters = 4;
  constexpr int kWritesEach = 400;
  // Writer w owns the 4K stripes with (stripe % 4 == w) and writes within one stripe at a time.
  auto plan = [&](int w, int i, std::uint64_t& offset, std::uint64_t& length) {
    std::mt19937 random(static_cast<unsigned>(w * 1000 + i));
    const std::uint64_t stripe = (random() % (size / 4096 / kWriters)) * kWriters + w;
    const std::uint64_t start = random() % 8;
    length = 512 * (1 + random() % (8 - start));
    offset = stripe * 4096 + start * 512;
  };
  std::atomic<int> writers_left{kWriters};
  auto writer = [&](int w) -> coro::Task<int> {
    for (int i = 0; i < kWritesEach; ++i) {
      std::uint64_t offset = 0;
      std::uint64_t length = 0;
      plan(w, i, offset, length);
      Bytes data(length, std::byte{static_cast<std::uint8_t>(w * 16 + i % 16 + 1)});
      const int result = co_await node->write(offset, std::span<const std::byte>(data), 0);
      if (result < 0) co_return result;
    }
    writers_left.fetch_sub(1);
    co_return 0;
  };
  auto flusher = [&]() -> coro::Task<int> {
    while (writers_left.load() > 0) {
      const int result = co_await node->flush();
      if (result < 0) co_return result;
    }
    co_return 0;
  };
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int w = 0; w < kWriters; ++w) {
    threads.emplace_back([&, w] {
      if (coro::block_on(io_threads[w]->context(), writer(w)) != 0) failures.fetch_add(1);
    });
  }
  threads.emplace_back([&] {
    if (coro::block_on(io_threads[4]->context(), flusher()) != 0) failures.fetch_add(1);
  });
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(failures.load(), 0);
  Bytes model(size);
  for (int w = 0; w < kWriters; ++w) {
    for (int i = 0; i < kWritesEach; ++i) {
      std::uint64_t offset = 0;
      std::uint64_t length = 0;
      plan(w, i, offset, length);
      std::fill_n(model.begin() + static_cast<std::ptrdiff_t>(offset), length,
                  std::byte{static_cast<std::uint8_t>(w * 16 + i % 16 + 1)});
    }
  }
  EXPECT_EQ(read_all(*node), model);
  ASSERT_EQ(close(*node), 0);
  node.reset();
  EXPECT_NE(file_be64(path("w.qcow2"), 48), table_before);  // the refcount table moved
  const CommandResult check = qemu_check("w.qcow2");
  EXPECT_EQ(check.exit_code, 0) << check.output;
  qemu_compare("w.qcow2", model);
}

// Counts the reads of each offset (the metadata loads of a format above it).
class CountingNode final : public FilterNode {
 public:
  explicit CountingNode(BlockNodeRef child) : FilterNode(std::move(child)) {}
  const char* driver_name() const noexcept override { return "counting"; }
  coro::Task<int> read(std::uint64_t offset, std::span<std::byte> buffer,
                       std::uint32_t flags) override {
    {
      std::lock_guard lock(mutex_);
      ++reads_[offset];
    }
    co_return co_await child_->read(offset, buffer, flags);
  }
  int reads_at(std::uint64_t offset) {
    std::lock_guard lock(mutex_);
    return reads_[offset];
  }

 private:
  std::mutex mutex_;
  std::map<std::uint64_t, int> reads_;
};

TEST_F(Qcow2Test, ConcurrentMissesOnOneL2TableLoadItOnce) {
  REQUIRE_QEMU();
  qemu_img("create -q -f qcow2 l.qcow2 64M");
  qemu_io("l.qcow2", "-c 'write -P 0x71 0 1M'");
  const std::uint64_t l1_offset = file_be64(path("l.qcow2"), 40);
  const std::uint64_t l2_offset = file_be64(path("l.qcow2"), l1_offset) & kL1OffsetMask;
  base::Result<BlockNodeRef> file = open_file(path("l.qcow2"), true);
  ASSERT_TRUE(file.ok());
  auto counter = std::make_shared<CountingNode>(file.value());
  FormatOpenOptions options;
  options.read_only = true;
  BlockResult<BlockNodeRef> opened = run(open_qcow2(counter, options));
  ASSERT_TRUE(opened.ok()) << opened.error().message;
  BlockNodeRef node = opened.value();
  aio::IoThread t0("qcow2-r0"), t1("qcow2-r1"), t2("qcow2-r2"), t3("qcow2-r3");
  aio::IoThread* io_threads[] = {&t0, &t1, &t2, &t3};
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int r = 0; r < 4; ++r) {
    threads.emplace_back([&, r] {
      auto reader = [&]() -> coro::Task<int> {
        Bytes buffer(4096);
        for (int i = 0; i < 50; ++i) {
          const int result = co_await node->read((r * 50 + i) * 4096ull, std::span(buffer), 0);
          if (result < 0) co_return result;
          if (buffer != pattern(4096, 0x71)) co_return -EILSEQ;
        }
        co_return 0;
      };
      if (coro::block_on(io_threads[r]->context(), reader()) != 0) failures.fetch_add(1);
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(counter->reads_at(l2_offset), 1);
  // The cached table says where guest bytes lie in the file (for zero-copy sends): the
  // counting node passes nothing on, so ask a node over the file itself.
  EXPECT_FALSE(node->host_file_range(0, 4096).has_value());
  ASSERT_EQ(close(*node), 0);
  BlockNodeRef direct = open_image("l.qcow2", true);
  ASSERT_TRUE(direct);
  EXPECT_FALSE(direct->host_file_range(0, 4096).has_value());  // table not loaded yet
  Bytes buffer(4096);
  ASSERT_EQ(run(direct->read(0, std::span(buffer), 0)), 0);
  const std::optional<HostFileRange> range = direct->host_file_range(8192, 4096);
  ASSERT_TRUE(range.has_value());
  const std::uint64_t data = file_be64(path("l.qcow2"), l2_offset) & kL2OffsetMask;
  EXPECT_EQ(range->offset, data + 8192);
  EXPECT_FALSE(direct->host_file_range(2 << 20, 4096).has_value());  // unallocated
  ASSERT_EQ(close(*direct), 0);
}

// --- open validation and corruption ---------------------------------------------------------

TEST_F(Qcow2Test, CorruptL2EntryIsEioAndMarksTheImageCorrupt) {
  REQUIRE_QEMU();
  qemu_img("create -q -f qcow2 x.qcow2 4M");
  qemu_io("x.qcow2", "-c 'write -P 0x5a 0 256k'");
  // The L1 table's first entry names the L2 table; point its second entry at the header.
  const std::uint64_t l1_offset = file_be64(path("x.qcow2"), 40);
  const std::uint64_t l2_offset = file_be64(path("x.qcow2"), l1_offset) & kL1OffsetMask;
  patch_be64(path("x.qcow2"), l2_offset + 8, kEntryCopied | l1_offset);  // at metadata
  patch_be64(path("x.qcow2"), l2_offset + 16, kEntryCopied | (1ull << 40));  // past EOF
  patch_be64(path("x.qcow2"), l2_offset + 24, kEntryCopied | 0x10000 | 0x2);  // reserved bit
  {
    BlockNodeRef node = open_image("x.qcow2", true);
    ASSERT_TRUE(node);
    Bytes buffer(65536);
    EXPECT_EQ(run(node->read(0, std::span(buffer), 0)), 0);
    EXPECT_EQ(buffer, pattern(65536, 0x5a));
    for (int cluster = 1; cluster <= 3; ++cluster) {
      EXPECT_EQ(run(node->read(cluster * 65536ull, std::span(buffer), 0)), -EIO) << cluster;
      EXPECT_EQ(run(node->block_status(cluster * 65536ull, 65536)).error, -EIO) << cluster;
    }
    ASSERT_EQ(close(*node), 0);
  }
  // Read-only opens never write the corrupt bit.
  EXPECT_EQ(file_be64(path("x.qcow2"), 72) & kIncompatCorrupt, 0u);
  {
    BlockNodeRef node = open_image("x.qcow2");
    ASSERT_TRUE(node);
    Bytes buffer(4096);
    EXPECT_EQ(run(node->read(65536 * 2, std::span(buffer), 0)), -EIO);
    EXPECT_EQ(write(*node, 0, pattern(512, 1)), -EIO);  // no more writes once corrupt
    (void)close(*node);
  }
  EXPECT_NE(file_be64(path("x.qcow2"), 72) & kIncompatCorrupt, 0u);
  const BlockResult<BlockNodeRef> again = try_open("x.qcow2");
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.error().error, EACCES);
  EXPECT_NE(again.error().message.find("corrupt"), std::string::npos);
  EXPECT_TRUE(try_open("x.qcow2", true).ok());
}

TEST_F(Qcow2Test, EntryPastTheEndStaysCorruptWhenTheFileGrowsOverIt) {
  REQUIRE_QEMU();
  qemu_img("create -q -f qcow2 y.qcow2 4M");
  qemu_io("y.qcow2", "-c 'write -P 0x5b 0 64k'");
  const std::uint64_t end = fs::file_size(path("y.qcow2"));
  const std::uint64_t l1_offset = file_be64(path("y.qcow2"), 40);
  const std::uint64_t l2_offset = file_be64(path("y.qcow2"), l1_offset) & kL1OffsetMask;
  const std::uint64_t beyond = (end + 65535) / 65536 * 65536 + 2 * 65536;
  patch_be64(path("y.qcow2"), l2_offset + 8, kEntryCopied | beyond);
  BlockNodeRef node = open_image("y.qcow2");
  ASSERT_TRUE(node);
  // Allocations in the same L2 table grow the file past `beyond`.
  for (std::uint64_t cluster = 2; cluster < 10; ++cluster) {
    ASSERT_EQ(write(*node, cluster * 65536, pattern(65536, 0x60 + cluster)), 0);
  }
  ASSERT_EQ(run(node->flush()), 0);
  ASSERT_GT(fs::file_size(path("y.qcow2")), beyond + 65536);
  Bytes buffer(65536);
  EXPECT_EQ(run(node->read(65536, std::span(buffer), 0)), -EIO);
  EXPECT_EQ(write(*node, 65536, pattern(512, 1)), -EIO);
  (void)close(*node);
}

TEST_F(Qcow2Test, OpenRefusesBadTablesDirtyImagesAndUnknownOptions) {
  REQUIRE_QEMU();
  qemu_img("create -q -f qcow2 o.qcow2 4M");
  const Bytes original = read_file_bytes(path("o.qcow2"));
  // L1 table past the end of the file.
  patch_be64(path("o.qcow2"), 40, 1ull << 30);
  EXPECT_EQ(try_open("o.qcow2", true).error().error, EINVAL);
  write_file_bytes(path("o.qcow2"), original);
  // Refcount table past the end of the file.
  patch_be64(path("o.qcow2"), 48, 1ull << 30);
  EXPECT_EQ(try_open("o.qcow2", true).error().error, EINVAL);
  write_file_bytes(path("o.qcow2"), original);
  write_file_bytes(path("o.qcow2"), original);
  FormatOpenOptions options;
  options.options["no-such-option"] = "1";
  EXPECT_EQ(try_open("o.qcow2", true, options).error().error, EINVAL);
  options.options.clear();
  options.options["l2-cache-size"] = "128k";
  EXPECT_TRUE(try_open("o.qcow2", true, options).ok());
}

TEST_F(Qcow2Test, DirtyImageIsRepairedOnAWritableOpen) {
  REQUIRE_QEMU();
  // A lazy-refcounts image left dirty: data written, refcounts not updated. qemu-io's
  // "abort" kills it before it can clean up.
  qemu_img("create -q -f qcow2 -o lazy_refcounts=on d.qcow2 4M");
  run_command("cd '" + dir_ + "' && qemu-io -f qcow2 -c 'write -P 0x3c 0 512k' -c 'write -P 0x3d 2M 64k' "
              "-c abort d.qcow2");
  ASSERT_NE(file_be64(path("d.qcow2"), 72) & kIncompatDirty, 0u);
  const Bytes model = qemu_raw("d.qcow2");
  {
    // Read-only: opened as it is, bit still set afterwards.
    BlockNodeRef node = open_image("d.qcow2", true);
    ASSERT_TRUE(node);
    EXPECT_EQ(read_all(*node), model);
    ASSERT_EQ(close(*node), 0);
  }
  EXPECT_NE(file_be64(path("d.qcow2"), 72) & kIncompatDirty, 0u);
  BlockNodeRef node = open_image("d.qcow2");
  ASSERT_TRUE(node);
  EXPECT_EQ(file_be64(path("d.qcow2"), 72) & kIncompatDirty, 0u);
  EXPECT_EQ(read_all(*node), model);
  ASSERT_EQ(write(*node, 3 << 20, pattern(4096, 0x3e)), 0);
  ASSERT_EQ(close(*node), 0);
  node.reset();
  const CommandResult check = qemu_check("d.qcow2");
  EXPECT_EQ(check.exit_code, 0) << check.output;
}

TEST_F(Qcow2Test, SmallL2CacheStillReadsAndWritesEverything) {
  REQUIRE_QEMU();
  // 4K clusters: an L2 table covers 2 MiB; 16 MiB need 8 tables, the cache holds 2.
  const std::uint64_t size = 16ull << 20;
  qemu_img("create -q -f qcow2 -o cluster_size=4096 s.qcow2 " + std::to_string(size));
  qemu_io("s.qcow2", "-c 'write -P 0x31 0 1M' -c 'write -P 0x32 9M 3M'");
  Bytes model = qemu_raw("s.qcow2");
  FormatOpenOptions options;
  options.options["l2-cache-size"] = "8k";
  BlockNodeRef node = open_image("s.qcow2", false, options);
  ASSERT_TRUE(node);
  for (std::uint64_t offset = 1 << 20; offset < size; offset += (1 << 20) + 4096) {
    const Bytes data = pattern(6000, static_cast<std::uint8_t>(offset >> 20));
    ASSERT_EQ(write(*node, offset, data), 0);
    std::copy(data.begin(), data.end(), model.begin() + static_cast<std::ptrdiff_t>(offset));
  }
  EXPECT_EQ(read_all(*node), model);
  ASSERT_EQ(close(*node), 0);
  node.reset();
  const CommandResult check = qemu_check("s.qcow2");
  EXPECT_EQ(check.exit_code, 0) << check.output;
  qemu_compare("s.qcow2", model);
}

// Compressed writes (convert -c) from four IoThreads at once: compressible clusters are packed
// byte-wise, several to a host cluster (each host cluster's refcount counting them: qemu-img
// check clean), incompressible ones are stored as plain clusters, and a compressed write to a
// cluster that holds data, or not of one whole cluster, is refused.
TEST_F(Qcow2Test, CompressedWritesPackShareFallBackAndRefuseAllocatedClusters) {
  REQUIRE_QEMU();
  const std::uint64_t cs = 4096;
  const std::uint64_t clusters = 256;
  const std::uint64_t size = clusters * cs - 1024;  // the last cluster is short
  qemu_img("create -q -f qcow2 -o cluster_size=4096 c.qcow2 " + std::to_string(size));
  BlockNodeRef node = open_image("c.qcow2");
  ASSERT_TRUE(node);
  const auto incompressible = [](std::uint64_t c) { return c % 37 == 5; };
  Bytes model(size);
  std::mt19937 random(7);
  for (std::uint64_t c = 0; c < clusters; ++c) {
    const std::uint64_t length = std::min(cs, size - c * cs);
    for (std::uint64_t i = 0; i < length; ++i) {
      model[c * cs + i] = incompressible(c) ? std::byte{static_cast<std::uint8_t>(random())}
                                            : std::byte{static_cast<std::uint8_t>(c + i / 64)};
    }
  }
  aio::IoThread t0("qcow2c-0"), t1("qcow2c-1"), t2("qcow2c-2"), t3("qcow2c-3");
  aio::IoThread* io_threads[] = {&t0, &t1, &t2, &t3};
  auto writer = [&](std::uint64_t w) -> coro::Task<int> {
    for (std::uint64_t c = w; c < clusters; c += 4) {
      const std::uint64_t length = std::min(cs, size - c * cs);
      const int result = co_await node->write(
          c * cs, std::span<const std::byte>(model).subspan(c * cs, length), kWriteCompressed);
      if (result < 0) co_return result;
    }
    co_return 0;
  };
  EXPECT_EQ(failures_running(io_threads, 4, writer), 0);
  EXPECT_EQ(read_all(*node), model);
  const Bytes one(cs, std::byte{1});
  EXPECT_EQ(run(node->write(0, std::span<const std::byte>(one), kWriteCompressed)), -EINVAL);
  EXPECT_EQ(run(node->write(5 * cs, std::span<const std::byte>(one), kWriteCompressed)), -EINVAL);
  EXPECT_EQ(run(node->write(512, std::span<const std::byte>(one).first(512), kWriteCompressed)),
            -EINVAL);
  EXPECT_FALSE(std::static_pointer_cast<Qcow2Node>(node)->corrupt());
  ASSERT_EQ(close(*node), 0);
  node.reset();
  const CommandResult check = run_command("qemu-img check --output=json '" + path("c.qcow2") + "'");
  EXPECT_EQ(check.exit_code, 0) << check.output;
  std::uint64_t plain = 0;
  for (std::uint64_t c = 0; c < clusters; ++c) plain += incompressible(c);
  EXPECT_NE(check.output.find("\"compressed-clusters\": " + std::to_string(clusters - plain)),
            std::string::npos)
      << check.output;
  // Packed: the compressed clusters take a few host clusters, not one each.
  EXPECT_LT(fs::file_size(path("c.qcow2")), (8 + plain + (clusters - plain) / 4) * cs);
  qemu_compare("c.qcow2", model);
}

// compress_cluster(): what it writes decompress_cluster() reads back, for both types; data that
// does not shrink below the output buffer is refused with -ENOSPC.
TEST(Qcow2Compression, CompressRoundTripsAndRefusesWhatDoesNotFit) {
  std::vector<std::byte> cluster(65536);
  for (std::size_t i = 0; i < cluster.size(); ++i) cluster[i] = std::byte(i / 300 % 7);
  std::vector<std::byte> noise(65536);
  std::mt19937 random(13);
  for (std::byte& b : noise) b = std::byte(random() & 0xff);
  for (const CompressionType type : {CompressionType::kDeflate, CompressionType::kZstd}) {
    std::vector<std::byte> out(cluster.size() - 1);
    const int length = compress_cluster(type, cluster, out);
    ASSERT_GT(length, 0);
    EXPECT_LT(length, 4096);
    std::vector<std::byte> back(cluster.size());
    // Trailing bytes after the stream (the stored extent is whole sectors) are ignored.
    std::vector<std::byte> stored(out.begin(), out.begin() + length);
    stored.resize(stored.size() + 300, std::byte{0x55});
    ASSERT_EQ(decompress_cluster(type, stored, back), 0);
    EXPECT_EQ(back, cluster);
    EXPECT_EQ(compress_cluster(type, noise, out), -ENOSPC);
  }
}

// decompress_cluster() on streams that are not exactly one cluster: one that goes on past the
// cluster gives the cluster's worth (as qemu reads it: libdeflate refuses it, zlib takes over);
// a short, truncated or garbage stream is -EIO; a failure leaves the thread's reused
// decompression state fit for the next cluster.
TEST(Qcow2Compression, StreamsLongerShorterOrBrokenAreHandledAsQemuDoes) {
  std::vector<std::byte> twice(2 * 65536);
  for (std::size_t i = 0; i < twice.size(); ++i) twice[i] = std::byte(i / 100 % 11);
  const std::span<const std::byte> first_cluster = std::span(twice).first(65536);
  for (const CompressionType type : {CompressionType::kDeflate, CompressionType::kZstd}) {
    std::vector<std::byte> long_stream(twice.size());
    const int long_length = compress_cluster(type, twice, long_stream);
    ASSERT_GT(long_length, 0);
    long_stream.resize(static_cast<std::size_t>(long_length));
    std::vector<std::byte> back(65536);
    if (type == CompressionType::kDeflate) {
      ASSERT_EQ(decompress_cluster(type, long_stream, back), 0);
      EXPECT_TRUE(std::equal(back.begin(), back.end(), first_cluster.begin()));
    }

    std::vector<std::byte> half_stream(65536);
    const int half_length =
        compress_cluster(type, std::span<const std::byte>(twice).first(32768), half_stream);
    ASSERT_GT(half_length, 0);
    half_stream.resize(static_cast<std::size_t>(half_length));
    EXPECT_EQ(decompress_cluster(type, half_stream, back), -EIO);  // short of the cluster

    std::vector<std::byte> stream(65536);
    const int length = compress_cluster(type, first_cluster, stream);
    ASSERT_GT(length, 8);
    stream.resize(static_cast<std::size_t>(length));
    const std::vector<std::byte> truncated(stream.begin(), stream.begin() + length / 2);
    EXPECT_EQ(decompress_cluster(type, truncated, back), -EIO);
    const std::vector<std::byte> garbage(512, std::byte{0xff});
    EXPECT_EQ(decompress_cluster(type, garbage, back), -EIO);
    std::fill(back.begin(), back.end(), std::byte{0});
    ASSERT_EQ(decompress_cluster(type, stream, back), 0);  // after failures: still works
    EXPECT_TRUE(std::equal(back.begin(), back.end(), first_cluster.begin()));
  }
}

}  // namespace
}  // namespace spindle::block::qcow2
