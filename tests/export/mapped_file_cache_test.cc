// nbd::MappedFileCache: a range comes back as the file's bytes through a window that later
// ranges reuse; ranges that cross a window boundary are refused; at most kMaxWindows are
// mapped, the least recently used idle one is replaced, and leased ones never are.
#include "export/nbd/mapped_file_cache.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <string>
#include <utility>
#include <vector>

namespace spindle::exports::nbd {
namespace {

constexpr std::uint64_t kWindow = MappedFileCache::kWindowBytes;

// A sparse temporary file of `windows` windows with a marker written at each window's start.
class SparseFile {
 public:
  explicit SparseFile(std::uint64_t windows) {
    char path[] = "/tmp/spindle-mapped-XXXXXX";
    fd_ = ::mkstemp(path);
    EXPECT_GE(fd_, 0);
    ::unlink(path);
    EXPECT_EQ(::ftruncate(fd_, static_cast<off_t>(windows * kWindow)), 0);
    for (std::uint64_t i = 0; i < windows; ++i) {
      const std::string marker = "window " + std::to_string(i);
      EXPECT_EQ(::pwrite(fd_, marker.data(), marker.size(), static_cast<off_t>(i * kWindow + 100)),
                static_cast<ssize_t>(marker.size()));
    }
  }
  ~SparseFile() { ::close(fd_); }
  int fd() const { return fd_; }

 private:
  int fd_ = -1;
};

std::string bytes_at(const MappedFileCache::Lease& lease, std::size_t length) {
  return std::string(reinterpret_cast<const char*>(lease.data()), length);
}

TEST(MappedFileCacheTest, RangesReadTheFileThroughReusedWindows) {
  SparseFile file(2);
  MappedFileCache cache;
  {
    const auto a = cache.map(file.fd(), 100, 8);
    ASSERT_TRUE(a);
    EXPECT_EQ(bytes_at(a, 8), "window 0");
    const auto b = cache.map(file.fd(), kWindow + 100, 8);
    ASSERT_TRUE(b);
    EXPECT_EQ(bytes_at(b, 8), "window 1");
    const auto c = cache.map(file.fd(), 96, 12);  // the first window again
    ASSERT_TRUE(c);
    EXPECT_EQ(bytes_at(c, 12), std::string(4, '\0') + "window 0");
  }
  EXPECT_EQ(cache.mapped_windows(), 2u);
  // Writes through the file are seen through the mapping (one page cache).
  ASSERT_EQ(::pwrite(file.fd(), "changed!", 8, 100), 8);
  const auto again = cache.map(file.fd(), 100, 8);
  EXPECT_EQ(bytes_at(again, 8), "changed!");
  // The last byte of a window maps; a range that runs into the next one does not.
  EXPECT_TRUE(cache.map(file.fd(), kWindow - 1, 1));
  EXPECT_FALSE(cache.map(file.fd(), kWindow - 1, 2));
  EXPECT_FALSE(cache.map(file.fd(), 0, 0));
}

TEST(MappedFileCacheTest, TheLeastRecentlyUsedIdleWindowIsReplacedAndLeasedOnesAreKept) {
  constexpr std::size_t kMax = MappedFileCache::kMaxWindows;
  SparseFile file(kMax + 2);
  MappedFileCache cache;
  for (std::uint64_t i = 0; i < kMax; ++i) ASSERT_TRUE(cache.map(file.fd(), i * kWindow, 1));
  EXPECT_EQ(cache.mapped_windows(), kMax);
  ASSERT_TRUE(cache.map(file.fd(), 0, 1));  // window 0 is now the most recently used
  {
    const auto newest = cache.map(file.fd(), kMax * kWindow + 100, 9);  // replaces window 1
    ASSERT_TRUE(newest);
    EXPECT_EQ(bytes_at(newest, 9), "window " + std::to_string(kMax));
  }
  EXPECT_EQ(cache.mapped_windows(), kMax);
  // Hold a lease on every window: nothing can be replaced, so a new range is refused.
  std::vector<MappedFileCache::Lease> leases;
  for (std::uint64_t i : {std::uint64_t{0}, std::uint64_t{kMax}}) {
    leases.push_back(cache.map(file.fd(), i * kWindow, 1));
  }
  for (std::uint64_t i = 2; i < kMax; ++i) leases.push_back(cache.map(file.fd(), i * kWindow, 1));
  for (const auto& lease : leases) ASSERT_TRUE(lease);
  EXPECT_FALSE(cache.map(file.fd(), (kMax + 1) * kWindow, 1));
  // A moved lease still holds its window (0); once the others are released, a new range
  // replaces one of them, never the leased window.
  MappedFileCache::Lease moved(std::move(leases.front()));
  EXPECT_TRUE(moved);
  EXPECT_FALSE(leases.front());
  leases.clear();
  EXPECT_TRUE(cache.map(file.fd(), (kMax + 1) * kWindow, 1));
  EXPECT_EQ(std::memcmp(moved.data() + 100, "window 0", 8), 0);
}

}  // namespace
}  // namespace spindle::exports::nbd
