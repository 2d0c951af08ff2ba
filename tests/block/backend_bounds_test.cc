// BlockBackend under requests a hostile client can send: memory stays bounded whatever the
// length of an unaligned request (edge blocks by read-modify-write, the aligned middle passed
// down), zeroes and discards are ordered against read-modify-writes (also under O_DIRECT), and
// random unaligned requests agree with a byte-for-byte model.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "block/block_backend.h"
#include "block/drivers/direct_file.h"
#include "coro/block_on.h"
#include "coro/coroutine.h"
#include "coro/task.h"
#include "support/memory_node.h"

namespace spindle::block {
namespace {

std::uint64_t resident_bytes() {
  std::ifstream statm("/proc/self/statm");
  std::uint64_t size = 0, resident = 0;
  statm >> size >> resident;
  return resident * static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
}

// A huge sparse node (nothing stored) that records the largest resident-memory growth seen
// while it was being called, and the lengths it was asked to move.
class RecordingNode final : public BlockNode {
 public:
  RecordingNode(std::uint64_t size, std::uint32_t alignment)
      : size_(size), alignment_(alignment), baseline_(resident_bytes()) {}
  const char* driver_name() const noexcept override { return "recording"; }
  std::uint64_t size() const noexcept override { return size_; }
  BlockLimits limits() const noexcept override { return {alignment_, 0}; }

  coro::Task<int> read(std::uint64_t, std::span<std::byte> buffer, std::uint32_t) override {
    sample();
    std::memset(buffer.data(), 0, buffer.size());
    largest_data = std::max<std::uint64_t>(largest_data, buffer.size());
    co_return 0;
  }
  coro::Task<int> write(std::uint64_t, std::span<const std::byte> buffer, std::uint32_t) override {
    sample();
    largest_data = std::max<std::uint64_t>(largest_data, buffer.size());
    co_return 0;
  }
  coro::Task<int> write_zeroes(std::uint64_t, std::uint64_t bytes, std::uint32_t) override {
    sample();
    zeroed += bytes;
    co_return 0;
  }
  void sample() {
    const std::uint64_t now = resident_bytes();
    if (now > baseline_) peak_growth = std::max(peak_growth, now - baseline_);
  }

  std::uint64_t peak_growth = 0;
  std::uint64_t largest_data = 0;
  std::uint64_t zeroed = 0;

