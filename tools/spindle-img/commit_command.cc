// `spindle-img commit`: copies an image's data down into an image of its backing chain
// (qemu-img commit).
//
// The image is opened with its backing chain (read-only levels); the base (default: the
// image's backing file; -b: the chain level of that name) is opened a second time, writable,
// with its own backing chain. In chunks of up to kChunk bytes, chain_status() says which level
// answers each range: a range answered above the base (depth < the base's) is read from the
// image and written into the base, zeros as write_zeroes; the base is never read through the
// read-only chain for such a range, so its second (writable) node is the only one that
// changes. The base grows to the image's size first if it is smaller. Then the base is flushed
// and closed and, without -d or -b (qemu-img 7.2: -b implies -d), the image is emptied
// (ImageFormat::make_empty; a format that cannot, such as QED, is left as it is, as qemu-img
// does). -r is validated as qemu-img does and not enforced.
#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

#include "base/io_buffer.h"
#include "block/cache_mode.h"
#include "block/image_chain.h"
#include "chain_status.h"
#include "commands.h"
#include "coro/block_on.h"
#include "image_opener.h"
#include "progress_printer.h"
#include "size_parser.h"
#include "tool_failure.h"

namespace spindle::img {

namespace {

constexpr std::uint64_t kChunk = 1u << 20;

std::optional<std::string> real_path(const std::string& path) {
  char resolved[PATH_MAX];
  if (!::realpath(path.c_str(), resolved)) return std::nullopt;
  return std::string(resolved);
}

// The index in `levels` (1 or more) of the image `name` names, as qemu-img finds it: the name
// resolved against each image's own location (absolute names as they are) is the same file as
// that image's backing file. 0: not in the chain.
std::size_t find_base(const std::vector<block::ChainLevel>& levels, const std::string& name) {
  for (std::size_t i = 1; i < levels.size(); ++i) {
    if (name == levels[i].filename) return i;
    const std::optional<std::string> wanted =
        real_path(block::combine_backing_path(levels[i - 1].filename, name));
    const std::optional<std::string> level = real_path(levels[i].filename);
    if (wanted && level && *wanted == *level) return i;
  }
  return 0;
}

struct CommitResult {
  int error = 0;
  std::string message;
};

coro::Task<CommitResult> copy_down(OpenedImage& top, unsigned base_depth, OpenedImage& base,
                                   ProgressPrinter& progress) {
  const std::uint64_t size = top.backend->size();
  const std::uint64_t old_size = base.backend->size();
  if (old_size < size) {
    if (const int r = co_await base.root->truncate(size); r < 0) {
      co_return CommitResult{r, std::string("Top image is larger than base image and the base "
                                            "cannot grow: ") + std::strerror(-r)};
    }
    // The grown range read as zeros through the top image; over a backing file of the base's
    // own it would show that file's data instead.
    if (base.levels.size() > 1) {
      if (const int r = co_await base.backend->write_zeroes(old_size, size - old_size, 0);
          r < 0) {
        co_return CommitResult{r, std::string("error while writing to the base image: ") +
                                      std::strerror(-r)};
      }
    }
  }
  base::IoBytes buffer(kChunk);
  std::uint64_t pos = 0;
  while (pos < size) {
    progress.update(pos, size);
    const std::uint64_t want = std::min(kChunk, size - pos);
    const ChainExtent extent = co_await chain_status(top.root, pos, want);
    if (extent.error < 0 || extent.bytes == 0) {
      const int error = extent.error < 0 ? extent.error : -EIO;
      co_return CommitResult{error, std::string("error while reading image metadata: ") +
                                        std::strerror(-error)};
    }
    const std::uint64_t run = std::min(extent.bytes, want);
    if (extent.present && extent.depth < base_depth) {
      int r = 0;
      if (extent.zero) {
        r = co_await base.backend->write_zeroes(pos, run, 0);
        if (r < 0) {
          co_return CommitResult{r, std::string("error while writing to the base image: ") +
                                        std::strerror(-r)};
        }
      } else {
        const std::span<std::byte> data = std::span(buffer).first(run);
        r = co_await top.backend->read(pos, data);
        if (r < 0) {
          co_return CommitResult{r, std::string("error while reading the image: ") +
                                        std::strerror(-r)};
        }
        r = co_await base.backend->write(pos, data);
        if (r < 0) {
          co_return CommitResult{r, std::string("error while writing to the base image: ") +
                                        std::strerror(-r)};
        }
      }
    }
    pos += run;
  }
  int r = co_await base.backend->flush();
  const int closed = co_await base.root->close();
  if (r >= 0) r = closed;
  if (r < 0) {
    co_return CommitResult{r, std::string("error while writing to the base image: ") +
                                  std::strerror(-r)};
  }
  co_return CommitResult{};
}

coro::Task<block::BlockError> empty_and_close(OpenedImage& top, bool empty) {
  block::BlockError error;
  if (empty) {
    error = co_await top.format->make_empty(*top.root);
    if (error.error == ENOTSUP) error = {};  // the format cannot: qemu-img leaves it too
  }
  co_return co_await close_after(top, std::move(error));
}

}  // namespace

int run_commit(const CommitOptions& options) {
  if (!options.rate.empty() && !parse_size(options.rate)) {
    fail("Invalid rate limit specified. You may use k, M, G, T, P or E suffixes for\n"
         "spindle-img: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.");
  }
  if (!block::parse_cache_mode(options.cache)) fail("Invalid cache option: " + options.cache);
  // qemu-img 7.2: naming the base implies -d.
  const bool drop = options.drop || !options.base.empty();
  const block::CacheMode cache = *block::parse_cache_mode(options.cache);
  OpenedImage top = open_image(options.filename, options.format,
                               ImageOpenOptions{.read_only = drop, .with_backing = true,
                                                .repair_if_dirty = true, .cache = cache});
  if (top.levels.size() < 2) fail("Image does not have a backing file");
  std::size_t base_index = 1;
  if (!options.base.empty()) {
    base_index = find_base(top.levels, options.base);
    if (base_index == 0) {
      fail("Did not find '" + options.base + "' in the backing chain of '" + options.filename +
           "'");
    }
  }
  const block::ChainLevel& level = top.levels[base_index];
  OpenedImage base = open_image(level.filename, std::string(level.format->name()),
                                ImageOpenOptions{.read_only = false, .with_backing = true,
                                                 .repair_if_dirty = true, .cache = cache});

  ProgressPrinter progress(options.progress && !options.quiet);
  const CommitResult copied =
      coro::block_on(copy_down(top, static_cast<unsigned>(base_index), base, progress));
  if (copied.error < 0) {
    (void)coro::block_on(top.root->close());
    fail(copied.message);
  }
  const block::BlockError emptied = coro::block_on(empty_and_close(top, !drop));
  progress.finish();
  if (!emptied.ok()) fail("Could not empty " + options.filename + ": " + emptied.message);
  if (!options.quiet) std::printf("Image committed.\n");
  return 0;
}

}  // namespace spindle::img
