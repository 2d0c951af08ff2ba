// base::IoBytes: blocks of a page or more are page-aligned, smaller ones cache-line aligned,
// whatever malloc would have returned; growing and copying keep that; contents are zeroed as
// std::vector's are.
#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "base/io_buffer.h"

namespace spindle::base {
namespace {

std::uintptr_t address(const IoBytes& bytes) {
  return reinterpret_cast<std::uintptr_t>(bytes.data());
}

TEST(IoBytesTest, PageOrMoreIsPageAlignedAndSmallerIsCacheLineAligned) {
  std::vector<IoBytes> kept;  // held so that malloc cannot hand the same block back each time
  for (const std::size_t size : {1u, 17u, 100u, 4095u, 4096u, 65536u, 65552u, 2u << 20}) {
    for (int i = 0; i < 8; ++i) {
      IoBytes bytes(size);
      const std::uintptr_t expected = size >= 4096 ? 4096 : 64;
      EXPECT_EQ(address(bytes) % expected, 0u) << "size " << size;
      for (const std::byte b : bytes) ASSERT_EQ(b, std::byte{0});
      kept.push_back(std::move(bytes));
    }
  }
}

TEST(IoBytesTest, GrowingCopyingAndMovingKeepTheAlignmentAndTheBytes) {
  IoBytes bytes(100, std::byte{7});
  bytes.resize(10000, std::byte{9});
  EXPECT_EQ(address(bytes) % 4096, 0u);
  EXPECT_EQ(bytes[99], std::byte{7});
  EXPECT_EQ(bytes[100], std::byte{9});
  IoBytes copy = bytes;
  EXPECT_EQ(address(copy) % 4096, 0u);
  EXPECT_EQ(copy, bytes);
  const std::byte* block = bytes.data();
  IoBytes moved = std::move(bytes);
  EXPECT_EQ(moved.data(), block);
}

}  // namespace
}  // namespace spindle::base
