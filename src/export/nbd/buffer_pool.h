// BufferPool and ByteBuffer: request data buffers (READ data, WRITE payloads, CACHE scratch)
// that a connection recycles. Large buffers (64 KiB and up) are page-aligned and go back to
// the pool when released instead of to malloc, for two measured reasons (1 MiB reads over a
// Unix socket, docs/benchmarks.md):
//   * malloc hands blocks that large back to the kernel (munmap or trim), so every reuse paid
//     a page fault per 4 KiB, about 250 per 1 MiB READ;
//   * malloc's large blocks start 16 bytes into a page, and the kernel's copies into and out of
//     them (the io_uring read, the socket write) ran at half speed: 1.0-1.2 GB/s against
//     2.2-2.5 GB/s with page-aligned buffers, at twice the CPU per request.
// Small buffers come from malloc, which keeps and reuses them cheaply, aligned to a cache line:
// malloc's own 16-byte alignment slowed the kernel's copy of a 4 KiB read into them by a third
// (base/io_buffer.h).
//
// Capacities are powers of two, so a pool serves any mix of sizes from a few free lists; it
// keeps at most kMaxCachedBytes. A ByteBuffer shares ownership of its pool: a request coroutine
// may release its buffer after the connection itself is gone.
//
// Thread-safety: a pool and its buffers belong to one connection and are used only on that
// connection's context (acquire and release from one thread; the shared_ptr only keeps the
// pool alive).
#pragma once

#include <array>
#include <cstddef>
#include <new>
#include <memory>
#include <span>
#include <vector>

namespace spindle::exports::nbd {

class BufferPool;

// A block from ::operator new[] with the given alignment, freed with the same alignment.
struct AlignedDelete {
  std::align_val_t alignment{alignof(std::max_align_t)};
  void operator()(std::byte* block) const noexcept;
};
using AlignedBlock = std::unique_ptr<std::byte[], AlignedDelete>;
AlignedBlock allocate_aligned(std::size_t bytes, std::size_t alignment);

// A request's data buffer, left uninitialized (every byte is written before it is read).
class ByteBuffer {
 public:
  ByteBuffer() = default;
  ByteBuffer(ByteBuffer&&) noexcept = default;
  ByteBuffer& operator=(ByteBuffer&& other) noexcept;
  ~ByteBuffer();

  std::byte* data() noexcept { return data_.get(); }
  std::size_t size() const noexcept { return size_; }
  std::span<std::byte> span() noexcept { return {data_.get(), size_}; }

 private:
  friend class BufferPool;
  void give_back() noexcept;

  AlignedBlock data_;
  std::size_t size_ = 0;
  std::size_t capacity_ = 0;             // a power of two when pooled
  std::shared_ptr<BufferPool> pool_;     // null: the block is freed, not recycled
};

class BufferPool : public std::enable_shared_from_this<BufferPool> {
 public:
  static constexpr std::size_t kMinPooledSize = 64 * 1024;
  // Enough for 8 reads of 1 MiB in flight (or 32 of 256 KiB); more is freed on release, so
  // an idle connection holds at most this much.
  static constexpr std::size_t kMaxCachedBytes = 8u << 20;
  static constexpr std::size_t kPooledAlignment = 4096;
  static constexpr std::size_t kSmallAlignment = 64;

  // A buffer of exactly `size` bytes (size 0: an empty buffer).
  ByteBuffer acquire(std::size_t size);
  std::size_t cached_bytes() const noexcept { return cached_bytes_; }

 private:
  friend class ByteBuffer;
  static constexpr int kMinShift = 16;  // 64 KiB
  static constexpr int kMaxShift = 26;  // 64 MiB: above every request the server accepts

  void recycle(AlignedBlock block, std::size_t capacity) noexcept;

  std::array<std::vector<AlignedBlock>, kMaxShift - kMinShift + 1> free_;
  std::size_t cached_bytes_ = 0;
};

}  // namespace spindle::exports::nbd
