// BlockNode: one node of the block graph — a format driver (raw, qed), a protocol driver
// (file, null, nbd) or a filter (blkdebug, throttle). Every data path entry point is a
// coroutine returning 0 (or a value) on success and -errno on failure.
//
// Requests arriving here are already checked and aligned by BlockBackend: offsets and lengths
// are multiples of limits().request_alignment, within size() (except where a driver says it
// grows), and no longer than limits().max_transfer. Drivers run on the calling coroutine's
// context; file I/O goes through that context's io_uring or thread pool.
//
// Thread-safety: a node may be called from coroutines on several contexts at once; each driver
// documents what protects its own state (metadata caches, allocation). Graph edges (children)
// are set at open time and immutable afterwards.
//
// Contexts: requests run on whatever context calls them, so most nodes are not tied to one.
// A node with background work of its own (QED's need-check timer) keeps it on one *home*
// context: the context that opened it, until BlockBackend::move_to() calls attach_context().
#pragma once

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>

#include "coro/task.h"

namespace spindle::aio {
class Context;
}

namespace spindle::block {

// Request flags (values as QEMU's BdrvRequestFlags).
enum RequestFlag : std::uint32_t {
  kMayUnmap = 0x4,     // write_zeroes may deallocate (punch a hole)
  kFua = 0x10,         // the write is durable when it completes
  // write: store the data compressed (qemu-img convert -c). Nodes of a format whose
  // can_compress() is true take it for one whole cluster at a cluster-aligned offset (the
  // image's last cluster may be short) that holds nothing yet (else -EINVAL); filters pass it
  // on; other nodes ignore it, so callers check can_compress() first.
  kWriteCompressed = 0x20,
  kNoFallback = 0x100  // write_zeroes: fail with -ENOTSUP rather than write zero buffers
};

// Block status flags (values as QEMU's BDRV_BLOCK_*).
enum StatusFlag : std::uint32_t {
  kStatusData = 0x01,         // the range holds data (read it)
  kStatusZero = 0x02,         // the range reads as zeros
  kStatusOffsetValid = 0x04,  // `file_offset` says where the data lives in the child
  kStatusAllocated = 0x10,    // this node (not a backing file) decides the content
  kStatusEof = 0x20,          // the range reaches the end of the node
};

struct BlockStatus {
  std::uint32_t flags = 0;
  std::uint64_t bytes = 0;  // length of the run with these flags, starting at the query offset
  std::uint64_t file_offset = 0;
  // Negative errno when the node cannot say what the range holds (its metadata is corrupt or
  // unreadable); `flags` then mean nothing, and reading the range fails the same way.
  int error = 0;
};

// Where a node's bytes lie unchanged in a host file (see BlockNode::host_file_range).
struct HostFileRange {
  int fd = -1;
  std::uint64_t offset = 0;
};

struct BlockLimits {
  std::uint32_t request_alignment = 1;  // power of two
  std::uint64_t max_transfer = 0;       // 0: unlimited
};

class BlockNode {
 public:
  virtual ~BlockNode() = default;

  virtual const char* driver_name() const noexcept = 0;
  virtual std::string filename() const { return {}; }
  virtual std::uint64_t size() const noexcept = 0;
  virtual BlockLimits limits() const noexcept { return {}; }
  virtual bool read_only() const noexcept { return false; }
  // The node that supplies content this one does not allocate (a format's backing file).
  virtual BlockNode* backing_node() const noexcept { return nullptr; }

  virtual coro::Task<int> read(std::uint64_t offset, std::span<std::byte> buffer,
                               std::uint32_t flags) = 0;
  virtual coro::Task<int> write(std::uint64_t offset, std::span<const std::byte> buffer,
                                std::uint32_t flags) = 0;
  virtual coro::Task<int> flush() { co_return 0; }
  // Default: writes a zero buffer (unless kNoFallback).
  virtual coro::Task<int> write_zeroes(std::uint64_t offset, std::uint64_t bytes,
                                       std::uint32_t flags);
  // Default: nothing (discard is advisory).
  virtual coro::Task<int> discard(std::uint64_t offset, std::uint64_t bytes) { co_return 0; }
  // Default: all data, allocated here.
  virtual coro::Task<BlockStatus> block_status(std::uint64_t offset, std::uint64_t bytes);
  virtual coro::Task<int> truncate(std::uint64_t new_size) { co_return -ENOTSUP; }

  // Where [offset, offset + bytes) is stored byte for byte in a host file read through the
  // page cache (not O_DIRECT), so that a sender may pass those pages on with sendfile()
  // instead of reading them. The default is "nowhere": nodes that transform, filter, count or
  // inject faults into reads must see every read, so only pass-through nodes override it.
  // Any thread; the fd stays open as long as the node.
  virtual std::optional<HostFileRange> host_file_range(std::uint64_t offset,
                                                       std::uint64_t bytes) const noexcept {
    return std::nullopt;
  }
  // Writes back cached metadata and marks the image clean (called before closing).
  virtual coro::Task<int> close() { co_return co_await flush(); }

  // ---- graph-wide operations, called by BlockBackend inside a drained section -------------
  // Both may be called from any context; both must reach every node below this one that has
  // background work. The defaults forward to backing_node() (the only edge the base class
  // knows): right for leaf protocol nodes (file, null, nbd: nothing to do) and for raw over a
  // protocol node. Nodes with children (filters, formats) override them to forward.

  // The backend's requests have drained: finish background work that would otherwise touch
  // the image later (QED: clear the need-check bit now instead of on its idle timer).
  virtual coro::Task<void> quiesce();
  // Points the child edge `role` ("file", "backing") at `child` (null: none, where the role
  // allows it). Only inside a drained section of every backend that reaches this node, from
  // one thread. 0; -ENOENT: no such role; -EINVAL: the child does not fit (size); -ENOTSUP:
  // this node's children are fixed. Default: -ENOTSUP.
  virtual int replace_child(std::string_view role, std::shared_ptr<BlockNode> child) {
    return -ENOTSUP;
  }

  // Moves the node's background work (timers) to `context`. Requests are not affected: they
  // keep running on their callers' contexts. Every context involved must be running (polled)
  // until it returns. Never called concurrently with itself for one node.
  virtual coro::Task<void> attach_context(aio::Context& context);
};

using BlockNodeRef = std::shared_ptr<BlockNode>;

}  // namespace spindle::block
