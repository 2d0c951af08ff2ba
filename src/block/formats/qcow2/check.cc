#include "block/formats/qcow2/check.h"

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <map>
#include <optional>
#include <vector>

#include "base/byte_order.h"
#include "block/formats/qcow2/snapshot_table.h"

namespace spindle::block::qcow2 {

namespace {

using base::load_be16;
using base::load_be32;
using base::load_be64;

constexpr std::uint64_t kMaxL1Entries = (32ull << 20) / 8;
constexpr std::uint64_t kReftableReservedMask = 0x1ff;
constexpr std::uint64_t kL2BitmapAllAlloc = 0xffffffffull;

// Expected refcounts: dense for clusters inside the file, sparse beyond it (entries may point
// anywhere; memory stays bounded by the number of entries).
class References {
 public:
  explicit References(std::uint64_t clusters) : dense_(clusters, 0) {}
  // Returns false when the count would overflow the image's refcount width.
  bool add(std::uint64_t cluster, std::uint64_t max) {
    if (cluster < dense_.size()) {
      std::uint32_t& v = dense_[cluster];
      if (v >= std::min<std::uint64_t>(max, UINT32_MAX)) return false;
      ++v;
      return true;
    }
    std::uint64_t& v = sparse_[cluster];
    if (v >= max) return false;
    ++v;
    return true;
  }
  std::uint64_t get(std::uint64_t cluster) const {
    if (cluster < dense_.size()) return dense_[cluster];
    auto it = sparse_.find(cluster);
    return it == sparse_.end() ? 0 : it->second;
  }
  std::uint64_t dense_size() const { return dense_.size(); }
  const std::map<std::uint64_t, std::uint64_t>& sparse() const { return sparse_; }
  void clear() {
    std::fill(dense_.begin(), dense_.end(), 0);
    sparse_.clear();
  }

 private:
  std::vector<std::uint32_t> dense_;  // 4 bytes per cluster of the file
  std::map<std::uint64_t, std::uint64_t> sparse_;
};

class Checker {
 public:
  Checker(BlockNode& file, Header header, RepairMode mode)
      : file_(file),
        h_(std::move(header)),
        mode_(mode),
        cs_(h_.cluster_size()),
        file_size_(file.size()),
        refs_((file_size_ + cs_ - 1) >> h_.cluster_bits),
        refcount_max_(h_.refcount_order == 6 ? ~0ull
                                              : (std::uint64_t{1} << h_.refcount_bits()) - 1) {}

  coro::Task<CheckReport> run() {
    co_await check_pass();
    if (mode_ == RepairMode::kNone || r_.check_errors) co_return r_;
    // Report the repaired image, as qemu-img does after "Double checking the fixed image".
    Checker again(file_, h_, RepairMode::kNone);
    co_await again.check_pass();
    CheckReport after = again.r_;
    after.corruptions_fixed = r_.corruptions_fixed;
    after.leaks_fixed = r_.leaks_fixed;
    if (after.corruptions == 0 && after.check_errors == 0) co_await mark_clean();
    co_return after;
  }

 private:
  // ---- I/O -------------------------------------------------------------------------------
  // Reads [offset, offset + length); what lies past the end of the file reads as zeros.
  coro::Task<int> read(std::uint64_t offset, std::span<std::byte> out) {
    std::fill(out.begin(), out.end(), std::byte{0});
    if (offset >= file_size_) co_return 0;
    const std::uint64_t n = std::min<std::uint64_t>(out.size(), file_size_ - offset);
    const int r = co_await file_.read(offset, out.first(n), 0);
    co_return r < 0 ? r : 0;
  }
  coro::Task<int> write(std::uint64_t offset, std::span<const std::byte> data) {
    const int r = co_await file_.write(offset, data, 0);
    if (r >= 0 && offset + data.size() > file_size_) file_size_ = offset + data.size();
    co_return r < 0 ? r : 0;
  }
  // How many of `entries` table entries of `bytes` each from `offset` lie inside the file.
  std::uint64_t in_file_entries(std::uint64_t offset, std::uint64_t entries,
                                std::uint64_t bytes) const {
    if (offset >= file_size_) return 0;
    return std::min(entries, (file_size_ - offset + bytes - 1) / bytes);
  }
  void io_error(int r) {
    ++r_.check_errors;
    r_.error = r;
  }

