// SnapshotParam: which internal snapshot a read-only user of an image reads instead of the
// active image (qemu-img convert -l, measure -l, qemu-nbd -l), and loading that view.
//
// Thread-safety: parse_snapshot_param() is a pure function. load_snapshot_view() runs on the
// node's context before any other request, as ImageFormat::load_snapshot_view() requires.
#pragma once

#include <string>
#include <string_view>

#include "block/block_error.h"
#include "block/block_node.h"
#include "block/image_format.h"
#include "coro/task.h"

namespace spindle::block {

struct SnapshotParam {
  std::string id;
  std::string name;
  bool either = false;  // a bare word: an id, else a name (qemu's load_tmp_by_id_or_name)
};

// "snapshot.id=ID,snapshot.name=NAME" (either key or both; an empty value matches any), or an
// id or name alone. EINVAL with qemu's two-line message for any other key.
BlockResult<SnapshotParam> parse_snapshot_param(std::string_view text);

// From now on `node` (read-only, of `format`) reads the snapshot `param` selects. ENOENT
// "Can't find snapshot" when none matches; the format's errors otherwise.
coro::Task<BlockError> load_snapshot_view(const ImageFormat& format, BlockNode& node,
                                          SnapshotParam param);

}  // namespace spindle::block
