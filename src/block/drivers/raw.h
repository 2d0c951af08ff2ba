// The `raw` format driver: the image is the child's bytes, unchanged. A thin pass-through so
// that every image has a format node (raw or qed) over a protocol node (file, nbd, null): it
// is a FilterNode that changes nothing, and unlike a filter it also passes on where its bytes
// lie in a host file (host_file_range), since it never needs to see a read.
//
// Thread-safety: stateless apart from the immutable child; safe from any number of contexts.
#pragma once

#include "block/drivers/filter_node.h"

namespace spindle::block {

class RawNode final : public FilterNode {
 public:
  explicit RawNode(BlockNodeRef child) : FilterNode(std::move(child)) {}

  const char* driver_name() const noexcept override { return "raw"; }
  std::optional<HostFileRange> host_file_range(std::uint64_t offset,
                                               std::uint64_t bytes) const noexcept override {
    return child_->host_file_range(offset, bytes);
  }
};

}  // namespace spindle::block
