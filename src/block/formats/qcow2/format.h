// The qcow2 on-disk format (QEMU's docs/interop/qcow2.rst): the header (version 2 = compat
// 0.10, version 3 = compat 1.1), header extensions, and the bit layout of L1, L2 and
// refcount entries. Pure data and codecs: no I/O, so the fuzzer and the checker use it as is.
// All integers on disk are big-endian.
//
// decode_header() parses and validates everything that can be checked without reading past
// the header cluster: magic, version, cluster_bits (9..21), header_length, refcount_order
// (0..6), table offsets aligned to the cluster size, table sizes against QEMU's limits, the
// backing name inside the first cluster, unknown incompatible features (refused, named by the
// feature table when the image has one), encryption (refused), and the extensions' framing.
//
// Thread-safety: plain value types and pure functions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "block/block_error.h"

namespace spindle::block::qcow2 {

inline constexpr std::uint32_t kMagic = 0x514649fb;  // "QFI\xfb"
inline constexpr std::uint32_t kVersion2HeaderLength = 72;
inline constexpr std::uint32_t kVersion3HeaderLength = 104;  // without compression_type
inline constexpr std::uint32_t kHeaderLength = 112;  // v3 as QEMU writes it: + compression_type, pad
inline constexpr std::uint32_t kMinClusterBits = 9;
inline constexpr std::uint32_t kMaxClusterBits = 21;
inline constexpr std::uint32_t kDefaultClusterSize = 65536;

// Incompatible feature bits.
inline constexpr std::uint64_t kIncompatDirty = 1u << 0;
inline constexpr std::uint64_t kIncompatCorrupt = 1u << 1;
inline constexpr std::uint64_t kIncompatDataFile = 1u << 2;
inline constexpr std::uint64_t kIncompatCompression = 1u << 3;
inline constexpr std::uint64_t kIncompatExtendedL2 = 1u << 4;
inline constexpr std::uint64_t kIncompatKnown = 0x1f;
// Compatible feature bits.
inline constexpr std::uint64_t kCompatLazyRefcounts = 1u << 0;
// Autoclear feature bits.
inline constexpr std::uint64_t kAutoclearBitmaps = 1u << 0;
inline constexpr std::uint64_t kAutoclearDataFileRaw = 1u << 1;
inline constexpr std::uint64_t kAutoclearKnown = 0x3;

// Header extension types.
inline constexpr std::uint32_t kExtEnd = 0;
inline constexpr std::uint32_t kExtBackingFormat = 0xe2792aca;
inline constexpr std::uint32_t kExtFeatureTable = 0x6803f857;
inline constexpr std::uint32_t kExtBitmaps = 0x23852875;
inline constexpr std::uint32_t kExtEncryption = 0x0537be77;
inline constexpr std::uint32_t kExtDataFile = 0x44415441;

enum class CompressionType : std::uint8_t { kDeflate = 0, kZstd = 1 };

// L1 / L2 / refcount-table entry bits.
inline constexpr std::uint64_t kEntryCopied = 1ull << 63;      // refcount is exactly 1 (L1, L2)
inline constexpr std::uint64_t kEntryCompressed = 1ull << 62;  // L2: compressed cluster
inline constexpr std::uint64_t kEntryZero = 1ull << 0;         // L2 (v3): reads as zeros
inline constexpr std::uint64_t kL1OffsetMask = 0x00fffffffffffe00ull;   // bits 9-55
inline constexpr std::uint64_t kL2OffsetMask = 0x00fffffffffffe00ull;   // bits 9-55
inline constexpr std::uint64_t kRefcountTableOffsetMask = 0xfffffffffffffe00ull;  // bits 9-63
inline constexpr std::uint64_t kL1ReservedMask = 0x7f000000000001ffull;  // must be 0
inline constexpr std::uint64_t kL2ReservedMask = 0x3f000000000001feull;  // standard entries

// Header extension as stored: type, then `data` padded to a multiple of 8 on disk.
struct HeaderExtension {
  std::uint32_t type = 0;
  std::vector<std::byte> data;
};

struct FeatureName {  // one entry of the feature name table (48 bytes on disk)
  std::uint8_t type = 0;  // 0 incompatible, 1 compatible, 2 autoclear
  std::uint8_t bit = 0;
  std::string name;       // up to 46 bytes
};

struct BitmapsExtension {
  std::uint32_t nb_bitmaps = 0;
  std::uint64_t bitmap_directory_size = 0;
  std::uint64_t bitmap_directory_offset = 0;
};

struct Header {
  std::uint32_t version = 3;
  std::uint64_t backing_file_offset = 0;
  std::uint32_t backing_file_size = 0;
  std::uint32_t cluster_bits = 16;
  std::uint64_t size = 0;  // virtual disk size in bytes
  std::uint32_t crypt_method = 0;
  std::uint32_t l1_size = 0;  // entries
  std::uint64_t l1_table_offset = 0;
  std::uint64_t refcount_table_offset = 0;
  std::uint32_t refcount_table_clusters = 0;
  std::uint32_t nb_snapshots = 0;
  std::uint64_t snapshots_offset = 0;
  // Version 3 (version 2 images read as: no features, refcount_order 4, length 72).
  std::uint64_t incompatible_features = 0;
  std::uint64_t compatible_features = 0;
  std::uint64_t autoclear_features = 0;
  std::uint32_t refcount_order = 4;  // refcount width = 1 << refcount_order bits
  std::uint32_t header_length = kHeaderLength;  // as read; encode_header writes 112 + unknown
  CompressionType compression_type = CompressionType::kDeflate;

