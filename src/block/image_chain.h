// open_image_chain(): opens an image and its whole backing chain through the format registry
// (format_registry.h): a file, or an NBD URI (block/drivers/nbd/uri.h) whose export is the
// protocol node. At each level the format is the one given ("" = probe the first bytes; a
// backing file's format is the one its parent records, else probed), looked up by name; a
// format we only recognise (vmdk, ...) is refused with an error naming it. Backing files are
// opened read-only through FormatOpenOptions::open_backing, their names resolved against the
// image naming them (combine_backing_path). A chain that refers to itself (compared by real
// path, or URI text) or is deeper than max_depth is refused with ELOOP.
//
// Error messages do not name the top image (the caller says "Could not open 'F': ...").
//
// Thread-safety: call from a coroutine; the returned nodes follow their own contracts.
#pragma once

#include <functional>
#include <map>
#include <string>
#include <vector>

#include "base/result.h"
#include "block/block_error.h"
#include "block/block_node.h"
#include "block/image_format.h"
#include "coro/task.h"

namespace spindle::block {

// Opens a protocol node for a file (block/drivers/file.h's open_file fits).
using FileOpener = std::function<base::Result<BlockNodeRef>(const std::string& path, bool read_only)>;

struct ChainOptions {
  bool read_only = false;
  bool repair_if_dirty = true;
  unsigned max_depth = 16;
  bool ignore_backing = false;  // the top image's backing file is not opened (qemu-img info)
  bool metadata_only = false;   // FormatOpenOptions::metadata_only for the top image
  FileOpener open_file;         // required
  // The top image's format options (FormatOpenOptions::options).
  std::map<std::string, std::string> format_options;
};

// One image of an opened chain.
struct ChainLevel {
  const BlockNode* node = nullptr;      // the node its format opened
  std::string filename;                 // as opened: the top's as given, backing names resolved
  const ImageFormat* format = nullptr;
  bool probed = false;                  // the format was probed, not given or recorded
};

struct ImageChain {
  BlockNodeRef root;
  std::vector<ChainLevel> levels;  // top first; levels[0] is the root
  const ImageFormat& format() const { return *levels.front().format; }
  bool probed() const { return levels.front().probed; }
};

// `format`: a registry name, or "" to probe.
coro::Task<BlockResult<ImageChain>> open_chain(std::string path, std::string format,
                                               ChainOptions options);
// The same, for callers that need only the root node.
coro::Task<BlockResult<BlockNodeRef>> open_image_chain(std::string path, std::string format,
                                                       ChainOptions options);

// A backing name as recorded in the image at `image_path`, resolved as QEMU's
// "full-backing-filename": absolute names and NBD URIs as they are, names under an NBD URI as
// they are, others relative to the directory of `image_path`.
std::string combine_backing_path(const std::string& image_path, const std::string& backing_name);

}  // namespace spindle::block
