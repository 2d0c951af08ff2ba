// qcow2 consistency check and repair, with `qemu-img check`'s counts and meaning: every
// cluster's expected refcount is computed from the metadata that references it (the header
// cluster, the L1 table and the L2 tables it names, the refcount table and refcount blocks,
// the snapshot table and every snapshot's L1 table and L2 tables, the bitmap directory, and
// each bitmap's table and data clusters) and compared with the stored refcount.
//
//   corruptions   a stored refcount lower than the references, a COPIED flag that disagrees
//                 with the stored refcount, reserved bits set, an unaligned table or cluster
//                 offset, a data cluster past the end of the file, a broken refcount table
//                 entry or refcount block;
//   leaks         clusters whose stored refcount is higher than the references;
//   allocated / fragmented / compressed clusters, image-end-offset: as qemu-img reports them
//                 (refcounts stored for clusters past the end of the file are not compared).
//
// Repair, as qemu-img's -r: `kLeaks` lowers refcounts that are too high; `kAll` also raises
// those that are too low, turns preallocated zero clusters at unaligned offsets into plain
// zero clusters, and fixes COPIED flags (with `kLeaks` only on an otherwise clean image).
// When a referenced cluster has no stored refcount at all, or the refcount table or a block
// is broken, `kAll` rebuilds the refcount structure (new blocks and table placed first-fit,
// the old ones freed) and `kLeaks` gives up with check_errors (qemu-img's "need to rebuild").
// After a repair the image is checked again and that report is returned, with
// corruptions_fixed/leaks_fixed from the repair, as qemu-img's double check does; a clean
// result clears the dirty and corrupt bits. A data cluster past the end of the file stays a
// corruption (qemu-img does not repair it either).
//
// Works on the image file node directly, given the decoded header: for an open Qcow2Node
// pass its file() and header() after a flush, and use the node for nothing but close() after a
// repair (its caches no longer match the file).
//
// Thread-safety: needs the file node to itself while it runs.
#pragma once

#include "block/block_node.h"
#include "block/formats/qcow2/format.h"
#include "block/image_format.h"
#include "coro/task.h"

namespace spindle::block::qcow2 {

coro::Task<CheckReport> check_image(BlockNode& file, Header header, RepairMode mode);

// qemu-img amend -o refcount_bits: rebuilds a clean image's refcount table and blocks with
// 2^new_order-bit entries (placed first-fit, as a repair's rebuild) and switches the header to
// them in one write; `header` is updated. Refuses (EINVAL, qemu-img's message) a width that
// cannot hold some cluster's refcount, and images with leaks or corruptions.
coro::Task<BlockError> change_refcount_width(BlockNode& file, Header& header,
                                             std::uint32_t new_order);

}  // namespace spindle::block::qcow2
