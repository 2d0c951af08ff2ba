#include "image_opener.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstring>

#include "block/drivers/direct_file.h"
#include "block/drivers/file.h"
#include "block/drivers/nbd/uri.h"
#include "block/qed/chain.h"
#include "block/qed/format.h"
#include "coro/block_on.h"
#include "tool_failure.h"

namespace spindle::img {

namespace {

coro::Task<block::qed::QedResult<block::qed::QedNodeRef>> open_qed_without_backing(
    block::BlockNodeRef file, bool read_only) {
  block::qed::OpenOptions options;
  options.read_only = read_only;
  options.repair_if_dirty = false;
  options.ignore_backing = true;
  co_return co_await block::qed::open_qed(std::move(file), std::move(options));
}

}  // namespace

void require_known_format(const std::string& format) {
  if (!format.empty() && format != "raw" && format != "qed") {
    fail("Unknown file format '" + format + "' (spindle-img supports raw and qed)");
  }
}

std::string probe_format(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail("Could not open '" + path + "': " + std::strerror(errno));
  unsigned char magic[4] = {};
  const ssize_t got = ::pread(fd, magic, sizeof magic, 0);
  const int error = errno;
  ::close(fd);
  if (got < 0) fail("Could not read '" + path + "': " + std::strerror(error));
  const std::uint32_t value = static_cast<std::uint32_t>(magic[0]) |
                              static_cast<std::uint32_t>(magic[1]) << 8 |
                              static_cast<std::uint32_t>(magic[2]) << 16 |
                              static_cast<std::uint32_t>(magic[3]) << 24;
  return got == 4 && value == block::qed::kMagic ? "qed" : "raw";
}

OpenedImage open_image(const std::string& path, const std::string& format,
                       ImageOpenOptions options) {
  require_known_format(format);
  OpenedImage image;
  image.filename = path;
  // NBD URIs open through the chain (which probes their format over the wire).
  const bool remote = block::nbd::is_nbd_uri(path);
  image.format = format.empty() && !remote ? probe_format(path) : format;

  if (options.with_backing || remote) {
    block::qed::ChainOptions chain;
    chain.ignore_backing = !options.with_backing;
    chain.read_only = options.read_only;
    chain.repair_if_dirty = options.repair_if_dirty;
    chain.open_file = [direct = options.direct](const std::string& file, bool read_only) {
      return direct ? block::open_direct_file(file, read_only) : block::open_file(file, read_only);
    };
    auto node = coro::block_on(block::qed::open_image_chain(path, image.format, std::move(chain)));
    if (!node) {
      const std::string& message = node.error().message;
      // The chain's messages usually name the file already.
      fail(message.find("'" + path + "'") != std::string::npos
               ? message
               : "Could not open '" + path + "': " + message);
    }
    image.root = std::move(node).value();
  } else {
    base::Result<block::BlockNodeRef> file = options.direct
                                                 ? block::open_direct_file(path, options.read_only)
                                                 : block::open_file(path, options.read_only);
    if (!file.ok()) fail("Could not open '" + path + "': " + std::strerror(file.error()));
    image.root = std::move(file).value();
    if (image.format == "qed") {
      auto qed = coro::block_on(open_qed_without_backing(image.root, options.read_only));
      if (!qed) fail("Could not open '" + path + "': " + qed.error().message);
      image.root = std::move(qed).value();
    }
  }
  image.qed = std::dynamic_pointer_cast<block::qed::QedNode>(image.root);
  if (image.format.empty()) image.format = image.qed ? "qed" : "raw";
  if (image.format == "qed" && !image.qed) fail("'" + path + "' did not open as a QED image");
  image.backend = std::make_shared<block::BlockBackend>(image.root);
  return image;
}

std::string combine_backing_path(const std::string& image_path, const std::string& backing_name) {
  if (backing_name.empty() || backing_name.front() == '/') return backing_name;
  const std::size_t slash = image_path.rfind('/');
  if (slash == std::string::npos) return backing_name;
  return image_path.substr(0, slash + 1) + backing_name;
}

}  // namespace spindle::img
