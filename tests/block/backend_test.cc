// Block layer core: the file, raw and null drivers and BlockBackend — bounds, alignment with
// read-modify-write (concurrent RMWs of one block from two IoThreads lose nothing), splitting,
// drain, block status on sparse files, zeroing and discard, blocking wrappers.
#include "block/block_backend.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <memory>
#include <vector>

#include "aio/context.h"
#include "aio/io_thread.h"
#include "block/drivers/file.h"
#include "block/drivers/null.h"
#include "block/drivers/raw.h"
#include "coro/block_on.h"
#include "coro/event.h"
#include "coro/sleep.h"
#include "coro/task.h"
#include "support/memory_node.h"

namespace spindle::block {
namespace {

using namespace std::chrono_literals;

std::vector<std::byte> pattern(std::size_t size, int seed) {
  std::vector<std::byte> data(size);
  for (std::size_t i = 0; i < size; ++i) data[i] = static_cast<std::byte>((i * 31 + seed) & 0xff);
  return data;
}

class TempPath {
 public:
  TempPath() {
    char path[] = "/tmp/spindle-block-XXXXXX";
    const int fd = ::mkstemp(path);
    EXPECT_GE(fd, 0);
    ::close(fd);
    path_ = path;
  }
  ~TempPath() { ::unlink(path_.c_str()); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

TEST(BlockBackendTest, BoundsAreChecked) {
  auto node = std::make_shared<NullNode>(1 << 20);
  BlockBackend backend(node);
  std::vector<std::byte> buffer(4096);
  EXPECT_EQ(backend.read_blocking(0, buffer), 0);
  EXPECT_EQ(backend.read_blocking((1 << 20) - 4096, buffer), 0);
  EXPECT_EQ(backend.read_blocking((1 << 20) - 4095, buffer), -EIO);
  EXPECT_EQ(backend.read_blocking(std::uint64_t{1} << 63, buffer), -EINVAL);
  EXPECT_EQ(backend.write_blocking(~std::uint64_t{0} - 10, buffer), -EINVAL);
}

TEST(BlockBackendTest, UnalignedRequestsAreAlignedForTheDriver) {
  auto node = std::make_shared<MemoryNode>(64 * 1024, 512, 4096);
  BlockBackend backend(node);
  const auto data = pattern(10000, 7);
  EXPECT_EQ(backend.write_blocking(1234, data), 0);  // unaligned start and end, split by 4096
  std::vector<std::byte> back(10000);
  EXPECT_EQ(backend.read_blocking(1234, back), 0);
  EXPECT_EQ(back, data);
  const auto image = node->snapshot();
  EXPECT_TRUE(std::all_of(image.begin(), image.begin() + 1234, [](std::byte b) { return b == std::byte{0}; }));
  EXPECT_EQ(std::memcmp(image.data() + 1234, data.data(), data.size()), 0);
  EXPECT_EQ(node->violations.load(), 0);
}

TEST(BlockBackendTest, ConcurrentReadModifyWritesOfOneBlockLoseNothing) {
  // 64 coroutines on two IoThreads each write their own 8 bytes inside the same two 512-byte
  // blocks. Without serialising RMW, one RMW would overwrite another's bytes with stale data.
  auto node = std::make_shared<MemoryNode>(4096, 512);
  BlockBackend backend(node);
  aio::IoThread a("rmw-a"), b("rmw-b");
  constexpr int kWriters = 64;
  std::atomic<int> done{0}, failures{0};
  for (int i = 0; i < kWriters; ++i) {
    aio::Context& ctx = (i % 2 ? a : b).context();
    coro::spawn(ctx, [](BlockBackend& bk, int index, std::atomic<int>& finished,
                        std::atomic<int>& failed) -> coro::Task<void> {
      std::vector<std::byte> bytes(8, static_cast<std::byte>(index + 1));
      const int written = co_await bk.write(static_cast<std::uint64_t>(500 + index * 8), bytes);
      if (written != 0) {
        failed.fetch_add(1);
      }
      finished.fetch_add(1);
    }(backend, i, done, failures));
  }
  while (done.load() < kWriters) std::this_thread::sleep_for(1ms);
  EXPECT_EQ(failures.load(), 0);
  const auto image = node->snapshot();
  for (int i = 0; i < kWriters; ++i) {
    for (int j = 0; j < 8; ++j) {
      ASSERT_EQ(image[500 + i * 8 + j], static_cast<std::byte>(i + 1)) << "writer " << i;
    }
  }
  EXPECT_EQ(node->violations.load(), 0);
}

TEST(BlockBackendTest, DrainWaitsForInFlightRequestsAndHoldsNewOnes) {
  auto node = std::make_shared<MemoryNode>(1 << 20, 1);
  node->delay_ = 30ms;
  BlockBackend backend(node);
  aio::IoThread io("drain");
  std::atomic<int> finished{0};
  for (int i = 0; i < 10; ++i) {
    coro::spawn(io.context(), [](BlockBackend& bk, int index, std::atomic<int>& f) -> coro::Task<void> {
      std::vector<std::byte> data(100, std::byte{1});
      co_await bk.write(static_cast<std::uint64_t>(index) * 100, data);
      f.fetch_add(1);
    }(backend, i, finished));
  }
  std::this_thread::sleep_for(5ms);
  const auto result = coro::block_on(io.context(), [](BlockBackend& bk, std::atomic<int>& f) -> coro::Task<std::pair<int, std::int64_t>> {
    co_await bk.drained_begin();
    const std::pair<int, std::int64_t> seen{f.load(), bk.in_flight()};
    co_return seen;
  }(backend, finished));
  EXPECT_EQ(result.first, 10);  // every request that was in flight has completed
  EXPECT_EQ(result.second, 0);
  // A request issued inside the drained section waits for drained_end().
  std::atomic<bool> late_done{false};
  coro::spawn(io.context(), [](BlockBackend& bk, std::atomic<bool>& d) -> coro::Task<void> {
    std::vector<std::byte> data(10);
    co_await bk.read(0, data);
    d = true;
  }(backend, late_done));
  std::this_thread::sleep_for(80ms);
  EXPECT_FALSE(late_done.load());
  io.context().run_soon([&] { backend.drained_end(); });
  while (!late_done.load()) std::this_thread::sleep_for(1ms);
  SUCCEED();
}

TEST(FileDriverTest, ReadWriteAndGrowth) {
  TempPath file;
  auto node = open_file(file.path(), FileOptions{false, false, false});
  ASSERT_TRUE(node) << std::strerror(node.error());
  EXPECT_EQ(node.value()->size(), 0u);
  aio::IoThread io("file-driver");
  const auto data = pattern(100000, 3);
  const int written = coro::block_on(io.context(), [](BlockNode& n, const std::vector<std::byte>& d) -> coro::Task<int> {
    co_return co_await n.write(4096, d, kFua);
  }(*node.value(), data));
  EXPECT_EQ(written, 0);
  EXPECT_EQ(node.value()->size(), 4096u + data.size());
  std::vector<std::byte> back(data.size() + 8192, std::byte{0x55});
  const int read = coro::block_on(io.context(), [](BlockNode& n, std::vector<std::byte>& out) -> coro::Task<int> {
    co_return co_await n.read(0, out, 0);  // runs past the end: zeros there
  }(*node.value(), back));
  EXPECT_EQ(read, 0);
  EXPECT_TRUE(std::all_of(back.begin(), back.begin() + 4096, [](std::byte b) { return b == std::byte{0}; }));
  EXPECT_EQ(std::memcmp(back.data() + 4096, data.data(), data.size()), 0);
  EXPECT_TRUE(std::all_of(back.end() - 4096, back.end(), [](std::byte b) { return b == std::byte{0}; }));
}

TEST(FileDriverTest, BlockStatusSeesHolesAndZeroingAndDiscardWork) {
  TempPath file;
  auto node = open_file(file.path(), false);
  ASSERT_TRUE(node);
  BlockBackend backend(node.value());
  aio::IoThread io("file-status");
  ASSERT_EQ(coro::block_on(io.context(), backend.root()->truncate(4 << 20)), 0);
  const auto data = pattern(1 << 20, 9);
  ASSERT_EQ(coro::block_on(io.context(), backend.write(2 << 20, data)), 0);
  const auto hole = coro::block_on(io.context(), backend.block_status(0, 4 << 20));
  EXPECT_TRUE(hole.flags & kStatusZero);
  EXPECT_FALSE(hole.flags & kStatusData);
  EXPECT_EQ(hole.bytes, 2u << 20);
  const auto filled = coro::block_on(io.context(), backend.block_status(2 << 20, 2 << 20));
  EXPECT_TRUE(filled.flags & kStatusData);
  EXPECT_EQ(filled.bytes, 1u << 20);

  ASSERT_EQ(coro::block_on(io.context(), backend.write_zeroes((2 << 20) + 4096, 8192)), 0);
  ASSERT_EQ(coro::block_on(io.context(), backend.discard((2 << 20) + 65536, 65536)), 0);
  std::vector<std::byte> back(1 << 20);
  ASSERT_EQ(coro::block_on(io.context(), backend.read(2 << 20, back)), 0);
  for (std::size_t i = 0; i < back.size(); ++i) {
    const bool zeroed = (i >= 4096 && i < 4096 + 8192) || (i >= 65536 && i < 131072);
    ASSERT_EQ(back[i], zeroed ? std::byte{0} : data[i]) << "at " << i;
  }
}

TEST(FileDriverTest, ReadOnlyRefusesWritesAndMissingFileIsAnError) {
  TempPath file;
  auto node = open_file(file.path(), true);
  ASSERT_TRUE(node);
  BlockBackend backend(std::make_shared<RawNode>(node.value()));
  std::vector<std::byte> data(10);
  EXPECT_EQ(backend.write_blocking(0, data), -EROFS);
  auto missing = open_file("/nonexistent/spindle/image", true);
  EXPECT_FALSE(missing);
  EXPECT_EQ(missing.error(), ENOENT);
}

TEST(FileDriverTest, DirectIoWithUnalignedBuffersAndRequests) {
  TempPath file;
  auto node = open_file(file.path(), FileOptions{false, true, false});
  if (!node && node.error() == EINVAL) GTEST_SKIP() << "O_DIRECT is not supported on /tmp here";
  ASSERT_TRUE(node);
  EXPECT_GE(node.value()->limits().request_alignment, 512u);
  BlockBackend backend(node.value());
  ASSERT_EQ(coro::block_on(backend.root()->truncate(1 << 20)), 0);
  const auto data = pattern(7777, 5);
  EXPECT_EQ(backend.write_blocking(333, data), 0);
  std::vector<std::byte> back(7777 + 1);  // +1: an unaligned view into it below
  EXPECT_EQ(backend.read_blocking(333, std::span(back).subspan(1, 7777)), 0);
  EXPECT_EQ(std::memcmp(back.data() + 1, data.data(), data.size()), 0);
}

TEST(NullDriverTest, ReadsZerosAndReportsZeroStatus) {
  BlockBackend backend(std::make_shared<NullNode>(1 << 30));
  std::vector<std::byte> buffer(4096, std::byte{7});
  EXPECT_EQ(backend.read_blocking(12345, buffer), 0);
  EXPECT_TRUE(std::all_of(buffer.begin(), buffer.end(), [](std::byte b) { return b == std::byte{0}; }));
  EXPECT_EQ(backend.write_blocking(0, buffer), 0);
  const auto status = coro::block_on(backend.block_status(0, 1 << 20));
  EXPECT_EQ(status.flags & (kStatusZero | kStatusData), kStatusZero);
}

}  // namespace
}  // namespace spindle::block
