// Sockets: listening and connecting over TCP (IPv4 and IPv6) and Unix domain sockets, producing
// Channels. TCP sockets get TCP_NODELAY; listeners get SO_REUSEADDR. Host names are resolved on
// the calling context's thread pool (getaddrinfo blocks); numeric addresses need no resolution.
//
// Thread-safety: Listener::accept() from one coroutine at a time; the factory functions from
// any thread (connect_* from coroutines). Each Listener/Channel is owned by one party.
#pragma once

#include <sys/socket.h>

#include <cstdint>
#include <memory>
#include <string>

#include "base/result.h"
#include "coro/task.h"
#include "io/channel.h"

namespace spindle::io {

class Listener {
 public:
  // Binds and listens; port 0 picks a free port (see port()).
  static base::Result<std::unique_ptr<Listener>> tcp(const std::string& host, std::uint16_t port,
                                                     int backlog = SOMAXCONN);
  // Binds a Unix socket at `path` (an existing socket file there is replaced).
  static base::Result<std::unique_ptr<Listener>> unix_socket(const std::string& path,
                                                             int backlog = SOMAXCONN);

  // Takes over an already listening socket (socket activation). EINVAL if it is not one.
  static base::Result<std::unique_ptr<Listener>> adopt(int fd);

  // Waits for the next connection. -ECANCELED once the listener is closed.
  coro::Task<base::Result<std::unique_ptr<Channel>>> accept();

  std::uint16_t port() const noexcept { return port_; }  // TCP only
  Channel& channel() noexcept { return channel_; }
  void close() noexcept { channel_.close(); }

 private:
  // Not attached yet: accept() attaches it to the context of the coroutine that waits.
  Listener(int fd, std::uint16_t port) : channel_(fd, nullptr), port_(port) {}
  Channel channel_;
  std::uint16_t port_;
};

// Connects from a coroutine. `deadline_ns` (CLOCK_MONOTONIC, 0 = none) bounds the attempt:
// past it the connect fails with ETIMEDOUT instead of waiting out the kernel's SYN retries.
// A host name's resolution on the thread pool cannot be interrupted; the deadline is checked
// when it returns.
coro::Task<base::Result<std::unique_ptr<Channel>>> connect_tcp(std::string host,
                                                                std::uint16_t port,
                                                                std::int64_t deadline_ns = 0);
coro::Task<base::Result<std::unique_ptr<Channel>>> connect_unix(std::string path,
                                                                 std::int64_t deadline_ns = 0);

}  // namespace spindle::io
