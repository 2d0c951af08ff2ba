#include "export/nbd/connection.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <string>

#include <fmt/format.h>

#include "aio/context.h"
#include "aio/timer.h"
#include "block/block_backend.h"
#include "export/nbd/server.h"

namespace spindle::exports::nbd {

namespace {

constexpr std::uint32_t kBaseAllocationId = 1;
// Reads this large are checked for holes first, so a sparse image sends OFFSET_HOLE chunks
// instead of zeros; smaller reads skip the extra block-status query.
constexpr std::uint32_t kSparseReadThreshold = 64 * 1024;
// READs at least this long of bytes that lie in a host file (a raw export, or a run of QED data
// clusters: BlockNode::host_file_range) whose pages are resident skip the io_uring read into a
// buffer (unless --zero-copy=never, and never under TLS): sendfile() for clients that
// ServerOptions::zero_copy_reads selects, otherwise a writev from a mapping of the file (one
// kernel copy). Smaller reads are cheaper read into memory and corked with their neighbours'
// replies into one writev (the residency check is a system call of its own).
constexpr std::uint32_t kZeroCopyReadThreshold = 64 * 1024;
constexpr std::uint32_t kMaxExtentsPerReply = 256;
// Bytes of request buffers and working memory one connection may hold in flight at once.
constexpr std::uint64_t kMaxBytesInFlight = 64u << 20;
// CACHE reads its range in pieces this large (the data is dropped; only the page cache keeps it).
constexpr std::uint64_t kCachePiece = 1u << 20;

// What a request may hold while it runs, counted against both budgets. Data commands hold
// their buffer; WRITE_ZEROES and TRIM at most a block layer's bounded working memory (a 1 MiB
// zero buffer where a driver falls back to writing zeros); the rest a coroutine frame and a
// small reply.
std::uint64_t request_cost(const RequestHeader& request) {
  constexpr std::uint64_t kMinimum = 4096;
  switch (request.command()) {
    case Command::kRead:
    case Command::kWrite:
      return std::max<std::uint64_t>(request.length, kMinimum);
    case Command::kCache:
      return std::clamp<std::uint64_t>(request.length, kMinimum, kCachePiece);
    case Command::kWriteZeroes:
    case Command::kTrim:
      return 1u << 20;
    default:
      return kMinimum;
  }
}

iovec bytes_iovec(const void* data, std::size_t size) {
  return iovec{const_cast<void*>(data), size};
}

std::uint32_t allocation_flags(std::uint32_t status) {
  std::uint32_t flags = 0;
  if (!(status & block::kStatusData)) flags |= kStateHole;
  if (status & block::kStatusZero) flags |= kStateZero;
  return flags;
}

// The bytes that precede a successful READ's data on the wire.
struct ReadReplyHeader {
  std::array<std::byte, kChunkHeaderSize + kOffsetDataPrefixSize> bytes{};
  std::size_t size = 0;

  ReadReplyHeader(bool structured, const RequestHeader& request) {
    if (structured) {
      bytes = encode_offset_data_header(request.cookie, request.offset, request.length, true);
      size = bytes.size();
    } else {
      const auto simple = encode_simple_reply(Error::kNone, request.cookie);
      std::copy(simple.begin(), simple.end(), bytes.begin());
      size = simple.size();
    }
  }
  iovec vector() const { return bytes_iovec(bytes.data(), size); }
};

// Whether the socket's peer runs on this machine: a Unix socket, or TCP over loopback.
bool peer_is_local(int fd) {
  sockaddr_storage peer{};
  socklen_t length = sizeof peer;
  if (::getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &length) != 0) return true;
  if (peer.ss_family == AF_INET) {
    const auto& v4 = reinterpret_cast<const sockaddr_in&>(peer);
    return (ntohl(v4.sin_addr.s_addr) >> 24) == 127;
  }
  if (peer.ss_family == AF_INET6) {
    const in6_addr& address = reinterpret_cast<const sockaddr_in6&>(peer).sin6_addr;
    if (IN6_IS_ADDR_LOOPBACK(&address)) return true;
    return IN6_IS_ADDR_V4MAPPED(&address) && address.s6_addr[12] == 127;
  }
  return true;  // AF_UNIX and anything else
}

bool wants_sendfile(ZeroCopyReads policy, int fd) {
  switch (policy) {
    case ZeroCopyReads::never: return false;
    case ZeroCopyReads::always: return true;
    case ZeroCopyReads::remote: return !peer_is_local(fd);
  }
  return false;
}

}  // namespace

