// nbd::protocol: every encoder checked byte by byte against bytes written out by hand from the
// spec (not produced by the code under test), round trips through the matching parsers, and the
// malformed inputs a hostile peer can send: truncated headers, wrong magic, lengths beyond the
// payload, oversized names, impossible counts, unknown commands and flags, oversized requests,
// offset/length overflow, inconsistent chunk lengths, sizes ≥ 2^63 from a server.
#include "nbd/protocol.h"

#include <gtest/gtest.h>

#include <cerrno>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "base/byte_order.h"

namespace spindle::nbd {
namespace {

using Bytes = std::vector<std::byte>;

// Bytes from literal values.
Bytes hex(std::initializer_list<unsigned> values) {
  Bytes out;
  for (unsigned v : values) out.push_back(static_cast<std::byte>(v));
  return out;
}

// Hand-built wire messages, big-endian by explicit shifts (independent of base/byte_order.h).
class Wire {
 public:
  Wire& u8(unsigned v) {
    bytes_.push_back(static_cast<std::byte>(v & 0xff));
    return *this;
  }
  Wire& u16(std::uint16_t v) { return u8(v >> 8).u8(v); }
  Wire& u32(std::uint32_t v) { return u16(static_cast<std::uint16_t>(v >> 16)).u16(v & 0xffff); }
  Wire& u64(std::uint64_t v) {
    return u32(static_cast<std::uint32_t>(v >> 32)).u32(static_cast<std::uint32_t>(v));
  }
  Wire& str(std::string_view s) {
    for (char c : s) u8(static_cast<unsigned char>(c));
    return *this;
  }
  Wire& zeroes(std::size_t n) {
    bytes_.insert(bytes_.end(), n, std::byte{0});
    return *this;
  }
  Wire& raw(const Bytes& b) {
    bytes_.insert(bytes_.end(), b.begin(), b.end());
    return *this;
  }
  Bytes bytes() const { return bytes_; }
  operator Bytes() const { return bytes_; }  // NOLINT: implicit for brevity

