// `spindle-img create`: formats a new image in any format the registry can create
// (qemu-img create).
#include <cstdio>

#include "commands.h"
#include "image_creator.h"
#include "image_opener.h"
#include "size_parser.h"
#include "tool_failure.h"

namespace spindle::img {

int run_create(const CreateOptions& options) {
  const block::ImageFormat& format = require_creatable_format(options.format);
  block::CreateRequest request;
  parse_creation_options(options.options, request);
  if (!options.backing_file.empty()) request.options["backing_file"] = options.backing_file;
  if (!options.backing_format.empty()) request.options["backing_fmt"] = options.backing_format;
  validate_creation(format, request);
  const auto option = [&request](const char* key) {
    const auto found = request.options.find(key);
    return found == request.options.end() ? std::string() : found->second;
  };
  const std::string backing_file = option("backing_file");
  const std::string backing_format = option("backing_fmt");
  if (backing_file.empty() && !backing_format.empty()) {
    fail("Backing format given without a backing file");
  }
  if (!backing_file.empty() && backing_format.empty()) {
    fail(options.filename + ": Backing file specified without backing format");
  }

  bool have_size = false;
  if (!options.size.empty()) {
    const std::optional<std::uint64_t> parsed = parse_size(options.size);
    if (!parsed) fail(kInvalidSizeMessage);
    request.size = *parsed;
    have_size = true;
  }
  if (!backing_file.empty()) {
    // Like qemu-img without -u: the backing file must open in the given format.
    require_format(backing_format);
    const std::string backing_path = block::combine_backing_path(options.filename, backing_file);
    OpenedImage backing;
    try {
      backing = open_image(backing_path, backing_format, ImageOpenOptions{});
    } catch (const ToolFailure& error) {
      fail(std::string(error.what()) + "\nCould not open backing image.");
    }
    if (!have_size) {
      request.size = backing.backend->size();
      have_size = true;
    }
  }
  if (!have_size) fail("Image creation needs a size parameter");

  if (!options.quiet) {
    std::printf("%s\n", formatting_line(options.filename, format, request).c_str());
    std::fflush(stdout);
  }
  create_image(options.filename, format, request);
  return 0;
}

}  // namespace spindle::img
