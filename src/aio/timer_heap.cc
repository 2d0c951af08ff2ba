#include "aio/timer_heap.h"

namespace spindle::aio {

void TimerHeap::insert(Timer* timer) {
  heap_.push_back(timer);
  timer->heap_index_ = heap_.size() - 1;
  sift_up(heap_.size() - 1);
}

void TimerHeap::remove(Timer* timer) noexcept {
  const std::size_t index = timer->heap_index_;
  Timer* last = heap_.back();
  heap_.pop_back();
  timer->heap_index_ = Timer::kNotArmed;
  if (last == timer) return;
  place(index, last);
  sift_up(index);
  sift_down(last->heap_index_);
}

void TimerHeap::sift_up(std::size_t index) noexcept {
  Timer* timer = heap_[index];
  while (index > 0) {
    const std::size_t parent = (index - 1) / 2;
    if (!earlier(timer, heap_[parent])) break;
    place(index, heap_[parent]);
    index = parent;
  }
  place(index, timer);
}

void TimerHeap::sift_down(std::size_t index) noexcept {
  Timer* timer = heap_[index];
  const std::size_t size = heap_.size();
  for (;;) {
    std::size_t child = 2 * index + 1;
    if (child >= size) break;
    if (child + 1 < size && earlier(heap_[child + 1], heap_[child])) ++child;
    if (!earlier(heap_[child], timer)) break;
    place(index, heap_[child]);
    index = child;
  }
  place(index, timer);
}

}  // namespace spindle::aio
