// The `throttle` filter driver: a BlockNode over a child node that limits I/O rates, and the
// ThrottleGroup whose budget it spends. Several throttle nodes (one per backend, say) share one
// group, so several disks can share one IOPS / bandwidth budget.
//
// Budget: one token bucket per limit — IOPS and bytes per second, each for reads, writes and
// both (total). A bucket refills at `per_second` up to `burst` (its size). A request needs
// min(cost, burst) tokens in every bucket it touches, where the cost is 1 for IOPS buckets and
// its length for byte buckets; it is then charged its full cost, so a bucket may go into debt.
// That way a request larger than the bucket still goes through (once the bucket is full), and
// the debt holds back the requests after it, so the long-run rate is the configured one.
//
// Order: a request *reserves* its budget when it arrives — it is charged at once and told how
// long to wait — so requests start in arrival order per bucket and none can starve: a later
// request always finds the bucket at least as deep in debt as the one before it. A waiting
// request sleeps on a timer of its own context (coro::sleep): it never blocks a thread, and
// the event loop keeps running other work meanwhile.
//
// Counted: read (read buckets + total), write, write_zeroes and discard (write buckets +
// total; zeroing and discard cost their length, as in QEMU). Not counted: flush, block_status,
// truncate, close — they pass straight through.
//
// Thread-safety: requests may come from coroutines on any contexts at once.
//   ThrottleGroup:   `name_` is immutable; `mutex_` (a std::mutex, held only for O(1)
//                    arithmetic, never across a suspension) protects `limits_`, `buckets_` and
//                    `last_refill_ns_`. set_limits()/limits() from any thread.
//   ThrottleGroupRegistry: `mutex_` protects `groups_` (weak references: a group lives while a
//                    node or a caller holds it). Any thread.
//   ThrottleNode:    `group_` is immutable after construction; `child_` a ChildLink (FilterNode).
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "block/drivers/filter_node.h"

namespace spindle::block {

struct ThrottleRate {
  double per_second = 0;  // 0: unlimited
  double burst = 0;       // bucket size, in the same unit; 0: a tenth of per_second (100 ms)
};

struct ThrottleLimits {
  ThrottleRate iops_total, iops_read, iops_write;
  ThrottleRate bps_total, bps_read, bps_write;  // bytes per second
};

enum class ThrottleDirection { read, write };

class ThrottleGroup {
 public:
  explicit ThrottleGroup(std::string name, const ThrottleLimits& limits = {});
  ThrottleGroup(const ThrottleGroup&) = delete;
  ThrottleGroup& operator=(const ThrottleGroup&) = delete;

  const std::string& name() const noexcept { return name_; }
  ThrottleLimits limits() const;
  // New limits apply to requests that arrive afterwards; requests already waiting keep their
  // start time. A bucket that was unlimited starts full. Any thread.
  void set_limits(const ThrottleLimits& limits);

  // Charges one request of `bytes` and returns how long it must wait before it may start
  // (zero: start now). Any thread; it does not wait itself.
  std::chrono::nanoseconds reserve(ThrottleDirection direction, std::uint64_t bytes);

 private:
  struct Bucket {
    double rate = 0;      // tokens per second; 0: unlimited
    double capacity = 0;  // bucket size
    double level = 0;     // tokens available now; negative: debt
  };
  enum BucketIndex { kIopsTotal, kIopsRead, kIopsWrite, kBpsTotal, kBpsRead, kBpsWrite, kCount };

  void refill(std::int64_t now_ns) noexcept;  // mutex_ held

  const std::string name_;
  mutable std::mutex mutex_;
  ThrottleLimits limits_;
  std::array<Bucket, kCount> buckets_;
  std::int64_t last_refill_ns_;
};

using ThrottleGroupRef = std::shared_ptr<ThrottleGroup>;

// Finds throttle groups by name, creating them on first use.
class ThrottleGroupRegistry {
 public:
  // The process-wide registry (tools and servers); tests may make their own.
  static ThrottleGroupRegistry& global();

  // The group called `name`; a new one gets `limits`, an existing one keeps its own (change
  // them with set_limits()).
  ThrottleGroupRef get_or_create(const std::string& name, const ThrottleLimits& limits = {});
  // The group called `name`, or null if no one holds it.
  ThrottleGroupRef find(const std::string& name) const;

 private:
  mutable std::mutex mutex_;
  std::map<std::string, std::weak_ptr<ThrottleGroup>> groups_;
};

class ThrottleNode final : public FilterNode {
 public:
  ThrottleNode(BlockNodeRef child, ThrottleGroupRef group)
      : FilterNode(std::move(child)), group_(std::move(group)) {}

  const ThrottleGroupRef& group() const noexcept { return group_; }

  const char* driver_name() const noexcept override { return "throttle"; }
  coro::Task<int> read(std::uint64_t offset, std::span<std::byte> buffer,
                       std::uint32_t flags) override;
  coro::Task<int> write(std::uint64_t offset, std::span<const std::byte> buffer,
                        std::uint32_t flags) override;
  coro::Task<int> write_zeroes(std::uint64_t offset, std::uint64_t bytes,
                               std::uint32_t flags) override;
  coro::Task<int> discard(std::uint64_t offset, std::uint64_t bytes) override;

 private:
  const ThrottleGroupRef group_;
};

}  // namespace spindle::block
