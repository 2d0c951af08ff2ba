// ThreadPool: runs blocking functions on worker threads on behalf of one Context, and delivers
// each completion back in that Context's thread (QEMU's thread-pool.c, reference §1.12).
//
//   co_await pool.run(fn)        from a coroutine: fn() runs on a worker; the coroutine resumes
//                                in its home context with fn's result
//   submit(work, done)           callback style: done(result) runs in the pool's context,
//                                result = work() or -ECANCELED
//   cancel(job)                  a job that has not started is removed and completes with
//                                -ECANCELED; a running job cannot be interrupted
//
// Workers are started on demand up to `max_threads` and exit after `idle_timeout` without work.
// Completions are work items on the context, so they are serialized there.
//
// Thread-safety: submit() and run() from any thread; cancel() from the pool's context thread
// (a Job handle stays valid until its completion has run there). `mutex_` protects the job
// queue, job states and the worker counts; job functions run without it.
#pragma once

#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <coroutine>
#include <cstddef>
#include <functional>
#include <mutex>
#include <optional>
#include <type_traits>
#include <utility>

#include "aio/context.h"
#include "aio/work_item.h"
#include "coro/coroutine.h"

namespace spindle::aio {

class ThreadPool {
 public:
  struct Options {
    std::size_t max_threads = 64;
    std::chrono::milliseconds idle_timeout{10'000};
  };

  // A unit of work; subclasses say what to run on the worker and what to do on completion.
  class Job : private WorkItem {
   public:
    Job(void (*execute)(Job*), void (*complete)(Job*, bool cancelled)) noexcept
        : WorkItem(&Job::deliver, "thread pool completion"),
          execute_(execute),
          complete_(complete) {}

   private:
    friend class ThreadPool;
    enum class State { queued, running, finished, cancelled };
    static bool deliver(WorkItem* item) noexcept;

    void (*execute_)(Job*);
    void (*complete_)(Job*, bool cancelled);
    ThreadPool* pool_ = nullptr;
    State state_ = State::queued;  // protected by ThreadPool::mutex_
    Job* queue_prev_ = nullptr;    // protected by ThreadPool::mutex_
    Job* queue_next_ = nullptr;
  };

  using Work = std::function<int()>;
  using Completion = std::function<void(int result)>;

  explicit ThreadPool(Context& context, Options options);
  explicit ThreadPool(Context& context) : ThreadPool(context, Options{}) {}
  // Waits for running jobs and for idle workers to exit. Jobs must all have completed.
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  Job* submit(Work work, Completion done = {});
  // Returns true if the job had not started (its completion then reports -ECANCELED).
  bool cancel(Job* job) noexcept;

  template <typename Fn>
  class RunAwaiter;
  template <typename Fn>
  RunAwaiter<Fn> run(Fn fn) {
    return RunAwaiter<Fn>(*this, std::move(fn));
  }

  Context& context() const noexcept { return context_; }
  std::size_t worker_count() const noexcept;

  // Queues a caller-owned job (used by RunAwaiter; the caller keeps it alive until completion).
  void enqueue(Job* job);

 private:
  void worker_loop() noexcept;
  void finish(Job* job, Job::State state) noexcept;

  Context& context_;
  const Options options_;
  mutable std::mutex mutex_;
  std::condition_variable work_available_;
  std::condition_variable workers_gone_;
  Job* queue_head_ = nullptr;
  Job* queue_tail_ = nullptr;
  std::size_t workers_ = 0;
  std::size_t idle_workers_ = 0;
  std::size_t unfinished_jobs_ = 0;
  bool stopping_ = false;
};

template <typename Fn>
class ThreadPool::RunAwaiter : private ThreadPool::Job {
  using Result = std::invoke_result_t<Fn&>;
  using Stored = std::conditional_t<std::is_void_v<Result>, bool, Result>;

 public:
  RunAwaiter(ThreadPool& pool, Fn fn)
      : Job(&RunAwaiter::execute, &RunAwaiter::complete), pool_(pool), fn_(std::move(fn)) {}

  bool await_ready() const noexcept { return false; }
  void await_suspend(std::coroutine_handle<> handle) {
    coroutine_ = coro::park(handle);
    pool_.enqueue(this);  // a worker may finish it at once; the completion wakes us at home
  }
  Result await_resume() {
    if constexpr (!std::is_void_v<Result>) return std::move(*result_);
  }

 private:
  static void execute(Job* job) {
    auto* self = static_cast<RunAwaiter*>(job);
    if constexpr (std::is_void_v<Result>) {
      self->fn_();
      self->result_.emplace(true);
    } else {
      self->result_.emplace(self->fn_());
    }
  }
  static void complete(Job* job, bool /*cancelled: run() jobs are never cancelled*/) {
    coro::wake(static_cast<RunAwaiter*>(job)->coroutine_, "ThreadPool::run");
  }

  ThreadPool& pool_;
  Fn fn_;
  std::optional<Stored> result_;
  coro::Coroutine* coroutine_ = nullptr;
};

}  // namespace spindle::aio
