#include "coro/cancellation.h"

#include "base/fatal.h"

namespace spindle::coro {

bool CancelSource::cancel() noexcept {
  if (state_->cancelled.exchange(true, std::memory_order_acq_rel)) return false;
  std::lock_guard lock(state_->mutex);
  while (CancelRegistration* registration = state_->first) {
    state_->first = registration->next_;
    if (state_->first) state_->first->previous_ = nullptr;
    registration->linked_ = false;
    registration->callback_();
  }
  return true;
}

CancelRegistration::CancelRegistration(const CancelToken& token, std::function<void()> callback)
    : state_(token.state_), callback_(std::move(callback)) {
  if (!state_) return;  // never cancelled
  {
    std::lock_guard lock(state_->mutex);
    // Checked under the mutex: cancel() sets the flag before it takes the mutex, so either it
    // finds this registration linked, or this sees the flag.
    if (!state_->cancelled.load(std::memory_order_acquire)) {
      next_ = state_->first;
      if (next_) next_->previous_ = this;
      state_->first = this;
      linked_ = true;
      return;
    }
  }
  callback_();
}

CancelRegistration::~CancelRegistration() {
  if (!state_) return;
  std::lock_guard lock(state_->mutex);  // waits out a callback running on another thread
  if (!linked_) return;
  if (previous_) {
    previous_->next_ = next_;
  } else {
    state_->first = next_;
  }
  if (next_) next_->previous_ = previous_;
}

void CancellableSleepAwaiter::await_suspend(std::coroutine_handle<> handle) {
  home_ = aio::current_context();
  if (home_ == nullptr) base::fatal("coro::sleep() on a thread without a context");
  coroutine_ = park(handle);
  detail::claim(coroutine_, "coro::sleep(token)");
  // Both ends only queue the coroutine (it resumes in a later work item), so await_resume()
  // may destroy the timer and the registration; the registration's destructor waits for a
  // cancellation callback still returning on another thread.
  timer_.emplace(*home_, aio::Clock::monotonic, [this] { finish(true); });
  timer_->arm_in(duration_);
  registration_.emplace(token_, [this] { finish(false); });
}

void CancellableSleepAwaiter::finish(bool slept) noexcept {
  if (finished_.exchange(true, std::memory_order_acq_rel)) return;
  slept_ = slept;
  detail::post_claimed(*home_, coroutine_);  // touches nothing of `this` after this
}

bool CancellableSleepAwaiter::await_resume() noexcept {
  if (!coroutine_) return !token_.cancelled();  // did not suspend
  registration_.reset();
  timer_.reset();  // on its context's thread, which is this one: its callback is not running
  return slept_;
}

}  // namespace spindle::coro
