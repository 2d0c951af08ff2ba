// ClientConnection: one NBD client connection, from greeting to disconnect, living on one
// Context (its "home": the context that connect() ran on).
//
// Handshake (fixed newstyle only): NO_ZEROES when offered; STARTTLS first when the URI asks for
// TLS (a refusal ends the open: never clear text); STRUCTURED_REPLY; SET_META_CONTEXT
// base:allocation; GO with INFO_BLOCK_SIZE, falling back to EXPORT_NAME on ERR_UNSUP. A timer
// (uri.connect_timeout) bounds the connect and the handshake together: a peer that drops our
// SYNs, or a server that accepts but never speaks, cannot hold an open forever (-ETIMEDOUT).
//
// Transmission: each request gets a cookie and a Pending record in `in_flight_`, is sent under
// `send_mutex_` (header and WRITE payload in one writev), and then waits on its own coro::Event.
// One reply-reader coroutine per connection reads reply headers and chunks incrementally through
// the ByteStream (a coroutine read: a half-received header only suspends the reader, never the
// loop), finds the Pending by cookie, reads READ data straight into the caller's buffer,
// assembles OFFSET_DATA/OFFSET_HOLE/BLOCK_STATUS/ERROR chunks, and sets the Event on DONE, which
// resumes the request coroutine on its home (this connection's context).
//
// Failure: a protocol violation (bad magic, unknown cookie, a length over its cap, a chunk
// outside its request, a structured reply without negotiation) fails every pending request
// with -EIO, closes the channel and marks the connection dead; later requests fail with -EIO at
// once. Lengths are checked by nbd/protocol.h parsers before anything is allocated or read.
// A lost stream (EOF, reset, a failed send) does the same unless uri.reconnect_delay > 0: then
// the connection goes kReconnecting, pending requests stay in `in_flight_` (marked unsent) and
// new ones queue there too, and reconnect_loop() retries connect + handshake with backoff until
// the delay since the loss runs out. On success (same size, no advertised feature lost) it
// starts a new reader and resends every unsent request with its cookie; on expiry everything
// fails with -EIO as without the key. Resending is safe: every command is idempotent.
//
// Thread-safety: request methods (read, write, command, block_status, disconnect) may be called
// from coroutines on any context: they switch to the connection's context for their whole
// exchange and switch back before returning. Everything marked context-only is touched only by
// coroutines and callbacks on that context's thread, so it needs no lock; `send_mutex_` keeps
// two senders' bytes from interleaving across a suspension in writev, and keeps the reconnect
// loop from replacing the stream under a sender. `channel_mutex_` guards the channel_ pointer
// (replaced on reconnection) against abort() from other threads; abort() posts the close to the
// home context, the channel's owner (Channel::close() is owner-only). abort() may be called
// from any thread. `details_` is immutable after connect().
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "aio/context.h"
#include "block/drivers/nbd/uri.h"
#include "coro/event.h"
#include "coro/mutex.h"
#include "coro/task.h"
#include "io/channel.h"
#include "io/tls_credentials.h"
#include "io/tls_session.h"
#include "nbd/protocol.h"

namespace spindle::block::nbd {

// What the handshake negotiated.
struct ExportDetails {
  std::uint64_t size = 0;
  std::uint16_t flags = 0;  // NBD_FLAG_* transmission flags
  bool structured = false;  // structured replies
  bool base_allocation = false;
  std::uint32_t context_id = 0;  // base:allocation's id
  spindle::nbd::BlockSizeInfo block_size;  // defaults unless the server sent INFO_BLOCK_SIZE
  bool used_export_name = false;           // GO was unsupported
  std::string description;
};

// One extent of base:allocation status.
struct ExtentStatus {
  std::uint32_t flags = 0;  // kStateHole | kStateZero
  std::uint64_t length = 0;
};

class ClientConnection;
struct ConnectOutcome {
  std::shared_ptr<ClientConnection> connection;  // null on failure
  int error = 0;                                 // positive errno
  std::string message;
};

class ClientConnection : public std::enable_shared_from_this<ClientConnection> {
 public:
  // Connects and negotiates on the current context, which becomes the connection's home, and
  // starts the reply reader there. `credentials` is required iff uri.tls (kept for reconnects).
  static coro::Task<ConnectOutcome> connect(NbdUri uri,
                                            std::shared_ptr<const io::TlsCredentials> credentials);
  ~ClientConnection();
  ClientConnection(const ClientConnection&) = delete;
  ClientConnection& operator=(const ClientConnection&) = delete;

  const ExportDetails& details() const noexcept { return details_; }
  aio::Context& context() const noexcept { return *context_; }
  // True once the connection is dead and none of its coroutines (reader, reconnect loop) is
  // left: after abort(), disconnect() or a final failure.
  bool reader_finished() const noexcept { return finished_.load(std::memory_order_acquire); }

  // 0 or -errno. `flags`: kCmdFlag* as sent; the caller checks they were advertised.
  coro::Task<int> read(std::uint64_t offset, std::span<std::byte> buffer);
  coro::Task<int> write(std::uint64_t offset, std::span<const std::byte> buffer,
                        std::uint16_t flags);
  // FLUSH, TRIM, WRITE_ZEROES: commands without payload or data.
  coro::Task<int> command(spindle::nbd::Command command, std::uint16_t flags, std::uint64_t offset,
                          std::uint32_t length);
  // BLOCK_STATUS for base:allocation over the whole range (no REQ_ONE): the extents of the
  // first reply chunk, adjacent equal flags merged, clipped to `length`; at most kMaxExtents.
  static constexpr std::size_t kMaxExtents = 65536;
  coro::Task<int> block_status(std::uint64_t offset, std::uint32_t length,
                               std::vector<ExtentStatus>& extents);

