// `spindle-img rebase`: changes the backing file an image records (qemu-img rebase).
//
// Safe mode (the default) keeps what the guest sees: the image is opened with its old backing
// chain and the new backing image with its own chain; wherever the image allocates nothing
// itself (its block status), the old chain's content is compared with the new one's in chunks
// of up to kChunk bytes (ranges both chains report as zeros are skipped unread), and every run
// of 512-byte sectors that differs is written into the image with the old content (as data,
// zeros too: qemu-img writes zeroes where no old backing file reaches, which an image without
// a backing file may drop as already reading as zeros). Only then
// is the new name recorded (ImageFormat::change_backing). -u (unsafe) records the name and
// nothing else; neither the old nor the new backing file is opened.
//
// A relative -b name is recorded as given and, in safe mode, opened relative to the image's
// directory, as qemu-img does.
#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

#include "base/io_buffer.h"
#include "block/cache_mode.h"
#include "block/format_registry.h"
#include "chain_status.h"
#include "commands.h"
#include "coro/block_on.h"
#include "image_opener.h"
#include "progress_printer.h"
#include "tool_failure.h"

namespace spindle::img {

namespace {

constexpr std::uint64_t kChunk = 1u << 20;
constexpr std::uint64_t kSector = 512;

std::string real_path(const std::string& path) {
  char resolved[PATH_MAX];
  return ::realpath(path.c_str(), resolved) ? std::string(resolved) : path;
}

// Why a rebase stopped: a message for ToolFailure.
struct CopyResult {
  int error = 0;
  std::string message;
};

// How many bytes from `pos` (at most `max`) read as zeros in `node`'s chain, for sure; 0 when
// they may hold data. Past the node's end everything reads as zeros.
coro::Task<int> zero_run(const block::BlockNodeRef& node, std::uint64_t pos, std::uint64_t max,
                         std::uint64_t& run) {
  run = 0;
  if (!node || pos >= node->size()) {
    run = max;
    co_return 0;
  }
  const ChainExtent extent = co_await chain_status(node, pos, std::min(max, node->size() - pos));
  if (extent.error < 0) co_return extent.error;
  if (extent.zero) run = extent.bytes;
  co_return 0;
}

// Reads [pos, pos + buffer.size()) of `image`, zeros past its end (or without an image).
coro::Task<int> read_padded(const OpenedImage* image, std::uint64_t pos,
                            std::span<std::byte> buffer) {
  std::fill(buffer.begin(), buffer.end(), std::byte{0});
  if (!image || pos >= image->backend->size()) co_return 0;
  const std::uint64_t length = std::min<std::uint64_t>(buffer.size(), image->backend->size() - pos);
  const int result = co_await image->backend->read(pos, buffer.first(length));
  co_return result < 0 ? result : 0;
}

// Writes the old content of [pos, pos + length) into the image wherever it differs from the
// new backing chain's, sector by sector.
coro::Task<CopyResult> copy_differences(OpenedImage& image, const OpenedImage* new_backing,
                                        std::uint64_t pos, std::uint64_t length,
                                        base::IoBytes& old_data,
                                        base::IoBytes& new_data) {
  const std::span<std::byte> old_span = std::span(old_data).first(length);
  const std::span<std::byte> new_span = std::span(new_data).first(length);
  // Where the image allocates nothing, its own reads are the old backing chain's content.
  if (const int r = co_await image.backend->read(pos, old_span); r < 0) {
    co_return CopyResult{r, std::string("error while reading from old backing file: ") +
                                std::strerror(-r)};
  }
  if (const int r = co_await read_padded(new_backing, pos, new_span); r < 0) {
    co_return CopyResult{r, std::string("error while reading from new backing file: ") +
                                std::strerror(-r)};
  }
  std::uint64_t at = 0;
  while (at < length) {
    const auto differs = [&](std::uint64_t from) {
      const std::uint64_t n = std::min(kSector, length - from);
      return std::memcmp(old_span.data() + from, new_span.data() + from, n) != 0;
    };
    if (!differs(at)) {
      at += std::min(kSector, length - at);
      continue;
    }
    std::uint64_t end = at;
    while (end < length && differs(end)) end += std::min(kSector, length - end);
    const int r = co_await image.backend->write(pos + at, old_span.subspan(at, end - at));
    if (r < 0) {
      co_return CopyResult{r, std::string("Error while writing to COW image: ") +
                                  std::strerror(-r)};
    }
    at = end;
  }
  co_return CopyResult{};
}

coro::Task<CopyResult> copy_old_content(OpenedImage& image, const OpenedImage* new_backing,
                                        ProgressPrinter& progress) {
  const std::uint64_t size = image.backend->size();
  const block::BlockNodeRef new_root = new_backing ? new_backing->root : nullptr;
  base::IoBytes old_data(kChunk), new_data(kChunk);
  std::uint64_t pos = 0;
  while (pos < size) {
    progress.update(pos, size);
    const std::uint64_t want = std::min(kChunk, size - pos);
    // The top node's own answer (the backend's would look through the chain).
    const block::BlockStatus status = co_await image.root->block_status(pos, want);
    if (status.error < 0 || status.bytes == 0) {
      const int error = status.error < 0 ? status.error : -EIO;
      co_return CopyResult{error, std::string("error while reading image metadata: ") +
                                      std::strerror(-error)};
    }
    const std::uint64_t run = std::min(status.bytes, want);
    if (status.flags & block::kStatusAllocated) {
      pos += run;
      continue;
    }
    // Not allocated here: old content (the image's own view) against the new chain's.
    std::uint64_t done = 0;
    while (done < run) {
      const std::uint64_t at = pos + done;
      std::uint64_t old_zero = 0, new_zero = 0;
      int r = co_await zero_run(image.root, at, run - done, old_zero);
      if (r >= 0 && old_zero > 0) r = co_await zero_run(new_root, at, run - done, new_zero);
      if (r < 0) {
        co_return CopyResult{r, std::string("error while reading image metadata: ") +
                                    std::strerror(-r)};
      }
      if (old_zero > 0 && new_zero > 0) {
        done += std::min(old_zero, new_zero);
        continue;
      }
      const std::uint64_t length = run - done;
      CopyResult copied =
          co_await copy_differences(image, new_backing, at, length, old_data, new_data);
      if (copied.error < 0) co_return copied;
      done += length;
    }
    pos += run;
  }
  if (const int r = co_await image.backend->flush(); r < 0) {
    co_return CopyResult{r, std::string("Error while writing to COW image: ") + std::strerror(-r)};
  }
  co_return CopyResult{};
}

coro::Task<block::BlockError> change_and_close(OpenedImage& image, std::string name,
                                               std::string format) {
  block::BlockError error =
      co_await image.format->change_backing(*image.root, std::move(name), std::move(format));
  co_return co_await close_after(image, std::move(error));
}

}  // namespace

int run_rebase(const RebaseOptions& options) {
  if (!options.unsafe && !options.backing_given) {
    fail("Must specify backing file (-b) or use unsafe mode (-u)\n"
         "Try 'spindle-img --help' for more information");
  }
  if (!block::parse_cache_mode(options.cache)) fail("Invalid cache option: " + options.cache);
  if (!block::parse_cache_mode(options.source_cache)) {
    fail("Invalid source cache option: " + options.source_cache);
  }
  // -u: the old backing file is not opened (it may be gone: that is often why one rebases).
  const block::CacheMode cache = *block::parse_cache_mode(options.cache);
  const block::CacheMode source_cache = *block::parse_cache_mode(options.source_cache);
  OpenedImage image = open_image(options.filename, options.format,
                                 ImageOpenOptions{.read_only = false,
                                                  .with_backing = !options.unsafe,
                                                  .repair_if_dirty = true,
                                                  .cache = cache});
  const std::string& name = options.backing;
  const std::string format = name.empty() ? std::string() : options.backing_format;
  if (!options.backing_format.empty() && !block::find_format(options.backing_format)) {
    fail("Invalid format name: '" + options.backing_format + "'");
  }

  ProgressPrinter progress(options.progress && !options.quiet);
  if (!options.unsafe) {
    std::optional<OpenedImage> new_backing;
    if (!name.empty()) {
      const std::string path = block::combine_backing_path(options.filename, name);
      try {
        new_backing = open_image(path, options.backing_format,
                                 ImageOpenOptions{.read_only = true, .with_backing = true,
                                                  .cache = source_cache});
      } catch (const ToolFailure& failure) {
        // The opener's "Could not open 'PATH': " is said once, inside qemu's wording.
        std::string why = failure.what();
        const std::string opener = "Could not open '" + path + "': ";
        if (why.starts_with(opener)) why.erase(0, opener.size());
        fail("Could not open new backing file '" + name + "': " + why);
      }
      // The image itself in the new chain would make a loop (qemu-img: its image lock).
      const std::string self = real_path(options.filename);
      for (const block::ChainLevel& level : new_backing->levels) {
        if (real_path(level.filename) == self) {
          fail("Could not open new backing file '" + name + "': Failed to get shared \"write\" "
               "lock\nIs another process using the image [" + level.filename + "]?");
        }
      }
      if (format.empty()) {
        fail("Could not change the backing file to '" + name +
             "': backing format must be specified");
      }
    }
    const CopyResult copied = coro::block_on(
        copy_old_content(image, new_backing ? &*new_backing : nullptr, progress));
    if (new_backing) (void)coro::block_on(new_backing->root->close());
    if (copied.error < 0) {
      (void)coro::block_on(image.root->close());
      fail(copied.message);
    }
  } else if (!name.empty() && format.empty()) {
    fail("Could not change the backing file to '" + name + "': backing format must be specified");
  }
  const block::BlockError error = coro::block_on(change_and_close(image, name, format));
  progress.finish();
  if (error.error == ENOSPC) {
    fail("Could not change the backing file to '" + name + "': No space left in the file header");
  }
  if (!error.ok()) fail("Could not change the backing file to '" + name + "': " + error.message);
  return 0;
}

}  // namespace spindle::img
