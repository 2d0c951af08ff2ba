// sleep(duration): suspends the calling coroutine for at least `duration`, on a monotonic timer
// of its current (home) context. While it sleeps the coroutine's resumption belongs to the
// timer: any other wake()/schedule() aborts naming "coro::sleep" (use an Event for a sleep
// that others may cut short).
//
// Thread-safety: call from a coroutine; the timer fires in the coroutine's home context.
#pragma once

#include <chrono>
#include <coroutine>
#include <optional>

#include "aio/context.h"
#include "aio/timer.h"
#include "coro/coroutine.h"

namespace spindle::coro {

class SleepAwaiter {
 public:
  explicit SleepAwaiter(std::chrono::nanoseconds duration) noexcept : duration_(duration) {}
  bool await_ready() const noexcept { return duration_.count() <= 0; }
  void await_suspend(std::coroutine_handle<> handle);
  void await_resume() noexcept { timer_.reset(); }

 private:
  std::chrono::nanoseconds duration_;
  std::optional<aio::Timer> timer_;
};

inline SleepAwaiter sleep(std::chrono::nanoseconds duration) noexcept {
  return SleepAwaiter(duration);
}

}  // namespace spindle::coro
