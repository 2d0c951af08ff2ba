// The NBD wire protocol as pure data: constants, fixed-size headers, encoders and parsers for
// both ends of a connection, with no I/O, so that every byte can be unit-tested and fuzzed.
// Facts follow the NBD spec (NetworkBlockDevice/nbd doc/proto.md); see
// shared/reference/nbd.md §1 for the summary this code was written from.
//
// What is here, by phase:
//   Handshake (fixed newstyle only; oldstyle is recognised and refused):
//     server greeting (18 bytes), client flags (4), option header (16: IHAVEOPT, option,
//     length), option reply header (20: magic, option, type, length) and the typed reply
//     payloads (SERVER, INFO EXPORT/NAME/DESCRIPTION/BLOCK_SIZE, META_CONTEXT, errors), the
//     EXPORT_NAME reply (size, flags, 124 zeroes unless NO_ZEROES), and the option payloads a
//     server must parse (EXPORT_NAME, INFO/GO, LIST/SET_META_CONTEXT).
//   Transmission (compact headers; extended headers are not spoken):
//     request header (28 bytes) and its validation against the export, simple reply header
//     (16), structured chunk header (20) and the chunk payloads (OFFSET_DATA, OFFSET_HOLE,
//     BLOCK_STATUS, ERROR, ERROR_OFFSET, NONE), NBD error values and their mapping to errno.
//
// Conventions:
//   - encode_*(...) returns a std::array<std::byte, N> (no allocation: the server hot path
//     encodes a reply header per request); append_*(out, ...) appends a variable-length
//     message to a std::vector<std::byte> so that several can go out in one write.
//   - parse_*(...) never trusts a length: every length field is checked against the bytes
//     present and against its cap *before* anything is allocated, and never throws (except
//     std::bad_alloc from the two that fill vectors, INFO/GO and META_CONTEXT requests). It
//     returns ParseResult<T> (a value or a ParseError). Strings and payload pieces come back as
//     views into the caller's buffer: they are valid as long as that buffer is.
//   - Integers are host-order in the structs and big-endian on the wire.
//
// Thread-safety: every function is pure (no global state, no locks, no I/O) and callable from
// any thread at the same time; the types are plain values.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "base/fatal.h"

