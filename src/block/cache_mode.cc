#include "block/cache_mode.h"

#include <utility>

namespace spindle::block {

std::optional<CacheMode> parse_cache_mode(const std::string& mode) {
  if (mode == "none" || mode == "off") return CacheMode{.direct = true};
  if (mode == "writeback") return CacheMode{};
  if (mode == "writethrough") return CacheMode{.write_through = true};
  if (mode == "directsync") return CacheMode{.direct = true, .write_through = true};
  if (mode == "unsafe") return CacheMode{.ignore_flush = true};
  return std::nullopt;
}

FlushMode file_flush_mode(const CacheMode& mode) {
  return mode.ignore_flush ? FlushMode::ignored : FlushMode::normal;
}

BlockNodeRef with_write_through(BlockNodeRef root, const CacheMode& mode) {
  return wrap_flush_mode(std::move(root),
                         mode.write_through ? FlushMode::every_write : FlushMode::normal);
}

}  // namespace spindle::block
