#include "block/formats/qcow2/bitmap_directory.h"

#include <fmt/format.h>

#include <cerrno>
#include <set>

#include "base/byte_order.h"

namespace spindle::block::qcow2 {

namespace {

std::uint64_t entry_bytes(std::uint64_t name_size, std::uint64_t extra_size) noexcept {
  return (kBitmapEntryFixedBytes + name_size + extra_size + 7) & ~std::uint64_t{7};
}

BlockError invalid(std::string message) {
  return {EINVAL, std::move(message)};
}

}  // namespace

std::uint64_t bitmap_data_bytes(std::uint64_t image_size, std::uint32_t granularity_bits) noexcept {
  const std::uint64_t granularity = std::uint64_t{1} << granularity_bits;
  const std::uint64_t bits = image_size / granularity + (image_size % granularity != 0);
  return bits / 8 + (bits % 8 != 0);
}

std::uint64_t bitmap_table_entries(std::uint64_t image_size, std::uint32_t granularity_bits,
                                   std::uint64_t cluster_size) noexcept {
  const std::uint64_t bytes = bitmap_data_bytes(image_size, granularity_bits);
  return bytes / cluster_size + (bytes % cluster_size != 0);
}

BlockError check_bitmap_entry(const BitmapEntry& e, std::uint64_t cluster_size,
                              std::uint64_t image_size) {
  const bool bad =
      e.table_size == 0 || e.table_offset == 0 || e.table_offset % cluster_size != 0 ||
      e.table_size > kMaxBitmapTableEntries || e.granularity_bits > kMaxBitmapGranularityBits ||
      e.granularity_bits < kMinBitmapGranularityBits || (e.flags & kBitmapReservedFlags) ||
      e.name.size() > kMaxBitmapNameBytes || e.type != kBitmapTypeDirty;
  const std::uint64_t data_bytes = std::uint64_t{e.table_size} * cluster_size;
  // data_bytes <= 512 MiB, so the bit count fits after shifting by at most 31.
  const bool too_small = !bad && data_bytes <= kMaxBitmapDataBytes && !e.in_use() &&
                         image_size > ((data_bytes * 8) << e.granularity_bits);
  if (bad || data_bytes > kMaxBitmapDataBytes || too_small) {
    return invalid(fmt::format("Bitmap '{}' doesn't satisfy the constraints", e.name));
  }
  return {};
}

bool valid_bitmap_table_entry(std::uint64_t entry, std::uint64_t cluster_size) noexcept {
  if (entry & kBitmapTableReservedMask) return false;
  const std::uint64_t offset = entry & kBitmapTableOffsetMask;
  if (offset != 0 && ((entry & kBitmapTableAllOnes) || offset % cluster_size != 0)) return false;
  return true;
}

BlockResult<std::vector<BitmapEntry>> decode_bitmap_directory(std::span<const std::byte> bytes,
                                                              std::uint32_t count,
                                                              std::uint64_t cluster_size,
                                                              std::uint64_t image_size) {
  if (bytes.empty()) return invalid("Requested bitmap directory size is zero");
  if (bytes.size() > kMaxBitmapDirectoryBytes) {
    return invalid("Requested bitmap directory size is too big");
  }
  std::vector<BitmapEntry> list;
  std::uint64_t at = 0;
  while (at < bytes.size()) {
    if (bytes.size() - at < kBitmapEntryFixedBytes) return invalid("Broken bitmap directory");
    if (list.size() + 1 > count) {
      return invalid("More bitmaps found than specified in header extension");
    }
    const std::byte* p = bytes.data() + at;
    BitmapEntry e;
    e.table_offset = base::load_be64(p);
    e.table_size = base::load_be32(p + 8);
    e.flags = base::load_be32(p + 12);
    e.type = static_cast<std::uint8_t>(p[16]);
    e.granularity_bits = static_cast<std::uint8_t>(p[17]);
    const std::uint16_t name_size = base::load_be16(p + 18);
    const std::uint32_t extra_size = base::load_be32(p + 20);
    const std::uint64_t size = entry_bytes(name_size, extra_size);
    if (size > bytes.size() - at) return invalid("Broken bitmap directory");
    if (extra_size != 0) return invalid("Bitmap extra data is not supported");
    e.name.assign(reinterpret_cast<const char*>(p + kBitmapEntryFixedBytes), name_size);
    if (BlockError error = check_bitmap_entry(e, cluster_size, image_size); !error.ok()) {
      return error;
    }
    list.push_back(std::move(e));
    at += size;
  }
  if (list.size() != count) return invalid("Less bitmaps found than specified in header extension");
  return list;
}

BlockResult<std::vector<std::byte>> encode_bitmap_directory(const std::vector<BitmapEntry>& list,
                                                            std::uint64_t cluster_size,
                                                            std::uint64_t image_size) {
  if (list.empty()) return invalid("no bitmaps to write");
  if (list.size() > kMaxBitmapCount) return invalid("Too many persistent bitmaps");
  std::uint64_t total = 0;
  std::set<std::string> names;
  for (const BitmapEntry& e : list) {
    if (e.name.empty()) return invalid("Bitmap name cannot be empty");
    if (!names.insert(e.name).second) {
      return invalid(fmt::format("Bitmap already exists: {}", e.name));
    }
    if (BlockError error = check_bitmap_entry(e, cluster_size, image_size); !error.ok()) {
      return error;
    }
    total += entry_bytes(e.name.size(), 0);
  }
  if (total > kMaxBitmapDirectoryBytes) return invalid("Bitmap directory is too large");
  std::vector<std::byte> out(total, std::byte{0});
  std::uint64_t at = 0;
  for (const BitmapEntry& e : list) {
    std::byte* p = out.data() + at;
    base::store_be64(p, e.table_offset);
    base::store_be32(p + 8, e.table_size);
    base::store_be32(p + 12, e.flags);
    p[16] = static_cast<std::byte>(e.type);
    p[17] = static_cast<std::byte>(e.granularity_bits);
    base::store_be16(p + 18, static_cast<std::uint16_t>(e.name.size()));
    base::store_be32(p + 20, 0);
    for (std::size_t i = 0; i < e.name.size(); ++i) {
      p[kBitmapEntryFixedBytes + i] = static_cast<std::byte>(e.name[i]);
    }
    at += entry_bytes(e.name.size(), 0);
  }
  return out;
}

BlockError check_new_bitmap(const std::string& name, std::uint64_t granularity,
                            std::uint64_t cluster_size, std::uint64_t image_size) {
  std::uint32_t bits = 0;
  while (bits < 64 && (std::uint64_t{1} << bits) < granularity) ++bits;
  if (bits > kMaxBitmapGranularityBits) {
    return invalid(fmt::format("Granularity exceeds maximum ({} bytes)",
                               std::uint64_t{1} << kMaxBitmapGranularityBits));
  }
  if (bits < kMinBitmapGranularityBits) {
    return invalid(fmt::format("Granularity is under minimum ({} bytes)",
                               std::uint64_t{1} << kMinBitmapGranularityBits));
  }
  const std::uint64_t bytes = bitmap_data_bytes(image_size, bits);
  if (bytes > kMaxBitmapDataBytes || bytes > std::uint64_t{kMaxBitmapTableEntries} * cluster_size) {
    return invalid("Too much space will be occupied by the bitmap. Use larger granularity");
  }
  if (name.size() > kMaxBitmapNameBytes) {
    return invalid(fmt::format("Name length exceeds maximum ({} characters)", kMaxBitmapNameBytes));
  }
  return {};
}

}  // namespace spindle::block::qcow2
