#include "block/formats/qed/create.h"

#include <fmt/format.h>

#include <cstring>
#include <vector>

namespace spindle::block::qed {

coro::Task<BlockError> create_qed(BlockNode& file, CreateOptions options) {
  Header header;
  header.cluster_size = options.cluster_size;
  header.table_size = options.table_size;
  header.header_size = 1;
  header.l1_table_offset = options.cluster_size;
  if (options.size > UINT64_MAX - 511) co_return BlockError{EINVAL, "image size is too large"};
  header.image_size = (options.size + 511) / 512 * 512;
  if (!options.backing_file.empty()) {
    header.features |= kFeatureBackingFile;
    if (options.backing_format == "raw") header.features |= kFeatureBackingFormatNoProbe;
    header.backing_filename_offset = kHeaderBytes;
    header.backing_filename_size = static_cast<std::uint32_t>(
        std::min<std::size_t>(options.backing_file.size(), UINT32_MAX));
  }
  if (!is_power_of_two(header.cluster_size) || header.cluster_size < kMinClusterSize ||
      header.cluster_size > kMaxClusterSize) {
    co_return BlockError{EINVAL, fmt::format("QED cluster size must be a power of two in [{}, {}]",
                                           kMinClusterSize, kMaxClusterSize)};
  }
  if (!is_power_of_two(header.table_size) || header.table_size > kMaxTableSize) {
    co_return BlockError{EINVAL, fmt::format("QED table size must be a power of two in [{}, {}]",
                                           kMinTableSize, kMaxTableSize)};
  }
  const Geometry geometry = Geometry::make(header.cluster_size, header.table_size);
  if (!is_image_size_valid(geometry, header.image_size)) {
    co_return BlockError{EINVAL, fmt::format("QED image size must be at most {} bytes",
                                           geometry.max_image_size)};
  }
  if (kHeaderBytes + options.backing_file.size() > header.cluster_size ||
      options.backing_file.size() > kMaxBackingNameBytes) {
    co_return BlockError{EINVAL, "backing file name does not fit in the QED header cluster"};
  }

  int result = co_await file.truncate(0);
  if (result < 0) {
    co_return BlockError{-result, fmt::format("cannot truncate the image file: {}", std::strerror(-result))};
  }
  std::vector<std::byte> head(kHeaderBytes + options.backing_file.size());
  encode_header(header, head);
  std::memcpy(head.data() + kHeaderBytes, options.backing_file.data(), options.backing_file.size());
  result = co_await file.write(0, std::span<const std::byte>(head), 0);
  if (result >= 0) {
    const std::vector<std::byte> l1(geometry.table_bytes);
    result = co_await file.write(header.l1_table_offset, std::span<const std::byte>(l1), 0);
  }
  if (result >= 0) result = co_await file.flush();
  if (result < 0) {
    co_return BlockError{-result, fmt::format("cannot write the QED image: {}", std::strerror(-result))};
  }
  co_return BlockError{};
}

}  // namespace spindle::block::qed
