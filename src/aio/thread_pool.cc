#include "aio/thread_pool.h"

#include <thread>

#include "base/fatal.h"

namespace spindle::aio {

namespace {

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
    : context_(context), options_(options) {
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

void ThreadPool::enqueue(Job* job) {
  bool signal = false;
  {
    std::lock_guard lock(mutex_);
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
    unfinished_jobs_.fetch_add(1, std::memory_order_relaxed);
    // Every worker that is not running a job takes one queued job before it sleeps (or is asleep
    // and needs the signal below). Increments of busy_workers_ happen under the mutex, so the
    // value read here is never below the truth; a stale higher one at worst starts a worker that
    // was not needed.
    const std::size_t free_workers = workers_ - busy_workers_.load(std::memory_order_relaxed);
    if (free_workers > queued_jobs_++) {
      // notify_one() costs no syscall when nobody waits (the free worker is still awake).
      signal = true;
      signallers_.fetch_add(1, std::memory_order_relaxed);
    } else if (workers_ < options_.max_threads) {
      ++workers_;
      std::thread([this] { worker_loop(); }).detach();
    }
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
    --queued_jobs_;
  }
  context_.post(job);  // completes with -ECANCELED in the context, like any other completion
  return true;
}

void ThreadPool::worker_loop() noexcept {
  std::unique_lock lock(mutex_);
  for (;;) {
    if (queue_head_ == nullptr && !stopping_ &&
        !work_available_.wait_for(lock, options_.idle_timeout,
                                  [&] { return queue_head_ != nullptr || stopping_; })) {
      break;  // idle for too long
    }
    if (queue_head_ == nullptr) break;  // stopping (the queue is empty by then)
    Job* job = queue_head_;
    queue_head_ = job->queue_next_;
    (queue_head_ ? queue_head_->queue_prev_ : queue_tail_) = nullptr;
    job->state_ = Job::State::running;
    --queued_jobs_;
    busy_workers_.fetch_add(1, std::memory_order_relaxed);
    lock.unlock();
    job->execute_(job);
    // Not busy any more: an enqueue() from now on counts on this worker re-checking the queue
    // below instead of starting another one.
    busy_workers_.fetch_sub(1, std::memory_order_relaxed);
    // Posted without the mutex, so the context's thread never waits for it. The job may be freed
    // as soon as the context runs it; this worker (still counted in workers_) keeps the pool alive.
    context_.post(job);
    lock.lock();
  }
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
