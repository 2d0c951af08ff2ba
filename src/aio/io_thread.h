// IoThread: a thread that owns a Context and polls it until stopped.
//
// Thread-safety: construct, stop() and destroy from any thread other than the IoThread itself
// (stop() from inside the loop is allowed too: it ends the loop after the current iteration
// without joining). context() may be used from any thread. Stopping is a callback run inside the
// loop (never a flag poked from outside: reference/qemu-aio.md §5.6), so it cannot race with
// the loop going to sleep. `stopping_` is touched only by the IoThread's own thread.
#pragma once

#include <atomic>
#include <string>
#include <thread>

#include "aio/context.h"

namespace spindle::aio {

class IoThread {
 public:
  // QEMU's IOThread default: busy-poll up to 32 us before sleeping.
  static constexpr Context::PollParams kDefaultPollParams{32768, 0, 0};

  // Starts the thread and returns once its Context is being polled.
  explicit IoThread(std::string name = "iothread", Context::PollParams params = kDefaultPollParams);
  ~IoThread();  // stop() + join
  IoThread(const IoThread&) = delete;
  IoThread& operator=(const IoThread&) = delete;

  Context& context() const noexcept { return *context_; }
  ContextRef context_ref() const noexcept { return context_; }
  std::thread::id thread_id() const noexcept { return thread_id_; }
  // The kernel's id of the thread (gettid(); QMP's query-iothreads "thread-id").
  int native_thread_id() const noexcept { return native_thread_id_; }

  // Ends the loop: work already queued is still run, and io_uring operations in flight are
  // waited for (a read parked on an empty pipe keeps stop() waiting until it completes); then
  // the context's ring is closed on the IoThread, the thread exits and is joined. Work posted
  // after the loop ended runs in the joining thread (its file I/O on a ring of that thread's
  // own). Idempotent.
  void stop();

 private:
  void run(std::atomic<bool>& started);
  // Polls until no work is queued and no ring operation is in flight, then closes the ring.
  void drain();

  ContextRef context_;
  std::thread thread_;
  std::thread::id thread_id_;
  int native_thread_id_ = 0;
  bool stopping_ = false;
  bool joined_ = false;
};

}  // namespace spindle::aio
