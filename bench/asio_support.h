// Standalone Asio 1.22 as the benchmarks use it: the include (with clang's co_await switch),
// coroutine types bound to the io_context's own executor, and AsioThread, the Asio counterpart
// of aio::IoThread.
//
// Thread-safety: AsioThread is constructed and destroyed by one thread; io() may be used from
// any thread as io_context allows (post, co_spawn).
#pragma once

#include <atomic>
#include <thread>

// Asio 1.22 enables co_await for clang only with <experimental/coroutine> (libc++); with
// libstdc++ clang has the standard <coroutine>, which Asio then uses (ASIO_HAS_STD_COROUTINE).
#if defined(__clang__) && !defined(ASIO_HAS_CO_AWAIT)
#define ASIO_HAS_CO_AWAIT 1
#endif
#include <asio.hpp>

namespace spindle::bench {

// Asio coroutines use the io_context's own executor type rather than the default type-erased
// any_io_executor: that is legitimate Asio and 30-40% faster, so Asio shows its best here.
using AsioExecutor = asio::io_context::executor_type;
template <typename T>
using AsioTask = asio::awaitable<T, AsioExecutor>;
inline constexpr asio::use_awaitable_t<AsioExecutor> kUseAwaitable{};

// An Asio event-loop thread. Busy-polling runs `while (!stop) io.poll();`; sleeping runs
// io.run(), which blocks when idle. A work guard keeps the io_context from stopping when it
// runs out of handlers.
class AsioThread {
 public:
  enum class Mode { busy_poll, sleep };

  explicit AsioThread(Mode mode)
      : work_guard_(asio::make_work_guard(io_)), thread_([this, mode] { run(mode); }) {}
  ~AsioThread() {
    stop_.store(true, std::memory_order_release);
    work_guard_.reset();
    thread_.join();
  }
  AsioThread(const AsioThread&) = delete;
  AsioThread& operator=(const AsioThread&) = delete;

  asio::io_context& io() noexcept { return io_; }
  std::thread::id thread_id() const noexcept { return thread_.get_id(); }

 private:
  void run(Mode mode) {
    if (mode == Mode::busy_poll) {
      while (!stop_.load(std::memory_order_acquire)) io_.poll();
    }
    io_.run();  // drains what is left; returns once the guard is gone and no work remains
  }

  asio::io_context io_;
  asio::executor_work_guard<asio::io_context::executor_type> work_guard_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace spindle::bench
