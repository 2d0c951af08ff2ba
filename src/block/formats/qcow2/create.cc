#include "block/formats/qcow2/create.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <map>
#include <optional>
#include <vector>

#include <fmt/format.h>

#include "base/byte_order.h"

namespace spindle::block::qcow2 {

namespace {

constexpr std::uint64_t kMaxL1Entries = (32ull << 20) / 8;  // QEMU's QCOW_MAX_L1_SIZE / 8
constexpr std::uint64_t kMaxRequestBytes = (0x7fffffffull >> 9) << 9;  // BDRV_REQUEST_MAX_BYTES
constexpr const char* kNeedV3 = "(use version=v3 or greater)";

BlockError invalid(std::string message) { return BlockError{EINVAL, std::move(message)}; }

// QEMU's size parser (qemu_strtosz): a number with an optional k/M/G/T/P/E suffix.
std::optional<std::uint64_t> parse_size(const std::string& text) {
  if (text.empty() || text[0] == '-' || text[0] == '+') return std::nullopt;
  std::size_t used = 0;
  unsigned long long value = 0;
  try {
    value = std::stoull(text, &used, 0);
  } catch (...) {
    return std::nullopt;
  }
  std::uint32_t shift = 0;
  if (used < text.size()) {
    if (used + 1 != text.size()) return std::nullopt;
    switch (text[used]) {
      case 'b': case 'B': shift = 0; break;
      case 'k': case 'K': shift = 10; break;
      case 'm': case 'M': shift = 20; break;
      case 'g': case 'G': shift = 30; break;
      case 't': case 'T': shift = 40; break;
      case 'p': case 'P': shift = 50; break;
      case 'e': case 'E': shift = 60; break;
      default: return std::nullopt;
    }
  }
  if (shift && value > (~0ull >> shift)) return std::nullopt;
  return std::uint64_t{value} << shift;
}

std::optional<bool> parse_bool(const std::string& text) {
  if (text == "on" || text == "yes" || text == "true" || text == "y") return true;
  if (text == "off" || text == "no" || text == "false" || text == "n") return false;
  return std::nullopt;
}

const std::string* find(const CreateRequest& request, const char* key) {
  auto it = request.options.find(key);
  return it == request.options.end() ? nullptr : &it->second;
}

// A model of QEMU's cluster allocator while qemu-img create builds the image: the refcount
// table (one cluster), which clusters have refcount 1, and the free-cluster cursor. It
// follows qcow2-refcount.c's rules so that refcount blocks land where QEMU puts them.
class Allocator {
 public:
  Allocator(std::uint32_t cluster_bits, std::uint32_t refcount_order)
      : cluster_bits_(cluster_bits),
        block_bits_(cluster_bits + 3 - refcount_order),
        table_((std::uint64_t{1} << cluster_bits) / 8, 0),
        table_offset_(std::uint64_t{1} << cluster_bits) {
    table_[0] = std::uint64_t{2} << cluster_bits;  // create writes refcount block 0 at cluster 2
  }

  // qcow2_alloc_clusters: n contiguous clusters at the first free place (growing the
  // refcount table as QEMU does when needed); -EFBIG past QEMU's limits.
  std::int64_t allocate(std::uint64_t n) {
    while (true) {
      const std::uint64_t start = find_free(n);
      const int r = increment(start, n);
      if (r == -EAGAIN) continue;
      if (r < 0) return r;
      return static_cast<std::int64_t>(start);
    }
  }

  // qcow2_alloc_clusters_at: as many of the n clusters from `start` as are free (maybe 0).
  std::int64_t allocate_at(std::uint64_t start, std::uint64_t n) {
    while (true) {
      const std::optional<std::uint64_t> used = first_used(start, start + n);
      const std::uint64_t count = used ? *used - start : n;
      const int r = increment(start, count);
      if (r == -EAGAIN) continue;
      if (r < 0) return r;
      return static_cast<std::int64_t>(count);
    }
  }

