#include "aio/file_io.h"

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
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

coro::Task<ssize_t> pread(int fd, void* buffer, std::size_t length, off_t offset) {
  return perform(
      [=](Uring& ring) {
        return ring.read(fd, buffer, static_cast<std::uint32_t>(length),
                         static_cast<std::uint64_t>(offset));
      },
      [=] {
        return result_or_errno(offset < 0 ? ::read(fd, buffer, length)
                                          : ::pread(fd, buffer, length, offset));
      });
}

coro::Task<ssize_t> pwrite(int fd, const void* buffer, std::size_t length, off_t offset) {
  return perform(
      [=](Uring& ring) {
        return ring.write(fd, buffer, static_cast<std::uint32_t>(length),
                          static_cast<std::uint64_t>(offset));
      },
      [=] {
        return result_or_errno(offset < 0 ? ::write(fd, buffer, length)
                                          : ::pwrite(fd, buffer, length, offset));
      });
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
  return perform(
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
