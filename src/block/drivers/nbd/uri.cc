#include "block/drivers/nbd/uri.h"

#include <charconv>

namespace spindle::block::nbd {

namespace {

struct Scheme {
  std::string_view prefix;
  bool tls;
  bool unix_socket;
};
constexpr Scheme kSchemes[] = {
    {"nbd://", false, false},
    {"nbds://", true, false},
    {"nbd+unix://", false, true},
    {"nbds+unix://", true, true},
};

int hex_value(char c) noexcept {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// Percent-decoding; false for a malformed escape or a decoded NUL (never valid in a name).
bool decode(std::string_view text, std::string& out) {
  out.clear();
  for (std::size_t i = 0; i < text.size(); ++i) {
    if (text[i] != '%') {
      out.push_back(text[i]);
      continue;
    }
    if (i + 2 >= text.size()) return false;  // needs two hex digits
    const int high = hex_value(text[i + 1]);
    const int low = hex_value(text[i + 2]);
    if (high < 0 || low < 0) return false;
    const char decoded = static_cast<char>(high * 16 + low);
    if (decoded == '\0') return false;
    out.push_back(decoded);
    i += 2;
  }
  return true;
}

// A duration in seconds, 0..kMaxSeconds, decimal fraction allowed.
bool parse_seconds(const std::string& value, double& seconds) {
  const auto [end, ec] = std::from_chars(value.data(), value.data() + value.size(), seconds,
                                         std::chars_format::fixed);
  return ec == std::errc() && end == value.data() + value.size() && seconds >= 0.0 &&
         seconds <= kMaxSeconds;
}

std::optional<NbdUri> failure(std::string& error, std::string_view text, std::string message) {
  error = "invalid NBD URI '" + std::string(text) + "': " + std::move(message);
  return std::nullopt;
}

}  // namespace

bool is_nbd_uri(std::string_view text) noexcept {
  for (const Scheme& scheme : kSchemes) {
    if (text.starts_with(scheme.prefix)) return true;
  }
  return false;
}

std::optional<NbdUri> parse_nbd_uri(std::string_view text, std::string& error) {
  NbdUri uri;
  std::string_view rest;
  bool known = false;
  for (const Scheme& scheme : kSchemes) {
    if (text.starts_with(scheme.prefix)) {
      uri.tls = scheme.tls;
      uri.unix_socket = scheme.unix_socket;
      rest = text.substr(scheme.prefix.size());
      known = true;
      break;
    }
  }
  if (!known) return failure(error, text, "expected nbd://, nbds://, nbd+unix:// or nbds+unix://");
  if (rest.find('#') != std::string_view::npos) return failure(error, text, "fragments are not allowed");

  // Split authority / path / query.
  const std::size_t query_at = rest.find('?');
  const std::string_view query = query_at == std::string_view::npos ? std::string_view{}
                                                                      : rest.substr(query_at + 1);
  rest = rest.substr(0, query_at);
  const std::size_t path_at = rest.find('/');
  std::string_view authority = rest.substr(0, path_at);
  const std::string_view path =
      path_at == std::string_view::npos ? std::string_view{} : rest.substr(path_at + 1);

  if (!decode(path, uri.export_name)) return failure(error, text, "bad percent-escape in the export name");
  if (uri.export_name.size() > 4096) return failure(error, text, "export name longer than 4096 bytes");

  const std::size_t at = authority.rfind('@');
  if (at != std::string_view::npos) {
    if (!decode(authority.substr(0, at), uri.user) || uri.user.empty() ||
        uri.user.find(':') != std::string::npos) {
      return failure(error, text, "bad user name (user@ is the TLS PSK username; no password)");
    }
    authority = authority.substr(at + 1);
  }

  if (uri.unix_socket) {
    if (!authority.empty()) {
      return failure(error, text, "a Unix-socket URI has no host (write nbd+unix:///EXPORT?socket=PATH)");
    }
  } else {
    std::string_view port_text;
    if (authority.starts_with('[')) {
      const std::size_t close = authority.find(']');
      if (close == std::string_view::npos) return failure(error, text, "unterminated IPv6 literal");
      uri.host = std::string(authority.substr(1, close - 1));
      const std::string_view after = authority.substr(close + 1);
      if (!after.empty()) {
        if (after.front() != ':') return failure(error, text, "junk after the IPv6 literal");
        port_text = after.substr(1);
      }
    } else {
      const std::size_t colon = authority.find(':');
      uri.host = std::string(authority.substr(0, colon));
      if (colon != std::string_view::npos) port_text = authority.substr(colon + 1);
    }
    if (uri.host.empty()) return failure(error, text, "no host name");
    if (!port_text.empty() || authority.ends_with(':')) {
      unsigned port = 0;
      const auto [end, ec] = std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
      if (ec != std::errc() || end != port_text.data() + port_text.size() || port == 0 || port > 65535) {
        return failure(error, text, "bad port '" + std::string(port_text) + "'");
      }
      uri.port = static_cast<std::uint16_t>(port);
    }
  }

  // Query: key=value pairs separated by '&' (or ';').
  std::string_view remaining = query;
  while (!remaining.empty()) {
    const std::size_t end = remaining.find_first_of("&;");
    const std::string_view pair = remaining.substr(0, end);
    remaining = end == std::string_view::npos ? std::string_view{} : remaining.substr(end + 1);
    if (pair.empty()) continue;
    const std::size_t equals = pair.find('=');
    if (equals == std::string_view::npos) {
      return failure(error, text, "query parameter '" + std::string(pair) + "' has no value");
    }
    const std::string_view key = pair.substr(0, equals);
    std::string value;
    if (!decode(pair.substr(equals + 1), value)) {
      return failure(error, text, "bad percent-escape in '" + std::string(key) + "'");
    }
    if (key == "socket") {
      if (!uri.unix_socket) return failure(error, text, "socket= needs nbd+unix:// or nbds+unix://");
      uri.socket_path = std::move(value);
    } else if (key == "tls-certificates") {
      uri.tls_certificates = std::move(value);
    } else if (key == "tls-psk-file") {
      uri.tls_psk_file = std::move(value);
    } else if (key == "connections") {
      unsigned count = 0;
      const auto [ptr, ec] = std::from_chars(value.data(), value.data() + value.size(), count);
      if (ec != std::errc() || ptr != value.data() + value.size() || count < 1 ||
          count > kMaxConnections) {
        return failure(error, text, "connections must be 1.." + std::to_string(kMaxConnections));
      }
      uri.connections = count;
    } else if (key == "connect-timeout" || key == "reconnect-delay") {
      double& target = key == "connect-timeout" ? uri.connect_timeout : uri.reconnect_delay;
      if (!parse_seconds(value, target)) {
        return failure(error, text, std::string(key) + " must be 0..86400 seconds");
      }
    } else {
      return failure(error, text, "unknown query parameter '" + std::string(key) + "'");
    }
  }

  if (uri.unix_socket && uri.socket_path.empty()) {
    return failure(error, text, "missing ?socket=PATH");
  }
  const bool has_tls_keys = !uri.tls_certificates.empty() || !uri.tls_psk_file.empty();
  if (!uri.tls && has_tls_keys) {
    return failure(error, text, "TLS parameters need nbds:// or nbds+unix://");
  }
  if (uri.tls && !has_tls_keys) {
    return failure(error, text, "nbds needs tls-certificates=DIR or tls-psk-file=FILE");
  }
  if (!uri.tls_certificates.empty() && !uri.tls_psk_file.empty()) {
    return failure(error, text, "give tls-certificates or tls-psk-file, not both");
  }
  if (!uri.user.empty() && uri.tls_psk_file.empty()) {
    return failure(error, text, "user@ is only meaningful with tls-psk-file");
  }
  return uri;
}

std::string describe(const NbdUri& uri) {
  std::string text = uri.tls ? "nbds" : "nbd";
  if (uri.unix_socket) return text + "+unix:///" + uri.export_name + "?socket=" + uri.socket_path;
  const bool v6 = uri.host.find(':') != std::string::npos;
  return text + "://" + (v6 ? "[" + uri.host + "]" : uri.host) + ":" + std::to_string(uri.port) +
         "/" + uri.export_name;
}

}  // namespace spindle::block::nbd