  // ---- expected refcounts ----------------------------------------------------------------
  void reference(std::uint64_t offset, std::uint64_t size) {
    if (size == 0) return;
    const std::uint64_t first = offset >> h_.cluster_bits;
    const std::uint64_t last = (offset + size - 1) >> h_.cluster_bits;
    for (std::uint64_t c = first; c <= last; ++c) {
      if (!refs_.add(c, refcount_max_)) ++r_.corruptions;  // refcount overflow
    }
  }

  coro::Task<void> check_l2(std::uint64_t l2_offset, bool active, std::uint64_t l1_index,
                            std::uint64_t l1_table_offset) {
    // Entries past the end of the file read as zeros (unallocated): read what the file holds.
    const std::uint32_t entry_bytes = h_.l2_entry_bytes();
    const std::uint64_t entries = in_file_entries(l2_offset, h_.l2_entries(), entry_bytes);
    std::vector<std::byte> table(entries * entry_bytes);
    if (int r = co_await read(l2_offset, table); r < 0) {
      io_error(r);
      co_return;
    }
    const bool sub = h_.extended_l2();
    std::uint64_t next_contiguous = 0;
    bool dirty = false;
    for (std::uint64_t i = 0; i < entries; ++i) {
      std::byte* at = table.data() + i * entry_bytes;
      std::uint64_t entry = load_be64(at);
      const std::uint64_t bitmap = sub ? load_be64(at + 8) : 0;
      const bool compressed = entry & kEntryCompressed;
      if (!compressed && (entry & kL2ReservedMask)) ++r_.corruptions;
      if (compressed) {
        if (entry & kEntryCopied) {
          entry &= ~kEntryCopied;
          ++r_.corruptions;
        }
        if (bitmap) ++r_.corruptions;
        const CompressedExtent e = decode_compressed_entry(entry, h_.cluster_bits);
        reference(e.host_offset, e.length);
        if (active) {
          ++r_.allocated_clusters;
          ++r_.compressed_clusters;
          ++r_.fragmented_clusters;
        }
        continue;
      }
      const std::uint64_t offset = entry & kL2OffsetMask;
      const bool zero_flag = (entry & kEntryZero) && !sub;
      // (offset 0 with COPIED is the data file's first cluster)
      const bool data_file_start =
          (h_.incompatible_features & kIncompatDataFile) && (entry & kEntryCopied);
      if (offset == 0 && !data_file_start) {
        if (!zero_flag && (bitmap & kL2BitmapAllAlloc)) ++r_.corruptions;
        continue;
      }
      // A normal or preallocated-zero cluster.
      if ((bitmap >> 32) & bitmap) ++r_.corruptions;
      if (offset & (cs_ - 1)) {
        ++r_.corruptions;
        const bool data = sub ? (bitmap & kL2BitmapAllAlloc) != 0 : !(entry & kEntryZero);
        if (!data && mode_ == RepairMode::kAll) {
          // A preallocated zero cluster at a bad offset becomes a plain zero cluster.
          base::store_be64(at, kEntryZero);
          if (sub) base::store_be64(at + 8, 0);
          dirty = true;
          --r_.corruptions;
          ++r_.corruptions_fixed;
          continue;
        }
      }
      // Clusters in an external data file are not counted (nor bounded by this file).
      const bool external = (h_.incompatible_features & kIncompatDataFile) != 0;
      const bool past_eof = !external && offset >= file_size_;
      if (past_eof) ++r_.corruptions;  // not referenced: the refcounts cannot cover it
      if (active) {
        ++r_.allocated_clusters;
        if (next_contiguous && offset != next_contiguous) ++r_.fragmented_clusters;
        next_contiguous = offset + cs_;
      }
      if (!past_eof && !external) reference(offset, cs_);
    }
    (void)l1_index;
    (void)l1_table_offset;
    if (dirty) {
      if (int r = co_await write(l2_offset, table); r < 0) io_error(r);
    }
  }

