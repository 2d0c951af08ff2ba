#include "aio/thread_pool.h"

#include <algorithm>
#include <system_error>
#include <thread>

#include "aio/timer.h"
#include "base/cpu_relax.h"
#include "base/fatal.h"

namespace spindle::aio {

namespace {

std::atomic<unsigned> failing_thread_starts{0};  // fail_thread_starts_for_testing()

// A callback-style job: owns its functions and frees itself after completing.
class CallbackJob final : public ThreadPool::Job {
 public:
  CallbackJob(ThreadPool::Work work, ThreadPool::Completion done)
      : Job(&CallbackJob::execute, &CallbackJob::complete),
        work_(std::move(work)),
        done_(std::move(done)) {}

 private:
  static void execute(Job* job) {
    auto* self = static_cast<CallbackJob*>(job);
    self->result_ = self->work_();
  }
  static void complete(Job* job, bool cancelled) {
    auto* self = static_cast<CallbackJob*>(job);
    if (self->done_) self->done_(cancelled ? -ECANCELED : self->result_);
    delete self;
  }

  ThreadPool::Work work_;
  ThreadPool::Completion done_;
  int result_ = 0;
};

}  // namespace

ThreadPool::ThreadPool(Context& context, Options options)
    : context_(context),
      options_(options),
      spin_window_ns_(std::chrono::nanoseconds(options.spin).count()) {
  if (options_.max_threads == 0) base::fatal("ThreadPool: max_threads must be at least 1");
}

ThreadPool::~ThreadPool() {
  if (const std::size_t unfinished = unfinished_jobs_.load(std::memory_order_acquire)) {
    base::fatal("ThreadPool destroyed with {} jobs not completed", unfinished);
  }
  std::unique_lock lock(mutex_);
  stopping_ = true;
  work_available_.notify_all();
  workers_gone_.wait(lock, [&] { return workers_ == 0; });
  lock.unlock();
  // An enqueue() whose job has already run and completed may still be about to notify_one():
  // wait for it before the condition variable goes away (a window of a few instructions).
  while (signallers_.load(std::memory_order_acquire) != 0) std::this_thread::yield();
}

std::size_t ThreadPool::worker_count() const noexcept {
  std::lock_guard lock(mutex_);
  return workers_;
}

ThreadPool::Job* ThreadPool::submit(Work work, Completion done) {
  auto* job = new CallbackJob(std::move(work), std::move(done));
  enqueue(job);
  return job;
}

bool ThreadPool::wake_one(std::int64_t now) {
  last_progress_ns_ = now;  // hands are on the way
  if (sleeping_ > wakeups_) {
    ++wakeups_;
    last_grant_ns_ = now;
    ++spinning_;  // on the sleeper's behalf: later jobs need not wake another
    signallers_.fetch_add(1, std::memory_order_relaxed);
    return true;
  }
  if (workers_ < options_.max_threads) {
    ++workers_;
    ++spinning_;  // born looking for a job
    try {
      start_worker_thread();
    } catch (const std::exception&) {
      // No thread: undo, so the invariant (a queued job has a spinner, a busy worker or
      // max_threads running) does not count a worker that does not exist. enqueue() runs the
      // queue itself if no worker is left at all.
      --workers_;
      --spinning_;
    }
  }
  return false;
}

void ThreadPool::run_queue_on_caller(std::unique_lock<std::mutex>& lock) {
  ++workers_;  // counted like a worker: keeps the pool alive and lets enqueue()s queue on us
  // Until the queue is empty, jobs queued meanwhile included: they found us counted as the
  // worker and nobody else would take them. (Only when no thread at all could be started.)
  while (Job* job = queue_head_) {
    queue_head_ = job->queue_next_;
    (queue_head_ ? queue_head_->queue_prev_ : queue_tail_) = nullptr;
    job->state_ = Job::State::running;
    queued_hint_.store(--queued_jobs_, std::memory_order_relaxed);
    last_progress_ns_ = now_ns(Clock::monotonic);
    lock.unlock();
    job->execute_(job);
    context_.post(job);  // may be freed from here on
    lock.lock();
  }
  --workers_;
  workers_gone_.notify_all();
}

void ThreadPool::fail_thread_starts_for_testing(unsigned count) noexcept {
  failing_thread_starts.store(count, std::memory_order_relaxed);
}

void ThreadPool::start_worker_thread() {
  unsigned failing = failing_thread_starts.load(std::memory_order_relaxed);
  while (failing > 0 && !failing_thread_starts.compare_exchange_weak(
                            failing, failing - 1, std::memory_order_relaxed)) {
  }
  if (failing > 0) {
    throw std::system_error(std::make_error_code(std::errc::resource_unavailable_try_again),
                            "ThreadPool: test hook failed the thread start");
  }
  std::thread([this] { worker_loop(); }).detach();
}

bool ThreadPool::queue_starved(std::int64_t now) const noexcept {
  constexpr std::int64_t kStarvedNs = 200'000;
  return queue_head_ != nullptr && now - queue_head_->queued_at_ns_ > kStarvedNs &&
         now - last_progress_ns_ > kStarvedNs;
}

void ThreadPool::enqueue(Job* job) {
  bool signal = false;
  const std::int64_t now = now_ns(Clock::monotonic);
  {
    std::unique_lock lock(mutex_);
    const bool starved = queue_starved(now);  // before this job joins the queue
    job->queued_at_ns_ = now;
    job->pool_ = this;
    job->state_ = Job::State::queued;
    job->queue_next_ = nullptr;
    job->queue_prev_ = queue_tail_;
    if (queue_tail_) {
      queue_tail_->queue_next_ = job;
    } else {
      queue_head_ = job;
    }
    queue_tail_ = job;
    queued_hint_.store(++queued_jobs_, std::memory_order_relaxed);
    unfinished_jobs_.fetch_add(1, std::memory_order_relaxed);
    if (spinning_ == 0 || starved) signal = wake_one(now);  // else the spinner takes it
    // No worker and none could be started (the thread limit): run the queue on this thread.
    if (workers_ == 0) run_queue_on_caller(lock);
  }
  if (signal) {
    work_available_.notify_one();
    signallers_.fetch_sub(1, std::memory_order_release);  // the last touch of the pool
  }
}

bool ThreadPool::cancel(Job* job) noexcept {
  {
    std::lock_guard lock(mutex_);
    if (job->state_ != Job::State::queued) return false;
    (job->queue_prev_ ? job->queue_prev_->queue_next_ : queue_head_) = job->queue_next_;
    (job->queue_next_ ? job->queue_next_->queue_prev_ : queue_tail_) = job->queue_prev_;
    job->state_ = Job::State::cancelled;
    queued_hint_.store(--queued_jobs_, std::memory_order_relaxed);
  }
  context_.post(job);  // completes with -ECANCELED in the context, like any other completion
  return true;
}

void ThreadPool::adapt_spin_window(std::int64_t slept_ns) noexcept {
  constexpr std::int64_t kInitialSpinNs = 4000;
  const std::int64_t max_ns = std::chrono::nanoseconds(options_.spin).count();
  if (slept_ns > max_ns) {  // halve, so that one late job (a preempted client) costs little
    spin_window_ns_ = spin_window_ns_ / 2 < kInitialSpinNs ? 0 : spin_window_ns_ / 2;
  } else if (slept_ns > spin_window_ns_) {  // a longer spin would have caught this job
    spin_window_ns_ =
        spin_window_ns_ == 0 ? kInitialSpinNs : std::min(spin_window_ns_ * 2, max_ns);
  }
}

void ThreadPool::spin(std::unique_lock<std::mutex>& lock) noexcept {
  const std::int64_t end = now_ns(Clock::monotonic) + spin_window_ns_;
  lock.unlock();
  for (unsigned iteration = 1; queued_hint_.load(std::memory_order_relaxed) == 0; ++iteration) {
    if (iteration % 64 == 0 && now_ns(Clock::monotonic) >= end) break;
    base::cpu_relax();
  }
  lock.lock();
}

void ThreadPool::worker_loop() noexcept {
  std::unique_lock lock(mutex_);
  bool spinning = true;  // wake_one() counted this worker in spinning_
  bool spun = false;     // since the last job
  for (;;) {
    if (Job* job = queue_head_) {
      queue_head_ = job->queue_next_;
      (queue_head_ ? queue_head_->queue_prev_ : queue_tail_) = nullptr;
      job->state_ = Job::State::running;
      queued_hint_.store(--queued_jobs_, std::memory_order_relaxed);
      bool signal = false;
      const std::int64_t now = now_ns(Clock::monotonic);
      const bool waited_long = queued_jobs_ > 0 && queue_starved(now);
      last_progress_ns_ = now;
      if (spinning) {
        spinning = false;
        // The last searcher found work: recruit another while jobs are left.
        if (--spinning_ == 0 && queued_jobs_ > 0) signal = wake_one(now);
      }
      if (!signal && waited_long) signal = wake_one(now);  // long jobs: more hands
      lock.unlock();
      if (signal) {
        work_available_.notify_one();
        signallers_.fetch_sub(1, std::memory_order_release);
      }
      job->execute_(job);
      // Posted without the mutex, so the context's thread never waits for it. The job may be
      // freed as soon as the context runs it; this worker (still counted in workers_) keeps the
      // pool alive.
      context_.post(job);
      spun = false;
      lock.lock();
      continue;
    }
    if (stopping_) break;
    // The queue is empty. Spin first (one worker at a time), then sleep.
    if (!spinning && !spun && spinning_ == 0 && spin_window_ns_ > 0) {
      spinning = true;
      ++spinning_;
    }
    if (spinning && !spun && spin_window_ns_ > 0) {
      spun = true;
      spin(lock);
      continue;  // takes a job that arrived, or comes back here to sleep
    }
    if (spinning) {
      spinning = false;
      --spinning_;  // under mutex_ and with the queue seen empty: enqueue() wakes someone now
    }
    ++sleeping_;
    const std::int64_t slept_at = options_.spin.count() > 0 ? now_ns(Clock::monotonic) : 0;
    const bool granted = work_available_.wait_for(
        lock, options_.idle_timeout, [&] { return wakeups_ > 0 || stopping_; });
    --sleeping_;
    if (granted && wakeups_ > 0) {
      --wakeups_;
      if (options_.spin.count() > 0) adapt_spin_window(last_grant_ns_ - slept_at);
      spinning = true;  // wake_one() counted us in spinning_
      spun = false;
      continue;
    }
    if (!granted && queue_head_ == nullptr) break;  // idle for too long
  }
  if (spinning) --spinning_;
  --workers_;
  // Notify under the lock: the destructor may free the pool once it sees zero workers.
  workers_gone_.notify_all();
}

bool ThreadPool::Job::deliver(WorkItem* item) noexcept {
  auto* job = static_cast<Job*>(item);
  // The state was set under the pool mutex before the post; the queue's release/acquire makes
  // it visible here, and nothing writes it again.
  const bool cancelled = job->state_ == State::cancelled;
  // Before the completion, which may destroy the pool; no mutex: the destructor only reads it.
  job->pool_->unfinished_jobs_.fetch_sub(1, std::memory_order_release);
  job->complete_(job, cancelled);  // may free the job, or even the pool: touch neither after
  return true;
}

}  // namespace spindle::aio
