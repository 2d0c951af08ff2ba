// Task<T>: a lazy coroutine that produces a T. It starts when awaited (the parent resumes it by
// symmetric transfer, and it resumes the parent the same way when it finishes) or when made a
// root with create()/spawn()/block_on(). Errors are values: return a Result-like T on hot paths.
// An exception escaping a Task is rethrown in the awaiting parent (a bug path, not a fast one);
// escaping a detached root it is fatal.
//
// Thread-safety: a Task object is owned by one coroutine or thread at a time. Awaiting it runs it
// on the awaiting coroutine's thread and home context; it shares the root's Coroutine state.
#pragma once

#include <coroutine>
#include <exception>
#include <optional>
#include <type_traits>
#include <utility>

#include "base/fatal.h"
#include "coro/coroutine.h"
#include "coro/frame_allocator.h"

namespace spindle::coro {

namespace detail {

class PromiseBase : public Coroutine {
 public:
  std::suspend_always initial_suspend() noexcept { return {}; }

  struct FinalAwaiter {
    bool await_ready() const noexcept { return false; }
    template <typename Promise>
    std::coroutine_handle<> await_suspend(std::coroutine_handle<Promise> frame) const noexcept {
      return frame.promise().on_final_suspend(frame);
    }
    void await_resume() const noexcept {}
  };
  FinalAwaiter final_suspend() noexcept { return {}; }

  void unhandled_exception() noexcept { error_ = std::current_exception(); }

  static void* operator new(std::size_t size) { return allocate_frame(size); }
  static void operator delete(void* frame, std::size_t size) noexcept { free_frame(frame, size); }

  void set_continuation(std::coroutine_handle<> parent) noexcept { continuation_ = parent; }
  void set_finish_hook(FinishHook hook, void* argument) noexcept {
    finish_hook_ = hook;
    finish_argument_ = argument;
  }
  void rethrow_if_failed() const {
    if (error_) std::rethrow_exception(error_);
  }
  // Resumes the awaiting parent, or finishes the root (freeing it if detached).
  std::coroutine_handle<> on_final_suspend(std::coroutine_handle<> frame) noexcept {
    if (continuation_) return transfer_to(continuation_);
    if (detached_ && error_) fatal_unhandled_exception();
    root_finished(this, frame);
    return std::noop_coroutine();
  }

 protected:
  void start_at(std::coroutine_handle<> self) noexcept { resume_point_ = self; }

 private:
  [[noreturn]] void fatal_unhandled_exception() const noexcept;

  std::coroutine_handle<> continuation_;
  std::exception_ptr error_;
};

inline void PromiseBase::fatal_unhandled_exception() const noexcept {
  try {
    std::rethrow_exception(error_);
  } catch (const std::exception& e) {
    base::fatal("exception escaped a detached coroutine: {}", e.what());
  } catch (...) {
    base::fatal("non-standard exception escaped a detached coroutine");
  }
}

template <typename T>
class ValuePromise : public PromiseBase {
 public:
  template <typename U>
  void return_value(U&& value) noexcept(std::is_nothrow_constructible_v<T, U&&>) {
    value_.emplace(std::forward<U>(value));
  }
  T take_result() {
    rethrow_if_failed();
    return std::move(*value_);
  }

 private:
  std::optional<T> value_;
};

template <>
class ValuePromise<void> : public PromiseBase {
 public:
  void return_void() noexcept {}
  void take_result() const { rethrow_if_failed(); }
};

}  // namespace detail

template <typename T = void>
class [[nodiscard]] Task {
 public:
  struct promise_type : detail::ValuePromise<T> {
    Task get_return_object() noexcept {
      auto frame = std::coroutine_handle<promise_type>::from_promise(*this);
      this->start_at(frame);
      return Task(frame);
    }
  };
  using Handle = std::coroutine_handle<promise_type>;

  Task() noexcept = default;
  Task(Task&& other) noexcept : frame_(std::exchange(other.frame_, {})) {}
  Task& operator=(Task&& other) noexcept {
    if (this != &other) {
      if (frame_) frame_.destroy();
      frame_ = std::exchange(other.frame_, {});
    }
    return *this;
  }
  ~Task() {
    if (frame_) frame_.destroy();
  }

  struct Awaiter {
    Handle child;
    bool await_ready() const noexcept { return false; }
    std::coroutine_handle<> await_suspend(std::coroutine_handle<> parent) const noexcept {
      child.promise().set_continuation(parent);
      return detail::transfer_to(child);
    }
    T await_resume() const { return child.promise().take_result(); }
  };
  // Awaiting consumes the task: `co_await make_task()` or `co_await std::move(task)`.
  Awaiter operator co_await() && noexcept { return Awaiter{frame_}; }

  bool valid() const noexcept { return static_cast<bool>(frame_); }
  bool done() const noexcept { return frame_.done(); }
  Handle handle() const noexcept { return frame_; }
  // Gives up ownership of the frame (used to turn the task into a root).
  Handle release() noexcept { return std::exchange(frame_, {}); }

 private:
  explicit Task(Handle frame) noexcept : frame_(frame) {}
  Handle frame_;
};

}  // namespace spindle::coro
