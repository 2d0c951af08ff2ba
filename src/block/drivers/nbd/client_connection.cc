#include "block/drivers/nbd/client_connection.h"

#include <fmt/format.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "io/socket.h"

namespace spindle::block::nbd {

namespace proto = spindle::nbd;

namespace {

// Caps on server-chosen payloads the client buffers (data goes straight to the caller's buffer
// and is bounded by the request instead). BLOCK_STATUS: the spec's SHOULD of 2^20 extents.
constexpr std::uint32_t kMaxBlockStatusPayload = 4 + (1u << 20) * proto::kExtentSize;
constexpr std::uint32_t kMaxErrorPayload = 64u << 10;

coro::Task<base::Result<std::unique_ptr<io::Channel>>> open_socket(const NbdUri& uri) {
  if (uri.unix_socket) co_return co_await io::connect_unix(uri.socket_path);
  co_return co_await io::connect_tcp(uri.host, uri.port);
}

}  // namespace

ClientConnection::~ClientConnection() {
  tls_.reset();
  if (channel_) channel_->close();
}

coro::Task<ConnectOutcome> ClientConnection::connect(
    NbdUri uri, std::shared_ptr<const io::TlsCredentials> credentials) {
  std::shared_ptr<ClientConnection> connection(new ClientConnection(*aio::current_context()));
  auto channel = co_await open_socket(uri);
  if (!channel.ok()) {
    co_return ConnectOutcome{nullptr, channel.error(),
                             fmt::format("cannot connect to {}: {}", describe(uri),
                                         std::strerror(channel.error()))};
  }
  connection->channel_ = std::move(channel).value();
  connection->stream_ = connection->channel_.get();
  const int negotiated = co_await connection->handshake(uri, std::move(credentials));
  if (negotiated < 0) {
    connection->channel_->close();
    co_return ConnectOutcome{nullptr, -negotiated,
                             fmt::format("{}: {}", describe(uri), connection->error_message_)};
  }
  coro::spawn(*connection->context_, connection->reader_loop(connection));
  co_return ConnectOutcome{std::move(connection), 0, {}};
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

coro::Task<int> ClientConnection::handshake(const NbdUri& uri,
                                            std::shared_ptr<const io::TlsCredentials> credentials) {
  using proto::Option;
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
    tls_ = io::TlsSession::create(*channel_, std::move(credentials),
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
    details_.structured = true;
  } else if (!proto::is_error_reply(reply_header_.type)) {
    co_return handshake_error(EPROTO, "unexpected reply to NBD_OPT_STRUCTURED_REPLY");
  }

  if (details_.structured) {
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
          details_.base_allocation = true;
          details_.context_id = context->context_id;
        }
        continue;
      }
      if (reply_header_.type != static_cast<std::uint32_t>(OptionReply::kAck) &&
          !proto::is_error_reply(reply_header_.type)) {
        co_return handshake_error(EPROTO, "unexpected reply to NBD_OPT_SET_META_CONTEXT");
      }
      if (proto::is_error_reply(reply_header_.type)) details_.base_allocation = false;
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
        details_.size = info->size;
        details_.flags = info->transmission_flags;
        have_export = true;
      } else if (*info_type == static_cast<std::uint16_t>(proto::Info::kBlockSize)) {
        auto sizes = proto::parse_reply_info_block_size(reply_data_);
        if (sizes) details_.block_size = *sizes;  // a bad one is ignored (the spec allows it)
      } else if (*info_type == static_cast<std::uint16_t>(proto::Info::kDescription)) {
        auto text = proto::parse_reply_info_string(reply_data_);
        if (text) details_.description = std::string(*text);
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
    details_.size = info->size;
    details_.flags = info->transmission_flags;
    details_.used_export_name = true;
  }
  // Without structured replies, BLOCK_STATUS cannot be used.
  if (!details_.structured) details_.base_allocation = false;
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
                                               ExtentStatus& status) {
  Pending pending;
  pending.header.type = static_cast<std::uint16_t>(proto::Command::kBlockStatus);
  pending.header.flags = proto::kCmdFlagReqOne;
  pending.header.offset = offset;
  pending.header.length = length;
  pending.status = &status;
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
  if (dead_) co_return -EIO;
  pending.header.cookie = next_cookie_++;
  in_flight_.emplace(pending.header.cookie, &pending);
  const auto header = proto::encode_request(pending.header);
  {
    auto guard = co_await send_mutex_.scoped_lock();
    if (!dead_) {  // the connection may have died while we queued for the lock
      const iovec parts[2] = {{const_cast<std::byte*>(header.data()), header.size()},
                              {const_cast<std::byte*>(payload.data()), payload.size()}};
      const int sent = co_await stream_->writev_all(std::span(parts, payload.empty() ? 1 : 2));
      if (sent < 0) fail_all(fmt::format("sending a request failed: {}", std::strerror(-sent)));
    }
  }
  // fail_all() (ours or the reader's) has completed `pending` if the connection died.
  co_await pending.done.wait();
  co_return pending.result;
}

coro::Task<void> ClientConnection::disconnect() {
  aio::Context* origin = aio::current_context();
  co_await coro::switch_to(*context_);
  if (!dead_) {
    auto guard = co_await send_mutex_.scoped_lock();
    if (!dead_) {
      proto::RequestHeader request;
      request.type = static_cast<std::uint16_t>(proto::Command::kDisconnect);
      request.cookie = next_cookie_++;
      const auto header = proto::encode_request(request);
      co_await stream_->write_all(header.data(), header.size());  // best effort
      if (tls_) tls_->say_goodbye();
    }
  }
  channel_->close();  // the reader resumes with -ECANCELED and fails anything left
  co_await reader_done_.wait();
  co_await coro::switch_to(*origin);
}

