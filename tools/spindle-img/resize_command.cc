// `spindle-img resize`: changes an image's virtual size (qemu-img resize). Shrinking needs
// --shrink and a format whose truncate can shrink (raw can; one that cannot answers ENOTSUP).
#include <cstdio>
#include <cstring>

#include "commands.h"
#include "coro/block_on.h"
#include "image_opener.h"
#include "size_parser.h"
#include "tool_failure.h"

namespace spindle::img {

namespace {

coro::Task<int> truncate_and_close(OpenedImage& image, std::uint64_t size) {
  int result = co_await image.root->truncate(size);
  if (result >= 0) result = co_await image.backend->flush();
  const int closed = co_await image.root->close();
  co_return result < 0 ? result : closed;
}

}  // namespace

int run_resize(const ResizeOptions& options) {
  std::string text = options.size;
  int sign = 0;
  if (!text.empty() && (text.front() == '+' || text.front() == '-')) {
    sign = text.front() == '+' ? 1 : -1;
    text.erase(0, 1);
  }
  const std::optional<std::uint64_t> amount = parse_size(text);
  if (!amount) fail(kInvalidSizeMessage);

  OpenedImage image = open_image(options.filename, options.format,
                                 ImageOpenOptions{.read_only = false, .with_backing = true,
                                                  .repair_if_dirty = true});
  const std::uint64_t current = image.backend->size();
  std::uint64_t size = *amount;
  if (sign > 0) {
    if (*amount > UINT64_MAX - current) fail("Image size would overflow");
    size = current + *amount;
  } else if (sign < 0) {
    if (*amount > current) fail("New image size must be positive.");
    size = current - *amount;
  }
  if (size < current) {
    if (!options.shrink) fail("Use the --shrink option to perform a shrink operation.");
  }
  const int result = coro::block_on(truncate_and_close(image, size));
  if (result == -EINVAL) fail("Invalid size " + std::to_string(size) + " for this image");
  if (result == -ENOTSUP && size < current) {
    fail("Image format '" + std::string(image.format->name()) + "' cannot shrink images");
  }
  if (result < 0) fail(std::string("Error resizing image: ") + std::strerror(-result));
  if (!options.quiet) std::printf("Image resized.\n");
  return 0;
}

}  // namespace spindle::img
