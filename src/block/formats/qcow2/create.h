// qcow2 image creation, as `qemu-img create -f qcow2` (QEMU 7.2) does it, byte for byte: the
// header cluster (header, extensions, backing file name), the refcount table in cluster 1, the
// first refcount block in cluster 2, the L1 table from cluster 3, and, with
// preallocation=metadata, an L2 table before each run of data clusters it maps. Where
// refcount blocks land follows QEMU's allocator (a refcount block is placed at the first free
// cluster when an allocation first needs it, and the allocation is retried; a refcount table
// that outgrows its cluster is replaced by a larger one placed with new refcount blocks at the
// next refcount-block boundary, the old one freed), so the files compare equal with cmp.
//
// parse_create_options() checks the -o options as QEMU does (same conditions, same meaning of
// the messages). preallocation=falloc/full place the refcount structures for the whole disk
// first, then the data clusters in one run (fallocated, or written with zeros for full),
// then the L2 tables. With an external data file (data_file) the data clusters are the data
// file's bytes at their guest offsets: the data file is created at the virtual size
// (preallocated for falloc/full), and any preallocation, like data_file_raw=on (which implies
// preallocation=metadata), gives the image an L2 table for every range, mapping every cluster.
// Not supported, refused with ENOTSUP: encryption.
//
// Thread-safety: pure functions, and create_image() needs the file node to itself while it
// runs.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "block/block_error.h"
#include "block/block_node.h"
#include "block/formats/qcow2/format.h"
#include "block/image_format.h"
#include "coro/task.h"

namespace spindle::block::qcow2 {

// QEMU's option value parsers: sizes with k/M/G/T/P/E suffixes, and on/off (yes/no, ...).
std::optional<std::uint64_t> parse_option_size(const std::string& text);
std::optional<bool> parse_option_bool(const std::string& text);
// The qcow2 version a compat value names ("0.10"/"v2": 2, "1.1"/"v3": 3), or none.
std::optional<std::uint32_t> parse_compat(const std::string& text);

enum class Preallocation { kOff, kMetadata, kFalloc, kFull };

struct CreateOptions {
  std::uint64_t size = 0;  // rounded up to 512 bytes, as qemu-img does
  std::uint32_t version = 3;
  std::uint32_t cluster_bits = 16;
  std::uint32_t refcount_order = 4;
  bool lazy_refcounts = false;
  bool extended_l2 = false;
  CompressionType compression_type = CompressionType::kDeflate;
  Preallocation preallocation = Preallocation::kOff;
  std::string backing_file;
  std::string backing_format;
  std::string data_file;  // empty: none
  bool data_file_raw = false;
};

BlockResult<CreateOptions> parse_create_options(const CreateRequest& request);

// The "cluster_size=65536 extended_l2=off ..." part of qemu-img create's "Formatting" line.
std::string create_summary_text(const CreateRequest& request);

// Formats `file` (empty) as a new image; `data` is the new, empty data file if
// options.data_file is set.
coro::Task<BlockError> create_image(BlockNode& file, BlockNode* data, CreateOptions options);

}  // namespace spindle::block::qcow2
