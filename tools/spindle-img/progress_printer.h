// qemu-img's progress line for -p: "    (xx.xx/100%)" on stdout (where qemu-img prints it),
// rewritten in place (\r) when the percentage moves by a hundredth or more; finish() prints
// 100% once more and the newline, as qemu-img does.
//
// Thread-safety: not thread-safe; the tool calls it from its main thread only.
#pragma once

#include <cstdint>

namespace spindle::img {

class ProgressPrinter {
 public:
  // An inactive printer (-p not given) prints nothing.
  explicit ProgressPrinter(bool active = true) : active_(active) {}

  void update(std::uint64_t done, std::uint64_t total);
  // Prints 100% and the newline (if active).
  void finish();
  // Only the newline (if active): after a result line printed behind the progress.
  void end();

 private:
  bool active_;
  double last_ = -1.0;
};

}  // namespace spindle::img
