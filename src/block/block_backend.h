// BlockBackend: what users of an image hold (the NBD server, spindle-img, tests). It sits on the
// root node of a graph and turns arbitrary byte requests into what drivers accept:
//   * bounds: requests beyond the end fail with -EIO (-EINVAL for lengths that overflow);
//   * alignment: the partial edge blocks of an unaligned read go through a one-block bounce
//     buffer and the aligned middle is read in place; unaligned writes and write_zeroes
//     read-modify-write their edge blocks under a *serialising* tracked request over the whole
//     range and pass the aligned middle down, so overlapping requests (writes, write_zeroes
//     and discards, which are tracked too) wait for it and never lose each other's bytes.
//     No request allocates more than one block, whatever its length;
//   * splitting by the root's max_transfer;
//   * in-flight tracking and drain(): drained_begin() waits until nothing is in flight, holds
//     new requests back until drained_end(), and tells the graph to finish its background
//     work (BlockNode::quiesce: QED clears its need-check bit);
//   * a home context and move_to(): the context that owns the graph's background work (QED's
//     need-check timer). Requests do NOT hop to it: they run on their caller's context, from
//     any number of contexts at once, before and after a move (the nodes are thread-safe).
//     move_to() drains, moves the background work (BlockNode::attach_context) and ends the
//     drained section; requests issued meanwhile wait and then run normally;
//   * blocking wrappers (read_blocking, ...) for callers outside coroutines: they run the
//     request as a coroutine and poll the calling thread's context until it finishes.
//
// Thread-safety: any number of coroutines on any contexts may use one backend at once.
// `state_mutex_` (a std::mutex, never held across a suspension; waits go through coro::Queue)
// protects in_flight_, quiesce_ and both wait queues. `tracked_mutex_` protects the tracked
// request list and its queue. The root node is immutable after construction. `home_` is an
// atomic written only by move_to(); `move_mutex_` (a coro::Mutex) serializes moves.
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>
#include <optional>
#include <span>

#include "aio/context.h"
#include "block/block_node.h"
#include "coro/mutex.h"
#include "coro/queue.h"
#include "coro/task.h"

namespace spindle::block {

// Takes a range of an image as pages of a host file rather than as bytes in memory
// (BlockBackend::read_zero_copy), e.g. to sendfile() them to a socket.
// Thread-safety: send_from() runs in the coroutine that called read_zero_copy(), on its
// context, once per call; the sink needs no locking of its own for that.
class HostFileSink {
 public:
  // Passes on `bytes` bytes of `fd` from `file_offset`: 0 or -errno.
  virtual coro::Task<int> send_from(int fd, std::uint64_t file_offset, std::uint64_t bytes) = 0;

 protected:
  ~HostFileSink() = default;
};

class BlockBackend {
 public:
  explicit BlockBackend(BlockNodeRef root);
  ~BlockBackend();
  BlockBackend(const BlockBackend&) = delete;
  BlockBackend& operator=(const BlockBackend&) = delete;

  const BlockNodeRef& root() const noexcept { return root_; }
  std::uint64_t size() const noexcept { return root_->size(); }
  bool read_only() const noexcept { return root_->read_only(); }

  coro::Task<int> read(std::uint64_t offset, std::span<std::byte> buffer, std::uint32_t flags = 0);
  coro::Task<int> write(std::uint64_t offset, std::span<const std::byte> buffer,
                        std::uint32_t flags = 0);
  // A read without copying: when the whole range lies unchanged in a host file
  // (BlockNode::host_file_range) and in the page cache (so that passing it on cannot stall the
  // caller's event loop on the disk), calls sink.send_from() as a request of this backend
  // (drain waits for it) and returns its result. Otherwise returns -ENOTSUP without calling
  // the sink: use read(). Bounds are checked as for read().
  coro::Task<int> read_zero_copy(std::uint64_t offset, std::uint64_t bytes, HostFileSink& sink);
  coro::Task<int> write_zeroes(std::uint64_t offset, std::uint64_t bytes, std::uint32_t flags = 0);
  coro::Task<int> discard(std::uint64_t offset, std::uint64_t bytes);
  coro::Task<int> flush();
  coro::Task<BlockStatus> block_status(std::uint64_t offset, std::uint64_t bytes);

