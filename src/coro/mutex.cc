#include "coro/mutex.h"

#include "base/cpu_relax.h"
#include "base/fatal.h"
#include "base/intrusive_list.h"

namespace spindle::coro {

Mutex::~Mutex() {
  if (state_.load(std::memory_order_relaxed) != unlocked_tag() || fifo_ != nullptr) {
    base::fatal("coro::Mutex {} destroyed while locked", static_cast<void*>(this));
  }
}

bool Mutex::try_lock() noexcept {
  LockAwaiter* expected = unlocked_tag();
  if (!state_.compare_exchange_strong(expected, nullptr, std::memory_order_acquire,
                                      std::memory_order_relaxed)) {
    return false;
  }
  note_holder();
  return true;
}

bool Mutex::try_lock_or_spin() noexcept {
  LockAwaiter* expected = unlocked_tag();
  if (state_.compare_exchange_strong(expected, nullptr, std::memory_order_acquire,
                                     std::memory_order_relaxed)) {
    return true;
  }
  if (spin_limit_ == 0) return false;
  aio::Context* const here = aio::current_context();
  for (unsigned i = 0; i < spin_limit_; ++i) {
    LockAwaiter* state = state_.load(std::memory_order_relaxed);
    if (state == unlocked_tag()) {
      if (state_.compare_exchange_weak(state, nullptr, std::memory_order_acquire,
                                       std::memory_order_relaxed)) {
        return true;
      }
      continue;
    }
    // Queued waiters go first (FIFO); a holder on our own thread cannot finish while we spin.
    if (state != nullptr || holder_context_.load(std::memory_order_relaxed) == here) break;
    base::cpu_relax();
  }
  return false;
}

bool Mutex::LockAwaiter::await_suspend(std::coroutine_handle<> handle) noexcept {
  coroutine_ = park(handle);  // parked before it becomes visible to an unlocker
  LockAwaiter* state = mutex_.state_.load(std::memory_order_relaxed);
  for (;;) {
    if (state == unlocked_tag()) {
      if (mutex_.state_.compare_exchange_weak(state, nullptr, std::memory_order_acquire,
                                              std::memory_order_relaxed)) {
        unpark(coroutine_);
        return false;  // freed meanwhile: we own it without suspending
      }
      continue;
    }
    next_ = state;
    if (mutex_.state_.compare_exchange_weak(state, this, std::memory_order_release,
                                            std::memory_order_relaxed)) {
      return true;  // published: an unlocker may already be waking us; touch nothing
    }
  }
}

void Mutex::note_holder() noexcept {
  holder_ = self();
  holder_context_.store(aio::current_context(), std::memory_order_relaxed);
}

void Mutex::unlock() noexcept {
  if (state_.load(std::memory_order_relaxed) == unlocked_tag()) {
    base::fatal("coro::Mutex {}: unlock() of a mutex that is not locked", static_cast<void*>(this));
  }
  if (holder_ != self()) {
    base::fatal("coro::Mutex {}: unlock() by a coroutine that does not hold it",
                static_cast<void*>(this));
  }
  holder_ = nullptr;
  holder_context_.store(nullptr, std::memory_order_relaxed);
  if (fifo_ == nullptr) {
    LockAwaiter* expected = nullptr;
    if (state_.compare_exchange_strong(expected, unlocked_tag(), std::memory_order_release,
                                       std::memory_order_relaxed)) {
      return;
    }
    // Waiters arrived: take them all and reverse the stack so the oldest comes first.
    fifo_ = base::reverse_list<&LockAwaiter::next_>(
        state_.exchange(nullptr, std::memory_order_acquire));
  }
  LockAwaiter* next_owner = fifo_;
  fifo_ = next_owner->next_;
  Coroutine* co = next_owner->coroutine_;  // `next_owner` lives in its frame: read it first
  holder_context_.store(co->home(), std::memory_order_relaxed);
  wake_later(co, "coro::Mutex::unlock");
}

}  // namespace spindle::coro
