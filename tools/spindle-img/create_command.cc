// `spindle-img create`: formats a new raw or QED image (qemu-img create).
#include <cstdio>

#include "commands.h"
#include "image_creator.h"
#include "image_opener.h"
#include "size_parser.h"
#include "tool_failure.h"

namespace spindle::img {

int run_create(const CreateOptions& options) {
  if (options.format != "raw" && options.format != "qed") {
    fail("Unknown file format '" + options.format + "' (spindle-img creates raw and qed)");
  }
  CreationOptions creation = parse_creation_options(options.format, options.options);
  if (!options.backing_file.empty()) creation.backing_file = options.backing_file;
  if (!options.backing_format.empty()) creation.backing_format = options.backing_format;
  if (options.format == "raw" && (!creation.backing_file.empty() ||
                                  !creation.backing_format.empty())) {
    fail("Backing file not supported for file format 'raw'");
  }
  if (creation.backing_file.empty() && !creation.backing_format.empty()) {
    fail("Backing format given without a backing file");
  }
  if (!creation.backing_file.empty() && creation.backing_format.empty()) {
    fail(options.filename + ": Backing file specified without backing format");
  }

  std::uint64_t size = 0;
  bool have_size = false;
  if (!options.size.empty()) {
    const std::optional<std::uint64_t> parsed = parse_size(options.size);
    if (!parsed) fail(kInvalidSizeMessage);
    size = *parsed;
    have_size = true;
  }
  if (!creation.backing_file.empty()) {
    // Like qemu-img without -u: the backing file must open in the given format.
    require_known_format(creation.backing_format);
    const std::string backing_path =
        combine_backing_path(options.filename, creation.backing_file);
    OpenedImage backing;
    try {
      backing = open_image(backing_path, creation.backing_format, ImageOpenOptions{});
    } catch (const ToolFailure& error) {
      fail(std::string(error.what()) + "\nCould not open backing image.");
    }
    if (backing.format != creation.backing_format) {
      fail("'" + backing_path + "' is not in " + creation.backing_format + " format");
    }
    if (!have_size) {
      size = backing.backend->size();
      have_size = true;
    }
  }
  if (!have_size) fail("Image creation needs a size parameter");

  if (!options.quiet) {
    std::printf("%s\n", formatting_line(options.filename, options.format, size, creation).c_str());
    std::fflush(stdout);
  }
  create_image(options.filename, options.format, size, creation);
  return 0;
}

}  // namespace spindle::img
