// Context::poll() contract (reference/qemu-aio.md §1.3, §1.4, §1.6): notify is a kick, not
// progress; blocking with nothing registered; nesting; adaptive polling; current context rules.
#include "aio/context.h"

#include <gtest/gtest.h>

#include <thread>

#include "aio/bottom_half.h"
#include "aio/io_thread.h"
#include "aio/timer.h"
#include "coro/coroutine.h"
#include "coro/task.h"

namespace spindle::aio {
namespace {

using namespace std::chrono_literals;

TEST(ContextNotifyTest, NotifyIsNotProgressAndDoesNotBlock) {
  ContextRef ctx = Context::create("notify");
  EXPECT_FALSE(ctx->poll(false));
  ctx->notify();
  EXPECT_FALSE(ctx->poll(true));  // returns at once: the kick is sticky, but not progress
  EXPECT_FALSE(ctx->poll(false));
}

TEST(ContextNotifyTest, NotifyFromAnotherThreadEndsABlockingPollWithNoFds) {
  ContextRef ctx = Context::create("notify-xthread");
  // Read before the thread starts: the notify comes at least 50 ms after it, however late
  // this thread gets to poll() on a loaded machine.
  const std::int64_t before = now_ns(Clock::monotonic);
  std::thread other([&] {
    std::this_thread::sleep_for(50ms);
    ctx->notify();
  });
  EXPECT_FALSE(ctx->poll(true));  // blocked (no fd registered at all) until the notify
  EXPECT_GE(now_ns(Clock::monotonic) - before, 40'000'000);
  other.join();
}

TEST(ContextNotifyTest, ManyProducersNeverLoseAWakeup) {
  // Each round the loop goes to sleep and two threads race to post; a lost wake-up would hang.
  ContextRef ctx = Context::create("no-lost-wakeups");
  constexpr int kRounds = 2000;
  std::atomic<int> posted{0};
  int ran = 0;
  std::thread producers[2];
  for (auto& producer : producers) {
    producer = std::thread([&] {
      for (int i = 0; i < kRounds; ++i) {
        ctx->run_soon([&] { ++ran; });
        posted.fetch_add(1);
        if (i % 64 == 0) std::this_thread::sleep_for(50us);
      }
    });
  }
  while (ran < 2 * kRounds) ctx->poll(true);
  for (auto& producer : producers) producer.join();
  EXPECT_EQ(ran, 2 * kRounds);
  EXPECT_FALSE(ctx->poll(false));
}

TEST(ContextNestingTest, NestedPollRunsWorkClaimedByTheOuterPoll) {
  ContextRef ctx = Context::create("nested");
  int first = 0, second = 0;
  BottomHalf* b = BottomHalf::create(*ctx, [&] { ++second; });
  BottomHalf* a = BottomHalf::create(*ctx, [&] {
    ++first;
    EXPECT_TRUE(ctx->poll(false));  // runs `b`, which the outer poll had already claimed
    EXPECT_EQ(second, 1);
  });
  a->schedule();
  b->schedule();
  EXPECT_TRUE(ctx->poll(false));
  EXPECT_EQ(first, 1);
  EXPECT_EQ(second, 1);
  EXPECT_FALSE(ctx->poll(false));
  a->destroy();
  b->destroy();
}

TEST(ContextCurrentTest, CurrentContextFollowsThePollingThread) {
  ContextRef ctx = Context::create("current");
  EXPECT_EQ(current_context(), &main_context());  // gtest runs on the main thread
  Context* seen = nullptr;
  ctx->run_soon([&] { seen = current_context(); });
  ctx->poll(false);
  EXPECT_EQ(seen, ctx.get());
  EXPECT_EQ(current_context(), &main_context());

  Context* worker_sees = &main_context();
  std::thread([&] { worker_sees = current_context(); }).join();
  EXPECT_EQ(worker_sees, nullptr);  // a plain worker thread is nobody's home

  IoThread io("io-current");
  Context* io_sees = nullptr;
  std::atomic<bool> done{false};
  io.context().run_soon([&] {
    io_sees = current_context();
    done = true;
  });
  while (!done) std::this_thread::yield();
  EXPECT_EQ(io_sees, &io.context());
}

TEST(ContextPollingTest, WindowGrowsFromFourMicrosecondsAndShrinksAfterLongWaits) {
  ContextRef ctx = Context::create("adaptive");
  // max_ns is far above the 200 us waits, which a loaded machine stretches by its wake-up
  // latency (a 200 us wait measured past max_ns would shrink the window instead).
  ctx->set_poll_params({/*max_ns=*/100'000'000, /*grow=*/0, /*shrink=*/0});
  EXPECT_EQ(ctx->poll_window_ns(), 0);
  int runs = 0;
  Timer timer(*ctx, Clock::monotonic, [&] { ++runs; });

  timer.arm_in(200us);  // short waits: the window starts at 4 us, then doubles
  ctx->poll(true);
  EXPECT_EQ(ctx->poll_window_ns(), 4000);
  timer.arm_in(200us);
  ctx->poll(true);
  EXPECT_EQ(ctx->poll_window_ns(), 8000);

  timer.arm_in(150ms);  // a wait longer than max_ns: shrink 0 drops the window to zero
  ctx->poll(true);
  EXPECT_EQ(ctx->poll_window_ns(), 0);
  EXPECT_EQ(runs, 3);
}

TEST(ContextPollingTest, BusyPollingStillDeliversCrossThreadWork) {
  IoThread io("io-polling", {/*max_ns=*/1'000'000, 0, 0});
  for (int round = 0; round < 200; ++round) {
    std::atomic<bool> done{false};
    io.context().run_soon([&] { done = true; });
    while (!done) std::this_thread::yield();
  }
  SUCCEED();
}

TEST(IoThreadTest, StopRunsWorkQueuedBeforeTheStop) {
  std::atomic<int> ran{0};
  {
    IoThread io("io-stop", {0, 0, 0});
    for (int i = 0; i < 100; ++i) io.context().run_soon([&] { ran.fetch_add(1); });
    io.stop();
    EXPECT_EQ(ran.load(), 100);
    io.stop();  // idempotent
  }
  EXPECT_EQ(ran.load(), 100);
}

TEST(IoThreadTest, StopFromInsideTheLoop) {
  IoThread io("io-self-stop");
  std::atomic<bool> stopped{false};
  io.context().run_soon([&] {
    io.stop();  // ends the loop after this iteration
    stopped = true;
  });
  while (!stopped) std::this_thread::yield();
  io.stop();  // joins
  SUCCEED();
}

coro::Task<void> polls_its_own_context(Context& ctx) {
  ctx.poll(false);
  co_return;
}

TEST(ContextDeathTest, PollFromACoroutineIsFatal) {
  EXPECT_DEATH(
      {
        ContextRef ctx = Context::create("poll-in-coroutine");
        coro::enter(coro::create(polls_its_own_context(*ctx)));
      },
      "poll\\(\\) called from a coroutine");
}

TEST(ContextDeathTest, PollFromTwoThreadsAtOnceIsFatal) {
  EXPECT_DEATH(
      {
        IoThread io("io-owner", {0, 0, 0});
        // Hold the IoThread inside poll() (running an item) instead of hoping it got there in
        // 20 ms; the bound only ends the hold if the fatal error never comes.
        std::atomic<bool> inside{false};
        std::atomic<bool> release{false};
        io.context().run_soon([&] {
          inside.store(true);
          inside.notify_all();
          for (int i = 0; i < 10'000 && !release.load(); ++i) std::this_thread::sleep_for(1ms);
        });
        inside.wait(false);
        io.context().poll(false);
        release.store(true);
      },
      "poll\\(\\) from two threads at once");
}

}  // namespace
}  // namespace spindle::aio
