// Opening images for spindle-img: format probing, the backing chain, and the names qemu-img
// shows for each level. Failures throw ToolFailure (exit status 1) with a message naming the
// file, so subcommands only deal with images that opened.
//
//   probe_format()       "qed" when the file starts with the QED magic, else "raw";
//   open_image()         the image and (unless `with_backing` is false) its whole backing chain
//                        (block/qed/chain.h), wrapped in a BlockBackend;
//   combine_backing_path() resolves a backing name against the image that names it, as
//                        qemu-img's "full-backing-filename" does.
//
// Thread-safety: call from the main thread outside coroutines (it uses coro::block_on on the
// main context). The returned nodes and backend follow their own contracts.
#pragma once

#include <memory>
#include <string>

#include "block/block_backend.h"
#include "block/block_node.h"
#include "block/qed/qed_node.h"

namespace spindle::img {

struct ImageOpenOptions {
  bool read_only = true;
  bool with_backing = true;       // false: QEMU's BDRV_O_NO_BACKING (qemu-img info does this)
  bool repair_if_dirty = false;   // only writable opens repair; check and info never do
  bool direct = false;  // O_DIRECT on every file of the chain (cache=none; block/drivers/direct_file.h)
};

struct OpenedImage {
  std::string filename;  // as given on the command line
  std::string format;    // "raw" or "qed"
  block::BlockNodeRef root;
  block::qed::QedNodeRef qed;  // null for raw images
  std::shared_ptr<block::BlockBackend> backend;
};

// Throws ToolFailure if the file cannot be read. A format other than raw/qed is refused.
std::string probe_format(const std::string& path);
void require_known_format(const std::string& format);

// `format`: "raw", "qed", or "" to probe.
OpenedImage open_image(const std::string& path, const std::string& format,
                       ImageOpenOptions options);

std::string combine_backing_path(const std::string& image_path, const std::string& backing_name);

}  // namespace spindle::img
