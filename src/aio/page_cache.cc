#include "aio/page_cache.h"

#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>

namespace spindle::aio {
namespace {

// cachestat(2) is newer than Debian 12's headers: number and structures from the kernel ABI
// (include/uapi/linux/mman.h; the number is the same on every architecture).
constexpr long kCachestatSyscall = 451;

struct CachestatRange {
  std::uint64_t offset;
  std::uint64_t length;
};

struct Cachestat {
  std::uint64_t nr_cache;
  std::uint64_t nr_dirty;
  std::uint64_t nr_writeback;
  std::uint64_t nr_evicted;
  std::uint64_t nr_recently_evicted;
};

std::atomic<bool> kernel_lacks_cachestat{false};

}  // namespace

bool range_in_page_cache(int fd, std::uint64_t offset, std::uint64_t bytes) noexcept {
  if (bytes == 0) return true;
  if (kernel_lacks_cachestat.load(std::memory_order_relaxed)) return false;
  static const std::uint64_t page_size = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
  CachestatRange range{offset, bytes};
  Cachestat stat{};
  if (::syscall(kCachestatSyscall, fd, &range, &stat, 0) != 0) {
    if (errno == ENOSYS || errno == EPERM) kernel_lacks_cachestat.store(true, std::memory_order_relaxed);
    return false;
  }
  const std::uint64_t pages = (offset + bytes - 1) / page_size - offset / page_size + 1;
  return stat.nr_cache >= pages;
}

}  // namespace spindle::aio
