// ByteStream: the coroutine byte-stream interface that protocol code (the NBD server and
// client) is written against, so the same code runs over a plain Channel or over a TlsSession
// layered on one. Implementations supply read_some() and writev_all(); read_exact() and
// write_all() are built on them.
//
// Thread-safety: as the implementation documents; both implementations allow one reading and
// one writing coroutine at a time.
#pragma once

#include <sys/types.h>
#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <span>

#include "coro/task.h"

namespace spindle::io {

class ByteStream {
 public:
  virtual ~ByteStream() = default;

  // Reads what is available (waiting for at least one byte): >0 bytes, 0 at end of stream,
  // or -errno.
  virtual coro::Task<ssize_t> read_some(void* buffer, std::size_t size) = 0;
  // read_some(), except that where it would wait for data it returns -EINTR instead if the
  // stream's reads were interrupted (Channel::interrupt_read()) since the last -EINTR. Lets a
  // loop that waits for the next message be called away without losing a partial read. The
  // default is never interrupted.
  virtual coro::Task<ssize_t> read_some_or_interrupt(void* buffer, std::size_t size) {
    return read_some(buffer, size);
  }
  // Writes everything: 0 or -errno (-EPIPE if the peer is gone).
  virtual coro::Task<int> writev_all(std::span<const iovec> vectors) = 0;

  // Whether send_file() passes file pages to the stream without copying them through memory
  // (a plain socket: sendfile). Elsewhere send_file() still works, by copying.
  virtual bool can_send_file() const noexcept { return false; }
  // Writes `bytes` bytes of `file_fd` starting at `offset` (the file position is not used):
  // 0, -EIO if the file ends first, or -errno. The default reads the file with pread() into a
  // buffer and writes that: it blocks the calling thread on the disk unless the pages are
  // cached, so callers on an event loop check (aio::range_in_page_cache) first.
  virtual coro::Task<int> send_file(int file_fd, std::uint64_t offset, std::uint64_t bytes);

  // Fills the whole buffer: 0, -ECONNRESET if the stream ended first, or -errno.
  coro::Task<int> read_exact(void* buffer, std::size_t size);
  coro::Task<int> write_all(const void* buffer, std::size_t size);
};

}  // namespace spindle::io
