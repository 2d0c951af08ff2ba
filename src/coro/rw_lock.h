// RwLock: a fair reader-writer lock for coroutines on any context (QEMU's 2021 CoRwlock design).
// Readers share, a writer is exclusive, and waiters are served strictly in arrival order from a
// ticket queue: a writer at the head holds back every later reader, so writers never starve.
// Ownership is handed to waiters directly (the waker updates `owners_` for them), and they
// resume in their own home contexts through wake_later().
//
// upgrade(): a reader becomes the writer — at once if it is the only owner and nobody waits,
// otherwise it gives up its read share and queues as a writer behind those already waiting.
// downgrade(): the writer becomes a reader and lets the readers at the head of the queue in.
//
// Thread-safety: all calls from coroutines on any context. `mutex_` (a std::mutex, held only
// for O(1) bookkeeping, never across a suspension) protects `owners_` and the ticket queue;
// tickets live in the suspended coroutines' frames.
#pragma once

#include <coroutine>
#include <mutex>

#include "coro/coroutine.h"

namespace spindle::coro {

class RwLock {
  struct Ticket {
    Coroutine* coroutine = nullptr;
    bool writer = false;
    Ticket* next = nullptr;
  };

 public:
  RwLock() noexcept = default;
  ~RwLock();
  RwLock(const RwLock&) = delete;
  RwLock& operator=(const RwLock&) = delete;

  class Awaiter {
   public:
    enum class Kind { read, write, upgrade };
    Awaiter(RwLock& lock, Kind kind) noexcept : lock_(lock), kind_(kind) {}
    bool await_ready() const noexcept { return false; }
    bool await_suspend(std::coroutine_handle<> handle) noexcept {
      return lock_.acquire_or_queue(kind_, ticket_, handle);
    }
    void await_resume() const noexcept {}

   private:
    RwLock& lock_;
    Kind kind_;
    Ticket ticket_;
  };

  Awaiter read_lock() noexcept { return {*this, Awaiter::Kind::read}; }
  Awaiter write_lock() noexcept { return {*this, Awaiter::Kind::write}; }
  // Reader -> writer (may suspend; see above).
  Awaiter upgrade() noexcept { return {*this, Awaiter::Kind::upgrade}; }
  // Writer -> reader; never suspends.
  void downgrade() noexcept;
  // Releases a read or write hold.
  void unlock() noexcept;

  // Current owners: >0 readers, -1 a writer, 0 free (a snapshot, for tests and assertions).
  int owners() const noexcept;

 private:
  // Returns false if the lock was granted at once (no suspension).
  bool acquire_or_queue(Awaiter::Kind kind, Ticket& ticket, std::coroutine_handle<> handle);
  // Grants the lock to the waiters at the head that can have it now; returns them as a list.
  Ticket* grant_locked() noexcept;
  static void wake_all(Ticket* granted) noexcept;

  mutable std::mutex mutex_;
  int owners_ = 0;
  Ticket* head_ = nullptr;
  Ticket* tail_ = nullptr;
};

}  // namespace spindle::coro
