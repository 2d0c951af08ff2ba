#include "block/formats/qed/qed_node.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "aio/context.h"
#include "base/fatal.h"
#include "base/io_buffer.h"
#include "coro/coroutine.h"

namespace spindle::block::qed {

namespace {

BlockError io_error(int result, const char* what) {
  return {-result, fmt::format("{}: {}", what, std::strerror(-result))};
}

}  // namespace

QedNode::QedNode(Private, BlockNodeRef file, const Header& header, Table l1,
                 std::string backing_name, bool read_only)
    : file_(std::move(file)),
      read_only_(read_only),
      geometry_(Geometry::make(header.cluster_size, header.table_size)),
      backing_name_(std::move(backing_name)),
      image_size_(header.image_size),
      header_(header),
      l1_(std::move(l1)) {
  const std::uint64_t child_size = file_->size();
  file_size_ = child_size - child_size % header.cluster_size;
  open_file_size_ = file_size_;
  index_l1();
}

QedNode::~QedNode() {
  std::lock_guard lock(timer_mutex_);
  // A job holds `this`; close() waits for it.
  if (idle_jobs_ > 0) base::fatal("QED node destroyed while its need-check job runs: close() it first");
}

coro::Task<BlockResult<QedNodeRef>> open_qed(BlockNodeRef file, OpenOptions options) {
  const std::uint64_t child_size = file->size();
  if (child_size < kHeaderBytes) {
    co_return BlockError{EINVAL, fmt::format("QED header is truncated: the file holds {} bytes, "
                                           "the header needs {}",
                                           child_size, kHeaderBytes)};
  }
  std::vector<std::byte> raw(kHeaderBytes);
  int result = co_await file->read(0, std::span(raw), 0);
  if (result < 0) co_return io_error(result, "cannot read the QED header");
  Header header = decode_header(raw);
  if (BlockError error = validate_header(header, child_size); !error.ok()) co_return error;

  const Geometry geometry = Geometry::make(header.cluster_size, header.table_size);
  std::string backing_name;
  if (header.features & kFeatureBackingFile) {
    backing_name.resize(header.backing_filename_size);
    result = co_await file->read(header.backing_filename_offset,
                                 std::as_writable_bytes(std::span(backing_name)), 0);
    if (result < 0) co_return io_error(result, "cannot read the QED backing file name");
  }
  Table l1;
  result = co_await load_table(*file, geometry, header.l1_table_offset, l1);
  if (result < 0) co_return io_error(result, "cannot read the QED L1 table");

  const bool read_only = options.read_only || file->read_only();
  auto node = std::make_shared<QedNode>(QedNode::Private{}, file, header, std::move(l1),
                                        backing_name, read_only);

  if (!read_only && (header.autoclear_features & ~kKnownAutoclearFeatures)) {
    // Unknown autoclear bits must be cleared before the image is modified.
    header.autoclear_features &= kKnownAutoclearFeatures;
    node->header_ = header;
    result = co_await node->write_header(header);
    if (result >= 0) result = co_await file->flush();
    if (result < 0) co_return io_error(result, "cannot clear QED autoclear features");
  }

  if ((header.features & kFeatureBackingFile) && !options.ignore_backing) {
    if (!options.open_backing) {
      co_return BlockError{ENOTSUP, fmt::format("QED image has a backing file '{}' but no way "
                                              "to open it was given",
                                              backing_name)};
    }
    const std::string format =
        (header.features & kFeatureBackingFormatNoProbe) ? std::string("raw") : std::string();
    BlockResult<BlockNodeRef> backing = co_await options.open_backing(backing_name, format);
    if (!backing.ok()) {
      BlockError error = backing.error();
      error.message = "Could not open backing file: " + error.message;
      co_return error;
    }
    node->backing_ = std::move(backing).value();
  }

  if ((header.features & kFeatureNeedCheck) && !read_only && options.repair_if_dirty) {
    const CheckResult check = co_await node->check(true);
    if (check.check_errors || check.corruptions) {
      co_return BlockError{EINVAL, fmt::format("QED image is dirty and its repair failed ({} "
                                             "corruptions, {} check errors)",
                                             check.corruptions, check.check_errors)};
    }
  }
  if (!read_only && !node->backing_) {  // only then is NEED_CHECK used
    aio::Context* here = aio::current_context();
    aio::Context& context = here ? *here : aio::main_context();
    QedNode* raw = node.get();
    std::lock_guard lock(node->timer_mutex_);
    node->need_check_delay_ = options.need_check_delay;
    node->timer_context_ = &context;
    node->timer_ = std::make_unique<aio::Timer>(context, aio::Clock::monotonic,
                                                [raw] { raw->on_need_check_timer(); });
  }
  co_return node;
}

coro::Task<Header> QedNode::header() {
  auto guard = co_await table_lock_.scoped_lock();
  co_return header_;
}

void QedNode::index_l1() {
  const std::uint64_t table_bytes = geometry_.table_bytes;
  const std::uint64_t l1_offset = header_.l1_table_offset;
  std::vector<std::uint8_t> state(l1_.size(), kL1Unseen);
  std::vector<std::pair<std::uint64_t, std::uint64_t>> targets;  // (L2 offset, L1 index)
  for (std::uint64_t i = 0; i < l1_.size(); ++i) {
    const std::uint64_t entry = l1_[i];
    if (entry == 0) continue;
    if (i < l1_state_.size() && l1_state_[i] != kL1Unseen) {
      state[i] = l1_state_[i];  // still bad, or still loaded since open
      if (state[i] == kL1Bad) continue;
    }
    if (!is_table_offset_valid(header_, file_size_, entry)) {
      state[i] = kL1Bad;
      continue;
    }
    targets.emplace_back(entry, i);
  }
  std::sort(targets.begin(), targets.end());
  metadata_tables_.clear();
  metadata_tables_.push_back(l1_offset);
  for (std::size_t k = 0; k < targets.size(); ++k) {
    const auto [offset, index] = targets[k];
    metadata_tables_.push_back(offset);
    if (offset < l1_offset + table_bytes && l1_offset < offset + table_bytes) state[index] = kL1Bad;
    if (k > 0 && offset < targets[k - 1].first + table_bytes) {  // overlaps the previous one
      state[index] = kL1Bad;
      state[targets[k - 1].second] = kL1Bad;
    }
  }
  std::sort(metadata_tables_.begin(), metadata_tables_.end());
  l1_state_ = std::move(state);
}

void QedNode::validate_l2(std::uint64_t l2_offset, const Table& table, bool first_load) {
  // Entries at metadata are caught on lookup (in_metadata()); here only what the file size
  // decides, which changes as the file grows. A first pass without branches on the data.
  const std::uint64_t limit = first_load ? open_file_size_ : file_size_;
  const std::uint64_t header_end = std::uint64_t{header_.header_size} * geometry_.cluster_size;
  const std::uint64_t cluster_mask = geometry_.cluster_size - 1;
  // Entries 0 and 1 are below header_end: `entry - header_end` wraps for them as for any
  // other entry in the header, so the range test is one comparison.
  const std::uint64_t span = limit > header_end ? limit - header_end : 0;
  auto misfit = [&](std::uint64_t entry) -> std::uint64_t {
    return (entry > kZeroClusterEntry) &
           ((entry & cluster_mask) != 0 || entry - header_end >= span);
  };
  std::uint64_t any = 0;
  for (const std::uint64_t entry : table) any |= misfit(entry);
  if (any == 0) return;
  std::vector<std::uint64_t> found;
  for (std::uint64_t i = 0; i < table.size(); ++i) {
    if (misfit(table[i])) found.push_back(l2_offset + i * 8);
  }
  const auto middle = static_cast<std::ptrdiff_t>(bad_entries_.size());
  bad_entries_.insert(bad_entries_.end(), found.begin(), found.end());
  std::inplace_merge(bad_entries_.begin(), bad_entries_.begin() + middle, bad_entries_.end());
  bad_entries_.erase(std::unique(bad_entries_.begin(), bad_entries_.end()), bad_entries_.end());
}

bool QedNode::in_metadata(std::uint64_t offset, std::uint64_t& free_end) const noexcept {
  // The last table starting at or before `offset` is the only one that can contain it (all
  // tables have the same length).
  const auto next = std::upper_bound(metadata_tables_.begin(), metadata_tables_.end(), offset);
  if (next != metadata_tables_.begin() && offset < *(next - 1) + geometry_.table_bytes) return true;
  free_end = next == metadata_tables_.end() ? std::numeric_limits<std::uint64_t>::max() : *next;
  return false;
}

bool QedNode::is_bad_entry(std::uint64_t l2_offset, std::uint64_t index) const noexcept {
  return !bad_entries_.empty() &&
         std::binary_search(bad_entries_.begin(), bad_entries_.end(), l2_offset + index * 8);
}

coro::Task<int> QedNode::find_run(std::uint64_t pos, std::uint64_t length, Run& run) {
  length = std::min(length, geometry_.l2_end(pos) - pos);
  run = Run{};
  const std::uint64_t l1_index = geometry_.l1_index(pos);
  if (l1_index >= l1_.size()) co_return -EINVAL;
  const std::uint64_t l2_offset = l1_[l1_index];
  if (l2_offset == 0) {
    run.kind = Kind::kUnallocated;
    run.bytes = length;
    co_return 0;
  }
  if (l1_state_[l1_index] == kL1Bad) {
    corrupt_ = true;
    co_return -EIO;
  }
  TableRef table = l2_cache_.find(l2_offset);
  if (!table) {
    auto loaded = std::make_shared<Table>();
    const int result = co_await load_table(*file_, geometry_, l2_offset, *loaded);
    if (result < 0) co_return result;
    validate_l2(l2_offset, *loaded, l1_state_[l1_index] == kL1Unseen);
    l1_state_[l1_index] = kL1Seen;
    table = l2_cache_.insert(l2_offset, std::move(loaded));
  }
  const int result = scan_l2(std::move(table), pos, length, run);
  if (result == -EIO) corrupt_ = true;
  co_return result;
}

coro::Task<void> QedNode::mark_corrupt(bool allocating) {
  if (read_only_) co_return;
  {
    auto guard = co_await table_lock_.scoped_lock();
    if (!corrupt_ || corrupt_marked_) co_return;
  }
  if (!allocating) co_await allocation_lock_.lock();
  bool needed;
  {
    auto guard = co_await table_lock_.scoped_lock();
    needed = corrupt_ && !corrupt_marked_;
    corrupt_marked_ = corrupt_marked_ || needed;
  }
  // Writes only the header: never anything a table entry points at. On failure the bit may be
  // missing on disk, but corrupt_ still refuses the bad entries.
  if (needed) (void)co_await set_need_check(true);
  if (!allocating) allocation_lock_.unlock();
}

int QedNode::scan_l2(TableRef table, std::uint64_t pos, std::uint64_t length, Run& run) const {
  length = std::min(length, geometry_.l2_end(pos) - pos);
  run.l2 = std::move(table);
  const Table& entries = *run.l2;
  const std::uint64_t l2_offset = l1_[geometry_.l1_index(pos)];
  const std::uint64_t cluster_size = geometry_.cluster_size;
  std::uint64_t index = geometry_.l2_index(pos);
  const std::uint64_t first = entries[index];
  auto kind_of = [](std::uint64_t entry) {
    if (entry == kUnallocatedEntry) return Kind::kUnallocated;
    if (entry == kZeroClusterEntry) return Kind::kZero;
    return Kind::kData;
  };
  run.kind = kind_of(first);
  std::uint64_t free_end = 0;  // kData: where the next table after `first` starts
  if (run.kind == Kind::kData) {
    if (!is_cluster_offset_valid(header_, file_size_, first) || is_bad_entry(l2_offset, index) ||
        in_metadata(first, free_end)) {
      return -EIO;
    }
    run.host_offset = first + geometry_.in_cluster(pos);
  }
  std::uint64_t bytes = cluster_size - geometry_.in_cluster(pos);
  std::uint64_t expected = first + cluster_size;
  while (bytes < length && ++index < geometry_.table_entries) {
    const std::uint64_t entry = entries[index];
    if (kind_of(entry) != run.kind) break;
    if (run.kind == Kind::kData) {
      if (entry != expected || entry >= free_end ||
          !is_cluster_offset_valid(header_, file_size_, entry) || is_bad_entry(l2_offset, index)) {
        break;
      }
      expected += cluster_size;
    }
    bytes += cluster_size;
  }
  run.bytes = std::min(bytes, length);
  return 0;
}

std::optional<HostFileRange> QedNode::host_file_range(std::uint64_t offset,
                                                      std::uint64_t bytes) const noexcept {
  if (bytes == 0 || !table_lock_.try_lock()) return std::nullopt;
  std::optional<std::uint64_t> host_offset;
  const std::uint64_t l1_index = geometry_.l1_index(offset);
  if (l1_index < l1_.size() && l1_[l1_index] != 0 && l1_state_[l1_index] != kL1Bad) {
    if (TableRef table = l2_cache_.peek(l1_[l1_index])) {
      Run run;
      if (scan_l2(std::move(table), offset, bytes, run) == 0 && run.kind == Kind::kData &&
          run.bytes >= bytes) {
        host_offset = run.host_offset;
      }
    }
  }
  table_lock_.unlock();
  if (!host_offset) return std::nullopt;
  return file_->host_file_range(*host_offset, bytes);
}

coro::Task<int> QedNode::read_backing(std::uint64_t pos, std::span<std::byte> buffer) {
  std::size_t copied = 0;
  if (backing_) {
    const std::uint64_t backing_size = backing_->size();
    if (pos < backing_size) {
      copied = static_cast<std::size_t>(std::min<std::uint64_t>(buffer.size(), backing_size - pos));
      const int result = co_await backing_->read(pos, buffer.first(copied), 0);
      if (result < 0) co_return result;
    }
  }
  std::fill(buffer.begin() + static_cast<std::ptrdiff_t>(copied), buffer.end(), std::byte{0});
  co_return 0;
}

coro::Task<int> QedNode::read(std::uint64_t offset, std::span<std::byte> buffer,
                              std::uint32_t flags) {
  std::uint64_t done = 0;
  while (done < buffer.size()) {
    const std::uint64_t pos = offset + done;
    Run run;
    {
      co_await table_lock_.lock();
      const int result = co_await find_run(pos, buffer.size() - done, run);
      table_lock_.unlock();
      if (result < 0) {
        co_await mark_corrupt(false);
        co_return result;
      }
    }
    std::span<std::byte> part = buffer.subspan(done, run.bytes);
    int result = 0;
    switch (run.kind) {
      case Kind::kZero:
        std::fill(part.begin(), part.end(), std::byte{0});
        break;
      case Kind::kUnallocated:
        result = co_await read_backing(pos, part);
        break;
      case Kind::kData:
        result = co_await file_->read(run.host_offset, part, 0);
        break;
    }
    if (result < 0) co_return result;
    done += run.bytes;
  }
  co_return 0;
}

coro::Task<int> QedNode::write_header(const Header& header) {
  std::vector<std::byte> bytes(kHeaderBytes);
  encode_header(header, bytes);
  co_return co_await file_->write(0, std::span<const std::byte>(bytes), 0);
}

coro::Task<int> QedNode::set_need_check(bool dirty) {
  Header header;
  {
    auto guard = co_await table_lock_.scoped_lock();
    if (((header_.features & kFeatureNeedCheck) != 0) == dirty) co_return 0;
    if (!dirty && corrupt_) co_return 0;  // stays set until a check finds the image clean
    if (dirty) {
      header_.features |= kFeatureNeedCheck;
    } else {
      header_.features &= ~kFeatureNeedCheck;
    }
    header = header_;
  }
  int result = 0;
  if (!dirty) result = co_await file_->flush();  // everything the bit guarded is on disk first
  if (result >= 0) result = co_await write_header(header);
  // QEMU does not flush after setting the bit (reference/qed.md §2.4, pitfall H); we do, so that
  // no L2 update can reach the disk before the bit.
  if (result >= 0) result = co_await file_->flush();
  co_return result;
}

coro::Task<int> QedNode::write_cow(Kind kind, std::uint64_t pos, std::uint64_t length,
                                   std::uint64_t host_offset) {
  if (length == 0) co_return 0;
  base::IoBytes buffer(length);
  if (kind == Kind::kUnallocated) {
    const int result = co_await read_backing(pos, std::span(buffer));
    if (result < 0) co_return result;
  }
  co_return co_await file_->write(host_offset, std::span<const std::byte>(buffer), 0);
}

coro::Task<int> QedNode::allocate_run(std::uint64_t pos, const Run& run,
                                      std::span<const std::byte> data, AllocationMode mode) {
  // Entered with allocation_lock_ and table_lock_ held.
  const std::uint64_t cluster_size = geometry_.cluster_size;
  const std::uint64_t in_cluster = geometry_.in_cluster(pos);
  const std::uint64_t clusters = geometry_.clusters_for(in_cluster + run.bytes);
  std::uint64_t new_offset = kZeroClusterEntry;
  if (mode == AllocationMode::kData) {
    new_offset = file_size_;
    file_size_ += clusters * cluster_size;
  }
  const bool need_dirty = !backing_ && !(header_.features & kFeatureNeedCheck);
  table_lock_.unlock();

  int result = 0;
  if (need_dirty) {
    result = co_await set_need_check(true);
    if (result < 0) co_return result;
  }
  if (mode == AllocationMode::kData) {
    const std::uint64_t cluster_begin = pos - in_cluster;
    const std::uint64_t end = pos + run.bytes;
    const std::uint64_t cluster_end = cluster_begin + clusters * cluster_size;
    result = co_await write_cow(run.kind, cluster_begin, in_cluster, new_offset);
    if (result >= 0) result = co_await file_->write(new_offset + in_cluster, data, 0);
    if (result >= 0) {
      result = co_await write_cow(run.kind, end, cluster_end - end,
                                  new_offset + (end - cluster_begin));
    }
    // With a backing file, the COW data must be durable before an L2 entry points at it.
    if (result >= 0 && backing_) result = co_await file_->flush();
    if (result < 0) co_return result;
  }

  const std::uint64_t first = geometry_.l2_index(pos);
  const std::uint64_t step = mode == AllocationMode::kData ? cluster_size : 0;
  if (run.l2) {
    // Existing L2 table: patch the cached entries, write the changed slice.
    TableSlice slice;
    {
      auto guard = co_await table_lock_.scoped_lock();
      Table& table = *run.l2;
      const std::uint64_t l2_offset = l1_[geometry_.l1_index(pos)];
      for (std::uint64_t i = 0; i < clusters; ++i) table[first + i] = new_offset + i * step;
      if (!bad_entries_.empty()) {
        // Entries we overwrite held 0 or 1: any record of them is stale (left by a repair).
        const auto begin = std::lower_bound(bad_entries_.begin(), bad_entries_.end(),
                                            l2_offset + first * 8);
        const auto end = std::lower_bound(begin, bad_entries_.end(),
                                          l2_offset + (first + clusters) * 8);
        bad_entries_.erase(begin, end);
      }
      slice = encode_table_slice(geometry_, l2_offset, table, first, clusters);
    }
    co_return co_await write_table_slice(*file_, slice);
  }

  // No L2 table yet: write a new one, flush, then link it from the L1 table.
  auto table = std::make_shared<Table>(geometry_.table_entries, 0);
  for (std::uint64_t i = 0; i < clusters; ++i) (*table)[first + i] = new_offset + i * step;
  std::uint64_t table_offset;
  TableSlice l1_slice;
  const std::uint64_t l1_index = geometry_.l1_index(pos);
  {
    auto guard = co_await table_lock_.scoped_lock();
    table_offset = file_size_;
    file_size_ += geometry_.table_bytes;
    Table l1_copy(l1_);
    l1_copy[l1_index] = table_offset;
    l1_slice = encode_table_slice(geometry_, header_.l1_table_offset, l1_copy, l1_index, 1);
  }
  const TableSlice l2_slice =
      encode_table_slice(geometry_, table_offset, *table, 0, geometry_.table_entries);
  result = co_await write_table_slice(*file_, l2_slice);
  if (result >= 0) result = co_await file_->flush();
  if (result >= 0) result = co_await write_table_slice(*file_, l1_slice);
  if (result < 0) co_return result;
  auto guard = co_await table_lock_.scoped_lock();
  l1_[l1_index] = table_offset;
  l1_state_[l1_index] = kL1Seen;
  metadata_tables_.push_back(table_offset);  // past every other table: stays sorted
  l2_cache_.insert(table_offset, std::move(table));
  co_return 0;
}

coro::Task<int> QedNode::write_runs(std::uint64_t offset, std::uint64_t length,
                                    std::span<const std::byte> data, AllocationMode mode) {
  bool allocating = false;  // this request holds allocation_lock_
  int result = 0;
  std::uint64_t done = 0;
  std::vector<std::byte> zeros;
  while (done < length) {
    const std::uint64_t pos = offset + done;
    Run run;
    co_await table_lock_.lock();
    result = co_await find_run(pos, length - done, run);
    if (result < 0) {
      table_lock_.unlock();
      co_await mark_corrupt(allocating);
      break;
    }
    const std::span<const std::byte> part =
        mode == AllocationMode::kData ? data.subspan(done, run.bytes) : std::span<const std::byte>();
    if (run.kind == Kind::kData) {
      table_lock_.unlock();
      if (mode == AllocationMode::kData) {
        result = co_await file_->write(run.host_offset, part, 0);
      } else {
        // Zeroing an allocated cluster writes zeros in place (as QEMU does).
        zeros.assign(std::min<std::uint64_t>(run.bytes, 1 << 20), std::byte{0});
        for (std::uint64_t at = 0; at < run.bytes && result >= 0; at += zeros.size()) {
          const std::uint64_t n = std::min<std::uint64_t>(zeros.size(), run.bytes - at);
          result = co_await file_->write(run.host_offset + at,
                                         std::span<const std::byte>(zeros.data(), n), 0);
        }
      }
    } else if (mode == AllocationMode::kZero && run.kind == Kind::kZero) {
      table_lock_.unlock();  // already zero clusters
    } else if (!allocating) {
      // Become the allocating request, then look up again: another request may have
      // allocated these clusters meanwhile.
      table_lock_.unlock();
      co_await allocation_lock_.lock();
      allocating = true;
      continue;
    } else {
      result = co_await allocate_run(pos, run, part, mode);  // releases table_lock_
    }
    if (result < 0) break;
    done += run.bytes;
  }
  if (allocating) {
    allocation_lock_.unlock();
    // Armed only now: a timer that fired while we held the lock would have given up.
    arm_need_check_timer();
  }
  co_return result < 0 ? result : 0;
}

coro::Task<int> QedNode::write(std::uint64_t offset, std::span<const std::byte> buffer,
                               std::uint32_t flags) {
  if (read_only_) co_return -EROFS;
  int result = co_await write_runs(offset, buffer.size(), buffer, AllocationMode::kData);
  if (result >= 0 && (flags & kFua)) result = co_await file_->flush();
  co_return result;
}

coro::Task<int> QedNode::write_zeroes(std::uint64_t offset, std::uint64_t bytes,
                                      std::uint32_t flags) {
  if (read_only_) co_return -EROFS;
  const std::uint64_t cluster_size = geometry_.cluster_size;
  std::uint64_t head_end = std::min(offset + bytes, (offset + cluster_size - 1) / cluster_size * cluster_size);
  std::uint64_t tail_begin = std::max(head_end, (offset + bytes) / cluster_size * cluster_size);
  // The image's last cluster may be partial: zero it as a cluster if the range reaches the end.
  if (offset + bytes == size() && tail_begin < offset + bytes) tail_begin = offset + bytes;
  if ((flags & kNoFallback) && (head_end != offset || tail_begin != offset + bytes)) {
    co_return -ENOTSUP;
  }
  int result = 0;
  if (head_end > offset) {
    result = co_await BlockNode::write_zeroes(offset, head_end - offset, flags & ~kFua);
  }
  if (result >= 0 && tail_begin > head_end) {
    result = co_await write_runs(head_end, tail_begin - head_end, {}, AllocationMode::kZero);
  }
  if (result >= 0 && offset + bytes > tail_begin) {
    result = co_await BlockNode::write_zeroes(tail_begin, offset + bytes - tail_begin, flags & ~kFua);
  }
  if (result >= 0 && (flags & kFua)) result = co_await file_->flush();
  co_return result;
}

coro::Task<int> QedNode::flush() {
  int result = co_await file_->flush();
  if (result < 0 || read_only_) co_return result;
  // Simple need-check policy: the bit is cleared at every flush once no allocating request runs.
  bool dirty;
  {
    auto guard = co_await table_lock_.scoped_lock();
    dirty = header_.features & kFeatureNeedCheck;
  }
  if (!dirty) co_return 0;
  co_await allocation_lock_.lock();
  result = co_await set_need_check(false);
  allocation_lock_.unlock();
  co_return result;
}

coro::Task<int> QedNode::close() {
  timer_mutex_.lock();
  closing_ = true;
  if (timer_) timer_->cancel();
  while (idle_jobs_ > 0) co_await jobs_done_.wait(timer_mutex_);
  timer_mutex_.unlock();
  co_return co_await flush();
}

// ---- need-check timer -----------------------------------------------------------------------

void QedNode::arm_need_check_timer() {
  std::lock_guard lock(timer_mutex_);
  if (timer_ && !closing_) timer_->arm_in(need_check_delay_);
}

void QedNode::on_need_check_timer() {
  aio::Context* context;
  {
    std::lock_guard lock(timer_mutex_);
    if (closing_) return;
    ++idle_jobs_;
    context = timer_context_;  // this thread's context: only attach_context() changes it, here
  }
  coro::spawn(*context, need_check_job());
}

coro::Task<void> QedNode::need_check_job() {
  // Never waits for allocation_lock_: an allocating request that holds it re-arms the timer
  // when it finishes, and while it waits we would only delay it.
  if (allocation_lock_.try_lock()) {
    (void)co_await set_need_check(false);  // on failure the bit stays set: close() retries
    allocation_lock_.unlock();
  }
  std::function<void()> hook;
  {
    std::lock_guard lock(timer_mutex_);
    hook = timer_hook_;
  }
  if (hook) hook();
  std::lock_guard lock(timer_mutex_);
  if (--idle_jobs_ == 0) jobs_done_.restart_all();
}

aio::Context* QedNode::need_check_context() const {
  std::lock_guard lock(timer_mutex_);
  return timer_ ? timer_context_ : nullptr;
}

void QedNode::set_need_check_hook(std::function<void()> hook) {
  std::lock_guard lock(timer_mutex_);
  timer_hook_ = std::move(hook);
}

coro::Task<void> QedNode::quiesce() {
  bool has_timer;
  {
    std::lock_guard lock(timer_mutex_);
    has_timer = timer_ != nullptr;
  }
  if (has_timer) {
    // As the timer would, but now and waiting for allocating requests of other users.
    co_await allocation_lock_.lock();
    {
      std::lock_guard lock(timer_mutex_);
      timer_->cancel();
    }
    (void)co_await set_need_check(false);
    allocation_lock_.unlock();
  }
  co_await file_->quiesce();
  if (backing_) co_await backing_->quiesce();
}

coro::Task<void> QedNode::attach_context(aio::Context& context) {
  aio::Context* origin = aio::current_context();
  aio::Context* old_context;
  {
    std::lock_guard lock(timer_mutex_);
    old_context = timer_ ? timer_context_ : nullptr;
  }
  if (old_context != nullptr && old_context != &context) {
    bool dirty;
    {
      auto guard = co_await table_lock_.scoped_lock();
      dirty = header_.features & kFeatureNeedCheck;
    }
    // Replace the timer on its own thread: there none of its callbacks can be running, so it
    // may be destroyed, and a callback that already ran has counted its job in idle_jobs_.
    co_await coro::switch_to(*old_context);
    std::unique_ptr<aio::Timer> retired;
    {
      std::lock_guard lock(timer_mutex_);
      const bool rearm = (timer_->armed() || dirty) && !closing_;
      retired = std::move(timer_);
      timer_context_ = &context;
      timer_ = std::make_unique<aio::Timer>(context, aio::Clock::monotonic,
                                            [this] { on_need_check_timer(); });
      if (rearm) timer_->arm_in(need_check_delay_);
    }
    retired.reset();
    if (origin != nullptr) co_await coro::switch_to(*origin);
  }
  co_await file_->attach_context(context);
  if (backing_) co_await backing_->attach_context(context);
}

coro::Task<BlockStatus> QedNode::block_status(std::uint64_t offset, std::uint64_t bytes) {
  BlockStatus status;
  Run run;
  co_await table_lock_.lock();
  const int result = co_await find_run(offset, bytes, run);
  table_lock_.unlock();
  if (result < 0) {
    co_await mark_corrupt(false);
    status.error = result;
    status.flags = kStatusAllocated;
    status.bytes = std::min<std::uint64_t>(bytes, geometry_.cluster_size - geometry_.in_cluster(offset));
    co_return status;
  }
  status.bytes = run.bytes;
  switch (run.kind) {
    case Kind::kData:
      status.flags = kStatusData | kStatusOffsetValid | kStatusAllocated;
      status.file_offset = run.host_offset;
      break;
    case Kind::kZero:
      status.flags = kStatusZero | kStatusAllocated;
      break;
    case Kind::kUnallocated:
      status.flags = backing_ ? 0u : std::uint32_t{kStatusZero};
      break;
  }
  if (offset + status.bytes >= size()) status.flags |= kStatusEof;
  co_return status;
}

coro::Task<int> QedNode::truncate(std::uint64_t new_size) {
  if (read_only_) co_return -EROFS;
  const std::uint64_t old_size = size();
  if (new_size < old_size) co_return -ENOTSUP;  // "Shrinking images is currently not supported"
  if (new_size == old_size) co_return 0;
  if (!is_image_size_valid(geometry_, new_size)) co_return -EINVAL;
  auto allocation = co_await allocation_lock_.scoped_lock();
  Header header;
  {
    auto guard = co_await table_lock_.scoped_lock();
    header = header_;
    header.image_size = new_size;
  }
  int result = co_await write_header(header);
  if (result >= 0) result = co_await file_->flush();
  if (result < 0) co_return result;
  auto guard = co_await table_lock_.scoped_lock();
  header_.image_size = new_size;
  image_size_.store(new_size, std::memory_order_release);
  co_return 0;
}

int QedNode::replace_child(std::string_view role, BlockNodeRef child) {
  if (role == "file") return -ENOTSUP;
  if (role != "backing") return -ENOENT;
  backing_ = std::move(child);
  return 0;
}

}  // namespace spindle::block::qed
