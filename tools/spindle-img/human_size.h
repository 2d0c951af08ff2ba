// human_size(): a byte count as qemu-img's human-readable output writes it: three significant
// digits and a binary unit ("10 MiB", "260 KiB", "1.5 GiB", "0 B"), moving to the next unit once
// the number would reach 1000.
//
// Thread-safety: a pure function; callable from any thread.
#pragma once

#include <cstdint>
#include <string>

namespace spindle::img {

std::string human_size(std::uint64_t bytes);

}  // namespace spindle::img
