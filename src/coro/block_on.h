// block_on(): runs a Task to completion from code that is not a coroutine, and returns its
// result — the blocking wrapper that synchronous callers (tools, tests, main()) use.
//
// Thread-safety: call it from a thread that is not running a coroutine. If `context` is the
// calling thread's current context, or a private context with no dedicated thread, block_on
// polls it until the task is done (other work on it keeps running meanwhile). If another thread
// polls it (an IoThread, or the main thread for main_context()), the task runs there and the
// caller sleeps on a condition variable until it finishes.
#pragma once

#include <atomic>
#include <condition_variable>
#include <mutex>

#include "aio/context.h"
#include "base/fatal.h"
#include "coro/coroutine.h"
#include "coro/task.h"

namespace spindle::coro {

namespace detail {
struct BlockOnWaiter {
  aio::Context* context = nullptr;
  bool other_thread = false;  // the caller sleeps on `finished` instead of polling `context`
  std::atomic<bool> done{false};
  std::mutex mutex;
  std::condition_variable finished;

  static void on_finish(void* argument) noexcept {
    auto* waiter = static_cast<BlockOnWaiter*>(argument);
    if (waiter->other_thread) {
      std::lock_guard lock(waiter->mutex);  // notify under the lock: the waiter may free us next
      waiter->done.store(true, std::memory_order_release);
      waiter->finished.notify_one();
      return;
    }
    // The caller polls `context`. The task may have finished elsewhere (it moved to another
    // context), in which case the caller may be asleep in poll() and needs a notify().
    aio::Context* context = waiter->context;
    if (context->is_current()) {
      waiter->done.store(true, std::memory_order_release);
      return;
    }
    // Once `done` is set the caller may return and drop its context: keep it alive for notify.
    aio::ContextRef keep_alive(context);
    waiter->done.store(true, std::memory_order_release);  // `waiter` may be gone after this
    context->notify();
  }
};
}  // namespace detail

template <typename T>
T block_on(aio::Context& context, Task<T> task) {
  if (in_coroutine()) base::fatal("block_on() called from a coroutine: co_await the task instead");
  detail::BlockOnWaiter waiter;
  waiter.context = &context;
  waiter.other_thread = !context.is_current() && context.has_dedicated_thread();
  auto& promise = task.handle().promise();
  promise.set_finish_hook(&detail::BlockOnWaiter::on_finish, &waiter);
  schedule(context, &promise, "block_on");
  if (waiter.other_thread) {
    std::unique_lock lock(waiter.mutex);
    waiter.finished.wait(lock, [&] { return waiter.done.load(std::memory_order_acquire); });
  } else {
    while (!waiter.done.load(std::memory_order_acquire)) context.poll(true);
  }
  return promise.take_result();  // `task` frees the frame when it goes out of scope
}

// Runs `task` on the calling thread's current context (main_context() on the main thread).
template <typename T>
T block_on(Task<T> task) {
  aio::Context* context = aio::current_context();
  if (context == nullptr) {
    base::fatal("block_on(): this thread has no current context; pass one explicitly");
  }
  return block_on(*context, std::move(task));
}

}  // namespace spindle::coro
