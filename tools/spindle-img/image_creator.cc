#include "image_creator.h"

#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>

#include "block/drivers/file.h"
#include "block/format_registry.h"
#include "block/image_chain.h"
#include "coro/block_on.h"
#include "tool_failure.h"

namespace spindle::img {

namespace {

coro::Task<block::BlockError> format_file(const block::ImageFormat& format,
                                          block::BlockNodeRef file, block::CreateRequest request) {
  const int result = co_await file->truncate(0);
  if (result < 0) co_return block::BlockError{-result, std::strerror(-result)};
  co_return co_await format.create(*file, std::move(request));
}

}  // namespace

const block::ImageFormat& require_creatable_format(const std::string& name) {
  const block::ImageFormat* format = block::find_format(name);
  if (!format) fail("Unknown file format '" + name + "'");
  if (!format->can_create()) {
    fail("Format driver '" + name + "' does not support image creation");
  }
  return *format;
}

void parse_creation_options(const std::string& text, block::CreateRequest& request) {
  std::size_t start = 0;
  while (start < text.size()) {
    std::size_t comma = text.find(',', start);
    if (comma == std::string::npos) comma = text.size();
    const std::string item = text.substr(start, comma - start);
    start = comma + 1;
    if (item.empty()) continue;
    const std::size_t equals = item.find('=');
    if (equals == std::string::npos) fail("Invalid option '" + item + "': expected key=value");
    request.options[item.substr(0, equals)] = item.substr(equals + 1);
  }
}

void validate_creation(const block::ImageFormat& format, const block::CreateRequest& request) {
  const block::BlockError error = format.validate_create(request);
  if (!error.ok()) fail(error.message);
}

std::string formatting_line(const std::string& filename, const block::ImageFormat& format,
                            const block::CreateRequest& request) {
  return fmt::format("Formatting '{}', fmt={} {}", filename, format.name(),
                     format.create_summary(request));
}

void create_image(const std::string& filename, const block::ImageFormat& format,
                  const block::CreateRequest& request) {
  struct stat existing;
  const bool existed = ::stat(filename.c_str(), &existing) == 0;
  base::Result<block::BlockNodeRef> file =
      block::open_file(filename, block::FileOptions{.read_only = false, .direct = false,
                                                    .create = true});
  if (!file.ok()) {
    fail("Could not create '" + filename + "': " + std::strerror(file.error()));
  }
  // Files the image refers to (a qcow2 data file) lie where opening the image will look.
  block::CreateRequest with_files = request;
  with_files.create_file = [&filename](const std::string& name)
      -> block::BlockResult<block::BlockNodeRef> {
    const std::string path = block::combine_backing_path(filename, name);
    base::Result<block::BlockNodeRef> created = block::open_file(
        path, block::FileOptions{.read_only = false, .direct = false, .create = true});
    if (!created.ok()) {
      return block::BlockError{created.error(), "Could not create '" + path + "': " +
                                                    std::strerror(created.error())};
    }
    return std::move(created.value());
  };
  const block::BlockError result =
      coro::block_on(format_file(format, file.value(), std::move(with_files)));
  file.value().reset();  // close the file before cleaning up
  if (!result.ok()) {
    if (!existed) ::unlink(filename.c_str());
    fail(filename + ": " + result.message);
  }
}

}  // namespace spindle::img
