#include "block/block_node.h"

#include <algorithm>
#include <cerrno>
#include <vector>

namespace spindle::block {

coro::Task<int> BlockNode::write_zeroes(std::uint64_t offset, std::uint64_t bytes,
                                        std::uint32_t flags) {
  if (flags & kNoFallback) co_return -ENOTSUP;
  const BlockLimits node_limits = limits();
  std::uint64_t chunk = 1 << 20;
  if (node_limits.max_transfer != 0) chunk = std::min(chunk, node_limits.max_transfer);
  const std::uint32_t alignment = std::max<std::uint32_t>(node_limits.request_alignment, 1);
  const std::vector<std::byte> zeros(std::min(bytes, chunk));
  while (bytes > 0) {
    std::uint64_t length = std::min<std::uint64_t>(bytes, zeros.size());
    if (length < bytes) length -= length % alignment;  // keep the pieces aligned
    const int result = co_await write(offset, std::span(zeros.data(), length), flags & kFua);
    if (result < 0) co_return result;
    offset += length;
    bytes -= length;
  }
  co_return 0;
}

coro::Task<BlockStatus> BlockNode::block_status(std::uint64_t offset, std::uint64_t bytes) {
  BlockStatus status;
  status.flags = kStatusData | kStatusAllocated;
  status.bytes = bytes;
  if (offset + bytes >= size()) status.flags |= kStatusEof;
  co_return status;
}

coro::Task<void> BlockNode::quiesce() {
  if (BlockNode* backing = backing_node()) co_await backing->quiesce();
}

coro::Task<void> BlockNode::attach_context(aio::Context& context) {
  if (BlockNode* backing = backing_node()) co_await backing->attach_context(context);
}

}  // namespace spindle::block
