// open_image_chain(): opens an image file and its whole backing chain (QED over QED over ...
// over raw). Backing names are resolved relative to the directory of the image naming them;
// a format of "" is probed (QED magic, else raw) unless the image marks its backing file raw.
// A chain that refers to itself (compared by real path) or is deeper than max_depth is
// refused with ELOOP. Backing files are opened read-only.
//
// Thread-safety: call from a coroutine; the returned nodes follow their own contracts.
#pragma once

#include <functional>
#include <string>

#include "base/result.h"
#include "block/block_node.h"
#include "block/qed/error.h"
#include "coro/task.h"

namespace spindle::block::qed {

// Opens a protocol node for a file (block/drivers/file.h's open_file fits).
using FileOpener = std::function<base::Result<BlockNodeRef>(const std::string& path, bool read_only)>;

struct ChainOptions {
  bool read_only = false;
  bool repair_if_dirty = true;
  unsigned max_depth = 16;
  bool ignore_backing = false;  // the top image's backing file is not opened (qemu-img info)
  FileOpener open_file;
};

// `format`: "qed", "raw", or "" to probe.
coro::Task<QedResult<BlockNodeRef>> open_image_chain(std::string path, std::string format,
                                                     ChainOptions options);

}  // namespace spindle::block::qed
