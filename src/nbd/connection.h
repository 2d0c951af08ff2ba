// Connection: one NBD client, from greeting to disconnect, on one IoThread. The handshake runs
// under a timeout; transmission has a receive loop that reads request headers (and WRITE
// payloads) and starts one coroutine per request, at most `max_requests_per_connection` at a
// time; replies go out through a ReplyWriter, which never interleaves them and sends the
// replies that are ready together in one write.
//
// With TLS configured, STARTTLS layers a TlsSession over the channel and every later byte goes
// through it (`stream_`); under TlsMode::require nothing but STARTTLS and ABORT is answered
// before that.
//
// Thread-safety: everything runs on the connection's context (its channel is attached there,
// and request coroutines are spawned there and resume there); only stop_reading() is called
// from other threads. `replies_`, in_flight_ and bytes_in_flight_ are used only on that
// context.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "coro/event.h"
#include "coro/mutex.h"
#include "coro/task.h"
#include "io/channel.h"
#include "io/tls_session.h"
#include "nbd/buffer_pool.h"
#include "nbd/mapped_file_cache.h"
#include "nbd/protocol.h"
#include "nbd/reply_writer.h"

namespace spindle::nbd {

class Server;
struct ExportConfig;

class Connection : public std::enable_shared_from_this<Connection> {
 public:
  Connection(Server& server, std::unique_ptr<io::Channel> channel);
  ~Connection();

  // Runs the connection to its end on the current context (attaches the channel here).
  coro::Task<void> run();
  // Makes the receive loop see end-of-stream: requests already read still get their replies.
  void stop_reading() noexcept;

 private:
  enum class Next { keep_negotiating, transmit, close };

  coro::Task<bool> handshake();
  coro::Task<Next> handle_option(const OptionHeader& header, std::span<const std::byte> data);
  coro::Task<Next> start_tls(std::span<const std::byte> data);
  coro::Task<Next> handle_info_or_go(std::uint32_t option, std::span<const std::byte> data);
  coro::Task<Next> handle_meta_context(std::uint32_t option, std::span<const std::byte> data);
  coro::Task<bool> send_option_bytes(const std::vector<std::byte>& bytes);
  const ExportConfig* find_export(std::string_view name, std::size_t& index) const;
  std::uint16_t transmission_flags(const ExportConfig& config) const;
  void select_export(const ExportConfig& config, std::size_t index);

  coro::Task<void> transmission();
  // Reads exactly `size` bytes through a receive buffer, so that a burst of requests costs
  // one recv() instead of one per header: 0, or -errno / -ECONNRESET.
  coro::Task<int> receive(void* destination, std::size_t size);
  coro::Task<void> handle_request(RequestHeader request, ByteBuffer payload);
  coro::Task<int> handle_read(const RequestHeader& request);
  coro::Task<int> handle_block_status(const RequestHeader& request);
  coro::Task<void> send_simple(const RequestHeader& request, Error error);
  coro::Task<void> send_error(const RequestHeader& request, int errno_value);
  // Sends one reply; `tail` (a zero-copy READ's data) follows `parts` if it names a file.
  coro::Task<void> send(std::span<const iovec> parts, FileRange tail = {});

  class PageCacheRead;  // a READ reply whose data goes from the page cache to the socket
                        // without a buffer (sendfile, or writev from a mapping)

  Server& server_;
  std::unique_ptr<io::Channel> channel_;
  std::unique_ptr<io::TlsSession> tls_;  // after STARTTLS
  io::ByteStream* stream_;               // channel_, or tls_ once TLS is up
  const ExportConfig* export_ = nullptr;
  std::size_t export_index_ = 0;
  bool no_zeroes_ = false;
  bool structured_ = false;
  bool base_allocation_ = false;  // SET_META_CONTEXT selected base:allocation for export_
  const bool copy_free_reads_;    // large READs of resident pages skip the buffer (not "never")
  const bool sendfile_reads_;     // ... and leave by sendfile, not a mapping (ServerOptions)
  TransmissionPolicy policy_;

  std::vector<std::byte> receive_buffer_;
  std::size_t receive_begin_ = 0;  // unread bytes are [receive_begin_, receive_end_)
  std::size_t receive_end_ = 0;

  ReplyWriter replies_;
  MappedFileCache mapped_;
  std::shared_ptr<BufferPool> buffers_ = std::make_shared<BufferPool>();
  std::size_t in_flight_ = 0;
  std::uint64_t bytes_in_flight_ = 0;
  coro::Event slot_free_{true};
  coro::Event idle_{true};
};

}  // namespace spindle::nbd
