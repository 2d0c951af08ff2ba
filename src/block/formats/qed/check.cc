// QedNode::check(): the consistency check and repair of reference/qed.md §1.11, counting what
// qemu-img check counts. It holds allocation_lock_ and table_lock_ throughout, so it sees no
// allocation in progress, and reads tables straight from the child (not the L2 cache).
#include <vector>

#include "block/formats/qed/qed_node.h"

namespace spindle::block::qed {

namespace {

// One bit per cluster of the file; marking a cluster twice is a corruption.
class ClusterMap {
 public:
  explicit ClusterMap(std::uint64_t clusters) : used_(clusters, false) {}
  // Marks `count` clusters from `first`; returns how many were already marked.
  std::uint64_t mark(std::uint64_t first, std::uint64_t count) {
    std::uint64_t doubles = 0;
    for (std::uint64_t i = first; i < first + count && i < used_.size(); ++i) {
      if (used_[i]) ++doubles;
      used_[i] = true;
    }
    return doubles;
  }
  bool used(std::uint64_t cluster) const { return used_[cluster]; }
  std::uint64_t size() const { return used_.size(); }

 private:
  std::vector<bool> used_;
};

}  // namespace

coro::Task<CheckResult> QedNode::check(bool repair) {
  repair = repair && !read_only_;
  auto allocation = co_await allocation_lock_.scoped_lock();
  co_await table_lock_.lock();
  CheckResult out;
  const std::uint64_t cluster_size = geometry_.cluster_size;
  out.total_clusters = geometry_.clusters_for(header_.image_size);
  ClusterMap map(file_size_ / cluster_size);
  map.mark(header_.l1_table_offset / cluster_size, header_.table_size);

  bool l1_changed = false;
  for (std::uint64_t i = 0; i < l1_.size(); ++i) {
    const std::uint64_t l2_offset = l1_[i];
    if (l2_offset == 0) continue;
    if (!is_table_offset_valid(header_, file_size_, l2_offset)) {
      if (repair) {
        l1_[i] = 0;
        l1_changed = true;
        ++out.corruptions_fixed;
      } else {
        ++out.corruptions;
      }
      continue;
    }
    if (const std::uint64_t doubles = map.mark(l2_offset / cluster_size, header_.table_size)) {
      out.corruptions += doubles;
      continue;
    }
    Table table;
    int result = co_await load_table(*file_, geometry_, l2_offset, table);
    if (result < 0) {
      ++out.check_errors;
      out.error = result;
      continue;
    }
    bool l2_changed = false;
    std::uint64_t last = 0;
    for (std::uint64_t& entry : table) {
      if (entry == kUnallocatedEntry || entry == kZeroClusterEntry) continue;
      ++out.allocated_clusters;
      if (last != 0 && last + cluster_size != entry) ++out.fragmented_clusters;
      last = entry;
      if (!is_cluster_offset_valid(header_, file_size_, entry)) {
        if (repair) {
          entry = 0;
          l2_changed = true;
          ++out.corruptions_fixed;
        } else {
          ++out.corruptions;
        }
        continue;
      }
      out.corruptions += map.mark(entry / cluster_size, 1);
    }
    if (l2_changed) {
      result = co_await write_table_slice(
          *file_, encode_table_slice(geometry_, l2_offset, table, 0, geometry_.table_entries));
      if (result < 0) {
        ++out.check_errors;
        out.error = result;
      }
    }
  }
  if (l1_changed) {
    const int result = co_await write_table_slice(
        *file_, encode_table_slice(geometry_, header_.l1_table_offset, l1_, 0,
                                   geometry_.table_entries));
    if (result < 0) {
      ++out.check_errors;
      out.error = result;
    }
  }
  if (repair) {
    l2_cache_.clear();  // repaired tables were rewritten behind the cache
    index_l1();         // repaired L1 entries are 0 now
    if (out.corruptions == 0 && out.check_errors == 0) {
      // Clean: no table entry points at metadata, past EOF or at a cluster used twice.
      bad_entries_.clear();
      corrupt_ = false;
      corrupt_marked_ = false;
    }
  }
  if (out.error == 0) {
    for (std::uint64_t c = header_.header_size; c < map.size(); ++c) {
      if (!map.used(c)) ++out.leaks;
    }
  }
  table_lock_.unlock();
  if (repair && out.corruptions == 0 && out.check_errors == 0) {
    const int result = co_await set_need_check(false);
    if (result < 0) {
      ++out.check_errors;
      out.error = result;
    }
  }
  co_return out;
}

}  // namespace spindle::block::qed
