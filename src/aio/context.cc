#include "aio/context.h"

#include <sys/epoll.h>
#include <linux/futex.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <thread>

#include "aio/bottom_half.h"
#include "aio/thread_pool.h"
#include "aio/uring.h"
#include "base/cpu_relax.h"
#include "base/fatal.h"

namespace spindle::aio {

namespace detail {
constinit thread_local bool t_running_coroutine = false;
}  // namespace detail

namespace {

thread_local Context* t_current = nullptr;
thread_local char t_thread_marker;  // its address identifies the thread for misuse checks

// Static initialization runs on the process's main thread: make main_context() its current
// context there (and nowhere else), so current_context() is a single thread-local load.
const bool g_main_thread_bound = [] {
  t_current = &main_context();
  return true;
}();

constexpr std::int64_t kInitialPollWindowNs = 4000;
// epoll data of the ring's completion eventfd (the wake-up eventfd's is null; handlers are heap
// pointers, never this).
void* const kUringTag = reinterpret_cast<void*>(std::uintptr_t{1});
constexpr std::size_t kMaxEventsPerWait = 64;

}  // namespace

struct Context::FdHandler {
  int fd;
  FdCallback on_readable;
  FdCallback on_writable;
  // Set (release) once published and when removed; dispatch reads it (acquire) before using the
  // callbacks, which also makes the creating thread's writes visible to the home thread.
  std::atomic<bool> live{false};
};

detail::CurrentContextScope::CurrentContextScope(Context* context) noexcept : saved_(t_current) {
  t_current = context;
}
detail::CurrentContextScope::~CurrentContextScope() { t_current = saved_; }

Context* current_context() noexcept { return t_current; }

Context& main_context() noexcept {
  static Context* const main = [] {
    auto* context = new Context("main");  // never destroyed: other statics may still use it
    context->dedicated_thread_.store(true, std::memory_order_release);
    return context;
  }();
  return *main;
}

ContextRef Context::create(std::string name) {
  return ContextRef(new Context(std::move(name)), /*adopt=*/true);
}

Context::Context(std::string name) : name_(std::move(name)) {
  epoll_fd_ = ::epoll_create1(EPOLL_CLOEXEC);
  wake_fd_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (epoll_fd_ < 0 || wake_fd_ < 0) base::fatal("context '{}': {}", name_, std::strerror(errno));
  epoll_event event{};
  event.events = EPOLLIN;
  event.data.ptr = nullptr;  // the context's own wake-up
  if (::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, wake_fd_, &event) < 0) {
    base::fatal("context '{}': epoll_ctl: {}", name_, std::strerror(errno));
  }
}

ThreadPool& Context::thread_pool() {
  if (!thread_pool_) thread_pool_ = std::make_unique<ThreadPool>(*this);
  return *thread_pool_;
}

Uring* Context::uring() {
  if (!uring_probed_) {
    uring_probed_ = true;
    uring_ = Uring::create(*this);
    if (uring_) {
      // Watched directly, not as an fd handler: it does not make the loop epoll while it is
      // awake, and it only makes it sleep in epoll while operations are in flight.
      epoll_event event{};
      event.events = EPOLLIN;
      event.data.ptr = kUringTag;
      if (::epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, uring_->completion_fd(), &event) < 0) {
        base::fatal("context '{}': cannot watch the io_uring eventfd: {}", name_,
                    std::strerror(errno));
      }
    }
  }
  return uring_.get();
}

bool Context::ring_busy() const noexcept {
  return uring_ && (uring_->in_flight() > 0 || uring_->has_pending_submissions());
}

void Context::close_ring() noexcept {
  if (uring_) ::epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, uring_->completion_fd(), nullptr);
  uring_.reset();  // aborts if operations are still in flight
  uring_probed_ = false;
}

