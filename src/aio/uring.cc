#include "aio/uring.h"

#include <atomic>
#include <cerrno>
#include <cstring>

#include "aio/context.h"
#include "base/fatal.h"

namespace spindle::aio {

namespace {
// The kernel's IO_LOCAL_TW_DEFAULT_MAX: deferred completions run per io_uring_enter (6.13+).
constexpr unsigned kDeferredWorkBatch = 20;
constexpr unsigned kNeedsEnterFlags = IORING_SQ_TASKRUN | IORING_SQ_CQ_OVERFLOW;
}  // namespace

std::unique_ptr<Uring> Uring::create(Context& context, unsigned entries) {
  // DEFER_TASKRUN needs a single issuer thread, which only a dedicated thread guarantees.
  struct Attempt {
    unsigned flags;
    bool deferred;
  };
  const Attempt dedicated[] = {
      {IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_TASKRUN_FLAG, true},
      {IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN, true},
      {IORING_SETUP_COOP_TASKRUN, false},
      {0, false},
  };
  const Attempt shared[] = {{IORING_SETUP_COOP_TASKRUN, false}, {0, false}};
  const bool has_thread = context.has_dedicated_thread();
  const Attempt* attempts = has_thread ? dedicated : shared;
  const int count = has_thread ? 4 : 2;
  for (int i = 0; i < count; ++i) {
    io_uring probe{};
    io_uring_params params{};
    params.flags = attempts[i].flags;
    if (io_uring_queue_init_params(entries, &probe, &params) == 0) {
      io_uring_queue_exit(&probe);
      return std::unique_ptr<Uring>(
          new Uring(entries, attempts[i].flags, attempts[i].deferred));
    }
  }
  return nullptr;
}

Uring::Uring(unsigned entries, unsigned flags, bool deferred)
    : deferred_task_run_(deferred),
      taskrun_flag_((flags & IORING_SETUP_TASKRUN_FLAG) != 0) {
  io_uring_params params{};
  params.flags = flags;
  if (int error = io_uring_queue_init_params(entries, &ring_, &params); error < 0) {
    base::fatal("io_uring setup: {}", std::strerror(-error));
  }
  if (int error = io_uring_register_eventfd(&ring_, completions_.fd()); error < 0) {
    base::fatal("io_uring eventfd registration: {}", std::strerror(-error));
  }
  // The context adds completions_ to its epoll set. Off while the loop is awake, if we can.
  if (deferred_task_run_ && taskrun_flag_ && io_uring_cq_eventfd_toggle(&ring_, false) == 0) {
    toggles_eventfd_ = true;
    eventfd_on_ = false;
  }
}

Uring::~Uring() {
  if (in_flight_ != 0) base::fatal("io_uring destroyed with {} operations in flight", in_flight_);
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

bool Uring::flush() noexcept {
  if (pending_submissions_ == 0) return completions_ready() && reap_ring();
  int submitted;
  do {
    // Also runs deferred completion work: page-cache hits complete during the submit, so
    // their completions are delivered right away instead of after an eventfd round trip.
    submitted = deferred_task_run_ ? io_uring_submit_and_get_events(&ring_)
                                   : io_uring_submit(&ring_);
  } while (submitted == -EINTR);
  if (submitted < 0) base::fatal("io_uring_submit: {}", std::strerror(-submitted));
  pending_submissions_ = 0;
  const unsigned delivered = deliver_completions();
  leftover_work_ = deferred_task_run_ && delivered >= kDeferredWorkBatch;
  return delivered != 0;
}

bool Uring::completions_ready() const noexcept {
  if (in_flight_ == 0) return false;
  return io_uring_cq_ready(&ring_) != 0 || leftover_work_ ||
         (IO_URING_READ_ONCE(*ring_.sq.kflags) & kNeedsEnterFlags) != 0;
}

bool Uring::prepare_to_sleep() noexcept {
  if (in_flight_ == 0) return false;  // nothing can complete: the eventfd stays as it is
  if (toggles_eventfd_ && !eventfd_on_) {
    io_uring_cq_eventfd_toggle(&ring_, true);
    eventfd_on_ = true;
    // Orders the store of the cq flags before the loads of the sq flags and the CQ tail (the
    // Dekker pair with the kernel described in the header).
    std::atomic_thread_fence(std::memory_order_seq_cst);
  }
  return completions_ready();
}

void Uring::after_wake() noexcept {
  if (toggles_eventfd_ && eventfd_on_) {
    io_uring_cq_eventfd_toggle(&ring_, false);
    eventfd_on_ = false;
  }
}

bool Uring::reap() noexcept {
  completions_.test_and_clear();
  return reap_ring();
}

bool Uring::reap_ring() noexcept {
  if (deferred_task_run_ &&
      (leftover_work_ || !taskrun_flag_ ||
       (IO_URING_READ_ONCE(*ring_.sq.kflags) & kNeedsEnterFlags) != 0)) {
    io_uring_get_events(&ring_);
  }
  const unsigned delivered = deliver_completions();
  leftover_work_ = deferred_task_run_ && delivered >= kDeferredWorkBatch;
  return delivered != 0;
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

void Uring::Operation::start(Completion completion, void* argument) noexcept {
  completion_ = completion;
  argument_ = argument;
  prepare(ring_.next_sqe());
  ++ring_.pending_submissions_;
  ++ring_.in_flight_;
}

unsigned Uring::deliver_completions() noexcept {
  unsigned delivered = 0;
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
    ++delivered;
    op->result_ = result;
    op->completion_(op, op->argument_);  // may start more operations
  }
  return delivered;
}

}  // namespace spindle::aio
