#include "monitor/storage_daemon.h"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <variant>

#include "block/block_backend.h"
#include "block/drivers/detect_zeroes.h"
#include "block/drivers/throttle.h"
#include "block/format_registry.h"
#include "block/image_chain.h"
#include "coro/coroutine.h"
#include "monitor/arguments.h"
#include "monitor/blockdev.h"
#include "monitor/socket_address.h"

namespace spindle::monitor {

namespace {

constexpr int kQemuMajor = 7, kQemuMinor = 2, kQemuMicro = 0;

Json version_info() {
  Json qemu = Json::object();  // members in QAPI's order: QMP text then matches QEMU's
  qemu["major"] = kQemuMajor;
  qemu["minor"] = kQemuMinor;
  qemu["micro"] = kQemuMicro;
  Json version = Json::object();
  version["qemu"] = qemu;
  version["package"] = "spindle-storaged 0.1";
  return version;
}

Json greeting() {
  Json qmp = Json::object();
  qmp["version"] = version_info();
  qmp["capabilities"] = Json::array();
  return Json{{"QMP", qmp}};
}

// QEMU 7.2's ObjectType enum (qapi/qom.json), as qemu-storage-daemon knows it.
// clang-format off
constexpr std::initializer_list<const char*> kObjectTypes = {
    "authz-list", "authz-listfile", "authz-pam", "authz-simple", "can-bus", "can-host-socketcan",
    "colo-compare", "cryptodev-backend", "cryptodev-backend-builtin", "cryptodev-vhost-user",
    "dbus-vmstate", "filter-buffer", "filter-dump", "filter-mirror", "filter-redirector",
    "filter-replay", "filter-rewriter", "input-barrier", "input-linux", "iothread", "main-loop",
    "memory-backend-epc", "memory-backend-file", "memory-backend-memfd", "memory-backend-ram",
    "pef-guest", "pr-manager-helper", "qtest", "rng-builtin", "rng-egd", "rng-random", "secret",
    "secret_keyring", "sev-guest", "thread-context", "s390-pv-guest", "throttle-group",
    "tls-creds-anon", "tls-creds-psk", "tls-creds-x509", "tls-cipher-suites", "x-remote-object",
    "x-vfio-user-server"};
// clang-format on

// A command's arguments must be empty (query-version, query-commands, ...).
std::optional<QmpError> no_arguments(const Json& arguments) {
  Arguments args(arguments, false);
  return args.finish();
}

}  // namespace

StorageDaemon::StorageDaemon(aio::Context& control) : control_(control) {
  register_commands();
  monitors_ = std::make_unique<QmpServer>(control_, commands_, greeting());
}

StorageDaemon::~StorageDaemon() = default;

StorageDaemon::IoThreadEntry* StorageDaemon::find_iothread(const std::string& id) {
  for (IoThreadEntry& entry : iothreads_) {
    if (entry.id == id) return &entry;
  }
  return nullptr;
}

void StorageDaemon::register_commands() {
  commands_.add("query-version", [](const Json& arguments) -> coro::Task<QmpResult> {
    if (std::optional<QmpError> error = no_arguments(arguments)) co_return *error;
    co_return version_info();
  });
  commands_.add("query-commands", [this](const Json& arguments) -> coro::Task<QmpResult> {
    if (std::optional<QmpError> error = no_arguments(arguments)) co_return *error;
    Json list = Json::array();
    std::vector<std::string> names = commands_.names();
    names.push_back("qmp_capabilities");
    for (const std::string& name : names) list.push_back(Json{{"name", name}});
    co_return list;
  });
  commands_.add("quit", [this](const Json& arguments) -> coro::Task<QmpResult> {
    if (std::optional<QmpError> error = no_arguments(arguments)) co_return *error;
    if (on_quit_) control_.run_soon(on_quit_);
    co_return Json::object();
  });
  commands_.add("blockdev-add", [this](const Json& arguments) -> coro::Task<QmpResult> {
    co_return co_await blockdev_add(arguments, false);
  });
  commands_.add("blockdev-del", [this](const Json& arguments) -> coro::Task<QmpResult> {
    co_return co_await blockdev_del(arguments);
  });
  commands_.add("query-named-block-nodes", [this](const Json& arguments) -> coro::Task<QmpResult> {
    co_return co_await query_named_block_nodes(arguments);
  });
  commands_.add("object-add", [this](const Json& arguments) -> coro::Task<QmpResult> {
    co_return object_add(arguments, false);
  });
  commands_.add("object-del", [this](const Json& arguments) -> coro::Task<QmpResult> {
    co_return object_del(arguments);
  });
  commands_.add("query-iothreads", [this](const Json& arguments) -> coro::Task<QmpResult> {
    co_return query_iothreads(arguments);
  });
  commands_.add("x-blockdev-set-iothread", [this](const Json& arguments) -> coro::Task<QmpResult> {
    co_return co_await set_iothread(arguments);
  });
  commands_.add("blockdev-reopen", [this](const Json& arguments) -> coro::Task<QmpResult> {
    co_return co_await blockdev_reopen(arguments);
  });
  commands_.add("nbd-server-start", [this](const Json& arguments) -> coro::Task<QmpResult> {
    co_return nbd_server_start(arguments, false, true);
  });
  commands_.add("nbd-server-stop", [this](const Json& arguments) -> coro::Task<QmpResult> {
    co_return co_await nbd_server_stop(arguments);
  });
  commands_.add("block-export-add", [this](const Json& arguments) -> coro::Task<QmpResult> {
    co_return co_await block_export_add(arguments, false);
  });
  commands_.add("block-export-del", [this](const Json& arguments) -> coro::Task<QmpResult> {
    co_return co_await block_export_del(arguments);
  });
  commands_.add("query-block-exports", [this](const Json& arguments) -> coro::Task<QmpResult> {
    co_return query_block_exports(arguments);
  });
}

// ---- block nodes ----------------------------------------------------------------------------

coro::Task<QmpResult> StorageDaemon::blockdev_add(const Json& options, bool from_keyval) {
  co_return co_await add_blockdev(nodes_, options, from_keyval);
}

namespace {

bool is_format_driver(const std::string& driver) {
  return driver == "raw" || driver == "qcow2" || driver == "qed";
}

// The child a role names now, or "".
std::string child_in_role(const NodeEntry& entry, const std::string& role) {
  for (const auto& [r, child] : entry.children) {
    if (r == role) return child;
  }
  return "";
}

}  // namespace

coro::Task<QmpResult> StorageDaemon::blockdev_reopen(const Json& arguments) {
  Arguments outer(arguments, false);
  const Json* list = outer.raw("options", true);
  if (!outer.error() && list && !list->is_array()) {
    outer.set_error(
        QmpError{"GenericError", "Invalid parameter type for 'options', expected: array", ""});
  }
  if (std::optional<QmpError> error = outer.finish()) co_return *error;
  struct Change {
    NodeEntry* node;
    std::string role;
    NodeEntry* child;  // null: none (backing only)
  };
  std::vector<Change> changes;
  for (std::size_t i = 0; i < list->size(); ++i) {
    const std::string path = "options[" + std::to_string(i) + "]";
    Arguments args((*list)[i], false, path);
    const std::optional<std::string> driver = args.string("driver", true);
    const std::optional<std::string> node_name = args.string("node-name");
    const bool has_file_role = driver && (is_format_driver(*driver) || *driver == "throttle");
    const Json* file = has_file_role ? args.raw("file", true) : nullptr;
    const Json* backing = args.raw("backing");
    // What reopen may state but not change: read back and compared with the node's.
    const std::optional<bool> read_only = args.boolean("read-only");
    const std::optional<std::string> discard =
        args.choice("discard", {"ignore", "off", "unmap", "on"});
    const std::optional<std::string> detect_zeroes =
        args.choice("detect-zeroes", {"off", "on", "unmap"});
    const std::optional<std::string> filename = args.string("filename");
    std::optional<bool> direct, no_flush;
    if (std::optional<Arguments> cache = args.object("cache")) {
      direct = cache->boolean("direct");
      no_flush = cache->boolean("no-flush");
      args.finish_nested(*cache);
    }
    for (const char* ignored : {"auto-read-only", "force-share"}) args.boolean(ignored);
    args.string("aio");
    args.string("throttle-group");
    if (std::optional<QmpError> error = args.finish()) co_return *error;
    if (!node_name) co_return generic_error("node-name not specified");
    NodeEntry* node = nodes_.find(*node_name);
    if (!node) co_return generic_error("Failed to find node with node-name='" + *node_name + "'");
    const auto unchangeable = [](const std::string& option) {
      return generic_error("Cannot change the option '" + option + "'");
    };
    if (*driver != node->driver) co_return unchangeable("driver");
    if (read_only.value_or(false) != node->read_only) co_return unchangeable("read-only");
    if (discard && (*discard == "unmap" || *discard == "on") != node->discard_unmap)
      co_return unchangeable("discard");
    if (detect_zeroes.value_or("off") != node->detect_zeroes)
      co_return unchangeable("detect-zeroes");
    if (filename && *filename != node->filename) co_return unchangeable("filename");
    if (direct.value_or(false) != node->cache_direct) co_return unchangeable("cache.direct");
    if (no_flush.value_or(false) != node->cache_no_flush) co_return unchangeable("cache.no-flush");
    const auto wanted_child = [&](const Json* value,
                                  const std::string& role) -> std::variant<NodeEntry*, QmpError> {
      if (value->is_null()) return static_cast<NodeEntry*>(nullptr);
      if (value->is_object()) return unchangeable(role + ".driver");  // a new inline node
      if (!value->is_string()) {
        return generic_error("Invalid parameter type for '" + path + "." + role +
                             "', expected: BlockdevRef or null");
      }
      const std::string name = value->get<std::string>();
      NodeEntry* child = nodes_.find(name);
      if (!child) return generic_error("Cannot find device='' nor node-name='" + name + "'");
      // A cycle: the new child is the node or one of its ancestors.
      std::vector<const NodeEntry*> up{node};
      for (std::size_t next = 0; next < up.size(); ++next) {
        if (up[next] == child) {
          return generic_error("Making '" + name + "' a " + role + " child of '" + node->name +
                               "' would create a cycle");
        }
        for (const auto& [parent, r] : up[next]->parents) {
          if (const NodeEntry* p = nodes_.find(parent)) up.push_back(p);
        }
      }
      // Two formats over one file would corrupt it (qemu's permission system refuses it too).
      for (const auto& [parent, r] : child->parents) {
        const NodeEntry* other = nodes_.find(parent);
        if (other && other != node && r == "file" && is_format_driver(other->driver)) {
          return generic_error("Permission conflict on node '" + name + "': node '" + parent +
                               "' uses it as 'file' child");
        }
      }
      return child;
    };
    if (file) {
      if (file->is_null()) co_return generic_error("Parameter '" + path + ".file' is missing");
      auto child = wanted_child(file, "file");
      if (auto* error = std::get_if<QmpError>(&child)) co_return *error;
      NodeEntry* target = std::get<NodeEntry*>(child);
      if (target->name != child_in_role(*node, "file")) {
        if (*driver == "qcow2" || *driver == "qed") co_return unchangeable("file");
        if (target->node->size() != node->node->size()) {
          co_return generic_error("Node '" + target->name + "' does not have the size of '" +
                                  node->name + "''s current file child");
        }
        changes.push_back(Change{node, "file", target});
      }
    }
    if (backing) {
      if (*driver != "qcow2" && *driver != "qed") co_return unchangeable("backing");
      auto child = wanted_child(backing, "backing");
      if (auto* error = std::get_if<QmpError>(&child)) co_return *error;
      NodeEntry* target = std::get<NodeEntry*>(child);
      if ((target ? target->name : "") != child_in_role(*node, "backing")) {
        changes.push_back(Change{node, "backing", target});
      }
    }
  }
  if (changes.empty()) co_return Json::object();

  // Every export backend that reaches a node involved is drained while the edges change.
  std::vector<NodeEntry*> involved;
  for (const Change& change : changes) {
    for (NodeEntry* member : nodes_.connected(*change.node)) involved.push_back(member);
    if (change.child) {
      for (NodeEntry* member : nodes_.connected(*change.child)) involved.push_back(member);
    }
  }
  std::vector<std::shared_ptr<block::BlockBackend>> drained;
  for (NodeEntry* member : involved) {
    for (const std::string& id : member->exports) {
      ExportEntry* exp = find_export_entry(id);
      if (exp && std::find(drained.begin(), drained.end(), exp->backend) == drained.end()) {
        drained.push_back(exp->backend);
      }
    }
  }
  for (const auto& backend : drained) co_await backend->drained_begin();
  std::vector<std::string> orphans;  // generated children no node uses any more
  std::optional<QmpError> failed;
  for (const Change& change : changes) {
    const int replaced =
        change.node->node->replace_child(change.role, change.child ? change.child->node : nullptr);
    if (replaced != 0) {  // (not expected: the checks above cover what nodes refuse)
      failed = generic_error("Cannot change the option '" + change.role + "'");
      continue;
    }
    const std::string old_name = child_in_role(*change.node, change.role);
    auto& children = change.node->children;
    children.erase(std::remove_if(children.begin(), children.end(),
                                  [&](const auto& c) { return c.first == change.role; }),
                   children.end());
    if (change.child) {
      children.emplace_back(change.role, change.child->name);
      change.child->parents.emplace_back(change.node->name, change.role);
    }
    if (NodeEntry* old_child = nodes_.find(old_name)) {
      auto& parents = old_child->parents;
      parents.erase(
          std::remove(parents.begin(), parents.end(),
                      std::pair<std::string, std::string>(change.node->name, change.role)),
          parents.end());
      if (old_child->generated_name && parents.empty()) orphans.push_back(old_name);
    }
  }
  for (const auto& backend : drained) backend->drained_end();
  if (failed) co_return *failed;
  // A child from another IoThread joins its new parent's graph there.
  for (const Change& change : changes) {
    if (change.child && change.node->iothread != change.child->iothread) {
      co_await place_graph(*change.node, change.node->iothread.value_or(""));
    }
  }
  for (const std::string& name : orphans) {
    std::vector<std::unique_ptr<NodeEntry>> removed = nodes_.remove(name);
    co_await bring_home(removed);
    for (const auto& entry : removed) co_await entry->node->close();
  }
  co_return Json::object();
}

coro::Task<QmpResult> StorageDaemon::blockdev_del(const Json& arguments) {
  Arguments args(arguments, false);
  const std::optional<std::string> name = args.string("node-name", true);
  if (std::optional<QmpError> error = args.finish()) co_return *error;
  NodeEntry* entry = nodes_.find(*name);
  if (!entry || entry->generated_name) {
    co_return generic_error("Failed to find node with node-name='" + *name + "'");
  }
  if (!entry->parents.empty()) co_return generic_error("Block device " + *name + " is in use");
  if (!entry->exports.empty()) co_return generic_error("Node " + *name + " is in use");
  std::vector<std::unique_ptr<NodeEntry>> removed = nodes_.remove(*name);
  co_await bring_home(removed);
  for (const auto& node : removed) co_await node->node->close();
  co_return Json::object();
}

coro::Task<Json> StorageDaemon::describe_image(const NodeEntry& entry, bool flat) {
  // ImageInfo, members in QAPI's order.
  Json image = Json::object();
  image["filename"] = entry.filename;
  image["format"] = entry.driver;
  block::ImageDescription description;
  const block::ImageFormat* format = entry.format;
  block::BlockNode* image_node = entry.node.get();
  // (detect-zeroes wraps the node in a filter; the format describes the node under it.)
  if (auto* detecting = dynamic_cast<block::DetectZeroesNode*>(image_node)) {
    image_node = detecting->child();
  }
  if (format) description = co_await format->describe(*image_node);
  if (format || entry.driver == "file" || entry.driver == "host_device") {
    image["dirty-flag"] = description.dirty;
  }
  struct stat st {};
  const std::uint64_t actual = (entry.driver != "nbd" && entry.driver.rfind("null", 0) != 0 &&
                                ::stat(entry.filename.c_str(), &st) == 0)
                                   ? static_cast<std::uint64_t>(st.st_blocks) * 512
                                   : 0;
  image["actual-size"] = actual;
  std::uint64_t virtual_size = entry.node->size();
  if (entry.driver == "file" || entry.driver == "host_device") {
    virtual_size = (virtual_size + 511) / 512 * 512;  // QEMU counts protocol nodes in sectors
  }
  image["virtual-size"] = virtual_size;
  if (description.cluster_size) image["cluster-size"] = description.cluster_size;
  if (!description.backing_filename.empty()) {
    image["backing-filename"] = description.backing_filename;
    image["full-backing-filename"] =
        block::combine_backing_path(entry.filename, description.backing_filename);
    if (!description.backing_format.empty()) {
      image["backing-filename-format"] = description.backing_format;
    }
  }
  if (!flat) {
    if (NodeEntry* backing = backing_entry(entry)) {
      image["backing-image"] = co_await describe_image(*backing, flat);
    }
  }
  if (!description.format_specific.is_null())
    image["format-specific"] = description.format_specific;
  co_return image;
}

NodeEntry* StorageDaemon::backing_entry(const NodeEntry& entry) {
  for (const auto& [role, child] : entry.children) {
    if (role == "backing") return nodes_.find(child);
  }
  return nullptr;
}

coro::Task<Json> StorageDaemon::describe_node(const NodeEntry& entry, bool flat) {
  // BlockDeviceInfo, members in QAPI's order.
  Json info = Json::object();
  info["file"] = entry.filename;
  info["node-name"] = entry.name;
  info["ro"] = entry.read_only;
  info["drv"] = entry.driver;
  int depth = 0;
  for (const block::BlockNode* node = entry.node->backing_node(); node;
       node = node->backing_node()) {
    ++depth;
  }
  Json image = co_await describe_image(entry, flat);
  if (image.contains("backing-filename")) info["backing_file"] = image["backing-filename"];
  info["backing_file_depth"] = depth;
  info["encrypted"] = false;
  info["detect_zeroes"] = entry.detect_zeroes;
  for (const char* key : {"bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"}) info[key] = 0;
  info["image"] = std::move(image);
  Json cache = Json::object();
  cache["writeback"] = true;
  cache["direct"] = entry.cache_direct;
  cache["no-flush"] = entry.cache_no_flush;
  info["cache"] = cache;
  info["write_threshold"] = 0;
  co_return info;
}

coro::Task<QmpResult> StorageDaemon::query_named_block_nodes(const Json& arguments) {
  Arguments args(arguments, false);
  const bool flat = args.boolean("flat").value_or(false);
  if (std::optional<QmpError> error = args.finish()) co_return *error;
  Json list = Json::array();
  const auto& entries = nodes_.entries();
  for (auto it = entries.rbegin(); it != entries.rend(); ++it) {  // newest first, as QEMU
    list.push_back(co_await describe_node(**it, flat));
  }
  co_return list;
}

// ---- IoThreads -------------------------------------------------------------------------------

aio::Context& StorageDaemon::placement_context(const std::optional<std::string>& iothread) {
  if (!iothread || iothread->empty()) return control_;
  IoThreadEntry* entry = find_iothread(*iothread);
  return entry ? entry->thread->context() : control_;  // (object-del refuses a used one)
}

StorageDaemon::ExportEntry* StorageDaemon::find_export_entry(const std::string& id) {
  for (ExportEntry& entry : exports_) {
    if (entry.id == id) return &entry;
  }
  return nullptr;
}

coro::Task<std::optional<QmpError>> StorageDaemon::place_graph(NodeEntry& node,
                                                               const std::string& iothread) {
  const std::vector<NodeEntry*> graph = nodes_.connected(node);
  aio::Context& target = placement_context(iothread);
  for (const NodeEntry* member : graph) {
    if (&placement_context(member->iothread) == &target) continue;
    for (const std::string& id : member->exports) {
      const ExportEntry* exp = find_export_entry(id);
      if (exp && exp->fixed_iothread) {
        co_return generic_error("Cannot change iothread of active block backend");
      }
    }
  }
  for (NodeEntry* member : graph) member->iothread = iothread;
  for (NodeEntry* member : graph) {
    if (member->exports.empty()) {
      // Background work of nodes no export reaches through a backend (the roots' attach
      // forwards to their children).
      if (member->parents.empty()) co_await member->node->attach_context(target);
      continue;
    }
    for (const std::string& id : member->exports) {
      ExportEntry* exp = find_export_entry(id);
      if (!exp) continue;
      co_await exp->backend->move_to(target);
      if (nbd_) co_await nbd_->move_export(exp->name, target);
    }
  }
  co_return std::nullopt;
}

coro::Task<void> StorageDaemon::bring_home(const std::vector<std::unique_ptr<NodeEntry>>& removed) {
  // remove() returns parents before their children: the first is the graph's root.
  if (!removed.empty() && removed.front()->iothread) {
    co_await removed.front()->node->attach_context(control_);
  }
}

coro::Task<QmpResult> StorageDaemon::set_iothread(const Json& arguments) {
  Arguments args(arguments, false);
  const std::optional<std::string> node_name = args.string("node-name", true);
  const Json* target = args.raw("iothread", true);
  const bool force = args.boolean("force").value_or(false);
  if (!args.error() && target && !target->is_string() && !target->is_null()) {
    args.set_error(
        QmpError{"GenericError", "Invalid parameter type for 'iothread', expected: StrOrNull", ""});
  }
  if (std::optional<QmpError> error = args.finish()) co_return *error;
  NodeEntry* node = nodes_.find(*node_name);
  if (!node) co_return generic_error("Failed to find node with node-name='" + *node_name + "'");
  // QEMU's guard against accidents: only the node's own users count, not its parents'.
  if (!force && !node->exports.empty()) {
    co_return generic_error("Node " + *node_name +
                            " is associated with a BlockBackend and could be in use (use "
                            "force=true to override this check)");
  }
  std::string iothread;
  if (target->is_string()) {
    iothread = target->get<std::string>();
    if (!find_iothread(iothread)) co_return generic_error("Cannot find iothread " + iothread);
  }
  if (std::optional<QmpError> refused = co_await place_graph(*node, iothread)) co_return *refused;
  co_return Json::object();
}

QmpResult StorageDaemon::object_add(const Json& options, bool from_keyval) {
  Arguments args(options, from_keyval);
  const std::optional<std::string> type = args.choice("qom-type", kObjectTypes, true);
  const std::optional<std::string> id = args.string("id", true);
  if (args.error()) return *args.error();
  if (*type == "tls-creds-x509" || *type == "tls-creds-psk") return add_tls_creds(*type, *id, args);
  if (*type == "throttle-group") return add_throttle_group(*id, args);
  if (*type == "authz-simple") {
    const std::optional<std::string> identity = args.string("identity", true);
    if (std::optional<QmpError> error = args.finish()) return *error;
    if (std::optional<QmpError> error = check_new_object_id(*id)) return *error;
    std::lock_guard lock(authz_->mutex);
    authz_->identities[*id] = *identity;
    return Json::object();
  }
  if (*type != "iothread") {
    args.finish();
    return generic_error("Invalid parameter 'qom-type': object type '" + *type +
                         "' is not supported by spindle-storaged");
  }
  const std::int64_t poll_max_ns = args.integer("poll-max-ns").value_or(32768);
  const std::int64_t poll_grow = args.integer("poll-grow").value_or(0);
  const std::int64_t poll_shrink = args.integer("poll-shrink").value_or(0);
  const std::int64_t aio_max_batch = args.integer("aio-max-batch").value_or(0);
  if (std::optional<QmpError> error = args.finish()) return *error;
  if (std::optional<QmpError> error = check_new_object_id(*id)) return *error;
  if (poll_max_ns < 0 || poll_grow < 0 || poll_shrink < 0 || aio_max_batch < 0) {
    return generic_error("Property value must be non-negative");
  }
  aio::Context::PollParams params{poll_max_ns, poll_grow, poll_shrink};
  iothreads_.push_back(IoThreadEntry{*id, std::make_unique<aio::IoThread>(*id, params), poll_max_ns,
                                     poll_grow, poll_shrink, aio_max_batch});
  return Json::object();
}

QmpResult StorageDaemon::add_throttle_group(const std::string& id, Arguments& args) {
  // QEMU's ThrottleGroupProperties: "limits" (ThrottleLimits) or the same members prefixed
  // "x-" at the top level; each rate's "-max" is its burst.
  block::ThrottleLimits limits;
  struct Member {
    const char* name;
    block::ThrottleRate block::ThrottleLimits::*rate;
  };
  static constexpr Member kMembers[] = {{"iops-total", &block::ThrottleLimits::iops_total},
                                        {"iops-read", &block::ThrottleLimits::iops_read},
                                        {"iops-write", &block::ThrottleLimits::iops_write},
                                        {"bps-total", &block::ThrottleLimits::bps_total},
                                        {"bps-read", &block::ThrottleLimits::bps_read},
                                        {"bps-write", &block::ThrottleLimits::bps_write}};
  auto read_rates = [&limits](Arguments& from, const std::string& prefix) {
    for (const Member& member : kMembers) {
      block::ThrottleRate& rate = limits.*member.rate;
      if (auto value = from.integer(prefix + member.name))
        rate.per_second = static_cast<double>(*value);
      if (auto value = from.integer(prefix + member.name + "-max"))
        rate.burst = static_cast<double>(*value);
      from.integer(prefix + member.name + "-max-length");
    }
    from.integer(prefix + "iops-size");
  };
  if (std::optional<Arguments> nested = args.object("limits")) {
    read_rates(*nested, "");
    args.finish_nested(*nested);
  }
  read_rates(args, "x-");
  if (std::optional<QmpError> error = args.finish()) return *error;
  if (std::optional<QmpError> error = check_new_object_id(id)) return *error;
  for (const Member& member : kMembers) {
    const block::ThrottleRate& rate = limits.*member.rate;
    if (rate.per_second < 0 || rate.burst < 0) {
      return generic_error("bps/iops/max values must be within [0, 1000000000000000]");
    }
  }
  block::ThrottleGroupRef group = block::ThrottleGroupRegistry::global().get_or_create(id, limits);
  group->set_limits(limits);
  throttle_groups_.emplace(id, std::move(group));
  return Json::object();
}

std::optional<QmpError> StorageDaemon::check_new_object_id(const std::string& id) {
  if (!is_well_formed_id(id)) {
    QmpError error = generic_error("Parameter 'id' expects an identifier");
    error.hint = "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.";
    return error;
  }
  bool authz = false;
  {
    std::lock_guard lock(authz_->mutex);
    authz = authz_->identities.contains(id);
  }
  if (authz || find_iothread(id) || tls_creds_.contains(id) || throttle_groups_.contains(id)) {
    return generic_error("attempt to add duplicate property '" + id +
                         "' to object (type 'container')");
  }
  return std::nullopt;
}

QmpResult StorageDaemon::add_tls_creds(const std::string& type, const std::string& id,
                                       Arguments& args) {
  // QEMU's tls-creds-x509 / tls-creds-psk properties; the files are QEMU's layout in `dir`
  // (ca-cert.pem, server-cert.pem, server-key.pem; keys.psk).
  const std::optional<std::string> dir = args.string("dir");
  const std::string endpoint = args.choice("endpoint", {"server", "client"}).value_or("client");
  const bool verify_peer = args.boolean("verify-peer").value_or(true);
  args.string("priority");
  args.boolean("loaded");
  if (type == "tls-creds-x509") {
    args.boolean("sanity-check");
    args.string("passwordid");
  } else {
    args.string("username");
  }
  if (std::optional<QmpError> error = args.finish()) return *error;
  if (std::optional<QmpError> error = check_new_object_id(id)) return *error;
  TlsCredsEntry entry;
  entry.endpoint = endpoint;
  if (endpoint == "server") {
    if (!dir) return generic_error("Unable to access credentials: no 'dir' given");
    std::string error;
    entry.credentials = type == "tls-creds-x509"
                            ? io::TlsCredentials::server_x509(*dir, verify_peer, error)
                            : io::TlsCredentials::server_psk(*dir + "/keys.psk", error);
    if (!entry.credentials) return generic_error(error);
  }
  tls_creds_.emplace(id, std::move(entry));
  return Json::object();
}

QmpResult StorageDaemon::object_del(const Json& arguments) {
  Arguments args(arguments, false);
  const std::optional<std::string> id = args.string("id", true);
  if (std::optional<QmpError> error = args.finish()) return *error;
  if (const auto group = throttle_groups_.find(*id); group != throttle_groups_.end()) {
    if (group->second.use_count() > 1) {  // a throttle node holds it too
      return generic_error("object '" + *id + "' is in use, can not be deleted");
    }
    throttle_groups_.erase(group);
    return Json::object();
  }
  {
    // As QEMU: deleting it while the NBD server names it leaves clients denied from then on.
    std::lock_guard lock(authz_->mutex);
    if (authz_->identities.erase(*id) != 0) return Json::object();
  }
  if (const auto creds = tls_creds_.find(*id); creds != tls_creds_.end()) {
    if (*id == nbd_tls_creds_ && nbd_) {
      return generic_error("object '" + *id + "' is in use, can not be deleted");
    }
    tls_creds_.erase(creds);
    return Json::object();
  }
  const auto it = std::find_if(iothreads_.begin(), iothreads_.end(),
                               [&](const IoThreadEntry& e) { return e.id == *id; });
  if (it == iothreads_.end()) return generic_error("object '" + *id + "' not found");
  // (qemu-storage-daemon 7.2 deletes it and aborts later.)
  for (const auto& node : nodes_.entries()) {
    if (node->iothread == *id) return generic_error("object '" + *id + "' can't be deleted");
  }
  retire(std::move(it->thread));
  iothreads_.erase(it);
  return Json::object();
}

QmpResult StorageDaemon::query_iothreads(const Json& arguments) {
  if (std::optional<QmpError> error = no_arguments(arguments)) return *error;
  Json list = Json::array();
  for (const IoThreadEntry& entry : iothreads_) {
    Json info = Json::object();
    info["id"] = entry.id;
    info["thread-id"] = entry.thread->native_thread_id();
    info["poll-max-ns"] = entry.poll_max_ns;
    info["poll-grow"] = entry.poll_grow;
    info["poll-shrink"] = entry.poll_shrink;
    info["aio-max-batch"] = entry.aio_max_batch;
    list.push_back(info);
  }
  return list;
}

// ---- NBD server and exports -----------------------------------------------------------------

QmpResult StorageDaemon::nbd_server_start(const Json& options, bool from_keyval,
                                          bool legacy_address) {
  Arguments args(options, from_keyval);
  SocketAddress address;
  if (std::optional<Arguments> addr = args.object("addr", true)) {
    address = read_socket_address(*addr, legacy_address);
    args.finish_nested(*addr);
  }
  const std::optional<std::string> tls_creds = args.string("tls-creds");
  const std::optional<std::string> tls_authz = args.string("tls-authz");
  const std::int64_t max_connections = args.integer("max-connections").value_or(0);
  if (std::optional<QmpError> error = args.finish()) return *error;
  if (nbd_) return generic_error("NBD server already running");
  std::shared_ptr<const io::TlsCredentials> credentials;
  if (tls_creds) {
    const auto it = tls_creds_.find(*tls_creds);
    if (it == tls_creds_.end())
      return generic_error("No TLS credentials with id '" + *tls_creds + "'");
    if (it->second.endpoint != "server") {
      return generic_error("Expecting TLS credentials with a server endpoint");
    }
    credentials = it->second.credentials;
  }

  if (max_connections < 0) return generic_error("max-connections must be non-negative");
  base::Result<std::unique_ptr<io::Listener>> listener =
      address.type == "unix"
          ? io::Listener::unix_socket(address.path)
          : io::Listener::tcp(address.host,
                              static_cast<std::uint16_t>(std::atoi(address.port.c_str())));
  if (!listener.ok()) {
    const std::string where =
        address.type == "unix" ? address.path : address.host + ":" + address.port;
    return generic_error("Failed to bind socket to " + where + ": " +
                         std::strerror(listener.error()));
  }
  exports::nbd::ServerOptions server_options;
  server_options.max_connections = max_connections == 0 ? std::numeric_limits<std::size_t>::max()
                                                        : static_cast<std::size_t>(max_connections);
  server_options.close_exports_on_shutdown = false;  // the daemon closes its nodes
  if (credentials) {  // as QEMU: with credentials, clients must start TLS
    server_options.tls_mode = exports::nbd::TlsMode::require;
    server_options.tls_credentials = credentials;
    if (tls_authz) {  // (without credentials QEMU ignores it too)
      server_options.tls_authorize = [table = authz_, id = *tls_authz](const std::string& who) {
        std::lock_guard lock(table->mutex);
        const auto found = table->identities.find(id);
        return found != table->identities.end() && found->second == who;
      };
    }
  }
  nbd_tls_creds_ = tls_creds.value_or("");
  nbd_ = std::make_unique<exports::nbd::Server>(control_, server_options,
                                                std::vector<exports::nbd::ExportConfig>{});
  nbd_->listen(std::move(listener).value());
  return Json::object();
}

coro::Task<QmpResult> StorageDaemon::nbd_server_stop(const Json& arguments) {
  if (std::optional<QmpError> error = no_arguments(arguments)) co_return *error;
  if (!nbd_) co_return generic_error("NBD server not running");
  std::vector<std::string> ids;
  for (const ExportEntry& exp : exports_) ids.push_back(exp.id);
  for (const std::string& id : ids) co_await remove_export(id);
  co_await nbd_->shutdown();
  retire(std::move(nbd_));
  co_return Json::object();
}

coro::Task<QmpResult> StorageDaemon::block_export_add(const Json& options, bool from_keyval) {
  Arguments args(options, from_keyval);
  const std::optional<std::string> type =
      args.choice("type", {"nbd", "vhost-user-blk", "fuse", "vduse-blk"}, true);
  const std::optional<std::string> id = args.string("id", true);
  const bool fixed_iothread = args.boolean("fixed-iothread").value_or(false);
  const std::optional<std::string> iothread = args.string("iothread");
  const std::optional<std::string> node_name = args.string("node-name", true);
  const bool writable = args.boolean("writable").value_or(false);
  args.boolean("writethrough");
  if (args.error()) co_return *args.error();
  if (*type != "nbd") {
    args.finish();
    co_return generic_error("Export type '" + *type + "' is not supported by spindle-storaged");
  }
  const std::optional<std::string> name = args.string("name");
  const std::optional<std::string> description = args.string("description");
  args.raw("bitmaps");
  args.boolean("allocation-depth");
  if (std::optional<QmpError> error = args.finish()) co_return *error;
  if (!is_well_formed_id(*id)) co_return generic_error("Invalid block export id '" + *id + "'");
  if (find_export_entry(*id)) {
    co_return generic_error("Block export id '" + *id + "' is already in use");
  }
  // QEMU's order: the node, the IoThread, then the NBD server and the export's own options.
  NodeEntry* node = nodes_.find(*node_name);
  if (!node) {
    co_return generic_error("Cannot find device='' nor node-name='" + *node_name + "'");
  }
  if (iothread && !find_iothread(*iothread)) {
    co_return generic_error("iothread \"" + *iothread + "\" not found");
  }
  if (iothread) {
    // As QEMU: the graph moves there (and stays, even if the export then fails), unless an
    // export fixed elsewhere refuses; that refusal matters only to a fixed new export, which
    // otherwise runs where the graph is.
    std::optional<QmpError> refused = co_await place_graph(*node, *iothread);
    if (refused && fixed_iothread) co_return *refused;
  }
  if (!nbd_) co_return generic_error("NBD server not running");
  const std::string export_name = name.value_or(*node_name);
  if (export_name.size() > 4096)
    co_return generic_error("export name '" + export_name + "' too long");
  if (description && description->size() > 4096) {
    co_return generic_error("description '" + *description + "' too long");
  }
  if (writable && (node->read_only || node->node->read_only())) {
    co_return generic_error("Cannot export read-only node as writable");
  }
  exports::nbd::ExportConfig config;
  config.name = export_name;
  config.description = description.value_or("");
  config.backend = std::make_shared<block::BlockBackend>(node->node);
  config.read_only = !writable;
  config.allow_unmap = node->discard_unmap;
  std::shared_ptr<block::BlockBackend> backend = config.backend;
  if (node->iothread) {
    aio::Context& home = placement_context(node->iothread);
    co_await backend->move_to(home);
    config.home = &home;
  }
  if (nbd_->add_export(std::move(config)) != 0) {
    co_return generic_error("NBD server already has export named '" + export_name + "'");
  }
  node->exports.push_back(*id);
  exports_.push_back(ExportEntry{*id, *node_name, export_name, fixed_iothread, backend});
  co_return Json::object();
}

coro::Task<void> StorageDaemon::remove_export(std::string id) {
  const auto it = std::find_if(exports_.begin(), exports_.end(),
                               [&](const ExportEntry& e) { return e.id == id; });
  if (it == exports_.end()) co_return;
  const ExportEntry entry = *it;
  exports_.erase(it);
  // Hard at the server: a safe deletion was checked for clients already, and one that
  // connected since is disconnected rather than left serving a deleted export.
  if (nbd_) co_await nbd_->remove_export(entry.name, true);
  if (NodeEntry* node = nodes_.find(entry.node_name)) {
    auto& users = node->exports;
    users.erase(std::remove(users.begin(), users.end(), entry.id), users.end());
  }
  monitors_->emit("BLOCK_EXPORT_DELETED", Json{{"id", entry.id}});
}

coro::Task<QmpResult> StorageDaemon::block_export_del(const Json& arguments) {
  Arguments args(arguments, false);
  const std::optional<std::string> id = args.string("id", true);
  const std::string mode = args.choice("mode", {"safe", "hard"}).value_or("safe");
  if (std::optional<QmpError> error = args.finish()) co_return *error;
  const ExportEntry* found = find_export_entry(*id);
  if (!found) co_return generic_error("Export '" + *id + "' is not found");
  if (mode == "safe" && nbd_ && nbd_->export_connections(found->name) > 0) {
    co_return generic_error("export '" + *id + "' still in use");
  }
  // Without clients the export goes at once and BLOCK_EXPORT_DELETED precedes the reply; a
  // hard removal of one with clients finishes after the reply (when their connections have
  // closed), and the event tells when. Both as in QEMU.
  if (nbd_ && nbd_->export_connections(found->name) > 0) {
    coro::spawn(control_, remove_export(*id));
  } else {
    co_await remove_export(*id);
  }
  co_return Json::object();
}

QmpResult StorageDaemon::query_block_exports(const Json& arguments) {
  if (std::optional<QmpError> error = no_arguments(arguments)) return *error;
  Json list = Json::array();
  for (auto it = exports_.rbegin(); it != exports_.rend(); ++it) {  // newest first, as QEMU
    const ExportEntry& exp = *it;
    Json info = Json::object();
    info["type"] = "nbd";
    info["id"] = exp.id;
    info["node-name"] = exp.node_name;
    info["shutting-down"] = false;
    list.push_back(info);
  }
  return list;
}

// ---- shutdown -------------------------------------------------------------------------------

coro::Task<void> StorageDaemon::shutdown(std::string reason) {
  if (shutting_down_) co_return;
  shutting_down_ = true;
  monitors_->emit("SHUTDOWN", Json{{"guest", false}, {"reason", reason}});
  std::vector<std::string> ids;
  for (const ExportEntry& exp : exports_) ids.push_back(exp.id);
  for (const std::string& id : ids) co_await remove_export(id);
  if (nbd_) {
    co_await nbd_->shutdown();
    retire(std::move(nbd_));
  }
  co_await monitors_->shutdown();
  // Parents before their children: newest first (a parent is added after its children).
  while (!nodes_.entries().empty()) {
    const std::string name = nodes_.entries().back()->name;
    const std::vector<std::unique_ptr<NodeEntry>> graph = nodes_.remove(name);
    co_await bring_home(graph);
    for (const auto& removed : graph) {
      co_await removed->node->flush();
      co_await removed->node->close();
    }
  }
  while (!iothreads_.empty()) {
    retire(std::move(iothreads_.back().thread));
    iothreads_.pop_back();
  }
}

}  // namespace spindle::monitor
