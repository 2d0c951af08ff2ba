#include "block/cache_mode.h"

namespace spindle::block {

std::optional<CacheMode> parse_cache_mode(const std::string& mode) {
  if (mode == "none" || mode == "off") return CacheMode{.direct = true};
  if (mode == "writeback") return CacheMode{};
  if (mode == "writethrough") return CacheMode{.write_through = true};
  if (mode == "directsync") return CacheMode{.direct = true, .write_through = true};
  if (mode == "unsafe") return CacheMode{.ignore_flush = true};
  return std::nullopt;
}

FlushMode flush_mode_of(const CacheMode& mode) {
  if (mode.ignore_flush) return FlushMode::ignored;
  if (mode.write_through) return FlushMode::every_write;
  return FlushMode::normal;
}

}  // namespace spindle::block
