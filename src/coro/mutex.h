// Mutex: a fair coroutine mutex usable by coroutines on any number of contexts at once.
// Strict FIFO with direct hand-off: unlock() passes ownership to the oldest waiter without the
// mutex ever becoming free in between (no barging), and that waiter resumes in *its own* home
// context through wake() — never on the unlocker's stack.
//
// Protocol (one atomic word `state_`, after cppcoro async_mutex / folly coro::Mutex):
//
//   state_ value   meaning
//   ------------   ------------------------------------------------------------------
//   kUnlocked      free
//   nullptr        held; no waiters pushed since the holder last looked
//   Waiter*        held; a LIFO stack of waiters that arrived since the holder last looked
//
//   lock:    CAS kUnlocked -> nullptr (acquire) takes it. Otherwise the coroutine parks, then
//            pushes its Waiter (CAS, release) — unless it sees kUnlocked again, in which case it
//            takes the mutex and does not suspend. The Waiter lives in the suspended frame.
//   unlock:  (only the holder runs it, so `fifo_` needs no lock.) If `fifo_` is empty, CAS
//            nullptr -> kUnlocked (release) frees it; if that fails, new waiters arrived:
//            exchange(nullptr, acquire) takes the whole stack, reversed onto `fifo_`. The head of
//            `fifo_` becomes the owner (state_ stays "held") and is woken.
//
// The release in push/unlock and acquire in lock/exchange order the protected data; the wake
// goes through the waiter's home context queue (release/acquire) or, on the same context, the
// deferred list of the same thread. Optional spinning: a locker that finds the mutex held with
// no waiters, by a holder running on another context, spins up to `spin_limit` iterations for
// it to become free before queueing (the holder cannot progress if it is on our own thread).
//
// Thread-safety: lock()/try_lock() from coroutines on any context; unlock() by the holder
// only (checked). `fifo_` and `holder_` belong to the current holder; `holder_context_` is a
// relaxed hint for spinning.
#pragma once

#include <atomic>
#include <coroutine>
#include <cstdint>
#include <utility>

#include "aio/context.h"
#include "coro/coroutine.h"

namespace spindle::coro {

class Mutex {
 public:
  Mutex() noexcept = default;
  ~Mutex();
  Mutex(const Mutex&) = delete;
  Mutex& operator=(const Mutex&) = delete;

  // Bounded spin before queueing when the holder runs on another context (0 disables).
  void set_spin_limit(unsigned iterations) noexcept { spin_limit_ = iterations; }

  bool try_lock() noexcept;
  void unlock() noexcept;
  bool is_locked() const noexcept {
    return state_.load(std::memory_order_relaxed) != unlocked_tag();
  }

  class LockAwaiter {
   public:
    explicit LockAwaiter(Mutex& mutex) noexcept : mutex_(mutex) {}
    bool await_ready() noexcept { return mutex_.try_lock_or_spin(); }
    bool await_suspend(std::coroutine_handle<> handle) noexcept;
    void await_resume() noexcept { mutex_.note_holder(); }

   protected:
    friend class Mutex;
    Mutex& mutex_;
    Coroutine* coroutine_ = nullptr;
    // In the pushed stack: the waiter pushed before this one (older). In `fifo_`, after the
    // reversal: the one that gets the mutex after this one (newer).
    LockAwaiter* next_ = nullptr;
  };
  // co_await mutex.lock();  ...  mutex.unlock();
  LockAwaiter lock() noexcept { return LockAwaiter(*this); }

  // A guard that unlocks when it goes out of scope: auto guard = co_await mutex.scoped_lock();
  class Guard {
   public:
    explicit Guard(Mutex& mutex) noexcept : mutex_(&mutex) {}
    Guard(Guard&& other) noexcept : mutex_(std::exchange(other.mutex_, nullptr)) {}
    Guard& operator=(Guard&&) = delete;
    ~Guard() {
      if (mutex_) mutex_->unlock();
    }

   private:
    Mutex* mutex_;
  };
  struct ScopedLockAwaiter : LockAwaiter {
    using LockAwaiter::LockAwaiter;
    Guard await_resume() noexcept {
      LockAwaiter::await_resume();
      return Guard(mutex_);
    }
  };
  ScopedLockAwaiter scoped_lock() noexcept { return ScopedLockAwaiter(*this); }

 private:
  static LockAwaiter* unlocked_tag() noexcept {
    return reinterpret_cast<LockAwaiter*>(std::uintptr_t{1});
  }
  bool try_lock_or_spin() noexcept;
  void note_holder() noexcept;

  std::atomic<LockAwaiter*> state_{unlocked_tag()};
  LockAwaiter* fifo_ = nullptr;  // waiters taken from state_, oldest first; holder only
  Coroutine* holder_ = nullptr;  // holder only (for the unlock check)
  std::atomic<aio::Context*> holder_context_{nullptr};
  unsigned spin_limit_ = 0;
};

}  // namespace spindle::coro
