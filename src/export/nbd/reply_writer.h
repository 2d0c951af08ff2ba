// ReplyWriter: sends a connection's replies, corked. Replies that become ready in the same pass
// of the event loop leave in one writev() instead of one syscall each: the first sender queues
// its parts, yields once so that the other request coroutines woken in this pass (a batch of
// io_uring completions, say) can queue theirs, then writes everything queued, repeating until
// the queue is empty. Every sender stays suspended until its own bytes are written, so the
// buffers its iovecs point to stay valid; each reply's parts stay contiguous on the wire.
// A reply may end with a range of a host file (a zero-copy READ): the bytes queued before it
// leave in one writev, then the file range with sendfile, then the rest.
//
// Thread-safety: single-threaded by design. Every call comes from coroutines on the
// connection's context (requests are spawned there and resume there), so the queue and flags
// need no lock; the one flushing coroutine is the only writer to the stream.
#pragma once

#include <sys/uio.h>

#include <span>
#include <vector>

#include "coro/event.h"
#include "coro/task.h"
#include "io/byte_stream.h"

namespace spindle::exports::nbd {

// `bytes` bytes of host file `fd` from `offset`, sent with ByteStream::send_file().
struct FileRange {
  int fd = -1;
  std::uint64_t offset = 0;
  std::uint64_t bytes = 0;
};

class ReplyWriter {
 public:
  // Sends one reply (all of `parts`, in order, with no other reply inside it). False if the
  // stream failed, now or earlier: the peer is gone and later sends are dropped.
  coro::Task<bool> send(io::ByteStream& stream, std::span<const iovec> parts);
  // The same, followed by `tail`, sent with stream.send_file().
  coro::Task<bool> send(io::ByteStream& stream, std::span<const iovec> parts, FileRange tail);
  bool broken() const noexcept { return broken_; }

 private:
  struct Segment {
    iovec memory{};  // bytes in memory, or (file.fd >= 0) nothing
    FileRange file;
  };

  coro::Task<int> write_segments(io::ByteStream& stream, std::span<const Segment> segments);

  std::vector<Segment> queued_;              // parts of replies waiting for the next write
  std::vector<iovec> gathered_;              // write_segments()'s scratch: one writev's worth
  std::vector<coro::Event*> queued_senders_;  // their senders (not the flusher), to wake
  bool flushing_ = false;                    // a sender is writing; others just queue
  bool broken_ = false;
};

}  // namespace spindle::exports::nbd
