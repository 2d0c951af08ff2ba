// coro::CancelSource / CancelToken / CancelRegistration and sleep(duration, token): a token
// sees the cancellation; callbacks run once, at cancellation or at once when registered after
// it, never after their registration is destroyed (also when the destruction races a cancel
// on another thread); a sleep ends early when cancelled from another thread, resumes on its own
// context, reports whether it slept in full, and many racing sleeps and cancels across two
// IoThreads all end.
#include "coro/cancellation.h"

#include <gtest/gtest.h>

#include <atomic>
#include <thread>
#include <vector>

#include "aio/io_thread.h"
#include "coro/block_on.h"
#include "coro/event.h"
#include "coro/task.h"

namespace spindle::coro {
namespace {

using namespace std::chrono_literals;

TEST(CancellationTest, TokensSeeTheFirstCancelOnly) {
  CancelSource source;
  CancelToken token = source.token();
  CancelToken never;
  EXPECT_FALSE(token.cancelled());
  EXPECT_TRUE(source.cancel());
  EXPECT_FALSE(source.cancel());
  EXPECT_TRUE(token.cancelled());
  EXPECT_TRUE(source.token().cancelled());
  EXPECT_FALSE(never.cancelled());
}

TEST(CancellationTest, CallbacksRunOnceAndNotAfterTheirRegistrationEnds) {
  CancelSource source;
  int first = 0, second = 0, dropped = 0, late = 0;
  CancelRegistration a(source.token(), [&] { ++first; });
  std::optional<CancelRegistration> b;
  b.emplace(source.token(), [&] { ++second; });
  {
    CancelRegistration gone(source.token(), [&] { ++dropped; });
  }
  CancelRegistration never(CancelToken(), [&] { ++late; });
  source.cancel();
  source.cancel();
  EXPECT_EQ(first, 1);
  EXPECT_EQ(second, 1);
  EXPECT_EQ(dropped, 0);
  b.reset();  // after its callback ran: nothing to unlink
  CancelRegistration after(source.token(), [&] { ++late; });  // runs at once
  EXPECT_EQ(late, 1);
}

TEST(CancellationTest, ARegistrationDestroyedWhileAnotherThreadCancelsWaitsForItsCallback) {
  for (int round = 0; round < 2000; ++round) {
    CancelSource source;
    std::atomic<bool> destroyed{false};
    std::atomic<int> ran_after_destruction{0};
    auto registration = std::make_unique<CancelRegistration>(source.token(), [&] {
      std::this_thread::yield();
      if (destroyed.load()) ran_after_destruction.fetch_add(1);
    });
    std::thread canceller([&] { source.cancel(); });
    registration.reset();
    destroyed.store(true);
    canceller.join();
    ASSERT_EQ(ran_after_destruction.load(), 0) << "round " << round;
  }
}

TEST(CancellationTest, SleepEndsEarlyWhenCancelledFromAnotherThread) {
  aio::IoThread io("sleeper");
  CancelSource source;
  std::atomic<bool> sleeping{false};
  Event done;
  bool slept = true;
  aio::Context* resumed_on = nullptr;
  spawn(io.context(),
        [](CancelToken token, std::atomic<bool>& started, bool& result, aio::Context*& where,
           Event& finished) -> Task<void> {
          started.store(true);
          result = co_await sleep(std::chrono::hours(1), token);
          where = aio::current_context();
          finished.set();
        }(source.token(), sleeping, slept, resumed_on, done));
  while (!sleeping.load()) std::this_thread::sleep_for(1ms);
  source.cancel();  // whether the sleep has begun yet or not, it ends now
  block_on(io.context(), [](Event& finished) -> Task<void> { co_await finished.wait(); }(done));
  EXPECT_FALSE(slept);
  EXPECT_EQ(resumed_on, &io.context());
}

TEST(CancellationTest, SleepReportsAFullSleepAndAnEarlierCancel) {
  aio::IoThread io("sleeper");
  CancelSource source;
  const auto results = block_on(io.context(), [](CancelSource& s) -> Task<std::vector<bool>> {
    std::vector<bool> out;
    out.push_back(co_await sleep(1ms, s.token()));      // slept in full
    out.push_back(co_await sleep(0ms, CancelToken()));  // nothing to sleep
    s.cancel();
    out.push_back(co_await sleep(std::chrono::hours(1), s.token()));  // cancelled before
    co_return out;
  }(source));
  EXPECT_EQ(results, (std::vector<bool>{true, true, false}));
}

TEST(CancellationTest, RacingSleepsAndCancelsAllEnd) {
  aio::IoThread a("cancel-a"), b("cancel-b");
  constexpr int kSleepers = 200;
  std::vector<std::unique_ptr<CancelSource>> sources;
  for (int i = 0; i < kSleepers; ++i) sources.push_back(std::make_unique<CancelSource>());
  std::atomic<int> left{kSleepers};
  std::atomic<int> full{0};
  Event all_done;
  for (int i = 0; i < kSleepers; ++i) {
    aio::Context& context = (i % 2 ? a : b).context();
    spawn(context,
          [](CancelToken token, int n, std::atomic<int>& remaining, std::atomic<int>& slept_full,
             Event& done) -> Task<void> {
            // Some sleeps are short enough to end before their cancel, the rest are cut short.
            const bool slept =
                co_await sleep(std::chrono::microseconds(n % 7 == 0 ? 50 : 3'600'000'000), token);
            if (slept) slept_full.fetch_add(1);
            if (remaining.fetch_sub(1) == 1) done.set();
          }(sources[i]->token(), i, left, full, all_done));
  }
  std::thread canceller([&] {
    for (auto& source : sources) source->cancel();
  });
  canceller.join();
  block_on(a.context(), [](Event& done) -> Task<void> { co_await done.wait(); }(all_done));
  EXPECT_EQ(left.load(), 0);
  EXPECT_LE(full.load(), (kSleepers + 6) / 7);  // only the short ones can have slept in full
}

}  // namespace
}  // namespace spindle::coro
