#include "block/format_registry.h"

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <vector>

#include <fmt/format.h>

#include "block/formats/qcow2/qcow2_format.h"
#include "block/formats/qed/qed_format.h"
#include "block/formats/raw/raw_format.h"

namespace spindle::block {

namespace {

// The probe rules of the formats we only recognise are QEMU's (block/<format>.c, the
// bdrv_probe functions): a magic at a fixed offset, sometimes with a version, scored 100; cloop
// and dmg, which have no real magic, score 2.

std::uint32_t be32(const std::byte* p) noexcept {
  const auto* u = reinterpret_cast<const unsigned char*>(p);
  return std::uint32_t{u[0]} << 24 | std::uint32_t{u[1]} << 16 | std::uint32_t{u[2]} << 8 | u[3];
}
std::uint32_t le32(const std::byte* p) noexcept {
  const auto* u = reinterpret_cast<const unsigned char*>(p);
  return std::uint32_t{u[3]} << 24 | std::uint32_t{u[2]} << 16 | std::uint32_t{u[1]} << 8 | u[0];
}
bool starts_with(std::span<const std::byte> head, std::size_t at, std::string_view text) noexcept {
  return head.size() >= at + text.size() && std::memcmp(head.data() + at, text.data(), text.size()) == 0;
}
// A NUL-terminated string equal to `text` at `at`, inside a field of `field` bytes.
bool c_string_at(std::span<const std::byte> head, std::size_t at, std::size_t field,
                 std::string_view text) noexcept {
  return text.size() < field && starts_with(head, at, text) &&
         head[at + text.size()] == std::byte{0};
}

// VMDK: sparse extents ("KDMV", version 4; "COWD", version 3) and descriptor files, whose first
// line that is neither a comment nor blank must be "version=1|2|3" (LF or CRLF).
int probe_vmdk(const ProbeInput& input) {
  const std::span<const std::byte> head = input.head;
  if (head.size() < 4) return 0;
  const std::uint32_t magic = be32(head.data());
  if (magic == 0x4b444d56 /* KDMV */ || magic == 0x434f5744 /* COWD */) return 100;
  const char* p = reinterpret_cast<const char*>(head.data());
  const char* const end = p + head.size();
  while (p < end) {
    if (*p == '#') {  // a comment line
      while (p < end && *p != '\n') ++p;
      if (p == end) return 0;
      ++p;
      continue;
    }
    if (*p == ' ') {  // only blank lines may come before the version line
      while (p < end && *p == ' ') ++p;
      if (p < end && *p == '\r') ++p;
      if (p == end || *p != '\n') return 0;
      ++p;
      continue;
    }
    const std::string_view rest(p, static_cast<std::size_t>(end - p));
    for (const std::string_view line : {"version=1\n", "version=2\n", "version=3\n",
                                        "version=1\r\n", "version=2\r\n", "version=3\r\n"}) {
      if (rest.starts_with(line)) return 100;
    }
    return 0;
  }
  return 0;
}

// VDI: the signature 0xbeda107f (little-endian) at offset 64 of a 512-byte header.
int probe_vdi(const ProbeInput& input) {
  if (input.head.size() < 512) return 0;
  return le32(input.head.data() + 64) == 0xbeda107f ? 100 : 0;
}

// VPC (VHD): the footer copy at offset 0 starts with "conectix".
int probe_vpc(const ProbeInput& input) { return starts_with(input.head, 0, "conectix") ? 100 : 0; }

// VHDX: the file type identifier "vhdxfile".
int probe_vhdx(const ProbeInput& input) { return starts_with(input.head, 0, "vhdxfile") ? 100 : 0; }

// LUKS: "LUKS\xba\xbe" and version 1 (big-endian 16 bits at offset 6).
int probe_luks(const ProbeInput& input) {
  const std::span<const std::byte> head = input.head;
  if (!starts_with(head, 0, std::string_view("LUKS\xba\xbe", 6)) || head.size() < 8) return 0;
  const unsigned version = std::to_integer<unsigned>(head[6]) << 8 | std::to_integer<unsigned>(head[7]);
  return version == 1 ? 100 : 0;
}

// DMG has no magic at the start: QEMU recognises it by the file name's ".dmg" suffix.
int probe_dmg(const ProbeInput& input) {
  return input.filename.size() > 4 && input.filename.ends_with(".dmg") ? 2 : 0;
}

// Parallels: "WithoutFreeSpace" or "WithouFreSpacExt" and version 2 (LE32 at 16) in a
// 64-byte header.
int probe_parallels(const ProbeInput& input) {
  const std::span<const std::byte> head = input.head;
  if (head.size() < 64) return 0;
  if (!starts_with(head, 0, "WithoutFreeSpace") && !starts_with(head, 0, "WithouFreSpacExt")) {
    return 0;
  }
  return le32(head.data() + 16) == 2 ? 100 : 0;
}

// cloop: the shell script its images start with (compared over at most the bytes probed).
int probe_cloop(const ProbeInput& input) {
  constexpr std::string_view kScript =
      "#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";
  const std::size_t length = std::min(kScript.size(), input.head.size());
  return std::memcmp(input.head.data(), kScript.data(), length) == 0 ? 2 : 0;
}

// qcow (version 1): "QFI\xfb" and version 1, big-endian, in a 48-byte header.
int probe_qcow(const ProbeInput& input) {
  if (input.head.size() < 48) return 0;
  return be32(input.head.data()) == 0x514649fb && be32(input.head.data() + 4) == 1 ? 100 : 0;
}

// Bochs: NUL-terminated "Bochs Virtual HD Image", type "Redolog", subtype "Growing" and version
// 0x00020000 or 0x00010000 (LE32 at 64) in a 512-byte header.
int probe_bochs(const ProbeInput& input) {
  const std::span<const std::byte> head = input.head;
  if (head.size() < 512) return 0;
  if (!c_string_at(head, 0, 32, "Bochs Virtual HD Image") || !c_string_at(head, 32, 16, "Redolog") ||
      !c_string_at(head, 48, 16, "Growing")) {
    return 0;
  }
  const std::uint32_t version = le32(head.data() + 64);
  return version == 0x00020000 || version == 0x00010000 ? 100 : 0;
}

// A format we recognise by its probe but cannot open or create.
class RecognisedFormat final : public ImageFormat {
 public:
  using Probe = int (*)(const ProbeInput&);
  RecognisedFormat(std::string_view name, Probe probe) : name_(name), probe_(probe) {}