void ClientConnection::abort() noexcept {
  if (channel_) channel_->close();
}

// ---------------------------------------------------------------------------------------------
// The reply reader

void ClientConnection::complete(Pending& pending) noexcept {
  in_flight_.erase(pending.header.cookie);
  pending.done.set();  // wakes the request on its home context (this one), after we suspend
}

int ClientConnection::fail_all(std::string reason) {
  if (!dead_) {
    dead_ = true;
    death_reason_ = std::move(reason);
  }
  auto pending = std::move(in_flight_);
  in_flight_.clear();
  for (auto& [cookie, request] : pending) {
    request->result = -EIO;
    request->done.set();
  }
  channel_->close();
  return -EPROTO;
}

coro::Task<void> ClientConnection::reader_loop(std::shared_ptr<ClientConnection> self) {
  // `self` keeps the connection alive until the reader has finished.
  std::array<std::byte, proto::kChunkHeaderSize> header;
  for (;;) {
    const int got = co_await stream_->read_exact(header.data(), 4);
    if (got < 0) {
      fail_all(got == -ECONNRESET ? "the server closed the connection"
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
  reader_finished_.store(true, std::memory_order_release);
  reader_done_.set();
}

coro::Task<int> ClientConnection::read_simple_reply(
    std::span<std::byte, proto::kChunkHeaderSize> header) {
  const int got = co_await stream_->read_exact(header.data() + 4, proto::kSimpleReplyHeaderSize - 4);
  if (got < 0) co_return fail_all("the server closed the connection in a reply header");
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
    if (details_.structured) co_return fail_all("simple reply with data after structured replies");
    const int data = co_await stream_->read_exact(pending.read_buffer.data(), pending.read_buffer.size());
    if (data < 0) co_return fail_all("the server closed the connection in READ data");
  } else if (command == proto::Command::kBlockStatus) {
    co_return fail_all("simple success reply to NBD_CMD_BLOCK_STATUS");
  }
  complete(pending);
  co_return 0;
}

coro::Task<int> ClientConnection::read_chunk(std::span<std::byte, proto::kChunkHeaderSize> header) {
  const int got = co_await stream_->read_exact(header.data() + 4, proto::kChunkHeaderSize - 4);
  if (got < 0) co_return fail_all("the server closed the connection in a chunk header");
  auto chunk = proto::parse_chunk_header(header, max_chunk_);
  if (!chunk) {
    co_return fail_all(fmt::format("bad structured reply chunk ({})",
                                   proto::parse_error_name(chunk.error())));
  }
  if (!details_.structured) co_return fail_all("structured reply without negotiation");
  const auto found = in_flight_.find(chunk->cookie);
  if (found == in_flight_.end()) co_return fail_all("reply chunk with an unknown cookie");
  Pending& pending = *found->second;
  const proto::RequestHeader& request = pending.header;
  const std::uint16_t type = chunk->type;

  if (type == static_cast<std::uint16_t>(proto::ChunkType::kOffsetData)) {
    if (request.command() != proto::Command::kRead) co_return fail_all("OFFSET_DATA for a non-READ");
    std::array<std::byte, proto::kOffsetDataPrefixSize> prefix;
    const int got_prefix = co_await stream_->read_exact(prefix.data(), prefix.size());
    if (got_prefix < 0) co_return fail_all("the server closed the connection in a chunk");
    auto data = proto::parse_offset_data(*chunk, prefix);
    if (!data || !proto::range_within(data->offset, data->data_length, request.offset, request.length)) {
      co_return fail_all("OFFSET_DATA outside its request");
    }
    std::byte* target = pending.read_buffer.data() + (data->offset - request.offset);
    const int got_data = co_await stream_->read_exact(target, data->data_length);
    if (got_data < 0) co_return fail_all("the server closed the connection in READ data");
    pending.covered += data->data_length;
  } else if (type == static_cast<std::uint16_t>(proto::ChunkType::kOffsetHole)) {
    if (request.command() != proto::Command::kRead) co_return fail_all("OFFSET_HOLE for a non-READ");
    std::array<std::byte, 12> payload;
    const int got_payload = co_await stream_->read_exact(payload.data(), payload.size());
    if (got_payload < 0) co_return fail_all("the server closed the connection in a chunk");
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
    if (got_payload < 0) co_return fail_all("the server closed the connection in a chunk");
    auto status = proto::parse_block_status(*chunk, scratch_);
    if (!status) co_return fail_all("bad BLOCK_STATUS chunk");
    if (!details_.base_allocation || status->context_id != details_.context_id) {
      co_return fail_all("BLOCK_STATUS for a context not negotiated");
    }
    if (!pending.got_status) {
      // Merge leading extents with equal flags (REQ_ONE asks for one; be lenient).
      const proto::Extent first = status->extent(0);
      std::uint64_t length = first.length;
      for (std::size_t i = 1; i < status->count() && status->extent(i).flags == first.flags; ++i) {
        length += status->extent(i).length;
      }
      pending.status->flags = first.flags;
      pending.status->length = length;
      pending.got_status = true;
    }
  } else if (proto::is_error_chunk(type)) {
    if (chunk->length > kMaxErrorPayload) co_return fail_all("error chunk too long");
    scratch_.resize(chunk->length);
    const int got_payload = co_await stream_->read_exact(scratch_.data(), scratch_.size());
    if (got_payload < 0) co_return fail_all("the server closed the connection in a chunk");
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
