// Fatal errors: print a message naming what went wrong and abort.
//
// Thread-safety: callable from any thread; writes one line to stderr and never returns.
// Used for broken invariants (double scheduling, leaked bottom halves), never for bad input.
#pragma once

#include <fmt/format.h>

namespace spindle::base {

[[noreturn]] void fatal_message(const std::string& message) noexcept;

template <typename... Args>
[[noreturn]] void fatal(fmt::format_string<Args...> format, Args&&... args) noexcept {
  fatal_message(fmt::format(format, std::forward<Args>(args)...));
}

}  // namespace spindle::base