  coro::Task<void> check_l1(std::uint64_t l1_offset, std::uint64_t l1_size, bool active) {
    reference(l1_offset, l1_size * 8);
    if (l1_size == 0) co_return;
    // Entries past the end of the file read as zeros: read only what the file holds.
    const std::uint64_t in_file =
        l1_offset >= file_size_ ? 0 : std::min(l1_size, (file_size_ - l1_offset + 7) / 8);
    std::vector<std::byte> table(in_file * 8);
    if (int r = co_await read(l1_offset, table); r < 0) {
      io_error(r);
      co_return;
    }
    for (std::uint64_t i = 0; i < in_file; ++i) {
      const std::uint64_t entry = load_be64(table.data() + i * 8);
      if (entry & kL1ReservedMask) ++r_.corruptions;
      const std::uint64_t l2 = entry & kL1OffsetMask;
      if (!l2) continue;
      reference(l2, cs_);
      if (l2 & (cs_ - 1)) {
        ++r_.corruptions;
        continue;
      }
      if (active) active_l2_.push_back({i, entry});
      co_await check_l2(l2, active, i, l1_offset);
    }
  }

  coro::Task<void> check_snapshots() {
    std::uint64_t offset = h_.snapshots_offset;
    for (std::uint32_t i = 0; i < h_.nb_snapshots; ++i) {
      if (offset - h_.snapshots_offset > kMaxSnapshotTableBytes) {
        ++r_.check_errors;
        co_return;
      }
      std::byte fixed[40];
      if (int r = co_await read(offset, fixed); r < 0) {
        io_error(r);
        co_return;
      }
      const std::uint64_t l1_offset = load_be64(fixed);
      const std::uint32_t l1_size = load_be32(fixed + 8);
      const std::uint16_t id_size = load_be16(fixed + 12);
      const std::uint16_t name_size = load_be16(fixed + 14);
      const std::uint32_t extra = load_be32(fixed + 36);
      if (extra > kMaxSnapshotExtraData) {
        ++r_.check_errors;
        co_return;
      }
      offset += 40 + std::uint64_t{extra} + id_size + name_size;
      offset = (offset + 7) & ~std::uint64_t{7};
      if (l1_offset & (cs_ - 1)) {
        ++r_.corruptions;
        continue;
      }
      if (l1_size > kMaxL1Entries) {
        ++r_.corruptions;
        continue;
      }
      co_await check_l1(l1_offset, l1_size, false);
    }
    reference(h_.snapshots_offset, offset - h_.snapshots_offset);
  }

  coro::Task<void> check_bitmaps() {
    if (!h_.bitmaps) co_return;
    const BitmapsExtension& b = *h_.bitmaps;
    reference(b.bitmap_directory_offset, b.bitmap_directory_size);
    std::vector<std::byte> dir(std::min<std::uint64_t>(b.bitmap_directory_size, 64ull << 20));
    if (int r = co_await read(b.bitmap_directory_offset, dir); r < 0) {
      io_error(r);
      co_return;
    }
    std::size_t at = 0;
    for (std::uint32_t i = 0; i < b.nb_bitmaps && at + 24 <= dir.size(); ++i) {
      const std::uint64_t table_offset = load_be64(dir.data() + at);
      const std::uint32_t table_size = load_be32(dir.data() + at + 8);
      const std::uint16_t name_size = load_be16(dir.data() + at + 18);
      const std::uint32_t extra = load_be32(dir.data() + at + 20);
      at += (24 + std::size_t{extra} + name_size + 7) & ~std::size_t{7};
      if (table_offset & (cs_ - 1) || table_size > kMaxL1Entries) {
        ++r_.corruptions;
        continue;
      }
      reference(table_offset, std::uint64_t{table_size} * 8);
      const std::uint64_t in_file =
          table_offset >= file_size_
              ? 0
              : std::min<std::uint64_t>(table_size, (file_size_ - table_offset + 7) / 8);
      std::vector<std::byte> table(in_file * 8);
      if (int r = co_await read(table_offset, table); r < 0) {
        io_error(r);
        continue;
      }
      for (std::uint64_t k = 0; k < in_file; ++k) {
        const std::uint64_t data = load_be64(table.data() + k * 8) & kL1OffsetMask;
        if (data) reference(data, cs_);
      }
    }
  }

  coro::Task<void> load_reftable() {
    const std::uint64_t entries = std::uint64_t{h_.refcount_table_clusters} * cs_ / 8;
    const std::uint64_t in_file =
        h_.refcount_table_offset >= file_size_
            ? 0
            : std::min(entries, (file_size_ - h_.refcount_table_offset + 7) / 8);
    reftable_.assign(entries, 0);
    std::vector<std::byte> raw(in_file * 8);
    if (int r = co_await read(h_.refcount_table_offset, raw); r < 0) {
      io_error(r);
      co_return;
    }
    for (std::uint64_t i = 0; i < in_file; ++i) reftable_[i] = load_be64(raw.data() + i * 8);
  }

