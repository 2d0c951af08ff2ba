// Context: a per-thread event loop (QEMU's AioContext, without its big lock). It runs fd
// handlers, bottom halves, one-shot callbacks, timers and scheduled coroutines, all in its one
// home thread, and lets every other thread hand it work without locks.
//
// Thread-safety contract:
//  * Exactly one thread polls a Context at a time (its home thread: an IoThread's thread, the
//    process's main thread for main_context(), or whichever thread calls poll() on a private
//    Context). poll() may nest inside callbacks; it must never be called from a coroutine
//    (that blocks the whole thread) and aborts if it is, or if two threads poll at once.
//  * post(), run_soon(), notify(), set_fd_handler(), set_poll_params(), ref()/unref() and the
//    Timer/BottomHalf operations are callable from any thread.
//  * No lock is held while a callback runs. Fields and what protects them:
//      queue_            lock-free MPSC (remote_queue.h protocol), any thread pushes
//      notified_         atomic, Dekker pair with queue_.arm() (see notify())
//      futex_word_, sleeping_on_futex_  atomics; the home thread's choice of sleep primitive
//      local_, batch_    home thread only (work posted from the home thread, the batch being run)
//      poll_window_ns_   home thread only
//      poll_max_ns_ ...  atomics, relaxed: a stale value used once is harmless
//      handlers_ ...     fd_mutex_ (map, graveyard); handler `live` flag is atomic;
//                        handlers_to_free_ (atomic, written under fd_mutex_) lets poll() skip it
//      timer heaps       timer_mutex_; earliest_deadline_ mirrors the heads for a lock-free check
//      bottom halves     bh_registry_mutex_ (the registry list only; see bottom_half.h)
//      thread_pool_, uring_  home thread only (created on first use); the ring's completion
//                        eventfd sits in epoll_fd_ beside wake_fd_, not among the fd handlers,
//                        and the loop reaps the ring itself while awake (uring.h protocol)
//      refcount_         atomic
//  * Lifetime: reference counted (ContextRef). When the last reference goes, pending work items
//    or undestroyed bottom halves are a fatal error that names them.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "aio/remote_queue.h"
#include "aio/timer.h"
#include "aio/timer_heap.h"
#include "aio/work_item.h"

struct epoll_event;

namespace spindle::aio {

class BottomHalf;
class ContextRef;
class ThreadPool;
class Uring;

class Context {
 public:
  // Adaptive busy polling before sleeping (reference/qemu-aio.md §1.6). max_ns == 0 disables it.
  // The window starts at 4 us, grows by `grow` (0 means 2) up to max_ns while waits are short,
  // and shrinks by `shrink` (0 means straight to 0) after a wait longer than max_ns.
  struct PollParams {
    std::int64_t max_ns = 0;
    std::int64_t grow = 0;
    std::int64_t shrink = 0;
  };
  using FdCallback = std::function<void()>;

  static ContextRef create(std::string name = "context");

  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

  // One loop iteration: wait (only if `blocking` and nothing is pending), then run queued work
  // items, ready fd handlers and expired timers. Returns whether any callback other than the
  // context's own wake-up ran ("progress"); a bare notify() is not progress. poll(true) blocks
  // even with no fd registered, until work arrives, a timer expires or notify() is called.
  bool poll(bool blocking);

  // Makes a blocking poll() return and re-evaluate (it returns false unless other work ran).
  // Sticky: a notify() before poll(true) makes that poll not sleep. Any thread; signal-safe.
  void notify() noexcept;

  // Queues `item` to run in the home thread during a later poll(). Any thread. FIFO per
  // producer thread. Wakes the home thread only if it is asleep (or about to sleep).
  void post(WorkItem* item) noexcept;

  // Runs `fn` once in the home thread (a one-shot bottom half). Any thread.
  template <typename Fn>
  void run_soon(Fn&& fn);

