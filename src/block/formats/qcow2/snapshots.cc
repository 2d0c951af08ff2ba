// Qcow2Node's internal snapshots: list, create, delete, apply (declared in qcow2_node.h).
//
// Every change follows one order, so that a crash leaves at worst leaked clusters:
// references are added (refcount blocks written) before anything names the clusters, the
// header write that commits the change comes after everything it names is on disk, and
// references are dropped only once nothing on disk names them any more.
#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "base/byte_order.h"
#include "block/formats/qcow2/qcow2_node.h"

namespace spindle::block::qcow2 {

namespace {

constexpr std::uint64_t kFirstTableRead = 64 * 1024;

BlockError errno_error(int result, const std::string& what) {
  return {-result, fmt::format("{}: {}", what, std::strerror(-result))};
}

std::vector<std::byte> encode_l1(const std::vector<std::uint64_t>& entries, std::uint64_t bytes) {
  std::vector<std::byte> out(bytes, std::byte{0});
  for (std::size_t i = 0; i < entries.size(); ++i) base::store_be64(out.data() + i * 8, entries[i]);
  return out;
}

}  // namespace

coro::Task<BlockResult<std::vector<SnapshotEntry>>> Qcow2Node::read_snapshot_table(
    std::uint64_t& extent) {
  extent = 0;
  Header header;
  {
    std::lock_guard lock(meta_mutex_);
    header = header_;
  }
  const std::uint64_t file_size = file_->size();
  if (BlockError e = validate_snapshot_location(header, file_size); !e.ok()) co_return e;
  if (header.nb_snapshots == 0) co_return std::vector<SnapshotEntry>{};
  const std::uint64_t limit =
      std::min(file_size - header.snapshots_offset, kMaxSnapshotTableBytes);
  std::uint64_t want = std::min(limit, kFirstTableRead);
  std::vector<std::byte> bytes;
  for (;;) {
    bytes.assign(want, std::byte{0});
    const int result = co_await read_aligned(*file_, header.snapshots_offset, std::span(bytes));
    if (result < 0) co_return errno_error(result, "cannot read the qcow2 snapshot table");
    extent = snapshot_table_extent(bytes, header.nb_snapshots);
    if (extent != 0 || want == limit) break;
    want = std::min(limit, want * 4);
  }
  co_return decode_snapshot_table(bytes, header, file_size, size());
}

BlockError Qcow2Node::snapshot_change_refused() const {
  if (read_only_) return BlockError{EROFS, "the image is opened read-only"};
  if (refuses_writes()) return BlockError{EIO, "the image is corrupt"};
  return {};
}

coro::Task<BlockResult<std::vector<SnapshotEntry>>> Qcow2Node::flushed_snapshot_table(
    std::uint64_t& extent) {
  const int result = co_await write_back_locked();
  if (result < 0) co_return errno_error(result, "cannot write qcow2 metadata");
  co_return co_await read_snapshot_table(extent);
}

coro::Task<BlockResult<std::vector<SnapshotEntry>>> Qcow2Node::snapshots() {
  std::uint64_t extent = 0;
  co_return co_await read_snapshot_table(extent);
}

BlockError Qcow2Node::refcount_error(int result, const std::string& what) const {
  if (result == -EINVAL) {
    return BlockError{EINVAL, fmt::format("{} has the largest refcount {} bits hold", what,
                                          header_.refcount_bits())};
  }
  return errno_error(result, fmt::format("cannot update the refcount of {}", what));
}

coro::Task<BlockError> Qcow2Node::walk_tree(std::vector<std::uint64_t> l1, bool active,
                                            int delta) {
  const std::uint64_t cs = cluster_size();
  const std::uint64_t per_entry = extended_ ? 2 : 1;
  std::uint64_t since_write_back = 0;
  for (std::uint64_t i = 0; i < l1.size(); ++i) {
    const std::uint64_t l1_entry = l1[i];
    const std::uint64_t l2_offset = l1_entry & kL1OffsetMask;
    if (l2_offset == 0) continue;
    {
      std::lock_guard lock(meta_mutex_);
      if ((l1_entry & kL1ReservedMask) || l2_offset % cs != 0 || l2_offset + cs > file_end()) {
        co_return BlockError{EIO, fmt::format("qcow2: L1 entry {} ({:#x}) is corrupt", i, l1_entry)};
      }
    }
    TableRef table;
    int result = co_await get_table(l2_cache_, l2_offset, table);
    if (result < 0) co_return errno_error(result, "cannot read a qcow2 L2 table");
    std::vector<std::uint64_t> entries(l2_entries_);
    {
      std::lock_guard lock(meta_mutex_);
      for (std::uint64_t j = 0; j < l2_entries_; ++j) entries[j] = get64(*table, j * per_entry);
    }
    // The refcount each data cluster ends with (0: no COPIED bit to keep).
    std::vector<std::uint64_t> counts(l2_entries_, 0);
    for (std::uint64_t j = 0; j < l2_entries_; ++j) {
      const std::uint64_t entry = entries[j];
      std::uint64_t now = 0;
      if (entry & kEntryCompressed) {
        if (delta == 0) continue;
        const CompressedExtent extent = decode_compressed_entry(entry, header_.cluster_bits);
        if (extent.length == 0) continue;
        for (std::uint64_t c = extent.host_offset / cs;
             c <= (extent.host_offset + extent.length - 1) / cs; ++c) {
          result = co_await adjust_refcount(c * cs, delta, now);
          if (result < 0) break;
        }
      } else {
        const std::uint64_t host = entry & kL2OffsetMask;
        if (host == 0) continue;
        bool bad = (entry & kL2ReservedMask) != 0 || host % cs != 0;
        {
          std::lock_guard lock(meta_mutex_);
          bad = bad || host + cs > file_end();
        }
        if (bad) {
          co_return BlockError{EIO, fmt::format("qcow2: L2 entry {} of the table at {:#x} "
                                                "({:#x}) is corrupt",
                                                j, l2_offset, entry)};
        }
        result = co_await adjust_refcount(host, delta, now);
        counts[j] = now;
      }
      if (result < 0) {
        co_return refcount_error(
            result, fmt::format("a cluster the L2 table at {:#x} names", l2_offset));
      }
    }
    std::uint64_t table_count = 0;
    result = co_await adjust_refcount(l2_offset, delta, table_count);
    if (result < 0) {
      co_return refcount_error(result, fmt::format("the L2 table at {:#x}", l2_offset));
    }
    if (active) {
      std::lock_guard lock(meta_mutex_);
      bool changed = false;
      for (std::uint64_t j = 0; j < l2_entries_; ++j) {
        if (counts[j] == 0) continue;
        const std::uint64_t entry = get64(*table, j * per_entry);
        const std::uint64_t wanted =
            counts[j] == 1 ? entry | kEntryCopied : entry & ~kEntryCopied;
        if (wanted != entry) {
          put64(*table, j * per_entry, wanted);
          changed = true;
        }
      }
      if (changed) ++table->generation;
      if (i < l1_.size()) {
        const std::uint64_t wanted =
            table_count == 1 ? l1_[i] | kEntryCopied : l1_[i] & ~kEntryCopied;
        if (wanted != l1_[i]) {
          l1_[i] = wanted;
          ++l1_generation_;
        }
      }
    }
    table.reset();
    // Keep the dirty tables bounded: writing back here is safe at any point, refcount blocks
    // going first.
    if (++since_write_back >= 64) {
      since_write_back = 0;
      bool full = false;
      {
        std::lock_guard lock(meta_mutex_);
        full = l2_cache_.dirty_count() * 2 >= l2_cache_.capacity() ||
               refcount_cache_.dirty_count() * 2 >= refcount_cache_.capacity();
      }
      if (full) {
        result = co_await write_back_locked();
        if (result < 0) co_return errno_error(result, "cannot write qcow2 metadata");
      }
    }
  }
  co_return BlockError{};
}

coro::Task<BlockError> Qcow2Node::commit_snapshot_table(const std::vector<SnapshotEntry>& table,
                                                        std::uint64_t old_extent) {
  const std::uint64_t cs = cluster_size();
  BlockResult<std::vector<std::byte>> encoded = encode_snapshot_table(table);
  if (!encoded) co_return encoded.error();
  std::vector<std::byte> bytes = std::move(encoded).value();
  std::uint64_t offset = 0;
  int result = 0;
  if (!table.empty()) {
    const std::uint64_t clusters = (bytes.size() + cs - 1) / cs;
    result = co_await allocate_clusters(clusters, offset, /*flush_mutex_held=*/true);
    if (result < 0) co_return errno_error(result, "cannot allocate the qcow2 snapshot table");
    bytes.resize(clusters * cs, std::byte{0});
    result = co_await file_->write(offset, std::span<const std::byte>(bytes), 0);
    if (result < 0) co_return errno_error(result, "cannot write the qcow2 snapshot table");
  }
  // Everything the new table and the active tree name, and their refcounts, on disk first.
  result = co_await write_back_locked();
  if (result < 0) co_return errno_error(result, "cannot write qcow2 metadata");
  std::uint64_t old_offset = 0;
  {
    std::lock_guard lock(meta_mutex_);
    old_offset = header_.snapshots_offset;
    header_.nb_snapshots = static_cast<std::uint32_t>(table.size());
    header_.snapshots_offset = offset;
  }
  result = co_await write_header_fields();
  if (result >= 0) result = co_await file_->flush();
  if (result < 0) {
    broken_.store(true, std::memory_order_release);
    co_return errno_error(result, "cannot write the qcow2 header");
  }
  if (old_extent > 0 && old_offset != 0) {
    std::lock_guard lock(meta_mutex_);
    for (std::uint64_t c = old_offset / cs; c <= (old_offset + old_extent - 1) / cs; ++c) {
      pending_frees_.push_back(c * cs);
    }
  }
  result = co_await write_back_locked();
  if (result < 0) co_return errno_error(result, "cannot write qcow2 metadata");
  co_return BlockError{};
}

coro::Task<BlockError> Qcow2Node::create_snapshot(SnapshotEntry snapshot) {
  if (external_data_) {
    co_return BlockError{ENOTSUP, "internal snapshots are not supported with an external data "
                                  "file"};
  }
  if (BlockError refused = snapshot_change_refused(); !refused.ok()) co_return refused;
  auto guard = co_await flush_mutex_.scoped_lock();
  std::uint64_t old_extent = 0;
  BlockResult<std::vector<SnapshotEntry>> read = co_await flushed_snapshot_table(old_extent);
  int result = 0;
  if (!read) co_return read.error();
  std::vector<SnapshotEntry> table = std::move(read).value();
  if (table.size() >= kMaxSnapshotCount) co_return BlockError{EFBIG, "Too many snapshots"};
  if (snapshot.id.empty()) {
    unsigned long largest = 0;
    for (const SnapshotEntry& s : table) {
      largest = std::max(largest, std::strtoul(s.id.c_str(), nullptr, 10));
    }
    snapshot.id = std::to_string(largest + 1);
  }
  for (const SnapshotEntry& s : table) {
    if (s.id == snapshot.id) {
      co_return BlockError{EEXIST, fmt::format("a snapshot with id '{}' exists", s.id)};
    }
  }
  const std::uint64_t cs = cluster_size();
  std::vector<std::uint64_t> l1;
  {
    std::lock_guard lock(meta_mutex_);
    l1 = l1_;
  }
  snapshot.l1_size = static_cast<std::uint32_t>(l1.size());
  snapshot.disk_size = size();
  snapshot.l1_table_offset = 0;
  snapshot.unknown_extra.clear();
  if (!l1.empty()) {
    // The copy names the same L2 tables; COPIED means nothing in a snapshot's table.
    std::vector<std::uint64_t> copy = l1;
    for (std::uint64_t& e : copy) e &= ~kEntryCopied;
    const std::uint64_t clusters = (copy.size() * 8 + cs - 1) / cs;
    result = co_await allocate_clusters(clusters, snapshot.l1_table_offset, true);
    if (result < 0) co_return errno_error(result, "cannot allocate the snapshot's L1 table");
    const std::vector<std::byte> bytes = encode_l1(copy, clusters * cs);
    result = co_await file_->write(snapshot.l1_table_offset, std::span<const std::byte>(bytes), 0);
    if (result < 0) co_return errno_error(result, "cannot write the snapshot's L1 table");
  }
  // One more reference along the active tree (COPIED cleared where the count passes 1).
  BlockError error = co_await walk_tree(l1, /*active=*/true, +1);
  if (!error.ok()) co_return error;
  table.push_back(std::move(snapshot));
  co_return co_await commit_snapshot_table(table, old_extent);
}

coro::Task<BlockError> Qcow2Node::delete_snapshot(std::string name) {
  if (BlockError refused = snapshot_change_refused(); !refused.ok()) co_return refused;
  auto guard = co_await flush_mutex_.scoped_lock();
  std::uint64_t old_extent = 0;
  BlockResult<std::vector<SnapshotEntry>> read = co_await flushed_snapshot_table(old_extent);
  int result = 0;
  if (!read) co_return read.error();
  std::vector<SnapshotEntry> table = std::move(read).value();
  const auto found = std::find_if(table.begin(), table.end(),
                                  [&](const SnapshotEntry& s) { return s.name == name; });
  if (found == table.end()) co_return BlockError{ENOENT, "snapshot not found"};
  const SnapshotEntry snapshot = *found;
  BlockResult<std::vector<std::uint64_t>> loaded = co_await read_snapshot_l1(snapshot);
  if (!loaded) co_return loaded.error();
  std::vector<std::uint64_t> l1 = std::move(loaded).value();
  table.erase(found);
  BlockError error = co_await commit_snapshot_table(table, old_extent);
  if (!error.ok()) co_return error;
  // Nothing on disk names the snapshot now: drop its references, then its L1 table's.
  error = co_await walk_tree(l1, /*active=*/false, -1);
  if (!error.ok()) co_return error;
  if (!l1.empty()) {
    const std::uint64_t cs = cluster_size();
    std::lock_guard lock(meta_mutex_);
    const std::uint64_t first = snapshot.l1_table_offset / cs;
    const std::uint64_t last = (snapshot.l1_table_offset + l1.size() * 8 - 1) / cs;
    for (std::uint64_t c = first; c <= last; ++c) pending_frees_.push_back(c * cs);
  }
  std::vector<std::uint64_t> active;
  {
    std::lock_guard lock(meta_mutex_);
    active = l1_;
  }
  error = co_await walk_tree(active, /*active=*/true, 0);  // COPIED where back to 1
  if (!error.ok()) co_return error;
  result = co_await write_back_locked();
  if (result < 0) co_return errno_error(result, "cannot write qcow2 metadata");
  co_return BlockError{};
}

coro::Task<BlockResult<std::vector<std::uint64_t>>> Qcow2Node::read_snapshot_l1(
    const SnapshotEntry& snapshot) {
  Header header;
  {
    std::lock_guard lock(meta_mutex_);
    header = header_;
  }
  if (BlockError e = validate_snapshot_l1(snapshot, header, file_->size()); !e.ok()) co_return e;
  std::vector<std::byte> raw(std::uint64_t{snapshot.l1_size} * 8);
  if (!raw.empty()) {
    const int result = co_await read_aligned(*file_, snapshot.l1_table_offset, std::span(raw));
    if (result < 0) co_return errno_error(result, "cannot read the snapshot's L1 table");
  }
  std::vector<std::uint64_t> l1(snapshot.l1_size);
  for (std::size_t i = 0; i < l1.size(); ++i) l1[i] = base::load_be64(raw.data() + i * 8);
  co_return l1;
}

coro::Task<BlockError> Qcow2Node::view_snapshot(std::string id, std::string name) {
  if (!read_only_) co_return BlockError{EROFS, "the image must be opened read-only"};
  std::uint64_t extent = 0;
  BlockResult<std::vector<SnapshotEntry>> read = co_await read_snapshot_table(extent);
  if (!read) co_return read.error();
  const std::vector<SnapshotEntry>& table = read.value();
  const auto found = std::find_if(table.begin(), table.end(), [&](const SnapshotEntry& s) {
    return (id.empty() || s.id == id) && (name.empty() || s.name == name);
  });
  if (found == table.end() || (id.empty() && name.empty())) {
    co_return BlockError{ENOENT, "Can't find snapshot"};
  }
  const SnapshotEntry snapshot = *found;
  BlockResult<std::vector<std::uint64_t>> loaded = co_await read_snapshot_l1(snapshot);
  if (!loaded) co_return loaded.error();
  std::vector<std::uint64_t> l1 = std::move(loaded).value();
  // The virtual size stays the active image's, as with qemu (past the snapshot's L1 table the
  // image reads as unallocated).
  std::lock_guard lock(meta_mutex_);
  l1_ = l1;
  l1_on_disk_ = std::move(l1);
  co_return BlockError{};
}

coro::Task<BlockError> Qcow2Node::apply_snapshot(std::string id_or_name) {
  if (BlockError refused = snapshot_change_refused(); !refused.ok()) co_return refused;
  auto guard = co_await flush_mutex_.scoped_lock();
  std::uint64_t extent = 0;
  BlockResult<std::vector<SnapshotEntry>> read = co_await flushed_snapshot_table(extent);
  int result = 0;
  if (!read) co_return read.error();
  const std::vector<SnapshotEntry>& table = read.value();
  auto found = std::find_if(table.begin(), table.end(),
                            [&](const SnapshotEntry& s) { return s.id == id_or_name; });
  if (found == table.end()) {
    found = std::find_if(table.begin(), table.end(),
                         [&](const SnapshotEntry& s) { return s.name == id_or_name; });
  }
  if (found == table.end()) co_return BlockError{ENOENT, "snapshot not found"};
  const SnapshotEntry snapshot = *found;
  const std::uint64_t cs = cluster_size();
  Header header;
  {
    std::lock_guard lock(meta_mutex_);
    header = header_;
  }
  if (BlockError e = validate_snapshot_l1(snapshot, header, file_->size()); !e.ok()) co_return e;
  if (snapshot.disk_size % 512 != 0) {
    co_return BlockError{EINVAL, "the snapshot's disk size is not a multiple of 512"};
  }
  BlockResult<std::vector<std::uint64_t>> loaded = co_await read_snapshot_l1(snapshot);
  if (!loaded) co_return loaded.error();
  std::vector<std::uint64_t> l1 = std::move(loaded).value();
  for (std::uint64_t& entry : l1) entry &= ~kEntryCopied;
  // The new active tree's references first, on disk before anything names them as active.
  BlockError error = co_await walk_tree(l1, /*active=*/false, +1);
  if (!error.ok()) co_return error;
  // The new active L1 table in new clusters (the old one stays what the header names until
  // the commit); with no entries the header keeps the old offset.
  std::uint64_t l1_offset = header.l1_table_offset;
  if (!l1.empty()) {
    const std::uint64_t clusters = (l1.size() * 8 + cs - 1) / cs;
    result = co_await allocate_clusters(clusters, l1_offset, true);
    if (result < 0) co_return errno_error(result, "cannot allocate an L1 table");
    const std::vector<std::byte> bytes = encode_l1(l1, clusters * cs);
    result = co_await file_->write(l1_offset, std::span<const std::byte>(bytes), 0);
    if (result < 0) co_return errno_error(result, "cannot write the L1 table");
  }
  result = co_await write_back_locked();
  if (result < 0) co_return errno_error(result, "cannot write qcow2 metadata");
  // The commit: L1 offset and size and the virtual size in one header write.
  std::vector<std::uint64_t> old_l1;
  const std::uint64_t old_l1_offset = header.l1_table_offset;
  const std::uint64_t old_l1_bytes = std::uint64_t{header.l1_size} * 8;
  {
    std::lock_guard lock(meta_mutex_);
    header_.l1_table_offset = l1_offset;
    header_.l1_size = snapshot.l1_size;
    header_.size = snapshot.disk_size;
  }
  result = co_await write_header_fields();
  if (result >= 0) result = co_await file_->flush();
  if (result < 0) {
    broken_.store(true, std::memory_order_release);
    co_return errno_error(result, "cannot write the qcow2 header");
  }
  {
    std::lock_guard lock(meta_mutex_);
    old_l1 = std::move(l1_);
    l1_ = l1;
    l1_on_disk_ = l1;
    ++l1_generation_;
    l1_written_ = l1_generation_;
    for (const std::uint64_t entry : l1_) {
      const std::uint64_t offset = entry & kL1OffsetMask;
      if (offset != 0) l2_clusters_.insert(offset / cs);
    }
    size_.store(snapshot.disk_size, std::memory_order_release);
    if (old_l1_bytes > 0) {
      for (std::uint64_t c = old_l1_offset / cs; c <= (old_l1_offset + old_l1_bytes - 1) / cs; ++c) {
        pending_frees_.push_back(c * cs);
      }
    }
  }
  // Nothing names the old active tree now.
  error = co_await walk_tree(old_l1, /*active=*/false, -1);
  if (!error.ok()) co_return error;
  error = co_await walk_tree(l1, /*active=*/true, 0);  // COPIED where a count is 1
  if (!error.ok()) co_return error;
  result = co_await write_back_locked();
  if (result < 0) co_return errno_error(result, "cannot write qcow2 metadata");
  co_return BlockError{};
}

}  // namespace spindle::block::qcow2
