// QED on-disk format (reference/qed.md §1): the 64-byte little-endian header, its constants and
// feature bits, decoding/encoding, the geometry derived from it (shifts, masks, maximum size,
// computed without overflow), offset validity rules, and header validation at open.
//
// Thread-safety: pure values and functions; callable from any thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>

#include "block/block_error.h"

namespace spindle::block::qed {

inline constexpr std::uint32_t kMagic = 0x00444551;  // 'Q' 'E' 'D' '\0' read as u32 LE
inline constexpr std::size_t kHeaderBytes = 64;
inline constexpr std::uint32_t kMinClusterSize = 4096;
inline constexpr std::uint32_t kMaxClusterSize = 64u << 20;
inline constexpr std::uint32_t kDefaultClusterSize = 65536;
inline constexpr std::uint32_t kMinTableSize = 1;
inline constexpr std::uint32_t kMaxTableSize = 16;
inline constexpr std::uint32_t kDefaultTableSize = 4;
inline constexpr std::uint64_t kMaxBackingNameBytes = 4095;  // QEMU's PATH_MAX buffer less the NUL

// Incompatible feature bits.
inline constexpr std::uint64_t kFeatureBackingFile = 0x01;
inline constexpr std::uint64_t kFeatureNeedCheck = 0x02;
inline constexpr std::uint64_t kFeatureBackingFormatNoProbe = 0x04;
inline constexpr std::uint64_t kKnownFeatures = 0x07;
inline constexpr std::uint64_t kKnownCompatFeatures = 0;
inline constexpr std::uint64_t kKnownAutoclearFeatures = 0;

// L2 entry values with a special meaning.
inline constexpr std::uint64_t kUnallocatedEntry = 0;
inline constexpr std::uint64_t kZeroClusterEntry = 1;

struct Header {
  std::uint32_t magic = kMagic;
  std::uint32_t cluster_size = kDefaultClusterSize;
  std::uint32_t table_size = kDefaultTableSize;
  std::uint32_t header_size = 1;
  std::uint64_t features = 0;
  std::uint64_t compat_features = 0;
  std::uint64_t autoclear_features = 0;
  std::uint64_t l1_table_offset = 0;
  std::uint64_t image_size = 0;
  std::uint32_t backing_filename_offset = 0;
  std::uint32_t backing_filename_size = 0;
};

// `bytes` must hold at least kHeaderBytes.
Header decode_header(std::span<const std::byte> bytes) noexcept;
void encode_header(const Header& header, std::span<std::byte> bytes) noexcept;

constexpr bool is_power_of_two(std::uint64_t value) noexcept {
  return value != 0 && (value & (value - 1)) == 0;
}

// Derived values of a header whose cluster_size and table_size are valid.
struct Geometry {
  std::uint32_t cluster_size = 0;
  std::uint32_t table_size = 0;        // clusters per table
  std::uint64_t table_bytes = 0;       // cluster_size * table_size
  std::uint64_t table_entries = 0;     // table_bytes / 8
  unsigned cluster_bits = 0;           // log2(cluster_size)
  unsigned table_bits = 0;             // log2(table_entries)
  unsigned l1_shift = 0;               // cluster_bits + table_bits
  std::uint64_t max_image_size = 0;    // entries^2 * cluster_size, saturated at UINT64_MAX

  static Geometry make(std::uint32_t cluster_size, std::uint32_t table_size) noexcept;

  std::uint64_t l1_index(std::uint64_t pos) const noexcept { return pos >> l1_shift; }
  std::uint64_t l2_index(std::uint64_t pos) const noexcept {
    return (pos >> cluster_bits) & (table_entries - 1);
  }
  std::uint64_t in_cluster(std::uint64_t pos) const noexcept { return pos & (cluster_size - 1); }
  std::uint64_t cluster_start(std::uint64_t pos) const noexcept {
    return pos & ~std::uint64_t{cluster_size - 1};
  }
  // First guest byte past the L2 table that covers `pos` (saturated).
  std::uint64_t l2_end(std::uint64_t pos) const noexcept;
  // Clusters needed to cover `bytes` bytes.
  std::uint64_t clusters_for(std::uint64_t bytes) const noexcept {
    return (bytes >> cluster_bits) + ((bytes & (cluster_size - 1)) != 0);
  }
};

// Valid image sizes: a multiple of 512 and no more than the geometry's maximum.
bool is_image_size_valid(const Geometry& geometry, std::uint64_t image_size) noexcept;

// Offset validity against the allocated file size (a multiple of the cluster size):
// a cluster offset is cluster-aligned, past the header clusters and below `file_size`; a table
// offset has valid first and last clusters. Unlike QEMU we accept table_size = 1 (QEMU rejects
// every table offset then; reference/qed.md §5.1-A). The header's cluster_size must be a power
// of two (validate_header() checks that before any offset).
bool is_cluster_offset_valid(const Header& header, std::uint64_t file_size,
                             std::uint64_t offset) noexcept;
bool is_table_offset_valid(const Header& header, std::uint64_t file_size,
                           std::uint64_t offset) noexcept;

// Checks every header field in QEMU's order (reference/qed.md §1.4) against the child's size in
// bytes. Returns the error (errno + message) of the first violation, or success (error 0).
BlockError validate_header(const Header& header, std::uint64_t child_size) noexcept;

}  // namespace spindle::block::qed
