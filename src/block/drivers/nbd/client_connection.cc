#include "block/drivers/nbd/client_connection.h"

#include <fmt/format.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <optional>
#include <utility>

#include "aio/timer.h"
#include "coro/sleep.h"
#include "io/socket.h"

namespace spindle::block::nbd {

namespace proto = spindle::nbd;

namespace {

// Caps on server-chosen payloads the client buffers (data goes straight to the caller's buffer
// and is bounded by the request instead). BLOCK_STATUS: the spec's SHOULD of 2^20 extents.
constexpr std::uint32_t kMaxBlockStatusPayload = 4 + (1u << 20) * proto::kExtentSize;
constexpr std::uint32_t kMaxErrorPayload = 64u << 10;

coro::Task<base::Result<std::unique_ptr<io::Channel>>> open_socket(const NbdUri& uri,
                                                                    std::int64_t deadline_ns) {
  if (uri.unix_socket) co_return co_await io::connect_unix(uri.socket_path, deadline_ns);
  co_return co_await io::connect_tcp(uri.host, uri.port, deadline_ns);
}

}  // namespace

ClientConnection::~ClientConnection() {
  tls_.reset();
  if (channel_) channel_->close();
}

coro::Task<ConnectOutcome> ClientConnection::connect(
    NbdUri uri, std::shared_ptr<const io::TlsCredentials> credentials) {
  std::shared_ptr<ClientConnection> connection(
      new ClientConnection(*aio::current_context(), std::move(uri), std::move(credentials)));
  const int established = co_await connection->establish();
  if (established < 0) co_return ConnectOutcome{nullptr, -established, connection->error_message_};
  connection->details_ = connection->negotiated_;
  connection->start_reader();
  co_return ConnectOutcome{std::move(connection), 0, {}};
}

void ClientConnection::install_channel(std::unique_ptr<io::Channel> channel) noexcept {
  std::lock_guard lock(channel_mutex_);
  channel_ = std::move(channel);
  stream_ = channel_.get();
  // abort() or the timer may have fired while we connected: they found no channel to close.
  if (stopping_.load(std::memory_order_acquire) || timed_out_) channel_->close();
}

void ClientConnection::close_channel() noexcept {
  std::lock_guard lock(channel_mutex_);
  if (channel_) channel_->close();
}

coro::Task<int> ClientConnection::establish() {
  timed_out_ = false;
  // The timer closes the socket; every blocked read/write then fails and the handshake ends.
  // One deadline covers the connect (io::connect_* enforce it) and the handshake.
  std::optional<aio::Timer> timer;
  std::int64_t deadline_ns = 0;
  if (uri_.connect_timeout > 0) {
    timer.emplace(*context_, aio::Clock::monotonic, [this] {
      timed_out_ = true;
      close_channel();
    });
    deadline_ns = aio::now_ns(aio::Clock::monotonic) +
                  std::chrono::duration_cast<std::chrono::nanoseconds>(
                      std::chrono::duration<double>(uri_.connect_timeout))
                      .count();
    timer->arm_at(deadline_ns);
  }
  auto channel = co_await open_socket(uri_, deadline_ns);
  if (!channel.ok()) {
    error_message_ =
        channel.error() == ETIMEDOUT && deadline_ns > 0
            ? fmt::format("cannot connect to {}: no connection within {} s (connect-timeout)",
                          describe(uri_), uri_.connect_timeout)
            : fmt::format("cannot connect to {}: {}", describe(uri_),
                          std::strerror(channel.error()));
    co_return -channel.error();
  }
  install_channel(std::move(channel).value());
  int negotiated = co_await handshake();
  timer.reset();
  // Even a handshake that just finished is void if the timer closed the socket under it.
  if (timed_out_) {
    negotiated = handshake_error(ETIMEDOUT, fmt::format("no complete handshake within {} s "
                                                        "(connect-timeout)", uri_.connect_timeout));
  }
  if (negotiated < 0) {
    close_channel();
    error_message_ = fmt::format("{}: {}", describe(uri_), error_message_);
  }
  co_return negotiated;
}

void ClientConnection::start_reader() {
  reader_running_ = true;
  reader_exited_.reset();
  coro::spawn(*context_, reader_loop(shared_from_this()));
}

// ---------------------------------------------------------------------------------------------
// Handshake

int ClientConnection::handshake_error(int error, std::string message) {
  error_message_ = std::move(message);
  return -error;
}

std::string ClientConnection::reply_error_text() const {
  std::string text(proto::option_reply_name(reply_header_.type));
  if (!reply_data_.empty()) {
    text += ": ";
    text.append(reinterpret_cast<const char*>(reply_data_.data()),
                std::min<std::size_t>(reply_data_.size(), proto::kMaxStringLength));
  }
  return text;
}

coro::Task<int> ClientConnection::send_bytes(const std::vector<std::byte>& bytes) {
  const int sent = co_await stream_->write_all(bytes.data(), bytes.size());
  if (sent < 0) co_return handshake_error(EIO, "server closed the connection during the handshake");
  co_return 0;
}

coro::Task<int> ClientConnection::read_option_reply(proto::Option option) {
  std::array<std::byte, proto::kOptionReplyHeaderSize> bytes;
  const int got = co_await stream_->read_exact(bytes.data(), bytes.size());
  if (got < 0) {
    co_return handshake_error(EIO, fmt::format("server closed the connection after {}",
                                               proto::option_name(static_cast<std::uint32_t>(option))));
  }
  auto header = proto::parse_option_reply_header(bytes);
  if (!header) {
    co_return handshake_error(EPROTO, fmt::format("bad option reply ({})",
                                                  proto::parse_error_name(header.error())));
  }
  if (header->option != static_cast<std::uint32_t>(option)) {
    co_return handshake_error(EPROTO, "option reply for an option not asked");
  }
  reply_header_ = *header;
  reply_data_.resize(header->length);
  const int got_data = co_await stream_->read_exact(reply_data_.data(), reply_data_.size());
  if (got_data < 0) co_return handshake_error(EIO, "server closed the connection in an option reply");
  co_return 0;
}

coro::Task<int> ClientConnection::handshake() {
  using proto::Option;
  const NbdUri& uri = uri_;
  negotiated_ = ExportDetails{};
  using proto::OptionReply;
  std::array<std::byte, proto::kGreetingSize> greeting;
  const int greeted = co_await stream_->read_exact(greeting.data(), greeting.size());
  if (greeted < 0) co_return handshake_error(EIO, "server closed the connection before its greeting");
  auto handshake_flags = proto::parse_greeting(greeting);
  if (!handshake_flags) {
    co_return handshake_error(EPROTO, handshake_flags.error() == proto::ParseError::kUnsupported
                                          ? "oldstyle NBD servers are not supported"
                                          : "not an NBD server (bad greeting)");
  }
  if ((*handshake_flags & proto::kFlagFixedNewstyle) == 0) {
    co_return handshake_error(EPROTO, "the server does not speak fixed newstyle NBD");
  }
  const bool no_zeroes = (*handshake_flags & proto::kFlagNoZeroes) != 0;
  const auto client_flags = proto::encode_client_flags(
      proto::kClientFlagFixedNewstyle | (no_zeroes ? proto::kClientFlagNoZeroes : 0));
  const int flagged = co_await stream_->write_all(client_flags.data(), client_flags.size());
  if (flagged < 0) co_return handshake_error(EIO, "server closed the connection during the handshake");

  std::vector<std::byte> out;
  if (uri.tls) {
    // STARTTLS before anything else; any refusal ends the open (no downgrade to clear text).
    proto::append_option(out, Option::kStartTls);
    const int sent = co_await send_bytes(out);
    if (sent < 0) co_return sent;
    const int replied = co_await read_option_reply(Option::kStartTls);
    if (replied < 0) co_return replied;
    if (reply_header_.type != static_cast<std::uint32_t>(OptionReply::kAck)) {
      co_return handshake_error(EACCES, "server refused STARTTLS (" + reply_error_text() + ")");
    }
    std::string error;
    tls_ = io::TlsSession::create(*channel_, credentials_,
                                  uri.unix_socket ? std::string() : uri.host, error);
    if (!tls_) co_return handshake_error(EPROTO, "TLS setup failed: " + error);
    const int shaken = co_await tls_->handshake();
    if (shaken < 0) co_return handshake_error(-shaken, "TLS handshake failed: " + tls_->error_message());
    stream_ = tls_.get();
  }

  out.clear();
  proto::append_option(out, Option::kStructuredReply);
  const int sent_sr = co_await send_bytes(out);
  if (sent_sr < 0) co_return sent_sr;
  const int replied_sr = co_await read_option_reply(Option::kStructuredReply);
  if (replied_sr < 0) co_return replied_sr;
  if (reply_header_.type == static_cast<std::uint32_t>(OptionReply::kErrTlsRequired)) {
    co_return handshake_error(EACCES, "the server requires TLS (use nbds:// or nbds+unix://)");
  }
  if (reply_header_.type == static_cast<std::uint32_t>(OptionReply::kAck)) {
    negotiated_.structured = true;
  } else if (!proto::is_error_reply(reply_header_.type)) {
    co_return handshake_error(EPROTO, "unexpected reply to NBD_OPT_STRUCTURED_REPLY");
  }

  if (negotiated_.structured) {
    out.clear();
    const std::string_view queries[] = {proto::kBaseAllocation};
    proto::append_option_meta_context(out, Option::kSetMetaContext, uri.export_name, queries);
    const int sent_meta = co_await send_bytes(out);
    if (sent_meta < 0) co_return sent_meta;
    for (;;) {
      const int replied = co_await read_option_reply(Option::kSetMetaContext);
      if (replied < 0) co_return replied;
      if (reply_header_.type == static_cast<std::uint32_t>(OptionReply::kMetaContext)) {
        auto context = proto::parse_reply_meta_context(reply_data_);
        if (!context) co_return handshake_error(EPROTO, "bad NBD_REP_META_CONTEXT");
        if (context->name == proto::kBaseAllocation) {
          negotiated_.base_allocation = true;
          negotiated_.context_id = context->context_id;
        }
        continue;
      }
      if (reply_header_.type != static_cast<std::uint32_t>(OptionReply::kAck) &&
          !proto::is_error_reply(reply_header_.type)) {
        co_return handshake_error(EPROTO, "unexpected reply to NBD_OPT_SET_META_CONTEXT");
      }
      if (proto::is_error_reply(reply_header_.type)) negotiated_.base_allocation = false;
      break;
    }
  }

  out.clear();
  const proto::Info wanted[] = {proto::Info::kBlockSize};
  proto::append_option_info(out, Option::kGo, uri.export_name, wanted);
  const int sent_go = co_await send_bytes(out);
  if (sent_go < 0) co_return sent_go;
  bool have_export = false;
  bool go_unsupported = false;
  for (;;) {
    const int replied = co_await read_option_reply(Option::kGo);
    if (replied < 0) co_return replied;
    const std::uint32_t type = reply_header_.type;
    if (type == static_cast<std::uint32_t>(OptionReply::kInfo)) {
      auto info_type = proto::parse_reply_info_type(reply_data_);
      if (!info_type) co_return handshake_error(EPROTO, "bad NBD_REP_INFO");
      if (*info_type == static_cast<std::uint16_t>(proto::Info::kExport)) {
        auto info = proto::parse_reply_info_export(reply_data_);
        if (!info) {
          co_return handshake_error(EPROTO, fmt::format("bad NBD_INFO_EXPORT ({})",
                                                        proto::parse_error_name(info.error())));
        }
        negotiated_.size = info->size;
        negotiated_.flags = info->transmission_flags;
        have_export = true;
      } else if (*info_type == static_cast<std::uint16_t>(proto::Info::kBlockSize)) {
        auto sizes = proto::parse_reply_info_block_size(reply_data_);
        if (sizes) negotiated_.block_size = *sizes;  // a bad one is ignored (the spec allows it)
      } else if (*info_type == static_cast<std::uint16_t>(proto::Info::kDescription)) {
        auto text = proto::parse_reply_info_string(reply_data_);
        if (text) negotiated_.description = std::string(*text);
      }
      continue;
    }
    if (type == static_cast<std::uint32_t>(OptionReply::kAck)) {
      if (!have_export) co_return handshake_error(EPROTO, "NBD_OPT_GO acknowledged without NBD_INFO_EXPORT");
      break;
    }
    if (type == static_cast<std::uint32_t>(OptionReply::kErrUnsupported)) {
      go_unsupported = true;
      break;
    }
    if (type == static_cast<std::uint32_t>(OptionReply::kErrUnknown)) {
      co_return handshake_error(ENOENT, "the server has no export named '" + uri.export_name +
                                            "' (" + reply_error_text() + ")");
    }
    if (type == static_cast<std::uint32_t>(OptionReply::kErrTlsRequired)) {
      co_return handshake_error(EACCES, "the server requires TLS (use nbds:// or nbds+unix://)");
    }
    if (proto::is_error_reply(type)) {
      co_return handshake_error(EACCES, "the server refused the export (" + reply_error_text() + ")");
    }
    co_return handshake_error(EPROTO, "unexpected reply to NBD_OPT_GO");
  }

  if (go_unsupported) {
    // Old servers: EXPORT_NAME has no error reply; a server without the export just closes.
    out.clear();
    proto::append_option_export_name(out, uri.export_name);
    const int sent_name = co_await send_bytes(out);
    if (sent_name < 0) co_return sent_name;
    std::array<std::byte, proto::kExportNameReplySize> reply;
    const std::size_t reply_size =
        no_zeroes ? proto::kExportNameReplyShortSize : proto::kExportNameReplySize;
    const int got = co_await stream_->read_exact(reply.data(), reply_size);
    if (got < 0) {
      co_return handshake_error(ENOENT, "the server closed the connection (no export named '" +
                                            uri.export_name + "'?)");
    }
    auto info = proto::parse_export_name_reply(std::span(reply).first(proto::kExportNameReplyShortSize));
    if (!info) {
      co_return handshake_error(EPROTO, fmt::format("bad NBD_OPT_EXPORT_NAME reply ({})",
                                                    proto::parse_error_name(info.error())));
    }
    negotiated_.size = info->size;
    negotiated_.flags = info->transmission_flags;
    negotiated_.used_export_name = true;
  }
  // Without structured replies, BLOCK_STATUS cannot be used.
  if (!negotiated_.structured) negotiated_.base_allocation = false;
  co_return 0;
}

// ---------------------------------------------------------------------------------------------
// Requests

coro::Task<int> ClientConnection::read(std::uint64_t offset, std::span<std::byte> buffer) {
  Pending pending;
  pending.header.type = static_cast<std::uint16_t>(proto::Command::kRead);
  pending.header.offset = offset;
  pending.header.length = static_cast<std::uint32_t>(buffer.size());
  pending.read_buffer = buffer;
  co_return co_await submit(pending, {});
}

coro::Task<int> ClientConnection::write(std::uint64_t offset, std::span<const std::byte> buffer,
                                        std::uint16_t flags) {
  Pending pending;
  pending.header.type = static_cast<std::uint16_t>(proto::Command::kWrite);
  pending.header.flags = flags;
  pending.header.offset = offset;
  pending.header.length = static_cast<std::uint32_t>(buffer.size());
  pending.payload = buffer;
  co_return co_await submit(pending, buffer);
}

coro::Task<int> ClientConnection::command(proto::Command command, std::uint16_t flags,
                                          std::uint64_t offset, std::uint32_t length) {
  Pending pending;
  pending.header.type = static_cast<std::uint16_t>(command);
  pending.header.flags = flags;
  pending.header.offset = offset;
  pending.header.length = length;
  co_return co_await submit(pending, {});
}

coro::Task<int> ClientConnection::block_status(std::uint64_t offset, std::uint32_t length,
                                               std::vector<ExtentStatus>& extents) {
  extents.clear();
  Pending pending;
  pending.header.type = static_cast<std::uint16_t>(proto::Command::kBlockStatus);
  pending.header.offset = offset;
  pending.header.length = length;
  pending.extents = &extents;
  co_return co_await submit(pending, {});
}

coro::Task<int> ClientConnection::submit(Pending& pending, std::span<const std::byte> payload) {
  aio::Context* origin = aio::current_context();
  if (origin == context_.get()) co_return co_await submit_here(pending, payload);
  co_await coro::switch_to(*context_);
  const int result = co_await submit_here(pending, payload);
  co_await coro::switch_to(*origin);
  co_return result;
}

coro::Task<int> ClientConnection::submit_here(Pending& pending, std::span<const std::byte> payload) {
  if (state_ == State::kDead) co_return -EIO;
  pending.header.cookie = next_cookie_++;
  in_flight_.emplace(pending.header.cookie, &pending);
  // While reconnecting the request only queues: reconnect_loop() sends it.
  if (state_ == State::kUp) {
    auto guard = co_await send_mutex_.scoped_lock();
    // The connection may have died, or been re-established and resent us, while we queued.
    if (state_ == State::kUp && !pending.sent && !pending.done.is_set()) {
      pending.sent = true;
      const auto header = proto::encode_request(pending.header);
      const iovec parts[2] = {{const_cast<std::byte*>(header.data()), header.size()},
                              {const_cast<std::byte*>(payload.data()), payload.size()}};
      const int sent = co_await stream_->writev_all(std::span(parts, payload.empty() ? 1 : 2));
      if (sent < 0) {
        connection_lost(fmt::format("sending a request failed: {}", std::strerror(-sent)));
      }
    }
  }
  // fail_all() (ours or the reader's) has completed `pending` if the connection died.
  co_await pending.done.wait();
  co_return pending.result;
}

coro::Task<void> ClientConnection::disconnect() {
  aio::Context* origin = aio::current_context();
  co_await coro::switch_to(*context_);
  stopping_.store(true, std::memory_order_release);
  if (state_ == State::kUp) {
    auto guard = co_await send_mutex_.scoped_lock();
    if (state_ == State::kUp) {
      proto::RequestHeader request;
      request.type = static_cast<std::uint16_t>(proto::Command::kDisconnect);
      request.cookie = next_cookie_++;
      const auto header = proto::encode_request(request);
      co_await stream_->write_all(header.data(), header.size());  // best effort
      if (tls_) tls_->say_goodbye();
    }
  }
  // Fails anything left; the reader resumes with -ECANCELED, a reconnect loop gives up.
  if (state_ != State::kDead) fail_all("disconnected");
  co_await finished_event_.wait();
  co_await coro::switch_to(*origin);
}

void ClientConnection::abort() noexcept {
  stopping_.store(true, std::memory_order_release);
  if (finished_.load(std::memory_order_acquire)) return;  // closed already: nothing to post
  if (context_->is_current()) {
    goodbye_now();
    return;
  }
  context_->run_soon([self = shared_from_this()] { self->goodbye_now(); });
}

void ClientConnection::goodbye_now() noexcept {
  // Only when nobody is mid-send (the header must not land inside another request) and the
  // socket takes all 28 bytes now: a destructor must not wait on the network.
  if (state_ == State::kUp && send_mutex_.try_lock()) {
    if (tls_) {
      tls_->say_goodbye();
    } else {
      proto::RequestHeader request;
      request.type = static_cast<std::uint16_t>(proto::Command::kDisconnect);
      request.cookie = next_cookie_++;
      const auto header = proto::encode_request(request);
      const int fd = channel_ ? channel_->fd() : -1;
      if (fd >= 0) {
        [[maybe_unused]] const ssize_t n =
            ::send(fd, header.data(), header.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
      }
    }
    send_mutex_.unlock();
  }
  if (state_ != State::kDead) fail_all("closed");
  close_channel();
}

// ---------------------------------------------------------------------------------------------
// The reply reader

void ClientConnection::complete(Pending& pending) noexcept {
  in_flight_.erase(pending.header.cookie);
  pending.done.set();  // wakes the request on its home context (this one), after we suspend
}

int ClientConnection::fail_all(std::string reason) {
  if (state_ != State::kDead) {
    state_ = State::kDead;
    death_reason_ = std::move(reason);
  }
  auto pending = std::move(in_flight_);
  in_flight_.clear();
  for (auto& [cookie, request] : pending) {
    request->result = -EIO;
    request->done.set();
  }
  close_channel();
  maybe_finish();
  return -EPROTO;
}

int ClientConnection::connection_lost(std::string reason) {
  if (state_ != State::kUp) return -EPIPE;  // already handled
  if (uri_.reconnect_delay <= 0 || stopping_.load(std::memory_order_acquire)) {
    fail_all(std::move(reason));
    return -EPIPE;
  }
  state_ = State::kReconnecting;
  death_reason_ = std::move(reason);
  lost_at_ns_ = aio::now_ns(aio::Clock::monotonic);
  for (auto& [cookie, request] : in_flight_) request->reset_for_resend();
  close_channel();
  if (!reconnecting_) {
    reconnecting_ = true;
    coro::spawn(*context_, reconnect_loop(shared_from_this()));
  }
  return -EPIPE;
}

void ClientConnection::maybe_finish() noexcept {
  if (state_ == State::kDead && !reader_running_ && !reconnecting_) {
    finished_.store(true, std::memory_order_release);
    finished_event_.set();
  }
}

bool ClientConnection::compatible_after_reconnect(std::string& why) const {
  if (negotiated_.size != details_.size) {
    why = fmt::format("the export's size changed ({} -> {})", details_.size, negotiated_.size);
    return false;
  }
  if ((details_.flags & ~negotiated_.flags) != 0 ||
      ((negotiated_.flags & proto::kFlagReadOnly) && !(details_.flags & proto::kFlagReadOnly))) {
    why = "the export's flags changed";
    return false;
  }
  if (negotiated_.structured != details_.structured ||
      negotiated_.base_allocation != details_.base_allocation ||
      negotiated_.block_size.minimum != details_.block_size.minimum ||
      negotiated_.block_size.maximum < details_.block_size.maximum) {
    why = "the server negotiated different features";
    return false;
  }
  return true;
}

coro::Task<void> ClientConnection::resend_pending() {
  std::vector<std::uint64_t> cookies;
  for (const auto& [cookie, request] : in_flight_) {
    if (!request->sent) cookies.push_back(cookie);
  }
  std::sort(cookies.begin(), cookies.end());
  for (const std::uint64_t cookie : cookies) {
    // Look it up again: the new reader may complete requests while we send.
    const auto found = in_flight_.find(cookie);
    if (state_ != State::kUp) break;
    if (found == in_flight_.end() || found->second->sent) continue;
    Pending& pending = *found->second;
    pending.sent = true;
    const auto header = proto::encode_request(pending.header);
    const std::span<const std::byte> payload = pending.payload;
    const iovec parts[2] = {{const_cast<std::byte*>(header.data()), header.size()},
                            {const_cast<std::byte*>(payload.data()), payload.size()}};
    const int sent = co_await stream_->writev_all(std::span(parts, payload.empty() ? 1 : 2));
    if (sent < 0) {
      connection_lost(fmt::format("resending a request failed: {}", std::strerror(-sent)));
      break;
    }
  }
}

coro::Task<void> ClientConnection::reconnect_loop(std::shared_ptr<ClientConnection> self) {
  // `self` keeps the connection alive while we retry.
  using namespace std::chrono_literals;
  const auto delay_ns = static_cast<std::int64_t>(uri_.reconnect_delay * 1e9);
  std::chrono::milliseconds backoff = 50ms;
  while (state_ == State::kReconnecting && !stopping_.load(std::memory_order_acquire)) {
    // The old stream goes only once its reader is out and no sender is inside it.
    co_await reader_exited_.wait();
    {
      auto guard = co_await send_mutex_.scoped_lock();
      tls_.reset();
      std::lock_guard lock(channel_mutex_);
      channel_.reset();
      stream_ = nullptr;
    }
    if (state_ != State::kReconnecting || stopping_.load(std::memory_order_acquire)) break;
    const std::int64_t deadline = lost_at_ns_ + delay_ns;
    if (aio::now_ns(aio::Clock::monotonic) >= deadline) {
      fail_all(fmt::format("{}; no reconnection within {} s", death_reason_, uri_.reconnect_delay));
      break;
    }
    const int established = co_await establish();
    std::string why;
    const bool usable = established == 0 && compatible_after_reconnect(why);
    if (state_ != State::kReconnecting || stopping_.load(std::memory_order_acquire)) break;
    if (usable) {
      state_ = State::kUp;
      start_reader();
      auto guard = co_await send_mutex_.scoped_lock();
      co_await resend_pending();  // may lose the new stream again: the loop goes on
      continue;
    }
    if (established == 0 && !why.empty()) {
      fail_all(fmt::format("reconnected to {}, but {}", describe(uri_), why));
      break;
    }
    // Wait before the next try, in slices so that abort()/disconnect() are seen promptly.
    const auto wake_at = std::min<std::int64_t>(
        deadline, aio::now_ns(aio::Clock::monotonic) +
                      std::chrono::duration_cast<std::chrono::nanoseconds>(backoff).count());
    backoff = std::min<std::chrono::milliseconds>(backoff * 2, 1000ms);
    for (;;) {
      const std::int64_t left = wake_at - aio::now_ns(aio::Clock::monotonic);
      if (left <= 0 || stopping_.load(std::memory_order_acquire)) break;
      const std::chrono::nanoseconds slice = std::min<std::chrono::nanoseconds>(
          std::chrono::nanoseconds(left), 100ms);
      co_await coro::sleep(slice);
    }
  }
  if (state_ == State::kReconnecting) fail_all("closed while reconnecting");
  reconnecting_ = false;
  maybe_finish();
}

coro::Task<void> ClientConnection::reader_loop(std::shared_ptr<ClientConnection> self) {
  // `self` keeps the connection alive until the reader has finished.
  std::array<std::byte, proto::kChunkHeaderSize> header;
  for (;;) {
    const int got = co_await stream_->read_exact(header.data(), 4);
    if (got < 0) {
      connection_lost(got == -ECONNRESET
                          ? "the server closed the connection"
                          : fmt::format("reading a reply failed: {}", std::strerror(-got)));
      break;
    }
    const proto::ReplyKind kind = proto::classify_reply(std::span<const std::byte, 4>(header.data(), 4));
    int handled = 0;
    if (kind == proto::ReplyKind::kSimple) {
      handled = co_await read_simple_reply(header);
    } else if (kind == proto::ReplyKind::kStructured) {
      handled = co_await read_chunk(header);
    } else {
      handled = fail_all("bad reply magic");
    }
    if (handled < 0) break;
  }
  reader_running_ = false;
  reader_exited_.set();
  maybe_finish();
}

coro::Task<int> ClientConnection::read_simple_reply(
    std::span<std::byte, proto::kChunkHeaderSize> header) {
  const int got = co_await stream_->read_exact(header.data() + 4, proto::kSimpleReplyHeaderSize - 4);
  if (got < 0) co_return connection_lost("the server closed the connection in a reply header");
  auto reply = proto::parse_simple_reply(header.first(proto::kSimpleReplyHeaderSize));
  if (!reply) co_return fail_all("bad simple reply");
  const auto found = in_flight_.find(reply->cookie);
  if (found == in_flight_.end()) co_return fail_all("reply with an unknown cookie");
  Pending& pending = *found->second;
  const proto::Command command = pending.header.command();
  if (reply->error != 0) {
    pending.result = -proto::nbd_to_errno(reply->error);
  } else if (command == proto::Command::kRead) {
    // With structured replies a successful READ must come as chunks (it has a payload).
    if (negotiated_.structured) {
      co_return fail_all("simple reply with data after structured replies");
    }
    const int data = co_await stream_->read_exact(pending.read_buffer.data(), pending.read_buffer.size());
    if (data < 0) co_return connection_lost("the server closed the connection in READ data");
  } else if (command == proto::Command::kBlockStatus) {
    co_return fail_all("simple success reply to NBD_CMD_BLOCK_STATUS");
  }
  complete(pending);
  co_return 0;
}

coro::Task<int> ClientConnection::read_chunk(std::span<std::byte, proto::kChunkHeaderSize> header) {
  const int got = co_await stream_->read_exact(header.data() + 4, proto::kChunkHeaderSize - 4);
  if (got < 0) co_return connection_lost("the server closed the connection in a chunk header");
  auto chunk = proto::parse_chunk_header(header, max_chunk_);
  if (!chunk) {
    co_return fail_all(fmt::format("bad structured reply chunk ({})",
                                   proto::parse_error_name(chunk.error())));
  }
  if (!negotiated_.structured) co_return fail_all("structured reply without negotiation");
  const auto found = in_flight_.find(chunk->cookie);
  if (found == in_flight_.end()) co_return fail_all("reply chunk with an unknown cookie");
  Pending& pending = *found->second;
  const proto::RequestHeader& request = pending.header;
  const std::uint16_t type = chunk->type;

  if (type == static_cast<std::uint16_t>(proto::ChunkType::kOffsetData)) {
    if (request.command() != proto::Command::kRead) co_return fail_all("OFFSET_DATA for a non-READ");
    std::array<std::byte, proto::kOffsetDataPrefixSize> prefix;
    const int got_prefix = co_await stream_->read_exact(prefix.data(), prefix.size());
    if (got_prefix < 0) co_return connection_lost("the server closed the connection in a chunk");
    auto data = proto::parse_offset_data(*chunk, prefix);
    if (!data || !proto::range_within(data->offset, data->data_length, request.offset, request.length)) {
      co_return fail_all("OFFSET_DATA outside its request");
    }
    std::byte* target = pending.read_buffer.data() + (data->offset - request.offset);
    const int got_data = co_await stream_->read_exact(target, data->data_length);
    if (got_data < 0) co_return connection_lost("the server closed the connection in READ data");
    pending.covered += data->data_length;
  } else if (type == static_cast<std::uint16_t>(proto::ChunkType::kOffsetHole)) {
    if (request.command() != proto::Command::kRead) co_return fail_all("OFFSET_HOLE for a non-READ");
    std::array<std::byte, 12> payload;
    const int got_payload = co_await stream_->read_exact(payload.data(), payload.size());
    if (got_payload < 0) co_return connection_lost("the server closed the connection in a chunk");
    auto hole = proto::parse_offset_hole(*chunk, payload);
    if (!hole || !proto::range_within(hole->offset, hole->length, request.offset, request.length)) {
      co_return fail_all("OFFSET_HOLE outside its request");
    }
    std::memset(pending.read_buffer.data() + (hole->offset - request.offset), 0, hole->length);
    pending.covered += hole->length;
  } else if (type == static_cast<std::uint16_t>(proto::ChunkType::kBlockStatus)) {
    if (request.command() != proto::Command::kBlockStatus) {
      co_return fail_all("BLOCK_STATUS chunk for another command");
    }
    if (chunk->length > kMaxBlockStatusPayload) co_return fail_all("BLOCK_STATUS chunk too long");
    scratch_.resize(chunk->length);
    const int got_payload = co_await stream_->read_exact(scratch_.data(), scratch_.size());
    if (got_payload < 0) co_return connection_lost("the server closed the connection in a chunk");
    auto status = proto::parse_block_status(*chunk, scratch_);
    if (!status) co_return fail_all("bad BLOCK_STATUS chunk");
    if (!negotiated_.base_allocation || status->context_id != negotiated_.context_id) {
      co_return fail_all("BLOCK_STATUS for a context not negotiated");
    }
    if (!pending.got_status) {
      // Only the first chunk counts (a server sends one per context; we asked for one).
      std::vector<ExtentStatus>& extents = *pending.extents;
      std::uint64_t total = 0;
      for (std::size_t i = 0; i < status->count() && total < request.length; ++i) {
        const proto::Extent extent = status->extent(i);
        const std::uint64_t length = std::min<std::uint64_t>(extent.length, request.length - total);
        if (length == 0) break;  // a zero-length extent ends what we can use
        total += length;
        if (!extents.empty() && extents.back().flags == extent.flags) {
          extents.back().length += length;
        } else if (extents.size() < kMaxExtents) {
          extents.push_back(ExtentStatus{extent.flags, length});
        } else {
          break;
        }
      }
      pending.got_status = !extents.empty();
    }
  } else if (proto::is_error_chunk(type)) {
    if (chunk->length > kMaxErrorPayload) co_return fail_all("error chunk too long");
    scratch_.resize(chunk->length);
    const int got_payload = co_await stream_->read_exact(scratch_.data(), scratch_.size());
    if (got_payload < 0) co_return connection_lost("the server closed the connection in a chunk");
    auto error = proto::parse_error_chunk(*chunk, scratch_);
    if (!error) co_return fail_all("bad error chunk");
    const int errno_value = error->error == 0 ? EINVAL : proto::nbd_to_errno(error->error);
    if (pending.result == 0) pending.result = -errno_value;
  } else if (type != static_cast<std::uint16_t>(proto::ChunkType::kNone)) {
    co_return fail_all("unknown chunk type");  // parse_chunk_header refuses these already
  }

  if (chunk->done()) {
    if (pending.result == 0 && request.command() == proto::Command::kRead &&
        pending.covered != request.length) {
      pending.result = -EIO;  // the server left part of the buffer unfilled
    }
    if (pending.result == 0 && request.command() == proto::Command::kBlockStatus &&
        !pending.got_status) {
      pending.result = -EIO;
    }
    complete(pending);
  }
  co_return 0;
}

}  // namespace spindle::block::nbd