 private:
  const std::uint64_t size_;
  const std::uint32_t alignment_;
  const std::uint64_t baseline_;
};

TEST(BlockBackendBoundsTest, UnalignedWriteZeroesOfGigabytesUsesAtMostABlockOfMemory) {
  // What a client's NBD_CMD_WRITE_ZEROES at offset 1 of length 1 GiB - 4 KiB asks of a
  // 512-aligned image (QED): the edges are patched through one block, the middle is zeroed.
  auto node = std::make_shared<RecordingNode>(std::uint64_t{8} << 30, 512);
  BlockBackend backend(node);
  const std::uint64_t length = (std::uint64_t{1} << 30) - 4096;
  EXPECT_EQ(coro::block_on(backend.write_zeroes(1, length)), 0);
  EXPECT_LT(node->peak_growth, std::uint64_t{64} << 20) << "bytes of RSS growth";
  EXPECT_LE(node->largest_data, 512u);
  EXPECT_EQ(node->zeroed, length - 512);  // [512, 1 GiB - 4608): all but the two edge blocks
}

TEST(BlockBackendBoundsTest, UnalignedWriteAndReadPassTheMiddleDownInPlace) {
  std::vector<std::byte> data((32u << 20) + 1, std::byte{7});
  auto node = std::make_shared<RecordingNode>(std::uint64_t{1} << 30, 4096);  // after `data`
  BlockBackend backend(node);
  EXPECT_EQ(backend.write_blocking(3, data), 0);
  EXPECT_EQ(backend.read_blocking(3, data), 0);
  // The middle (32 MiB - 4 KiB) reaches the node in place; nothing else bigger than a block.
  EXPECT_EQ(node->largest_data, (32u << 20) - 4096);
  EXPECT_LT(node->peak_growth, std::uint64_t{8} << 20) << "bytes of RSS growth";
}

TEST(BlockBackendBoundsTest, FastZeroOfAnUnalignedRangeIsNotSupported) {
  auto node = std::make_shared<RecordingNode>(64 * 1024, 512);
  BlockBackend backend(node);
  EXPECT_EQ(coro::block_on(backend.write_zeroes(100, 4096, kNoFallback)), -ENOTSUP);
  EXPECT_EQ(coro::block_on(backend.write_zeroes(512, 4096, kNoFallback)), 0);
}

TEST(BlockBackendBoundsTest, RandomUnalignedRequestsMatchAByteModel) {
  constexpr std::size_t kSize = 256 * 1024;
  auto node = std::make_shared<MemoryNode>(kSize, 512, 8192);
  BlockBackend backend(node);
  std::vector<std::byte> model(kSize);
  std::mt19937 random(12345);
  for (int round = 0; round < 400; ++round) {
    const std::size_t offset = random() % kSize;
    const std::size_t length = 1 + random() % std::min<std::size_t>(kSize - offset, 20000);
    switch (random() % 3) {
      case 0: {
        std::vector<std::byte> data(length);
        for (auto& b : data) b = static_cast<std::byte>(random());
        ASSERT_EQ(backend.write_blocking(offset, data), 0);
        std::memcpy(model.data() + offset, data.data(), length);
        break;
      }
      case 1:
        ASSERT_EQ(coro::block_on(backend.write_zeroes(offset, length)), 0);
        std::memset(model.data() + offset, 0, length);
        break;
      default: {
        std::vector<std::byte> back(length);
        ASSERT_EQ(backend.read_blocking(offset, back), 0);
        ASSERT_EQ(std::memcmp(back.data(), model.data() + offset, length), 0)
            << "round " << round << " offset " << offset << " length " << length;
      }
    }
  }
  EXPECT_EQ(node->snapshot(), model);
  EXPECT_EQ(node->violations.load(), 0);
}

// Runs an unaligned write and a concurrent write_zeroes (or discard) on one context, many
// times, and checks that both took effect: the zeros must survive the write's read-modify-write.
struct RaceResult {
  int lost_zeroes = 0;
  int lost_data = 0;
};

RaceResult race_write_and_zeroes(BlockBackend& backend, std::uint64_t write_offset,
                                 std::uint64_t write_length, std::uint64_t zero_offset,
                                 std::uint64_t zero_length, bool discard, int rounds) {
  RaceResult result;
  const std::vector<std::byte> ones(zero_length, std::byte{0x11});
  for (int round = 0; round < rounds; ++round) {
    EXPECT_EQ(backend.write_blocking(zero_offset, ones), 0);  // nonzero, to see the zeroing
    const std::vector<std::byte> data(write_length, static_cast<std::byte>(round % 200 + 40));
    std::atomic<int> done{0};
    auto writer = [](BlockBackend& b, std::uint64_t at, const std::vector<std::byte>& bytes,
                     std::atomic<int>& finished) -> coro::Task<void> {
      EXPECT_EQ(co_await b.write(at, bytes), 0);
      finished.fetch_add(1);
    };
    auto zeroer = [](BlockBackend& b, std::uint64_t at, std::uint64_t length, bool punch,
                     std::atomic<int>& finished) -> coro::Task<void> {
      co_await coro::yield();  // let the writer start its read-modify-write first
      const int r = punch ? co_await b.discard(at, length)
                          : co_await b.write_zeroes(at, length, kMayUnmap);
      EXPECT_EQ(r, 0);
      finished.fetch_add(1);
    };
    aio::Context& here = *aio::current_context();
    coro::spawn(here, writer(backend, write_offset, data, done));
    coro::spawn(here, zeroer(backend, zero_offset, zero_length, discard, done));
    while (done.load() < 2) here.poll(true);
    // Where the two overlap either order is right; elsewhere each must have taken effect.
    std::vector<std::byte> zeros(zero_length), data_back(write_length);
    EXPECT_EQ(backend.read_blocking(zero_offset, zeros), 0);
    EXPECT_EQ(backend.read_blocking(write_offset, data_back), 0);
    auto in_write = [&](std::uint64_t at) { return at >= write_offset && at < write_offset + write_length; };
    auto in_zeroes = [&](std::uint64_t at) { return at >= zero_offset && at < zero_offset + zero_length; };
    bool zeroes_lost = false, data_lost = false;
    for (std::uint64_t i = 0; i < zero_length; ++i) {
      if (!in_write(zero_offset + i) && zeros[i] != std::byte{0}) zeroes_lost = true;
    }
    for (std::uint64_t i = 0; i < write_length; ++i) {
      if (!in_zeroes(write_offset + i) && data_back[i] != data[i]) data_lost = true;
    }
    if (zeroes_lost) ++result.lost_zeroes;
    if (data_lost) ++result.lost_data;
  }
  return result;
}

TEST(BlockBackendBoundsTest, AlignedZeroesAreNotUndoneByAReadModifyWrite) {
  auto node = std::make_shared<MemoryNode>(64 * 1024, 512);
  BlockBackend backend(node);
  // The write [500, 600) read-modify-writes blocks 0 and 1; the zeroes cover block 1 exactly.
  const RaceResult race = race_write_and_zeroes(backend, 500, 100, 512, 512, false, 50);
  EXPECT_EQ(race.lost_zeroes, 0);
  EXPECT_EQ(race.lost_data, 0);
  const RaceResult punched = race_write_and_zeroes(backend, 1000, 100, 1024, 512, true, 50);
  EXPECT_EQ(punched.lost_data, 0);
}

TEST(BlockBackendBoundsTest, DirectIoZeroesAreNotUndoneByAReadModifyWrite) {
  // --cache=none: an unaligned WRITE of [0, 100) and a WRITE_ZEROES of [256, 512) at once.
  char path[] = "/var/tmp/spindle-direct-XXXXXX";
  const int fd = ::mkstemp(path);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::ftruncate(fd, 1 << 20), 0);
  ::close(fd);
  auto node = open_direct_file(path, false);
  if (!node.ok() && node.error() == EINVAL) {
    ::unlink(path);
    GTEST_SKIP() << "O_DIRECT is not supported in /var/tmp here";
  }
  ASSERT_TRUE(node.ok());
  {
    BlockBackend backend(std::move(node).value());
    const RaceResult race = race_write_and_zeroes(backend, 0, 100, 256, 256, false, 200);
    EXPECT_EQ(race.lost_zeroes, 0) << "of 200 rounds";
    EXPECT_EQ(race.lost_data, 0);
    coro::block_on(backend.root()->close());
  }
  ::unlink(path);
}

}  // namespace
}  // namespace spindle::block
