#include "io/byte_stream.h"

#include <cerrno>

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

coro::Task<int> ByteStream::write_all(const void* buffer, std::size_t size) {
  const iovec vector{const_cast<void*>(buffer), size};
  co_return co_await writev_all(std::span<const iovec>(&vector, 1));
}

}  // namespace spindle::io
