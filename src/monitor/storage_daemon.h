// StorageDaemon: what spindle-storaged runs: named IoThreads, named block nodes, the NBD server
// and its exports, and the QMP commands over them with qemu-storage-daemon's names, arguments,
// replies and error classes. The command line's --blockdev, --object, --nbd-server and
// --export go through the same code as blockdev-add, object-add, nbd-server-start and
// block-export-add (their options as keyval strings or JSON).
//
// Commands: qmp_capabilities (in QmpSession), query-version, query-commands, blockdev-add,
// blockdev-del, query-named-block-nodes, object-add / object-del (iothread, tls-creds-x509,
// tls-creds-psk, throttle-group, authz-simple),
// query-iothreads, x-blockdev-set-iothread, blockdev-reopen (children only), nbd-server-start,
// nbd-server-stop,
// block-export-add, block-export-del, query-block-exports. Events: BLOCK_EXPORT_DELETED,
// SHUTDOWN (request_shutdown()).
//
// IoThreads: a graph of connected nodes lives on one context (NodeEntry::iothread), as in
// QEMU. Placing it (block-export-add's iothread, x-blockdev-set-iothread) moves the graph's
// background work (BlockBackend::move_to) and every export on it: their NBD connections
// move, between two requests, to that IoThread (Server::move_export) while clients keep
// doing I/O. An export with fixed-iothread refuses to move.
//
// The graph changes live: blockdev-reopen points a node's `file` (filters and raw) or
// `backing` (qcow2, qed) at another node inside a drained section of every export backend on
// the graphs involved (BlockNode::replace_child), e.g. to insert a throttle filter under a
// served raw node.
//
// Thread-safety: everything on the control context's thread (the QMP sessions run there);
// the NBD server's connections run on its IoThreads and only touch the nodes through their
// BlockBackends.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "aio/context.h"
#include "aio/io_thread.h"
#include "block/drivers/throttle.h"
#include "coro/task.h"
#include "export/nbd/server.h"
#include "io/socket.h"
#include "io/tls_credentials.h"
#include "monitor/arguments.h"
#include "monitor/command_table.h"
#include "monitor/node_table.h"
#include "monitor/qmp_error.h"
#include "monitor/qmp_server.h"
#include "monitor/qmp_text.h"

namespace spindle::monitor {

class StorageDaemon {
 public:
  explicit StorageDaemon(aio::Context& control);
  ~StorageDaemon();
  StorageDaemon(const StorageDaemon&) = delete;
  StorageDaemon& operator=(const StorageDaemon&) = delete;

  QmpServer& monitors() noexcept { return *monitors_; }
  const CommandTable& commands() const noexcept { return commands_; }

  // The command-line options, as their QMP commands (`from_keyval`: string values).
  coro::Task<QmpResult> blockdev_add(const Json& options, bool from_keyval);
  QmpResult object_add(const Json& options, bool from_keyval);
  // --nbd-server takes a flat SocketAddress ("addr.type=unix,addr.path=..."), nbd-server-start
  // QMP's legacy one ({"type": "unix", "data": {"path": ...}}).
  QmpResult nbd_server_start(const Json& options, bool from_keyval, bool legacy_address);
  coro::Task<QmpResult> block_export_add(const Json& options, bool from_keyval);

  // Called (on the control context) when a client asks the daemon to stop ("quit"), once.
  void set_on_quit(std::function<void()> callback) { on_quit_ = std::move(callback); }
  // Ends everything in order: monitors stop reading, SHUTDOWN is sent, exports are removed
  // (clients drained), the NBD server stops, nodes are flushed and closed (parents first),
  // IoThreads are stopped. `reason`: QEMU's ShutdownCause ("host-signal", "host-qmp-quit").
  coro::Task<void> shutdown(std::string reason);

