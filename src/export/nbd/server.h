// Server: serves block exports over the NBD protocol (fixed newstyle handshake; simple and
// structured replies; base:allocation block status). Each connection lives on one IoThread
// (spread round-robin); its receive loop parses request headers and starts one coroutine per
// request, so many requests are in flight per connection; replies are serialized by the
// connection's coro::Mutex. Every length is checked (protocol.h) before anything is allocated;
// bad input gets the protocol's error or a clean disconnect.
//
// Exports may be added and removed while clients are served (add_export, remove_export): a
// client selects an export by name during its handshake and keeps it until it disconnects.
// An export may have a home context (ExportConfig::home): its connections run there, and
// move_export() moves them, live, to another.
//
// Thread-safety: construct, listen(), serve(), add_export(), remove_export() and shutdown()
// from one controlling thread (the one that polls the context passed to the constructor,
// usually main_context()); connections run on the server's IoThreads. `exports_mutex_`
// protects the export list and each ServedExport's connection count; `connections_mutex_`
// the connection set (never both at once); counters are atomics.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "aio/context.h"
#include "aio/io_thread.h"
#include "block/block_backend.h"
#include "coro/event.h"
#include "coro/mutex.h"
#include "coro/task.h"
#include "export/nbd/in_flight_budget.h"
#include "export/nbd/served_export.h"
#include "io/channel.h"
#include "io/socket.h"
#include "io/tls_credentials.h"