  // Registers, replaces or (both callbacks empty) removes the handler of `fd`. Read interest
  // covers readable/hang-up/error, write interest writable/error. Level-triggered by default;
  // edge-triggered handlers run once per readiness change (io::Channel uses them: it always
  // tries the syscall first and waits only after EAGAIN). Any thread; removal while the
  // handler is being dispatched takes effect after it returns. Returns 0, or -errno if the fd
  // cannot be watched (EPERM for regular files, EBADF).
  enum class Trigger { level, edge };
  int set_fd_handler(int fd, FdCallback on_readable, FdCallback on_writable,
                     Trigger trigger = Trigger::level);
  void remove_fd_handler(int fd) { set_fd_handler(fd, {}, {}); }

  // This context's thread pool, created on first use (home thread only).
  ThreadPool& thread_pool();
  // This context's io_uring, created on first use (home thread only); null if io_uring is
  // unavailable on this system.
  Uring* uring();

  void set_poll_params(PollParams params) noexcept;
  PollParams poll_params() const noexcept;
  // Current busy-poll window (home thread; for tests and statistics).
  std::int64_t poll_window_ns() const noexcept { return poll_window_ns_; }

  const std::string& name() const noexcept { return name_; }
  // True in the home thread (inside its poll(), in its IoThread, or main thread for main).
  bool is_current() const noexcept;
  // True if a dedicated thread polls this context (an IoThread's, or the main thread for
  // main_context()); false for a private context driven by whoever calls poll().
  bool has_dedicated_thread() const noexcept {
    return dedicated_thread_.load(std::memory_order_acquire);
  }

  void ref() noexcept { refcount_.fetch_add(1, std::memory_order_relaxed); }
  void unref() noexcept;

 private:
  friend class BottomHalf;
  friend class Timer;
  friend class IoThread;
  friend Context& main_context() noexcept;
  struct FdHandler;
  template <typename Fn>
  struct OneShot;

  explicit Context(std::string name);
  ~Context();

  bool has_pending_work() const noexcept;
  // For IoThread's last drain (home thread): whether the ring has operations submitted or
  // prepared, and closing the ring once it has none, so that whichever thread polls the
  // context later creates a ring of its own instead of entering this thread's (SINGLE_ISSUER).
  bool ring_busy() const noexcept;
  void close_ring() noexcept;
  std::int64_t timer_timeout_ns() const noexcept;
  std::int64_t blocking_timeout_ns(bool& armed) noexcept;
  std::size_t wait_for_events(std::int64_t timeout_ns, ::epoll_event* events,
                              std::size_t capacity) noexcept;
  bool run_work_items() noexcept;
  bool dispatch_fd_events(const ::epoll_event* events, std::size_t count) noexcept;
  bool run_timers() noexcept;
  // Whether either clock has an armed timer (the lock-free mirror of the heap heads).
  bool timers_armed() const noexcept {
    return earliest_deadline_[0].load(std::memory_order_acquire) != TimerHeap::kNoDeadline ||
           earliest_deadline_[1].load(std::memory_order_acquire) != TimerHeap::kNoDeadline;
  }
  void adapt_poll_window(std::int64_t blocked_ns) noexcept;
  void kick() noexcept;
  void sleep_on_futex(std::uint32_t observed, std::int64_t timeout_ns) noexcept;
  // Wakes a sleeping poll() so it re-reads its inputs (timer deadlines, poll parameters)
  // without that counting as a notify(): it goes back to sleep if nothing is due.
  void reevaluate() noexcept;
  void free_deleted_handlers() noexcept;

  void register_bottom_half(BottomHalf* bh);
  void unregister_bottom_half(BottomHalf* bh) noexcept;
  void timer_changed(Clock clock, bool became_earliest) noexcept;

  const std::string name_;
  std::atomic<std::int64_t> refcount_{1};

  RemoteQueue queue_;
  std::atomic<bool> notified_{false};
  WorkFifo local_;
  WorkFifo batch_;