  // Decoded extensions and the backing file name (both live in the first cluster).
  std::string backing_file;
  std::string backing_format;   // the backing-format extension; empty if absent
  std::string data_file;        // the external-data-file extension; empty if absent
  std::vector<FeatureName> feature_names;
  std::optional<BitmapsExtension> bitmaps;
  std::vector<HeaderExtension> unknown_extensions;  // kept and written back unchanged
  std::vector<std::byte> unknown_header_fields;     // v3 bytes 112..header_length, kept

  std::uint64_t cluster_size() const noexcept { return std::uint64_t{1} << cluster_bits; }
  bool extended_l2() const noexcept { return incompatible_features & kIncompatExtendedL2; }
  // Bytes per L2 entry: 8, or 16 with extended L2 (entry + subcluster bitmap).
  std::uint32_t l2_entry_bytes() const noexcept { return extended_l2() ? 16 : 8; }
  std::uint64_t l2_entries() const noexcept { return cluster_size() / l2_entry_bytes(); }
  std::uint32_t refcount_bits() const noexcept { return 1u << refcount_order; }
  std::uint64_t refcount_block_entries() const noexcept {
    return cluster_size() * 8 / refcount_bits();
  }
};

// `cluster` is the image's first cluster (or as much of it as the file holds, at least the
// header's length). Errors: EINVAL for a malformed header, ENOTSUP for a feature we do not
// implement (message names it, as QEMU does: "Unsupported qcow2 feature(s): ..."), EFBIG for
// sizes beyond QEMU's limits.
BlockResult<Header> decode_header(std::span<const std::byte> cluster);

// The header, its extensions (backing format, data file, feature name table (v3), bitmaps,
// unknown ones; then the end marker) and the backing file name, laid out as qemu-img 7.2
// writes them; backing_file_offset/size are computed from the layout, and the feature table
// written is always standard_feature_names() (as QEMU rewrites its own), not
// header.feature_names, and only with clusters larger than 4 KiB (as qemu-img 7.2 does). Fails (EINVAL) when they do not fit in one cluster.
BlockResult<std::vector<std::byte>> encode_header(const Header& header);

// The feature name table QEMU 7.2 writes into every v3 header, in its order.
const std::vector<FeatureName>& standard_feature_names();

// The refcount blocks and refcount table clusters needed to count `clusters` clusters and
// themselves (QEMU's qcow2_refcount_metadata_size); `generous` adds room for half the table
// again, as QEMU's allocator does when it grows the table.
struct RefcountMetadata {
  std::uint64_t blocks = 0;
  std::uint64_t table_clusters = 0;
};
RefcountMetadata refcount_metadata(std::uint64_t clusters, std::uint32_t cluster_bits,
                                   std::uint32_t refcount_order, bool generous) noexcept;

// L1 entries needed to map `size` bytes (QEMU's size_to_l1).
std::uint64_t l1_entries_needed(std::uint64_t size, std::uint32_t cluster_bits,
                                bool extended_l2) noexcept;

// Compressed L2 entries: host offset and the number of bytes to read (whole 512-byte sectors).
struct CompressedExtent {
  std::uint64_t host_offset = 0;
  std::uint64_t length = 0;
};
CompressedExtent decode_compressed_entry(std::uint64_t entry, std::uint32_t cluster_bits) noexcept;
std::uint64_t encode_compressed_entry(std::uint64_t host_offset, std::uint64_t length,
                                      std::uint32_t cluster_bits) noexcept;

// Refcount block entries of any width (1..64 bits): entries narrower than a byte fill each
// byte from its least significant bit; 8 bits and wider are big-endian integers.
std::uint64_t get_refcount(std::span<const std::byte> block, std::uint64_t index,
                           std::uint32_t refcount_order) noexcept;
void set_refcount(std::span<std::byte> block, std::uint64_t index, std::uint32_t refcount_order,
                  std::uint64_t value) noexcept;

}  // namespace spindle::block::qcow2
