// The format registry: the one place that lists the image formats (image_format.h). Tools and
// servers probe, open, create, describe and check through it and never name a format.
//
//   image_formats()   every format, readable and merely recognised (vmdk, vdi, vpc, vhdx,
//                     luks, dmg, parallels, cloop, qcow v1, bochs), in a fixed order;
//   find_format()     by QEMU's name ("raw", "qcow2", "qed", ...), or null;
//   probe_format()    the highest-scoring format for a file's first bytes (the first listed
//                     wins a tie); raw when nothing else claims them. The caller must refuse a
//                     result whose can_open() is false, naming it ("image format 'vmdk' is not
//                     supported").
//   probe_node()      reads a node's first ProbeInput::kProbeBytes (zeros past its end, as
//                     QEMU probes) and probes them with `filename` (dmg goes by its name).
//
// Thread-safety: the list is immutable after static initialisation; every function may be
// called from any thread at once.
#pragma once

#include <span>
#include <string_view>

#include "block/block_error.h"
#include "block/block_node.h"
#include "block/image_format.h"
#include "coro/task.h"

namespace spindle::block {

std::span<const ImageFormat* const> image_formats();
const ImageFormat* find_format(std::string_view name);
const ImageFormat& probe_format(const ProbeInput& input);
coro::Task<BlockResult<const ImageFormat*>> probe_node(BlockNode& file, std::string_view filename);

}  // namespace spindle::block
