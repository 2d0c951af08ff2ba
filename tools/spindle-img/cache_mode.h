// qemu-img's -t/-T cache modes: none/off (O_DIRECT), writeback (the default), writethrough
// (every write durable on completion), directsync (both), unsafe (flushes do nothing).
//
// Thread-safety: pure functions; callable from any thread.
#pragma once

#include <optional>
#include <string>

namespace spindle::img {

struct CacheMode {
  bool direct = false;         // O_DIRECT
  bool write_through = false;  // every write is durable on completion (FUA)
  bool ignore_flush = false;   // "unsafe": flushes do nothing
};

// The mode a -t value names, or none ("Invalid cache option").
std::optional<CacheMode> parse_cache_mode(const std::string& mode);

}  // namespace spindle::img
