// Qcow2Node's persistent dirty bitmaps on disk: reading the directory and a bitmap's bits,
// and replacing the directory (declared in qcow2_node.h).
//
// A change follows the snapshot table's order, so that a crash leaves at worst leaked
// clusters: new data clusters, tables and directory are written and counted (refcount
// blocks written back) before the header names them; the header write (with the autoclear
// bit) commits; the old directory and tables are released only after that.
#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <unordered_set>

#include "base/byte_order.h"
#include "block/formats/qcow2/qcow2_node.h"

namespace spindle::block::qcow2 {

namespace {

BlockError errno_error(int result, const std::string& what) {
  return {-result, fmt::format("{}: {}", what, std::strerror(-result))};
}

// Clears the bits of the last byte that lie past the image's last bit.
void clear_tail(std::vector<std::uint8_t>& bits, std::uint64_t image_size,
                std::uint32_t granularity_bits) {
  const std::uint64_t granularity = std::uint64_t{1} << granularity_bits;
  const std::uint64_t count = image_size / granularity + (image_size % granularity != 0);
  if (count % 8 != 0 && !bits.empty() && bits.size() == (count + 7) / 8) {
    bits.back() = static_cast<std::uint8_t>(bits.back() & ((1u << (count % 8)) - 1));
  }
}

}  // namespace

coro::Task<BlockResult<std::vector<BitmapEntry>>> Qcow2Node::bitmap_directory() {
  auto guard = co_await flush_mutex_.scoped_lock();
  co_return co_await read_bitmap_directory_locked();
}

coro::Task<BlockResult<std::vector<BitmapEntry>>> Qcow2Node::read_bitmap_directory_locked() {
  std::optional<BitmapsExtension> ext;
  {
    std::lock_guard lock(meta_mutex_);
    ext = header_.bitmaps;
  }
  if (!ext || ext->nb_bitmaps == 0) co_return std::vector<BitmapEntry>{};
  const std::uint64_t file_size = file_->size();
  if (ext->bitmap_directory_size == 0) {
    co_return BlockError{EINVAL, "Requested bitmap directory size is zero"};
  }
  if (ext->bitmap_directory_size > kMaxBitmapDirectoryBytes) {
    co_return BlockError{EINVAL, "Requested bitmap directory size is too big"};
  }
  if (ext->bitmap_directory_offset > file_size ||
      file_size - ext->bitmap_directory_offset < ext->bitmap_directory_size) {
    co_return BlockError{EINVAL,
                         "Failed to read bitmap directory: it lies past the end of the file"};
  }
  std::vector<std::byte> bytes(ext->bitmap_directory_size);
  const int result = co_await read_aligned(*file_, ext->bitmap_directory_offset, std::span(bytes));
  if (result < 0) co_return errno_error(result, "Failed to read bitmap directory");
  co_return decode_bitmap_directory(bytes, ext->nb_bitmaps, cluster_size(), size());
}

coro::Task<BlockResult<std::vector<std::uint64_t>>> Qcow2Node::read_bitmap_table(
    const BitmapEntry& entry) {
  const std::uint64_t file_size = file_->size();
  const std::uint64_t bytes = std::uint64_t{entry.table_size} * 8;
  if (entry.table_size == 0 || entry.table_size > kMaxBitmapTableEntries ||
      entry.table_offset > file_size || file_size - entry.table_offset < bytes) {
    co_return BlockError{EINVAL, fmt::format("Could not read bitmap_table table from image for "
                                             "bitmap '{}': Invalid argument",
                                             entry.name)};
  }
  std::vector<std::byte> raw(bytes);
  const int result = co_await read_aligned(*file_, entry.table_offset, std::span(raw));
  if (result < 0) {
    co_return errno_error(result, fmt::format("Could not read bitmap_table table from image for "
                                              "bitmap '{}'",
                                              entry.name));
  }
  std::vector<std::uint64_t> table(entry.table_size);
  const std::uint64_t cs = cluster_size();
  for (std::size_t i = 0; i < table.size(); ++i) {
    table[i] = base::load_be64(raw.data() + i * 8);
    const std::uint64_t offset = table[i] & kBitmapTableOffsetMask;
    if (!valid_bitmap_table_entry(table[i], cs) || (offset != 0 && offset + cs > file_size)) {
      co_return BlockError{EINVAL, fmt::format("Could not read bitmap_table table from image for "
                                               "bitmap '{}': Invalid argument",
                                               entry.name)};
    }
  }
  co_return table;
}

coro::Task<BlockError> Qcow2Node::validate_bitmaps() {
  BlockResult<std::vector<BitmapEntry>> dir = co_await read_bitmap_directory_locked();
  if (!dir) co_return dir.error();
  for (const BitmapEntry& e : dir.value()) {
    if (e.in_use()) continue;
    BlockResult<std::vector<std::uint64_t>> table = co_await read_bitmap_table(e);
    if (!table) co_return table.error();
    if (bitmap_table_entries(size(), e.granularity_bits, cluster_size()) != e.table_size) {
      co_return BlockError{EINVAL, fmt::format("Could not read bitmap '{}' from image: Invalid "
                                               "argument",
                                               e.name)};
    }
  }
  co_return BlockError{};
}

coro::Task<BlockResult<std::vector<std::uint8_t>>> Qcow2Node::read_bitmap_bits(
    const BitmapEntry& entry) {
  if (entry.in_use()) {
    co_return BlockError{EINVAL,
                         fmt::format("Bitmap '{}' is inconsistent and cannot be used", entry.name)};
  }
  const std::uint64_t cs = cluster_size();
  const std::uint64_t image_size = size();
  const std::uint64_t data_bytes = bitmap_data_bytes(image_size, entry.granularity_bits);
  const std::uint64_t entries = bitmap_table_entries(image_size, entry.granularity_bits, cs);
  if (entries != entry.table_size || data_bytes > kMaxBitmapDataBytes) {
    co_return BlockError{EINVAL, fmt::format("Could not read bitmap '{}' from image: Invalid "
                                             "argument",
                                             entry.name)};
  }
  BlockResult<std::vector<std::uint64_t>> table = co_await read_bitmap_table(entry);
  if (!table) co_return table.error();
  std::vector<std::uint8_t> bits(data_bytes, 0);
  std::vector<std::byte> cluster(cs);
  for (std::uint64_t i = 0; i < entries; ++i) {
    const std::uint64_t e = table.value()[i];
    const std::uint64_t offset = e & kBitmapTableOffsetMask;
    const std::uint64_t at = i * cs;
    const std::uint64_t n = std::min(cs, data_bytes - at);
    if (offset == 0) {
      if (e & kBitmapTableAllOnes) std::fill_n(bits.begin() + at, n, std::uint8_t{0xff});
      continue;
    }
    const int result = co_await read_aligned(*file_, offset, std::span(cluster));
    if (result < 0) {
      co_return errno_error(result,
                            fmt::format("Could not read bitmap '{}' from image", entry.name));
    }
    std::memcpy(bits.data() + at, cluster.data(), n);
  }
  clear_tail(bits, image_size, entry.granularity_bits);
  co_return bits;
}

coro::Task<BlockError> Qcow2Node::write_bitmap_data(StoredBitmap& bitmap) {
  const std::uint64_t cs = cluster_size();
  const std::uint64_t image_size = size();
  BitmapEntry& entry = bitmap.entry;
  if (BlockError e = check_new_bitmap(entry.name, entry.granularity(), cs, image_size); !e.ok()) {
    co_return BlockError{e.error, fmt::format("Bitmap '{}' doesn't satisfy the constraints: {}",
                                              entry.name, e.message)};
  }
  std::vector<std::uint8_t>& bits = *bitmap.bits;
  const std::uint64_t data_bytes = bitmap_data_bytes(image_size, entry.granularity_bits);
  bits.resize(data_bytes, 0);
  clear_tail(bits, image_size, entry.granularity_bits);
  const std::uint64_t entries = bitmap_table_entries(image_size, entry.granularity_bits, cs);
  std::vector<std::uint64_t> table(entries, 0);
  std::vector<std::byte> cluster(cs);
  for (std::uint64_t i = 0; i < entries; ++i) {
    const std::uint64_t at = i * cs;
    const std::uint64_t n = std::min(cs, data_bytes - at);
    const auto first = bits.begin() + static_cast<std::ptrdiff_t>(at);
    if (std::all_of(first, first + static_cast<std::ptrdiff_t>(n),
                    [](std::uint8_t b) { return b == 0; })) {
      continue;  // reads as zeros: no cluster
    }
    std::uint64_t offset = 0;
    int result = co_await allocate_clusters(1, offset, /*flush_mutex_held=*/true);
    if (result < 0) {
      co_return errno_error(result,
                            fmt::format("Failed to allocate clusters for bitmap '{}'", entry.name));
    }
    std::fill(cluster.begin(), cluster.end(), std::byte{0});
    std::memcpy(cluster.data(), bits.data() + at, n);
    result = co_await file_->write(offset, std::span<const std::byte>(cluster), 0);
    if (result < 0) {
      co_return errno_error(result, fmt::format("Failed to write bitmap '{}' to file", entry.name));
    }
    table[i] = offset;
  }
  const std::uint64_t table_clusters = (entries * 8 + cs - 1) / cs;
  std::uint64_t table_offset = 0;
  int result = co_await allocate_clusters(table_clusters, table_offset, /*flush_mutex_held=*/true);
  if (result < 0) {
    co_return errno_error(result,
                          fmt::format("Failed to allocate clusters for bitmap '{}'", entry.name));
  }
  std::vector<std::byte> raw(table_clusters * cs, std::byte{0});
  for (std::uint64_t i = 0; i < entries; ++i) base::store_be64(raw.data() + i * 8, table[i]);
  result = co_await file_->write(table_offset, std::span<const std::byte>(raw), 0);
  if (result < 0) {
    co_return errno_error(result, fmt::format("Failed to write bitmap '{}' to file", entry.name));
  }
  entry.table_offset = table_offset;
  entry.table_size = static_cast<std::uint32_t>(entries);
  co_return BlockError{};
}

coro::Task<BlockError> Qcow2Node::store_bitmaps(std::vector<StoredBitmap> list) {
  auto guard = co_await bitmap_mutex_.scoped_lock();
  if (bitmap_state_.load(std::memory_order_acquire) == kBitmapsTracking) {
    co_return BlockError{EBUSY, "the image's bitmaps are tracking writes"};
  }
  BlockError error = co_await commit_bitmaps(std::move(list));
  // The next write starts tracking from the directory as it is now.
  if (error.ok()) bitmap_state_.store(kBitmapsUnloaded, std::memory_order_release);
  co_return error;
}

coro::Task<int> Qcow2Node::start_bitmap_tracking() {
  auto guard = co_await bitmap_mutex_.scoped_lock();
  const int state = bitmap_state_.load(std::memory_order_acquire);
  if (state == kBitmapsFailed) co_return -EIO;
  if (state != kBitmapsUnloaded) co_return 0;
  BlockResult<std::vector<BitmapEntry>> dir = co_await bitmap_directory();
  if (!dir) {
    bitmap_state_.store(kBitmapsFailed, std::memory_order_release);
    co_return -EIO;
  }
  std::uint64_t memory = 0;
  for (const BitmapEntry& e : dir.value()) {
    if (e.enabled() && !e.in_use()) memory += bitmap_data_bytes(size(), e.granularity_bits);
  }
  if (memory > kMaxBitmapMemoryBytes) {
    bitmap_state_.store(kBitmapsFailed, std::memory_order_release);
    co_return -ENOMEM;
  }
  tracker_ = BitmapTracker{};
  std::vector<StoredBitmap> list;
  bool tracked = false;
  for (const BitmapEntry& e : dir.value()) {
    StoredBitmap b{e, std::nullopt};
    if (e.enabled() && !e.in_use()) {
      BlockResult<std::vector<std::uint8_t>> bits = co_await read_bitmap_bits(e);
      if (!bits) {
        bitmap_state_.store(kBitmapsFailed, std::memory_order_release);
        co_return -EIO;
      }
      tracker_.add(e.name, e.granularity(), size(), bits.value());
      b.entry.flags |= kBitmapFlagInUse;
      tracked = true;
    }
    list.push_back(std::move(b));
  }
  if (tracked) {
    // IN_USE on disk (the header flushed) before the write that changes the guest's data.
    if (BlockError e = co_await commit_bitmaps(std::move(list)); !e.ok()) {
      bitmap_state_.store(kBitmapsFailed, std::memory_order_release);
      co_return e.error ? -e.error : -EIO;
    }
  }
  bitmap_state_.store(tracked ? kBitmapsTracking : kBitmapsNone, std::memory_order_release);
  co_return 0;
}

coro::Task<int> Qcow2Node::close() {
  const int flushed = co_await flush();
  auto guard = co_await bitmap_mutex_.scoped_lock();
  if (bitmap_state_.load(std::memory_order_acquire) != kBitmapsTracking) co_return flushed;
  BlockResult<std::vector<BitmapEntry>> dir = co_await bitmap_directory();
  if (!dir) co_return -EIO;
  std::vector<StoredBitmap> list;
  for (const BitmapEntry& e : dir.value()) {
    StoredBitmap b{e, std::nullopt};
    for (std::size_t i = 0; i < tracker_.count(); ++i) {
      if (tracker_.name(i) != e.name) continue;
      b.bits = tracker_.serialize(i);
      b.entry.flags &= ~kBitmapFlagInUse;
    }
    list.push_back(std::move(b));
  }
  const BlockError error = co_await commit_bitmaps(std::move(list));
  bitmap_state_.store(kBitmapsNone, std::memory_order_release);
  if (!error.ok()) co_return error.error ? -error.error : -EIO;
  co_return flushed;
}

coro::Task<int> Qcow2Node::truncate(std::uint64_t new_size) {
  bool has_bitmaps = false;
  {
    std::lock_guard lock(meta_mutex_);
    has_bitmaps = header_.bitmaps.has_value();
  }
  if (read_only_ || !has_bitmaps || new_size == size() || new_size % 512 != 0) {
    co_return co_await resize_image(new_size);
  }
  auto guard = co_await bitmap_mutex_.scoped_lock();
  BlockResult<std::vector<BitmapEntry>> dir = co_await bitmap_directory();
  if (!dir) co_return -EIO;
  // Every consistent bitmap's bits now (the tracked ones from memory), and the directory
  // with all of them in use while the size changes.
  const bool tracking = bitmap_state_.load(std::memory_order_acquire) == kBitmapsTracking;
  std::vector<StoredBitmap> bits, in_use;
  for (const BitmapEntry& e : dir.value()) {
    StoredBitmap b{e, std::nullopt};
    if (!e.in_use() || tracking) {
      for (std::size_t i = 0; tracking && i < tracker_.count(); ++i) {
        if (tracker_.name(i) == e.name) b.bits = tracker_.serialize(i);
      }
      if (!b.bits && !e.in_use()) {
        BlockResult<std::vector<std::uint8_t>> read = co_await read_bitmap_bits(e);
        if (!read) co_return -EIO;
        b.bits = std::move(read).value();
      }
    }
    if (b.bits) b.entry.flags &= ~kBitmapFlagInUse;
    StoredBitmap marked{b.entry, std::nullopt};
    if (b.bits) marked.entry.flags |= kBitmapFlagInUse;
    bits.push_back(std::move(b));
    in_use.push_back(std::move(marked));
  }
  if (BlockError e = co_await commit_bitmaps(std::move(in_use)); !e.ok()) {
    co_return e.error ? -e.error : -EIO;
  }
  bitmap_state_.store(kBitmapsUnloaded, std::memory_order_release);
  const int resized = co_await resize_image(new_size);
  // Stored at the size the image has now (resized or not); write_bitmap_data() sizes them.
  const BlockError stored = co_await commit_bitmaps(std::move(bits));
  if (resized < 0) co_return resized;
  if (!stored.ok()) co_return stored.error ? -stored.error : -EIO;
  co_return 0;
}

coro::Task<BlockError> Qcow2Node::commit_bitmaps(std::vector<StoredBitmap> list) {
  if (read_only_) co_return BlockError{EROFS, "No write access"};
  if (refuses_writes()) co_return BlockError{EIO, "the image is corrupt"};
  auto guard = co_await flush_mutex_.scoped_lock();
  const std::uint64_t cs = cluster_size();
  std::uint32_t version = 0;
  std::optional<BitmapsExtension> old_ext;
  {
    std::lock_guard lock(meta_mutex_);
    version = header_.version;
    old_ext = header_.bitmaps;
  }
  if (version < 3 && !list.empty()) {
    co_return BlockError{ENOTSUP, "Cannot store dirty bitmaps in qcow2 v2 files"};
  }
  BlockResult<std::vector<BitmapEntry>> old = co_await read_bitmap_directory_locked();
  if (!old) co_return old.error();

  // New data first; a failure leaves the image as it was (plus leaked clusters).
  std::unordered_set<std::uint64_t> kept_tables;
  for (StoredBitmap& b : list) {
    b.entry.type = kBitmapTypeDirty;
    if (b.bits) {
      if (BlockError e = co_await write_bitmap_data(b); !e.ok()) co_return e;
      continue;
    }
    auto it = std::find_if(old.value().begin(), old.value().end(),
                           [&](const BitmapEntry& e) { return e.name == b.entry.name; });
    if (it == old.value().end()) {
      co_return BlockError{EINVAL, fmt::format("Dirty bitmap '{}' not found", b.entry.name)};
    }
    b.entry.table_offset = it->table_offset;
    b.entry.table_size = it->table_size;
    b.entry.granularity_bits = it->granularity_bits;
    kept_tables.insert(it->table_offset);
  }
  std::vector<BitmapEntry> entries;
  for (const StoredBitmap& b : list) entries.push_back(b.entry);

  std::optional<BitmapsExtension> new_ext;
  if (!entries.empty()) {
    BlockResult<std::vector<std::byte>> encoded = encode_bitmap_directory(entries, cs, size());
    if (!encoded) co_return encoded.error();
    std::vector<std::byte> dir = std::move(encoded).value();
    const std::uint64_t dir_size = dir.size();
    const std::uint64_t clusters = (dir_size + cs - 1) / cs;
    std::uint64_t offset = 0;
    int result = co_await allocate_clusters(clusters, offset, /*flush_mutex_held=*/true);
    if (result < 0) co_return errno_error(result, "Failed to allocate the bitmap directory");
    dir.resize(clusters * cs, std::byte{0});
    result = co_await file_->write(offset, std::span<const std::byte>(dir), 0);
    if (result < 0) co_return errno_error(result, "Failed to write the bitmap directory");
    new_ext = BitmapsExtension{static_cast<std::uint32_t>(entries.size()), dir_size, offset};
  }

  // The clusters the old directory and its dropped tables hold, found before the switch.
  std::vector<std::uint64_t> frees;
  if (old_ext && old_ext->nb_bitmaps > 0) {
    const std::uint64_t first = old_ext->bitmap_directory_offset / cs;
    const std::uint64_t last =
        (old_ext->bitmap_directory_offset + old_ext->bitmap_directory_size - 1) / cs;
    for (std::uint64_t c = first; c <= last; ++c) frees.push_back(c * cs);
    for (const BitmapEntry& e : old.value()) {
      if (kept_tables.count(e.table_offset)) continue;
      BlockResult<std::vector<std::uint64_t>> table = co_await read_bitmap_table(e);
      if (!table) continue;  // a bad table is left leaked, never freed on a guess
      for (std::uint64_t t : table.value()) {
        if (t & kBitmapTableOffsetMask) frees.push_back(t & kBitmapTableOffsetMask);
      }
      const std::uint64_t bytes = std::uint64_t{e.table_size} * 8;
      for (std::uint64_t c = e.table_offset / cs; c <= (e.table_offset + bytes - 1) / cs; ++c) {
        frees.push_back(c * cs);
      }
    }
  }

  int result = co_await write_back_locked();
  if (result < 0) co_return errno_error(result, "cannot write qcow2 metadata");
  {
    std::lock_guard lock(meta_mutex_);
    header_.bitmaps = new_ext;
    if (new_ext) {
      header_.autoclear_features |= kAutoclearBitmaps;
    } else {
      header_.autoclear_features &= ~kAutoclearBitmaps;
    }
  }
  result = co_await write_header_cluster();
  if (result >= 0) result = co_await file_->flush();
  if (result < 0) {
    broken_.store(true, std::memory_order_release);
    co_return errno_error(result, "Failed to update bitmap extension");
  }
  if (!frees.empty()) {
    std::lock_guard lock(meta_mutex_);
    pending_frees_.insert(pending_frees_.end(), frees.begin(), frees.end());
  }
  result = co_await write_back_locked();
  if (result < 0) co_return errno_error(result, "cannot write qcow2 metadata");
  co_return BlockError{};
}

}  // namespace spindle::block::qcow2
