// Timer: a callback that runs in its Context's thread, inside Context::poll(), once the chosen
// clock reaches the armed deadline. Arming with an earlier deadline than any other wakes a
// sleeping poll() so it recomputes its timeout.
//
// Thread-safety: arm_at(), arm_in(), cancel() and armed() may be called from any thread; they
// lock the owning Context's timer mutex (Context::timer_mutex_), which protects `deadline_ns_`,
// `sequence_` and `heap_index_`. The callback runs only in the Context's thread. Destroy a Timer
// in the Context's thread, or from elsewhere only when its callback cannot be running; the
// destructor cancels it. cancel() does not stop a callback that has already begun.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>

namespace spindle::aio {

class Context;

enum class Clock { monotonic, realtime };

// Current time of `clock` in nanoseconds (CLOCK_MONOTONIC or CLOCK_REALTIME).
std::int64_t now_ns(Clock clock) noexcept;

class Timer {
 public:
  using Callback = std::function<void()>;

  Timer(Context& context, Clock clock, Callback callback);
  ~Timer();
  Timer(const Timer&) = delete;
  Timer& operator=(const Timer&) = delete;

  // Absolute deadline in nanoseconds of the timer's clock; re-arming replaces the deadline.
  void arm_at(std::int64_t deadline_ns) noexcept;
  void arm_in(std::chrono::nanoseconds delay) noexcept;
  void cancel() noexcept;
  bool armed() const noexcept;

  Clock clock() const noexcept { return clock_; }
  Context& context() const noexcept { return context_; }

 private:
  friend class TimerHeap;
  friend class Context;
  static constexpr std::size_t kNotArmed = static_cast<std::size_t>(-1);

  Context& context_;
  const Clock clock_;
  const Callback callback_;
  std::int64_t deadline_ns_ = 0;
  std::uint64_t sequence_ = 0;  // arming order: equal deadlines fire first-armed first
  std::size_t heap_index_ = kNotArmed;
};

}  // namespace spindle::aio
