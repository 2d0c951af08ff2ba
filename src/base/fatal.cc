#include "base/fatal.h"

#include <cstdio>
#include <cstdlib>

namespace spindle::base {

void fatal_message(const std::string& message) noexcept {
  std::fprintf(stderr, "spindle: fatal: %s\n", message.c_str());
  std::fflush(stderr);
  std::abort();
}

}  // namespace spindle::base
