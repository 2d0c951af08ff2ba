#include "export/nbd/mapped_file_cache.h"

#include <sys/mman.h>

namespace spindle::exports::nbd {

MappedFileCache::Lease::Lease(Lease&& other) noexcept
    : window_(other.window_), data_(other.data_) {
  other.window_ = nullptr;
  other.data_ = nullptr;
}

MappedFileCache::Lease::~Lease() {
  if (window_) --window_->leases;
}

MappedFileCache::~MappedFileCache() {
  for (Window& window : windows_) {
    if (window.address) ::munmap(window.address, kWindowBytes);
  }
}

std::size_t MappedFileCache::mapped_windows() const noexcept {
  std::size_t count = 0;
  for (const Window& window : windows_) count += window.address != nullptr;
  return count;
}

MappedFileCache::Lease MappedFileCache::map(int fd, std::uint64_t offset, std::uint64_t bytes) {
  const std::uint64_t base = offset / kWindowBytes * kWindowBytes;
  if (bytes == 0 || offset + bytes > base + kWindowBytes) return {};  // crosses a boundary
  Window* victim = nullptr;
  for (Window& window : windows_) {
    if (window.address && window.fd == fd && window.base == base) {
      ++window.leases;
      window.last_use = ++clock_;
      return Lease(window, window.address + (offset - base));
    }
    if (window.leases == 0 && (!victim || !window.address ||
                               (victim->address && window.last_use < victim->last_use))) {
      victim = &window;  // an empty slot, else the least recently used idle window
    }
  }
  if (!victim) return {};  // every window is being written from
  if (victim->address) {
    ::munmap(victim->address, kWindowBytes);
    victim->address = nullptr;
  }
  // Mapping past the end of the file is allowed; only touching those pages would fail, and the
  // block layer only hands out ranges within the file.
  void* address =
      ::mmap(nullptr, kWindowBytes, PROT_READ, MAP_SHARED, fd, static_cast<off_t>(base));
  if (address == MAP_FAILED) return {};
  victim->fd = fd;
  victim->base = base;
  victim->address = static_cast<std::byte*>(address);
  victim->leases = 1;
  victim->last_use = ++clock_;
  return Lease(*victim, victim->address + (offset - base));
}

}  // namespace spindle::exports::nbd
