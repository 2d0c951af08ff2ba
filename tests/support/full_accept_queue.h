// FullAcceptQueue: makes a loopback TCP listener (backlog 0, nobody accepting) drop further
// SYNs, so that a connect to it stays in progress for the kernel's minutes of retries. It fills
// the accept queue with plain sockets until one does not complete within 300 ms, and closes
// them when destroyed. Tests use it to check connect deadlines.
//
// Thread-safety: a plain value used by one test thread.
#pragma once

#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <vector>

namespace spindle::testing_support {

class FullAcceptQueue {
 public:
  explicit FullAcceptQueue(std::uint16_t port) {
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_port = htons(port);
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    for (int i = 0; i < 64; ++i) {
      const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
      if (fd < 0) return;
      sockets_.push_back(fd);
      if (::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0) continue;
      pollfd waiting{fd, POLLOUT, 0};
      if (errno == EINPROGRESS && ::poll(&waiting, 1, 300) == 0) return;  // a SYN was dropped
    }
  }
  ~FullAcceptQueue() {
    for (const int fd : sockets_) ::close(fd);
  }
  FullAcceptQueue(const FullAcceptQueue&) = delete;
  FullAcceptQueue& operator=(const FullAcceptQueue&) = delete;

 private:
  std::vector<int> sockets_;
};

}  // namespace spindle::testing_support
