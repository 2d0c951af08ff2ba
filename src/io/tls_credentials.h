// TlsCredentials: what one side of a TLS connection proves itself with, loaded once and
// shared by all its sessions.
//   X.509: a directory laid out as QEMU and nbdkit expect it: ca-cert.pem, server-cert.pem and
//          server-key.pem for a server; ca-cert.pem and optionally client-cert.pem and
//          client-key.pem for a client.
//   PSK:   a file of "username:hexkey" lines, as `psktool` writes them.
// The factories return null and fill `error` with a message naming the file when something
// cannot be loaded, so a CLI can refuse to start rather than fail every handshake later.
//
// Thread-safety: immutable after the factory returns (GnuTLS credentials and priority caches
// are read-only once loaded), so one object may be used by sessions on any threads at once.
#pragma once

#include <gnutls/gnutls.h>

#include <memory>
#include <string>

namespace spindle::io {

class TlsCredentials {
 public:
  enum class Role { server, client };
  enum class Kind { x509, psk };

  // verify_peer: clients must present a certificate signed by ca-cert.pem.
  static std::shared_ptr<TlsCredentials> server_x509(const std::string& directory,
                                                     bool verify_peer, std::string& error);
  static std::shared_ptr<TlsCredentials> server_psk(const std::string& key_file,
                                                    std::string& error);
  // The server's certificate is checked against ca-cert.pem (and the host name, if given to
  // the session).
  static std::shared_ptr<TlsCredentials> client_x509(const std::string& directory,
                                                     std::string& error);
  // Uses `username`'s key from `key_file`.
  static std::shared_ptr<TlsCredentials> client_psk(const std::string& key_file,
                                                    const std::string& username,
                                                    std::string& error);

  ~TlsCredentials();
  TlsCredentials(const TlsCredentials&) = delete;
  TlsCredentials& operator=(const TlsCredentials&) = delete;

  Role role() const noexcept { return role_; }
  Kind kind() const noexcept { return kind_; }
  // Configures a new session: credentials, priorities, peer verification. GnuTLS error code.
  int apply(gnutls_session_t session, const std::string& hostname) const;

 private:
  TlsCredentials(Role role, Kind kind) : role_(role), kind_(kind) {}
  bool init_priority(std::string& error);

  const Role role_;
  const Kind kind_;
  bool verify_peer_ = false;
  gnutls_certificate_credentials_t certificate_ = nullptr;
  gnutls_psk_server_credentials_t psk_server_ = nullptr;
  gnutls_psk_client_credentials_t psk_client_ = nullptr;
  gnutls_priority_t priority_ = nullptr;
};

}  // namespace spindle::io