 private:
  Bytes bytes_;
};

// The rejection reason, or nullopt when the parse succeeded (error() alone is meaningless then).
template <typename T>
std::optional<ParseError> failure(const ParseResult<T>& result) {
  if (result.ok()) return std::nullopt;
  return result.error();
}

template <std::size_t N>
Bytes to_vector(const std::array<std::byte, N>& a) {
  return Bytes(a.begin(), a.end());
}

Bytes truncate(Bytes b, std::size_t n) {
  b.resize(n);
  return b;
}

const Bytes kNbdMagicBytes = hex({'N', 'B', 'D', 'M', 'A', 'G', 'I', 'C'});
const Bytes kIHaveOptBytes = hex({'I', 'H', 'A', 'V', 'E', 'O', 'P', 'T'});
const Bytes kOptionReplyMagicBytes = hex({0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9});
const Bytes kRequestMagicBytes = hex({0x25, 0x60, 0x95, 0x13});
const Bytes kSimpleMagicBytes = hex({0x67, 0x44, 0x66, 0x98});
const Bytes kStructuredMagicBytes = hex({0x66, 0x8e, 0x33, 0xef});

constexpr std::uint64_t kTwoTo63 = std::uint64_t{1} << 63;

// ---------------------------------------------------------------------------------------------
// Byte order and constants

TEST(ByteOrderTest, BigEndianStoresMostSignificantByteFirst) {
  std::byte buffer[8];
  base::store_be16(buffer, 0x0102);
  EXPECT_EQ(Bytes(buffer, buffer + 2), hex({0x01, 0x02}));
  base::store_be32(buffer, 0x01020304);
  EXPECT_EQ(Bytes(buffer, buffer + 4), hex({0x01, 0x02, 0x03, 0x04}));
  base::store_be64(buffer, 0x0102030405060708);
  EXPECT_EQ(Bytes(buffer, buffer + 8), hex({1, 2, 3, 4, 5, 6, 7, 8}));
  EXPECT_EQ(base::load_be64(buffer), 0x0102030405060708u);
  EXPECT_EQ(base::load_be32(buffer + 1), 0x02030405u);  // unaligned
  EXPECT_EQ(base::load_be16(buffer + 3), 0x0405u);
}

TEST(ByteOrderTest, LittleEndianStoresLeastSignificantByteFirst) {
  std::byte buffer[8];
  base::store_le16(buffer, 0x0102);
  EXPECT_EQ(Bytes(buffer, buffer + 2), hex({0x02, 0x01}));
  base::store_le32(buffer, 0x01020304);
  EXPECT_EQ(Bytes(buffer, buffer + 4), hex({0x04, 0x03, 0x02, 0x01}));
  base::store_le64(buffer, 0x0102030405060708);
  EXPECT_EQ(Bytes(buffer, buffer + 8), hex({8, 7, 6, 5, 4, 3, 2, 1}));
  EXPECT_EQ(base::load_le64(buffer), 0x0102030405060708u);
  EXPECT_EQ(base::load_le32(buffer + 4), 0x01020304u);
  EXPECT_EQ(base::load_le16(buffer + 6), 0x0102u);
  base::store_be32(buffer, 0xfffefdfc);  // high bits survive the shifts
  EXPECT_EQ(base::load_be32(buffer), 0xfffefdfcu);
}

TEST(ConstantsTest, ValuesMatchTheSpec) {
  EXPECT_EQ(kNbdMagic, 0x4e42444d41474943u);
  EXPECT_EQ(kIHaveOpt, 0x49484156454f5054u);
  EXPECT_EQ(kOptionReplyMagic, 0x3e889045565a9u);
  EXPECT_EQ(kRequestMagic, 0x25609513u);
  EXPECT_EQ(kSimpleReplyMagic, 0x67446698u);
  EXPECT_EQ(kStructuredReplyMagic, 0x668e33efu);
  EXPECT_EQ(static_cast<std::uint32_t>(Option::kGo), 7u);
  EXPECT_EQ(static_cast<std::uint32_t>(Option::kSetMetaContext), 10u);
  EXPECT_EQ(static_cast<std::uint32_t>(OptionReply::kErrUnsupported), 0x80000001u);
  EXPECT_EQ(static_cast<std::uint32_t>(OptionReply::kErrTooBig), 0x80000009u);
  EXPECT_EQ(static_cast<std::uint16_t>(Info::kBlockSize), 3u);
  EXPECT_EQ(kFlagSendCache, 1u << 10);
  EXPECT_EQ(kFlagSendFastZero, 1u << 11);
  EXPECT_EQ(kCmdFlagFastZero, 1u << 4);
  EXPECT_EQ(static_cast<std::uint16_t>(ChunkType::kError), 0x8001u);
  EXPECT_EQ(static_cast<std::uint16_t>(ChunkType::kBlockStatus), 5u);
  EXPECT_EQ(static_cast<std::uint32_t>(Error::kShutdown), 108u);
  EXPECT_EQ(static_cast<std::uint32_t>(Error::kNotSupported), 95u);
  EXPECT_TRUE(is_error_reply(0x80000005));
  EXPECT_FALSE(is_error_reply(3));
  EXPECT_TRUE(is_error_chunk(0x8002));
  EXPECT_FALSE(is_error_chunk(2));
}

// ---------------------------------------------------------------------------------------------
// Errors and names

TEST(ErrorTest, ErrnoMapsToNbdErrors) {
  EXPECT_EQ(errno_to_nbd(0), Error::kNone);
  EXPECT_EQ(errno_to_nbd(EPERM), Error::kPermission);
  EXPECT_EQ(errno_to_nbd(EROFS), Error::kPermission);
  EXPECT_EQ(errno_to_nbd(EIO), Error::kIo);
  EXPECT_EQ(errno_to_nbd(ENOMEM), Error::kNoMemory);
  EXPECT_EQ(errno_to_nbd(EINVAL), Error::kInvalid);
  EXPECT_EQ(errno_to_nbd(ENOSPC), Error::kNoSpace);
  EXPECT_EQ(errno_to_nbd(EDQUOT), Error::kNoSpace);
  EXPECT_EQ(errno_to_nbd(EFBIG), Error::kNoSpace);
  EXPECT_EQ(errno_to_nbd(EOVERFLOW), Error::kOverflow);
  EXPECT_EQ(errno_to_nbd(ENOTSUP), Error::kNotSupported);
  EXPECT_EQ(errno_to_nbd(EOPNOTSUPP), Error::kNotSupported);
  EXPECT_EQ(errno_to_nbd(ESHUTDOWN), Error::kShutdown);
  EXPECT_EQ(errno_to_nbd(-EIO), Error::kIo);  // negative errno from channels
  EXPECT_EQ(errno_to_nbd(-ENOSPC), Error::kNoSpace);
  EXPECT_EQ(errno_to_nbd(EBADF), Error::kInvalid);  // no NBD equivalent
  EXPECT_EQ(errno_to_nbd(ECONNRESET), Error::kInvalid);
}

TEST(ErrorTest, EnotsupAndEoverflowOnlyWhereTheSpecAllowsThem) {
  EXPECT_EQ(errno_to_nbd(ENOTSUP, Command::kWriteZeroes, kCmdFlagFastZero), Error::kNotSupported);
  EXPECT_EQ(errno_to_nbd(ENOTSUP, Command::kWriteZeroes, 0), Error::kInvalid);
  EXPECT_EQ(errno_to_nbd(-ENOTSUP, Command::kTrim, kCmdFlagFastZero), Error::kInvalid);
  EXPECT_EQ(errno_to_nbd(EOVERFLOW, Command::kRead, kCmdFlagDf), Error::kOverflow);
  EXPECT_EQ(errno_to_nbd(EOVERFLOW, Command::kRead, 0), Error::kInvalid);
  EXPECT_EQ(errno_to_nbd(EOVERFLOW, Command::kWrite, kCmdFlagDf), Error::kInvalid);
  EXPECT_EQ(errno_to_nbd(EIO, Command::kRead, 0), Error::kIo);
  EXPECT_EQ(errno_to_nbd(EROFS, Command::kWrite, kCmdFlagFua), Error::kPermission);
}

TEST(ErrorTest, NbdErrorsMapToErrno) {
  EXPECT_EQ(nbd_to_errno(0), 0);
  EXPECT_EQ(nbd_to_errno(1), EPERM);
  EXPECT_EQ(nbd_to_errno(5), EIO);
  EXPECT_EQ(nbd_to_errno(12), ENOMEM);
  EXPECT_EQ(nbd_to_errno(22), EINVAL);
  EXPECT_EQ(nbd_to_errno(28), ENOSPC);
  EXPECT_EQ(nbd_to_errno(75), EOVERFLOW);
  EXPECT_EQ(nbd_to_errno(95), ENOTSUP);
  EXPECT_EQ(nbd_to_errno(108), ESHUTDOWN);
  EXPECT_EQ(nbd_to_errno(2), EINVAL);  // unknown values are EINVAL to a client
  EXPECT_EQ(nbd_to_errno(0xffffffff), EINVAL);
  for (Error e : {Error::kPermission, Error::kIo, Error::kNoMemory, Error::kInvalid,
                  Error::kNoSpace, Error::kOverflow, Error::kNotSupported, Error::kShutdown}) {
    EXPECT_EQ(errno_to_nbd(nbd_to_errno(static_cast<std::uint32_t>(e))), e);
  }
}

TEST(ErrorTest, NamesForLogs) {
  EXPECT_EQ(option_name(7), "NBD_OPT_GO");
  EXPECT_EQ(option_name(1), "NBD_OPT_EXPORT_NAME");
  EXPECT_EQ(option_name(4), "unknown");  // PEEK_EXPORT: withdrawn
  EXPECT_EQ(option_reply_name(0x80000009), "NBD_REP_ERR_TOO_BIG");
  EXPECT_EQ(option_reply_name(0x80000000), "unknown");
  EXPECT_EQ(command_name(7), "NBD_CMD_BLOCK_STATUS");
  EXPECT_EQ(command_name(8), "unknown");
  EXPECT_EQ(chunk_type_name(0x8002), "NBD_REPLY_TYPE_ERROR_OFFSET");
  EXPECT_EQ(chunk_type_name(3), "unknown");
  EXPECT_EQ(error_name(28), "NBD_ENOSPC");
  EXPECT_EQ(error_name(29), "unknown");
  EXPECT_EQ(parse_error_name(ParseError::kBadMagic), "bad magic");
}

TEST(ErrorTest, OptionErrorForParseErrors) {
  EXPECT_EQ(option_error_for(ParseError::kTooMany), OptionReply::kErrTooBig);
  EXPECT_EQ(option_error_for(ParseError::kTooLarge), OptionReply::kErrTooBig);
  EXPECT_EQ(option_error_for(ParseError::kBadLength), OptionReply::kErrInvalid);
  EXPECT_EQ(option_error_for(ParseError::kStringTooLong), OptionReply::kErrInvalid);
  EXPECT_EQ(option_error_for(ParseError::kInvalidValue), OptionReply::kErrInvalid);
}

TEST(ParseResultDeathTest, ValueOfAFailureIsFatal) {
  EXPECT_DEATH(
      {
        ParseResult<std::uint32_t> result = ParseError::kBadMagic;
        (void)result.value();
      },
      "ParseResult::value\\(\\) on a failure \\(bad magic\\)");
}

// ---------------------------------------------------------------------------------------------
// Greeting and client flags

TEST(GreetingTest, EncodesMagicsAndFlags) {
  const Bytes expected = Wire().raw(kNbdMagicBytes).raw(kIHaveOptBytes).u8(0x00).u8(0x03);
  EXPECT_EQ(to_vector(encode_greeting(kFlagFixedNewstyle | kFlagNoZeroes)), expected);
}

TEST(GreetingTest, ParsesFlagsIncludingUnknownOnes) {
  const Bytes greeting = Wire().raw(kNbdMagicBytes).raw(kIHaveOptBytes).u16(0x8001);
  auto flags = parse_greeting(greeting);
  ASSERT_TRUE(flags.ok());
  EXPECT_EQ(*flags, 0x8001);  // clients ignore unknown handshake flags; they are kept
  EXPECT_EQ(*parse_greeting(encode_greeting(kFlagFixedNewstyle)), kFlagFixedNewstyle);
}

TEST(GreetingTest, RejectsOldstyleWrongMagicAndTruncation) {
  const Bytes oldstyle = Wire().raw(kNbdMagicBytes).u64(0x00420281861253).u16(0);
  EXPECT_EQ(failure(parse_greeting(oldstyle)), ParseError::kUnsupported);
  const Bytes not_nbd = Wire().str("HTTP/1.1").raw(kIHaveOptBytes).u16(1);
  EXPECT_EQ(failure(parse_greeting(not_nbd)), ParseError::kBadMagic);
  const Bytes bad_second = Wire().raw(kNbdMagicBytes).str("IHAVEOPS").u16(1);
  EXPECT_EQ(failure(parse_greeting(bad_second)), ParseError::kBadMagic);
  const Bytes full = to_vector(encode_greeting(1));
  EXPECT_EQ(failure(parse_greeting(truncate(full, 17))), ParseError::kTruncated);
  EXPECT_EQ(failure(parse_greeting(truncate(full, 0))), ParseError::kTruncated);
}

TEST(ClientFlagsTest, EncodesAndParses) {
  EXPECT_EQ(to_vector(encode_client_flags(kClientFlagFixedNewstyle | kClientFlagNoZeroes)),
            hex({0, 0, 0, 3}));
  EXPECT_EQ(*parse_client_flags(hex({0x80, 0, 0, 1})), 0x80000001u);
  EXPECT_EQ(failure(parse_client_flags(hex({0, 0, 1}))), ParseError::kTruncated);
}

TEST(ClientFlagsTest, OnlyOfferedFlagsAreAcceptable) {
  const std::uint16_t both = kFlagFixedNewstyle | kFlagNoZeroes;
  EXPECT_TRUE(client_flags_acceptable(0, both));
  EXPECT_TRUE(client_flags_acceptable(kClientFlagFixedNewstyle | kClientFlagNoZeroes, both));
  EXPECT_FALSE(client_flags_acceptable(kClientFlagNoZeroes, kFlagFixedNewstyle));
  EXPECT_FALSE(client_flags_acceptable(kClientFlagFixedNewstyle, kFlagNoZeroes));
  EXPECT_FALSE(client_flags_acceptable(kClientFlagFixedNewstyle | (1u << 2), both));
  EXPECT_FALSE(client_flags_acceptable(0x80000000, both));
}

// ---------------------------------------------------------------------------------------------
// Options: headers and client encoders

TEST(OptionHeaderTest, EncodesIHaveOptOptionAndLength) {
  const Bytes expected = Wire().raw(kIHaveOptBytes).u32(7).u32(0x0102);
  EXPECT_EQ(to_vector(encode_option_header(7, 0x0102)), expected);
}

TEST(OptionHeaderTest, ParsesAndRoundTrips) {
  auto header = parse_option_header(encode_option_header(0xdeadbeef, 1234));
  ASSERT_TRUE(header.ok());
  EXPECT_EQ(header->option, 0xdeadbeefu);  // unknown options parse: the server says ERR_UNSUP
  EXPECT_EQ(header->length, 1234u);
}

TEST(OptionHeaderTest, RejectsBadMagicTruncationAndHugeLengths) {
  Bytes bad = to_vector(encode_option_header(7, 0));
  bad[7] = std::byte{'X'};
  EXPECT_EQ(failure(parse_option_header(bad)), ParseError::kBadMagic);
  EXPECT_EQ(failure(parse_option_header(truncate(to_vector(encode_option_header(7, 0)), 15))),
            ParseError::kTruncated);
  EXPECT_TRUE(parse_option_header(encode_option_header(7, kMaxOptionLength)).ok());
  EXPECT_EQ(failure(parse_option_header(encode_option_header(7, kMaxOptionLength + 1))),
            ParseError::kTooLarge);
  EXPECT_EQ(failure(parse_option_header(encode_option_header(7, 0xffffffff))),
            ParseError::kTooLarge);
  EXPECT_EQ(failure(parse_option_header(encode_option_header(7, 4097), 4096)),
            ParseError::kTooLarge);
}

TEST(ClientOptionTest, EncodesOptionsWithoutData) {
  Bytes out;
  append_option(out, Option::kStructuredReply);
  append_option(out, Option::kAbort);
  const Bytes expected = Wire().raw(kIHaveOptBytes).u32(8).u32(0).raw(kIHaveOptBytes).u32(2).u32(0);
  EXPECT_EQ(out, expected);
}

TEST(ClientOptionTest, EncodesExportName) {
  Bytes out;
  append_option_export_name(out, "disk");
  EXPECT_EQ(out, Wire().raw(kIHaveOptBytes).u32(1).u32(4).str("disk").bytes());
}

TEST(ClientOptionTest, EncodesGoByteByByte) {
  Bytes out;
  const Info requests[] = {Info::kBlockSize, Info::kName};
  append_option_info(out, Option::kGo, "disk", requests);
  const Bytes expected = hex({'I', 'H', 'A', 'V', 'E', 'O', 'P', 'T',  // magic
                              0,   0,   0,   7,                        // NBD_OPT_GO
                              0,   0,   0,   14,                       // 4 + 4 + 2 + 2 × 2
                              0,   0,   0,   4,   'd', 'i', 's', 'k',  // name
                              0,   2,   0,   3,   0,   1});            // 2 requests
  EXPECT_EQ(out, expected);
}

TEST(ClientOptionTest, EncodesSetMetaContextByteByByte) {
  Bytes out;
  const std::string_view queries[] = {"base:allocation", "x"};
  append_option_meta_context(out, Option::kSetMetaContext, "e", queries);
  const Bytes expected = Wire()
                             .raw(kIHaveOptBytes)
                             .u32(10)
                             .u32(4 + 1 + 4 + 4 + 15 + 4 + 1)
                             .u32(1)
                             .str("e")
                             .u32(2)
                             .u32(15)
                             .str("base:allocation")
                             .u32(1)
                             .str("x");
  EXPECT_EQ(out, expected);
}

// ---------------------------------------------------------------------------------------------
// Options: server-side payload parsers

TEST(ExportNameTest, ParsesNamesUpToTheCap) {
  EXPECT_EQ(*parse_export_name(Wire().str("disk").bytes()), "disk");
  EXPECT_EQ(*parse_export_name({}), "");  // the default export
  const Bytes max(kMaxStringLength, std::byte{'a'});
  EXPECT_EQ(parse_export_name(max)->size(), kMaxStringLength);
  const Bytes over(kMaxStringLength + 1, std::byte{'a'});
  EXPECT_EQ(failure(parse_export_name(over)), ParseError::kStringTooLong);
  EXPECT_EQ(failure(parse_export_name(Wire().str("abcde").bytes(), 4)), ParseError::kStringTooLong);
  EXPECT_EQ(failure(parse_export_name(Wire().str("a").u8(0).str("b").bytes())),
            ParseError::kInvalidValue);
}

TEST(InfoRequestTest, RoundTripsThroughTheClientEncoder) {
  Bytes out;
  const Info requests[] = {Info::kExport, Info::kBlockSize, static_cast<Info>(0x1234)};
  append_option_info(out, Option::kInfo, "some/export", requests);
  auto header = parse_option_header(out);
  ASSERT_TRUE(header.ok());
  EXPECT_EQ(header->option, 6u);
  ASSERT_EQ(header->length, out.size() - kOptionHeaderSize);
  auto request = parse_info_request(std::span(out).subspan(kOptionHeaderSize));
  ASSERT_TRUE(request.ok()) << parse_error_name(request.error());
  EXPECT_EQ(request->name, "some/export");
  EXPECT_EQ(request->requests, (std::vector<std::uint16_t>{0, 3, 0x1234}));  // unknown kept
}

TEST(InfoRequestTest, AcceptsEmptyNameAndNoRequests) {
  const Bytes payload = Wire().u32(0).u16(0);
  auto request = parse_info_request(payload);
  ASSERT_TRUE(request.ok());
  EXPECT_EQ(request->name, "");
  EXPECT_TRUE(request->requests.empty());
}

TEST(InfoRequestTest, RejectsTruncatedPayloads) {
  EXPECT_EQ(failure(parse_info_request({})), ParseError::kBadLength);
  EXPECT_EQ(failure(parse_info_request(hex({0, 0, 0}))), ParseError::kBadLength);
  EXPECT_EQ(failure(parse_info_request(Wire().u32(0).bytes())), ParseError::kBadLength);
  EXPECT_EQ(failure(parse_info_request(Wire().u32(0).u8(0).bytes())), ParseError::kBadLength);
}

TEST(InfoRequestTest, RejectsNameLengthBeyondThePayload) {
  EXPECT_EQ(failure(parse_info_request(Wire().u32(100).str("disk").u16(0).bytes())),
            ParseError::kBadLength);
  EXPECT_EQ(failure(parse_info_request(Wire().u32(0xffffffff).str("disk").u16(0).bytes())),
            ParseError::kBadLength);
  // The name swallowing the count: length = everything after it.
  EXPECT_EQ(failure(parse_info_request(Wire().u32(6).str("disk").u16(0).bytes())),
            ParseError::kBadLength);
  EXPECT_EQ(failure(parse_info_request(Wire().u32(5).str("disk").u16(0).bytes())),
            ParseError::kBadLength);
}

TEST(InfoRequestTest, RejectsCountNotMatchingTheRemainingBytes) {
  EXPECT_EQ(failure(parse_info_request(Wire().u32(1).str("d").u16(2).u16(0).bytes())),
            ParseError::kBadLength);
  EXPECT_EQ(failure(parse_info_request(Wire().u32(1).str("d").u16(0).u16(0).bytes())),
            ParseError::kBadLength);
  EXPECT_EQ(failure(parse_info_request(Wire().u32(1).str("d").u16(1).u8(0).bytes())),
            ParseError::kBadLength);
  EXPECT_EQ(failure(parse_info_request(Wire().u32(1).str("d").u16(0xffff).u16(0).bytes())),
            ParseError::kBadLength);
  EXPECT_EQ(failure(parse_info_request(Wire().u32(1).str("d").u16(1).u16(3).u8(0).bytes())),
            ParseError::kBadLength);
}

TEST(InfoRequestTest, AcceptsTheLargestCount) {
  Wire wire;
  wire.u32(1).str("d").u16(0xffff);
  for (unsigned i = 0; i < 0xffff; ++i) wire.u16(static_cast<std::uint16_t>(i));
  auto request = parse_info_request(wire.bytes());
  ASSERT_TRUE(request.ok());
  ASSERT_EQ(request->requests.size(), 0xffffu);
  EXPECT_EQ(request->requests[0xfffe], 0xfffe);
}

TEST(InfoRequestTest, RejectsLongNamesAndNul) {
  const std::string long_name(5000, 'n');
  EXPECT_EQ(failure(parse_info_request(Wire().u32(5000).str(long_name).u16(0).bytes())),
            ParseError::kStringTooLong);
  const std::string max_name(4096, 'n');
  EXPECT_TRUE(parse_info_request(Wire().u32(4096).str(max_name).u16(0).bytes()).ok());
  EXPECT_EQ(
      failure(parse_info_request(Wire().u32(17).str(std::string(17, 'n')).u16(0).bytes(), 16)),
      ParseError::kStringTooLong);
  EXPECT_TRUE(parse_info_request(Wire().u32(16).str(std::string(16, 'n')).u16(0).bytes(), 16).ok());
  EXPECT_EQ(failure(parse_info_request(Wire().u32(3).str("a").u8(0).str("b").u16(0).bytes())),
            ParseError::kInvalidValue);
}

TEST(MetaContextRequestTest, RoundTripsThroughTheClientEncoder) {
  Bytes out;
  const std::string_view queries[] = {"base:allocation", "qemu:dirty-bitmap:b0", ""};
  append_option_meta_context(out, Option::kListMetaContext, "exp", queries);
  auto header = parse_option_header(out);
  ASSERT_TRUE(header.ok());
  EXPECT_EQ(header->option, 9u);
  ASSERT_EQ(header->length, out.size() - kOptionHeaderSize);
  auto request = parse_meta_context_request(std::span(out).subspan(kOptionHeaderSize));
  ASSERT_TRUE(request.ok()) << parse_error_name(request.error());
  EXPECT_EQ(request->export_name, "exp");
  ASSERT_EQ(request->queries.size(), 3u);
  EXPECT_EQ(request->queries[0], "base:allocation");
  EXPECT_EQ(request->queries[1], "qemu:dirty-bitmap:b0");
  EXPECT_EQ(request->queries[2], "");
}

TEST(MetaContextRequestTest, AcceptsZeroQueries) {
  auto request = parse_meta_context_request(Wire().u32(0).u32(0).bytes());
  ASSERT_TRUE(request.ok());
  EXPECT_TRUE(request->queries.empty());
}

TEST(MetaContextRequestTest, RejectsTruncationAndNameLengthBeyondThePayload) {
  EXPECT_EQ(failure(parse_meta_context_request({})), ParseError::kBadLength);
  EXPECT_EQ(failure(parse_meta_context_request(Wire().u32(0).bytes())), ParseError::kBadLength);
  EXPECT_EQ(failure(parse_meta_context_request(Wire().u32(0).u16(0).bytes())),
            ParseError::kBadLength);
  EXPECT_EQ(failure(parse_meta_context_request(Wire().u32(50).str("e").u32(0).bytes())),
            ParseError::kBadLength);
  EXPECT_EQ(failure(parse_meta_context_request(Wire().u32(3).str("e").u32(0).bytes())),
            ParseError::kBadLength);  // the name would swallow the count
}

TEST(MetaContextRequestTest, RejectsQueryCountOverflow) {
  // 0xffffffff queries announced, 8 bytes present: rejected before reserving anything.
  EXPECT_EQ(
      failure(parse_meta_context_request(Wire().u32(0).u32(0xffffffff).u32(0).u32(0).bytes())),
      ParseError::kBadLength);
  EXPECT_EQ(failure(parse_meta_context_request(Wire().u32(0).u32(3).u32(0).u32(0).bytes())),
            ParseError::kBadLength);
  EXPECT_EQ(failure(parse_meta_context_request(Wire().u32(0).u32(0x40000000).bytes())),
            ParseError::kBadLength);
}

TEST(MetaContextRequestTest, RejectsMoreQueriesThanTheCap) {
  Wire wire;
  wire.u32(0).u32(300);
  for (int i = 0; i < 300; ++i) wire.u32(1).str("q");
  EXPECT_EQ(failure(parse_meta_context_request(wire.bytes())), ParseError::kTooMany);
  auto allowed = parse_meta_context_request(wire.bytes(), kMaxStringLength, 300);
  ASSERT_TRUE(allowed.ok());
  EXPECT_EQ(allowed->queries.size(), 300u);
  EXPECT_EQ(failure(parse_meta_context_request(wire.bytes(), kMaxStringLength, 299)),
            ParseError::kTooMany);
}

TEST(MetaContextRequestTest, RejectsBadQueryLengthsAndTrailingBytes) {
  EXPECT_EQ(failure(parse_meta_context_request(Wire().u32(0).u32(1).u32(10).str("abc").bytes())),
            ParseError::kBadLength);
  EXPECT_EQ(
      failure(parse_meta_context_request(Wire().u32(0).u32(1).u32(0xffffffff).str("abc").bytes())),
      ParseError::kBadLength);
  EXPECT_EQ(failure(parse_meta_context_request(Wire().u32(0).u32(1).u32(1).str("ab").bytes())),
            ParseError::kBadLength);  // trailing byte
  EXPECT_EQ(failure(parse_meta_context_request(Wire().u32(0).u32(0).u8(0).bytes())),
            ParseError::kBadLength);
  // A second query whose length field is cut short (3 of its 4 bytes present).
  EXPECT_EQ(failure(parse_meta_context_request(
                Wire().u32(0).u32(2).u32(1).str("a").u8(0).u8(0).u8(0).bytes())),
            ParseError::kBadLength);
}

TEST(MetaContextRequestTest, RejectsLongStringsAndNul) {
  const std::string long_query(5000, 'q');
  EXPECT_EQ(
      failure(parse_meta_context_request(Wire().u32(0).u32(1).u32(5000).str(long_query).bytes())),
      ParseError::kStringTooLong);
  const std::string long_name(5000, 'e');
  EXPECT_EQ(failure(parse_meta_context_request(Wire().u32(5000).str(long_name).u32(0).bytes())),
            ParseError::kStringTooLong);
  EXPECT_EQ(failure(parse_meta_context_request(
                Wire().u32(0).u32(1).u32(3).str("a").u8(0).str("b").bytes())),
            ParseError::kInvalidValue);
  EXPECT_EQ(failure(parse_meta_context_request(Wire().u32(1).u8(0).u32(0).bytes())),
            ParseError::kInvalidValue);
}

// ---------------------------------------------------------------------------------------------
// Option replies: header and server encoders

TEST(OptionReplyTest, EncodesHeader) {
  const Bytes expected = Wire().raw(kOptionReplyMagicBytes).u32(7).u32(0x80000006).u32(5);
  EXPECT_EQ(to_vector(encode_option_reply_header(7, OptionReply::kErrUnknown, 5)), expected);
}

TEST(OptionReplyTest, ParsesHeaderAndRejectsMalformedOnes) {
  auto header = parse_option_reply_header(encode_option_reply_header(3, OptionReply::kServer, 9));
  ASSERT_TRUE(header.ok());
  EXPECT_EQ(header->option, 3u);
  EXPECT_EQ(header->type, 2u);
  EXPECT_EQ(header->length, 9u);
  Bytes bad = to_vector(encode_option_reply_header(3, OptionReply::kAck, 0));
  bad[0] = std::byte{1};
  EXPECT_EQ(failure(parse_option_reply_header(bad)), ParseError::kBadMagic);
  EXPECT_EQ(failure(parse_option_reply_header(truncate(bad, 19))), ParseError::kTruncated);
  EXPECT_EQ(failure(parse_option_reply_header(
                encode_option_reply_header(3, OptionReply::kServer, kMaxOptionReplyLength + 1))),
            ParseError::kTooLarge);
  EXPECT_EQ(failure(parse_option_reply_header(
                encode_option_reply_header(3, OptionReply::kServer, 0xffffffff))),
            ParseError::kTooLarge);
}

TEST(OptionReplyTest, EncodesAck) {
  Bytes out;
  append_reply_ack(out, 7);
  const Bytes expected = hex({0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9,  // reply magic
                              0,    0,    0,    7,    0,    0,    0,    1,    0, 0, 0, 0});
  EXPECT_EQ(out, expected);
}

TEST(OptionReplyTest, EncodesServer) {
  Bytes out;
  append_reply_server(out, 3, "disk", "desc");
  EXPECT_EQ(out, Wire()
                     .raw(kOptionReplyMagicBytes)
                     .u32(3)
                     .u32(2)
                     .u32(12)
                     .u32(4)
                     .str("disk")
                     .str("desc")
                     .bytes());
  auto header = parse_option_reply_header(out);
  ASSERT_TRUE(header.ok());
  auto server = parse_reply_server(std::span(out).subspan(kOptionReplyHeaderSize));
  ASSERT_TRUE(server.ok());
  EXPECT_EQ(server->name, "disk");
  EXPECT_EQ(server->description, "desc");
}

TEST(OptionReplyTest, EncodesInfoExport) {
  Bytes out;
  append_reply_info_export(out, 7, 0x0000000100000200, kFlagHasFlags | kFlagSendFlush);
  const Bytes expected = hex({0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9,  //
                              0,    0,    0,    7,                             // GO
                              0,    0,    0,    3,                             // REP_INFO
                              0,    0,    0,    12,                            // length
                              0,    0,                                         // INFO_EXPORT
                              0,    0,    0,    1,    0,    0,    2,    0,     // size
                              0,    5});                                       // flags
  EXPECT_EQ(out, expected);
  auto info = parse_reply_info_export(std::span(out).subspan(kOptionReplyHeaderSize));
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->size, 0x0000000100000200u);
  EXPECT_EQ(info->transmission_flags, kFlagHasFlags | kFlagSendFlush);
}

TEST(OptionReplyTest, EncodesInfoNameDescriptionAndBlockSize) {
  Bytes out;
  append_reply_info_name(out, 6, "canon");
  append_reply_info_description(out, 6, "hi");
  append_reply_info_block_size(out, 6, 512, 4096, 32u << 20);
  const Bytes expected = Wire()
                             .raw(kOptionReplyMagicBytes)
                             .u32(6)
                             .u32(3)
                             .u32(7)
                             .u16(1)
                             .str("canon")
                             .raw(kOptionReplyMagicBytes)
                             .u32(6)
                             .u32(3)
                             .u32(4)
                             .u16(2)
                             .str("hi")
                             .raw(kOptionReplyMagicBytes)
                             .u32(6)
                             .u32(3)
                             .u32(14)
                             .u16(3)
                             .u32(512)
                             .u32(4096)
                             .u32(0x02000000);
  EXPECT_EQ(out, expected);
}

TEST(OptionReplyTest, EncodesMetaContext) {
  Bytes out;
  append_reply_meta_context(out, 10, 0x11223344, "base:allocation");
  EXPECT_EQ(out, Wire()
                     .raw(kOptionReplyMagicBytes)
                     .u32(10)
                     .u32(4)
                     .u32(19)
                     .u32(0x11223344)
                     .str("base:allocation")
                     .bytes());
  auto reply = parse_reply_meta_context(std::span(out).subspan(kOptionReplyHeaderSize));
  ASSERT_TRUE(reply.ok());
  EXPECT_EQ(reply->context_id, 0x11223344u);
  EXPECT_EQ(reply->name, "base:allocation");
}

TEST(OptionReplyTest, EncodesErrorsWithMessage) {
  Bytes out;
  append_reply_error(out, 7, OptionReply::kErrUnknown, "no such export");
  EXPECT_EQ(out, Wire()
                     .raw(kOptionReplyMagicBytes)
                     .u32(7)
                     .u32(0x80000006)
                     .u32(14)
                     .str("no such export")
                     .bytes());
  out.clear();
  append_reply_error(out, 0x99, OptionReply::kErrUnsupported);
  EXPECT_EQ(out, Wire().raw(kOptionReplyMagicBytes).u32(0x99).u32(0x80000001).u32(0).bytes());
}

TEST(OptionReplyTest, ClipsLongMessagesAtAUtf8Boundary) {
  Bytes out;
  append_reply_error(out, 7, OptionReply::kErrInvalid, std::string(10000, 'm'));
  EXPECT_EQ(out.size(), kOptionReplyHeaderSize + kMaxStringLength);
  EXPECT_EQ(parse_option_reply_header(out)->length, kMaxStringLength);
  // "é" (2 bytes) straddling byte 4096: the whole character goes.
  out.clear();
  const std::string message = std::string(4095, 'm') + "\xc3\xa9" + "tail";
  append_reply_error(out, 7, OptionReply::kErrInvalid, message);
  EXPECT_EQ(parse_option_reply_header(out)->length, 4095u);
  EXPECT_EQ(out.back(), std::byte{'m'});
}

TEST(OptionReplyDeathTest, ErrorReplyNeedsAnErrorType) {
  Bytes out;
  EXPECT_DEATH(append_reply_error(out, 7, OptionReply::kAck, "x"), "non-error reply type 1");
}

TEST(OptionReplyTest, ServerDescriptionIsClipped) {
  Bytes out;
  append_reply_server(out, 3, "disk", std::string(5000, 'd'));
  EXPECT_EQ(parse_option_reply_header(out)->length, 4 + 4 + kMaxStringLength);
}

TEST(OptionReplyTest, ListRepliesParseInSequence) {
  Bytes out;
  append_reply_server(out, 3, "a", "");
  append_reply_server(out, 3, "second", "the second export");
  append_reply_ack(out, 3);
  std::span<const std::byte> rest(out);
  std::vector<std::string> names;
  for (;;) {
    auto header = parse_option_reply_header(rest);
    ASSERT_TRUE(header.ok());
    rest = rest.subspan(kOptionReplyHeaderSize);
    if (header->type == static_cast<std::uint32_t>(OptionReply::kAck)) break;
    ASSERT_EQ(header->type, static_cast<std::uint32_t>(OptionReply::kServer));
    auto server = parse_reply_server(rest.first(header->length));
    ASSERT_TRUE(server.ok());
    names.emplace_back(server->name);
    rest = rest.subspan(header->length);
  }
  EXPECT_TRUE(rest.empty());
  EXPECT_EQ(names, (std::vector<std::string>{"a", "second"}));
}

// ---------------------------------------------------------------------------------------------
// Option replies: client-side payload parsers

TEST(ServerReplyTest, RejectsMalformedPayloads) {
  EXPECT_EQ(failure(parse_reply_server(hex({0, 0, 0}))), ParseError::kTruncated);
  EXPECT_EQ(failure(parse_reply_server(Wire().u32(10).str("disk").bytes())),
            ParseError::kBadLength);
  EXPECT_EQ(failure(parse_reply_server(Wire().u32(0xffffffff).bytes())), ParseError::kBadLength);
  EXPECT_EQ(failure(parse_reply_server(Wire().u32(5000).str(std::string(5000, 'n')).bytes())),
            ParseError::kStringTooLong);
  EXPECT_EQ(failure(parse_reply_server(Wire().u32(1).str("n").str(std::string(5000, 'd')).bytes())),
            ParseError::kStringTooLong);
  EXPECT_EQ(failure(parse_reply_server(Wire().u32(2).str("a").u8(0).bytes())),
            ParseError::kInvalidValue);
  const Bytes empty_payload = Wire().u32(0);
  auto empty = parse_reply_server(empty_payload);
  ASSERT_TRUE(empty.ok());
  EXPECT_EQ(empty->name, "");
  EXPECT_EQ(empty->description, "");
}

TEST(InfoReplyTest, ParsesType) {
  EXPECT_EQ(*parse_reply_info_type(hex({0, 3, 9, 9})), 3);
  EXPECT_EQ(failure(parse_reply_info_type(hex({0}))), ParseError::kTruncated);
}

TEST(InfoReplyTest, ExportRejectsSizesFrom2To63AndMissingHasFlags) {
  EXPECT_EQ(failure(parse_reply_info_export(Wire().u16(0).u64(kTwoTo63).u16(1).bytes())),
            ParseError::kTooLarge);
  EXPECT_EQ(failure(parse_reply_info_export(Wire().u16(0).u64(~std::uint64_t{0}).u16(1).bytes())),
            ParseError::kTooLarge);
  auto largest = parse_reply_info_export(Wire().u16(0).u64(kTwoTo63 - 1).u16(1).bytes());
  ASSERT_TRUE(largest.ok());
  EXPECT_EQ(largest->size, kTwoTo63 - 1);
  EXPECT_EQ(failure(parse_reply_info_export(Wire().u16(0).u64(4096).u16(kFlagReadOnly).bytes())),
            ParseError::kInvalidValue);
  EXPECT_EQ(failure(parse_reply_info_export(Wire().u16(0).u64(4096).u8(1).bytes())),
            ParseError::kBadLength);
  EXPECT_EQ(failure(parse_reply_info_export(Wire().u16(0).u64(4096).u16(1).u8(0).bytes())),
            ParseError::kBadLength);
  EXPECT_EQ(failure(parse_reply_info_export(Wire().u16(1).u64(4096).u16(1).bytes())),
            ParseError::kInvalidValue);  // not INFO_EXPORT
}

TEST(InfoReplyTest, ParsesNameAndDescriptionStrings) {
  EXPECT_EQ(*parse_reply_info_string(Wire().u16(1).str("canonical").bytes()), "canonical");
  EXPECT_EQ(*parse_reply_info_string(Wire().u16(2).bytes()), "");
  EXPECT_EQ(failure(parse_reply_info_string(hex({0}))), ParseError::kTruncated);
  EXPECT_EQ(failure(parse_reply_info_string(Wire().u16(1).str(std::string(4097, 'x')).bytes())),
            ParseError::kStringTooLong);
  EXPECT_EQ(failure(parse_reply_info_string(Wire().u16(1).u8(0).bytes())),
            ParseError::kInvalidValue);
}

TEST(InfoReplyTest, BlockSizeParsesAndChecksConstraints) {
  auto sizes = parse_reply_info_block_size(Wire().u16(3).u32(512).u32(4096).u32(1u << 25).bytes());
  ASSERT_TRUE(sizes.ok());
  EXPECT_EQ(sizes->minimum, 512u);
  EXPECT_EQ(sizes->preferred, 4096u);
  EXPECT_EQ(sizes->maximum, 1u << 25);
  EXPECT_TRUE(
      parse_reply_info_block_size(Wire().u16(3).u32(1).u32(4096).u32(0xffffffff).bytes()).ok());
  EXPECT_TRUE(
      parse_reply_info_block_size(Wire().u16(3).u32(65536).u32(65536).u32(65536).bytes()).ok());
  const auto bad = [](std::uint32_t min, std::uint32_t pref, std::uint32_t max) {
    return failure(parse_reply_info_block_size(Wire().u16(3).u32(min).u32(pref).u32(max).bytes()));
  };
  EXPECT_EQ(bad(0, 4096, 1 << 20), ParseError::kInvalidValue);
  EXPECT_EQ(bad(3, 4096, 1 << 20), ParseError::kInvalidValue);
  EXPECT_EQ(bad(1 << 17, 1 << 17, 1 << 20), ParseError::kInvalidValue);  // min > 64 KiB
  EXPECT_EQ(bad(512, 1000, 1 << 20), ParseError::kInvalidValue);
  EXPECT_EQ(bad(4096, 512, 1 << 20), ParseError::kInvalidValue);
  EXPECT_EQ(bad(4096, 4096, 512), ParseError::kInvalidValue);
  EXPECT_EQ(failure(parse_reply_info_block_size(Wire().u16(3).u32(1).u32(1).u16(0).bytes())),
            ParseError::kBadLength);
  EXPECT_EQ(failure(parse_reply_info_block_size(Wire().u16(0).u32(1).u32(4096).u32(4096).bytes())),
            ParseError::kInvalidValue);
}

TEST(MetaContextReplyTest, RejectsMalformedPayloads) {
  EXPECT_EQ(failure(parse_reply_meta_context(hex({0, 0, 1}))), ParseError::kTruncated);
  EXPECT_EQ(failure(parse_reply_meta_context(Wire().u32(1).bytes())), ParseError::kBadLength);
  EXPECT_EQ(failure(parse_reply_meta_context(Wire().u32(1).str(std::string(4097, 'c')).bytes())),
            ParseError::kStringTooLong);
  EXPECT_EQ(failure(parse_reply_meta_context(Wire().u32(1).str("a").u8(0).bytes())),
            ParseError::kInvalidValue);
}

// ---------------------------------------------------------------------------------------------
// EXPORT_NAME reply

TEST(ExportNameReplyTest, EncodesWithAndWithoutZeroes) {
  Bytes out;
  append_export_name_reply(out, 0x1122334455667788, 0x0103, false);
  EXPECT_EQ(out, Wire().u64(0x1122334455667788).u16(0x0103).zeroes(124).bytes());
  EXPECT_EQ(out.size(), 134u);
  out.clear();
  append_export_name_reply(out, 1 << 20, kFlagHasFlags, true);
  EXPECT_EQ(out, hex({0, 0, 0, 0, 0, 0x10, 0, 0, 0, 1}));
}

TEST(ExportNameReplyTest, ParsesAndRejectsHostileSizes) {
  auto info = parse_export_name_reply(Wire().u64(1 << 20).u16(3).zeroes(124).bytes());
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->size, 1u << 20);
  EXPECT_EQ(info->transmission_flags, 3);
  EXPECT_EQ(failure(parse_export_name_reply(Wire().u64(kTwoTo63).u16(1).bytes())),
            ParseError::kTooLarge);
  EXPECT_EQ(failure(parse_export_name_reply(Wire().u64(1).u16(0).bytes())),
            ParseError::kInvalidValue);
  EXPECT_EQ(failure(parse_export_name_reply(Wire().u64(1).u8(1).bytes())), ParseError::kTruncated);
}