namespace spindle::nbd {

// ---------------------------------------------------------------------------------------------
// Constants

// Magic numbers.
inline constexpr std::uint64_t kNbdMagic = 0x4e42444d41474943;     // "NBDMAGIC"
inline constexpr std::uint64_t kOldstyleMagic = 0x00420281861253;  // cliserv_magic (refused)
inline constexpr std::uint64_t kIHaveOpt = 0x49484156454f5054;     // "IHAVEOPT"
inline constexpr std::uint64_t kOptionReplyMagic = 0x0003e889045565a9;
inline constexpr std::uint32_t kRequestMagic = 0x25609513;
inline constexpr std::uint32_t kSimpleReplyMagic = 0x67446698;
inline constexpr std::uint32_t kStructuredReplyMagic = 0x668e33ef;

// Handshake flags (16 bits, server greeting).
inline constexpr std::uint16_t kFlagFixedNewstyle = 1u << 0;
inline constexpr std::uint16_t kFlagNoZeroes = 1u << 1;
// Client flags (32 bits, the client's answer to the greeting).
inline constexpr std::uint32_t kClientFlagFixedNewstyle = 1u << 0;
inline constexpr std::uint32_t kClientFlagNoZeroes = 1u << 1;

// Option codes (NBD_OPT_*).
enum class Option : std::uint32_t {
  kExportName = 1,
  kAbort = 2,
  kList = 3,
  kStartTls = 5,
  kInfo = 6,
  kGo = 7,
  kStructuredReply = 8,
  kListMetaContext = 9,
  kSetMetaContext = 10,
  kExtendedHeaders = 11,  // known so that it can be refused with ERR_UNSUP by name
};

// Option reply types (NBD_REP_*); errors have bit 31 set.
inline constexpr std::uint32_t kReplyErrorBit = 1u << 31;
enum class OptionReply : std::uint32_t {
  kAck = 1,
  kServer = 2,
  kInfo = 3,
  kMetaContext = 4,
  kErrUnsupported = kReplyErrorBit | 1,
  kErrPolicy = kReplyErrorBit | 2,
  kErrInvalid = kReplyErrorBit | 3,
  kErrPlatform = kReplyErrorBit | 4,
  kErrTlsRequired = kReplyErrorBit | 5,
  kErrUnknown = kReplyErrorBit | 6,
  kErrShutdown = kReplyErrorBit | 7,
  kErrBlockSizeRequired = kReplyErrorBit | 8,
  kErrTooBig = kReplyErrorBit | 9,
};
constexpr bool is_error_reply(std::uint32_t reply_type) noexcept {
  return (reply_type & kReplyErrorBit) != 0;
}

// NBD_REP_INFO types (NBD_INFO_*), also what a client asks for in INFO/GO.
enum class Info : std::uint16_t {
  kExport = 0,
  kName = 1,
  kDescription = 2,
  kBlockSize = 3,
};

// Transmission flags (16 bits, NBD_FLAG_*).
inline constexpr std::uint16_t kFlagHasFlags = 1u << 0;
inline constexpr std::uint16_t kFlagReadOnly = 1u << 1;
inline constexpr std::uint16_t kFlagSendFlush = 1u << 2;
inline constexpr std::uint16_t kFlagSendFua = 1u << 3;
inline constexpr std::uint16_t kFlagRotational = 1u << 4;
inline constexpr std::uint16_t kFlagSendTrim = 1u << 5;
inline constexpr std::uint16_t kFlagSendWriteZeroes = 1u << 6;
inline constexpr std::uint16_t kFlagSendDf = 1u << 7;
inline constexpr std::uint16_t kFlagCanMultiConn = 1u << 8;
inline constexpr std::uint16_t kFlagSendResize = 1u << 9;  // experimental; never advertised here
inline constexpr std::uint16_t kFlagSendCache = 1u << 10;
inline constexpr std::uint16_t kFlagSendFastZero = 1u << 11;

// Commands (NBD_CMD_*).
enum class Command : std::uint16_t {
  kRead = 0,
  kWrite = 1,
  kDisconnect = 2,
  kFlush = 3,
  kTrim = 4,
  kCache = 5,
  kWriteZeroes = 6,
  kBlockStatus = 7,
};

// Command flags (16 bits, NBD_CMD_FLAG_*).
inline constexpr std::uint16_t kCmdFlagFua = 1u << 0;
inline constexpr std::uint16_t kCmdFlagNoHole = 1u << 1;
inline constexpr std::uint16_t kCmdFlagDf = 1u << 2;
inline constexpr std::uint16_t kCmdFlagReqOne = 1u << 3;
inline constexpr std::uint16_t kCmdFlagFastZero = 1u << 4;

// Structured reply chunk types (NBD_REPLY_TYPE_*); error chunks have bit 15 set.
inline constexpr std::uint16_t kChunkErrorBit = 1u << 15;
enum class ChunkType : std::uint16_t {
  kNone = 0,
  kOffsetData = 1,
  kOffsetHole = 2,
  kBlockStatus = 5,
  kError = kChunkErrorBit | 1,
  kErrorOffset = kChunkErrorBit | 2,
};
constexpr bool is_error_chunk(std::uint16_t chunk_type) noexcept {
  return (chunk_type & kChunkErrorBit) != 0;
}
// Structured reply flags.
inline constexpr std::uint16_t kReplyFlagDone = 1u << 0;

// base:allocation status flags.
inline constexpr std::string_view kBaseAllocation = "base:allocation";
inline constexpr std::uint32_t kStateHole = 1u << 0;
inline constexpr std::uint32_t kStateZero = 1u << 1;

// NBD error values (the simple reply's error field, an ERROR chunk's error). Not host errno.
enum class Error : std::uint32_t {
  kNone = 0,
  kPermission = 1,     // NBD_EPERM
  kIo = 5,             // NBD_EIO
  kNoMemory = 12,      // NBD_ENOMEM
  kInvalid = 22,       // NBD_EINVAL
  kNoSpace = 28,       // NBD_ENOSPC
  kOverflow = 75,      // NBD_EOVERFLOW
  kNotSupported = 95,  // NBD_ENOTSUP
  kShutdown = 108,     // NBD_ESHUTDOWN
};

// Sizes and caps.
inline constexpr std::size_t kGreetingSize = 18;
inline constexpr std::size_t kClientFlagsSize = 4;
inline constexpr std::size_t kOptionHeaderSize = 16;
inline constexpr std::size_t kOptionReplyHeaderSize = 20;
inline constexpr std::size_t kExportNameReplySize = 134;  // 10 without the zeroes
inline constexpr std::size_t kExportNameReplyShortSize = 10;
inline constexpr std::size_t kRequestHeaderSize = 28;
inline constexpr std::size_t kSimpleReplyHeaderSize = 16;
inline constexpr std::size_t kChunkHeaderSize = 20;
inline constexpr std::size_t kOffsetDataPrefixSize = 8;  // u64 offset before the data
inline constexpr std::size_t kExtentSize = 8;            // one BLOCK_STATUS descriptor
// Protocol limit on any string (export names, context names, messages).
inline constexpr std::size_t kMaxStringLength = 4096;
// Default payload limit for READ/WRITE (the spec's interoperable 32 MiB).
inline constexpr std::uint32_t kMaxPayloadLength = 32u << 20;
// Default cap on one option's data length (larger ⇒ the server disconnects, as QEMU does).
inline constexpr std::uint32_t kMaxOptionLength = 32u << 20;
// Default cap on one option reply's payload a client accepts (names ≤ 4096, so 64 KiB is ample).
inline constexpr std::uint32_t kMaxOptionReplyLength = 64u << 10;
// Default cap on a structured chunk payload a client accepts: a full READ plus its offset.
inline constexpr std::uint32_t kMaxChunkPayloadLength =
    kMaxPayloadLength + static_cast<std::uint32_t>(kOffsetDataPrefixSize);
// Default cap on the number of queries in one LIST/SET_META_CONTEXT option.
inline constexpr std::uint32_t kMaxMetaContextQueries = 256;
// Largest export size and offset either side accepts (sizes ≥ 2^63 are rejected).
inline constexpr std::uint64_t kMaxExportSize = (std::uint64_t{1} << 63) - 1;

// ---------------------------------------------------------------------------------------------
// Parse results

enum class ParseError : std::uint8_t {
  kTruncated,      // fewer bytes than the fixed part of the message needs
  kBadMagic,       // wrong magic: framing is lost, hard disconnect
  kBadLength,      // a length field disagrees with the bytes present or with the type
  kStringTooLong,  // a string longer than its cap (default: the protocol's 4096 bytes)
  kTooMany,        // a count above its cap
  kTooLarge,       // a length above its cap (DoS guard) or a size/offset ≥ 2^63
  kInvalidValue,   // a value the spec forbids (NUL in a string, zero-length extent, error 0, ...)
  kUnsupported,    // well-formed but not spoken here (oldstyle greeting, unknown chunk type)
};
std::string_view parse_error_name(ParseError error) noexcept;

// A parsed value or the reason it was rejected.
template <typename T>
class [[nodiscard]] ParseResult {
 public:
  ParseResult(T value) : value_(std::move(value)), ok_(true) {}  // NOLINT: implicit
  ParseResult(ParseError error) : error_(error), ok_(false) {}   // NOLINT: implicit

