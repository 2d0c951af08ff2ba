#include "io/byte_stream.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <vector>

namespace spindle::io {

coro::Task<int> ByteStream::read_exact(void* buffer, std::size_t size) {
  auto* bytes = static_cast<char*>(buffer);
  std::size_t done = 0;
  while (done < size) {
    const ssize_t n = co_await read_some(bytes + done, size - done);
    if (n == 0) co_return -ECONNRESET;  // the stream ended in the middle
    if (n < 0) co_return static_cast<int>(n);
    done += static_cast<std::size_t>(n);
  }
  co_return 0;
}

coro::Task<int> ByteStream::send_file(int file_fd, std::uint64_t offset, std::uint64_t bytes) {
  constexpr std::size_t kChunk = 256 * 1024;
  std::vector<char> buffer(static_cast<std::size_t>(std::min<std::uint64_t>(bytes, kChunk)));
  while (bytes > 0) {
    const std::size_t want = static_cast<std::size_t>(std::min<std::uint64_t>(bytes, kChunk));
    const ssize_t n = ::pread(file_fd, buffer.data(), want, static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) co_return -errno;
    if (n == 0) co_return -EIO;  // the file is shorter than promised
    const int written = co_await write_all(buffer.data(), static_cast<std::size_t>(n));
    if (written != 0) co_return written;
    offset += static_cast<std::uint64_t>(n);
    bytes -= static_cast<std::uint64_t>(n);
  }
  co_return 0;
}

coro::Task<int> ByteStream::write_all(const void* buffer, std::size_t size) {
  const iovec vector{const_cast<void*>(buffer), size};
  co_return co_await writev_all(std::span<const iovec>(&vector, 1));
}

}  // namespace spindle::io