namespace spindle::exports::nbd {

// off: STARTTLS is refused. on: clients choose (TLS or clear text). require: nothing is served
// before STARTTLS (the spec's FORCEDTLS).
enum class TlsMode { off, on, require };

// How large READs of raw file exports whose pages are cached avoid the copy into a buffer
// (see Connection and docs/spindle-nbd.md). sendfile() spares the server both copies, but then
// a client on the same machine copies from page-cache memory rather than from socket buffers
// the server just wrote (still in the CPU cache), and that copy limits it: 1 MiB reads over a
// Unix socket measured 1.44 GB/s by sendfile. For such clients a writev from a mapping of the
// file (one kernel copy) is faster. remote (default): sendfile for clients on other machines
// (TCP, not loopback), the mapping for local ones; always: sendfile for all; never: neither
// (read into a buffer, write it).
enum class ZeroCopyReads { never, remote, always };

struct ServerOptions {
  std::size_t io_threads = 0;  // 0: one per CPU
  std::chrono::milliseconds handshake_timeout{10'000};
  // Connections at once. When all are taken, a new connection replaces the oldest one still in
  // its handshake (unauthenticated clients cannot starve served ones), or is closed at once.
  std::size_t max_connections = 100;
  // Server-wide bytes that admitted requests may hold (see InFlightBudget); each connection
  // may also hold up to `connection_reserve_bytes` beyond it.
  std::uint64_t max_bytes_in_flight = 256u << 20;
  std::uint64_t connection_reserve_bytes = 1u << 20;
  // After a stop begins, replies still owed get this long before connections are closed.
  std::chrono::milliseconds drain_timeout{2'000};
  std::size_t max_requests_per_connection = 64;
  std::size_t max_name_length = 4096;
  // shutdown() flushes every export's backend, then closes its root node unless this is off
  // (a daemon that owns the nodes closes them itself).
  bool close_exports_on_shutdown = true;
  TlsMode tls_mode = TlsMode::off;
  std::shared_ptr<const io::TlsCredentials> tls_credentials;  // needed unless tls_mode is off
  // After the TLS handshake: whether the client may go on, given its identity (the X.509
  // certificate's distinguished name, or the PSK username; empty if it has none). Called on
  // the connection's thread. Unset: every client that completes the handshake.
  std::function<bool(const std::string& identity)> tls_authorize;
  ZeroCopyReads zero_copy_reads = ZeroCopyReads::remote;
};

class Connection;

class Server {
 public:
  Server(aio::Context& control, ServerOptions options, std::vector<ExportConfig> exports);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Accepts connections from `listener` (on the control context) until shutdown().
  void listen(std::unique_ptr<io::Listener> listener);
  // Serves one already-connected channel (stdin/stdout mode, socket activation, tests).
  void serve(std::unique_ptr<io::Channel> channel);

  // Stops accepting, lets connections finish the requests they have read (their replies get
  // options.drain_timeout from now, whatever the clients do), closes them, flushes and closes
  // every export. Call from a coroutine on the control context.
  coro::Task<void> shutdown();

  // Serves `config` to clients that select it from now on. -EEXIST: an export of that name
  // is served already.
  int add_export(ExportConfig config);
  // Stops offering the export named `name` to new clients and completes once no connection
  // uses it, after a flush of its backend. Safe (hard = false): -EBUSY, and nothing changes,
  // while a client uses it. Hard: those clients' connections are stopped (the requests they
  // sent get ServerOptions::drain_timeout to complete). -ENOENT: no such export.
  coro::Task<int> remove_export(std::string name, bool hard);
  // Makes `target` the export's home: the connections that use it move there (each between
  // two of its requests, once those in flight have replied; see Connection), and so do those
  // that select it later. Completes when every connection that used it has moved or ended;
  // moves run one after another. -ENOENT: no such export. `target` must be polled until then.
  // Call from a coroutine on the control context.
  coro::Task<int> move_export(std::string name, aio::Context& target);
  // How many connections use the export named `name` (0 for an unknown name).
  std::size_t export_connections(const std::string& name) const;

  // Called (on the control context) whenever the last open connection closes.
  void set_on_idle(std::function<void()> callback) { on_idle_ = std::move(callback); }

  std::size_t connection_count() const noexcept { return active_.load(); }
  std::uint64_t bytes_in_flight() const { return budget_.held(); }
  std::size_t total_connections() const noexcept { return accepted_.load(); }
  std::string stats_report() const;
  std::vector<ExportConfig> exports() const;  // those served now, in the order added

 private:
  friend class Connection;
  coro::Task<void> accept_loop(io::Listener& listener);
  void start_connection(std::unique_ptr<io::Channel> channel);
  void connection_finished(Connection* connection);
  // Stops the oldest connection still in its handshake; false if there is none.
  bool evict_oldest_handshake();
  // The export a client asks for by `name` ("" is the first one), or null.
  std::shared_ptr<ServedExport> find_export(std::string_view name) const;
  // Makes `connection` a user of `served` (and sends it to the export's home, if it has one):
  // false if it was removed meanwhile.
  bool claim_export(Connection& connection, const std::shared_ptr<ServedExport>& served);
  void release_export(ServedExport& served);

  aio::Context& control_;
  const ServerOptions options_;
  mutable std::mutex exports_mutex_;
  std::vector<std::shared_ptr<ServedExport>> exports_;  // exports_mutex_
  std::vector<std::unique_ptr<aio::IoThread>> io_threads_;
  std::vector<std::unique_ptr<io::Listener>> listeners_;
  std::atomic<std::size_t> next_thread_{0};
  std::atomic<std::size_t> active_{0};
  std::atomic<std::size_t> accepted_{0};
  std::atomic<std::size_t> evicted_{0};  // stopped by eviction, not yet finished
  std::atomic<bool> stopping_{false};
  std::atomic<int> accept_loops_{0};
  coro::Event accept_loops_done_;
  coro::Event all_closed_{true};
  std::mutex connections_mutex_;
  std::set<std::shared_ptr<Connection>> connections_;
  std::set<Connection*> evicted_connections_;  // guarded by connections_mutex_
  InFlightBudget budget_;
  coro::Mutex move_mutex_;  // move_export() calls, one at a time
  std::function<void()> on_idle_;
};

}  // namespace spindle::exports::nbd
