// TlsSession: TLS (GnuTLS) over a Channel, as a ByteStream. The NBD server starts one after
// STARTTLS on the same socket; a client uses it for nbds:// URIs.
//
// Non-blocking protocol: every GnuTLS call is tried first; on GNUTLS_E_AGAIN the coroutine
// waits for the readiness GnuTLS asked for (gnutls_record_get_direction) on the channel's
// context and tries again with the same arguments, as GnuTLS requires. GnuTLS may hold
// decrypted bytes the socket no longer shows; since a wait only follows a call that found
// nothing, no buffered record is ever left unread.
//
// Thread-safety: one reading and one writing coroutine at a time, both on the channel's
// context thread (GnuTLS keeps separate read and write state; the two coroutines interleave only
// between GnuTLS calls). handshake() runs before any read or write. The channel must outlive
// the session; closing the channel makes blocked operations return -ECANCELED.
#pragma once

#include <gnutls/gnutls.h>

#include <memory>
#include <string>
#include <vector>

#include "io/byte_stream.h"
#include "io/channel.h"
#include "io/tls_credentials.h"

namespace spindle::io {

class TlsSession final : public ByteStream {
 public:
  // `hostname`: for a client, the name the server's certificate must carry (empty: any name,
  // the CA check still applies). Null (with `error` set) if GnuTLS cannot set up a session.
  static std::unique_ptr<TlsSession> create(Channel& channel,
                                            std::shared_ptr<const TlsCredentials> credentials,
                                            const std::string& hostname, std::string& error);
  ~TlsSession() override;
  TlsSession(const TlsSession&) = delete;
  TlsSession& operator=(const TlsSession&) = delete;

  // Runs the TLS handshake: 0, or -errno (-EACCES when the peer's credentials are refused,
  // -ECONNRESET when the peer went away, -EPROTO for other TLS failures); see error_message().
  coro::Task<int> handshake();
  const std::string& error_message() const noexcept { return error_message_; }
  // The PSK username the client authenticated as, or empty.
  std::string psk_username() const;
  // The distinguished name of the peer's X.509 certificate as GnuTLS writes it
  // ("O=Spindle,CN=client", the form QEMU's authz objects match), or empty without one.
  std::string peer_certificate_dn() const;

  coro::Task<ssize_t> read_some(void* buffer, std::size_t size) override;
  coro::Task<ssize_t> read_some_or_interrupt(void* buffer, std::size_t size) override;
  coro::Task<int> writev_all(std::span<const iovec> vectors) override;

  // Sends close_notify if the socket takes it now; never waits (the peer may be gone).
  void say_goodbye() noexcept;

 private:
  TlsSession(Channel& channel, std::shared_ptr<const TlsCredentials> credentials)
      : channel_(channel), credentials_(std::move(credentials)) {}
  // Waits for the readiness the last GnuTLS call blocked on; false if the channel closed.
  coro::Task<bool> wait_for_direction();
  coro::Task<ssize_t> read_records(void* buffer, std::size_t size, bool interruptible);
  int fail(int gnutls_code);
  // Sends [data, data + size) in full as records: 0 or -errno.
  coro::Task<int> send_all(const std::byte* data, std::size_t size);

  Channel& channel_;
  const std::shared_ptr<const TlsCredentials> credentials_;
  gnutls_session_t session_ = nullptr;
  std::string error_message_;
  std::vector<std::byte> staging_;  // small pieces gathered before encryption (writer only)
};

}  // namespace spindle::io