class Connection::PageCacheRead final : public block::HostFileSink {
 public:
  PageCacheRead(Connection& connection, const RequestHeader& request)
      : connection_(connection), request_(request) {}

  coro::Task<int> send_from(int fd, std::uint64_t file_offset, std::uint64_t bytes) override {
    const ReadReplyHeader header(connection_.structured_, request_);
    if (connection_.sendfile_reads_) {
      const iovec parts[] = {header.vector()};
      co_await connection_.send(parts, FileRange{fd, file_offset, bytes});
      co_return 0;  // the read itself succeeded; a failed send ends the connection instead
    }
    // One copy: the socket write reads the page cache through a mapping.
    const MappedFileCache::Lease lease = connection_.mapped_.map(fd, file_offset, bytes);
    if (!lease) co_return -ENOTSUP;  // read it the ordinary way
    const iovec parts[] = {header.vector(), bytes_iovec(lease.data(), bytes)};
    co_await connection_.send(parts);
    co_return 0;
  }

 private:
  Connection& connection_;
  const RequestHeader& request_;
};

Connection::Connection(Server& server, std::unique_ptr<io::Channel> channel, aio::Context& home,
                       std::uint64_t serial)
    : server_(server),
      channel_(std::move(channel)),
      stream_(channel_.get()),
      copy_free_reads_(server.options_.zero_copy_reads != ZeroCopyReads::never),
      sendfile_reads_(wants_sendfile(server.options_.zero_copy_reads, channel_->fd())),
      serial_(serial),
      home_(&home),
      drain_deadline_(make_drain_deadline(home)) {
  // Room for several large READ replies in a Unix socket, so that the loop is not woken for
  // every ~200 KiB the client drains (the default buffer); the kernel caps the request at
  // net.core.wmem_max. TCP is left alone: setting SO_SNDBUF there would turn off the kernel's
  // send-buffer autotuning, which grows further on its own.
  sockaddr_storage local{};
  socklen_t length = sizeof local;
  if (::getsockname(channel_->fd(), reinterpret_cast<sockaddr*>(&local), &length) == 0 &&
      local.ss_family == AF_UNIX) {
    constexpr int kSendBufferBytes = 4 << 20;
    ::setsockopt(channel_->fd(), SOL_SOCKET, SO_SNDBUF, &kSendBufferBytes,
                 sizeof kSendBufferBytes);
  }
}

Connection::~Connection() = default;

std::unique_ptr<aio::Timer> Connection::make_drain_deadline(aio::Context& context) {
  return std::make_unique<aio::Timer>(context, aio::Clock::monotonic, [this] {
    peer_gone_ = true;
    channel_->close();  // blocked reads and sends get -ECANCELED
  });
}

bool Connection::stop(std::chrono::nanoseconds grace) noexcept {
  if (stop_requested_.exchange(true, std::memory_order_acq_rel)) return false;
  channel_->shutdown_read();  // a read blocked now, or later, sees EOF
  slot_free_.set();           // the receive loop may be waiting for admission
  arm_drain_deadline(grace);
  return true;
}

void Connection::arm_drain_deadline(std::chrono::nanoseconds delay) noexcept {
  // Once only: the first stop (or the end of the receive loop) sets the deadline.
  std::lock_guard lock(deadline_mutex_);
  if (deadline_armed_) return;
  deadline_armed_ = true;
  deadline_at_ = aio::now_ns(aio::Clock::monotonic) + delay.count();
  if (drain_deadline_) drain_deadline_->arm_at(deadline_at_);  // else: armed after the move
}

void Connection::cancel_drain_deadline() noexcept {
  std::lock_guard lock(deadline_mutex_);
  if (drain_deadline_) drain_deadline_->cancel();
}

void Connection::request_move(aio::Context& target) noexcept {
  wanted_home_.store(&target, std::memory_order_release);
  channel_->interrupt_read();  // a receive loop waiting for the next request comes to look
}

