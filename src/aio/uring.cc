#include "aio/uring.h"

#include <cerrno>
#include <cstring>

#include "aio/context.h"
#include "base/fatal.h"

namespace spindle::aio {

std::unique_ptr<Uring> Uring::create(Context& context, unsigned entries) {
  // DEFER_TASKRUN needs a single issuer thread, which only a dedicated thread guarantees.
  struct Attempt {
    unsigned flags;
    bool deferred;
  };
  const Attempt dedicated[] = {
      {IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN, true},
      {IORING_SETUP_COOP_TASKRUN, false},
      {0, false},
  };
  const Attempt shared[] = {{IORING_SETUP_COOP_TASKRUN, false}, {0, false}};
  const bool has_thread = context.has_dedicated_thread();
  const Attempt* attempts = has_thread ? dedicated : shared;
  const int count = has_thread ? 3 : 2;
  for (int i = 0; i < count; ++i) {
    io_uring probe{};
    io_uring_params params{};
    params.flags = attempts[i].flags;
    if (io_uring_queue_init_params(entries, &probe, &params) == 0) {
      io_uring_queue_exit(&probe);
      return std::unique_ptr<Uring>(
          new Uring(context, entries, attempts[i].flags, attempts[i].deferred));
    }
  }
  return nullptr;
}

Uring::Uring(Context& context, unsigned entries, unsigned flags, bool deferred)
    : context_(context), deferred_task_run_(deferred) {
  io_uring_params params{};
  params.flags = flags;
  if (int error = io_uring_queue_init_params(entries, &ring_, &params); error < 0) {
    base::fatal("io_uring setup: {}", std::strerror(-error));
  }
  if (int error = io_uring_register_eventfd(&ring_, completions_.fd()); error < 0) {
    base::fatal("io_uring eventfd registration: {}", std::strerror(-error));
  }
  if (int error = context_.set_fd_handler(completions_.fd(), [this] { reap(); }, {}); error < 0) {
    base::fatal("io_uring: cannot watch the completion eventfd: {}", std::strerror(-error));
  }
}

Uring::~Uring() {
  if (in_flight_ != 0) base::fatal("io_uring destroyed with {} operations in flight", in_flight_);
  context_.remove_fd_handler(completions_.fd());
  io_uring_queue_exit(&ring_);
}

io_uring_sqe* Uring::next_sqe() noexcept {
  io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
  if (sqe == nullptr) {  // submission queue full: push what we have and try again
    flush();
    sqe = io_uring_get_sqe(&ring_);
    if (sqe == nullptr) base::fatal("io_uring: no submission queue entry after a flush");
  }
  return sqe;
}

void Uring::flush() noexcept {
  if (pending_submissions_ == 0) return;
  int submitted;
  do {
    // Also runs deferred completion work: page-cache hits complete during the submit, so
    // their completions can be delivered right away instead of after an eventfd round trip.
    submitted = deferred_task_run_ ? io_uring_submit_and_get_events(&ring_)
                                   : io_uring_submit(&ring_);
  } while (submitted == -EINTR);
  if (submitted < 0) base::fatal("io_uring_submit: {}", std::strerror(-submitted));
  pending_submissions_ = 0;
  deliver_completions();
}

void Uring::Operation::prepare(io_uring_sqe* sqe) noexcept {
  switch (opcode_) {
    case Opcode::read:
      io_uring_prep_read(sqe, fd_, buffer_, static_cast<unsigned>(length_), offset_);
      break;
    case Opcode::write:
      io_uring_prep_write(sqe, fd_, buffer_, static_cast<unsigned>(length_), offset_);
      break;
    case Opcode::readv:
      io_uring_prep_readv(sqe, fd_, static_cast<const iovec*>(buffer_),
                          static_cast<unsigned>(length_), offset_);
      break;
    case Opcode::writev:
      io_uring_prep_writev(sqe, fd_, static_cast<const iovec*>(buffer_),
                           static_cast<unsigned>(length_), offset_);
      break;
    case Opcode::fsync:
      io_uring_prep_fsync(sqe, fd_, 0);
      break;
    case Opcode::fdatasync:
      io_uring_prep_fsync(sqe, fd_, IORING_FSYNC_DATASYNC);
      break;
    case Opcode::fallocate:
      io_uring_prep_fallocate(sqe, fd_, mode_, offset_, length_);
      break;
  }
  io_uring_sqe_set_data(sqe, this);
}

void Uring::Operation::await_suspend(std::coroutine_handle<> handle) noexcept {
  coroutine_ = coro::park(handle);
  prepare(ring_.next_sqe());
  ++ring_.pending_submissions_;
  ++ring_.in_flight_;
}

void Uring::reap() noexcept {
  completions_.test_and_clear();
  if (deferred_task_run_) io_uring_get_events(&ring_);
  deliver_completions();
}

void Uring::deliver_completions() noexcept {
  io_uring_cqe* cqe;
  while (io_uring_peek_cqe(&ring_, &cqe) == 0) {
    auto* op = static_cast<Operation*>(io_uring_cqe_get_data(cqe));
    const int result = cqe->res;
    io_uring_cqe_seen(&ring_, cqe);
    if (result == -EAGAIN || result == -EINTR) {  // transient: submit it again
      op->prepare(next_sqe());
      ++pending_submissions_;
      continue;
    }
    --in_flight_;
    op->result_ = result;
    coro::wake(op->coroutine_, "Uring completion");  // may submit more operations
  }
}

}  // namespace spindle::aio
