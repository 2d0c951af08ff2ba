#include "block/formats/qed/l2_cache.h"

namespace spindle::block::qed {

TableRef L2Cache::find(std::uint64_t offset) {
  for (auto it = entries_.begin(); it != entries_.end(); ++it) {
    if (it->first == offset) {
      entries_.splice(entries_.begin(), entries_, it);
      return entries_.front().second;
    }
  }
  return nullptr;
}

TableRef L2Cache::peek(std::uint64_t offset) const {
  for (const auto& [cached_offset, table] : entries_) {
    if (cached_offset == offset) return table;
  }
  return nullptr;
}

TableRef L2Cache::insert(std::uint64_t offset, TableRef table) {
  if (TableRef existing = find(offset)) return existing;
  entries_.emplace_front(offset, std::move(table));
  // Evict the least recently used tables that no request holds.
  for (auto it = entries_.end(); entries_.size() > kCapacity && it != entries_.begin();) {
    --it;
    if (it->second.use_count() == 1) it = entries_.erase(it);
  }
  return entries_.front().second;
}

}  // namespace spindle::block::qed
