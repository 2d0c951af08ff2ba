// The qcow2 entry of the format registry (block/format_registry.h): probe, open, create,
// describe, check for qcow2 images.
//
// Thread-safety: an immutable singleton (image_format.h).
#pragma once

#include "block/image_format.h"

namespace spindle::block::qcow2 {

const ImageFormat& qcow2_format();

}  // namespace spindle::block::qcow2
