#include "io/tls_session.h"

#include <cerrno>
#include <cstring>

#include <gnutls/x509.h>

namespace spindle::io {

namespace {

// Small pieces (reply headers, 4 KiB payloads) are gathered into buffers of up to this size, so
// that a 16-byte header does not become a record of its own.
constexpr std::size_t kGatherLimit = 64 * 1024;

bool retry_code(ssize_t code) { return code == GNUTLS_E_AGAIN || code == GNUTLS_E_INTERRUPTED; }

}  // namespace

std::unique_ptr<TlsSession> TlsSession::create(Channel& channel,
                                               std::shared_ptr<const TlsCredentials> credentials,
                                               const std::string& hostname,
                                               std::string& error) {
  std::unique_ptr<TlsSession> tls(new TlsSession(channel, std::move(credentials)));
  const unsigned flags =
      (tls->credentials_->role() == TlsCredentials::Role::server ? GNUTLS_SERVER : GNUTLS_CLIENT) |
      GNUTLS_NONBLOCK | GNUTLS_NO_SIGNAL;
  int rc = gnutls_init(&tls->session_, flags);
  if (rc >= 0) rc = tls->credentials_->apply(tls->session_, hostname);
  if (rc < 0) {
    error = std::string("TLS session: ") + gnutls_strerror(rc);
    return nullptr;
  }
  gnutls_transport_set_int(tls->session_, channel.fd());
  return tls;
}

TlsSession::~TlsSession() {
  if (session_) gnutls_deinit(session_);
}

int TlsSession::fail(int gnutls_code) {
  error_message_ = gnutls_strerror(gnutls_code);
  switch (gnutls_code) {
    case GNUTLS_E_PREMATURE_TERMINATION:
    case GNUTLS_E_PULL_ERROR:
    case GNUTLS_E_PUSH_ERROR:
      return -ECONNRESET;
    case GNUTLS_E_CERTIFICATE_ERROR:
    case GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR:
    case GNUTLS_E_DECRYPTION_FAILED:  // a PSK mismatch shows up as a bad record MAC
    case GNUTLS_E_NO_CERTIFICATE_FOUND:
    case GNUTLS_E_INSUFFICIENT_CREDENTIALS:
    case GNUTLS_E_WARNING_ALERT_RECEIVED:
    case GNUTLS_E_FATAL_ALERT_RECEIVED:
      return -EACCES;
    default:
      return -EPROTO;
  }
}

coro::Task<bool> TlsSession::wait_for_direction() {
  if (gnutls_record_get_direction(session_) == 1) {
    const bool ready = co_await channel_.writable();
    co_return ready;
  }
  const bool ready = co_await channel_.readable();
  co_return ready;
}

coro::Task<int> TlsSession::handshake() {
  for (;;) {
    if (channel_.closed()) co_return -ECANCELED;
    const int rc = gnutls_handshake(session_);
    if (rc == GNUTLS_E_SUCCESS) co_return 0;
    if (retry_code(rc) || !gnutls_error_is_fatal(rc)) {
      if (!retry_code(rc)) continue;  // a warning alert during the handshake: keep going
      const bool ready = co_await wait_for_direction();
      if (!ready) co_return -ECANCELED;
      continue;
    }
    co_return fail(rc);
  }
}

std::string TlsSession::psk_username() const {
  const char* name = gnutls_psk_server_get_username(session_);
  return name ? name : "";
}

std::string TlsSession::peer_certificate_dn() const {
  unsigned int count = 0;
  const gnutls_datum_t* certificates = gnutls_certificate_get_peers(session_, &count);
  if (!certificates || count == 0) return "";
  gnutls_x509_crt_t certificate;
  if (gnutls_x509_crt_init(&certificate) < 0) return "";
  std::string dn;
  if (gnutls_x509_crt_import(certificate, &certificates[0], GNUTLS_X509_FMT_DER) >= 0) {
    std::size_t size = 0;
    gnutls_x509_crt_get_dn(certificate, nullptr, &size);  // learns the size
    dn.resize(size);
    if (size == 0 || gnutls_x509_crt_get_dn(certificate, dn.data(), &size) < 0) dn.clear();
    while (!dn.empty() && dn.back() == '\0') dn.pop_back();
  }
  gnutls_x509_crt_deinit(certificate);
  return dn;
}

coro::Task<ssize_t> TlsSession::read_some(void* buffer, std::size_t size) {
  return read_records(buffer, size, false);
}

coro::Task<ssize_t> TlsSession::read_some_or_interrupt(void* buffer, std::size_t size) {
  return read_records(buffer, size, true);
}

coro::Task<ssize_t> TlsSession::read_records(void* buffer, std::size_t size, bool interruptible) {
  for (;;) {
    if (channel_.closed()) co_return -ECANCELED;
    const ssize_t n = gnutls_record_recv(session_, buffer, size);
    if (n >= 0) co_return n;  // 0: the peer sent close_notify
    if (retry_code(n)) {
      // Giving up a wait for reading loses nothing: GnuTLS keeps a partial record and resumes
      // it on the next call. (A wait to write, during a renegotiation, is not interrupted.)
      if (interruptible && gnutls_record_get_direction(session_) == 0 &&
          channel_.take_interrupt()) {
        co_return -EINTR;
      }
      const bool ready = co_await wait_for_direction();
      if (!ready) co_return -ECANCELED;
      continue;
    }
    // A peer that closes the socket without close_notify (most NBD clients after DISC, or
    // shutdown_read() here) ends the stream like a plain EOF.
    if (n == GNUTLS_E_PREMATURE_TERMINATION) co_return 0;
    if (!gnutls_error_is_fatal(static_cast<int>(n))) continue;  // e.g. a warning alert
    co_return fail(static_cast<int>(n));
  }
}

coro::Task<int> TlsSession::send_all(const std::byte* data, std::size_t size) {
  std::size_t done = 0;
  while (done < size) {
    if (channel_.closed()) co_return -ECANCELED;
    // After GNUTLS_E_AGAIN the same arguments must be passed again: `done` only moves forward
    // on success, so the retry repeats the call exactly.
    const ssize_t n = gnutls_record_send(session_, data + done, size - done);
    if (n >= 0) {
      done += static_cast<std::size_t>(n);
      continue;
    }
    if (retry_code(n)) {
      const bool ready = co_await wait_for_direction();
      if (!ready) co_return -ECANCELED;
      continue;
    }
    const int error = fail(static_cast<int>(n));
    co_return error == -ECONNRESET ? -EPIPE : error;
  }
  co_return 0;
}

coro::Task<int> TlsSession::writev_all(std::span<const iovec> vectors) {
  std::size_t staged = 0;
  for (const iovec& vector : vectors) {
    const auto* bytes = static_cast<const std::byte*>(vector.iov_base);
    if (staged > 0 && staged + vector.iov_len > kGatherLimit) {
      const int rc = co_await send_all(staging_.data(), staged);
      if (rc != 0) co_return rc;
      staged = 0;
    }
    if (vector.iov_len >= kGatherLimit) {  // big enough for full records on its own
      const int rc = co_await send_all(bytes, vector.iov_len);
      if (rc != 0) co_return rc;
      continue;
    }
    if (staging_.size() < kGatherLimit) staging_.resize(kGatherLimit);
    if (vector.iov_len > 0) std::memcpy(staging_.data() + staged, bytes, vector.iov_len);
    staged += vector.iov_len;
  }
  if (staged > 0) co_return co_await send_all(staging_.data(), staged);
  co_return 0;
}

void TlsSession::say_goodbye() noexcept {
  if (!channel_.closed()) gnutls_bye(session_, GNUTLS_SHUT_WR);
}

}  // namespace spindle::io
