#include "chain_status.h"

#include <algorithm>
#include <memory>

namespace spindle::img {

coro::Task<ChainExtent> chain_status(block::BlockNodeRef top, std::uint64_t offset,
                                     std::uint64_t bytes) {
  ChainExtent extent;
  block::BlockNode* node = top.get();  // `top` keeps the whole chain alive
  while (true) {
    const block::BlockStatus status = co_await node->block_status(offset, bytes);
    // A driver that reports an empty run would stall the caller: count it as one sector.
    extent.bytes = std::min(bytes, status.bytes ? status.bytes : std::uint64_t{512});
    extent.level = node;
    if (status.error < 0) {
      extent.error = status.error;
      co_return extent;
    }
    if (status.flags & block::kStatusAllocated) {
      extent.present = true;
      extent.zero = status.flags & block::kStatusZero;
      extent.data = status.flags & block::kStatusData;
      extent.has_offset = status.flags & block::kStatusOffsetValid;
      extent.offset = status.file_offset;
      co_return extent;
    }
    block::BlockNode* const backing = node->backing_node();
    if (!backing || offset >= backing->size()) {
      extent.zero = true;  // unallocated without anything below it: reads as zeros
      // Space reserved for it may still exist (a qcow2 subcluster of an allocated cluster):
      // qemu-img map shows its offset.
      extent.has_offset = status.flags & block::kStatusOffsetValid;
      extent.offset = status.file_offset;
      co_return extent;
    }
    bytes = std::min(extent.bytes, backing->size() - offset);
    node = backing;
    ++extent.depth;
  }
}

}  // namespace spindle::img
