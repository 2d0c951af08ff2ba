#include "block/drivers/throttle.h"

#include <algorithm>
#include <cmath>

#include "aio/timer.h"
#include "coro/sleep.h"

namespace spindle::block {

namespace {

std::int64_t monotonic_now() noexcept {
  return aio::now_ns(aio::Clock::monotonic);
}

}  // namespace

ThrottleGroup::ThrottleGroup(std::string name, const ThrottleLimits& limits)
    : name_(std::move(name)), last_refill_ns_(monotonic_now()) {
  set_limits(limits);
}

ThrottleLimits ThrottleGroup::limits() const {
  std::lock_guard lock(mutex_);
  return limits_;
}

void ThrottleGroup::set_limits(const ThrottleLimits& limits) {
  const ThrottleRate* rates[kCount] = {&limits.iops_total, &limits.iops_read, &limits.iops_write,
                                       &limits.bps_total,  &limits.bps_read,  &limits.bps_write};
  std::lock_guard lock(mutex_);
  refill(monotonic_now());  // what accrued so far accrued at the old rates
  limits_ = limits;
  for (int i = 0; i < kCount; ++i) {
    Bucket& bucket = buckets_[i];
    const bool was_limited = bucket.rate > 0;
    bucket.rate = std::max(rates[i]->per_second, 0.0);
    bucket.capacity = rates[i]->burst > 0 ? rates[i]->burst : bucket.rate / 10;
    bucket.level = was_limited ? std::min(bucket.level, bucket.capacity) : bucket.capacity;
  }
}

void ThrottleGroup::refill(std::int64_t now_ns) noexcept {
  if (now_ns <= last_refill_ns_) return;  // the clock is read under mutex_: only equal times
  const double seconds = static_cast<double>(now_ns - last_refill_ns_) * 1e-9;
  last_refill_ns_ = now_ns;
  for (Bucket& bucket : buckets_) {
    if (bucket.rate > 0) {
      bucket.level = std::min(bucket.capacity, bucket.level + bucket.rate * seconds);
    }
  }
}

std::chrono::nanoseconds ThrottleGroup::reserve(ThrottleDirection direction, std::uint64_t bytes) {
  const bool read = direction == ThrottleDirection::read;
  const BucketIndex touched[] = {kIopsTotal, read ? kIopsRead : kIopsWrite, kBpsTotal,
                                 read ? kBpsRead : kBpsWrite};
  std::lock_guard lock(mutex_);
  refill(monotonic_now());
  double wait_seconds = 0;
  for (const BucketIndex index : touched) {
    Bucket& bucket = buckets_[index];
    if (bucket.rate <= 0) continue;
    const double cost = index <= kIopsWrite ? 1.0 : static_cast<double>(bytes);
    const double need = std::min(cost, bucket.capacity);
    if (bucket.level < need) {
      wait_seconds = std::max(wait_seconds, (need - bucket.level) / bucket.rate);
    }
    bucket.level -= cost;  // reserved now: whoever comes next waits behind this request
  }
  return std::chrono::nanoseconds(static_cast<std::int64_t>(std::ceil(wait_seconds * 1e9)));
}

ThrottleGroupRegistry& ThrottleGroupRegistry::global() {
  static ThrottleGroupRegistry registry;
  return registry;
}

ThrottleGroupRef ThrottleGroupRegistry::get_or_create(const std::string& name,
                                                      const ThrottleLimits& limits) {
  std::lock_guard lock(mutex_);
  // Drop groups nobody holds any more, so the map does not grow with every name ever used.
  std::erase_if(groups_, [](const auto& entry) { return entry.second.expired(); });
  std::weak_ptr<ThrottleGroup>& slot = groups_[name];
  ThrottleGroupRef group = slot.lock();
  if (!group) {
    group = std::make_shared<ThrottleGroup>(name, limits);
    slot = group;
  }
  return group;
}

ThrottleGroupRef ThrottleGroupRegistry::find(const std::string& name) const {
  std::lock_guard lock(mutex_);
  const auto it = groups_.find(name);
  return it == groups_.end() ? nullptr : it->second.lock();
}

coro::Task<int> ThrottleNode::read(std::uint64_t offset, std::span<std::byte> buffer,
                                   std::uint32_t flags) {
  const auto wait = group_->reserve(ThrottleDirection::read, buffer.size());
  co_await coro::sleep(wait);  // returns at once when `wait` is zero
  co_return co_await child_->read(offset, buffer, flags);
}

coro::Task<int> ThrottleNode::write(std::uint64_t offset, std::span<const std::byte> buffer,
                                    std::uint32_t flags) {
  const auto wait = group_->reserve(ThrottleDirection::write, buffer.size());
  co_await coro::sleep(wait);
  co_return co_await child_->write(offset, buffer, flags);
}

coro::Task<int> ThrottleNode::write_zeroes(std::uint64_t offset, std::uint64_t bytes,
                                           std::uint32_t flags) {
  const auto wait = group_->reserve(ThrottleDirection::write, bytes);
  co_await coro::sleep(wait);
  co_return co_await child_->write_zeroes(offset, bytes, flags);
}

coro::Task<int> ThrottleNode::discard(std::uint64_t offset, std::uint64_t bytes) {
  const auto wait = group_->reserve(ThrottleDirection::write, bytes);
  co_await coro::sleep(wait);
  co_return co_await child_->discard(offset, bytes);
}

}  // namespace spindle::block
