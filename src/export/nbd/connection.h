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
// Admission: a request is started only while the connection has fewer than
// `max_requests_per_connection` in flight and holds at most kMaxBytesInFlight (one request may
// always run), and the server-wide InFlightBudget admits its cost; otherwise the receive loop
// waits (slot_free_) before reading a WRITE's payload. Every command has a cost (request_cost).
//
// Stopping: stop() (server shutdown, or eviction of a connection still in its handshake) ends
// the receive loop and arms the drain deadline at once, whatever the loop is waiting for (a
// header, a payload, admission, an inline error reply, the handshake): when it fires the
// channel is closed, which fails every blocked read and send. Once the peer is gone (a send
// failed, the channel was closed), requests not yet started are dropped, not executed.
//
// Moving: request_move() (any thread) asks the connection to make another context its home.
// The receive loop does it at its next quiet point, between requests: it stops reading, waits
// until every request in flight has replied, re-creates the drain deadline on the new context,
// attaches the channel there and switches to it; requests it starts from then on run there.
// A loop waiting for the next request is called away by Channel::interrupt_read(). An export
// with a home context (ServedExport::home) has its connections moved there when they select it.
//
// Thread-safety: everything runs on the connection's home context (its channel is attached
// there, and request coroutines are spawned there and resume there); only stop(),
// request_move(), home(), ended(), in_handshake(), serial() and selected_export() are called
// from other threads (they use atomics, Channel::shutdown_read(), Channel::interrupt_read(),
// and the drain deadline under `deadline_mutex_`). `replies_`, in_flight_, bytes_in_flight_
// and peer_gone_ are used only on the home context; a move hands them over with the switch.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

#include "aio/timer.h"
#include "base/io_buffer.h"
#include "coro/event.h"
#include "coro/mutex.h"
#include "coro/task.h"
#include "export/nbd/buffer_pool.h"
#include "export/nbd/mapped_file_cache.h"
#include "export/nbd/reply_writer.h"
#include "export/nbd/served_export.h"
#include "io/channel.h"
#include "io/tls_session.h"
#include "nbd/protocol.h"

namespace spindle::exports::nbd {

// The server speaks the wire protocol's vocabulary (nbd/protocol.h).
using namespace spindle::nbd;

class Server;
struct ServedExport;

class Connection : public std::enable_shared_from_this<Connection> {
 public:
  // `home`: the context run() will be called on (the drain deadline's timer lives there).
  Connection(Server& server, std::unique_ptr<io::Channel> channel, aio::Context& home,
             std::uint64_t serial);
  ~Connection();

  // Runs the connection to its end on `home` (attaches the channel here).
  coro::Task<void> run();
  // Any thread. Ends the receive loop now; requests already read still get their replies for
  // `grace`, then the channel is closed. Returns false if the connection was already stopping.
  bool stop(std::chrono::nanoseconds grace) noexcept;
  // Any thread: whether the client has not finished the handshake yet.
  bool in_handshake() const noexcept { return handshaking_.load(std::memory_order_acquire); }
  std::uint64_t serial() const noexcept { return serial_; }  // accept order
  // Any thread: the export this connection selected (null before), set by Server::claim_export
  // under its exports_mutex_, with the export's home (null: none), where transmission starts
  // by moving.
  const ServedExport* selected_export() const noexcept {
    return selected_.load(std::memory_order_acquire);
  }
  void set_selected_export(const ServedExport* served, aio::Context* export_home) noexcept {
    selected_.store(served, std::memory_order_release);
    if (export_home) wanted_home_.store(export_home, std::memory_order_release);
  }

  // Any thread: asks the connection to move to `target` (see above). Returns at once;
  // `moved` is set (and home() is `target`) once it has, or once the connection has ended.
  void request_move(aio::Context& target) noexcept;
  aio::Context* home() const noexcept { return home_.load(std::memory_order_acquire); }
  bool ended() const noexcept { return ended_.load(std::memory_order_acquire); }
  // Set after every move and when the connection ends; a waiter resets it, then checks home()
  // and ended(), then waits (so that no change is missed).
  coro::Event moved{true};

 private:
  enum class Next { keep_negotiating, transmit, close };

