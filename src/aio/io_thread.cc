#include "aio/io_thread.h"

#include <pthread.h>
#include <unistd.h>

#include "base/fatal.h"

namespace spindle::aio {

IoThread::IoThread(std::string name, Context::PollParams params)
    : context_(Context::create(std::move(name))) {
  context_->set_poll_params(params);
  context_->dedicated_thread_.store(true, std::memory_order_release);
  std::atomic<bool> started{false};
  thread_ = std::thread([this, &started] { run(started); });
  started.wait(false, std::memory_order_acquire);
}

IoThread::~IoThread() { stop(); }

void IoThread::run(std::atomic<bool>& started) {
  const std::string thread_name = context_->name().substr(0, 15);
  pthread_setname_np(pthread_self(), thread_name.c_str());
  thread_id_ = std::this_thread::get_id();
  native_thread_id_ = static_cast<int>(::gettid());
  detail::CurrentContextScope bind(context_.get());
  started.store(true, std::memory_order_release);
  started.notify_all();
  while (!stopping_) context_->poll(true);
  drain();
}

void IoThread::drain() {
  // Work queued before the stop callback ran, and what it leads to; ring operations in flight
  // are waited for here, since only the thread that created the ring may enter it.
  for (;;) {
    if (context_->poll(false)) continue;
    if (!context_->ring_busy()) break;
    context_->poll(true);  // sleeps until a completion (or other work) arrives
  }
  context_->close_ring();
}

void IoThread::stop() {
  if (std::this_thread::get_id() == thread_id_) {
    stopping_ = true;  // called from inside the loop: it ends after this iteration
    return;
  }
  if (joined_) return;
  context_->run_soon([this] { stopping_ = true; });
  thread_.join();
  joined_ = true;
  context_->dedicated_thread_.store(false, std::memory_order_release);
  // If the loop had already ended itself, our stop callback (and anything else posted since)
  // is still queued: run it here rather than leak it. File I/O it does gets a ring of this
  // thread's own (the IoThread closed its ring before it exited).
  drain();
}

}  // namespace spindle::aio
