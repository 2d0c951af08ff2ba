// ToolFailure: how a spindle-img subcommand gives up. It carries the message that main() prints
// as "spindle-img: <message>" on stderr and the process exit status (1 unless a subcommand's
// qemu-img counterpart uses another code, as compare's 2 or check's 63).
//
// Thread-safety: a plain exception type. Throw it only from ordinary functions, never from a
// coroutine body: tasks report errors as values and their synchronous callers throw.
#pragma once

#include <stdexcept>
#include <string>

namespace spindle::img {

class ToolFailure : public std::runtime_error {
 public:
  explicit ToolFailure(const std::string& message, int exit_code = 1)
      : std::runtime_error(message), exit_code_(exit_code) {}
  int exit_code() const noexcept { return exit_code_; }

 private:
  int exit_code_;
};

[[noreturn]] inline void fail(const std::string& message, int exit_code = 1) {
  throw ToolFailure(message, exit_code);
}

// qemu prints each line of a several-line message with its own "qemu-img: ".
[[noreturn]] inline void fail_lines(const std::string& message, int exit_code = 1) {
  std::string text;
  for (char c : message) text += c == '\n' ? std::string("\nspindle-img: ") : std::string(1, c);
  fail(text, exit_code);
}

}  // namespace spindle::img
