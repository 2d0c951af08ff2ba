// BlockBackend: what users of an image hold (the NBD server, spindle-img, tests). It sits on the
// root node of a graph and turns arbitrary byte requests into what drivers accept:
//   * bounds: requests beyond the end fail with -EIO (-EINVAL for lengths that overflow);
//   * alignment: unaligned reads go through an aligned bounce buffer; unaligned writes become
//     read-modify-write under a *serialising* tracked request, so overlapping requests wait
//     for it and concurrent RMWs of one block never lose each other's bytes;
//   * splitting by the root's max_transfer;
//   * in-flight tracking and drain(): drained_begin() waits until nothing is in flight and
//     holds new requests back until drained_end();
//   * blocking wrappers (read_blocking, ...) for callers outside coroutines: they run the
//     request as a coroutine and poll the calling thread's context until it finishes.
//
// Thread-safety: any number of coroutines on any contexts may use one backend at once.
// `state_mutex_` (a std::mutex, never held across a suspension; waits go through coro::Queue)
// protects in_flight_, quiesce_ and both wait queues. `tracked_mutex_` protects the tracked
// request list and its queue. The root node is immutable after construction.
#pragma once

#include <cstdint>
#include <mutex>
#include <span>

#include "block/block_node.h"
#include "coro/queue.h"
#include "coro/task.h"

namespace spindle::block {

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
  coro::Task<int> write_zeroes(std::uint64_t offset, std::uint64_t bytes, std::uint32_t flags = 0);
  coro::Task<int> discard(std::uint64_t offset, std::uint64_t bytes);
  coro::Task<int> flush();
  coro::Task<BlockStatus> block_status(std::uint64_t offset, std::uint64_t bytes);

  coro::Task<void> drained_begin();
  void drained_end();
  coro::Task<void> drain();  // drained_begin() + drained_end()
  std::int64_t in_flight() const;

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
  coro::Task<int> write_unaligned(std::uint64_t offset, std::span<const std::byte> buffer,
                                  std::uint32_t flags);

  const BlockNodeRef root_;
  const std::uint32_t alignment_;
  const std::uint64_t max_transfer_;

  mutable std::mutex state_mutex_;
  std::int64_t in_flight_ = 0;
  int quiesce_ = 0;
  coro::Queue quiesced_;      // requests waiting for drained_end()
  coro::Queue idle_waiters_;  // drained_begin() waiting for in_flight_ == 0

  std::mutex tracked_mutex_;
  Tracked* tracked_ = nullptr;
  coro::Queue tracked_waiters_;
};

}  // namespace spindle::block
