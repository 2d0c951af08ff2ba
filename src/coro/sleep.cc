#include "coro/sleep.h"

#include "base/fatal.h"

namespace spindle::coro {

void SleepAwaiter::await_suspend(std::coroutine_handle<> handle) {
  aio::Context* home = aio::current_context();
  if (home == nullptr) base::fatal("coro::sleep() on a thread without a context");
  Coroutine* co = park(handle);
  detail::claim(co, "coro::sleep");
  // The callback only queues the coroutine: it resumes in a later work item, after the timer
  // callback has returned, so destroying the timer in await_resume() is safe.
  timer_.emplace(*home, aio::Clock::monotonic, [home, co] { detail::post_claimed(*home, co); });
  timer_->arm_in(duration_);
}

}  // namespace spindle::coro
