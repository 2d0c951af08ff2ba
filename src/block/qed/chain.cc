#include "block/qed/chain.h"

#include <fmt/format.h>
#include <limits.h>
#include <stdlib.h>

#include <cstring>
#include <memory>
#include <vector>

#include "block/qed/format.h"
#include "block/qed/qed_node.h"

namespace spindle::block::qed {

namespace {

struct ChainState {
  ChainOptions options;
  std::vector<std::string> real_paths;  // images opened so far, top first
};

coro::Task<QedResult<BlockNodeRef>> open_level(std::shared_ptr<ChainState> state,
                                               std::string path, std::string format,
                                               bool read_only) {
  char resolved[PATH_MAX];
  if (::realpath(path.c_str(), resolved) == nullptr) {
    const int error = errno;
    co_return QedError{error, fmt::format("cannot open '{}': {}", path, std::strerror(error))};
  }
  const std::string real_path = resolved;
  for (const std::string& seen : state->real_paths) {
    if (seen == real_path) {
      co_return QedError{ELOOP, fmt::format("backing chain refers to itself: '{}'", path)};
    }
  }
  if (state->real_paths.size() >= state->options.max_depth) {
    co_return QedError{ELOOP, fmt::format("backing chain is deeper than {} images at '{}'",
                                          state->options.max_depth, path)};
  }
  state->real_paths.push_back(real_path);

  base::Result<BlockNodeRef> file = state->options.open_file(path, read_only);
  if (!file.ok()) {
    co_return QedError{file.error(),
                       fmt::format("cannot open '{}': {}", path, std::strerror(file.error()))};
  }
  BlockNodeRef node = std::move(file).value();
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

  const std::string directory = path.find('/') == std::string::npos
                                    ? std::string(".")
                                    : path.substr(0, path.rfind('/') == 0 ? 1 : path.rfind('/'));
  OpenOptions options;
  options.read_only = read_only;
  options.repair_if_dirty = state->options.repair_if_dirty;
  options.open_backing = [state, directory](std::string name,
                                            std::string backing_format) -> coro::Task<QedResult<BlockNodeRef>> {
    const std::string backing_path = name.starts_with('/') ? name : directory + "/" + name;
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
