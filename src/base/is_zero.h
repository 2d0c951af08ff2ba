// is_zero(): whether a buffer holds only zero bytes (qemu's buffer_is_zero), for copies that
// turn zero data into zero writes.
//
// Thread-safety: a pure function over memory the caller keeps stable.
#pragma once

#include <cstddef>
#include <cstring>
#include <span>

namespace spindle::base {

inline bool is_zero(std::span<const std::byte> data) {
  // The first byte is zero and every byte equals the one before it: one memcmp of the buffer
  // against itself, shifted by one, which libc vectorises.
  return data.empty() || (data[0] == std::byte{0} &&
                          std::memcmp(data.data(), data.data() + 1, data.size() - 1) == 0);
}

}  // namespace spindle::base