  const std::vector<std::uint64_t>& table() const { return table_; }
  std::uint32_t block_bits() const { return block_bits_; }
  // Clusters with refcount 1 in [first, last).
  template <typename F>
  void for_each_used(std::uint64_t first, std::uint64_t last, F&& f) const {
    auto it = used_.upper_bound(first);
    if (it != used_.begin()) --it;
    for (; it != used_.end() && it->first < last; ++it) {
      const std::uint64_t a = std::max(first, it->first);
      const std::uint64_t b = std::min(last, it->second);
      if (a < b) f(a, b);
    }
  }

 private:
  std::optional<std::uint64_t> first_used(std::uint64_t first, std::uint64_t last) const {
    std::optional<std::uint64_t> found;
    for_each_used(first, last, [&](std::uint64_t a, std::uint64_t) {
      if (!found) found = a;
    });
    return found;
  }
  std::uint64_t run_end(std::uint64_t cluster) const {
    std::uint64_t end = cluster + 1;
    for (auto it = used_.upper_bound(cluster); it != used_.begin();) {
      --it;
      if (it->first <= cluster && it->second > cluster) end = it->second;
      break;
    }
    return end;
  }
  // alloc_clusters_noref.
  std::uint64_t find_free(std::uint64_t n) {
    std::uint64_t start = free_index_;
    while (true) {
      const std::optional<std::uint64_t> used = first_used(start, start + n);
      if (!used) break;
      start = run_end(*used);
    }
    free_index_ = start + n;
    return start;
  }
  void mark(std::uint64_t first, std::uint64_t last) {
    if (first >= last) return;
    auto [it, inserted] = used_.emplace(first, last);
    if (!inserted) it->second = std::max(it->second, last);
    // Merge with the neighbours.
    if (it != used_.begin()) {
      auto prev = std::prev(it);
      if (prev->second >= it->first) {
        prev->second = std::max(prev->second, it->second);
        used_.erase(it);
        it = prev;
      }
    }
    for (auto next = std::next(it); next != used_.end() && next->first <= it->second;
         next = used_.erase(next)) {
      it->second = std::max(it->second, next->second);
    }
  }
  void unmark(std::uint64_t first, std::uint64_t last) {
    if (first >= last) return;
    std::vector<std::pair<std::uint64_t, std::uint64_t>> keep;
    for (auto it = used_.begin(); it != used_.end();) {
      if (it->second <= first || it->first >= last) {
        ++it;
        continue;
      }
      if (it->first < first) keep.emplace_back(it->first, first);
      if (it->second > last) keep.emplace_back(last, it->second);
      it = used_.erase(it);
    }
    for (auto [a, b] : keep) used_.emplace(a, b);
  }
  // update_refcount(+1) over [start, start + n), undone on failure.
  int increment(std::uint64_t start, std::uint64_t n) {
    std::uint64_t at = start;
    const std::uint64_t end = start + n;
    while (at < end) {
      const std::uint64_t block_end = ((at >> block_bits_) + 1) << block_bits_;
      const int r = ensure_block(at);
      if (r < 0) {
        unmark(start, at);
        free_index_ = std::min(free_index_, start);
        return r;
      }
      const std::uint64_t seg_end = std::min(end, block_end);
      mark(at, seg_end);
      at = seg_end;
    }
    return 0;
  }
  // alloc_refcount_block: 0 if the block exists, -EAGAIN after making it.
  int ensure_block(std::uint64_t cluster) {
    const std::uint64_t index = cluster >> block_bits_;
    if (index < table_.size() && table_[index] != 0) return 0;
    const std::uint64_t block = find_free(1);
    if ((block >> block_bits_) == index) {
      mark(block, block + 1);
    } else if (const int r = increment(block, 1); r < 0) {
      return r;
    }
    if (index < table_.size()) {
      table_[index] = block << cluster_bits_;
      return -EAGAIN;
    }
    // The refcount table must grow: new refcount blocks and a new table go at the start of
    // the first refcount block range past both `cluster` and the new block.
    const std::uint64_t per_block = std::uint64_t{1} << block_bits_;
    const std::uint64_t blocks_used = (std::max(cluster, block) + 1 + per_block - 1) / per_block;
    const int r = grow_table(blocks_used * per_block, index, block);
    return r < 0 ? r : -EAGAIN;
  }

  std::uint64_t blocks_needed(std::uint64_t clusters, bool generous) const {
    return refcount_metadata(clusters, cluster_bits_, cluster_bits_ + 3 - block_bits_, generous)
        .blocks;
  }

