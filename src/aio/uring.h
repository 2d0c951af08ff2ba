// Uring: one io_uring per Context for file I/O. An Operation describes one request; start()
// prepares its SQE, submissions are batched and flushed once per loop iteration (before the
// context waits), and each completion calls the operation's completion function in the
// context's thread with the result (bytes, or -errno). coro/file_io.h awaits operations from
// coroutines.
//
// The ring uses SINGLE_ISSUER|DEFER_TASKRUN|TASKRUN_FLAG when the context has a dedicated thread
// and the kernel supports them (falling back to SINGLE_ISSUER|DEFER_TASKRUN, COOP_TASKRUN, then
// none). Completions are signalled through an eventfd registered with the ring, which the context
// watches in its epoll set (not as an fd handler: it is the context's own, like its wake-up fd).
//
// Completion protocol (no eventfd traffic while the loop is awake):
//  * Awake, the context reaps the ring itself: flush() at the top of every loop iteration submits
//    what was prepared (io_uring_submit_and_get_events with DEFER_TASKRUN, which also delivers
//    page-cache hits that completed during the submit) and delivers any completion that became
//    visible meanwhile (CQ entries, or IORING_SQ_TASKRUN: deferred completion work queued). So
//    the eventfd is switched off (IORING_CQ_EVENTFD_DISABLED, a store to the shared ring, no
//    syscall) and a context with no other fds never calls epoll when it has no reason to sleep.
//  * Before sleeping with operations in flight, prepare_to_sleep() switches the eventfd on, then
//    (after a full fence) looks again for visible completions; if there are any, the context
//    does not sleep. This is a Dekker pair with the kernel, which adds deferred work with a full
//    barrier (cmpxchg), sets IORING_SQ_TASKRUN with a locked RMW and only then reads the cq flags
//    to decide whether to signal: either we see the flag or the kernel sees the eventfd enabled.
//    after_wake() switches it off again. The eventfd's fd "handler" is reap().
//  * Only rings with DEFER_TASKRUN and TASKRUN_FLAG toggle the eventfd. Other rings (private
//    contexts; kernels without the flags) keep it on: completions posted to the CQ from other
//    threads are not ordered against the cq flags by a full barrier there. Their eventfd may be
//    readable while the loop is awake and unpolled; the next sleep then returns at once and
//    reaps (one spare loop pass per sleep, never a lost wake-up).
//  * The kernel runs at most 20 deferred completions per io_uring_enter and keeps the rest on a
//    retry list without setting IORING_SQ_TASKRUN or signalling again; so when one call delivered
//    that many, leftover_work_ makes the next pass ask the kernel again before anyone sleeps.
//
// Thread-safety: home thread only. The Uring is created, used and destroyed in its Context's
// thread; operations are started there and complete there. `pending_submissions_`,
// `in_flight_`, `eventfd_on_` and `leftover_work_` are home-thread state.
#pragma once

#include <liburing.h>
#include <sys/types.h>
#include <sys/uio.h>

#include <cstdint>
#include <memory>

#include "aio/event_notifier.h"

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
    // Called once, in the ring's thread, when the operation completed (result() is set).
    // The operation must stay where it is until then.
    using Completion = void (*)(Operation* operation, void* argument) noexcept;

    // Queues the request for the next submission.
    void start(Completion completion, void* argument) noexcept;
    int result() const noexcept { return result_; }

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
    Completion completion_ = nullptr;
    void* argument_ = nullptr;
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

  // Submits every prepared SQE and delivers the completions that are visible (the context
  // calls this at the top of each loop iteration). Returns whether it delivered any.
  bool flush() noexcept;
  bool uses_deferred_task_run() const noexcept { return deferred_task_run_; }
  bool toggles_eventfd() const noexcept { return toggles_eventfd_; }
  bool has_pending_submissions() const noexcept { return pending_submissions_ != 0; }
  unsigned in_flight() const noexcept { return in_flight_; }

  // For the context's loop (see the completion protocol above).
  int completion_fd() const noexcept { return completions_.fd(); }
  // Whether completions wait to be delivered (a flush() would deliver them). No syscall.
  bool completions_ready() const noexcept;
  // The loop is about to sleep: arm the eventfd. Returns true if it must not sleep after all.
  bool prepare_to_sleep() noexcept;
  void after_wake() noexcept;
  // The completion eventfd fired. Returns whether completions were delivered.
  bool reap() noexcept;

 private:
  Uring(unsigned entries, unsigned flags, bool deferred);
  io_uring_sqe* next_sqe() noexcept;
  bool reap_ring() noexcept;                 // runs deferred work if needed, then delivers
  unsigned deliver_completions() noexcept;   // completes every operation whose CQE is in the ring

  io_uring ring_{};
  EventNotifier completions_;
  bool deferred_task_run_;
  bool taskrun_flag_;            // the kernel sets IORING_SQ_TASKRUN when deferred work is queued
  bool toggles_eventfd_ = false;  // DEFER_TASKRUN + TASKRUN_FLAG + IORING_CQ_EVENTFD_DISABLED
  bool eventfd_on_ = true;
  bool leftover_work_ = false;
  unsigned pending_submissions_ = 0;
  unsigned in_flight_ = 0;
};

}  // namespace spindle::aio
