// Qcow2Node: the qcow2 image format driver (docs/interop/qcow2.rst), a BlockNode over the
// protocol node holding the image bytes, with an optional backing node for what the image does
// not allocate. open_qcow2() validates the header and the table locations before any table is
// read; the registry entry (qcow2_format.cc) calls it.
//
// Reads: each run of guest bytes within one L2 table is classified from the L1 entry and the
// L2 entries (or, with extended L2, the subcluster bitmaps): unallocated (the backing node,
// zeros past its end or without one), zero, data (host-contiguous clusters merged into one
// read), compressed (deflate or zstd, one cluster at a time). An entry with reserved bits,
// an unaligned offset, an offset past the end of the file (for entries read from the file:
// past the end it had at open, however far it has grown since) or at metadata (the header,
// the L1 table, the refcount table, a refcount block, an L2 table) makes that range fail with
// -EIO; it is never overwritten, and the image is marked corrupt (the header's corrupt bit,
// written for writable version 3 opens only, as QEMU does) and takes no more writes.
//
// Writes: a cluster whose entry is a plain data cluster with the COPIED bit (refcount 1) is
// written in place. Any other cluster is allocated: new host clusters (freed data clusters, see
// below, or else at the end of the file), counted in cached refcount blocks (new refcount blocks,
// and a larger refcount table, made as needed); the untouched parts of the cluster are copied from
// its old content (backing file, zeros, a compressed or shared cluster); the data is written; then
// the L2 entry (in a new L2 table if the L1 entry is empty) points at it, with COPIED. Extended L2:
// only the subclusters written become allocated (their zero bits cleared, the others' bits kept),
// partial ones completed from their old content (backing file or zeros); an unallocated or zero
// cluster gets a new host cluster, and a COPIED data cluster keeps its own, written in place at the
// new subclusters; a compressed or shared cluster is copied whole, every subcluster
// allocated. As qemu does, only the subclusters written reach the file, so the file may end
// inside its last host cluster. Clusters the old entries held are released only after the L2
// tables that no longer name them are on disk. Data clusters left at refcount 0 that way are
// reused for new guest data once every request that might still use their old mapping has
// finished (free_cluster_pool.h: reads, writes, zeroes and discards each hold an epoch guard);
// everything else is allocated at the end of the file. An L2 table shared with an internal
// snapshot (L1 entry without COPIED) is first copied to a new cluster (the copy written before
// the L1 entry names it, the old table's reference dropped after). With an external data file
// (FormatOpenOptions::open_data_file opens it) data clusters live there at their guest offsets,
// unrefcounted, and the data file is flushed before any table is written; a raw data file
// (data_file_raw) gets zeros written and holes punched for zeroes and discards, so that it
// always reads as the guest's view.
// Compressed writes (kWriteCompressed, from convert -c) pack compressed clusters byte-wise
// into host clusters, each host cluster's refcount counting the compressed clusters touching
// it (one may span two adjacent host clusters); a few host clusters are filled at once, so
// out-of-order requests still pack densely.
//
// Crash consistency: L2 tables, refcount blocks, the L1 table and the refcount table are
// cached write-back. flush() snapshots all of them at one instant (under meta_mutex_), then
// writes the refcount blocks, (flushes and writes the refcount table if it changed), flushes,
// writes the L2 tables, flushes, writes the L1 table, flushes, and finally applies the
// deferred releases (refcount blocks written again, flushed). Every L2 entry in
// the snapshot was set after its clusters were counted and after their data was written, so
// the file never holds an entry pointing at a cluster with refcount 0 or at unwritten COW
// data: a crash leaves at worst leaked clusters (qemu-img check exit 3).
//
// Locking protocol (thread-safety): the node may be used by coroutines on several contexts
// at once.
//   header_ (its immutable parts), file_, read_only_   immutable after open
//                        (l1_ of a read-only node: set once more by view_snapshot(), before
//                        any request)
//   backing_             set during open; changed only by replace_child() (drained section)
//   size_                atomic (size()); changed only by truncate()
//   meta_mutex_          std::mutex, never held across a suspension. Protects l1_,
//                        l1_on_disk_, rctable_, their generations, the two TableCaches and
//                        the contents of every ready cached table, next_free_,
//                        refblock_clusters_, l2_clusters_, new_refblocks_, known_bad_l2_,
//                        in_flight_, pending_frees_, pending_data_frees_, free_clusters_
//                        (but for its lock-free enter()), and the header's mutable fields (L1 and
//                        refcount table location and size, size, feature bits).
//   in_flight_           one record per guest cluster being allocated, zeroed or discarded,
//                        or (extended L2) having subclusters allocated. A second request for
//                        that cluster waits on the record's Event, then looks the cluster up
//                        again (and then usually writes in place). Requests on different guest
//                        clusters allocate in parallel; in-place writes take no claim: an
//                        allocating write never moves a cluster that has COPIED data in place
//                        (it writes only its unallocated subclusters, and copies-on-write
//                        only from those), so the two touch different bytes.
//   table loads          a miss inserts a not-ready table and its creator reads it with no
//                        lock held; concurrent misses wait on its Event (TableCache).
//   l2_in_making_        one record per L1 entry whose new L2 table (or copy of a table
//                        shared with a snapshot) is being made: others wanting that table
//                        wait on its Event, then look at the L1 entry again.
//   flush_mutex_         coro::Mutex serialising flush(), refcount table growth, truncate
//                        (and its L1 growth), marking the image corrupt and the internal
//                        snapshot operations (snapshots.cc), which each write metadata in
//                        order. Allocating requests take it only to grow the
//                        refcount table or to write back when the caches fill with dirty
//                        tables; nothing holding it waits for a guest cluster's record.
//   bitmap_mutex_        coro::Mutex serialising the persistent bitmaps' changes (starting
//                        to track them, storing them, close, truncate); taken before
//                        flush_mutex_, never while a guest cluster's record is held. Writes
//                        mark tracker_'s bits without it (atomics; see close()).
//   corrupt_, broken_,   atomics; set once (a corrupt entry found; a metadata move that
//   retired_             failed half way; amend rebuilt the refcounts with another width),
//                        after which writes fail with -EIO.
// Guest requests that overlap are not ordered against each other (the caller's job), except
// that allocations of one guest cluster are serialised as above.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "block/block_error.h"
#include "block/block_node.h"
#include "block/formats/qcow2/format.h"
#include "block/formats/qcow2/bitmap_directory.h"
#include "block/formats/qcow2/bitmap_tracker.h"
#include "block/formats/qcow2/free_cluster_pool.h"
#include "block/formats/qcow2/snapshot_table.h"
#include "block/formats/qcow2/table_cache.h"
#include "block/image_format.h"
#include "coro/event.h"
#include "coro/mutex.h"
#include "coro/task.h"