  bool ok() const noexcept { return ok_; }
  explicit operator bool() const noexcept { return ok_; }
  // The rejection reason; meaningless when ok().
  ParseError error() const noexcept { return error_; }

  const T& value() const& {
    if (!ok_) base::fatal("nbd::ParseResult::value() on a failure ({})", parse_error_name(error_));
    return value_;
  }
  T& value() & {
    if (!ok_) base::fatal("nbd::ParseResult::value() on a failure ({})", parse_error_name(error_));
    return value_;
  }
  const T* operator->() const { return &value(); }
  const T& operator*() const& { return value(); }

 private:
  T value_{};
  ParseError error_ = ParseError::kTruncated;
  bool ok_;
};

// ---------------------------------------------------------------------------------------------
// Errors and names

// Host errno (either sign) → NBD error, as QEMU and nbdkit do: EROFS→EPERM, EDQUOT/EFBIG→ENOSPC,
// EOPNOTSUPP→ENOTSUP; anything without an NBD equivalent → EINVAL; 0 → kNone.
Error errno_to_nbd(int errno_value) noexcept;
// The same, narrowed for a reply to `command` with `command_flags`: ENOTSUP only for a
// WRITE_ZEROES with FAST_ZERO, EOVERFLOW only for a READ with DF; otherwise those become EINVAL
// (the spec reserves them for those cases).
Error errno_to_nbd(int errno_value, Command command, std::uint16_t command_flags) noexcept;
// NBD error value from the wire → positive host errno; unknown values → EINVAL, 0 → 0.
int nbd_to_errno(std::uint32_t nbd_error) noexcept;

// Names for logs ("NBD_OPT_GO", "NBD_CMD_READ", ...); unknown values give "unknown".
std::string_view option_name(std::uint32_t option) noexcept;
std::string_view option_reply_name(std::uint32_t reply_type) noexcept;
std::string_view command_name(std::uint16_t command) noexcept;
std::string_view chunk_type_name(std::uint16_t chunk_type) noexcept;
std::string_view error_name(std::uint32_t nbd_error) noexcept;

// The option reply a server sends for an option payload that failed to parse: ERR_TOO_BIG for
// kTooMany/kTooLarge, ERR_INVALID for everything else (spec: malformed data MUST get ERR_INVALID).
OptionReply option_error_for(ParseError error) noexcept;

// ---------------------------------------------------------------------------------------------
// Handshake: greeting and client flags

// Server → client: NBDMAGIC, IHAVEOPT, handshake flags.
std::array<std::byte, kGreetingSize> encode_greeting(std::uint16_t handshake_flags) noexcept;
// Client side: the handshake flags. kBadMagic if not an NBD server; kUnsupported for oldstyle.
ParseResult<std::uint16_t> parse_greeting(std::span<const std::byte> bytes) noexcept;

std::array<std::byte, kClientFlagsSize> encode_client_flags(std::uint32_t client_flags) noexcept;
ParseResult<std::uint32_t> parse_client_flags(std::span<const std::byte> bytes) noexcept;
// Server side: the client flags are acceptable iff every bit is known and was offered
// (FIXED_NEWSTYLE needs kFlagFixedNewstyle, NO_ZEROES needs kFlagNoZeroes). If not, the spec
// says the server MUST close the connection.
bool client_flags_acceptable(std::uint32_t client_flags, std::uint16_t handshake_flags) noexcept;

// ---------------------------------------------------------------------------------------------
// Handshake: options (client → server)

struct OptionHeader {
  std::uint32_t option = 0;  // an Option, or an unknown code to answer with ERR_UNSUP
  std::uint32_t length = 0;  // bytes of option data that follow
};
std::array<std::byte, kOptionHeaderSize> encode_option_header(std::uint32_t option,
                                                              std::uint32_t length) noexcept;
// Server side. kBadMagic (not IHAVEOPT) and kTooLarge (length > max_length) both mean: hard
// disconnect without reading the data. Otherwise read `length` bytes of data next.
ParseResult<OptionHeader> parse_option_header(std::span<const std::byte> bytes,
                                              std::uint32_t max_length = kMaxOptionLength) noexcept;

// Client side: one whole option (header and data) appended to `out`.
void append_option(std::vector<std::byte>& out, Option option,
                   std::span<const std::byte> data = {});
void append_option_export_name(std::vector<std::byte>& out, std::string_view name);
// INFO or GO: u32 name length, name, u16 count, count × u16 info type.
void append_option_info(std::vector<std::byte>& out, Option info_or_go, std::string_view name,
                        std::span<const Info> requests);
// LIST_META_CONTEXT or SET_META_CONTEXT: u32 name length, name, u32 count, count × (u32, query).
void append_option_meta_context(std::vector<std::byte>& out, Option list_or_set,
                                std::string_view export_name,
                                std::span<const std::string_view> queries);

// Server side: the EXPORT_NAME data is the whole name. kStringTooLong over max_name (the server
// cannot answer EXPORT_NAME with an error: it must disconnect), kInvalidValue for a NUL.
ParseResult<std::string_view> parse_export_name(std::span<const std::byte> data,
                                                std::size_t max_name = kMaxStringLength) noexcept;

// Server side: INFO/GO data. Info types are kept as raw codes; unknown ones MUST be ignored.
struct InfoRequest {
  std::string_view name;                // view into the data
  std::vector<std::uint16_t> requests;  // NBD_INFO_* codes, in the client's order
};
// kBadLength: name length beyond the data, or count not matching the bytes left (2 per
// request, nothing extra). kStringTooLong: name over max_name. kInvalidValue: NUL in the name.
ParseResult<InfoRequest> parse_info_request(std::span<const std::byte> data,
                                            std::size_t max_name = kMaxStringLength);

// Server side: LIST/SET_META_CONTEXT data.
struct MetaContextRequest {
  std::string_view export_name;           // view into the data
  std::vector<std::string_view> queries;  // views into the data; empty = "all" (LIST) / none (SET)
};
// kBadLength: any length beyond the data, trailing bytes, a count that cannot fit (4 bytes per
// query at least). kTooMany: count over max_queries (answer ERR_TOO_BIG). kStringTooLong: a name
// or query over max_string. kInvalidValue: NUL in a string.
ParseResult<MetaContextRequest> parse_meta_context_request(
    std::span<const std::byte> data, std::size_t max_string = kMaxStringLength,
    std::uint32_t max_queries = kMaxMetaContextQueries);

// ---------------------------------------------------------------------------------------------
// Handshake: option replies (server → client)

struct OptionReplyHeader {
  std::uint32_t option = 0;  // echoes the client's option
  std::uint32_t type = 0;    // an OptionReply (or unknown)
  std::uint32_t length = 0;  // bytes of reply data that follow
};
std::array<std::byte, kOptionReplyHeaderSize> encode_option_reply_header(
    std::uint32_t option, OptionReply type, std::uint32_t length) noexcept;
// Client side. kBadMagic and kTooLarge (length > max_length) mean: hard disconnect.
ParseResult<OptionReplyHeader> parse_option_reply_header(
    std::span<const std::byte> bytes, std::uint32_t max_length = kMaxOptionReplyLength) noexcept;

// Server side: whole replies (header and data) appended to `out`. Human-readable text (error
// messages, descriptions) longer than kMaxStringLength is cut at a UTF-8 boundary; names are
// sent as given (the caller keeps them within the limit).
void append_option_reply(std::vector<std::byte>& out, std::uint32_t option, OptionReply type,
                         std::span<const std::byte> data = {});
void append_reply_ack(std::vector<std::byte>& out, std::uint32_t option);
void append_reply_server(std::vector<std::byte>& out, std::uint32_t option, std::string_view name,
                         std::string_view description = {});
void append_reply_info_export(std::vector<std::byte>& out, std::uint32_t option, std::uint64_t size,
                              std::uint16_t transmission_flags);
void append_reply_info_name(std::vector<std::byte>& out, std::uint32_t option,
                            std::string_view name);
void append_reply_info_description(std::vector<std::byte>& out, std::uint32_t option,
                                   std::string_view description);
void append_reply_info_block_size(std::vector<std::byte>& out, std::uint32_t option,
                                  std::uint32_t minimum, std::uint32_t preferred,
                                  std::uint32_t maximum);
void append_reply_meta_context(std::vector<std::byte>& out, std::uint32_t option,
                               std::uint32_t context_id, std::string_view name);
// `type` must be an error (bit 31); the message is optional human-readable text.
void append_reply_error(std::vector<std::byte>& out, std::uint32_t option, OptionReply type,
                        std::string_view message = {});

// Client side: typed reply payloads. Each takes the reply data (header.length bytes).
struct ServerReply {
  std::string_view name;         // export name
  std::string_view description;  // the rest; may be empty
};
ParseResult<ServerReply> parse_reply_server(std::span<const std::byte> data,
                                            std::size_t max_string = kMaxStringLength) noexcept;

// The u16 info type at the start of an NBD_REP_INFO; then the matching parser below.
ParseResult<std::uint16_t> parse_reply_info_type(std::span<const std::byte> data) noexcept;
struct ExportInfo {
  std::uint64_t size = 0;
  std::uint16_t transmission_flags = 0;
};
// INFO EXPORT (exactly 12 bytes). kTooLarge for a size ≥ 2^63 (CVE-2023-5215: clients must
// reject it), kInvalidValue without HAS_FLAGS.
ParseResult<ExportInfo> parse_reply_info_export(std::span<const std::byte> data) noexcept;
// INFO NAME / DESCRIPTION: the text after the type.
ParseResult<std::string_view> parse_reply_info_string(
    std::span<const std::byte> data, std::size_t max_string = kMaxStringLength) noexcept;
struct BlockSizeInfo {
  std::uint32_t minimum = 1;
  std::uint32_t preferred = 4096;
  std::uint32_t maximum = kMaxPayloadLength;  // 0xffffffff: no fixed limit
};
// INFO BLOCK_SIZE (exactly 14 bytes). kInvalidValue unless: minimum a power of 2 ≤ 64 KiB,
// preferred a power of 2 ≥ minimum, maximum ≥ minimum. (A client may ignore a bad one.)
ParseResult<BlockSizeInfo> parse_reply_info_block_size(std::span<const std::byte> data) noexcept;
struct MetaContextReply {
  std::uint32_t context_id = 0;
  std::string_view name;
};
ParseResult<MetaContextReply> parse_reply_meta_context(
    std::span<const std::byte> data, std::size_t max_string = kMaxStringLength) noexcept;

// EXPORT_NAME reply (no reply header): size, transmission flags, 124 zeroes unless the client
// set NO_ZEROES.
void append_export_name_reply(std::vector<std::byte>& out, std::uint64_t size,
                              std::uint16_t transmission_flags, bool no_zeroes);
// Client side: the first 10 bytes (size, flags); kTooLarge for a size ≥ 2^63, kInvalidValue
// without HAS_FLAGS. The 124 zeroes, when present, are for the caller to skip.
ParseResult<ExportInfo> parse_export_name_reply(std::span<const std::byte> bytes) noexcept;

// ---------------------------------------------------------------------------------------------
// Transmission: requests (client → server)

struct RequestHeader {
  std::uint16_t flags = 0;  // kCmdFlag*
  std::uint16_t type = 0;   // a Command (or unknown)
  std::uint64_t cookie = 0;
  std::uint64_t offset = 0;
  std::uint32_t length = 0;

