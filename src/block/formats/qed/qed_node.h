// QedNode: the QED image format driver (reference/qed.md §1–§2), a BlockNode over a child node
// holding the image bytes, with an optional backing node (raw or QED) for unallocated clusters.
// open_qed() validates everything before touching a table; QedNode::check() is the consistency
// check/repair; create_qed() (create.h) formats a new image.
//
// Requests: reads map each contiguous run of clusters (never crossing an L2 table) to zeros,
// the backing node, or the child. Writes to allocated clusters go to the child in place.
// Writes to unallocated or zero clusters allocate at the end of the file, copy the rest of the
// cluster from the backing node (or zeros), then link the clusters: data (+ flush with a
// backing file), then a new L2 table (+ flush) and its L1 entry, or the changed slice of an
// existing L2 table. Without a backing file the NEED_CHECK bit is set (and flushed) before the
// first allocating write and cleared again by flush(), close(), quiesce() (BlockBackend's
// drain) and, as in QEMU, by the need-check timer once allocating writes have stopped.
//
// Need-check timer (reference/qed.md §2.8): every allocating request re-arms it, after it
// releases allocation_lock_, for `need_check_delay` (OpenOptions; QEMU: 5 s), so it fires only
// after that long without allocating writes. Its callback spawns a job on the timer's context
// that try-locks allocation_lock_ (an allocating request in progress means: give up, that
// request re-arms the timer when it finishes), flushes, clears the bit and flushes again. The
// timer lives on the node's home context: the one open_qed() ran on, until attach_context().
// Destroy the node after close(), or on its home context's thread, or when that context cannot
// be running timers: a Timer may not be destroyed while its callback runs on another thread.
//
// Corrupt pointers (a table entry at metadata or past EOF): EIO for the range, never metadata
// read or overwritten; the image is marked NEED_CHECK (header write only) and the bit stays set
// until a repairing check finds the image clean. L1 entries are validated at open (an L2 table
// must not overlap the header, the L1 table or another L2 table). A data entry must lie below
// EOF, which is checked when its L2 table is loaded (on the first load since open: below the
// file size at open, since only cached tables get new entries) and remembered by file position
// so it stays bad as the file grows; and outside the L1 table and every L2 table, checked on
// each lookup (one binary search per run over the tables' offsets).
//
// Thread-safety: the node may be used by coroutines on several contexts at once.
//   geometry_, file_, read_only_   immutable after open
//   backing_           changed only by replace_child() (inside a drained section)
//   backing_name_      changed only by change_backing() (no other request in flight)
//   image_size_                                             atomic (read by size())
//   allocation_lock_   FIFO; held by the one allocating request for its whole duration (QEMU's
//                      allocating-write queue), and by flush's header clean-up, truncate, check.
//                      Lock order: allocation_lock_ before table_lock_.
//   table_lock_        protects header_, l1_, l2_cache_, file_size_, the entries of cached
//                      L2 tables and the corruption bookkeeping (l1_state_, metadata_tables_,
//                      bad_entries_, corrupt_, corrupt_marked_). Held for lookups (including
//                      loading an L2 table on a cache miss) and in-memory updates, never across
//                      data I/O. Only the holder of allocation_lock_ changes l1_, L2 entries,
//                      file_size_ or header_.
//   timer_mutex_       (std::mutex, never held across a suspension) protects timer_,
//                      timer_context_, closing_, idle_jobs_, jobs_done_ and timer_hook_.
//                      Lock order: timer_mutex_ before the Context's own timer lock (arm_in).
//                      timer_ is replaced only on its old context's thread (attach_context),
//                      so no callback of the old timer can be running when it is destroyed.
// Reads and in-place writes therefore run in parallel with each other and with an allocating
// write; overlapping guest requests are not ordered (the caller's job, as in QEMU).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "aio/timer.h"
#include "block/block_node.h"
#include "block/formats/qed/check.h"
#include "block/block_error.h"
#include "block/formats/qed/format.h"
#include "block/formats/qed/l2_cache.h"
#include "block/formats/qed/tables.h"
#include "coro/mutex.h"
#include "coro/queue.h"
#include "coro/task.h"