namespace spindle::block::qcow2 {

// Opens `file` as a qcow2 image. Option keys (FormatOpenOptions::options): "l2-cache-size"
// (bytes, k/M/G suffixes; QEMU's default: enough L2 tables to cover the whole image, at most
// 32 MiB, at least two tables) and "refcount-cache-size" (default: a quarter of the L2 cache,
// at least four tables); any other key is refused (EINVAL).
// A dirty image (lazy refcounts, not closed cleanly) opened writable with repair_if_dirty has
// its refcounts rebuilt by check_image() (check.h) and the bit cleared first; read-only or
// without repair_if_dirty it opens as it is.
// Errors: EINVAL for malformed headers, tables outside the file or a failed repair, ENOTSUP
// for features we do not implement (encryption; an external data file without an opener),
// EACCES for a writable open of an image marked corrupt.
coro::Task<BlockResult<BlockNodeRef>> open_qcow2(BlockNodeRef file, FormatOpenOptions options);

class Qcow2Node final : public BlockNode {
 public:
  struct Private {};
  Qcow2Node(Private, BlockNodeRef file, Header header, std::vector<std::uint64_t> l1,
            std::vector<std::uint64_t> rctable, bool read_only, std::size_t l2_tables,
            std::size_t refcount_tables);
  ~Qcow2Node() override;

  const char* driver_name() const noexcept override { return "qcow2"; }
  std::string filename() const override { return file_->filename(); }
  std::uint64_t size() const noexcept override { return size_.load(std::memory_order_acquire); }
  BlockLimits limits() const noexcept override;
  bool read_only() const noexcept override { return read_only_; }
  BlockNode* backing_node() const noexcept override { return backing_.get(); }
  // "backing" (null: none): unallocated clusters read from `child` from now on; the header
  // still names the backing file it had (as after QEMU's blockdev-reopen). Inside a drained
  // section only (BlockNode::replace_child); "file" is fixed (-ENOTSUP).
  int replace_child(std::string_view role, BlockNodeRef child) override;
  // A range inside one host-contiguous run of data clusters whose L2 table is cached, where the
  // file node stores it in a host file. Never waits: with meta_mutex_ busy or the table not
  // cached it says "nowhere". Data moves only when a write to the same guest cluster
  // allocates (a cluster shared with a snapshot is copied) or a discard or zeroing drops it, so
  // the range holds the guest data until such a request overlapping the guest cluster lands
  // (ordering against it is the caller's job, as with any request). After that the host
  // cluster may be reused for another guest cluster (this range is outside the epoch guards
  // of free_cluster_pool.h): a read racing a discard of the same range may then return that
  // data, which a client cannot tell from any other unspecified result of racing requests.
  std::optional<HostFileRange> host_file_range(std::uint64_t offset,
                                               std::uint64_t bytes) const noexcept override;