  void check_refblocks() {
    for (std::uint64_t i = 0; i < reftable_.size(); ++i) {
      const std::uint64_t entry = reftable_[i];
      const std::uint64_t offset = entry & kRefcountTableOffsetMask;
      if (entry & kReftableReservedMask) {
        ++r_.corruptions;
        rebuild_ = true;
        continue;
      }
      if (offset == 0) continue;
      if (offset >= file_size_) {
        ++r_.corruptions;  // "refcount block is outside image"
        rebuild_ = true;
        continue;
      }
      reference(offset, cs_);
      if (refs_.get(offset >> h_.cluster_bits) != 1) {
        ++r_.corruptions;
        rebuild_ = true;
      }
    }
  }

  // ---- stored refcounts ------------------------------------------------------------------
  // Loads the stored refcount block `index` (zeros if absent or outside the file).
  coro::Task<int> load_block(std::uint64_t index, std::vector<std::byte>& block) {
    block.assign(cs_, std::byte{0});
    if (index >= reftable_.size()) co_return 0;
    const std::uint64_t entry = reftable_[index];
    const std::uint64_t offset = entry & kRefcountTableOffsetMask;
    if (offset == 0 || (entry & kReftableReservedMask)) co_return 0;
    co_return co_await read(offset, block);
  }

  coro::Task<void> compare(bool fix) {
    const std::uint32_t block_bits = h_.cluster_bits + 3 - h_.refcount_order;
    const std::uint64_t per_block = std::uint64_t{1} << block_bits;
    const std::uint64_t stored_reach = reftable_.size() * per_block;
    std::vector<std::byte> block;
    std::uint64_t loaded = ~0ull;
    bool block_dirty = false;
    auto flush_block = [&]() -> coro::Task<void> {
      if (!block_dirty) co_return;
      block_dirty = false;
      const std::uint64_t offset = reftable_[loaded] & kRefcountTableOffsetMask;
      if (int r = co_await write(offset, block); r < 0) io_error(r);
    };
    auto visit = [&](std::uint64_t c) -> coro::Task<void> {
      std::uint64_t stored = 0;
      const std::uint64_t index = c >> block_bits;
      const bool have_block = c < stored_reach && reftable_[index] != 0 &&
                              !(reftable_[index] & kReftableReservedMask) &&
                              (reftable_[index] & kRefcountTableOffsetMask) < file_size_;
      if (have_block) {
        if (index != loaded) {
          co_await flush_block();
          loaded = index;
          if (int r = co_await load_block(index, block); r < 0) {
            io_error(r);
            loaded = ~0ull;
            co_return;
          }
        }
        stored = get_refcount(block, c & (per_block - 1), h_.refcount_order);
      }
      const std::uint64_t expected = refs_.get(c);
      if (stored || expected) highest_ = c;
      if (stored == expected) co_return;
      if (stored == 0) {
        rebuild_ = true;
      } else if (fix && stored > expected && mode_ != RepairMode::kNone && have_block) {
        set_refcount(block, c & (per_block - 1), h_.refcount_order, expected);
        block_dirty = true;
        ++r_.leaks_fixed;
        co_return;
      } else if (fix && stored < expected && mode_ == RepairMode::kAll && have_block) {
        set_refcount(block, c & (per_block - 1), h_.refcount_order, expected);
        block_dirty = true;
        ++r_.corruptions_fixed;
        co_return;
      }
      if (stored < expected) {
        ++r_.corruptions;
      } else {
        ++r_.leaks;
      }
    };
    // Inside the file: every cluster; beyond it only referenced clusters (as qemu-img, which
    // ignores refcounts stored for clusters past the end of the file).
    const std::uint64_t dense_end = refs_.dense_size();
    for (std::uint64_t c = 0; c < dense_end; ++c) co_await visit(c);
    for (const auto& [c, n] : refs_.sparse()) co_await visit(c);
    co_await flush_block();
  }