// ---------------------------------------------------------------------------------------------
// Requests

TEST(RequestTest, EncodesByteByByte) {
  const RequestHeader request{kCmdFlagFua, static_cast<std::uint16_t>(Command::kWrite),
                              0x0102030405060708, 0x1112131415161718, 0x21222324};
  const Bytes expected = hex({0x25, 0x60, 0x95, 0x13,                          // magic
                              0x00, 0x01,                                      // FUA
                              0x00, 0x01,                                      // WRITE
                              0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08,  // cookie
                              0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18,  // offset
                              0x21, 0x22, 0x23, 0x24});                        // length
  EXPECT_EQ(to_vector(encode_request(request)), expected);
}

TEST(RequestTest, ParsesAndRoundTrips) {
  const RequestHeader request{kCmdFlagReqOne, 7, ~std::uint64_t{0}, 4096, 65536};
  auto parsed = parse_request(encode_request(request));
  ASSERT_TRUE(parsed.ok());
  EXPECT_EQ(parsed->flags, kCmdFlagReqOne);
  EXPECT_EQ(parsed->command(), Command::kBlockStatus);
  EXPECT_EQ(parsed->cookie, ~std::uint64_t{0});
  EXPECT_EQ(parsed->offset, 4096u);
  EXPECT_EQ(parsed->length, 65536u);
}