  coro::Task<int> read(std::uint64_t offset, std::span<std::byte> buffer,
                       std::uint32_t flags) override;
  coro::Task<int> write(std::uint64_t offset, std::span<const std::byte> buffer,
                        std::uint32_t flags) override;
  coro::Task<int> flush() override;
  // v3: whole clusters get the zero flag (their host cluster is kept unless kMayUnmap);
  // with extended L2 the whole subclusters of a partial cluster get their zero bits (not in a
  // compressed cluster or one shared with a snapshot); the rest of partial clusters and v2
  // images are written as zero buffers (kNoFallback: -ENOTSUP).
  coro::Task<int> write_zeroes(std::uint64_t offset, std::uint64_t bytes,
                               std::uint32_t flags) override;
  // Whole clusters only (the rest is ignored): the cluster is released; the entry becomes
  // unallocated, or a zero cluster when there is a backing file (v3; v2 keeps it).
  coro::Task<int> discard(std::uint64_t offset, std::uint64_t bytes) override;
  // Data clusters: DATA|OFFSET_VALID|ALLOCATED; compressed: DATA|ALLOCATED; zero clusters:
  // ZERO|ALLOCATED; unallocated: 0 with a backing node, ZERO without. `error` -EIO for a
  // corrupt entry. Runs never cross an L2 table.
  coro::Task<BlockStatus> block_status(std::uint64_t offset, std::uint64_t bytes) override;
  // Grows (the L1 table too when needed) or shrinks where nothing is allocated past the new
  // end (else -ENOTSUP). The size must be a multiple of 512 (-EINVAL).
  // Persistent bitmaps are resized with the image (bits past the old end clear), as qemu
  // does: they are marked in use on disk first, then stored at the new size; call it with no
  // write in flight when the image has bitmaps.
  coro::Task<int> truncate(std::uint64_t new_size) override;

  // For check and info (qcow2 check/create, tools). The header as of the last metadata change:
  // read it while no request runs.
  const Header& header() const noexcept { return header_; }

  // qemu-img amend (amend.cc), with no other request in flight. Unset fields stay as they are.
  // version 2 (compat=0.10) expands zero clusters first (allocated and zeroed over a backing
  // file, else made unallocated) and refuses what v2 cannot hold (extended L2, non-16-bit
  // refcounts, zstd-compressed clusters, lazy refcounts asked for); version 3 rewrites the
  // header as v3. Errors carry qemu-img's messages.
  struct AmendRequest {
    std::optional<std::uint32_t> version;
    std::optional<bool> lazy_refcounts;
    std::optional<std::uint32_t> refcount_bits;
    std::optional<std::uint64_t> size;
  };
  coro::Task<BlockError> amend(AmendRequest request);
  // qemu-img rebase (backing_change.cc), with no other request in flight: the metadata is
  // flushed, then the header cluster is rewritten naming `name` ("": none) with `format` as
  // its backing-format extension ("": none). The node keeps reading through the backing node
  // it opened with. Errors: EINVAL for a name over 1023 bytes or an image with a raw external
  // data file, ENOSPC when the header no longer fits in its cluster, EROFS, EIO (corrupt).
  coro::Task<BlockError> change_backing(std::string name, std::string format);
  // qemu-img commit's emptying (backing_change.cc), with no other request in flight: every
  // active L2 entry becomes unallocated (the clusters it held are released), then the
  // metadata is flushed. ENOTSUP for a raw external data file (it must keep the guest view).
  coro::Task<BlockError> make_empty();
  const BlockNodeRef& file() const noexcept { return file_; }
  const BlockNodeRef& backing() const noexcept { return backing_; }
  bool corrupt() const noexcept { return corrupt_.load(std::memory_order_acquire); }
  // Freed data clusters waiting to be reused, and those reusable now (tests; any thread).
  std::uint64_t quarantined_clusters() const {
    std::lock_guard lock(meta_mutex_);
    return free_clusters_.quarantined_clusters();
  }
  std::uint64_t reusable_clusters() const {
    std::lock_guard lock(meta_mutex_);
    return free_clusters_.reusable_clusters();
  }

  // ---- internal snapshots (snapshots.cc) ----------------------------------------------------
  // Call these with no other request in flight on the node (spindle-img opens the image for
  // them alone). The changing ones take flush_mutex_ and write back all dirty metadata first;
  // a crash at any point leaves at worst leaked clusters (and COPIED bits still clear where a
  // refcount went back to 1). Errors: EINVAL for a bad snapshot table or snapshot L1 table
  // or a refcount already at the largest its width holds (as QEMU), EIO for a corrupt tree or
  // refcount, ENOENT no such snapshot, EEXIST a duplicate id, EFBIG too many snapshots, EROFS
  // read-only, I/O failures as their errno.
  // The snapshot table as the file holds it.
  coro::Task<BlockResult<std::vector<SnapshotEntry>>> snapshots();
  // Appends a snapshot of the active image: `snapshot`'s id (empty: one more than the
  // largest number among the ids), name, date, VM clock, VM state size and icount are kept;
  // its L1 table is a copy of the active one and every cluster the active tree reaches gets
  // one more reference (COPIED cleared).
  coro::Task<BlockError> create_snapshot(SnapshotEntry snapshot);
  // Removes the first snapshot named `name` and drops its references; COPIED is set again in
  // the active tree where a refcount is back to 1.
  coro::Task<BlockError> delete_snapshot(std::string name);
  // Makes the snapshot with id `id_or_name` (else the first named so) the active image: its
  // L1 table is copied to new clusters and committed with its virtual size in one header
  // write; the old active tree loses its references afterwards.
  coro::Task<BlockError> apply_snapshot(std::string id_or_name);
  // Read-only nodes (qemu's bdrv_snapshot_load_tmp, for measure -l): reads from now on see the
  // snapshot whose id is `id` and whose name is `name` (an empty one matches any); the virtual
  // size stays the active image's, as in qemu. Call before any request. ENOENT "Can't find snapshot", EROFS on a writable
  // node, EINVAL for a bad snapshot L1 table.
  coro::Task<BlockError> view_snapshot(std::string id, std::string name);

