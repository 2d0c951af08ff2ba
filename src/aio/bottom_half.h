// BottomHalf: a callback bound to one Context that any thread may schedule; it runs once per
// schedule (schedules that arrive before it runs coalesce), always in the Context's own thread,
// inside Context::poll(). Semantics follow reference/qemu-aio.md §1.5.
//
// Thread-safety: schedule(), cancel() and destroy() may be called from any thread. The callback
// runs only in the owning Context's thread, never concurrently with itself. All state lives in
// one atomic flags word (`flags_`); `callback_`, `context_` and `name_` are immutable.
//
//   flags_ bit   set by                       cleared by
//   kPending     schedule (0->1 pushes item)   dispatch, before the callback runs
//   kScheduled   schedule                      dispatch (before the callback), cancel
//   kRunning     dispatch                      dispatch, after the callback returns
//   kDeleted     destroy                       never
//
// Whoever observes "deleted and neither pending nor running" in its own atomic update frees the
// object: destroy() if the BH is idle, dispatch otherwise. A BH that reschedules itself from its
// callback runs again in the *next* poll, not the current one.
//
// Every BH must be destroyed before its Context goes away; a Context torn down with a live BH
// aborts naming it.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>

#include "aio/work_item.h"

namespace spindle::aio {

class Context;

class BottomHalf final : private WorkItem {
 public:
  using Callback = std::function<void()>;

  // `name` must outlive the BH (a string literal); it is printed in leak reports.
  static BottomHalf* create(Context& context, Callback callback, const char* name = "bh");

  // Wait-free apart from the queue push; callable from signal handlers' threads too.
  void schedule() noexcept;
  // Clears a pending schedule; has no effect on a callback that has already started.
  void cancel() noexcept;
  // Cancels and frees, now or (if it is queued or running) once the Context has let go of it.
  // Calling it from the BH's own callback is allowed. The pointer is invalid afterwards.
  void destroy() noexcept;

  const char* name() const noexcept { return label; }
  Context& context() const noexcept { return *context_; }

 private:
  friend class Context;
  static constexpr std::uint32_t kPending = 1;
  static constexpr std::uint32_t kScheduled = 2;
  static constexpr std::uint32_t kRunning = 4;
  static constexpr std::uint32_t kDeleted = 8;

  BottomHalf(Context& context, Callback callback, const char* name);
  ~BottomHalf();
  static bool dispatch(WorkItem* item) noexcept;
  void free() noexcept;

  Context* const context_;
  const Callback callback_;
  std::atomic<std::uint32_t> flags_{0};
  // Registry links, protected by Context::bh_registry_mutex_.
  BottomHalf* registry_prev_ = nullptr;
  BottomHalf* registry_next_ = nullptr;
};

}  // namespace spindle::aio
