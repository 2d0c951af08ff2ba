// TimerHeap: a binary min-heap of armed Timers ordered by (deadline, arming sequence), each
// Timer remembering its index so that cancel is O(log n) without searching.
//
// Thread-safety: none of its own; the owning Context guards it with Context::timer_mutex_.
#pragma once

#include <cstdint>
#include <limits>
#include <vector>

#include "aio/timer.h"

namespace spindle::aio {

class TimerHeap {
 public:
  static constexpr std::int64_t kNoDeadline = std::numeric_limits<std::int64_t>::max();

  bool empty() const noexcept { return heap_.empty(); }
  std::int64_t earliest_deadline() const noexcept {
    return heap_.empty() ? kNoDeadline : heap_.front()->deadline_ns_;
  }
  Timer* top() const noexcept { return heap_.front(); }

  void insert(Timer* timer);
  void remove(Timer* timer) noexcept;

 private:
  static bool earlier(const Timer* a, const Timer* b) noexcept {
    return a->deadline_ns_ != b->deadline_ns_ ? a->deadline_ns_ < b->deadline_ns_
                                              : a->sequence_ < b->sequence_;
  }
  void place(std::size_t index, Timer* timer) noexcept {
    heap_[index] = timer;
    timer->heap_index_ = index;
  }
  void sift_up(std::size_t index) noexcept;
  void sift_down(std::size_t index) noexcept;

  std::vector<Timer*> heap_;
};

}  // namespace spindle::aio
