// ThreadPool: runs blocking functions on worker threads on behalf of one Context, and delivers
// each completion back in that Context's thread (QEMU's thread-pool.c, reference §1.12).
//
//   submit(work, done)           callback style: done(result) runs in the pool's context,
//                                result = work() or -ECANCELED
//   cancel(job)                  a job that has not started is removed and completes with
//                                -ECANCELED; a running job cannot be interrupted
//   enqueue(job)                 a caller-owned Job; coro/run_blocking.h awaits one from a
//                                coroutine (co_await coro::run_blocking(pool, fn))
//
// Workers are started on demand up to `max_threads` and exit after `idle_timeout` without work.
// If no worker exists and none can be started (std::thread fails), submit()/enqueue() run the job
// on the calling thread instead; its completion is still delivered in the context as usual.
// Completions are work items on the context, so they are serialized there.
//
// Waking a sleeping thread costs tens of microseconds on a VM, far more than a page-cache read,
// so the pool wakes as few workers as the queue needs:
//  * a worker that finds the queue empty first spins (one worker at a time), and a job queued
//    while someone spins wakes nobody;
//  * a worker that takes a job as the spinner wakes (or starts) one more if jobs are still
//    queued and nobody else spins, so a stream of short jobs is run by the spinner and whichever
//    workers have just finished a job;
//  * a job left queued for 200 us while no worker took a job or was woken for 200 us means
//    every awake worker is busy with long jobs (disk reads on a cold cache): then a job
//    submitted or taken wakes one more worker (at most one per 200 us), so long jobs spread
//    over as many workers as they need.
// The spin is adaptive, like a Context's busy polling: it starts at `spin`, halves (to nothing
// below 4 us) each time a worker slept longer than `spin` before a job came (a spin that long
// would not have caught it, only burnt a core), and doubles again, up to `spin`, while jobs
// come soon after a worker went to sleep. The sleep is measured to the grant, not to the
// wake-up, whose latency the spin exists to avoid.
//
// Thread-safety: submit() and enqueue() from any thread; cancel() from the pool's context
// thread (a Job handle stays valid until its completion has run there); the destructor once every
// job has completed. Fields and what protects them:
//   queue_head_/tail_, queued_jobs_, Job::state_, Job::queue_*, Job::queued_at_ns_,
//   workers_, sleeping_, spinning_, wakeups_, spin_window_ns_, last_grant_ns_,
//   last_progress_ns_, stopping_                                                     mutex_
//   queued_hint_        atomic copy of queued_jobs_ (stored under mutex_), read by the spinner
//                       without the mutex: a stale value only ends its spin late or early, and
//                       it re-checks the queue under mutex_ before it stops spinning
//   unfinished_jobs_    atomic: incremented under mutex_ by enqueue(), decremented by the
//                       completion in the context thread without the mutex
//   signallers_         atomic: calls between their unlock and their notify_one()
// Job functions, completion posts, spins and condition-variable signals all run without mutex_.
//
// Protocol:
//  * States of a worker: running a job; spinning (awake, no job; spinning_ counts them, and
//    also workers granted a wake-up that have not yet left their wait); asleep on
//    work_available_ (sleeping_). A wake-up is a grant: wake_one() increments wakeups_ and
//    spinning_ on behalf of the sleeper, and a sleeper leaves its wait only by consuming a grant
//    (or at stopping_ / idle timeout), so spurious wake-ups and notify races cannot lose or
//    double-count one. Without a sleeper to grant, wake_one() starts a worker (born spinning)
//    if workers_ < max_threads. A failed start (std::thread throws) undoes both counts; if that
//    leaves workers_ == 0, enqueue() runs the queued jobs itself, on the submitting thread
//    (counted in workers_ meanwhile, so later submits queue behind it). Otherwise the workers
//    that exist take the jobs when they finish theirs. No job is lost and nothing throws.
//  * Long jobs need as many workers as jobs queued, soon, not one more per wake-up: a job still
//    queued after kStarvedNs (200 us), with no job taken and no worker woken in that time
//    (last_progress_ns_), means every awake worker is stuck in a job, so enqueue() then wakes
//    one more even while someone spins, and so does a worker that takes a job while the next
//    one has waited that long. A slow-starting thread or a busy machine, where workers still
//    take short jobs, does not look starved.
//  * enqueue(): under mutex_ links the job; if spinning_ == 0, wake_one(). The invariant that
//    makes this enough: while a job is queued, either some worker is counted in spinning_ (it
//    re-checks the queue under mutex_ before it stops spinning or sleeps), or every worker is
//    running a job (it takes the next queued job under mutex_ when it finishes), or
//    max_threads are running.
//  * A spinner that takes a job leaves spinning_; if jobs remain and spinning_ is now 0 it calls
//    wake_one() (Go's scheduler does the same: one searching thread at a time, each found job
//    recruiting the next).
//  * The notify_one() of a grant is sent after the unlock, so the woken worker does not at once
//    block on a mutex the signaller still holds. The job can run, complete and the pool be
//    destroyed before that notify_one(), so the signaller counts itself in signallers_ under the
//    mutex and uncounts itself after notify_one(); the destructor waits for signallers_ == 0
//    before the condition variable goes away.
//  * worker: takes a job under mutex_ (state running), runs it unlocked, posts the completion
//    unlocked, then re-takes mutex_ for the next job. From the post on it touches only the
//    pool, never the job (its completion may free it). The pool itself stays alive: the worker
//    is counted in workers_ until it leaves under mutex_, and the destructor waits for
//    workers_ == 0, notified under the mutex.
//  * completion (context thread, Job::deliver): reads state_ (written under mutex_ before the
//    post; the context queue's release/acquire publishes it), decrements unfinished_jobs_, then
//    runs the job's completion, which may free the job or the pool.
//  * cancel() (context thread): under mutex_ a queued job is unlinked and marked cancelled; its
//    completion is posted after the unlock. A running job keeps state `running` until delivered.
#pragma once