Context::~Context() {
  close_ring();
  thread_pool_.reset();  // waits for its workers; aborts if jobs have not completed
  WorkFifo pending;
  pending.append(local_);
  pending.append(batch_);
  queue_.drain_into(pending);
  if (WorkItem* item = pending.front()) {
    base::fatal("context '{}' destroyed with pending work ('{}' was never run)", name_,
                item->label);
  }
  {
    std::lock_guard lock(bh_registry_mutex_);
    if (bh_registry_) {
      base::fatal("context '{}' destroyed with bottom half '{}' never destroyed (leaked)", name_,
                  bh_registry_->name());
    }
  }
  for (auto& [fd, handler] : handlers_) delete handler;
  for (FdHandler* handler : deleted_handlers_) delete handler;  // the last reference: no lock
  ::close(wake_fd_);
  ::close(epoll_fd_);
}

void Context::unref() noexcept {
  if (refcount_.fetch_sub(1, std::memory_order_acq_rel) == 1) delete this;
}

bool Context::is_current() const noexcept { return current_context() == this; }

// ---- cross-thread entry points ------------------------------------------------------------

// The sleeper chose its primitive before arming (the arm CAS publishes that choice to whoever
// replaces the armed tag). A stale choice only costs a spurious wake-up.
void Context::kick() noexcept {
  if (sleeping_on_futex_.load(std::memory_order_acquire)) {
    futex_word_.fetch_add(1, std::memory_order_release);
    ::syscall(SYS_futex, &futex_word_, FUTEX_WAKE_PRIVATE, 1, nullptr, nullptr, 0);
    return;
  }
  const std::uint64_t one = 1;
  while (::write(wake_fd_, &one, sizeof one) < 0 && errno == EINTR) {
  }
}

void Context::sleep_on_futex(std::uint32_t observed, std::int64_t timeout_ns) noexcept {
  timespec relative{};
  if (timeout_ns >= 0) {
    relative.tv_sec = static_cast<time_t>(timeout_ns / 1'000'000'000);
    relative.tv_nsec = static_cast<long>(timeout_ns % 1'000'000'000);
  }
  // Returns at once if a kick changed the word since `observed` was read (EAGAIN).
  ::syscall(SYS_futex, &futex_word_, FUTEX_WAIT_PRIVATE, observed,
            timeout_ns >= 0 ? &relative : nullptr, nullptr, 0);
}

void Context::notify() noexcept {
  notified_.store(true, std::memory_order_seq_cst);
  if (queue_.armed() && queue_.try_disarm()) kick();
}

void Context::reevaluate() noexcept {
  if (queue_.armed() && queue_.try_disarm()) kick();
}

void Context::post(WorkItem* item) noexcept {
  if (is_current()) {
    local_.push_back(item);
    return;
  }
  // The item may run, and drop the last reference to this context, as soon as it is pushed. Only
  // a push that finds the consumer armed touches the context afterwards (to kick it), so only
  // that one takes a reference, before the item becomes visible (remote_queue.h protocol).
  bool pinned = false;
  if (queue_.push(item, [this, &pinned] {
        ref();
        pinned = true;
      })) {
    kick();
  }
  if (pinned) unref();
}

void Context::set_poll_params(PollParams params) noexcept {
  poll_max_ns_.store(std::max<std::int64_t>(params.max_ns, 0), std::memory_order_relaxed);
  poll_grow_.store(std::max<std::int64_t>(params.grow, 0), std::memory_order_relaxed);
  poll_shrink_.store(std::max<std::int64_t>(params.shrink, 0), std::memory_order_relaxed);
  reevaluate();
}

Context::PollParams Context::poll_params() const noexcept {
  return {poll_max_ns_.load(std::memory_order_relaxed), poll_grow_.load(std::memory_order_relaxed),
          poll_shrink_.load(std::memory_order_relaxed)};
}

// ---- fd handlers --------------------------------------------------------------------------

int Context::set_fd_handler(int fd, FdCallback on_readable, FdCallback on_writable,
                            Trigger trigger) {
  std::lock_guard lock(fd_mutex_);
  auto found = handlers_.find(fd);
  FdHandler* old = found == handlers_.end() ? nullptr : found->second;
  if (old) {
    // Never modify a published handler in place: the home thread may be dispatching it.
    old->live.store(false, std::memory_order_release);
    deleted_handlers_.push_back(old);
    handlers_to_free_.store(true, std::memory_order_relaxed);
    handlers_.erase(found);
  }
  if (!on_readable && !on_writable) {
    if (old) {
      ::epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, fd, nullptr);
      fd_handler_count_.fetch_sub(1, std::memory_order_relaxed);
    }
    return 0;
  }
  auto* handler = new FdHandler{fd, std::move(on_readable), std::move(on_writable)};
  handler->live.store(true, std::memory_order_release);
  epoll_event event{};
  event.events = (handler->on_readable ? EPOLLIN | EPOLLRDHUP : 0u) |
                 (handler->on_writable ? EPOLLOUT : 0u) |
                 (trigger == Trigger::edge ? EPOLLET : 0u);
  event.data.ptr = handler;
  if (::epoll_ctl(epoll_fd_, old ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, fd, &event) < 0) {
    const int error = errno;
    if (old) {
      ::epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, fd, nullptr);
      fd_handler_count_.fetch_sub(1, std::memory_order_relaxed);
    }
    delete handler;
    return -error;
  }
  handlers_.emplace(fd, handler);
  // epoll_wait() sees interest-list changes made while it sleeps, but a context with no fds
  // sleeps on a futex instead: make it re-evaluate when it gets its first fd.
  if (!old && fd_handler_count_.fetch_add(1, std::memory_order_relaxed) == 0) reevaluate();
  return 0;
}