  int epoll_fd_ = -1;
  int wake_fd_ = -1;
  // A context without fds sleeps on futex_word_ instead of epoll (sleeping_on_futex_ says
  // which, for the kicker); both are atomics written by the home thread.
  std::atomic<std::uint32_t> futex_word_{0};
  std::atomic<bool> sleeping_on_futex_{false};
  // The marker of the thread inside the outermost poll(), or null: the "two pollers" check.
  std::atomic<const void*> poller_{nullptr};
  // Whether a dedicated thread polls this context for its lifetime (an IoThread, set and cleared
  // by it; the main thread for main_context()): has_dedicated_thread(), which picks the ring's
  // flags. The thread currently inside poll() is `poller_`.
  std::atomic<bool> dedicated_thread_{false};
  int poll_depth_ = 0;

  std::atomic<std::int64_t> poll_max_ns_{0};
  std::atomic<std::int64_t> poll_grow_{0};
  std::atomic<std::int64_t> poll_shrink_{0};
  std::int64_t poll_window_ns_ = 0;

  std::mutex fd_mutex_;
  std::unordered_map<int, FdHandler*> handlers_;
  std::vector<FdHandler*> deleted_handlers_;
  // Whether deleted_handlers_ may be non-empty: written under fd_mutex_, read without it by
  // poll() to skip the lock (a stale false delays freeing to the next poll).
  std::atomic<bool> handlers_to_free_{false};
  std::atomic<int> fd_handler_count_{0};

  mutable std::mutex timer_mutex_;
  TimerHeap timer_heaps_[2];
  std::atomic<std::int64_t> earliest_deadline_[2] = {TimerHeap::kNoDeadline,
                                                     TimerHeap::kNoDeadline};
  std::uint64_t next_timer_sequence_ = 0;

  std::mutex bh_registry_mutex_;
  BottomHalf* bh_registry_ = nullptr;

  std::unique_ptr<ThreadPool> thread_pool_;  // home thread only
  std::unique_ptr<Uring> uring_;             // home thread only
  bool uring_probed_ = false;                // home thread only
};

template <typename Fn>
struct Context::OneShot final : WorkItem {
  explicit OneShot(Fn&& f) : WorkItem(&OneShot::run_once, "run_soon"), fn(std::move(f)) {}
  static bool run_once(WorkItem* item) noexcept {
    auto* self = static_cast<OneShot*>(item);
    self->fn();
    delete self;
    return true;
  }
  Fn fn;
};

template <typename Fn>
void Context::run_soon(Fn&& fn) {
  post(new OneShot<std::decay_t<Fn>>(std::decay_t<Fn>(std::forward<Fn>(fn))));
}

// Intrusive owning reference to a Context.
class ContextRef {
 public:
  ContextRef() = default;
  explicit ContextRef(Context* context, bool adopt = false) noexcept : context_(context) {
    if (context_ && !adopt) context_->ref();
  }
  ContextRef(const ContextRef& other) noexcept : ContextRef(other.context_) {}
  ContextRef(ContextRef&& other) noexcept : context_(std::exchange(other.context_, nullptr)) {}
  ContextRef& operator=(ContextRef other) noexcept {
    std::swap(context_, other.context_);
    return *this;
  }
  ~ContextRef() {
    if (context_) context_->unref();
  }
  Context* get() const noexcept { return context_; }
  Context* operator->() const noexcept { return context_; }
  Context& operator*() const noexcept { return *context_; }
  explicit operator bool() const noexcept { return context_ != nullptr; }

 private:
  Context* context_ = nullptr;
};

// The Context of the calling thread: the one it is polling, its IoThread's, or main_context()
// on the process's main thread. Null on other threads (workers), which therefore always go
// through the scheduling path when they wake a coroutine.
Context* current_context() noexcept;

// The process-wide main Context; its home thread is the thread that ran static initialization.
Context& main_context() noexcept;

namespace detail {
// Binds the calling thread to a Context for the scope's lifetime (used by poll() and IoThread).
class CurrentContextScope {
 public:
  explicit CurrentContextScope(Context* context) noexcept;
  ~CurrentContextScope();
  CurrentContextScope(const CurrentContextScope&) = delete;
  CurrentContextScope& operator=(const CurrentContextScope&) = delete;

 private:
  Context* saved_;
};

// Set by the coroutine layer while a coroutine runs on this thread, so poll() can refuse it.
extern constinit thread_local bool t_running_coroutine;
}  // namespace detail

}  // namespace spindle::aio
