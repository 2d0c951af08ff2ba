// Opening images for spindle-img through the format registry (block/format_registry.h): the
// format given with -f or probed, the backing chain (block/image_chain.h), and the names
// qemu-img shows for each level. Failures throw ToolFailure (exit status 1) with a message
// naming the file, so subcommands only deal with images that opened.
//
//   require_format()     the registry's format for a -f name ("Unknown file format 'X'");
//   open_image()         the image and (unless `with_backing` is false) its whole backing
//                        chain, wrapped in a BlockBackend. A writable open whose format was
//                        probed as raw prints qemu's warning on stderr (writes that would
//                        change what sector 0 probes as are then refused).
//   close_after()        a coroutine: closes an image after an operation, keeping the first
//                        error.
//
// Thread-safety: call from the main thread; open_image() and require_format() outside
// coroutines (they use coro::block_on on the main context). The returned nodes and backend follow their own contracts.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "block/block_backend.h"
#include "block/block_node.h"
#include "block/cache_mode.h"
#include "block/image_chain.h"
#include "block/image_format.h"
#include "coro/task.h"

namespace spindle::img {

struct ImageOpenOptions {
  bool read_only = true;
  bool with_backing = true;       // false: QEMU's BDRV_O_NO_BACKING (qemu-img info does this)
  bool repair_if_dirty = false;   // only writable opens repair; check and info never do
  bool metadata_only = false;     // qemu-img info's NO_IO: a missing data file is no error
  // qemu's cache mode for every file of the chain (block/cache_mode.h): O_DIRECT (none,
  // directsync; block/drivers/direct_file.h), flushes ignored (unsafe), or every write sent
  // with FUA to the root (writethrough, directsync).
  block::CacheMode cache = {};
};

struct OpenedImage {
  std::string filename;  // as given on the command line
  const block::ImageFormat* format = nullptr;  // the top image's
  bool probed = false;                         // the format was probed, not given
  block::BlockNodeRef root;
  std::vector<block::ChainLevel> levels;       // top first
  std::shared_ptr<block::BlockBackend> backend;
};

// Throws ToolFailure for a name the registry does not know. Formats we only recognise are
// returned (opening them fails with a message naming the format).
const block::ImageFormat& require_format(const std::string& name);

// `format`: a registry name, or "" to probe.
OpenedImage open_image(const std::string& path, const std::string& format,
                       ImageOpenOptions options);

// Closes `image` (writing back its metadata) after an operation that ended with `error`: that
// error, or if it is none, a failure to close ("Error while closing the image: ...").
coro::Task<block::BlockError> close_after(OpenedImage& image, block::BlockError error);

// The warning qemu prints when it probed raw for a writable image (on stderr, once per image).
void warn_probed_raw(const std::string& path);

}  // namespace spindle::img
