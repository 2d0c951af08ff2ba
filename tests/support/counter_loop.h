// CounterLoop: QEMU's test-aio-multithread mutex loop, shared by tests/coro/mutex_test.cc and
// bench/io_bench.cc. One coroutine per IoThread runs body(): lock; counter++; unlock;
// atomic_counter++ until `stopping` is set. atomic_counter is incremented after the unlock, as
// in QEMU (inside, the IoThread could exit before the woken coroutine ran), so at the end
// counter == atomic_counter proves mutual exclusion. `Lock` is coro::Mutex (awaited) or any
// thread lock (std::mutex, McsLock), which then blocks the IoThread.
//
// Thread-safety: `counter` is protected by `lock`; every other field is atomic. The owner sets
// `running` to the number of coroutines before starting them and waits for it to reach zero.
#pragma once

#include <atomic>
#include <thread>
#include <type_traits>

#include "coro/mutex.h"
#include "coro/task.h"
#include "support/thread_identity.h"

namespace spindle::testing_support {

template <typename Lock>
struct CounterLoop {
  Lock lock;
  long counter = 0;  // protected by `lock`
  std::atomic<long> atomic_counter{0};
  std::atomic<bool> stopping{false};
  std::atomic<int> started{0};
  std::atomic<int> running{0};
  std::atomic<long> wrong_thread{0};  // a coro::Mutex waiter resumed outside its home thread

  coro::Task<void> body(std::thread::id home_thread) {
    started.fetch_add(1);
    while (!stopping.load(std::memory_order_relaxed)) {
      if constexpr (std::is_same_v<Lock, coro::Mutex>) {
        co_await lock.lock();
      } else {
        lock.lock();
      }
      if (this_thread_id() != home_thread) wrong_thread.fetch_add(1, std::memory_order_relaxed);
      ++counter;
      lock.unlock();
      atomic_counter.fetch_add(1, std::memory_order_relaxed);
    }
    running.fetch_sub(1);
  }
};

}  // namespace spindle::testing_support
