// Bottom halves: the /aio/bh/* scenarios of QEMU's test-aio (reference/qemu-aio.md §3.2) with
// the same assertions, plus cross-thread scheduling and teardown checks.
#include "aio/bottom_half.h"

#include <gtest/gtest.h>

#include "support/thread_identity.h"

#include <thread>

#include "aio/context.h"

namespace spindle::aio {
namespace {

// Counts its runs and reschedules itself until it has run `max` times; optionally destroys
// itself (and clears the test's pointer) at that point.
struct CountingBh {
  BottomHalf* bh = nullptr;
  int n = 0;
  int max = 1;
  bool destroy_at_max = false;

  void attach(Context& ctx, int runs, bool self_destroy = false) {
    max = runs;
    destroy_at_max = self_destroy;
    bh = BottomHalf::create(ctx, [this] { run(); }, "counting");
  }
  void run() {
    ++n;
    if (n < max) {
      bh->schedule();
    } else if (destroy_at_max) {
      bh->destroy();
      bh = nullptr;
    }
  }
};

class BottomHalfTest : public testing::Test {
 protected:
  ContextRef ctx = Context::create("bh-test");
  void drain() {
    while (ctx->poll(false)) {
    }
  }
};

TEST_F(BottomHalfTest, Schedule) {
  CountingBh data;
  data.attach(*ctx, 1);
  data.bh->schedule();
  EXPECT_EQ(data.n, 0);  // nothing runs outside poll()
  EXPECT_TRUE(ctx->poll(true));
  EXPECT_EQ(data.n, 1);
  EXPECT_FALSE(ctx->poll(false));
  EXPECT_EQ(data.n, 1);
  data.bh->destroy();
}

TEST_F(BottomHalfTest, ScheduleTenRunsOncePerPoll) {
  CountingBh data;
  data.attach(*ctx, 10);
  data.bh->schedule();
  EXPECT_EQ(data.n, 0);
  EXPECT_TRUE(ctx->poll(false));
  EXPECT_EQ(data.n, 1);  // the reschedule from its own callback waits for the next poll
  EXPECT_TRUE(ctx->poll(true));
  EXPECT_EQ(data.n, 2);
  while (data.n < 10) ctx->poll(true);
  EXPECT_EQ(data.n, 10);
  EXPECT_FALSE(ctx->poll(false));
  EXPECT_EQ(data.n, 10);
  data.bh->destroy();
}

TEST_F(BottomHalfTest, Cancel) {
  CountingBh data;
  data.attach(*ctx, 1);
  data.bh->schedule();
  data.bh->cancel();
  EXPECT_FALSE(ctx->poll(false));  // a cancelled BH is not progress
  EXPECT_EQ(data.n, 0);
  data.bh->destroy();
}

TEST_F(BottomHalfTest, DeleteWhilePendingNeverRuns) {
  CountingBh data;
  data.attach(*ctx, 1);
  data.bh->schedule();
  data.bh->destroy();
  EXPECT_FALSE(ctx->poll(false));
  EXPECT_EQ(data.n, 0);
}

TEST_F(BottomHalfTest, CallbackDeleteOne) {
  CountingBh data;
  data.attach(*ctx, 1, /*self_destroy=*/true);
  data.bh->schedule();
  while (data.n < data.max) ctx->poll(true);
  EXPECT_EQ(data.n, 1);
  EXPECT_EQ(data.bh, nullptr);
  EXPECT_FALSE(ctx->poll(false));
}

TEST_F(BottomHalfTest, CallbackDeleteMany) {
  CountingBh data[4];
  const int maxes[4] = {1, 3, 2, 4};
  for (int i = 0; i < 4; ++i) data[i].attach(*ctx, maxes[i], /*self_destroy=*/true);
  for (auto& d : data) d.bh->schedule();
  EXPECT_TRUE(ctx->poll(false));  // one poll runs all four once
  for (auto& d : data) EXPECT_EQ(d.n, 1);
  EXPECT_EQ(data[0].bh, nullptr);
  auto all_gone = [&] {
    for (auto& d : data) {
      if (d.bh) return false;
    }
    return true;
  };
  while (!all_gone()) ctx->poll(true);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(data[i].n, maxes[i]);
  EXPECT_FALSE(ctx->poll(false));
}

TEST_F(BottomHalfTest, SchedulesCoalesceBeforeTheyRun) {
  int runs = 0;
  BottomHalf* bh = BottomHalf::create(*ctx, [&] { ++runs; });
  bh->schedule();
  bh->schedule();
  bh->schedule();
  EXPECT_TRUE(ctx->poll(false));
  EXPECT_EQ(runs, 1);
  EXPECT_FALSE(ctx->poll(false));
  bh->destroy();
}

TEST_F(BottomHalfTest, CancelThenRescheduleRuns) {
  int runs = 0;
  BottomHalf* bh = BottomHalf::create(*ctx, [&] { ++runs; });
  bh->schedule();
  bh->cancel();
  bh->schedule();
  EXPECT_TRUE(ctx->poll(false));
  EXPECT_EQ(runs, 1);
  bh->destroy();
}

TEST_F(BottomHalfTest, ScheduleFromAnotherThreadWakesBlockingPoll) {
  std::thread::id ran_on;
  BottomHalf* bh = BottomHalf::create(*ctx, [&] { ran_on = testing_support::this_thread_id(); });
  std::thread other([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    bh->schedule();
  });
  EXPECT_TRUE(ctx->poll(true));  // sleeps until the other thread's schedule kicks it
  other.join();
  EXPECT_EQ(ran_on, testing_support::this_thread_id());
  bh->destroy();
}

TEST_F(BottomHalfTest, RunSoonRunsOnceInPollingThread) {
  int runs = 0;
  std::thread([&] { ctx->run_soon([&] { ++runs; }); }).join();
  EXPECT_EQ(runs, 0);
  EXPECT_TRUE(ctx->poll(true));
  EXPECT_EQ(runs, 1);
  EXPECT_FALSE(ctx->poll(false));
}

TEST_F(BottomHalfTest, WritesBeforeScheduleAreVisibleToCallback) {
  int payload = 0;
  int seen = -1;
  BottomHalf* bh = BottomHalf::create(*ctx, [&] { seen = payload; });
  std::thread([&] {
    payload = 42;
    bh->schedule();
  }).join();
  ctx->poll(true);
  EXPECT_EQ(seen, 42);
  bh->destroy();
}

using BottomHalfDeathTest = BottomHalfTest;

TEST_F(BottomHalfDeathTest, ContextTeardownWithLiveBottomHalfNamesIt) {
  EXPECT_DEATH(
      {
        ContextRef doomed = Context::create("doomed");
        BottomHalf::create(*doomed, [] {}, "forgotten-bh");
        doomed = ContextRef();
      },
      "bottom half 'forgotten-bh' never destroyed");
}

TEST_F(BottomHalfDeathTest, ContextTeardownWithPendingWorkIsFatal) {
  EXPECT_DEATH(
      {
        ContextRef doomed = Context::create("doomed");
        std::thread([&] { doomed->run_soon([] {}); }).join();
        doomed = ContextRef();
      },
      "destroyed with pending work");
}

}  // namespace
}  // namespace spindle::aio