  constexpr Command command() const noexcept { return static_cast<Command>(type); }
};
std::array<std::byte, kRequestHeaderSize> encode_request(const RequestHeader& request) noexcept;
// Checks only size and magic (kBadMagic ⇒ the server MAY hard-disconnect; it should).
ParseResult<RequestHeader> parse_request(std::span<const std::byte> bytes) noexcept;
// Bytes of payload that follow this header on the wire: `length` for WRITE, 0 otherwise. A
// server that rejects a WRITE without disconnecting must still read (drain) them.
constexpr std::uint32_t request_payload_length(const RequestHeader& request) noexcept {
  return request.command() == Command::kWrite ? request.length : 0;
}

// What the server negotiated for this connection, for validate_request().
struct TransmissionPolicy {
  std::uint64_t export_size = 0;                     // clamped to kMaxExportSize
  std::uint16_t transmission_flags = kFlagHasFlags;  // as advertised to this client
  bool structured_replies = false;                   // NBD_OPT_STRUCTURED_REPLY acknowledged
  bool block_status = false;                         // ≥1 meta context selected for this export
  std::uint32_t min_block_size = 1;  // READ/WRITE must be aligned to it (1: no check)
  std::uint32_t max_write_payload = kMaxPayloadLength;
  std::uint32_t max_read_length = kMaxPayloadLength;  // READ and CACHE
};
struct RequestVerdict {
  Error error = Error::kNone;  // what to reply with; kNone = serve it
  bool disconnect = false;     // no safe reply: hard disconnect instead (oversized WRITE)
  bool ok() const noexcept { return error == Error::kNone && !disconnect; }
};
// Server side: decides what to do with a parsed request, in this order (first failure wins):
//   WRITE length > max_write_payload → disconnect (too big to drain safely; checked first
//                             because any other rejection of a WRITE means draining it)
//   DISC                    → always ok (it has no reply; the server finishes and closes)
//   unknown command         → EINVAL
//   command not advertised  → EINVAL (FLUSH, TRIM, WRITE_ZEROES, CACHE without their flag;
//                             BLOCK_STATUS without structured replies and a meta context)
//   flags                   → EINVAL for unknown bits, FUA without SEND_FUA, NO_HOLE outside
//                             WRITE_ZEROES, DF outside READ or without SEND_DF and structured
//                             replies, REQ_ONE outside BLOCK_STATUS, FAST_ZERO outside
//                             WRITE_ZEROES or without SEND_FAST_ZERO
//   READ/CACHE length > max_read_length → EINVAL
//   FLUSH with offset or length ≠ 0 → EINVAL
//   WRITE/TRIM/WRITE_ZEROES on a read-only export → EPERM
//   BLOCK_STATUS with length 0 → EINVAL (no extent could describe it); other zero lengths are
//                             valid no-ops the server serves
//   offset + length beyond the export (or wrapping, or past 2^63 − 1)
//                           → ENOSPC for WRITE/WRITE_ZEROES, EINVAL otherwise
//   READ/WRITE offset or length not a multiple of min_block_size → EINVAL
// EOVERFLOW is never produced here: with compact headers it belongs to DF reads the server
// will not send in one chunk, which only the server knows.
RequestVerdict validate_request(const RequestHeader& request,
                                const TransmissionPolicy& policy) noexcept;

// ---------------------------------------------------------------------------------------------
// Transmission: simple replies (server → client)

struct SimpleReplyHeader {
  std::uint32_t error = 0;  // an Error value; 0 = success
  std::uint64_t cookie = 0;
};
std::array<std::byte, kSimpleReplyHeaderSize> encode_simple_reply(Error error,
                                                                  std::uint64_t cookie) noexcept;
// Client side: checks size and magic.
ParseResult<SimpleReplyHeader> parse_simple_reply(std::span<const std::byte> bytes) noexcept;

// Which reply starts with these 4 bytes (a client reads 4, then 12 or 16 more).
enum class ReplyKind : std::uint8_t { kSimple, kStructured, kBadMagic };
ReplyKind classify_reply(std::span<const std::byte, 4> magic) noexcept;

// ---------------------------------------------------------------------------------------------
// Transmission: structured reply chunks (server → client)

struct ChunkHeader {
  std::uint16_t flags = 0;  // kReplyFlagDone; clients ignore unknown bits
  std::uint16_t type = 0;   // a ChunkType (or unknown)
  std::uint64_t cookie = 0;
  std::uint32_t length = 0;  // payload bytes that follow

