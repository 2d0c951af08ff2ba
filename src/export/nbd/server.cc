#include "export/nbd/server.h"

#include <fmt/format.h>

#include <cerrno>
#include <thread>

#include "base/fatal.h"
#include "coro/coroutine.h"
#include "coro/sleep.h"
#include "export/nbd/connection.h"

namespace spindle::exports::nbd {

Server::Server(aio::Context& control, ServerOptions options, std::vector<ExportConfig> exports)
    : control_(control),
      options_(options),
      budget_(options.max_bytes_in_flight, options.connection_reserve_bytes) {
  for (ExportConfig& config : exports) {
    if (add_export(std::move(config)) != 0) base::fatal("nbd::Server: duplicate export name");
  }
  if (options_.tls_mode != TlsMode::off && !options_.tls_credentials) {
    base::fatal("nbd::Server: a TLS mode needs credentials");
  }
  std::size_t threads = options_.io_threads;
  if (threads == 0) threads = std::max(1u, std::thread::hardware_concurrency());
  for (std::size_t i = 0; i < threads; ++i) {
    io_threads_.push_back(std::make_unique<aio::IoThread>(fmt::format("nbd-io-{}", i)));
  }
}

Server::~Server() {
  if (active_.load() != 0) base::fatal("nbd::Server destroyed with open connections");
  listeners_.clear();
  io_threads_.clear();
}

void Server::listen(std::unique_ptr<io::Listener> listener) {
  io::Listener& ref = *listener;
  listeners_.push_back(std::move(listener));
  accept_loops_.fetch_add(1);
  accept_loops_done_.reset();
  coro::spawn(control_, accept_loop(ref));
}

coro::Task<void> Server::accept_loop(io::Listener& listener) {
  while (!stopping_.load()) {
    auto connection = co_await listener.accept();
    if (!connection) {
      if (connection.error() == ECANCELED || stopping_.load()) break;
      // EMFILE and friends: back off instead of spinning, keep serving the others.
      co_await coro::sleep(std::chrono::milliseconds(100));
      continue;
    }
    // Evicted connections are on their way out: they no longer count.
    if (active_.load() - evicted_.load() >= options_.max_connections &&
        !evict_oldest_handshake()) {
      continue;  // dropped: closes at once
    }
    start_connection(std::move(connection.value()));
  }
  if (accept_loops_.fetch_sub(1) == 1) accept_loops_done_.set();
}

void Server::serve(std::unique_ptr<io::Channel> channel) { start_connection(std::move(channel)); }

bool Server::evict_oldest_handshake() {
  std::lock_guard lock(connections_mutex_);
  Connection* oldest = nullptr;
  for (const auto& connection : connections_) {
    if (!connection->in_handshake() || evicted_connections_.contains(connection.get())) continue;
    if (!oldest || connection->serial() < oldest->serial()) oldest = connection.get();
  }
  if (!oldest || !oldest->stop(std::chrono::nanoseconds(0))) return false;
  evicted_connections_.insert(oldest);
  evicted_.fetch_add(1);
  return true;
}

void Server::start_connection(std::unique_ptr<io::Channel> channel) {
  channel->detach();  // it moves to the connection's IoThread
  aio::IoThread& thread = *io_threads_[next_thread_.fetch_add(1) % io_threads_.size()];
  auto connection = std::make_shared<Connection>(*this, std::move(channel), thread.context(),
                                                 accepted_.load());
  {
    std::lock_guard lock(connections_mutex_);
    connections_.insert(connection);
  }
  if (active_.fetch_add(1) == 0) all_closed_.reset();
  accepted_.fetch_add(1);
  coro::spawn(thread.context(), [](Server& server, std::shared_ptr<Connection> self) -> coro::Task<void> {
    co_await self->run();
    server.connection_finished(self.get());
  }(*this, std::move(connection)));
}

void Server::connection_finished(Connection* connection) {
  std::shared_ptr<Connection> last_reference;  // released outside the lock
  {
    std::lock_guard lock(connections_mutex_);
    if (evicted_connections_.erase(connection) != 0) evicted_.fetch_sub(1);
    for (auto it = connections_.begin(); it != connections_.end(); ++it) {
      if (it->get() == connection) {
        last_reference = *it;
        connections_.erase(it);
        break;
      }
    }
  }
  if (active_.fetch_sub(1) == 1) {
    all_closed_.set();
    if (on_idle_) control_.run_soon([this] { if (active_.load() == 0 && on_idle_) on_idle_(); });
  }
}

coro::Task<void> Server::shutdown() {
  stopping_.store(true);
  for (auto& listener : listeners_) listener->close();  // ends the accept loops
  if (accept_loops_.load() > 0) co_await accept_loops_done_.wait();
  {
    std::lock_guard lock(connections_mutex_);
    for (const auto& connection : connections_) connection->stop(options_.drain_timeout);
  }
  co_await all_closed_.wait();
  for (const ExportConfig& config : exports()) {
    co_await config.backend->flush();
    if (options_.close_exports_on_shutdown) co_await config.backend->root()->close();
  }
}

int Server::add_export(ExportConfig config) {
  std::lock_guard lock(exports_mutex_);
  for (const auto& served : exports_) {
    if (served->config.name == config.name) return -EEXIST;
  }
  exports_.push_back(std::make_shared<ServedExport>(std::move(config)));
  return 0;
}

coro::Task<int> Server::remove_export(std::string name, bool hard) {
  std::shared_ptr<ServedExport> removed;
  {
    std::lock_guard lock(exports_mutex_);
    for (auto it = exports_.begin(); it != exports_.end(); ++it) {
      if ((*it)->config.name != name) continue;
      if (!hard && (*it)->connections > 0) co_return -EBUSY;
      removed = *it;
      removed->removed = true;  // claim_export() refuses it from now on
      exports_.erase(it);
      break;
    }
  }
  if (!removed) co_return -ENOENT;
  if (hard) {
    // Every connection that claimed it did so before the erase above (under exports_mutex_),
    // so its selected_export() is visible here.
    std::lock_guard lock(connections_mutex_);
    for (const auto& connection : connections_) {
      if (connection->selected_export() == removed.get()) {
        connection->stop(options_.drain_timeout);
      }
    }
  }
  co_await removed->unused.wait();
  const int flushed = co_await removed->config.backend->flush();
  co_return flushed < 0 ? flushed : 0;
}

coro::Task<int> Server::move_export(std::string name, aio::Context& target) {
  auto one_at_a_time = co_await move_mutex_.scoped_lock();
  std::shared_ptr<ServedExport> served;
  {
    std::lock_guard lock(exports_mutex_);
    for (const auto& candidate : exports_) {
      if (candidate->config.name == name) served = candidate;
    }
    if (!served) co_return -ENOENT;
    // From here on a connection that claims the export learns the new home itself; every one
    // that claimed it before is in connections_ with selected_export() set (claim_export).
    served->home = &target;
  }
  std::vector<std::shared_ptr<Connection>> moving;
  {
    std::lock_guard lock(connections_mutex_);
    for (const auto& connection : connections_) {
      if (connection->selected_export() != served.get()) continue;
      connection->request_move(target);
      moving.push_back(connection);
    }
  }
  for (const auto& connection : moving) {
    for (;;) {
      connection->moved.reset();  // before the check: a move or end after it sets it again
      if (connection->ended() || connection->home() == &target) break;
      co_await connection->moved.wait();
    }
  }
  co_return 0;
}

std::size_t Server::export_connections(const std::string& name) const {
  std::lock_guard lock(exports_mutex_);
  for (const auto& served : exports_) {
    if (served->config.name == name) return served->connections;
  }
  return 0;
}

std::vector<ExportConfig> Server::exports() const {
  std::lock_guard lock(exports_mutex_);
  std::vector<ExportConfig> configs;
  for (const auto& served : exports_) configs.push_back(served->config);
  return configs;
}

std::shared_ptr<ServedExport> Server::find_export(std::string_view name) const {
  std::lock_guard lock(exports_mutex_);
  for (const auto& served : exports_) {
    if (served->config.name == name) return served;
  }
  if (name.empty() && !exports_.empty()) return exports_.front();  // the default export
  return nullptr;
}

bool Server::claim_export(Connection& connection, const std::shared_ptr<ServedExport>& served) {
  std::lock_guard lock(exports_mutex_);
  if (served->removed) return false;
  if (served->connections++ == 0) served->unused.reset();
  // Under the lock, so that a move_export() either sets the home before this or finds the
  // connection after it (and asks it to move again).
  connection.set_selected_export(served.get(), served->home);
  return true;
}

void Server::release_export(ServedExport& served) {
  std::lock_guard lock(exports_mutex_);
  if (--served.connections == 0) served.unused.set();
}

std::string Server::stats_report() const {
  std::lock_guard lock(exports_mutex_);
  std::string report;
  for (const auto& served : exports_) {
    report += fmt::format("export '{}': {}\n", served->config.name, served->stats.report());
  }
  return report;
}

}  // namespace spindle::exports::nbd
