#include "block/formats/raw/raw_format.h"

#include <cerrno>
#include <cstring>

#include <fmt/format.h>

#include "block/formats/raw/probed_raw_node.h"

namespace spindle::block::raw {

namespace {

class RawFormat final : public ImageFormat {
 public:
  std::string_view name() const noexcept override { return "raw"; }
  int probe(const ProbeInput& /*input*/) const noexcept override { return 1; }

  coro::Task<BlockResult<BlockNodeRef>> open(BlockNodeRef file,
                                             FormatOpenOptions options) const override {
    if (!options.options.empty()) {
      co_return BlockError{EINVAL, fmt::format("Invalid option '{}' for format 'raw'",
                                               options.options.begin()->first)};
    }
    if (options.probed && !options.read_only && !file->read_only()) {
      co_return BlockNodeRef(std::make_shared<ProbedRawNode>(std::move(file)));
    }
    co_return file;
  }

  bool can_create() const noexcept override { return true; }

  BlockError validate_create(const CreateRequest& request) const override {
    for (const auto& [key, value] : request.options) {
      if (key == "backing_file" || key == "backing_fmt") {
        return BlockError{ENOTSUP, "Backing file not supported for file format 'raw'"};
      }
      if (key == "preallocation" && value == "off") continue;  // the only mode: a sparse file
      return BlockError{EINVAL, fmt::format("Invalid parameter '{}' for format 'raw'", key)};
    }
    return {};
  }

  coro::Task<BlockError> create(BlockNode& file, CreateRequest request) const override {
    if (BlockError error = validate_create(request); !error.ok()) co_return error;
    int result = co_await file.truncate(0);
    if (result >= 0) result = co_await file.truncate(request.size);
    if (result >= 0) result = co_await file.flush();
    if (result < 0) co_return BlockError{-result, std::strerror(-result)};
    co_return BlockError{};
  }

  std::string create_summary(const CreateRequest& request) const override {
    return fmt::format("size={}", request.size);
  }

  // The image is the bytes: every one of them is required, sectors whole.
  BlockResult<std::uint64_t> measure_granularity(const CreateRequest& request) const override {
    for (const auto& option : request.options) {
      if (option.first != "size" && option.first != "preallocation") {
        return BlockError{EINVAL, fmt::format("Invalid parameter '{}'\nInvalid options for file "
                                              "format 'raw'", option.first)};
      }
    }
    return 512;
  }
  BlockResult<SizeMeasurement> measure(const CreateRequest& request,
                                       const std::optional<MeasureSource>& source) const override {
    BlockResult<std::uint64_t> checked = measure_granularity(request);
    if (!checked) return checked.error();
    const std::uint64_t size = source ? source->size : request.size;
    if (size > static_cast<std::uint64_t>(INT64_MAX) - 511) {
      return BlockError{EINVAL, "Invalid image size specified. Must be between 0 and "
                                "9223372036854775807."};
    }
    const std::uint64_t sectors = (size + 511) / 512 * 512;
    return SizeMeasurement{.required = sectors, .fully_allocated = sectors, .bitmaps = {}};
  }
};

}  // namespace

const ImageFormat& raw_format() {
  static const RawFormat format;
  return format;
}

}  // namespace spindle::block::raw
