#include "block/image_format.h"

#include <cerrno>

#include <fmt/format.h>

namespace spindle::block {

coro::Task<BlockResult<BlockNodeRef>> ImageFormat::open(BlockNodeRef /*file*/,
                                                        FormatOpenOptions /*options*/) const {
  co_return BlockError{ENOTSUP, fmt::format("image format '{}' is not supported", name())};
}

coro::Task<BlockError> ImageFormat::create(BlockNode& /*file*/, CreateRequest /*request*/) const {
  co_return BlockError{ENOTSUP, fmt::format("cannot create images of format '{}'", name())};
}

std::string ImageFormat::create_summary(const CreateRequest& /*request*/) const { return {}; }

coro::Task<ImageDescription> ImageFormat::describe(BlockNode& /*node*/) const {
  co_return ImageDescription{};
}

coro::Task<CheckReport> ImageFormat::check(BlockNodeRef /*node*/, RepairMode /*mode*/) const {
  CheckReport report;
  report.error = -ENOTSUP;
  co_return report;
}

}  // namespace spindle::block
