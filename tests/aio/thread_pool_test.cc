// aio::ThreadPool: QEMU's test-thread-pool scenarios (reference/qemu-aio.md §3.4) with their
// assertions — submit, submit-aio, submit-co, submit-many, cancel (sync and async) — plus
// co_await pool.run() returning values on the caller's home context, idle workers exiting, and
// the wake-up policy: long jobs spread over workers, short ones do not start a thread each, and
// submits racing a spinning worker are never lost.
#include "aio/thread_pool.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cerrno>
#include <thread>
#include <vector>

#include "aio/context.h"
#include "aio/io_thread.h"
#include "coro/block_on.h"
#include "coro/task.h"
#include "support/thread_identity.h"

namespace spindle::aio {
namespace {

using namespace std::chrono_literals;

struct WorkerData {
  std::atomic<int> n{0};
  int ret = -EINPROGRESS;
  ThreadPool::Job* job = nullptr;
};

class ThreadPoolTest : public testing::Test {
 public:
  ContextRef ctx = Context::create("pool-test");
  std::unique_ptr<ThreadPool> pool = std::make_unique<ThreadPool>(*ctx);
  int active = 0;  // only touched by completions, which run serialized in ctx's thread

  void TearDown() override {
    while (active > 0) ctx->poll(true);
    pool.reset();
  }
  ThreadPool::Completion done_callback(WorkerData& data) {
    return [this, &data](int result) {
      EXPECT_TRUE(data.ret == -EINPROGRESS || data.ret == -ECANCELED);
      data.ret = result;
      data.job = nullptr;
      --active;
    };
  }
};

int worker(WorkerData& data) { return data.n.fetch_add(1) == 0 ? 0 : -1; }

TEST_F(ThreadPoolTest, Submit) {
  WorkerData data;
  pool->submit([&] { return worker(data); });
  while (data.n.load() == 0) ctx->poll(true);
  EXPECT_EQ(data.n.load(), 1);
  while (ctx->poll(false)) {  // deliver the (empty) completion
  }
}

TEST_F(ThreadPoolTest, SubmitWithCallback) {
  WorkerData data;
  ++active;
  data.job = pool->submit([&] { return worker(data); }, done_callback(data));
  EXPECT_EQ(data.ret, -EINPROGRESS);  // never called before the context polls
  while (data.ret == -EINPROGRESS) ctx->poll(true);
  EXPECT_EQ(active, 0);
  EXPECT_EQ(data.n.load(), 1);
  EXPECT_EQ(data.ret, 0);
}

TEST_F(ThreadPoolTest, SubmitFromCoroutine) {
  WorkerData data;
  coro::Coroutine* co = coro::create([](ThreadPool& p, WorkerData& d, int& act) -> coro::Task<void> {
    ++act;
    d.ret = co_await p.run([&d] { return worker(d); });
    --act;
  }(*pool, data, active));
  coro::schedule(*ctx, co);
  ctx->poll(false);  // starts, submits and suspends
  EXPECT_EQ(active, 1);
  EXPECT_EQ(data.ret, -EINPROGRESS);
  while (active > 0) ctx->poll(true);
  EXPECT_EQ(data.ret, 0);
  EXPECT_EQ(data.n.load(), 1);
}

TEST_F(ThreadPoolTest, SubmitMany) {
  constexpr int kJobs = 100;  // more than the pool's 64 threads
  std::vector<WorkerData> data(kJobs);
  for (auto& d : data) {
    ++active;
    d.job = pool->submit([&d] { return worker(d); }, done_callback(d));
  }
  while (active > 0) ctx->poll(true);
  for (auto& d : data) {
    EXPECT_EQ(d.n.load(), 1);
    EXPECT_EQ(d.ret, 0);
    EXPECT_EQ(d.job, nullptr);
  }
}

// 100 long jobs (64 run at once); those not started yet are cancelled by moving n from 0 to 4.
// Every job ends either run (n == 3, ret 0) or cancelled (n == 4, ret -ECANCELED).
void cancel_scenario(ThreadPoolTest& test, Context& ctx, ThreadPool& pool, int& active,
                     bool wait_for_each_cancel) {
  constexpr int kJobs = 100;
  std::vector<WorkerData> data(kJobs);
  for (auto& d : data) {
    ++active;
    d.job = pool.submit(
        [&d] {
          int expected = 0;
          if (d.n.compare_exchange_strong(expected, 1)) {
            std::this_thread::sleep_for(300ms);
            d.n.fetch_or(2);
          }
          return 0;
        },
        test.done_callback(d));
  }
  std::this_thread::sleep_for(100ms);
  EXPECT_EQ(active, kJobs);  // none finished yet
  int cancelled = 0;
  for (auto& d : data) {
    int expected = 0;
    if (d.n.compare_exchange_strong(expected, 4)) {
      EXPECT_TRUE(pool.cancel(d.job));
      ++cancelled;
      if (wait_for_each_cancel) {
        while (d.job != nullptr) ctx.poll(true);  // synchronous cancel: wait for its completion
      }
    }
  }
  EXPECT_GT(cancelled, 0);
  EXPECT_LT(cancelled, kJobs);
  while (active > 0) ctx.poll(true);
  for (auto& d : data) {
    EXPECT_EQ(d.job, nullptr);
    const int n = d.n.load();
    if (n == 3) {
      EXPECT_EQ(d.ret, 0);
    } else {
      EXPECT_EQ(n, 4);
      EXPECT_EQ(d.ret, -ECANCELED);
    }
  }
}

TEST_F(ThreadPoolTest, Cancel) { cancel_scenario(*this, *ctx, *pool, active, true); }
TEST_F(ThreadPoolTest, CancelAsync) { cancel_scenario(*this, *ctx, *pool, active, false); }

TEST_F(ThreadPoolTest, RunReturnsValuesAndResumesAtHome) {
  IoThread io("pool-home");
  auto result = coro::block_on(io.context(), []() -> coro::Task<std::pair<int, bool>> {
    const auto home = testing_support::this_thread_id();
    ThreadPool& p = current_context()->thread_pool();
    const auto worker_thread = co_await p.run([] { return testing_support::this_thread_id(); });
    const int value = co_await p.run([] { return 6 * 7; });
    co_await p.run([] {});  // void works too
    co_return std::pair<int, bool>{value,
                                   worker_thread != home && testing_support::this_thread_id() == home};
  }());
  EXPECT_EQ(result.first, 42);
  EXPECT_TRUE(result.second);
}

TEST(ThreadPoolIdleTest, IdleWorkersExit) {
  ContextRef ctx = Context::create("pool-idle");
  ThreadPool pool(*ctx, ThreadPool::Options{4, 50ms});
  std::atomic<int> ran{0};
  int completed = 0;
  for (int i = 0; i < 4; ++i) {
    pool.submit([&] {
      std::this_thread::sleep_for(20ms);
      return ran.fetch_add(1);
    }, [&](int) { ++completed; });
  }
  EXPECT_LE(pool.worker_count(), 4u);
  while (completed < 4) ctx->poll(true);
  EXPECT_EQ(ran.load(), 4);
  for (int i = 0; i < 100 && pool.worker_count() > 0; ++i) std::this_thread::sleep_for(10ms);
  EXPECT_EQ(pool.worker_count(), 0u);
}

// Completions are posted after the worker drops the pool mutex, and submit() signals a worker
// after dropping it: a pool destroyed by its last job's completion, right after that job ran,
// must wait for both (the worker still on its way back to the mutex, the submitter still in
// notify_one). Many rounds, submitting from another thread and from the context's own.
TEST(ThreadPoolLifetimeTest, DestroyedByItsLastCompletion) {
  for (int round = 0; round < 300; ++round) {
    ContextRef ctx = Context::create("pool-lifetime");
    auto* pool = new ThreadPool(*ctx, ThreadPool::Options{2, 10s});
    int warmed_up = 0;
    pool->submit([] { return 0; }, [&](int) { ++warmed_up; });
    while (warmed_up == 0) ctx->poll(true);  // a worker is free now: the next submit signals it
    std::atomic<bool> destroyed{false};
    auto destroy = [&](int result) {
      EXPECT_EQ(result, 7);
      delete pool;  // inside the completion: nothing of the pool may be touched after this
      destroyed.store(true);
    };
    std::thread submitter;
    if (round % 2 == 0) {
      pool->submit([] { return 7; }, destroy);
    } else {
      submitter = std::thread([&] { pool->submit([] { return 7; }, destroy); });
    }
    while (!destroyed.load()) ctx->poll(true);
    if (submitter.joinable()) submitter.join();
  }
}

// A burst of long jobs still spreads over a worker per job: each job that a searching worker
// takes recruits one more worker while jobs are queued, so all eight end up running at once.
TEST(ThreadPoolLifetimeTest, BurstOfLongJobsRunsInParallel) {
  ContextRef ctx = Context::create("pool-burst");
  ThreadPool pool(*ctx, ThreadPool::Options{8, 10s});
  std::atomic<int> running{0}, peak{0};
  int completed = 0;
  for (int i = 0; i < 8; ++i) {
    pool.submit([&] {
      const int now = running.fetch_add(1) + 1;
      for (int seen = peak.load(); now > seen && !peak.compare_exchange_weak(seen, now);) {
      }
      for (int waited = 0; waited < 200 && peak.load() < 8; ++waited) {
        std::this_thread::sleep_for(5ms);  // until all eight run (1 s at most)
      }
      running.fetch_sub(1);
      return 0;
    }, [&](int) { ++completed; });
  }
  while (completed < 8) ctx->poll(true);
  EXPECT_EQ(peak.load(), 8);
  EXPECT_EQ(pool.worker_count(), 8u);
}

// A burst of short jobs does not start a thread per job (waking or starting a thread costs far
// more than such a job): the workers already awake run them, recruiting only while the queue
// stays non-empty.
TEST(ThreadPoolLifetimeTest, BurstOfShortJobsUsesFewWorkers) {
  ContextRef ctx = Context::create("pool-short");
  ThreadPool pool(*ctx, ThreadPool::Options{256, 10s});
  std::atomic<int> sum{0};
  int completed = 0;
  for (int i = 0; i < 200; ++i) {
    pool.submit([&, i] { return sum.fetch_add(i); }, [&](int) { ++completed; });
  }
  while (completed < 200) ctx->poll(true);
  EXPECT_EQ(sum.load(), 199 * 200 / 2);
  // One thread per job would be 200. Usually a handful run them; under TSan, where jobs and
  // thread starts crawl and the queue stays non-empty for long, CI has seen 46.
  EXPECT_LT(pool.worker_count(), 100u);
}

// No job may be stranded by the race between a worker ending its spin (or going to sleep) and
// a submit that saw it spinning: producers on several threads submit with gaps around the spin
// time, with spinning on and off, and every job must complete.
TEST(ThreadPoolLifetimeTest, SubmitsRacingTheSpinnerAreNeverLost) {
  for (const auto spin : {std::chrono::microseconds{0}, std::chrono::microseconds{20}}) {
    ContextRef ctx = Context::create("pool-race");
    ThreadPool pool(*ctx, ThreadPool::Options{4, 10ms, spin});
    constexpr int kProducers = 3;
    constexpr int kJobsEach = 3000;
    std::atomic<int> ran{0};
    int completed = 0;
    std::vector<std::thread> producers;
    for (int p = 0; p < kProducers; ++p) {
      producers.emplace_back([&, p] {
        for (int i = 0; i < kJobsEach; ++i) {
          pool.submit([&] { return ran.fetch_add(1); },
                      [&](int) { ++completed; });  // completions run serialized in ctx
          const int gap_us = (i * 7 + p * 13) % 45;  // 0-44 us: before, at and after the spin
          if (gap_us > 2) std::this_thread::sleep_for(std::chrono::microseconds(gap_us));
        }
      });
    }
    const auto deadline = std::chrono::steady_clock::now() + 60s;
    while (completed < kProducers * kJobsEach && std::chrono::steady_clock::now() < deadline) {
      ctx->poll(false);
      std::this_thread::yield();
    }
    for (auto& producer : producers) producer.join();
    while (completed < kProducers * kJobsEach && std::chrono::steady_clock::now() < deadline) {
      ctx->poll(false);
    }
    EXPECT_EQ(completed, kProducers * kJobsEach) << "spin " << spin.count() << " us";
    EXPECT_EQ(ran.load(), kProducers * kJobsEach);
  }
}

}  // namespace
}  // namespace spindle::aio
