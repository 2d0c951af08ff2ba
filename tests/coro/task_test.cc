// Task<T>: values, nesting, exceptions, and the bounded stack for long chains of synchronously
// completing awaits (g++ drops the symmetric-transfer tail call at -O0 and under sanitizers).
#include "coro/task.h"

#include <gtest/gtest.h>

#include "support/thread_identity.h"

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

#include "aio/context.h"
#include "aio/io_thread.h"
#include "coro/block_on.h"

namespace spindle::coro {
namespace {

Task<int> answer() { co_return 42; }

Task<std::string> greet(std::string name) { co_return "hello " + name; }

Task<int> add_children() {
  const int a = co_await answer();
  const std::string b = co_await greet("world");
  co_return a + static_cast<int>(b.size());
}

TEST(TaskTest, ReturnsValuesThroughNestedAwaits) {
  EXPECT_EQ(block_on(add_children()), 42 + 11);
}

Task<std::unique_ptr<int>> move_only() { co_return std::make_unique<int>(7); }

TEST(TaskTest, MoveOnlyResults) {
  auto result = block_on(move_only());
  ASSERT_TRUE(result);
  EXPECT_EQ(*result, 7);
}

Task<int> depth(int n) {
  if (n == 0) co_return 0;
  co_return co_await depth(n - 1) + 1;
}

TEST(TaskTest, DeepRecursiveChain) { EXPECT_EQ(block_on(depth(1000)), 1000); }

Task<int> throws_logic_error() {
  throw std::logic_error("broken invariant");
  co_return 0;
}

Task<std::string> catches_child_error() {
  try {
    co_await throws_logic_error();
  } catch (const std::logic_error& e) {
    co_return std::string("caught: ") + e.what();
  }
  co_return "not thrown";
}

TEST(TaskTest, ExceptionsPropagateToTheAwaitingParent) {
  EXPECT_EQ(block_on(catches_child_error()), "caught: broken invariant");
  EXPECT_THROW(block_on(throws_logic_error()), std::logic_error);
}

TEST(TaskTest, UnstartedTaskIsDestroyedWithoutRunning) {
  bool ran = false;
  {
    auto task = [](bool& flag) -> Task<void> {
      flag = true;
      co_return;
    }(ran);
    EXPECT_TRUE(task.valid());
  }
  EXPECT_FALSE(ran);
}

// Stack probe: the deepest point reached below the root's frame. Frame addresses, not addresses
// of locals, because AddressSanitizer may put locals on a heap-allocated "fake stack".
std::uintptr_t g_stack_top = 0;
std::uintptr_t g_max_stack_depth = 0;

Task<int> completes_immediately(int value) {
  const auto here = reinterpret_cast<std::uintptr_t>(__builtin_frame_address(0));
  if (g_stack_top > here) g_max_stack_depth = std::max(g_max_stack_depth, g_stack_top - here);
  co_return value;
}

Task<long> sum_of_many_synchronous_awaits(int count) {
  g_stack_top = reinterpret_cast<std::uintptr_t>(__builtin_frame_address(0));
  long sum = 0;
  for (int i = 0; i < count; ++i) sum += co_await completes_immediately(1);
  co_return sum;
}

TEST(TaskTest, MillionSynchronousAwaitsUseBoundedStack) {
  constexpr int kAwaits = 1'000'000;
  g_max_stack_depth = 0;
  EXPECT_EQ(block_on(sum_of_many_synchronous_awaits(kAwaits)), kAwaits);
  // Without the transfer budget a -O0/sanitizer build uses tens of megabytes here.
  EXPECT_LT(g_max_stack_depth, 1u << 20);
}

TEST(TaskTest, BlockOnAnIoThreadFromTheMainThread) {
  aio::IoThread io("block-on");
  const auto caller = testing_support::this_thread_id();
  auto ran_on = block_on(io.context(), []() -> Task<std::thread::id> {
    co_return testing_support::this_thread_id();
  }());
  EXPECT_NE(ran_on, caller);
}

TEST(TaskDeathTest, ExceptionEscapingADetachedCoroutineIsFatal) {
  EXPECT_DEATH(enter(create([]() -> Task<void> {
                 throw std::runtime_error("nobody catches this");
                 co_return;
               }())),
               "exception escaped a detached coroutine: nobody catches this");
}

}  // namespace
}  // namespace spindle::coro
