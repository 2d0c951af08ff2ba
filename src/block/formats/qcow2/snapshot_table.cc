#include "block/formats/qcow2/snapshot_table.h"

#include <fmt/format.h>

#include <cerrno>
#include <cstring>

#include "base/byte_order.h"

namespace spindle::block::qcow2 {

namespace {

using base::load_be16;
using base::load_be32;
using base::load_be64;

constexpr std::uint64_t kNoIcount = ~std::uint64_t{0};

BlockError invalid(std::string message) { return {EINVAL, std::move(message)}; }

std::uint64_t align8(std::uint64_t n) noexcept { return (n + 7) & ~std::uint64_t{7}; }

}  // namespace

std::uint64_t snapshot_table_extent(std::span<const std::byte> bytes,
                                    std::uint32_t count) noexcept {
  std::uint64_t at = 0;
  for (std::uint32_t i = 0; i < count; ++i) {
    at = align8(at);
    if (at + kSnapshotFixedBytes > bytes.size()) return 0;
    const std::byte* p = bytes.data() + at;
    const std::uint32_t extra = load_be32(p + 36);
    // A bad entry ends the table here: reading more would not help.
    if (extra > kMaxSnapshotExtraData) return at + kSnapshotFixedBytes;
    at += std::uint64_t{kSnapshotFixedBytes} + extra + load_be16(p + 12) + load_be16(p + 14);
    if (at > kMaxSnapshotTableBytes) return at;
    if (at > bytes.size()) return 0;
  }
  return at;
}

BlockError validate_snapshot_location(const Header& header, std::uint64_t file_size) {
  if (header.nb_snapshots == 0) return {};
  if (header.nb_snapshots > kMaxSnapshotCount) return invalid("Too many snapshots");
  const std::uint64_t cs = header.cluster_size();
  if (header.snapshots_offset == 0 || header.snapshots_offset % cs != 0) {
    return invalid("Invalid snapshot table offset");
  }
  if (header.snapshots_offset >= file_size ||
      file_size - header.snapshots_offset <
          std::uint64_t{header.nb_snapshots} * kSnapshotFixedBytes) {
    return invalid("Snapshot table is outside the file");
  }
  return {};
}

BlockResult<std::vector<SnapshotEntry>> decode_snapshot_table(std::span<const std::byte> bytes,
                                                              const Header& header,
                                                              std::uint64_t file_size,
                                                              std::uint64_t image_size) {
  if (BlockError e = validate_snapshot_location(header, file_size); !e.ok()) return e;
  const std::uint64_t room = header.nb_snapshots == 0 ? 0 : file_size - header.snapshots_offset;
  std::vector<SnapshotEntry> table;
  table.reserve(header.nb_snapshots);
  std::uint64_t at = 0;
  for (std::uint32_t i = 0; i < header.nb_snapshots; ++i) {
    at = align8(at);
    if (at + kSnapshotFixedBytes > bytes.size() || at + kSnapshotFixedBytes > room) {
      return invalid(fmt::format("Snapshot table entry {} is outside the file", i));
    }
    const std::byte* p = bytes.data() + at;
    SnapshotEntry s;
    s.l1_table_offset = load_be64(p);
    s.l1_size = load_be32(p + 8);
    const std::uint16_t id_size = load_be16(p + 12);
    const std::uint16_t name_size = load_be16(p + 14);
    s.date_sec = load_be32(p + 16);
    s.date_nsec = load_be32(p + 20);
    s.vm_clock_nsec = load_be64(p + 24);
    s.vm_state_size = load_be32(p + 32);
    const std::uint32_t extra = load_be32(p + 36);
    if (extra > kMaxSnapshotExtraData) {
      return invalid(fmt::format("Too much extra metadata in snapshot table entry {}", i));
    }
    const std::uint64_t end = at + kSnapshotFixedBytes + extra + id_size + name_size;
    if (end > kMaxSnapshotTableBytes) return invalid("Snapshot table is too big");
    if (end > bytes.size() || end > room) {
      return invalid(fmt::format("Snapshot table entry {} is outside the file", i));
    }
    const std::byte* x = p + kSnapshotFixedBytes;
    if (extra >= 8) s.vm_state_size = load_be64(x);
    s.disk_size = extra >= 16 ? load_be64(x + 8) : image_size;
    if (extra >= 24 && load_be64(x + 16) != kNoIcount) s.icount = load_be64(x + 16);
    if (extra > kSnapshotExtraBytes) s.unknown_extra.assign(x + kSnapshotExtraBytes, x + extra);
    const char* text = reinterpret_cast<const char*>(x + extra);
    s.id.assign(text, id_size);
    s.name.assign(text + id_size, name_size);
    table.push_back(std::move(s));
    at = end;
  }
  return table;
}

BlockResult<std::vector<std::byte>> encode_snapshot_table(const std::vector<SnapshotEntry>& table) {
  if (table.size() > kMaxSnapshotCount) return invalid("Too many snapshots");
  std::uint64_t size = 0;
  for (const SnapshotEntry& s : table) {
    if (s.id.size() > 0xffff || s.name.size() > 0xffff) {
      return invalid("Snapshot id or name longer than 65535 bytes");
    }
    if (s.unknown_extra.size() > kMaxSnapshotExtraData - kSnapshotExtraBytes) {
      return invalid("Too much extra metadata in a snapshot table entry");
    }
    size = align8(size) + kSnapshotFixedBytes + kSnapshotExtraBytes + s.unknown_extra.size() +
           s.id.size() + s.name.size();
  }
  if (size > kMaxSnapshotTableBytes) return invalid("Snapshot table is too big");
  std::vector<std::byte> out(align8(size), std::byte{0});
  std::uint64_t at = 0;
  for (const SnapshotEntry& s : table) {
    at = align8(at);
    std::byte* p = out.data() + at;
    const std::uint32_t extra =
        kSnapshotExtraBytes + static_cast<std::uint32_t>(s.unknown_extra.size());
    base::store_be64(p, s.l1_table_offset);
    base::store_be32(p + 8, s.l1_size);
    base::store_be16(p + 12, static_cast<std::uint16_t>(s.id.size()));
    base::store_be16(p + 14, static_cast<std::uint16_t>(s.name.size()));
    base::store_be32(p + 16, s.date_sec);
    base::store_be32(p + 20, s.date_nsec);
    base::store_be64(p + 24, s.vm_clock_nsec);
    // A VM state too large for 32 bits reads as none to older readers (as QEMU writes it).
    base::store_be32(p + 32, s.vm_state_size <= 0xffffffffu
                                 ? static_cast<std::uint32_t>(s.vm_state_size)
                                 : 0);
    base::store_be32(p + 36, extra);
    std::byte* x = p + kSnapshotFixedBytes;
    base::store_be64(x, s.vm_state_size);
    base::store_be64(x + 8, s.disk_size);
    base::store_be64(x + 16, s.icount ? *s.icount : kNoIcount);
    if (!s.unknown_extra.empty()) {
      std::memcpy(x + kSnapshotExtraBytes, s.unknown_extra.data(), s.unknown_extra.size());
    }
    std::memcpy(x + extra, s.id.data(), s.id.size());
    std::memcpy(x + extra + s.id.size(), s.name.data(), s.name.size());
    at += kSnapshotFixedBytes + extra + s.id.size() + s.name.size();
  }
  out.resize(at);
  return out;
}

BlockError validate_snapshot_l1(const SnapshotEntry& snapshot, const Header& header,
                                std::uint64_t file_size) {
  const std::uint64_t cs = header.cluster_size();
  if (snapshot.l1_size > kMaxSnapshotL1Entries) return invalid("Snapshot L1 table too large");
  const std::uint64_t bytes = std::uint64_t{snapshot.l1_size} * 8;
  if (snapshot.l1_size > 0 &&
      (snapshot.l1_table_offset == 0 || snapshot.l1_table_offset % cs != 0 ||
       snapshot.l1_table_offset >= file_size || file_size - snapshot.l1_table_offset < bytes)) {
    return invalid("Snapshot L1 table offset invalid");
  }
  if (snapshot.l1_size < l1_entries_needed(snapshot.disk_size, header.cluster_bits,
                                           header.extended_l2())) {
    return invalid("Snapshot L1 table is too small for the snapshot's disk size");
  }
  return {};
}

}  // namespace spindle::block::qcow2
