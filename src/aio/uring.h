// Uring: one io_uring per Context for file I/O. Operations are coroutine awaiters: the SQE is
// prepared when the coroutine suspends, submissions are batched and flushed once per loop
// iteration (before the context waits), and each completion wakes its coroutine in the
// context's thread with the result (bytes, or -errno).
//
// The ring uses SINGLE_ISSUER|DEFER_TASKRUN when the context has a dedicated thread and the
// kernel supports them (falling back to COOP_TASKRUN, then to none). Completions are signalled
// through an eventfd registered with the ring and watched by the context: with DEFER_TASKRUN
// the ring fd itself does not become readable until the issuer asks for events.
//
// Thread-safety: home thread only. The Uring is created, used and destroyed in its Context's
// thread; operations must be awaited by coroutines running there. `pending_submissions_` and
// `in_flight_` are home-thread state.
#pragma once

#include <liburing.h>
#include <sys/types.h>
#include <sys/uio.h>

#include <coroutine>
#include <cstdint>
#include <memory>

#include "aio/event_notifier.h"
#include "coro/coroutine.h"

namespace spindle::aio {

class Context;

class Uring {
 public:
  // Returns null if io_uring is unavailable here (old kernel, seccomp, io_uring_disabled).
  static std::unique_ptr<Uring> create(Context& context, unsigned entries = 256);
  ~Uring();
  Uring(const Uring&) = delete;
  Uring& operator=(const Uring&) = delete;

  enum class Opcode : std::uint8_t { read, write, readv, writev, fsync, fdatasync, fallocate };

  class Operation {
   public:
    Operation(Uring& ring, Opcode opcode, int fd, void* buffer, std::uint64_t length,
              std::uint64_t offset, int mode = 0) noexcept
        : ring_(ring), opcode_(opcode), fd_(fd), buffer_(buffer), length_(length),
          offset_(offset), mode_(mode) {}
    bool await_ready() const noexcept { return false; }
    void await_suspend(std::coroutine_handle<> handle) noexcept;
    int await_resume() const noexcept { return result_; }

   private:
    friend class Uring;
    void prepare(io_uring_sqe* sqe) noexcept;

    Uring& ring_;
    Opcode opcode_;
    int fd_;
    void* buffer_;  // data buffer, or iovec array for readv/writev
    std::uint64_t length_;  // bytes, or iovec count
    std::uint64_t offset_;
    int mode_;
    int result_ = 0;
    coro::Coroutine* coroutine_ = nullptr;
  };

  Operation read(int fd, void* buffer, std::uint32_t length, std::uint64_t offset) noexcept {
    return {*this, Opcode::read, fd, buffer, length, offset};
  }
  Operation write(int fd, const void* buffer, std::uint32_t length,
                  std::uint64_t offset) noexcept {
    return {*this, Opcode::write, fd, const_cast<void*>(buffer), length, offset};
  }
  Operation readv(int fd, const iovec* iov, unsigned count, std::uint64_t offset) noexcept {
    return {*this, Opcode::readv, fd, const_cast<iovec*>(iov), count, offset};
  }
  Operation writev(int fd, const iovec* iov, unsigned count, std::uint64_t offset) noexcept {
    return {*this, Opcode::writev, fd, const_cast<iovec*>(iov), count, offset};
  }
  Operation fsync(int fd, bool data_only) noexcept {
    return {*this, data_only ? Opcode::fdatasync : Opcode::fsync, fd, nullptr, 0, 0};
  }
  Operation fallocate(int fd, int mode, std::uint64_t offset, std::uint64_t length) noexcept {
    return {*this, Opcode::fallocate, fd, nullptr, length, offset, mode};
  }

  // Submits every prepared SQE (the context calls this before it waits).
  void flush() noexcept;
  bool uses_deferred_task_run() const noexcept { return deferred_task_run_; }
  bool has_pending_submissions() const noexcept { return pending_submissions_ != 0; }
  unsigned in_flight() const noexcept { return in_flight_; }

 private:
  Uring(Context& context, unsigned entries, unsigned flags, bool deferred);
  io_uring_sqe* next_sqe() noexcept;
  void reap() noexcept;                 // the completion eventfd fired
  void deliver_completions() noexcept;  // wakes the coroutine of every completion in the ring

  Context& context_;
  io_uring ring_{};
  EventNotifier completions_;
  bool deferred_task_run_;
  unsigned pending_submissions_ = 0;
  unsigned in_flight_ = 0;
};

}  // namespace spindle::aio
