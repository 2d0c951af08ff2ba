#include "aio/uring_probe.h"

#include <liburing.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>

namespace spindle::aio {

UringProbe probe_uring() noexcept {
  UringProbe result;
  auto fail = [&result](const char* step, int error) {
    result.available = false;
    result.step = step;
    result.error = error;
    return result;
  };
  io_uring ring{};
  if (int error = io_uring_queue_init(2, &ring, 0); error < 0) {
    return fail("io_uring_setup", -error);
  }
  struct Ring {  // io_uring_queue_exit on every path below
    io_uring* ring;
    ~Ring() { io_uring_queue_exit(ring); }
  } guard{&ring};

  const int event_fd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (event_fd < 0) return fail("eventfd", errno);
  const int registered = io_uring_register_eventfd(&ring, event_fd);
  ::close(event_fd);
  if (registered < 0) return fail("io_uring_register", -registered);

  io_uring_sqe* sqe = io_uring_get_sqe(&ring);
  if (sqe == nullptr) return fail("io_uring_get_sqe", EBUSY);
  io_uring_prep_nop(sqe);
  if (int submitted = io_uring_submit_and_wait(&ring, 1); submitted < 0) {
    return fail("io_uring_enter", -submitted);
  }
  io_uring_cqe* cqe = nullptr;
  if (int error = io_uring_peek_cqe(&ring, &cqe); error < 0 || cqe == nullptr) {
    return fail("io_uring_enter", error < 0 ? -error : EIO);
  }
  const int nop = cqe->res;
  io_uring_cqe_seen(&ring, cqe);
  if (nop < 0) return fail("IORING_OP_NOP", -nop);
  result.available = true;
  return result;
}

}  // namespace spindle::aio
