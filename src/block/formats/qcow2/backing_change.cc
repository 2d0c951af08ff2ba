// Qcow2Node::change_backing: qemu-img rebase's header change. The backing name and the
// backing-format extension live in the header cluster, so the whole cluster is re-encoded
// from header_ with the new name; everything the header points at is flushed first, so the
// one header write is the commit point.
#include <fmt/format.h>

#include <cerrno>
#include <cstring>

#include "block/formats/qcow2/qcow2_node.h"

namespace spindle::block::qcow2 {

namespace {
// QEMU's limit for a qcow2 backing name (its header field is read into a 1024-byte buffer).
constexpr std::size_t kMaxBackingName = 1023;

BlockError errno_error(int error) { return BlockError{error, std::strerror(error)}; }
}  // namespace

coro::Task<BlockError> Qcow2Node::change_backing(std::string name, std::string format) {
  if (read_only_) co_return errno_error(EROFS);
  if (refuses_writes()) co_return errno_error(EIO);
  if (name.size() > kMaxBackingName) co_return errno_error(EINVAL);
  if (!name.empty() && raw_data_) co_return errno_error(EINVAL);
  if (name.empty()) format.clear();
  if (const int flushed = co_await flush(); flushed < 0) co_return errno_error(-flushed);
  {
    std::lock_guard lock(meta_mutex_);
    Header changed = header_;
    changed.backing_file = name;
    changed.backing_format = format;
    if (!encode_header(changed)) co_return errno_error(ENOSPC);  // no longer fits the cluster
    header_.backing_file = std::move(name);
    header_.backing_format = std::move(format);
  }
  // (write_header_cluster() keeps header_'s record of where the name now lies.)
  int result = co_await write_header_cluster();
  if (result >= 0) result = co_await file_->flush();
  if (result < 0) {
    // The header cluster may be half written: take no more writes.
    broken_.store(true, std::memory_order_release);
    co_return errno_error(-result);
  }
  co_return BlockError{};
}

}  // namespace spindle::block::qcow2
