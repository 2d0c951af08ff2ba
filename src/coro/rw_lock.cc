#include "coro/rw_lock.h"

#include "base/fatal.h"

namespace spindle::coro {

RwLock::~RwLock() {
  if (owners_ != 0 || head_ != nullptr) {
    base::fatal("coro::RwLock {} destroyed while held or waited for", static_cast<void*>(this));
  }
}

int RwLock::owners() const noexcept {
  std::lock_guard guard(mutex_);
  return owners_;
}

bool RwLock::acquire_or_queue(Awaiter::Kind kind, Ticket& ticket,
                              std::coroutine_handle<> handle) {
  Ticket* granted = nullptr;
  {
    std::lock_guard guard(mutex_);
    switch (kind) {
      case Awaiter::Kind::read:
        if (owners_ >= 0 && head_ == nullptr) {
          ++owners_;
          return false;
        }
        break;
      case Awaiter::Kind::write:
        if (owners_ == 0 && head_ == nullptr) {
          owners_ = -1;
          return false;
        }
        break;
      case Awaiter::Kind::upgrade:
        if (owners_ <= 0) base::fatal("coro::RwLock::upgrade() without a read hold");
        if (owners_ == 1 && head_ == nullptr) {
          owners_ = -1;
          return false;
        }
        --owners_;  // give up our share, then queue as a writer behind existing waiters
        break;
    }
    ticket.coroutine = park(handle);
    ticket.writer = kind != Awaiter::Kind::read;
    ticket.next = nullptr;
    if (tail_) {
      tail_->next = &ticket;
    } else {
      head_ = &ticket;
    }
    tail_ = &ticket;
    if (kind == Awaiter::Kind::upgrade) granted = grant_locked();
  }
  // Waking others after dropping the bookkeeping lock; our own ticket is never at the head
  // here unless the queue was empty, which the fast path above handled.
  wake_all(granted);
  return true;
}

RwLock::Ticket* RwLock::grant_locked() noexcept {
  Ticket* granted_head = nullptr;
  Ticket** granted_tail = &granted_head;
  while (head_) {
    Ticket* ticket = head_;
    if (ticket->writer) {
      if (owners_ != 0) break;
      owners_ = -1;
    } else {
      if (owners_ < 0) break;
      ++owners_;
    }
    head_ = ticket->next;
    if (head_ == nullptr) tail_ = nullptr;
    ticket->next = nullptr;
    *granted_tail = ticket;
    granted_tail = &ticket->next;
    if (ticket->writer) break;
  }
  return granted_head;
}

void RwLock::wake_all(Ticket* granted) noexcept {
  while (granted) {
    Ticket* next = granted->next;  // the ticket lives in the woken frame: read it first
    wake_later(granted->coroutine, "coro::RwLock");
    granted = next;
  }
}

void RwLock::unlock() noexcept {
  Ticket* granted;
  {
    std::lock_guard guard(mutex_);
    if (owners_ == 0) base::fatal("coro::RwLock::unlock() of a lock nobody holds");
    owners_ = owners_ < 0 ? 0 : owners_ - 1;
    granted = grant_locked();
  }
  wake_all(granted);
}

void RwLock::downgrade() noexcept {
  Ticket* granted;
  {
    std::lock_guard guard(mutex_);
    if (owners_ != -1) base::fatal("coro::RwLock::downgrade() without the write hold");
    owners_ = 1;
    granted = grant_locked();
  }
  wake_all(granted);
}

}  // namespace spindle::coro
