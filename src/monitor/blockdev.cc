#include "monitor/blockdev.h"

#include <cctype>
#include <cerrno>
#include <cstring>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "block/block_node.h"
#include "block/drivers/blkdebug.h"
#include "block/drivers/detect_zeroes.h"
#include "block/drivers/direct_file.h"
#include "block/drivers/file.h"
#include "block/drivers/flush_mode.h"
#include "block/drivers/nbd/nbd_node.h"
#include "block/drivers/null.h"
#include "block/drivers/raw.h"
#include "block/drivers/throttle.h"
#include "block/format_registry.h"
#include "block/image_chain.h"
#include "monitor/arguments.h"
#include "monitor/socket_address.h"

namespace spindle::monitor {

namespace {

// QEMU 7.2's BlockdevDriver enum: a name outside it is refused as QEMU refuses it; a name in
// it that Spindle does not implement gets its own message.
// clang-format off
constexpr std::initializer_list<const char*> kDrivers = {
    "blkdebug", "blklogwrites", "blkreplay", "blkverify", "bochs", "cloop", "compress",
    "copy-before-write", "copy-on-read", "dmg", "file", "snapshot-access", "ftp", "ftps",
    "gluster", "host_cdrom", "host_device", "http", "https", "iscsi", "luks", "nbd", "nfs",
    "null-aio", "null-co", "nvme", "parallels", "preallocate", "qcow", "qcow2", "qed", "quorum",
    "raw", "rbd", "replication", "ssh", "throttle", "vdi", "vhdx", "vmdk", "vpc", "vvfat"};
// clang-format on

// One blockdev-add request: the nodes it opened so far, undone unless it commits.
class Request {
 public:
  Request(NodeTable& nodes, bool from_keyval) : nodes_(nodes), from_keyval_(from_keyval) {}
  ~Request() {
    // Not committed: drop what was added, newest first (nodes hold their children).
    for (auto it = added_.rbegin(); it != added_.rend(); ++it) nodes_.remove(*it);
  }
  void commit() { added_.clear(); }

  // Opens one node; its name (given or generated) in `name`.
  coro::Task<std::optional<QmpError>> open(const Json& options, std::string path, bool top,
                                           bool inherited_read_only, std::string& name);

 private:
  // A child reference: an existing node's name or an inline definition. Sets `child` (null:
  // absent, or null when `allow_null`).
  coro::Task<std::optional<QmpError>> child(Arguments& args, const char* role, bool required,
                                            bool allow_null, bool read_only, NodeEntry*& child,
                                            bool& is_null);

