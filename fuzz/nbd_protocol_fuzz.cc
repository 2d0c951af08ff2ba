// libFuzzer target for src/nbd/protocol: every input is read through every parser, both as a
// single message and as a stream of messages the way the server's handshake and request loops
// and the client's reply reader consume them. Besides the sanitizers, it checks properties the
// parsers promise: what parses re-encodes to the same bytes, views stay inside the input,
// counts agree with lengths, and an accepted request stays inside the export.
//
// Thread-safety: single-threaded, as libFuzzer calls it.
#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "base/byte_order.h"
#include "nbd/protocol.h"

namespace spindle::nbd {
namespace {

#define FUZZ_CHECK(condition)           \
  do {                                  \
    if (!(condition)) __builtin_trap(); \
  } while (0)

using Bytes = std::span<const std::byte>;

bool inside(std::string_view view, Bytes input) {
  if (view.empty()) return true;
  const auto* begin = reinterpret_cast<const char*>(input.data());
  return view.data() >= begin && view.data() + view.size() <= begin + input.size();
}

template <std::size_t N>
bool same_prefix(const std::array<std::byte, N>& encoded, Bytes input) {
  return input.size() >= N && std::equal(encoded.begin(), encoded.end(), input.begin());
}

void single_messages(Bytes in) {
  if (auto flags = parse_greeting(in)) FUZZ_CHECK(same_prefix(encode_greeting(*flags), in));
  if (auto flags = parse_client_flags(in)) FUZZ_CHECK(same_prefix(encode_client_flags(*flags), in));
  if (auto header = parse_option_header(in)) {
    FUZZ_CHECK(same_prefix(encode_option_header(header->option, header->length), in));
    FUZZ_CHECK(header->length <= kMaxOptionLength);
  }
  if (auto header = parse_option_reply_header(in)) {
    FUZZ_CHECK(
        same_prefix(encode_option_reply_header(
                        header->option, static_cast<OptionReply>(header->type), header->length),
                    in));
  }
  if (auto request = parse_request(in)) FUZZ_CHECK(same_prefix(encode_request(*request), in));
  if (auto reply = parse_simple_reply(in)) {
    FUZZ_CHECK(
        same_prefix(encode_simple_reply(static_cast<Error>(reply->error), reply->cookie), in));
  }
  if (in.size() >= 4) {
    const ReplyKind kind = classify_reply(in.first<4>());
    FUZZ_CHECK(parse_simple_reply(in).ok() == (kind == ReplyKind::kSimple && in.size() >= 16));
  }
  if (auto info = parse_export_name_reply(in)) {
    FUZZ_CHECK(info->size <= kMaxExportSize);
    std::vector<std::byte> out;
    append_export_name_reply(out, info->size, info->transmission_flags, true);
    FUZZ_CHECK(std::equal(out.begin(), out.end(), in.begin()));
  }
}

// Server side: option payloads.
void option_payload(std::uint32_t option, Bytes data) {
  switch (static_cast<Option>(option)) {
    case Option::kExportName:
      if (auto name = parse_export_name(data)) {
        FUZZ_CHECK(name->size() == data.size() && name->size() <= kMaxStringLength);
      }
      break;
    case Option::kInfo:
    case Option::kGo:
      if (auto request = parse_info_request(data)) {
        FUZZ_CHECK(inside(request->name, data));
        std::vector<Info> infos;
        for (std::uint16_t code : request->requests) infos.push_back(static_cast<Info>(code));
        std::vector<std::byte> out;
        append_option_info(out, static_cast<Option>(option), request->name, infos);
        FUZZ_CHECK(out.size() == kOptionHeaderSize + data.size());
        FUZZ_CHECK(std::equal(data.begin(), data.end(), out.begin() + kOptionHeaderSize));
      } else {
        FUZZ_CHECK(option_error_for(request.error()) == OptionReply::kErrInvalid);
      }
      break;
    case Option::kListMetaContext:
    case Option::kSetMetaContext:
      if (auto request = parse_meta_context_request(data, kMaxStringLength, 64)) {
        FUZZ_CHECK(inside(request->export_name, data));
        FUZZ_CHECK(request->queries.size() <= 64);
        for (std::string_view query : request->queries) FUZZ_CHECK(inside(query, data));
        std::vector<std::byte> out;
        append_option_meta_context(out, static_cast<Option>(option), request->export_name,
                                   request->queries);
        FUZZ_CHECK(out.size() == kOptionHeaderSize + data.size());
        FUZZ_CHECK(std::equal(data.begin(), data.end(), out.begin() + kOptionHeaderSize));
      }
      break;
    default:
      break;
  }
}

// The server's handshake loop: option headers and their data, until something fails.
void option_stream(Bytes in) {
  while (true) {
    auto header = parse_option_header(in, 1 << 16);
    if (!header) return;
    in = in.subspan(kOptionHeaderSize);
    if (header->length > in.size()) return;
    option_payload(header->option, in.first(header->length));
    in = in.subspan(header->length);
  }
}

// Client side: option reply payloads.
void option_reply_payload(std::uint32_t type, Bytes data) {
  switch (static_cast<OptionReply>(type)) {
    case OptionReply::kServer:
      if (auto server = parse_reply_server(data)) {
        FUZZ_CHECK(inside(server->name, data) && inside(server->description, data));
        FUZZ_CHECK(4 + server->name.size() + server->description.size() == data.size());
      }
      break;
    case OptionReply::kInfo: {
      auto info_type = parse_reply_info_type(data);
      if (!info_type) break;
      switch (static_cast<Info>(*info_type)) {
        case Info::kExport:
          if (auto info = parse_reply_info_export(data)) {
            FUZZ_CHECK(info->size <= kMaxExportSize && (info->transmission_flags & kFlagHasFlags));
          }
          break;
        case Info::kBlockSize:
          if (auto sizes = parse_reply_info_block_size(data)) {
            FUZZ_CHECK(sizes->minimum >= 1 && sizes->minimum <= 65536);
            FUZZ_CHECK((sizes->minimum & (sizes->minimum - 1)) == 0);
            FUZZ_CHECK(sizes->preferred >= sizes->minimum && sizes->maximum >= sizes->minimum);
          }
          break;
        default:
          if (auto text = parse_reply_info_string(data)) {
            FUZZ_CHECK(inside(*text, data) && text->size() + 2 == data.size());
          }
          break;
      }
      break;
    }
    case OptionReply::kMetaContext:
      if (auto context = parse_reply_meta_context(data)) {
        FUZZ_CHECK(inside(context->name, data) && !context->name.empty());
      }
      break;
    default:
      break;
  }
}

// The client's handshake reader: option reply headers and their data.
void option_reply_stream(Bytes in) {
  while (true) {
    auto header = parse_option_reply_header(in);
    if (!header) return;
    in = in.subspan(kOptionReplyHeaderSize);
    if (header->length > in.size()) return;
    option_reply_payload(header->type, in.first(header->length));
    in = in.subspan(header->length);
  }
}

// The server's request loop, validating against a policy taken from the first 24 bytes.
void request_stream(Bytes in) {
  if (in.size() < 24) return;
  TransmissionPolicy policy;
  policy.export_size = base::load_be64(in.data());
  policy.transmission_flags = base::load_be16(in.data() + 8);
  const std::uint16_t bits = base::load_be16(in.data() + 10);
  policy.structured_replies = bits & 1;
  policy.block_status = bits & 2;
  policy.min_block_size = 1u << ((bits >> 2) % 13);
  policy.max_write_payload = base::load_be32(in.data() + 12) % (kMaxPayloadLength + 1);
  policy.max_read_length = base::load_be32(in.data() + 16) % (kMaxPayloadLength + 1);
  in = in.subspan(24);
  const std::uint64_t size =
      policy.export_size < kMaxExportSize ? policy.export_size : kMaxExportSize;
  while (true) {
    auto request = parse_request(in);
    if (!request) return;
    in = in.subspan(kRequestHeaderSize);
    const RequestVerdict verdict = validate_request(*request, policy);
    const Command command = request->command();
    if (verdict.disconnect) {
      FUZZ_CHECK(command == Command::kWrite && request->length > policy.max_write_payload);
      return;
    }
    if (verdict.ok() && command != Command::kDisconnect) {
      FUZZ_CHECK(request->type <= static_cast<std::uint16_t>(Command::kBlockStatus));
      FUZZ_CHECK(request->offset <= size && request->length <= size - request->offset);
      if (command == Command::kWrite) FUZZ_CHECK(request->length <= policy.max_write_payload);
      if (command == Command::kRead) FUZZ_CHECK(request->length <= policy.max_read_length);
      if (request->flags & kCmdFlagFua) FUZZ_CHECK(policy.transmission_flags & kFlagSendFua);
    }
    if (!verdict.ok()) {
      // What the server would do: map and reply, draining a WRITE payload.
      FUZZ_CHECK(verdict.error != Error::kNone);
      const auto reply = encode_simple_reply(verdict.error, request->cookie);
      FUZZ_CHECK(parse_simple_reply(reply)->cookie == request->cookie);
    }
    const std::uint32_t payload = request_payload_length(*request);
    if (payload > in.size()) return;
    in = in.subspan(payload);
  }
}

// The client's reply reader: simple replies and structured chunks, interleaved.
void reply_stream(Bytes in) {
  while (in.size() >= 4) {
    const ReplyKind kind = classify_reply(in.first<4>());
    if (kind == ReplyKind::kBadMagic) return;
    if (kind == ReplyKind::kSimple) {
      auto reply = parse_simple_reply(in);
      if (!reply) return;
      FUZZ_CHECK(nbd_to_errno(reply->error) >= 0);
      in = in.subspan(kSimpleReplyHeaderSize);
      continue;
    }
    auto header = parse_chunk_header(in, 1 << 20);
    if (!header) return;
    FUZZ_CHECK(same_prefix(encode_chunk_header(header->flags, static_cast<ChunkType>(header->type),
                                               header->cookie, header->length),
                           in));
    if (header->length > in.size() - kChunkHeaderSize) return;
    const Bytes chunk = in.first(kChunkHeaderSize + header->length);
    const Bytes payload = chunk.subspan(kChunkHeaderSize);
    in = in.subspan(chunk.size());
    switch (static_cast<ChunkType>(header->type)) {
      case ChunkType::kNone:
        FUZZ_CHECK(header->length == 0 && header->done());
        break;
      case ChunkType::kOffsetData:
        if (auto data = parse_offset_data(*header, payload)) {
          FUZZ_CHECK(data->data_length + kOffsetDataPrefixSize == payload.size());
          FUZZ_CHECK(data->offset <= kMaxExportSize &&
                     data->data_length <= kMaxExportSize - data->offset);
        }
        break;
      case ChunkType::kOffsetHole:
        if (auto hole = parse_offset_hole(*header, payload)) {
          FUZZ_CHECK(hole->length != 0 && hole->offset <= kMaxExportSize);
          // Re-encodes to the same bytes unless the server set flags we ignore.
          FUZZ_CHECK((header->flags & ~kReplyFlagDone) != 0 ||
                     same_prefix(encode_offset_hole(header->cookie, hole->offset, hole->length,
                                                    header->done()),
                                 chunk));
        }
        break;
      case ChunkType::kBlockStatus:
        if (auto status = parse_block_status(*header, payload)) {
          FUZZ_CHECK(4 + status->count() * kExtentSize == payload.size() && status->count() > 0);
          for (std::size_t i = 0; i < status->count(); ++i) {
            FUZZ_CHECK(status->extent(i).length != 0);
          }
        }
        break;
      default:
        FUZZ_CHECK(is_error_chunk(header->type));
        if (auto error = parse_error_chunk(*header, payload)) {
          FUZZ_CHECK(inside(error->message, payload));
          FUZZ_CHECK(6 + error->message.size() + (error->has_offset ? 8 : 0) <= payload.size());
          FUZZ_CHECK(nbd_to_errno(error->error) >= 0);
        }
        break;
    }
  }
}

// Payload parsers on the raw input, without a header in front.
void raw_payloads(Bytes in) {
  option_payload(static_cast<std::uint32_t>(Option::kExportName), in);
  option_payload(static_cast<std::uint32_t>(Option::kGo), in);
  option_payload(static_cast<std::uint32_t>(Option::kSetMetaContext), in);
  option_reply_payload(static_cast<std::uint32_t>(OptionReply::kServer), in);
  option_reply_payload(static_cast<std::uint32_t>(OptionReply::kInfo), in);
  option_reply_payload(static_cast<std::uint32_t>(OptionReply::kMetaContext), in);
  const auto length = static_cast<std::uint32_t>(in.size());
  for (std::uint16_t type : {std::uint16_t{1}, std::uint16_t{2}, std::uint16_t{5},
                             std::uint16_t{0x8001}, std::uint16_t{0x8002}, std::uint16_t{0x8123}}) {
    const ChunkHeader header{kReplyFlagDone, type, 0, length};
    (void)parse_offset_data(header, in);
    (void)parse_offset_hole(header, in);
    (void)parse_block_status(header, in);
    if (auto error = parse_error_chunk(header, in)) FUZZ_CHECK(inside(error->message, in));
  }
}

}  // namespace
}  // namespace spindle::nbd

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace spindle::nbd;
  const Bytes in(reinterpret_cast<const std::byte*>(data), size);
  single_messages(in);
  raw_payloads(in);
  option_stream(in);
  option_reply_stream(in);
  request_stream(in);
  reply_stream(in);
  return 0;
}
