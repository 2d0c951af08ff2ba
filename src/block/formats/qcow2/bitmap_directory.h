// The qcow2 bitmap directory and bitmap tables (docs/interop/qcow2.rst, "Bitmaps", "Bitmap
// directory", "Bitmap table", "Bitmap data"): the list of persistent dirty bitmaps the
// bitmaps header extension points at. A directory entry is 24 fixed bytes (bitmap table
// offset and size, flags, type, granularity bits, name size, extra data size), then the extra
// data and the name (not NUL-terminated), padded with zeros to a multiple of 8 bytes. A bitmap
// table entry names one cluster of bitmap data, or says the cluster reads as all zeros (0) or
// all ones (1). Bitmap data is the bitmap's bits from bit 0 on, each byte filled from its
// least significant bit; bit i covers guest bytes [i * granularity, (i + 1) * granularity).
//
// Validation follows QEMU's limits and messages: at most 65535 bitmaps and 64 MiB of
// directory, entry framing inside the directory and counted against nb_bitmaps, no extra data
// (QEMU refuses it), the bitmap table non-empty, cluster aligned and at most 2^27 entries and
// 512 MiB of data, granularity bits 9..31, no reserved flags, a name of 1..1023 bytes, type 1
// (dirty tracking), and a table large enough for the image unless the bitmap is in use.
// Errors are EINVAL with a message.
//
// Thread-safety: plain value types and pure functions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "block/block_error.h"

namespace spindle::block::qcow2 {

inline constexpr std::uint32_t kBitmapFlagInUse = 1u << 0;
inline constexpr std::uint32_t kBitmapFlagAuto = 1u << 1;
inline constexpr std::uint32_t kBitmapReservedFlags = ~(kBitmapFlagInUse | kBitmapFlagAuto);
inline constexpr std::uint8_t kBitmapTypeDirty = 1;
inline constexpr std::uint32_t kMinBitmapGranularityBits = 9;
inline constexpr std::uint32_t kMaxBitmapGranularityBits = 31;
inline constexpr std::uint32_t kMaxBitmapNameBytes = 1023;
inline constexpr std::uint32_t kMaxBitmapTableEntries = 0x8000000;
inline constexpr std::uint64_t kMaxBitmapDataBytes = 0x20000000;  // 512 MiB
inline constexpr std::uint32_t kMaxBitmapCount = 65535;
inline constexpr std::uint64_t kMaxBitmapDirectoryBytes = 1024ull * kMaxBitmapCount;
inline constexpr std::uint32_t kBitmapEntryFixedBytes = 24;
// Our cap on the bits held in memory at once for one image (all its bitmaps together), where
// QEMU caps each bitmap only: a hostile directory cannot make us allocate without bound.
inline constexpr std::uint64_t kMaxBitmapMemoryBytes = 1ull << 30;
// Bitmap table entries.
inline constexpr std::uint64_t kBitmapTableOffsetMask = 0x00fffffffffffe00ull;
inline constexpr std::uint64_t kBitmapTableReservedMask = 0xff000000000001feull;
inline constexpr std::uint64_t kBitmapTableAllOnes = 1;

struct BitmapEntry {
  std::uint64_t table_offset = 0;
  std::uint32_t table_size = 0;  // entries
  std::uint32_t flags = 0;
  std::uint8_t type = kBitmapTypeDirty;
  std::uint8_t granularity_bits = 16;
  std::string name;

  bool in_use() const noexcept { return flags & kBitmapFlagInUse; }
  bool enabled() const noexcept { return flags & kBitmapFlagAuto; }
  std::uint64_t granularity() const noexcept { return std::uint64_t{1} << granularity_bits; }
};

// Bytes of bitmap data for `image_size` guest bytes at this granularity (whole bytes).
std::uint64_t bitmap_data_bytes(std::uint64_t image_size, std::uint32_t granularity_bits) noexcept;
// Bitmap table entries for that data with clusters of `cluster_size` bytes.
std::uint64_t bitmap_table_entries(std::uint64_t image_size, std::uint32_t granularity_bits,
                                   std::uint64_t cluster_size) noexcept;

// QEMU's check of one directory entry against the image (EINVAL "Bitmap 'NAME' doesn't
// satisfy the constraints").
BlockError check_bitmap_entry(const BitmapEntry& entry, std::uint64_t cluster_size,
                              std::uint64_t image_size);
// Whether a bitmap table entry is well formed: no reserved bits, a cluster-aligned offset,
// the all-ones bit only without an offset.
bool valid_bitmap_table_entry(std::uint64_t entry, std::uint64_t cluster_size) noexcept;

// Decodes the `count` entries the directory `bytes` (exactly bitmap_directory_size bytes)
// holds. Messages as QEMU's: "Broken bitmap directory", "More bitmaps found than specified
// in header extension", "Less bitmaps found ...", "Bitmap extra data is not supported".
BlockResult<std::vector<BitmapEntry>> decode_bitmap_directory(std::span<const std::byte> bytes,
                                                              std::uint32_t count,
                                                              std::uint64_t cluster_size,
                                                              std::uint64_t image_size);

// The directory as QEMU writes it (no extra data). EINVAL for an empty list, too many
// bitmaps, a directory over 64 MiB, a duplicate name or an entry check_bitmap_entry refuses.
BlockResult<std::vector<std::byte>> encode_bitmap_directory(const std::vector<BitmapEntry>& list,
                                                            std::uint64_t cluster_size,
                                                            std::uint64_t image_size);

// QEMU's constraints on a bitmap to be stored (qemu-img bitmap --add): EINVAL with
// "Granularity exceeds maximum (2147483648 bytes)", "Granularity is under minimum (512
// bytes)", "Too much space will be occupied by the bitmap. Use larger granularity", "Name
// length exceeds maximum (1023 characters)".
BlockError check_new_bitmap(const std::string& name, std::uint64_t granularity,
                            std::uint64_t cluster_size, std::uint64_t image_size);

}  // namespace spindle::block::qcow2
