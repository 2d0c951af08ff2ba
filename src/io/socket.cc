#include "io/socket.h"

#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <optional>

#include "aio/context.h"
#include "aio/thread_pool.h"
#include "aio/timer.h"
#include "coro/run_blocking.h"
#include "coro/sleep.h"

namespace spindle::io {

namespace {

using ChannelResult = base::Result<std::unique_ptr<Channel>>;

struct AddressList {
  addrinfo* head = nullptr;
  int error = 0;  // EAI_* from getaddrinfo
  ~AddressList() {
    if (head) ::freeaddrinfo(head);
  }
};

void resolve(const std::string& host, std::uint16_t port, bool passive, bool numeric,
             AddressList& out) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = (passive ? AI_PASSIVE : 0) | (numeric ? AI_NUMERICHOST : 0) | AI_NUMERICSERV;
  const std::string service = std::to_string(port);
  out.error = ::getaddrinfo(host.empty() ? nullptr : host.c_str(), service.c_str(), &hints,
                            &out.head);
}

int errno_from_resolver(int eai_error) { return eai_error == EAI_SYSTEM ? errno : EHOSTUNREACH; }

void set_tcp_nodelay(int fd) {
  const int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

bool fill_unix_address(const std::string& path, sockaddr_un& address) {
  if (path.empty() || path.size() >= sizeof address.sun_path) return false;
  address.sun_family = AF_UNIX;
  std::memcpy(address.sun_path, path.c_str(), path.size() + 1);
  return true;
}

base::Result<std::unique_ptr<Listener>> listen_on(int fd, int backlog, std::uint16_t port,
                                                  auto&& make) {
  if (::listen(fd, backlog) < 0) {
    const int error = errno;
    ::close(fd);
    return base::Result<std::unique_ptr<Listener>>::failure(error);
  }
  return make(fd, port);
}

// Finishes a non-blocking connect on `fd`: waits for writability, then reads SO_ERROR.
coro::Task<int> complete_connect(Channel& channel) {
  const bool ready = co_await channel.writable();
  if (!ready) co_return ECANCELED;
  int error = 0;
  socklen_t length = sizeof error;
  if (::getsockopt(channel.fd(), SOL_SOCKET, SO_ERROR, &error, &length) < 0) co_return errno;
  co_return error;
}

bool past(std::int64_t deadline_ns) {
  return deadline_ns > 0 && aio::now_ns(aio::Clock::monotonic) >= deadline_ns;
}

coro::Task<ChannelResult> connect_to(const sockaddr* address, socklen_t length, int family,
                                     bool tcp, std::int64_t deadline_ns) {
  const int fd = ::socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) co_return ChannelResult::failure(errno);
  auto channel = std::make_unique<Channel>(fd);
  if (tcp) set_tcp_nodelay(fd);
  // A Unix socket whose listen backlog is full fails with EAGAIN (nothing is in progress):
  // back off briefly and try again, for up to about five seconds.
  for (int attempt = 0; ::connect(fd, address, length) < 0; ++attempt) {
    if (errno == EAGAIN && family == AF_UNIX && attempt < 5000) {
      if (past(deadline_ns)) co_return ChannelResult::failure(ETIMEDOUT);
      co_await coro::sleep(std::chrono::milliseconds(1));
      continue;
    }
    if (errno != EINPROGRESS) co_return ChannelResult::failure(errno);
    // A peer that drops our SYNs (a full accept queue, a firewall) would keep us waiting for
    // the kernel's retries, minutes: at the deadline the timer closes the socket, which ends
    // the wait (the close wakes the waiter later, never inside the timer's callback).
    bool expired = false;
    std::optional<aio::Timer> timer;
    if (deadline_ns > 0) {
      timer.emplace(*aio::current_context(), aio::Clock::monotonic, [&] {
        expired = true;
        channel->close();
      });
      timer->arm_at(deadline_ns);
    }
    const int error = co_await complete_connect(*channel);
    if (expired) co_return ChannelResult::failure(ETIMEDOUT);
    if (error != 0) co_return ChannelResult::failure(error);
    break;
  }
  co_return std::move(channel);
}

}  // namespace

