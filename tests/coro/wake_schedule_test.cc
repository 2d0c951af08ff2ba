// wake()/schedule()/switch_to()/yield(): QEMU's /aio/coroutine/* scenarios and the extra cases
// of reference/qemu-aio.md §3.5 (FIFO scheduling, deferred same-context wake, double-schedule
// abort naming both parties, thread identity after moving).
#include <gtest/gtest.h>

#include "support/thread_identity.h"

#include <atomic>
#include <thread>
#include <vector>

#include "aio/context.h"
#include "aio/io_thread.h"
#include "coro/block_on.h"
#include "coro/coroutine.h"
#include "coro/task.h"

namespace spindle::coro {
namespace {

using aio::Context;
using aio::ContextRef;
using aio::IoThread;

struct ChainData {
  int i = 0;
  int max = 25000;
  Coroutine* other = nullptr;
};

Task<void> chain(ChainData& data) {
  for (;;) {
    wake(data.other);  // same context, from a coroutine: runs right after we suspend
    co_await suspend();
    if (++data.i == data.max) break;
  }
}

TEST(WakeTest, QueueChainingPingPongDoesNotGrowTheStack) {
  ChainData a, b;
  Coroutine* co_a = create(chain(a));
  Coroutine* co_b = create(chain(b));
  a.other = co_b;
  b.other = co_a;
  enter(co_a);  // 2 x 25 000 alternating resumptions, all inside this call
  EXPECT_EQ(a.i, a.max);
  EXPECT_EQ(b.i, b.max - 1);  // b woke a one last time and is suspended
  enter(co_b);
  EXPECT_EQ(b.i, b.max);
}

Task<void> wake_then_check(Coroutine* target, const bool& target_ran, bool& checked) {
  wake(target);
  EXPECT_FALSE(target_ran);  // deferred: the waker keeps running
  co_await yield();          // ...until it suspends; yield() requeues us behind it
  EXPECT_TRUE(target_ran);
  checked = true;
}

Task<void> mark_ran(bool& ran) {
  co_await suspend();
  ran = true;
}

TEST(WakeTest, SameContextWakeFromACoroutineIsDeferredUntilTheWakerSuspends) {
  ContextRef ctx = Context::create("deferred");
  bool target_ran = false, checked = false;
  Coroutine* target = create(mark_ran(target_ran));
  block_on(*ctx, [&]() -> Task<void> {
    enter(target);  // runs until its first suspend; home = ctx
    co_return;
  }());
  Coroutine* waker = spawn(*ctx, wake_then_check(target, target_ran, checked));
  (void)waker;
  while (!checked) ctx->poll(true);
  EXPECT_TRUE(target_ran);
}

TEST(WakeTest, WakeOutsideACoroutineOnTheHomeThreadRunsImmediately) {
  bool ran = false;
  Coroutine* co = create(mark_ran(ran));
  enter(co);
  EXPECT_FALSE(ran);
  wake(co);  // main thread, main context, not in a coroutine: entered right here
  EXPECT_TRUE(ran);
}

TEST(WakeTest, WorkerThreadWakeSchedulesOnTheHomeContext) {
  // /aio/coroutine/worker-thread-co-enter: a thread without a context must not run the
  // coroutine itself; it runs later, in the home (main) thread's poll.
  std::thread::id ran_on;
  bool ran = false;
  Coroutine* co = create([](std::thread::id& where, bool& flag) -> Task<void> {
    co_await suspend();
    where = testing_support::this_thread_id();
    flag = true;
  }(ran_on, ran));
  enter(co);
  std::thread worker([&] { wake(co); });
  worker.join();
  EXPECT_FALSE(ran);
  EXPECT_TRUE(aio::main_context().poll(true));
  EXPECT_TRUE(ran);
  EXPECT_EQ(ran_on, testing_support::this_thread_id());
  EXPECT_FALSE(aio::main_context().poll(false));
}

Task<void> record_order(std::vector<int>& order, int index) {
  order.push_back(index);
  co_return;
}

TEST(ScheduleTest, CoroutinesScheduledFromOneThreadRunInFifoOrder) {
  constexpr int kCount = 1000;
  std::vector<int> local_order, remote_order;
  ContextRef ctx = Context::create("fifo");
  for (int i = 0; i < kCount; ++i) schedule(*ctx, create(record_order(remote_order, i)));
  // From the home thread itself too (the owner-private queue).
  ctx->run_soon([&] {
    for (int i = 0; i < kCount; ++i) schedule(*ctx, create(record_order(local_order, i)));
  });
  while (static_cast<int>(local_order.size()) < kCount) ctx->poll(true);
  ASSERT_EQ(static_cast<int>(remote_order.size()), kCount);
  for (int i = 0; i < kCount; ++i) {
    EXPECT_EQ(remote_order[i], i);
    EXPECT_EQ(local_order[i], i);
  }
}

TEST(ScheduleTest, CoroutinesScheduledAcrossThreadsRunInFifoOrderPerProducer) {
  IoThread io("fifo-io");
  constexpr int kCount = 2000;
  std::vector<int> order;
  std::atomic<int> finished{0};
  for (int i = 0; i < kCount; ++i) {
    schedule(io.context(), create([](std::vector<int>& out, int index,
                                     std::atomic<int>& done) -> Task<void> {
               out.push_back(index);  // all run in io's thread, one at a time
               done.fetch_add(1);
               co_return;
             }(order, i, finished)));
  }
  while (finished.load() < kCount) std::this_thread::yield();
  io.stop();
  for (int i = 0; i < kCount; ++i) ASSERT_EQ(order[i], i);
}

Task<void> hop(Context& target, std::thread::id& after, Context*& home_after) {
  co_await switch_to(target);
  after = testing_support::this_thread_id();
  home_after = self()->home();
}

TEST(ScheduleTest, SwitchToRunsOnTheTargetThreadAndMakesItHome) {
  IoThread io("switch-io");
  std::thread::id io_thread_id;
  io.context().run_soon([&] { io_thread_id = testing_support::this_thread_id(); });
  std::thread::id after;
  Context* home_after = nullptr;
  block_on(io.context(), [&]() -> Task<void> { co_return; }());  // io_thread_id is set now
  ContextRef ctx = Context::create("switch-origin");
  block_on(*ctx, hop(io.context(), after, home_after));
  EXPECT_EQ(after, io_thread_id);
  EXPECT_EQ(home_after, &io.context());
}

Task<void> bounce_between(Context& a, Context& b, int rounds, std::thread::id a_id,
                          std::thread::id b_id, int& verified) {
  for (int i = 0; i < rounds; ++i) {
    co_await switch_to(b);
    EXPECT_EQ(testing_support::this_thread_id(), b_id);
    co_await switch_to(a);
    EXPECT_EQ(testing_support::this_thread_id(), a_id);
    ++verified;
  }
}

TEST(ScheduleTest, ThreadIdentityHoldsAfterEveryMove) {
  IoThread a("identity-a"), b("identity-b");
  std::thread::id a_id, b_id;
  block_on(a.context(), [&]() -> Task<void> {
    a_id = testing_support::this_thread_id();
    co_return;
  }());
  block_on(b.context(), [&]() -> Task<void> {
    b_id = testing_support::this_thread_id();
    co_return;
  }());
  int verified = 0;
  block_on(a.context(), bounce_between(a.context(), b.context(), 1000, a_id, b_id, verified));
  EXPECT_EQ(verified, 1000);
}

Task<void> yield_and_count(int& counter, int times) {
  for (int i = 0; i < times; ++i) {
    ++counter;
    co_await yield();
  }
}

TEST(ScheduleTest, YieldLetsOtherCoroutinesOfTheContextRun) {
  ContextRef ctx = Context::create("yield");
  int a = 0, b = 0;
  spawn(*ctx, yield_and_count(a, 3));
  spawn(*ctx, yield_and_count(b, 3));
  EXPECT_TRUE(ctx->poll(false));
  EXPECT_EQ(a, 1);  // each ran once: a yielded to the back of the queue, then b ran
  EXPECT_EQ(b, 1);
  EXPECT_TRUE(ctx->poll(false));
  EXPECT_EQ(a, 2);
  EXPECT_EQ(b, 2);
  while (ctx->poll(false)) {
  }
  EXPECT_EQ(a, 3);
  EXPECT_EQ(b, 3);
}

Task<void> park_forever_until_woken(bool& done) {
  co_await suspend();
  done = true;
}

void schedule_twice() {
  ContextRef ctx = Context::create("double");
  bool done = false;
  Coroutine* co = create(park_forever_until_woken(done));
  enter(co);
  schedule(*ctx, co, "first_scheduler");
  schedule(*ctx, co, "second_scheduler");
}

TEST(ScheduleDeathTest, DoubleScheduleAbortsNamingBothParties) {
  EXPECT_DEATH(schedule_twice(),
               "second_scheduler: coroutine 0x[0-9a-f]+ was already scheduled by "
               "'first_scheduler'");
}

void enter_scheduled() {
  ContextRef ctx = Context::create("enter-scheduled");
  bool done = false;
  Coroutine* co = create(park_forever_until_woken(done));
  enter(co);
  schedule(*ctx, co, "the_scheduler");
  enter(co, "the_enterer");
}

TEST(ScheduleDeathTest, EnteringAScheduledCoroutineAborts) {
  EXPECT_DEATH(enter_scheduled(),
               "the_enterer: entering coroutine 0x[0-9a-f]+ that was already scheduled by "
               "'the_scheduler'");
}

void wake_twice_from_coroutine() {
  bool done = false;
  Coroutine* target = create(park_forever_until_woken(done));
  enter(target);
  enter(create([](Coroutine* t) -> Task<void> {
    wake(t, "first_waker");
    wake(t, "second_waker");
    co_return;
  }(target)));
}

TEST(ScheduleDeathTest, DoubleDeferredWakeAborts) {
  EXPECT_DEATH(wake_twice_from_coroutine(), "second_waker: .* already scheduled by 'first_waker'");
}

void wake_homeless() {
  Coroutine* co = nullptr;
  std::thread([&] { co = create([]() -> Task<void> { co_return; }()); }).join();
  wake(co, "homeless_waker");
}

TEST(ScheduleDeathTest, WakingACoroutineWithoutAHomeAborts) {
  EXPECT_DEATH(wake_homeless(), "homeless_waker: .* has no home context");
}

}  // namespace
}  // namespace spindle::coro