  std::string_view name() const noexcept override { return name_; }
  int probe(const ProbeInput& input) const noexcept override { return probe_(input); }
  bool can_open() const noexcept override { return false; }

 private:
  std::string_view name_;
  Probe probe_;
};

const std::vector<const ImageFormat*>& format_list() {
  // Function-local statics: ready whenever the first caller asks, even during static
  // initialisation of another file.
  static const RecognisedFormat vmdk("vmdk", probe_vmdk), vdi("vdi", probe_vdi),
      vpc("vpc", probe_vpc), vhdx("vhdx", probe_vhdx), luks("luks", probe_luks),
      dmg("dmg", probe_dmg), parallels("parallels", probe_parallels),
      cloop("cloop", probe_cloop), qcow("qcow", probe_qcow), bochs("bochs", probe_bochs);
  static const std::vector<const ImageFormat*> list = {
      &raw::raw_format(), &qcow2::qcow2_format(), &qed::qed_format(),
      &vmdk, &vdi, &vpc, &vhdx, &luks, &dmg, &parallels, &cloop, &qcow, &bochs,
  };
  return list;
}

}  // namespace

std::span<const ImageFormat* const> image_formats() { return format_list(); }

const ImageFormat* find_format(std::string_view name) {
  for (const ImageFormat* format : format_list()) {
    if (format->name() == name) return format;
  }
  return nullptr;
}

const ImageFormat& probe_format(const ProbeInput& input) {
  // The first format with the highest score wins (raw's 1 when nobody claims the bytes).
  const ImageFormat* best = &raw::raw_format();
  int best_score = 1;
  for (const ImageFormat* format : format_list()) {
    const int score = format->probe(input);
    if (score > best_score) {
      best = format;
      best_score = score;
    }
  }
  return *best;
}

coro::Task<BlockResult<const ImageFormat*>> probe_node(BlockNode& file, std::string_view filename) {
  std::array<std::byte, ProbeInput::kProbeBytes> head{};
  const std::uint64_t size = file.size();
  const std::size_t length = static_cast<std::size_t>(std::min<std::uint64_t>(size, head.size()));
  if (length > 0) {
    const int result = co_await file.read(0, std::span(head.data(), length), 0);
    if (result < 0) {
      co_return BlockError{-result, fmt::format("Could not read image for determining its "
                                                "format: {}", std::strerror(-result))};
    }
  }
  const ProbeInput input{.head = head, .file_size = size, .filename = filename};
  co_return &probe_format(input);
}

}  // namespace spindle::block
