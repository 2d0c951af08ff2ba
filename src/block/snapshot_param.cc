#include "block/snapshot_param.h"

#include <algorithm>
#include <cerrno>

namespace spindle::block {

BlockResult<SnapshotParam> parse_snapshot_param(std::string_view text) {
  SnapshotParam param;
  if (!text.starts_with("snapshot.")) {
    param.id = param.name = std::string(text);
    param.either = true;
    return param;
  }
  std::size_t start = 0;
  while (start <= text.size()) {
    const std::size_t comma = std::min(text.find(',', start), text.size());
    const std::string_view item = text.substr(start, comma - start);
    const std::size_t equals = item.find('=');
    const std::string_view key = item.substr(0, equals);
    const std::string value(equals == std::string_view::npos ? "" : item.substr(equals + 1));
    if (key == "snapshot.id") {
      param.id = value;
    } else if (key == "snapshot.name") {
      param.name = value;
    } else {
      return BlockError{EINVAL, "Invalid parameter '" + std::string(key) +
                                    "'\nFailed in parsing snapshot param '" + std::string(text) +
                                    "'"};
    }
    start = comma + 1;
  }
  return param;
}

coro::Task<BlockError> load_snapshot_view(const ImageFormat& format, BlockNode& node,
                                          SnapshotParam param) {
  if (!param.either) co_return co_await format.load_snapshot_view(node, param.id, param.name);
  BlockError error = co_await format.load_snapshot_view(node, param.id, "");
  if (error.error == ENOENT) error = co_await format.load_snapshot_view(node, "", param.name);
  co_return error;
}

}  // namespace spindle::block
