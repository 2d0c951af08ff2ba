// FreeClusterPool (qcow2's freed data clusters): a quarantined cluster becomes reusable only
// after every request that entered before it was freed has left; runs coalesce, split on
// take() and stay bounded; and, with threads entering and leaving at random while the owner
// frees and reuses clusters, no request ever sees the cluster it looked up handed to someone
// else (run under TSan in CI).
#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <thread>
#include <vector>

#include "block/formats/qcow2/free_cluster_pool.h"

namespace spindle::block::qcow2 {
namespace {

TEST(FreeClusterPoolTest, WithNoRequestRunningAFreedClusterIsReusableAtOnce) {
  FreeClusterPool pool;
  EXPECT_FALSE(pool.find(1));
  pool.quarantine(7);
  EXPECT_EQ(pool.quarantined_clusters(), 0u);
  EXPECT_EQ(pool.reusable_clusters(), 1u);
  ASSERT_EQ(pool.find(1), std::optional<std::uint64_t>(7));
  pool.take(7, 1);
  EXPECT_EQ(pool.reusable_clusters(), 0u);
  EXPECT_FALSE(pool.find(1));
}

TEST(FreeClusterPoolTest, ARequestThatEnteredBeforeTheFreeHoldsItBackUntilItLeaves) {
  FreeClusterPool pool;
  auto before = std::make_unique<FreeClusterPool::Guard>(pool.enter());
  pool.quarantine(3);
  EXPECT_FALSE(pool.find(1));
  EXPECT_FALSE(pool.find(1));  // asking again does not help
  {
    // Requests that come and go meanwhile change nothing.
    FreeClusterPool::Guard other = pool.enter();
  }
  EXPECT_FALSE(pool.find(1));
  before.reset();
  EXPECT_EQ(pool.find(1), std::optional<std::uint64_t>(3));
}

TEST(FreeClusterPoolTest, RequestsThatEnterLaterDoNotHoldItBack) {
  FreeClusterPool pool;
  auto older = std::make_unique<FreeClusterPool::Guard>(pool.enter());
  pool.quarantine(1);
  FreeClusterPool::Guard later = pool.enter();  // in the epoch after the free
  EXPECT_FALSE(pool.find(1));
  older.reset();
  EXPECT_EQ(pool.find(1), std::optional<std::uint64_t>(1));  // `later` still running
  FreeClusterPool::Guard fresh = pool.enter();
  pool.quarantine(2);
  EXPECT_FALSE(pool.find(2));  // 2 waits for `later`: 1 and 2 are no run of two yet
}

TEST(FreeClusterPoolTest, RunsCoalesceAndSplit) {
  FreeClusterPool pool;
  for (const std::uint64_t c : {10u, 11u, 12u, 20u, 14u, 13u}) pool.quarantine(c);
  EXPECT_EQ(pool.find(6), std::nullopt);               // 10-14 and 20
  EXPECT_EQ(pool.find(5), std::optional<std::uint64_t>(10));
  EXPECT_EQ(pool.reusable_clusters(), 6u);
  pool.take(11, 2);                                    // leaves 10, 13-14, 20
  EXPECT_EQ(pool.reusable_clusters(), 4u);
  EXPECT_EQ(pool.find(2), std::optional<std::uint64_t>(13));
  EXPECT_EQ(pool.find(1), std::optional<std::uint64_t>(10));
  pool.drop(13, 2);
  pool.take(10, 1);
  EXPECT_EQ(pool.find(1), std::optional<std::uint64_t>(20));
  pool.take(20, 1);
  EXPECT_EQ(pool.reusable_clusters(), 0u);
  EXPECT_EQ(pool.find(1), std::nullopt);
}

TEST(FreeClusterPoolTest, MemoryIsBoundedBeyondTheRunLimit) {
  FreeClusterPool pool;
  auto running = std::make_unique<FreeClusterPool::Guard>(pool.enter());  // keeps them waiting
  // Every other cluster: nothing coalesces.
  for (std::uint64_t i = 0; i < 3 * FreeClusterPool::kMaxRuns; ++i) pool.quarantine(2 * i);
  EXPECT_EQ(pool.quarantined_clusters(), FreeClusterPool::kMaxRuns);
  running.reset();
  ASSERT_TRUE(pool.find(1));
  EXPECT_EQ(pool.quarantined_clusters(), 0u);
  EXPECT_EQ(pool.reusable_clusters(), FreeClusterPool::kMaxRuns);
  // And the reusable set is bounded too: freed clusters beyond it are not kept.
  for (std::uint64_t i = 0; i < 16; ++i) pool.quarantine(1000000 + 2 * i);
  ASSERT_TRUE(pool.find(1));
  EXPECT_EQ(pool.reusable_clusters(), FreeClusterPool::kMaxRuns);
}

// The owner (under `lock`, as Qcow2Node's meta_mutex_) maps clusters to slots, unmaps one at
// random into quarantine and reuses reusable ones, bumping their generation. Readers enter,
// look a slot's cluster and generation up under the lock, wait a little without it, and check
// that the cluster was not handed out again while they held it.
TEST(FreeClusterPoolTest, NoRequestSeesItsClusterReusedUnderConcurrency) {
  constexpr int kSlots = 64;
  constexpr int kReaders = 3;
  FreeClusterPool pool;
  std::mutex lock;
  std::vector<std::int64_t> slot_cluster(kSlots);
  std::vector<std::uint64_t> generation(4 * kSlots, 0);
  std::uint64_t next_cluster = 0;
  for (int s = 0; s < kSlots; ++s) slot_cluster[s] = static_cast<std::int64_t>(next_cluster++);
  std::atomic<bool> stop{false};
  std::atomic<int> violations{0};
  std::atomic<std::uint64_t> lookups{0};

  std::vector<std::thread> readers;
  for (int r = 0; r < kReaders; ++r) {
    readers.emplace_back([&, r] {
      std::mt19937 random(static_cast<unsigned>(r + 1));
      while (!stop.load()) {
        FreeClusterPool::Guard guard = pool.enter();
        std::int64_t cluster;
        std::uint64_t seen;
        {
          std::lock_guard held(lock);
          cluster = slot_cluster[random() % kSlots];
          if (cluster < 0) continue;
          seen = generation[static_cast<std::size_t>(cluster)];
        }
        for (unsigned spin = random() % 50; spin > 0; --spin) std::this_thread::yield();
        {
          std::lock_guard held(lock);
          if (generation[static_cast<std::size_t>(cluster)] != seen) violations.fetch_add(1);
        }
        lookups.fetch_add(1);
      }
    });
  }
  std::mt19937 random(99);
  std::uint64_t reused = 0;
  for (int round = 0; reused < 1000 || lookups.load() < 10000; ++round) {
    if (round > 5000000) break;  // (readers starving every advance would fail below)
    std::this_thread::yield();
    std::lock_guard held(lock);
    const int s = static_cast<int>(random() % kSlots);
    if (slot_cluster[s] >= 0) {
      pool.quarantine(static_cast<std::uint64_t>(slot_cluster[s]));  // unmapped, then freed
      slot_cluster[s] = -1;
    } else if (const std::optional<std::uint64_t> found = pool.find(1)) {
      pool.take(*found, 1);
      ++generation[*found];  // new data: a reader holding the old mapping would see this
      slot_cluster[s] = static_cast<std::int64_t>(*found);
      ++reused;
    } else if (next_cluster < generation.size()) {
      slot_cluster[s] = static_cast<std::int64_t>(next_cluster++);
    }
  }
  stop.store(true);
  for (std::thread& reader : readers) reader.join();
  EXPECT_EQ(violations.load(), 0);
  EXPECT_GE(reused, 1000u);
  EXPECT_GE(lookups.load(), 10000u);
}

}  // namespace
}  // namespace spindle::block::qcow2
