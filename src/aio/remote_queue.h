// RemoteQueue: the lock-free multi-producer, single-consumer queue through which every thread
// hands work to a Context, with the "is the consumer asleep?" bit folded into the same word.
//
// Protocol (one atomic word, `head_`; see reference/cpp-anchors.md §4.4):
//
//   head_ value      meaning
//   -----------      -------------------------------------------------------------
//   nullptr          empty, consumer awake (it will look at the queue again soon)
//   kArmed           empty, consumer is about to sleep or sleeping: a producer must wake it
//   WorkItem*        a LIFO stack of pushed items (the consumer is awake or already woken)
//
//   push (any thread):   CAS head_ from h to item (item->next = h, or nullptr if h == kArmed),
//                        release. It returns true iff h was kArmed: exactly that producer, and
//                        no other, must kick the consumer's eventfd. Later producers see a list.
//   drain (consumer):    exchange(head_, nullptr, acquire); reverse the stack into FIFO order.
//                        The acquire pairs with each push's release, so everything a producer
//                        wrote before pushing is visible to the item's run function.
//   arm (consumer):      CAS nullptr -> kArmed (seq_cst). Failure means items arrived: don't sleep.
//   disarm (consumer):   CAS kArmed -> nullptr after waking, so producers stop paying for kicks.
//   try_disarm (notify): the same CAS from any thread; the winner kicks the consumer.
//
// Arm is seq_cst so that it orders with Context::notify()'s seq_cst store of `notified` (a Dekker
// pair: consumer writes head_ then reads notified; notifier writes notified then reads head_).
//
// Thread-safety: push() and try_disarm() from any thread; drain_into(), arm(), disarm() only from
// the owning Context's thread. No locks; push is lock-free, the rest wait-free.
#pragma once

#include <atomic>
#include <cstdint>

#include "aio/work_item.h"

namespace spindle::aio {

class alignas(64) RemoteQueue {  // a cache line of its own: producers write it, others stay off
 public:
  // Returns true iff the consumer was armed (asleep) and the caller must kick it.
  bool push(WorkItem* item) noexcept {
    WorkItem* head = head_.load(std::memory_order_relaxed);
    for (;;) {
      item->next = head == armed_tag() ? nullptr : head;
      if (head_.compare_exchange_weak(head, item, std::memory_order_release,
                                      std::memory_order_relaxed)) {
        return head == armed_tag();
      }
    }
  }

  // Moves all pushed items, oldest first, to the back of `out`. Returns whether there were any.
  bool drain_into(WorkFifo& out) noexcept {
    if (!has_items()) return false;
    WorkItem* stack = head_.exchange(nullptr, std::memory_order_acquire);
    if (stack == nullptr || stack == armed_tag()) return false;
    WorkItem* oldest_first = nullptr;
    while (stack) {  // reverse the LIFO stack
      WorkItem* next = stack->next;
      stack->next = oldest_first;
      oldest_first = stack;
      stack = next;
    }
    while (oldest_first) {
      WorkItem* next = oldest_first->next;
      out.push_back(oldest_first);
      oldest_first = next;
    }
    return true;
  }

  bool has_items() const noexcept {
    WorkItem* head = head_.load(std::memory_order_relaxed);
    return head != nullptr && head != armed_tag();
  }

  bool arm() noexcept {
    WorkItem* expected = nullptr;
    return head_.compare_exchange_strong(expected, armed_tag(), std::memory_order_seq_cst);
  }

  bool armed() const noexcept { return head_.load(std::memory_order_seq_cst) == armed_tag(); }

  // Returns true iff this call moved the queue from armed to awake (the caller must kick).
  bool try_disarm() noexcept {
    WorkItem* expected = armed_tag();
    return head_.compare_exchange_strong(expected, nullptr, std::memory_order_seq_cst);
  }

 private:
  static WorkItem* armed_tag() noexcept { return reinterpret_cast<WorkItem*>(std::uintptr_t{1}); }

  std::atomic<WorkItem*> head_{nullptr};
};

}  // namespace spindle::aio
