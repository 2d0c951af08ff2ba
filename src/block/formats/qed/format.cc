#include "block/formats/qed/format.h"

#include <fmt/format.h>

#include <bit>
#include <cerrno>
#include <limits>

#include "base/byte_order.h"

namespace spindle::block::qed {

Header decode_header(std::span<const std::byte> bytes) noexcept {
  const std::byte* p = bytes.data();
  Header h;
  h.magic = base::load_le32(p + 0);
  h.cluster_size = base::load_le32(p + 4);
  h.table_size = base::load_le32(p + 8);
  h.header_size = base::load_le32(p + 12);
  h.features = base::load_le64(p + 16);
  h.compat_features = base::load_le64(p + 24);
  h.autoclear_features = base::load_le64(p + 32);
  h.l1_table_offset = base::load_le64(p + 40);
  h.image_size = base::load_le64(p + 48);
  h.backing_filename_offset = base::load_le32(p + 56);
  h.backing_filename_size = base::load_le32(p + 60);
  return h;
}

void encode_header(const Header& h, std::span<std::byte> bytes) noexcept {
  std::byte* p = bytes.data();
  base::store_le32(p + 0, h.magic);
  base::store_le32(p + 4, h.cluster_size);
  base::store_le32(p + 8, h.table_size);
  base::store_le32(p + 12, h.header_size);
  base::store_le64(p + 16, h.features);
  base::store_le64(p + 24, h.compat_features);
  base::store_le64(p + 32, h.autoclear_features);
  base::store_le64(p + 40, h.l1_table_offset);
  base::store_le64(p + 48, h.image_size);
  base::store_le32(p + 56, h.backing_filename_offset);
  base::store_le32(p + 60, h.backing_filename_size);
}

Geometry Geometry::make(std::uint32_t cluster_size, std::uint32_t table_size) noexcept {
  Geometry g;
  g.cluster_size = cluster_size;
  g.table_size = table_size;
  g.table_bytes = std::uint64_t{cluster_size} * table_size;
  g.table_entries = g.table_bytes / 8;
  g.cluster_bits = static_cast<unsigned>(std::countr_zero(cluster_size));
  g.table_bits = static_cast<unsigned>(std::countr_zero(g.table_entries));
  g.l1_shift = g.cluster_bits + g.table_bits;
  // entries^2 * cluster_size = 2^(2*table_bits + cluster_bits); QEMU's version overflows
  // (reference/qed.md §5.1-B), ours saturates.
  const unsigned bits = 2 * g.table_bits + g.cluster_bits;
  g.max_image_size = bits >= 64 ? std::numeric_limits<std::uint64_t>::max() : (std::uint64_t{1} << bits);
  return g;
}

std::uint64_t Geometry::l2_end(std::uint64_t pos) const noexcept {
  const std::uint64_t index = l1_index(pos) + 1;
  if (l1_shift >= 64 || index > (std::numeric_limits<std::uint64_t>::max() >> l1_shift)) {
    return std::numeric_limits<std::uint64_t>::max();
  }
  return index << l1_shift;
}

bool is_image_size_valid(const Geometry& geometry, std::uint64_t image_size) noexcept {
  return image_size % 512 == 0 && image_size <= geometry.max_image_size;
}

bool is_cluster_offset_valid(const Header& header, std::uint64_t file_size,
                             std::uint64_t offset) noexcept {
  const std::uint64_t header_end = std::uint64_t{header.header_size} * header.cluster_size;
  // cluster_size is a power of two (validate_header checks it first).
  return (offset & (header.cluster_size - 1)) == 0 && offset >= header_end && offset < file_size;
}

bool is_table_offset_valid(const Header& header, std::uint64_t file_size,
                           std::uint64_t offset) noexcept {
  const std::uint64_t span = std::uint64_t{header.table_size - 1} * header.cluster_size;
  if (offset > std::numeric_limits<std::uint64_t>::max() - span) return false;
  return is_cluster_offset_valid(header, file_size, offset) &&
         is_cluster_offset_valid(header, file_size, offset + span);
}

BlockError validate_header(const Header& h, std::uint64_t child_size) noexcept {
  if (h.magic != kMagic) return {EINVAL, "not a QED image (bad magic)"};
  if (h.features & ~kKnownFeatures) {
    return {ENOTSUP, fmt::format("Unsupported QED features: {:#x}", h.features & ~kKnownFeatures)};
  }
  if (!is_power_of_two(h.cluster_size) || h.cluster_size < kMinClusterSize ||
      h.cluster_size > kMaxClusterSize) {
    return {EINVAL, fmt::format("invalid QED cluster size {} (a power of two in [{}, {}])",
                                h.cluster_size, kMinClusterSize, kMaxClusterSize)};
  }
  if (!is_power_of_two(h.table_size) || h.table_size < kMinTableSize ||
      h.table_size > kMaxTableSize) {
    return {EINVAL, fmt::format("invalid QED table size {} (a power of two in [{}, {}])",
                                h.table_size, kMinTableSize, kMaxTableSize)};
  }
  const Geometry g = Geometry::make(h.cluster_size, h.table_size);
  if (!is_image_size_valid(g, h.image_size)) {
    return {EINVAL, fmt::format("invalid QED image size {} (a multiple of 512, at most {})",
                                h.image_size, g.max_image_size)};
  }
  if (h.header_size == 0 || h.header_size > std::numeric_limits<std::uint32_t>::max() / h.cluster_size) {
    return {EINVAL, fmt::format("invalid QED header size {} clusters", h.header_size)};
  }
  const std::uint64_t file_size = child_size - child_size % h.cluster_size;
  if (!is_table_offset_valid(h, file_size, h.l1_table_offset)) {
    return {EINVAL, fmt::format("QED L1 table offset {:#x} is invalid (file size {})",
                                h.l1_table_offset, child_size)};
  }
  if (h.features & kFeatureBackingFile) {
    const std::uint64_t end =
        std::uint64_t{h.backing_filename_offset} + h.backing_filename_size;
    const std::uint64_t header_end = std::uint64_t{h.header_size} * h.cluster_size;
    if (end > header_end) {
      return {EINVAL, fmt::format("QED backing file name ({} bytes at {}) lies outside the "
                                  "{}-byte header area",
                                  h.backing_filename_size, h.backing_filename_offset, header_end)};
    }
    if (h.backing_filename_size > kMaxBackingNameBytes) {
      return {EINVAL, fmt::format("QED backing file name is too long ({} bytes)",
                                  h.backing_filename_size)};
    }
    if (h.backing_filename_size == 0) return {EINVAL, "QED backing file name is empty"};
  }
  return {};
}

}  // namespace spindle::block::qed