  coro::Task<bool> handshake();
  coro::Task<Next> handle_option(const OptionHeader& header, std::span<const std::byte> data);
  coro::Task<Next> start_tls(std::span<const std::byte> data);
  coro::Task<Next> handle_info_or_go(std::uint32_t option, std::span<const std::byte> data);
  coro::Task<Next> handle_meta_context(std::uint32_t option, std::span<const std::byte> data);
  coro::Task<bool> send_option_bytes(const std::vector<std::byte>& bytes);
  std::uint16_t transmission_flags(const ExportConfig& config) const;
  // Makes `served` this connection's export for transmission: false if it was removed since
  // it was looked up.
  bool select_export(std::shared_ptr<ServedExport> served);

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
  // Reads and drops `bytes` of payload (a rejected WRITE's) through a small buffer.
  coro::Task<int> skip_payload(std::uint64_t bytes);
  // Waits until a request costing `cost` may start; false if the connection stops meanwhile.
  coro::Task<bool> admit(std::uint64_t cost);
  void arm_drain_deadline(std::chrono::nanoseconds delay) noexcept;
  void cancel_drain_deadline() noexcept;
  std::unique_ptr<aio::Timer> make_drain_deadline(aio::Context& context);
  // Moves to the context request_move() asked for, if any, at a quiet point. False if the
  // connection is stopping.
  coro::Task<bool> move_if_asked();
  void finish_request(std::uint64_t cost) noexcept;  // a started request ended (or was dropped)
  bool stopping() const noexcept { return stop_requested_.load(std::memory_order_acquire); }

  class PageCacheRead;  // a READ reply whose data goes from the page cache to the socket
                        // without a buffer (sendfile, or writev from a mapping)

  Server& server_;
  std::unique_ptr<io::Channel> channel_;
  std::unique_ptr<io::TlsSession> tls_;  // after STARTTLS
  io::ByteStream* stream_;               // channel_, or tls_ once TLS is up
  std::shared_ptr<ServedExport> served_;  // selected for transmission (claimed on the server)
  const ExportConfig* export_ = nullptr;  // served_->config
  std::atomic<const ServedExport*> selected_{nullptr};
  bool no_zeroes_ = false;
  bool structured_ = false;
  bool base_allocation_ = false;  // SET_META_CONTEXT selected base:allocation for export_
  const bool copy_free_reads_;    // large READs of resident pages skip the buffer (not "never")
  const bool sendfile_reads_;     // ... and leave by sendfile, not a mapping (ServerOptions)
  TransmissionPolicy policy_;

  static constexpr std::size_t kReceiveBufferSize = 64 * 1024;
  base::IoBytes receive_buffer_;
  std::size_t receive_begin_ = 0;  // unread bytes are [receive_begin_, receive_end_)
  std::size_t receive_end_ = 0;

  ReplyWriter replies_;
  MappedFileCache mapped_;
  std::shared_ptr<BufferPool> buffers_ = std::make_shared<BufferPool>();
  std::size_t in_flight_ = 0;
  std::uint64_t bytes_in_flight_ = 0;
  bool peer_gone_ = false;  // no reply can reach the client any more
  coro::Event slot_free_{true};  // set when a request ends, budget is given back, or on stop()
  coro::Event idle_{true};

  const std::uint64_t serial_;
  std::atomic<bool> handshaking_{true};
  std::atomic<bool> stop_requested_{false};
  std::atomic<aio::Context*> home_;
  std::atomic<aio::Context*> wanted_home_{nullptr};  // request_move()'s target, until done
  std::atomic<bool> ended_{false};
  // The drain deadline closes the channel on the home context. A move replaces the timer (a
  // Timer belongs to one context): `deadline_mutex_` orders that with stop() on other threads,
  // and `deadline_at_` keeps a deadline armed while no timer exists.
  std::mutex deadline_mutex_;
  bool deadline_armed_ = false;                 // deadline_mutex_
  std::int64_t deadline_at_ = 0;                // deadline_mutex_ (monotonic ns)
  std::unique_ptr<aio::Timer> drain_deadline_;  // deadline_mutex_; null while moving
};

}  // namespace spindle::exports::nbd
