#include "io/channel.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <mutex>
#include <vector>

#include "base/fatal.h"
#include "coro/file_io.h"

namespace spindle::io {

namespace {

void ignore_sigpipe_once() {
  static std::once_flag once;
  std::call_once(once, [] { ::signal(SIGPIPE, SIG_IGN); });  // EPIPE comes back as an error
}

}  // namespace

Channel::Channel(int fd, aio::Context* context) : fd_(fd) {
  ignore_sigpipe_once();
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags >= 0 && !(flags & O_NONBLOCK)) ::fcntl(fd, F_SETFL, flags | O_NONBLOCK);
  struct stat info;
  if (::fstat(fd, &info) == 0) {
    is_socket_ = S_ISSOCK(info.st_mode);
    pollable_ = !S_ISREG(info.st_mode) && !S_ISBLK(info.st_mode);
  }
  if (context) attach(*context);
}

Channel::~Channel() { close(); }

void Channel::attach(aio::Context& context) {
  detach();
  const int fd = fd_.load(std::memory_order_acquire);
  if (fd < 0 || !pollable_) return;  // files complete through aio file I/O instead
  context_.store(&context, std::memory_order_release);
  // Adding the fd reports its current readiness once, so a coroutine already waiting when
  // the channel moves is woken by its new context.
  context.set_fd_handler(
      fd, [this] { signal_ready(readable_); }, [this] { signal_ready(writable_); },
      aio::Context::Trigger::edge);
}

void Channel::detach() {
  aio::Context* old = context_.exchange(nullptr, std::memory_order_acq_rel);
  const int fd = fd_.load(std::memory_order_acquire);
  if (old && fd >= 0) old->remove_fd_handler(fd);
}

void Channel::signal_ready(std::atomic<std::uintptr_t>& direction, bool from_elsewhere) noexcept {
  std::uintptr_t state = direction.load(std::memory_order_acquire);
  for (;;) {
    if (state == kReady || state == kClosed) return;
    const std::uintptr_t desired = state == 0 ? kReady : 0;
    if (direction.compare_exchange_weak(state, desired, std::memory_order_acq_rel,
                                        std::memory_order_acquire)) {
      if (state == 0) return;
      auto* waiter = reinterpret_cast<coro::Coroutine*>(state);
      if (from_elsewhere) {
        coro::wake(waiter, "io::Channel::interrupt_read");  // in its home context
      } else {
        // Resume the waiter here, in the channel's context: it follows the channel.
        coro::enter(waiter, "io::Channel");
      }
      return;
    }
  }
}

bool Channel::ReadinessAwaiter::await_suspend(std::coroutine_handle<> handle) noexcept {
  coro::Coroutine* co = coro::park(handle);
  std::uintptr_t expected = 0;
  if (direction_.compare_exchange_strong(expected, reinterpret_cast<std::uintptr_t>(co),
                                         std::memory_order_acq_rel, std::memory_order_acquire)) {
    return true;  // published: the fd handler may already be resuming us
  }
  if (expected == kReady) {  // an edge arrived before we waited: consume it and retry
    direction_.compare_exchange_strong(expected, 0, std::memory_order_acq_rel);
  }
  coro::unpark(co);
  return false;
}

Channel::ReadinessAwaiter Channel::readable() noexcept {
  if (context() == nullptr) {
    if (aio::Context* here = aio::current_context()) attach(*here);
  }
  return ReadinessAwaiter(readable_);
}

Channel::ReadinessAwaiter Channel::writable() noexcept {
  if (context() == nullptr) {
    if (aio::Context* here = aio::current_context()) attach(*here);
  }
  return ReadinessAwaiter(writable_);
}

ssize_t Channel::try_read(void* buffer, std::size_t size) noexcept {
  const int fd = fd_.load(std::memory_order_acquire);
  const ssize_t n = is_socket_ ? ::recv(fd, buffer, size, 0) : ::read(fd, buffer, size);
  return n < 0 ? -errno : n;
}

ssize_t Channel::try_writev(const iovec* vectors, int count) noexcept {
  const int fd = fd_.load(std::memory_order_acquire);
  ssize_t n;
  if (is_socket_) {
    msghdr message{};
    message.msg_iov = const_cast<iovec*>(vectors);
    message.msg_iovlen = static_cast<std::size_t>(count);
    n = ::sendmsg(fd, &message, MSG_NOSIGNAL);
  } else {
    n = ::writev(fd, vectors, count);
  }
  return n < 0 ? -errno : n;
}

coro::Task<ssize_t> Channel::read_some(void* buffer, std::size_t size) {
  if (!pollable_) {
    if (closed()) co_return -ECANCELED;
    co_return co_await coro::pread(fd(), buffer, size, -1);  // at the file position
  }
  for (;;) {
    if (closed()) co_return -ECANCELED;
    const ssize_t n = try_read(buffer, size);
    if (n >= 0 || (n != -EAGAIN && n != -EINTR)) co_return n;
    if (n == -EAGAIN) {
      const bool ready = co_await readable();
      if (!ready) co_return -ECANCELED;
    }
  }
}

