#include "progress_printer.h"

#include <cstdio>

namespace spindle::img {

void ProgressPrinter::update(std::uint64_t done, std::uint64_t total) {
  if (!active_) return;
  const double percent =
      total ? static_cast<double>(done) * 100.0 / static_cast<double>(total) : 100.0;
  if (percent - last_ < 0.01 && !(percent >= 100.0 && last_ < 100.0)) return;
  last_ = percent;
  std::printf("    (%0.2f/100%%)\r", percent);
  std::fflush(stdout);
}

void ProgressPrinter::finish() {
  if (!active_) return;
  std::printf("    (100.00/100%%)\r\n");
  std::fflush(stdout);
}

void ProgressPrinter::end() {
  if (!active_) return;
  std::printf("\n");
  std::fflush(stdout);
}

}  // namespace spindle::img
