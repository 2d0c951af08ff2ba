// The `file` protocol driver: a BlockNode over a regular file (or block device). Data moves
// through the calling context's io_uring or thread pool (aio file I/O). With `direct` (cache
// mode "none") the file is opened O_DIRECT: requests must be aligned to the device's logical
// block size (reported in limits(); BlockBackend aligns them) and buffers that are not aligned
// in memory go through an aligned bounce buffer. Reads past the end of the file return zeros;
// writes past it grow the file.
//
// Thread-safety: any number of coroutines on any contexts may call it at once; the fd is
// immutable and `size_` is an atomic that only grows (or changes through truncate()).
// It has no home context (no timers, no background work): the default attach_context() and
// quiesce() (no-ops for a node without a backing node) are right for it.
#pragma once

#include <atomic>
#include <string>

#include "base/result.h"
#include "block/block_node.h"

namespace spindle::block {

struct FileOptions {
  bool read_only = false;
  bool direct = false;  // O_DIRECT (cache=none)
  bool create = false;  // create the file if missing
};

base::Result<BlockNodeRef> open_file(const std::string& path, FileOptions options);
inline base::Result<BlockNodeRef> open_file(const std::string& path, bool read_only) {
  return open_file(path, FileOptions{read_only, false, false});
}

class FileNode final : public BlockNode {
 public:
  FileNode(int fd, std::string path, FileOptions options, std::uint32_t alignment,
           std::uint64_t size);
  ~FileNode() override;

  const char* driver_name() const noexcept override { return "file"; }
  std::string filename() const override { return path_; }
  std::uint64_t size() const noexcept override { return size_.load(std::memory_order_acquire); }
  BlockLimits limits() const noexcept override { return {alignment_, 0}; }
  bool read_only() const noexcept override { return options_.read_only; }
  int fd() const noexcept { return fd_; }

  coro::Task<int> read(std::uint64_t offset, std::span<std::byte> buffer,
                       std::uint32_t flags) override;
  coro::Task<int> write(std::uint64_t offset, std::span<const std::byte> buffer,
                        std::uint32_t flags) override;
  coro::Task<int> flush() override;
  coro::Task<int> write_zeroes(std::uint64_t offset, std::uint64_t bytes,
                               std::uint32_t flags) override;
  coro::Task<int> discard(std::uint64_t offset, std::uint64_t bytes) override;
  coro::Task<BlockStatus> block_status(std::uint64_t offset, std::uint64_t bytes) override;
  coro::Task<int> truncate(std::uint64_t new_size) override;
  // The file itself, unless it is opened O_DIRECT (its pages are not cached to pass on).
  std::optional<HostFileRange> host_file_range(std::uint64_t offset,
                                               std::uint64_t bytes) const noexcept override;

 private:
  coro::Task<int> read_exactly(std::uint64_t offset, std::byte* data, std::size_t length);
  coro::Task<int> write_exactly(std::uint64_t offset, const std::byte* data, std::size_t length);
  void note_extent(std::uint64_t end) noexcept;

  const int fd_;
  const std::string path_;
  const FileOptions options_;
  const std::uint32_t alignment_;
  std::atomic<std::uint64_t> size_;
};

}  // namespace spindle::block
