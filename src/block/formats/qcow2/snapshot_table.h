// The qcow2 snapshot table (docs/interop/qcow2.rst, "Snapshots"): the list of internal
// snapshots the header points at (nb_snapshots entries from snapshots_offset), each entry a
// fixed 40-byte part (L1 table offset and size, id and name lengths, date, VM clock, 32-bit VM
// state size, extra data size), then the extra data (64-bit VM state size, virtual disk size,
// instruction count: each present when the extra data reaches it), the id and the name (not
// NUL-terminated), padded to a multiple of 8 bytes. Pure codecs: no I/O.
//
// Validation follows QEMU's limits: snapshots_offset cluster aligned (and non-zero with
// entries), at most 65536 entries, at most 64 MiB of table, at most 1024 bytes of extra data
// per entry, the table inside the file; each snapshot's L1 table is checked separately
// (validate_snapshot_l1) when a snapshot is used, as QEMU lists snapshots whose L1 is bad.
// Errors are EINVAL with a message naming what is wrong.
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
#include "block/formats/qcow2/format.h"

namespace spindle::block::qcow2 {

inline constexpr std::uint32_t kMaxSnapshotCount = 65536;
inline constexpr std::uint64_t kMaxSnapshotTableBytes = 64ull << 20;
inline constexpr std::uint32_t kMaxSnapshotExtraData = 1024;
inline constexpr std::uint32_t kSnapshotFixedBytes = 40;
inline constexpr std::uint32_t kSnapshotExtraBytes = 24;  // as QEMU 7.2 writes every entry
inline constexpr std::uint64_t kMaxSnapshotL1Entries = (32ull << 20) / 8;  // QEMU's L1 limit

struct SnapshotEntry {
  std::uint64_t l1_table_offset = 0;
  std::uint32_t l1_size = 0;  // entries
  std::string id;
  std::string name;
  std::uint32_t date_sec = 0;
  std::uint32_t date_nsec = 0;
  std::uint64_t vm_clock_nsec = 0;
  std::uint64_t vm_state_size = 0;  // the 64-bit field when the extra data has it
  // The guest size when the snapshot was taken; entries without it (extra data under 16
  // bytes) read as the image's current size, as QEMU reads them.
  std::uint64_t disk_size = 0;
  std::optional<std::uint64_t> icount;  // absent in the entry, or ~0 on disk: none
  std::vector<std::byte> unknown_extra;  // extra data past the 24 bytes known, kept
};

// How many bytes the table of `count` entries takes, read from its start in `bytes`: 0 when
// `bytes` holds too little to tell (read more and ask again). At an entry with too much
// extra data, or past 64 MiB, it stops there with a non-zero count: decode_snapshot_table()
// then reports the error.
std::uint64_t snapshot_table_extent(std::span<const std::byte> bytes, std::uint32_t count) noexcept;

// Checks the header's snapshot table location against the file: the count, the alignment and
// the start inside the file.
BlockError validate_snapshot_location(const Header& header, std::uint64_t file_size);

// Decodes the `header.nb_snapshots` entries at the start of `bytes` (the table read from
// snapshots_offset; `file_size` bounds where the table may end). `image_size` is what entries
// without a disk size get.
BlockResult<std::vector<SnapshotEntry>> decode_snapshot_table(std::span<const std::byte> bytes,
                                                         const Header& header,
                                                         std::uint64_t file_size,
                                                         std::uint64_t image_size);

// The table as QEMU 7.2 writes it: 24 bytes of extra data (plus any unknown extra kept) per
// entry, an icount of ~0 where there is none. EINVAL when ids or names exceed 65535 bytes, or
// the table 64 MiB or 65536 entries.
BlockResult<std::vector<std::byte>> encode_snapshot_table(const std::vector<SnapshotEntry>& table);

// A snapshot's L1 table: cluster aligned, at most QEMU's L1 size, inside the file, and large
// enough for the snapshot's disk size. EINVAL with QEMU's wording otherwise.
BlockError validate_snapshot_l1(const SnapshotEntry& snapshot, const Header& header,
                                std::uint64_t file_size);

}  // namespace spindle::block::qcow2