  // Sends NBD_CMD_DISC, closes the connection and waits until its coroutines are done.
  coro::Task<void> disconnect();
  // Any thread: ends the connection without waiting; pending and later requests fail with
  // -EIO. On the home thread NBD_CMD_DISC goes out first if the socket takes it at once and no
  // request is mid-send (clear text only; TLS gets close_notify); from another thread the
  // same is posted to the home context.
  void abort() noexcept;

 private:
  enum class State { kUp, kReconnecting, kDead };

  struct Pending {
    spindle::nbd::RequestHeader header;
    std::span<const std::byte> payload;  // WRITE: kept for a resend
    std::span<std::byte> read_buffer;    // READ: where data goes
    std::vector<ExtentStatus>* extents = nullptr;  // BLOCK_STATUS: where the result goes
    // Reply progress, reset when the request is to be resent:
    std::uint64_t covered = 0;  // READ: bytes filled by data/hole chunks
    bool got_status = false;
    int result = 0;  // first error seen (-errno)
    bool sent = false;  // on the current stream
    coro::Event done;
    void reset_for_resend() noexcept {
      covered = 0;
      got_status = false;
      result = 0;
      sent = false;
      if (extents) extents->clear();
    }
  };

  ClientConnection(aio::Context& context, NbdUri uri,
                   std::shared_ptr<const io::TlsCredentials> credentials)
      : context_(&context), uri_(std::move(uri)), credentials_(std::move(credentials)) {}

  // Opens a socket and negotiates into `negotiated_`, under the connect-timeout timer: 0 or
  // -errno with error_message_ set (the URI included).
  coro::Task<int> establish();
  coro::Task<int> handshake();
  void install_channel(std::unique_ptr<io::Channel> channel) noexcept;
  void close_channel() noexcept;  // any thread
  void start_reader();
  coro::Task<int> send_bytes(const std::vector<std::byte>& bytes);
  // Reads one option reply for `option` into reply_header_ / reply_data_: 0 or -errno.
  coro::Task<int> read_option_reply(spindle::nbd::Option option);
  int handshake_error(int error, std::string message);
  std::string reply_error_text() const;

  coro::Task<int> submit(Pending& pending, std::span<const std::byte> payload);
  coro::Task<int> submit_here(Pending& pending, std::span<const std::byte> payload);
  coro::Task<void> reader_loop(std::shared_ptr<ClientConnection> self);
  coro::Task<void> reconnect_loop(std::shared_ptr<ClientConnection> self);
  // True if what the server offers now still covers what the node relies on (details_).
  bool compatible_after_reconnect(std::string& why) const;
  // Sends every unsent pending request, oldest cookie first (send_mutex_ held).
  coro::Task<void> resend_pending();
  void goodbye_now() noexcept;  // home thread: abort()'s work
  coro::Task<int> read_simple_reply(std::span<std::byte, spindle::nbd::kChunkHeaderSize> header);
  coro::Task<int> read_chunk(std::span<std::byte, spindle::nbd::kChunkHeaderSize> header);
  void complete(Pending& pending) noexcept;
  // Ends the connection: every pending request fails with -EIO. Returns -EPROTO for callers.
  int fail_all(std::string reason);
  // The stream broke: reconnect if the URI asks for it (and we are not stopping), else
  // fail_all(). Returns -EPIPE for callers.
  int connection_lost(std::string reason);
  void maybe_finish() noexcept;

  const aio::ContextRef context_;
  const NbdUri uri_;
  const std::shared_ptr<const io::TlsCredentials> credentials_;
  ExportDetails details_;  // what the first handshake negotiated; immutable afterwards
  std::uint32_t max_chunk_ = spindle::nbd::kMaxChunkPayloadLength;
  std::atomic<bool> stopping_{false};  // abort()/disconnect(): no more reconnecting
  std::atomic<bool> finished_{false};

  std::mutex channel_mutex_;  // guards the channel_ pointer (not the channel's operations)
  std::unique_ptr<io::Channel> channel_;

  // context-only
  std::unique_ptr<io::TlsSession> tls_;  // after STARTTLS; destroyed before channel_
  io::ByteStream* stream_ = nullptr;     // channel_, or tls_ once TLS is up
  ExportDetails negotiated_;             // the latest handshake's result
  std::string error_message_;            // handshake failure text
  bool timed_out_ = false;               // the handshake timer fired
  spindle::nbd::OptionReplyHeader reply_header_;  // handshake scratch
  std::vector<std::byte> reply_data_;
  State state_ = State::kUp;
  std::unordered_map<std::uint64_t, Pending*> in_flight_;
  std::uint64_t next_cookie_ = 1;
  std::string death_reason_;
  std::int64_t lost_at_ns_ = 0;   // monotonic time of the latest loss
  bool reader_running_ = false;
  bool reconnecting_ = false;     // reconnect_loop() is running
  std::vector<std::byte> scratch_;  // reader: BLOCK_STATUS and error payloads
  coro::Mutex send_mutex_;
  coro::Event reader_exited_{true};
  coro::Event finished_event_;
};

}  // namespace spindle::block::nbd
