// open_direct_file(): the file node for cache=none/directsync (spindle-nbd --cache=none,
// spindle-img -t none). The file is opened O_DIRECT, and a BlockBackend sits between it and
// whatever format driver opens it, because O_DIRECT takes only requests aligned to the device's
// logical block size and format drivers issue smaller ones (QED reads and rewrites its header
// in place, format probing reads a few bytes). The backend turns those into aligned
// bounce-buffer reads and serialised read-modify-writes; aligned data requests pass straight
// through.
//
// Thread-safety: as BlockBackend: any number of coroutines on any contexts.
#pragma once

#include <string>

#include "base/result.h"
#include "block/block_node.h"

namespace spindle::block {

base::Result<BlockNodeRef> open_direct_file(const std::string& path, bool read_only);

}  // namespace spindle::block