  // -r all when refcount blocks are missing or broken: new refcount blocks and a new refcount
  // table from the computed refcounts, placed first-fit among the clusters in use (the old
  // structures still count as used while placing, and are free afterwards), as QEMU's
  // rebuild_refcount_structure places them.
  coro::Task<void> rebuild() {
    const std::uint32_t block_bits = h_.cluster_bits + 3 - h_.refcount_order;
    const std::uint64_t per_block = std::uint64_t{1} << block_bits;
    // The old refcount table and blocks: used while placing, freed afterwards.
    std::vector<std::uint64_t> old;
    for (std::uint64_t c = h_.refcount_table_offset >> h_.cluster_bits,
                       n = 0; n < h_.refcount_table_clusters; ++n) {
      old.push_back(c + n);
    }
    for (std::uint64_t e : reftable_) {
      const std::uint64_t o = e & kRefcountTableOffsetMask;
      if (o && !(e & kReftableReservedMask) && !(o & (cs_ - 1)) && o < file_size_) {
        old.push_back(o >> h_.cluster_bits);
      }
    }
    auto used = [&](std::uint64_t c) { return refs_.get(c) != 0; };
    auto alloc = [&](std::uint64_t n) -> std::uint64_t {
      std::uint64_t start = 0;
      while (true) {
        std::uint64_t k = 0;
        while (k < n && !used(start + k)) ++k;
        if (k == n) break;
        start += k + 1;
      }
      for (std::uint64_t k = 0; k < n; ++k) refs_.add(start + k, refcount_max_);
      return start;
    };
    auto highest_used = [&]() {
      std::uint64_t top = 0;
      if (!refs_.sparse().empty()) top = refs_.sparse().rbegin()->first;
      for (std::uint64_t c = refs_.dense_size(); c-- > top;) {
        if (refs_.get(c)) return c;
      }
      return top;
    };
    if (highest_used() > refs_.dense_size() + (std::uint64_t{1} << 20)) {
      ++r_.check_errors;  // references far past the end of the file: nothing to rebuild for
      r_.error = -EFBIG;
      co_return;
    }
    std::map<std::uint64_t, std::uint64_t> blocks;  // refblock index -> cluster
    std::uint64_t table_at = 0, table_clusters = 0;
    for (int round = 0; round < 8; ++round) {
      bool changed = false;
      const std::uint64_t last_index = highest_used() >> block_bits;
      for (std::uint64_t index = 0; index <= last_index; ++index) {
        if (blocks.count(index)) continue;
        bool any = false;
        for (std::uint64_t c = index << block_bits; c < (index + 1) << block_bits && !any; ++c) {
          any = used(c);
        }
        if (!any) continue;
        blocks[index] = alloc(1);
        changed = true;
      }
      const std::uint64_t entries = blocks.empty() ? 1 : blocks.rbegin()->first + 1;
      const std::uint64_t need = (entries * 8 + cs_ - 1) / cs_;
      if (need != table_clusters) {
        table_clusters = need;
        table_at = alloc(need);
        changed = true;
      }
      if (!changed) break;
    }
    if (table_clusters > (8ull << 20) / cs_) {
      ++r_.check_errors;
      r_.error = -EFBIG;
      co_return;
    }
    std::map<std::uint64_t, bool> freed;
    for (std::uint64_t c : old) freed[c] = true;
    std::vector<std::byte> block(cs_);
    for (auto [index, cluster] : blocks) {
      std::fill(block.begin(), block.end(), std::byte{0});
      for (std::uint64_t i = 0; i < per_block; ++i) {
        const std::uint64_t c = (index << block_bits) + i;
        std::uint64_t v = refs_.get(c);
        if (v && freed.count(c)) --v;
        set_refcount(block, i, h_.refcount_order, v);
      }
      if (int r = co_await write(cluster << h_.cluster_bits, block); r < 0) {
        io_error(r);
        co_return;
      }
    }
    std::vector<std::byte> table(table_clusters * cs_);
    for (auto [index, cluster] : blocks) base::store_be64(table.data() + index * 8, cluster << h_.cluster_bits);
    if (int r = co_await write(table_at << h_.cluster_bits, table); r < 0) {
      io_error(r);
      co_return;
    }
    if (int r = co_await file_.flush(); r < 0) {
      io_error(r);
      co_return;
    }
    // The header's refcount table fields (and, v3, refcount_order) in one write: the commit
    // point that switches from the old structures to the new ones.
    h_.refcount_table_offset = table_at << h_.cluster_bits;
    h_.refcount_table_clusters = static_cast<std::uint32_t>(table_clusters);
    std::byte raw[52] = {};
    base::store_be64(raw, h_.refcount_table_offset);
    base::store_be32(raw + 8, h_.refcount_table_clusters);
    base::store_be32(raw + 12, h_.nb_snapshots);
    base::store_be64(raw + 16, h_.snapshots_offset);
    base::store_be64(raw + 24, h_.incompatible_features);
    base::store_be64(raw + 32, h_.compatible_features);
    base::store_be64(raw + 40, h_.autoclear_features);
    base::store_be32(raw + 48, h_.refcount_order);
    const std::span<const std::byte> fields(raw, h_.version >= 3 ? 52 : 12);
    if (int r = co_await write(48, fields); r < 0) {
      io_error(r);
      co_return;
    }
  }

