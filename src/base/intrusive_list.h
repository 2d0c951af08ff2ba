// reverse_list<&T::link>(head): reverses a singly linked list in place and returns its new head.
// The lock-free LIFO stacks (aio::RemoteQueue, coro::Mutex, coro::Event) pop all their nodes
// with one atomic exchange, newest first; this turns such a stack into oldest-first order.
//
// Thread-safety: none needed; the caller must own every node (as it does after the exchange).
#pragma once

namespace spindle::base {

template <auto Link, typename T>
T* reverse_list(T* head) noexcept {
  T* reversed = nullptr;
  while (head != nullptr) {
    T* const following = head->*Link;
    head->*Link = reversed;
    reversed = head;
    head = following;
  }
  return reversed;
}

}  // namespace spindle::base