 private:
  struct IoThreadEntry {
    std::string id;
    std::unique_ptr<aio::IoThread> thread;
    std::int64_t poll_max_ns, poll_grow, poll_shrink, aio_max_batch;
  };
  struct TlsCredsEntry {
    std::string endpoint;                                   // "server" or "client"
    std::shared_ptr<const io::TlsCredentials> credentials;  // server endpoints
  };
  struct ExportEntry {
    std::string id;
    std::string node_name;
    std::string name;  // the NBD export name
    bool fixed_iothread = false;
    std::shared_ptr<block::BlockBackend> backend;
  };

  void register_commands();
  coro::Task<QmpResult> blockdev_del(const Json& arguments);
  coro::Task<QmpResult> query_named_block_nodes(const Json& arguments);
  QmpResult object_del(const Json& arguments);
  QmpResult query_iothreads(const Json& arguments);
  coro::Task<QmpResult> set_iothread(const Json& arguments);
  coro::Task<QmpResult> blockdev_reopen(const Json& arguments);
  // The context of a placement ("" is the main loop).
  aio::Context& placement_context(const std::optional<std::string>& iothread);
  // Moves the graph around `node` and its exports to `iothread` ("": the main loop). Refused,
  // with nothing changed, when an export on the graph is fixed to another context.
  coro::Task<std::optional<QmpError>> place_graph(NodeEntry& node, const std::string& iothread);
  // Before closing removed nodes: their background work comes back to the control context.
  coro::Task<void> bring_home(const std::vector<std::unique_ptr<NodeEntry>>& removed);
  ExportEntry* find_export_entry(const std::string& id);
  coro::Task<QmpResult> nbd_server_stop(const Json& arguments);
  coro::Task<QmpResult> block_export_del(const Json& arguments);
  QmpResult query_block_exports(const Json& arguments);
  // query-named-block-nodes' BlockDeviceInfo and its ImageInfo (`flat`: no backing-image).
  coro::Task<Json> describe_node(const NodeEntry& entry, bool flat);
  coro::Task<Json> describe_image(const NodeEntry& entry, bool flat);
  NodeEntry* backing_entry(const NodeEntry& entry);
  // Removes the export (its clients, if any, are disconnected), then BLOCK_EXPORT_DELETED.
  coro::Task<void> remove_export(std::string id);
  IoThreadEntry* find_iothread(const std::string& id);
  // Whether `id` may name a new object (well formed, not taken).
  std::optional<QmpError> check_new_object_id(const std::string& id);
  QmpResult add_tls_creds(const std::string& type, const std::string& id, Arguments& args);
  QmpResult add_throttle_group(const std::string& id, Arguments& args);
  // Destroys `object` (an NBD server or an IoThread, whose destructors join threads) from the
  // control context's loop, not from the coroutine that let go of it.
  template <typename T>
  void retire(std::unique_ptr<T> object) {
    control_.run_soon(
        [shared = std::shared_ptr<T>(std::move(object))]() mutable { shared.reset(); });
  }

  aio::Context& control_;
  CommandTable commands_;
  std::unique_ptr<QmpServer> monitors_;
  std::vector<IoThreadEntry> iothreads_;
  std::map<std::string, TlsCredsEntry> tls_creds_;
  std::map<std::string, block::ThrottleGroupRef> throttle_groups_;  // throttle nodes share them
  // authz-simple objects: id -> the one identity each allows. The NBD server's connections
  // look them up at their TLS handshakes, on IoThreads: the map is shared under its mutex.
  struct AuthzTable {
    std::mutex mutex;
    std::map<std::string, std::string> identities;  // mutex
  };
  std::shared_ptr<AuthzTable> authz_ = std::make_shared<AuthzTable>();
  std::string nbd_tls_creds_;  // the running NBD server's tls-creds object
  NodeTable nodes_;
  std::unique_ptr<exports::nbd::Server> nbd_;
  std::vector<ExportEntry> exports_;
  std::function<void()> on_quit_;
  bool shutting_down_ = false;
};

}  // namespace spindle::monitor