 public:
  // Rebuilds the refcount structures of a clean image with 2^new_order-bit entries (qemu-img
  // amend -o refcount_bits); the header is the commit point. The error names the first cluster
  // whose refcount the new width cannot hold, with qemu-img's message.
  coro::Task<BlockError> change_width(std::uint32_t new_order) {
    co_await check_pass();
    if (r_.check_errors) {
      co_return BlockError{r_.error ? -r_.error : EIO, "Could not check the image's refcounts"};
    }
    if (r_.corruptions || r_.leaks) {
      co_return BlockError{EINVAL, "The image's refcounts are not consistent; repair it first "
                                   "(check -r all)"};
    }
    const std::uint64_t new_max =
        new_order == 6 ? ~0ull : (std::uint64_t{1} << (1u << new_order)) - 1;
    std::optional<std::uint64_t> over;
    for (std::uint64_t c = 0; c < refs_.dense_size() && !over; ++c) {
      if (refs_.get(c) > new_max) over = c;
    }
    for (const auto& [cluster, count] : refs_.sparse()) {
      if (!over && count > new_max) over = cluster;
    }
    if (over) {
      co_return BlockError{
          EINVAL, fmt::format("Cannot decrease refcount entry width to {} bits: Cluster at offset "
                              "0x{:x} has a refcount of {}",
                              1u << new_order, *over << h_.cluster_bits, refs_.get(*over))};
    }
    h_.refcount_order = new_order;
    refcount_max_ = new_max;
    co_await rebuild();
    if (r_.check_errors) {
      co_return BlockError{r_.error ? -r_.error : EIO, "Could not rebuild the refcounts"};
    }
    if (int r = co_await file_.flush(); r < 0) {
      co_return BlockError{-r, "Could not rebuild the refcounts"};
    }
    co_return BlockError{};
  }
  const Header& header() const noexcept { return h_; }

 private:
  coro::Task<void> check_copied() {
    const bool repair = mode_ == RepairMode::kAll ||
                        (mode_ == RepairMode::kLeaks && !r_.check_errors && !r_.corruptions &&
                         !r_.leaks);
    const std::uint32_t block_bits = h_.cluster_bits + 3 - h_.refcount_order;
    auto stored = [&](std::uint64_t offset) -> coro::Task<std::uint64_t> {
      const std::uint64_t c = offset >> h_.cluster_bits;
      std::vector<std::byte> block;
      const int loaded = co_await load_block(c >> block_bits, block);
      if (loaded < 0) co_return 0;
      co_return get_refcount(block, c & ((std::uint64_t{1} << block_bits) - 1),
                             h_.refcount_order);
    };
    for (auto [index, l1_entry] : active_l2_) {
      const std::uint64_t l2 = l1_entry & kL1OffsetMask;
      const std::uint64_t refcount = co_await stored(l2);
      if ((refcount == 1) != ((l1_entry & kEntryCopied) != 0)) {
        ++r_.corruptions;
        if (repair) {
          const std::uint64_t fixed =
              refcount == 1 ? l1_entry | kEntryCopied : l1_entry & ~kEntryCopied;
          std::byte raw[8];
          base::store_be64(raw, fixed);
          if (int r = co_await write(h_.l1_table_offset + index * 8, raw); r < 0) {
            io_error(r);
            co_return;
          }
          --r_.corruptions;
          ++r_.corruptions_fixed;
        }
      }
      const std::uint32_t entry_bytes = h_.l2_entry_bytes();
      const std::uint64_t entries = in_file_entries(l2, h_.l2_entries(), entry_bytes);
      std::vector<std::byte> table(entries * entry_bytes);
      if (int r = co_await read(l2, table); r < 0) {
        io_error(r);
        co_return;
      }
      std::uint64_t dirty = 0;
      for (std::uint64_t i = 0; i < entries; ++i) {
        std::byte* at = table.data() + i * entry_bytes;
        const std::uint64_t entry = load_be64(at);
        if (entry & kEntryCompressed) continue;
        const std::uint64_t offset = entry & kL2OffsetMask;
        if (!offset) continue;
        // A cluster of an external data file has one owner: COPIED always.
        std::uint64_t rc = 1;
        if (!(h_.incompatible_features & kIncompatDataFile)) rc = co_await stored(offset);
        if ((rc == 1) != ((entry & kEntryCopied) != 0)) {
          ++r_.corruptions;
          if (repair) {
            base::store_be64(at, rc == 1 ? entry | kEntryCopied : entry & ~kEntryCopied);
            ++dirty;
          }
        }
      }
      if (dirty) {
        if (int r = co_await write(l2, table); r < 0) {
          io_error(r);
          co_return;
        }
        r_.corruptions -= dirty;
        r_.corruptions_fixed += dirty;
      }
    }
  }

