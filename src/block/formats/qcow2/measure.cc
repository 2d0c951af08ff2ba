#include "block/formats/qcow2/measure.h"

#include <algorithm>
#include <cerrno>
#include <string>

#include <fmt/format.h>

#include "block/formats/qcow2/create.h"
#include "block/formats/qcow2/format.h"

namespace spindle::block::qcow2 {

namespace {

constexpr std::uint64_t kMaxL1Bytes = 32ull << 20;  // QEMU's QCOW_MAX_L1_SIZE
constexpr std::uint64_t kNormalEntryBytes = 8, kExtendedEntryBytes = 16;

// What qemu-img measure takes from the -o options.
struct MeasureOptions {
  std::uint32_t cluster_bits = 16;
  std::uint32_t version = 3;
  std::uint32_t refcount_order = 4;
  bool extended_l2 = false;
  bool preallocated_data = false;  // preallocation=falloc or full
  bool backing_file = false;
};

BlockError invalid(std::string message) { return BlockError{EINVAL, std::move(message)}; }

// An option qemu's option parser refuses before the driver sees it: qemu-img adds a line.
BlockError unparsable(std::string message) {
  return invalid(std::move(message) + "\nInvalid options for file format 'qcow2'");
}

const std::string* find(const CreateRequest& request, const char* key) {
  auto it = request.options.find(key);
  return it == request.options.end() ? nullptr : &it->second;
}

BlockResult<MeasureOptions> parse_measure_options(const CreateRequest& request) {
  static const char* const kKnown[] = {
      "size",          "compat",         "backing_file",  "backing_fmt",     "data_file",
      "data_file_raw", "encryption",     "cluster_size",  "extended_l2",     "preallocation",
      "lazy_refcounts", "refcount_bits", "compression_type"};
  for (const auto& option : request.options) {
    const std::string& key = option.first;
    if (key.rfind("encrypt.", 0) == 0) {
      return BlockError{ENOTSUP, "measuring encrypted qcow2 images is not supported"};
    }
    if (std::none_of(std::begin(kKnown), std::end(kKnown),
                     [&](const char* known) { return key == known; })) {
      return unparsable(fmt::format("Invalid parameter '{}'", key));
    }
  }
  // The option parser's type checks, for every option, before any of the driver's checks.
  for (const char* key : {"data_file_raw", "encryption", "extended_l2", "lazy_refcounts"}) {
    if (const std::string* v = find(request, key); v && !parse_option_bool(*v)) {
      return unparsable(fmt::format("Parameter '{}' expects 'on' or 'off'", key));
    }
  }
  std::optional<std::uint64_t> cluster_size = 65536;
  if (const std::string* v = find(request, "cluster_size")) {
    cluster_size = parse_option_size(*v);
    if (!cluster_size) {
      return unparsable("Parameter 'cluster_size' expects a non-negative number below 2^64");
    }
  }
  std::optional<std::uint64_t> refcount_bits = 16;
  if (const std::string* v = find(request, "refcount_bits")) {
    refcount_bits = parse_option_size(*v);
    if (!refcount_bits || v->find_first_not_of("0123456789") != std::string::npos) {
      return unparsable("Parameter 'refcount_bits' expects a number");
    }
  }

  MeasureOptions o;
  if (const std::string* v = find(request, "extended_l2")) o.extended_l2 = *parse_option_bool(*v);
  const std::uint64_t cs = *cluster_size;
  if (cs < 512 || cs > (2u << 20) || (cs & (cs - 1))) {
    return invalid("Cluster size must be a power of two between 512 and 2048k");
  }
  if (o.extended_l2 && cs < 16384) {
    return invalid("Extended L2 entries are only supported with cluster sizes of at least "
                   "16384 bytes");
  }
  o.cluster_bits = static_cast<std::uint32_t>(__builtin_ctzll(cs));
  if (const std::string* v = find(request, "compat")) {
    // (measure takes only these two spellings; create takes v2 and v3 as well)
    if (*v != "0.10" && *v != "1.1") {
      return invalid(fmt::format("Invalid compatibility level: '{}'", *v));
    }
    o.version = *v == "0.10" ? 2 : 3;
  }
  const std::uint64_t bits = *refcount_bits;
  if (bits == 0 || bits > 64 || (bits & (bits - 1))) {
    return invalid("Refcount width must be a power of two and may not exceed 64 bits");
  }
  if (o.version < 3 && bits != 16) {
    return invalid("Different refcount widths than 16 bits require compatibility level 1.1 or "
                   "above (use compat=1.1 or greater)");
  }
  o.refcount_order = static_cast<std::uint32_t>(__builtin_ctzll(bits));
  if (const std::string* v = find(request, "preallocation")) {
    if (*v != "off" && *v != "metadata" && *v != "falloc" && *v != "full") {
      return invalid(fmt::format("invalid parameter value: {}", *v));
    }
    o.preallocated_data = *v == "falloc" || *v == "full";
  }
  o.backing_file = find(request, "backing_file") != nullptr;
  return o;
}

// The file size of an image of `aligned_size` (whole clusters) with every cluster allocated:
// QEMU's qcow2_calc_prealloc_size.
std::uint64_t fully_allocated_size(std::uint64_t aligned_size, const MeasureOptions& o) {
  const std::uint64_t cs = std::uint64_t{1} << o.cluster_bits;
  const std::uint64_t entry_bytes = o.extended_l2 ? kExtendedEntryBytes : kNormalEntryBytes;
  auto round_up = [](std::uint64_t n, std::uint64_t unit) { return (n + unit - 1) / unit * unit; };
  std::uint64_t metadata = cs;  // the header cluster
  const std::uint64_t l2_entries = round_up(aligned_size / cs, cs / entry_bytes);
  metadata += l2_entries * entry_bytes;
  const std::uint64_t l1_entries = round_up(l2_entries * entry_bytes / cs, cs / 8);
  metadata += l1_entries * 8;
  const RefcountMetadata refcounts =
      refcount_metadata((metadata + aligned_size) / cs, o.cluster_bits, o.refcount_order, false);
  metadata += (refcounts.blocks + refcounts.table_clusters) * cs;
  return metadata + aligned_size;
}

// The clusters the persistent bitmaps take in an image of `size` with clusters of `cs`: each
// bitmap's data clusters and table, and the directory (QEMU's
// qcow2_get_persistent_dirty_bitmap_size).
std::uint64_t bitmaps_size(const std::vector<PersistentBitmap>& bitmaps, std::uint64_t size,
                           std::uint64_t cs) {
  auto round_up = [](std::uint64_t n, std::uint64_t unit) { return (n + unit - 1) / unit * unit; };
  std::uint64_t total = 0, directory = 0;
  for (const PersistentBitmap& bitmap : bitmaps) {
    const std::uint64_t bits = (size + bitmap.granularity - 1) / bitmap.granularity;
    const std::uint64_t clusters = (bits + cs * 8 - 1) / (cs * 8);
    total += clusters * cs + round_up(clusters * 8, cs);
    directory += round_up(24 + bitmap.name.size(), 8);  // an entry without extra data
  }
  return total + round_up(directory, cs);
}

}  // namespace

BlockResult<std::uint64_t> measure_cluster_size(const CreateRequest& request) {
  BlockResult<MeasureOptions> options = parse_measure_options(request);
  if (!options) return options.error();
  return std::uint64_t{1} << options.value().cluster_bits;
}

BlockResult<SizeMeasurement> measure_size(const CreateRequest& request,
                                          const std::optional<MeasureSource>& source) {
  BlockResult<MeasureOptions> parsed = parse_measure_options(request);
  if (!parsed) return parsed.error();
  const MeasureOptions& o = parsed.value();
  const std::uint64_t cs = std::uint64_t{1} << o.cluster_bits;
  const std::uint64_t size = source ? source->size : request.size;
  if (size > static_cast<std::uint64_t>(INT64_MAX) - cs) {
    return invalid("The image size is too large (try using a larger cluster size)");
  }
  const std::uint64_t aligned = (size + cs - 1) / cs * cs;
  const std::uint64_t entry_bytes = o.extended_l2 ? kExtendedEntryBytes : kNormalEntryBytes;
  const std::uint64_t per_table = cs / entry_bytes;
  const std::uint64_t l2_tables = (aligned / cs + per_table - 1) / per_table;
  if (!source && l2_tables > kMaxL1Bytes / 8) {  // qemu checks the --size value only
    return invalid("The image size is too large (try using a larger cluster size)");
  }
  // Data clusters a copy writes: with a backing file named, all of them (the backing file may
  // share nothing with the source).
  std::uint64_t data = 0;
  if (o.preallocated_data || (source && o.backing_file)) {
    data = aligned;
  } else if (source) {
    data = std::min(source->data_bytes, aligned);
  }
  SizeMeasurement m;
  m.fully_allocated = fully_allocated_size(aligned, o);
  m.required = m.fully_allocated - aligned + data;
  if (o.version >= 3 && source && source->keeps_bitmaps) {
    m.bitmaps = bitmaps_size(source->bitmaps, size, cs);
  }
  return m;
}

}  // namespace spindle::block::qcow2
