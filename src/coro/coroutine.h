// Coroutine: a root coroutine with a *home context* — the Context whose thread last resumed it —
// and the operations that resume it (reference/qemu-aio.md §1.8, ARCHITECTURE.md):
//
//   enter(co)           run co now, in this thread, until it suspends (QEMU coroutine_enter)
//   wake(co)            resume co in its home context: inline if called there outside any
//                       coroutine; after the caller suspends if called from a coroutine of the
//                       same context; through the home context's queue from anywhere else
//   schedule(ctx, co)   make co run next on ctx (and make ctx its home)
//   spawn(ctx, task)    start a Task as a new detached root on ctx
//   co_await switch_to(ctx) / yield() / suspend()   (see awaitables below)
//
// Each suspended coroutine has at most one pending resumption: scheduling or entering a
// coroutine that is already scheduled aborts with a message naming both callers.
//
// Thread-safety: enter() only from a thread with a current Context (or any thread for a
// coroutine that has never run); wake()/schedule() from any thread. A Coroutine's fields:
//   home_, scheduled_by_, running_   atomics; the claim on scheduled_by_ (CAS from null) is what
//                                    gives one party the right to resume it. home_ is written by
//                                    the resuming thread, and by schedule() from any thread, but
//                                    only by the claim's holder while the coroutine is suspended
//   resume_point_, detached_          written only by the thread running the coroutine, read by
//                                    the resuming thread after the claim/queue hand-off
// Every Task promise derives from Coroutine, so a root costs no extra allocation.
#pragma once

#include <atomic>
#include <coroutine>

#include "aio/context.h"
#include "aio/work_item.h"

namespace spindle::coro {

template <typename T>
class Task;
class Coroutine;
namespace detail {
struct CoroutineAccess;
class PromiseBase;
std::coroutine_handle<> transfer_to(std::coroutine_handle<> next) noexcept;
void root_finished(Coroutine* co, std::coroutine_handle<> frame) noexcept;
void claim(Coroutine* co, const char* who) noexcept;
void post_claimed(aio::Context& context, Coroutine* co) noexcept;
}  // namespace detail

class Coroutine : private aio::WorkItem {
 public:
  aio::Context* home() const noexcept { return home_.load(std::memory_order_acquire); }
  // True while the coroutine runs (entered and not suspended).
  bool entered() const noexcept { return running_.load(std::memory_order_relaxed); }
  // Who holds the pending resumption, or null.
  const char* scheduled_by() const noexcept {
    return scheduled_by_.load(std::memory_order_relaxed);
  }

  using FinishHook = void (*)(void* argument) noexcept;

 protected:
  Coroutine() noexcept : WorkItem(&Coroutine::run_scheduled, "coroutine") {}
  ~Coroutine() = default;

 private:
  friend struct detail::CoroutineAccess;
  friend class detail::PromiseBase;
  friend std::coroutine_handle<> detail::transfer_to(std::coroutine_handle<> next) noexcept;
  friend void detail::root_finished(Coroutine* co, std::coroutine_handle<> frame) noexcept;
  friend Coroutine* park(std::coroutine_handle<> leaf) noexcept;
  friend void unpark(Coroutine* co) noexcept;
  friend void enter(Coroutine* co, const char* who) noexcept;
  friend void schedule(aio::Context& context, Coroutine* co, const char* who) noexcept;
  friend void wake(Coroutine* co, const char* who) noexcept;
  friend Coroutine* create(Task<void>&& task) noexcept;
  friend void detail::claim(Coroutine* co, const char* who) noexcept;
  friend void detail::post_claimed(aio::Context& context, Coroutine* co) noexcept;

  static bool run_scheduled(aio::WorkItem* item) noexcept;
  void claim(const char* who) noexcept;

