// The format registry (block/format_registry.h): probing each format's magic from headers built
// in memory (QEMU's probe rules), raw as the fallback, scores and their order, formats we only
// recognise refused by name, and the probed-raw guard on sector 0 (block/formats/raw/
// probed_raw_node.h) against the files a real open gives.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <array>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "block/block_backend.h"
#include "block/drivers/file.h"
#include "block/format_registry.h"
#include "block/formats/raw/probed_raw_node.h"
#include "block/image_chain.h"
#include "coro/block_on.h"

namespace spindle::block {
namespace {

using Sector = std::array<std::byte, ProbeInput::kProbeBytes>;

Sector sector_with(std::string_view text, std::size_t at = 0) {
  Sector sector{};
  std::memcpy(sector.data() + at, text.data(), text.size());
  return sector;
}
void put_le32(Sector& sector, std::size_t at, std::uint32_t value) {
  for (int i = 0; i < 4; ++i) sector[at + i] = std::byte(value >> (8 * i));
}
void put_be32(Sector& sector, std::size_t at, std::uint32_t value) {
  for (int i = 0; i < 4; ++i) sector[at + i] = std::byte(value >> (8 * (3 - i)));
}

std::string_view probed(const Sector& sector, std::string_view filename = "image") {
  return probe_format(ProbeInput{.head = sector, .file_size = 1 << 20, .filename = filename})
      .name();
}
int score(std::string_view format, const Sector& sector, std::string_view filename = "image") {
  return find_format(format)->probe(
      ProbeInput{.head = sector, .file_size = 1 << 20, .filename = filename});
}

Sector qed_header() {
  Sector sector = sector_with("QED");  // 'Q' 'E' 'D' '\0' as a little-endian u32
  put_le32(sector, 4, 65536);
  return sector;
}
Sector qcow_header(std::uint32_t version) {
  Sector sector{};
  put_be32(sector, 0, 0x514649fb);
  put_be32(sector, 4, version);
  return sector;
}

TEST(FormatRegistry, ListsEveryFormatOnceAndFindsThemByName) {
  std::vector<std::string> names;
  for (const ImageFormat* format : image_formats()) names.emplace_back(format->name());
  const std::vector<std::string> expected = {"raw",  "qcow2", "qed",       "vmdk",  "vdi",
                                             "vpc",  "vhdx",  "luks",      "dmg",   "parallels",
                                             "cloop", "qcow", "bochs"};
  EXPECT_EQ(names, expected);
  for (const std::string& name : expected) {
    ASSERT_NE(find_format(name), nullptr) << name;
    EXPECT_EQ(find_format(name)->name(), name);
  }
  EXPECT_EQ(find_format("vmdk4"), nullptr);
  EXPECT_EQ(find_format(""), nullptr);
  EXPECT_TRUE(find_format("raw")->can_open());
  EXPECT_TRUE(find_format("qed")->can_open());
  EXPECT_TRUE(find_format("raw")->can_create());
  EXPECT_TRUE(find_format("qed")->can_create());
  EXPECT_TRUE(find_format("qed")->can_check());
  EXPECT_FALSE(find_format("raw")->can_check());
  for (const char* name : {"vmdk", "vdi", "vpc", "vhdx", "luks", "dmg", "parallels", "cloop",
                           "qcow", "bochs"}) {
    EXPECT_FALSE(find_format(name)->can_open()) << name;
    EXPECT_FALSE(find_format(name)->can_create()) << name;
  }
}

TEST(FormatRegistry, RawIsTheFallbackWithScoreOne) {
  const Sector zeros{};
  EXPECT_EQ(probed(zeros), "raw");
  EXPECT_EQ(score("raw", zeros), 1);
  EXPECT_EQ(probed(sector_with("just some data, a boot sector perhaps")), "raw");
  EXPECT_EQ(score("raw", qed_header()), 1);  // raw claims everything, weakly
  for (const ImageFormat* format : image_formats()) {
    if (format->name() != "raw") {
      EXPECT_EQ(format->probe({.head = zeros, .file_size = 512, .filename = {}}), 0)
          << format->name();
    }
  }
}

TEST(FormatRegistry, ProbesQedAndQcow2) {
  EXPECT_EQ(probed(qed_header()), "qed");
  EXPECT_EQ(score("qed", qed_header()), 100);
  EXPECT_EQ(probed(qcow_header(2)), "qcow2");
  EXPECT_EQ(probed(qcow_header(3)), "qcow2");
  EXPECT_EQ(score("qcow2", qcow_header(3)), 100);
  // A QED header shorter than 64 bytes is not QED (a probe always sees 512 zero-padded bytes;
  // shorter input comes only from callers probing their own buffers).
  const Sector qed = qed_header();
  EXPECT_EQ(find_format("qed")->probe({.head = std::span(qed).first(63), .file_size = 63,
                                       .filename = {}}),
            0);
}

TEST(FormatRegistry, ProbesVmdkSparseAndDescriptorFiles) {
  Sector sparse = sector_with("KDMV");
  EXPECT_EQ(probed(sparse), "vmdk");
  EXPECT_EQ(probed(sector_with("COWD")), "vmdk");
  EXPECT_EQ(probed(sector_with("# Disk DescriptorFile\nversion=1\nCID=fffffffe\n")), "vmdk");
  EXPECT_EQ(probed(sector_with("# Disk DescriptorFile\r\nversion=3\r\n")), "vmdk");
  EXPECT_EQ(probed(sector_with("# a\n   \n# b\nversion=2\n")), "vmdk");  // blank lines may come first
  EXPECT_EQ(score("vmdk", sector_with("# Disk DescriptorFile\nversion=1\n")), 100);
  // The first line that is not a comment or blank must be the version line.
  EXPECT_EQ(probed(sector_with("# Disk DescriptorFile\nCID=1\nversion=1\n")), "raw");
  EXPECT_EQ(probed(sector_with("# Disk DescriptorFile\nversion=4\n")), "raw");
  EXPECT_EQ(probed(sector_with("  x\nversion=1\n")), "raw");
  EXPECT_EQ(probed(sector_with("# only a comment\n")), "raw");
}

TEST(FormatRegistry, ProbesTheOtherRecognisedFormats) {
  Sector vdi = sector_with("<<< Oracle VM VirtualBox Disk Image >>>\n");
  put_le32(vdi, 64, 0xbeda107f);
  EXPECT_EQ(probed(vdi), "vdi");
  EXPECT_EQ(probed(sector_with("conectix")), "vpc");
  EXPECT_EQ(probed(sector_with("conectiX")), "raw");
  EXPECT_EQ(probed(sector_with("vhdxfile")), "vhdx");

  Sector luks = sector_with(std::string_view("LUKS\xba\xbe\0\x01", 8));
  EXPECT_EQ(probed(luks), "luks");
  luks[7] = std::byte{2};  // LUKS2: not what QEMU 7.2 probes
  EXPECT_EQ(probed(luks), "raw");

  for (const char* magic : {"WithoutFreeSpace", "WithouFreSpacExt"}) {
    Sector parallels = sector_with(magic);
    put_le32(parallels, 16, 2);
    EXPECT_EQ(probed(parallels), "parallels") << magic;
    put_le32(parallels, 16, 3);
    EXPECT_EQ(probed(parallels), "raw") << magic;
  }

  const Sector cloop = sector_with(
      "#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n");
  EXPECT_EQ(probed(cloop), "cloop");
  EXPECT_EQ(score("cloop", cloop), 2);
  EXPECT_EQ(probed(sector_with("#!/bin/sh\n#V2.0 Format\nmodprobe cloop")), "raw");

  EXPECT_EQ(probed(qcow_header(1)), "qcow");
  EXPECT_EQ(score("qcow", qcow_header(1)), 100);

  Sector bochs = sector_with("Bochs Virtual HD Image");
  std::memcpy(bochs.data() + 32, "Redolog", 7);
  std::memcpy(bochs.data() + 48, "Growing", 7);
  put_le32(bochs, 64, 0x00020000);
  EXPECT_EQ(probed(bochs), "bochs");
  put_le32(bochs, 64, 0x00010000);
  EXPECT_EQ(probed(bochs), "bochs");
  put_le32(bochs, 64, 0x00030000);
  EXPECT_EQ(probed(bochs), "raw");
}

TEST(FormatRegistry, DmgIsRecognisedByItsNameOnlyAndLosesToAMagic) {
  const Sector zeros{};
  EXPECT_EQ(probed(zeros, "disk.dmg"), "dmg");
  EXPECT_EQ(score("dmg", zeros, "disk.dmg"), 2);
  EXPECT_EQ(probed(zeros, ".dmg"), "raw");  // a suffix needs a name before it
  EXPECT_EQ(probed(zeros, "disk.dmg.img"), "raw");
  EXPECT_EQ(probed(zeros, ""), "raw");
  EXPECT_EQ(probed(qed_header(), "disk.dmg"), "qed");  // 100 beats 2
}

class FormatFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    char pattern[] = "/tmp/spindle-format-registry-XXXXXX";
    ASSERT_NE(::mkdtemp(pattern), nullptr);
    dir_ = pattern;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::string write_file(const std::string& name, std::span<const std::byte> head,
                         std::uint64_t size) {
    const std::string path = dir_ + "/" + name;
    std::ofstream(path, std::ios::binary)
        .write(reinterpret_cast<const char*>(head.data()), static_cast<std::streamsize>(head.size()));
    std::filesystem::resize_file(path, size);
    return path;
  }
  std::vector<char> contents(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  }
  static ChainOptions options(bool read_only) {
    ChainOptions options;
    options.read_only = read_only;
    options.open_file = [](const std::string& file, bool ro) { return open_file(file, ro); };
    return options;
  }
  BlockResult<ImageChain> open(const std::string& path, const std::string& format,
                               bool read_only = false) {
    return coro::block_on(open_chain(path, format, options(read_only)));
  }

