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
//   change_backing() the backing name and format an image records (qemu-img rebase).
//   make_empty()     drops everything an image allocates (qemu-img commit).
//   *_snapshot(s)()  internal snapshots: list, create, apply, remove (qcow2; others: ENOTSUP).
//   *_bitmaps()      persistent dirty bitmaps: load, store (qcow2; others: none, ENOTSUP).
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
  // Only the metadata will be read (qemu-img info, QEMU's BDRV_O_NO_IO): an external data file
  // that cannot be opened is not an error, and I/O to the image's data then fails with EIO.
  bool metadata_only = false;
  BackingOpener open_backing;    // required unless ignore_backing
  // Opens an image's external data file (qcow2 data_file) by the name the image records,
  // resolved against the image's location (failures say "Could not open 'PATH': why"); unset:
  // such images are refused.
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
  // Creates (or truncates to empty) another file that the new image will refer to by `name`
  // (qcow2's data_file), resolved as opening the image will resolve it; unset: formats
  // refuse options that need one.
  std::function<BlockResult<BlockNodeRef>(const std::string& name)> create_file;
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

// qemu-img measure's answer: the bytes a new image of the format would take.
struct SizeMeasurement {
  std::uint64_t required = 0;         // for the source's data (none with a size alone)
  std::uint64_t fully_allocated = 0;  // with every cluster allocated
  // The source's persistent bitmaps in the target's layout, where both can keep them.
  std::optional<std::uint64_t> bitmaps;
};

// One persistent dirty bitmap. Bits are in qcow2's serialization: bit i (byte i / 8, from
// its least significant bit) is set when guest bytes [i * granularity, (i + 1) * granularity)
// were written while the bitmap was enabled.
struct PersistentBitmap {
  std::string name;
  std::uint64_t granularity = 65536;
  bool enabled = true;   // "auto": tracks writes
  bool in_use = false;   // not saved correctly: its bits are unusable ("in-use")
  std::optional<std::vector<std::uint8_t>> bits;
};

// What measure() is told of the source image (qemu-img measure --size has none).
struct MeasureSource {
  std::uint64_t size = 0;  // virtual size
  // The source's data, counted in whole units of the target's measure_granularity() (ranges
  // that read as zeros are not data).
  std::uint64_t data_bytes = 0;
  bool keeps_bitmaps = false;  // the source's image can hold persistent bitmaps
  std::vector<PersistentBitmap> bitmaps;  // the source's persistent bitmaps (bits not needed)
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
  // qemu-img rebase: records `name` ("" = none) and `format` ("" = none recorded) as the
  // open (writable) node's backing file, with no other request in flight. Only the image's
  // header changes: the node keeps reading through the backing node it was opened with, so
  // close it next. Default: ENOTSUP (qemu's answer for formats without backing files).
  virtual coro::Task<BlockError> change_backing(BlockNode& node, std::string name,
                                                std::string format) const;
  // qemu-img commit's emptying of the top image (open, writable, no other request in
  // flight): afterwards the node allocates nothing and reads through to its backing node.
  // Default: ENOTSUP (qemu-img commit then leaves the image as it is).
  virtual coro::Task<BlockError> make_empty(BlockNode& node) const;

  // qemu-img measure, for a target made with `request`'s options (request.size: the virtual
  // size when there is no source). measure_granularity(): the unit the source's data is to be
  // counted in (the options checked as qemu-img measure checks them; the message may hold
  // several lines). supports_persistent_bitmaps(): whether `node`, an image of this format,
  // can hold persistent dirty bitmaps. Defaults: qemu-img's error for a format without
  // measurement; false.
  virtual BlockResult<std::uint64_t> measure_granularity(const CreateRequest& request) const;
  virtual BlockResult<SizeMeasurement> measure(const CreateRequest& request,
                                               const std::optional<MeasureSource>& source) const;
  virtual bool supports_persistent_bitmaps(const BlockNode& /*node*/) const noexcept {
    return false;
  }

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
  // A read-only node reads the internal snapshot with id `id` and name `name` (empty: any)
  // from now on (qemu's bdrv_snapshot_load_tmp: measure -l). ENOTSUP "Block format 'X' used by
  // device '' does not support temporarily loading internal snapshots" by default.
  virtual coro::Task<BlockError> load_snapshot_view(BlockNode& node, std::string id,
                                                    std::string name) const;

  // Persistent dirty bitmaps (qemu-img bitmap, info, convert --bitmaps), on a node of this
  // format opened for them alone. load_bitmaps(): the image's bitmaps in directory order,
  // their bits too with `with_bits` (bitmaps in use get none). store_bitmaps(): the image's
  // bitmaps become `bitmaps`, in that order; one without bits keeps the data of the bitmap of
  // that name it has now. Defaults: no bitmaps; storing fails with ENOTSUP ("Operation not
  // supported", as qemu for formats without persistent bitmaps).
  virtual coro::Task<BlockResult<std::vector<PersistentBitmap>>> load_bitmaps(
      BlockNode& node, bool with_bits) const;
  virtual coro::Task<BlockError> store_bitmaps(BlockNode& node,
                                               std::vector<PersistentBitmap> bitmaps) const;
};

}  // namespace spindle::block