void Context::free_deleted_handlers() noexcept {
  // Most polls have nothing to free: skip the lock. A handler removed concurrently, whose flag
  // this load misses, is freed after the next outermost poll (or by the destructor).
  if (!handlers_to_free_.load(std::memory_order_relaxed)) return;
  std::vector<FdHandler*> doomed;
  {
    std::lock_guard lock(fd_mutex_);
    doomed.swap(deleted_handlers_);
    handlers_to_free_.store(false, std::memory_order_relaxed);
  }
  for (FdHandler* handler : doomed) delete handler;
}

bool Context::dispatch_fd_events(const epoll_event* events, std::size_t count) noexcept {
  bool progress = false;
  for (std::size_t i = 0; i < count; ++i) {
    auto* handler = static_cast<FdHandler*>(events[i].data.ptr);
    if (handler == nullptr) {  // our own wake-up eventfd: consume it; not progress
      std::uint64_t value;
      while (::read(wake_fd_, &value, sizeof value) < 0 && errno == EINTR) {
      }
      continue;
    }
    if (events[i].data.ptr == kUringTag) {  // the ring's completion eventfd
      progress |= uring_->reap();
      continue;
    }
    const std::uint32_t ready = events[i].events;
    if ((ready & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) &&
        handler->live.load(std::memory_order_acquire) && handler->on_readable) {
      handler->on_readable();
      progress = true;
    }
    if ((ready & (EPOLLOUT | EPOLLERR)) && handler->live.load(std::memory_order_acquire) &&
        handler->on_writable) {
      handler->on_writable();
      progress = true;
    }
  }
  return progress;
}

// ---- bottom-half registry -----------------------------------------------------------------

void Context::register_bottom_half(BottomHalf* bh) {
  std::lock_guard lock(bh_registry_mutex_);
  bh->registry_next_ = bh_registry_;
  if (bh_registry_) bh_registry_->registry_prev_ = bh;
  bh_registry_ = bh;
}

void Context::unregister_bottom_half(BottomHalf* bh) noexcept {
  std::lock_guard lock(bh_registry_mutex_);
  if (bh->registry_prev_) {
    bh->registry_prev_->registry_next_ = bh->registry_next_;
  } else {
    bh_registry_ = bh->registry_next_;
  }
  if (bh->registry_next_) bh->registry_next_->registry_prev_ = bh->registry_prev_;
}

