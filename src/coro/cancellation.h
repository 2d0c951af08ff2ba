// Cancellation: a CancelSource says "stop" once; the CancelTokens made from it are what the
// code being stopped observes. A token is polled (cancelled()) between steps, observed by
// awaits that take one (sleep(duration, token) ends early), and may run a callback at the
// moment of cancellation (CancelRegistration: wake a waiter, set an Event, close a channel).
// Block jobs hand their token to every step; job-cancel cancels the source.
//
// Protocol: CancelState holds `cancelled_` (atomic, set once) and, under `mutex_`, the
// registrations not yet run (an intrusive doubly linked list). cancel() sets the flag and,
// holding the mutex, unlinks and runs each registration's callback in turn. A registration
// made after that runs its callback at once, in its constructor; one made before is either
// still linked (its destructor unlinks it under the mutex) or has run or is running (its
// destructor takes the mutex, so it returns only once the callback is over). So after a
// CancelRegistration's destructor the callback neither runs nor is running.
//
// Thread-safety: cancel(), cancelled(), token() and registration from any thread. Callbacks run
// on the cancelling thread (or the registering one, if already cancelled), with the state's
// mutex held: keep them short, never resume a coroutine inline from them (wake_later,
// Event::set and post-style hand-offs are fine), never make or destroy a registration of the
// same token from them.
#pragma once

#include <atomic>
#include <chrono>
#include <coroutine>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>

#include "aio/context.h"
#include "aio/timer.h"
#include "coro/coroutine.h"

namespace spindle::coro {

class CancelRegistration;

namespace detail {
struct CancelState {
  std::atomic<bool> cancelled{false};
  std::mutex mutex;
  CancelRegistration* first = nullptr;  // mutex
};
}  // namespace detail

class CancelToken {
 public:
  CancelToken() = default;  // a token that is never cancelled
  bool cancelled() const noexcept {
    return state_ && state_->cancelled.load(std::memory_order_acquire);
  }

 private:
  friend class CancelSource;
  friend class CancelRegistration;
  explicit CancelToken(std::shared_ptr<detail::CancelState> state) : state_(std::move(state)) {}
  std::shared_ptr<detail::CancelState> state_;
};

class CancelSource {
 public:
  CancelSource() : state_(std::make_shared<detail::CancelState>()) {}
  // The first call cancels: cancelled() turns true, and every registered callback runs on this
  // thread before it returns. Later calls do nothing and return false.
  bool cancel() noexcept;
  bool cancelled() const noexcept { return state_->cancelled.load(std::memory_order_acquire); }
  CancelToken token() const noexcept { return CancelToken(state_); }

 private:
  std::shared_ptr<detail::CancelState> state_;
};

class CancelRegistration {
 public:
  // Runs `callback` once when `token` is cancelled (at once, here, if it is already).
  CancelRegistration(const CancelToken& token, std::function<void()> callback);
  ~CancelRegistration();
  CancelRegistration(const CancelRegistration&) = delete;
  CancelRegistration& operator=(const CancelRegistration&) = delete;

 private:
  friend class CancelSource;
  std::shared_ptr<detail::CancelState> state_;
  std::function<void()> callback_;
  CancelRegistration* previous_ = nullptr;  // state_->mutex
  CancelRegistration* next_ = nullptr;      // state_->mutex
  bool linked_ = false;                     // state_->mutex
};

// co_await sleep(duration, token): like sleep(duration), but ends as soon as `token` is
// cancelled. True if the whole duration passed, false if cancelled (before or during). The
// coroutine resumes in the context it slept on, whichever ends the sleep.
class CancellableSleepAwaiter {
 public:
  CancellableSleepAwaiter(std::chrono::nanoseconds duration, CancelToken token) noexcept
      : duration_(duration), token_(std::move(token)) {}
  bool await_ready() const noexcept { return token_.cancelled() || duration_.count() <= 0; }
  void await_suspend(std::coroutine_handle<> handle);
  bool await_resume() noexcept;

 private:
  void finish(bool slept) noexcept;  // the timer or the cancellation: the first one resumes

  std::chrono::nanoseconds duration_;
  CancelToken token_;
  aio::Context* home_ = nullptr;
  Coroutine* coroutine_ = nullptr;
  std::atomic<bool> finished_{false};
  bool slept_ = false;  // written by the winner of finished_, before it resumes the coroutine
  std::optional<aio::Timer> timer_;
  std::optional<CancelRegistration> registration_;
};

inline CancellableSleepAwaiter sleep(std::chrono::nanoseconds duration,
                                     CancelToken token) noexcept {
  return CancellableSleepAwaiter(duration, std::move(token));
}

}  // namespace spindle::coro
