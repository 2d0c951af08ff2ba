// nbd::BufferPool: large buffers are page-aligned and recycled (the same block comes back for
// any size of its power-of-two class), small ones are not pooled, the cache is bounded, and a
// buffer released after its connection dropped the pool still goes back safely.
#include "export/nbd/buffer_pool.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace spindle::exports::nbd {
namespace {

bool page_aligned(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 4096 == 0; }

TEST(BufferPoolTest, LargeBuffersArePageAlignedAndRecycledWithinTheirSizeClass) {
  auto pool = std::make_shared<BufferPool>();
  std::byte* first = nullptr;
  {
    ByteBuffer buffer = pool->acquire(100 * 1024);
    ASSERT_NE(buffer.data(), nullptr);
    EXPECT_EQ(buffer.size(), 100u * 1024);
    EXPECT_TRUE(page_aligned(buffer.data()));
    std::memset(buffer.data(), 0xab, buffer.size());  // all of it is usable
    first = buffer.data();
    EXPECT_EQ(pool->cached_bytes(), 0u);
  }
  EXPECT_EQ(pool->cached_bytes(), 128u * 1024);  // the 128 KiB class
  ByteBuffer again = pool->acquire(65 * 1024);   // same class: the same block
  EXPECT_EQ(again.data(), first);
  EXPECT_EQ(again.size(), 65u * 1024);
  EXPECT_EQ(pool->cached_bytes(), 0u);
  ByteBuffer other_class = pool->acquire(64 * 1024);  // exactly 64 KiB: its own class
  EXPECT_NE(other_class.data(), first);
  EXPECT_TRUE(page_aligned(other_class.data()));
}

TEST(BufferPoolTest, SmallAndEmptyBuffersAreNotPooled) {
  auto pool = std::make_shared<BufferPool>();
  {
    ByteBuffer small = pool->acquire(4096);
    ASSERT_NE(small.data(), nullptr);
    EXPECT_EQ(small.size(), 4096u);
    ByteBuffer empty = pool->acquire(0);
    EXPECT_EQ(empty.size(), 0u);
    EXPECT_TRUE(empty.span().empty());
  }
  EXPECT_EQ(pool->cached_bytes(), 0u);
}

TEST(BufferPoolTest, TheCacheIsBounded) {
  auto pool = std::make_shared<BufferPool>();
  {
    std::vector<ByteBuffer> buffers;
    for (int i = 0; i < 40; ++i) buffers.push_back(pool->acquire(1 << 20));
  }
  EXPECT_EQ(pool->cached_bytes(), BufferPool::kMaxCachedBytes);
}

TEST(BufferPoolTest, MovesHandOverTheBlockAndAssignmentReleasesTheOldOne) {
  auto pool = std::make_shared<BufferPool>();
  ByteBuffer a = pool->acquire(200 * 1024);
  std::byte* block = a.data();
  ByteBuffer b = std::move(a);
  EXPECT_EQ(b.data(), block);
  EXPECT_EQ(a.data(), nullptr);
  b = pool->acquire(300 * 1024);  // the 256 KiB block goes back to the pool
  EXPECT_EQ(pool->cached_bytes(), 256u * 1024);
}

TEST(BufferPoolTest, ABufferMayOutliveItsConnectionsReference) {
  auto pool = std::make_shared<BufferPool>();
  ByteBuffer survivor = pool->acquire(1 << 20);
  pool.reset();  // the connection is gone; the buffer keeps the pool alive until it is released
  std::memset(survivor.data(), 1, survivor.size());
  survivor = ByteBuffer();  // released into the pool, which is then freed (ASan checks it)
  EXPECT_EQ(survivor.data(), nullptr);
}

}  // namespace
}  // namespace spindle::exports::nbd
