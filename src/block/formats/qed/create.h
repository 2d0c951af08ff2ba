// create_qed(): formats a new QED image on a child node, as `qemu-img create -f qed` does
// (reference/qed.md §1.13): truncate to 0, write the header, the backing file name at offset
// 64, and a zeroed L1 table at offset cluster_size. The size is rounded up to 512 bytes.
//
// Thread-safety: the caller owns the child exclusively while it runs.
#pragma once

#include <cstdint>
#include <string>

#include "block/block_node.h"
#include "block/block_error.h"
#include "block/formats/qed/format.h"
#include "coro/task.h"

namespace spindle::block::qed {

struct CreateOptions {
  std::uint64_t size = 0;
  std::uint32_t cluster_size = kDefaultClusterSize;
  std::uint32_t table_size = kDefaultTableSize;  // 1 is valid, but QEMU cannot open it (§5.1-A)
  std::string backing_file;                      // empty: none
  std::string backing_format;                    // "raw" sets BACKING_FORMAT_NO_PROBE
};

coro::Task<BlockError> create_qed(BlockNode& file, CreateOptions options);

}  // namespace spindle::block::qed
