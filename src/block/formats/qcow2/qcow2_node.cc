#include "block/formats/qcow2/qcow2_node.h"

#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <cstring>
#include <limits>
#include <utility>

#include "aio/context.h"
#include "aio/thread_pool.h"
#include "base/byte_order.h"
#include "base/io_buffer.h"
#include "block/formats/qcow2/check.h"
#include "block/formats/qcow2/compression.h"
#include "coro/run_blocking.h"

namespace spindle::block::qcow2 {

namespace {

// The data file of an image opened for its metadata only, when that file cannot be opened:
// every I/O fails.
class MissingDataFile final : public BlockNode {
 public:
  const char* driver_name() const noexcept override { return "file"; }
  std::uint64_t size() const noexcept override { return 0; }
  coro::Task<int> read(std::uint64_t, std::span<std::byte>, std::uint32_t) override {
    co_return -EIO;
  }
  coro::Task<int> write(std::uint64_t, std::span<const std::byte>, std::uint32_t) override {
    co_return -EIO;
  }
  coro::Task<int> flush() override { co_return -EIO; }
  coro::Task<int> write_zeroes(std::uint64_t, std::uint64_t, std::uint32_t) override {
    co_return -EIO;
  }
  coro::Task<int> discard(std::uint64_t, std::uint64_t) override { co_return -EIO; }
};

constexpr std::uint64_t kMaxDefaultL2CacheBytes = 32ull << 20;  // QEMU on Linux
constexpr std::uint64_t kAllSubclustersAllocated = 0x00000000ffffffffull;
constexpr std::uint64_t kAllSubclustersZero = 0xffffffff00000000ull;

BlockError io_error(int result, const char* what) {
  return {-result, fmt::format("{}: {}", what, std::strerror(-result))};
}

// "1048576", "512k", "2M", "1G" (QEMU's size suffixes, powers of 1024).
bool parse_size(const std::string& text, std::uint64_t& value) {
  if (text.empty() || !std::isdigit(static_cast<unsigned char>(text[0]))) return false;
  std::size_t used = 0;
  unsigned long long number = 0;
  try {
    number = std::stoull(text, &used, 10);
  } catch (...) {
    return false;
  }
  unsigned shift = 0;
  if (used < text.size()) {
    if (used + 1 != text.size()) return false;
    switch (std::tolower(static_cast<unsigned char>(text[used]))) {
      case 'b': shift = 0; break;
      case 'k': shift = 10; break;
      case 'm': shift = 20; break;
      case 'g': shift = 30; break;
      case 't': shift = 40; break;
      default: return false;
    }
  }
  if (number > (std::numeric_limits<std::uint64_t>::max() >> shift)) return false;
  value = std::uint64_t{number} << shift;
  return true;
}

std::vector<std::byte> encode_entries(const std::vector<std::uint64_t>& entries) {
  std::vector<std::byte> bytes(entries.size() * 8);
  for (std::size_t i = 0; i < entries.size(); ++i) base::store_be64(bytes.data() + i * 8, entries[i]);
  return bytes;
}

std::vector<std::uint64_t> decode_entries(std::span<const std::byte> bytes) {
  std::vector<std::uint64_t> entries(bytes.size() / 8);
  for (std::size_t i = 0; i < entries.size(); ++i) entries[i] = base::load_be64(bytes.data() + i * 8);
  return entries;
}

}  // namespace

// ---- open -----------------------------------------------------------------------------------

Qcow2Node::Qcow2Node(Private, BlockNodeRef file, Header header, std::vector<std::uint64_t> l1,
                     std::vector<std::uint64_t> rctable, bool read_only, std::size_t l2_tables,
                     std::size_t refcount_tables)
    : file_(std::move(file)),
      data_(file_),
      read_only_(read_only),
      l2_entries_(header.l2_entries()),
      refcount_entries_(header.refcount_block_entries()),
      extended_(header.extended_l2()),
      external_data_((header.incompatible_features & kIncompatDataFile) != 0),
      raw_data_(external_data_ && (header.autoclear_features & kAutoclearDataFileRaw) != 0),
      size_(header.size),
      header_(std::move(header)),
      l1_(std::move(l1)),
      l1_on_disk_(l1_),
      rctable_(std::move(rctable)),
      l2_cache_(l2_tables),
      refcount_cache_(refcount_tables) {
  const std::uint64_t cs = cluster_size();
  open_end_ = file_->size();
  next_free_ = (open_end_ + cs - 1) / cs;
  for (const std::uint64_t entry : rctable_) {
    const std::uint64_t offset = entry & kRefcountTableOffsetMask;
    if (offset != 0) refblock_clusters_.insert(offset / cs);
  }
  for (const std::uint64_t entry : l1_) {
    const std::uint64_t offset = entry & kL1OffsetMask;
    if (offset != 0) l2_clusters_.insert(offset / cs);
  }
}

Qcow2Node::~Qcow2Node() = default;

coro::Task<BlockResult<BlockNodeRef>> open_qcow2(BlockNodeRef file, FormatOpenOptions options) {
  const std::uint64_t file_size = file->size();
  if (file_size < kVersion2HeaderLength) {
    co_return BlockError{EINVAL, fmt::format("qcow2 header is truncated: the file holds {} bytes",
                                             file_size)};
  }
  std::vector<std::byte> head(std::min<std::uint64_t>(file_size, 512));
  int result = co_await Qcow2Node::read_aligned(*file, 0, std::span(head));
  if (result < 0) co_return io_error(result, "cannot read the qcow2 header");
  const std::uint32_t cluster_bits = base::load_be32(head.data() + 20);
  if (cluster_bits >= kMinClusterBits && cluster_bits <= kMaxClusterBits) {
    head.resize(std::min<std::uint64_t>(file_size, std::uint64_t{1} << cluster_bits));
    result = co_await Qcow2Node::read_aligned(*file, 0, std::span(head));
    if (result < 0) co_return io_error(result, "cannot read the qcow2 header");
  }
  BlockResult<Header> decoded = decode_header(head);
  if (!decoded.ok()) co_return decoded.error();
  Header header = std::move(decoded).value();
  if (header.crypt_method != 0) {
    co_return BlockError{ENOTSUP, fmt::format("qcow2: encrypted images are not supported ({})",
                                              header.crypt_method == 1 ? "AES" : "LUKS")};
  }
  const bool external_data = (header.incompatible_features & kIncompatDataFile) != 0;
  if (!external_data && !header.data_file.empty()) {
    co_return BlockError{EINVAL, fmt::format("qcow2: the image names a data file ('{}') without "
                                             "the external data file feature bit",
                                             header.data_file)};
  }
  if (external_data && header.data_file.empty()) {
    co_return BlockError{EINVAL, "'data-file' is required for this image"};
  }
  if (external_data && !options.open_data_file) {
    co_return BlockError{ENOTSUP, fmt::format("qcow2: the image's external data file '{}' "
                                              "cannot be opened from here",
                                              header.data_file)};
  }
  if (external_data && header.nb_snapshots != 0) {
    co_return BlockError{EINVAL, "qcow2: internal snapshots with an external data file"};
  }

  // Option keys.
  std::uint64_t l2_cache_bytes = 0;
  std::uint64_t refcount_cache_bytes = 0;
  for (const auto& [key, value] : options.options) {
    std::uint64_t* target = nullptr;
    if (key == "l2-cache-size") {
      target = &l2_cache_bytes;
    } else if (key == "refcount-cache-size") {
      target = &refcount_cache_bytes;
    } else if (key == "cache-clean-interval") {
      continue;  // accepted; clean tables are dropped only when the cache is full
    } else {
      co_return BlockError{EINVAL, fmt::format("qcow2: unknown option '{}'", key)};
    }
    if (!parse_size(value, *target)) {
      co_return BlockError{EINVAL, fmt::format("qcow2: invalid value '{}' for '{}'", value, key)};
    }
  }

  const std::uint64_t cs = header.cluster_size();
  const std::uint64_t l2_span = header.l2_entries() * cs;
  const std::uint64_t l1_needed = (header.size + l2_span - 1) / l2_span;
  if (header.l1_size < l1_needed) {
    co_return BlockError{EINVAL, fmt::format("qcow2: the L1 table has {} entries, the image size "
                                             "needs {}",
                                             header.l1_size, l1_needed)};
  }
  const std::uint64_t l1_bytes = std::uint64_t{header.l1_size} * 8;
  if (header.l1_table_offset % cs != 0 || header.l1_table_offset == 0 ||
      (header.l1_size > 0 && header.l1_table_offset + l1_bytes > file_size)) {
    co_return BlockError{EINVAL, "qcow2: the L1 table is not within the file or not cluster "
                                 "aligned"};
  }
  const std::uint64_t rct_bytes = std::uint64_t{header.refcount_table_clusters} * cs;
  if (header.refcount_table_offset % cs != 0 || header.refcount_table_offset == 0 ||
      header.refcount_table_clusters == 0 ||
      header.refcount_table_offset + rct_bytes > file_size) {
    co_return BlockError{EINVAL, "qcow2: the refcount table is not within the file or not "
                                 "cluster aligned"};
  }
  std::vector<std::byte> raw(l1_bytes);
  if (!raw.empty()) {
    result = co_await Qcow2Node::read_aligned(*file, header.l1_table_offset, std::span(raw));
    if (result < 0) co_return io_error(result, "cannot read the qcow2 L1 table");
  }
  std::vector<std::uint64_t> l1 = decode_entries(raw);
  raw.assign(rct_bytes, std::byte{0});
  result = co_await Qcow2Node::read_aligned(*file, header.refcount_table_offset, std::span(raw));
  if (result < 0) co_return io_error(result, "cannot read the qcow2 refcount table");
  std::vector<std::uint64_t> rctable = decode_entries(raw);

  const bool read_only = options.read_only || file->read_only();
  if ((header.incompatible_features & kIncompatCorrupt) && !read_only) {
    co_return BlockError{EACCES, "qcow2: Image is corrupt; cannot be opened read/write"};
  }
  if ((header.incompatible_features & kIncompatDirty) && !read_only && options.repair_if_dirty) {
    // Not closed cleanly while using lazy refcounts: rebuild the refcounts (as QEMU does on
    // open), clear the bit, and open the repaired image.
    const CheckReport report = co_await check_image(*file, header, RepairMode::kAll);
    if (report.check_errors || report.corruptions) {
      co_return BlockError{EINVAL, fmt::format("qcow2: the image is dirty and repairing its "
                                               "refcounts failed ({} corruptions, {} check "
                                               "errors left)",
                                               report.corruptions, report.check_errors)};
    }
    std::vector<std::byte> first(std::max<std::uint32_t>(512, file->limits().request_alignment));
    result = co_await Qcow2Node::read_aligned(*file, 0, std::span(first));
    if (result >= 0) {
      const std::uint64_t features = base::load_be64(first.data() + 72);
      base::store_be64(first.data() + 72, features & ~kIncompatDirty);
      result = co_await file->write(0, std::span<const std::byte>(first), 0);
    }
    if (result >= 0) result = co_await file->flush();
    if (result < 0) co_return io_error(result, "cannot mark the repaired qcow2 image clean");
    co_return co_await open_qcow2(std::move(file), std::move(options));
  }

  // QEMU's default L2 cache: enough to cover the image, at most 32 MiB.
  if (l2_cache_bytes == 0) {
    const std::uint64_t clusters = (header.size + cs - 1) / cs;
    l2_cache_bytes = std::min(kMaxDefaultL2CacheBytes, clusters * header.l2_entry_bytes());
  }
  const std::size_t l2_tables = std::max<std::uint64_t>(2, (l2_cache_bytes + cs - 1) / cs);
  const std::size_t refcount_tables =
      refcount_cache_bytes ? std::max<std::uint64_t>(4, refcount_cache_bytes / cs)
                           : std::max<std::size_t>(4, l2_tables / 4);

  auto node = std::make_shared<Qcow2Node>(Qcow2Node::Private{}, file, header, std::move(l1),
                                          std::move(rctable), read_only, l2_tables,
                                          refcount_tables);
  if (external_data) {
    BlockResult<BlockNodeRef> data = options.open_data_file(header.data_file, read_only);
    if (data.ok()) {
      node->data_ = std::move(data).value();
    } else if (options.metadata_only) {
      node->data_ = std::make_shared<MissingDataFile>();  // qemu-img info shows such images
    } else {
      co_return data.error();  // "Could not open 'NAME': why"
    }
  }

  if (!header.backing_file.empty() && !options.ignore_backing) {
    if (!options.open_backing) {
      co_return BlockError{ENOTSUP, fmt::format("qcow2 image has a backing file '{}' but no way "
                                                "to open it was given",
                                                header.backing_file)};
    }
    BlockResult<BlockNodeRef> backing =
        co_await options.open_backing(header.backing_file, header.backing_format);
    if (!backing.ok()) {
      BlockError error = backing.error();
      error.message = "Could not open backing file: " + error.message;
      co_return error;
    }
    node->backing_ = std::move(backing).value();
  }

  if (BlockError error = co_await node->validate_bitmaps(); !error.ok()) co_return error;
  constexpr std::uint64_t kKeptAutoclear = kAutoclearDataFileRaw | kAutoclearBitmaps;
  if (!read_only && header.version >= 3 && (header.autoclear_features & ~kKeptAutoclear)) {
    // Autoclear bits we do not keep up to date are cleared before the image is modified, as
    // the format requires; the bitmaps bit stays (the write hooks keep the bitmaps, see
    // Qcow2Node::close()).
    node->header_.autoclear_features &= kKeptAutoclear;
    result = co_await node->write_header_fields();
    if (result >= 0) result = co_await file->flush();
    if (result < 0) co_return io_error(result, "cannot clear qcow2 autoclear features");
  }
  co_return BlockNodeRef(std::move(node));
}

BlockLimits Qcow2Node::limits() const noexcept {
  const std::uint32_t alignment = file_->limits().request_alignment;
  return {.request_alignment = alignment > 1 ? alignment : 1, .max_transfer = 0};
}

coro::Task<int> Qcow2Node::write_header_fields() {
  std::vector<std::byte> bytes;
  {
    std::lock_guard lock(meta_mutex_);
    const Header& h = header_;
    bytes.assign(h.version >= 3 ? 96 : 72, std::byte{0});
    std::byte* p = bytes.data();
    base::store_be32(p + 0, kMagic);
    base::store_be32(p + 4, h.version);
    base::store_be64(p + 8, h.backing_file_offset);
    base::store_be32(p + 16, h.backing_file_size);
    base::store_be32(p + 20, h.cluster_bits);
    base::store_be64(p + 24, h.size);
    base::store_be32(p + 32, h.crypt_method);
    base::store_be32(p + 36, h.l1_size);
    base::store_be64(p + 40, h.l1_table_offset);
    base::store_be64(p + 48, h.refcount_table_offset);
    base::store_be32(p + 56, h.refcount_table_clusters);
    base::store_be32(p + 60, h.nb_snapshots);
    base::store_be64(p + 64, h.snapshots_offset);
    if (h.version >= 3) {
      base::store_be64(p + 72, h.incompatible_features);
      base::store_be64(p + 80, h.compatible_features);
      base::store_be64(p + 88, h.autoclear_features);
    }
  }
  const std::uint32_t alignment = file_->limits().request_alignment;
  if (alignment > 1) {
    // Read-modify-write of the first aligned block.
    std::vector<std::byte> block((bytes.size() + alignment - 1) / alignment * alignment);
    const int result = co_await file_->read(0, std::span(block), 0);
    if (result < 0) co_return result;
    std::memcpy(block.data(), bytes.data(), bytes.size());
    co_return co_await file_->write(0, std::span<const std::byte>(block), 0);
  }
  co_return co_await file_->write(0, std::span<const std::byte>(bytes), 0);
}

// ---- metadata access ------------------------------------------------------------------------

coro::Task<int> Qcow2Node::get_table(TableCache& cache, std::uint64_t offset, TableRef& out) {
  bool created = false;
  TableRef table;
  {
    std::lock_guard lock(meta_mutex_);
    table = cache.find_or_insert(offset, created);
  }
  if (created) {
    base::IoBytes bytes(cluster_size());
    const int result = co_await read_aligned(*file_, offset, std::span(bytes));
    {
      std::lock_guard lock(meta_mutex_);
      if (result < 0) {
        table->error = result;
        cache.erase(offset, table);
      } else {
        table->bytes = std::move(bytes);
        if (&cache == &l2_cache_) table->bad = bad_l2_entries(offset, *table);
      }
    }
    table->ready.set();
  } else {
    co_await table->ready.wait();
  }
  if (table->error < 0) co_return table->error;
  out = std::move(table);
  co_return 0;
}

bool Qcow2Node::is_metadata(std::uint64_t offset) const noexcept {
  const std::uint64_t cs = cluster_size();
  const std::uint64_t cluster = offset / cs;
  if (cluster == 0) return true;
  const std::uint64_t l1_first = header_.l1_table_offset / cs;
  const std::uint64_t l1_clusters = (std::uint64_t{header_.l1_size} * 8 + cs - 1) / cs;
  if (cluster >= l1_first && cluster < l1_first + l1_clusters) return true;
  const std::uint64_t rct_first = header_.refcount_table_offset / cs;
  if (cluster >= rct_first && cluster < rct_first + header_.refcount_table_clusters) return true;
  return refblock_clusters_.count(cluster) != 0 || l2_clusters_.count(cluster) != 0;
}

std::uint64_t Qcow2Node::file_end() const noexcept {
  return std::max(file_->size(), next_free_ * cluster_size());
}

std::vector<std::uint32_t> Qcow2Node::bad_l2_entries(std::uint64_t l2_offset,
                                                      const CachedTable& table) {
  // On the first load since open, an entry may not point at or past the file's end at open:
  // only tables this node changed name clusters beyond it. The finding is kept, so the entry
  // stays bad however far the file grows.
  if (auto known = known_bad_l2_.find(l2_offset); known != known_bad_l2_.end()) return known->second;
  std::vector<std::uint32_t> bad;
  const std::uint64_t step = extended_ ? 2 : 1;
  for (std::uint64_t i = 0; i < l2_entries_; ++i) {
    const std::uint64_t entry = get64(table, i * step);
    std::uint64_t host = entry & kL2OffsetMask;
    if (entry & kEntryCompressed) {
      host = decode_compressed_entry(entry, header_.cluster_bits).host_offset;
    } else if (external_data_) {
      continue;  // data clusters live in the data file, at their guest offsets
    }
    if (host != 0 && host >= open_end_) bad.push_back(static_cast<std::uint32_t>(i));
  }
  known_bad_l2_.emplace(l2_offset, bad);
  return bad;
}

std::int64_t Qcow2Node::checked_l2_offset(std::uint64_t l1_entry) noexcept {
  const std::uint64_t cs = cluster_size();
  const std::uint64_t offset = l1_entry & kL1OffsetMask;
  const std::uint64_t cluster = offset / cs;
  const std::uint64_t l1_first = header_.l1_table_offset / cs;
  const std::uint64_t l1_clusters = (std::uint64_t{header_.l1_size} * 8 + cs - 1) / cs;
  const std::uint64_t rct_first = header_.refcount_table_offset / cs;
  // Past the end of the file at open: only a table this node made may lie there.
  const bool beyond = offset + cs > open_end_ && !known_bad_l2_.count(offset);
  const bool bad = (l1_entry & kL1ReservedMask) != 0 || offset % cs != 0 || beyond ||
                   offset + cs > file_end() || cluster == 0 ||
                   (cluster >= l1_first && cluster < l1_first + l1_clusters) ||
                   (cluster >= rct_first && cluster < rct_first + header_.refcount_table_clusters) ||
                   refblock_clusters_.count(cluster) != 0;
  if (bad) {
    corrupt_.store(true, std::memory_order_release);
    return -EIO;
  }
  return static_cast<std::int64_t>(offset);
}

Qcow2Node::Unit Qcow2Node::unit_at(const CachedTable& table, std::uint64_t pos) const noexcept {
  const std::uint64_t cs = cluster_size();
  const std::uint64_t index = (pos / cs) % l2_entries_;
  const std::uint64_t cluster_start = pos - pos % cs;
  const bool extended = extended_;
  Unit unit;
  unit.entry = get64(table, extended ? index * 2 : index);
  unit.end = cluster_start + cs;
  if (!table.bad.empty() &&
      std::binary_search(table.bad.begin(), table.bad.end(), static_cast<std::uint32_t>(index))) {
    return unit;  // error
  }
  const std::uint64_t bitmap = extended ? get64(table, index * 2 + 1) : 0;
  const std::uint64_t entry = unit.entry;
  if (entry & kEntryCompressed) {
    // (an image with an external data file has no compressed clusters)
    if ((entry & kEntryCopied) || external_data_) return unit;  // error
    const CompressedExtent extent = decode_compressed_entry(entry, header_.cluster_bits);
    if (extent.host_offset < cs || extent.host_offset >= file_end()) return unit;
    unit.kind = Kind::kCompressed;
    unit.ok = true;
    return unit;
  }
  const std::uint64_t reserved = kL2ReservedMask | (extended ? kEntryZero : 0);
  if (entry & reserved) return unit;
  const std::uint64_t host = entry & kL2OffsetMask;
  const bool present = has_host(entry);
  auto valid_host = [&] {
    if (external_data_) return host % cs == 0;
    return host % cs == 0 && host < file_end() && !is_metadata(host);
  };
  if (!extended) {
    if (entry & kEntryZero) {
      if (present && !valid_host()) return unit;
      unit.kind = Kind::kZero;
      if (present) unit.host = host + pos % cs;  // space kept for it: qemu shows the offset
    } else if (!present) {
      unit.kind = Kind::kUnallocated;
    } else {
      if (!valid_host()) return unit;
      unit.kind = Kind::kData;
      unit.host = host + pos % cs;
    }
    unit.ok = true;
    return unit;
  }
  const std::uint64_t sc = cs / 32;
  const std::uint64_t sub = (pos % cs) / sc;
  const bool allocated = (bitmap >> sub) & 1;
  const bool zero = (bitmap >> (32 + sub)) & 1;
  unit.end = cluster_start + (sub + 1) * sc;
  if ((allocated && zero) || (allocated && !present)) return unit;
  if (present && !valid_host()) return unit;
  // A subcluster of an allocated cluster has its place in the host cluster whatever its bits.
  if (present) unit.host = host + pos % cs;
  if (allocated) {
    unit.kind = Kind::kData;
  } else {
    unit.kind = zero ? Kind::kZero : Kind::kUnallocated;
  }
  unit.ok = true;
  return unit;
}

int Qcow2Node::classify(const CachedTable* l2, std::uint64_t pos, std::uint64_t length,
                        Mapping& out) {
  const std::uint64_t span_end = (pos / l2_span() + 1) * l2_span();
  const std::uint64_t end = std::min(pos + length, span_end);
  out = Mapping{};
  if (l2 == nullptr) {
    out.kind = Kind::kUnallocated;
    out.bytes = end - pos;
    return 0;
  }
  const Unit first = unit_at(*l2, pos);
  if (!first.ok) {
    corrupt_.store(true, std::memory_order_release);
    return -EIO;
  }
  out.kind = first.kind;
  out.host_offset = first.host;
  out.entry = first.entry;
  std::uint64_t at = first.end;
  if (first.kind != Kind::kCompressed) {
    while (at < end) {
      const Unit next = unit_at(*l2, at);
      if (!next.ok || next.kind != first.kind) break;
      // Runs keep one host layout: contiguous space, or none (host 0).
      if (next.host != (first.host != 0 ? first.host + (at - pos) : 0)) break;
      at = next.end;
    }
  }
  out.bytes = std::min(at, end) - pos;
  return 0;
}

coro::Task<int> Qcow2Node::map_range(std::uint64_t pos, std::uint64_t length, Mapping& out) {
  std::uint64_t l2_offset = 0;
  {
    std::lock_guard lock(meta_mutex_);
    const std::uint64_t l1_index = pos / l2_span();
    const std::uint64_t entry = l1_index < l1_.size() ? l1_[l1_index] : 0;
    if ((entry & kL1OffsetMask) == 0) {
      if (entry & kL1ReservedMask) {
        corrupt_.store(true, std::memory_order_release);
        co_return -EIO;
      }
      co_return classify(nullptr, pos, length, out);
    }
    const std::int64_t checked = checked_l2_offset(entry);
    if (checked < 0) co_return -EIO;
    l2_offset = static_cast<std::uint64_t>(checked);
    if (TableRef table = l2_cache_.find(l2_offset); table && table->ready.is_set() && table->error == 0) {
      co_return classify(table.get(), pos, length, out);
    }
  }
  TableRef table;
  const int result = co_await get_table(l2_cache_, l2_offset, table);
  if (result < 0) co_return result;
  std::lock_guard lock(meta_mutex_);
  co_return classify(table.get(), pos, length, out);
}

coro::Task<void> Qcow2Node::mark_corrupt() {
  if (!corrupt_.load(std::memory_order_acquire)) co_return;
  if (read_only_ || corrupt_marked_.exchange(true)) co_return;
  // Header writes are serialised with those of refcount table growth and truncate.
  auto guard = co_await flush_mutex_.scoped_lock();
  {
    std::lock_guard lock(meta_mutex_);
    if (header_.version < 3) co_return;  // version 2 has no corrupt bit
    header_.incompatible_features |= kIncompatCorrupt;
  }
  // Only the header is written: nothing a corrupt entry points at.
  int result = co_await write_header_fields();
  if (result >= 0) result = co_await file_->flush();
  (void)result;
}

// ---- reads ----------------------------------------------------------------------------------

coro::Task<int> Qcow2Node::read_aligned(BlockNode& node, std::uint64_t offset,
                                        std::span<std::byte> buffer) {
  const std::uint64_t alignment = std::max<std::uint32_t>(1, node.limits().request_alignment);
  if (offset % alignment == 0 && buffer.size() % alignment == 0) {
    co_return co_await node.read(offset, buffer, 0);
  }
  const std::uint64_t start = offset / alignment * alignment;
  const std::uint64_t end = (offset + buffer.size() + alignment - 1) / alignment * alignment;
  base::IoBytes bounce(end - start);
  const int result = co_await node.read(start, std::span(bounce), 0);
  if (result < 0) co_return result;
  std::memcpy(buffer.data(), bounce.data() + (offset - start), buffer.size());
  co_return 0;
}

coro::Task<int> Qcow2Node::read_backing(std::uint64_t pos, std::span<std::byte> buffer) {
  std::size_t copied = 0;
  if (backing_) {
    const std::uint64_t backing_size = backing_->size();
    if (pos < backing_size) {
      copied = static_cast<std::size_t>(std::min<std::uint64_t>(buffer.size(), backing_size - pos));
      const int result = co_await read_aligned(*backing_, pos, buffer.first(copied));
      if (result < 0) co_return result;
    }
  }
  std::fill(buffer.begin() + static_cast<std::ptrdiff_t>(copied), buffer.end(), std::byte{0});
  co_return 0;
}

coro::Task<int> Qcow2Node::read_compressed(std::uint64_t entry, std::uint64_t in_cluster,
                                           std::span<std::byte> out) {
  const CompressedExtent extent = decode_compressed_entry(entry, header_.cluster_bits);
  const std::uint64_t file_size = file_->size();
  if (extent.host_offset >= file_size) co_return -EIO;
  base::IoBytes input(std::min(extent.length, file_size - extent.host_offset));
  int result = co_await read_aligned(*file_, extent.host_offset, std::span(input));
  if (result < 0) co_return result;
  base::IoBytes cluster(cluster_size());
  // On the context's thread pool: inflating a cluster takes tens of microseconds, which the
  // event loop would otherwise not spend on its other requests.
  const CompressionType type = header_.compression_type;
  result = co_await coro::run_blocking(
      aio::current_context()->thread_pool(),
      [type, &input, &cluster] { return decompress_cluster(type, input, cluster); });
  if (result < 0) co_return result;
  std::memcpy(out.data(), cluster.data() + in_cluster, out.size());
  co_return 0;
}

coro::Task<int> Qcow2Node::read(std::uint64_t offset, std::span<std::byte> buffer,
                                std::uint32_t /*flags*/) {
  // The host offsets looked up below are used after meta_mutex_ is dropped: their clusters
  // must not be reused meanwhile.
  const FreeClusterPool::Guard in_epoch = free_clusters_.enter();
  std::uint64_t done = 0;
  while (done < buffer.size()) {
    const std::uint64_t pos = offset + done;
    Mapping mapping;
    int result = co_await map_range(pos, buffer.size() - done, mapping);
    if (result < 0) {
      co_await mark_corrupt();
      co_return result;
    }
    std::span<std::byte> part = buffer.subspan(done, mapping.bytes);
    switch (mapping.kind) {
      case Kind::kZero:
        std::fill(part.begin(), part.end(), std::byte{0});
        break;
      case Kind::kUnallocated:
        result = co_await read_backing(pos, part);
        break;
      case Kind::kData:
        result = co_await read_aligned(*data_, mapping.host_offset, part);
        break;
      case Kind::kCompressed:
        result = co_await read_compressed(mapping.entry, pos % cluster_size(), part);
        break;
    }
    if (result < 0) co_return result;
    done += mapping.bytes;
  }
  co_return 0;
}

coro::Task<int> Qcow2Node::read_guest(std::uint64_t pos, std::span<std::byte> buffer) {
  const std::uint64_t image_size = size();
  const std::size_t inside =
      pos < image_size ? static_cast<std::size_t>(std::min<std::uint64_t>(buffer.size(), image_size - pos))
                       : 0;
  std::fill(buffer.begin() + static_cast<std::ptrdiff_t>(inside), buffer.end(), std::byte{0});
  if (inside == 0) co_return 0;
  co_return co_await read(pos, buffer.first(inside), 0);
}

coro::Task<BlockStatus> Qcow2Node::block_status(std::uint64_t offset, std::uint64_t bytes) {
  BlockStatus status;
  Mapping mapping;
  const int result = co_await map_range(offset, bytes, mapping);
  if (result < 0) {
    co_await mark_corrupt();
    status.error = result;
    status.bytes = std::min<std::uint64_t>(bytes, cluster_size() - offset % cluster_size());
    co_return status;
  }
  status.bytes = mapping.bytes;
  switch (mapping.kind) {
    case Kind::kUnallocated:
      status.flags = backing_ ? 0u : std::uint32_t{kStatusZero};
      break;
    case Kind::kZero:
      status.flags = kStatusZero | kStatusAllocated;
      break;
    case Kind::kData:
      status.flags = kStatusData | kStatusOffsetValid | kStatusAllocated;
      status.file_offset = mapping.host_offset;
      break;
    case Kind::kCompressed:
      status.flags = kStatusData | kStatusAllocated;
      break;
  }
  // Zero or unallocated space inside an allocated cluster (a zero cluster that kept its host
  // cluster, an extended L2 subcluster): its offset is valid, as qemu-img map shows it.
  if ((mapping.kind == Kind::kUnallocated || mapping.kind == Kind::kZero) &&
      mapping.host_offset != 0) {
    status.flags |= kStatusOffsetValid;
    status.file_offset = mapping.host_offset;
  }
  if (offset + status.bytes >= size()) status.flags |= kStatusEof;
  co_return status;
}

std::optional<HostFileRange> Qcow2Node::host_file_range(std::uint64_t offset,
                                                        std::uint64_t bytes) const noexcept {
  if (bytes == 0) return std::nullopt;
  std::uint64_t host = 0;
  {
    std::unique_lock lock(meta_mutex_, std::try_to_lock);
    if (!lock.owns_lock()) return std::nullopt;
    const std::uint64_t l1_index = offset / l2_span();
    if (l1_index >= l1_.size() || offset + bytes > (l1_index + 1) * l2_span()) return std::nullopt;
    const std::uint64_t l2_offset = l1_[l1_index] & kL1OffsetMask;
    if (l2_offset == 0 || !known_bad_l2_.count(l2_offset)) return std::nullopt;
    const TableRef table = l2_cache_.peek(l2_offset);
    if (!table || !table->ready.is_set() || table->error < 0) return std::nullopt;
    const Unit first = unit_at(*table, offset);
    if (!first.ok || first.kind != Kind::kData) return std::nullopt;
    std::uint64_t at = first.end;
    while (at < offset + bytes) {
      const Unit next = unit_at(*table, at);
      if (!next.ok || next.kind != Kind::kData || next.host != first.host + (at - offset)) {
        return std::nullopt;
      }
      at = next.end;
    }
    host = first.host;
  }
  return data_->host_file_range(host, bytes);
}

// ---- allocation -----------------------------------------------------------------------------

Qcow2Node::AllocStep Qcow2Node::try_allocate(std::uint64_t count, std::uint64_t& offset,
                                             std::uint64_t& load_offset,
                                             std::uint64_t& needed_entries,
                                             std::vector<TableRef>& pins,
                                             std::vector<std::uint64_t>* table) {
  std::vector<std::uint64_t>& rct = table ? *table : rctable_;
  const std::uint64_t per_block = refcount_entries_;
  const std::uint64_t cs = cluster_size();
  const std::uint64_t start = next_free_;
  // New refcount blocks go first, at `start`, one per range not yet covered; the clusters
  // asked for follow. Count the uncovered ranges until the count stops changing.
  std::uint64_t blocks = 0;
  std::uint64_t first_range = start / per_block;
  std::uint64_t last_range = 0;
  for (;;) {
    last_range = (start + blocks + count - 1) / per_block;
    if (last_range >= rct.size()) {
      needed_entries = last_range + 1;
      return AllocStep::kGrow;
    }
    std::uint64_t uncovered = 0;
    for (std::uint64_t r = first_range; r <= last_range; ++r) {
      uncovered += (rct[r] & kRefcountTableOffsetMask) == 0;
    }
    if (uncovered == blocks) break;
    blocks = uncovered;
  }
  std::vector<TableRef> blocks_by_range(last_range - first_range + 1);
  for (std::uint64_t r = first_range; r <= last_range; ++r) {
    const std::uint64_t block_offset = rct[r] & kRefcountTableOffsetMask;
    if (block_offset == 0) continue;
    TableRef found = refcount_cache_.find(block_offset);
    if (!found || !found->ready.is_set() || found->error < 0) {
      load_offset = block_offset;
      return AllocStep::kLoad;
    }
    blocks_by_range[r - first_range] = found;
  }
  std::uint64_t made = 0;
  for (std::uint64_t r = first_range; r <= last_range; ++r) {
    if (blocks_by_range[r - first_range]) continue;
    const std::uint64_t cluster = start + made++;
    auto block = std::make_shared<CachedTable>();
    block->bytes.assign(cs, std::byte{0});
    block->generation = 1;
    refcount_cache_.insert_ready(cluster * cs, block);
    rct[r] = cluster * cs;
    ++rctable_generation_;
    refblock_clusters_.insert(cluster);
    new_refblocks_.insert(cluster);
    blocks_by_range[r - first_range] = block;
  }
  for (std::uint64_t cluster = start; cluster < start + blocks + count; ++cluster) {
    CachedTable& block = *blocks_by_range[cluster / per_block - first_range];
    set_refcount(std::span(block.bytes), cluster % per_block, header_.refcount_order, 1);
    ++block.generation;
  }
  for (TableRef& block : blocks_by_range) pins.push_back(std::move(block));
  next_free_ = start + blocks + count;
  offset = (start + blocks) * cs;
  return AllocStep::kDone;
}

coro::Task<int> Qcow2Node::load_refcount_block(std::uint64_t offset, std::vector<TableRef>& pins) {
  {
    std::lock_guard lock(meta_mutex_);
    const std::uint64_t cs = cluster_size();
    const std::uint64_t cluster = offset / cs;
    const std::uint64_t l1_first = header_.l1_table_offset / cs;
    const std::uint64_t l1_clusters = (std::uint64_t{header_.l1_size} * 8 + cs - 1) / cs;
    const std::uint64_t rct_first = header_.refcount_table_offset / cs;
    const bool beyond = offset + cs > open_end_ && !new_refblocks_.count(cluster);
    if (offset % cs != 0 || beyond || offset + cs > file_end() || cluster == 0 ||
        (cluster >= l1_first && cluster < l1_first + l1_clusters) ||
        (cluster >= rct_first && cluster < rct_first + header_.refcount_table_clusters) ||
        l2_clusters_.count(cluster) != 0) {
      corrupt_.store(true, std::memory_order_release);
      co_return -EIO;
    }
  }
  TableRef table;
  const int result = co_await get_table(refcount_cache_, offset, table);
  if (result < 0) co_return result;
  pins.push_back(std::move(table));
  co_return 0;
}

coro::Task<int> Qcow2Node::allocate_clusters(std::uint64_t count, std::uint64_t& offset,
                                             bool flush_mutex_held) {
  std::vector<TableRef> pins;  // keeps loaded refcount blocks from being evicted meanwhile
  for (;;) {
    std::uint64_t load_offset = 0;
    std::uint64_t needed = 0;
    AllocStep step;
    {
      std::lock_guard lock(meta_mutex_);
      step = try_allocate(count, offset, load_offset, needed, pins, nullptr);
    }
    if (step == AllocStep::kDone) co_return 0;
    int result = 0;
    if (step == AllocStep::kLoad) {
      result = co_await load_refcount_block(load_offset, pins);
    } else if (flush_mutex_held) {
      result = co_await grow_refcount_table_locked(needed);
    } else {
      result = co_await grow_refcount_table(needed);
    }
    if (result < 0) co_return result;
  }
}

Qcow2Node::AllocStep Qcow2Node::try_reuse(std::uint64_t count, std::uint64_t& offset,
                                          std::uint64_t& load_offset,
                                          std::vector<TableRef>& pins) {
  const std::optional<std::uint64_t> found = free_clusters_.find(count);
  if (!found) return AllocStep::kGrow;
  const std::uint64_t first = *found;
  const std::uint64_t per_block = refcount_entries_;
  const std::uint32_t order = header_.refcount_order;
  // The refcount blocks counting the run: cached, and every count still 0 (anything else,
  // and the run is not reused).
  std::vector<TableRef> blocks;
  for (std::uint64_t range = first / per_block; range <= (first + count - 1) / per_block;
       ++range) {
    const std::uint64_t block_offset =
        range < rctable_.size() ? rctable_[range] & kRefcountTableOffsetMask : 0;
    if (block_offset == 0) {
      free_clusters_.drop(first, count);
      return AllocStep::kGrow;
    }
    TableRef block = refcount_cache_.find(block_offset);
    if (!block || !block->ready.is_set() || block->error < 0) {
      load_offset = block_offset;
      return AllocStep::kLoad;
    }
    blocks.push_back(std::move(block));
  }
  const auto block_of = [&](std::uint64_t cluster) -> CachedTable& {
    return *blocks[cluster / per_block - first / per_block];
  };
  for (std::uint64_t cluster = first; cluster < first + count; ++cluster) {
    if (get_refcount(std::span<const std::byte>(block_of(cluster).bytes), cluster % per_block,
                     order) != 0) {
      free_clusters_.drop(first, count);
      return AllocStep::kGrow;
    }
  }
  free_clusters_.take(first, count);
  for (std::uint64_t cluster = first; cluster < first + count; ++cluster) {
    CachedTable& block = block_of(cluster);
    set_refcount(std::span(block.bytes), cluster % per_block, order, 1);
    ++block.generation;
  }
  for (TableRef& block : blocks) pins.push_back(std::move(block));
  offset = first * cluster_size();
  return AllocStep::kDone;
}

coro::Task<int> Qcow2Node::allocate_data_clusters(std::uint64_t count, std::uint64_t& offset) {
  std::vector<TableRef> pins;
  for (;;) {
    std::uint64_t load_offset = 0;
    AllocStep step;
    {
      std::lock_guard lock(meta_mutex_);
      step = try_reuse(count, offset, load_offset, pins);
    }
    if (step == AllocStep::kDone) co_return 0;
    if (step == AllocStep::kGrow) co_return co_await allocate_clusters(count, offset);
    const int result = co_await load_refcount_block(load_offset, pins);
    if (result < 0) co_return result;
  }
}

coro::Task<int> Qcow2Node::grow_refcount_table(std::uint64_t min_entries) {
  auto guard = co_await flush_mutex_.scoped_lock();
  co_return co_await grow_refcount_table_locked(min_entries);
}

coro::Task<int> Qcow2Node::grow_refcount_table_locked(std::uint64_t min_entries) {
  const std::uint64_t cs = cluster_size();
  const std::uint64_t per_cluster = cs / 8;
  std::uint64_t new_entries = 0;
  std::vector<std::uint64_t> table;
  {
    std::lock_guard lock(meta_mutex_);
    if (rctable_.size() >= min_entries) co_return 0;  // another request grew it
    new_entries = std::max<std::uint64_t>(rctable_.size() * 2, min_entries * 2);
    new_entries = (new_entries + per_cluster - 1) / per_cluster * per_cluster;
    table = rctable_;
  }
  // Place the new table (and the refcount blocks it needs) at the end of the file, counted in
  // the new table, all in memory first.
  std::vector<TableRef> pins;
  std::uint64_t table_offset = 0;
  std::uint64_t table_clusters = 0;
  for (;;) {
    std::uint64_t load_offset = 0;
    std::uint64_t needed = 0;
    AllocStep step;
    {
      std::lock_guard lock(meta_mutex_);
      // Entries added by allocations since the copy was taken.
      for (std::size_t i = 0; i < rctable_.size(); ++i) table[i] = rctable_[i];
      table.resize(new_entries, 0);
      table_clusters = new_entries / per_cluster;
      step = try_allocate(table_clusters, table_offset, load_offset, needed, pins, &table);
      if (step == AllocStep::kDone) {
        // The new table is installed in memory; flush() cannot run until we are done, and the
        // header goes on naming the old table until the new one is on disk.
        rctable_ = table;
        ++rctable_generation_;
      }
    }
    if (step == AllocStep::kDone) break;
    if (step == AllocStep::kGrow) {
      new_entries = (needed * 2 + per_cluster - 1) / per_cluster * per_cluster;
      continue;
    }
    const int result = co_await load_refcount_block(load_offset, pins);
    if (result < 0) co_return result;
  }
  // Refcount blocks first (they count the new table), then the table, then the header.
  int result = co_await write_refcount_blocks();
  std::vector<std::byte> bytes;
  std::uint64_t generation = 0;
  std::uint64_t old_offset = 0;
  std::uint64_t old_clusters = 0;
  {
    std::lock_guard lock(meta_mutex_);
    bytes = encode_entries(rctable_);
    generation = rctable_generation_;
  }
  if (result >= 0) result = co_await file_->write(table_offset, std::span<const std::byte>(bytes), 0);
  if (result >= 0) result = co_await file_->flush();
  if (result >= 0) {
    std::lock_guard lock(meta_mutex_);
    old_offset = header_.refcount_table_offset;
    old_clusters = header_.refcount_table_clusters;
    header_.refcount_table_offset = table_offset;
    header_.refcount_table_clusters = static_cast<std::uint32_t>(table_clusters);
    rctable_written_ = std::max(rctable_written_, generation);
  }
  if (result >= 0) result = co_await write_header_fields();
  if (result >= 0) result = co_await file_->flush();
  if (result < 0) {
    broken_.store(true, std::memory_order_release);
    co_return result;
  }
  std::lock_guard lock(meta_mutex_);
  for (std::uint64_t i = 0; i < old_clusters; ++i) pending_frees_.push_back(old_offset + i * cs);
  co_return 0;
}

coro::Task<int> Qcow2Node::load_refcount_block_of(std::uint64_t host_offset,
                                                  std::vector<TableRef>& pins) {
  const std::uint64_t cluster = host_offset / cluster_size();
  std::uint64_t block_offset = 0;
  {
    std::lock_guard lock(meta_mutex_);
    const std::uint64_t range = cluster / refcount_entries_;
    if (range >= rctable_.size()) co_return -EIO;
    block_offset = rctable_[range] & kRefcountTableOffsetMask;
    if (block_offset == 0) co_return -EIO;
  }
  co_return co_await load_refcount_block(block_offset, pins);
}

coro::Task<int> Qcow2Node::adjust_refcount(std::uint64_t host_offset, int delta,
                                           std::uint64_t& now) {
  const std::uint64_t cluster = host_offset / cluster_size();
  std::vector<TableRef> pins;
  const int result = co_await load_refcount_block_of(host_offset, pins);
  if (result < 0) co_return result;
  std::lock_guard lock(meta_mutex_);
  CachedTable& block = *pins.back();
  const std::uint64_t index = cluster % refcount_entries_;
  const std::uint32_t order = header_.refcount_order;
  const std::uint64_t count = get_refcount(std::span<const std::byte>(block.bytes), index, order);
  if (delta < 0 && count == 0) co_return -EIO;  // the image's refcounts are wrong
  if (delta > 0 && count >= largest_refcount()) co_return -EINVAL;  // as QEMU: cannot count it
  now = delta < 0 ? count - 1 : delta > 0 ? count + 1 : count;
  if (delta != 0) {
    set_refcount(std::span(block.bytes), index, order, now);
    ++block.generation;
  }
  co_return 0;
}

coro::Task<int> Qcow2Node::release_cluster(std::uint64_t host_offset) {
  std::uint64_t now = 0;
  co_return co_await adjust_refcount(host_offset, -1, now);
}

void Qcow2Node::defer_release(std::uint64_t entry) noexcept {
  const std::uint64_t cs = cluster_size();
  if (entry & kEntryCompressed) {
    const CompressedExtent extent = decode_compressed_entry(entry, header_.cluster_bits);
    if (extent.length == 0) return;
    const std::uint64_t first = extent.host_offset / cs;
    const std::uint64_t last = (extent.host_offset + extent.length - 1) / cs;
    for (std::uint64_t c = first; c <= last; ++c) pending_frees_.push_back(c * cs);
    return;
  }
  const std::uint64_t host = entry & kL2OffsetMask;
  if (host != 0 && !external_data_) pending_data_frees_.push_back(host);  // data file: not counted
}

// ---- writes ---------------------------------------------------------------------------------

std::uint64_t Qcow2Node::claim(std::uint64_t first, std::uint64_t count, InFlightRef& wait_for) {
  std::lock_guard lock(meta_mutex_);
  std::uint64_t n = 0;
  while (n < count) {
    const auto it = in_flight_.find(first + n);
    if (it != in_flight_.end()) {
      if (n == 0) wait_for = it->second;
      break;
    }
    ++n;
  }
  if (n == 0) return 0;
  auto record = std::make_shared<InFlight>();
  for (std::uint64_t i = 0; i < n; ++i) in_flight_.emplace(first + i, record);
  return n;
}

void Qcow2Node::release_claims(std::uint64_t first, std::uint64_t count) {
  InFlightRef record;
  {
    std::lock_guard lock(meta_mutex_);
    const auto it = in_flight_.find(first);
    if (it != in_flight_.end()) record = it->second;
    for (std::uint64_t i = 0; i < count; ++i) in_flight_.erase(first + i);
  }
  if (record) record->done.set();
}

coro::Task<int> Qcow2Node::writable_l2(std::uint64_t pos, bool create, TableRef& out) {
  const std::uint64_t l1_index = pos / l2_span();
  out.reset();
  for (;;) {
    std::uint64_t l2_offset = 0;
    std::uint64_t seen = 0;  // the L1 entry as read: a new table is linked only over it
    bool shared = false;     // the table is shared with an internal snapshot (no COPIED)
    {
      std::lock_guard lock(meta_mutex_);
      if (l1_index >= l1_.size()) co_return -EINVAL;
      seen = l1_[l1_index];
      if ((seen & kL1OffsetMask) != 0) {
        const std::int64_t checked = checked_l2_offset(seen);
        if (checked < 0) co_return -EIO;
        shared = !(seen & kEntryCopied);
        l2_offset = static_cast<std::uint64_t>(checked);
      } else if (seen & kL1ReservedMask) {
        corrupt_.store(true, std::memory_order_release);
        co_return -EIO;
      }
    }
    if (l2_offset != 0 && !shared) co_return co_await get_table(l2_cache_, l2_offset, out);
    if (l2_offset == 0 && !create) co_return 0;
    // One request makes the table; the others wait for it (a cluster allocated for a table
    // that loses the race would leak: only freed data clusters are reused).
    InFlightRef maker;
    {
      std::lock_guard lock(meta_mutex_);
      const auto [it, inserted] = l2_in_making_.try_emplace(l1_index);
      if (inserted) {
        it->second = std::make_shared<InFlight>();
      } else {
        maker = it->second;
      }
    }
    if (maker) {
      co_await maker->done.wait();
      continue;
    }
    const int made = co_await make_l2(l1_index, seen, shared ? l2_offset : 0, out);
    InFlightRef record;
    {
      std::lock_guard lock(meta_mutex_);
      const auto it = l2_in_making_.find(l1_index);
      record = std::move(it->second);
      l2_in_making_.erase(it);
    }
    record->done.set();
    if (made == 1) continue;  // the L1 entry changed meanwhile: look again
    co_return made;
  }
}

coro::Task<int> Qcow2Node::make_l2(std::uint64_t l1_index, std::uint64_t seen,
                                   std::uint64_t shared_offset, TableRef& out) {
  {
    std::lock_guard lock(meta_mutex_);
    if (l1_[l1_index] != seen) co_return 1;  // linked or changed before we got here
  }
  // A new table in a new cluster: empty, or a copy of the table shared with a snapshot (its
  // entries as they are: data clusters shared with the snapshot have no COPIED and are copied
  // on write). It is written before the L1 entry naming it (write_back_locked), and a shared
  // table loses this reference only after that.
  TableRef source;
  if (shared_offset != 0) {
    const int result = co_await get_table(l2_cache_, shared_offset, source);
    if (result < 0) co_return result;
  }
  std::uint64_t host = 0;
  const int result = co_await allocate_clusters(1, host);
  if (result < 0) co_return result;
  std::lock_guard lock(meta_mutex_);
  if (l1_[l1_index] != seen) {
    // Changed meanwhile (only by something that does not take l2_in_making_, such as
    // truncate): ours was never referenced.
    pending_frees_.push_back(host);
    co_return 1;
  }
  auto table = std::make_shared<CachedTable>();
  if (source) {
    table->bytes = source->bytes;
    table->bad = source->bad;
    pending_frees_.push_back(shared_offset);
  } else {
    table->bytes.assign(cluster_size(), std::byte{0});  // made here: no bad entries
  }
  table->generation = 1;
  l2_cache_.insert_ready(host, table);
  l2_clusters_.insert(host / cluster_size());
  known_bad_l2_.emplace(host, table->bad);
  l1_[l1_index] = host | kEntryCopied;
  ++l1_generation_;
  out = std::move(table);
  co_return 0;
}

bool Qcow2Node::in_place(const CachedTable& table, std::uint64_t pos, std::uint64_t end,
                         std::uint64_t& host) const noexcept {
  const std::uint64_t cs = cluster_size();
  const std::uint64_t index = (pos / cs) % l2_entries_;
  const bool extended = extended_;
  const std::uint64_t entry = get64(table, extended ? index * 2 : index);
  if ((entry & (kEntryCompressed | kEntryZero | kL2ReservedMask)) || !(entry & kEntryCopied)) {
    return false;
  }
  if (!table.bad.empty() &&
      std::binary_search(table.bad.begin(), table.bad.end(), static_cast<std::uint32_t>(index))) {
    return false;
  }
  const std::uint64_t offset = entry & kL2OffsetMask;
  if (!has_host(entry) || offset % cs != 0) return false;
  if (!external_data_ && (offset >= file_end() || is_metadata(offset))) return false;
  if (extended) {
    const std::uint64_t bitmap = get64(table, index * 2 + 1);
    const std::uint64_t sc = cs / 32;
    const std::uint64_t cluster_start = pos - pos % cs;
    const std::uint64_t stop = std::min(end, cluster_start + cs);
    for (std::uint64_t s = (pos - cluster_start) / sc; s * sc + cluster_start < stop; ++s) {
      if (!((bitmap >> s) & 1) || ((bitmap >> (32 + s)) & 1)) return false;
    }
  }
  host = offset + pos % cs;
  return true;
}

std::uint64_t Qcow2Node::in_place_run(const CachedTable& table, std::uint64_t pos,
                                       std::uint64_t end, std::uint64_t& host) const noexcept {
  const std::uint64_t cs = cluster_size();
  if (!in_place(table, pos, end, host)) return 0;
  std::uint64_t at = pos - pos % cs + cs;
  std::uint64_t next_host = 0;
  while (at < end && in_place(table, at, end, next_host) && next_host == host + (at - pos)) {
    at += cs;
  }
  return std::min(at, end) - pos;
}

coro::Task<int> Qcow2Node::write_span(std::uint64_t pos, std::uint64_t length,
                                      std::span<const std::byte> data) {
  const std::uint64_t cs = cluster_size();
  std::uint64_t done = 0;
  while (done < length) {
    const std::uint64_t p = pos + done;
    const std::uint64_t end = pos + length;
    TableRef l2;
    int result = co_await writable_l2(p, false, l2);
    if (result < 0) co_return result;
    // In place: the longest host-contiguous run of COPIED data clusters from p.
    std::uint64_t host = 0;
    std::uint64_t run = 0;
    std::uint64_t clusters = 0;  // else: how many clusters from p need allocation
    if (l2) {
      std::lock_guard lock(meta_mutex_);
      run = in_place_run(*l2, p, end, host);
      if (run == 0) {
        // Entries that will be replaced must be valid: a corrupt one is never overwritten
        // (nor the clusters it names released).
        if (!unit_at(*l2, p).ok) {
          corrupt_.store(true, std::memory_order_release);
          co_return -EIO;
        }
        std::uint64_t at = p;
        std::uint64_t ignored = 0;
        do {
          ++clusters;
          at = at - at % cs + cs;
        } while (at < end && !in_place(*l2, at, end, ignored) && unit_at(*l2, at).ok);
      }
    } else {
      clusters = (end - 1) / cs - p / cs + 1;
    }
    if (run > 0) {
      // In place, with no claim: an allocating write of other subclusters of the same cluster
      // (extended L2) keeps its host cluster and writes only subclusters not allocated yet.
      result = co_await data_->write(host, data.subspan(done, run), 0);
      if (result < 0) co_return result;
      done += run;
      continue;
    }
    const std::uint64_t first = p / cs;
    InFlightRef wait_for;
    const std::uint64_t claimed = claim(first, clusters, wait_for);
    if (claimed == 0) {
      co_await wait_for->done.wait();
      continue;  // look again: it is probably allocated now
    }
    // Look again under the claim: the cluster may have been allocated just before.
    result = co_await writable_l2(p, true, l2);
    bool now_in_place = false;
    if (result >= 0) {
      std::lock_guard lock(meta_mutex_);
      now_in_place = in_place(*l2, p, end, host);
    }
    if (result < 0 || now_in_place) {
      release_claims(first, claimed);
      if (result < 0) co_return result;
      continue;
    }
    const std::uint64_t bytes = std::min(end, (first + claimed) * cs) - p;
    result = co_await allocate_and_write(p, bytes, data.subspan(done, bytes), l2, first, claimed);
    release_claims(first, claimed);
    if (result < 0) co_return result;
    done += bytes;
  }
  co_return 0;
}

coro::Task<int> Qcow2Node::allocate_and_write(std::uint64_t pos, std::uint64_t length,
                                              std::span<const std::byte> data, TableRef l2,
                                              std::uint64_t first_cluster,
                                              std::uint64_t clusters) {
  const std::uint64_t cs = cluster_size();
  const std::uint64_t end = pos + length;
  const bool extended = extended_;
  // What each guest cluster gets: the guest range [lo, hi) written to the host cluster (the
  // data plus copy-on-write around it), the host cluster (an existing one, or a new one), and
  // the new L2 entry and bitmap. The entries cannot change under us: we hold their claims.
  struct Piece {
    std::uint64_t lo = 0, hi = 0;
    std::uint64_t host = 0;     // host offset of the cluster (kept, or filled in once allocated)
    bool keep = false;          // extended L2: an allocated cluster written in place
    std::uint64_t bitmap = 0;   // extended L2: the new subcluster bitmap
  };
  std::vector<Piece> pieces(clusters);
  std::uint64_t fresh = 0;  // how many need a new host cluster
  {
    std::lock_guard lock(meta_mutex_);
    const CachedTable& table = *l2;
    const std::uint64_t sc = subcluster_size();
    for (std::uint64_t i = 0; i < clusters; ++i) {
      Piece& piece = pieces[i];
      const std::uint64_t cluster_start = (first_cluster + i) * cs;
      const std::uint64_t index = (first_cluster + i) % l2_entries_;
      // Entries that will be replaced must be valid: a corrupt one is never overwritten (nor
      // the clusters it names released), nor a bitmap with impossible subclusters kept.
      const Unit unit = unit_at(table, cluster_start);
      const std::uint64_t entry = get64(table, extended ? index * 2 : index);
      const std::uint64_t bitmap = extended ? get64(table, index * 2 + 1) : 0;
      const std::uint64_t old_host = entry & kL2OffsetMask;
      const bool compressed = (entry & kEntryCompressed) != 0;
      const std::uint64_t allocated = bitmap & kAllSubclustersAllocated;
      const std::uint64_t zero = bitmap >> 32;
      if (!unit.ok ||
          (extended && !compressed &&
           ((allocated & zero) != 0 || (!has_host(entry) && allocated)))) {
        corrupt_.store(true, std::memory_order_release);
        co_return -EIO;
      }
      const std::uint64_t lo = std::max(pos, cluster_start);
      const std::uint64_t hi = std::min(end, cluster_start + cs);
      // Extended L2: a cluster that is neither compressed nor shared (COPIED) keeps its host
      // cluster, and an empty (unallocated or zero) one gets a new host cluster; in both only
      // the subclusters written become allocated, each completed from its old content.
      // Anything else (standard L2; compressed or shared clusters) is copied whole to a new
      // host cluster, every subcluster allocated.
      const bool subclusters =
          extended && !compressed && (!has_host(entry) || (entry & kEntryCopied) != 0);
      if (!subclusters) {
        piece.lo = cluster_start;
        piece.hi = cluster_start + cs;
        piece.bitmap = kAllSubclustersAllocated;
        ++fresh;
        continue;
      }
      piece.keep = has_host(entry);
      piece.host = old_host;
      const std::uint64_t first_sub = (lo - cluster_start) / sc;
      const std::uint64_t last_sub = (hi - 1 - cluster_start) / sc;
      // Rounded out to whole subclusters, except at an edge whose subcluster is allocated
      // already (in place: its other bytes may be written concurrently by another request).
      piece.lo = ((allocated >> first_sub) & 1) ? lo : cluster_start + first_sub * sc;
      piece.hi = ((allocated >> last_sub) & 1) ? hi : cluster_start + (last_sub + 1) * sc;
      const std::uint64_t count = last_sub - first_sub + 1;
      const std::uint64_t touched = ((1ull << count) - 1) << first_sub;
      piece.bitmap = (allocated | touched) | ((zero & ~touched) << 32);
      if (!piece.keep) ++fresh;
    }
  }
  std::uint64_t host = 0;
  int result = 0;
  if (fresh > 0 && external_data_) {
    // The data file maps guest offsets to themselves; nothing is counted.
    for (std::uint64_t i = 0; i < clusters; ++i) {
      if (!pieces[i].keep) pieces[i].host = (first_cluster + i) * cs;
    }
  } else if (fresh > 0) {
    result = co_await allocate_data_clusters(fresh, host);
    if (result < 0) co_return result;
    std::uint64_t next = host;
    for (Piece& piece : pieces) {
      if (!piece.keep) {
        piece.host = next;
        next += cs;
      }
    }
  }
  // The pieces cover [lo, hi) without gaps (only the first and last can stop short of their
  // cluster's edges); copy-on-write fills [lo, pos) and [end, hi) from the current content
  // (backing file, zeros, the old cluster), which cannot change: we hold the claims.
  const std::uint64_t lo = pieces.front().lo;
  const std::uint64_t hi = pieces.back().hi;
  base::IoBytes buffer;
  std::span<const std::byte> source = data;
  if (lo < pos || hi > end) {
    buffer.resize(hi - lo);
    std::span<std::byte> whole(buffer);
    result = co_await read_guest(lo, whole.first(pos - lo));
    if (result >= 0) result = co_await read_guest(end, whole.subspan(end - lo));
    if (result >= 0) {
      std::memcpy(buffer.data() + (pos - lo), data.data(), length);
      source = buffer;
    }
  }
  // One write per host-contiguous run of pieces.
  for (std::uint64_t i = 0; result >= 0 && i < clusters;) {
    const std::uint64_t run_host = pieces[i].host + pieces[i].lo % cs;
    std::uint64_t run_end = pieces[i].hi;
    std::uint64_t j = i + 1;
    while (j < clusters &&
           pieces[j].host + pieces[j].lo % cs == run_host + (run_end - pieces[i].lo)) {
      run_end = pieces[j].hi;
      ++j;
    }
    result = co_await write_aligned(run_host,
                                    source.subspan(pieces[i].lo - lo, run_end - pieces[i].lo));
    i = j;
  }
  if (result < 0) {
    std::lock_guard lock(meta_mutex_);
    if (!external_data_) {
      for (std::uint64_t i = 0; i < fresh; ++i) pending_frees_.push_back(host + i * cs);
    }
    co_return result;
  }
  std::lock_guard lock(meta_mutex_);
  CachedTable& table = *l2;
  for (std::uint64_t i = 0; i < clusters; ++i) {
    const std::uint64_t index = (first_cluster + i) % l2_entries_;
    if (!pieces[i].keep) {
      defer_release(get64(table, extended ? index * 2 : index));
      put64(table, extended ? index * 2 : index, pieces[i].host | kEntryCopied);
    }
    if (extended) put64(table, index * 2 + 1, pieces[i].bitmap);
  }
  ++table.generation;
  co_return 0;
}

coro::Task<int> Qcow2Node::write_aligned(std::uint64_t offset, std::span<const std::byte> data) {
  co_return co_await data_->write(offset, data, 0);
}

coro::Task<int> Qcow2Node::write(std::uint64_t offset, std::span<const std::byte> buffer,
                                 std::uint32_t flags) {
  if (read_only_) co_return -EROFS;
  // In-place writes use a host offset after meta_mutex_ is dropped (as read() does).
  const FreeClusterPool::Guard in_epoch = free_clusters_.enter();
  if (refuses_writes()) {
    co_return -EIO;
  }
  if (bitmaps_pending()) {
    if (const int r = co_await start_bitmap_tracking(); r < 0) co_return r;
  }
  mark_dirty(offset, buffer.size());
  if (flags & kWriteCompressed) {
    const int result = co_await write_compressed(offset, buffer);
    if (result < 0) {
      co_await mark_corrupt();
      co_return result;
    }
    co_return co_await after_write(flags);
  }
  std::uint64_t done = 0;
  while (done < buffer.size()) {
    const std::uint64_t pos = offset + done;
    const std::uint64_t span_end = (pos / l2_span() + 1) * l2_span();
    const std::uint64_t length = std::min<std::uint64_t>(buffer.size() - done, span_end - pos);
    const int result = co_await write_span(pos, length, buffer.subspan(done, length));
    if (result < 0) {
      co_await mark_corrupt();
      co_return result;
    }
    done += length;
  }
  co_return co_await after_write(flags);
}

coro::Task<int> Qcow2Node::after_write(std::uint32_t flags) {
  bool full = false;
  {
    std::lock_guard lock(meta_mutex_);
    full = l2_cache_.size() > 2 * l2_cache_.capacity() ||
           refcount_cache_.size() > 2 * refcount_cache_.capacity();
  }
  if (full || (flags & kFua)) co_return co_await flush();
  co_return 0;
}

coro::Task<int> Qcow2Node::zero_or_discard(std::uint64_t first_cluster, std::uint64_t clusters,
                                           Mode mode, std::uint32_t flags) {
  const std::uint64_t cs = cluster_size();
  const bool extended = extended_;
  std::uint64_t done = 0;
  while (done < clusters) {
    const std::uint64_t cluster = first_cluster + done;
    InFlightRef wait_for;
    const std::uint64_t claimed = claim(cluster, clusters - done, wait_for);
    if (claimed == 0) {
      co_await wait_for->done.wait();
      continue;
    }
    // Zeroing needs a table only where a backing file would show through.
    const bool need_table = mode == Mode::kZero && backing_ != nullptr;
    TableRef l2;
    int result = co_await writable_l2(cluster * cs, need_table, l2);
    if (result >= 0 && l2) {
      std::lock_guard lock(meta_mutex_);
      CachedTable& table = *l2;
      for (std::uint64_t i = 0; i < claimed; ++i) {
        const std::uint64_t index = (cluster + i) % l2_entries_;
        const std::uint64_t slot = extended ? index * 2 : index;
        const std::uint64_t old = get64(table, slot);
        if (!unit_at(table, (cluster + i) * cs).ok) {
          corrupt_.store(true, std::memory_order_release);
          result = -EIO;
          break;
        }
        const bool plain = !(old & kEntryCompressed) && (old & kEntryCopied) && has_host(old);
        std::uint64_t entry = 0;
        std::uint64_t bitmap = 0;
        if (mode == Mode::kZero && plain && !(flags & kMayUnmap)) {
          entry = extended ? old : (old | kEntryZero);  // keep the host cluster
        } else {
          if (mode == Mode::kDiscard && backing_ && header_.version < 3) {
            continue;  // v2 over a backing file: nothing can hide the backing data
          }
          if (!(old & kEntryCompressed) && !has_host(old) && !(old & kEntryZero) &&
              (!extended || get64(table, slot + 1) == 0) && !backing_) {
            continue;  // unallocated without a backing file reads as zeros already
          }
          defer_release(old);
          entry = (!extended && (mode == Mode::kZero || backing_)) ? kEntryZero : 0;
        }
        if (extended) bitmap = (mode == Mode::kZero || backing_) ? kAllSubclustersZero : 0;
        put64(table, slot, entry);
        if (extended) put64(table, slot + 1, bitmap);
        ++table.generation;
      }
    }
    release_claims(cluster, claimed);
    if (result < 0) co_return result;
    done += claimed;
  }
  co_return 0;
}

coro::Task<int> Qcow2Node::zero_subclusters(std::uint64_t cluster, unsigned first,
                                            unsigned count) {
  const std::uint64_t cs = cluster_size();
  for (;;) {
    InFlightRef wait_for;
    if (claim(cluster, 1, wait_for) == 1) break;
    co_await wait_for->done.wait();
  }
  TableRef l2;
  int result = co_await writable_l2(cluster * cs, backing_ != nullptr, l2);
  int outcome = 1;  // no table and no backing file: the cluster reads as zeros already
  if (result >= 0 && l2) {
    std::lock_guard lock(meta_mutex_);
    CachedTable& table = *l2;
    const std::uint64_t slot = (cluster % l2_entries_) * 2;
    const std::uint64_t entry = get64(table, slot);
    const std::uint64_t bitmap = get64(table, slot + 1);
    if (!unit_at(table, cluster * cs).ok) {
      corrupt_.store(true, std::memory_order_release);
      result = -EIO;
    } else if ((entry & kEntryCompressed) || (has_host(entry) && !(entry & kEntryCopied))) {
      outcome = 0;  // its subclusters cannot be told apart / it is not ours alone to change
    } else {
      const std::uint64_t mask = (count >= 32 ? kAllSubclustersAllocated
                                              : (std::uint64_t{1} << count) - 1) << first;
      put64(table, slot + 1, (bitmap & ~mask) | (mask << 32));
      ++table.generation;
    }
  }
  release_claims(cluster, 1);
  co_return result < 0 ? result : outcome;
}

coro::Task<int> Qcow2Node::zero_in_cluster(std::uint64_t offset, std::uint64_t bytes,
                                           std::uint32_t flags) {
  if (!extended_) co_return co_await BlockNode::write_zeroes(offset, bytes, flags & ~kFua);
  const std::uint64_t cs = cluster_size(), sc = subcluster_size();
  const std::uint64_t end = offset + bytes;
  std::uint64_t first = (offset + sc - 1) / sc * sc;
  std::uint64_t last = std::max(first, end / sc * sc);
  // A subcluster the range only partly covers that reads as zeros already may be zeroed
  // whole, as qemu does (then nothing is written there).
  auto reads_as_zeros = [this, sc](std::uint64_t start) -> coro::Task<bool> {
    const BlockStatus status = co_await block_status(start, sc);
    co_return status.error == 0 && (status.flags & kStatusZero) && status.bytes >= sc;
  };
  if (offset < first) {
    const bool zeros = co_await reads_as_zeros(first - sc);
    if (zeros) first -= sc;
  }
  if (last < end && last / cs == offset / cs) {
    const bool zeros = co_await reads_as_zeros(last);
    if (zeros) last += sc;
  }
  if (first < last) {
    const int done = co_await zero_subclusters(
        offset / cs, static_cast<unsigned>(first % cs / sc),
        static_cast<unsigned>((last - first) / sc));
    if (done < 0) co_return done;
    if (done == 1) {
      int result = 0;
      if (offset < first) {
        result = co_await BlockNode::write_zeroes(offset, first - offset, flags & ~kFua);
      }
      if (result >= 0 && last < end) {
        result = co_await BlockNode::write_zeroes(last, end - last, flags & ~kFua);
      }
      co_return result;
    }
  }
  co_return co_await BlockNode::write_zeroes(offset, bytes, flags & ~kFua);
}

coro::Task<int> Qcow2Node::write_zeroes(std::uint64_t offset, std::uint64_t bytes,
                                        std::uint32_t flags) {
  if (read_only_) co_return -EROFS;
  const FreeClusterPool::Guard in_epoch = free_clusters_.enter();  // as write()
  if (refuses_writes()) {
    co_return -EIO;
  }
  if (bitmaps_pending()) {
    if (const int r = co_await start_bitmap_tracking(); r < 0) co_return r;
  }
  mark_dirty(offset, bytes);
  const std::uint64_t cs = cluster_size();
  const std::uint64_t end = offset + bytes;
  std::uint64_t head_end = std::min(end, (offset + cs - 1) / cs * cs);
  std::uint64_t tail_begin = std::max(head_end, end / cs * cs);
  if (end == size() && tail_begin < end) tail_begin = end;  // the image's partial last cluster
  if (header_.version < 3 || raw_data_) {
    // (a raw data file must read as the guest's view: its zeros are written there)
    if (flags & kNoFallback) co_return -ENOTSUP;
    co_return co_await BlockNode::write_zeroes(offset, bytes, flags);
  }
  if ((flags & kNoFallback) && (head_end != offset || tail_begin != end)) co_return -ENOTSUP;
  int result = 0;
  if (head_end > offset) result = co_await zero_in_cluster(offset, head_end - offset, flags);
  for (std::uint64_t pos = head_end; result >= 0 && pos < tail_begin;) {
    const std::uint64_t span_end = std::min(tail_begin, (pos / l2_span() + 1) * l2_span());
    const std::uint64_t clusters = (span_end - pos + cs - 1) / cs;
    result = co_await zero_or_discard(pos / cs, clusters, Mode::kZero, flags);
    pos = span_end;
  }
  if (result >= 0 && end > tail_begin) {
    result = co_await zero_in_cluster(tail_begin, end - tail_begin, flags);
  }
  if (result < 0) {
    co_await mark_corrupt();
    co_return result;
  }
  co_return co_await after_write(flags);
}

coro::Task<int> Qcow2Node::discard(std::uint64_t offset, std::uint64_t bytes) {
  const FreeClusterPool::Guard in_epoch = free_clusters_.enter();  // as write()
  if (read_only_) co_return -EROFS;
  if (refuses_writes()) {
    co_return -EIO;
  }
  if (bitmaps_pending()) {
    if (const int r = co_await start_bitmap_tracking(); r < 0) co_return r;
  }
  mark_dirty(offset, bytes);
  const std::uint64_t cs = cluster_size();
  const std::uint64_t end = offset + bytes;
  const std::uint64_t begin = (offset + cs - 1) / cs * cs;
  std::uint64_t stop = end / cs * cs;
  if (end == size()) stop = end;
  if (raw_data_) {
    // A raw data file must keep reading as the guest's view, its clusters mapped one to one:
    // the discarded clusters are zeroed (holes punched) there, the entries stay.
    if (begin >= stop) co_return 0;
    const int zeroed = co_await data_->write_zeroes(begin, stop - begin, kMayUnmap);
    if (zeroed < 0) co_return zeroed;
    co_return co_await after_write(0);
  }
  int result = 0;
  for (std::uint64_t pos = begin; result >= 0 && pos < stop;) {
    const std::uint64_t span_end = std::min(stop, (pos / l2_span() + 1) * l2_span());
    result = co_await zero_or_discard(pos / cs, (span_end - pos + cs - 1) / cs, Mode::kDiscard, 0);
    pos = span_end;
  }
  if (result < 0) {
    co_await mark_corrupt();
    co_return result;
  }
  co_return co_await after_write(0);
}

// ---- write-back -----------------------------------------------------------------------------

namespace {
struct Snapshot {
  std::uint64_t offset = 0;
  TableRef table;
  base::IoBytes bytes;
  std::uint64_t generation = 0;
};
}  // namespace

coro::Task<int> Qcow2Node::write_refcount_blocks() {
  std::vector<Snapshot> blocks;
  std::vector<std::byte> rct;
  std::uint64_t rct_generation = 0;
  std::uint64_t rct_offset = 0;
  {
    std::lock_guard lock(meta_mutex_);
    refcount_cache_.for_each([&](std::uint64_t offset, const TableRef& table) {
      if (table->ready.is_set() && table->error == 0 && table->dirty()) {
        blocks.push_back({offset, table, table->bytes, table->generation});
      }
    });
    // The in-memory refcount table is written where the header points, unless it has grown
    // beyond that (then grow_refcount_table() writes it).
    if (rctable_generation_ != rctable_written_ &&
        rctable_.size() * 8 == std::uint64_t{header_.refcount_table_clusters} * cluster_size()) {
      rct = encode_entries(rctable_);
      rct_generation = rctable_generation_;
      rct_offset = header_.refcount_table_offset;
    }
  }
  for (const Snapshot& block : blocks) {
    const int result = co_await file_->write(block.offset, std::span<const std::byte>(block.bytes), 0);
    if (result < 0) co_return result;
  }
  if (!rct.empty()) {
    // A refcount table entry may name a block written just now: that block first.
    int result = 0;
    if (!blocks.empty()) result = co_await file_->flush();
    if (result >= 0) result = co_await file_->write(rct_offset, std::span<const std::byte>(rct), 0);
    if (result < 0) co_return result;
  }
  std::lock_guard lock(meta_mutex_);
  for (const Snapshot& block : blocks) block.table->written = std::max(block.table->written, block.generation);
  if (!rct.empty()) rctable_written_ = std::max(rctable_written_, rct_generation);
  co_return 0;
}

coro::Task<int> Qcow2Node::write_back_locked() {
  // Data before the L2 entries naming it: the data file is flushed before any table is
  // written (the image file's own data is ordered by the flushes below).
  if (external_data_) {
    const int flushed = co_await data_->flush();
    if (flushed < 0) co_return flushed;
  }
  std::vector<Snapshot> tables;
  std::vector<std::byte> l1;
  std::uint64_t l1_generation = 0;
  std::uint64_t l1_offset = 0;
  std::vector<std::uint64_t> frees;
  std::vector<std::uint64_t> data_frees;
  {
    // One instant for everything: every L2 entry in this snapshot was set after its clusters
    // were counted, so the refcount blocks written next count them.
    std::lock_guard lock(meta_mutex_);
    l2_cache_.for_each([&](std::uint64_t offset, const TableRef& table) {
      if (table->ready.is_set() && table->error == 0 && table->dirty()) {
        tables.push_back({offset, table, table->bytes, table->generation});
      }
    });
    if (l1_generation_ != l1_written_) {
      l1 = encode_entries(l1_);
      l1_generation = l1_generation_;
      l1_offset = header_.l1_table_offset;
    }
    frees.swap(pending_frees_);
    data_frees.swap(pending_data_frees_);
  }
  int result = co_await write_refcount_blocks();
  if (result >= 0) result = co_await file_->flush();
  if (result < 0) co_return result;
  for (const Snapshot& table : tables) {
    result = co_await file_->write(table.offset, std::span<const std::byte>(table.bytes), 0);
    if (result < 0) co_return result;
  }
  if (!l1.empty()) {
    result = co_await file_->flush();  // the L2 tables before the L1 entries naming them
    if (result >= 0) result = co_await file_->write(l1_offset, std::span<const std::byte>(l1), 0);
    if (result < 0) co_return result;
  }
  {
    std::lock_guard lock(meta_mutex_);
    for (const Snapshot& table : tables) {
      table.table->written = std::max(table.table->written, table.generation);
    }
    if (!l1.empty() && l1_generation > l1_written_) {
      l1_written_ = l1_generation;
      l1_on_disk_ = decode_entries(l1);
    }
  }
  if (!frees.empty() || !data_frees.empty()) {
    // The tables that named these clusters no longer do, on disk: now they may be released.
    result = co_await file_->flush();
    if (result < 0) co_return result;
    for (const std::uint64_t host : frees) {
      result = co_await release_cluster(host);
      if (result < 0) co_return result;
    }
    // A data cluster nothing counts any more may hold new data once the requests that could
    // still use its old mapping are done (free_cluster_pool.h).
    for (const std::uint64_t host : data_frees) {
      std::uint64_t now = 0;
      result = co_await adjust_refcount(host, -1, now);
      if (result < 0) co_return result;
      if (now == 0) {
        std::lock_guard lock(meta_mutex_);
        free_clusters_.quarantine(host / cluster_size());
      }
    }
    result = co_await write_refcount_blocks();
    if (result < 0) co_return result;
  }
  co_return co_await file_->flush();
}

coro::Task<int> Qcow2Node::flush() {
  if (read_only_) co_return 0;
  if (broken_.load(std::memory_order_acquire)) co_return -EIO;
  auto guard = co_await flush_mutex_.scoped_lock();
  co_return co_await write_back_locked();
}

// ---- truncate -------------------------------------------------------------------------------

coro::Task<int> Qcow2Node::resize_image(std::uint64_t new_size) {
  if (read_only_) co_return -EROFS;
  if (new_size % 512 != 0) co_return -EINVAL;
  if (refuses_writes()) {
    co_return -EIO;
  }
  const std::uint64_t cs = cluster_size();
  const std::uint64_t old_size = size();
  if (new_size < old_size) {
    // Shrinking: only where nothing is allocated past the new end.
    for (std::uint64_t pos = new_size; pos < old_size;) {
      const std::uint64_t span_end = std::min(old_size, (pos / l2_span() + 1) * l2_span());
      const std::uint64_t first = (pos + cs - 1) / cs * cs;  // a cluster holding the end stays
      if (first < span_end) {
        TableRef l2;
        const int result = co_await writable_l2(first, false, l2);
        if (result < 0) co_return result;
        if (l2) {
          std::lock_guard lock(meta_mutex_);
          const bool extended = extended_;
          for (std::uint64_t at = first; at < span_end; at += cs) {
            const std::uint64_t index = (at / cs) % l2_entries_;
            const std::uint64_t entry = get64(*l2, extended ? index * 2 : index);
            const std::uint64_t bitmap = extended ? get64(*l2, index * 2 + 1) : 0;
            if (entry != 0 || bitmap != 0) co_return -ENOTSUP;
          }
        }
      }
      pos = span_end;
    }
  }
  auto guard = co_await flush_mutex_.scoped_lock();
  int result = co_await write_back_locked();
  if (result < 0) co_return result;
  const std::uint64_t needed = (new_size + l2_span() - 1) / l2_span();
  std::uint64_t old_l1_offset = 0;
  std::uint64_t old_l1_clusters = 0;
  bool relocate = false;
  {
    std::lock_guard lock(meta_mutex_);
    const std::uint64_t have_clusters = (std::uint64_t{header_.l1_size} * 8 + cs - 1) / cs;
    if (needed > l1_.size()) {
      if (needed * 8 <= have_clusters * cs && header_.l1_size > 0) {
        l1_.resize(needed, 0);
        ++l1_generation_;
        header_.l1_size = static_cast<std::uint32_t>(needed);
      } else {
        relocate = true;
        old_l1_offset = header_.l1_table_offset;
        old_l1_clusters = header_.l1_size > 0 ? have_clusters : 0;
      }
    }
  }
  if (relocate) {
    std::uint64_t offset = 0;
    const std::uint64_t clusters = (needed * 8 + cs - 1) / cs;
    result = co_await allocate_clusters(clusters, offset, /*flush_mutex_held=*/true);
    if (result < 0) co_return result;
    result = co_await write_refcount_blocks();  // they count the new table
    // The new table starts as a copy of what is on disk: entries set since then may name L2
    // tables not written yet, and reach the new table only through write_back_locked().
    std::vector<std::byte> bytes;
    {
      std::lock_guard lock(meta_mutex_);
      l1_.resize(needed, 0);
      ++l1_generation_;
      std::vector<std::uint64_t> on_disk = l1_on_disk_;
      on_disk.resize(needed, 0);
      bytes = encode_entries(on_disk);
      bytes.resize(clusters * cs, std::byte{0});
    }
    if (result >= 0) result = co_await file_->write(offset, std::span<const std::byte>(bytes), 0);
    if (result >= 0) result = co_await file_->flush();
    if (result < 0) co_return result;
    std::lock_guard lock(meta_mutex_);
    header_.l1_table_offset = offset;
    header_.l1_size = static_cast<std::uint32_t>(needed);
    l1_on_disk_.resize(needed, 0);
  }
  if (external_data_ && data_->size() < new_size) {
    result = co_await data_->truncate(new_size);  // as qemu grows the data file with the image
    if (result < 0) co_return result;
  }
  {
    std::lock_guard lock(meta_mutex_);
    header_.size = new_size;
  }
  size_.store(new_size, std::memory_order_release);
  result = co_await write_back_locked();  // an L1 table grown in place
  if (result >= 0) result = co_await write_header_fields();
  if (result >= 0) result = co_await file_->flush();
  if (result < 0) co_return result;
  if (relocate && old_l1_clusters > 0) {
    std::lock_guard lock(meta_mutex_);
    for (std::uint64_t i = 0; i < old_l1_clusters; ++i) pending_frees_.push_back(old_l1_offset + i * cs);
  }
  if (relocate) result = co_await write_back_locked();
  co_return result;
}

int Qcow2Node::replace_child(std::string_view role, BlockNodeRef child) {
  if (role == "file") return -ENOTSUP;
  if (role != "backing") return -ENOENT;
  backing_ = std::move(child);
  return 0;
}

}  // namespace spindle::block::qcow2