namespace spindle::block::qed {

// Opens the backing file an image names. `format` is "raw" when the image says so
// (QED_F_BACKING_FORMAT_NO_PROBE), otherwise empty (probe it). Backing files are opened
// read-only. The callee resolves `name` relative to the image and guards against loops.
using BackingOpener =
    std::function<coro::Task<BlockResult<BlockNodeRef>>(std::string name, std::string format)>;

struct OpenOptions {
  bool read_only = false;
  // QEMU repairs a dirty (NEED_CHECK) image on a writable open, except when opened by
  // `qemu-img check` (BDRV_O_CHECK): set false for that.
  bool repair_if_dirty = true;
  // Open without the backing file even if the image names one (QEMU's BDRV_O_NO_BACKING).
  bool ignore_backing = false;
  BackingOpener open_backing;
  // How long after the last allocating write the need-check timer clears NEED_CHECK (QEMU's
  // QED_NEED_CHECK_TIMEOUT is 5 s). Tests shorten it.
  std::chrono::nanoseconds need_check_delay = std::chrono::seconds(5);
};

class QedNode;
using QedNodeRef = std::shared_ptr<QedNode>;

coro::Task<BlockResult<QedNodeRef>> open_qed(BlockNodeRef file, OpenOptions options);

class QedNode final : public BlockNode {
 public:
  struct Private {};
  QedNode(Private, BlockNodeRef file, const Header& header, Table l1, std::string backing_name,
          bool read_only);
  ~QedNode() override;

  const char* driver_name() const noexcept override { return "qed"; }
  std::string filename() const override { return file_->filename(); }
  // A range inside one run of allocated, contiguous data clusters whose L2 table is cached,
  // where the child stores it in a host file. Never waits: with the table lock busy or the
  // table not cached it says "nowhere" and the caller reads the ordinary way. Clusters are
  // never moved or reused once allocated, so the range stays valid after the lock is released
  // (a concurrent overlapping write may land before or after, as with any overlapping
  // requests).
  std::optional<HostFileRange> host_file_range(std::uint64_t offset,
                                               std::uint64_t bytes) const noexcept override;
  std::uint64_t size() const noexcept override {
    return image_size_.load(std::memory_order_acquire);
  }
  BlockLimits limits() const noexcept override { return {.request_alignment = 512}; }
  bool read_only() const noexcept override { return read_only_; }

  coro::Task<int> read(std::uint64_t offset, std::span<std::byte> buffer,
                       std::uint32_t flags) override;
  coro::Task<int> write(std::uint64_t offset, std::span<const std::byte> buffer,
                        std::uint32_t flags) override;
  coro::Task<int> flush() override;
  // Cluster-aligned parts become zero clusters (allocated clusters get zero data written);
  // unaligned head and tail are written as zero buffers. kNoFallback: -ENOTSUP unless aligned.
  coro::Task<int> write_zeroes(std::uint64_t offset, std::uint64_t bytes,
                               std::uint32_t flags) override;
  // Data clusters: DATA|OFFSET_VALID|ALLOCATED (file_offset in the child); zero clusters:
  // ZERO|ALLOCATED; unallocated: 0 with a backing node (read it there), ZERO without one.
  // Runs never cross an L2 table. A corrupt entry is reported as `error` -EIO (a read there
  // fails the same way) and marks the image as needing a check.
  coro::Task<BlockStatus> block_status(std::uint64_t offset, std::uint64_t bytes) override;
  // Grow only (-ENOTSUP to shrink); the size must stay valid for the geometry (-EINVAL).
  coro::Task<int> truncate(std::uint64_t new_size) override;
  // Cancels the need-check timer, waits for a need-check job in progress, then flush().
  // Call once, after the last request.
  coro::Task<int> close() override;
  // Clears NEED_CHECK now (if set) and cancels the timer; then the file and backing nodes.
  coro::Task<void> quiesce() override;
  // Moves the need-check timer to `context` (re-armed there if it was armed or the image is
  // dirty); then the file and backing nodes. Both contexts must be running until it returns.
  coro::Task<void> attach_context(aio::Context& context) override;