base::Result<std::unique_ptr<Listener>> Listener::tcp(const std::string& host, std::uint16_t port,
                                                      int backlog) {
  AddressList addresses;
  resolve(host, port, /*passive=*/true, /*numeric=*/false, addresses);
  if (addresses.error) {
    return base::Result<std::unique_ptr<Listener>>::failure(errno_from_resolver(addresses.error));
  }
  int last_error = EADDRNOTAVAIL;
  for (addrinfo* ai = addresses.head; ai; ai = ai->ai_next) {
    const int fd = ::socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
      last_error = errno;
      continue;
    }
    const int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (::bind(fd, ai->ai_addr, ai->ai_addrlen) < 0) {
      last_error = errno;
      ::close(fd);
      continue;
    }
    sockaddr_storage bound{};
    socklen_t length = sizeof bound;
    ::getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &length);
    const std::uint16_t bound_port =
        bound.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6&>(bound).sin6_port)
                                    : ntohs(reinterpret_cast<sockaddr_in&>(bound).sin_port);
    return listen_on(fd, backlog, bound_port, [](int f, std::uint16_t p) {
      return base::Result<std::unique_ptr<Listener>>(std::unique_ptr<Listener>(new Listener(f, p)));
    });
  }
  return base::Result<std::unique_ptr<Listener>>::failure(last_error);
}

base::Result<std::unique_ptr<Listener>> Listener::unix_socket(const std::string& path,
                                                              int backlog) {
  sockaddr_un address{};
  if (!fill_unix_address(path, address)) {
    return base::Result<std::unique_ptr<Listener>>::failure(ENAMETOOLONG);
  }
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return base::Result<std::unique_ptr<Listener>>::failure(errno);
  ::unlink(path.c_str());
  if (::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) < 0) {
    const int error = errno;
    ::close(fd);
    return base::Result<std::unique_ptr<Listener>>::failure(error);
  }
  return listen_on(fd, backlog, 0, [](int f, std::uint16_t p) {
    return base::Result<std::unique_ptr<Listener>>(std::unique_ptr<Listener>(new Listener(f, p)));
  });
}

base::Result<std::unique_ptr<Listener>> Listener::adopt(int fd) {
  int listening = 0;
  socklen_t length = sizeof listening;
  if (::getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &length) < 0 || !listening) {
    return base::Result<std::unique_ptr<Listener>>::failure(EINVAL);
  }
  sockaddr_storage bound{};
  socklen_t bound_length = sizeof bound;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &bound_length);
  std::uint16_t port = 0;
  if (bound.ss_family == AF_INET) port = ntohs(reinterpret_cast<sockaddr_in&>(bound).sin_port);
  if (bound.ss_family == AF_INET6) port = ntohs(reinterpret_cast<sockaddr_in6&>(bound).sin6_port);
  return std::unique_ptr<Listener>(new Listener(fd, port));
}

coro::Task<ChannelResult> Listener::accept() {
  for (;;) {
    if (channel_.closed()) co_return ChannelResult::failure(ECANCELED);
    const int fd = ::accept4(channel_.fd(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd >= 0) {
      sockaddr_storage local{};
      socklen_t length = sizeof local;
      if (::getsockname(fd, reinterpret_cast<sockaddr*>(&local), &length) == 0 &&
          local.ss_family != AF_UNIX) {
        set_tcp_nodelay(fd);
      }
      co_return std::make_unique<Channel>(fd);
    }
    const int error = errno;
    if (error == EAGAIN || error == EINTR || error == ECONNABORTED) {
      if (error == EAGAIN) {
        const bool ready = co_await channel_.readable();
        if (!ready) co_return ChannelResult::failure(ECANCELED);
      }
      continue;
    }
    co_return ChannelResult::failure(error);  // EMFILE and friends: the caller decides
  }
}

coro::Task<ChannelResult> connect_tcp(std::string host, std::uint16_t port,
                                      std::int64_t deadline_ns) {
  auto addresses = std::make_unique<AddressList>();
  resolve(host, port, /*passive=*/false, /*numeric=*/true, *addresses);
  if (addresses->error == EAI_NONAME) {  // not a literal address: resolve on the thread pool
    addresses = std::make_unique<AddressList>();
    AddressList* target = addresses.get();
    co_await coro::run_blocking(aio::current_context()->thread_pool(), [&host, port, target] {
      resolve(host, port, false, false, *target);
    });
  }
  if (addresses->error) co_return ChannelResult::failure(errno_from_resolver(addresses->error));
  int last_error = EHOSTUNREACH;
  for (addrinfo* ai = addresses->head; ai; ai = ai->ai_next) {
    if (past(deadline_ns)) co_return ChannelResult::failure(ETIMEDOUT);
    auto result =
        co_await connect_to(ai->ai_addr, ai->ai_addrlen, ai->ai_family, true, deadline_ns);
    if (result) co_return result;
    last_error = result.error();
  }
  co_return ChannelResult::failure(last_error);
}

coro::Task<ChannelResult> connect_unix(std::string path, std::int64_t deadline_ns) {
  sockaddr_un address{};
  if (!fill_unix_address(path, address)) co_return ChannelResult::failure(ENAMETOOLONG);
  co_return co_await connect_to(reinterpret_cast<sockaddr*>(&address), sizeof address, AF_UNIX,
                                false, deadline_ns);
}

}  // namespace spindle::io
