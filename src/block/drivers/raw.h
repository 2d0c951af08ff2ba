// The `raw` format driver: the image is the child's bytes, unchanged. A thin pass-through so
// that every image has a format node (raw or qed) over a protocol node (file, nbd, null).
//
// Thread-safety: stateless apart from the immutable child; safe from any number of contexts.
#pragma once

#include "block/block_node.h"

namespace spindle::block {

class RawNode final : public BlockNode {
 public:
  explicit RawNode(BlockNodeRef child) : child_(std::move(child)) {}

  const char* driver_name() const noexcept override { return "raw"; }
  std::string filename() const override { return child_->filename(); }
  std::uint64_t size() const noexcept override { return child_->size(); }
  BlockLimits limits() const noexcept override { return child_->limits(); }
  bool read_only() const noexcept override { return child_->read_only(); }
  const BlockNodeRef& child() const noexcept { return child_; }

  coro::Task<int> read(std::uint64_t offset, std::span<std::byte> buffer,
                       std::uint32_t flags) override {
    return child_->read(offset, buffer, flags);
  }
  coro::Task<int> write(std::uint64_t offset, std::span<const std::byte> buffer,
                        std::uint32_t flags) override {
    return child_->write(offset, buffer, flags);
  }
  coro::Task<int> flush() override { return child_->flush(); }
  coro::Task<int> write_zeroes(std::uint64_t offset, std::uint64_t bytes,
                               std::uint32_t flags) override {
    return child_->write_zeroes(offset, bytes, flags);
  }
  coro::Task<int> discard(std::uint64_t offset, std::uint64_t bytes) override {
    return child_->discard(offset, bytes);
  }
  coro::Task<BlockStatus> block_status(std::uint64_t offset, std::uint64_t bytes) override {
    return child_->block_status(offset, bytes);
  }
  coro::Task<int> truncate(std::uint64_t new_size) override { return child_->truncate(new_size); }
  std::optional<HostFileRange> host_file_range(std::uint64_t offset,
                                               std::uint64_t bytes) const noexcept override {
    return child_->host_file_range(offset, bytes);
  }
  coro::Task<int> close() override { return child_->close(); }

 private:
  BlockNodeRef child_;
};

}  // namespace spindle::block
