// `spindle-img convert`: copies an image (its whole backing chain, flattened) into a new image
// of any format the registry can create, through BlockBackends, keeping the target sparse
// (qemu-img convert).
#include <cstdio>
#include <cstring>

#include "block/drivers/nbd/uri.h"
#include "commands.h"
#include "coro/block_on.h"
#include "image_creator.h"
#include "image_opener.h"
#include "parallel_copier.h"
#include "size_parser.h"
#include "tool_failure.h"

namespace spindle::img {

namespace {

constexpr std::uint64_t kMaxSparseSize = 16u << 20;

coro::Task<int> copy_and_close(ParallelCopier& copier, OpenedImage& target) {
  int result = co_await copier.run();
  if (result >= 0) result = co_await target.backend->flush();
  // Writes back metadata and marks the image clean.
  const int closed = co_await target.root->close();
  co_return result < 0 ? result : closed;
}

// Prints "    (xx.xx/100%)" on stderr when the percentage moves by a hundredth or more.
class ProgressPrinter {
 public:
  void update(std::uint64_t done, std::uint64_t total) {
    const double percent = total ? static_cast<double>(done) * 100.0 / static_cast<double>(total)
                                 : 100.0;
    if (percent - last_ < 0.01 && !(percent >= 100.0 && last_ < 100.0)) return;
    last_ = percent;
    std::fprintf(stderr, "    (%0.2f/100%%)\r", percent);
    std::fflush(stderr);
  }
  void finish() {
    update(1, 1);
    std::fprintf(stderr, "\n");
  }

 private:
  double last_ = -1.0;
};

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
  validate_creation(target_format, creation);
  OpenedImage source = open_image(options.source, options.source_format, ImageOpenOptions{});

  ProgressPrinter progress;
  if (options.progress) progress.update(0, source.backend->size());
  if (!existing_target) {
    creation.size = source.backend->size();
    create_image(options.target, target_format, creation);
  }
  // (with -B the target knows its backing file: zeros must be written to hide it)
  OpenedImage target = open_image(
      options.target, options.target_format,
      ImageOpenOptions{.read_only = false, .with_backing = !options.backing.empty()});
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
  if (options.progress) progress.finish();
  if (result < 0) {
    fail("error while converting '" + options.source + "' to '" + options.target +
         "': " + std::strerror(-result));
  }
  return 0;
}

}  // namespace spindle::img
