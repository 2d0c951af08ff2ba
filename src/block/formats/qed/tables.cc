#include "block/formats/qed/tables.h"

#include <algorithm>
#include <span>

#include "base/byte_order.h"

namespace spindle::block::qed {

coro::Task<int> load_table(BlockNode& child, const Geometry& geometry, std::uint64_t offset,
                           Table& table) {
  base::IoBytes bytes(geometry.table_bytes);
  const int result = co_await child.read(offset, std::span(bytes), 0);
  if (result < 0) co_return result;
  table.resize(geometry.table_entries);
  for (std::uint64_t i = 0; i < geometry.table_entries; ++i) {
    table[i] = base::load_le64(bytes.data() + i * 8);
  }
  co_return 0;
}

TableSlice encode_table_slice(const Geometry& geometry, std::uint64_t table_offset,
                              const Table& table, std::uint64_t first, std::uint64_t count) {
  constexpr std::uint64_t kEntriesPerSector = 512 / 8;
  const std::uint64_t begin = first - first % kEntriesPerSector;
  std::uint64_t end = first + count;
  end = std::min<std::uint64_t>(geometry.table_entries,
                                (end + kEntriesPerSector - 1) / kEntriesPerSector * kEntriesPerSector);
  TableSlice slice;
  slice.file_offset = table_offset + begin * 8;
  slice.bytes.resize((end - begin) * 8);
  for (std::uint64_t i = begin; i < end; ++i) {
    base::store_le64(slice.bytes.data() + (i - begin) * 8, table[i]);
  }
  return slice;
}

coro::Task<int> write_table_slice(BlockNode& child, const TableSlice& slice) {
  co_return co_await child.write(slice.file_offset, std::span<const std::byte>(slice.bytes), 0);
}

}  // namespace spindle::block::qed
