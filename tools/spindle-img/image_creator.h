// Creating images through the format registry: parsing qemu-img's `-o key=value,...` creation
// options into a block::CreateRequest, checking them with the format, printing qemu-img's
// "Formatting" line and formatting a new image. Used by `create` and by `convert` for its
// target.
//
// Thread-safety: call from the main thread outside coroutines (uses coro::block_on).
#pragma once

#include <string>

#include "block/image_format.h"

namespace spindle::img {

// The registry's format for `name`, which must be able to create images (ToolFailure if not).
const block::ImageFormat& require_creatable_format(const std::string& name);

// `-o` text into request.options (later keys win). Throws ToolFailure for an item without '='.
void parse_creation_options(const std::string& text, block::CreateRequest& request);

// Throws ToolFailure when `format` refuses the request's options.
void validate_creation(const block::ImageFormat& format, const block::CreateRequest& request);

// The "Formatting 'NAME', fmt=FORMAT size=..." line qemu-img create prints.
std::string formatting_line(const std::string& filename, const block::ImageFormat& format,
                            const block::CreateRequest& request);

// Creates (or truncates) `filename` as an empty image. On failure removes a file it created and
// throws ToolFailure.
void create_image(const std::string& filename, const block::ImageFormat& format,
                  const block::CreateRequest& request);

}  // namespace spindle::img
