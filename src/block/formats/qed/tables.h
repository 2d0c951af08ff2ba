// QED tables (reference/qed.md §1.5): an L1 or L2 table is `table_entries` little-endian u64
// offsets spanning table_size contiguous clusters. In memory a Table holds them host-endian.
// load_table reads a whole table through the image's child node; store_table writes the
// 512-byte-aligned slice holding entries [first, first + count) (a whole table when count is
// table_entries), so only the sectors that changed are rewritten, as QEMU does.
//
// Thread-safety: the functions touch only their arguments; the caller guarantees nobody
// modifies `table` while store_table encodes it (QedNode encodes under its table lock).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "base/io_buffer.h"
#include "block/block_node.h"
#include "block/formats/qed/format.h"
#include "coro/task.h"

namespace spindle::block::qed {

using Table = std::vector<std::uint64_t>;
using TableRef = std::shared_ptr<Table>;

// Reads the table at `offset` into `table` (resized to geometry.table_entries). 0 or -errno.
coro::Task<int> load_table(BlockNode& child, const Geometry& geometry, std::uint64_t offset,
                           Table& table);

// Encodes entries [first, first + count) of `table`, widened to whole 512-byte sectors, into a
// buffer; write_table_bytes writes such a buffer. Split so that encoding can run under a lock
// and the write outside it.
struct TableSlice {
  std::uint64_t file_offset = 0;
  base::IoBytes bytes;
};
TableSlice encode_table_slice(const Geometry& geometry, std::uint64_t table_offset,
                              const Table& table, std::uint64_t first, std::uint64_t count);
coro::Task<int> write_table_slice(BlockNode& child, const TableSlice& slice);

}  // namespace spindle::block::qed
