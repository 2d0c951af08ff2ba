// ImageFormat: everything the block layer knows about one image format (raw, qcow2, qed, and
// the formats we only recognise), behind one interface so that tools and servers never name a
// format: they ask the registry (format_registry.h) to probe, open, create, describe and check.
//
//   probe()          a score for the file's first 512 bytes: 0 "not this format"; the highest
//                    score wins (raw answers 1 for anything, real formats 100 on their magic).
//   can_open()       false for formats known only by their magic (vmdk, vdi, ...): the
//                    registry refuses such a file with an error naming the format.
//   open()           a format node over `file` (the protocol node holding the image bytes);
//                    backing files are opened through `FormatOpenOptions::open_backing`.
//   validate_create() whether create() accepts the request's options (unknown keys, bad values,
//                    a backing file for a format without one), before anything is written.
//   create()         formats `file` (already truncated to 0 by the caller) as a new image.
//   describe()       what `qemu-img info` shows of an open node of this format.
//   check()          qemu-img check's counts (and repair) for an open node of this format.
//   *_snapshot(s)()  internal snapshots: list, create, apply, remove (qcow2; others: ENOTSUP).
//
// A node opened by a format answers `backing_node()` (block_node.h); `describe()` gives its
// recorded backing name and format, so no caller needs to know the node's type.
//
// Thread-safety: ImageFormat objects are immutable singletons: every method may be called from
// any thread at once. The nodes they return follow their own contracts.
#pragma once

#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "block/block_error.h"
#include "block/block_node.h"
#include "coro/task.h"

namespace spindle::block {

// What probe() sees: the file's first kProbeBytes, zero-filled past the end of a shorter file
// (as QEMU probes: its BLOCK_PROBE_BUF_SIZE, read with zeros past EOF), its size, and its name
// (empty when probing data that is not a file, such as a sector about to be written).
struct ProbeInput {
  static constexpr std::size_t kProbeBytes = 512;
  std::span<const std::byte> head;
  std::uint64_t file_size = 0;
  std::string_view filename;
};

// Opens a backing image: `name` as the image records it (the chain opener resolves it against
// the image's own location), `format` as recorded ("" = probe). Always read-only.
using BackingOpener =
    std::function<coro::Task<BlockResult<BlockNodeRef>>(std::string name, std::string format)>;

struct FormatOpenOptions {
  bool read_only = false;
  bool repair_if_dirty = true;   // writable opens repair what a crash left (dirty bits, leaks)
  bool ignore_backing = false;   // do not open the backing file (qemu-img info's NO_BACKING)
  bool probed = false;           // the format was probed, not given (raw then guards sector 0)
  BackingOpener open_backing;    // required unless ignore_backing
  // Opens an image's external data file (qcow2 data_file) by the name the image records,
  // resolved against the image's location; unset: such images are refused.
  std::function<BlockResult<BlockNodeRef>(const std::string& name, bool read_only)> open_data_file;
  // Format-specific runtime options with QEMU's names (e.g. qcow2 "l2-cache-size",
  // "cache-clean-interval"); a format refuses keys it does not know.
  std::map<std::string, std::string> options;
};

// qemu-img create's -o options, by QEMU's names ("cluster_size", "backing_file",
// "backing_fmt", "compat", "lazy_refcounts", "refcount_bits", "preallocation", ...), as text.
struct CreateRequest {
  std::uint64_t size = 0;
  std::map<std::string, std::string> options;
};

// What `qemu-img info` shows beyond the generic fields.
struct ImageDescription {
  std::uint32_t cluster_size = 0;   // 0: not a clustered format
  bool dirty = false;               // "cleanly shut down: no" / dirty-flag
  std::string backing_filename;     // as recorded; empty: none
  std::string backing_format;       // as recorded; empty: not recorded
  // QEMU's ImageInfoSpecific ("format-specific": {"type": ..., "data": {...}}), or null.
  nlohmann::ordered_json format_specific;
};

// qemu-img check's ImageCheck fields, with its meaning, so tests compare them one for one.
struct CheckReport {
  std::uint64_t corruptions = 0;
  std::uint64_t leaks = 0;
  std::uint64_t check_errors = 0;
  std::uint64_t corruptions_fixed = 0;
  std::uint64_t leaks_fixed = 0;
  std::uint64_t total_clusters = 0;
  std::uint64_t allocated_clusters = 0;
  std::uint64_t fragmented_clusters = 0;
  std::uint64_t compressed_clusters = 0;
  std::uint64_t image_end_offset = 0;  // 0: not reported
  int error = 0;  // -errno of the last metadata I/O failure, 0 if none

