// How spindle-img shows an image's internal snapshots, in qemu-img 7.2's layouts: the
// "Snapshot list:" table of `snapshot -l` and human `info` (dates in local time, as QEMU's
// localtime_r; VM state sizes as human_size(); VM clock as HH:MM:SS.mmm; the icount column
// empty where none is recorded), and the "snapshots" list of `info --output=json`.
//
// Thread-safety: call from the main thread outside coroutines (image_snapshots() uses
// coro::block_on on the main context); the formatters are pure.
#pragma once

#include <nlohmann/json.hpp>

#include <string>
#include <vector>

#include "block/image_format.h"
#include "image_opener.h"

namespace spindle::img {

// The image's snapshots through its format, in table order: empty for formats without
// internal snapshots. A table that cannot be read throws ToolFailure ("Could not open ...").
std::vector<block::SnapshotDescription> image_snapshots(const OpenedImage& image);

// "Snapshot list:\n", the column header, one line per snapshot (each ending in "\n"); ""
// for none.
std::string snapshot_table_text(const std::vector<block::SnapshotDescription>& snapshots);

// QEMU's SnapshotInfo objects with its key order.
nlohmann::ordered_json snapshots_json(const std::vector<block::SnapshotDescription>& snapshots);

}  // namespace spindle::img
