// coro::RwLock (test-coroutine /locking/co-rwlock/upgrade and /downgrade, plus sharing and
// writer preference), coro::Queue (condition-variable use with both lock kinds), coro::Event
// and coro::sleep.
#include <gtest/gtest.h>

#include <atomic>
#include <mutex>
#include <thread>
#include <vector>

#include "aio/io_thread.h"
#include "coro/block_on.h"
#include "coro/event.h"
#include "coro/mutex.h"
#include "coro/queue.h"
#include "coro/rw_lock.h"
#include "coro/sleep.h"
#include "coro/task.h"
#include "support/thread_identity.h"

namespace spindle::coro {
namespace {

using namespace std::chrono_literals;

TEST(RwLockTest, ReadersShareWritersExclude) {
  RwLock lock;
  int readers_in = 0;
  auto reader = [](RwLock& l, int& in) -> Task<void> {
    co_await l.read_lock();
    ++in;
    co_await suspend();
    --in;
    l.unlock();
  };
  Coroutine* r1 = create(reader(lock, readers_in));
  Coroutine* r2 = create(reader(lock, readers_in));
  enter(r1);
  enter(r2);
  EXPECT_EQ(readers_in, 2);  // both inside at once
  EXPECT_EQ(lock.owners(), 2);
  bool wrote = false;
  Coroutine* w = create([](RwLock& l, bool& done) -> Task<void> {
    co_await l.write_lock();
    done = true;
    l.unlock();
  }(lock, wrote));
  enter(w);
  EXPECT_FALSE(wrote);  // waits for both readers
  enter(r1);
  EXPECT_FALSE(wrote);
  enter(r2);  // last reader out: the writer runs right after
  EXPECT_TRUE(wrote);
  EXPECT_EQ(lock.owners(), 0);
}

TEST(RwLockTest, WaitingWriterHoldsBackLaterReaders) {
  RwLock lock;
  std::vector<char> order;
  auto reader = [](RwLock& l, std::vector<char>& out, bool hold) -> Task<void> {
    co_await l.read_lock();
    out.push_back('r');
    if (hold) co_await suspend();
    l.unlock();
  };
  Coroutine* first = create(reader(lock, order, true));
  enter(first);
  enter(create([](RwLock& l, std::vector<char>& out) -> Task<void> {
    co_await l.write_lock();
    out.push_back('w');
    l.unlock();
  }(lock, order)));
  enter(create(reader(lock, order, false)));  // must not overtake the queued writer
  EXPECT_EQ(order, (std::vector<char>{'r'}));
  enter(first);
  EXPECT_EQ(order, (std::vector<char>{'r', 'w', 'r'}));
}

// /locking/co-rwlock/upgrade: c1 reads; c2 queues for writing; c1's upgrade must queue behind c2
// rather than starve it.
TEST(RwLockTest, UpgradeQueuesBehindAWaitingWriter) {
  RwLock lock;
  bool c1_done = false, c2_done = false;
  Coroutine* c1 = create([](RwLock& l, bool& done) -> Task<void> {
    co_await l.read_lock();
    co_await suspend();
    co_await l.upgrade();
    done = true;
    l.unlock();
  }(lock, c1_done));
  Coroutine* c2 = create([](RwLock& l, bool& done) -> Task<void> {
    co_await l.write_lock();
    co_await suspend();
    done = true;
    l.unlock();
  }(lock, c2_done));
  enter(c1);
  enter(c2);
  enter(c1);  // upgrade: gives up the read share, c2 gets the write lock, c1 queues
  EXPECT_FALSE(c1_done);
  EXPECT_FALSE(c2_done);
  EXPECT_EQ(lock.owners(), -1);
  enter(c2);  // c2 unlocks: c1 becomes the writer and finishes
  EXPECT_TRUE(c2_done);
  EXPECT_TRUE(c1_done);
  EXPECT_EQ(lock.owners(), 0);
}

TEST(RwLockTest, UpgradeOfTheSoleReaderIsImmediate) {
  RwLock lock;
  bool done = false;
  enter(create([](RwLock& l, bool& finished) -> Task<void> {
    co_await l.read_lock();
    co_await l.upgrade();
    EXPECT_EQ(l.owners(), -1);
    l.unlock();
    finished = true;
  }(lock, done)));
  EXPECT_TRUE(done);
}

// /locking/co-rwlock/downgrade (regression for a hang): c1 reads; c2 (write), c3 (read), c4
// (write) queue in that order; c1 unlocks; c2 writes, downgrades and unlocks; c3 then c4 run.
TEST(RwLockTest, DowngradeLetsQueuedReadersInAndNothingHangs) {
  RwLock lock;
  std::vector<int> order;
  Coroutine* c1 = create([](RwLock& l, std::vector<int>& out) -> Task<void> {
    co_await l.read_lock();
    co_await suspend();
    l.unlock();
    out.push_back(1);
  }(lock, order));
  auto writer_downgrades = [](RwLock& l, std::vector<int>& out) -> Task<void> {
    co_await l.write_lock();
    out.push_back(2);
    l.downgrade();
    EXPECT_EQ(l.owners(), 2);  // c3 was let in with us
    l.unlock();
  };
  auto reader = [](RwLock& l, std::vector<int>& out) -> Task<void> {
    co_await l.read_lock();
    out.push_back(3);
    l.unlock();
  };
  auto writer = [](RwLock& l, std::vector<int>& out) -> Task<void> {
    co_await l.write_lock();
    out.push_back(4);
    l.unlock();
  };
  enter(c1);
  enter(create(writer_downgrades(lock, order)));
  enter(create(reader(lock, order)));
  enter(create(writer(lock, order)));
  EXPECT_TRUE(order.empty());
  enter(c1);
  EXPECT_EQ(order, (std::vector<int>{1, 2, 3, 4}));
  EXPECT_EQ(lock.owners(), 0);
}

TEST(QueueTest, WaitReleasesTheMutexAndNextWakesInFifoOrder) {
  aio::ContextRef ctx = aio::Context::create("queue");
  Mutex mutex;
  Queue queue;
  int ready = 0;
  std::vector<int> order;
  auto consumer = [](Mutex& m, Queue& q, int& available, std::vector<int>& out,
                     int index) -> Task<void> {
    co_await m.lock();
    while (available == 0) co_await q.wait(m);
    --available;
    out.push_back(index);
    m.unlock();
  };
  for (int i = 0; i < 3; ++i) spawn(*ctx, consumer(mutex, queue, ready, order, i));
  while (ctx->poll(false)) {
  }
  EXPECT_FALSE(queue.empty());
  EXPECT_FALSE(mutex.is_locked());  // every waiter released it
  spawn(*ctx, [](Mutex& m, Queue& q, int& available) -> Task<void> {
    co_await m.lock();
    available = 3;
    q.restart_all();
    m.unlock();
  }(mutex, queue, ready));
  while (order.size() < 3) ctx->poll(true);
  EXPECT_EQ(order, (std::vector<int>{0, 1, 2}));
  EXPECT_TRUE(queue.empty());
}

TEST(QueueTest, WorksWithAStdMutexAcrossThreads) {
  aio::IoThread io("queue-io");
  std::mutex mutex;
  Queue queue;
  bool flag = false;
  std::atomic<bool> woke{false};
  spawn(io.context(), [](std::mutex& m, Queue& q, bool& f, std::atomic<bool>& w) -> Task<void> {
    m.lock();
    while (!f) co_await q.wait(m);
    m.unlock();
    w = true;
  }(mutex, queue, flag, woke));
  for (;;) {  // wait until it is queued
    std::lock_guard guard(mutex);
    if (!queue.empty()) break;
  }
  {
    std::lock_guard guard(mutex);  // next() with a std::mutex held: never resumes inline
    flag = true;
    EXPECT_TRUE(queue.next());
  }
  while (!woke) std::this_thread::sleep_for(1ms);
  EXPECT_FALSE(queue.next());
}

TEST(CoroEventTest, WaitersResumeWhenSetFromAnotherThread) {
  aio::IoThread a("event-a"), b("event-b");
  Event event;
  std::atomic<int> resumed{0};
  auto waiter = [](Event& e, std::atomic<int>& count) -> Task<void> {
    co_await e.wait();
    count.fetch_add(1);
  };
  spawn(a.context(), waiter(event, resumed));
  spawn(b.context(), waiter(event, resumed));
  std::this_thread::sleep_for(20ms);
  EXPECT_EQ(resumed.load(), 0);
  event.set();
  while (resumed.load() < 2) std::this_thread::sleep_for(1ms);
  EXPECT_TRUE(event.is_set());
  // Once set, waits complete at once; reset() makes them wait again.
  block_on(a.context(), [](Event& e) -> Task<void> { co_await e.wait(); }(event));
  event.reset();
  EXPECT_FALSE(event.is_set());
}

TEST(SleepTest, SleepsAtLeastTheDurationOnTheHomeContext) {
  aio::IoThread io("sleeper");
  const auto result = block_on(io.context(), []() -> Task<std::pair<long, bool>> {
    const auto home = testing_support::this_thread_id();
    const auto start = std::chrono::steady_clock::now();
    co_await sleep(30ms);
    const auto slept = std::chrono::steady_clock::now() - start;
    co_return std::pair<long, bool>{
        std::chrono::duration_cast<std::chrono::milliseconds>(slept).count(),
        testing_support::this_thread_id() == home};
  }());
  EXPECT_GE(result.first, 30);
  EXPECT_LT(result.first, 2000);
  EXPECT_TRUE(result.second);
}

void wake_a_sleeper() {
  aio::ContextRef ctx = aio::Context::create("sleep-wake");
  Coroutine* sleeper = spawn(*ctx, []() -> Task<void> { co_await sleep(10s); }());
  ctx->poll(false);  // it starts sleeping
  wake(sleeper, "impatient_waker");
}

TEST(SleepDeathTest, WakingASleepingCoroutineIsFatal) {
  EXPECT_DEATH(wake_a_sleeper(), "impatient_waker: .* already scheduled by 'coro::sleep'");
}

}  // namespace
}  // namespace spindle::coro
