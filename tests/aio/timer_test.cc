// Timers: QEMU's /aio/timer/schedule (reference/qemu-aio.md §3.2; 750 ms scaled down to 200 ms)
// with the same assertions, on both clocks, plus ordering, cancel and cross-thread arming.
#include "aio/timer.h"

#include <gtest/gtest.h>

#include <thread>
#include <vector>

#include "aio/context.h"

namespace spindle::aio {
namespace {

using namespace std::chrono_literals;

class TimerTest : public testing::TestWithParam<Clock> {
 protected:
  ContextRef ctx = Context::create("timer-test");
  void drain() {
    while (ctx->poll(false)) {
    }
  }
};

TEST_P(TimerTest, Schedule) {
  constexpr auto kPeriod = 200ms;
  int n = 0;
  const int max = 2;
  Timer* self = nullptr;
  // When each (re)arm happened, or at most earlier. A check that the timer has not fired yet
  // is only sound if it ended before the deadline: a loaded machine can deschedule this thread
  // for longer than kPeriod, and then the timer legally fires in that poll.
  std::int64_t armed_at = 0;
  std::vector<std::int64_t> fired_at;
  const auto before_deadline = [&] {
    return now_ns(Clock::monotonic) - armed_at < std::chrono::nanoseconds(kPeriod).count();
  };
  Timer timer(*ctx, GetParam(), [&] {
    ++n;
    fired_at.push_back(now_ns(Clock::monotonic));
    armed_at = now_ns(Clock::monotonic);
    if (n < max) self->arm_in(kPeriod);
  });
  self = &timer;
  armed_at = now_ns(Clock::monotonic);
  timer.arm_in(kPeriod);

  drain();
  const bool early_poll = ctx->poll(false);
  if (before_deadline()) {
    EXPECT_FALSE(early_poll);
    EXPECT_EQ(n, 0);
  }
  if (n > 0) GTEST_SKIP() << "descheduled past the first deadline; nothing left to check";

  std::this_thread::sleep_for(kPeriod + 100ms);
  EXPECT_EQ(n, 0);  // callbacks run only inside poll()

  EXPECT_TRUE(ctx->poll(false));
  EXPECT_EQ(n, 1);  // and the callback re-armed it
  drain();
  const bool rearmed_poll = ctx->poll(false);
  if (before_deadline()) {
    EXPECT_FALSE(rearmed_poll);
    EXPECT_EQ(n, 1);
  }

  if (n < 2) {
    EXPECT_TRUE(ctx->poll(true));  // sleeps until the re-armed timer fires
  }
  EXPECT_EQ(n, 2);
  ASSERT_EQ(fired_at.size(), 2u);
  // It really waited: the re-armed deadline is kPeriod after the first firing.
  EXPECT_GE(fired_at[1] - fired_at[0], std::chrono::nanoseconds(kPeriod).count());
  EXPECT_FALSE(ctx->poll(false));
  EXPECT_FALSE(timer.armed());
}

INSTANTIATE_TEST_SUITE_P(BothClocks, TimerTest,
                         testing::Values(Clock::monotonic, Clock::realtime),
                         [](const testing::TestParamInfo<Clock>& info) {
                           return info.param == Clock::monotonic ? "Monotonic" : "Realtime";
                         });

TEST(TimerOrderTest, FiresInDeadlineOrderAndFifoForTies) {
  ContextRef ctx = Context::create("timer-order");
  std::vector<int> fired;
  const std::int64_t base = now_ns(Clock::monotonic);
  Timer late(*ctx, Clock::monotonic, [&] { fired.push_back(3); });
  Timer tie_first(*ctx, Clock::monotonic, [&] { fired.push_back(1); });
  Timer tie_second(*ctx, Clock::monotonic, [&] { fired.push_back(2); });
  Timer early(*ctx, Clock::monotonic, [&] { fired.push_back(0); });
  late.arm_at(base + 3'000'000);
  tie_first.arm_at(base + 2'000'000);
  tie_second.arm_at(base + 2'000'000);
  early.arm_at(base + 1'000'000);
  while (fired.size() < 4) ctx->poll(true);
  EXPECT_EQ(fired, (std::vector<int>{0, 1, 2, 3}));
}

TEST(TimerCancelTest, CancelledTimerNeverFiresAndRearmReplacesDeadline) {
  ContextRef ctx = Context::create("timer-cancel");
  int cancelled_runs = 0, rearmed_runs = 0;
  Timer cancelled(*ctx, Clock::monotonic, [&] { ++cancelled_runs; });
  std::int64_t rearmed_fired_at = 0;
  Timer rearmed(*ctx, Clock::monotonic, [&] {
    ++rearmed_runs;
    rearmed_fired_at = now_ns(Clock::monotonic);
  });
  cancelled.arm_in(1ms);
  EXPECT_TRUE(cancelled.armed());
  cancelled.cancel();
  EXPECT_FALSE(cancelled.armed());
  const std::int64_t rearmed_at = now_ns(Clock::monotonic);
  rearmed.arm_in(1ms);
  rearmed.arm_in(30ms);  // replaces the 1 ms deadline
  std::this_thread::sleep_for(10ms);
  // Past the 1 ms deadline, and before the 30 ms one unless this thread was descheduled for
  // 20 ms (a loaded machine): then the timer legally fires here.
  const bool early = ctx->poll(false);
  if (now_ns(Clock::monotonic) - rearmed_at < 30'000'000) {
    EXPECT_FALSE(early);
    EXPECT_EQ(rearmed_runs, 0);
  }
  if (rearmed_runs == 0) {
    EXPECT_TRUE(ctx->poll(true));
  }
  EXPECT_EQ(rearmed_runs, 1);
  EXPECT_GE(rearmed_fired_at - rearmed_at, 30'000'000);  // at the new deadline, not the old
  EXPECT_EQ(cancelled_runs, 0);
}

TEST(TimerCrossThreadTest, EarlierDeadlineFromAnotherThreadWakesSleepingPoll) {
  ContextRef ctx = Context::create("timer-xthread");
  int far_runs = 0, near_runs = 0;
  Timer far(*ctx, Clock::monotonic, [&] { ++far_runs; });
  Timer near(*ctx, Clock::monotonic, [&] { ++near_runs; });
  far.arm_in(60s);
  std::thread other([&] {
    std::this_thread::sleep_for(50ms);
    near.arm_in(10ms);
  });
  const std::int64_t before = now_ns(Clock::monotonic);
  EXPECT_TRUE(ctx->poll(true));  // sleeping with a 60 s timeout until `near` is armed
  other.join();
  EXPECT_EQ(near_runs, 1);
  EXPECT_EQ(far_runs, 0);
  EXPECT_LT(now_ns(Clock::monotonic) - before, 5'000'000'000);
}

TEST(TimerCallbackTest, TimerRearmedToThePastRunsInTheNextPoll) {
  ContextRef ctx = Context::create("timer-past");
  int runs = 0;
  Timer* self = nullptr;
  Timer timer(*ctx, Clock::monotonic, [&] {
    if (++runs < 3) self->arm_at(0);  // already expired: must not loop inside one poll
  });
  self = &timer;
  timer.arm_at(0);
  EXPECT_TRUE(ctx->poll(false));
  EXPECT_EQ(runs, 1);
  EXPECT_TRUE(ctx->poll(false));
  EXPECT_EQ(runs, 2);
}

}  // namespace
}  // namespace spindle::aio
