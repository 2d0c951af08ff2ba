// IoBytes: a byte vector for data that the kernel copies to or from (file reads and writes,
// socket sends), allocated so that the copy runs at full speed. Blocks of a page or more are
// page-aligned, smaller ones cache-line aligned. malloc's blocks start 16 bytes past such a
// boundary, and on the reference VM (AMD EPYC, Linux 6.18) the kernel's copy into a
// destination 16 bytes off a cache line ran 4-8x slower: a 2 MiB pread from the page cache
// reached 1.6 GB/s against 13 GB/s page-aligned, a 64 KiB one 2.2 against 9.4 GB/s
// (docs/benchmarks.md, "Buffer alignment"). Page alignment also suits O_DIRECT.
//
// IoAllocator picks the alignment from the size asked for; std::allocator_traits hands the
// same size back on deallocate, so the two agree.
//
// Thread-safety: a plain value type, as std::vector; no shared state.
#pragma once

#include <cstddef>
#include <new>
#include <vector>

namespace spindle::base {

template <class T>
struct IoAllocator {
  using value_type = T;
  static constexpr std::size_t kPage = 4096;
  static constexpr std::size_t kCacheLine = 64;

  IoAllocator() noexcept = default;
  template <class U>
  IoAllocator(const IoAllocator<U>&) noexcept {}  // NOLINT: rebinding is implicit

  static constexpr std::align_val_t alignment_for(std::size_t n) noexcept {
    return std::align_val_t{n * sizeof(T) >= kPage ? kPage : kCacheLine};
  }
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), alignment_for(n)));
  }
  void deallocate(T* block, std::size_t n) noexcept {
    ::operator delete(block, alignment_for(n));
  }

  template <class U>
  bool operator==(const IoAllocator<U>&) const noexcept {
    return true;
  }
};

using IoBytes = std::vector<std::byte, IoAllocator<std::byte>>;

}  // namespace spindle::base
