// The NBD wire protocol: see protocol.h. Every parser reads through a Reader that checks the
// bytes left before each field, so no length from the wire is trusted before it is compared
// with what is present and with its cap.
#include "nbd/protocol.h"

#include <cerrno>
#include <cstring>

#include "base/byte_order.h"

namespace spindle::nbd {
namespace {

// Sequential big-endian reader over a span; a failed read leaves it unchanged.
class Reader {
 public:
  explicit Reader(std::span<const std::byte> bytes) noexcept : bytes_(bytes) {}

  std::size_t remaining() const noexcept { return bytes_.size() - position_; }

  bool u16(std::uint16_t& value) noexcept {
    if (remaining() < 2) return false;
    value = base::load_be16(bytes_.data() + position_);
    position_ += 2;
    return true;
  }
  bool u32(std::uint32_t& value) noexcept {
    if (remaining() < 4) return false;
    value = base::load_be32(bytes_.data() + position_);
    position_ += 4;
    return true;
  }
  bool u64(std::uint64_t& value) noexcept {
    if (remaining() < 8) return false;
    value = base::load_be64(bytes_.data() + position_);
    position_ += 8;
    return true;
  }
  // `length` bytes as a view; false if fewer remain.
  bool bytes(std::size_t length, std::span<const std::byte>& out) noexcept {
    if (remaining() < length) return false;
    out = bytes_.subspan(position_, length);
    position_ += length;
    return true;
  }

