#include "block/drivers/file.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "coro/file_io.h"

namespace spindle::block {

namespace {

struct AlignedFree {
  void operator()(std::byte* p) const noexcept { std::free(p); }
};
using AlignedBuffer = std::unique_ptr<std::byte, AlignedFree>;

AlignedBuffer aligned_buffer(std::size_t alignment, std::size_t length) {
  const std::size_t rounded = (length + alignment - 1) / alignment * alignment;
  return AlignedBuffer(static_cast<std::byte*>(std::aligned_alloc(alignment, rounded)));
}

// O_DIRECT needs requests aligned to the logical block size: ask the device, else probe.
std::uint32_t probe_direct_alignment(int fd, const struct stat& info) {
  if (S_ISBLK(info.st_mode)) {
    int logical = 0;
    if (::ioctl(fd, BLKSSZGET, &logical) == 0 && logical > 0) {
      return static_cast<std::uint32_t>(logical);
    }
  }
  AlignedBuffer probe = aligned_buffer(4096, 4096);
  for (std::uint32_t size : {512u, 1024u, 2048u, 4096u}) {
    if (::pread(fd, probe.get(), size, 0) >= 0) return size;
  }
  return 4096;
}

}  // namespace

base::Result<BlockNodeRef> open_file(const std::string& path, FileOptions options) {
  int flags = (options.read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC;
  if (options.direct) flags |= O_DIRECT;
  if (options.create && !options.read_only) flags |= O_CREAT;
  const int fd = ::open(path.c_str(), flags, 0644);
  if (fd < 0) return base::Result<BlockNodeRef>::failure(errno);
  struct stat info;
  if (::fstat(fd, &info) < 0) {
    const int error = errno;
    ::close(fd);
    return base::Result<BlockNodeRef>::failure(error);
  }
  if (!S_ISREG(info.st_mode) && !S_ISBLK(info.st_mode)) {
    ::close(fd);
    return base::Result<BlockNodeRef>::failure(EINVAL);
  }
  std::uint64_t size = static_cast<std::uint64_t>(info.st_size);
  if (S_ISBLK(info.st_mode)) ::ioctl(fd, BLKGETSIZE64, &size);
  const std::uint32_t alignment = options.direct ? probe_direct_alignment(fd, info) : 1;
  return BlockNodeRef(std::make_shared<FileNode>(fd, path, options, alignment, size));
}

FileNode::FileNode(int fd, std::string path, FileOptions options, std::uint32_t alignment,
                   std::uint64_t size)
    : fd_(fd), path_(std::move(path)), options_(options), alignment_(alignment), size_(size) {}

FileNode::~FileNode() { ::close(fd_); }

void FileNode::note_extent(std::uint64_t end) noexcept {
  std::uint64_t current = size_.load(std::memory_order_relaxed);
  while (end > current &&
         !size_.compare_exchange_weak(current, end, std::memory_order_acq_rel)) {
  }
}

coro::Task<int> FileNode::read_exactly(std::uint64_t offset, std::byte* data, std::size_t length) {
  std::size_t done = 0;
  while (done < length) {
    const ssize_t n =
        co_await coro::pread(fd_, data + done, length - done, static_cast<off_t>(offset + done));
    if (n < 0) co_return static_cast<int>(n);
    if (n == 0) {  // past the end of the file: zeros
      std::memset(data + done, 0, length - done);
      break;
    }
    done += static_cast<std::size_t>(n);
  }
  co_return 0;
}

coro::Task<int> FileNode::write_exactly(std::uint64_t offset, const std::byte* data,
                                        std::size_t length) {
  std::size_t done = 0;
  while (done < length) {
    const ssize_t n =
        co_await coro::pwrite(fd_, data + done, length - done, static_cast<off_t>(offset + done));
    if (n < 0) co_return static_cast<int>(n);
    if (n == 0) co_return -EIO;
    done += static_cast<std::size_t>(n);
  }
  note_extent(offset + length);
  co_return 0;
}

coro::Task<int> FileNode::read(std::uint64_t offset, std::span<std::byte> buffer,
                               std::uint32_t flags) {
  if (options_.direct && reinterpret_cast<std::uintptr_t>(buffer.data()) % alignment_ != 0) {
    AlignedBuffer bounce = aligned_buffer(alignment_, buffer.size());
    const int result = co_await read_exactly(offset, bounce.get(), buffer.size());
    if (result == 0) std::memcpy(buffer.data(), bounce.get(), buffer.size());
    co_return result;
  }
  co_return co_await read_exactly(offset, buffer.data(), buffer.size());
}

coro::Task<int> FileNode::write(std::uint64_t offset, std::span<const std::byte> buffer,
                                std::uint32_t flags) {
  if (options_.read_only) co_return -EROFS;
  const std::uint64_t size_before = size();
  int result;
  if (options_.direct && reinterpret_cast<std::uintptr_t>(buffer.data()) % alignment_ != 0) {
    AlignedBuffer bounce = aligned_buffer(alignment_, buffer.size());
    std::memcpy(bounce.get(), buffer.data(), buffer.size());
    result = co_await write_exactly(offset, bounce.get(), buffer.size());
  } else {
    result = co_await write_exactly(offset, buffer.data(), buffer.size());
  }
  const std::uint64_t end = offset + buffer.size();
  if (result == 0 && options_.direct && offset < size_before && end > size_before &&
      end - size_before < alignment_) {
    // The last sector of an image whose size is not a multiple of the sector size: O_DIRECT
    // made the read-modify-write pad past the end. Cut the file back so the image keeps its
    // size. (Files that really grow, like QED's, are extended by write_zeroes first.)
    if (::ftruncate(fd_, static_cast<off_t>(size_before)) < 0) {
      result = -errno;
    } else {
      size_.store(size_before, std::memory_order_release);
    }
  }
  if (result == 0 && (flags & kFua)) result = co_await coro::fdatasync(fd_);
  co_return result;
}

coro::Task<int> FileNode::flush() {
  if (options_.read_only) co_return 0;
  co_return co_await coro::fdatasync(fd_);
}

coro::Task<int> FileNode::write_zeroes(std::uint64_t offset, std::uint64_t bytes,
                                       std::uint32_t flags) {
  if (options_.read_only) co_return -EROFS;
  const std::uint64_t end = offset + bytes;
  int result;
  if ((flags & kMayUnmap) && end <= size()) {
    result = co_await coro::fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                      static_cast<off_t>(offset), static_cast<off_t>(bytes));
  } else {
    result = co_await coro::fallocate(fd_, FALLOC_FL_ZERO_RANGE, static_cast<off_t>(offset),
                                      static_cast<off_t>(bytes));
  }
  if (result == -EOPNOTSUPP || result == -ENOTSUP || result == -EINVAL) {
    if (flags & kNoFallback) co_return -ENOTSUP;
    co_return co_await BlockNode::write_zeroes(offset, bytes, flags);
  }
  if (result == 0) {
    note_extent(end);
    if (flags & kFua) result = co_await coro::fdatasync(fd_);
  }
  co_return result;
}

coro::Task<int> FileNode::discard(std::uint64_t offset, std::uint64_t bytes) {
  if (options_.read_only) co_return -EROFS;
  const std::uint64_t end = std::min(offset + bytes, size());
  if (end <= offset) co_return 0;
  const int result =
      co_await coro::fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                               static_cast<off_t>(offset), static_cast<off_t>(end - offset));
  // Discard is advisory: a file system that cannot punch holes simply keeps the data.
  co_return (result == -EOPNOTSUPP || result == -ENOTSUP) ? 0 : result;
}