TEST(RequestTest, RejectsWrongMagicAndTruncation) {
  Bytes bytes = to_vector(encode_request({}));
  EXPECT_EQ(failure(parse_request(truncate(bytes, 27))), ParseError::kTruncated);
  bytes[3] = std::byte{0x14};  // 0x25609514: a reserved magic
  EXPECT_EQ(failure(parse_request(bytes)), ParseError::kBadMagic);
  const Bytes reply_magic = Wire().raw(kSimpleMagicBytes).zeroes(24);
  EXPECT_EQ(failure(parse_request(reply_magic)), ParseError::kBadMagic);
}

TEST(RequestTest, OnlyWriteCarriesAPayload) {
  EXPECT_EQ(request_payload_length({0, 1, 0, 0, 4096}), 4096u);
  EXPECT_EQ(request_payload_length({0, 0, 0, 0, 4096}), 0u);
  EXPECT_EQ(request_payload_length({0, 6, 0, 0, 4096}), 0u);
  EXPECT_EQ(request_payload_length({0, 99, 0, 0, 4096}), 0u);
}

// A writable 1 MiB export with everything advertised.
TransmissionPolicy full_policy() {
  TransmissionPolicy policy;
  policy.export_size = 1 << 20;
  policy.transmission_flags = kFlagHasFlags | kFlagSendFlush | kFlagSendFua | kFlagSendTrim |
                              kFlagSendWriteZeroes | kFlagSendDf | kFlagSendCache |
                              kFlagSendFastZero | kFlagCanMultiConn;
  policy.structured_replies = true;
  policy.block_status = true;
  return policy;
}

