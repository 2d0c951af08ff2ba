#include "coro/event.h"

#include "base/fatal.h"
#include "base/intrusive_list.h"

namespace spindle::coro {

Event::~Event() {
  WaitAwaiter* state = state_.load(std::memory_order_relaxed);
  if (state != nullptr && state != set_tag()) {
    base::fatal("coro::Event {} destroyed with coroutines waiting", static_cast<void*>(this));
  }
}

void Event::set() noexcept {
  WaitAwaiter* stack = state_.exchange(set_tag(), std::memory_order_acq_rel);
  if (stack == set_tag()) return;
  WaitAwaiter* oldest_first = base::reverse_list<&WaitAwaiter::next_>(stack);
  while (oldest_first) {
    WaitAwaiter* next = oldest_first->next_;  // the waiter lives in its frame: read it first
    wake_later(oldest_first->coroutine_, "coro::Event::set");
    oldest_first = next;
  }
}

void Event::reset() noexcept {
  WaitAwaiter* expected = set_tag();
  state_.compare_exchange_strong(expected, nullptr, std::memory_order_relaxed);
}

bool Event::WaitAwaiter::await_suspend(std::coroutine_handle<> handle) noexcept {
  coroutine_ = park(handle);
  WaitAwaiter* state = event_.state_.load(std::memory_order_acquire);
  for (;;) {
    if (state == set_tag()) {
      unpark(coroutine_);
      return false;
    }
    next_ = state;
    if (event_.state_.compare_exchange_weak(state, this, std::memory_order_release,
                                            std::memory_order_acquire)) {
      return true;
    }
  }
}

}  // namespace spindle::coro
