#include "coro/queue.h"

namespace spindle::coro {

void Queue::push_back(Waiter* waiter) noexcept {
  waiter->next = nullptr;
  if (tail_) {
    tail_->next = waiter;
  } else {
    head_ = waiter;
  }
  tail_ = waiter;
}

bool Queue::next() noexcept {
  Waiter* waiter = head_;
  if (waiter == nullptr) return false;
  head_ = waiter->next;
  if (head_ == nullptr) tail_ = nullptr;
  wake_later(waiter->coroutine, "coro::Queue::next");
  return true;
}

void Queue::restart_all() noexcept {
  while (next()) {
  }
}

}  // namespace spindle::coro
