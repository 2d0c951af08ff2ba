#include "io/tls_credentials.h"

#include <sys/stat.h>
#include <unistd.h>

#include <fstream>

namespace spindle::io {

namespace {

bool readable_file(const std::string& path) { return ::access(path.c_str(), R_OK) == 0; }

std::string gnutls_message(const std::string& what, int code) {
  return what + ": " + gnutls_strerror(code);
}

// X.509 suites only, or the PSK key exchanges too (GnuTLS leaves them out of NORMAL).
constexpr const char* kX509Priority = "NORMAL";
constexpr const char* kPskPriority = "NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK";

}  // namespace

TlsCredentials::~TlsCredentials() {
  if (certificate_) gnutls_certificate_free_credentials(certificate_);
  if (psk_server_) gnutls_psk_free_server_credentials(psk_server_);
  if (psk_client_) gnutls_psk_free_client_credentials(psk_client_);
  if (priority_) gnutls_priority_deinit(priority_);
}

bool TlsCredentials::init_priority(std::string& error) {
  const char* text = kind_ == Kind::psk ? kPskPriority : kX509Priority;
  const int rc = gnutls_priority_init(&priority_, text, nullptr);
  if (rc < 0) error = gnutls_message("TLS priority string", rc);
  return rc >= 0;
}

std::shared_ptr<TlsCredentials> TlsCredentials::server_x509(const std::string& directory,
                                                            bool verify_peer,
                                                            std::string& error) {
  std::shared_ptr<TlsCredentials> creds(new TlsCredentials(Role::server, Kind::x509));
  creds->verify_peer_ = verify_peer;
  const std::string ca = directory + "/ca-cert.pem";
  const std::string cert = directory + "/server-cert.pem";
  const std::string key = directory + "/server-key.pem";
  for (const std::string* path : {&cert, &key}) {
    if (!readable_file(*path)) {
      error = "TLS credentials: cannot read " + *path;
      return nullptr;
    }
  }
  if (verify_peer && !readable_file(ca)) {
    error = "TLS credentials: verifying clients needs " + ca;
    return nullptr;
  }
  int rc = gnutls_certificate_allocate_credentials(&creds->certificate_);
  if (rc < 0) {
    error = gnutls_message("TLS credentials", rc);
    return nullptr;
  }
  rc = gnutls_certificate_set_x509_key_file(creds->certificate_, cert.c_str(), key.c_str(),
                                            GNUTLS_X509_FMT_PEM);
  if (rc < 0) {
    error = gnutls_message("TLS credentials: " + cert + " / " + key, rc);
    return nullptr;
  }
  if (readable_file(ca)) {
    rc = gnutls_certificate_set_x509_trust_file(creds->certificate_, ca.c_str(),
                                                GNUTLS_X509_FMT_PEM);
    if (rc < 0) {
      error = gnutls_message("TLS credentials: " + ca, rc);
      return nullptr;
    }
  }
  if (!creds->init_priority(error)) return nullptr;
  return creds;
}

std::shared_ptr<TlsCredentials> TlsCredentials::server_psk(const std::string& key_file,
                                                           std::string& error) {
  std::shared_ptr<TlsCredentials> creds(new TlsCredentials(Role::server, Kind::psk));
  if (!readable_file(key_file)) {
    error = "TLS PSK: cannot read " + key_file;
    return nullptr;
  }
  int rc = gnutls_psk_allocate_server_credentials(&creds->psk_server_);
  if (rc < 0) {
    error = gnutls_message("TLS PSK", rc);
    return nullptr;
  }
  // GnuTLS reads psktool's "username:hexkey" format itself, at each handshake.
  rc = gnutls_psk_set_server_credentials_file(creds->psk_server_, key_file.c_str());
  if (rc < 0) {
    error = gnutls_message("TLS PSK: " + key_file, rc);
    return nullptr;
  }
  if (!creds->init_priority(error)) return nullptr;
  return creds;
}

std::shared_ptr<TlsCredentials> TlsCredentials::client_x509(const std::string& directory,
                                                            std::string& error) {
  std::shared_ptr<TlsCredentials> creds(new TlsCredentials(Role::client, Kind::x509));
  const std::string ca = directory + "/ca-cert.pem";
  const std::string cert = directory + "/client-cert.pem";
  const std::string key = directory + "/client-key.pem";
  if (!readable_file(ca)) {
    error = "TLS credentials: cannot read " + ca;
    return nullptr;
  }
  int rc = gnutls_certificate_allocate_credentials(&creds->certificate_);
  if (rc < 0) {
    error = gnutls_message("TLS credentials", rc);
    return nullptr;
  }
  rc = gnutls_certificate_set_x509_trust_file(creds->certificate_, ca.c_str(),
                                              GNUTLS_X509_FMT_PEM);
  if (rc < 0) {
    error = gnutls_message("TLS credentials: " + ca, rc);
    return nullptr;
  }
  if (readable_file(cert) && readable_file(key)) {
    rc = gnutls_certificate_set_x509_key_file(creds->certificate_, cert.c_str(), key.c_str(),
                                              GNUTLS_X509_FMT_PEM);
    if (rc < 0) {
      error = gnutls_message("TLS credentials: " + cert + " / " + key, rc);
      return nullptr;
    }
  }
  creds->verify_peer_ = true;  // a client always checks the server
  if (!creds->init_priority(error)) return nullptr;
  return creds;
}

std::shared_ptr<TlsCredentials> TlsCredentials::client_psk(const std::string& key_file,
                                                           const std::string& username,
                                                           std::string& error) {
  std::ifstream file(key_file);
  if (!file) {
    error = "TLS PSK: cannot read " + key_file;
    return nullptr;
  }
  std::string line, key;
  while (std::getline(file, line)) {
    const std::size_t colon = line.find(':');
    if (colon != std::string::npos && line.compare(0, colon, username) == 0 &&
        colon == username.size()) {
      key = line.substr(colon + 1);
      break;
    }
  }
  if (key.empty()) {
    error = "TLS PSK: no key for user '" + username + "' in " + key_file;
    return nullptr;
  }
  std::shared_ptr<TlsCredentials> creds(new TlsCredentials(Role::client, Kind::psk));
  int rc = gnutls_psk_allocate_client_credentials(&creds->psk_client_);
  if (rc < 0) {
    error = gnutls_message("TLS PSK", rc);
    return nullptr;
  }
  const gnutls_datum_t datum{reinterpret_cast<unsigned char*>(key.data()),
                             static_cast<unsigned>(key.size())};
  rc = gnutls_psk_set_client_credentials(creds->psk_client_, username.c_str(), &datum,
                                         GNUTLS_PSK_KEY_HEX);
  if (rc < 0) {
    error = gnutls_message("TLS PSK: key of '" + username + "' in " + key_file, rc);
    return nullptr;
  }
  if (!creds->init_priority(error)) return nullptr;
  return creds;
}

int TlsCredentials::apply(gnutls_session_t session, const std::string& hostname) const {
  int rc = gnutls_priority_set(session, priority_);
  if (rc < 0) return rc;
  if (kind_ == Kind::x509) {
    rc = gnutls_credentials_set(session, GNUTLS_CRD_CERTIFICATE, certificate_);
    if (rc < 0) return rc;
    if (role_ == Role::server && verify_peer_) {
      gnutls_certificate_server_set_request(session, GNUTLS_CERT_REQUIRE);
    }
    if (verify_peer_) {
      // The handshake itself fails when the peer's certificate does not verify.
      gnutls_session_set_verify_cert(session, hostname.empty() ? nullptr : hostname.c_str(), 0);
    }
    if (role_ == Role::client && !hostname.empty()) {
      rc = gnutls_server_name_set(session, GNUTLS_NAME_DNS, hostname.data(), hostname.size());
    }
    return rc < 0 ? rc : 0;
  }
  if (role_ == Role::server) return gnutls_credentials_set(session, GNUTLS_CRD_PSK, psk_server_);
  return gnutls_credentials_set(session, GNUTLS_CRD_PSK, psk_client_);
}

}  // namespace spindle::io
