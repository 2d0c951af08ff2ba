// FilterNode: the base of nodes that sit over one child and change only some requests
// (blkdebug, throttle, the O_DIRECT aligning node; raw changes none). Everything a subclass
// does not override is forwarded to the child, so the filter is transparent: size, limits,
// block status, the backing-chain walk (backing_node() returns the child's backing node, so
// BlockBackend's walk for unallocated ranges continues below the child), truncate, close, and
// the graph's background-work hooks (filters keep none of their own).
//
// The child may be replaced (replace_child("file", ...)) inside a drained section: `child_` is a
// ChildLink.
//
// Thread-safety: every forwarded call has the child's contract (any coroutine, any context, as
// BlockNode); replace_child() as ChildLink::replace().
#pragma once

#include <cerrno>
#include <string>
#include <string_view>
#include <utility>

#include "block/block_node.h"
#include "block/child_link.h"

namespace spindle::block {

class FilterNode : public BlockNode {
 public:
  BlockNode* child() const noexcept { return child_.get(); }
  // "file": the filter now passes requests to `child`, which must have the same size.
  int replace_child(std::string_view role, BlockNodeRef child) override {
    if (role != "file") return -ENOENT;
    if (!child || child->size() != child_->size()) return -EINVAL;
    child_.replace(std::move(child));
    return 0;
  }

  std::string filename() const override { return child_->filename(); }
  std::uint64_t size() const noexcept override { return child_->size(); }
  BlockLimits limits() const noexcept override { return child_->limits(); }
  bool read_only() const noexcept override { return child_->read_only(); }
  BlockNode* backing_node() const noexcept override { return child_->backing_node(); }

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
  coro::Task<int> close() override { return child_->close(); }
  coro::Task<void> quiesce() override { return child_->quiesce(); }
  coro::Task<void> attach_context(aio::Context& context) override {
    return child_->attach_context(context);
  }

 protected:
  explicit FilterNode(BlockNodeRef child) : child_(std::move(child)) {}

  ChildLink child_;
};

}  // namespace spindle::block
