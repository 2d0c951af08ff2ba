// Event: a manual-reset event (latch) that any thread may set; coroutines co_await wait() until
// it is set. Once set it stays set (waits complete at once) until reset().
//
// Protocol (one atomic word `state_`, after cppcoro async_manual_reset_event):
//   kSet            set
//   nullptr         not set, nobody waiting
//   Waiter*         not set; LIFO stack of parked waiters
// wait: park, then CAS-push (release) unless it sees kSet (then unpark, don't suspend).
// set:  exchange(kSet, acq_rel) takes the stack; waiters are woken oldest first.
//
// Thread-safety: set()/reset()/is_set() from any thread; wait() from coroutines on any
// context; woken waiters resume in their home contexts (wake_later: never on the setter's stack).
#pragma once

#include <atomic>
#include <coroutine>
#include <cstdint>

#include "coro/coroutine.h"

namespace spindle::coro {

class Event {
 public:
  explicit Event(bool initially_set = false) noexcept
      : state_(initially_set ? set_tag() : nullptr) {}
  ~Event();
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;

  void set() noexcept;
  void reset() noexcept;
  bool is_set() const noexcept { return state_.load(std::memory_order_acquire) == set_tag(); }

  class WaitAwaiter {
   public:
    explicit WaitAwaiter(Event& event) noexcept : event_(event) {}
    bool await_ready() const noexcept { return event_.is_set(); }
    bool await_suspend(std::coroutine_handle<> handle) noexcept;
    void await_resume() const noexcept {}

   private:
    friend class Event;
    Event& event_;
    Coroutine* coroutine_ = nullptr;
    // In the pushed stack: the waiter pushed before this one (older); after set() reverses the
    // stack: the one woken after this one (newer).
    WaitAwaiter* next_ = nullptr;
  };
  WaitAwaiter wait() noexcept { return WaitAwaiter(*this); }

 private:
  static WaitAwaiter* set_tag() noexcept {
    return reinterpret_cast<WaitAwaiter*>(std::uintptr_t{1});
  }
  std::atomic<WaitAwaiter*> state_;
};

}  // namespace spindle::coro