  std::atomic<aio::Context*> home_{nullptr};
  std::atomic<const char*> scheduled_by_{nullptr};
  std::atomic<bool> running_{false};
  std::coroutine_handle<> resume_point_;
  bool detached_ = false;
  FinishHook finish_hook_ = nullptr;  // non-detached roots: told when the root finishes
  void* finish_argument_ = nullptr;
};

// Runs `co` in this thread until it suspends or finishes; its home becomes current_context().
void enter(Coroutine* co, const char* who = __builtin_FUNCTION()) noexcept;
// Queues `co` to run on `context`, which becomes its home. `co` must be suspended, or be the
// running coroutine scheduling itself on its own home context before it suspends.
void schedule(aio::Context& context, Coroutine* co, const char* who = __builtin_FUNCTION()) noexcept;
// Resumes a suspended `co` in its home context (see the table at the top of this file).
void wake(Coroutine* co, const char* who = __builtin_FUNCTION()) noexcept;

// Like wake(), but never resumes `co` on the caller's stack: called outside coroutines on the
// home thread, it queues `co` on the home context instead of entering it. Synchronization
// primitives use it so that a waker holding a lock cannot be re-entered by the woken coroutine
// (reference/qemu-aio.md §5.19).
void wake_later(Coroutine* co, const char* who = __builtin_FUNCTION()) noexcept;

// The running root coroutine of this thread, or null outside coroutines.
Coroutine* self() noexcept;
bool in_coroutine() noexcept;

// For awaiters: records that the running coroutine is suspending at `leaf` (the handle passed to
// await_suspend) and returns it, so that a later wake()/schedule() resumes it there. Call it in
// await_suspend before publishing the coroutine to anyone, then touch nothing of the frame.
Coroutine* park(std::coroutine_handle<> leaf) noexcept;
// Undoes park() for an awaiter that finds, after parking, that it need not suspend after all
// (await_suspend returns false). Only valid if nobody else can have seen the coroutine.
void unpark(Coroutine* co) noexcept;

// Turns `task` into a detached root (freed when it finishes) that has not started yet. Its home
// is the creating thread's current context until it first runs.
Coroutine* create(Task<void>&& task) noexcept;
// create() + schedule(context, ...): the task starts during a later poll of `context`.
Coroutine* spawn(aio::Context& context, Task<void>&& task) noexcept;

namespace detail {
// For awaiters that own a coroutine's resumption themselves (sleep): claim() takes the right to
// resume it, so that any other wake()/schedule() meanwhile aborts naming `who`; post_claimed()
// later queues it on `context`, which releases the claim as it resumes it.
void claim(Coroutine* co, const char* who) noexcept;
void post_claimed(aio::Context& context, Coroutine* co) noexcept;
}  // namespace detail

// detail::transfer_to(next): symmetric transfer with a bounded inline depth. It returns `next`,
// or, once a budget of consecutive inline transfers is spent, parks the running root at `next`
// in the trampoline's queue and returns noop_coroutine(): g++ drops the tail call at -O0 and
// under sanitizers, so unbounded chains of synchronously completing awaits would overflow the
// stack. detail::root_finished(co, frame): a root's final suspend; frees detached roots.

// ---- awaitables ---------------------------------------------------------------------------

// co_await suspend(): parks the coroutine and returns to whoever entered or woke it. Someone
// must later wake() or enter() it (QEMU qemu_coroutine_yield).
struct SuspendAwaiter {
  bool await_ready() const noexcept { return false; }
  void await_suspend(std::coroutine_handle<> handle) const noexcept { park(handle); }
  void await_resume() const noexcept {}
};
inline SuspendAwaiter suspend() noexcept { return {}; }

// co_await yield(): lets the home context run everything else that is ready, then continues.
struct YieldAwaiter {
  bool await_ready() const noexcept { return false; }
  void await_suspend(std::coroutine_handle<> handle) const noexcept;
  void await_resume() const noexcept {}
};
inline YieldAwaiter yield() noexcept { return {}; }

// co_await switch_to(ctx): continues on ctx's thread; ctx becomes the coroutine's home.
struct SwitchAwaiter {
  aio::Context& target;
  bool await_ready() const noexcept { return target.is_current(); }
  void await_suspend(std::coroutine_handle<> handle) const noexcept;
  void await_resume() const noexcept {}
};
inline SwitchAwaiter switch_to(aio::Context& context) noexcept { return {context}; }

}  // namespace spindle::coro
