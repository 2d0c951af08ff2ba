// McsLock: a fair FIFO queue lock for threads that sleeps on a futex (std::atomic::wait), the
// baseline QEMU's test-aio-multithread compares CoMutex with. Unlike coro::Mutex it blocks the
// whole thread while it waits.
//
// Thread-safety: lock()/unlock() from any thread; each thread uses its own thread_local node,
// so a thread may hold at most one McsLock at a time.
#pragma once

#include <atomic>

namespace spindle::testing_support {

class McsLock {
 public:
  void lock() noexcept {
    Node& me = node();
    me.next.store(nullptr, std::memory_order_relaxed);
    me.locked.store(1, std::memory_order_relaxed);
    Node* previous = tail_.exchange(&me, std::memory_order_acq_rel);
    if (previous == nullptr) return;
    previous->next.store(&me, std::memory_order_release);
    while (me.locked.load(std::memory_order_acquire) != 0) me.locked.wait(1);
  }

  void unlock() noexcept {
    Node& me = node();
    Node* successor = me.next.load(std::memory_order_acquire);
    if (successor == nullptr) {
      Node* expected = &me;
      if (tail_.compare_exchange_strong(expected, nullptr, std::memory_order_acq_rel)) return;
      while ((successor = me.next.load(std::memory_order_acquire)) == nullptr) {
      }
    }
    successor->locked.store(0, std::memory_order_release);
    successor->locked.notify_one();
  }

 private:
  struct alignas(64) Node {
    std::atomic<Node*> next{nullptr};
    std::atomic<int> locked{0};
  };
  static Node& node() noexcept {
    thread_local Node t_node;
    return t_node;
  }
  alignas(64) std::atomic<Node*> tail_{nullptr};
};

}  // namespace spindle::testing_support
