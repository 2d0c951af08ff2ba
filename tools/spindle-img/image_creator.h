// Creating images: parsing qemu-img's `-o key=value,...` creation options and formatting a new
// raw (sparse file of the given size) or QED (block/qed/create.h) image. Used by `create` and by
// `convert` for its target.
//
// Thread-safety: call from the main thread outside coroutines (uses coro::block_on).
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace spindle::img {

struct CreationOptions {
  std::optional<std::uint32_t> cluster_size;  // qed; unset: the default (64 KiB)
  std::optional<std::uint32_t> table_size;    // qed; unset: the default (4)
  std::string backing_file;
  std::string backing_format;
};

// Throws ToolFailure for unknown keys (per format) and bad values.
CreationOptions parse_creation_options(const std::string& format, const std::string& text);

// The "Formatting 'NAME', fmt=... size=..." line qemu-img create prints.
std::string formatting_line(const std::string& filename, const std::string& format,
                            std::uint64_t size, const CreationOptions& options);

// Creates (or truncates) `filename` as an empty image. On failure removes a file it created and
// throws ToolFailure.
void create_image(const std::string& filename, const std::string& format, std::uint64_t size,
                  const CreationOptions& options);

}  // namespace spindle::img
