// `spindle-img amend`: changes an existing image's options in place (qemu-img amend): for
// qcow2 compat (0.10 <-> 1.1), lazy_refcounts and size; the format decides what it accepts and
// answers with qemu-img's messages.
#include <cstring>

#include "commands.h"
#include "coro/block_on.h"
#include "image_creator.h"
#include "image_opener.h"
#include "progress_printer.h"
#include "tool_failure.h"

namespace spindle::img {

namespace {

coro::Task<block::BlockError> amend_and_close(OpenedImage& image,
                                              std::map<std::string, std::string> options) {
  block::BlockError error = co_await image.format->amend(*image.root, std::move(options));
  co_return co_await close_after(image, std::move(error));
}

}  // namespace

int run_amend(const AmendOptions& options) {
  if (!options.options_given) {
    fail("Must specify options (-o)\nTry 'qemu-img --help' for more information");
  }
  if (options.options.empty()) fail("Invalid option list: ");
  block::CreateRequest request;
  parse_creation_options(options.options, request);
  OpenedImage image = open_image(options.filename, options.format,
                                 ImageOpenOptions{.read_only = false, .with_backing = true,
                                                  .repair_if_dirty = true});
  ProgressPrinter progress(options.progress && !options.quiet);
  progress.update(0, 1);
  const block::BlockError error =
      coro::block_on(amend_and_close(image, std::move(request.options)));
  progress.finish();
  if (!error.ok()) fail(error.message);
  return 0;
}

}  // namespace spindle::img
