#include "monitor/socket_address.h"

#include <optional>

namespace spindle::monitor {

SocketAddress read_socket_address(Arguments& address, bool legacy) {
  SocketAddress result;
  const std::optional<std::string> type =
      address.choice("type", {"inet", "unix", "vsock", "fd"}, true);
  if (!type) return result;
  std::optional<Arguments> inner = legacy ? address.object("data", true) : std::nullopt;
  if (legacy && !inner) return result;
  Arguments& data = inner ? *inner : address;
  if (*type == "unix") {
    result.path = data.string("path", true).value_or("");
    data.boolean("abstract");
    data.boolean("tight");
  } else if (*type == "inet") {
    result.host = data.string("host", true).value_or("");
    result.port = data.string("port", true).value_or("");
    for (const char* key : {"numeric", "to", "ipv4", "ipv6", "keep-alive"}) data.raw(key);
  } else {
    for (const char* key : {"cid", "port", "str"}) data.raw(key);
    data.set_error(generic_error("address type '" + *type + "' is not supported"));
  }
  if (inner) address.finish_nested(*inner);
  if (!address.error()) result.type = *type;
  return result;
}

}  // namespace spindle::monitor