coro::Task<bool> Connection::move_if_asked() {
  // The quiet point: the loop reads nothing more until every request in flight has replied,
  // so nothing else of this connection runs while it changes threads.
  co_await idle_.wait();
  aio::Context* target = wanted_home_.exchange(nullptr, std::memory_order_acq_rel);
  if (stopping()) co_return false;
  if (target != nullptr && target != home_.load(std::memory_order_acquire)) {
    {
      // Destroyed on its own context, by its thread: its callback cannot be running.
      std::lock_guard lock(deadline_mutex_);
      drain_deadline_.reset();
    }
    channel_->attach(*target);
    co_await coro::switch_to(*target);
    {
      std::lock_guard lock(deadline_mutex_);
      drain_deadline_ = make_drain_deadline(*target);
      if (deadline_armed_) drain_deadline_->arm_at(deadline_at_);  // stop() came meanwhile
    }
    home_.store(target, std::memory_order_release);
  }
  moved.set();
  co_return true;
}

coro::Task<void> Connection::run() {
  channel_->attach(*aio::current_context());
  const bool negotiated = co_await handshake();
  handshaking_.store(false, std::memory_order_release);
  if (negotiated) co_await transmission();
  // Once the receive loop has ended (client EOF or DISC, lost framing), the replies still owed
  // get ServerOptions::drain_timeout to go out (a server stop arms the same deadline when it
  // begins). A peer that stopped reading must not keep the connection, and with it a server
  // shutdown, alive forever: after the deadline the channel is closed. Backend requests already
  // started run to completion; their replies, and requests not started yet, are dropped.
  arm_drain_deadline(server_.options_.drain_timeout);
  co_await idle_.wait();  // every request has sent its reply (or given up on the peer)
  cancel_drain_deadline();
  server_.budget_.forget(&slot_free_);
  if (tls_ && !peer_gone_) tls_->say_goodbye();
  channel_->close();
  if (served_) server_.release_export(*served_);
  ended_.store(true, std::memory_order_release);
  moved.set();
}

// ---- handshake ----------------------------------------------------------------------------

coro::Task<bool> Connection::handshake() {
  // A client that does not finish the handshake in time is cut off: closing the channel ends
  // whatever read it is blocked in.
  aio::Timer deadline(*aio::current_context(), aio::Clock::monotonic,
                      [this] { channel_->close(); });
  deadline.arm_in(server_.options_.handshake_timeout);

  const std::uint16_t handshake_flags = kFlagFixedNewstyle | kFlagNoZeroes;
  const auto greeting = encode_greeting(handshake_flags);
  const int greeted = co_await stream_->write_all(greeting.data(), greeting.size());
  if (greeted != 0) co_return false;
  std::array<std::byte, kClientFlagsSize> flag_bytes;
  const int got_flags = co_await stream_->read_exact(flag_bytes.data(), flag_bytes.size());
  if (got_flags != 0) co_return false;
  const auto client_flags = parse_client_flags(flag_bytes);
  if (!client_flags || !client_flags_acceptable(*client_flags, handshake_flags)) co_return false;
  no_zeroes_ = (*client_flags & kClientFlagNoZeroes) != 0;

  std::vector<std::byte> data;
  for (;;) {
    std::array<std::byte, kOptionHeaderSize> header_bytes;
    const int got_header = co_await stream_->read_exact(header_bytes.data(), header_bytes.size());
    if (got_header != 0) co_return false;
    const auto header = parse_option_header(header_bytes);
    if (!header) co_return false;  // not IHAVEOPT, or a payload too large to read: disconnect
    data.resize(header->length);
    const int got_data = co_await stream_->read_exact(data.data(), data.size());
    if (got_data != 0) co_return false;
    const Next next = co_await handle_option(*header, data);
    switch (next) {
      case Next::keep_negotiating:
        break;
      case Next::transmit:
        deadline.cancel();
        co_return true;
      case Next::close:
        co_return false;
    }
  }
}

coro::Task<bool> Connection::send_option_bytes(const std::vector<std::byte>& bytes) {
  co_return co_await stream_->write_all(bytes.data(), bytes.size()) == 0;
}

std::uint16_t Connection::transmission_flags(const ExportConfig& config) const {
  std::uint16_t flags = kFlagHasFlags | kFlagSendFlush | kFlagSendFua | kFlagSendCache;
  if (config.read_only || config.backend->read_only()) {
    flags |= kFlagReadOnly;
  } else {
    flags |= kFlagSendTrim | kFlagSendWriteZeroes | kFlagSendFastZero;
  }
  if (config.multi_conn) flags |= kFlagCanMultiConn;
  if (structured_) flags |= kFlagSendDf;
  return flags;
}

