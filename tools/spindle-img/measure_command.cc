// `spindle-img measure`: how large a new image of the -O format would be, for a virtual size
// (--size) or for converting an existing image (its whole backing chain): the required size
// and the fully allocated size, as qemu-img measure prints them. The target format does the
// arithmetic (ImageFormat::measure); this counts the source's data in the target's clusters.
#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "block/format_registry.h"
#include "block/snapshot_param.h"
#include "chain_status.h"
#include "commands.h"
#include "coro/block_on.h"
#include "image_creator.h"
#include "image_opener.h"
#include "size_parser.h"
#include "tool_failure.h"

namespace spindle::img {

namespace {

// A decimal number with a suffix that parse_size() refused can only be too large.
bool looks_like_size(const std::string& text) {
  std::string digits = text;
  if (!digits.empty() && std::strchr("bBkKmMgGtTpPeE", digits.back())) digits.pop_back();
  if (digits.empty() || digits.front() == '.') return false;
  return digits.find_first_not_of("0123456789.") == std::string::npos &&
         digits.find('.') == digits.rfind('.');
}

[[noreturn]] void size_out_of_range() {
  fail("Invalid image size specified. Must be between 0 and 9223372036854775807.");
}

std::uint64_t parse_virtual_size(const std::string& text) {
  const std::optional<std::uint64_t> size = parse_size(text);
  if (!size && looks_like_size(text)) size_out_of_range();
  if (!size) {
    fail_lines("Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n"
               "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.");
  }
  if (*size > static_cast<std::uint64_t>(INT64_MAX)) size_out_of_range();
  return *size;
}

// The source's data (what reads as neither zeros nor nothing), counted in whole units of
// `granularity`: a unit holding any data counts whole, once.
coro::Task<std::uint64_t> count_data(block::BlockNodeRef root, std::uint64_t size,
                                     std::uint64_t granularity, int& error) {
  std::uint64_t data = 0, pos = 0;
  while (pos < size) {
    const ChainExtent extent = co_await chain_status(root, pos, size - pos);
    if (extent.error < 0) {
      error = extent.error;
      co_return 0;
    }
    if (extent.present && extent.data && !extent.zero) {
      const std::uint64_t first = pos / granularity * granularity;
      const std::uint64_t end = (pos + extent.bytes + granularity - 1) / granularity * granularity;
      data += end - first;
      pos = end;
    } else {
      pos += extent.bytes;
    }
  }
  co_return data;
}

}  // namespace

int run_measure(const MeasureOptions& options) {
  const bool has_size = !options.size.empty();
  if (!options.filename.empty() && has_size) {
    fail("--size N cannot be used together with a filename.");
  }
  if (options.filename.empty() && (!options.source_format.empty() || !options.snapshot.empty())) {
    fail("--image-opts, -f, and -l require a filename argument.");
  }
  if (options.filename.empty() && !has_size) {
    fail("Either --size N or one filename must be specified.");
  }
  std::optional<block::SnapshotParam> snapshot;
  if (!options.snapshot.empty()) {
    block::BlockResult<block::SnapshotParam> parsed = block::parse_snapshot_param(options.snapshot);
    if (!parsed) fail_lines(parsed.error().message);
    snapshot = std::move(parsed).value();
  }
  // Formats that are only recognised say themselves that they cannot measure.
  const block::ImageFormat* target = block::find_format(options.target_format);
  if (!target) fail("Unknown file format '" + options.target_format + "'");
  block::CreateRequest request;
  for (const std::string& text : options.options) parse_creation_options(text, request);
  request.options.erase("size");  // qemu-img measure takes the size from --size or the source

  std::optional<block::MeasureSource> source;
  if (has_size) {
    request.size = parse_virtual_size(options.size);
  } else {
    OpenedImage image = open_image(options.filename, options.source_format, ImageOpenOptions{});
    if (snapshot) {
      const block::BlockError loaded =
          coro::block_on(block::load_snapshot_view(*image.format, *image.root, *snapshot));
      if (!loaded.ok()) fail("Failed to load snapshot: " + loaded.message);
    }
    block::BlockResult<std::uint64_t> granularity = target->measure_granularity(request);
    if (!granularity) fail_lines(granularity.error().message);
    source.emplace();
    source->size = image.backend->size();
    source->keeps_bitmaps = image.format->supports_persistent_bitmaps(*image.root);
    if (source->keeps_bitmaps) {
      block::BlockResult<std::vector<block::PersistentBitmap>> bitmaps =
          coro::block_on(image.format->load_bitmaps(*image.root, false));
      if (!bitmaps) fail(bitmaps.error().message);
      source->bitmaps = std::move(bitmaps).value();
    }
    int error = 0;
    source->data_bytes =
        coro::block_on(count_data(image.root, source->size, granularity.value(), error));
    if (error < 0) fail(std::string("Unable to get block status: ") + std::strerror(-error));
  }
  block::BlockResult<block::SizeMeasurement> measured = target->measure(request, source);
  if (!measured) fail_lines(measured.error().message);
  const block::SizeMeasurement& m = measured.value();
  if (options.output == "json") {
    nlohmann::ordered_json json;
    if (m.bitmaps) json["bitmaps"] = *m.bitmaps;
    json["required"] = m.required;
    json["fully-allocated"] = m.fully_allocated;
    std::printf("%s\n", json.dump(4).c_str());
  } else {
    std::printf("required size: %llu\n", static_cast<unsigned long long>(m.required));
    std::printf("fully allocated size: %llu\n",
                static_cast<unsigned long long>(m.fully_allocated));
    if (m.bitmaps) std::printf("bitmaps size: %llu\n", static_cast<unsigned long long>(*m.bitmaps));
  }
  return 0;
}

}  // namespace spindle::img
