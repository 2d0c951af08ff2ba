// QED's need-check idle timer and BlockBackend::move_to():
//   * the NEED_CHECK bit (read from the file's header bytes) is set by an allocating write and
//     cleared by the timer once writes stop, without any flush; not while allocating writes
//     keep coming; at drain; and the timer job never runs after close();
//   * coroutines on one IoThread keep reading and writing through a backend (over blkdebug over
//     QED, the timer armed) while the main thread moves the graph between IoThreads A and B
//     several times: every request completes with the data a model predicts, and the timer
//     then fires on the graph's new home thread.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "aio/context.h"
#include "aio/io_thread.h"
#include "base/byte_order.h"
#include "block/block_backend.h"
#include "block/drivers/blkdebug.h"
#include "block/drivers/file.h"
#include "block/drivers/null.h"
#include "block/drivers/raw.h"
#include "block/drivers/throttle.h"
#include "block/formats/qed/create.h"
#include "block/formats/qed/format.h"
#include "block/formats/qed/qed_node.h"
#include "coro/block_on.h"
#include "coro/sleep.h"
#include "coro/task.h"
#include "support/thread_identity.h"

namespace spindle::block::qed {
namespace {

using namespace std::chrono_literals;
using Bytes = std::vector<std::byte>;

constexpr std::uint32_t kCluster = 4096;

coro::Task<void> sleep_task(std::chrono::nanoseconds duration) { co_await coro::sleep(duration); }

// Sleeps while polling the calling thread's context (timers homed there keep firing).
void sleep_polling(std::chrono::nanoseconds duration) { coro::block_on(sleep_task(duration)); }

class QedTimerTest : public testing::Test {
 protected:
  void SetUp() override {
    char templ[] = "/tmp/spindle-move-XXXXXX";
    const int fd = ::mkstemp(templ);
    ASSERT_GE(fd, 0);
    ::close(fd);
    path_ = templ;
  }
  void TearDown() override { ::unlink(path_.c_str()); }

  // Creates a fresh image and opens it on the calling thread's context (its timer's home).
  QedNodeRef open(std::uint64_t size, std::chrono::nanoseconds delay) {
    base::Result<BlockNodeRef> file = open_file(path_, FileOptions{false, false, true});
    EXPECT_TRUE(file.ok());
    if (!file.ok()) return nullptr;
    CreateOptions create;
    create.size = size;
    create.cluster_size = kCluster;
    const BlockError created = coro::block_on(create_qed(*file.value(), create));
    EXPECT_TRUE(created.ok()) << created.message;
    OpenOptions options;
    options.need_check_delay = delay;
    BlockResult<QedNodeRef> node = coro::block_on(open_qed(file.value(), options));
    EXPECT_TRUE(node.ok()) << node.error().message;
    return node.ok() ? node.value() : nullptr;
  }

  // NEED_CHECK as the file holds it (header `features` at offset 16).
  bool dirty_on_disk() const {
    std::byte bytes[8];
    const int fd = ::open(path_.c_str(), O_RDONLY);
    EXPECT_GE(fd, 0);
    EXPECT_EQ(::pread(fd, bytes, sizeof bytes, 16), 8);
    ::close(fd);
    return (base::load_le64(bytes) & kFeatureNeedCheck) != 0;
  }

  // Polls the main context (where the images of these tests were opened) until `done` or 10 s.
  template <typename Done>
  bool wait_until(Done done) {
    const auto deadline = std::chrono::steady_clock::now() + 10s;
    while (!done()) {
      if (std::chrono::steady_clock::now() > deadline) return false;
      sleep_polling(5ms);
    }
    return true;
  }