bool Connection::select_export(std::shared_ptr<ServedExport> served) {
  if (!server_.claim_export(*this, served)) return false;
  served_ = std::move(served);
  const ExportConfig& config = served_->config;
  export_ = &config;
  policy_.export_size = std::min(config.backend->size(), kMaxExportSize);
  policy_.transmission_flags = transmission_flags(config);
  policy_.structured_replies = structured_;
  policy_.block_status = structured_ && base_allocation_;
  return true;
}

coro::Task<Connection::Next> Connection::handle_option(const OptionHeader& header,
                                                       std::span<const std::byte> data) {
  std::vector<std::byte> reply;
  const auto option = static_cast<Option>(header.option);
  if (option == Option::kStartTls) co_return co_await start_tls(data);
  if (!tls_ && server_.options_.tls_mode == TlsMode::require && option != Option::kAbort) {
    // Forced TLS: nothing but STARTTLS and ABORT in clear text. EXPORT_NAME cannot carry an
    // error, so the spec has the server disconnect.
    if (option == Option::kExportName) co_return Next::close;
    append_reply_error(reply, header.option, OptionReply::kErrTlsRequired,
                       "TLS is required: send STARTTLS first");
    co_return co_await send_option_bytes(reply) ? Next::keep_negotiating : Next::close;
  }
  switch (option) {
    case Option::kExportName: {
      const auto name = parse_export_name(data, server_.options_.max_name_length);
      std::shared_ptr<ServedExport> served = name ? server_.find_export(*name) : nullptr;
      // EXPORT_NAME cannot be answered with an error
      if (!served || !select_export(std::move(served))) co_return Next::close;
      append_export_name_reply(reply, policy_.export_size, policy_.transmission_flags,
                               no_zeroes_);
      // Served from here on (before the client can see the reply): not evictable any more.
      handshaking_.store(false, std::memory_order_release);
      co_return co_await send_option_bytes(reply) ? Next::transmit : Next::close;
    }
    case Option::kAbort:
      append_reply_ack(reply, header.option);
      co_await send_option_bytes(reply);  // best effort: the client may already be gone
      co_return Next::close;
    case Option::kList:
      if (!data.empty()) {
        append_reply_error(reply, header.option, OptionReply::kErrInvalid, "LIST takes no data");
      } else {
        for (const ExportConfig& config : server_.exports()) {
          append_reply_server(reply, header.option, config.name, config.description);
        }
        append_reply_ack(reply, header.option);
      }
      break;
    case Option::kInfo:
    case Option::kGo:
      co_return co_await handle_info_or_go(header.option, data);
    case Option::kStructuredReply:
      if (!data.empty()) {
        append_reply_error(reply, header.option, OptionReply::kErrInvalid,
                           "STRUCTURED_REPLY takes no data");
      } else {
        structured_ = true;
        append_reply_ack(reply, header.option);
      }
      break;
    case Option::kListMetaContext:
    case Option::kSetMetaContext:
      co_return co_await handle_meta_context(header.option, data);
    default:
      append_reply_error(reply, header.option, OptionReply::kErrUnsupported,
                         "unsupported option");
      break;
  }
  co_return co_await send_option_bytes(reply) ? Next::keep_negotiating : Next::close;
}

coro::Task<Connection::Next> Connection::start_tls(std::span<const std::byte> data) {
  constexpr auto kStartTls = static_cast<std::uint32_t>(Option::kStartTls);
  std::vector<std::byte> reply;
  const auto& credentials = server_.options_.tls_credentials;
  if (server_.options_.tls_mode == TlsMode::off || !credentials) {
    append_reply_error(reply, kStartTls, OptionReply::kErrUnsupported,
                       "TLS is not configured on this server");
  } else if (!data.empty()) {
    append_reply_error(reply, kStartTls, OptionReply::kErrInvalid, "STARTTLS takes no data");
  } else if (tls_) {
    append_reply_error(reply, kStartTls, OptionReply::kErrInvalid, "TLS is already active");
  } else {
    append_reply_ack(reply, kStartTls);
    const bool acknowledged = co_await send_option_bytes(reply);
    if (!acknowledged) co_return Next::close;
    std::string error;
    auto session = io::TlsSession::create(*channel_, credentials, {}, error);
    if (!session) {
      fmt::print(stderr, "spindle-nbd: {}\n", error);
      co_return Next::close;
    }
    const int shaken = co_await session->handshake();  // still under the handshake deadline
    if (shaken != 0) {
      if (shaken != -ECANCELED && shaken != -ECONNRESET) {
        fmt::print(stderr, "spindle-nbd: TLS handshake failed: {}\n", session->error_message());
      }
      co_return Next::close;  // a failed handshake leaves no usable stream: disconnect
    }
    if (server_.options_.tls_authorize) {
      const bool x509 = credentials->kind() == io::TlsCredentials::Kind::x509;
      const std::string identity = x509 ? session->peer_certificate_dn() : session->psk_username();
      if (!server_.options_.tls_authorize(identity)) {
        fmt::print(stderr, "{}: option negotiation failed: TLS {} authz check for {} is denied\n",
                   program_invocation_short_name, x509 ? "x509" : "psk", identity);
        co_return Next::close;
      }
    }
    tls_ = std::move(session);
    stream_ = tls_.get();
    // Whatever was negotiated in clear text may have been tampered with: forget it.
    structured_ = false;
    base_allocation_ = false;
    export_ = nullptr;
    co_return Next::keep_negotiating;
  }
  co_return co_await send_option_bytes(reply) ? Next::keep_negotiating : Next::close;
}

