// Qcow2Node's compressed writes (kWriteCompressed): what `convert -c` stores. Each guest
// cluster is compressed on the context's thread pool (in parallel across requests, no lock
// held), then its bytes are packed after those of the previous compressed cluster in the host
// cluster being filled, and the L2 entry names the byte offset and sector count
// (docs/interop/qcow2.rst, "Compressed Clusters Descriptor").
//
// Ordering is that of any allocating write: the host cluster is counted (a new cluster, or one
// more reference to the one being filled) in the cached refcount blocks, the bytes are written,
// and only then does the L2 entry point at them, so flush() never puts an entry on disk before
// its data and refcount.
#include <algorithm>
#include <cerrno>
#include <cstring>
#include <optional>
#include <vector>

#include "aio/context.h"
#include "aio/thread_pool.h"
#include "block/formats/qcow2/compression.h"
#include "block/formats/qcow2/qcow2_node.h"
#include "coro/run_blocking.h"

namespace spindle::block::qcow2 {

coro::Task<int> Qcow2Node::write_compressed(std::uint64_t offset,
                                            std::span<const std::byte> buffer) {
  const std::uint64_t cs = cluster_size();
  const bool whole = buffer.size() == cs || offset + buffer.size() == size();
  if (offset % cs != 0 || buffer.empty() || buffer.size() > cs || !whole) co_return -EINVAL;
  const std::uint64_t cluster = offset / cs;
  for (;;) {
    InFlightRef wait_for;
    if (claim(cluster, 1, wait_for) == 1) break;
    co_await wait_for->done.wait();
  }
  const int result = co_await write_compressed_claimed(offset, buffer);
  release_claims(cluster, 1);
  if (result != 1) co_return result;
  // Does not compress to less than a cluster: an ordinary write (qemu does the same).
  co_return co_await write_span(offset, buffer.size(), buffer);
}

coro::Task<int> Qcow2Node::write_compressed_claimed(std::uint64_t offset,
                                                    std::span<const std::byte> buffer) {
  const std::uint64_t cs = cluster_size();
  if (external_data_) co_return 1;  // no compressed clusters in a data file: store it plainly
  TableRef l2;
  int result = co_await writable_l2(offset, true, l2);
  if (result < 0) co_return result;
  const std::uint64_t index = (offset / cs) % l2_entries_;
  const std::uint64_t slot = extended_ ? index * 2 : index;
  {
    std::lock_guard lock(meta_mutex_);
    if (!unit_at(*l2, offset).ok) {
      corrupt_.store(true, std::memory_order_release);
      co_return -EIO;
    }
    // Only a cluster with nothing stored may become compressed (as qemu: convert writes into
    // a fresh image).
    const std::uint64_t old = get64(*l2, slot);
    if ((old & kEntryCompressed) || (old & kL2OffsetMask) != 0) co_return -EINVAL;
  }

  std::vector<std::byte> input(cs, std::byte{0});  // a short last cluster is padded with zeros
  std::memcpy(input.data(), buffer.data(), buffer.size());
  // Smaller than a cluster by at least a byte, or not worth storing compressed.
  std::vector<std::byte> output(cs - 1);
  const CompressionType type = header_.compression_type;
  const int length = co_await coro::run_blocking(
      aio::current_context()->thread_pool(),
      [type, &input, &output] { return compress_cluster(type, input, output); });
  if (length == -ENOSPC) co_return 1;
  if (length < 0) co_return length;

  std::uint64_t host = 0;
  result = co_await store_compressed(std::span<const std::byte>(output).first(length), host);
  if (result == -ENOTSUP) co_return 1;
  if (result < 0) co_return result;

  std::lock_guard lock(meta_mutex_);
  CachedTable& table = *l2;
  put64(table, slot,
        encode_compressed_entry(host, static_cast<std::uint64_t>(length), header_.cluster_bits));
  if (extended_) put64(table, slot + 1, 0);  // the bitmap of a compressed cluster is reserved
  ++table.generation;
  co_return 0;
}

coro::Task<int> Qcow2Node::add_reference(std::uint64_t host_offset, bool& added) {
  added = false;
  std::uint64_t now = 0;
  int result = co_await adjust_refcount(host_offset, 0, now);
  // (0: released since; at the largest count: a 1-bit refcount, say)
  if (result < 0 || now == 0 || now >= largest_refcount()) co_return result;
  result = co_await adjust_refcount(host_offset, +1, now);
  added = result >= 0;
  co_return result;
}

coro::Task<int> Qcow2Node::store_compressed(std::span<const std::byte> data,
                                            std::uint64_t& host) {
  const std::uint64_t cs = cluster_size();
  // Bytes are written in whole sectors (or the file's request alignment) from the in-memory
  // copy of their host cluster, so a sector shared with an earlier compressed cluster is
  // rewritten with that cluster's bytes intact.
  const std::uint64_t align =
      std::max<std::uint64_t>(512, std::max<std::uint32_t>(file_->limits().request_alignment, 1));
  if (align > cs) co_return -ENOTSUP;
  auto guard = co_await compressed_mutex_.scoped_lock();
  const auto erase = [this](std::size_t index) {
    filling_.erase(filling_.begin() + static_cast<std::ptrdiff_t>(index));
  };
  // Best fit: the fullest cluster that still has room (requests arrive out of order, mixed
  // with ordinary allocations, so a single "current" cluster would waste its tail each time
  // a large compressed cluster does not fit).
  std::optional<std::size_t> chosen;
  for (std::size_t i = 0; i < filling_.size(); ++i) {
    if (cs - filling_[i].used >= data.size() &&
        (!chosen || filling_[i].used > filling_[*chosen].used)) {
      chosen = i;
    }
  }
  if (chosen) {
    bool added = false;
    const int result = co_await add_reference(filling_[*chosen].base, added);
    if (result < 0) co_return result;
    if (!added) {  // its refcount cannot count one more (1-bit refcounts, say)
      erase(*chosen);
      chosen.reset();
    }
  }
  if (chosen) {
    FillingCluster& cluster = filling_[*chosen];
    const std::uint64_t at = cluster.used;
    std::memcpy(cluster.bytes.data() + at, data.data(), data.size());
    const std::uint64_t from = at / align * align;
    const std::uint64_t to = std::min(cs, (at + data.size() + align - 1) / align * align);
    const int result = co_await file_->write(
        cluster.base + from, std::span<const std::byte>(cluster.bytes).subspan(from, to - from),
        0);
    if (result < 0) {
      erase(*chosen);  // the reference taken stays: a leak at worst
      co_return result;
    }
    host = cluster.base + at;
    cluster.used = at + data.size();
    if (cluster.used == cs) erase(*chosen);
    co_return 0;
  }

  // A new cluster. When it follows one being filled, the bytes start in that one's tail and
  // spill over (as qemu packs them).
  std::uint64_t fresh = 0;
  int result = co_await allocate_clusters(1, fresh);
  if (result < 0) co_return result;
  std::optional<std::size_t> before;
  for (std::size_t i = 0; i < filling_.size(); ++i) {
    if (filling_[i].base + cs == fresh) before = i;
  }
  if (before) {
    bool added = false;
    result = co_await add_reference(filling_[*before].base, added);
    if (result < 0 || !added) {
      erase(*before);
      before.reset();
    }
  }
  FillingCluster next{fresh, 0, std::vector<std::byte>(cs, std::byte{0})};
  std::uint64_t head = 0;  // bytes in the cluster before `fresh`
  std::vector<std::byte> spill;
  std::uint64_t write_at = fresh;
  if (before) {
    FillingCluster& tail = filling_[*before];
    head = cs - tail.used;
    std::memcpy(tail.bytes.data() + tail.used, data.data(), head);
    const std::uint64_t from = tail.used / align * align;
    spill.assign(tail.bytes.begin() + static_cast<std::ptrdiff_t>(from), tail.bytes.end());
    write_at = tail.base + from;
    host = tail.base + tail.used;
  } else {
    host = fresh;
  }
  std::memcpy(next.bytes.data(), data.data() + head, data.size() - head);
  next.used = data.size() - head;
  const std::uint64_t to = std::min(cs, (next.used + align - 1) / align * align);
  spill.insert(spill.end(), next.bytes.begin(), next.bytes.begin() + static_cast<std::ptrdiff_t>(to));
  result = co_await file_->write(write_at, std::span<const std::byte>(spill), 0);
  if (before) erase(*before);  // full now (or unusable after a failed write)
  if (result < 0) {
    std::lock_guard lock(meta_mutex_);
    pending_frees_.push_back(fresh);
    co_return result;
  }
  if (next.used == cs) co_return 0;
  if (filling_.size() >= kFillingClusters) {
    // Give up on the fullest one: its room is the smallest.
    erase(static_cast<std::size_t>(
        std::max_element(filling_.begin(), filling_.end(),
                         [](const FillingCluster& a, const FillingCluster& b) {
                           return a.used < b.used;
                         }) -
        filling_.begin()));
  }
  filling_.push_back(std::move(next));
  co_return 0;
}

}  // namespace spindle::block::qcow2
