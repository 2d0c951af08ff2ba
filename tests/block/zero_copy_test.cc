// Zero-copy reads: aio::range_in_page_cache() (cachestat) and BlockBackend::read_zero_copy() —
// the sink gets the host file's own fd and offset for raw-over-file images whose pages are
// cached, and is never called where the bytes must be read (a filter that sees every read,
// O_DIRECT, pages evicted, out of bounds); drain waits for a sink that is still sending.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "aio/io_thread.h"
#include "aio/page_cache.h"
#include "block/block_backend.h"
#include "block/drivers/blkdebug.h"
#include "block/drivers/direct_file.h"
#include "block/drivers/file.h"
#include "block/drivers/raw.h"
#include "coro/block_on.h"
#include "coro/event.h"
#include "coro/task.h"

namespace spindle::block {
namespace {

using namespace std::chrono_literals;

constexpr std::size_t kImageSize = 4 << 20;

// A temporary raw image of kImageSize patterned bytes, written through the page cache.
class CachedImage {
 public:
  CachedImage() {
    char path[] = "/tmp/spindle-zero-copy-XXXXXX";
    const int fd = ::mkstemp(path);
    EXPECT_GE(fd, 0);
    path_ = path;
    bytes_.resize(kImageSize);
    for (std::size_t i = 0; i < bytes_.size(); ++i) bytes_[i] = static_cast<char>(i * 7 + i / 4096);
    EXPECT_EQ(::write(fd, bytes_.data(), bytes_.size()), static_cast<ssize_t>(bytes_.size()));
    ::close(fd);
  }
  ~CachedImage() { ::unlink(path_.c_str()); }
  const std::string& path() const { return path_; }
  const std::string& bytes() const { return bytes_; }

  // Writes the file back and drops its pages from the page cache.
  void evict() const {
    const int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
    ASSERT_GE(fd, 0);
    ::fdatasync(fd);
    ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    ::close(fd);
  }

 private:
  std::string path_;
  std::string bytes_;
};

bool kernel_has_cachestat(const CachedImage& image) {
  const int fd = ::open(image.path().c_str(), O_RDONLY | O_CLOEXEC);
  const bool cached = aio::range_in_page_cache(fd, 0, kImageSize);
  ::close(fd);
  return cached;
}

// Records what read_zero_copy() handed over and reads it back with pread().
class RecordingSink final : public HostFileSink {
 public:
  coro::Task<int> send_from(int fd, std::uint64_t file_offset, std::uint64_t bytes) override {
    ++calls;
    offset = file_offset;
    data.resize(bytes);
    const ssize_t n = ::pread(fd, data.data(), bytes, static_cast<off_t>(file_offset));
    if (n != static_cast<ssize_t>(bytes)) co_return -EIO;
    if (gate) co_await gate->wait();
    co_return 0;
  }

