#include "human_size.h"

#include <fmt/format.h>

#include <cstdio>

namespace spindle::img {

std::string human_size(std::uint64_t bytes) {
  static constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  unsigned unit = 0;
  double value = static_cast<double>(bytes);
  while (unit + 1 < std::size(kUnits) && value >= 1000.0) {
    value /= 1024.0;
    ++unit;
  }
  char text[48];
  std::snprintf(text, sizeof text, "%0.3g %s", value, kUnits[unit]);
  return text;
}

}  // namespace spindle::img
