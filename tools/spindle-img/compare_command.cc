// `spindle-img compare`: whether two images read the same (qemu-img compare). Exit 0 when
// identical, 1 at the first difference (reported at 512-byte granularity, as qemu-img does), 2
// when an image cannot be opened or read. Ranges that read as zeros in both images are not
// read; without -s the longer image's extra tail must read as zeros, with -s a size difference
// or a range whose block status (present / zero / data) differs is a difference.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <optional>
#include <vector>

#include "base/io_buffer.h"
#include "chain_status.h"
#include "commands.h"
#include "coro/block_on.h"
#include "image_opener.h"
#include "progress_printer.h"
#include "tool_failure.h"

namespace spindle::img {

namespace {

constexpr int kExitError = 2;
constexpr std::uint64_t kSector = 512;
constexpr std::uint64_t kBufferBytes = 1u << 20;

struct Outcome {
  int error = 0;                           // -errno of a failed read
  std::optional<std::uint64_t> mismatch;   // first differing offset
  bool status_mismatch = false;            // strict mode: allocation differs at `mismatch`
};

std::uint64_t sector_floor(std::uint64_t offset) { return offset / kSector * kSector; }

std::optional<std::uint64_t> first_difference(std::span<const std::byte> a,
                                              std::span<const std::byte> b) {
  const auto [ia, ib] = std::mismatch(a.begin(), a.end(), b.begin());
  if (ia == a.end()) return std::nullopt;
  return static_cast<std::uint64_t>(ia - a.begin());
}

// Both images over [0, common).
coro::Task<Outcome> compare_common(const OpenedImage& a, const OpenedImage& b,
                                   std::uint64_t common, bool strict, ProgressPrinter& progress,
                                   std::uint64_t total) {
  base::IoBytes buffer_a(kBufferBytes), buffer_b(kBufferBytes);
  std::uint64_t pos = 0;
  while (pos < common) {
    const ChainExtent extent_a = co_await chain_status(a.root, pos, common - pos);
    if (extent_a.error < 0) co_return Outcome{extent_a.error, std::nullopt};
    const ChainExtent extent_b = co_await chain_status(b.root, pos, extent_a.bytes);
    if (extent_b.error < 0) co_return Outcome{extent_b.error, std::nullopt};
    const std::uint64_t length = std::min(extent_a.bytes, extent_b.bytes);
    const bool same_status = extent_a.present == extent_b.present &&
                             extent_a.zero == extent_b.zero && extent_a.data == extent_b.data;
    if (strict && !same_status) co_return Outcome{0, pos, true};
    if (!(extent_a.zero && extent_b.zero)) {
      for (std::uint64_t done = 0; done < length;) {
        const std::uint64_t piece = std::min(kBufferBytes, length - done);
        const std::span<std::byte> span_a(buffer_a.data(), piece), span_b(buffer_b.data(), piece);
        int result = co_await a.backend->read(pos + done, span_a);
        if (result >= 0) result = co_await b.backend->read(pos + done, span_b);
        if (result < 0) co_return Outcome{result, std::nullopt};
        const std::optional<std::uint64_t> at = first_difference(span_a, span_b);
        if (at) co_return Outcome{0, sector_floor(pos + done + *at)};
        done += piece;
      }
    }
    pos += length;
    progress.update(pos, total);
  }
  co_return Outcome{};
}

// [from, size) of the longer image must read as zeros.
coro::Task<Outcome> check_tail_is_zero(const OpenedImage& image, std::uint64_t from,
                                       ProgressPrinter& progress) {
  base::IoBytes buffer(kBufferBytes);
  const std::uint64_t size = image.backend->size();
  std::uint64_t pos = from;
  while (pos < size) {
    const ChainExtent extent = co_await chain_status(image.root, pos, size - pos);
    if (extent.error < 0) co_return Outcome{extent.error, std::nullopt};
    if (!extent.zero) {
      for (std::uint64_t done = 0; done < extent.bytes;) {
        const std::uint64_t piece = std::min(kBufferBytes, extent.bytes - done);
        const std::span<std::byte> span(buffer.data(), piece);
        const int result = co_await image.backend->read(pos + done, span);
        if (result < 0) co_return Outcome{result, std::nullopt};
        const auto nonzero = std::find_if(span.begin(), span.end(),
                                          [](std::byte x) { return x != std::byte{0}; });
        if (nonzero != span.end()) {
          co_return Outcome{0, sector_floor(pos + done + static_cast<std::uint64_t>(
                                                              nonzero - span.begin()))};
        }
        done += piece;
      }
    }
    pos += extent.bytes;
    progress.update(pos, size);
  }
  co_return Outcome{};
}

int compare_opened(const CompareOptions& options) {
  const OpenedImage a = open_image(options.image_a, options.format_a, ImageOpenOptions{});
  const OpenedImage b = open_image(options.image_b, options.format_b, ImageOpenOptions{});
  const std::uint64_t size_a = a.backend->size(), size_b = b.backend->size();
  if (size_a != size_b) {
    if (options.strict) {
      if (!options.quiet) std::printf("Strict mode: Image size mismatch!\n");
      return 1;
    }
  }
  const std::uint64_t common = std::min(size_a, size_b);
  // qemu-img prints the result behind the progress line, then ends the line.
  ProgressPrinter progress(options.progress && !options.quiet);
  progress.update(0, 1);
  Outcome outcome = coro::block_on(
      compare_common(a, b, common, options.strict, progress, std::max(size_a, size_b)));
  if (outcome.error == 0 && !outcome.mismatch && size_a != size_b) {
    if (!options.quiet) std::printf("Warning: Image size mismatch!\n");
    outcome = coro::block_on(check_tail_is_zero(size_a > size_b ? a : b, common, progress));
  }
  if (outcome.error < 0) {
    fail(std::string("Error while reading the images: ") + std::strerror(-outcome.error),
         kExitError);
  }
  if (outcome.mismatch) {
    if (!options.quiet && outcome.status_mismatch) {
      std::printf("Strict mode: Offset %llu block status mismatch!\n",
                  static_cast<unsigned long long>(*outcome.mismatch));
    } else if (!options.quiet) {
      std::printf("Content mismatch at offset %llu!\n",
                  static_cast<unsigned long long>(*outcome.mismatch));
    }
    progress.end();
    return 1;
  }
  progress.update(1, 1);
  if (!options.quiet) std::printf("Images are identical.\n");
  progress.end();
  return 0;
}

}  // namespace

int run_compare(const CompareOptions& options) {
  try {
    return compare_opened(options);
  } catch (const ToolFailure& error) {
    // qemu-img compare reports every failure (opening, reading) with exit status 2.
    throw ToolFailure(error.what(), kExitError);
  }
}

}  // namespace spindle::img