RequestHeader req(Command command, std::uint64_t offset, std::uint32_t length,
                  std::uint16_t flags = 0) {
  return {flags, static_cast<std::uint16_t>(command), 42, offset, length};
}

Error verdict_error(const RequestHeader& request, const TransmissionPolicy& policy) {
  const RequestVerdict verdict = validate_request(request, policy);
  EXPECT_FALSE(verdict.disconnect);
  return verdict.error;
}

TEST(ValidateRequestTest, AcceptsEveryAdvertisedCommand) {
  const TransmissionPolicy policy = full_policy();
  for (Command command : {Command::kRead, Command::kWrite, Command::kTrim, Command::kCache,
                          Command::kWriteZeroes, Command::kBlockStatus}) {
    const RequestVerdict verdict = validate_request(req(command, 4096, 4096), policy);
    EXPECT_TRUE(verdict.ok()) << command_name(static_cast<std::uint16_t>(command));
  }
  EXPECT_TRUE(validate_request(req(Command::kFlush, 0, 0), policy).ok());
}

TEST(ValidateRequestTest, RejectsUnknownCommands) {
  const TransmissionPolicy policy = full_policy();
  EXPECT_EQ(verdict_error({0, 8, 1, 0, 512}, policy), Error::kInvalid);  // RESIZE: not spoken
  EXPECT_EQ(verdict_error({0, 0xffff, 1, 0, 0}, policy), Error::kInvalid);
  EXPECT_FALSE(validate_request({0, 9, 1, 0, 0}, policy).ok());
}

TEST(ValidateRequestTest, DisconnectIsAlwaysAccepted) {
  EXPECT_TRUE(validate_request(req(Command::kDisconnect, 0, 0), full_policy()).ok());
  // DISC has no reply to carry an error: the server closes whatever the fields say.
  EXPECT_TRUE(
      validate_request(req(Command::kDisconnect, 99, 99, 0xffff), TransmissionPolicy{}).ok());
}

TEST(ValidateRequestTest, RejectsCommandsThatWereNotAdvertised) {
  TransmissionPolicy policy;
  policy.export_size = 1 << 20;
  EXPECT_EQ(verdict_error(req(Command::kFlush, 0, 0), policy), Error::kInvalid);
  EXPECT_EQ(verdict_error(req(Command::kTrim, 0, 512), policy), Error::kInvalid);
  EXPECT_EQ(verdict_error(req(Command::kWriteZeroes, 0, 512), policy), Error::kInvalid);
  EXPECT_EQ(verdict_error(req(Command::kCache, 0, 512), policy), Error::kInvalid);
  EXPECT_EQ(verdict_error(req(Command::kBlockStatus, 0, 512), policy), Error::kInvalid);
  EXPECT_TRUE(validate_request(req(Command::kRead, 0, 512), policy).ok());
  EXPECT_TRUE(validate_request(req(Command::kWrite, 0, 512), policy).ok());
}

TEST(ValidateRequestTest, BlockStatusNeedsStructuredRepliesAndAContext) {
  TransmissionPolicy policy = full_policy();
  policy.block_status = false;
  EXPECT_EQ(verdict_error(req(Command::kBlockStatus, 0, 512), policy), Error::kInvalid);
  policy = full_policy();
  policy.structured_replies = false;
  EXPECT_EQ(verdict_error(req(Command::kBlockStatus, 0, 512), policy), Error::kInvalid);
  EXPECT_TRUE(
      validate_request(req(Command::kBlockStatus, 0, 512, kCmdFlagReqOne), full_policy()).ok());
  EXPECT_EQ(verdict_error(req(Command::kBlockStatus, 0, 0), full_policy()), Error::kInvalid);
}

TEST(ValidateRequestTest, RejectsUnknownFlags) {
  const TransmissionPolicy policy = full_policy();
  EXPECT_EQ(verdict_error(req(Command::kRead, 0, 512, 1u << 5), policy), Error::kInvalid);
  EXPECT_EQ(verdict_error(req(Command::kWrite, 0, 512, 0x8000), policy), Error::kInvalid);
  EXPECT_EQ(verdict_error(req(Command::kFlush, 0, 0, 1u << 7), policy), Error::kInvalid);
}

TEST(ValidateRequestTest, FuaNeedsSendFuaAndIsThenValidOnAnyCommand) {
  TransmissionPolicy policy = full_policy();
  for (Command command : {Command::kRead, Command::kWrite, Command::kTrim, Command::kCache,
                          Command::kWriteZeroes, Command::kBlockStatus}) {
    EXPECT_TRUE(validate_request(req(command, 0, 512, kCmdFlagFua), policy).ok());
  }
  EXPECT_TRUE(validate_request(req(Command::kFlush, 0, 0, kCmdFlagFua), policy).ok());
  policy.transmission_flags &= static_cast<std::uint16_t>(~kFlagSendFua);
  EXPECT_EQ(verdict_error(req(Command::kWrite, 0, 512, kCmdFlagFua), policy), Error::kInvalid);
  EXPECT_EQ(verdict_error(req(Command::kFlush, 0, 0, kCmdFlagFua), policy), Error::kInvalid);
}

