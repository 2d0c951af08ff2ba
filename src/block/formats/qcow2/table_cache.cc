#include "block/formats/qcow2/table_cache.h"

namespace spindle::block::qcow2 {

TableRef TableCache::find(std::uint64_t offset) {
  const auto it = index_.find(offset);
  if (it == index_.end()) return nullptr;
  order_.splice(order_.begin(), order_, it->second);
  return it->second->second;
}

TableRef TableCache::peek(std::uint64_t offset) const {
  const auto it = index_.find(offset);
  return it == index_.end() ? nullptr : it->second->second;
}

TableRef TableCache::find_or_insert(std::uint64_t offset, bool& created) {
  created = false;
  if (TableRef found = find(offset)) return found;
  created = true;
  auto table = std::make_shared<CachedTable>();
  order_.emplace_front(offset, table);
  index_[offset] = order_.begin();
  evict();
  return table;
}

void TableCache::insert_ready(std::uint64_t offset, TableRef table) {
  table->ready.set();
  const auto it = index_.find(offset);
  if (it != index_.end()) {
    it->second->second = std::move(table);
    order_.splice(order_.begin(), order_, it->second);
    return;
  }
  order_.emplace_front(offset, std::move(table));
  index_[offset] = order_.begin();
  evict();
}

void TableCache::erase(std::uint64_t offset, const TableRef& table) {
  const auto it = index_.find(offset);
  if (it == index_.end() || it->second->second != table) return;
  order_.erase(it->second);
  index_.erase(it);
}

void TableCache::for_each(
    const std::function<void(std::uint64_t, const TableRef&)>& visit) const {
  for (const Entry& entry : order_) visit(entry.first, entry.second);
}

std::size_t TableCache::dirty_count() const {
  std::size_t count = 0;
  for (const Entry& entry : order_) count += entry.second->ready.is_set() && entry.second->dirty();
  return count;
}

void TableCache::evict() {
  auto it = order_.end();
  while (index_.size() > capacity_ && it != order_.begin()) {
    --it;
    const TableRef& table = it->second;
    // use_count 1: only the cache holds it, so no lookup or loader is using it.
    if (table.use_count() == 1 && table->ready.is_set() && !table->dirty()) {
      index_.erase(it->first);
      it = order_.erase(it);
    }
  }
}

}  // namespace spindle::block::qcow2
