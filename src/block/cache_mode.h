// QEMU's cache modes, as qemu-img -t/-T and qemu-nbd --cache name them: none/off (O_DIRECT),
// writeback (the page cache, flushes honoured), writethrough (every write durable on
// completion), directsync (both), unsafe (flushes do nothing). A mode becomes a file opener's
// O_DIRECT choice (block/drivers/direct_file.h) and a flush filter (block/drivers/flush_mode.h).
//
// Thread-safety: pure functions; callable from any thread.
#pragma once

#include <optional>
#include <string>

#include "block/drivers/flush_mode.h"

namespace spindle::block {

struct CacheMode {
  bool direct = false;         // O_DIRECT
  bool write_through = false;  // every write is durable on completion (FUA)
  bool ignore_flush = false;   // "unsafe": flushes do nothing
};

// The mode a cache option names, or none (the caller says "Invalid cache option").
std::optional<CacheMode> parse_cache_mode(const std::string& mode);

// What the file nodes do with flushes and FUA under `mode` (ignored for unsafe, else normal).
FlushMode file_flush_mode(const CacheMode& mode);
// The node to send requests to for an image whose root (format node) is `root`: `root`
// itself, or under writethrough/directsync a FlushMode::every_write filter over it.
BlockNodeRef with_write_through(BlockNodeRef root, const CacheMode& mode);

}  // namespace spindle::block