  std::string dir_;
};

TEST_F(FormatFiles, ProbeNodeZeroPadsAShortFileAsQemuDoes) {
  const Sector qed = qed_header();
  const std::string path = write_file("short", std::span(qed).first(4), 4);
  auto file = open_file(path, true);
  ASSERT_TRUE(file.ok());
  auto found = coro::block_on(probe_node(*file.value(), path));
  ASSERT_TRUE(found.ok()) << found.error().message;
  EXPECT_EQ(found.value()->name(), "qed");  // qemu-img: "Could not open: QED ... invalid"
  auto empty = open_file(write_file("empty", {}, 0), true);
  ASSERT_TRUE(empty.ok());
  auto none = coro::block_on(probe_node(*empty.value(), "empty"));
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(none.value()->name(), "raw");
}

TEST_F(FormatFiles, RecognisedOnlyFormatsAreRefusedByNameAndLeftAlone) {
  Sector vpc = sector_with("conectix");
  const std::string path = write_file("disk.vhd", vpc, 1 << 20);
  const std::vector<char> before = contents(path);
  for (bool read_only : {true, false}) {
    auto chain = open(path, "", read_only);
    ASSERT_FALSE(chain.ok());
    EXPECT_EQ(chain.error().error, ENOTSUP);
    EXPECT_NE(chain.error().message.find("'vpc'"), std::string::npos) << chain.error().message;
  }
  auto given = open(path, "vpc");
  ASSERT_FALSE(given.ok());
  EXPECT_NE(given.error().message.find("'vpc'"), std::string::npos) << given.error().message;
  auto unknown = open(path, "nosuchformat");
  ASSERT_FALSE(unknown.ok());
  EXPECT_NE(unknown.error().message.find("Unknown file format 'nosuchformat'"), std::string::npos);
  EXPECT_EQ(contents(path), before);
}

TEST_F(FormatFiles, ProbedRawOpensAsRawAndRecordsThatItWasProbed) {
  const std::string path = write_file("disk.img", sector_with("data"), 1 << 20);
  auto probed_chain = open(path, "");
  ASSERT_TRUE(probed_chain.ok()) << probed_chain.error().message;
  EXPECT_EQ(probed_chain.value().format().name(), "raw");
  EXPECT_TRUE(probed_chain.value().probed());
  ASSERT_EQ(probed_chain.value().levels.size(), 1u);
  EXPECT_EQ(probed_chain.value().levels[0].filename, path);
  EXPECT_NE(dynamic_cast<raw::ProbedRawNode*>(probed_chain.value().root.get()), nullptr);

  auto given = open(path, "raw");
  ASSERT_TRUE(given.ok());
  EXPECT_FALSE(given.value().probed());
  EXPECT_EQ(dynamic_cast<raw::ProbedRawNode*>(given.value().root.get()), nullptr);

  auto read_only = open(path, "", true);  // nothing to guard
  ASSERT_TRUE(read_only.ok());
  EXPECT_TRUE(read_only.value().probed());
  EXPECT_EQ(dynamic_cast<raw::ProbedRawNode*>(read_only.value().root.get()), nullptr);
}

TEST_F(FormatFiles, ProbedRawRefusesWritesThatMakeSectorZeroAnotherFormat) {
  const std::string path = write_file("disk.img", sector_with("boot"), 1 << 20);
  auto chain = open(path, "");
  ASSERT_TRUE(chain.ok()) << chain.error().message;
  BlockBackend backend(chain.value().root);
  const Sector qed = qed_header(), qcow2 = qcow_header(3);
  EXPECT_EQ(coro::block_on(backend.write(0, qed)), -EPERM);
  EXPECT_EQ(coro::block_on(backend.write(0, qcow2)), -EPERM);
  Sector vmdk_text = sector_with("# Disk DescriptorFile\nversion=1\n");
  EXPECT_EQ(coro::block_on(backend.write(0, vmdk_text)), -EPERM);
  // A longer write starting at 0 is judged by its first sector.
  std::vector<std::byte> longer(4096);
  std::memcpy(longer.data(), qcow2.data(), qcow2.size());
  EXPECT_EQ(coro::block_on(backend.write(0, longer)), -EPERM);
  // A small write that turns the existing sector into a QED header (read-modify-write).
  const std::array<std::byte, 4> magic = {std::byte{'Q'}, std::byte{'E'}, std::byte{'D'},
                                          std::byte{0}};
  EXPECT_EQ(coro::block_on(backend.write(0, magic)), -EPERM);
  EXPECT_EQ(contents(path)[0], 'b');  // nothing of the refused writes landed

  // Writes that keep sector 0 raw, writes elsewhere, zero writes and discards are fine.
  const Sector data = sector_with("an ordinary boot sector");
  EXPECT_EQ(coro::block_on(backend.write(0, data)), 0);
  EXPECT_EQ(coro::block_on(backend.write_zeroes(0, 512)), 0);
  EXPECT_EQ(coro::block_on(backend.discard(0, 4096)), 0);
  EXPECT_EQ(coro::block_on(backend.write(512, qed)), 0);
  EXPECT_EQ(coro::block_on(backend.flush()), 0);
  EXPECT_EQ(contents(path)[512], 'Q');
}

TEST_F(FormatFiles, ExplicitRawAllowsAnySectorZero) {
  const std::string path = write_file("disk.img", sector_with("boot"), 1 << 20);
  auto chain = open(path, "raw");
  ASSERT_TRUE(chain.ok());
  BlockBackend backend(chain.value().root);
  EXPECT_EQ(coro::block_on(backend.write(0, qed_header())), 0);
  EXPECT_EQ(coro::block_on(backend.flush()), 0);
  EXPECT_EQ(contents(path)[0], 'Q');
  // Now it probes as QED (and, having no valid geometry, fails to open as one).
  auto probed = open(path, "", true);
  EXPECT_FALSE(probed.ok());
}

TEST(ProbedRaw, ProbesAsRawJudgesTheSectorAlone) {
  const Sector zeros{};
  EXPECT_TRUE(raw::probes_as_raw(zeros, 1 << 20));
  EXPECT_FALSE(raw::probes_as_raw(qed_header(), 1 << 20));
}

}  // namespace
}  // namespace spindle::block