coro::Task<Connection::Next> Connection::handle_info_or_go(std::uint32_t option,
                                                           std::span<const std::byte> data) {
  std::vector<std::byte> reply;
  const auto request = parse_info_request(data, server_.options_.max_name_length);
  if (!request) {
    append_reply_error(reply, option, option_error_for(request.error()), "malformed request");
    co_return co_await send_option_bytes(reply) ? Next::keep_negotiating : Next::close;
  }
  std::shared_ptr<ServedExport> served = server_.find_export(request->name);
  const ExportConfig* config = served ? &served->config : nullptr;
  const bool go = static_cast<Option>(option) == Option::kGo;
  // GO claims the export before the reply: one removed meanwhile is unknown to this client.
  if (!config || (go && !select_export(served))) {
    append_reply_error(reply, option, OptionReply::kErrUnknown,
                       "no export named '" + std::string(request->name) + "'");
    co_return co_await send_option_bytes(reply) ? Next::keep_negotiating : Next::close;
  }
  const std::uint16_t flags = transmission_flags(*config);
  for (std::uint16_t info : request->requests) {
    switch (static_cast<Info>(info)) {
      case Info::kName:
        append_reply_info_name(reply, option, config->name);
        break;
      case Info::kDescription:
        if (!config->description.empty()) {
          append_reply_info_description(reply, option, config->description);
        }
        break;
      case Info::kBlockSize:
        append_reply_info_block_size(reply, option, 1, 4096, kMaxPayloadLength);
        break;
      default:
        break;  // unknown info types are ignored; EXPORT is always sent below
    }
  }
  append_reply_info_export(reply, option, std::min(config->backend->size(), kMaxExportSize),
                           flags);
  append_reply_ack(reply, option);
  // Served from here on (before the client can see the ACK): not evictable any more.
  if (go) handshaking_.store(false, std::memory_order_release);
  const bool sent = co_await send_option_bytes(reply);
  if (!sent) co_return Next::close;
  co_return go ? Next::transmit : Next::keep_negotiating;
}

coro::Task<Connection::Next> Connection::handle_meta_context(std::uint32_t option,
                                                             std::span<const std::byte> data) {
  std::vector<std::byte> reply;
  const bool set = static_cast<Option>(option) == Option::kSetMetaContext;
  const auto request = parse_meta_context_request(data);
  if (!request) {
    append_reply_error(reply, option, option_error_for(request.error()), "malformed request");
  } else if (!structured_) {
    append_reply_error(reply, option, OptionReply::kErrInvalid,
                       "negotiate structured replies first");
  } else {
    if (!server_.find_export(request->export_name)) {
      append_reply_error(reply, option, OptionReply::kErrUnknown, "no such export");
    } else {
      bool selected = false;
      const bool list_all = !set && request->queries.empty();
      for (std::string_view query : request->queries) {
        if (query == kBaseAllocation || query == "base:") selected = true;
      }
      if (selected || list_all) {
        append_reply_meta_context(reply, option, kBaseAllocationId, kBaseAllocation);
      }
      if (set) base_allocation_ = selected;  // SET replaces the previous selection
      append_reply_ack(reply, option);
    }
  }
  co_return co_await send_option_bytes(reply) ? Next::keep_negotiating : Next::close;
}

// ---- transmission -------------------------------------------------------------------------

