#include "chain_status.h"

#include <algorithm>
#include <memory>

#include "block/qed/qed_node.h"

namespace spindle::img {

coro::Task<ChainExtent> chain_status(block::BlockNodeRef top, std::uint64_t offset,
                                     std::uint64_t bytes) {
  ChainExtent extent;
  block::BlockNodeRef node = std::move(top);
  while (true) {
    const block::BlockStatus status = co_await node->block_status(offset, bytes);
    // A driver that reports an empty run would stall the caller: count it as one sector.
    extent.bytes = std::min(bytes, status.bytes ? status.bytes : std::uint64_t{512});
    extent.level = node.get();
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
    const auto* qed = dynamic_cast<const block::qed::QedNode*>(node.get());
    const block::BlockNodeRef backing = qed ? qed->backing() : nullptr;
    if (!backing || offset >= backing->size()) {
      extent.zero = true;  // unallocated without anything below it: reads as zeros
      co_return extent;
    }
    bytes = std::min(extent.bytes, backing->size() - offset);
    node = backing;
    ++extent.depth;
  }
}

}  // namespace spindle::img
