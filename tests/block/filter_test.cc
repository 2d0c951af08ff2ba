// Filter drivers: blkdebug (rules that fail requests reach the BlockBackend caller with their
// errno: range, nth, once/always, flush, removal, rules changed while two IoThreads send
// requests) and throttle (IOPS and bytes/s limits measured over about a second, a request
// larger than the bucket, a group shared by two nodes on two IoThreads, arrival order, and an
// event loop that keeps running while a request waits), and the flush modes of cache=unsafe
// and cache=writethrough (what reaches the file node).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "aio/context.h"
#include "aio/io_thread.h"
#include "aio/timer.h"
#include "block/block_backend.h"
#include "block/drivers/blkdebug.h"
#include "block/drivers/file.h"
#include "block/drivers/flush_mode.h"
#include "block/drivers/null.h"
#include "block/drivers/raw.h"
#include "block/drivers/throttle.h"
#include "coro/block_on.h"
#include "coro/coroutine.h"
#include "coro/event.h"
#include "coro/task.h"

namespace spindle::block {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

class TempFile {
 public:
  TempFile() {
    char path[] = "/tmp/spindle-filter-XXXXXX";
    const int fd = ::mkstemp(path);
    EXPECT_GE(fd, 0);
    ::close(fd);
    path_ = path;
  }
  ~TempFile() { ::unlink(path_.c_str()); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

BlockNodeRef open_temp_file(const TempFile& file, std::uint64_t size) {
  auto node = open_file(file.path(), false);
  EXPECT_TRUE(node) << std::strerror(node.error());
  EXPECT_EQ(coro::block_on(node.value()->truncate(size)), 0);
  return node.value();
}

// ---- blkdebug ------------------------------------------------------------------------------

TEST(BlkdebugTest, RangeRuleFailsOverlappingRequestsOnlyAndOthersGoThrough) {
  TempFile file;
  auto debug = std::make_shared<BlkdebugNode>(open_temp_file(file, 4 << 20));
  BlockBackend backend(debug);
  EXPECT_EQ(backend.size(), 4u << 20);
  debug->add_rule({.op = BlkdebugOp::write, .error = ENOSPC, .offset = 1 << 20, .length = 65536});

  std::vector<std::byte> data(4096, std::byte{0x5a});
  EXPECT_EQ(backend.write_blocking(0, data), 0);                        // before the range
  EXPECT_EQ(backend.write_blocking((1 << 20) - 4095, data), -ENOSPC);   // overlaps its start
  EXPECT_EQ(backend.write_blocking((1 << 20) + 61440, data), -ENOSPC);  // its last 4 KiB
  EXPECT_EQ(backend.write_blocking((1 << 20) + 65536, data), 0);        // just after it
  std::vector<std::byte> back(4096);
  EXPECT_EQ(backend.read_blocking(1 << 20, back), 0);  // a read does not match a write rule
  EXPECT_EQ(backend.read_blocking(0, back), 0);
  EXPECT_EQ(back, data);  // the write before the range reached the file
  EXPECT_EQ(debug->injected(), 2u);
}

TEST(BlkdebugTest, NthRuleFailsOnlyTheNthMatchingRequest) {
  auto debug = std::make_shared<BlkdebugNode>(std::make_shared<NullNode>(1 << 20));
  BlockBackend backend(debug);
  debug->add_rule({.op = BlkdebugOp::read, .error = EIO, .nth = 3});
  std::vector<std::byte> buffer(512);
  std::vector<int> results;
  for (int i = 0; i < 6; ++i) {
    results.push_back(backend.read_blocking(static_cast<std::uint64_t>(i) * 512, buffer));
    EXPECT_EQ(backend.write_blocking(0, buffer), 0);  // writes are not counted
  }
  EXPECT_EQ(results, (std::vector<int>{0, 0, -EIO, 0, 0, 0}));
  EXPECT_EQ(debug->injected(), 1u);
}

TEST(BlkdebugTest, OnceRuleFiresOnceAndAlwaysRuleEveryTime) {
  auto debug = std::make_shared<BlkdebugNode>(std::make_shared<NullNode>(1 << 20));
  BlockBackend backend(debug);
  std::vector<std::byte> buffer(512);

  debug->add_rule({.op = BlkdebugOp::any, .error = EROFS, .once = true});
  EXPECT_EQ(backend.write_blocking(0, buffer), -EROFS);
  EXPECT_EQ(debug->rule_count(), 0u);  // a once rule is gone after it fired
  EXPECT_EQ(backend.write_blocking(0, buffer), 0);
  EXPECT_EQ(backend.read_blocking(0, buffer), 0);

  debug->add_rule({.op = BlkdebugOp::read, .error = EIO});
  for (int i = 0; i < 3; ++i) EXPECT_EQ(backend.read_blocking(0, buffer), -EIO);
  EXPECT_EQ(debug->rule_count(), 1u);
  EXPECT_EQ(debug->injected(), 4u);
}

TEST(BlkdebugTest, FlushZeroingAndDiscardErrorsReachTheCaller) {
  TempFile file;
  auto debug = std::make_shared<BlkdebugNode>(open_temp_file(file, 1 << 20));
  BlockBackend backend(debug);
  // A rule with a range never matches a flush: a flush covers no range.
  debug->add_rule({.op = BlkdebugOp::any, .error = ENOSPC, .offset = 0, .length = 512});
  EXPECT_EQ(backend.flush_blocking(), 0);
  debug->clear_rules();

  debug->add_rule({.op = BlkdebugOp::flush, .error = EIO});
  EXPECT_EQ(backend.flush_blocking(), -EIO);
  std::vector<std::byte> buffer(512);
  EXPECT_EQ(backend.write_blocking(0, buffer), 0);
  debug->add_rule({.op = BlkdebugOp::write_zeroes, .error = ENOSPC});
  debug->add_rule({.op = BlkdebugOp::discard, .error = EPERM});
  EXPECT_EQ(coro::block_on(backend.write_zeroes(0, 65536)), -ENOSPC);
  EXPECT_EQ(coro::block_on(backend.discard(0, 65536)), -EPERM);
  EXPECT_EQ(backend.flush_blocking(), -EIO);  // an "always" rule
}

TEST(BlkdebugTest, RemovingARuleStopsItsErrors) {
  auto debug = std::make_shared<BlkdebugNode>(std::make_shared<NullNode>(1 << 20));
  BlockBackend backend(debug);
  std::vector<std::byte> buffer(512);
  const int read_rule = debug->add_rule({.op = BlkdebugOp::read, .error = EIO});
  const int write_rule = debug->add_rule({.op = BlkdebugOp::write, .error = ENOSPC});
  EXPECT_EQ(backend.read_blocking(0, buffer), -EIO);
  EXPECT_EQ(backend.write_blocking(0, buffer), -ENOSPC);
  EXPECT_TRUE(debug->remove_rule(read_rule));
  EXPECT_FALSE(debug->remove_rule(read_rule));
  EXPECT_EQ(backend.read_blocking(0, buffer), 0);
  EXPECT_EQ(backend.write_blocking(0, buffer), -ENOSPC);
  EXPECT_TRUE(debug->remove_rule(write_rule));
  EXPECT_EQ(backend.write_blocking(0, buffer), 0);
  EXPECT_EQ(debug->rule_count(), 0u);
}

// A node that allocates nothing itself: its content comes from its backing node.
class UnallocatedNode final : public BlockNode {
 public:
  explicit UnallocatedNode(BlockNodeRef backing) : backing_(std::move(backing)) {}
  const char* driver_name() const noexcept override { return "unallocated"; }
  std::uint64_t size() const noexcept override { return backing_->size(); }
  BlockNode* backing_node() const noexcept override { return backing_.get(); }
  coro::Task<int> read(std::uint64_t, std::span<std::byte>, std::uint32_t) override {
    co_return -ENOTSUP;
  }
  coro::Task<int> write(std::uint64_t, std::span<const std::byte>, std::uint32_t) override {
    co_return -ENOTSUP;
  }
  coro::Task<BlockStatus> block_status(std::uint64_t offset, std::uint64_t bytes) override {
    co_return BlockStatus{0, bytes, 0};
  }

 private:
  BlockNodeRef backing_;
};

// A filter's `file` edge changes inside a drained section while requests wait at the backend:
// those issued during the change run on the new child afterwards; a child of another size
// and an unknown role are refused.
TEST(FilterTest, ReplacedChildServesTheRequestsThatWaitedForTheChange) {
  TempFile first, second, other_size;
  BlockNodeRef a = open_temp_file(first, 1 << 20);
  BlockNodeRef b = open_temp_file(second, 1 << 20);
  BlockNodeRef small = open_temp_file(other_size, 1 << 16);
  auto raw = std::make_shared<RawNode>(a);
  BlockBackend backend(raw);
  const std::vector<std::byte> ones(4096, std::byte{1}), twos(4096, std::byte{2});
  ASSERT_EQ(backend.write_blocking(0, std::span(ones)), 0);
  EXPECT_EQ(raw->replace_child("backing", b), -ENOENT);
  EXPECT_EQ(raw->replace_child("file", small), -EINVAL);
  const int written =
      coro::block_on([](BlockBackend& be, std::shared_ptr<RawNode> node, BlockNodeRef next,
                        const std::vector<std::byte>& data) -> coro::Task<int> {
        co_await be.drained_begin();
        // Issued now, it waits for drained_end(), then runs on the new child.
        coro::Event done;
        int result = 1;
        coro::spawn(*aio::current_context(),
                    [](BlockBackend& b2, const std::vector<std::byte>& d, int& r,
                       coro::Event& e) -> coro::Task<void> {
                      r = co_await b2.write(0, std::span(d));
                      e.set();
                    }(be, data, result, done));
        co_await coro::yield();
        const int replaced = node->replace_child("file", next);
        be.drained_end();
        co_await done.wait();
        co_return replaced == 0 ? result : replaced;
      }(backend, raw, b, twos));
  EXPECT_EQ(written, 0);
  EXPECT_EQ(raw->child(), b.get());
  std::vector<std::byte> back(4096);
  ASSERT_EQ(coro::block_on(a->read(0, std::span(back), 0)), 0);
  EXPECT_EQ(back, ones);  // the old child kept what it had
  ASSERT_EQ(coro::block_on(b->read(0, std::span(back), 0)), 0);
  EXPECT_EQ(back, twos);
}

TEST(FilterTest, FiltersAreTransparentForBlockStatusAndTheBackingChain) {
  TempFile file;
  auto child = open_temp_file(file, 4 << 20);
  auto debug = std::make_shared<BlkdebugNode>(child);
  auto group = std::make_shared<ThrottleGroup>("transparent");
  BlockBackend backend(std::make_shared<ThrottleNode>(debug, group));
  EXPECT_EQ(backend.size(), 4u << 20);
  EXPECT_STREQ(backend.root()->driver_name(), "throttle");
  EXPECT_EQ(backend.root()->filename(), file.path());
  std::vector<std::byte> data(65536, std::byte{1});
  ASSERT_EQ(backend.write_blocking(1 << 20, data), 0);
  const auto hole = coro::block_on(backend.block_status(0, 4 << 20));
  EXPECT_TRUE(hole.flags & kStatusZero);
  EXPECT_EQ(hole.bytes, 1u << 20);
  const auto filled = coro::block_on(backend.block_status(1 << 20, 1 << 20));
  EXPECT_TRUE(filled.flags & kStatusData);

  // Over a node that allocates nothing, the backend's walk goes on to that node's backing file.
  auto backing = std::make_shared<NullNode>(1 << 20);
  BlockBackend chained(std::make_shared<BlkdebugNode>(std::make_shared<UnallocatedNode>(backing)));
  const auto below = coro::block_on(chained.block_status(0, 65536));
  EXPECT_TRUE(below.flags & kStatusZero);
  EXPECT_TRUE(below.flags & kStatusAllocated);
}

// ---- flush mode (cache=unsafe / writethrough) ----------------------------------------------

// Counts what reaches it: flushes, closes, and the flags of the last write and write-zeroes.
class FlagCountingNode final : public BlockNode {
 public:
  const char* driver_name() const noexcept override { return "file"; }
  std::uint64_t size() const noexcept override { return 1 << 20; }
  coro::Task<int> read(std::uint64_t, std::span<std::byte> buffer, std::uint32_t) override {
    std::fill(buffer.begin(), buffer.end(), std::byte{0});
    co_return 0;
  }
  coro::Task<int> write(std::uint64_t, std::span<const std::byte> buffer,
                        std::uint32_t flags) override {
    write_flags = flags;
    written += buffer.size();
    co_return 0;
  }
  coro::Task<int> write_zeroes(std::uint64_t, std::uint64_t, std::uint32_t flags) override {
    zero_flags = flags;
    co_return 0;
  }
  coro::Task<int> flush() override {
    ++flushes;
    co_return 0;
  }
  coro::Task<int> close() override {
    ++closes;
    co_return 0;
  }
  std::uint32_t write_flags = ~0u, zero_flags = ~0u;
  std::uint64_t written = 0;
  int flushes = 0, closes = 0;
};

TEST(FlushModeTest, IgnoredModeDropsFlushesCloseFlushesAndFua) {
  auto child = std::make_shared<FlagCountingNode>();
  BlockNodeRef node = wrap_flush_mode(child, FlushMode::ignored);
  ASSERT_NE(node.get(), child.get());
  EXPECT_STREQ(node->driver_name(), "file");  // shown as the file it stands for
  std::vector<std::byte> data(4096, std::byte{3});
  EXPECT_EQ(coro::block_on(node->write(0, data, kFua)), 0);
  EXPECT_EQ(child->write_flags, 0u);
  EXPECT_EQ(child->written, 4096u);  // the data itself still goes through
  EXPECT_EQ(coro::block_on(node->write_zeroes(0, 4096, kFua | kMayUnmap)), 0);
  EXPECT_EQ(child->zero_flags, std::uint32_t{kMayUnmap});
  EXPECT_EQ(coro::block_on(node->flush()), 0);
  EXPECT_EQ(coro::block_on(node->close()), 0);
  EXPECT_EQ(child->flushes, 0);
  EXPECT_EQ(child->closes, 0);
}

TEST(FlushModeTest, EveryWriteModeMakesEachWriteFuaAndPassesFlushes) {
  auto child = std::make_shared<FlagCountingNode>();
  BlockNodeRef node = wrap_flush_mode(child, FlushMode::every_write);
  std::vector<std::byte> data(512, std::byte{3});
  EXPECT_EQ(coro::block_on(node->write(0, data, 0)), 0);
  EXPECT_EQ(child->write_flags, std::uint32_t{kFua});
  EXPECT_EQ(coro::block_on(node->write_zeroes(0, 512, kMayUnmap)), 0);
  EXPECT_EQ(child->zero_flags, std::uint32_t{kFua | kMayUnmap});
  EXPECT_EQ(coro::block_on(node->flush()), 0);
  EXPECT_EQ(coro::block_on(node->close()), 0);
  EXPECT_EQ(child->flushes, 1);
  EXPECT_EQ(child->closes, 1);
}

TEST(FlushModeTest, NormalModeAddsNoNode) {
  auto child = std::make_shared<FlagCountingNode>();
  EXPECT_EQ(wrap_flush_mode(child, FlushMode::normal).get(), child.get());
}

coro::Task<void> write_once(BlockBackend& backend, std::uint64_t offset, std::atomic<int>& failed,
                            std::atomic<int>& finished) {
  std::vector<std::byte> data(512, std::byte{7});
  const int result = co_await backend.write(offset, data);
  if (result == -EIO) {
    failed.fetch_add(1);
  } else if (result != 0) {
    failed.fetch_add(1000);  // any other error is a bug
  }
  finished.fetch_add(1);
}

TEST(BlkdebugTest, OnceRuleFiresExactlyOnceUnderConcurrentRequestsAndRuleChanges) {
  auto debug = std::make_shared<BlkdebugNode>(std::make_shared<NullNode>(1 << 20));
  BlockBackend backend(debug);
  debug->add_rule({.op = BlkdebugOp::write, .error = EIO, .once = true});
  aio::IoThread a("blkdebug-a"), b("blkdebug-b");
  constexpr int kWriters = 1000;
  std::atomic<int> failed{0}, finished{0};
  for (int i = 0; i < kWriters; ++i) {
    coro::spawn((i % 2 ? a : b).context(),
                write_once(backend, static_cast<std::uint64_t>(i) * 512, failed, finished));
  }
  // Meanwhile this thread edits the rule list (rules that match nothing being sent).
  do {
    const int id = debug->add_rule({.op = BlkdebugOp::discard, .error = EPERM});
    EXPECT_TRUE(debug->remove_rule(id));
    std::this_thread::yield();
  } while (finished.load() < kWriters);
  EXPECT_EQ(failed.load(), 1);
  EXPECT_EQ(debug->injected(), 1u);
}

// ---- throttle ------------------------------------------------------------------------------

// Sends requests from a shared counter until `count` have been taken; several run at once so
// that the throttle, not the request latency, sets the pace.
coro::Task<void> request_loop(BlockBackend& backend, std::atomic<int>& next, int count,
                              std::size_t bytes, bool write, std::atomic<int>& failures,
                              std::atomic<int>& finished) {
  std::vector<std::byte> buffer(bytes);
  for (;;) {
    const int index = next.fetch_add(1);
    if (index >= count) break;
    const std::uint64_t offset =
        static_cast<std::uint64_t>(index) % (backend.size() / bytes) * bytes;
    int result = 0;
    if (write) {
      result = co_await backend.write(offset, buffer);
    } else {
      result = co_await backend.read(offset, buffer);
    }
    if (result != 0) failures.fetch_add(1);
  }
  finished.fetch_add(1);
}

// Runs `count` requests of `bytes` through `backend` on `context` with `workers` coroutines
// and returns the seconds it took.
double timed_requests(BlockBackend& backend, aio::Context& context, int workers, int count,
                      std::size_t bytes, bool write) {
  std::atomic<int> next{0}, failures{0}, finished{0};
  const auto start = Clock::now();
  for (int i = 0; i < workers; ++i) {
    coro::spawn(context, request_loop(backend, next, count, bytes, write, failures, finished));
  }
  while (finished.load() < workers) std::this_thread::sleep_for(1ms);
  EXPECT_EQ(failures.load(), 0);
  return seconds_since(start);
}

TEST(ThrottleTest, IopsLimitHoldsWithinTenPercent) {
  ThrottleLimits limits;
  limits.iops_total = {.per_second = 200, .burst = 1};
  auto group = std::make_shared<ThrottleGroup>("iops", limits);
  BlockBackend backend(std::make_shared<ThrottleNode>(std::make_shared<NullNode>(64 << 20), group));
  aio::IoThread io("throttle-iops");
  // One request goes at once (burst 1), the other 200 at 200/s: 1.0 s.
  const double elapsed = timed_requests(backend, io.context(), 8, 201, 4096, false);
  EXPECT_GE(elapsed, 0.9);
  // The pace is set when each request reserves, so late wake-ups do not add up; only the last
  // request's and this thread's do, which under ASan on a loaded 2-core machine went past
  // 1.1 s. The upper bound still catches a throttle that holds requests back far too long.
  EXPECT_LE(elapsed, 1.5);
}

TEST(ThrottleTest, BandwidthLimitHoldsWithinTenPercentOnAFile) {
  TempFile file;
  ThrottleLimits limits;
  limits.bps_write = {.per_second = 4 << 20, .burst = 65536};
  auto group = std::make_shared<ThrottleGroup>("bps", limits);
  BlockBackend backend(std::make_shared<ThrottleNode>(open_temp_file(file, 16 << 20), group));
  aio::IoThread io("throttle-bps");
  // 65 writes of 64 KiB: one from the burst, then 4 MiB at 4 MiB/s.
  const double elapsed = timed_requests(backend, io.context(), 4, 65, 65536, true);
  EXPECT_GE(elapsed, 0.9);
  EXPECT_LE(elapsed, 1.5);  // room for the last wake-ups on a loaded machine (see above)
  // Reads are not held back by a write limit: at 4 MiB/s these 12.5 MiB would take 3.1 s.
  // Unthrottled they take tens of ms; the bound leaves room for a loaded machine under ASan.
  const double reads = timed_requests(backend, io.context(), 4, 200, 65536, false);
  EXPECT_LT(reads, 2.0);
}

TEST(ThrottleTest, RequestLargerThanTheBucketGoesThroughAndDelaysTheNext) {
  ThrottleLimits limits;
  limits.bps_total = {.per_second = 1 << 20, .burst = 65536};
  auto group = std::make_shared<ThrottleGroup>("large", limits);
  BlockBackend backend(std::make_shared<ThrottleNode>(std::make_shared<NullNode>(16 << 20), group));
  std::vector<std::byte> big(256 << 10), small(64 << 10);
  auto start = Clock::now();
  EXPECT_EQ(backend.write_blocking(0, big), 0);  // four times the bucket, but it is full
  // At once: waiting for the 192 KiB beyond the bucket would take 0.1875 s (the bound leaves
  // a loaded machine room to deschedule this thread).
  EXPECT_LT(seconds_since(start), 0.15);
  start = Clock::now();
  EXPECT_EQ(backend.write_blocking(0, small), 0);  // waits out the debt: (192 + 64) KiB at 1 MiB/s
  const double elapsed = seconds_since(start);
  EXPECT_GE(elapsed, 0.225);
  EXPECT_LE(elapsed, 0.4);  // one sleep's wake-up latency on a loaded machine; 0.5 = double debt
}

TEST(ThrottleTest, TwoNodesInOneGroupShareTheBudget) {
  ThrottleGroupRegistry registry;
  ThrottleLimits limits;
  limits.iops_total = {.per_second = 200, .burst = 1};
  auto group = registry.get_or_create("shared", limits);
  ThrottleLimits ignored;
  ignored.iops_total = {.per_second = 1e6};
  EXPECT_EQ(registry.get_or_create("shared", ignored), group);  // found, limits unchanged
  EXPECT_EQ(group->limits().iops_total.per_second, 200);
  EXPECT_NE(registry.get_or_create("other"), group);

  BlockBackend first(
      std::make_shared<ThrottleNode>(std::make_shared<NullNode>(1 << 20), registry.find("shared")));
  BlockBackend second(std::make_shared<ThrottleNode>(std::make_shared<NullNode>(1 << 20),
                                                     registry.get_or_create("shared")));
  aio::IoThread a("throttle-a"), b("throttle-b");
  // 100 requests on each backend, from two IoThreads at once. Alone, each would take 0.5 s;
  // sharing 200/s they take 1 s together.
  std::atomic<int> next_a{0}, next_b{0}, failures{0}, finished{0};
  const auto start = Clock::now();
  for (int i = 0; i < 4; ++i) {
    coro::spawn(a.context(), request_loop(first, next_a, 100, 4096, false, failures, finished));
    coro::spawn(b.context(), request_loop(second, next_b, 100, 4096, true, failures, finished));
  }
  while (finished.load() < 8) std::this_thread::sleep_for(1ms);
  const double elapsed = seconds_since(start);
  EXPECT_EQ(failures.load(), 0);
  EXPECT_GE(elapsed, 0.9);
  EXPECT_LE(elapsed, 1.5);  // room for the last wake-ups on a loaded machine (see above)

  group.reset();
  EXPECT_NE(registry.find("shared"), nullptr);  // the nodes still hold it
}

TEST(ThrottleTest, RegistryForgetsGroupsNobodyHolds) {
  ThrottleGroupRegistry registry;
  {
    auto group = registry.get_or_create("short-lived");
    EXPECT_EQ(registry.find("short-lived"), group);
  }
  EXPECT_EQ(registry.find("short-lived"), nullptr);
  EXPECT_EQ(&ThrottleGroupRegistry::global(), &ThrottleGroupRegistry::global());
}

coro::Task<void> ordered_write(BlockBackend& backend, std::size_t bytes, int index,
                               std::mutex& mutex, std::vector<int>& order) {
  std::vector<std::byte> data(bytes);
  const int result = co_await backend.write(0, data);
  EXPECT_EQ(result, 0);
  std::lock_guard lock(mutex);
  order.push_back(index);
}

TEST(ThrottleTest, WaitingRequestsStartInArrivalOrderAndALargeOneIsNotOvertaken) {
  ThrottleLimits limits;
  limits.bps_total = {.per_second = 1 << 20, .burst = 65536};
  auto group = std::make_shared<ThrottleGroup>("fifo", limits);
  BlockBackend backend(std::make_shared<ThrottleNode>(std::make_shared<NullNode>(1 << 20), group));
  aio::IoThread io("throttle-fifo");
  std::mutex mutex;
  std::vector<int> order;
  // Request 1 (384 KiB) must wait for the bucket to fill again after request 0; the small
  // ones behind it would fit in the budget sooner, but must not overtake it.
  for (int i = 0; i < 10; ++i) {
    const std::size_t bytes = i == 1 ? (384 << 10) : 4096;
    coro::spawn(io.context(), ordered_write(backend, bytes, i, mutex, order));
  }
  for (;;) {
    std::this_thread::sleep_for(1ms);
    std::lock_guard lock(mutex);
    if (order.size() == 10) break;
  }
  EXPECT_EQ(order, (std::vector<int>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}));
}

TEST(ThrottleTest, WaitingRequestDoesNotBlockTheEventLoop) {
  ThrottleLimits limits;
  limits.iops_total = {.per_second = 4, .burst = 1};
  auto group = std::make_shared<ThrottleGroup>("loop", limits);
  BlockBackend backend(std::make_shared<ThrottleNode>(std::make_shared<NullNode>(1 << 20), group));
  std::vector<std::byte> buffer(512);
  ASSERT_EQ(backend.read_blocking(0, buffer), 0);  // takes the burst

  // A timer on this thread's context (the one the request runs on) ticks every 10 ms.
  aio::Context& context = *aio::current_context();
  int ticks = 0;
  aio::Timer* self = nullptr;
  aio::Timer ticker(context, aio::Clock::monotonic, [&] {
    ++ticks;
    self->arm_in(10ms);
  });
  self = &ticker;
  ticker.arm_in(10ms);
  const auto start = Clock::now();
  EXPECT_EQ(backend.read_blocking(0, buffer), 0);  // waits 250 ms in coro::sleep
  const double elapsed = seconds_since(start);
  ticker.cancel();
  EXPECT_GE(elapsed, 0.2);
  // About 25 ticks; a stalled loop gets at most one. Each tick re-arms after the last, so a
  // loaded machine's wake-up latency adds up: 5 is enough to show the loop kept running.
  EXPECT_GE(ticks, 5) << "the loop stalled while the request waited";
  // Flushes are not counted: this one does not wait for the next token (0.25 s away).
  const auto flush_start = Clock::now();
  EXPECT_EQ(backend.flush_blocking(), 0);
  EXPECT_LT(seconds_since(flush_start), 0.2);
}

TEST(ThrottleTest, UnlimitedGroupNeverWaitsAndNewLimitsApply) {
  ThrottleGroup group("unlimited");
  for (int i = 0; i < 1000; ++i) {
    EXPECT_EQ(group.reserve(ThrottleDirection::write, 1 << 20).count(), 0);
  }
  ThrottleLimits limits;
  limits.iops_read = {.per_second = 10, .burst = 1};
  group.set_limits(limits);
  // The second reservation waits 100 ms for the next token, less the time since the first
  // (which refilled part of it): measure that time instead of assuming it is under 10 ms.
  const auto before_first = Clock::now();
  EXPECT_EQ(group.reserve(ThrottleDirection::read, 512).count(), 0);  // a new bucket is full
  const auto wait = group.reserve(ThrottleDirection::read, 512);
  const auto between = Clock::now() - before_first;
  EXPECT_GE(wait + between, 100ms);
  EXPECT_LE(wait, 100ms);
  EXPECT_EQ(group.reserve(ThrottleDirection::write, 512).count(), 0);  // writes are not limited
}

}  // namespace
}  // namespace spindle::block