  constexpr bool done() const noexcept { return (flags & kReplyFlagDone) != 0; }
};
std::array<std::byte, kChunkHeaderSize> encode_chunk_header(std::uint16_t flags, ChunkType type,
                                                            std::uint64_t cookie,
                                                            std::uint32_t length) noexcept;
// Client side: checks magic, the length cap, and the length the type demands, so the client can
// refuse before reading the payload: NONE length 0 with DONE; OFFSET_DATA ≥ 9; OFFSET_HOLE 12;
// BLOCK_STATUS 4 + n × 8 with n ≥ 1; ERROR ≥ 6; ERROR_OFFSET ≥ 14; unknown error types ≥ 6.
// kBadMagic / kTooLarge / kBadLength / kInvalidValue (NONE without DONE) / kUnsupported (an
// unknown non-error type) all mean: hard disconnect. An unknown type with bit 15 set parses:
// the client fails that request (its payload starts like ERROR) and continues.
ParseResult<ChunkHeader> parse_chunk_header(
    std::span<const std::byte> bytes, std::uint32_t max_length = kMaxChunkPayloadLength) noexcept;

// NONE with DONE: the success end of a structured reply.
std::array<std::byte, kChunkHeaderSize> encode_none_chunk(std::uint64_t cookie) noexcept;
// OFFSET_DATA header and offset; `data_length` bytes of data follow (1 ≤ data_length ≤ 2^32 − 9).
std::array<std::byte, kChunkHeaderSize + kOffsetDataPrefixSize> encode_offset_data_header(
    std::uint64_t cookie, std::uint64_t offset, std::uint32_t data_length, bool done) noexcept;
// The whole OFFSET_HOLE chunk (hole_length ≠ 0).
std::array<std::byte, kChunkHeaderSize + 12> encode_offset_hole(std::uint64_t cookie,
                                                                std::uint64_t offset,
                                                                std::uint32_t hole_length,
                                                                bool done) noexcept;

struct Extent {
  std::uint32_t length = 0;  // never 0 on the wire
  std::uint32_t flags = 0;   // kState* for base:allocation
};
// BLOCK_STATUS header and context id; extent_count descriptors (encode_extent) follow.
std::array<std::byte, kChunkHeaderSize + 4> encode_block_status_header(std::uint64_t cookie,
                                                                       std::uint32_t context_id,
                                                                       std::uint32_t extent_count,
                                                                       bool done) noexcept;
std::array<std::byte, kExtentSize> encode_extent(Extent extent) noexcept;
// The whole BLOCK_STATUS chunk.
void append_block_status_chunk(std::vector<std::byte>& out, std::uint64_t cookie,
                               std::uint32_t context_id, std::span<const Extent> extents,
                               bool done);
// The whole ERROR chunk (error ≠ kNone; message cut to kMaxStringLength at a UTF-8 boundary).
void append_error_chunk(std::vector<std::byte>& out, std::uint64_t cookie, Error error,
                        std::string_view message, bool done);
// The whole ERROR_OFFSET chunk.
void append_error_offset_chunk(std::vector<std::byte>& out, std::uint64_t cookie, Error error,
                               std::string_view message, std::uint64_t offset, bool done);

// Client side: chunk payloads. Each takes the header (already parsed) and the payload bytes.
struct OffsetData {
  std::uint64_t offset = 0;
  std::uint32_t data_length = 0;  // header.length − 8: bytes of data after the offset
};
// Takes only the first 8 payload bytes, so the client can read the data straight into the
// request's buffer. kTooLarge if offset + data_length passes 2^63 − 1.
ParseResult<OffsetData> parse_offset_data(const ChunkHeader& header,
                                          std::span<const std::byte> prefix) noexcept;
struct OffsetHole {
  std::uint64_t offset = 0;
  std::uint32_t length = 0;
};
// kInvalidValue for a zero length; kTooLarge if offset + length passes 2^63 − 1.
ParseResult<OffsetHole> parse_offset_hole(const ChunkHeader& header,
                                          std::span<const std::byte> payload) noexcept;

// A validated BLOCK_STATUS payload, read in place (no allocation).
struct BlockStatus {
  std::uint32_t context_id = 0;
  std::span<const std::byte> descriptors;  // count() × 8 bytes

