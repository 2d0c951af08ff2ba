#include "aio/file_io.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "aio/context.h"
#include "aio/thread_pool.h"
#include "aio/uring.h"
#include "base/fatal.h"

namespace spindle::aio {

namespace {

FileBackend backend_from_environment() noexcept {
  const char* value = std::getenv("SPINDLE_AIO");
  if (value == nullptr || *value == '\0') return FileBackend::automatic;
  if (std::strcmp(value, "io_uring") == 0) return FileBackend::io_uring;
  if (std::strcmp(value, "threads") == 0) return FileBackend::threads;
  base::fatal("SPINDLE_AIO='{}': expected 'io_uring' or 'threads'", value);
}

std::atomic<FileBackend>& backend_setting() noexcept {
  static std::atomic<FileBackend> setting{backend_from_environment()};
  return setting;
}

Context& home_context() {
  Context* context = current_context();
  if (context == nullptr) base::fatal("file I/O from a thread without a context");
  return *context;
}

// The ring to use, or null for the thread pool; *unavailable is set if io_uring was forced but
// is missing.
Uring* choose_ring(Context& context, bool* unavailable) {
  *unavailable = false;
  switch (file_backend()) {
    case FileBackend::threads:
      return nullptr;
    case FileBackend::io_uring:
      if (Uring* ring = context.uring()) return ring;
      *unavailable = true;
      return nullptr;
    case FileBackend::automatic:
      return context.uring();
  }
  return nullptr;
}

ssize_t result_or_errno(ssize_t result) noexcept { return result < 0 ? -errno : result; }

}  // namespace

void set_file_backend(FileBackend backend) noexcept {
  backend_setting().store(backend, std::memory_order_relaxed);
}

FileBackend file_backend() noexcept { return backend_setting().load(std::memory_order_relaxed); }

const char* active_file_backend() {
  bool unavailable;
  Uring* ring = choose_ring(home_context(), &unavailable);
  return ring ? "io_uring" : unavailable ? "unavailable" : "threads";
}

namespace {

// Runs one operation on the calling context's ring (`on_ring` makes the Uring::Operation), or
// as a blocking call (`blocking` returns the result or -errno) on its thread pool.
template <typename OnRing, typename Blocking>
coro::Task<ssize_t> perform(OnRing on_ring, Blocking blocking) {
  Context& context = home_context();
  bool unavailable;
  if (Uring* ring = choose_ring(context, &unavailable)) co_return co_await on_ring(*ring);
  if (unavailable) co_return -ENOSYS;
  co_return co_await context.thread_pool().run(std::move(blocking));
}

}  // namespace

namespace {

// One ring operation carries a 32-bit length, and the kernel moves at most MAX_RW_COUNT
// (2 GiB - 4 KiB) per call anyway: longer reads and writes go out as pieces of this size.
constexpr std::size_t kMaxPiece = std::size_t{1} << 30;

coro::Task<ssize_t> pread_piece(int fd, void* buffer, std::uint32_t length, off_t offset) {
  return perform(
      [=](Uring& ring) {
        return ring.read(fd, buffer, length, static_cast<std::uint64_t>(offset));
      },
      [=] {
        return result_or_errno(offset < 0 ? ::read(fd, buffer, length)
                                          : ::pread(fd, buffer, length, offset));
      });
}

// Large buffered (not O_DIRECT) writes go to the thread pool even when the ring is there:
// io_uring cannot complete them inline (ext4 buffered writes block), so it hands them to an
// io-wq worker, which runs one file's buffered writes one at a time; the 2 MiB writes of
// spindle-img convert then took 0.09-0.6 s for 256 MiB against a steady 0.10-0.12 s on the
// pool (docs/benchmarks.md, "convert"). O_DIRECT writes, small writes and a forced io_uring
// backend stay on the ring.
constexpr std::size_t kLargeWrite = std::size_t{1} << 20;

bool pool_is_better_for_write(int fd, std::size_t length) noexcept {
  if (length < kLargeWrite || file_backend() != FileBackend::automatic) return false;
  const int flags = ::fcntl(fd, F_GETFL);
  return flags >= 0 && (flags & O_DIRECT) == 0;
}

template <typename OnRing, typename Blocking>
coro::Task<ssize_t> perform_write(int fd, std::size_t length, OnRing on_ring, Blocking blocking) {
  if (pool_is_better_for_write(fd, length)) {
    co_return co_await home_context().thread_pool().run(std::move(blocking));
  }
  co_return co_await perform(std::move(on_ring), std::move(blocking));
}

coro::Task<ssize_t> pwrite_piece(int fd, const void* buffer, std::uint32_t length,
                                 off_t offset) {
  return perform_write(
      fd, length,
      [=](Uring& ring) {
        return ring.write(fd, buffer, length, static_cast<std::uint64_t>(offset));
      },
      [=] {
        return result_or_errno(offset < 0 ? ::write(fd, buffer, length)
                                          : ::pwrite(fd, buffer, length, offset));
      });
}

// Issues pieces of at most kMaxPiece bytes one after another until `length` is done, a piece
// comes back short (end of file, a full disk, a pipe with less data: the same short result a
// single call gives) or fails. An error after some progress reports the progress.
coro::Task<ssize_t> transfer(bool write, int fd, char* buffer, std::size_t length,
                             off_t offset) {
  std::size_t done = 0;
  for (;;) {
    const auto piece = static_cast<std::uint32_t>(std::min(length - done, kMaxPiece));
    const off_t at = offset < 0 ? offset : offset + static_cast<off_t>(done);
    ssize_t result;
    if (write) {
      result = co_await pwrite_piece(fd, buffer + done, piece, at);
    } else {
      result = co_await pread_piece(fd, buffer + done, piece, at);
    }
    if (result < 0) co_return done > 0 ? static_cast<ssize_t>(done) : result;
    done += static_cast<std::size_t>(result);
    if (static_cast<std::size_t>(result) < piece || done == length) {
      co_return static_cast<ssize_t>(done);
    }
  }
}

}  // namespace

coro::Task<ssize_t> pread(int fd, void* buffer, std::size_t length, off_t offset) {
  if (length <= kMaxPiece) {
    return pread_piece(fd, buffer, static_cast<std::uint32_t>(length), offset);
  }
  return transfer(false, fd, static_cast<char*>(buffer), length, offset);
}

coro::Task<ssize_t> pwrite(int fd, const void* buffer, std::size_t length, off_t offset) {
  if (length <= kMaxPiece) {
    return pwrite_piece(fd, buffer, static_cast<std::uint32_t>(length), offset);
  }
  // The buffer is only read: transfer() takes a char* for both directions.
  return transfer(true, fd, const_cast<char*>(static_cast<const char*>(buffer)), length, offset);
}

coro::Task<ssize_t> preadv(int fd, std::span<const iovec> vectors, off_t offset) {
  const int count = static_cast<int>(vectors.size());
  return perform(
      [=](Uring& ring) {
        return ring.readv(fd, vectors.data(), static_cast<unsigned>(count),
                          static_cast<std::uint64_t>(offset));
      },
      [=] {
        return result_or_errno(offset < 0 ? ::readv(fd, vectors.data(), count)
                                          : ::preadv(fd, vectors.data(), count, offset));
      });
}

coro::Task<ssize_t> pwritev(int fd, std::span<const iovec> vectors, off_t offset) {
  const int count = static_cast<int>(vectors.size());
  std::size_t length = 0;
  for (const iovec& vector : vectors) length += vector.iov_len;
  return perform_write(
      fd, length,
      [=](Uring& ring) {
        return ring.writev(fd, vectors.data(), static_cast<unsigned>(count),
                           static_cast<std::uint64_t>(offset));
      },
      [=] {
        return result_or_errno(offset < 0 ? ::writev(fd, vectors.data(), count)
                                          : ::pwritev(fd, vectors.data(), count, offset));
      });
}

namespace {
coro::Task<int> sync(int fd, bool data_only) {
  const ssize_t result = co_await perform(
      [=](Uring& ring) { return ring.fsync(fd, data_only); },
      [=] { return result_or_errno(data_only ? ::fdatasync(fd) : ::fsync(fd)); });
  co_return static_cast<int>(result);
}
}  // namespace

coro::Task<int> fsync(int fd) { return sync(fd, false); }
coro::Task<int> fdatasync(int fd) { return sync(fd, true); }

coro::Task<int> fallocate(int fd, int mode, off_t offset, off_t length) {
  const ssize_t result = co_await perform(
      [=](Uring& ring) {
        return ring.fallocate(fd, mode, static_cast<std::uint64_t>(offset),
                              static_cast<std::uint64_t>(length));
      },
      [=] { return result_or_errno(::fallocate(fd, mode, offset, length)); });
  co_return static_cast<int>(result);
}

}  // namespace spindle::aio