  coro::Task<void> drained_begin();
  void drained_end();
  coro::Task<void> drain();  // drained_begin() + drained_end()
  void drain_blocking();
  std::int64_t in_flight() const;

  // The context that owns the graph's background work: the constructing thread's context
  // (main_context() on threads without one) until move_to(). Any thread.
  aio::Context& home() const noexcept { return *home_.load(std::memory_order_acquire); }
  // Moves the graph's background work to `target` while requests may be running: drains
  // (in-flight requests finish, new ones wait), calls root()->attach_context(target), records
  // `target` as home() and lets the waiting requests go. Any coroutine, any context; the
  // graph's old and new home contexts must be running (polled) until it returns. Concurrent
  // moves run one after another. Not from inside a request of this backend (like drain(), it
  // would wait for itself).
  coro::Task<void> move_to(aio::Context& target);
  void move_to_blocking(aio::Context& target);  // for non-coroutine callers

  // Blocking wrappers, for code that is not a coroutine (polls the current context).
  int read_blocking(std::uint64_t offset, std::span<std::byte> buffer, std::uint32_t flags = 0);
  int write_blocking(std::uint64_t offset, std::span<const std::byte> buffer,
                     std::uint32_t flags = 0);
  int flush_blocking();

 private:
  struct Tracked {
    std::uint64_t start;
    std::uint64_t end;
    bool serialising;
    Tracked* next = nullptr;
  };
  class InFlight;  // RAII: counts a request as in flight, waiting out drained sections

  int check_request(std::uint64_t offset, std::uint64_t bytes) const noexcept;
  coro::Task<void> enter_request();
  void leave_request() noexcept;
  coro::Task<void> track(Tracked& request);
  void untrack(Tracked& request) noexcept;
  coro::Task<int> read_aligned(std::uint64_t offset, std::span<std::byte> buffer,
                               std::uint32_t flags);
  coro::Task<int> write_aligned(std::uint64_t offset, std::span<const std::byte> buffer,
                                std::uint32_t flags);
  // An unaligned range: the partial edge blocks (head, tail: block starts; absent when that
  // edge is aligned or both lie in one block) and the aligned middle [middle_begin, middle_end).
  struct Edges {
    std::uint64_t start = 0, end = 0;  // the range rounded out to whole blocks
    std::optional<std::uint64_t> head, tail;
    std::uint64_t middle_begin = 0, middle_end = 0;
  };
  Edges edges(std::uint64_t offset, std::uint64_t bytes) const noexcept;
  coro::Task<int> read_unaligned(std::uint64_t offset, std::span<std::byte> buffer,
                                 std::uint32_t flags);
  // Writes `data` (or zeros when null) over [offset, offset + bytes) inside the block at
  // `block_start`, by read-modify-write through `block` (one block of scratch).
  coro::Task<int> patch_block(std::uint64_t block_start, std::uint64_t offset, std::uint64_t bytes,
                              const std::byte* data, std::span<std::byte> block,
                              std::uint32_t flags);
  // An unaligned write (data) or write_zeroes (data == nullptr), serialised over its blocks.
  coro::Task<int> modify_unaligned(std::uint64_t offset, std::uint64_t bytes,
                                   const std::byte* data, std::uint32_t flags);

  const BlockNodeRef root_;
  const std::uint32_t alignment_;
  const std::uint64_t max_transfer_;

  mutable std::mutex state_mutex_;
  std::int64_t in_flight_ = 0;
  int quiesce_ = 0;
  coro::Queue quiesced_;      // requests waiting for drained_end()
  coro::Queue idle_waiters_;  // drained_begin() waiting for in_flight_ == 0

  std::atomic<aio::Context*> home_;
  coro::Mutex move_mutex_;

  std::mutex tracked_mutex_;
  Tracked* tracked_ = nullptr;
  coro::Queue tracked_waiters_;
};

}  // namespace spindle::block
