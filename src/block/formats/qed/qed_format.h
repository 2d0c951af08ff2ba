// The QED entry of the format registry (block/format_registry.h): probes the QED magic, opens
// images through open_qed() (qed_node.h), creates them through create_qed() (create.h) with
// qemu-img's -o options cluster_size, table_size, backing_file and backing_fmt, describes them
// (cluster size, NEED_CHECK as "dirty", the backing name, "raw" as the backing format when
// the image marks it so), checks/repairs them with QedNode::check() and changes the backing
// file they record with QedNode::change_backing() (rebase). QED images cannot be emptied
// (make_empty: ENOTSUP, as in QEMU).
//
// Thread-safety: an immutable singleton (image_format.h).
#pragma once

#include "block/image_format.h"

namespace spindle::block::qed {

const ImageFormat& qed_format();

}  // namespace spindle::block::qed
