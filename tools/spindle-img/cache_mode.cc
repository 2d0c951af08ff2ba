#include "cache_mode.h"

namespace spindle::img {

std::optional<CacheMode> parse_cache_mode(const std::string& mode) {
  if (mode == "none" || mode == "off") return CacheMode{.direct = true};
  if (mode == "writeback") return CacheMode{};
  if (mode == "writethrough") return CacheMode{.write_through = true};
  if (mode == "directsync") return CacheMode{.direct = true, .write_through = true};
  if (mode == "unsafe") return CacheMode{.ignore_flush = true};
  return std::nullopt;
}

}  // namespace spindle::img