TEST(ValidateRequestTest, FlagsOnlyForTheirCommands) {
  const TransmissionPolicy policy = full_policy();
  EXPECT_EQ(verdict_error(req(Command::kWrite, 0, 512, kCmdFlagNoHole), policy), Error::kInvalid);
  EXPECT_EQ(verdict_error(req(Command::kTrim, 0, 512, kCmdFlagNoHole), policy), Error::kInvalid);
  EXPECT_TRUE(validate_request(req(Command::kWriteZeroes, 0, 512, kCmdFlagNoHole), policy).ok());
  EXPECT_EQ(verdict_error(req(Command::kWrite, 0, 512, kCmdFlagDf), policy), Error::kInvalid);
  EXPECT_TRUE(validate_request(req(Command::kRead, 0, 512, kCmdFlagDf), policy).ok());
  EXPECT_EQ(verdict_error(req(Command::kRead, 0, 512, kCmdFlagReqOne), policy), Error::kInvalid);
  EXPECT_EQ(verdict_error(req(Command::kWrite, 0, 512, kCmdFlagFastZero), policy), Error::kInvalid);
  EXPECT_TRUE(validate_request(
                  req(Command::kWriteZeroes, 0, 512, kCmdFlagFastZero | kCmdFlagNoHole), policy)
                  .ok());
}

TEST(ValidateRequestTest, DfAndFastZeroNeedTheirTransmissionFlags) {
  TransmissionPolicy policy = full_policy();
  policy.transmission_flags &= static_cast<std::uint16_t>(~(kFlagSendDf | kFlagSendFastZero));
  EXPECT_EQ(verdict_error(req(Command::kRead, 0, 512, kCmdFlagDf), policy), Error::kInvalid);
  EXPECT_EQ(verdict_error(req(Command::kWriteZeroes, 0, 512, kCmdFlagFastZero), policy),
            Error::kInvalid);
  policy = full_policy();
  policy.structured_replies = false;  // DF means nothing without structured replies
  EXPECT_EQ(verdict_error(req(Command::kRead, 0, 512, kCmdFlagDf), policy), Error::kInvalid);
}

TEST(ValidateRequestTest, OversizedWriteMeansDisconnect) {
  TransmissionPolicy policy = full_policy();
  policy.export_size = std::uint64_t{1} << 40;
  EXPECT_TRUE(validate_request(req(Command::kWrite, 0, 32u << 20), policy).ok());
  RequestVerdict verdict = validate_request(req(Command::kWrite, 0, (32u << 20) + 1), policy);
  EXPECT_TRUE(verdict.disconnect);
  EXPECT_FALSE(verdict.ok());
  // Even when something else is wrong too: a rejected WRITE must be drained, and this one can't.
  verdict = validate_request(req(Command::kWrite, 0, 0xffffffff, 0x8000), policy);
  EXPECT_TRUE(verdict.disconnect);
  policy.transmission_flags |= kFlagReadOnly;
  EXPECT_TRUE(validate_request(req(Command::kWrite, 0, 0xffffffff), policy).disconnect);
  policy = full_policy();
  policy.max_write_payload = 4096;
  EXPECT_TRUE(validate_request(req(Command::kWrite, 0, 4097), policy).disconnect);
  EXPECT_TRUE(validate_request(req(Command::kWrite, 0, 4096), policy).ok());
}

TEST(ValidateRequestTest, OversizedReadAndCacheGetEinval) {
  TransmissionPolicy policy = full_policy();
  policy.export_size = std::uint64_t{1} << 40;
  EXPECT_TRUE(validate_request(req(Command::kRead, 0, 32u << 20), policy).ok());
  EXPECT_EQ(verdict_error(req(Command::kRead, 0, (32u << 20) + 1), policy), Error::kInvalid);
  EXPECT_EQ(verdict_error(req(Command::kCache, 0, 0xffffffff), policy), Error::kInvalid);
  policy.max_read_length = 1 << 20;
  EXPECT_EQ(verdict_error(req(Command::kRead, 0, (1 << 20) + 1), policy), Error::kInvalid);
  // Payload-less commands may exceed the payload limit.
  EXPECT_TRUE(validate_request(req(Command::kTrim, 0, 0xffffffff), policy).ok());
  EXPECT_TRUE(validate_request(req(Command::kWriteZeroes, 0, 0xffffffff), policy).ok());
  EXPECT_TRUE(validate_request(req(Command::kBlockStatus, 0, 0xffffffff), policy).ok());
}

TEST(ValidateRequestTest, FlushMustHaveZeroOffsetAndLength) {
  const TransmissionPolicy policy = full_policy();
  EXPECT_EQ(verdict_error(req(Command::kFlush, 512, 0), policy), Error::kInvalid);
  EXPECT_EQ(verdict_error(req(Command::kFlush, 0, 512), policy), Error::kInvalid);
}

TEST(ValidateRequestTest, ReadOnlyExportRejectsWritesWithEperm) {
  TransmissionPolicy policy = full_policy();
  policy.transmission_flags |= kFlagReadOnly;
  EXPECT_EQ(verdict_error(req(Command::kWrite, 0, 512), policy), Error::kPermission);
  EXPECT_EQ(verdict_error(req(Command::kTrim, 0, 512), policy), Error::kPermission);
  EXPECT_EQ(verdict_error(req(Command::kWriteZeroes, 0, 512), policy), Error::kPermission);
  EXPECT_TRUE(validate_request(req(Command::kRead, 0, 512), policy).ok());
  EXPECT_TRUE(validate_request(req(Command::kFlush, 0, 0), policy).ok());
  EXPECT_TRUE(validate_request(req(Command::kCache, 0, 512), policy).ok());
}

TEST(ValidateRequestTest, RangeBeyondTheExport) {
  const TransmissionPolicy policy = full_policy();
  const std::uint64_t size = policy.export_size;
  EXPECT_TRUE(validate_request(req(Command::kRead, size - 1, 1), policy).ok());
  EXPECT_TRUE(validate_request(req(Command::kWrite, size - 512, 512), policy).ok());
  EXPECT_EQ(verdict_error(req(Command::kRead, size - 1, 2), policy), Error::kInvalid);
  EXPECT_EQ(verdict_error(req(Command::kWrite, size - 1, 2), policy), Error::kNoSpace);
  EXPECT_EQ(verdict_error(req(Command::kWriteZeroes, size, 1), policy), Error::kNoSpace);
  EXPECT_EQ(verdict_error(req(Command::kTrim, size, 1), policy), Error::kInvalid);
  EXPECT_EQ(verdict_error(req(Command::kCache, size + 1, 0), policy), Error::kInvalid);
  EXPECT_EQ(verdict_error(req(Command::kBlockStatus, size, 1), policy), Error::kInvalid);
}

TEST(ValidateRequestTest, OffsetPlusLengthOverflow) {
  TransmissionPolicy policy = full_policy();
  const std::uint64_t max = ~std::uint64_t{0};
  EXPECT_EQ(verdict_error(req(Command::kRead, max, 2), policy), Error::kInvalid);  // wraps to 1
  EXPECT_EQ(verdict_error(req(Command::kWrite, max - 511, 512), policy), Error::kNoSpace);
  // Even a server claiming a 2^64 − 1 byte export stops at 2^63 − 1.
  policy.export_size = max;
  EXPECT_TRUE(validate_request(req(Command::kRead, kTwoTo63 - 2, 1), policy).ok());
  EXPECT_EQ(verdict_error(req(Command::kRead, kTwoTo63 - 1, 1), policy), Error::kInvalid);
  EXPECT_EQ(verdict_error(req(Command::kRead, kTwoTo63, 0), policy), Error::kInvalid);
  EXPECT_EQ(verdict_error(req(Command::kWrite, max, 1), policy), Error::kNoSpace);
}

TEST(ValidateRequestTest, ZeroLengthRequestsAreServed) {
  const TransmissionPolicy policy = full_policy();
  EXPECT_TRUE(validate_request(req(Command::kRead, 0, 0), policy).ok());
  EXPECT_TRUE(validate_request(req(Command::kWrite, 512, 0), policy).ok());
  EXPECT_TRUE(validate_request(req(Command::kTrim, policy.export_size, 0), policy).ok());
  EXPECT_TRUE(validate_request(req(Command::kWriteZeroes, 0, 0), policy).ok());
}

TEST(ValidateRequestTest, ReadAndWriteAlignedToTheMinimumBlockSize) {
  TransmissionPolicy policy = full_policy();
  policy.min_block_size = 512;
  EXPECT_TRUE(validate_request(req(Command::kRead, 512, 1024), policy).ok());
  EXPECT_EQ(verdict_error(req(Command::kRead, 1, 512), policy), Error::kInvalid);
  EXPECT_EQ(verdict_error(req(Command::kWrite, 512, 100), policy), Error::kInvalid);
  EXPECT_TRUE(validate_request(req(Command::kTrim, 1, 100), policy).ok());  // hint: not checked
}

// ---------------------------------------------------------------------------------------------
// Simple replies

TEST(SimpleReplyTest, EncodesByteByByte) {
  const Bytes expected = hex({0x67, 0x44, 0x66, 0x98,  // magic
                              0x00, 0x00, 0x00, 0x16,  // EINVAL
                              0xde, 0xad, 0xbe, 0xef, 0x00, 0x00, 0x00, 0x01});
  EXPECT_EQ(to_vector(encode_simple_reply(Error::kInvalid, 0xdeadbeef00000001)), expected);
}

TEST(SimpleReplyTest, ParsesAndRejectsMalformedOnes) {
  auto reply = parse_simple_reply(encode_simple_reply(Error::kNoSpace, 77));
  ASSERT_TRUE(reply.ok());
  EXPECT_EQ(reply->error, 28u);
  EXPECT_EQ(reply->cookie, 77u);
  Bytes bytes = to_vector(encode_simple_reply(Error::kNone, 1));
  EXPECT_EQ(failure(parse_simple_reply(truncate(bytes, 15))), ParseError::kTruncated);
  const Bytes structured = Wire().raw(kStructuredMagicBytes).zeroes(12);
  EXPECT_EQ(failure(parse_simple_reply(structured)), ParseError::kBadMagic);
}

TEST(SimpleReplyTest, ClassifiesReplyMagic) {
  EXPECT_EQ(classify_reply(std::span<const std::byte, 4>(kSimpleMagicBytes.data(), 4)),
            ReplyKind::kSimple);
  EXPECT_EQ(classify_reply(std::span<const std::byte, 4>(kStructuredMagicBytes.data(), 4)),
            ReplyKind::kStructured);
  EXPECT_EQ(classify_reply(std::span<const std::byte, 4>(kRequestMagicBytes.data(), 4)),
            ReplyKind::kBadMagic);
}

