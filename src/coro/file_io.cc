#include "coro/file_io.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <utility>

#include "aio/context.h"
#include "aio/file_backend.h"
#include "aio/thread_pool.h"
#include "aio/uring.h"
#include "base/fatal.h"
#include "coro/coroutine.h"
#include "coro/run_blocking.h"

namespace spindle::coro {

namespace {

aio::Context& home_context() {
  aio::Context* context = aio::current_context();
  if (context == nullptr) base::fatal("file I/O from a thread without a context");
  return *context;
}

ssize_t result_or_errno(ssize_t result) noexcept {
  return result < 0 ? -errno : result;
}

// Awaits one ring operation: started when the coroutine suspends, resumed at home by its
// completion (which runs in the ring's thread, the coroutine's home).
class RingOperation {
 public:
  explicit RingOperation(aio::Uring::Operation operation) noexcept : operation_(operation) {}
  bool await_ready() const noexcept { return false; }
  void await_suspend(std::coroutine_handle<> handle) noexcept {
    coroutine_ = park(handle);
    operation_.start(&RingOperation::completed, this);
  }
  int await_resume() const noexcept { return operation_.result(); }

 private:
  static void completed(aio::Uring::Operation*, void* self) noexcept {
    wake(static_cast<RingOperation*>(self)->coroutine_, "Uring completion");
  }

  aio::Uring::Operation operation_;
  Coroutine* coroutine_ = nullptr;
};

// Runs one operation on the calling context's ring (`on_ring` makes the Uring::Operation), or
// as a blocking call (`blocking` returns the result or -errno) on its thread pool.
template <typename OnRing, typename Blocking>
Task<ssize_t> perform(OnRing on_ring, Blocking blocking) {
  aio::Context& context = home_context();
  bool unavailable;
  if (aio::Uring* ring = aio::file_ring(context, &unavailable)) {
    co_return co_await RingOperation(on_ring(*ring));
  }
  if (unavailable) co_return -ENOSYS;
  co_return co_await run_blocking(context.thread_pool(), std::move(blocking));
}

// One ring operation carries a 32-bit length, and the kernel moves at most MAX_RW_COUNT
// (2 GiB - 4 KiB) per call anyway: longer reads and writes go out as pieces of this size.
constexpr std::size_t kMaxPiece = std::size_t{1} << 30;

Task<ssize_t> pread_piece(int fd, void* buffer, std::uint32_t length, off_t offset) {
  return perform(
      [=](aio::Uring& ring) {
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
  if (length < kLargeWrite || aio::file_backend() != aio::FileBackend::automatic) return false;
  const int flags = ::fcntl(fd, F_GETFL);
  return flags >= 0 && (flags & O_DIRECT) == 0;
}

template <typename OnRing, typename Blocking>
Task<ssize_t> perform_write(int fd, std::size_t length, OnRing on_ring, Blocking blocking) {
  if (pool_is_better_for_write(fd, length)) {
    co_return co_await run_blocking(home_context().thread_pool(), std::move(blocking));
  }
  co_return co_await perform(std::move(on_ring), std::move(blocking));
}

Task<ssize_t> pwrite_piece(int fd, const void* buffer, std::uint32_t length, off_t offset) {
  return perform_write(
      fd, length,
      [=](aio::Uring& ring) {
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
Task<ssize_t> transfer(bool write, int fd, char* buffer, std::size_t length, off_t offset) {
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

Task<ssize_t> pread(int fd, void* buffer, std::size_t length, off_t offset) {
  if (length <= kMaxPiece) {
    return pread_piece(fd, buffer, static_cast<std::uint32_t>(length), offset);
  }
  return transfer(false, fd, static_cast<char*>(buffer), length, offset);
}

Task<ssize_t> pwrite(int fd, const void* buffer, std::size_t length, off_t offset) {
  if (length <= kMaxPiece) {
    return pwrite_piece(fd, buffer, static_cast<std::uint32_t>(length), offset);
  }
  // The buffer is only read: transfer() takes a char* for both directions.
  return transfer(true, fd, const_cast<char*>(static_cast<const char*>(buffer)), length, offset);
}

Task<ssize_t> preadv(int fd, std::span<const iovec> vectors, off_t offset) {
  const int count = static_cast<int>(vectors.size());
  return perform(
      [=](aio::Uring& ring) {
        return ring.readv(fd, vectors.data(), static_cast<unsigned>(count),
                          static_cast<std::uint64_t>(offset));
      },
      [=] {
        return result_or_errno(offset < 0 ? ::readv(fd, vectors.data(), count)
                                          : ::preadv(fd, vectors.data(), count, offset));
      });
}

Task<ssize_t> pwritev(int fd, std::span<const iovec> vectors, off_t offset) {
  const int count = static_cast<int>(vectors.size());
  std::size_t length = 0;
  for (const iovec& vector : vectors) length += vector.iov_len;
  return perform_write(
      fd, length,
      [=](aio::Uring& ring) {
        return ring.writev(fd, vectors.data(), static_cast<unsigned>(count),
                           static_cast<std::uint64_t>(offset));
      },
      [=] {
        return result_or_errno(offset < 0 ? ::writev(fd, vectors.data(), count)
                                          : ::pwritev(fd, vectors.data(), count, offset));
      });
}

namespace {
Task<int> sync(int fd, bool data_only) {
  const ssize_t result =
      co_await perform([=](aio::Uring& ring) { return ring.fsync(fd, data_only); },
                       [=] { return result_or_errno(data_only ? ::fdatasync(fd) : ::fsync(fd)); });
  co_return static_cast<int>(result);
}
}  // namespace

Task<int> fsync(int fd) {
  return sync(fd, false);
}
Task<int> fdatasync(int fd) {
  return sync(fd, true);
}

Task<int> fallocate(int fd, int mode, off_t offset, off_t length) {
  const ssize_t result = co_await perform(
      [=](aio::Uring& ring) {
        return ring.fallocate(fd, mode, static_cast<std::uint64_t>(offset),
                              static_cast<std::uint64_t>(length));
      },
      [=] { return result_or_errno(::fallocate(fd, mode, offset, length)); });
  co_return static_cast<int>(result);
}

}  // namespace spindle::coro