 private:
  std::span<const std::byte> bytes_;
  std::size_t position_ = 0;
};

std::string_view as_string(std::span<const std::byte> bytes) noexcept {
  return {reinterpret_cast<const char*>(bytes.data()), bytes.size()};
}

bool contains_nul(std::string_view text) noexcept {
  return text.find('\0') != std::string_view::npos;
}

// A string of `length` bytes from the reader, checked against the data left (kBadLength), its
// cap (kStringTooLong) and for NUL (kInvalidValue).
ParseResult<std::string_view> read_string(Reader& reader, std::size_t length,
                                          std::size_t max_length) noexcept {
  if (length > reader.remaining()) return ParseError::kBadLength;
  if (length > max_length) return ParseError::kStringTooLong;
  std::span<const std::byte> bytes;
  reader.bytes(length, bytes);
  const std::string_view text = as_string(bytes);
  if (contains_nul(text)) return ParseError::kInvalidValue;
  return text;
}

// Cuts a human-readable message to the protocol's string limit without splitting a UTF-8
// sequence.
std::string_view clip_message(std::string_view message) noexcept {
  if (message.size() <= kMaxStringLength) return message;
  std::size_t cut = kMaxStringLength;
  while (cut > 0 && (static_cast<unsigned char>(message[cut]) & 0xc0) == 0x80) --cut;
  return message.substr(0, cut);
}

// Appending big-endian fields to a vector.
void put16(std::vector<std::byte>& out, std::uint16_t value) {
  const std::size_t at = out.size();
  out.resize(at + 2);
  base::store_be16(out.data() + at, value);
}
void put32(std::vector<std::byte>& out, std::uint32_t value) {
  const std::size_t at = out.size();
  out.resize(at + 4);
  base::store_be32(out.data() + at, value);
}
void put64(std::vector<std::byte>& out, std::uint64_t value) {
  const std::size_t at = out.size();
  out.resize(at + 8);
  base::store_be64(out.data() + at, value);
}
void put_bytes(std::vector<std::byte>& out, std::span<const std::byte> bytes) {
  out.insert(out.end(), bytes.begin(), bytes.end());
}
void put_string(std::vector<std::byte>& out, std::string_view text) {
  put_bytes(out, std::as_bytes(std::span(text.data(), text.size())));
}
template <std::size_t N>
void put_array(std::vector<std::byte>& out, const std::array<std::byte, N>& bytes) {
  out.insert(out.end(), bytes.begin(), bytes.end());
}

constexpr std::uint32_t u32_size(std::size_t size) noexcept {
  return static_cast<std::uint32_t>(size);
}

constexpr bool is_power_of_two(std::uint32_t value) noexcept {
  return value != 0 && (value & (value - 1)) == 0;
}

// Opens an option reply whose data length is not known yet; close_option_reply() fills it in.
std::size_t open_option_reply(std::vector<std::byte>& out, std::uint32_t option, OptionReply type) {
  const std::size_t at = out.size();
  put_array(out, encode_option_reply_header(option, type, 0));
  return at;
}
void close_option_reply(std::vector<std::byte>& out, std::size_t at) {
  base::store_be32(out.data() + at + 16, u32_size(out.size() - at - kOptionReplyHeaderSize));
}

std::size_t open_chunk(std::vector<std::byte>& out, std::uint64_t cookie, ChunkType type,
                       bool done) {
  const std::size_t at = out.size();
  put_array(out, encode_chunk_header(done ? kReplyFlagDone : 0, type, cookie, 0));
  return at;
}
void close_chunk(std::vector<std::byte>& out, std::size_t at) {
  base::store_be32(out.data() + at + 16, u32_size(out.size() - at - kChunkHeaderSize));
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Errors and names

std::string_view parse_error_name(ParseError error) noexcept {
  switch (error) {
    case ParseError::kTruncated:
      return "truncated";
    case ParseError::kBadMagic:
      return "bad magic";
    case ParseError::kBadLength:
      return "inconsistent length";
    case ParseError::kStringTooLong:
      return "string too long";
    case ParseError::kTooMany:
      return "count too large";
    case ParseError::kTooLarge:
      return "length or size too large";
    case ParseError::kInvalidValue:
      return "invalid value";
    case ParseError::kUnsupported:
      return "unsupported";
  }
  return "unknown";
}

Error errno_to_nbd(int errno_value) noexcept {
  if (errno_value < 0) errno_value = -errno_value;
  switch (errno_value) {
    case 0:
      return Error::kNone;
    case EPERM:
    case EROFS:
      return Error::kPermission;
    case EIO:
      return Error::kIo;
    case ENOMEM:
      return Error::kNoMemory;
    case EINVAL:
      return Error::kInvalid;
    case ENOSPC:
    case EDQUOT:
    case EFBIG:
      return Error::kNoSpace;
    case EOVERFLOW:
      return Error::kOverflow;
#if EOPNOTSUPP != ENOTSUP
    case EOPNOTSUPP:
#endif
    case ENOTSUP:
      return Error::kNotSupported;
    case ESHUTDOWN:
      return Error::kShutdown;
    default:
      return Error::kInvalid;
  }
}

Error errno_to_nbd(int errno_value, Command command, std::uint16_t command_flags) noexcept {
  const Error error = errno_to_nbd(errno_value);
  if (error == Error::kNotSupported &&
      !(command == Command::kWriteZeroes && (command_flags & kCmdFlagFastZero) != 0)) {
    return Error::kInvalid;
  }
  if (error == Error::kOverflow &&
      !(command == Command::kRead && (command_flags & kCmdFlagDf) != 0)) {
    return Error::kInvalid;
  }
  return error;
}

int nbd_to_errno(std::uint32_t nbd_error) noexcept {
  switch (static_cast<Error>(nbd_error)) {
    case Error::kNone:
      return 0;
    case Error::kPermission:
      return EPERM;
    case Error::kIo:
      return EIO;
    case Error::kNoMemory:
      return ENOMEM;
    case Error::kInvalid:
      return EINVAL;
    case Error::kNoSpace:
      return ENOSPC;
    case Error::kOverflow:
      return EOVERFLOW;
    case Error::kNotSupported:
      return ENOTSUP;
    case Error::kShutdown:
      return ESHUTDOWN;
  }
  return EINVAL;
}

std::string_view option_name(std::uint32_t option) noexcept {
  switch (static_cast<Option>(option)) {
    case Option::kExportName:
      return "NBD_OPT_EXPORT_NAME";
    case Option::kAbort:
      return "NBD_OPT_ABORT";
    case Option::kList:
      return "NBD_OPT_LIST";
    case Option::kStartTls:
      return "NBD_OPT_STARTTLS";
    case Option::kInfo:
      return "NBD_OPT_INFO";
    case Option::kGo:
      return "NBD_OPT_GO";
    case Option::kStructuredReply:
      return "NBD_OPT_STRUCTURED_REPLY";
    case Option::kListMetaContext:
      return "NBD_OPT_LIST_META_CONTEXT";
    case Option::kSetMetaContext:
      return "NBD_OPT_SET_META_CONTEXT";
    case Option::kExtendedHeaders:
      return "NBD_OPT_EXTENDED_HEADERS";
  }
  return "unknown";
}

std::string_view option_reply_name(std::uint32_t reply_type) noexcept {
  switch (static_cast<OptionReply>(reply_type)) {
    case OptionReply::kAck:
      return "NBD_REP_ACK";
    case OptionReply::kServer:
      return "NBD_REP_SERVER";
    case OptionReply::kInfo:
      return "NBD_REP_INFO";
    case OptionReply::kMetaContext:
      return "NBD_REP_META_CONTEXT";
    case OptionReply::kErrUnsupported:
      return "NBD_REP_ERR_UNSUP";
    case OptionReply::kErrPolicy:
      return "NBD_REP_ERR_POLICY";
    case OptionReply::kErrInvalid:
      return "NBD_REP_ERR_INVALID";
    case OptionReply::kErrPlatform:
      return "NBD_REP_ERR_PLATFORM";
    case OptionReply::kErrTlsRequired:
      return "NBD_REP_ERR_TLS_REQD";
    case OptionReply::kErrUnknown:
      return "NBD_REP_ERR_UNKNOWN";
    case OptionReply::kErrShutdown:
      return "NBD_REP_ERR_SHUTDOWN";
    case OptionReply::kErrBlockSizeRequired:
      return "NBD_REP_ERR_BLOCK_SIZE_REQD";
    case OptionReply::kErrTooBig:
      return "NBD_REP_ERR_TOO_BIG";
  }
  return "unknown";
}

std::string_view command_name(std::uint16_t command) noexcept {
  switch (static_cast<Command>(command)) {
    case Command::kRead:
      return "NBD_CMD_READ";
    case Command::kWrite:
      return "NBD_CMD_WRITE";
    case Command::kDisconnect:
      return "NBD_CMD_DISC";
    case Command::kFlush:
      return "NBD_CMD_FLUSH";
    case Command::kTrim:
      return "NBD_CMD_TRIM";
    case Command::kCache:
      return "NBD_CMD_CACHE";
    case Command::kWriteZeroes:
      return "NBD_CMD_WRITE_ZEROES";
    case Command::kBlockStatus:
      return "NBD_CMD_BLOCK_STATUS";
  }
  return "unknown";
}

std::string_view chunk_type_name(std::uint16_t chunk_type) noexcept {
  switch (static_cast<ChunkType>(chunk_type)) {
    case ChunkType::kNone:
      return "NBD_REPLY_TYPE_NONE";
    case ChunkType::kOffsetData:
      return "NBD_REPLY_TYPE_OFFSET_DATA";
    case ChunkType::kOffsetHole:
      return "NBD_REPLY_TYPE_OFFSET_HOLE";
    case ChunkType::kBlockStatus:
      return "NBD_REPLY_TYPE_BLOCK_STATUS";
    case ChunkType::kError:
      return "NBD_REPLY_TYPE_ERROR";
    case ChunkType::kErrorOffset:
      return "NBD_REPLY_TYPE_ERROR_OFFSET";
  }
  return "unknown";
}

std::string_view error_name(std::uint32_t nbd_error) noexcept {
  switch (static_cast<Error>(nbd_error)) {
    case Error::kNone:
      return "success";
    case Error::kPermission:
      return "NBD_EPERM";
    case Error::kIo:
      return "NBD_EIO";
    case Error::kNoMemory:
      return "NBD_ENOMEM";
    case Error::kInvalid:
      return "NBD_EINVAL";
    case Error::kNoSpace:
      return "NBD_ENOSPC";
    case Error::kOverflow:
      return "NBD_EOVERFLOW";
    case Error::kNotSupported:
      return "NBD_ENOTSUP";
    case Error::kShutdown:
      return "NBD_ESHUTDOWN";
  }
  return "unknown";
}

OptionReply option_error_for(ParseError error) noexcept {
  switch (error) {
    case ParseError::kTooMany:
    case ParseError::kTooLarge:
      return OptionReply::kErrTooBig;
    default:
      return OptionReply::kErrInvalid;
  }
}

// ---------------------------------------------------------------------------------------------
// Handshake: greeting and client flags

std::array<std::byte, kGreetingSize> encode_greeting(std::uint16_t handshake_flags) noexcept {
  std::array<std::byte, kGreetingSize> bytes{};
  base::store_be64(bytes.data(), kNbdMagic);
  base::store_be64(bytes.data() + 8, kIHaveOpt);
  base::store_be16(bytes.data() + 16, handshake_flags);
  return bytes;
}

ParseResult<std::uint16_t> parse_greeting(std::span<const std::byte> bytes) noexcept {
  if (bytes.size() < 16) return ParseError::kTruncated;
  if (base::load_be64(bytes.data()) != kNbdMagic) return ParseError::kBadMagic;
  const std::uint64_t second = base::load_be64(bytes.data() + 8);
  if (second == kOldstyleMagic) return ParseError::kUnsupported;
  if (second != kIHaveOpt) return ParseError::kBadMagic;
  if (bytes.size() < kGreetingSize) return ParseError::kTruncated;
  return base::load_be16(bytes.data() + 16);
}

std::array<std::byte, kClientFlagsSize> encode_client_flags(std::uint32_t client_flags) noexcept {
  std::array<std::byte, kClientFlagsSize> bytes{};
  base::store_be32(bytes.data(), client_flags);
  return bytes;
}

ParseResult<std::uint32_t> parse_client_flags(std::span<const std::byte> bytes) noexcept {
  if (bytes.size() < kClientFlagsSize) return ParseError::kTruncated;
  return base::load_be32(bytes.data());
}

bool client_flags_acceptable(std::uint32_t client_flags, std::uint16_t handshake_flags) noexcept {
  std::uint32_t allowed = 0;
  if (handshake_flags & kFlagFixedNewstyle) allowed |= kClientFlagFixedNewstyle;
  if (handshake_flags & kFlagNoZeroes) allowed |= kClientFlagNoZeroes;
  return (client_flags & ~allowed) == 0;
}

// ---------------------------------------------------------------------------------------------
// Handshake: options

std::array<std::byte, kOptionHeaderSize> encode_option_header(std::uint32_t option,
                                                              std::uint32_t length) noexcept {
  std::array<std::byte, kOptionHeaderSize> bytes{};
  base::store_be64(bytes.data(), kIHaveOpt);
  base::store_be32(bytes.data() + 8, option);
  base::store_be32(bytes.data() + 12, length);
  return bytes;
}

ParseResult<OptionHeader> parse_option_header(std::span<const std::byte> bytes,
                                              std::uint32_t max_length) noexcept {
  if (bytes.size() < kOptionHeaderSize) return ParseError::kTruncated;
  if (base::load_be64(bytes.data()) != kIHaveOpt) return ParseError::kBadMagic;
  OptionHeader header;
  header.option = base::load_be32(bytes.data() + 8);
  header.length = base::load_be32(bytes.data() + 12);
  if (header.length > max_length) return ParseError::kTooLarge;
  return header;
}

void append_option(std::vector<std::byte>& out, Option option, std::span<const std::byte> data) {
  put_array(out, encode_option_header(static_cast<std::uint32_t>(option), u32_size(data.size())));
  put_bytes(out, data);
}

void append_option_export_name(std::vector<std::byte>& out, std::string_view name) {
  append_option(out, Option::kExportName, std::as_bytes(std::span(name.data(), name.size())));
}

void append_option_info(std::vector<std::byte>& out, Option info_or_go, std::string_view name,
                        std::span<const Info> requests) {
  put_array(out, encode_option_header(static_cast<std::uint32_t>(info_or_go),
                                      u32_size(4 + name.size() + 2 + 2 * requests.size())));
  put32(out, u32_size(name.size()));
  put_string(out, name);
  put16(out, static_cast<std::uint16_t>(requests.size()));
  for (Info info : requests) put16(out, static_cast<std::uint16_t>(info));
}

void append_option_meta_context(std::vector<std::byte>& out, Option list_or_set,
                                std::string_view export_name,
                                std::span<const std::string_view> queries) {
  const std::size_t at = out.size();
  put_array(out, encode_option_header(static_cast<std::uint32_t>(list_or_set), 0));
  put32(out, u32_size(export_name.size()));
  put_string(out, export_name);
  put32(out, u32_size(queries.size()));
  for (std::string_view query : queries) {
    put32(out, u32_size(query.size()));
    put_string(out, query);
  }
  base::store_be32(out.data() + at + 12, u32_size(out.size() - at - kOptionHeaderSize));
}

ParseResult<std::string_view> parse_export_name(std::span<const std::byte> data,
                                                std::size_t max_name) noexcept {
  Reader reader(data);
  return read_string(reader, data.size(), max_name);
}

ParseResult<InfoRequest> parse_info_request(std::span<const std::byte> data, std::size_t max_name) {
  Reader reader(data);
  std::uint32_t name_length = 0;
  if (!reader.u32(name_length)) return ParseError::kBadLength;
  // The name may not eat into the u16 count that must follow it.
  if (reader.remaining() < 2 || name_length > reader.remaining() - 2) {
    return ParseError::kBadLength;
  }
  auto name = read_string(reader, name_length, max_name);
  if (!name) return name.error();
  std::uint16_t count = 0;
  reader.u16(count);
  if (reader.remaining() != std::size_t{count} * 2) return ParseError::kBadLength;
  InfoRequest request;
  request.name = *name;
  request.requests.reserve(count);
  for (std::uint16_t i = 0; i < count; ++i) {
    std::uint16_t info = 0;
    reader.u16(info);
    request.requests.push_back(info);
  }
  return request;
}

ParseResult<MetaContextRequest> parse_meta_context_request(std::span<const std::byte> data,
                                                           std::size_t max_string,
                                                           std::uint32_t max_queries) {
  Reader reader(data);
  std::uint32_t name_length = 0;
  if (!reader.u32(name_length)) return ParseError::kBadLength;
  // The name may not eat into the u32 count that must follow it.
  if (reader.remaining() < 4 || name_length > reader.remaining() - 4) {
    return ParseError::kBadLength;
  }
  auto name = read_string(reader, name_length, max_string);
  if (!name) return name.error();
  std::uint32_t count = 0;
  reader.u32(count);
  // Each query needs at least its 4-byte length: reject impossible counts before reserving.
  if (count > reader.remaining() / 4) return ParseError::kBadLength;
  if (count > max_queries) return ParseError::kTooMany;
  MetaContextRequest request;
  request.export_name = *name;
  request.queries.reserve(count);
  for (std::uint32_t i = 0; i < count; ++i) {
    std::uint32_t query_length = 0;
    if (!reader.u32(query_length)) return ParseError::kBadLength;
    auto query = read_string(reader, query_length, max_string);
    if (!query) return query.error();
    request.queries.push_back(*query);
  }
  if (reader.remaining() != 0) return ParseError::kBadLength;
  return request;
}

// ---------------------------------------------------------------------------------------------
// Handshake: option replies

std::array<std::byte, kOptionReplyHeaderSize> encode_option_reply_header(
    std::uint32_t option, OptionReply type, std::uint32_t length) noexcept {
  std::array<std::byte, kOptionReplyHeaderSize> bytes{};
  base::store_be64(bytes.data(), kOptionReplyMagic);
  base::store_be32(bytes.data() + 8, option);
  base::store_be32(bytes.data() + 12, static_cast<std::uint32_t>(type));
  base::store_be32(bytes.data() + 16, length);
  return bytes;
}

ParseResult<OptionReplyHeader> parse_option_reply_header(std::span<const std::byte> bytes,
                                                         std::uint32_t max_length) noexcept {
  if (bytes.size() < kOptionReplyHeaderSize) return ParseError::kTruncated;
  if (base::load_be64(bytes.data()) != kOptionReplyMagic) return ParseError::kBadMagic;
  OptionReplyHeader header;
  header.option = base::load_be32(bytes.data() + 8);
  header.type = base::load_be32(bytes.data() + 12);
  header.length = base::load_be32(bytes.data() + 16);
  if (header.length > max_length) return ParseError::kTooLarge;
  return header;
}

void append_option_reply(std::vector<std::byte>& out, std::uint32_t option, OptionReply type,
                         std::span<const std::byte> data) {
  put_array(out, encode_option_reply_header(option, type, u32_size(data.size())));
  put_bytes(out, data);
}

void append_reply_ack(std::vector<std::byte>& out, std::uint32_t option) {
  append_option_reply(out, option, OptionReply::kAck);
}

void append_reply_server(std::vector<std::byte>& out, std::uint32_t option, std::string_view name,
                         std::string_view description) {
  const std::size_t at = open_option_reply(out, option, OptionReply::kServer);
  put32(out, u32_size(name.size()));
  put_string(out, name);
  put_string(out, clip_message(description));
  close_option_reply(out, at);
}

void append_reply_info_export(std::vector<std::byte>& out, std::uint32_t option, std::uint64_t size,
                              std::uint16_t transmission_flags) {
  const std::size_t at = open_option_reply(out, option, OptionReply::kInfo);
  put16(out, static_cast<std::uint16_t>(Info::kExport));
  put64(out, size);
  put16(out, transmission_flags);
  close_option_reply(out, at);
}

void append_reply_info_name(std::vector<std::byte>& out, std::uint32_t option,
                            std::string_view name) {
  const std::size_t at = open_option_reply(out, option, OptionReply::kInfo);
  put16(out, static_cast<std::uint16_t>(Info::kName));
  put_string(out, name);
  close_option_reply(out, at);
}

void append_reply_info_description(std::vector<std::byte>& out, std::uint32_t option,
                                   std::string_view description) {
  const std::size_t at = open_option_reply(out, option, OptionReply::kInfo);
  put16(out, static_cast<std::uint16_t>(Info::kDescription));
  put_string(out, clip_message(description));
  close_option_reply(out, at);
}

void append_reply_info_block_size(std::vector<std::byte>& out, std::uint32_t option,
                                  std::uint32_t minimum, std::uint32_t preferred,
                                  std::uint32_t maximum) {
  const std::size_t at = open_option_reply(out, option, OptionReply::kInfo);
  put16(out, static_cast<std::uint16_t>(Info::kBlockSize));
  put32(out, minimum);
  put32(out, preferred);
  put32(out, maximum);
  close_option_reply(out, at);
}

void append_reply_meta_context(std::vector<std::byte>& out, std::uint32_t option,
                               std::uint32_t context_id, std::string_view name) {
  const std::size_t at = open_option_reply(out, option, OptionReply::kMetaContext);
  put32(out, context_id);
  put_string(out, name);
  close_option_reply(out, at);
}

void append_reply_error(std::vector<std::byte>& out, std::uint32_t option, OptionReply type,
                        std::string_view message) {
  if (!is_error_reply(static_cast<std::uint32_t>(type))) {
    base::fatal("nbd::append_reply_error with a non-error reply type {}",
                static_cast<std::uint32_t>(type));
  }
  const std::size_t at = open_option_reply(out, option, type);
  put_string(out, clip_message(message));
  close_option_reply(out, at);
}

ParseResult<ServerReply> parse_reply_server(std::span<const std::byte> data,
                                            std::size_t max_string) noexcept {
  Reader reader(data);
  std::uint32_t name_length = 0;
  if (!reader.u32(name_length)) return ParseError::kTruncated;
  auto name = read_string(reader, name_length, max_string);
  if (!name) return name.error();
  auto description = read_string(reader, reader.remaining(), max_string);
  if (!description) return description.error();
  return ServerReply{*name, *description};
}

ParseResult<std::uint16_t> parse_reply_info_type(std::span<const std::byte> data) noexcept {
  if (data.size() < 2) return ParseError::kTruncated;
  return base::load_be16(data.data());
}

ParseResult<ExportInfo> parse_reply_info_export(std::span<const std::byte> data) noexcept {
  if (data.size() != 12) return ParseError::kBadLength;
  if (base::load_be16(data.data()) != static_cast<std::uint16_t>(Info::kExport)) {
    return ParseError::kInvalidValue;
  }
  ExportInfo info;
  info.size = base::load_be64(data.data() + 2);
  info.transmission_flags = base::load_be16(data.data() + 10);
  if (info.size > kMaxExportSize) return ParseError::kTooLarge;
  if (!(info.transmission_flags & kFlagHasFlags)) return ParseError::kInvalidValue;
  return info;
}

ParseResult<std::string_view> parse_reply_info_string(std::span<const std::byte> data,
                                                      std::size_t max_string) noexcept {
  Reader reader(data);
  std::uint16_t type = 0;
  if (!reader.u16(type)) return ParseError::kTruncated;
  return read_string(reader, reader.remaining(), max_string);
}

ParseResult<BlockSizeInfo> parse_reply_info_block_size(std::span<const std::byte> data) noexcept {
  if (data.size() != 14) return ParseError::kBadLength;
  if (base::load_be16(data.data()) != static_cast<std::uint16_t>(Info::kBlockSize)) {
    return ParseError::kInvalidValue;
  }
  BlockSizeInfo info;
  info.minimum = base::load_be32(data.data() + 2);
  info.preferred = base::load_be32(data.data() + 6);
  info.maximum = base::load_be32(data.data() + 10);
  if (!is_power_of_two(info.minimum) || info.minimum > (64u << 10)) {
    return ParseError::kInvalidValue;
  }
  if (!is_power_of_two(info.preferred) || info.preferred < info.minimum) {
    return ParseError::kInvalidValue;
  }
  if (info.maximum < info.minimum) return ParseError::kInvalidValue;
  return info;
}

ParseResult<MetaContextReply> parse_reply_meta_context(std::span<const std::byte> data,
                                                       std::size_t max_string) noexcept {
  Reader reader(data);
  MetaContextReply reply;
  if (!reader.u32(reply.context_id)) return ParseError::kTruncated;
  if (reader.remaining() == 0) return ParseError::kBadLength;  // a context always has a name
  auto name = read_string(reader, reader.remaining(), max_string);
  if (!name) return name.error();
  reply.name = *name;
  return reply;
}

void append_export_name_reply(std::vector<std::byte>& out, std::uint64_t size,
                              std::uint16_t transmission_flags, bool no_zeroes) {
  put64(out, size);
  put16(out, transmission_flags);
  if (!no_zeroes) out.resize(out.size() + (kExportNameReplySize - kExportNameReplyShortSize));
}

ParseResult<ExportInfo> parse_export_name_reply(std::span<const std::byte> bytes) noexcept {
  if (bytes.size() < kExportNameReplyShortSize) return ParseError::kTruncated;
  ExportInfo info;
  info.size = base::load_be64(bytes.data());
  info.transmission_flags = base::load_be16(bytes.data() + 8);
  if (info.size > kMaxExportSize) return ParseError::kTooLarge;
  if (!(info.transmission_flags & kFlagHasFlags)) return ParseError::kInvalidValue;
  return info;
}

// ---------------------------------------------------------------------------------------------
// Transmission: requests

std::array<std::byte, kRequestHeaderSize> encode_request(const RequestHeader& request) noexcept {
  std::array<std::byte, kRequestHeaderSize> bytes{};
  base::store_be32(bytes.data(), kRequestMagic);
  base::store_be16(bytes.data() + 4, request.flags);
  base::store_be16(bytes.data() + 6, request.type);
  base::store_be64(bytes.data() + 8, request.cookie);
  base::store_be64(bytes.data() + 16, request.offset);
  base::store_be32(bytes.data() + 24, request.length);
  return bytes;
}

ParseResult<RequestHeader> parse_request(std::span<const std::byte> bytes) noexcept {
  if (bytes.size() < kRequestHeaderSize) return ParseError::kTruncated;
  if (base::load_be32(bytes.data()) != kRequestMagic) return ParseError::kBadMagic;
  RequestHeader request;
  request.flags = base::load_be16(bytes.data() + 4);
  request.type = base::load_be16(bytes.data() + 6);
  request.cookie = base::load_be64(bytes.data() + 8);
  request.offset = base::load_be64(bytes.data() + 16);
  request.length = base::load_be32(bytes.data() + 24);
  return request;
}

RequestVerdict validate_request(const RequestHeader& request,
                                const TransmissionPolicy& policy) noexcept {
  constexpr RequestVerdict kInvalid{Error::kInvalid, false};
  const std::uint16_t advertised = policy.transmission_flags;
  const Command command = request.command();

  // First, because every later EINVAL/EPERM for a WRITE obliges the server to drain `length`
  // bytes: an oversized payload cannot be drained safely, so the only answer is to disconnect.
  if (command == Command::kWrite && request.length > policy.max_write_payload) {
    return {Error::kInvalid, true};
  }

  // Which commands exist and were advertised.
  switch (command) {
    case Command::kDisconnect:
      return {};
    case Command::kRead:
    case Command::kWrite:
      break;
    case Command::kFlush:
      if (!(advertised & kFlagSendFlush)) return kInvalid;
      break;
    case Command::kTrim:
      if (!(advertised & kFlagSendTrim)) return kInvalid;
      break;
    case Command::kCache:
      if (!(advertised & kFlagSendCache)) return kInvalid;
      break;
    case Command::kWriteZeroes:
      if (!(advertised & kFlagSendWriteZeroes)) return kInvalid;
      break;
    case Command::kBlockStatus:
      if (!policy.structured_replies || !policy.block_status) return kInvalid;
      break;
    default:
      return kInvalid;
  }

  // Which flags are allowed for this command.
  std::uint16_t allowed = 0;
  if (advertised & kFlagSendFua) allowed |= kCmdFlagFua;
  switch (command) {
    case Command::kRead:
      if ((advertised & kFlagSendDf) && policy.structured_replies) allowed |= kCmdFlagDf;
      break;
    case Command::kWriteZeroes:
      allowed |= kCmdFlagNoHole;
      if (advertised & kFlagSendFastZero) allowed |= kCmdFlagFastZero;
      break;
    case Command::kBlockStatus:
      allowed |= kCmdFlagReqOne;
      break;
    default:
      break;
  }
  if (request.flags & ~allowed) return kInvalid;

  // Length limits.
  if ((command == Command::kRead || command == Command::kCache) &&
      request.length > policy.max_read_length) {
    return kInvalid;
  }
  if (command == Command::kFlush) {
    return request.offset == 0 && request.length == 0 ? RequestVerdict{} : kInvalid;
  }

  const bool writes =
      command == Command::kWrite || command == Command::kTrim || command == Command::kWriteZeroes;
  if (writes && (advertised & kFlagReadOnly)) return {Error::kPermission, false};
  if (command == Command::kBlockStatus && request.length == 0) return kInvalid;

  // Range: [offset, offset + length) inside the export, computed without wrapping.
  const std::uint64_t size =
      policy.export_size < kMaxExportSize ? policy.export_size : kMaxExportSize;
  if (request.offset > size || request.length > size - request.offset) {
    const bool grows = command == Command::kWrite || command == Command::kWriteZeroes;
    return {grows ? Error::kNoSpace : Error::kInvalid, false};
  }

  if (policy.min_block_size > 1 && (command == Command::kRead || command == Command::kWrite) &&
      (request.offset % policy.min_block_size != 0 ||
       request.length % policy.min_block_size != 0)) {
    return kInvalid;
  }
  return {};
}

// ---------------------------------------------------------------------------------------------
// Transmission: simple replies

std::array<std::byte, kSimpleReplyHeaderSize> encode_simple_reply(Error error,
                                                                  std::uint64_t cookie) noexcept {
  std::array<std::byte, kSimpleReplyHeaderSize> bytes{};
  base::store_be32(bytes.data(), kSimpleReplyMagic);
  base::store_be32(bytes.data() + 4, static_cast<std::uint32_t>(error));
  base::store_be64(bytes.data() + 8, cookie);
  return bytes;
}

ParseResult<SimpleReplyHeader> parse_simple_reply(std::span<const std::byte> bytes) noexcept {
  if (bytes.size() < kSimpleReplyHeaderSize) return ParseError::kTruncated;
  if (base::load_be32(bytes.data()) != kSimpleReplyMagic) return ParseError::kBadMagic;
  SimpleReplyHeader reply;
  reply.error = base::load_be32(bytes.data() + 4);
  reply.cookie = base::load_be64(bytes.data() + 8);
  return reply;
}

ReplyKind classify_reply(std::span<const std::byte, 4> magic) noexcept {
  switch (base::load_be32(magic.data())) {
    case kSimpleReplyMagic:
      return ReplyKind::kSimple;
    case kStructuredReplyMagic:
      return ReplyKind::kStructured;
    default:
      return ReplyKind::kBadMagic;
  }
}

// ---------------------------------------------------------------------------------------------
// Transmission: structured reply chunks

std::array<std::byte, kChunkHeaderSize> encode_chunk_header(std::uint16_t flags, ChunkType type,
                                                            std::uint64_t cookie,
                                                            std::uint32_t length) noexcept {
  std::array<std::byte, kChunkHeaderSize> bytes{};
  base::store_be32(bytes.data(), kStructuredReplyMagic);
  base::store_be16(bytes.data() + 4, flags);
  base::store_be16(bytes.data() + 6, static_cast<std::uint16_t>(type));
  base::store_be64(bytes.data() + 8, cookie);
  base::store_be32(bytes.data() + 16, length);
  return bytes;
}

ParseResult<ChunkHeader> parse_chunk_header(std::span<const std::byte> bytes,
                                            std::uint32_t max_length) noexcept {
  if (bytes.size() < kChunkHeaderSize) return ParseError::kTruncated;
  if (base::load_be32(bytes.data()) != kStructuredReplyMagic) return ParseError::kBadMagic;
  ChunkHeader header;
  header.flags = base::load_be16(bytes.data() + 4);
  header.type = base::load_be16(bytes.data() + 6);
  header.cookie = base::load_be64(bytes.data() + 8);
  header.length = base::load_be32(bytes.data() + 16);
  if (header.length > max_length) return ParseError::kTooLarge;
  const std::uint32_t length = header.length;
  switch (static_cast<ChunkType>(header.type)) {
    case ChunkType::kNone:
      if (length != 0) return ParseError::kBadLength;
      if (!header.done()) return ParseError::kInvalidValue;
      break;
    case ChunkType::kOffsetData:
      if (length < kOffsetDataPrefixSize + 1) return ParseError::kBadLength;
      break;
    case ChunkType::kOffsetHole:
      if (length != 12) return ParseError::kBadLength;
      break;
    case ChunkType::kBlockStatus:
      if (length < 4 + kExtentSize || (length - 4) % kExtentSize != 0) {
        return ParseError::kBadLength;
      }
      break;
    case ChunkType::kErrorOffset:
      if (length < 14) return ParseError::kBadLength;
      break;
    case ChunkType::kError:
    default:
      if (!is_error_chunk(header.type)) return ParseError::kUnsupported;
      if (length < 6) return ParseError::kBadLength;
      break;
  }
  return header;
}

std::array<std::byte, kChunkHeaderSize> encode_none_chunk(std::uint64_t cookie) noexcept {
  return encode_chunk_header(kReplyFlagDone, ChunkType::kNone, cookie, 0);
}

std::array<std::byte, kChunkHeaderSize + kOffsetDataPrefixSize> encode_offset_data_header(
    std::uint64_t cookie, std::uint64_t offset, std::uint32_t data_length, bool done) noexcept {
  std::array<std::byte, kChunkHeaderSize + kOffsetDataPrefixSize> bytes{};
  const auto header =
      encode_chunk_header(done ? kReplyFlagDone : 0, ChunkType::kOffsetData, cookie,
                          data_length + static_cast<std::uint32_t>(kOffsetDataPrefixSize));
  std::memcpy(bytes.data(), header.data(), header.size());
  base::store_be64(bytes.data() + kChunkHeaderSize, offset);
  return bytes;
}

std::array<std::byte, kChunkHeaderSize + 12> encode_offset_hole(std::uint64_t cookie,
                                                                std::uint64_t offset,
                                                                std::uint32_t hole_length,
                                                                bool done) noexcept {
  std::array<std::byte, kChunkHeaderSize + 12> bytes{};
  const auto header =
      encode_chunk_header(done ? kReplyFlagDone : 0, ChunkType::kOffsetHole, cookie, 12);
  std::memcpy(bytes.data(), header.data(), header.size());
  base::store_be64(bytes.data() + kChunkHeaderSize, offset);
  base::store_be32(bytes.data() + kChunkHeaderSize + 8, hole_length);
  return bytes;
}

std::array<std::byte, kChunkHeaderSize + 4> encode_block_status_header(std::uint64_t cookie,
                                                                       std::uint32_t context_id,
                                                                       std::uint32_t extent_count,
                                                                       bool done) noexcept {
  std::array<std::byte, kChunkHeaderSize + 4> bytes{};
  const auto header =
      encode_chunk_header(done ? kReplyFlagDone : 0, ChunkType::kBlockStatus, cookie,
                          4 + extent_count * static_cast<std::uint32_t>(kExtentSize));
  std::memcpy(bytes.data(), header.data(), header.size());
  base::store_be32(bytes.data() + kChunkHeaderSize, context_id);
  return bytes;
}

std::array<std::byte, kExtentSize> encode_extent(Extent extent) noexcept {
  std::array<std::byte, kExtentSize> bytes{};
  base::store_be32(bytes.data(), extent.length);
  base::store_be32(bytes.data() + 4, extent.flags);
  return bytes;
}

void append_block_status_chunk(std::vector<std::byte>& out, std::uint64_t cookie,
                               std::uint32_t context_id, std::span<const Extent> extents,
                               bool done) {
  out.reserve(out.size() + kChunkHeaderSize + 4 + extents.size() * kExtentSize);
  put_array(out, encode_block_status_header(cookie, context_id, u32_size(extents.size()), done));
  for (const Extent& extent : extents) put_array(out, encode_extent(extent));
}

void append_error_chunk(std::vector<std::byte>& out, std::uint64_t cookie, Error error,
                        std::string_view message, bool done) {
  message = clip_message(message);
  const std::size_t at = open_chunk(out, cookie, ChunkType::kError, done);
  put32(out, static_cast<std::uint32_t>(error));
  put16(out, static_cast<std::uint16_t>(message.size()));
  put_string(out, message);
  close_chunk(out, at);
}

void append_error_offset_chunk(std::vector<std::byte>& out, std::uint64_t cookie, Error error,
                               std::string_view message, std::uint64_t offset, bool done) {
  message = clip_message(message);
  const std::size_t at = open_chunk(out, cookie, ChunkType::kErrorOffset, done);
  put32(out, static_cast<std::uint32_t>(error));
  put16(out, static_cast<std::uint16_t>(message.size()));
  put_string(out, message);
  put64(out, offset);
  close_chunk(out, at);
}

ParseResult<OffsetData> parse_offset_data(const ChunkHeader& header,
                                          std::span<const std::byte> prefix) noexcept {
  if (header.type != static_cast<std::uint16_t>(ChunkType::kOffsetData)) {
    return ParseError::kInvalidValue;
  }
  if (header.length < kOffsetDataPrefixSize + 1) return ParseError::kBadLength;
  if (prefix.size() < kOffsetDataPrefixSize) return ParseError::kTruncated;
  OffsetData data;
  data.offset = base::load_be64(prefix.data());
  data.data_length = header.length - static_cast<std::uint32_t>(kOffsetDataPrefixSize);
  if (data.offset > kMaxExportSize || data.data_length > kMaxExportSize - data.offset) {
    return ParseError::kTooLarge;
  }
  return data;
}

ParseResult<OffsetHole> parse_offset_hole(const ChunkHeader& header,
                                          std::span<const std::byte> payload) noexcept {
  if (header.type != static_cast<std::uint16_t>(ChunkType::kOffsetHole)) {
    return ParseError::kInvalidValue;
  }
  if (header.length != 12 || payload.size() != 12) return ParseError::kBadLength;
  OffsetHole hole;
  hole.offset = base::load_be64(payload.data());
  hole.length = base::load_be32(payload.data() + 8);
  if (hole.length == 0) return ParseError::kInvalidValue;
  if (hole.offset > kMaxExportSize || hole.length > kMaxExportSize - hole.offset) {
    return ParseError::kTooLarge;
  }
  return hole;
}

Extent BlockStatus::extent(std::size_t index) const noexcept {
  const std::byte* p = descriptors.data() + index * kExtentSize;
  return Extent{base::load_be32(p), base::load_be32(p + 4)};
}

ParseResult<BlockStatus> parse_block_status(const ChunkHeader& header,
                                            std::span<const std::byte> payload) noexcept {
  if (header.type != static_cast<std::uint16_t>(ChunkType::kBlockStatus)) {
    return ParseError::kInvalidValue;
  }
  if (payload.size() != header.length) return ParseError::kBadLength;
  if (payload.size() < 4 + kExtentSize || (payload.size() - 4) % kExtentSize != 0) {
    return ParseError::kBadLength;
  }
  BlockStatus status;
  status.context_id = base::load_be32(payload.data());
  status.descriptors = payload.subspan(4);
  for (std::size_t i = 0; i < status.count(); ++i) {
    if (status.extent(i).length == 0) return ParseError::kInvalidValue;
  }
  return status;
}

ParseResult<ErrorChunk> parse_error_chunk(const ChunkHeader& header,
                                          std::span<const std::byte> payload) noexcept {
  if (!is_error_chunk(header.type)) return ParseError::kInvalidValue;
  if (payload.size() != header.length) return ParseError::kBadLength;
  Reader reader(payload);
  ErrorChunk chunk;
  std::uint16_t message_length = 0;
  if (!reader.u32(chunk.error) || !reader.u16(message_length)) return ParseError::kBadLength;
  std::span<const std::byte> message;
  if (!reader.bytes(message_length, message)) return ParseError::kBadLength;
  chunk.message = as_string(message);
  const auto type = static_cast<ChunkType>(header.type);
  if (type == ChunkType::kErrorOffset) {
    if (reader.remaining() != 8) return ParseError::kBadLength;
    chunk.has_offset = true;
    reader.u64(chunk.offset);
  }
  if ((type == ChunkType::kError || type == ChunkType::kErrorOffset) && chunk.error == 0) {
    return ParseError::kInvalidValue;
  }
  return chunk;
}

}  // namespace spindle::nbd
