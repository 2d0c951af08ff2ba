// Channel: a byte stream over a file descriptor (TCP or Unix socket, pipe, file) with coroutine
// operations. A coroutine blocked in a channel waits for readiness on the Context the channel
// is attached to and resumes *there*: attaching a channel to another IoThread moves its
// waiting coroutines with it (the seed's "qio_channel_yield aware of AioContexts", in the
// follow-the-channel form). Partial reads never block a loop; EOF, ECONNRESET and EPIPE come
// back as negative errno values, never as signals (SIGPIPE is ignored, sends use MSG_NOSIGNAL).
//
// Readiness protocol, per direction (`readable_`, `writable_`: one atomic word each):
//   0            idle
//   kReady       the fd became ready while nobody waited (an edge not to lose)
//   Coroutine*   that coroutine waits for this direction
// An operation always tries the syscall first and waits only after EAGAIN: it parks, then
// CASes 0 -> itself; finding kReady instead, it clears it and retries without suspending.
// The edge-triggered fd handler CASes Coroutine* -> 0 and enters that coroutine, or 0 -> kReady.
// Exactly one party wins each CAS, so a wake-up is neither lost nor doubled.
//
// interrupt_read() sets `read_interrupted_` and then signals the read direction as the fd
// handler would, except that a waiting coroutine is woken in its home context (wake), not entered
// on the calling thread. The waiter retries its read; read_some_or_interrupt() checks the flag
// before each wait (after EAGAIN), so the flag is seen whether it was set before the wait or
// during it.
//
// Regular files and block devices cannot be polled: a channel over one reads and writes at the
// file position through aio file I/O (io_uring or the thread pool), so it never blocks a loop.
//
// Thread-safety: at most one coroutine reads and one writes at a time (any context). attach()
// and detach() from any thread. shutdown_read()/shutdown_write() from any thread: `fd_mutex_`
// orders them with close(), so they never act on an fd number that close() has released (and
// the kernel may have reused for an unrelated socket). close() only from the channel's owner:
// the attached context's thread (where its coroutines run and use the fd), or any thread while
// no coroutine uses the channel; other threads shut the socket down (waiters then see EOF or
// an error) and leave the close to the owner. Destroy the channel only when no coroutine uses
// it and from the attached context's thread (or after detach()).
#pragma once

#include <sys/types.h>
#include <sys/uio.h>

#include <atomic>
#include <coroutine>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <span>

#include "aio/context.h"
#include "coro/coroutine.h"
#include "coro/task.h"
#include "io/byte_stream.h"

namespace spindle::io {

class Channel final : public ByteStream {
 public:
  // Takes ownership of `fd` and makes it non-blocking; attaches to `context` if given.
  explicit Channel(int fd, aio::Context* context = aio::current_context());
  ~Channel() override;
  Channel(const Channel&) = delete;
  Channel& operator=(const Channel&) = delete;

  // ByteStream (read_exact() and write_all() come from there).
  coro::Task<ssize_t> read_some(void* buffer, std::size_t size) override;
  coro::Task<ssize_t> read_some_or_interrupt(void* buffer, std::size_t size) override;
  coro::Task<int> writev_all(std::span<const iovec> vectors) override;
  bool can_send_file() const noexcept override { return is_socket_ && pollable_; }
  coro::Task<int> send_file(int file_fd, std::uint64_t offset, std::uint64_t bytes) override;

  // Ends the write direction (the peer reads EOF); sockets only. 0 or -errno.
  int shutdown_write() noexcept;
  // Ends the read direction: a read blocked in the channel (from any thread) returns 0 (EOF),
  // and so do later ones; sockets only. 0 or -errno.
  int shutdown_read() noexcept;
  // Any thread. Makes the next (or the current) read_some_or_interrupt() that would wait for
  // data return -EINTR, once; a plain read that is waiting just retries. See take_interrupt().
  void interrupt_read() noexcept;
  // Consumes a pending interrupt_read(): true if there was one. For streams layered on this
  // channel (TlsSession), which implement read_some_or_interrupt() themselves.
  bool take_interrupt() noexcept {
    return read_interrupted_.exchange(false, std::memory_order_acq_rel);
  }
  // Closes the fd; coroutines waiting in the channel resume with -ECANCELED. Owner only (see
  // above).
  void close() noexcept;
  bool closed() const noexcept { return fd_.load(std::memory_order_acquire) < 0; }

  void attach(aio::Context& context);
  void detach();
  aio::Context* context() const noexcept { return context_.load(std::memory_order_acquire); }
  int fd() const noexcept { return fd_.load(std::memory_order_acquire); }

  // Waits until the fd is readable (or writable) without transferring data.
  class ReadinessAwaiter;
  ReadinessAwaiter readable() noexcept;
  ReadinessAwaiter writable() noexcept;

 private:
  static constexpr std::uintptr_t kReady = 1;
  static constexpr std::uintptr_t kClosed = 2;

  // `from_elsewhere`: not the fd handler (on the channel's context) but interrupt_read().
  static void signal_ready(std::atomic<std::uintptr_t>& direction,
                           bool from_elsewhere = false) noexcept;
  ssize_t try_read(void* buffer, std::size_t size) noexcept;
  ssize_t try_writev(const iovec* vectors, int count) noexcept;

  std::atomic<int> fd_;
  std::mutex fd_mutex_;  // held by close() and the shutdown calls around their use of fd_
  bool is_socket_ = false;
  bool pollable_ = true;  // false for regular files and block devices
  std::atomic<aio::Context*> context_{nullptr};
  std::atomic<std::uintptr_t> readable_{0};
  std::atomic<std::uintptr_t> writable_{0};
  std::atomic<bool> read_interrupted_{false};
};

class Channel::ReadinessAwaiter {
 public:
  explicit ReadinessAwaiter(std::atomic<std::uintptr_t>& direction) noexcept
      : direction_(direction) {}
  bool await_ready() const noexcept { return false; }
  bool await_suspend(std::coroutine_handle<> handle) noexcept;
  // False if the channel was closed while waiting.
  bool await_resume() const noexcept {
    return direction_.load(std::memory_order_acquire) != kClosed;
  }

 private:
  std::atomic<std::uintptr_t>& direction_;
};

}  // namespace spindle::io
