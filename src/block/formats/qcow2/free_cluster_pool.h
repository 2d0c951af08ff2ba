// FreeClusterPool: data clusters whose refcount dropped to 0 while the image is open, handed
// out again for new data once no request that could still use their old mapping is running.
//
// Why the wait: reads and in-place writes look a cluster's host offset up under the node's
// lock and then do their I/O without it. A discard (or an overwrite that moves a cluster) may
// drop that mapping meanwhile; if its cluster were allocated again at once, the late in-place
// write would land in another guest cluster's data. So a freed cluster is quarantined, tagged
// with the current epoch, and becomes reusable only two epoch advances later. The pool tries
// to advance after each quarantine and before each find(): with no older request running, a
// cluster freed by a flush is reusable by the next request.
//
// Epoch protocol (lock-free on the request side; the rest under the owner's lock). The count
// of requests in each epoch parity is sharded: kShards cache-line-sized counters pairs, each
// thread using its own shard, so that requests on different IoThreads do not bounce one line.
//   enter():   e = epoch_; shard.users[e & 1] += 1; if epoch_ still equals e the request is in
//              epoch e, else it undoes the increment and retries. (All seq_cst.)
//   leave():   the same shard's users[e & 1] -= 1 (the Guard's destructor, on any thread).
//   advance(): from epoch E to E + 1 only when users[(E + 1) & 1] is 0 in every shard, i.e.
//              every request of epoch E - 1 has left (epoch E + 1 shares their slot).
// A request that saw a mapping entered before the mapping was dropped, so in some epoch
// e <= t, where t is the epoch when the freed cluster was quarantined (after the drop). The
// advance from e + 1 to e + 2 waits for users[e & 1] to be 0 in every shard, which counts that
// request: its increment precedes its confirming load of e, which precedes the store of
// e + 1, which precedes the loads of that check; and a shard's count never drops below the
// requests still in it. Hence at epoch t + 2 no such request is left.
//
// A request that never finishes (a hung backing read) stops the epoch two advances after its
// own: nothing freed since is reused until it ends, and quarantine fills up (safe; the image
// just grows as it did before reuse).
//
// Memory is bounded: at most kMaxRuns runs of contiguous clusters wait in quarantine and at
// most kMaxRuns are reusable; clusters beyond that are simply not reused this session (they
// stay free space in the file, as every freed cluster was before this pool existed).
//
// Thread-safety: enter() and the Guard from any thread without a lock; every other member
// only with the owner's lock held (Qcow2Node::meta_mutex_).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <map>
#include <optional>

namespace spindle::block::qcow2 {

class FreeClusterPool {
 public:
  static constexpr std::size_t kMaxRuns = 4096;
  static constexpr std::size_t kMaxScan = 64;  // runs find() looks at

  class Guard {
   public:
    Guard() = default;
    Guard(Guard&& other) noexcept : users_(other.users_) { other.users_ = nullptr; }
    Guard& operator=(Guard&&) = delete;
    ~Guard() {
      if (users_) users_->fetch_sub(1);
    }

   private:
    friend class FreeClusterPool;
    explicit Guard(std::atomic<std::uint64_t>* users) : users_(users) {}
    std::atomic<std::uint64_t>* users_ = nullptr;  // the shard's counter it incremented
  };

  // Marks the calling request as one that may use mappings looked up from now on until the
  // guard goes away.
  Guard enter() noexcept;

  // The data cluster `cluster` (an index) has refcount 0 and nothing names it any more. It may
  // be called under a guard of the calling request (write-back from inside a write); the
  // cluster then waits for that request too.
  void quarantine(std::uint64_t cluster);

  // The first of `count` contiguous reusable clusters (lowest first, among the first kMaxScan
  // runs), after moving every cluster whose quarantine is over into the reusable set; none if
  // there is no such run.
  // The run stays in the pool until take() or drop().
  std::optional<std::uint64_t> find(std::uint64_t count);
  // Removes [first, first + count), a range find() returned, from the reusable set: the
  // caller now owns those clusters (take) or gives up on them (drop: they are not reused).
  void take(std::uint64_t first, std::uint64_t count);
  void drop(std::uint64_t first, std::uint64_t count) { take(first, count); }

  std::uint64_t reusable_clusters() const noexcept { return reusable_count_; }
  std::uint64_t quarantined_clusters() const noexcept { return quarantined_count_; }

 private:
  struct Quarantined {
    std::uint64_t first = 0;
    std::uint64_t count = 0;
    std::uint64_t epoch = 0;
  };
  void advance() noexcept;
  void make_reusable(std::uint64_t first, std::uint64_t count);

  static constexpr unsigned kShards = 16;
  struct alignas(64) Shard {
    std::atomic<std::uint64_t> users[2] = {0, 0};  // requests in even / odd epochs
  };
  static unsigned shard_of_this_thread() noexcept;
  bool slot_empty(unsigned slot) const noexcept;

  std::atomic<std::uint64_t> epoch_{0};
  Shard shards_[kShards];
  std::deque<Quarantined> quarantine_;         // oldest first
  std::map<std::uint64_t, std::uint64_t> reusable_;  // first cluster -> count, disjoint
  std::uint64_t quarantined_count_ = 0;
  std::uint64_t reusable_count_ = 0;
};

}  // namespace spindle::block::qcow2