  std::string path_;
};

int write_blocking(BlockNode& node, std::uint64_t offset, const Bytes& data) {
  return coro::block_on(node.write(offset, std::span<const std::byte>(data), 0));
}

TEST_F(QedTimerTest, BitIsClearedAfterTheIdleDelayWithoutAFlush) {
  QedNodeRef node = open(1 << 20, 50ms);
  ASSERT_TRUE(node);
  EXPECT_EQ(node->need_check_context(), &aio::main_context());
  std::atomic<int> fired{0};
  std::atomic<bool> on_main{true};
  const std::thread::id main_thread = testing_support::this_thread_id();
  node->set_need_check_hook([&] {
    if (testing_support::this_thread_id() != main_thread) on_main.store(false);
    fired.fetch_add(1);
  });
  EXPECT_FALSE(dirty_on_disk());
  // The bit is still set after an allocating write unless the write (which armed the timer)
  // took the whole 50 ms delay, as a flush on a loaded machine can: then the timer may
  // legally have fired and cleared it inside write_blocking().
  auto allocating_write = [&](std::uint64_t offset, std::byte value) {
    const auto start = std::chrono::steady_clock::now();
    ASSERT_EQ(write_blocking(*node, offset, Bytes(512, value)), 0);
    const bool dirty = dirty_on_disk();
    if (std::chrono::steady_clock::now() - start < 50ms) {
      EXPECT_TRUE(dirty);
    }
  };
  allocating_write(0, std::byte{1});
  // The header reaches the file before the job's last flush and the hook: wait for both.
  EXPECT_TRUE(wait_until([&] { return fired.load() == 1; }));
  EXPECT_FALSE(dirty_on_disk());
  EXPECT_TRUE(on_main.load());
  // An in-place write neither sets the bit nor arms the timer.
  ASSERT_EQ(write_blocking(*node, 512, Bytes(512, std::byte{2})), 0);
  sleep_polling(150ms);
  EXPECT_FALSE(dirty_on_disk());
  EXPECT_EQ(fired.load(), 1);
  // The next allocating write starts the cycle again.
  allocating_write(8 * kCluster, std::byte{3});
  EXPECT_TRUE(wait_until([&] { return fired.load() == 2; }));
  EXPECT_FALSE(dirty_on_disk());
  Bytes back(512);
  ASSERT_EQ(coro::block_on(node->read(8 * kCluster, std::span(back), 0)), 0);
  EXPECT_EQ(back, Bytes(512, std::byte{3}));
  EXPECT_EQ(coro::block_on(node->close()), 0);
}

TEST_F(QedTimerTest, BitStaysSetWhileAllocatingWritesKeepComing) {
  QedNodeRef node = open(4 << 20, 400ms);
  ASSERT_TRUE(node);
  std::atomic<int> fired{0};
  node->set_need_check_hook([&] { fired.fetch_add(1); });
  // 40 allocating writes 15 ms apart: each re-arms the timer, so 600 ms pass without it firing.
  // Each write arms the timer somewhere between its start and its return; the timer cannot
  // fire while the span from one write's start to the next one's return (or to the check)
  // stays under the delay. A loaded machine can stretch a span past 400 ms (a slow flush, a
  // descheduled thread): then firing is legal and only the rest is checked.
  using SteadyClock = std::chrono::steady_clock;
  SteadyClock::duration longest_span{0};
  SteadyClock::time_point previous_start{};
  for (int i = 0; i < 40; ++i) {
    const auto start = SteadyClock::now();
    ASSERT_EQ(write_blocking(*node, std::uint64_t(i) * kCluster, Bytes(512, std::byte{7})), 0);
    if (i > 0) longest_span = std::max(longest_span, SteadyClock::now() - previous_start);
    previous_start = start;
    EXPECT_TRUE(dirty_on_disk()) << "write " << i;  // set again by this write in any case
    sleep_polling(15ms);
  }
  const int fired_during_writes = fired.load();
  longest_span = std::max(longest_span, SteadyClock::now() - previous_start);
  if (longest_span < 400ms) {
    EXPECT_EQ(fired_during_writes, 0);
    EXPECT_TRUE(dirty_on_disk());
    EXPECT_TRUE(wait_until([&] { return fired.load() == 1; }));
  } else {  // it fired during the writes; the last write's timer fires (or fired) after them
    EXPECT_TRUE(wait_until([&] { return fired.load() > fired_during_writes || !dirty_on_disk(); }));
  }
  EXPECT_FALSE(dirty_on_disk());
  EXPECT_EQ(coro::block_on(node->close()), 0);
}

TEST_F(QedTimerTest, BitIsClearedAtDrainAndTheTimerCancelled) {
  QedNodeRef node = open(1 << 20, 10min);
  ASSERT_TRUE(node);
  std::atomic<int> fired{0};
  node->set_need_check_hook([&] { fired.fetch_add(1); });
  BlockBackend backend(std::make_shared<BlkdebugNode>(node));  // quiesce passes the filter
  ASSERT_EQ(backend.write_blocking(0, Bytes(4096, std::byte{9})), 0);
  EXPECT_TRUE(dirty_on_disk());
  backend.drain_blocking();
  EXPECT_FALSE(dirty_on_disk());
  EXPECT_EQ(fired.load(), 0);
  EXPECT_EQ(coro::block_on(node->close()), 0);
  EXPECT_FALSE(dirty_on_disk());
}

TEST_F(QedTimerTest, CloseCancelsTheTimer) {
  QedNodeRef node = open(1 << 20, 30ms);
  ASSERT_TRUE(node);
  std::atomic<int> fired{0};
  node->set_need_check_hook([&] { fired.fetch_add(1); });
  const auto write_start = std::chrono::steady_clock::now();
  ASSERT_EQ(write_blocking(*node, 0, Bytes(512, std::byte{1})), 0);
  EXPECT_EQ(coro::block_on(node->close()), 0);
  // The write armed the timer after write_start. If the write and the close took the whole
  // 30 ms delay (slow flushes on a loaded machine), the timer may legally have fired before
  // the close got to cancel it; what must never happen is a firing after the close.
  const bool closed_in_time = std::chrono::steady_clock::now() - write_start < 30ms;
  const int fired_at_close = fired.load();
  EXPECT_FALSE(dirty_on_disk());
  sleep_polling(100ms);
  if (closed_in_time) {
    EXPECT_EQ(fired_at_close, 0);
  }
  EXPECT_EQ(fired.load(), fired_at_close);
}

// ---- moving a graph while requests run ------------------------------------------------------

TEST_F(QedTimerTest, MoveGraphBetweenIoThreadsWhileRequestsRun) {
  constexpr std::uint64_t kSize = 4 << 20;
  constexpr int kWorkers = 4;
  constexpr int kMinOps = 150;
  QedNodeRef node = open(kSize, 20ms);
  ASSERT_TRUE(node);
  aio::IoThread a("move-a");
  aio::IoThread b("move-b");
  auto debug = std::make_shared<BlkdebugNode>(node);
  BlockBackend backend(debug);
  EXPECT_EQ(&backend.home(), &aio::main_context());

  std::mutex hook_mutex;
  std::vector<std::thread::id> hook_threads;  // hook_mutex
  node->set_need_check_hook([&] {
    std::lock_guard lock(hook_mutex);
    hook_threads.push_back(testing_support::this_thread_id());
  });
  auto hooks_on = [&](std::thread::id thread) {
    std::lock_guard lock(hook_mutex);
    return std::count(hook_threads.begin(), hook_threads.end(), thread);
  };

  backend.move_to_blocking(a.context());
  EXPECT_EQ(&backend.home(), &a.context());
  EXPECT_EQ(node->need_check_context(), &a.context());

  // Worker w owns the clusters whose index % kWorkers == w, so its model is exact: it writes
  // (aligned, unaligned through read-modify-write, zeroes; allocating and in place) and reads
  // its own clusters, checking every read against the model.
  Bytes model(kSize);
  std::atomic<bool> stop{false};
  std::atomic<int> failures{0};
  std::atomic<int> total_ops{0};
  auto worker = [&](int w) -> coro::Task<int> {
    std::mt19937 random(1234 + w);
    const aio::Context* home = &a.context();
    for (int op = 0; op < kMinOps || !stop.load(std::memory_order_relaxed); ++op) {
      if (aio::current_context() != home) co_return -EXDEV;  // requests do not hop
      const std::uint64_t clusters = kSize / kCluster / kWorkers;
      const std::uint64_t base = ((random() % clusters) * kWorkers + w) * kCluster;
      const std::uint64_t start = random() % kCluster;
      const std::uint64_t length = 1 + random() % (kCluster - start);
      const std::uint64_t offset = base + start;
      const int kind = static_cast<int>(random() % 4);
      if (kind == 0) {
        Bytes back(length);
        const int got = co_await backend.read(offset, std::span(back));
        if (got < 0) co_return got;
        if (std::memcmp(back.data(), model.data() + offset, length) != 0) co_return -EILSEQ;
      } else if (kind == 3) {
        const int zeroed = co_await backend.write_zeroes(offset, length);
        if (zeroed < 0) co_return zeroed;
        std::memset(model.data() + offset, 0, length);
      } else {
        Bytes data(length);
        for (auto& byte : data) byte = static_cast<std::byte>(random() | 1);
        const int wrote = co_await backend.write(offset, std::span<const std::byte>(data));
        if (wrote < 0) co_return wrote;
        std::memcpy(model.data() + offset, data.data(), length);
      }
      total_ops.fetch_add(1, std::memory_order_relaxed);
      if (op % 16 == 0) co_await coro::sleep(1ms);  // let the timer fire now and then
    }
    co_return 0;
  };
  std::vector<std::thread> threads;
  for (int w = 0; w < kWorkers; ++w) {
    threads.emplace_back([&, w] {
      const int result = coro::block_on(a.context(), worker(w));
      if (result != 0) {
        ADD_FAILURE() << "worker " << w << ": " << result;
        failures.fetch_add(1);
      }
    });
  }
  for (int round = 0; round < 4; ++round) {
    std::this_thread::sleep_for(20ms);
    backend.move_to_blocking(b.context());
    EXPECT_EQ(node->need_check_context(), &b.context());
    EXPECT_EQ(&backend.home(), &b.context());
    std::this_thread::sleep_for(20ms);
    backend.move_to_blocking(a.context());
    EXPECT_EQ(node->need_check_context(), &a.context());
  }
  stop.store(true);
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_GE(total_ops.load(), kWorkers * kMinOps);
  EXPECT_EQ(backend.in_flight(), 0);

  // The timer now fires on each new home: one allocating write (from main) after each move.
  backend.move_to_blocking(b.context());
  ASSERT_FALSE(dirty_on_disk());  // move_to drained, and draining cleared it
  const auto b_hooks = hooks_on(b.thread_id());
  Bytes fresh(kCluster, std::byte{0x5a});
  std::uint64_t free_cluster = kSize;
  for (std::uint64_t c = 0; c < kSize / kCluster && free_cluster == kSize; ++c) {
    const BlockStatus status = coro::block_on(node->block_status(c * kCluster, kCluster));
    if (!(status.flags & kStatusAllocated)) free_cluster = c * kCluster;
  }
  ASSERT_LT(free_cluster, kSize) << "every cluster was allocated; make the image larger";
  ASSERT_EQ(backend.write_blocking(free_cluster, fresh), 0);
  std::memcpy(model.data() + free_cluster, fresh.data(), fresh.size());
  EXPECT_TRUE(dirty_on_disk());
  EXPECT_TRUE(wait_until([&] { return hooks_on(b.thread_id()) > b_hooks; }));
  EXPECT_FALSE(dirty_on_disk());
  EXPECT_EQ(hooks_on(a.thread_id()) + hooks_on(b.thread_id()), [&] {
    std::lock_guard lock(hook_mutex);
    return static_cast<std::ptrdiff_t>(hook_threads.size());
  }()) << "the timer fired on a thread that was not the graph's home";

  Bytes all(kSize);
  ASSERT_EQ(backend.read_blocking(0, std::span(all)), 0);
  EXPECT_TRUE(all == model) << "image differs from the model";
  backend.move_to_blocking(aio::main_context());
  EXPECT_EQ(coro::block_on(node->close()), 0);
  EXPECT_FALSE(dirty_on_disk());
}

// A graph with no background work (throttle over raw over null): attach_context() is the
// default no-op all the way down, and requests from two IoThreads keep flowing across moves.
TEST(BlockBackendMove, GraphWithoutBackgroundWorkMovesWhileRequestsRun) {
  aio::IoThread a("plain-a");
  aio::IoThread b("plain-b");
  auto group = std::make_shared<ThrottleGroup>("move-test");
  BlockBackend backend(
      std::make_shared<ThrottleNode>(std::make_shared<RawNode>(std::make_shared<NullNode>(1 << 20)),
                                     group));
  std::atomic<bool> stop{false};
  auto reader = [&](aio::Context& home) -> coro::Task<int> {
    int done = 0;
    while (done < 50 || !stop.load(std::memory_order_relaxed)) {
      Bytes data(777, std::byte{1});
      const int got = co_await backend.read(123 + done, std::span(data));
      if (got < 0) co_return got;
      if (data != Bytes(777)) co_return -EILSEQ;
      if (aio::current_context() != &home) co_return -EXDEV;
      ++done;
    }
    co_return 0;
  };
  std::atomic<int> failures{0};
  std::thread on_a([&] { failures += coro::block_on(a.context(), reader(a.context())) != 0; });
  std::thread on_b([&] { failures += coro::block_on(b.context(), reader(b.context())) != 0; });
  for (int i = 0; i < 10; ++i) {
    backend.move_to_blocking(i % 2 ? a.context() : b.context());
    EXPECT_EQ(&backend.home(), i % 2 ? &a.context() : &b.context());
  }
  stop.store(true);
  on_a.join();
  on_b.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(backend.in_flight(), 0);
}

}  // namespace
}  // namespace spindle::block::qed
