// NBD URIs (shared/reference/nbd.md §1.15, the libnbd/QEMU conventions):
//   nbd://HOST[:PORT]/EXPORT          TCP (port 10809 by default; IPv6 literals in brackets)
//   nbd+unix:///EXPORT?socket=PATH    Unix socket
//   nbds://... and nbds+unix://...    the same with TLS, which is then mandatory
// The export name is the path without its first '/', percent-decoded ("" = default export).
// Query keys: socket=PATH (Unix only), tls-certificates=DIR (X.509: ca-cert.pem, optionally
// client-cert.pem + client-key.pem), tls-psk-file=FILE (PSK; the username is the URI's
// user@, "qemu" if none), connections=N (1..16; used only if the server allows multi-conn),
// connect-timeout=SECONDS (connect + handshake deadline; default 30, 0 = none),
// reconnect-delay=SECONDS (after a lost connection, how long requests wait while the client
// reconnects; default 0 = fail at once with -EIO). Seconds may have a fraction ("0.5").
// Unknown keys, TLS keys on a clear-text scheme and a TLS scheme without credentials are errors,
// so that a typo never silently weakens what the user asked for.
//
// Thread-safety: pure functions on values.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace spindle::block::nbd {

struct NbdUri {
  bool tls = false;
  bool unix_socket = false;
  std::string host;         // TCP only
  std::uint16_t port = 10809;
  std::string socket_path;  // Unix only
  std::string export_name;
  std::string user;              // TLS PSK username ("" = not given)
  std::string tls_certificates;  // directory, X.509
  std::string tls_psk_file;      // PSK key file
  unsigned connections = 1;
  double connect_timeout = 30.0;  // seconds; 0 = none
  double reconnect_delay = 0.0;   // seconds; 0 = no reconnection
};

inline constexpr double kMaxSeconds = 86400.0;  // bound for the two *-timeout/delay keys

inline constexpr unsigned kMaxConnections = 16;

// True if `text` starts with one of the four NBD schemes (then it is never a file name).
bool is_nbd_uri(std::string_view text) noexcept;

// The parsed URI, or nullopt with `error` set to a message naming what is wrong.
std::optional<NbdUri> parse_nbd_uri(std::string_view text, std::string& error);

// The URI without credentials' paths, for messages: "nbd+unix:///disk?socket=/tmp/s".
std::string describe(const NbdUri& uri);

}  // namespace spindle::block::nbd
