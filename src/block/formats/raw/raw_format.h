// The raw entry of the format registry (block/format_registry.h): the image is the protocol
// node's bytes, unchanged. raw probes with score 1 for anything, so it wins only when no other
// format claims a file. open() returns the protocol node itself, except for a probed
// (FormatOpenOptions::probed), writable image: that gets a ProbedRawNode (probed_raw_node.h),
// which refuses writes that would make sector 0 probe as another format. create() makes a
// sparse file of the requested size (`preallocation=off` is the only option).
//
// Thread-safety: an immutable singleton (image_format.h).
#pragma once

#include "block/image_format.h"

namespace spindle::block::raw {

const ImageFormat& raw_format();

}  // namespace spindle::block::raw
