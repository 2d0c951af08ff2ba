#include "export/nbd/server.h"

#include <fmt/format.h>

#include <thread>

#include "base/fatal.h"
#include "coro/coroutine.h"
#include "coro/sleep.h"
#include "export/nbd/connection.h"

namespace spindle::exports::nbd {

Server::Server(aio::Context& control, ServerOptions options, std::vector<ExportConfig> exports)
    : control_(control),
      options_(options),
      exports_(std::move(exports)),
      budget_(options.max_bytes_in_flight, options.connection_reserve_bytes) {
  if (exports_.empty()) base::fatal("nbd::Server needs at least one export");
  if (options_.tls_mode != TlsMode::off && !options_.tls_credentials) {
    base::fatal("nbd::Server: a TLS mode needs credentials");
  }
  for (std::size_t i = 0; i < exports_.size(); ++i) {
    stats_.push_back(std::make_unique<ExportStats>());
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
  for (const auto& config : exports_) {
    co_await config.backend->flush();
    co_await config.backend->root()->close();
  }
}

std::string Server::stats_report() const {
  std::string report;
  for (std::size_t i = 0; i < exports_.size(); ++i) {
    report += fmt::format("export '{}': {}\n", exports_[i].name, stats_[i]->report());
  }
  return report;
}

}  // namespace spindle::exports::nbd
