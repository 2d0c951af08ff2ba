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

BlockResult<std::uint64_t> ImageFormat::measure_granularity(
    const CreateRequest& /*request*/) const {
  return BlockError{ENOTSUP,
                    fmt::format("Block driver '{}' does not support size measurement", name())};
}

BlockResult<SizeMeasurement> ImageFormat::measure(
    const CreateRequest& request, const std::optional<MeasureSource>& /*source*/) const {
  return measure_granularity(request).error();
}

coro::Task<BlockError> ImageFormat::amend(BlockNode& /*node*/,
                                          std::map<std::string, std::string> /*options*/) const {
  co_return BlockError{ENOTSUP,
                       fmt::format("Format driver '{}' does not support option amendment", name())};
}

coro::Task<BlockError> ImageFormat::change_backing(BlockNode& /*node*/, std::string /*name*/,
                                                   std::string /*format*/) const {
  co_return BlockError{ENOTSUP, "Operation not supported"};
}

coro::Task<BlockError> ImageFormat::make_empty(BlockNode& /*node*/) const {
  co_return BlockError{ENOTSUP, fmt::format("{} does not support emptying nodes", name())};
}

namespace {
BlockError no_snapshots(std::string_view format) {
  return {ENOTSUP, fmt::format("image format '{}' does not support internal snapshots", format)};
}
}  // namespace

coro::Task<BlockResult<std::vector<SnapshotDescription>>> ImageFormat::list_snapshots(
    BlockNode& /*node*/) const {
  co_return no_snapshots(name());
}

coro::Task<BlockError> ImageFormat::create_snapshot(BlockNode& /*node*/,
                                                    SnapshotDescription /*snapshot*/) const {
  co_return no_snapshots(name());
}

coro::Task<BlockError> ImageFormat::apply_snapshot(BlockNode& /*node*/,
                                                   std::string /*id_or_name*/) const {
  co_return no_snapshots(name());
}

coro::Task<BlockError> ImageFormat::load_snapshot_view(BlockNode& /*node*/, std::string /*id*/,
                                                       std::string /*name*/) const {
  co_return BlockError{ENOTSUP, "Block format '" + std::string(name()) +
                                    "' used by device '' does not support temporarily loading "
                                    "internal snapshots"};
}

coro::Task<BlockError> ImageFormat::remove_snapshot(BlockNode& /*node*/,
                                                    std::string /*name*/) const {
  co_return no_snapshots(name());
}

coro::Task<BlockResult<std::vector<PersistentBitmap>>> ImageFormat::load_bitmaps(
    BlockNode& /*node*/, bool /*with_bits*/) const {
  co_return std::vector<PersistentBitmap>{};
}

coro::Task<BlockError> ImageFormat::store_bitmaps(BlockNode& /*node*/,
                                                  std::vector<PersistentBitmap> /*bitmaps*/) const {
  co_return BlockError{ENOTSUP, "Operation not supported"};
}

}  // namespace spindle::block
