// MemoryNode: an in-memory block node for block-layer tests, with a configurable alignment and
// max transfer, that counts violations of what BlockBackend promises drivers (aligned,
// in-bounds, bounded requests). Optionally slow; every read yields once before returning, to
// widen the window between a read-modify-write's read and its write.
//
// Thread-safety: any number of contexts at once (`mutex_` guards the bytes).
#pragma once

#include <atomic>
#include <chrono>
#include <cstring>
#include <mutex>
#include <vector>

#include "block/block_node.h"
#include "coro/coroutine.h"
#include "coro/sleep.h"

namespace spindle::block {

class MemoryNode final : public BlockNode {
 public:
  MemoryNode(std::size_t size, std::uint32_t alignment, std::uint64_t max_transfer = 0)
      : data_(size), alignment_(alignment), max_transfer_(max_transfer) {}
  const char* driver_name() const noexcept override { return "memory"; }
  std::uint64_t size() const noexcept override { return data_.size(); }
  BlockLimits limits() const noexcept override { return {alignment_, max_transfer_}; }

  coro::Task<int> read(std::uint64_t offset, std::span<std::byte> buffer, std::uint32_t) override {
    check(offset, buffer.size());
    if (delay_.count()) co_await coro::sleep(delay_);
    {
      std::lock_guard lock(mutex_);
      std::memcpy(buffer.data(), data_.data() + offset, buffer.size());
    }
    co_await coro::yield();  // widen the window between an RMW's read and its write
    co_return 0;
  }
  coro::Task<int> write(std::uint64_t offset, std::span<const std::byte> buffer,
                        std::uint32_t) override {
    check(offset, buffer.size());
    if (delay_.count()) co_await coro::sleep(delay_);
    {
      std::lock_guard lock(mutex_);
      std::memcpy(data_.data() + offset, buffer.data(), buffer.size());
    }
    co_return 0;
  }
  void check(std::uint64_t offset, std::size_t length) {
    if (offset % alignment_ || length % alignment_ || offset + length > data_.size() ||
        (max_transfer_ && length > max_transfer_)) {
      violations.fetch_add(1);
    }
  }
  std::vector<std::byte> snapshot() {
    std::lock_guard lock(mutex_);
    return data_;
  }
  std::chrono::milliseconds delay_{0};
  std::atomic<int> violations{0};

 private:
  std::mutex mutex_;
  std::vector<std::byte> data_;
  const std::uint32_t alignment_;
  const std::uint64_t max_transfer_;
};

}  // namespace spindle::block