  // ---- persistent dirty bitmaps (bitmap_store.cc) -------------------------------------------
  // The bitmap directory as the file holds it (empty without a consistent bitmaps extension).
  // Errors: EINVAL for a bad directory (QEMU's messages), I/O failures as their errno.
  coro::Task<BlockResult<std::vector<BitmapEntry>>> bitmap_directory();
  // A bitmap's bits (bitmap_data_bytes() of them for the current size): its table read and
  // checked (EINVAL: bad entries, a table not sized for the image), all-zeros and all-ones
  // entries expanded, tail bits past the image cleared. EINVAL for a bitmap in use.
  coro::Task<BlockResult<std::vector<std::uint8_t>>> read_bitmap_bits(const BitmapEntry& entry);
  // Replaces the directory with `list`, in its order. An entry with `bits` gets new data
  // clusters (only those holding a set bit) and a new table; one without keeps the table of
  // the entry of that name in the current directory (EINVAL when there is none). Then the
  // new directory is written, all metadata written back, the header switched (the autoclear
  // bit set, or the extension dropped with an empty list) and flushed, and only then the old
  // directory and the tables (and their data) nothing names any more released. A crash
  // leaves at worst leaked clusters. Call with no other request in flight (the write hooks
  // excepted); flush_mutex_ is taken inside. EROFS read-only, EIO corrupt, ENOTSUP for v2
  // images ("Cannot store dirty bitmaps in qcow2 v2 files"), EINVAL bad entries.
  struct StoredBitmap {
    BitmapEntry entry;  // name, flags, granularity_bits (table location: filled in here)
    std::optional<std::vector<std::uint8_t>> bits;
  };
  coro::Task<BlockError> store_bitmaps(std::vector<StoredBitmap> list);
  // Persistent bitmaps on a writable node: the first write, write_zeroes or discard loads the
  // enabled ("auto") bitmaps that are not in use into a BitmapTracker and sets their IN_USE
  // flag on disk (flushed) before anything else is written; every later one marks its range
  // in them (atomic bit operations, from any thread) before writing. close() stores their
  // bits and clears IN_USE. A node dropped without close() (a process killed) leaves IN_USE
  // set, so qemu reports those bitmaps inconsistent. store_bitmaps() while tracking: EBUSY.
  // When the bitmaps cannot be read or marked (a bad directory or table: -EIO; more than
  // kMaxBitmapMemoryBytes of enabled bitmaps: -ENOMEM), writes fail rather than leave a
  // bitmap that no longer tells what changed.
  coro::Task<int> close() override;

 private:
  friend coro::Task<BlockResult<BlockNodeRef>> open_qcow2(BlockNodeRef file,
                                                          FormatOpenOptions options);

  enum class Kind { kUnallocated, kZero, kData, kCompressed };
  // What a run of guest bytes [pos, pos + bytes) is, within one L2 table.
  struct Mapping {
    Kind kind = Kind::kUnallocated;
    std::uint64_t bytes = 0;
    // kData: where pos lives; kZero/kUnallocated: where pos's space lives in a host cluster
    // kept for it (a zero cluster with an offset, an extended L2 subcluster), else 0
    std::uint64_t host_offset = 0;
    std::uint64_t entry = 0;        // kCompressed: the raw L2 entry
  };
  // A guest cluster's current L2 state, for the write path.
  struct ClusterState {
    std::uint64_t entry = 0;
    std::uint64_t bitmap = 0;  // extended L2 only
    bool has_table = false;    // the L1 entry is set
  };
  struct InFlight {
    coro::Event done;
  };
  using InFlightRef = std::shared_ptr<InFlight>;

  // ---- geometry ---------------------------------------------------------------------------
  std::uint64_t cluster_size() const noexcept { return header_.cluster_size(); }
  std::uint64_t l2_entries() const noexcept { return l2_entries_; }
  std::uint64_t l2_span() const noexcept { return l2_entries_ * cluster_size(); }
  std::uint64_t subcluster_size() const noexcept { return cluster_size() / 32; }

