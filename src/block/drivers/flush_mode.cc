#include "block/drivers/flush_mode.h"

#include <memory>
#include <utility>

namespace spindle::block {

std::uint32_t FlushModeNode::adjust(std::uint32_t flags) const noexcept {
  if (mode_ == FlushMode::ignored) return flags & ~std::uint32_t{kFua};
  if (mode_ == FlushMode::every_write) return flags | kFua;
  return flags;
}

coro::Task<int> FlushModeNode::write(std::uint64_t offset, std::span<const std::byte> buffer,
                                     std::uint32_t flags) {
  co_return co_await child_->write(offset, buffer, adjust(flags));
}

coro::Task<int> FlushModeNode::write_zeroes(std::uint64_t offset, std::uint64_t bytes,
                                            std::uint32_t flags) {
  co_return co_await child_->write_zeroes(offset, bytes, adjust(flags));
}

coro::Task<int> FlushModeNode::flush() {
  if (mode_ == FlushMode::ignored) co_return 0;
  co_return co_await child_->flush();
}

coro::Task<int> FlushModeNode::close() {
  if (mode_ == FlushMode::ignored) co_return 0;
  co_return co_await child_->close();
}

BlockNodeRef wrap_flush_mode(BlockNodeRef node, FlushMode mode) {
  if (mode == FlushMode::normal) return node;
  return std::make_shared<FlushModeNode>(std::move(node), mode);
}

}  // namespace spindle::block
