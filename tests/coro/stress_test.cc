// Stress: 5 IoThreads moving 10 000 coroutines among themselves at random for a bounded time.
// Every coroutine must be accounted for at the end, each must always run on the thread of the
// context it moved to, and the whole run must be clean under ThreadSanitizer.
// SPINDLE_STRESS_SECONDS overrides the duration (default 2).
#include <gtest/gtest.h>

#include "support/thread_identity.h"

#include <array>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <random>
#include <thread>

#include "aio/io_thread.h"
#include "coro/block_on.h"
#include "coro/coroutine.h"
#include "coro/task.h"

namespace spindle::coro {
namespace {

constexpr int kThreads = 5;
constexpr int kCoroutines = 10'000;

struct Shared {
  std::array<std::unique_ptr<aio::IoThread>, kThreads> threads;
  std::array<std::thread::id, kThreads> thread_ids;
  std::atomic<bool> stop{false};
  std::atomic<int> live{0};
  std::atomic<long> moves{0};
  std::atomic<long> wrong_thread{0};
  std::atomic<long> finished_moves_total{0};
};

Task<void> wander(Shared& shared, unsigned seed) {
  std::minstd_rand random(seed);
  long my_moves = 0;
  while (!shared.stop.load(std::memory_order_relaxed)) {
    const int target = static_cast<int>(random() % kThreads);
    co_await switch_to(shared.threads[target]->context());
    if (testing_support::this_thread_id() != shared.thread_ids[target] ||
        self()->home() != &shared.threads[target]->context()) {
      shared.wrong_thread.fetch_add(1, std::memory_order_relaxed);
    }
    ++my_moves;
    shared.moves.fetch_add(1, std::memory_order_relaxed);
    if (my_moves % 8 == 0) co_await yield();
  }
  shared.finished_moves_total.fetch_add(my_moves, std::memory_order_relaxed);
  shared.live.fetch_sub(1, std::memory_order_acq_rel);
}

TEST(StressTest, TenThousandCoroutinesWanderAmongFiveIoThreads) {
  const char* env = std::getenv("SPINDLE_STRESS_SECONDS");
  const double seconds = env ? std::atof(env) : 2.0;
  Shared shared;
  for (int i = 0; i < kThreads; ++i) {
    shared.threads[i] = std::make_unique<aio::IoThread>("wander-" + std::to_string(i),
                                                        aio::Context::PollParams{0, 0, 0});
    shared.thread_ids[i] = block_on(shared.threads[i]->context(), []() -> Task<std::thread::id> {
      co_return testing_support::this_thread_id();
    }());
  }
  shared.live = kCoroutines;
  for (int i = 0; i < kCoroutines; ++i) {
    spawn(shared.threads[i % kThreads]->context(), wander(shared, static_cast<unsigned>(i + 1)));
  }
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  shared.stop = true;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (shared.live.load() > 0 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_EQ(shared.live.load(), 0) << "coroutines lost";
  EXPECT_EQ(shared.wrong_thread.load(), 0);
  EXPECT_EQ(shared.finished_moves_total.load(), shared.moves.load());
  EXPECT_GT(shared.moves.load(), kCoroutines);  // on average each moved more than once
  std::printf("%ld moves in %.1f s\n", shared.moves.load(), seconds);
  for (auto& thread : shared.threads) thread->stop();
}

}  // namespace
}  // namespace spindle::coro