coro::Task<int> Connection::receive(void* destination, std::size_t size) {
  constexpr std::size_t kBufferSize = kReceiveBufferSize;
  auto* out = static_cast<std::byte*>(destination);
  const std::size_t buffered = std::min(size, receive_end_ - receive_begin_);
  // (Before the first refill the buffer is empty and data() is null: memcpy(.., null, 0) is UB.)
  if (buffered > 0) std::memcpy(out, receive_buffer_.data() + receive_begin_, buffered);
  receive_begin_ += buffered;
  out += buffered;
  size -= buffered;
  if (size == 0) co_return 0;
  if (size >= kBufferSize / 2) co_return co_await stream_->read_exact(out, size);  // big payload
  receive_buffer_.resize(kBufferSize);
  receive_begin_ = receive_end_ = 0;
  while (receive_end_ < size) {
    const ssize_t n = co_await stream_->read_some(receive_buffer_.data() + receive_end_,
                                                   kBufferSize - receive_end_);
    if (n == 0) co_return -ECONNRESET;
    if (n < 0) co_return static_cast<int>(n);
    receive_end_ += static_cast<std::size_t>(n);
  }
  std::memcpy(out, receive_buffer_.data(), size);
  receive_begin_ = size;
  co_return 0;
}

coro::Task<bool> Connection::admit(std::uint64_t cost) {
  const std::size_t max_in_flight = std::max<std::size_t>(
      server_.options_.max_requests_per_connection, 1);
  for (;;) {
    // Reset before checking: a completion or give_back() after the check sets it again.
    slot_free_.reset();
    if (stopping()) co_return false;
    const bool fits_connection =
        in_flight_ < max_in_flight &&
        (in_flight_ == 0 || bytes_in_flight_ + cost <= kMaxBytesInFlight);
    if (fits_connection && server_.budget_.try_take(cost, bytes_in_flight_, &slot_free_)) {
      co_return true;
    }
    co_await slot_free_.wait();
  }
}

coro::Task<int> Connection::skip_payload(std::uint64_t bytes) {
  std::array<std::byte, 16 * 1024> scratch;
  while (bytes > 0) {
    const std::size_t piece = std::min<std::uint64_t>(bytes, scratch.size());
    const int got = co_await receive(scratch.data(), piece);
    if (got != 0) co_return got;
    bytes -= piece;
  }
  co_return 0;
}

coro::Task<void> Connection::transmission() {
  while (!stopping()) {
    if (wanted_home_.load(std::memory_order_acquire) != nullptr) {
      const bool moved_home = co_await move_if_asked();
      if (!moved_home) break;
      continue;
    }
    if (receive_begin_ == receive_end_) {
      // Waiting for the next request, the one place where request_move() may call the loop
      // away (-EINTR): nothing of a request has been read yet.
      receive_buffer_.resize(kReceiveBufferSize);
      const ssize_t n =
          co_await stream_->read_some_or_interrupt(receive_buffer_.data(), kReceiveBufferSize);
      if (n == -EINTR) continue;
      if (n <= 0) {
        if (n < 0) peer_gone_ = true;  // (0: the client's clean EOF)
        break;
      }
      receive_begin_ = 0;
      receive_end_ = static_cast<std::size_t>(n);
    }
    std::array<std::byte, kRequestHeaderSize> header_bytes;
    const int got_header = co_await receive(header_bytes.data(), header_bytes.size());
    if (got_header != 0) {
      if (got_header != -ECONNRESET) peer_gone_ = true;  // (-ECONNRESET: our clean EOF)
      break;
    }
    const auto request = parse_request(header_bytes);
    if (!request) break;  // lost framing: hard disconnect
    const RequestVerdict verdict = validate_request(*request, policy_);
    if (verdict.disconnect) break;
    if (request->command() == Command::kDisconnect) break;
    if (!verdict.ok()) {
      const int skipped = co_await skip_payload(request_payload_length(*request));
      if (skipped != 0) break;
      // With structured replies a READ (or BLOCK_STATUS) must be answered with chunks even when
      // it is rejected up front: libnbd drops the connection on a simple reply to a READ.
      const Command command = request->command();
      if (structured_ && (command == Command::kRead || command == Command::kBlockStatus)) {
        std::vector<std::byte> chunk;
        append_error_chunk(chunk, request->cookie, verdict.error,
                           error_name(static_cast<std::uint32_t>(verdict.error)), true);
        const iovec parts[] = {bytes_iovec(chunk.data(), chunk.size())};
        co_await send(parts);
      } else {
        co_await send_simple(*request, verdict.error);
      }
      continue;
    }
    // Admission, before a WRITE payload is read: a client cannot make the server hold more
    // than the budgets allow, however many requests it pipelines.
    const std::uint64_t cost = request_cost(*request);
    const bool admitted = co_await admit(cost);
    if (!admitted) break;
    if (in_flight_++ == 0) idle_.reset();
    bytes_in_flight_ += cost;
    ByteBuffer payload = buffers_->acquire(request_payload_length(*request));
    if (payload.size() > 0) {
      const int got_payload = co_await receive(payload.data(), payload.size());
      if (got_payload != 0) {
        finish_request(cost);
        break;
      }
    }
    coro::spawn(*aio::current_context(), handle_request(*request, std::move(payload)));
  }
}

