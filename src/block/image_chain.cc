#include "block/image_chain.h"

#include <fmt/format.h>
#include <limits.h>
#include <stdlib.h>

#include <algorithm>
#include <cstring>
#include <memory>

#include "block/drivers/nbd/nbd_node.h"
#include "block/drivers/nbd/uri.h"
#include "block/format_registry.h"

namespace spindle::block {

namespace {

struct ChainState {
  ChainOptions options;
  std::vector<std::string> seen;  // real paths or URIs opened so far, top first
  std::vector<ChainLevel> levels;  // in the order their formats finished opening (bottom first)
};

BlockError check_loop(ChainState& state, const std::string& key, const std::string& path) {
  if (std::find(state.seen.begin(), state.seen.end(), key) != state.seen.end()) {
    return BlockError{ELOOP, fmt::format("backing chain refers to itself: '{}'", path)};
  }
  if (state.seen.size() >= state.options.max_depth) {
    return BlockError{ELOOP, fmt::format("backing chain is deeper than {} images at '{}'",
                                         state.options.max_depth, path)};
  }
  state.seen.push_back(key);
  return {};
}

// A local file: loops are detected by comparing real paths.
BlockResult<BlockNodeRef> open_local(ChainState& state, const std::string& path, bool read_only) {
  char resolved[PATH_MAX];
  // qemu's wording: the file named as opened, then why.
  auto failed = [&path](int error) {
    return BlockError{error, fmt::format("Could not open '{}': {}", path, std::strerror(error))};
  };
  if (::realpath(path.c_str(), resolved) == nullptr) return failed(errno);
  if (BlockError error = check_loop(state, resolved, path); !error.ok()) return error;
  base::Result<BlockNodeRef> file = state.options.open_file(path, read_only);
  if (!file.ok()) return failed(file.error());
  return std::move(file).value();
}

// An NBD URI: loops are detected by comparing the URI text.
coro::Task<BlockResult<BlockNodeRef>> open_remote(ChainState& state, const std::string& uri,
                                                  bool read_only) {
  if (BlockError error = check_loop(state, uri, uri); !error.ok()) co_return error;
  nbd::NbdOpenResult opened = co_await nbd::open_nbd(uri, read_only);
  if (!opened.node) co_return BlockError{opened.error, opened.message};
  co_return std::move(opened.node);
}

coro::Task<BlockResult<BlockNodeRef>> open_level(std::shared_ptr<ChainState> state,
                                                 std::string path, std::string format_name,
                                                 bool read_only) {
  const bool top = state->seen.empty();
  const ImageFormat* format = nullptr;
  if (!format_name.empty()) {
    format = find_format(format_name);
    if (!format) co_return BlockError{EINVAL, fmt::format("Unknown file format '{}'", format_name)};
    if (!format->can_open()) {
      co_return BlockError{ENOTSUP, fmt::format("image format '{}' is not supported", format_name)};
    }
  }

  BlockNodeRef file;
  if (nbd::is_nbd_uri(path)) {
    BlockResult<BlockNodeRef> opened = co_await open_remote(*state, path, read_only);
    if (!opened.ok()) co_return opened.error();
    file = std::move(opened).value();
  } else {
    BlockResult<BlockNodeRef> opened = open_local(*state, path, read_only);
    if (!opened.ok()) co_return opened.error();
    file = std::move(opened).value();
  }

  const bool probed = format == nullptr;
  if (probed) {
    BlockResult<const ImageFormat*> found = co_await probe_node(*file, path);
    if (!found.ok()) co_return found.error();
    format = found.value();
    if (!format->can_open()) {
      co_return BlockError{ENOTSUP,
                           fmt::format("image format '{}' is not supported", format->name())};
    }
  }

  FormatOpenOptions options;
  options.read_only = read_only;
  options.repair_if_dirty = state->options.repair_if_dirty;
  options.ignore_backing = top && state->options.ignore_backing;
  options.metadata_only = top && state->options.metadata_only;
  options.probed = probed;
  if (top) options.options = state->options.format_options;
  options.open_backing = [state, path](std::string name, std::string backing_format)
      -> coro::Task<BlockResult<BlockNodeRef>> {
    co_return co_await open_level(state, combine_backing_path(path, name), backing_format, true);
  };
  if (!nbd::is_nbd_uri(path)) {
    options.open_data_file = [state, path](const std::string& name,
                                           bool data_read_only) -> BlockResult<BlockNodeRef> {
      return open_local(*state, combine_backing_path(path, name), data_read_only);
    };
  }
  BlockResult<BlockNodeRef> node = co_await format->open(std::move(file), std::move(options));
  if (!node.ok()) co_return node.error();
  state->levels.push_back(ChainLevel{node.value().get(), path, format, probed});
  co_return node;
}

}  // namespace

coro::Task<BlockResult<ImageChain>> open_chain(std::string path, std::string format,
                                               ChainOptions options) {
  const bool read_only = options.read_only;
  auto state = std::make_shared<ChainState>();
  state->options = std::move(options);
  BlockResult<BlockNodeRef> root =
      co_await open_level(state, std::move(path), std::move(format), read_only);
  if (!root.ok()) co_return root.error();
  ImageChain chain;
  chain.root = std::move(root).value();
  chain.levels.assign(state->levels.rbegin(), state->levels.rend());
  co_return chain;
}

coro::Task<BlockResult<BlockNodeRef>> open_image_chain(std::string path, std::string format,
                                                       ChainOptions options) {
  BlockResult<ImageChain> chain =
      co_await open_chain(std::move(path), std::move(format), std::move(options));
  if (!chain.ok()) co_return chain.error();
  co_return std::move(chain.value().root);
}

std::string combine_backing_path(const std::string& image_path, const std::string& backing_name) {
  if (backing_name.empty() || backing_name.front() == '/' || nbd::is_nbd_uri(backing_name) ||
      nbd::is_nbd_uri(image_path)) {
    return backing_name;
  }
  const std::size_t slash = image_path.rfind('/');
  if (slash == std::string::npos) return backing_name;
  return image_path.substr(0, slash + 1) + backing_name;
}

}  // namespace spindle::block