  // qemu-img rebase (backing_change.cc), with no other request in flight: rewrites the header
  // and the name after it (at offset 64) to name `name` ("": none), marked raw (no probing)
  // when `format` is "raw". The node keeps reading through the backing node it opened with.
  // Errors: ENOTSUP for unknown compat features, ENOSPC when the name does not fit in the
  // header clusters, EINVAL for a name longer than kMaxBackingNameBytes, EROFS.
  coro::Task<BlockError> change_backing(std::string name, std::string format);

  // Consistency check (reference/qed.md §1.11); `repair` drops invalid offsets and, if nothing
  // uncorrectable remains, marks the image clean. Runs exclusive of all allocating work.
  coro::Task<CheckResult> check(bool repair);

  // Introspection for tools and tests.
  const Geometry& geometry() const noexcept { return geometry_; }
  const std::string& backing_filename() const noexcept { return backing_name_; }
  const BlockNodeRef& backing() const noexcept { return backing_; }
  BlockNode* backing_node() const noexcept override { return backing_.get(); }
  // "backing" (null: none): unallocated clusters read from `child` from now on; the header
  // still names the backing file it had (as after QEMU's blockdev-reopen). Inside a drained
  // section only (BlockNode::replace_child); "file" is fixed (-ENOTSUP).
  int replace_child(std::string_view role, BlockNodeRef child) override;
  const BlockNodeRef& file() const noexcept { return file_; }
  coro::Task<Header> header();
  // The context the need-check timer runs on (null for read-only images and images with a
  // backing file, which have no timer). Any thread.
  aio::Context* need_check_context() const;
  // For tests: called on the timer's context after each need-check job (whether or not it
  // cleared the bit). Any thread.
  void set_need_check_hook(std::function<void()> hook);

 private:
  friend coro::Task<BlockResult<QedNodeRef>> open_qed(BlockNodeRef file, OpenOptions options);

  enum class Kind { kUnallocated, kZero, kData };
  struct Run {
    Kind kind = Kind::kUnallocated;
    std::uint64_t bytes = 0;        // from the lookup position, within one L2 table
    std::uint64_t host_offset = 0;  // kData: where the lookup position lives in the child
    TableRef l2;                    // the L2 table (null when the L1 entry is 0)
  };
  enum class AllocationMode { kData, kZero };

