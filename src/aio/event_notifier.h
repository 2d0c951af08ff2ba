// EventNotifier: an eventfd that one thread sets and an fd handler on some Context consumes.
//
// Thread-safety: set() and test_and_clear() may be called from any thread at any time (they are
// single syscalls on the eventfd); construction and destruction belong to the owner.
#pragma once

namespace spindle::aio {

class EventNotifier {
 public:
  EventNotifier();  // aborts if the eventfd cannot be created (fd exhaustion is fatal here)
  ~EventNotifier();
  EventNotifier(const EventNotifier&) = delete;
  EventNotifier& operator=(const EventNotifier&) = delete;

  int fd() const noexcept { return fd_; }
  void set() noexcept;
  // Returns whether the notifier was set, and clears it.
  bool test_and_clear() noexcept;

 private:
  int fd_;
};

}  // namespace spindle::aio
