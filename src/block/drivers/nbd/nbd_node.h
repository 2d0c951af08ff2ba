// The `nbd` protocol driver: a BlockNode over a remote NBD export (uri.h for the URI forms),
// through one or more ClientConnections.
//
//   limits():  request_alignment = the server's minimum block size (INFO_BLOCK_SIZE, else 1);
//              max_transfer = its maximum payload, capped at 32 MiB and aligned down.
//   read/write: one NBD command each (BlockBackend has aligned and split them). kFua maps to
//              NBD_CMD_FLAG_FUA when the server offers SEND_FUA, else write + flush.
//   write_zeroes: WRITE_ZEROES (NO_HOLE unless kMayUnmap; FAST_ZERO with kNoFallback when
//              offered, -ENOTSUP when not); without SEND_WRITE_ZEROES, zero buffers (or
//              -ENOTSUP with kNoFallback). Lengths over 2^32 are split.
//   discard:   TRIM when offered, else nothing (advisory).
//   block_status: base:allocation (HOLE → not data, ZERO → zero), else "all data". One
//              BLOCK_STATUS (no REQ_ONE) asks for the rest of the export (up to 4 GiB) and the
//              extents that come back are cached, so a map walk costs one round trip per
//              server reply, not one per extent. Our own writes, zeroes and trims drop the
//              cache; a reply that raced with one of them is not cached; entries live one
//              second, which bounds how stale another client's writes can leave them. An
//              error reply is the status's `error` (what the server cannot describe, a
//              tool must not copy as data).
//   connections=N: when the server advertises CAN_MULTI_CONN, N connections, the first on the
//              opening context and the others each on an IoThread owned by the node; a request
//              uses the connection on its own context if there is one, else round-robin. (A
//              server without CAN_MULTI_CONN gets one connection: the protocol promises no
//              cross-connection consistency then.)
//
// Thread-safety: requests from coroutines on any contexts at once (each connection hops to its
// context and back). The connection and thread vectors are immutable after open; `next_` is an
// atomic round-robin counter; `cache_mutex_` guards the extent cache (never held across a
// suspension). close() once, after the last request: it flushes and sends NBD_CMD_DISC. The
// destructor without close() aborts the connections (NBD_CMD_DISC if it can go out at once).
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "aio/io_thread.h"
#include "block/block_node.h"
#include "block/drivers/nbd/client_connection.h"
#include "block/drivers/nbd/uri.h"
#include "coro/task.h"

namespace spindle::block::nbd {

struct NbdOpenResult {
  BlockNodeRef node;  // null on failure
  int error = 0;      // positive errno
  std::string message;
};

// Opens `uri` (see uri.h). Writable opens of a read-only export fail with EACCES. Call from a
// coroutine; the first connection's home is the calling context, which must keep being polled
// while the node is used.
coro::Task<NbdOpenResult> open_nbd(std::string uri, bool read_only);

class NbdNode final : public BlockNode {
 public:
  NbdNode(std::string filename, std::vector<std::shared_ptr<ClientConnection>> connections,
          std::vector<std::unique_ptr<aio::IoThread>> threads, bool read_only);
  ~NbdNode() override;

  const char* driver_name() const noexcept override { return "nbd"; }
  std::string filename() const override { return filename_; }
  std::uint64_t size() const noexcept override { return details_.size; }
  BlockLimits limits() const noexcept override { return limits_; }
  bool read_only() const noexcept override { return read_only_; }
  std::size_t connection_count() const noexcept { return connections_.size(); }
  const ExportDetails& details() const noexcept { return details_; }

  coro::Task<int> read(std::uint64_t offset, std::span<std::byte> buffer,
                       std::uint32_t flags) override;
  coro::Task<int> write(std::uint64_t offset, std::span<const std::byte> buffer,
                        std::uint32_t flags) override;
  coro::Task<int> flush() override;
  coro::Task<int> write_zeroes(std::uint64_t offset, std::uint64_t bytes,
                               std::uint32_t flags) override;
  coro::Task<int> discard(std::uint64_t offset, std::uint64_t bytes) override;
  coro::Task<BlockStatus> block_status(std::uint64_t offset, std::uint64_t bytes) override;
  // Flushes (if writable), then disconnects every connection.
  coro::Task<int> close() override;

 private:
  ClientConnection& pick() noexcept;
  bool has(std::uint16_t flag) const noexcept { return (details_.flags & flag) != 0; }
  // Largest length for a payload-less command: u32, aligned down.
  std::uint64_t max_effect_length() const noexcept;
  // The cached extent containing `offset`: true with its flags and the bytes left in it.
  bool cached_extent(std::uint64_t offset, ExtentStatus& extent);
  void store_extents(std::uint64_t offset, std::uint64_t generation,
                     std::vector<ExtentStatus> extents);
  void drop_extents() noexcept;

  const std::string filename_;
  const std::vector<std::shared_ptr<ClientConnection>> connections_;
  std::vector<std::unique_ptr<aio::IoThread>> threads_;  // after connections_: joined first
  const ExportDetails details_;
  const bool read_only_;
  BlockLimits limits_;
  std::atomic<std::size_t> next_{0};
  std::atomic<bool> closed_{false};

  std::mutex cache_mutex_;
  std::uint64_t cache_generation_ = 0;  // bumped by every change we make (cache_mutex_)
  std::uint64_t cache_offset_ = 0;      // where cache_extents_ start (cache_mutex_)
  std::int64_t cache_time_ns_ = 0;      // when they were stored, monotonic (cache_mutex_)
  std::vector<ExtentStatus> cache_extents_;  // cache_mutex_
  std::size_t cache_hint_ = 0;             // index of the last hit (cache_mutex_)
  std::uint64_t cache_hint_start_ = 0;     // where that extent starts (cache_mutex_)
};

}  // namespace spindle::block::nbd