  // ---- metadata access --------------------------------------------------------------------
  // The ready table at `offset` in `cache`, read from the file on a miss (once, however many
  // wait for it). Takes meta_mutex_ briefly; none held across the read.
  coro::Task<int> get_table(TableCache& cache, std::uint64_t offset, TableRef& out);
  // With meta_mutex_ held: where the file ends, counting clusters allocated but not written.
  std::uint64_t file_end() const noexcept;
  // With meta_mutex_ held: the entries of the L2 table at `l2_offset`, just read, that are
  // corrupt because they point past the file's end at open (remembered per table).
  std::vector<std::uint32_t> bad_l2_entries(std::uint64_t l2_offset, const CachedTable& table);
  // With meta_mutex_ held: -EIO (and corrupt_) if an L1 entry is invalid, else its offset.
  std::int64_t checked_l2_offset(std::uint64_t l1_entry) noexcept;
  // Whether a (non-compressed) L2 entry names a host cluster: a non-zero offset, or, in an
  // external data file (where 0 is a valid offset and every cluster has one owner), offset 0
  // with COPIED.
  bool has_host(std::uint64_t entry) const noexcept {
    return (entry & kL2OffsetMask) != 0 || (external_data_ && (entry & kEntryCopied) != 0);
  }
  // With meta_mutex_ held: whether the host cluster at `offset` holds metadata.
  bool is_metadata(std::uint64_t offset) const noexcept;
  // One cluster (or, with extended L2, one subcluster) of an L2 table, as seen from `pos`.
  struct Unit {
    bool ok = false;  // false: the entry is corrupt
    Kind kind = Kind::kUnallocated;
    std::uint64_t host = 0;   // where `pos` lives in the file's host cluster, 0: none
    std::uint64_t end = 0;    // guest end of the unit
    std::uint64_t entry = 0;  // the raw L2 entry
  };
  // With meta_mutex_ held.
  Unit unit_at(const CachedTable& table, std::uint64_t pos) const noexcept;
  // With meta_mutex_ held: the mapping of the run at `pos` within table `l2` (null: the L1
  // entry is 0). -EIO for a corrupt first entry; a run ends before a corrupt entry.
  int classify(const CachedTable* l2, std::uint64_t pos, std::uint64_t length, Mapping& out);
  // The run at `pos` (at most `length` bytes, never crossing an L2 table).
  coro::Task<int> map_range(std::uint64_t pos, std::uint64_t length, Mapping& out);
  // Marks the image corrupt (once) if a corrupt entry was found: the header bit for writable
  // v3 opens; writes fail with -EIO from then on.
  coro::Task<void> mark_corrupt();
  coro::Task<int> write_header_fields();
  // Rewrites the whole header cluster (fields, extensions, backing name) from header_, and
  // records in header_ where the backing name now lies.
  coro::Task<int> write_header_cluster();
  // The guest clusters whose active L2 entry is compressed (flag kEntryCompressed) or, not
  // compressed, has `flag` set (amend.cc).
  coro::Task<int> find_clusters(std::uint64_t flag, std::vector<std::uint64_t>& found);
  // For a downgrade to v2: no zero clusters left in the active tables (amend.cc).
  coro::Task<int> expand_zero_clusters();

  // ---- reads ------------------------------------------------------------------------------
  // Guest content of [pos, pos + buffer.size()), zeros past the image's end.
  coro::Task<int> read_guest(std::uint64_t pos, std::span<std::byte> buffer);
  coro::Task<int> read_backing(std::uint64_t pos, std::span<std::byte> buffer);
  coro::Task<int> read_compressed(std::uint64_t entry, std::uint64_t in_cluster,
                                  std::span<std::byte> out);
  // Reads from `node` at any offset and length, bouncing through its request alignment.
  static coro::Task<int> read_aligned(BlockNode& node, std::uint64_t offset,
                                      std::span<std::byte> buffer);

