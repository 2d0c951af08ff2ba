#include "export/nbd/reply_writer.h"

#include "coro/coroutine.h"

namespace spindle::exports::nbd {

coro::Task<bool> ReplyWriter::send(io::ByteStream& stream, std::span<const iovec> parts) {
  co_return co_await send(stream, parts, FileRange{});
}

coro::Task<bool> ReplyWriter::send(io::ByteStream& stream, std::span<const iovec> parts,
                                   FileRange tail) {
  if (broken_) co_return false;
  for (const iovec& part : parts) queued_.push_back(Segment{part, FileRange{}});
  if (tail.fd >= 0) queued_.push_back(Segment{iovec{}, tail});
  if (flushing_) {
    coro::Event written;
    queued_senders_.push_back(&written);
    co_await written.wait();
    co_return !broken_;
  }
  flushing_ = true;
  co_await coro::yield();  // the cork: replies finishing in this loop pass join this write
  std::vector<Segment> batch;
  std::vector<coro::Event*> senders;
  while (!queued_.empty()) {
    batch.swap(queued_);
    senders.swap(queued_senders_);
    if (!broken_) {
      const int written = co_await write_segments(stream, batch);
      if (written != 0) broken_ = true;
    }
    for (coro::Event* sender : senders) sender->set();
    batch.clear();
    senders.clear();
  }
  flushing_ = false;
  co_return !broken_;
}

coro::Task<int> ReplyWriter::write_segments(io::ByteStream& stream,
                                            std::span<const Segment> segments) {
  gathered_.clear();
  for (const Segment& segment : segments) {
    if (segment.file.fd < 0) {
      gathered_.push_back(segment.memory);
      continue;
    }
    if (!gathered_.empty()) {
      const int written = co_await stream.writev_all(gathered_);
      if (written != 0) co_return written;
      gathered_.clear();
    }
    const int sent = co_await stream.send_file(segment.file.fd, segment.file.offset,
                                               segment.file.bytes);
    if (sent != 0) co_return sent;
  }
  if (gathered_.empty()) co_return 0;
  co_return co_await stream.writev_all(gathered_);
}

}  // namespace spindle::exports::nbd