  NodeTable& nodes_;
  const bool from_keyval_;
  std::vector<std::string> added_;
};

std::string errno_text(int error) {
  return std::strerror(error);
}

coro::Task<std::optional<QmpError>> Request::child(Arguments& args, const char* role, bool required,
                                                   bool allow_null, bool read_only,
                                                   NodeEntry*& child, bool& is_null) {
  child = nullptr;
  is_null = false;
  const Json* ref = args.raw(role, required);
  if (args.error()) co_return args.error();
  if (!ref) co_return std::nullopt;
  if (ref->is_null() && allow_null) {
    is_null = true;
    co_return std::nullopt;
  }
  if (ref->is_string()) {
    const std::string name = ref->get<std::string>();
    child = nodes_.find(name);
    if (!child) {
      co_return generic_error("Cannot find device='" + name + "' nor node-name='" + name + "'");
    }
    co_return std::nullopt;
  }
  if (!ref->is_object()) {
    co_return generic_error("Invalid parameter type for '" + args.name_of(role) +
                            "', expected: " + (allow_null ? "BlockdevRefOrNull" : "BlockdevRef"));
  }
  std::string name;
  std::optional<QmpError> error = co_await open(*ref, args.name_of(role), false, read_only, name);
  if (error) co_return error;
  child = nodes_.find(name);
  co_return std::nullopt;
}

coro::Task<std::optional<QmpError>> Request::open(const Json& options, std::string path, bool top,
                                                  bool inherited_read_only, std::string& name) {
  Arguments args(options, from_keyval_, path);
  const std::optional<std::string> driver = args.choice("driver", kDrivers, true);
  const std::optional<std::string> node_name = args.string("node-name");
  const std::string discard =
      args.choice("discard", {"ignore", "off", "unmap", "on"}).value_or("ignore");
  bool direct = false, no_flush = false;
  if (std::optional<Arguments> cache = args.object("cache")) {
    direct = cache->boolean("direct").value_or(false);
    no_flush = cache->boolean("no-flush").value_or(false);
    args.finish_nested(*cache);
  }
  const bool read_only = args.boolean("read-only").value_or(inherited_read_only);
  args.boolean("auto-read-only");
  args.boolean("force-share");
  const std::string detect_zeroes =
      args.choice("detect-zeroes", {"off", "on", "unmap"}).value_or("off");
  if (args.error()) co_return args.error();
  if (node_name) {
    if (!is_well_formed_id(*node_name))
      co_return generic_error("Invalid node-name: '" + *node_name + "'");
    if (node_name->size() >= 32) co_return generic_error("Node name too long");
    if (nodes_.find(*node_name)) {
      co_return generic_error("Duplicate nodes with node-name='" + *node_name + "'");
    }
  } else if (top) {
    co_return generic_error("'node-name' must be specified for the root node");
  }
  if (detect_zeroes == "unmap" && discard != "unmap" && discard != "on") {
    co_return generic_error(
        "setting detect-zeroes to unmap is not allowed without setting discard operation to "
        "unmap");
  }

  NodeEntry entry;
  entry.driver = *driver;
  entry.read_only = read_only;
  entry.cache_direct = direct;
  entry.cache_no_flush = no_flush;
  entry.detect_zeroes = detect_zeroes;
  entry.discard_unmap = discard == "unmap" || discard == "on";
  if (*driver == "file" || *driver == "host_device") {
    const std::optional<std::string> filename = args.string("filename", true);
    args.string("pr-manager");
    args.choice("locking", {"auto", "on", "off"});
    args.choice("aio", {"threads", "native", "io_uring"});
    args.integer("aio-max-batch");
    args.boolean("drop-cache");
    args.boolean("x-check-cache-dropped");
    if (std::optional<QmpError> error = args.finish()) co_return error;
    base::Result<block::BlockNodeRef> node =
        direct ? block::open_direct_file(*filename, read_only)
               : block::open_file(*filename, block::FileOptions{read_only, false, false});
    if (!node.ok()) {
      co_return generic_error("Could not open '" + *filename + "': " + errno_text(node.error()));
    }
    // cache.no-flush: flushes (and FUA) stop at this node, as cache=unsafe.
    entry.node = no_flush
                     ? block::wrap_flush_mode(std::move(node).value(), block::FlushMode::ignored)
                     : std::move(node).value();
    entry.filename = *filename;
  } else if (*driver == "null-co" || *driver == "null-aio") {
    const std::uint64_t size = args.size("size").value_or(std::uint64_t{1} << 30);
    args.integer("latency-ns");
    const bool read_zeroes = args.boolean("read-zeroes").value_or(false);
    if (std::optional<QmpError> error = args.finish()) co_return error;
    entry.node = std::make_shared<block::NullNode>(size, read_zeroes);
    entry.filename = args.has("size") ? "json:{\"driver\": \"" + *driver +
                                            "\", \"size\": " + std::to_string(size) + "}"
                                      : *driver + "://";
  } else if (*driver == "raw" || *driver == "qcow2" || *driver == "qed") {
    NodeEntry* file = nullptr;
    bool ignored = false;
    std::optional<QmpError> error =
        co_await child(args, "file", true, false, read_only, file, ignored);
    if (error) co_return error;
    NodeEntry* backing = nullptr;
    bool no_backing = false;
    if (*driver == "raw") {
      const std::uint64_t offset = args.size("offset").value_or(0);
      const bool sized = args.size("size").has_value();
      if ((offset != 0 || sized) && !args.error()) {
        args.set_error(generic_error("raw 'offset' and 'size' are not supported"));
      }
    } else {
      error = co_await child(args, "backing", false, true, true, backing, no_backing);
      if (error) co_return error;
      for (const char* key : {"lazy-refcounts", "pass-discard-request", "pass-discard-snapshot",
                              "pass-discard-other"}) {
        args.boolean(key);
      }
      for (const char* key :
           {"cache-size", "l2-cache-size", "l2-cache-entry-size", "refcount-cache-size"}) {
        args.size(key);
      }
      args.integer("cache-clean-interval");
      args.raw("overlap-check");
      if (args.has("encrypt") || args.has("data-file")) {
        args.raw("encrypt");
        args.raw("data-file");
        if (!args.error()) {
          args.set_error(generic_error("'encrypt' and 'data-file' are not supported yet"));
        }
      }
    }
    if (std::optional<QmpError> finished = args.finish()) co_return finished;
    const block::ImageFormat* format = block::find_format(*driver);
    block::FormatOpenOptions open;
    open.read_only = read_only;
    open.ignore_backing = no_backing;
    const std::string image_name = file->filename;
    if (backing) {
      block::BlockNodeRef backing_node = backing->node;
      open.open_backing = [backing_node](std::string, std::string)
          -> coro::Task<block::BlockResult<block::BlockNodeRef>> { co_return backing_node; };
    } else {
      open.open_backing = [image_name](std::string backing_name, std::string backing_format)
          -> coro::Task<block::BlockResult<block::BlockNodeRef>> {
        block::ChainOptions chain;
        chain.read_only = true;
        chain.open_file = [](const std::string& path, bool ro) {
          return block::open_file(path, ro);
        };
        co_return co_await block::open_image_chain(
            block::combine_backing_path(image_name, backing_name), backing_format,
            std::move(chain));
      };
    }
    block::BlockResult<block::BlockNodeRef> node =
        co_await format->open(file->node, std::move(open));
    if (!node) {
      co_return generic_error("Could not open '" + image_name + "': " + node.error().message);
    }
    entry.node = std::move(node).value();
    // The raw format opens as its file node itself; the daemon keeps a node of its own, whose
    // `file` child blockdev-reopen can change (a RawNode still passes on host_file_range).
    if (*driver == "raw") entry.node = std::make_shared<block::RawNode>(std::move(entry.node));
    entry.format = format;
    entry.filename = image_name;
    entry.children.emplace_back("file", file->name);
    if (backing) entry.children.emplace_back("backing", backing->name);
  } else if (*driver == "throttle") {
    // A filter over `file` that spends the named throttle-group object's budget.
    const std::optional<std::string> group_name = args.string("throttle-group", true);
    NodeEntry* file = nullptr;
    bool ignored = false;
    if (args.error()) co_return args.error();
    std::optional<QmpError> error =
        co_await child(args, "file", true, false, read_only, file, ignored);
    if (error) co_return error;
    if (std::optional<QmpError> finished = args.finish()) co_return finished;
    block::ThrottleGroupRef group = block::ThrottleGroupRegistry::global().find(*group_name);
    if (!group) co_return generic_error("Cannot find throttle group '" + *group_name + "'");
    entry.node = std::make_shared<block::ThrottleNode>(file->node, std::move(group));
    entry.filename = file->filename;
    entry.children.emplace_back("file", file->name);
  } else if (*driver == "blkdebug") {
    // A filter over `image` that fails the requests its inject-error rules describe. Of
    // QEMU's events only those of the request itself: read_aio, write_aio, flush_to_disk.
    NodeEntry* image = nullptr;
    bool ignored = false;
    std::optional<QmpError> error =
        co_await child(args, "image", true, false, read_only, image, ignored);
    if (error) co_return error;
    std::vector<block::BlkdebugRule> rules;
    if (const Json* list = args.raw("inject-error")) {
      if (!list->is_array()) {
        co_return generic_error("Invalid parameter type for '" + args.name_of("inject-error") +
                                "', expected: array");
      }
      for (std::size_t i = 0; i < list->size(); ++i) {
        Arguments rule_args((*list)[i], from_keyval_,
                            args.name_of("inject-error") + "[" + std::to_string(i) + "]");
        const std::optional<std::string> event = rule_args.string("event", true);
        const std::optional<std::int64_t> state = rule_args.integer("state");
        // (QEMU checks iotype after flattening the rule: its message names no path.)
        const std::optional<std::string> iotype = rule_args.string("iotype");
        const std::int64_t error_number = rule_args.integer("errno").value_or(EIO);
        const std::int64_t sector = rule_args.integer("sector").value_or(-1);
        const bool once = rule_args.boolean("once").value_or(false);
        rule_args.boolean("immediately");
        if (std::optional<QmpError> bad = rule_args.finish()) co_return bad;
        if (state && *state != 1) {  // without set-state the node stays in its first state
          co_return generic_error(
              "blkdebug states other than 1 are not supported by "
              "spindle-storaged");
        }
        block::BlkdebugRule rule;
        if (*event == "read_aio") {
          rule.op = block::BlkdebugOp::read;
        } else if (*event == "write_aio") {
          rule.op = block::BlkdebugOp::write;
        } else if (*event == "flush_to_disk") {
          rule.op = block::BlkdebugOp::flush;
        } else {
          co_return generic_error("blkdebug event '" + *event +
                                  "' is not supported by spindle-storaged");
        }
        static const std::set<std::string> kIoTypes = {"read",    "write", "write-zeroes",
                                                       "discard", "flush", "block-status"};
        if (iotype && !kIoTypes.contains(*iotype)) {
          co_return generic_error("Parameter 'iotype' does not accept value '" + *iotype + "'");
        }
        if (iotype) {
          static const std::map<std::string, block::BlkdebugOp> kOps = {
              {"read", block::BlkdebugOp::read},
              {"write", block::BlkdebugOp::write},
              {"write-zeroes", block::BlkdebugOp::write_zeroes},
              {"discard", block::BlkdebugOp::discard},
              {"flush", block::BlkdebugOp::flush}};
          const auto op = kOps.find(*iotype);
          if (op == kOps.end() || op->second != rule.op) {
            co_return generic_error("blkdebug iotype '" + *iotype + "' with event '" + *event +
                                    "' is not supported by spindle-storaged");
          }
        }
        rule.error = static_cast<int>(error_number);
        if (sector >= 0) {
          rule.offset = static_cast<std::uint64_t>(sector) * 512;
          rule.length = 1;  // as QEMU: the request must cover that sector's first byte
        }
        rule.once = once;
        rules.push_back(rule);
      }
    }
    if (args.raw("set-state")) {
      co_return generic_error("blkdebug 'set-state' is not supported by spindle-storaged");
    }
    if (args.string("config")) {
      co_return generic_error("blkdebug 'config' files are not supported by spindle-storaged");
    }
    for (const char* key : {"align", "max-transfer", "opt-write-zero", "max-write-zero",
                            "opt-discard", "max-discard"}) {
      args.integer(key);
    }
    args.raw("take-child-perms");
    args.raw("unshare-child-perms");
    if (std::optional<QmpError> finished = args.finish()) co_return finished;
    auto debug = std::make_shared<block::BlkdebugNode>(image->node);
    for (const block::BlkdebugRule& rule : rules) debug->add_rule(rule);
    entry.node = std::move(debug);
    entry.filename = image->filename;
    entry.children.emplace_back("image", image->name);
  } else if (*driver == "nbd") {
    SocketAddress address;
    if (std::optional<Arguments> server = args.object("server", true)) {
      address = read_socket_address(*server, false);
      args.finish_nested(*server);
    }
    const std::string export_name = args.string("export").value_or("");
    args.string("tls-creds");
    args.string("tls-hostname");
    args.raw("x-dirty-bitmap");
    args.integer("reconnect-delay");
    args.integer("open-timeout");
    if (std::optional<QmpError> error = args.finish()) co_return error;
    const std::string uri = address.type == "unix"
                                ? "nbd+unix:///" + export_name + "?socket=" + address.path
                                : "nbd://" + address.host + ":" + address.port + "/" + export_name;
    block::nbd::NbdOpenResult opened = co_await block::nbd::open_nbd(uri, read_only);
    if (!opened.node)
      co_return generic_error("Failed to connect to '" + uri + "': " + opened.message);
    entry.node = std::move(opened.node);
    entry.filename = uri;
  } else {
    co_return generic_error("Driver '" + *driver + "' is not supported by spindle-storaged");
  }
  if (detect_zeroes != "off") {
    entry.node =
        std::make_shared<block::DetectZeroesNode>(std::move(entry.node), detect_zeroes == "unmap");
  }
  entry.name = node_name ? *node_name : nodes_.generate_name();
  entry.generated_name = !node_name;
  name = entry.name;
  added_.push_back(name);
  nodes_.add(std::move(entry));
  co_return std::nullopt;
}

}  // namespace

bool is_well_formed_id(const std::string& name) {
  if (name.empty() || !std::isalpha(static_cast<unsigned char>(name[0]))) return false;
  for (char c : name) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '.' && c != '_')
      return false;
  }
  return true;
}

coro::Task<QmpResult> add_blockdev(NodeTable& nodes, const Json& options, bool from_keyval) {
  Request request(nodes, from_keyval);
  std::string name;
  std::optional<QmpError> error = co_await request.open(options, "", true, false, name);
  if (error) co_return *error;
  request.commit();
  co_return Json::object();
}

}  // namespace spindle::monitor