  // ---- allocation -------------------------------------------------------------------------
  // Allocates `count` contiguous host clusters (refcount 1) at the end of the file and
  // returns the first's offset. A caller holding flush_mutex_ says so: growing the refcount
  // table then runs under its lock instead of taking it again (coro::Mutex is not recursive).
  coro::Task<int> allocate_clusters(std::uint64_t count, std::uint64_t& offset,
                                    bool flush_mutex_held = false);
  // For guest data: reuses freed data clusters (free_clusters_) when a run of `count` is
  // ready, else allocates at the end as allocate_clusters() does.
  coro::Task<int> allocate_data_clusters(std::uint64_t count, std::uint64_t& offset);
  // With meta_mutex_ held: allocates in memory, counted in `table` (null: rctable_), if every
  // refcount block needed is cached (new ones are made in memory); otherwise says which block
  // to load or how many refcount table entries are needed.
  enum class AllocStep { kDone, kLoad, kGrow };
  AllocStep try_allocate(std::uint64_t count, std::uint64_t& offset, std::uint64_t& load_offset,
                         std::uint64_t& needed_entries, std::vector<TableRef>& pins,
                         std::vector<std::uint64_t>* table);
  // With meta_mutex_ held: takes a run of `count` freed clusters from free_clusters_ (their
  // refcounts set to 1 in cached blocks) and returns kDone; kLoad when a refcount block they
  // need is not cached; kGrow (used here as "none") when no run is ready.
  AllocStep try_reuse(std::uint64_t count, std::uint64_t& offset, std::uint64_t& load_offset,
                      std::vector<TableRef>& pins);
  coro::Task<int> load_refcount_block(std::uint64_t offset, std::vector<TableRef>& pins);
  // The refcount block counting the cluster at `host_offset` (pinned last in `pins`).
  coro::Task<int> load_refcount_block_of(std::uint64_t host_offset, std::vector<TableRef>& pins);
  // Moves the refcount table to a larger place (flush_mutex_ taken inside; _locked: held).
  coro::Task<int> grow_refcount_table(std::uint64_t min_entries);
  coro::Task<int> grow_refcount_table_locked(std::uint64_t min_entries);
  // Adds `delta` (-1, 0 or +1) to the refcount of the cluster holding `host_offset`; `now`
  // is the new count. -EIO below 0 or without a refcount block, -EINVAL above the maximum.
  coro::Task<int> adjust_refcount(std::uint64_t host_offset, int delta, std::uint64_t& now);
  // Decrements a cluster's refcount in its (loaded) block.
  coro::Task<int> release_cluster(std::uint64_t host_offset);
  // The largest refcount the image's refcount width holds.
  std::uint64_t largest_refcount() const noexcept {
    return header_.refcount_order == 6 ? ~std::uint64_t{0}
                                       : (std::uint64_t{1} << (1u << header_.refcount_order)) - 1;
  }
  // With meta_mutex_ held: queues the clusters an entry being replaced held, for release once
  // the tables that no longer name them are on disk (write_back_locked).
  void defer_release(std::uint64_t entry) noexcept;

  // ---- writes -----------------------------------------------------------------------------
  // Claims in_flight_ records for guest clusters [first, first + count); returns how many
  // were claimed from `first` on (0: `first` is taken and `wait_for` is its record).
  std::uint64_t claim(std::uint64_t first, std::uint64_t count, InFlightRef& wait_for);
  void release_claims(std::uint64_t first, std::uint64_t count);
  // The L2 table for guest position `pos` (null if the L1 entry is 0 and !create); with
  // `create`, a new table is made and linked in memory. A table shared with an internal
  // snapshot (no COPIED bit) is copied to a new cluster and linked with COPIED in memory.
  coro::Task<int> writable_l2(std::uint64_t pos, bool create, TableRef& out);
  // With l2_in_making_[l1_index] held: links a new table (empty, or a copy of the shared one
  // at `shared_offset`) over L1 entry `seen`. 1: the entry is no longer `seen` (look again).
  coro::Task<int> make_l2(std::uint64_t l1_index, std::uint64_t seen, std::uint64_t shared_offset,
                          TableRef& out);
  // With meta_mutex_ held: whether guest bytes [pos, min(end, cluster end)) may be written
  // in place, and where.
  bool in_place(const CachedTable& table, std::uint64_t pos, std::uint64_t end,
                std::uint64_t& host) const noexcept;
  // With meta_mutex_ held: the length of the host-contiguous in-place run from `pos` (before
  // `end`; 0: `pos` is not in place) and its host offset.
  std::uint64_t in_place_run(const CachedTable& table, std::uint64_t pos, std::uint64_t end,
                             std::uint64_t& host) const noexcept;
  // Writes [pos, pos + length) of one L2 table's span: in place where it can, else by
  // allocation (claiming the guest clusters first).
  coro::Task<int> write_span(std::uint64_t pos, std::uint64_t length,
                             std::span<const std::byte> data);
  // With the claims on [first_cluster, first_cluster + clusters) held: writes clusters that
  // are not in place (see "Writes" above), extended L2 subclusters in their host cluster.
  coro::Task<int> allocate_and_write(std::uint64_t pos, std::uint64_t length,
                                     std::span<const std::byte> data, TableRef l2,
                                     std::uint64_t first_cluster, std::uint64_t clusters);
  coro::Task<int> write_aligned(std::uint64_t offset, std::span<const std::byte> data);