  std::size_t count() const noexcept { return descriptors.size() / kExtentSize; }
  Extent extent(std::size_t index) const noexcept;
};
// kInvalidValue for a zero-length extent; kBadLength for a payload that is not 4 + n × 8.
ParseResult<BlockStatus> parse_block_status(const ChunkHeader& header,
                                            std::span<const std::byte> payload) noexcept;

struct ErrorChunk {
  std::uint32_t error = 0;   // raw NBD error (map with nbd_to_errno)
  std::string_view message;  // view into the payload
  bool has_offset = false;   // ERROR_OFFSET
  std::uint64_t offset = 0;
};
// ERROR, ERROR_OFFSET, and unknown types with bit 15 set. kBadLength: message length beyond the
// payload (ERROR_OFFSET: not exactly 14 + message). kInvalidValue: error 0 (ERROR and
// ERROR_OFFSET; for an unknown error type the client treats 0 as EINVAL itself).
ParseResult<ErrorChunk> parse_error_chunk(const ChunkHeader& header,
                                          std::span<const std::byte> payload) noexcept;

// True if [offset, offset + length) lies inside [request_offset, request_offset + request_length),
// without overflow: for a client checking that a chunk stays inside its request.
constexpr bool range_within(std::uint64_t offset, std::uint64_t length,
                            std::uint64_t request_offset, std::uint64_t request_length) noexcept {
  return offset >= request_offset && offset - request_offset <= request_length &&
         length <= request_length - (offset - request_offset);
}

}  // namespace spindle::nbd