#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>
#include <utility>

#include "aio/context.h"
#include "aio/work_item.h"

namespace spindle::aio {

class ThreadPool {
 public:
  struct Options {
    std::size_t max_threads = 64;
    std::chrono::milliseconds idle_timeout{10'000};
    // The longest a worker that runs out of jobs spins before sleeping (0: never spins).
    std::chrono::microseconds spin{50};
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
    std::int64_t queued_at_ns_ = 0;  // protected by ThreadPool::mutex_
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

  Context& context() const noexcept { return context_; }
  std::size_t worker_count() const noexcept;

  // Queues a caller-owned job (coro::run_blocking's; the caller keeps it alive until it
  // completed).
  void enqueue(Job* job);

  // Test seam: the next `count` worker starts (in any pool) fail as if std::thread had thrown
  // std::system_error. Any thread.
  static void fail_thread_starts_for_testing(unsigned count) noexcept;

 private:
  void worker_loop() noexcept;
  // Starts a detached thread running worker_loop(); throws what std::thread throws.
  void start_worker_thread();
  // Under mutex_ (released around each job), when no worker exists and none could be started:
  // runs every queued job on the calling thread, counted in workers_ meanwhile.
  void run_queue_on_caller(std::unique_lock<std::mutex>& lock);
  // Under mutex_, at monotonic time `now`: grants a sleeping worker a wake-up, or starts a
  // worker. Returns whether the caller must notify_one() (after unlocking, counted in
  // signallers_).
  bool wake_one(std::int64_t now);
  // Under mutex_: whether the oldest queued job has waited long enough that every awake worker
  // must be busy (see the protocol).
  bool queue_starved(std::int64_t now_ns) const noexcept;
  // Spins without the mutex (held on entry and on return) until a job may be queued or
  // spin_window_ns_ has passed.
  void spin(std::unique_lock<std::mutex>& lock) noexcept;
  // Under mutex_: a worker that slept `slept_ns` until its wake-up grant adjusts the window.
  void adapt_spin_window(std::int64_t slept_ns) noexcept;

  Context& context_;
  const Options options_;
  mutable std::mutex mutex_;
  std::condition_variable work_available_;
  std::condition_variable workers_gone_;
  Job* queue_head_ = nullptr;
  Job* queue_tail_ = nullptr;
  std::size_t workers_ = 0;       // mutex_
  std::size_t queued_jobs_ = 0;   // mutex_
  std::size_t sleeping_ = 0;      // mutex_: workers waiting on work_available_
  std::size_t spinning_ = 0;      // mutex_: awake workers without a job, and granted sleepers
  std::size_t wakeups_ = 0;       // mutex_: grants not yet taken by a sleeper
  std::int64_t spin_window_ns_;      // mutex_: how long the next spin lasts
  std::int64_t last_grant_ns_ = 0;   // mutex_: when wake_one() last granted a wake-up
  std::int64_t last_progress_ns_ = 0;  // mutex_: when a worker last took a job or was woken
  std::atomic<std::size_t> queued_hint_{0};
  std::atomic<std::size_t> unfinished_jobs_{0};
  std::atomic<std::size_t> signallers_{0};
  bool stopping_ = false;  // mutex_
};

}  // namespace spindle::aio