  // qemu-img check's exit code: 0 clean, 1 not completed, 2 corruptions, 3 leaks.
  int exit_code() const noexcept {
    if (check_errors) return 1;
    if (corruptions) return 2;
    if (leaks) return 3;
    return 0;
  }
};

enum class RepairMode { kNone, kLeaks, kAll };  // qemu-img check's -r

// One internal snapshot as qemu-img snapshot -l and info show it (QEMU's SnapshotInfo).
struct SnapshotDescription {
  std::string id;    // create: empty picks the next free number
  std::string name;
  std::uint64_t vm_state_size = 0;
  std::uint32_t date_sec = 0;
  std::uint32_t date_nsec = 0;
  std::uint64_t vm_clock_nsec = 0;
  std::optional<std::uint64_t> icount;  // none recorded
};

class ImageFormat {
 public:
  virtual ~ImageFormat() = default;

  virtual std::string_view name() const noexcept = 0;
  virtual int probe(const ProbeInput& input) const noexcept = 0;

  virtual bool can_open() const noexcept { return true; }
  virtual coro::Task<BlockResult<BlockNodeRef>> open(BlockNodeRef file,
                                                     FormatOpenOptions options) const;

  virtual bool can_create() const noexcept { return false; }
  // Default: accepts everything (create() is then the one to refuse).
  virtual BlockError validate_create(const CreateRequest& /*request*/) const { return {}; }
  virtual coro::Task<BlockError> create(BlockNode& file, CreateRequest request) const;
  // qemu-img create's "Formatting 'F', fmt=... " option list for `request`, in qemu's order
  // and spelling (the part after "fmt=NAME ").
  virtual std::string create_summary(const CreateRequest& request) const;

  virtual coro::Task<ImageDescription> describe(BlockNode& node) const;

  virtual bool can_check() const noexcept { return false; }
  // Whether the format's nodes take writes with kWriteCompressed (block_node.h).
  virtual bool can_compress() const noexcept { return false; }
  virtual coro::Task<CheckReport> check(BlockNodeRef node, RepairMode mode) const;
  // qemu-img amend: changes the open (writable) node's image options, `options` by qemu's
  // names (compat, lazy_refcounts, size, ...), with no other request in flight. Default: the
  // error qemu-img gives for a format without amendment.
  virtual coro::Task<BlockError> amend(BlockNode& node,
                                       std::map<std::string, std::string> options) const;

  // Internal snapshots (qemu-img snapshot), on a node of this format opened for them alone.
  // The defaults fail with ENOTSUP. list: the snapshots in table order. create: adds one of
  // the active image. apply: the snapshot with id `id_or_name`, else the first so named,
  // becomes the active image. remove: deletes the first snapshot named `name`. ENOENT: none
  // matches.
  virtual bool can_snapshot() const noexcept { return false; }
  virtual coro::Task<BlockResult<std::vector<SnapshotDescription>>> list_snapshots(
      BlockNode& node) const;
  virtual coro::Task<BlockError> create_snapshot(BlockNode& node,
                                                 SnapshotDescription snapshot) const;
  virtual coro::Task<BlockError> apply_snapshot(BlockNode& node, std::string id_or_name) const;
  virtual coro::Task<BlockError> remove_snapshot(BlockNode& node, std::string name) const;
};

}  // namespace spindle::block
