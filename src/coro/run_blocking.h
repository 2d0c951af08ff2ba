// run_blocking: `co_await coro::run_blocking(pool, fn)` runs the blocking function fn() on a
// worker of `pool` (aio::ThreadPool) and resumes the awaiting coroutine in its home context
// with fn's result (nothing for a void fn). The awaiter is the pool job, so nothing is
// allocated per call; fn and its result live in the awaiting coroutine's frame.
//
// Thread-safety: awaited from a coroutine on any context; fn runs on a pool worker (or, when no
// worker can be started, on the awaiting thread, as ThreadPool::enqueue says) and must not touch
// the caller's state concurrently with it. Such jobs are never cancelled.
#pragma once

#include <coroutine>
#include <optional>
#include <type_traits>
#include <utility>

#include "aio/thread_pool.h"
#include "coro/coroutine.h"

namespace spindle::coro {

template <typename Fn>
class RunBlockingAwaiter : private aio::ThreadPool::Job {
  using Result = std::invoke_result_t<Fn&>;
  using Stored = std::conditional_t<std::is_void_v<Result>, bool, Result>;

 public:
  RunBlockingAwaiter(aio::ThreadPool& pool, Fn fn)
      : Job(&RunBlockingAwaiter::execute, &RunBlockingAwaiter::complete),
        pool_(pool),
        fn_(std::move(fn)) {}

  bool await_ready() const noexcept { return false; }
  void await_suspend(std::coroutine_handle<> handle) {
    coroutine_ = park(handle);
    pool_.enqueue(this);  // a worker may finish it at once; the completion wakes us at home
  }
  Result await_resume() {
    if constexpr (!std::is_void_v<Result>) return std::move(*result_);
  }

 private:
  static void execute(Job* job) {
    auto* self = static_cast<RunBlockingAwaiter*>(job);
    if constexpr (std::is_void_v<Result>) {
      self->fn_();
      self->result_.emplace(true);
    } else {
      self->result_.emplace(self->fn_());
    }
  }
  static void complete(Job* job, bool /*cancelled: these jobs are never cancelled*/) {
    wake(static_cast<RunBlockingAwaiter*>(job)->coroutine_, "run_blocking");
  }

  aio::ThreadPool& pool_;
  Fn fn_;
  std::optional<Stored> result_;
  Coroutine* coroutine_ = nullptr;
};

template <typename Fn>
RunBlockingAwaiter<Fn> run_blocking(aio::ThreadPool& pool, Fn fn) {
  return RunBlockingAwaiter<Fn>(pool, std::move(fn));
}

}  // namespace spindle::coro
