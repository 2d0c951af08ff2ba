// add_blockdev(): opens the node that blockdev-add (or --blockdev) describes, with QEMU's
// option names and argument checking, and its inline children, and records them in the
// NodeTable. Drivers: file and host_device, raw, qcow2, qed, null-co and null-aio, nbd.
// Children ("file", "backing") are an existing node's name or an inline object; qcow2/qed
// "backing" absent opens the backing chain the image records, null opens none. Either every
// node of the request is added or none (what was opened before an error is closed again).
//
// Thread-safety: a coroutine on the daemon's control context (the NodeTable's).
#pragma once

#include "coro/task.h"
#include "monitor/node_table.h"
#include "monitor/qmp_error.h"
#include "monitor/qmp_text.h"

namespace spindle::monitor {

coro::Task<QmpResult> add_blockdev(NodeTable& nodes, const Json& options, bool from_keyval);

// Whether `name` is a valid QEMU id: a letter, then letters, digits, '-', '.' and '_'.
bool is_well_formed_id(const std::string& name);

}  // namespace spindle::monitor
