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
// Thread-safety: submit(), run() and enqueue() from any thread; cancel() from the pool's context
// thread (a Job handle stays valid until its completion has run there); the destructor once every
// job has completed. Fields and what protects them:
//   queue_head_/tail_, queued_jobs_, Job::state_, Job::queue_*, workers_, stopping_   mutex_
//   busy_workers_       atomic: incremented under mutex_ when a worker takes a job, decremented
//                       without it when the job function returns (before its completion is
//                       posted); read under mutex_ by enqueue()
//   unfinished_jobs_    atomic: incremented under mutex_ by enqueue(), decremented by the
//                       completion in the context thread without the mutex
//   signallers_         atomic: enqueue() calls between their unlock and their notify_one()
// Job functions, completion posts and condition-variable signals all run without mutex_.
//
// Protocol (the parts that run outside mutex_):
//  * enqueue(): under mutex_ it links the job and decides. Each worker not running a job
//    (workers_ - busy_workers_, including one just started) takes one queued job before it
//    sleeps, or is asleep on work_available_ and must be signalled: if there are more of them
//    than jobs queued before this one, signal; otherwise start a worker (up to max_threads), or
//    leave the job for the first busy worker that finishes. The signal is sent after the unlock, so the
//    woken worker does not at once block on a mutex the signaller still holds. The job can run,
//    complete and the pool be destroyed before that notify_one(), so a signalling enqueue() counts
//    itself in signallers_ under the mutex and uncounts itself after notify_one(); the destructor
//    waits for signallers_ == 0 before the condition variable goes away.
//  * worker: takes a job under mutex_ (state running, ++busy_workers_), runs it unlocked,
//    --busy_workers_, posts the completion unlocked, then re-takes mutex_ for the next job. From
//    the post on it touches only the pool, never the job (its completion may free it). The pool
//    itself stays alive: the worker is counted in workers_ until it leaves under mutex_, and the
//    destructor waits for workers_ == 0, notified under the mutex.
//  * completion (context thread, Job::deliver): reads state_ (written under mutex_ before the
//    post; the context queue's release/acquire publishes it), decrements unfinished_jobs_, then
//    runs the job's completion, which may free the job or the pool.
//  * cancel() (context thread): under mutex_ a queued job is unlinked and marked cancelled; its
//    completion is posted after the unlock. A running job keeps state `running` until delivered.
#pragma once

#include <cerrno>
#include <atomic>
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
    enum class State { queued, running, cancelled };
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

  Context& context_;
  const Options options_;
  mutable std::mutex mutex_;
  std::condition_variable work_available_;
  std::condition_variable workers_gone_;
  Job* queue_head_ = nullptr;
  Job* queue_tail_ = nullptr;
  std::size_t workers_ = 0;                   // mutex_
  std::size_t queued_jobs_ = 0;               // mutex_
  std::atomic<std::size_t> busy_workers_{0};  // see the protocol above
  std::atomic<std::size_t> unfinished_jobs_{0};
  std::atomic<std::size_t> signallers_{0};
  bool stopping_ = false;  // mutex_
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
