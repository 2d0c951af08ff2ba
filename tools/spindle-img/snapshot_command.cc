// `spindle-img snapshot`: qemu-img snapshot's -l (list), -c (create), -a (apply) and -d
// (delete) of internal snapshots, through the image's format (formats without internal
// snapshots list none and refuse the rest with qemu-img's messages). The image is opened for
// this alone: read-only for -l, writable otherwise (-U only read-only, as qemu-img).
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>

#include "commands.h"
#include "coro/block_on.h"
#include "image_opener.h"
#include "snapshot_listing.h"
#include "tool_failure.h"

namespace spindle::img {

namespace {

using block::BlockError;

coro::Task<BlockError> create(const block::ImageFormat& format, block::BlockNodeRef node,
                              block::SnapshotDescription snapshot) {
  co_return co_await format.create_snapshot(*node, std::move(snapshot));
}
coro::Task<BlockError> apply(const block::ImageFormat& format, block::BlockNodeRef node,
                             std::string name) {
  co_return co_await format.apply_snapshot(*node, std::move(name));
}
coro::Task<BlockError> remove(const block::ImageFormat& format, block::BlockNodeRef node,
                              std::string name) {
  co_return co_await format.remove_snapshot(*node, std::move(name));
}
coro::Task<int> flush(block::BlockNodeRef node) { co_return co_await node->flush(); }

// A failure's detail, on its own line before qemu-img's summary line, where it says more.
void detail(const BlockError& error) {
  if (!error.message.empty() && error.message != std::strerror(error.error)) {
    std::fprintf(stderr, "spindle-img: %s\n", error.message.c_str());
  }
}

}  // namespace

int run_snapshot(const SnapshotOptions& options) {
  if (options.actions > 1) {
    std::fprintf(stderr, "spindle-img: Cannot mix '-l', '-a', '-c', '-d'\n");
    std::fprintf(stderr, "Try 'spindle-img --help' for more information.\n");
    return 1;
  }
  const bool list = options.action == 'l';
  if (options.force_share && !list) {
    fail("Could not open '" + options.filename +
         "': force-share=on can only be used with read-only images");
  }
  OpenedImage image = open_image(options.filename, options.format,
                                 ImageOpenOptions{.read_only = list, .repair_if_dirty = !list});
  if (list) {
    std::fputs(snapshot_table_text(image_snapshots(image)).c_str(), stdout);
    return 0;
  }
  const block::ImageFormat& format = *image.format;
  const std::string& name = options.name;
  if (options.action == 'c') {
    block::SnapshotDescription snapshot;
    snapshot.name = name;
    const auto now = std::chrono::duration_cast<std::chrono::microseconds>(
                         std::chrono::system_clock::now().time_since_epoch())
                         .count();
    snapshot.date_sec = static_cast<std::uint32_t>(now / 1000000);
    snapshot.date_nsec = static_cast<std::uint32_t>(now % 1000000 * 1000);
    snapshot.icount = 0;  // what qemu-img records
    const BlockError error = coro::block_on(create(format, image.root, std::move(snapshot)));
    if (!error.ok()) {
      if (format.can_snapshot()) detail(error);
      fail("Could not create snapshot '" + name + "': " + std::to_string(-error.error) + " (" +
           std::strerror(error.error) + ")");
    }
  } else if (options.action == 'a') {
    const BlockError error = coro::block_on(apply(format, image.root, name));
    if (!error.ok()) {
      if (!format.can_snapshot()) {
        fail("Could not apply snapshot '" + name + "': Block driver does not support snapshots");
      }
      // Refused before anything was read (bitmaps present): qemu-img says why, once.
      if (error.error == EBUSY) fail("Could not apply snapshot '" + name + "': " + error.message);
      if (error.error != ENOENT) detail(error);
      fail("Could not apply snapshot '" + name +
           "': Failed to load snapshot: " + std::strerror(error.error));
    }
  } else if (options.action == 'd') {
    const BlockError error = coro::block_on(remove(format, image.root, name));
    if (!error.ok()) {
      if (error.error == ENOENT || !format.can_snapshot()) {
        fail("Could not delete snapshot '" + name + "': snapshot not found");
      }
      fail("Could not delete snapshot '" + name + "': " + error.message);
    }
  }
  if (const int r = coro::block_on(flush(image.root)); r < 0) {
    fail("Could not write '" + options.filename + "': " + std::strerror(-r));
  }
  return 0;
}

}  // namespace spindle::img