  int grow_table(std::uint64_t start, std::uint64_t index, std::uint64_t block) {
    const std::int64_t r = refcount_area(start, 0, false, index, block);
    return r < 0 ? static_cast<int>(r) : 0;
  }

 public:
  // QEMU's qcow2_refcount_area at `start` (a cluster index, everything from there free):
  // refcount blocks covering `additional` more clusters, then a new refcount table, all
  // counted; `block` (if not 0) hooked in at `index`; the old table freed (its bytes stay in
  // the file until something overwrites them). Returns the first cluster after the new
  // structures, or -EFBIG.
  std::int64_t refcount_area(std::uint64_t start, std::uint64_t additional, bool exact,
                             std::uint64_t index, std::uint64_t block) {
    const std::uint64_t cs = std::uint64_t{1} << cluster_bits_;
    const std::uint64_t per_block = std::uint64_t{1} << block_bits_;
    const std::uint64_t total = blocks_needed(start + additional, !exact);
    if (total > (8ull << 20)) return -EFBIG;
    const std::uint64_t area_index = start / per_block;
    std::uint64_t table_size = exact ? total : total + (total + 1) / 2;
    const std::uint64_t per_table_cluster = cs / 8;
    table_size = (table_size + per_table_cluster - 1) / per_table_cluster * per_table_cluster;
    if (table_size > (8ull << 20)) return -EFBIG;
    const std::uint64_t table_clusters = table_size / per_table_cluster;
    std::vector<std::uint64_t> table(table_size, 0);
    std::copy_n(table_.begin(), std::min<std::size_t>(table_.size(), table_size), table.begin());
    if (block) table[index] = block << cluster_bits_;
    std::uint64_t new_blocks = 0;
    for (std::uint64_t i = area_index; i < total; ++i) new_blocks += table[i] == 0;
    const std::uint64_t table_at = start + new_blocks;
    std::uint64_t next = start;
    for (std::uint64_t i = area_index; i < total; ++i) {
      if (table[i] == 0) table[i] = (next++) << cluster_bits_;
    }
    mark(start, table_at + table_clusters);
    stale_.push_back({table_offset_, table_});  // the old table's bytes
    const std::uint64_t old_first = table_offset_ >> cluster_bits_;
    const std::uint64_t old_clusters = table_.size() / per_table_cluster;
    table_ = std::move(table);
    table_offset_ = table_at << cluster_bits_;
    unmark(old_first, old_first + old_clusters);
    free_index_ = std::min(free_index_, old_first);
    return static_cast<std::int64_t>(table_at + table_clusters);
  }
  // One past the last cluster in use.
  std::uint64_t end_of_used() const { return used_.empty() ? 0 : used_.rbegin()->second; }

  std::uint64_t table_offset() const { return table_offset_; }
  // Tables that were replaced, with their content then: qemu-img leaves their bytes behind.
  const std::vector<std::pair<std::uint64_t, std::vector<std::uint64_t>>>& stale() const {
    return stale_;
  }

 private:

