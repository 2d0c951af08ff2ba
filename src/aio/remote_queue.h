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
//                        A producer that must still touch the consumer after pushing (to kick
//                        it) passes `before_kick`: it runs at most once, before the first CAS
//                        attempted against kArmed, so the producer can pin the consumer before
//                        the item (whose run may free it) becomes visible. A push that returns
//                        true has run it; one that returns false may have run it too (the
//                        consumer woke meanwhile). A push that never saw kArmed must not touch
//                        the consumer afterwards, and pins nothing.
//   drain (consumer):    exchange(head_, nullptr, acquire); reverse the stack into FIFO order.
//                        The acquire pairs with each push's release, so everything a producer
//                        wrote before pushing is visible to the item's run function.
//   arm (consumer):      CAS nullptr -> kArmed (seq_cst). Failure means items arrived: don't sleep.
//   try_disarm (any):    CAS kArmed -> nullptr (seq_cst). The consumer calls it after waking, so
//                        producers stop paying for kicks; Context::notify() and reevaluate()
//                        call it from other threads, and the winner kicks the consumer.
//
// Arm is seq_cst so that it orders with Context::notify()'s seq_cst store of `notified` (a Dekker
// pair: consumer writes head_ then reads notified; notifier writes notified then reads head_).
//
// Thread-safety: push(), try_disarm(), armed() and has_items() from any thread; drain_into() and
// arm() only from the owning Context's thread. No locks; push is lock-free, the rest wait-free.
#pragma once

#include <atomic>
#include <cstdint>

#include "aio/work_item.h"
#include "base/intrusive_list.h"

namespace spindle::aio {

class alignas(64) RemoteQueue {  // a cache line of its own: producers write it, others stay off
 public:
  // Returns true iff the consumer was armed (asleep) and the caller must kick it; before_kick()
  // has then run (once, before the item was published). It may also have run on a false return.
  template <typename BeforeKick>
  bool push(WorkItem* item, BeforeKick&& before_kick) noexcept {
    WorkItem* head = head_.load(std::memory_order_relaxed);
    bool pinned = false;
    for (;;) {
      if (head == armed_tag() && !pinned) {
        before_kick();
        pinned = true;
      }
      item->next = head == armed_tag() ? nullptr : head;
      if (head_.compare_exchange_weak(head, item, std::memory_order_release,
                                      std::memory_order_relaxed)) {
        return head == armed_tag();
      }
    }
  }
  bool push(WorkItem* item) noexcept {
    return push(item, [] {});
  }

  // Moves all pushed items, oldest first, to the back of `out`. Returns whether there were any.
  bool drain_into(WorkFifo& out) noexcept {
    if (!has_items()) return false;
    WorkItem* stack = head_.exchange(nullptr, std::memory_order_acquire);
    if (stack == nullptr || stack == armed_tag()) return false;
    WorkItem* oldest_first = base::reverse_list<&WorkItem::next>(stack);
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