// ---- timers -------------------------------------------------------------------------------

std::int64_t now_ns(Clock clock) noexcept {
  timespec ts;
  ::clock_gettime(clock == Clock::monotonic ? CLOCK_MONOTONIC : CLOCK_REALTIME, &ts);
  return std::int64_t{ts.tv_sec} * 1'000'000'000 + ts.tv_nsec;
}

Timer::Timer(Context& context, Clock clock, Callback callback)
    : context_(context), clock_(clock), callback_(std::move(callback)) {}

Timer::~Timer() { cancel(); }

bool Timer::armed() const noexcept {
  std::lock_guard lock(context_.timer_mutex_);
  return heap_index_ != kNotArmed;
}

void Timer::arm_in(std::chrono::nanoseconds delay) noexcept {
  arm_at(now_ns(clock_) + delay.count());
}

void Timer::arm_at(std::int64_t deadline_ns) noexcept {
  bool became_earliest;
  {
    std::lock_guard lock(context_.timer_mutex_);
    TimerHeap& heap = context_.timer_heaps_[static_cast<int>(clock_)];
    if (heap_index_ != kNotArmed) heap.remove(this);
    deadline_ns_ = deadline_ns;
    sequence_ = context_.next_timer_sequence_++;
    heap.insert(this);
    became_earliest = heap.top() == this;
    context_.earliest_deadline_[static_cast<int>(clock_)].store(heap.earliest_deadline(),
                                                                std::memory_order_release);
  }
  // A sleeping poll() computed its timeout from the old earliest deadline: make it recompute.
  if (became_earliest && !context_.is_current()) context_.reevaluate();
}

void Timer::cancel() noexcept {
  std::lock_guard lock(context_.timer_mutex_);
  if (heap_index_ == kNotArmed) return;
  TimerHeap& heap = context_.timer_heaps_[static_cast<int>(clock_)];
  heap.remove(this);
  context_.earliest_deadline_[static_cast<int>(clock_)].store(heap.earliest_deadline(),
                                                              std::memory_order_release);
}

std::int64_t Context::timer_timeout_ns() const noexcept {
  std::int64_t timeout = -1;
  for (Clock clock : {Clock::monotonic, Clock::realtime}) {
    const std::int64_t deadline =
        earliest_deadline_[static_cast<int>(clock)].load(std::memory_order_acquire);
    if (deadline == TimerHeap::kNoDeadline) continue;
    const std::int64_t remaining = std::max<std::int64_t>(deadline - now_ns(clock), 0);
    if (timeout < 0 || remaining < timeout) timeout = remaining;
  }
  return timeout;
}

bool Context::run_timers() noexcept {
  bool progress = false;
  for (Clock clock : {Clock::monotonic, Clock::realtime}) {
    const int index = static_cast<int>(clock);
    if (earliest_deadline_[index].load(std::memory_order_acquire) == TimerHeap::kNoDeadline) {
      continue;
    }
    const std::int64_t now = now_ns(clock);
    std::uint64_t sequence_limit;  // timers re-armed by callbacks wait for the next poll
    {
      std::lock_guard lock(timer_mutex_);
      sequence_limit = next_timer_sequence_;
    }
    for (;;) {
      Timer* expired = nullptr;
      {
        std::lock_guard lock(timer_mutex_);
        TimerHeap& heap = timer_heaps_[index];
        if (!heap.empty() && heap.top()->deadline_ns_ <= now &&
            heap.top()->sequence_ < sequence_limit) {
          expired = heap.top();
          heap.remove(expired);
          earliest_deadline_[index].store(heap.earliest_deadline(), std::memory_order_release);
        }
      }
      if (!expired) break;
      expired->callback_();
      progress = true;
    }
  }
  return progress;
}

// ---- the loop -----------------------------------------------------------------------------

bool Context::has_pending_work() const noexcept {
  return !local_.empty() || !batch_.empty() || queue_.has_items() ||
         notified_.load(std::memory_order_relaxed) ||
         // flushed and reaped at the next iteration
         (uring_ && (uring_->has_pending_submissions() || uring_->completions_ready()));
}