  // ---- compressed writes (compressed_write.cc) ----------------------------------------------
  // A kWriteCompressed write of one whole cluster (the last may be short) into an unallocated
  // or zero cluster: compressed on the context's thread pool with no lock held, then packed
  // (store_compressed) and linked; stored normally when it does not compress below a cluster.
  coro::Task<int> write_compressed(std::uint64_t offset, std::span<const std::byte> buffer);
  // With the guest cluster's claim held: 0 stored compressed, 1 the caller stores it normally.
  coro::Task<int> write_compressed_claimed(std::uint64_t offset,
                                           std::span<const std::byte> buffer);
  // Places compressed bytes after those already in the fullest host cluster being filled
  // that has room for them (one more reference to it), or in a new one (starting in the tail
  // of the cluster before it when that one is being filled), and writes them; `host` says
  // where.
  // -ENOTSUP when the file's request alignment exceeds a cluster (store normally).
  coro::Task<int> store_compressed(std::span<const std::byte> data, std::uint64_t& host);
  // One more reference to the host cluster being filled; `added` false (nothing done) when
  // its refcount is 0 or already the largest the width holds.
  coro::Task<int> add_reference(std::uint64_t host_offset, bool& added);
  // ---- internal snapshots (snapshots.cc); flush_mutex_ held ---------------------------------
  // The table and the bytes it spans on disk (`extent`).
  coro::Task<BlockResult<std::vector<SnapshotEntry>>> read_snapshot_table(std::uint64_t& extent);
  // A snapshot's L1 table as the file holds it (COPIED bits included), its location checked.
  coro::Task<BlockResult<std::vector<std::uint64_t>>> read_snapshot_l1(
      const SnapshotEntry& snapshot);
  // The same after writing back the caches (the table change then starts from disk state).
  coro::Task<BlockResult<std::vector<SnapshotEntry>>> flushed_snapshot_table(
      std::uint64_t& extent);
  // Why a snapshot may not be created, applied or deleted now (read-only, corrupt), or ok.
  BlockError snapshot_change_refused() const;
  // adjust_refcount's error for the refcount of `what` (a cluster, a table), as a message.
  BlockError refcount_error(int result, const std::string& what) const;
  // Adds `delta` to every cluster the tree of `l1` reaches (L2 tables, data clusters, each
  // host cluster a compressed cluster touches). `active`: `l1` is l1_ and the COPIED bits of
  // l1_ and of its L2 tables are set from the resulting refcounts.
  coro::Task<BlockError> walk_tree(std::vector<std::uint64_t> l1, bool active, int delta);
  // Writes `table` to new clusters, then (all metadata written back) points the header at it,
  // then frees the old table (`old_extent` bytes at the old snapshots_offset).
  // bitmap_store.cc, flush_mutex_ held: the directory, and the host clusters of a bitmap
  // table and of the data it names (appended to `clusters`).
  coro::Task<BlockResult<std::vector<BitmapEntry>>> read_bitmap_directory_locked();
  coro::Task<BlockResult<std::vector<std::uint64_t>>> read_bitmap_table(const BitmapEntry& entry);
  coro::Task<BlockError> write_bitmap_data(StoredBitmap& bitmap);
  coro::Task<BlockError> commit_bitmaps(std::vector<StoredBitmap> list);
  // At open, as QEMU opens: the directory and the table of each bitmap not in use are well
  // formed and sized for the image (EINVAL with QEMU's message otherwise).
  coro::Task<BlockError> validate_bitmaps();
  // The write hooks (see close()): whether tracking still has to start (or failed), and the
  // marking itself.
  enum BitmapState : int { kBitmapsUnloaded, kBitmapsTracking, kBitmapsNone, kBitmapsFailed };
  bool bitmaps_pending() const noexcept {
    const int state = bitmap_state_.load(std::memory_order_acquire);
    return state == kBitmapsUnloaded || state == kBitmapsFailed;
  }
  void mark_dirty(std::uint64_t offset, std::uint64_t bytes) noexcept {
    if (bitmap_state_.load(std::memory_order_acquire) == kBitmapsTracking) {
      tracker_.mark(offset, bytes);
    }
  }
  coro::Task<int> start_bitmap_tracking();
  // truncate() without the persistent bitmaps (qcow2_node.cc); truncate() (bitmap_store.cc)
  // resizes the bitmaps around it.
  coro::Task<int> resize_image(std::uint64_t new_size);
  coro::Task<BlockError> commit_snapshot_table(const std::vector<SnapshotEntry>& table,
                                               std::uint64_t old_extent);
  // Flushes for FUA, or to write back when the caches hold too many dirty tables.
  coro::Task<int> after_write(std::uint32_t flags);
  enum class Mode { kZero, kDiscard };
  // Whole clusters of one L2 span: zero flag / unallocated (claims them first).
  coro::Task<int> zero_or_discard(std::uint64_t first_cluster, std::uint64_t clusters, Mode mode,
                                  std::uint32_t flags);
  // Extended L2: subclusters [first, first + count) of guest cluster `cluster` read as zeros
  // by their zero bits (claims the cluster first). 1: done; 0: not possible this way (a
  // compressed cluster, or one shared with a snapshot: the caller writes zeros instead).
  coro::Task<int> zero_subclusters(std::uint64_t cluster, unsigned first, unsigned count);
  // write_zeroes' part inside one cluster: its whole subclusters by zero_subclusters(), the
  // rest (and everything where that is not possible) written as zeros.
  coro::Task<int> zero_in_cluster(std::uint64_t offset, std::uint64_t bytes, std::uint32_t flags);
  // Writes back all dirty metadata in crash-safe order; flush_mutex_ held by the caller.
  coro::Task<int> write_back_locked();
  // Writes the dirty refcount blocks (and the refcount table where the header points at a
  // table of its size); flush_mutex_ held by the caller. No flush.
  coro::Task<int> write_refcount_blocks();

