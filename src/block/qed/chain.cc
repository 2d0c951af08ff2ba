#include "block/qed/chain.h"

#include <fmt/format.h>
#include <limits.h>
#include <stdlib.h>

#include <cstring>
#include <memory>
#include <vector>

#include "block/drivers/nbd/nbd_node.h"
#include "block/qed/format.h"
#include "block/qed/qed_node.h"

namespace spindle::block::qed {

namespace {

struct ChainState {
  ChainOptions options;
  std::vector<std::string> real_paths;  // images opened so far, top first
};

// A local file: loops are detected by comparing real paths.
QedResult<BlockNodeRef> open_local(ChainState& state, const std::string& path, bool read_only) {
  char resolved[PATH_MAX];
  if (::realpath(path.c_str(), resolved) == nullptr) {
    const int error = errno;
    return QedError{error, fmt::format("cannot open '{}': {}", path, std::strerror(error))};
  }
  const std::string real_path = resolved;
  for (const std::string& seen : state.real_paths) {
    if (seen == real_path) {
      return QedError{ELOOP, fmt::format("backing chain refers to itself: '{}'", path)};
    }
  }
  if (state.real_paths.size() >= state.options.max_depth) {
    return QedError{ELOOP, fmt::format("backing chain is deeper than {} images at '{}'",
                                       state.options.max_depth, path)};
  }
  state.real_paths.push_back(real_path);

  base::Result<BlockNodeRef> file = state.options.open_file(path, read_only);
  if (!file.ok()) {
    return QedError{file.error(),
                    fmt::format("cannot open '{}': {}", path, std::strerror(file.error()))};
  }
  return std::move(file).value();
}

// An NBD URI (block/drivers/nbd/uri.h) instead of a file name: the remote export is the
// protocol node. Loops are detected by comparing the URI text.
coro::Task<QedResult<BlockNodeRef>> open_remote(ChainState& state, const std::string& uri,
                                                bool read_only) {
  for (const std::string& seen : state.real_paths) {
    if (seen == uri) co_return QedError{ELOOP, fmt::format("backing chain refers to itself: '{}'", uri)};
  }
  if (state.real_paths.size() >= state.options.max_depth) {
    co_return QedError{ELOOP, fmt::format("backing chain is deeper than {} images at '{}'",
                                          state.options.max_depth, uri)};
  }
  state.real_paths.push_back(uri);
  nbd::NbdOpenResult opened = co_await nbd::open_nbd(uri, read_only);
  if (!opened.node) co_return QedError{opened.error, opened.message};
  co_return std::move(opened.node);
}

coro::Task<QedResult<BlockNodeRef>> open_level(std::shared_ptr<ChainState> state,
                                               std::string path, std::string format,
                                               bool read_only) {
  const bool remote = nbd::is_nbd_uri(path);
  BlockNodeRef node;
  if (remote) {
    QedResult<BlockNodeRef> opened = co_await open_remote(*state, path, read_only);
    if (!opened.ok()) co_return opened.error();
    node = std::move(opened).value();
  } else {
    QedResult<BlockNodeRef> opened = open_local(*state, path, read_only);
    if (!opened.ok()) co_return opened.error();
    node = std::move(opened).value();
  }
  if (format.empty()) {
    format = "raw";
    if (node->size() >= 4) {
      std::byte magic[4];
      const int result = co_await node->read(0, std::span(magic), 0);
      if (result < 0) {
        co_return QedError{-result, fmt::format("cannot read '{}': {}", path, std::strerror(-result))};
      }
      std::byte header[kHeaderBytes] = {};
      std::memcpy(header, magic, 4);
      if (decode_header(header).magic == kMagic) format = "qed";
    }
  }
  if (format == "raw") co_return node;
  if (format != "qed") {
    co_return QedError{ENOTSUP, fmt::format("unsupported image format '{}' for '{}'", format, path)};
  }

  // Relative backing names resolve against the image's directory (a URI has none: as given).
  const std::string directory = remote ? std::string(".")
                                : path.find('/') == std::string::npos
                                    ? std::string(".")
                                    : path.substr(0, path.rfind('/') == 0 ? 1 : path.rfind('/'));
  OpenOptions options;
  options.read_only = read_only;
  options.repair_if_dirty = state->options.repair_if_dirty;
  options.ignore_backing = state->real_paths.size() == 1 && state->options.ignore_backing;
  options.open_backing = [state, directory, remote](std::string name,
                                            std::string backing_format) -> coro::Task<QedResult<BlockNodeRef>> {
    const std::string backing_path =
        name.starts_with('/') || nbd::is_nbd_uri(name) || (remote && !name.empty())
            ? name
            : directory + "/" + name;
    co_return co_await open_level(state, backing_path, backing_format, true);
  };
  QedResult<QedNodeRef> qed = co_await open_qed(node, std::move(options));
  if (!qed.ok()) {
    QedError error = qed.error();
    error.message = fmt::format("'{}': {}", path, error.message);
    co_return error;
  }
  co_return BlockNodeRef(std::move(qed).value());
}

}  // namespace

coro::Task<QedResult<BlockNodeRef>> open_image_chain(std::string path, std::string format,
                                                     ChainOptions options) {
  const bool read_only = options.read_only;
  auto state = std::make_shared<ChainState>();
  state->options = std::move(options);
  co_return co_await open_level(state, std::move(path), std::move(format), read_only);
}

}  // namespace spindle::block::qed
