// qemu-img measure for a qcow2 target (QEMU 7.2's arithmetic): the fully allocated size is
// the header cluster, L2 tables and L1 table for the whole virtual size (each rounded to
// whole tables and clusters), the refcount structures counting all of that, and every data
// cluster; the required size is the fully allocated size with only the source's data
// clusters (all of them with preallocation=falloc/full). The -o options are checked as
// qemu-img measure checks them, which is less than create does: options that only conflict
// with each other (compat=0.10 with lazy_refcounts, say) are accepted.
//
// Thread-safety: pure functions; callable from any thread.
#pragma once

#include <cstdint>
#include <optional>

#include "block/block_error.h"
#include "block/image_format.h"

namespace spindle::block::qcow2 {

// The target's cluster size for these options, or qemu-img measure's error.
BlockResult<std::uint64_t> measure_cluster_size(const CreateRequest& request);

BlockResult<SizeMeasurement> measure_size(const CreateRequest& request,
                                          const std::optional<MeasureSource>& source);

}  // namespace spindle::block::qcow2