  const BlockNodeRef file_;
  // Where data clusters live: file_, or the external data file (set once during open). Its
  // host offsets are the guest offsets, and its clusters are not refcounted.
  BlockNodeRef data_;
  BlockNodeRef backing_;  // set during open; replace_child() inside a drained section
  const bool read_only_;
  std::uint64_t l2_entries_;
  std::uint64_t refcount_entries_;  // per refcount block
  const bool extended_;             // extended L2 entries (subclusters)
  const bool external_data_;        // data clusters in data_, not in file_
  const bool raw_data_;             // ...which must always read as the guest sees the image
  std::atomic<std::uint64_t> size_;
  std::atomic<bool> corrupt_{false};
  std::atomic<bool> corrupt_marked_{false};
  std::atomic<bool> broken_{false};  // a metadata move failed half way: no more writes
  std::atomic<bool> retired_{false};  // amend rebuilt the refcounts on the file: no more writes
  bool refuses_writes() const noexcept {
    return corrupt_.load(std::memory_order_acquire) || broken_.load(std::memory_order_acquire) ||
           retired_.load(std::memory_order_acquire);
  }

  mutable std::mutex meta_mutex_;  // mutable: host_file_range() try-locks it
  Header header_;                        // meta_mutex_ for the mutable fields
  std::vector<std::uint64_t> l1_;        // meta_mutex_
  std::vector<std::uint64_t> l1_on_disk_;  // meta_mutex_: the L1 table as last written
  std::uint64_t l1_generation_ = 0;      // meta_mutex_
  std::uint64_t l1_written_ = 0;         // meta_mutex_
  std::vector<std::uint64_t> rctable_;   // meta_mutex_
  std::uint64_t rctable_generation_ = 0; // meta_mutex_
  std::uint64_t rctable_written_ = 0;    // meta_mutex_
  TableCache l2_cache_;                  // meta_mutex_
  TableCache refcount_cache_;            // meta_mutex_
  std::uint64_t next_free_ = 0;          // meta_mutex_: first cluster index never allocated
  std::unordered_set<std::uint64_t> refblock_clusters_;  // meta_mutex_: cluster indices
  std::unordered_set<std::uint64_t> l2_clusters_;        // meta_mutex_: cluster indices
  std::unordered_set<std::uint64_t> new_refblocks_;      // meta_mutex_: made since open
  // meta_mutex_: every L2 table loaded or made since open, with its corrupt entries.
  std::unordered_map<std::uint64_t, std::vector<std::uint32_t>> known_bad_l2_;
  std::uint64_t open_end_ = 0;  // the file's size at open (immutable after construction)
  std::map<std::uint64_t, InFlightRef> in_flight_;       // meta_mutex_: by guest cluster
  std::map<std::uint64_t, InFlightRef> l2_in_making_;    // meta_mutex_: by L1 index
  std::vector<std::uint64_t> pending_frees_;             // meta_mutex_: host clusters
  // meta_mutex_: host offsets of data clusters (plain, not compressed) whose entries were
  // replaced; released like pending_frees_, and those left at refcount 0 go to free_clusters_.
  std::vector<std::uint64_t> pending_data_frees_;
  FreeClusterPool free_clusters_;  // meta_mutex_ (enter(): any thread)

  coro::Mutex flush_mutex_;

  // Persistent bitmaps: bitmap_mutex_ serialises starting and ending the tracking (taken
  // before flush_mutex_); tracker_ is built under it before bitmap_state_ turns to
  // kBitmapsTracking (release), and is then only read and marked (its bits are atomics).
  coro::Mutex bitmap_mutex_;
  std::atomic<int> bitmap_state_{kBitmapsUnloaded};
  BitmapTracker tracker_;

  // Compressed writes: the host clusters being filled with compressed clusters.
  // compressed_mutex_ is taken after a guest cluster's claim and before flush_mutex_
  // (allocation may grow the refcount table), and held across the write of the packed bytes
  // so that writes sharing a sector come one after the other; compression runs before it.
  struct FillingCluster {
    std::uint64_t base = 0;        // host offset
    std::uint64_t used = 0;        // bytes taken from the start
    std::vector<std::byte> bytes;  // the cluster's content as written
  };
  static constexpr std::size_t kFillingClusters = 4;
  coro::Mutex compressed_mutex_;
  std::vector<FillingCluster> filling_;  // compressed_mutex_
};

// qemu-img amend's -o options for qcow2 (amend.cc), with qemu-img's messages for keys it does
// not amend (create-only, unknown) and bad values.
BlockResult<Qcow2Node::AmendRequest> parse_amend_options(
    const std::map<std::string, std::string>& options);

}  // namespace spindle::block::qcow2
