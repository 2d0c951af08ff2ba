#include "aio/event_notifier.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>

#include "base/fatal.h"

namespace spindle::aio {

EventNotifier::EventNotifier() : fd_(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) {
  if (fd_ < 0) base::fatal("eventfd: {}", std::strerror(errno));
}

EventNotifier::~EventNotifier() { ::close(fd_); }

void EventNotifier::set() noexcept {
  const std::uint64_t one = 1;
  // EAGAIN only when the counter would overflow, which still leaves it set.
  while (::write(fd_, &one, sizeof one) < 0 && errno == EINTR) {
  }
}

bool EventNotifier::test_and_clear() noexcept {
  std::uint64_t value = 0;
  ssize_t n;
  do {
    n = ::read(fd_, &value, sizeof value);
  } while (n < 0 && errno == EINTR);
  return n == sizeof value && value != 0;
}

}  // namespace spindle::aio
