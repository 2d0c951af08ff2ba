// FlushModeNode: the flush half of qemu's cache modes, as a filter.
//   FlushMode::ignored      cache=unsafe, over each file node: flush() succeeds without doing
//                           anything and FUA is dropped, so the format's own ordering flushes
//                           go too (qemu-img convert's default for its target: a crash during
//                           the copy loses the copy, not data that was there before).
//   FlushMode::every_write  cache=writethrough/directsync, over the image's root (the format
//                           node): every write and write-zeroes is sent with kFua, so the
//                           format makes it and the metadata naming it durable before it
//                           completes (qcow2 and QED write back and flush after such a write).
// cache=writeback needs no filter. O_DIRECT is the file node's business (direct_file.h).
// wrap_flush_mode() returns the node itself for FlushMode::normal. The child is a protocol
// node (file, O_DIRECT file), whose close() is its flush: under FlushMode::ignored close does
// nothing either.
//
// Thread-safety: stateless apart from the immutable child and mode; safe from any number of
// coroutines on any contexts, as the child is.
#pragma once

#include <cstdint>
#include <utility>

#include "block/drivers/filter_node.h"

namespace spindle::block {

enum class FlushMode { normal, ignored, every_write };

class FlushModeNode final : public FilterNode {
 public:
  FlushModeNode(BlockNodeRef child, FlushMode mode) : FilterNode(std::move(child)), mode_(mode) {}

  const char* driver_name() const noexcept override { return child_->driver_name(); }
  std::optional<HostFileRange> host_file_range(std::uint64_t offset,
                                               std::uint64_t bytes) const noexcept override {
    return child_->host_file_range(offset, bytes);
  }

  // (Defined out of line: clang 14 with ASan fails on these coroutines inline in a header.)
  coro::Task<int> write(std::uint64_t offset, std::span<const std::byte> buffer,
                        std::uint32_t flags) override;
  coro::Task<int> write_zeroes(std::uint64_t offset, std::uint64_t bytes,
                               std::uint32_t flags) override;
  coro::Task<int> flush() override;
  // A file node's close is its flush.
  coro::Task<int> close() override;

 private:
  std::uint32_t adjust(std::uint32_t flags) const noexcept;

  const FlushMode mode_;
};

BlockNodeRef wrap_flush_mode(BlockNodeRef node, FlushMode mode);

}  // namespace spindle::block
