#include "image_opener.h"

#include <cstdio>
#include <cstring>

#include "block/drivers/direct_file.h"
#include "block/drivers/file.h"
#include "block/format_registry.h"
#include "coro/block_on.h"
#include "tool_failure.h"

namespace spindle::img {

const block::ImageFormat& require_format(const std::string& name) {
  const block::ImageFormat* format = block::find_format(name);
  if (!format) fail("Unknown file format '" + name + "'");
  if (!format->can_open()) {
    fail("Unknown file format '" + name + "' (spindle-img recognises " + name +
         " images but cannot open them)");
  }
  return *format;
}

coro::Task<block::BlockError> close_after(OpenedImage& image, block::BlockError error) {
  const int closed = co_await image.root->close();
  if (error.ok() && closed < 0) {
    error = {-closed, std::string("Error while closing the image: ") + std::strerror(-closed)};
  }
  co_return error;
}

void warn_probed_raw(const std::string& path) {
  std::fprintf(stderr,
               "WARNING: Image format was not specified for '%s' and probing guessed raw.\n"
               "         Automatically detecting the format is dangerous for raw images, write "
               "operations on block 0 will be restricted.\n"
               "         Specify the 'raw' format explicitly to remove the restrictions.\n",
               path.c_str());
}

OpenedImage open_image(const std::string& path, const std::string& format,
                       ImageOpenOptions options) {
  if (!format.empty()) require_format(format);
  block::ChainOptions chain;
  chain.ignore_backing = !options.with_backing;
  chain.read_only = options.read_only;
  chain.repair_if_dirty = options.repair_if_dirty;
  chain.metadata_only = options.metadata_only;
  chain.open_file = [cache = options.cache](const std::string& file, bool read_only) {
    base::Result<block::BlockNodeRef> node = cache.direct ? block::open_direct_file(file, read_only)
                                                          : block::open_file(file, read_only);
    if (node.ok()) node = block::wrap_flush_mode(std::move(node).value(), file_flush_mode(cache));
    return node;
  };
  auto opened = coro::block_on(block::open_chain(path, format, std::move(chain)));
  if (!opened) {
    std::string message = opened.error().message;
    // "image format 'vmdk' is not supported": say by what.
    if (message.starts_with("image format '")) message += " by spindle-img";
    fail("Could not open '" + path + "': " + message);
  }
  OpenedImage image;
  image.filename = path;
  image.format = &opened.value().format();
  image.probed = opened.value().probed();
  image.root = std::move(opened.value().root);
  image.levels = std::move(opened.value().levels);
  if (image.probed && !options.read_only && image.format->name() == "raw") warn_probed_raw(path);
  image.backend =
      std::make_shared<block::BlockBackend>(block::with_write_through(image.root, options.cache));
  return image;
}

}  // namespace spindle::img