coro::Task<ssize_t> Channel::read_some_or_interrupt(void* buffer, std::size_t size) {
  if (!pollable_) co_return co_await read_some(buffer, size);  // a file never waits for data
  for (;;) {
    if (closed()) co_return -ECANCELED;
    const ssize_t n = try_read(buffer, size);
    if (n >= 0 || (n != -EAGAIN && n != -EINTR)) co_return n;
    if (n == -EAGAIN) {
      if (take_interrupt()) co_return -EINTR;
      const bool ready = co_await readable();
      if (!ready) co_return -ECANCELED;
    }
  }
}

void Channel::interrupt_read() noexcept {
  read_interrupted_.store(true, std::memory_order_release);
  signal_ready(readable_, true);
}

coro::Task<int> Channel::writev_all(std::span<const iovec> vectors) {
  // Work on a copy: partial writes advance it.
  std::vector<iovec> pending(vectors.begin(), vectors.end());
  std::size_t first = 0;
  while (first < pending.size()) {
    if (pending[first].iov_len == 0) {
      ++first;
      continue;
    }
    if (closed()) co_return -ECANCELED;
    const int count = static_cast<int>(std::min<std::size_t>(pending.size() - first, IOV_MAX));
    ssize_t n = pollable_ ? try_writev(&pending[first], count)
                          : co_await coro::pwritev(
                                fd(), std::span<const iovec>(&pending[first], count), -1);
    if (n == -EINTR) continue;
    if (n == -EAGAIN) {
      const bool ready = co_await writable();
      if (!ready) co_return -ECANCELED;
      continue;
    }
    if (n < 0) co_return static_cast<int>(n);
    while (n > 0) {  // advance past what was written
      iovec& head = pending[first];
      const std::size_t used = std::min<std::size_t>(head.iov_len, static_cast<std::size_t>(n));
      head.iov_base = static_cast<char*>(head.iov_base) + used;
      head.iov_len -= used;
      n -= static_cast<ssize_t>(used);
      if (head.iov_len == 0) ++first;
    }
  }
  co_return 0;
}

coro::Task<int> Channel::send_file(int file_fd, std::uint64_t offset, std::uint64_t bytes) {
  if (!can_send_file()) co_return co_await ByteStream::send_file(file_fd, offset, bytes);
  // One sendfile() moves at most this much (the kernel's own cap is a little under 2 GiB).
  constexpr std::uint64_t kMaxChunk = 1u << 30;
  while (bytes > 0) {
    if (closed()) co_return -ECANCELED;
    auto at = static_cast<off_t>(offset);
    const ssize_t n = ::sendfile(fd(), file_fd, &at, std::min(bytes, kMaxChunk));
    if (n < 0) {
      const int error = errno;
      if (error == EINTR) continue;
      if (error == EINVAL || error == ENOSYS || error == EOPNOTSUPP) {
        // A file system without sendfile support: copy the rest through memory.
        co_return co_await ByteStream::send_file(file_fd, offset, bytes);
      }
      if (error != EAGAIN) co_return -error;
      const bool ready = co_await writable();
      if (!ready) co_return -ECANCELED;
      continue;
    }
    if (n == 0) co_return -EIO;  // the file is shorter than promised
    offset += static_cast<std::uint64_t>(n);
    bytes -= static_cast<std::uint64_t>(n);
  }
  co_return 0;
}

int Channel::shutdown_write() noexcept {
  if (!is_socket_) return -ENOTSOCK;
  std::lock_guard lock(fd_mutex_);
  const int fd = fd_.load(std::memory_order_acquire);
  if (fd < 0) return -EBADF;
  return ::shutdown(fd, SHUT_WR) < 0 ? -errno : 0;
}

int Channel::shutdown_read() noexcept {
  if (!is_socket_) return -ENOTSOCK;
  std::lock_guard lock(fd_mutex_);
  const int fd = fd_.load(std::memory_order_acquire);
  if (fd < 0) return -EBADF;
  return ::shutdown(fd, SHUT_RD) < 0 ? -errno : 0;
}

void Channel::close() noexcept {
  detach();
  int fd;
  {
    std::lock_guard lock(fd_mutex_);
    fd = fd_.exchange(-1, std::memory_order_acq_rel);
    if (fd < 0) return;
    ::close(fd);
  }
  for (auto* direction : {&readable_, &writable_}) {
    const std::uintptr_t state = direction->exchange(kClosed, std::memory_order_acq_rel);
    if (state != 0 && state != kReady && state != kClosed) {
      coro::wake_later(reinterpret_cast<coro::Coroutine*>(state), "io::Channel::close");
    }
  }
}

}  // namespace spindle::io
