#include "block/drivers/direct_file.h"

#include <memory>

#include "block/block_backend.h"
#include "block/drivers/file.h"

namespace spindle::block {

namespace {

// A BlockNode that forwards everything through a BlockBackend over `file`, so callers may
// issue requests of any alignment.
class AligningNode final : public BlockNode {
 public:
  explicit AligningNode(BlockNodeRef file)
      : file_(file), backend_(std::make_shared<BlockBackend>(std::move(file))) {}

  const char* driver_name() const noexcept override { return file_->driver_name(); }
  std::string filename() const override { return file_->filename(); }
  std::uint64_t size() const noexcept override { return file_->size(); }
  bool read_only() const noexcept override { return file_->read_only(); }

  coro::Task<int> read(std::uint64_t offset, std::span<std::byte> buffer,
                       std::uint32_t flags) override {
    return backend_->read(offset, buffer, flags);
  }
  coro::Task<int> write(std::uint64_t offset, std::span<const std::byte> buffer,
                        std::uint32_t flags) override {
    // The backend refuses writes past the end, but files grow (QED appends clusters).
    if (offset + buffer.size() > file_->size()) return grow_and_write(offset, buffer, flags);
    return backend_->write(offset, buffer, flags);
  }
  coro::Task<int> flush() override { return backend_->flush(); }
  coro::Task<int> write_zeroes(std::uint64_t offset, std::uint64_t bytes,
                               std::uint32_t flags) override {
    return file_->write_zeroes(offset, bytes, flags);  // fallocate: no alignment needed
  }
  coro::Task<int> discard(std::uint64_t offset, std::uint64_t bytes) override {
    return file_->discard(offset, bytes);
  }
  coro::Task<BlockStatus> block_status(std::uint64_t offset,
                                              std::uint64_t bytes) override {
    return file_->block_status(offset, bytes);
  }
  coro::Task<int> truncate(std::uint64_t new_size) override { return file_->truncate(new_size); }
  coro::Task<int> close() override { return file_->close(); }

 private:
  coro::Task<int> grow_and_write(std::uint64_t offset, std::span<const std::byte> buffer,
                                 std::uint32_t flags) {
    // Zeroing the range extends the file and, unlike truncate, never shrinks it under a
    // concurrent append.
    const int grown = co_await file_->write_zeroes(offset, buffer.size(), 0);
    if (grown < 0) co_return grown;
    co_return co_await backend_->write(offset, buffer, flags);
  }

  const BlockNodeRef file_;
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