// ---------------------------------------------------------------------------------------------
// Structured chunks: encoders

TEST(ChunkEncodeTest, HeaderAndNoneChunkByteByByte) {
  const Bytes header = hex({0x66, 0x8e, 0x33, 0xef,                    // magic
                            0x00, 0x01,                                // DONE
                            0x80, 0x01,                                // ERROR
                            0,    0,    0,    0,    0, 0, 0x12, 0x34,  // cookie
                            0x00, 0x00, 0x01, 0x00});                  // length
  EXPECT_EQ(to_vector(encode_chunk_header(kReplyFlagDone, ChunkType::kError, 0x1234, 256)), header);
  const Bytes none = hex({0x66, 0x8e, 0x33, 0xef, 0x00, 0x01, 0x00, 0x00,  //
                          0,    0,    0,    0,    0,    0,    0,    9,    0, 0, 0, 0});
  EXPECT_EQ(to_vector(encode_none_chunk(9)), none);
}

TEST(ChunkEncodeTest, OffsetDataHeaderCountsTheOffset) {
  const Bytes expected =
      Wire().raw(kStructuredMagicBytes).u16(0).u16(1).u64(5).u32(4096 + 8).u64(0x10000);
  EXPECT_EQ(to_vector(encode_offset_data_header(5, 0x10000, 4096, false)), expected);
  const auto done = encode_offset_data_header(5, 0, 1, true);
  EXPECT_EQ(done[5], std::byte{1});
  EXPECT_EQ(base::load_be32(done.data() + 16), 9u);
}

TEST(ChunkEncodeTest, OffsetHoleByteByByte) {
  const Bytes expected = hex({0x66, 0x8e, 0x33, 0xef, 0x00, 0x01, 0x00, 0x02,  //
                              0,    0,    0,    0,    0,    0,    0,    3,     // cookie
                              0,    0,    0,    12,                            // length
                              0,    0,    0,    0,    0,    0x10, 0,    0,     // offset
                              0,    0,    0x02, 0x00});                        // hole size
  EXPECT_EQ(to_vector(encode_offset_hole(3, 0x100000, 512, true)), expected);
}

TEST(ChunkEncodeTest, BlockStatusByteByByte) {
  Bytes out;
  const Extent extents[] = {{4096, kStateHole | kStateZero}, {8192, 0}};
  append_block_status_chunk(out, 11, 1, extents, true);
  const Bytes expected = Wire()
                             .raw(kStructuredMagicBytes)
                             .u16(1)
                             .u16(5)
                             .u64(11)
                             .u32(4 + 16)
                             .u32(1)
                             .u32(4096)
                             .u32(3)
                             .u32(8192)
                             .u32(0);
  EXPECT_EQ(out, expected);
  // The split encoders produce the same bytes.
  Bytes split = to_vector(encode_block_status_header(11, 1, 2, true));
  for (const Extent& e : extents) {
    const Bytes piece = to_vector(encode_extent(e));
    split.insert(split.end(), piece.begin(), piece.end());
  }
  EXPECT_EQ(split, expected);
}

TEST(ChunkEncodeTest, ErrorChunksByteByByte) {
  Bytes out;
  append_error_chunk(out, 2, Error::kIo, "hello", true);
  const Bytes error = hex({0x66, 0x8e, 0x33, 0xef, 0x00, 0x01, 0x80, 0x01,  //
                           0,    0,    0,    0,    0,    0,    0,    2,     // cookie
                           0,    0,    0,    11,                            // 6 + 5
                           0,    0,    0,    5,                             // EIO
                           0,    5,    'h',  'e',  'l',  'l',  'o'});
  EXPECT_EQ(out, error);
  out.clear();
  append_error_offset_chunk(out, 2, Error::kIo, "", 0x200, false);
  const Bytes error_offset = hex({0x66, 0x8e, 0x33, 0xef, 0x00, 0x00, 0x80, 0x02,  //
                                  0,    0,    0,    0,    0,    0,    0,    2,     //
                                  0,    0,    0,    14,                            //
                                  0,    0,    0,    5,    0,    0,                 //
                                  0,    0,    0,    0,    0,    0,    0x02, 0x00});
  EXPECT_EQ(out, error_offset);
}

TEST(ChunkEncodeTest, ErrorMessageIsClipped) {
  Bytes out;
  append_error_chunk(out, 1, Error::kInvalid, std::string(70000, 'x'), true);
  auto header = parse_chunk_header(out);
  ASSERT_TRUE(header.ok());
  EXPECT_EQ(header->length, 6 + kMaxStringLength);
  auto chunk = parse_error_chunk(*header, std::span(out).subspan(kChunkHeaderSize));
  ASSERT_TRUE(chunk.ok());
  EXPECT_EQ(chunk->message.size(), kMaxStringLength);
}

// ---------------------------------------------------------------------------------------------
// Structured chunks: header parsing

std::optional<ParseError> chunk_error(std::uint16_t flags, std::uint16_t type,
                                      std::uint32_t length) {
  return failure(parse_chunk_header(
      Wire().raw(kStructuredMagicBytes).u16(flags).u16(type).u64(1).u32(length).bytes()));
}
bool chunk_ok(std::uint16_t flags, std::uint16_t type, std::uint32_t length) {
  return !chunk_error(flags, type, length).has_value();
}

TEST(ChunkHeaderTest, ParsesAndRoundTrips) {
  auto header = parse_chunk_header(
      encode_chunk_header(kReplyFlagDone | 0x8000, ChunkType::kOffsetData, 0xabcdef, 4104));
  ASSERT_TRUE(header.ok());
  EXPECT_TRUE(header->done());
  EXPECT_EQ(header->flags, kReplyFlagDone | 0x8000);  // unknown flags are ignored, not refused
  EXPECT_EQ(header->type, 1);
  EXPECT_EQ(header->cookie, 0xabcdefu);
  EXPECT_EQ(header->length, 4104u);
}

TEST(ChunkHeaderTest, RejectsWrongMagicTruncationAndHugeLengths) {
  Bytes bytes = to_vector(encode_none_chunk(1));
  EXPECT_EQ(failure(parse_chunk_header(truncate(bytes, 19))), ParseError::kTruncated);
  bytes[0] = std::byte{0x67};
  EXPECT_EQ(failure(parse_chunk_header(bytes)), ParseError::kBadMagic);
  EXPECT_TRUE(chunk_ok(0, 1, kMaxChunkPayloadLength));
  EXPECT_EQ(chunk_error(0, 1, kMaxChunkPayloadLength + 1), ParseError::kTooLarge);
  EXPECT_EQ(chunk_error(0, 1, 0xffffffff), ParseError::kTooLarge);
  EXPECT_EQ(
      failure(parse_chunk_header(encode_chunk_header(0, ChunkType::kOffsetData, 1, 4097), 4096)),
      ParseError::kTooLarge);
}

TEST(ChunkHeaderTest, LengthMustMatchTheType) {
  EXPECT_TRUE(chunk_ok(1, 0, 0));
  EXPECT_EQ(chunk_error(1, 0, 1), ParseError::kBadLength);     // NONE with payload
  EXPECT_EQ(chunk_error(0, 0, 0), ParseError::kInvalidValue);  // NONE without DONE
  EXPECT_TRUE(chunk_ok(0, 1, 9));
  EXPECT_EQ(chunk_error(0, 1, 8), ParseError::kBadLength);  // data without data
  EXPECT_EQ(chunk_error(0, 1, 0), ParseError::kBadLength);
  EXPECT_TRUE(chunk_ok(0, 2, 12));
  EXPECT_EQ(chunk_error(0, 2, 11), ParseError::kBadLength);
  EXPECT_EQ(chunk_error(0, 2, 13), ParseError::kBadLength);
  EXPECT_TRUE(chunk_ok(0, 5, 12));
  EXPECT_TRUE(chunk_ok(0, 5, 4 + 8 * 1000));
  EXPECT_EQ(chunk_error(0, 5, 4), ParseError::kBadLength);  // no descriptor
  EXPECT_EQ(chunk_error(0, 5, 8), ParseError::kBadLength);
  EXPECT_EQ(chunk_error(0, 5, 13), ParseError::kBadLength);
  EXPECT_TRUE(chunk_ok(0, 0x8001, 6));
  EXPECT_EQ(chunk_error(0, 0x8001, 5), ParseError::kBadLength);
  EXPECT_TRUE(chunk_ok(0, 0x8002, 14));
  EXPECT_EQ(chunk_error(0, 0x8002, 13), ParseError::kBadLength);
}

TEST(ChunkHeaderTest, UnknownTypes) {
  EXPECT_TRUE(
      chunk_ok(1, 0x8005, 6));  // unknown error type: the request fails, transmission goes on
  EXPECT_EQ(chunk_error(1, 0x8005, 5), ParseError::kBadLength);
  EXPECT_EQ(chunk_error(0, 3, 0), ParseError::kUnsupported);   // unknown non-error: disconnect
  EXPECT_EQ(chunk_error(0, 6, 20), ParseError::kUnsupported);  // BLOCK_STATUS_EXT, not negotiated
  EXPECT_EQ(chunk_error(0, 0x7fff, 0), ParseError::kUnsupported);
}

// ---------------------------------------------------------------------------------------------
// Structured chunks: payloads

ChunkHeader header_of(ChunkType type, std::uint32_t length, std::uint16_t flags = 0) {
  return {flags, static_cast<std::uint16_t>(type), 1, length};
}

TEST(OffsetDataTest, ParsesOffsetAndDataLength) {
  auto data =
      parse_offset_data(header_of(ChunkType::kOffsetData, 8 + 4096), Wire().u64(0x7000).bytes());
  ASSERT_TRUE(data.ok());
  EXPECT_EQ(data->offset, 0x7000u);
  EXPECT_EQ(data->data_length, 4096u);
}

TEST(OffsetDataTest, RejectsHostileValues) {
  EXPECT_EQ(failure(parse_offset_data(header_of(ChunkType::kOffsetData, 9), hex({0, 0, 0}))),
            ParseError::kTruncated);
  EXPECT_EQ(failure(parse_offset_data(header_of(ChunkType::kOffsetData, 8), Wire().u64(0).bytes())),
            ParseError::kBadLength);
  EXPECT_EQ(
      failure(parse_offset_data(header_of(ChunkType::kOffsetHole, 12), Wire().u64(0).bytes())),
      ParseError::kInvalidValue);
  EXPECT_EQ(failure(parse_offset_data(header_of(ChunkType::kOffsetData, 9),
                                      Wire().u64(kTwoTo63).bytes())),
            ParseError::kTooLarge);
  EXPECT_EQ(failure(parse_offset_data(header_of(ChunkType::kOffsetData, 8 + 2),
                                      Wire().u64(kTwoTo63 - 2).bytes())),
            ParseError::kTooLarge);
  EXPECT_TRUE(
      parse_offset_data(header_of(ChunkType::kOffsetData, 8 + 1), Wire().u64(kTwoTo63 - 2).bytes())
          .ok());
}

