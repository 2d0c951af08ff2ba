// read_socket_address(): QAPI's SocketAddress ({"type": "unix", "path": ...}, the command
// line's and blockdev-add's form) or SocketAddressLegacy ({"type": "unix", "data": {"path":
// ...}}, nbd-server-start's), read from the object `address` reads, with QEMU's argument
// checks. Types unix and inet are supported; vsock and fd are refused with a message.
//
// Thread-safety: a pure function over the reader.
#pragma once

#include <string>

#include "monitor/arguments.h"

namespace spindle::monitor {

struct SocketAddress {
  std::string type;  // "unix" or "inet" (empty after an error)
  std::string path;  // unix
  std::string host;  // inet
  std::string port;  // inet
};

SocketAddress read_socket_address(Arguments& address, bool legacy);

}  // namespace spindle::monitor
