// ProbedRawNode: a raw image whose format was probed rather than given, opened writable. As
// QEMU's raw driver does for such images, it refuses (-EPERM) a write covering sector 0 whose
// new first 512 bytes would probe as a format other than raw, so that a guest cannot turn its
// disk into, say, a qcow2 header naming a host file as its backing file. A write covering only
// part of sector 0 is judged by the sector it would leave: the child's current first bytes with
// the write laid over them (zeros past the end of an image shorter than a sector, as QEMU
// probes). Request alignment is the child's.
// Zero writes and discards are not checked (QEMU's rule: a sector of zeros probes as raw, and
// a discard leaves zeros or the old data). Everything else passes through to the child, including host_file_range.
//
// Thread-safety: stateless apart from the immutable child; safe from any number of contexts.
// Two concurrent writes to sector 0 are checked independently, each against what the child held
// when it looked (the caller orders overlapping requests, as for any node).
#pragma once

#include "block/drivers/filter_node.h"

namespace spindle::block::raw {

class ProbedRawNode final : public FilterNode {
 public:
  static constexpr std::uint32_t kGuardedBytes = 512;

  explicit ProbedRawNode(BlockNodeRef child) : FilterNode(std::move(child)) {}

  const char* driver_name() const noexcept override { return "raw"; }
  std::optional<HostFileRange> host_file_range(std::uint64_t offset,
                                               std::uint64_t bytes) const noexcept override {
    return child_->host_file_range(offset, bytes);
  }
  coro::Task<int> write(std::uint64_t offset, std::span<const std::byte> buffer,
                        std::uint32_t flags) override;
};

// Whether `sector` (the first kGuardedBytes of an image of `image_size` bytes) probes as raw.
bool probes_as_raw(std::span<const std::byte> sector, std::uint64_t image_size) noexcept;

}  // namespace spindle::block::raw