coro::Task<BlockStatus> FileNode::block_status(std::uint64_t offset, std::uint64_t bytes) {
  BlockStatus status;
  status.file_offset = offset;
  const std::uint64_t file_size = size();
  std::uint64_t end = std::min(offset + bytes, std::max(file_size, offset));
  if (offset >= file_size) {  // past the end: reads as zeros
    status.flags = kStatusZero | kStatusAllocated | kStatusEof;
    status.bytes = bytes;
    co_return status;
  }
  const off_t data = ::lseek(fd_, static_cast<off_t>(offset), SEEK_DATA);
  if (data < 0 && errno == ENXIO) {  // only a hole up to the end of the file
    status.flags = kStatusZero | kStatusOffsetValid | kStatusAllocated;
    status.bytes = end - offset;
  } else if (data < 0) {  // no SEEK_DATA support: say everything is data
    status.flags = kStatusData | kStatusOffsetValid | kStatusAllocated;
    status.bytes = end - offset;
  } else if (static_cast<std::uint64_t>(data) > offset) {  // a hole first
    status.flags = kStatusZero | kStatusOffsetValid | kStatusAllocated;
    status.bytes = std::min<std::uint64_t>(static_cast<std::uint64_t>(data), end) - offset;
  } else {  // data until the next hole
    const off_t hole = ::lseek(fd_, static_cast<off_t>(offset), SEEK_HOLE);
    const std::uint64_t data_end = hole < 0 ? end : static_cast<std::uint64_t>(hole);
    status.flags = kStatusData | kStatusOffsetValid | kStatusAllocated;
    status.bytes = std::min(data_end, end) - offset;
  }
  if (offset + status.bytes >= file_size) status.flags |= kStatusEof;
  if (status.bytes == 0) status.bytes = end - offset;
  co_return status;
}

std::optional<HostFileRange> FileNode::host_file_range(std::uint64_t offset,
                                                      std::uint64_t bytes) const noexcept {
  if (options_.direct || offset + bytes > size()) return std::nullopt;
  return HostFileRange{fd_, offset};
}

coro::Task<int> FileNode::truncate(std::uint64_t new_size) {
  if (options_.read_only) co_return -EROFS;
  if (::ftruncate(fd_, static_cast<off_t>(new_size)) < 0) co_return -errno;
  size_.store(new_size, std::memory_order_release);
  co_return 0;
}

}  // namespace spindle::block
