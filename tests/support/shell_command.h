// Helpers the block tests share for driving qemu-img/qemu-io (the oracle) and reading image
// files: run_command() runs a shell command and captures its output, must_run() expects it to
// succeed, REQUIRE_QEMU() skips a test where qemu-utils is missing, read_file_bytes() reads a
// whole file.
//
// Thread-safety: call from the test's main thread (popen and the gtest macros).
#pragma once

#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstddef>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

namespace spindle::test {

struct CommandResult {
  int exit_code = -1;
  std::string output;
};

// `with_stderr`: stderr joins the captured output, else it is discarded.
inline CommandResult run_command(const std::string& command, bool with_stderr = true) {
  CommandResult result;
  FILE* pipe = ::popen((command + (with_stderr ? " 2>&1" : " 2>/dev/null")).c_str(), "r");
  if (pipe == nullptr) return result;
  char buffer[4096];
  std::size_t n;
  while ((n = std::fread(buffer, 1, sizeof buffer, pipe)) > 0) result.output.append(buffer, n);
  const int status = ::pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

inline bool have_qemu() {
  static const bool present =
      run_command("command -v qemu-img && command -v qemu-io").exit_code == 0;
  return present;
}

// Runs a command that must succeed.
inline std::string must_run(const std::string& command) {
  const CommandResult result = run_command(command);
  EXPECT_EQ(result.exit_code, 0) << command << "\n" << result.output;
  return result.output;
}

inline std::vector<std::byte> read_file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<char> chars((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::byte> bytes(chars.size());
  if (!chars.empty()) std::memcpy(bytes.data(), chars.data(), chars.size());
  return bytes;
}

}  // namespace spindle::test

#define REQUIRE_QEMU()              \
  if (!::spindle::test::have_qemu()) \
  GTEST_SKIP() << "qemu-img/qemu-io (qemu-utils) not installed"
