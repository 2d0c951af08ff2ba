#include "nbd/reply_writer.h"

#include "coro/coroutine.h"

namespace spindle::nbd {

coro::Task<bool> ReplyWriter::send(io::ByteStream& stream, std::span<const iovec> parts) {
  if (broken_) co_return false;
  queued_.insert(queued_.end(), parts.begin(), parts.end());
  if (flushing_) {
    coro::Event written;
    queued_senders_.push_back(&written);
    co_await written.wait();
    co_return !broken_;
  }
  flushing_ = true;
  co_await coro::yield();  // the cork: replies finishing in this loop pass join this write
  std::vector<iovec> batch;
  std::vector<coro::Event*> senders;
  while (!queued_.empty()) {
    batch.swap(queued_);
    senders.swap(queued_senders_);
    if (!broken_) {
      const int written = co_await stream.writev_all(batch);
      if (written != 0) broken_ = true;
    }
    for (coro::Event* sender : senders) sender->set();
    batch.clear();
    senders.clear();
  }
  flushing_ = false;
  co_return !broken_;
}

}  // namespace spindle::nbd
