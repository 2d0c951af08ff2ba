#include "aio/bottom_half.h"

#include "aio/context.h"
#include "base/fatal.h"

namespace spindle::aio {

BottomHalf* BottomHalf::create(Context& context, Callback callback, const char* name) {
  auto* bh = new BottomHalf(context, std::move(callback), name);
  context.register_bottom_half(bh);
  return bh;
}

BottomHalf::BottomHalf(Context& context, Callback callback, const char* name)
    : WorkItem(&BottomHalf::dispatch, name), context_(&context), callback_(std::move(callback)) {}

BottomHalf::~BottomHalf() = default;

void BottomHalf::free() noexcept {
  context_->unregister_bottom_half(this);
  delete this;
}

void BottomHalf::schedule() noexcept {
  const std::uint32_t old = flags_.fetch_or(kPending | kScheduled, std::memory_order_acq_rel);
  if (old & kDeleted) base::fatal("bottom half '{}' scheduled after destroy()", name());
  if (!(old & kPending)) context_->post(this);
}

void BottomHalf::cancel() noexcept { flags_.fetch_and(~kScheduled, std::memory_order_acq_rel); }

void BottomHalf::destroy() noexcept {
  std::uint32_t old = flags_.load(std::memory_order_relaxed);
  std::uint32_t desired;
  do {
    desired = (old & ~kScheduled) | kDeleted;
  } while (!flags_.compare_exchange_weak(old, desired, std::memory_order_acq_rel,
                                         std::memory_order_relaxed));
  if (!(old & (kPending | kRunning))) free();  // idle: nobody else holds it
}

bool BottomHalf::dispatch(WorkItem* item) noexcept {
  auto* bh = static_cast<BottomHalf*>(item);
  std::uint32_t old = bh->flags_.load(std::memory_order_relaxed);
  std::uint32_t desired;
  do {
    desired = old & ~(kPending | kScheduled);
    if ((old & kScheduled) && !(old & kDeleted)) desired |= kRunning;
  } while (!bh->flags_.compare_exchange_weak(old, desired, std::memory_order_acquire,
                                             std::memory_order_relaxed));
  if (old & kDeleted) {  // destroyed while queued: we held the last reference
    bh->free();
    return false;
  }
  if (!(desired & kRunning)) return false;  // cancelled
  bh->callback_();
  old = bh->flags_.fetch_and(~kRunning, std::memory_order_acq_rel);
  if (old & kDeleted) {
    // destroy() ran during the callback and left freeing to us, unless the BH was rescheduled
    // first, in which case the queued entry will free it.
    if (!(old & kPending)) bh->free();
  }
  return true;
}

}  // namespace spindle::aio
