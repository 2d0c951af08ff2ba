// ClientConnection: one NBD client connection, from greeting to disconnect, living on one
// Context (its "home": the context that connect() ran on).
//
// Handshake (fixed newstyle only): NO_ZEROES when offered; STARTTLS first when the URI asks for
// TLS (a refusal ends the open: never clear text); STRUCTURED_REPLY; SET_META_CONTEXT
// base:allocation; GO with INFO_BLOCK_SIZE, falling back to EXPORT_NAME on ERR_UNSUP.
//
// Transmission: each request gets a cookie and a Pending record in `in_flight_`, is sent under
// `send_mutex_` (header and WRITE payload in one writev), and then waits on its own coro::Event.
// One reply-reader coroutine per connection reads reply headers and chunks incrementally through
// the ByteStream (a coroutine read: a half-received header only suspends the reader, never the
// loop), finds the Pending by cookie, reads READ data straight into the caller's buffer,
// assembles OFFSET_DATA/OFFSET_HOLE/BLOCK_STATUS/ERROR chunks, and sets the Event on DONE, which
// resumes the request coroutine on its home (this connection's context).
//
// Failure: any protocol violation (bad magic, unknown cookie, a length over its cap, a chunk
// outside its request, a structured reply without negotiation) or a lost stream fails every
// pending request with -EIO, closes the channel and marks the connection dead; later requests
// fail with -EIO at once. Lengths are checked by nbd/protocol.h parsers before anything is
// allocated or read.
//
// Thread-safety: request methods (read, write, command, block_status, disconnect) may be called
// from coroutines on any context: they switch to the connection's context for their whole
// exchange and switch back before returning. Everything below "context-only" is touched only by
// coroutines running on that context's thread, so it needs no lock; `send_mutex_` only keeps
// two senders' bytes from interleaving across a suspension in writev. abort() may be called
// from any thread (Channel::close() is thread-safe). `details_` is immutable after connect().
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
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
  // starts the reply reader there. `credentials` is required iff uri.tls.
  static coro::Task<ConnectOutcome> connect(NbdUri uri,
                                            std::shared_ptr<const io::TlsCredentials> credentials);
  ~ClientConnection();
  ClientConnection(const ClientConnection&) = delete;
  ClientConnection& operator=(const ClientConnection&) = delete;

  const ExportDetails& details() const noexcept { return details_; }
  aio::Context& context() const noexcept { return *context_; }
  // True once the reply reader has finished (after abort(), disconnect() or a failure).
  bool reader_finished() const noexcept { return reader_finished_.load(std::memory_order_acquire); }

  // 0 or -errno. `flags`: kCmdFlag* as sent; the caller checks they were advertised.
  coro::Task<int> read(std::uint64_t offset, std::span<std::byte> buffer);
  coro::Task<int> write(std::uint64_t offset, std::span<const std::byte> buffer,
                        std::uint16_t flags);
  // FLUSH, TRIM, WRITE_ZEROES: commands without payload or data.
  coro::Task<int> command(spindle::nbd::Command command, std::uint16_t flags, std::uint64_t offset,
                          std::uint32_t length);
  // BLOCK_STATUS (REQ_ONE) for base:allocation: the first extent's flags and length (extents
  // with the same flags that follow are merged).
  coro::Task<int> block_status(std::uint64_t offset, std::uint32_t length, ExtentStatus& status);

  // Sends NBD_CMD_DISC, closes the connection and waits for the reader to finish.
  coro::Task<void> disconnect();
  // Any thread: closes the channel; pending and later requests fail with -EIO.
  void abort() noexcept;

 private:
  struct Pending {
    spindle::nbd::RequestHeader header;
    std::span<std::byte> read_buffer;  // READ: where data goes
    std::uint64_t covered = 0;         // READ: bytes filled by data/hole chunks
    ExtentStatus* status = nullptr;    // BLOCK_STATUS: where the result goes
    bool got_status = false;
    int result = 0;  // first error seen (-errno)
    coro::Event done;
  };

  explicit ClientConnection(aio::Context& context) : context_(&context) {}

  coro::Task<int> handshake(const NbdUri& uri, std::shared_ptr<const io::TlsCredentials> credentials);
  coro::Task<int> send_bytes(const std::vector<std::byte>& bytes);
  // Reads one option reply for `option` into reply_header_ / reply_data_: 0 or -errno.
  coro::Task<int> read_option_reply(spindle::nbd::Option option);
  int handshake_error(int error, std::string message);
  std::string reply_error_text() const;

  coro::Task<int> submit(Pending& pending, std::span<const std::byte> payload);
  coro::Task<int> submit_here(Pending& pending, std::span<const std::byte> payload);
  coro::Task<void> reader_loop(std::shared_ptr<ClientConnection> self);
  coro::Task<int> read_simple_reply(std::span<std::byte, spindle::nbd::kChunkHeaderSize> header);
  coro::Task<int> read_chunk(std::span<std::byte, spindle::nbd::kChunkHeaderSize> header);
  void complete(Pending& pending) noexcept;
  // Ends the connection: every pending request fails with -EIO. Returns -EPROTO for callers.
  int fail_all(std::string reason);

  const aio::ContextRef context_;
  std::unique_ptr<io::Channel> channel_;
  std::unique_ptr<io::TlsSession> tls_;  // after STARTTLS; destroyed before channel_
  io::ByteStream* stream_ = nullptr;     // channel_, or tls_ once TLS is up
  ExportDetails details_;
  std::uint32_t max_chunk_ = spindle::nbd::kMaxChunkPayloadLength;
  std::string error_message_;  // handshake failure text
  std::atomic<bool> reader_finished_{false};

  // Handshake scratch (the connecting coroutine only).
  spindle::nbd::OptionReplyHeader reply_header_;
  std::vector<std::byte> reply_data_;

  // context-only
  std::unordered_map<std::uint64_t, Pending*> in_flight_;
  std::uint64_t next_cookie_ = 1;
  bool dead_ = false;
  std::string death_reason_;
  std::vector<std::byte> scratch_;  // reader: BLOCK_STATUS and error payloads
  coro::Mutex send_mutex_;
  coro::Event reader_done_;
};

}  // namespace spindle::block::nbd
