#include "image_creator.h"

#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>

#include "block/drivers/file.h"
#include "block/qed/create.h"
#include "block/qed/format.h"
#include "coro/block_on.h"
#include "size_parser.h"
#include "tool_failure.h"

namespace spindle::img {

namespace {

std::uint32_t parse_u32_option(const std::string& key, const std::string& value, bool with_suffix) {
  std::optional<std::uint64_t> number = parse_size(value);
  if (!with_suffix && value.find_first_not_of("0123456789") != std::string::npos) number.reset();
  if (!number || *number > UINT32_MAX) {
    fail("Parameter '" + key + "' expects a " + (with_suffix ? "size" : "number") + ", got '" +
         value + "'");
  }
  return static_cast<std::uint32_t>(*number);
}

coro::Task<int> resize_raw(block::BlockNodeRef file, std::uint64_t size) {
  int result = co_await file->truncate(0);
  if (result >= 0) result = co_await file->truncate(size);
  if (result >= 0) result = co_await file->flush();
  co_return result;
}

coro::Task<block::qed::QedError> format_qed(block::BlockNodeRef file,
                                            block::qed::CreateOptions options) {
  co_return co_await block::qed::create_qed(*file, std::move(options));
}

}  // namespace

CreationOptions parse_creation_options(const std::string& format, const std::string& text) {
  CreationOptions options;
  std::size_t start = 0;
  while (start < text.size()) {
    std::size_t comma = text.find(',', start);
    if (comma == std::string::npos) comma = text.size();
    const std::string item = text.substr(start, comma - start);
    start = comma + 1;
    if (item.empty()) continue;
    const std::size_t equals = item.find('=');
    if (equals == std::string::npos) fail("Invalid option '" + item + "': expected key=value");
    const std::string key = item.substr(0, equals), value = item.substr(equals + 1);
    if (key == "backing_file" && format == "qed") {
      options.backing_file = value;
    } else if (key == "backing_fmt" && format == "qed") {
      options.backing_format = value;
    } else if (key == "cluster_size" && format == "qed") {
      options.cluster_size = parse_u32_option(key, value, true);
    } else if (key == "table_size" && format == "qed") {
      options.table_size = parse_u32_option(key, value, false);
    } else if (key == "preallocation" && format == "raw" && value == "off") {
      // The only preallocation mode: a sparse file.
    } else {
      fail("Invalid parameter '" + key + "' for format '" + format + "'");
    }
  }
  return options;
}

std::string formatting_line(const std::string& filename, const std::string& format,
                            std::uint64_t size, const CreationOptions& options) {
  std::string line = fmt::format("Formatting '{}', fmt={} size={}", filename, format, size);
  if (format != "qed") return line;
  if (!options.backing_file.empty()) line += " backing_file=" + options.backing_file;
  if (!options.backing_format.empty()) line += " backing_fmt=" + options.backing_format;
  line += fmt::format(" cluster_size={}",
                      options.cluster_size.value_or(block::qed::kDefaultClusterSize));
  if (options.table_size) line += fmt::format(" table_size={}", *options.table_size);
  return line;
}

void create_image(const std::string& filename, const std::string& format, std::uint64_t size,
                  const CreationOptions& options) {
  if (format != "raw" && format != "qed") {
    fail("Unknown file format '" + format + "' (spindle-img creates raw and qed)");
  }
  struct stat existing;
  const bool existed = ::stat(filename.c_str(), &existing) == 0;
  base::Result<block::BlockNodeRef> file =
      block::open_file(filename, block::FileOptions{.read_only = false, .direct = false,
                                                    .create = true});
  if (!file.ok()) {
    fail("Could not create '" + filename + "': " + std::strerror(file.error()));
  }
  std::string error;
  if (format == "raw") {
    const int result = coro::block_on(resize_raw(file.value(), size));
    if (result < 0) error = std::strerror(-result);
  } else {
    block::qed::CreateOptions qed;
    qed.size = size;
    qed.cluster_size = options.cluster_size.value_or(block::qed::kDefaultClusterSize);
    qed.table_size = options.table_size.value_or(block::qed::kDefaultTableSize);
    qed.backing_file = options.backing_file;
    qed.backing_format = options.backing_format;
    const block::qed::QedError result = coro::block_on(format_qed(file.value(), std::move(qed)));
    if (!result.ok()) error = result.message;
  }
  file.value().reset();  // close the file before cleaning up
  if (!error.empty()) {
    if (!existed) ::unlink(filename.c_str());
    fail(filename + ": " + error);
  }
}

}  // namespace spindle::img