// Decides how long a blocking poll may sleep, busy-polling first if enabled. Arms the queue
// (so producers kick the eventfd) when it returns a non-zero timeout.
std::int64_t Context::blocking_timeout_ns(bool& armed) noexcept {
  if (has_pending_work()) return 0;
  std::int64_t timeout = timer_timeout_ns();
  if (timeout == 0) return 0;

  if (poll_window_ns_ > 0 && poll_max_ns_.load(std::memory_order_relaxed) > 0) {
    const std::int64_t spin = timeout < 0 ? poll_window_ns_ : std::min(timeout, poll_window_ns_);
    const std::int64_t spin_end = now_ns(Clock::monotonic) + spin;
    for (unsigned iteration = 0;; ++iteration) {
      if (has_pending_work()) return 0;
      if ((iteration & 15) == 15 && now_ns(Clock::monotonic) >= spin_end) break;
      base::cpu_relax();
    }
    timeout = timer_timeout_ns();
    if (timeout == 0) return 0;
  }

  if (!queue_.arm()) return 0;  // items arrived
  armed = true;
  if (notified_.load(std::memory_order_seq_cst)) return 0;
  // Arms the ring's completion eventfd; completions that arrived before that are reaped first.
  if (uring_ && uring_->prepare_to_sleep()) return 0;
  // Recompute after arming: a timer armed by another thread before this point is in the heap
  // now; one armed after it will see the armed queue and kick us.
  return timer_timeout_ns();
}

