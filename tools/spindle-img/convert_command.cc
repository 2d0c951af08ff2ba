// `spindle-img convert`: copies an image (its whole backing chain, flattened) into a new image
// of any format the registry can create, through BlockBackends, keeping the target sparse
// (qemu-img convert). -l copies one of the source's internal snapshots instead of its active
// image (the virtual size stays the active image's, as in qemu).
// --bitmaps copies the top source image's persistent dirty bitmaps (names, granularities,
// enabled flags, bits) after the data, once the target is closed (so that the data writes
// are not tracked in them), appended to any the target (-n) already has.
#include <cstdio>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "block/cache_mode.h"
#include "block/drivers/nbd/uri.h"
#include "block/snapshot_param.h"
#include "commands.h"
#include "coro/block_on.h"
#include "image_creator.h"
#include "image_opener.h"
#include "parallel_copier.h"
#include "progress_printer.h"
#include "size_parser.h"
#include "tool_failure.h"

namespace spindle::img {

namespace {

using block::BlockResult;

constexpr std::uint64_t kMaxSparseSize = 16u << 20;

coro::Task<BlockResult<std::vector<block::PersistentBitmap>>> load_bitmaps(
    const OpenedImage& image, bool with_bits) {
  co_return co_await image.format->load_bitmaps(*image.root, with_bits);
}
coro::Task<block::BlockError> store_bitmaps(const OpenedImage& image,
                                            std::vector<block::PersistentBitmap> bitmaps) {
  block::BlockError error = co_await image.format->store_bitmaps(*image.root, std::move(bitmaps));
  if (error.ok()) {
    if (const int r = co_await image.root->flush(); r < 0) error = {-r, std::strerror(-r)};
  }
  co_return error;
}

// The source's bitmaps to copy: qemu-img's checks and messages, in its order (the last
// bitmap first).
std::vector<block::PersistentBitmap> source_bitmaps(const OpenedImage& source,
                                                    bool skip_broken) {
  if (!source.format->supports_persistent_bitmaps(*source.root)) {
    fail("Source lacks bitmap support");
  }
  BlockResult<std::vector<block::PersistentBitmap>> loaded =
      coro::block_on(load_bitmaps(source, true));
  if (!loaded) fail("Could not read the bitmaps of '" + source.filename + "': " +
                    loaded.error().message);
  std::vector<block::PersistentBitmap> list = std::move(loaded).value();
  for (auto it = list.rbegin(); it != list.rend() && !skip_broken; ++it) {
    if (it->in_use) {
      fail("Cannot copy inconsistent bitmap '" + it->name +
           "'\nTry --skip-broken-bitmaps, or use 'spindle-img bitmap --remove' to delete it");
    }
  }
  return list;
}

// Appends `copied` to the target's own bitmaps and stores them.
void copy_bitmaps(const OpenedImage& target, const std::vector<block::PersistentBitmap>& copied) {
  BlockResult<std::vector<block::PersistentBitmap>> loaded =
      coro::block_on(load_bitmaps(target, false));
  if (!loaded) fail("Could not read the bitmaps of '" + target.filename + "': " +
                    loaded.error().message);
  std::vector<block::PersistentBitmap> list = std::move(loaded).value();
  const std::size_t own = list.size();
  for (auto it = copied.rbegin(); it != copied.rend(); ++it) {
    if (it->in_use) {
      std::fprintf(stderr, "spindle-img: warning: Skipping inconsistent bitmap '%s'\n",
                   it->name.c_str());
      continue;
    }
    for (std::size_t i = 0; i < own; ++i) {
      if (list[i].name == it->name) {
        fail("Failed to create bitmap " + it->name + ": Bitmap already exists: " + it->name);
      }
    }
  }
  for (const block::PersistentBitmap& b : copied) {
    if (!b.in_use) list.push_back(b);
  }
  if (list.size() == own) return;
  const block::BlockError error = coro::block_on(store_bitmaps(target, std::move(list)));
  if (!error.ok()) fail("Failed to populate the bitmaps of '" + target.filename + "': " +
                        error.message);
}

coro::Task<int> copy_and_close(ParallelCopier& copier, OpenedImage& target) {
  int result = co_await copier.run();
  if (result >= 0) result = co_await target.backend->flush();
  // Writes back metadata and marks the image clean.
  const int closed = co_await target.root->close();
  co_return result < 0 ? result : closed;
}

}  // namespace

int run_convert(const ConvertOptions& options) {
  if (options.coroutines < 1 || options.coroutines > 16) {
    fail("Invalid number of coroutines. Allowed number of coroutines is between 1 and 16");
  }
  const std::optional<std::uint64_t> sparse = parse_size(options.sparse_size);
  if (!sparse || *sparse % 512 != 0 || *sparse > kMaxSparseSize) {
    fail("Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up "
         "to 16MiB");
  }
  const block::ImageFormat& target_format = require_creatable_format(options.target_format);
  const bool remote_target = block::nbd::is_nbd_uri(options.target);
  if (options.compress && (!target_format.can_compress() || remote_target)) {
    fail("Compression not supported for this file format");
  }
  // -n, or an NBD target (an existing export): the target is not created but must be large
  // enough, and is zeroed over the source's size first, since the copy skips zero ranges.
  const bool existing_target = options.no_create || remote_target;
  if (options.no_create && !options.options.empty()) {
    fail("-o has no effect when skipping image creation");
  }
  block::CreateRequest creation;
  parse_creation_options(options.options, creation);
  if (creation.options.contains("backing_file")) {
    fail("convert does not support -o backing_file for the target: use -B");
  }
  if (!options.backing.empty()) {
    if (options.backing_format.empty()) fail("Use of backing file requires explicit backing format");
    if (existing_target) fail("-B is not supported with -n or an NBD target");
    creation.options["backing_file"] = options.backing;
    creation.options["backing_fmt"] = options.backing_format;
  }
  if (options.skip_broken_bitmaps && !options.bitmaps) {
    fail("Use of --skip-broken-bitmaps requires --bitmaps");
  }
  validate_creation(target_format, creation);
  const std::optional<block::CacheMode> cache = block::parse_cache_mode(options.cache);
  if (!cache) fail("Invalid cache option: " + options.cache);
  const std::optional<block::CacheMode> source_cache =
      block::parse_cache_mode(options.source_cache);
  if (!source_cache) fail("Invalid source cache option: " + options.source_cache);
  std::optional<block::SnapshotParam> snapshot;
  if (!options.snapshot.empty()) {
    block::BlockResult<block::SnapshotParam> parsed = block::parse_snapshot_param(options.snapshot);
    if (!parsed) fail_lines(parsed.error().message);
    snapshot = std::move(parsed).value();
  }
  OpenedImage source = open_image(options.source, options.source_format,
                                  ImageOpenOptions{.cache = *source_cache});
  if (snapshot) {
    const block::BlockError loaded =
        coro::block_on(block::load_snapshot_view(*source.format, *source.root, *snapshot));
    if (!loaded.ok()) fail("Failed to load snapshot: " + loaded.message);
  }
  std::vector<block::PersistentBitmap> bitmaps;
  if (options.bitmaps) bitmaps = source_bitmaps(source, options.skip_broken_bitmaps);

  ProgressPrinter progress(options.progress && !options.quiet);
  progress.update(0, source.backend->size());
  if (!existing_target) {
    creation.size = source.backend->size();
    create_image(options.target, target_format, creation);
  }
  // (with -B the target knows its backing file: zeros must be written to hide it)
  OpenedImage target = open_image(
      options.target, options.target_format,
      ImageOpenOptions{.read_only = false,
                       .with_backing = !options.backing.empty(),
                       .cache = *cache});
  if (options.bitmaps && !target.format->supports_persistent_bitmaps(*target.root)) {
    fail("Format driver '" + std::string(target.format->name()) + "' does not support bitmaps");
  }
  if (existing_target) {
    if (target.backend->size() < source.backend->size()) {
      fail("output file is smaller than input file");
    }
    const int zeroed =
        coro::block_on(target.backend->write_zeroes(0, source.backend->size(), block::kMayUnmap));
    if (zeroed < 0) fail("cannot zero '" + options.target + "': " + std::strerror(-zeroed));
  }

  ParallelCopier::Options copy;
  copy.workers = static_cast<unsigned>(options.coroutines);
  copy.sparse_size = *sparse;
  copy.target_has_backing = !options.backing.empty();
  if (options.compress) {
    copy.compress_cluster_size = coro::block_on(target_format.describe(*target.root)).cluster_size;
    if (copy.compress_cluster_size == 0) fail("Compression not supported for this file format");
  }
  if (options.progress) {
    copy.on_progress = [&progress](std::uint64_t done, std::uint64_t total) {
      progress.update(done, total);
    };
  }
  ParallelCopier copier(source.backend, target.backend, std::move(copy));
  const int result = coro::block_on(copy_and_close(copier, target));
  progress.finish();
  if (result < 0) {
    fail("error while converting '" + options.source + "' to '" + options.target +
         "': " + std::strerror(-result));
  }
  if (options.bitmaps) copy_bitmaps(target, bitmaps);
  return 0;
}

}  // namespace spindle::img
