#include "block/block_backend.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "aio/page_cache.h"
#include "base/fatal.h"
#include "coro/block_on.h"

namespace spindle::block {

BlockBackend::BlockBackend(BlockNodeRef root)
    : root_(std::move(root)),
      alignment_(std::max<std::uint32_t>(root_->limits().request_alignment, 1)),
      max_transfer_(root_->limits().max_transfer),
      home_(aio::current_context() ? aio::current_context() : &aio::main_context()) {
  if ((alignment_ & (alignment_ - 1)) != 0) {
    base::fatal("block node '{}' has a request alignment that is not a power of two",
                root_->driver_name());
  }
}

BlockBackend::~BlockBackend() {
  std::lock_guard lock(state_mutex_);
  if (in_flight_ != 0) base::fatal("BlockBackend destroyed with {} requests in flight", in_flight_);
}

int BlockBackend::check_request(std::uint64_t offset, std::uint64_t bytes) const noexcept {
  constexpr std::uint64_t kMax = std::numeric_limits<std::int64_t>::max();
  if (offset > kMax || bytes > kMax || offset + bytes > kMax) return -EINVAL;
  if (offset + bytes > size()) return -EIO;
  return 0;
}

// ---- in-flight tracking and drain ---------------------------------------------------------

coro::Task<void> BlockBackend::enter_request() {
  state_mutex_.lock();
  while (quiesce_ > 0) co_await quiesced_.wait(state_mutex_);
  ++in_flight_;
  state_mutex_.unlock();
}

void BlockBackend::leave_request() noexcept {
  std::lock_guard lock(state_mutex_);
  if (--in_flight_ == 0) idle_waiters_.restart_all();
}

class BlockBackend::InFlight {
 public:
  explicit InFlight(BlockBackend& backend) noexcept : backend_(backend) {}
  ~InFlight() { backend_.leave_request(); }
  InFlight(const InFlight&) = delete;
  InFlight& operator=(const InFlight&) = delete;