  // With table_lock_ held: the run at `pos` of at most `length` bytes. -EIO (and corrupt_
  // set) for a corrupt L1 or first L2 entry.
  coro::Task<int> find_run(std::uint64_t pos, std::uint64_t length, Run& run);
  // With table_lock_ held: the run at `pos` of at most `length` bytes (not past the end of
  // `table`'s reach) as `table` maps it. -EIO for a corrupt first entry; a run ends before a
  // corrupt entry.
  int scan_l2(TableRef table, std::uint64_t pos, std::uint64_t length, Run& run) const;
  // With table_lock_ held: (re)computes l1_state_ and metadata_tables_ from l1_ (at open and
  // after a repairing check). Entries already known bad stay bad while unchanged.
  void index_l1();
  // With table_lock_ held: records the entries of the L2 table at `l2_offset`, just read, that
  // are unaligned, in the header or past EOF. `first_load`: not loaded since open, so no entry
  // may point at or past open_file_size_.
  void validate_l2(std::uint64_t l2_offset, const Table& table, bool first_load);
  // With table_lock_ held: whether the cluster at `offset` lies in the L1 or an L2 table; if not,
  // `free_end` is set to where the next table starts.
  bool in_metadata(std::uint64_t offset, std::uint64_t& free_end) const noexcept;
  bool is_bad_entry(std::uint64_t l2_offset, std::uint64_t index) const noexcept;
  // After a failed lookup, with table_lock_ not held: if corruption was found and not yet
  // marked, sets NEED_CHECK (taking allocation_lock_ unless `allocating`: the caller holds it).
  coro::Task<void> mark_corrupt(bool allocating);
  // Reads guest bytes [pos, pos + size) of the backing node (zeros past its end or without one).
  coro::Task<int> read_backing(std::uint64_t pos, std::span<std::byte> buffer);
  // Copy-on-write fill for [pos, pos + buffer.size()) of a cluster being allocated.
  coro::Task<int> write_cow(Kind kind, std::uint64_t pos, std::uint64_t length,
                            std::uint64_t host_offset);
  // With allocation_lock_ and table_lock_ held: allocates and links the run at `pos`; returns
  // with table_lock_ released. `data` is the guest data for kData mode.
  coro::Task<int> allocate_run(std::uint64_t pos, const Run& run,
                               std::span<const std::byte> data, AllocationMode mode);
  // With allocation_lock_ held and table_lock_ not held: sets/clears NEED_CHECK on disk.
  coro::Task<int> set_need_check(bool dirty);
  // Writes the header fields (64 bytes at offset 0) as encoded from `header`.
  coro::Task<int> write_header(const Header& header);
  // After an allocating request released allocation_lock_: (re)arms the need-check timer.
  void arm_need_check_timer();
  // The timer callback (home context thread): starts a need-check job there.
  void on_need_check_timer();
  coro::Task<void> need_check_job();
  // Shared by write() and write_zeroes(): `data` empty in kZero mode.
  coro::Task<int> write_runs(std::uint64_t offset, std::uint64_t length,
                             std::span<const std::byte> data, AllocationMode mode);

  const BlockNodeRef file_;
  BlockNodeRef backing_;  // set during open; replace_child() inside a drained section
  const bool read_only_;
  const Geometry geometry_;
  std::string backing_name_;
  std::atomic<std::uint64_t> image_size_;

  coro::Mutex allocation_lock_;
  mutable coro::Mutex table_lock_;  // mutable: host_file_range() try-locks it
  Header header_;             // table_lock_
  Table l1_;                  // table_lock_
  L2Cache l2_cache_;          // table_lock_
  std::uint64_t file_size_;   // table_lock_: next allocation offset (a multiple of cluster_size)
  std::uint64_t open_file_size_;  // immutable: file_size_ at open

  // Corruption bookkeeping (table_lock_).
  enum L1State : std::uint8_t { kL1Bad, kL1Unseen, kL1Seen };  // kL1Seen: loaded/made since open
  std::vector<std::uint8_t> l1_state_;           // per L1 entry (meaningless for 0 entries)
  std::vector<std::uint64_t> metadata_tables_;   // sorted starts of the L1 table and every
                                                 // in-file L1 target, each table_bytes long
  std::vector<std::uint64_t> bad_entries_;       // sorted file offsets of bad L2 entries
  bool corrupt_ = false;         // a corrupt entry was met: NEED_CHECK must stay set
  bool corrupt_marked_ = false;  // NEED_CHECK was set (or tried) for it

  std::chrono::nanoseconds need_check_delay_{std::chrono::seconds(5)};  // set once during open
  mutable std::mutex timer_mutex_;
  std::unique_ptr<aio::Timer> timer_;      // timer_mutex_; null: no need-check timer
  aio::Context* timer_context_ = nullptr;  // timer_mutex_
  bool closing_ = false;                   // timer_mutex_: close() began, never re-arm
  int idle_jobs_ = 0;                      // timer_mutex_: need-check jobs spawned, not done
  coro::Queue jobs_done_;                  // timer_mutex_: close() waiting for idle_jobs_ == 0
  std::function<void()> timer_hook_;       // timer_mutex_
};

}  // namespace spindle::block::qed
