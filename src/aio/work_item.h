// WorkItem: one unit of work a Context runs in its own thread (a bottom half, a one-shot callback,
// a scheduled coroutine), and WorkFifo, an owner-private FIFO of them.
//
// Thread-safety: a WorkItem is linked into at most one queue at a time; whoever pushed it gives up
// the `next` field until the owning Context has popped it. WorkFifo is not thread-safe: only the
// thread that owns it touches it (a Context's own thread, or a coroutine trampoline's thread).
#pragma once

namespace spindle::aio {

struct WorkItem {
  // Runs the item in the owning context's thread; returns whether it counted as progress
  // (a cancelled bottom half does not).
  using RunFunction = bool (*)(WorkItem*) noexcept;

  explicit WorkItem(RunFunction run_function, const char* item_label) noexcept
      : run(run_function), label(item_label) {}

  WorkItem* next = nullptr;
  RunFunction run;
  const char* label;  // for leak diagnostics: a bottom half's name, "coroutine", ...
};

class WorkFifo {
 public:
  bool empty() const noexcept { return head_ == nullptr; }

  void push_back(WorkItem* item) noexcept {
    item->next = nullptr;
    if (tail_) {
      tail_->next = item;
    } else {
      head_ = item;
    }
    tail_ = item;
  }

  WorkItem* pop_front() noexcept {
    WorkItem* item = head_;
    if (item) {
      head_ = item->next;
      if (!head_) tail_ = nullptr;
      item->next = nullptr;
    }
    return item;
  }

  // Moves every item of `other` to the back of this FIFO, keeping their order.
  void append(WorkFifo& other) noexcept {
    if (other.empty()) return;
    if (tail_) {
      tail_->next = other.head_;
    } else {
      head_ = other.head_;
    }
    tail_ = other.tail_;
    other.head_ = other.tail_ = nullptr;
  }

  WorkItem* front() const noexcept { return head_; }

 private:
  WorkItem* head_ = nullptr;
  WorkItem* tail_ = nullptr;
};

}  // namespace spindle::aio