void Connection::finish_request(std::uint64_t cost) noexcept {
  bytes_in_flight_ -= cost;
  server_.budget_.give_back(cost);
  if (--in_flight_ == 0) idle_.set();
  slot_free_.set();
}

coro::Task<void> Connection::handle_request(RequestHeader request, ByteBuffer payload) {
  auto keep_alive = shared_from_this();
  block::BlockBackend& backend = *export_->backend;
  const std::int64_t start = aio::now_ns(aio::Clock::monotonic);
  int result = 0;
  auto kind = ExportStats::Kind::other;
  // No reply can reach a client that is gone: its queued requests are dropped, not executed.
  const Command command = peer_gone_ ? Command::kDisconnect : request.command();
  switch (command) {
    case Command::kDisconnect:
      finish_request(request_cost(request));
      co_return;
    case Command::kRead:
      kind = ExportStats::Kind::read;
      result = co_await handle_read(request);  // sends its own reply
      break;
    case Command::kWrite:
      kind = ExportStats::Kind::write;
      result = co_await backend.write(request.offset, payload.span(),
                                      (request.flags & kCmdFlagFua) ? std::uint32_t{block::kFua} : 0u);
      co_await send_error(request, result);
      break;
    case Command::kFlush:
      result = co_await backend.flush();
      co_await send_error(request, result);
      break;
    case Command::kTrim:
      if (export_->allow_unmap && request.length > 0) {
        result = co_await backend.discard(request.offset, request.length);
      }
      if (result == 0 && (request.flags & kCmdFlagFua)) result = co_await backend.flush();
      co_await send_error(request, result);
      break;
    case Command::kWriteZeroes: {
      std::uint32_t flags = 0;
      if (export_->allow_unmap && !(request.flags & kCmdFlagNoHole)) flags |= block::kMayUnmap;
      if (request.flags & kCmdFlagFua) flags |= block::kFua;
      if (request.flags & kCmdFlagFastZero) flags |= block::kNoFallback;
      if (request.length > 0) {
        result = co_await backend.write_zeroes(request.offset, request.length, flags);
      }
      co_await send_error(request, result);
      break;
    }
    case Command::kCache: {
      // Prefetch: read it (the page cache keeps it) and drop the data, a piece at a time.
      ByteBuffer scratch = buffers_->acquire(std::min<std::uint64_t>(request.length, kCachePiece));
      for (std::uint64_t done = 0; done < request.length && result >= 0 && !peer_gone_;) {
        const std::uint64_t piece = std::min<std::uint64_t>(request.length - done, kCachePiece);
        result = co_await backend.read(request.offset + done, scratch.span().first(piece));
        done += piece;
      }
      co_await send_error(request, result);
      break;
    }
    case Command::kBlockStatus:
      result = co_await handle_block_status(request);
      break;
    default:
      co_await send_simple(request, Error::kInvalid);
      break;
  }
  served_->stats.record(kind, request.length, aio::now_ns(aio::Clock::monotonic) - start,
                        result < 0);
  finish_request(request_cost(request));
}