  coro::Task<void> mark_clean() {
    if (h_.version < 3) co_return;
    const std::uint64_t features =
        h_.incompatible_features & ~(kIncompatDirty | kIncompatCorrupt);
    if (features == h_.incompatible_features) co_return;
    std::byte raw[8];
    base::store_be64(raw, features);
    const int written = co_await write(72, raw);
    if (written == 0) {
      h_.incompatible_features = features;
      co_await file_.flush();
    }
  }

  coro::Task<void> check_pass() {
    r_.total_clusters = (h_.size + cs_ - 1) >> h_.cluster_bits;
    co_await load_reftable();
    reference(0, cs_);
    co_await check_l1(h_.l1_table_offset, h_.l1_size, true);
    co_await check_snapshots();
    reference(h_.refcount_table_offset, std::uint64_t{h_.refcount_table_clusters} * cs_);
    co_await check_bitmaps();
    check_refblocks();
    const CheckReport before_compare = r_;
    co_await compare(false);
    if (rebuild_ && mode_ == RepairMode::kAll) {
      const std::uint64_t corruptions = r_.corruptions, leaks = r_.leaks;
      co_await rebuild();
      if (r_.check_errors) co_return;
      r_.corruptions_fixed += corruptions;
      r_.leaks_fixed += leaks;
      r_.corruptions = r_.leaks = 0;
      if (int r = co_await file_.flush(); r < 0) io_error(r);
      co_return;  // the double check reports the rebuilt image
    }
    if (rebuild_ && mode_ != RepairMode::kNone) {
      ++r_.check_errors;  // "need to rebuild refcount structures": only -r all may
      r_.error = -EIO;
      co_return;
    }
    if (mode_ != RepairMode::kNone && (r_.leaks || r_.corruptions)) {
      const std::uint64_t highest = highest_;
      r_ = before_compare;
      co_await compare(true);
      highest_ = std::max(highest_, highest);
    }
    co_await check_copied();
    r_.image_end_offset = (highest_ + 1) * cs_;
    if (mode_ != RepairMode::kNone) co_await file_.flush();
  }

  BlockNode& file_;
  Header h_;
  RepairMode mode_;
  std::uint64_t cs_;
  std::uint64_t file_size_;
  References refs_;
  std::uint64_t refcount_max_;
  std::vector<std::uint64_t> reftable_;
  std::vector<std::pair<std::uint64_t, std::uint64_t>> active_l2_;  // (L1 index, L1 entry)
  std::uint64_t highest_ = 0;
  bool rebuild_ = false;
  CheckReport r_;
};

}  // namespace

coro::Task<CheckReport> check_image(BlockNode& file, Header header, RepairMode mode) {
  Checker checker(file, std::move(header), mode);
  co_return co_await checker.run();
}

coro::Task<BlockError> change_refcount_width(BlockNode& file, Header& header,
                                             std::uint32_t new_order) {
  Checker checker(file, header, RepairMode::kNone);
  BlockError error = co_await checker.change_width(new_order);
  if (error.ok()) header = checker.header();
  co_return error;
}

}  // namespace spindle::block::qcow2
