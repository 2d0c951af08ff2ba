// QedNode::change_backing: qemu-img rebase's header change for QED. The 64-byte header and
// the backing name right after it (QEMU's layout when it changes the name) are written in one
// request within the header clusters, after everything else is flushed; the header's
// BACKING_FILE and BACKING_FORMAT_NO_PROBE bits follow the new name and format.
#include <algorithm>
#include <cerrno>
#include <cstring>
#include <vector>

#include "block/formats/qed/qed_node.h"

namespace spindle::block::qed {

coro::Task<BlockError> QedNode::change_backing(std::string name, std::string format) {
  const auto failed = [](int error) { return BlockError{error, std::strerror(error)}; };
  if (read_only_) co_return failed(EROFS);
  if (name.size() > kMaxBackingNameBytes) co_return failed(EINVAL);
  // Clears NEED_CHECK when it can: the header written below keeps whatever bit is left.
  if (const int flushed = co_await flush(); flushed < 0) co_return failed(-flushed);

  co_await allocation_lock_.lock();  // the header changes only under it
  Header changed;
  {
    auto guard = co_await table_lock_.scoped_lock();
    changed = header_;
  }
  // With unknown compat features, what follows the header may be theirs.
  if (!name.empty() && (changed.compat_features & ~kKnownCompatFeatures)) {
    allocation_lock_.unlock();
    co_return failed(ENOTSUP);
  }
  changed.features &= ~(kFeatureBackingFile | kFeatureBackingFormatNoProbe);
  if (!name.empty()) {
    changed.features |= kFeatureBackingFile;
    if (format == "raw") changed.features |= kFeatureBackingFormatNoProbe;
  }
  changed.backing_filename_offset = kHeaderBytes;
  changed.backing_filename_size = static_cast<std::uint32_t>(name.size());
  const std::uint64_t room = std::uint64_t{changed.header_size} * changed.cluster_size;
  const std::uint64_t length = kHeaderBytes + name.size();
  if (length > room) {
    allocation_lock_.unlock();
    co_return failed(ENOSPC);
  }

  // One write of whole alignment units: what lies after the name in the last unit is kept.
  const std::uint64_t align = std::max<std::uint64_t>(1, file_->limits().request_alignment);
  const std::uint64_t span = std::min(room, (length + align - 1) / align * align);
  std::vector<std::byte> bytes(span);
  int result = co_await file_->read(0, bytes, 0);
  if (result >= 0) {
    encode_header(changed, bytes);
    std::memcpy(bytes.data() + kHeaderBytes, name.data(), name.size());
    result = co_await file_->write(0, std::span<const std::byte>(bytes), 0);
  }
  if (result >= 0) result = co_await file_->flush();
  if (result >= 0) {
    auto guard = co_await table_lock_.scoped_lock();
    header_ = changed;
    backing_name_ = std::move(name);
  }
  allocation_lock_.unlock();
  co_return result < 0 ? failed(-result) : BlockError{};
}

}  // namespace spindle::block::qed