std::size_t Context::wait_for_events(std::int64_t timeout_ns, epoll_event* events,
                                     std::size_t capacity) noexcept {
  for (;;) {
    int n;
    if (timeout_ns < 0) {
      n = ::epoll_pwait2(epoll_fd_, events, static_cast<int>(capacity), nullptr, nullptr);
    } else {
      const timespec ts{static_cast<time_t>(timeout_ns / 1'000'000'000),
                        static_cast<long>(timeout_ns % 1'000'000'000)};
      n = ::epoll_pwait2(epoll_fd_, events, static_cast<int>(capacity), &ts, nullptr);
    }
    if (n >= 0) return static_cast<std::size_t>(n);
    if (errno == EINTR) return 0;
    if (errno == ENOSYS) {  // kernels before 5.11: millisecond resolution, rounded up
      const int ms = timeout_ns < 0 ? -1 : static_cast<int>((timeout_ns + 999'999) / 1'000'000);
      n = ::epoll_wait(epoll_fd_, events, static_cast<int>(capacity), ms);
      if (n >= 0) return static_cast<std::size_t>(n);
      if (errno == EINTR) return 0;
    }
    base::fatal("context '{}': epoll_wait: {}", name_, std::strerror(errno));
  }
}

bool Context::run_work_items() noexcept {
  queue_.drain_into(local_);
  batch_.append(local_);
  // A nested poll() from inside an item keeps draining the same batch, so work claimed by the
  // outer iteration is not stranded while the inner one runs (QEMU's BH "slices").
  bool progress = false;
  while (WorkItem* item = batch_.pop_front()) progress |= item->run(item);
  return progress;
}

void Context::adapt_poll_window(std::int64_t blocked_ns) noexcept {
  const std::int64_t max_ns = poll_max_ns_.load(std::memory_order_relaxed);
  if (max_ns == 0) {
    poll_window_ns_ = 0;
    return;
  }
  if (blocked_ns <= poll_window_ns_) return;  // the window caught the event: keep it
  if (blocked_ns > max_ns) {
    const std::int64_t shrink = poll_shrink_.load(std::memory_order_relaxed);
    poll_window_ns_ = shrink == 0 ? 0 : poll_window_ns_ / shrink;
  } else if (poll_window_ns_ < max_ns && blocked_ns < max_ns) {
    const std::int64_t grow = poll_grow_.load(std::memory_order_relaxed);
    poll_window_ns_ = poll_window_ns_ == 0 ? kInitialPollWindowNs
                                           : poll_window_ns_ * (grow == 0 ? 2 : grow);
    poll_window_ns_ = std::min(poll_window_ns_, max_ns);
  }
}

bool Context::poll(bool blocking) {
  if (detail::t_running_coroutine) {
    base::fatal("context '{}': poll() called from a coroutine (it would block its thread)",
                name_);
  }
  // Misuse check: the outermost poll() claims the context with a CAS (null -> this thread's
  // marker), so two threads can never be inside at once, not even when they enter together; a
  // nested poll() sees its own marker and skips the locked instruction. The acquire here and
  // the release at the outermost exit hand the home-thread state from one polling thread to
  // the next.
  const void* const me = &t_thread_marker;
  if (poller_.load(std::memory_order_relaxed) != me) {
    const void* expected = nullptr;
    if (!poller_.compare_exchange_strong(expected, me, std::memory_order_acquire,
                                         std::memory_order_relaxed)) {
      base::fatal("context '{}': poll() from two threads at once", name_);
    }
  }
  detail::CurrentContextScope bind(this);
  ++poll_depth_;

  bool progress = false;
  epoll_event events[kMaxEventsPerWait];
  for (;;) {
    // I/O prepared since the last iteration goes out before we wait, and completions that are
    // already visible are delivered (progress: they resume coroutines), eventfd or not.
    const bool ring_progress = uring_ && uring_->flush();
    progress |= ring_progress;
    const bool measure = blocking && poll_max_ns_.load(std::memory_order_relaxed) > 0;
    const std::int64_t start_ns = measure ? now_ns(Clock::monotonic) : 0;
    // With no fd registered a blocking wait sleeps on a futex, which wakes faster than an
    // eventfd through epoll; the choice must be visible before the queue is armed. The ring's
    // completion eventfd needs epoll only while operations are in flight, and never needs a
    // zero-timeout epoll: flush() reaps the ring on every pass.
    const bool has_fds = fd_handler_count_.load(std::memory_order_relaxed) > 0;
    const bool sleep_in_epoll = has_fds || (uring_ && uring_->in_flight() > 0);
    const std::uint32_t futex_observed = futex_word_.load(std::memory_order_acquire);
    if (blocking && !sleep_in_epoll) sleeping_on_futex_.store(true, std::memory_order_relaxed);
    bool armed = false;
    const std::int64_t timeout = blocking && !ring_progress ? blocking_timeout_ns(armed) : 0;

    std::size_t ready = 0;
    if (timeout != 0 && !sleep_in_epoll) {
      sleep_on_futex(futex_observed, timeout);
    } else if (timeout != 0 || has_fds) {  // nothing to watch and no reason to sleep: no syscall
      ready = wait_for_events(timeout, events, kMaxEventsPerWait);
    }
    if (uring_) uring_->after_wake();  // the completion eventfd goes off while we are awake
    if (blocking && !sleep_in_epoll) sleeping_on_futex_.store(false, std::memory_order_relaxed);
    if (armed) queue_.try_disarm();
    // Read first: the exchange (a locked instruction) only when there is a notify to consume.
    const bool notified = notified_.load(std::memory_order_relaxed) &&
                          notified_.exchange(false, std::memory_order_acq_rel);
    if (measure) adapt_poll_window(now_ns(Clock::monotonic) - start_ns);

    progress |= run_work_items();
    if (ready != 0) progress |= dispatch_fd_events(events, ready);
    if (timers_armed()) progress |= run_timers();
    // A blocking poll that woke for nothing (a stale wake-up, a timer cancelled meanwhile)
    // waits again; only real work or an explicit notify() ends it.
    if (progress || !blocking || notified || timeout == 0) break;
  }

  if (--poll_depth_ == 0) {
    free_deleted_handlers();
    poller_.store(nullptr, std::memory_order_release);
  }
  return progress;
}

}  // namespace spindle::aio
