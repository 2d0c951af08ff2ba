// QEMU's test-coroutine /basic/* scenarios (reference/qemu-aio.md §3.3) with the same
// assertions, expressed with enter()/suspend() on stackless coroutines.
#include <gtest/gtest.h>

#include <vector>

#include "coro/coroutine.h"
#include "coro/task.h"

namespace spindle::coro {
namespace {

Task<void> set_flag(bool& done) {
  done = true;
  co_return;
}

TEST(CoroutineBasicTest, Lifecycle) {
  for (int i = 0; i < 2; ++i) {  // twice: the second reuses a pooled frame
    bool done = false;
    enter(create(set_flag(done)));
    EXPECT_TRUE(done);
  }
}

Task<void> suspend_n_times(int times, bool& done) {
  for (int i = 0; i < times; ++i) co_await suspend();
  done = true;
}

TEST(CoroutineBasicTest, Yield) {
  bool done = false;
  Coroutine* co = create(suspend_n_times(5, done));
  int entries = 0;
  while (!done) {
    enter(co);
    ++entries;
  }
  EXPECT_EQ(entries, 5 + 1);  // five re-entries after the first
}

struct NestData {
  int n_enter = 0;
  int n_return = 0;
  int max = 128;
};

Task<void> nest(NestData& data) {
  ++data.n_enter;
  if (data.n_enter < data.max) enter(create(nest(data)));  // a root inside a root
  ++data.n_return;
  co_return;
}

TEST(CoroutineBasicTest, Nesting) {
  NestData data;
  enter(create(nest(data)));
  EXPECT_EQ(data.n_enter, data.max);
  EXPECT_EQ(data.n_return, data.max);
}

Task<void> record_self(Coroutine*& seen) {
  seen = self();
  co_return;
}

TEST(CoroutineBasicTest, Self) {
  Coroutine* seen = nullptr;
  Coroutine* co = create(record_self(seen));
  enter(co);
  EXPECT_EQ(seen, co);
}

Task<void> inner_checks_entered(Coroutine* caller, bool& checked) {
  EXPECT_TRUE(caller->entered());  // suspended only because it entered us: still "entered"
  EXPECT_TRUE(self()->entered());
  co_await suspend();
  EXPECT_TRUE(self()->entered());
  checked = true;
}

Task<void> outer_checks_entered(bool& checked) {
  EXPECT_TRUE(self()->entered());
  Coroutine* inner = create(inner_checks_entered(self(), checked));
  EXPECT_FALSE(inner->entered());  // not before it is entered
  enter(inner);
  EXPECT_FALSE(inner->entered());  // it suspended
  enter(inner);                    // let it finish
  co_return;
}

TEST(CoroutineBasicTest, Entered) {
  bool checked = false;
  enter(create(outer_checks_entered(checked)));
  EXPECT_TRUE(checked);
}

Task<void> note_in_coroutine(bool& inside) {
  inside = in_coroutine();
  co_return;
}

TEST(CoroutineBasicTest, InCoroutine) {
  EXPECT_FALSE(in_coroutine());
  bool inside = false;
  enter(create(note_in_coroutine(inside)));
  EXPECT_TRUE(inside);
  EXPECT_FALSE(in_coroutine());
}

Task<void> ordered(std::vector<int>& order) {
  order.push_back(11);
  co_await suspend();
  order.push_back(12);
}

TEST(CoroutineBasicTest, Order) {
  std::vector<int> order;  // 1x: main, 1y: coroutine
  order.push_back(1);
  Coroutine* co = create(ordered(order));
  enter(co);
  order.push_back(2);
  enter(co);
  order.push_back(3);
  EXPECT_EQ(order, (std::vector<int>{1, 11, 2, 12, 3}));
}

Task<void> suspend_once(bool& finished) {
  co_await suspend();
  finished = true;
}

Task<void> enter_other_then_finish(Coroutine* other) {
  enter(other);  // `other` suspends; we finish and our frame is freed
  co_return;
}

TEST(CoroutineBasicTest, NoDanglingAccessToAFinishedEnterer) {
  // c1 enters c2, which suspends; c1 finishes and is freed; resuming c2 must not touch c1
  // (AddressSanitizer builds turn any such access into a failure).
  bool finished = false;
  Coroutine* c2 = create(suspend_once(finished));
  enter(create(enter_other_then_finish(c2)));
  EXPECT_FALSE(finished);
  enter(c2);
  EXPECT_TRUE(finished);
}

}  // namespace
}  // namespace spindle::coro
