// parse_size(): reads a byte count the way qemu-img's command line does: a decimal number,
// optionally with a fraction, and an optional suffix b/B (bytes) or k/K, M, G, T, P, E (powers
// of 1024). "1.5G" is 1610612736. Rejects signs, trailing garbage and values above UINT64_MAX.
//
// Thread-safety: pure functions; callable from any thread.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

namespace spindle::img {

std::optional<std::uint64_t> parse_size(std::string_view text);

// The message qemu-img prints for an unparsable image size.
inline constexpr const char* kInvalidSizeMessage =
    "Invalid image size specified. You may use k, M, G, T, P or E suffixes for kilobytes, "
    "megabytes, gigabytes, terabytes, petabytes and exabytes.";

}  // namespace spindle::img
