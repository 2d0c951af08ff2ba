#include "block/formats/raw/probed_raw_node.h"

#include <algorithm>
#include <array>
#include <cstring>

#include "block/format_registry.h"
#include "block/formats/raw/raw_format.h"

namespace spindle::block::raw {

bool probes_as_raw(std::span<const std::byte> sector, std::uint64_t image_size) noexcept {
  // QEMU probes the new sector without a file name (so no format recognised by its name).
  const ProbeInput input{.head = sector, .file_size = image_size, .filename = {}};
  return &probe_format(input) == &raw_format();
}

coro::Task<int> ProbedRawNode::write(std::uint64_t offset, std::span<const std::byte> buffer,
                                     std::uint32_t flags) {
  if (offset < kGuardedBytes && !buffer.empty()) {
    std::array<std::byte, kGuardedBytes> sector{};
    const std::uint64_t image_bytes = std::min<std::uint64_t>(size(), kGuardedBytes);
    const std::uint64_t end = offset + buffer.size();
    if (offset > 0 || end < image_bytes) {
      // Part of the sector stays as it is: read it (whole aligned units of the child only;
      // a child with an alignment above a sector never gets here, its writes cover it all).
      const std::uint32_t alignment = std::max<std::uint32_t>(child_->limits().request_alignment, 1);
      const std::uint64_t length = image_bytes / alignment * alignment;
      if (length > 0) {
        const int result = co_await child_->read(0, std::span(sector.data(), length), 0);
        if (result < 0) co_return result;
      }
    }
    const std::uint64_t copied = std::min<std::uint64_t>(end, kGuardedBytes) - offset;
    std::memcpy(sector.data() + offset, buffer.data(), copied);
    if (!probes_as_raw(sector, size())) co_return -EPERM;
  }
  co_return co_await child_->write(offset, buffer, flags);
}

}  // namespace spindle::block::raw
