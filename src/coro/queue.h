// Queue: a FIFO of coroutines waiting for a condition (QEMU's CoQueue): a condition variable
// for coroutines. The caller supplies the lock that protects both the condition and the queue:
// a coro::Mutex, or any BasicLockable (std::mutex, ...) for state also touched outside
// coroutines. There is no wait morphing: a woken waiter re-acquires the lock like anyone else.
//
// Thread-safety: every call must be made with the associated lock held (wait() releases it
// while suspended and re-acquires it before returning). next()/restart_all() may be called from
// any thread that holds the lock, coroutine or not; woken coroutines resume in their own home
// context via wake_later() (never on the waker's stack, so holding a std::mutex while calling
// next() is safe). A waiter is parked before it becomes visible, so no wake-up is lost.
#pragma once

#include <coroutine>
#include <type_traits>

#include "coro/coroutine.h"
#include "coro/mutex.h"
#include "coro/task.h"

namespace spindle::coro {

class Queue {
 public:
  Queue() noexcept = default;
  Queue(const Queue&) = delete;
  Queue& operator=(const Queue&) = delete;

  // Appends the calling coroutine, releases `lock`, suspends until next()/restart_all(), then
  // re-acquires `lock`. Use it in a loop that re-checks the condition.
  template <typename Lock>
  Task<void> wait(Lock& lock) {
    co_await WaitAwaiter<Lock>{*this, lock};
    if constexpr (std::is_same_v<Lock, Mutex>) {
      co_await lock.lock();
    } else {
      lock.lock();
    }
  }

  // Wakes the oldest waiter; returns whether there was one.
  bool next() noexcept;
  // Wakes every waiter, oldest first.
  void restart_all() noexcept;
  bool empty() const noexcept { return head_ == nullptr; }

 private:
  struct Waiter {
    Coroutine* coroutine = nullptr;
    Waiter* next = nullptr;
  };

  template <typename Lock>
  struct WaitAwaiter {
    Queue& queue;
    Lock& lock;
    Waiter waiter{};
    bool await_ready() const noexcept { return false; }
    void await_suspend(std::coroutine_handle<> handle) noexcept {
      waiter.coroutine = park(handle);
      queue.push_back(&waiter);
      lock.unlock();  // from here a waker may resume us; touch nothing
    }
    void await_resume() const noexcept {}
  };

  void push_back(Waiter* waiter) noexcept;

  Waiter* head_ = nullptr;  // protected by the caller's lock
  Waiter* tail_ = nullptr;
};

}  // namespace spindle::coro
