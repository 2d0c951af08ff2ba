#include "block/drivers/direct_file.h"

#include <memory>

#include "block/block_backend.h"
#include "block/drivers/file.h"
#include "block/drivers/filter_node.h"

namespace spindle::block {

namespace {

// A filter over the O_DIRECT file that sends every request through a BlockBackend, so callers
// may issue requests of any alignment. write_zeroes and discard go through it too (although
// fallocate needs no alignment): the backend tracks them against its read-modify-writes, so an
// unaligned write's write-back cannot undo zeros that landed between its read and its write.
class AligningNode final : public FilterNode {
 public:
  explicit AligningNode(BlockNodeRef file)
      : FilterNode(file), backend_(std::make_shared<BlockBackend>(std::move(file))) {}

  const char* driver_name() const noexcept override { return child_->driver_name(); }
  BlockLimits limits() const noexcept override { return {}; }  // any alignment: see above

  coro::Task<int> read(std::uint64_t offset, std::span<std::byte> buffer,
                       std::uint32_t flags) override {
    return backend_->read(offset, buffer, flags);
  }
  coro::Task<int> write(std::uint64_t offset, std::span<const std::byte> buffer,
                        std::uint32_t flags) override {
    // The backend refuses writes past the end, but files grow (QED appends clusters).
    if (offset + buffer.size() > child_->size()) return grow_and_write(offset, buffer, flags);
    return backend_->write(offset, buffer, flags);
  }
  coro::Task<int> write_zeroes(std::uint64_t offset, std::uint64_t bytes,
                               std::uint32_t flags) override {
    if (offset + bytes > child_->size()) return child_->write_zeroes(offset, bytes, flags);  // grows
    return backend_->write_zeroes(offset, bytes, flags);
  }
  coro::Task<int> discard(std::uint64_t offset, std::uint64_t bytes) override {
    return backend_->discard(offset, bytes);
  }
  coro::Task<int> flush() override { return backend_->flush(); }

 private:
  coro::Task<int> grow_and_write(std::uint64_t offset, std::span<const std::byte> buffer,
                                 std::uint32_t flags) {
    // Zeroing the range extends the file and, unlike truncate, never shrinks it under a
    // concurrent append.
    const int grown = co_await child_->write_zeroes(offset, buffer.size(), 0);
    if (grown < 0) co_return grown;
    co_return co_await backend_->write(offset, buffer, flags);
  }

  const std::shared_ptr<BlockBackend> backend_;
};

}  // namespace

base::Result<BlockNodeRef> open_direct_file(const std::string& path, bool read_only) {
  base::Result<BlockNodeRef> file =
      open_file(path, FileOptions{.read_only = read_only, .direct = true});
  if (!file.ok()) return file;
  return BlockNodeRef(std::make_shared<AligningNode>(std::move(file).value()));
}

}  // namespace spindle::block