 private:
  BlockBackend& backend_;
};

coro::Task<void> BlockBackend::drained_begin() {
  state_mutex_.lock();
  ++quiesce_;
  while (in_flight_ > 0) co_await idle_waiters_.wait(state_mutex_);
  state_mutex_.unlock();
  // Nested or concurrent drained sections each call it; the nodes make it idempotent.
  co_await root_->quiesce();
}

void BlockBackend::drained_end() {
  std::lock_guard lock(state_mutex_);
  if (quiesce_ <= 0) base::fatal("BlockBackend::drained_end() without drained_begin()");
  if (--quiesce_ == 0) quiesced_.restart_all();
}

coro::Task<void> BlockBackend::drain() {
  co_await drained_begin();
  drained_end();
}

coro::Task<void> BlockBackend::move_to(aio::Context& target) {
  auto moving = co_await move_mutex_.scoped_lock();
  co_await drained_begin();
  co_await root_->attach_context(target);
  home_.store(&target, std::memory_order_release);
  drained_end();
}

void BlockBackend::move_to_blocking(aio::Context& target) { coro::block_on(move_to(target)); }

void BlockBackend::drain_blocking() { coro::block_on(drain()); }

std::int64_t BlockBackend::in_flight() const {
  std::lock_guard lock(state_mutex_);
  return in_flight_;
}

// ---- serialising tracked requests ---------------------------------------------------------

coro::Task<void> BlockBackend::track(Tracked& request) {
  auto conflicts = [&] {
    for (Tracked* other = tracked_; other; other = other->next) {
      const bool overlap = other->start < request.end && request.start < other->end;
      if (overlap && (other->serialising || request.serialising)) return true;
    }
    return false;
  };
  tracked_mutex_.lock();
  while (conflicts()) co_await tracked_waiters_.wait(tracked_mutex_);
  request.next = tracked_;
  tracked_ = &request;
  tracked_mutex_.unlock();
}

void BlockBackend::untrack(Tracked& request) noexcept {
  std::lock_guard lock(tracked_mutex_);
  for (Tracked** link = &tracked_; *link; link = &(*link)->next) {
    if (*link == &request) {
      *link = request.next;
      break;
    }
  }
  tracked_waiters_.restart_all();
}

// ---- data path ----------------------------------------------------------------------------

namespace {

// Issues `transfer(offset, piece)` for consecutive pieces of at most `max_transfer` bytes (0:
// unlimited), stopping at the first error.
template <typename Span, typename Transfer>
coro::Task<int> in_pieces(std::uint64_t offset, Span buffer, std::uint64_t max_transfer,
                          Transfer transfer) {
  while (!buffer.empty()) {
    std::size_t length = buffer.size();
    if (max_transfer != 0) length = std::min<std::size_t>(length, max_transfer);
    const int result = co_await transfer(offset, buffer.first(length));
    if (result < 0) co_return result;
    offset += length;
    buffer = buffer.subspan(length);
  }
  co_return 0;
}

}  // namespace

coro::Task<int> BlockBackend::read_aligned(std::uint64_t offset, std::span<std::byte> buffer,
                                           std::uint32_t flags) {
  return in_pieces(offset, buffer, max_transfer_,
                   [this, flags](std::uint64_t at, std::span<std::byte> piece) {
                     return root_->read(at, piece, flags);
                   });
}

coro::Task<int> BlockBackend::write_aligned(std::uint64_t offset,
                                            std::span<const std::byte> buffer,
                                            std::uint32_t flags) {
  return in_pieces(offset, buffer, max_transfer_,
                   [this, flags](std::uint64_t at, std::span<const std::byte> piece) {
                     return root_->write(at, piece, flags);
                   });
}

// ---- unaligned requests --------------------------------------------------------------------
//
// An unaligned request is split into a partial head block, an aligned middle and a partial
// tail block. Only the edge blocks go through a bounce buffer of one block; the middle goes
// down in place (or, for write_zeroes, as a write_zeroes). So no request allocates more than
// one block, whatever its length.

BlockBackend::Edges BlockBackend::edges(std::uint64_t offset, std::uint64_t bytes) const noexcept {
  Edges e;
  e.start = offset / alignment_ * alignment_;
  e.end = (offset + bytes + alignment_ - 1) / alignment_ * alignment_;
  const bool head_partial = offset % alignment_ != 0;
  const bool tail_partial = (offset + bytes) % alignment_ != 0;
  if (head_partial) e.head = e.start;
  if (tail_partial && !(head_partial && e.end - e.start == alignment_)) e.tail = e.end - alignment_;
  e.middle_begin = head_partial ? e.start + alignment_ : offset;
  e.middle_end = tail_partial ? e.end - alignment_ : offset + bytes;
  if (e.middle_end < e.middle_begin) e.middle_end = e.middle_begin;  // one block: no middle
  return e;
}

coro::Task<int> BlockBackend::read_unaligned(std::uint64_t offset, std::span<std::byte> buffer,
                                             std::uint32_t flags) {
  const Edges e = edges(offset, buffer.size());
  const std::uint64_t request_end = offset + buffer.size();
  if (e.middle_end > e.middle_begin) {
    const int result = co_await read_aligned(
        e.middle_begin, buffer.subspan(e.middle_begin - offset, e.middle_end - e.middle_begin),
        flags);
    if (result < 0) co_return result;
  }
  std::vector<std::byte> block(alignment_);
  const std::optional<std::uint64_t> edge_blocks[] = {e.head, e.tail};
  for (const std::optional<std::uint64_t>& edge : edge_blocks) {
    if (!edge) continue;
    const int result = co_await read_aligned(*edge, block, flags);
    if (result < 0) co_return result;
    const std::uint64_t from = std::max(offset, *edge);
    const std::uint64_t to = std::min(request_end, *edge + alignment_);
    std::memcpy(buffer.data() + (from - offset), block.data() + (from - *edge), to - from);
  }
  co_return 0;
}

coro::Task<int> BlockBackend::patch_block(std::uint64_t block_start, std::uint64_t offset,
                                          std::uint64_t bytes, const std::byte* data,
                                          std::span<std::byte> block, std::uint32_t flags) {
  int result = co_await read_aligned(block_start, block, 0);
  if (result < 0) co_return result;
  const std::uint64_t from = std::max(offset, block_start);
  const std::uint64_t to = std::min(offset + bytes, block_start + alignment_);
  if (data) {
    std::memcpy(block.data() + (from - block_start), data + (from - offset), to - from);
  } else {
    std::memset(block.data() + (from - block_start), 0, to - from);
  }
  co_return co_await write_aligned(block_start, block, flags);
}

coro::Task<int> BlockBackend::modify_unaligned(std::uint64_t offset, std::uint64_t bytes,
                                               const std::byte* data, std::uint32_t flags) {
  const Edges e = edges(offset, bytes);
  // Serialising over the whole range: overlapping requests wait, so no read-modify-write of an
  // edge block undoes another request's bytes.
  Tracked request{e.start, e.end, /*serialising=*/true};
  co_await track(request);
  int result = 0;
  std::vector<std::byte> block(alignment_);
  const std::uint32_t data_flags = flags & kFua;
  if (e.head) result = co_await patch_block(*e.head, offset, bytes, data, block, data_flags);
  if (result >= 0 && e.tail) {
    result = co_await patch_block(*e.tail, offset, bytes, data, block, data_flags);
  }
  if (result >= 0 && e.middle_end > e.middle_begin) {
    const std::uint64_t length = e.middle_end - e.middle_begin;
    if (data) {
      result = co_await write_aligned(
          e.middle_begin, std::span(data + (e.middle_begin - offset), length), flags);
    } else {
      result = co_await root_->write_zeroes(e.middle_begin, length, flags);
    }
  }
  untrack(request);
  co_return result;
}

// ---- data path ------------------------------------------------------------------------------

coro::Task<int> BlockBackend::read(std::uint64_t offset, std::span<std::byte> buffer,
                                   std::uint32_t flags) {
  if (int error = check_request(offset, buffer.size()); error < 0) co_return error;
  co_await enter_request();
  InFlight in_flight(*this);
  if (offset % alignment_ == 0 && buffer.size() % alignment_ == 0) {
    co_return co_await read_aligned(offset, buffer, flags);
  }
  co_return co_await read_unaligned(offset, buffer, flags);
}

coro::Task<int> BlockBackend::read_zero_copy(std::uint64_t offset, std::uint64_t bytes,
                                             HostFileSink& sink) {
  if (int error = check_request(offset, bytes); error < 0) co_return error;
  const std::optional<HostFileRange> range = root_->host_file_range(offset, bytes);
  if (!range || !aio::range_in_page_cache(range->fd, range->offset, bytes)) co_return -ENOTSUP;
  co_await enter_request();
  InFlight in_flight(*this);
  co_return co_await sink.send_from(range->fd, range->offset, bytes);
}

coro::Task<int> BlockBackend::write(std::uint64_t offset, std::span<const std::byte> buffer,
                                    std::uint32_t flags) {
  if (read_only()) co_return -EROFS;
  if (int error = check_request(offset, buffer.size()); error < 0) co_return error;
  co_await enter_request();
  InFlight in_flight(*this);
  if (offset % alignment_ != 0 || buffer.size() % alignment_ != 0) {
    co_return co_await modify_unaligned(offset, buffer.size(), buffer.data(), flags);
  }
  if (alignment_ == 1) co_return co_await write_aligned(offset, buffer, flags);
  // Aligned writes still wait for an overlapping read-modify-write in progress.
  Tracked request{offset, offset + buffer.size(), /*serialising=*/false};
  co_await track(request);
  const int result = co_await write_aligned(offset, buffer, flags);
  untrack(request);
  co_return result;
}

coro::Task<int> BlockBackend::write_zeroes(std::uint64_t offset, std::uint64_t bytes,
                                           std::uint32_t flags) {
  if (read_only()) co_return -EROFS;
  if (int error = check_request(offset, bytes); error < 0) co_return error;
  const bool aligned = offset % alignment_ == 0 && bytes % alignment_ == 0;
  // Unaligned edges are written as data: not the fast zeroing that kNoFallback asks for.
  if (!aligned && (flags & kNoFallback)) co_return -ENOTSUP;
  co_await enter_request();
  InFlight in_flight(*this);
  if (!aligned) co_return co_await modify_unaligned(offset, bytes, nullptr, flags);
  if (alignment_ == 1) co_return co_await root_->write_zeroes(offset, bytes, flags);
  Tracked request{offset, offset + bytes, /*serialising=*/false};
  co_await track(request);
  const int result = co_await root_->write_zeroes(offset, bytes, flags);
  untrack(request);
  co_return result;
}

coro::Task<int> BlockBackend::discard(std::uint64_t offset, std::uint64_t bytes) {
  if (read_only()) co_return -EROFS;
  if (int error = check_request(offset, bytes); error < 0) co_return error;
  // Discard is advisory: shrink to whole aligned blocks.
  const std::uint64_t start = (offset + alignment_ - 1) / alignment_ * alignment_;
  const std::uint64_t end = (offset + bytes) / alignment_ * alignment_;
  if (end <= start) co_return 0;
  co_await enter_request();
  InFlight in_flight(*this);
  if (alignment_ == 1) co_return co_await root_->discard(start, end - start);
  // Like an aligned write, it must not land inside another request's read-modify-write.
  Tracked request{start, end, /*serialising=*/false};
  co_await track(request);
  const int result = co_await root_->discard(start, end - start);
  untrack(request);
  co_return result;
}

coro::Task<int> BlockBackend::flush() {
  co_await enter_request();
  InFlight in_flight(*this);
  co_return co_await root_->flush();
}

coro::Task<BlockStatus> BlockBackend::block_status(std::uint64_t offset, std::uint64_t bytes) {
  const std::uint64_t image_size = size();
  if (offset >= image_size) co_return BlockStatus{kStatusEof, 0, 0};
  bytes = std::min(bytes, image_size - offset);
  co_await enter_request();
  InFlight in_flight(*this);
  BlockStatus status = co_await root_->block_status(offset, bytes);
  status.bytes = std::min(std::max<std::uint64_t>(status.bytes, 1), bytes);
  // Not allocated in this layer: the backing chain decides what the range holds.
  for (BlockNode* node = root_.get(); status.error == 0 && !(status.flags & kStatusAllocated);) {
    BlockNode* backing = node->backing_node();
    if (backing == nullptr) break;
    if (offset >= backing->size()) {  // past the end of the backing file: zeros
      status.flags = kStatusZero;
      break;
    }
    const std::uint64_t length = std::min(status.bytes, backing->size() - offset);
    const BlockStatus below = co_await backing->block_status(offset, length);
    status.flags = below.flags;
    status.error = below.error;
    status.bytes = std::min(std::max<std::uint64_t>(below.bytes, 1), length);
    node = backing;
  }
  co_return status;
}

// ---- blocking wrappers --------------------------------------------------------------------

int BlockBackend::read_blocking(std::uint64_t offset, std::span<std::byte> buffer,
                                std::uint32_t flags) {
  return coro::block_on(read(offset, buffer, flags));
}

int BlockBackend::write_blocking(std::uint64_t offset, std::span<const std::byte> buffer,
                                 std::uint32_t flags) {
  return coro::block_on(write(offset, buffer, flags));
}

int BlockBackend::flush_blocking() { return coro::block_on(flush()); }

}  // namespace spindle::block
