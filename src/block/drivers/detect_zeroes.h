// DetectZeroesNode: QEMU's detect-zeroes option as a filter over the node it is set on. A
// write whose data is all zeros becomes a write_zeroes (keeping FUA): with `unmap` (the
// node's discard=unmap) the child may deallocate the range instead of storing zeros, so a
// guest that zeroes blocks gives the space back. Everything else passes through unchanged,
// including where reads lie in a host file (host_file_range: reads are not its business) and
// graph changes (replace_child goes to the node it wraps, which is the node users name).
//
// Thread-safety: stateless apart from its mode and the ChildLink; safe from any number of
// coroutines on any contexts, as the child is.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string_view>
#include <utility>

#include "base/is_zero.h"
#include "block/drivers/filter_node.h"

namespace spindle::block {

class DetectZeroesNode final : public FilterNode {
 public:
  DetectZeroesNode(BlockNodeRef child, bool unmap) : FilterNode(std::move(child)), unmap_(unmap) {}

  const char* driver_name() const noexcept override { return child_->driver_name(); }
  coro::Task<int> write(std::uint64_t offset, std::span<const std::byte> buffer,
                        std::uint32_t flags) override {
    if (!(flags & kWriteCompressed) && !buffer.empty() && base::is_zero(buffer)) {
      return child_->write_zeroes(offset, buffer.size(),
                                  (flags & kFua) | (unmap_ ? std::uint32_t{kMayUnmap} : 0u));
    }
    return child_->write(offset, buffer, flags);
  }
  std::optional<HostFileRange> host_file_range(std::uint64_t offset,
                                               std::uint64_t bytes) const noexcept override {
    return child_->host_file_range(offset, bytes);
  }
  int replace_child(std::string_view role, BlockNodeRef child) override {
    return child_->replace_child(role, std::move(child));
  }

 private:
  const bool unmap_;
};

}  // namespace spindle::block