coro::Task<int> Connection::handle_read(const RequestHeader& request) {
  block::BlockBackend& backend = *export_->backend;
  if (request.length == 0) {
    if (structured_) {
      const auto done = encode_none_chunk(request.cookie);
      const iovec parts[] = {bytes_iovec(done.data(), done.size())};
      co_await send(parts);
    } else {
      co_await send_simple(request, Error::kNone);
    }
    co_return 0;
  }
  if (structured_ && request.length >= kSparseReadThreshold) {
    const block::BlockStatus status = co_await backend.block_status(request.offset, request.length);
    if (status.error == 0 && (status.flags & block::kStatusZero) && !(status.flags & block::kStatusData) &&
        status.bytes >= request.length) {
      const auto hole = encode_offset_hole(request.cookie, request.offset, request.length, true);
      const iovec parts[] = {bytes_iovec(hole.data(), hole.size())};
      co_await send(parts);
      co_return 0;
    }
    if (peer_gone_) co_return 0;  // gone while we looked: no buffer, no read
  }
  // Only on a plain socket: TLS encrypts in user space, where neither sendfile nor a mapping
  // can be used (a mapped file truncated meanwhile would raise SIGBUS there).
  if (copy_free_reads_ && request.length >= kZeroCopyReadThreshold && stream_->can_send_file()) {
    PageCacheRead reply(*this, request);
    const int result = co_await backend.read_zero_copy(request.offset, request.length, reply);
    if (result != -ENOTSUP) {
      if (result < 0) co_await send_error(request, result);
      co_return result;
    }
  }
  ByteBuffer data = buffers_->acquire(request.length);
  const int result = co_await backend.read(request.offset, data.span());
  if (result < 0) {
    co_await send_error(request, result);
    co_return result;
  }
  const ReadReplyHeader header(structured_, request);
  const iovec parts[] = {header.vector(), bytes_iovec(data.data(), data.size())};
  co_await send(parts);
  co_return 0;
}

coro::Task<int> Connection::handle_block_status(const RequestHeader& request) {
  block::BlockBackend& backend = *export_->backend;
  std::vector<Extent> extents;
  std::uint64_t offset = request.offset;
  const std::uint64_t end = std::min<std::uint64_t>(request.offset + request.length,
                                                     policy_.export_size);
  const std::size_t max_extents = (request.flags & kCmdFlagReqOne) ? 1 : kMaxExtentsPerReply;
  while (offset < end && extents.size() < max_extents) {
    const block::BlockStatus status = co_await backend.block_status(offset, end - offset);
    if (status.error < 0) {
      // Describe the ranges before the bad one; a reply starting at it is the error itself.
      if (extents.empty()) {
        co_await send_error(request, status.error);
        co_return status.error;
      }
      break;
    }
    const std::uint64_t length = std::min<std::uint64_t>(status.bytes, end - offset);
    if (length == 0) break;
    const std::uint32_t flags = allocation_flags(status.flags);
    if (!extents.empty() && extents.back().flags == flags &&
        extents.back().length + length <= 0xffffffffu) {
      extents.back().length += static_cast<std::uint32_t>(length);  // merge equal neighbours
    } else {
      extents.push_back(Extent{static_cast<std::uint32_t>(length), flags});
    }
    offset += length;
  }
  if (extents.empty()) {
    co_await send_error(request, -EIO);
    co_return -EIO;
  }
  std::vector<std::byte> chunk;
  append_block_status_chunk(chunk, request.cookie, kBaseAllocationId, extents, true);
  const iovec parts[] = {bytes_iovec(chunk.data(), chunk.size())};
  co_await send(parts);
  co_return 0;
}

coro::Task<void> Connection::send_simple(const RequestHeader& request, Error error) {
  const auto header = encode_simple_reply(error, request.cookie);
  const iovec parts[] = {bytes_iovec(header.data(), header.size())};
  co_await send(parts);
}

coro::Task<void> Connection::send_error(const RequestHeader& request, int errno_value) {
  if (errno_value >= 0) {
    co_await send_simple(request, Error::kNone);
    co_return;
  }
  const Error error = errno_to_nbd(errno_value, request.command(), request.flags);
  if (structured_ && (request.command() == Command::kRead ||
                      request.command() == Command::kBlockStatus)) {
    std::vector<std::byte> chunk;
    append_error_chunk(chunk, request.cookie, error, std::strerror(-errno_value), true);
    const iovec parts[] = {bytes_iovec(chunk.data(), chunk.size())};
    co_await send(parts);
  } else {
    co_await send_simple(request, error);
  }
}

coro::Task<void> Connection::send(std::span<const iovec> parts, FileRange tail) {
  const bool sent = co_await replies_.send(*stream_, parts, tail);
  if (!sent) {  // the peer is gone: stop reading, wind down, drop what is queued
    peer_gone_ = true;
    channel_->shutdown_read();
  }
}

}  // namespace spindle::exports::nbd