  int calls = 0;
  std::uint64_t offset = 0;
  std::string data;
  coro::Event* gate = nullptr;  // if set, the "send" waits for it
};

BlockNodeRef open_raw(const std::string& path) {
  auto file = open_file(path, true);
  EXPECT_TRUE(file);
  return std::make_shared<RawNode>(file.value());
}

TEST(PageCacheTest, WrittenPagesAreCachedAndEvictedOnesAreNot) {
  CachedImage image;
  if (!kernel_has_cachestat(image)) GTEST_SKIP() << "no cachestat(2) on this kernel";
  image.evict();
  const int fd = ::open(image.path().c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  EXPECT_FALSE(aio::range_in_page_cache(fd, 0, kImageSize));
  char buffer[8192];
  ASSERT_EQ(::pread(fd, buffer, sizeof buffer, 1 << 20), static_cast<ssize_t>(sizeof buffer));
  // Readahead may bring in more than was read, but not the far end of the file before it.
  EXPECT_TRUE(aio::range_in_page_cache(fd, (1 << 20) + 100, 8000));
  EXPECT_FALSE(aio::range_in_page_cache(fd, kImageSize - 4096, 4096));
  EXPECT_TRUE(aio::range_in_page_cache(fd, 0, 0));  // nothing to miss
  EXPECT_FALSE(aio::range_in_page_cache(-1, 0, 4096));  // errors are "no"
  ::close(fd);
}

TEST(ZeroCopyReadTest, RawOverFileHandsOverTheHostFileRange) {
  CachedImage image;
  if (!kernel_has_cachestat(image)) GTEST_SKIP() << "no cachestat(2) on this kernel";
  BlockBackend backend(open_raw(image.path()));
  aio::IoThread io("zero-copy");
  RecordingSink sink;
  const std::uint64_t offset = 123457, length = 1 << 20;
  EXPECT_EQ(coro::block_on(io.context(), backend.read_zero_copy(offset, length, sink)), 0);
  EXPECT_EQ(sink.calls, 1);
  EXPECT_EQ(sink.offset, offset);
  EXPECT_EQ(sink.data, image.bytes().substr(offset, length));
  // The last byte of the image is in bounds; one past it is not, and the sink is not called.
  EXPECT_EQ(coro::block_on(io.context(), backend.read_zero_copy(kImageSize - 1, 1, sink)), 0);
  EXPECT_EQ(sink.data, image.bytes().substr(kImageSize - 1));
  EXPECT_EQ(coro::block_on(io.context(), backend.read_zero_copy(kImageSize - 1, 2, sink)), -EIO);
  EXPECT_EQ(sink.calls, 2);
}

TEST(ZeroCopyReadTest, RefusedWhereTheBytesMustBeRead) {
  CachedImage image;
  if (!kernel_has_cachestat(image)) GTEST_SKIP() << "no cachestat(2) on this kernel";
  aio::IoThread io("zero-copy-refused");
  RecordingSink sink;
  // A filter must see every read (blkdebug could fail it).
  BlockBackend filtered(std::make_shared<BlkdebugNode>(open_raw(image.path())));
  EXPECT_EQ(coro::block_on(io.context(), filtered.read_zero_copy(0, 65536, sink)), -ENOTSUP);
  // O_DIRECT images have no cached pages to pass on.
  if (auto direct = open_direct_file(image.path(), true)) {
    BlockBackend uncached(std::make_shared<RawNode>(direct.value()));
    EXPECT_EQ(coro::block_on(io.context(), uncached.read_zero_copy(0, 65536, sink)), -ENOTSUP);
  }
  // Pages not in the cache would stall the loop on the disk: read() them instead.
  image.evict();
  BlockBackend evicted(open_raw(image.path()));
  EXPECT_EQ(coro::block_on(io.context(), evicted.read_zero_copy(0, 65536, sink)), -ENOTSUP);
  EXPECT_EQ(sink.calls, 0);
  std::vector<std::byte> back(65536);
  EXPECT_EQ(coro::block_on(io.context(), evicted.read(0, back)), 0);
  EXPECT_EQ(std::memcmp(back.data(), image.bytes().data(), back.size()), 0);
  EXPECT_EQ(coro::block_on(io.context(), evicted.read_zero_copy(0, 65536, sink)), 0);
  EXPECT_EQ(sink.calls, 1);  // read() brought the pages back
}

TEST(ZeroCopyReadTest, DrainWaitsForASinkStillSending) {
  CachedImage image;
  if (!kernel_has_cachestat(image)) GTEST_SKIP() << "no cachestat(2) on this kernel";
  BlockBackend backend(open_raw(image.path()));
  aio::IoThread io("zero-copy-drain");
  coro::Event gate;
  RecordingSink sink;
  sink.gate = &gate;
  std::atomic<int> read_result{1};
  coro::spawn(io.context(), [](BlockBackend& bk, RecordingSink& s, std::atomic<int>& r) -> coro::Task<void> {
    r = co_await bk.read_zero_copy(0, 65536, s);
  }(backend, sink, read_result));
  std::atomic<bool> drained{false};
  coro::spawn(io.context(), [](BlockBackend& bk, std::atomic<bool>& d) -> coro::Task<void> {
    co_await bk.drained_begin();
    d = true;
    bk.drained_end();
  }(backend, drained));
  // Queued behind both coroutines on the same context: once this has run, the read is in
  // flight (waiting on the gate) and the drain has begun waiting, however slow the machine.
  coro::block_on(io.context(), []() -> coro::Task<void> { co_return; }());
  EXPECT_EQ(backend.in_flight(), 1);
  EXPECT_FALSE(drained.load());
  io.context().run_soon([&] { gate.set(); });
  while (!drained.load()) std::this_thread::sleep_for(1ms);
  EXPECT_EQ(read_result.load(), 0);
}

}  // namespace
}  // namespace spindle::block
