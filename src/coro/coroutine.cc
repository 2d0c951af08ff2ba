#include "coro/coroutine.h"

#include "base/fatal.h"
#include "coro/task.h"

namespace spindle::coro {

namespace detail {

// Consecutive inline symmetric transfers allowed before bouncing through the trampoline. Each
// costs a few hundred bytes of stack when the compiler does not turn it into a tail call.
constexpr int kInlineTransferBudget = 128;

// One level of coroutine resumption on a thread. A level runs a root, then, in FIFO order,
// every root that was deferred while it ran: same-context wakes issued from a coroutine (they
// run right after the waker suspends) and roots bounced by transfer_to(). Draining iteratively
// is what keeps two coroutines waking each other from growing the stack.
struct Trampoline {
  aio::WorkFifo deferred;
  Trampoline* outer;
};

constinit thread_local Coroutine* t_running = nullptr;
constinit thread_local Trampoline* t_trampoline = nullptr;
constinit thread_local int t_transfer_budget = kInlineTransferBudget;

struct CoroutineAccess {
  static Coroutine* from_item(aio::WorkItem* item) noexcept { return static_cast<Coroutine*>(item); }
  static aio::WorkItem* as_item(Coroutine* co) noexcept { return co; }

  static void run_one(Coroutine* co) noexcept {
    if (co->running_.load(std::memory_order_acquire)) {
      base::fatal("coroutine {} resumed while it is still running (publish it only after it "
                  "has suspended: use park() in await_suspend)",
                  static_cast<void*>(co));
    }
    t_running = co;
    t_transfer_budget = kInlineTransferBudget;
    aio::Context* const here = aio::current_context();
    if (co->home_.load(std::memory_order_relaxed) != here) {
      co->home_.store(here, std::memory_order_release);
    }
    co->running_.store(true, std::memory_order_relaxed);
    co->resume_point_.resume();  // `co` may be gone (or running elsewhere) once this returns
  }

  // Runs `co` and everything deferred while it runs, then restores the thread's state.
  static void resume(Coroutine* co) noexcept {
    Trampoline level{{}, t_trampoline};
    t_trampoline = &level;
    Coroutine* const saved_running = t_running;
    const bool saved_flag = aio::detail::t_running_coroutine;
    aio::detail::t_running_coroutine = true;
    run_one(co);
    while (aio::WorkItem* item = level.deferred.pop_front()) {
      Coroutine* next = from_item(item);
      next->scheduled_by_.store(nullptr, std::memory_order_relaxed);
      next->running_.store(false, std::memory_order_relaxed);  // bounced roots are mid-run
      run_one(next);
    }
    aio::detail::t_running_coroutine = saved_flag;
    t_running = saved_running;
    t_trampoline = level.outer;
  }
};

std::coroutine_handle<> transfer_to(std::coroutine_handle<> next) noexcept {
  if (--t_transfer_budget > 0 || t_trampoline == nullptr || t_running == nullptr) return next;
  Coroutine* co = t_running;
  co->resume_point_ = next;
  t_trampoline->deferred.push_back(CoroutineAccess::as_item(co));
  return std::noop_coroutine();
}

void root_finished(Coroutine* co, std::coroutine_handle<> frame) noexcept {
  co->running_.store(false, std::memory_order_release);
  if (co->detached_) {
    frame.destroy();
  } else if (co->finish_hook_) {
    co->finish_hook_(co->finish_argument_);  // may destroy the frame: touch nothing after
  }
}

void claim(Coroutine* co, const char* who) noexcept { co->claim(who); }

void post_claimed(aio::Context& context, Coroutine* co) noexcept {
  co->home_.store(&context, std::memory_order_release);
  context.post(CoroutineAccess::as_item(co));
}

}  // namespace detail

using detail::CoroutineAccess;

void Coroutine::claim(const char* who) noexcept {
  const char* previous = nullptr;
  if (!scheduled_by_.compare_exchange_strong(previous, who, std::memory_order_acq_rel)) {
    base::fatal("{}: coroutine {} was already scheduled by '{}'", who, static_cast<void*>(this),
                previous);
  }
}

bool Coroutine::run_scheduled(aio::WorkItem* item) noexcept {
  Coroutine* co = CoroutineAccess::from_item(item);
  co->scheduled_by_.store(nullptr, std::memory_order_relaxed);
  CoroutineAccess::resume(co);
  return true;
}

Coroutine* self() noexcept { return detail::t_running; }
bool in_coroutine() noexcept { return detail::t_running != nullptr; }

Coroutine* park(std::coroutine_handle<> leaf) noexcept {
  Coroutine* co = detail::t_running;
  if (co == nullptr) base::fatal("park() called outside a coroutine");
  co->resume_point_ = leaf;
  co->running_.store(false, std::memory_order_release);
  return co;
}

void unpark(Coroutine* co) noexcept { co->running_.store(true, std::memory_order_relaxed); }

void enter(Coroutine* co, const char* who) noexcept {
  if (const char* by = co->scheduled_by_.load(std::memory_order_acquire)) {
    base::fatal("{}: entering coroutine {} that was already scheduled by '{}'", who,
                static_cast<void*>(co), by);
  }
  if (co->running_.load(std::memory_order_acquire)) {
    base::fatal("{}: coroutine {} re-entered recursively", who, static_cast<void*>(co));
  }
  CoroutineAccess::resume(co);
}

void schedule(aio::Context& context, Coroutine* co, const char* who) noexcept {
  co->claim(who);
  detail::post_claimed(context, co);
}

void wake(Coroutine* co, const char* who) noexcept {
  aio::Context* home = co->home();
  if (home == nullptr) {
    base::fatal("{}: coroutine {} has no home context (it was created on a thread without "
                "one; start it with spawn(), schedule() or enter())",
                who, static_cast<void*>(co));
  }
  if (home->is_current()) {
    if (detail::t_running != nullptr) {  // from a coroutine: run it once the caller suspends
      if (co == detail::t_running) base::fatal("{}: a coroutine cannot wake itself", who);
      co->claim(who);
      detail::t_trampoline->deferred.push_back(CoroutineAccess::as_item(co));
      return;
    }
    enter(co, who);
    return;
  }
  schedule(*home, co, who);
}

void wake_later(Coroutine* co, const char* who) noexcept {
  if (detail::t_running == nullptr) {
    aio::Context* home = co->home();
    if (home != nullptr && home->is_current()) {
      schedule(*home, co, who);
      return;
    }
  }
  wake(co, who);
}

Coroutine* create(Task<void>&& task) noexcept {
  auto frame = task.release();
  Coroutine* co = &frame.promise();
  co->detached_ = true;
  co->home_.store(aio::current_context(), std::memory_order_relaxed);
  return co;
}

Coroutine* spawn(aio::Context& context, Task<void>&& task) noexcept {
  Coroutine* co = create(std::move(task));
  schedule(context, co, "spawn");
  return co;
}

void YieldAwaiter::await_suspend(std::coroutine_handle<> handle) const noexcept {
  aio::Context* here = aio::current_context();
  if (here == nullptr) base::fatal("yield(): this thread has no context to yield to");
  schedule(*here, park(handle), "yield");
}

void SwitchAwaiter::await_suspend(std::coroutine_handle<> handle) const noexcept {
  schedule(target, park(handle), "switch_to");
}

}  // namespace spindle::coro
