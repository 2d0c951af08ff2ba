// Qcow2Node::make_empty: qemu-img commit's emptying of the top image. Every active L2 entry
// (and, with extended L2, its subcluster bitmap) becomes 0, so the image reads through to its
// backing file everywhere; the clusters the entries held are released once the tables are
// written back (defer_release), and the L2 tables themselves stay. Tables shared with an
// internal snapshot are copied first (writable_l2), so snapshots keep their content.
#include <cerrno>
#include <cstring>

#include "block/formats/qcow2/qcow2_node.h"

namespace spindle::block::qcow2 {

coro::Task<BlockError> Qcow2Node::make_empty() {
  const auto failed = [](int error) { return BlockError{error, std::strerror(error)}; };
  if (read_only_) co_return failed(EROFS);
  if (refuses_writes()) co_return failed(EIO);
  if (raw_data_) co_return failed(ENOTSUP);
  const std::uint64_t cs = cluster_size();
  const std::uint64_t step = extended_ ? 2 : 1;
  std::size_t l1_entries = 0;
  {
    std::lock_guard lock(meta_mutex_);
    l1_entries = l1_.size();
  }
  int result = 0;
  for (std::size_t l1_index = 0; result >= 0 && l1_index < l1_entries; ++l1_index) {
    const std::uint64_t span_start = l1_index * l2_span();
    if (span_start >= size()) break;
    TableRef l2;
    result = co_await writable_l2(span_start, false, l2);
    if (result < 0 || !l2) continue;
    std::lock_guard lock(meta_mutex_);
    CachedTable& table = *l2;
    bool changed = false;
    for (std::uint64_t i = 0; i < l2_entries_ && span_start + i * cs < size(); ++i) {
      const std::uint64_t entry = get64(table, i * step);
      const std::uint64_t bitmap = extended_ ? get64(table, i * step + 1) : 0;
      if (entry == 0 && bitmap == 0) continue;
      if (!unit_at(table, span_start + i * cs).ok) {
        corrupt_.store(true, std::memory_order_release);
        result = -EIO;
        break;
      }
      defer_release(entry);
      put64(table, i * step, 0);
      if (extended_) put64(table, i * step + 1, 0);
      changed = true;
    }
    if (changed) ++table.generation;
  }
  if (result < 0) {
    co_await mark_corrupt();  // only if a bad entry was found (I/O errors do not mark it)
    co_return failed(-result);
  }
  if (const int flushed = co_await flush(); flushed < 0) co_return failed(-flushed);
  co_return BlockError{};
}

}  // namespace spindle::block::qcow2