  std::uint32_t cluster_bits_;
  std::uint32_t block_bits_;
  std::vector<std::uint64_t> table_;
  std::map<std::uint64_t, std::uint64_t> used_;  // [first, last) clusters with refcount 1
  std::uint64_t free_index_ = 0;
  std::uint64_t table_offset_;
  std::vector<std::pair<std::uint64_t, std::vector<std::uint64_t>>> stale_;
};

struct DataRun {  // guest clusters [guest, guest + count) at host clusters from `host`
  std::uint64_t guest = 0;
  std::uint64_t host = 0;
  std::uint64_t count = 0;
};

// The new data file holds the guest's bytes: `size` of them, allocated for falloc (where the
// file system can) and written with zeros for full.
coro::Task<BlockError> size_data_file(BlockNode& data, std::uint64_t size,
                                      Preallocation preallocation) {
  auto failed = [](int r) {
    return BlockError{-r, fmt::format("Could not write the data file: {}", std::strerror(-r))};
  };
  if (int r = co_await data.truncate(0); r < 0) co_return failed(r);
  if (int r = co_await data.truncate(size); r < 0) co_return failed(r);
  if (preallocation == Preallocation::kFull) {
    std::vector<std::byte> zeros(std::min<std::uint64_t>(size, 1 << 20));
    for (std::uint64_t at = 0; at < size;) {
      const std::uint64_t n = std::min<std::uint64_t>(zeros.size(), size - at);
      if (int r = co_await data.write(at, std::span(zeros).first(n), 0); r < 0) {
        co_return failed(r);
      }
      at += n;
    }
  } else if (preallocation == Preallocation::kFalloc && size) {
    (void)co_await data.write_zeroes(0, size, 0);
  }
  if (int r = co_await data.flush(); r < 0) co_return failed(r);
  co_return BlockError{};
}

BlockError too_big() {
  return BlockError{EFBIG, "The image size is too large for file format 'qcow2' (try using a "
                           "larger cluster size)"};
}


}  // namespace

std::optional<std::uint64_t> parse_option_size(const std::string& text) { return parse_size(text); }
std::optional<bool> parse_option_bool(const std::string& text) { return parse_bool(text); }
std::optional<std::uint32_t> parse_compat(const std::string& text) {
  if (text == "0.10" || text == "v2") return 2;
  if (text == "1.1" || text == "v3") return 3;
  return std::nullopt;
}

BlockResult<CreateOptions> parse_create_options(const CreateRequest& request) {
  static const char* const kKnown[] = {
      "size",           "compat",         "backing_file", "backing_fmt", "data_file",
      "data_file_raw",  "encryption",     "encrypt.format", "cluster_size", "extended_l2",
      "preallocation",  "lazy_refcounts", "refcount_bits", "compression_type"};
  for (const auto& option : request.options) {
    const std::string& key = option.first;
    const bool known = std::any_of(std::begin(kKnown), std::end(kKnown),
                                   [&](const char* k) { return key == k; }) ||
                       key.rfind("encrypt.", 0) == 0;
    if (!known) return invalid(fmt::format("Invalid parameter '{}'", key));
  }
  CreateOptions o;
  if (find(request, "size")) return invalid("The image size must be specified only once");
  if (request.size > static_cast<std::uint64_t>(INT64_MAX) - 511) {
    return invalid("Invalid image size specified. Must be between 0 and 9223372036854775807.");
  }
  o.size = (request.size + 511) & ~std::uint64_t{511};

  if (const std::string* v = find(request, "cluster_size")) {
    const auto size = parse_size(*v);
    if (!size) {
      return invalid("Parameter 'cluster_size' expects a non-negative number below 2^64");
    }
    if (*size < 512 || *size > (2u << 20) || (*size & (*size - 1))) {
      return invalid("Cluster size must be a power of two between 512 and 2048k");
    }
    o.cluster_bits = static_cast<std::uint32_t>(__builtin_ctzll(*size));
  }
  if (const std::string* v = find(request, "compat")) {
    const std::optional<std::uint32_t> version = parse_compat(*v);
    if (!version) return invalid(fmt::format("Parameter 'version' does not accept value '{}'", *v));
    o.version = *version;
  }
  auto boolean = [&](const char* key, bool& out) -> BlockError {
    if (const std::string* v = find(request, key)) {
      const auto b = parse_bool(*v);
      if (!b) return invalid(fmt::format("Parameter '{}' expects 'on' or 'off'", key));
      out = *b;
    }
    return {};
  };
  if (BlockError e = boolean("lazy_refcounts", o.lazy_refcounts); !e.ok()) return e;
  if (BlockError e = boolean("extended_l2", o.extended_l2); !e.ok()) return e;
  if (BlockError e = boolean("data_file_raw", o.data_file_raw); !e.ok()) return e;
  bool encryption = false;
  if (BlockError e = boolean("encryption", encryption); !e.ok()) return e;

  if (const std::string* v = find(request, "preallocation")) {
    if (*v == "off") {
      o.preallocation = Preallocation::kOff;
    } else if (*v == "metadata") {
      o.preallocation = Preallocation::kMetadata;
    } else if (*v == "falloc") {
      o.preallocation = Preallocation::kFalloc;
    } else if (*v == "full") {
      o.preallocation = Preallocation::kFull;
    } else {
      return invalid(fmt::format("Parameter 'preallocation' does not accept value '{}'", *v));
    }
  }
  if (const std::string* v = find(request, "compression_type")) {
    if (*v == "zlib") {
      o.compression_type = CompressionType::kDeflate;
    } else if (*v == "zstd") {
      o.compression_type = CompressionType::kZstd;
    } else {
      return invalid(fmt::format("Parameter 'compression-type' does not accept value '{}'", *v));
    }
  }
  if (const std::string* v = find(request, "refcount_bits")) {
    const auto bits = parse_size(*v);
    if (!bits || *bits == 0 || *bits > 64 || (*bits & (*bits - 1))) {
      return invalid("Refcount width must be a power of two and may not exceed 64 bits");
    }
    o.refcount_order = static_cast<std::uint32_t>(__builtin_ctzll(*bits));
  }
  if (const std::string* v = find(request, "backing_file")) o.backing_file = *v;
  if (const std::string* v = find(request, "backing_fmt")) o.backing_format = *v;

  // QEMU's checks, in its order.
  if (encryption || find(request, "encrypt.format")) {
    return BlockError{ENOTSUP, "qcow2 encryption is not supported"};
  }
  if (o.version < 3 && o.lazy_refcounts) {
    return invalid(fmt::format("Lazy refcounts only supported with compatibility level 1.1 and "
                               "above {}", kNeedV3));
  }
  if (o.version < 3 && o.refcount_order != 4) {
    return invalid(fmt::format("Different refcount widths than 16 bits require compatibility "
                               "level 1.1 or above {}", kNeedV3));
  }
  if (o.backing_file.empty() && !o.backing_format.empty()) {
    return invalid("Backing format cannot be used without backing file");
  }
  if (!o.backing_file.empty() && o.preallocation != Preallocation::kOff && !o.extended_l2) {
    return invalid("Backing file and preallocation can only be used at the same time if "
                   "extended_l2 is on");
  }
  if (const std::string* v = find(request, "data_file"); v && !v->empty()) {
    if (o.version < 3) {
      return invalid(fmt::format("External data files are only supported with compatibility "
                                 "level 1.1 and above {}", kNeedV3));
    }
    o.data_file = *v;
  }
  if (o.data_file_raw && o.data_file.empty()) return invalid("data-file-raw requires data-file");
  if (o.data_file_raw && !o.backing_file.empty()) {
    return invalid("Backing file and data-file-raw cannot be used at the same time");
  }
  // Every cluster of a raw data file must be mapped: the L2 tables exist from the start.
  if (o.data_file_raw && o.preallocation == Preallocation::kOff) {
    o.preallocation = Preallocation::kMetadata;
  }
  if (o.extended_l2) {
    if (o.version < 3) {
      return invalid(fmt::format("Extended L2 entries are only supported with compatibility "
                                 "level 1.1 and above {}", kNeedV3));
    }
    if (o.cluster_bits < 14) {
      return invalid("Extended L2 entries are only supported with cluster sizes of at least "
                     "16384 bytes");
    }
  }
  if (o.compression_type != CompressionType::kDeflate && o.version < 3) {
    return invalid(fmt::format("Non-zlib compression type is only supported with compatibility "
                               "level 1.1 and above {}", kNeedV3));
  }
  if (!o.backing_file.empty() && o.backing_file.size() > 1023) {
    return invalid("Backing file name too long");
  }
  if (l1_entries_needed(o.size, o.cluster_bits, o.extended_l2) > kMaxL1Entries) return too_big();
  return o;
}

std::string create_summary_text(const CreateRequest& request) {
  auto text = [&](const char* key, const char* fallback) -> std::string {
    const std::string* v = find(request, key);
    return v ? *v : std::string(fallback);
  };
  auto number = [&](const char* key, std::uint64_t fallback) -> std::string {
    const std::string* v = find(request, key);
    if (!v) return std::to_string(fallback);
    const auto n = parse_size(*v);
    return n ? std::to_string(*n) : *v;
  };
  std::string out;
  auto add = [&](const char* key, const std::string& value) {
    if (!out.empty()) out += ' ';
    out += key;
    out += '=';
    out += value;
  };
  auto add_if = [&](const char* key) {
    if (const std::string* v = find(request, key)) add(key, *v);
  };
  add_if("encryption");
  add_if("encrypt.format");
  add("cluster_size", number("cluster_size", kDefaultClusterSize));
  add("extended_l2", text("extended_l2", "off"));
  add_if("preallocation");
  add("compression_type", text("compression_type", "zlib"));
  add("size", std::to_string(request.size));
  add_if("compat");
  add_if("backing_file");
  add_if("backing_fmt");
  add_if("data_file");
  add_if("data_file_raw");
  add("lazy_refcounts", text("lazy_refcounts", "off"));
  add("refcount_bits", number("refcount_bits", 16));
  return out;
}

coro::Task<BlockError> create_image(BlockNode& file, BlockNode* data, CreateOptions o) {
  const std::uint32_t cb = o.cluster_bits;
  const std::uint64_t cs = std::uint64_t{1} << cb;
  Allocator alloc(cb, o.refcount_order);
  if (alloc.allocate(3) != 0) co_return BlockError{EIO, "qcow2 create: internal allocator error"};

  Header h;
  h.version = o.version;
  h.cluster_bits = cb;
  h.size = o.size;
  h.refcount_table_offset = cs;
  h.refcount_table_clusters = 1;
  h.refcount_order = o.refcount_order;
  h.header_length = o.version == 2 ? kVersion2HeaderLength : kHeaderLength;
  if (o.version == 3) {
    if (o.lazy_refcounts) h.compatible_features |= kCompatLazyRefcounts;
    if (o.extended_l2) h.incompatible_features |= kIncompatExtendedL2;
    if (o.compression_type != CompressionType::kDeflate) {
      h.incompatible_features |= kIncompatCompression;
      h.compression_type = o.compression_type;
    }
  }
  h.backing_file = o.backing_file;
  h.backing_format = o.backing_format;
  const bool external = !o.data_file.empty();
  if (external) {
    if (!data) co_return BlockError{EINVAL, "qcow2 create: no data file was created"};
    h.data_file = o.data_file;
    h.incompatible_features |= kIncompatDataFile;
    if (o.data_file_raw) h.autoclear_features |= kAutoclearDataFileRaw;
  }

  // The L1 table (qcow2_grow_l1_table), then preallocated L2 tables and data clusters.
  const std::uint64_t l1_entries = o.size ? l1_entries_needed(o.size, cb, o.extended_l2) : 0;
  std::vector<std::uint64_t> l1(l1_entries, 0);
  std::vector<DataRun> runs;
  std::uint64_t file_end = 3 * cs;
  if (l1_entries) {
    const std::uint64_t l1_bytes = l1_entries * 8;
    const std::int64_t at = alloc.allocate((l1_bytes + cs - 1) >> cb);
    if (at < 0) co_return too_big();
    h.l1_table_offset = static_cast<std::uint64_t>(at) << cb;
    h.l1_size = static_cast<std::uint32_t>(l1_entries);
    file_end = std::max(file_end, h.l1_table_offset + l1_bytes);
  }
  if (external && o.preallocation != Preallocation::kOff && o.size) {
    // Each L2 table at the first free cluster; the data clusters are the data file's.
    const std::uint64_t l2_entries = cs / (o.extended_l2 ? 16 : 8);
    const std::uint64_t total = (o.size + cs - 1) >> cb;
    for (std::uint64_t pos = 0; pos < total; pos += l2_entries) {
      const std::int64_t l2 = alloc.allocate(1);
      if (l2 < 0) co_return too_big();
      l1[pos / l2_entries] = static_cast<std::uint64_t>(l2);
      file_end = std::max(file_end, (static_cast<std::uint64_t>(l2) + 1) << cb);
      runs.push_back({pos, pos, std::min(l2_entries, total - pos)});
    }
  } else if (o.preallocation == Preallocation::kMetadata && o.size) {
    const std::uint64_t l2_entries = cs / (o.extended_l2 ? 16 : 8);
    const std::uint64_t total = (o.size + cs - 1) >> cb;
    const std::uint64_t cap = kMaxRequestBytes >> cb;
    std::uint64_t pos = 0;
    std::optional<std::uint64_t> next_host;  // where the current request would continue
    while (pos < total) {
      const std::uint64_t region = pos / l2_entries;
      if (l1[region] == 0) {
        const std::int64_t l2 = alloc.allocate(1);
        if (l2 < 0) co_return too_big();
        l1[region] = static_cast<std::uint64_t>(l2);
        file_end = std::max(file_end, (static_cast<std::uint64_t>(l2) + 1) << cb);
      }
      const std::uint64_t want =
          std::min({l2_entries - pos % l2_entries, total - pos, cap});
      std::uint64_t host = 0;
      std::uint64_t got = 0;
      if (next_host) {
        const std::int64_t n = alloc.allocate_at(*next_host, want);
        if (n < 0) co_return too_big();
        if (n == 0) {
          next_host.reset();  // the request ends here; the next one allocates afresh
          continue;
        }
        host = *next_host;
        got = static_cast<std::uint64_t>(n);
      } else {
        const std::int64_t n = alloc.allocate(want);
        if (n < 0) co_return too_big();
        host = static_cast<std::uint64_t>(n);
        got = want;
      }
      if (!runs.empty() && runs.back().guest + runs.back().count == pos &&
          runs.back().host + runs.back().count == host && pos % l2_entries != 0) {
        runs.back().count += got;
      } else {
        runs.push_back({pos, host, got});
      }
      pos += got;
      next_host = host + got;
    }
    // qemu-img extends the file to the end of the last data cluster.
    const DataRun& last = runs.back();
    file_end = std::max(file_end, (last.host + last.count) << cb);
  }
  // falloc/full (qcow2_co_truncate): refcount structures for everything first, right after
  // what is in use; then the data clusters in one run after them; then an L2 table per L2
  // range, each at the first free cluster. The data run is fallocated or written with zeros.
  std::uint64_t data_start = 0, data_clusters = 0;
  if (!external &&
      (o.preallocation == Preallocation::kFalloc || o.preallocation == Preallocation::kFull)) {
    const std::uint64_t l2_entries = cs / (o.extended_l2 ? 16 : 8);
    data_clusters = (o.size + cs - 1) >> cb;
    const std::uint64_t l2_tables = (data_clusters + l2_entries - 1) / l2_entries + 1;
    const std::int64_t start =
        alloc.refcount_area(alloc.end_of_used(), data_clusters + l2_tables, true, 0, 0);
    if (start < 0) co_return too_big();
    data_start = static_cast<std::uint64_t>(start);
    if (alloc.allocate_at(data_start, data_clusters) != static_cast<std::int64_t>(data_clusters)) {
      co_return BlockError{EIO, "qcow2 create: internal allocator error"};
    }
    file_end = std::max(file_end, (data_start + data_clusters) << cb);
    for (std::uint64_t pos = 0; pos < data_clusters; pos += l2_entries) {
      const std::int64_t l2 = alloc.allocate(1);
      if (l2 < 0) co_return too_big();
      l1[pos / l2_entries] = static_cast<std::uint64_t>(l2);
      file_end = std::max(file_end, (static_cast<std::uint64_t>(l2) + 1) << cb);
      runs.push_back({pos, data_start + pos, std::min(l2_entries, data_clusters - pos)});
    }
  }
  for (std::uint64_t block : alloc.table()) {
    if (block) file_end = std::max(file_end, block + cs);
  }

  // Write everything out.
  h.refcount_table_offset = alloc.table_offset();
  h.refcount_table_clusters = static_cast<std::uint32_t>(alloc.table().size() * 8 / cs);
  file_end = std::max(file_end, alloc.table_offset() + alloc.table().size() * 8);
  BlockResult<std::vector<std::byte>> header = encode_header(h);
  if (!header) co_return header.error();
  std::vector<std::byte> cluster(cs);
  auto write = [&](std::uint64_t offset, std::span<const std::byte> data) -> coro::Task<int> {
    co_return co_await file.write(offset, data, 0);
  };
  auto failed = [](int r) {
    return BlockError{-r, fmt::format("Could not write qcow2 image: {}", std::strerror(-r))};
  };
  std::fill(cluster.begin(), cluster.end(), std::byte{0});
  std::memcpy(cluster.data(), header->data(), header->size());
  if (int r = co_await write(0, cluster); r < 0) co_return failed(r);

  for (const auto& [offset, entries] : alloc.stale()) {
    std::vector<std::byte> table(entries.size() * 8);
    for (std::size_t i = 0; i < entries.size(); ++i) {
      base::store_be64(table.data() + i * 8, entries[i]);
    }
    if (int r = co_await write(offset, table); r < 0) co_return failed(r);
  }
  {
    std::vector<std::byte> table(alloc.table().size() * 8);
    for (std::size_t i = 0; i < alloc.table().size(); ++i) {
      base::store_be64(table.data() + i * 8, alloc.table()[i]);
    }
    if (int r = co_await write(alloc.table_offset(), table); r < 0) co_return failed(r);
  }

  const std::uint32_t block_bits = alloc.block_bits();
  for (std::size_t i = 0; i < alloc.table().size(); ++i) {
    if (!alloc.table()[i]) continue;
    std::fill(cluster.begin(), cluster.end(), std::byte{0});
    const std::uint64_t first = std::uint64_t{i} << block_bits;
    alloc.for_each_used(first, first + (std::uint64_t{1} << block_bits),
                        [&](std::uint64_t a, std::uint64_t b) {
                          for (std::uint64_t c = a; c < b; ++c) {
                            set_refcount(cluster, c - first, o.refcount_order, 1);
                          }
                        });
    if (int r = co_await write(alloc.table()[i], cluster); r < 0) co_return failed(r);
  }

  if (l1_entries) {
    std::vector<std::byte> table(l1_entries * 8);
    for (std::size_t i = 0; i < l1.size(); ++i) {
      if (l1[i]) base::store_be64(table.data() + i * 8, (l1[i] << cb) | kEntryCopied);
    }
    if (int r = co_await write(h.l1_table_offset, table); r < 0) co_return failed(r);
  }

  if (!runs.empty()) {
    const std::uint64_t l2_entries = cs / (o.extended_l2 ? 16 : 8);
    const std::uint32_t entry_bytes = o.extended_l2 ? 16 : 8;
    std::size_t run = 0;
    for (std::size_t region = 0; region < l1.size(); ++region) {
      if (!l1[region]) continue;
      std::fill(cluster.begin(), cluster.end(), std::byte{0});
      const std::uint64_t first = region * l2_entries;
      for (; run < runs.size() && runs[run].guest < first + l2_entries; ++run) {
        for (std::uint64_t k = 0; k < runs[run].count; ++k) {
          const std::uint64_t index = runs[run].guest + k - first;
          base::store_be64(cluster.data() + index * entry_bytes,
                           ((runs[run].host + k) << cb) | kEntryCopied);
        }
      }
      if (int r = co_await write(l1[region] << cb, cluster); r < 0) co_return failed(r);
    }
  }

  if (data_clusters && o.preallocation == Preallocation::kFull) {
    // Written, as qemu-img writes them (the file holds real blocks afterwards).
    std::vector<std::byte> zeros(std::min<std::uint64_t>(data_clusters << cb, 1 << 20));
    for (std::uint64_t at = data_start << cb, end = (data_start + data_clusters) << cb; at < end;) {
      const std::uint64_t n = std::min<std::uint64_t>(zeros.size(), end - at);
      if (int r = co_await write(at, std::span(zeros).first(n)); r < 0) co_return failed(r);
      at += n;
    }
  } else if (data_clusters) {
    // falloc: reserved without writing (the file driver allocates the range where it can).
    if (file_end > file.size()) {
      if (int r = co_await file.truncate(file_end); r < 0) {
        co_return BlockError{-r, fmt::format("Could not resize qcow2 image: {}", std::strerror(-r))};
      }
    }
    (void)co_await file.write_zeroes(data_start << cb, data_clusters << cb, 0);
  }
  if (file_end > file.size()) {
    if (int r = co_await file.truncate(file_end); r < 0) {
      co_return BlockError{-r, fmt::format("Could not resize qcow2 image: {}", std::strerror(-r))};
    }
  }
  if (external) {
    BlockError error = co_await size_data_file(*data, o.size, o.preallocation);
    if (!error.ok()) co_return error;
  }
  if (int r = co_await file.flush(); r < 0) co_return failed(r);
  co_return BlockError{};
}

}  // namespace spindle::block::qcow2
