// RecordingNode: a filter for crash-consistency tests. It passes everything to its child and
// records each write (offset and bytes) and flush, in the order they were issued, so that a
// test can rebuild the file as a crash at any point could have left it (apply_event()).
//
// Thread-safety: any number of contexts at once (`mutex_` guards the recorded events).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <span>
#include <utility>
#include <vector>

#include "block/drivers/filter_node.h"
#include "coro/task.h"

namespace spindle::test {

class RecordingNode final : public block::FilterNode {
 public:
  struct Event {
    bool flush = false;
    std::uint64_t offset = 0;
    std::vector<std::byte> data;
  };
  explicit RecordingNode(block::BlockNodeRef child) : block::FilterNode(std::move(child)) {}
  const char* driver_name() const noexcept override { return "recording"; }
  coro::Task<int> write(std::uint64_t offset, std::span<const std::byte> buffer,
                        std::uint32_t flags) override {
    {
      std::lock_guard lock(mutex_);
      events_.push_back({false, offset, std::vector<std::byte>(buffer.begin(), buffer.end())});
    }
    co_return co_await child_->write(offset, buffer, flags);
  }
  coro::Task<int> flush() override {
    {
      std::lock_guard lock(mutex_);
      events_.push_back({true, 0, {}});
    }
    co_return co_await child_->flush();
  }
  // The events so far; take_events() also forgets them.
  std::vector<Event> events() {
    std::lock_guard lock(mutex_);
    return events_;
  }
  std::vector<Event> take_events() {
    std::lock_guard lock(mutex_);
    return std::exchange(events_, {});
  }

 private:
  std::mutex mutex_;
  std::vector<Event> events_;
};

// Applies a recorded write to `image` (the file's bytes); flushes change nothing.
inline void apply_event(std::vector<std::byte>& image, const RecordingNode::Event& event) {
  if (event.flush) return;
  if (image.size() < event.offset + event.data.size()) image.resize(event.offset + event.data.size());
  std::copy(event.data.begin(), event.data.end(),
            image.begin() + static_cast<std::ptrdiff_t>(event.offset));
}

}  // namespace spindle::test
