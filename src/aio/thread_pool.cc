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
  std::unique_lock lock(mutex_);
  if (unfinished_jobs_ != 0) {
    base::fatal("ThreadPool destroyed with {} jobs not completed", unfinished_jobs_);
  }
  stopping_ = true;
  work_available_.notify_all();
  workers_gone_.wait(lock, [&] { return workers_ == 0; });
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
  std::unique_lock lock(mutex_);
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
  ++unfinished_jobs_;
  if (idle_workers_ > 0) {
    work_available_.notify_one();
  } else if (workers_ < options_.max_threads) {
    ++workers_;
    std::thread([this] { worker_loop(); }).detach();
  }
}

bool ThreadPool::cancel(Job* job) noexcept {
  {
    std::lock_guard lock(mutex_);
    if (job->state_ != Job::State::queued) return false;
    (job->queue_prev_ ? job->queue_prev_->queue_next_ : queue_head_) = job->queue_next_;
    (job->queue_next_ ? job->queue_next_->queue_prev_ : queue_tail_) = job->queue_prev_;
    job->state_ = Job::State::cancelled;
  }
  context_.post(job);  // completes with -ECANCELED in the context, like any other completion
  return true;
}

void ThreadPool::worker_loop() noexcept {
  std::unique_lock lock(mutex_);
  for (;;) {
    while (queue_head_ == nullptr && !stopping_) {
      ++idle_workers_;
      const bool woken = work_available_.wait_for(lock, options_.idle_timeout, [&] {
        return queue_head_ != nullptr || stopping_;
      });
      --idle_workers_;
      if (!woken) break;  // idle for too long
    }
    if (queue_head_ == nullptr) break;  // stopping, or idle timeout
    Job* job = queue_head_;
    queue_head_ = job->queue_next_;
    (queue_head_ ? queue_head_->queue_prev_ : queue_tail_) = nullptr;
    job->state_ = Job::State::running;
    lock.unlock();
    job->execute_(job);
    lock.lock();
    job->state_ = Job::State::finished;
    context_.post(job);  // the job may be freed as soon as the context runs it
  }
  --workers_;
  // Notify under the lock: the destructor may free the pool once it sees zero workers.
  workers_gone_.notify_all();
}

bool ThreadPool::Job::deliver(WorkItem* item) noexcept {
  auto* job = static_cast<Job*>(item);
  // The state was set under the pool mutex before the post; the queue's release/acquire makes
  // it visible here.
  const bool cancelled = job->state_ == State::cancelled;
  ThreadPool* pool = job->pool_;
  {
    std::lock_guard lock(pool->mutex_);
    --pool->unfinished_jobs_;
  }
  job->complete_(job, cancelled);  // may free the job, or even the pool: touch neither after
  return true;
}

}  // namespace spindle::aio