TEST(OffsetHoleTest, ParsesAndRejectsHostileValues) {
  const auto encoded = encode_offset_hole(3, 0x1000, 0x2000, false);
  auto header = parse_chunk_header(encoded);
  ASSERT_TRUE(header.ok());
  auto hole = parse_offset_hole(*header, std::span(encoded).subspan(kChunkHeaderSize));
  ASSERT_TRUE(hole.ok());
  EXPECT_EQ(hole->offset, 0x1000u);
  EXPECT_EQ(hole->length, 0x2000u);
  const ChunkHeader h = header_of(ChunkType::kOffsetHole, 12);
  EXPECT_EQ(failure(parse_offset_hole(h, Wire().u64(0).u32(0).bytes())), ParseError::kInvalidValue);
  EXPECT_EQ(failure(parse_offset_hole(h, Wire().u64(~std::uint64_t{0}).u32(2).bytes())),
            ParseError::kTooLarge);
  EXPECT_EQ(failure(parse_offset_hole(h, Wire().u64(kTwoTo63 - 1).u32(1).bytes())),
            ParseError::kTooLarge);
  EXPECT_EQ(failure(parse_offset_hole(h, Wire().u64(0).u32(1).u8(0).bytes())),
            ParseError::kBadLength);
  EXPECT_EQ(failure(parse_offset_hole(header_of(ChunkType::kOffsetHole, 13),
                                      Wire().u64(0).u32(1).bytes())),
            ParseError::kBadLength);
  EXPECT_EQ(failure(parse_offset_hole(header_of(ChunkType::kOffsetData, 12),
                                      Wire().u64(0).u32(1).bytes())),
            ParseError::kInvalidValue);
}

TEST(BlockStatusTest, RoundTripsExtents) {
  Bytes out;
  const Extent extents[] = {{512, kStateHole}, {1024, kStateZero}, {0xffffffff, 0xffffffff}};
  append_block_status_chunk(out, 4, 7, extents, false);
  auto header = parse_chunk_header(out);
  ASSERT_TRUE(header.ok());
  EXPECT_FALSE(header->done());
  auto status = parse_block_status(*header, std::span(out).subspan(kChunkHeaderSize));
  ASSERT_TRUE(status.ok());
  EXPECT_EQ(status->context_id, 7u);
  ASSERT_EQ(status->count(), 3u);
  for (std::size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(status->extent(i).length, extents[i].length);
    EXPECT_EQ(status->extent(i).flags, extents[i].flags);
  }
}

TEST(BlockStatusTest, RejectsInconsistentPayloads) {
  const Bytes one = Wire().u32(1).u32(512).u32(0);
  EXPECT_TRUE(parse_block_status(header_of(ChunkType::kBlockStatus, 12), one).ok());
  EXPECT_EQ(failure(parse_block_status(header_of(ChunkType::kBlockStatus, 20), one)),
            ParseError::kBadLength);  // header says more than was read
  EXPECT_EQ(
      failure(parse_block_status(header_of(ChunkType::kBlockStatus, 4), Wire().u32(1).bytes())),
      ParseError::kBadLength);
  const Bytes ragged = Wire().u32(1).u32(512).u32(0).u16(0);
  EXPECT_EQ(failure(parse_block_status(header_of(ChunkType::kBlockStatus, 14), ragged)),
            ParseError::kBadLength);
  const Bytes zero_extent = Wire().u32(1).u32(512).u32(0).u32(0).u32(1);
  EXPECT_EQ(failure(parse_block_status(header_of(ChunkType::kBlockStatus, 20), zero_extent)),
            ParseError::kInvalidValue);
  EXPECT_EQ(failure(parse_block_status(header_of(ChunkType::kError, 12), one)),
            ParseError::kInvalidValue);
}

TEST(ErrorChunkTest, ParsesErrorAndErrorOffset) {
  Bytes out;
  append_error_chunk(out, 1, Error::kNoSpace, "disk full", true);
  auto header = parse_chunk_header(out);
  ASSERT_TRUE(header.ok());
  auto error = parse_error_chunk(*header, std::span(out).subspan(kChunkHeaderSize));
  ASSERT_TRUE(error.ok());
  EXPECT_EQ(error->error, 28u);
  EXPECT_EQ(error->message, "disk full");
  EXPECT_FALSE(error->has_offset);

  out.clear();
  append_error_offset_chunk(out, 1, Error::kIo, "bad sector", 0x1234000, false);
  header = parse_chunk_header(out);
  ASSERT_TRUE(header.ok());
  error = parse_error_chunk(*header, std::span(out).subspan(kChunkHeaderSize));
  ASSERT_TRUE(error.ok());
  EXPECT_EQ(error->error, 5u);
  EXPECT_EQ(error->message, "bad sector");
  EXPECT_TRUE(error->has_offset);
  EXPECT_EQ(error->offset, 0x1234000u);
}

TEST(ErrorChunkTest, RejectsMessageLongerThanTheChunk) {
  const Bytes payload = Wire().u32(5).u16(100).str("short");
  EXPECT_EQ(failure(parse_error_chunk(header_of(ChunkType::kError, 11), payload)),
            ParseError::kBadLength);
  const Bytes exact = Wire().u32(5).u16(5).str("short");
  EXPECT_TRUE(parse_error_chunk(header_of(ChunkType::kError, 11), exact).ok());
  // ERROR_OFFSET: the message may not eat the offset.
  const Bytes eats_offset = Wire().u32(5).u16(9).str("x").u64(0);
  EXPECT_EQ(failure(parse_error_chunk(header_of(ChunkType::kErrorOffset, 15), eats_offset)),
            ParseError::kBadLength);
  const Bytes trailing = Wire().u32(5).u16(1).str("x").u64(0).u8(0);
  EXPECT_EQ(failure(parse_error_chunk(header_of(ChunkType::kErrorOffset, 16), trailing)),
            ParseError::kBadLength);
  EXPECT_EQ(failure(parse_error_chunk(header_of(ChunkType::kError, 5), hex({0, 0, 0, 5, 0}))),
            ParseError::kBadLength);
  EXPECT_EQ(failure(parse_error_chunk(header_of(ChunkType::kError, 12), exact)),
            ParseError::kBadLength);  // header length disagrees with the payload read
}

TEST(ErrorChunkTest, ErrorZeroAndUnknownErrorTypes) {
  EXPECT_EQ(
      failure(parse_error_chunk(header_of(ChunkType::kError, 6), Wire().u32(0).u16(0).bytes())),
      ParseError::kInvalidValue);
  EXPECT_EQ(failure(parse_error_chunk(header_of(ChunkType::kErrorOffset, 14),
                                      Wire().u32(0).u16(0).u64(0).bytes())),
            ParseError::kInvalidValue);
  // An unknown error type with extra trailing fields parses (error + message are common).
  const ChunkHeader unknown{0, 0x8010, 1, 6 + 2 + 4};
  const Bytes payload = Wire().u32(22).u16(2).str("hi").u32(7);  // outlives the views into it
  auto error = parse_error_chunk(unknown, payload);
  ASSERT_TRUE(error.ok());
  EXPECT_EQ(error->error, 22u);
  EXPECT_EQ(error->message, "hi");
  EXPECT_EQ(failure(parse_error_chunk(header_of(ChunkType::kOffsetData, 6),
                                      Wire().u32(5).u16(0).bytes())),
            ParseError::kInvalidValue);
}

TEST(RangeWithinTest, ChecksContainmentWithoutOverflow) {
  EXPECT_TRUE(range_within(100, 10, 100, 10));
  EXPECT_TRUE(range_within(105, 5, 100, 10));
  EXPECT_TRUE(range_within(110, 0, 100, 10));
  EXPECT_FALSE(range_within(105, 6, 100, 10));
  EXPECT_FALSE(range_within(99, 1, 100, 10));
  EXPECT_FALSE(range_within(111, 0, 100, 10));
  const std::uint64_t max = ~std::uint64_t{0};
  EXPECT_FALSE(range_within(max, 2, 100, 10));
  EXPECT_FALSE(range_within(105, max, 100, 10));
  EXPECT_TRUE(range_within(max - 1, 1, max - 10, 10));
}

// A READ answered in three chunks, parsed back the way a client's reply reader would.
TEST(StructuredReadTest, ClientReassemblesServerChunks) {
  const std::uint64_t cookie = 0x55;
  const std::uint64_t request_offset = 0x10000;
  Bytes stream;
  const auto data_header = encode_offset_data_header(cookie, request_offset, 4, false);
  stream.insert(stream.end(), data_header.begin(), data_header.end());
  const Bytes payload = hex({'d', 'a', 't', 'a'});
  stream.insert(stream.end(), payload.begin(), payload.end());
  const auto hole = encode_offset_hole(cookie, request_offset + 4, 12, false);
  stream.insert(stream.end(), hole.begin(), hole.end());
  const auto none = encode_none_chunk(cookie);
  stream.insert(stream.end(), none.begin(), none.end());

  std::string assembled(16, '?');
  std::span<const std::byte> rest(stream);
  bool done = false;
  while (!done) {
    auto header = parse_chunk_header(rest);
    ASSERT_TRUE(header.ok()) << parse_error_name(header.error());
    EXPECT_EQ(header->cookie, cookie);
    rest = rest.subspan(kChunkHeaderSize);
    const auto body = rest.first(header->length);
    rest = rest.subspan(header->length);
    done = header->done();
    switch (static_cast<ChunkType>(header->type)) {
      case ChunkType::kOffsetData: {
        auto data = parse_offset_data(*header, body);
        ASSERT_TRUE(data.ok());
        ASSERT_TRUE(range_within(data->offset, data->data_length, request_offset, 16));
        for (std::uint32_t i = 0; i < data->data_length; ++i) {
          assembled[data->offset - request_offset + i] =
              static_cast<char>(body[kOffsetDataPrefixSize + i]);
        }
        break;
      }
      case ChunkType::kOffsetHole: {
        auto h = parse_offset_hole(*header, body);
        ASSERT_TRUE(h.ok());
        ASSERT_TRUE(range_within(h->offset, h->length, request_offset, 16));
        for (std::uint32_t i = 0; i < h->length; ++i) assembled[h->offset - request_offset + i] = 0;
        break;
      }
      case ChunkType::kNone:
        break;
      default:
        FAIL() << "unexpected chunk " << header->type;
    }
  }
  EXPECT_TRUE(rest.empty());
  EXPECT_EQ(assembled, std::string("data") + std::string(12, '\0'));
}

}  // namespace
}  // namespace spindle::nbd
