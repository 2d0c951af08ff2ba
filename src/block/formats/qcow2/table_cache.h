// TableCache: the qcow2 node's cache of metadata clusters (L2 tables, refcount blocks), keyed
// by their offset in the image file, holding each cluster's on-disk bytes (big-endian entries).
// Write-back: a table modified in memory is dirty (generation != written) until the node's
// flush writes a snapshot of it and records the generation it wrote. Only clean, loaded tables
// that nobody else references are evicted, least recently used first, once the cache holds
// more than `capacity` tables; dirty ones stay until flushed (the node flushes when too many
// pile up).
//
// Loading: find_or_insert() creates an entry that is not yet `ready`; its creator reads the
// cluster (without any lock), stores `error` or the bytes, then sets `ready`. Everyone else
// who finds the entry waits on `ready`, so concurrent misses on one table read it once.
//
// Thread-safety: not thread-safe. Qcow2Node calls it, and reads or changes a ready table's
// `bytes`, `generation` and `written`, only with its metadata mutex held. Before `ready` is
// set only the creator touches `bytes` and `error`; the Event orders them for the waiters.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <unordered_map>
#include <utility>
#include <vector>

#include "base/byte_order.h"
#include "base/io_buffer.h"
#include "coro/event.h"

namespace spindle::block::qcow2 {

struct CachedTable {
  base::IoBytes bytes;
  coro::Event ready;
  int error = 0;                // negative errno of a failed load (set before `ready`)
  std::uint64_t generation = 0; // bumped by every change
  std::uint64_t written = 0;    // the generation last written to the file
  std::vector<std::uint32_t> bad;  // L2 tables: sorted indices of entries known corrupt

  bool dirty() const noexcept { return generation != written; }
};
using TableRef = std::shared_ptr<CachedTable>;

// The big-endian 64-bit entry `index` of an L1, L2 or refcount table's bytes (the caller holds
// whatever lock guards the table).
inline std::uint64_t get64(const CachedTable& table, std::uint64_t index) noexcept {
  return base::load_be64(table.bytes.data() + index * 8);
}
inline void put64(CachedTable& table, std::uint64_t index, std::uint64_t value) noexcept {
  base::store_be64(table.bytes.data() + index * 8, value);
}

class TableCache {
 public:
  explicit TableCache(std::size_t capacity) : capacity_(capacity < 2 ? 2 : capacity) {}

  // The table at `offset` (made most recently used), or null.
  TableRef find(std::uint64_t offset);
  // The same without touching the recency order.
  TableRef peek(std::uint64_t offset) const;
  // The table at `offset`; `created` is true when a new, not yet ready entry was made.
  TableRef find_or_insert(std::uint64_t offset, bool& created);
  // Adds a ready table made in memory (a new L2 table or refcount block).
  void insert_ready(std::uint64_t offset, TableRef table);
  // Removes the entry at `offset` if it is `table`.
  void erase(std::uint64_t offset, const TableRef& table);
  void for_each(const std::function<void(std::uint64_t, const TableRef&)>& visit) const;
  std::size_t size() const noexcept { return index_.size(); }
  std::size_t capacity() const noexcept { return capacity_; }
  std::size_t dirty_count() const;

 private:
  using Entry = std::pair<std::uint64_t, TableRef>;
  void evict();

  std::size_t capacity_;
  std::list<Entry> order_;  // most recently used first
  std::unordered_map<std::uint64_t, std::list<Entry>::iterator> index_;
};

}  // namespace spindle::block::qcow2
