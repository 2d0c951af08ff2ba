// The `null` protocol driver: a device of a given size that reads as zeros and discards writes.
// For benchmarks (it measures the stack above it) and tests.
//
// Thread-safety: stateless; safe from any number of contexts.
#pragma once

#include <cstring>

#include "block/block_node.h"

namespace spindle::block {

class NullNode final : public BlockNode {
 public:
  // `alignment` (a power of two): the request alignment it asks of BlockBackend, to put the
  // backend's read-modify-write paths under a null device (tests, fuzzing).
  explicit NullNode(std::uint64_t size, bool read_zeroes = true, std::uint32_t alignment = 1)
      : size_(size), read_zeroes_(read_zeroes), alignment_(alignment) {}

  const char* driver_name() const noexcept override { return "null"; }
  std::uint64_t size() const noexcept override { return size_; }
  BlockLimits limits() const noexcept override { return {alignment_, 0}; }

  coro::Task<int> read(std::uint64_t, std::span<std::byte> buffer, std::uint32_t) override {
    if (read_zeroes_) std::memset(buffer.data(), 0, buffer.size());
    co_return 0;
  }
  coro::Task<int> write(std::uint64_t, std::span<const std::byte>, std::uint32_t) override {
    co_return 0;
  }
  coro::Task<int> write_zeroes(std::uint64_t, std::uint64_t, std::uint32_t) override {
    co_return 0;
  }
  coro::Task<BlockStatus> block_status(std::uint64_t offset, std::uint64_t bytes) override {
    co_return BlockStatus{kStatusZero | kStatusAllocated |
                              (offset + bytes >= size_ ? kStatusEof : 0u),
                          bytes, offset};
  }

 private:
  const std::uint64_t size_;
  const bool read_zeroes_;
  const std::uint32_t alignment_;
};

}  // namespace spindle::block
