#include "block/formats/qcow2/free_cluster_pool.h"

#include <iterator>

namespace spindle::block::qcow2 {

unsigned FreeClusterPool::shard_of_this_thread() noexcept {
  static std::atomic<unsigned> next{0};
  thread_local const unsigned shard = next.fetch_add(1, std::memory_order_relaxed) % kShards;
  return shard;
}

bool FreeClusterPool::slot_empty(unsigned slot) const noexcept {
  for (const Shard& shard : shards_) {
    if (shard.users[slot].load() != 0) return false;
  }
  return true;
}

FreeClusterPool::Guard FreeClusterPool::enter() noexcept {
  Shard& shard = shards_[shard_of_this_thread()];
  for (;;) {
    const std::uint64_t epoch = epoch_.load();
    std::atomic<std::uint64_t>& users = shard.users[epoch & 1];
    users.fetch_add(1);
    if (epoch_.load() == epoch) return Guard(&users);
    users.fetch_sub(1);  // the epoch moved on between the two loads: try again
  }
}

void FreeClusterPool::quarantine(std::uint64_t cluster) {
  const std::uint64_t epoch = epoch_.load();
  if (!quarantine_.empty()) {
    Quarantined& last = quarantine_.back();
    if (last.epoch == epoch && last.first + last.count == cluster) {
      ++last.count;
      ++quarantined_count_;
      advance();
      return;
    }
  }
  if (quarantine_.size() >= kMaxRuns) return;  // not reused this session
  quarantine_.push_back({cluster, 1, epoch});
  ++quarantined_count_;
  // Advancing now, while the request that freed it (a flush holds no guard) is not counted,
  // lets the next request reuse the cluster if nothing older is running.
  advance();
}

void FreeClusterPool::advance() noexcept {
  if (quarantine_.empty()) return;
  for (int step = 0; step < 2; ++step) {
    const std::uint64_t epoch = epoch_.load();
    if (!slot_empty(static_cast<unsigned>((epoch + 1) & 1))) break;  // epoch - 1 still running
    epoch_.store(epoch + 1);
  }
  const std::uint64_t now = epoch_.load();
  while (!quarantine_.empty() && quarantine_.front().epoch + 2 <= now) {
    const Quarantined run = quarantine_.front();
    quarantine_.pop_front();
    quarantined_count_ -= run.count;
    make_reusable(run.first, run.count);
  }
}

void FreeClusterPool::make_reusable(std::uint64_t first, std::uint64_t count) {
  auto next = reusable_.lower_bound(first);
  if (next != reusable_.begin()) {
    auto previous = std::prev(next);
    if (previous->first + previous->second == first) {  // extends the run before it
      previous->second += count;
      reusable_count_ += count;
      if (next != reusable_.end() && previous->first + previous->second == next->first) {
        previous->second += next->second;
        reusable_.erase(next);
      }
      return;
    }
  }
  if (next != reusable_.end() && first + count == next->first) {  // extends the run after it
    const std::uint64_t merged = count + next->second;
    reusable_.erase(next);
    reusable_.emplace(first, merged);
    reusable_count_ += count;
    return;
  }
  if (reusable_.size() >= kMaxRuns) return;  // not reused this session
  reusable_.emplace(first, count);
  reusable_count_ += count;
}

std::optional<std::uint64_t> FreeClusterPool::find(std::uint64_t count) {
  advance();
  // Lowest first, looking at no more than kMaxScan runs: this runs under the node's lock on
  // every allocation, and a fragmented pool is not worth a long search.
  std::size_t looked = 0;
  for (const auto& [first, length] : reusable_) {
    if (length >= count) return first;
    if (++looked == kMaxScan) break;
  }
  return std::nullopt;
}

void FreeClusterPool::take(std::uint64_t first, std::uint64_t count) {
  auto run = reusable_.upper_bound(first);
  if (run == reusable_.begin()) return;
  --run;
  const std::uint64_t run_first = run->first;
  const std::uint64_t run_count = run->second;
  if (first + count > run_first + run_count) return;  // not a range find() returned
  reusable_.erase(run);
  reusable_count_ -= count;
  if (first > run_first) reusable_.emplace(run_first, first - run_first);
  if (first + count < run_first + run_count) {
    reusable_.emplace(first + count, run_first + run_count - first - count);
  }
}

}  // namespace spindle::block::qcow2
