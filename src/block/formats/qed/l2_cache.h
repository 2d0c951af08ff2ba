// L2Cache: the QED node's cache of loaded L2 tables, keyed by table offset (reference/qed.md
// §2.7). Write-through: a table enters the cache only once it is on disk (or was read from
// it), and callers patch cached tables before writing the changed slice. Entries are shared
// pointers; a lookup hands out a reference, and only entries nobody else references are
// evicted when the cache holds more than kCapacity tables (it grows while all are in use).
//
// Thread-safety: not thread-safe. QedNode calls it only with its table lock held.
#pragma once

#include <cstddef>
#include <cstdint>
#include <list>
#include <utility>

#include "block/formats/qed/tables.h"

namespace spindle::block::qed {

class L2Cache {
 public:
  static constexpr std::size_t kCapacity = 50;

  // The cached table at `offset` (moved to the front), or null.
  TableRef find(std::uint64_t offset);
  // The same without touching the recency order.
  TableRef peek(std::uint64_t offset) const;
  // Adds `table` for `offset`; if one is already cached, returns that one instead.
  TableRef insert(std::uint64_t offset, TableRef table);
  void clear() noexcept { entries_.clear(); }
  std::size_t size() const noexcept { return entries_.size(); }

 private:
  std::list<std::pair<std::uint64_t, TableRef>> entries_;  // most recently used first
};

}  // namespace spindle::block::qed
