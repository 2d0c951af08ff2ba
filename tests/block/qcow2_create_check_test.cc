// qcow2 header codecs, create, describe and check, with qemu-img 7.2 as the oracle: headers
// round-trip byte for byte, every malformed field is refused, created images compare equal
// (cmp) to qemu-img's, and check counts match `qemu-img check --output=json` on images that
// qemu-io wrote and on images damaged on purpose.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "aio/context.h"
#include "base/byte_order.h"
#include "block/drivers/file.h"
#include "block/formats/qcow2/check.h"
#include "block/formats/qcow2/create.h"
#include "block/formats/qcow2/format.h"
#include "block/formats/qcow2/qcow2_format.h"
#include "coro/block_on.h"
#include "coro/task.h"
#include "support/shell_command.h"
#include "support/temp_dir.h"

namespace spindle::block::qcow2 {
namespace {

namespace fs = std::filesystem;
using Bytes = std::vector<std::byte>;
using test::CommandResult;
using test::must_run;
using test::read_file_bytes;
using test::run_command;

void patch_file(const std::string& path, std::uint64_t offset, const void* data, std::size_t size) {
  const int fd = ::open(path.c_str(), O_WRONLY);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::pwrite(fd, data, size, static_cast<off_t>(offset)), static_cast<ssize_t>(size));
  ::close(fd);
}
void patch_be64(const std::string& path, std::uint64_t offset, std::uint64_t value) {
  std::byte b[8];
  base::store_be64(b, value);
  patch_file(path, offset, b, 8);
}
void patch_be16(const std::string& path, std::uint64_t offset, std::uint16_t value) {
  std::byte b[2];
  base::store_be16(b, value);
  patch_file(path, offset, b, 2);
}
std::uint64_t file_be64(const std::string& path, std::uint64_t offset) {
  const Bytes bytes = read_file_bytes(path);
  return base::load_be64(bytes.data() + offset);
}

class Qcow2CreateCheckTest : public testing::Test {
 protected:
  std::string path(const std::string& name) const { return dir_ + "/" + name; }

  template <typename T>
  T run(coro::Task<T> task) {
    return coro::block_on(*context_, std::move(task));
  }

  // Creates `name` through our create().
  BlockError create(const std::string& name, const CreateRequest& request) {
    fs::remove(path(name));
    auto file = open_file(path(name), FileOptions{false, false, true});
    EXPECT_TRUE(file.ok());
    if (!file.ok()) return BlockError{file.error(), "open"};
    BlockNodeRef node = std::move(file).value();
    BlockError e = run(qcow2_format().create(*node, request));
    run(node->close());
    return e;
  }

  Bytes header_cluster(const std::string& name) {
    Bytes bytes = read_file_bytes(path(name));
    const std::uint32_t bits = base::load_be32(bytes.data() + 20);
    bytes.resize(std::min<std::size_t>(bytes.size(), std::size_t{1} << bits));
    return bytes;
  }

  CheckReport check(const std::string& name, RepairMode mode) {
    auto file = open_file(path(name), mode == RepairMode::kNone);
    EXPECT_TRUE(file.ok());
    BlockNodeRef node = std::move(file).value();
    CheckReport report = run(qcow2_format().check(node, mode));
    run(node->close());
    return report;
  }

  // qemu-img check --output=json, as a report.
  nlohmann::json qemu_check(const std::string& name, const std::string& extra = "") {
    const CommandResult r =
        run_command("qemu-img check --output=json " + extra + " " + path(name), false);
    nlohmann::json j = nlohmann::json::parse(r.output, nullptr, false);
    if (j.is_discarded()) {
      // "Check failed": no report, only the exit code (1: the check could not complete).
      EXPECT_EQ(r.exit_code, 1) << r.output;
      j = nlohmann::json{{"check-errors", 1}, {"failed", true}};
    }
    j["exit"] = r.exit_code;
    return j;
  }

  void expect_same(const CheckReport& ours, const nlohmann::json& qemu) {
    if (qemu.contains("failed")) {
      EXPECT_EQ(ours.exit_code(), 1);
      EXPECT_GT(ours.check_errors, 0u);
      return;
    }
    auto field = [&](const char* key) -> std::uint64_t {
      return qemu.contains(key) ? qemu[key].get<std::uint64_t>() : 0;
    };
    EXPECT_EQ(ours.corruptions, field("corruptions")) << qemu.dump();
    EXPECT_EQ(ours.leaks, field("leaks")) << qemu.dump();
    EXPECT_EQ(ours.check_errors, field("check-errors")) << qemu.dump();
    EXPECT_EQ(ours.corruptions_fixed, field("corruptions-fixed")) << qemu.dump();
    EXPECT_EQ(ours.leaks_fixed, field("leaks-fixed")) << qemu.dump();
    EXPECT_EQ(ours.total_clusters, field("total-clusters")) << qemu.dump();
    EXPECT_EQ(ours.allocated_clusters, field("allocated-clusters")) << qemu.dump();
    EXPECT_EQ(ours.fragmented_clusters, field("fragmented-clusters")) << qemu.dump();
    EXPECT_EQ(ours.compressed_clusters, field("compressed-clusters")) << qemu.dump();
    EXPECT_EQ(ours.image_end_offset, field("image-end-offset")) << qemu.dump();
    EXPECT_EQ(ours.exit_code(), qemu["exit"].get<int>()) << qemu.dump();
  }

  test::TempDir temp_{"spindle-qcow2cc"};
  const std::string& dir_ = temp_.dir();
  aio::ContextRef context_ = aio::Context::create("qcow2-cc-test");
};

CreateRequest request(std::uint64_t size, std::map<std::string, std::string> options = {}) {
  CreateRequest r;
  r.size = size;
  r.options = std::move(options);
  return r;
}

std::string qemu_options(const CreateRequest& r) {
  std::string out;
  for (const auto& [k, v] : r.options) out += (out.empty() ? "" : ",") + k + "=" + v;
  return out.empty() ? "" : "-o " + out;
}

// ---- codecs ---------------------------------------------------------------------------------

TEST(Qcow2Codec, RefcountWidths) {
  for (std::uint32_t order = 0; order <= 6; ++order) {
    Bytes block(512);
    const std::uint64_t entries = 512 * 8 >> order;
    const std::uint64_t max = order == 6 ? ~0ull : (1ull << (1u << order)) - 1;
    for (std::uint64_t i = 0; i < entries; ++i) set_refcount(block, i, order, (i * 7 + 3) & max);
    for (std::uint64_t i = 0; i < entries; ++i) {
      ASSERT_EQ(get_refcount(block, i, order), (i * 7 + 3) & max) << order << " " << i;
    }
    set_refcount(block, 1, order, max);
    EXPECT_EQ(get_refcount(block, 1, order), max);
    EXPECT_EQ(get_refcount(block, 0, order), 3u & max);
    EXPECT_EQ(get_refcount(block, 2, order), 17u & max);
  }
  // Sub-byte widths fill each byte from its least significant bit (as qemu writes 1-bit
  // refcounts: clusters 0-3 used is 0x0f).
  Bytes block(8);
  for (int i = 0; i < 4; ++i) set_refcount(block, i, 0, 1);
  EXPECT_EQ(std::to_integer<int>(block[0]), 0x0f);
  Bytes wide(16);
  set_refcount(wide, 1, 4, 0x1234);
  EXPECT_EQ(std::to_integer<int>(wide[2]), 0x12);
  EXPECT_EQ(std::to_integer<int>(wide[3]), 0x34);
}

TEST(Qcow2Codec, CompressedEntries) {
  for (std::uint32_t bits = 9; bits <= 21; ++bits) {
    for (std::uint64_t offset : {0x10000ull, 0x10200ull, 0x123456ull, 0x7fffffe01ull}) {
      for (std::uint64_t length : {1ull, 511ull, 512ull, 1000ull, (1ull << bits) - 1}) {
        if (length > (1ull << bits)) continue;
        const std::uint64_t entry = encode_compressed_entry(offset, length, bits);
        EXPECT_TRUE(entry & kEntryCompressed);
        EXPECT_FALSE(entry & kEntryCopied);
        const CompressedExtent e = decode_compressed_entry(entry, bits);
        EXPECT_EQ(e.host_offset, offset);
        // Whole sectors from the offset to the end of the sector holding the last byte.
        const std::uint64_t end = ((offset + length + 511) / 512) * 512;
        EXPECT_EQ(e.length, end - offset) << bits << " " << offset << " " << length;
      }
    }
  }
}

// ---- header ---------------------------------------------------------------------------------

TEST_F(Qcow2CreateCheckTest, HeaderRoundTripsQemuImages) {
  REQUIRE_QEMU();
  const std::vector<std::string> variants = {
      "",
      "-o compat=0.10",
      "-o cluster_size=512",
      "-o cluster_size=2M,refcount_bits=1",
      "-o lazy_refcounts=on,refcount_bits=64",
      "-o compression_type=zstd,extended_l2=on",
      "-b base.qcow2 -F qcow2",
      "-o compat=0.10 -b base.qcow2 -F qcow2",
      "-o data_file=" + path("data.raw") + ",data_file_raw=on",
  };
  must_run("qemu-img create -f qcow2 " + path("base.qcow2") + " 1M");
  for (const std::string& v : variants) {
    SCOPED_TRACE(v);
    must_run("qemu-img create -q -f qcow2 " + v + " " + path("a.qcow2") + " 1G");
    const Bytes cluster = header_cluster("a.qcow2");
    BlockResult<Header> h = decode_header(cluster);
    ASSERT_TRUE(h.ok()) << h.error().message;
    BlockResult<std::vector<std::byte>> encoded = encode_header(h.value());
    ASSERT_TRUE(encoded.ok()) << encoded.error().message;
    Bytes padded = encoded.value();
    padded.resize(cluster.size());
    EXPECT_TRUE(padded == cluster);
    // The variant's own text decides, not the temporary directory's random name in it.
    if (v.find(" -F qcow2") != std::string::npos) {
      EXPECT_EQ(h->backing_file, "base.qcow2");
      EXPECT_EQ(h->backing_format, "qcow2");
    }
    if (v.rfind("-o data_file=", 0) == 0) {
      EXPECT_EQ(h->data_file, path("data.raw"));
    }
    // qemu-img writes the feature name table only into clusters larger than 4 KiB.
    if (h->version == 3 && h->cluster_size() > 4096) {
      EXPECT_EQ(h->feature_names.size(), standard_feature_names().size());
    } else {
      EXPECT_TRUE(h->feature_names.empty());
    }
  }
}

// An extension with no data (found by qcow2_open_fuzz: copying zero bytes into an empty
// vector passed a null pointer to memset, undefined behaviour that UBSan reports).
TEST_F(Qcow2CreateCheckTest, HeaderWithAnEmptyUnknownExtension) {
  Header h;
  h.size = 1 << 20;
  h.l1_size = 1;
  h.l1_table_offset = 3 << 16;
  h.refcount_table_offset = 1 << 16;
  h.refcount_table_clusters = 1;
  h.unknown_extensions.push_back({0x12345678, Bytes()});
  BlockResult<std::vector<std::byte>> e = encode_header(h);
  ASSERT_TRUE(e.ok());
  Bytes cluster = e.value();
  cluster.resize(65536);
  BlockResult<Header> d = decode_header(cluster);
  ASSERT_TRUE(d.ok()) << d.error().message;
  ASSERT_EQ(d->unknown_extensions.size(), 1u);
  EXPECT_TRUE(d->unknown_extensions[0].data.empty());
}

TEST_F(Qcow2CreateCheckTest, HeaderKeepsUnknownExtensionsAndFields) {
  Header h;
  h.size = 1 << 20;
  h.l1_size = 1;
  h.l1_table_offset = 3 << 16;
  h.refcount_table_offset = 1 << 16;
  h.refcount_table_clusters = 1;
  h.backing_file = "b.img";
  h.backing_format = "raw";
  h.unknown_extensions.push_back({0x12345678, Bytes(5, std::byte{0xab})});
  h.unknown_header_fields = Bytes(8, std::byte{0x5a});
  BlockResult<std::vector<std::byte>> e = encode_header(h);
  ASSERT_TRUE(e.ok());
  Bytes cluster = e.value();
  cluster.resize(65536);
  BlockResult<Header> d = decode_header(cluster);
  ASSERT_TRUE(d.ok()) << d.error().message;
  EXPECT_EQ(d->header_length, 120u);
  EXPECT_TRUE(d->unknown_header_fields == h.unknown_header_fields);
  ASSERT_EQ(d->unknown_extensions.size(), 1u);
  EXPECT_EQ(d->unknown_extensions[0].type, 0x12345678u);
  EXPECT_TRUE(d->unknown_extensions[0].data == h.unknown_extensions[0].data);
  EXPECT_EQ(d->backing_file, "b.img");
  EXPECT_EQ(d->backing_format, "raw");
  BlockResult<std::vector<std::byte>> again = encode_header(d.value());
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE(again.value() == e.value());
  // Too much for one cluster.
  h.cluster_bits = 9;
  h.backing_file = std::string(600, 'x');
  EXPECT_EQ(encode_header(h).error().error, EINVAL);
}

TEST_F(Qcow2CreateCheckTest, DecodeRejectsEveryBadField) {
  Header good;
  good.size = 1 << 30;
  good.l1_size = 2;
  good.l1_table_offset = 3 << 16;
  good.refcount_table_offset = 1 << 16;
  good.refcount_table_clusters = 1;
  BlockResult<std::vector<std::byte>> encoded = encode_header(good);
  ASSERT_TRUE(encoded.ok());
  Bytes base = encoded.value();
  base.resize(65536);
  ASSERT_TRUE(decode_header(base).ok());

  struct Case {
    const char* what;
    std::size_t offset;
    int width;  // 4 or 8
    std::uint64_t value;
    int error;
    const char* message;
  };
  const Case cases[] = {
      {"magic", 0, 4, 0x514649fa, EINVAL, "Image is not in qcow2 format"},
      {"version 1", 4, 4, 1, ENOTSUP, "Unsupported qcow2 version 1"},
      {"version 4", 4, 4, 4, ENOTSUP, "Unsupported qcow2 version 4"},
      {"cluster_bits 8", 20, 4, 8, EINVAL, "Unsupported cluster size: 2^8"},
      {"cluster_bits 22", 20, 4, 22, EINVAL, "Unsupported cluster size: 2^22"},
      {"header_length short", 100, 4, 100, EINVAL, "qcow2 header too short"},
      {"header_length long", 100, 4, 65544, EINVAL, "qcow2 header exceeds cluster size"},
      {"refcount_order 7", 96, 4, 7, EINVAL, "Reference count entry width too large"},
      {"l1 misaligned", 40, 8, (3 << 16) + 512, EINVAL, "Invalid L1 table offset"},
      {"l1 huge offset", 40, 8, 0xffffffffffff0000ull, EINVAL, "Invalid L1 table offset"},
      {"l1 too small", 36, 4, 1, EINVAL, "L1 table is too small"},
      {"l1 huge", 36, 4, 0x1000000, EFBIG, "Active L1 table too large"},
      {"refcount misaligned", 48, 8, (1 << 16) + 8, EINVAL, "Invalid reference count table offset"},
      {"refcount table huge", 56, 4, 1000, EINVAL, "Reference count table too large"},
      {"refcount table none", 56, 4, 0, EINVAL, "reference count table"},
      {"snapshots misaligned", 64, 8, 0x10001, EINVAL, "Invalid snapshot table offset"},
      {"too many snapshots", 60, 4, 70000, EINVAL, "Too many snapshots"},
      {"backing offset", 8, 8, 65537, EINVAL, "Invalid backing file offset"},
      {"unknown incompatible", 72, 8, 1ull << 40, ENOTSUP,
       "Unsupported qcow2 feature(s): Unknown incompatible feature: 10000000000"},
      {"aes", 32, 4, 1, ENOTSUP, "encrypted"},
      {"luks", 32, 4, 2, ENOTSUP, "encrypted"},
      {"crypt 3", 32, 4, 3, EINVAL, "Unsupported encryption method: 3"},
      {"compression bit with zlib", 72, 8, kIncompatCompression, EINVAL,
       "Compression type incompatible feature bit must not be set"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    Bytes bad = base;
    if (c.width == 4) {
      base::store_be32(bad.data() + c.offset, static_cast<std::uint32_t>(c.value));
    } else {
      base::store_be64(bad.data() + c.offset, c.value);
    }
    BlockResult<Header> h = decode_header(bad);
    ASSERT_FALSE(h.ok());
    EXPECT_EQ(h.error().error, c.error) << h.error().message;
    EXPECT_NE(h.error().message.find(c.message), std::string::npos) << h.error().message;
  }

  // Backing file name running past the cluster.
  {
    Bytes bad = base;
    base::store_be64(bad.data() + 8, 65000);
    base::store_be32(bad.data() + 16, 1000);
    BlockResult<Header> h = decode_header(bad);
    ASSERT_FALSE(h.ok());
    EXPECT_EQ(h.error().message, "Backing file name too long");
  }
  // An unknown compression type; a truncated input.
  {
    Bytes bad = base;
    bad[104] = std::byte{7};
    base::store_be64(bad.data() + 72, kIncompatCompression);
    EXPECT_EQ(decode_header(bad).error().error, ENOTSUP);
    EXPECT_EQ(decode_header(std::span(base).first(40)).error().error, EINVAL);
  }
  // An extension whose length runs past the cluster.
  {
    Bytes bad = base;
    base::store_be32(bad.data() + 112, 0x11111111);
    base::store_be32(bad.data() + 116, 70000);
    EXPECT_EQ(decode_header(bad).error().message, "Header extension too large");
  }
  // Unknown incompatible bits are named through the image's feature table, as QEMU words it.
  {
    Bytes bad = base;
    base::store_be64(bad.data() + 72, (1ull << 5) | (1ull << 9));
    // Replace the standard table (first extension at 112) with one naming bit 5.
    ASSERT_EQ(base::load_be32(bad.data() + 112), kExtFeatureTable);
    std::byte* entry = bad.data() + 120;
    std::memset(entry, 0, 48);
    entry[0] = std::byte{0};
    entry[1] = std::byte{5};
    std::memcpy(entry + 2, "shiny feature", 13);
    BlockResult<Header> h = decode_header(bad);
    ASSERT_FALSE(h.ok());
    EXPECT_EQ(h.error().error, ENOTSUP);
    EXPECT_EQ(h.error().message,
              "Unsupported qcow2 feature(s): shiny feature, Unknown incompatible feature: 200");
  }
}

TEST_F(Qcow2CreateCheckTest, DecodeRefusesWhatQemuRefuses) {
  REQUIRE_QEMU();
  must_run("qemu-img create -q -f qcow2 " + path("a.qcow2") + " 1M");
  patch_be64(path("a.qcow2"), 72, 1ull << 20);
  const CommandResult q = run_command("qemu-img info " + path("a.qcow2"));
  EXPECT_NE(q.exit_code, 0);
  BlockResult<Header> h = decode_header(header_cluster("a.qcow2"));
  ASSERT_FALSE(h.ok());
  EXPECT_NE(q.output.find(h.error().message), std::string::npos)
      << q.output << " vs " << h.error().message;
}

// ---- create ---------------------------------------------------------------------------------

TEST_F(Qcow2CreateCheckTest, CreateIsByteIdenticalToQemuImg) {
  REQUIRE_QEMU();
  must_run("qemu-img create -q -f qcow2 " + path("base.qcow2") + " 1M");
  std::vector<CreateRequest> cases = {
      request(0),
      request(1),
      request(1 << 20),
      request(1ull << 30),
      request(3ull << 40),
      request(100ull << 40),
      request(1ull << 30, {{"compat", "0.10"}}),
      request(1ull << 30, {{"compat", "1.1"}, {"lazy_refcounts", "on"}}),
      request(1ull << 30, {{"compression_type", "zstd"}}),
      request(1ull << 30, {{"extended_l2", "on"}}),
      request(1ull << 30, {{"extended_l2", "on"}, {"cluster_size", "16k"}}),
      request(1ull << 30, {{"backing_file", "base.qcow2"}, {"backing_fmt", "qcow2"}}),
      request(1ull << 30, {{"backing_file", "base.qcow2"}, {"backing_fmt", "qcow2"},
                           {"compat", "0.10"}}),
      request(1 << 20, {{"preallocation", "metadata"}}),
      request(64 << 20, {{"preallocation", "metadata"}, {"cluster_size", "4096"}}),
      request(1 << 20, {{"preallocation", "metadata"}, {"cluster_size", "512"}}),
      request(3 << 20, {{"preallocation", "metadata"}, {"extended_l2", "on"},
                        {"cluster_size", "16384"}}),
      request((64 << 20) + 512, {{"preallocation", "metadata"}}),
      request(300 << 20, {{"preallocation", "metadata"}, {"cluster_size", "2M"}}),
      request(64 << 20, {{"preallocation", "metadata"}, {"refcount_bits", "1"},
                         {"cluster_size", "4096"}}),
      request(100 << 20, {{"preallocation", "metadata"}, {"refcount_bits", "64"},
                          {"cluster_size", "4096"}}),
      request(64 << 20, {{"preallocation", "metadata"}, {"extended_l2", "on"},
                         {"backing_file", "base.qcow2"}, {"backing_fmt", "qcow2"}}),
      request(16ull << 30, {{"cluster_size", "512"}}),
      request(0, {{"preallocation", "falloc"}}),
      request(256 << 20, {{"preallocation", "falloc"}}),
      request(32 << 20, {{"preallocation", "full"}, {"cluster_size", "4096"}}),
      request(20 << 20, {{"preallocation", "falloc"}, {"cluster_size", "512"}}),
      request(4 << 20, {{"preallocation", "falloc"}, {"extended_l2", "on"},
                        {"cluster_size", "16k"}}),
      request(3 << 20, {{"preallocation", "full"}, {"refcount_bits", "1"},
                        {"cluster_size", "1024"}}),
      request(10 << 20, {{"preallocation", "falloc"}, {"compat", "0.10"}}),
      // The refcount table outgrows its first cluster (new table and blocks further on).
      request(64ull << 30, {{"cluster_size", "512"}}),
      request(48ull << 30, {{"cluster_size", "512"}, {"refcount_bits", "8"}}),
      request(10 << 20, {{"preallocation", "metadata"}, {"cluster_size", "512"}}),
      request(40 << 20, {{"preallocation", "metadata"}, {"cluster_size", "1024"},
                         {"refcount_bits", "32"}}),
  };
  for (std::uint32_t bits : {1, 2, 4, 8, 16, 32, 64}) {
    cases.push_back(request(1ull << 30, {{"refcount_bits", std::to_string(bits)}}));
  }
  for (std::uint64_t cs = 512; cs <= (2u << 20); cs *= 2) {
    cases.push_back(request(1ull << 30, {{"cluster_size", std::to_string(cs)}}));
  }
  for (const CreateRequest& r : cases) {
    const std::string opts = qemu_options(r);
    SCOPED_TRACE(opts + " size " + std::to_string(r.size));
    // qemu-img resolves the backing file relative to the image: run it in dir_.
    const CommandResult q = run_command("cd " + dir_ + " && qemu-img create -f qcow2 " + opts +
                                        " q.qcow2 " + std::to_string(r.size));
    ASSERT_EQ(q.exit_code, 0) << q.output;
    EXPECT_EQ(q.output, "Formatting 'q.qcow2', fmt=qcow2 " + qcow2_format().create_summary(r) +
                            "\n");
    BlockError e = create("s.qcow2", r);
    ASSERT_TRUE(e.ok()) << e.message;
    const CommandResult c = run_command("cmp " + path("q.qcow2") + " " + path("s.qcow2"));
    EXPECT_EQ(c.exit_code, 0) << c.output;
  }
}

TEST_F(Qcow2CreateCheckTest, CreateRefusesWhatQemuRefuses) {
  REQUIRE_QEMU();
  const std::vector<CreateRequest> cases = {
      request(1 << 20, {{"compat", "0.10"}, {"lazy_refcounts", "on"}}),
      request(1 << 20, {{"refcount_bits", "3"}}),
      request(1 << 20, {{"refcount_bits", "128"}}),
      request(1 << 20, {{"refcount_bits", "0"}}),
      request(1 << 20, {{"refcount_bits", "8"}, {"compat", "0.10"}}),
      request(1 << 20, {{"cluster_size", "1000"}}),
      request(1 << 20, {{"cluster_size", "256"}}),
      request(1 << 20, {{"cluster_size", "4M"}}),
      request(1 << 20, {{"extended_l2", "on"}, {"cluster_size", "8192"}}),
      request(1 << 20, {{"extended_l2", "on"}, {"compat", "0.10"}}),
      request(1 << 20, {{"compression_type", "zstd"}, {"compat", "0.10"}}),
      request(1 << 20, {{"compression_type", "lz4"}}),
      request(1 << 20, {{"preallocation", "bogus"}}),
      request(1 << 20, {{"compat", "0.9"}}),
      request(1 << 20, {{"lazy_refcounts", "maybe"}}),
      request(1 << 20, {{"foo", "bar"}}),
      request(1 << 20, {{"backing_fmt", "qcow2"}}),
      request(1 << 20, {{"data_file_raw", "on"}}),
      request(1 << 20, {{"data_file", path("d.data")}, {"compat", "0.10"}}),
      request(1 << 20, {{"data_file", path("d.data")}, {"data_file_raw", "on"},
                        {"backing_file", path("b.qcow2")}, {"backing_fmt", "qcow2"}}),
      request(1ull << 60),
      request(200ull << 30, {{"cluster_size", "512"}}),
  };
  must_run("qemu-img create -q -f qcow2 " + path("b.qcow2") + " 1M");
  for (const CreateRequest& r : cases) {
    const std::string opts = qemu_options(r);
    SCOPED_TRACE(opts);
    const CommandResult q = run_command("qemu-img create -f qcow2 " + opts + " " +
                                        path("q.qcow2") + " " + std::to_string(r.size));
    EXPECT_NE(q.exit_code, 0) << q.output;
    BlockError e = create("s.qcow2", r);
    ASSERT_FALSE(e.ok());
    EXPECT_NE(q.output.find(e.message), std::string::npos) << q.output << "\nours: " << e.message;
  }
  // Known gaps are refused cleanly rather than producing a different file.
  EXPECT_EQ(create("s.qcow2", request(1 << 20, {{"encryption", "on"}})).error, ENOTSUP);

}

TEST_F(Qcow2CreateCheckTest, CreateSummaryMatchesQemuImg) {
  REQUIRE_QEMU();
  const std::vector<CreateRequest> cases = {
      request(1),
      request(1 << 20, {{"cluster_size", "64k"}, {"lazy_refcounts", "yes"}}),
      request(1 << 20, {{"compat", "v3"}, {"preallocation", "off"}, {"extended_l2", "off"}}),
      request(1 << 20, {{"backing_file", "x"}, {"backing_fmt", "raw"}, {"compat", "1.1"}}),
      request(1 << 20, {{"refcount_bits", "8"}, {"compression_type", "zstd"}}),
  };
  for (const CreateRequest& r : cases) {
    const std::string opts = qemu_options(r);
    const CommandResult q = run_command("cd " + dir_ + " && qemu-img create -f qcow2 -u " +
                                        opts + " q.qcow2 " + std::to_string(r.size));
    EXPECT_EQ(q.output.substr(0, q.output.find('\n') + 1),
              "Formatting 'q.qcow2', fmt=qcow2 " + qcow2_format().create_summary(r) + "\n");
  }
}

// ---- describe -------------------------------------------------------------------------------

TEST_F(Qcow2CreateCheckTest, DescribeMatchesQemuImgInfo) {
  REQUIRE_QEMU();
  must_run("qemu-img create -q -f qcow2 " + path("base.qcow2") + " 1M");
  const std::vector<std::string> variants = {
      "",
      "-o compat=0.10",
      "-o lazy_refcounts=on,refcount_bits=8,compression_type=zstd,extended_l2=on",
      "-b base.qcow2 -F qcow2",
      "-o data_file=" + path("data.raw") + ",data_file_raw=on",
  };
  for (const std::string& v : variants) {
    SCOPED_TRACE(v);
    must_run("cd " + dir_ + " && qemu-img create -q -f qcow2 " + v + " a.qcow2 1G");
    const nlohmann::ordered_json info = nlohmann::ordered_json::parse(
        must_run("qemu-img info --output=json " + path("a.qcow2")), nullptr, false);
    auto file = open_file(path("a.qcow2"), true);
    ASSERT_TRUE(file.ok());
    BlockNodeRef node = std::move(file).value();
    ImageDescription d = run(qcow2_format().describe(*node));
    EXPECT_EQ(d.cluster_size, info["cluster-size"].get<std::uint32_t>());
    EXPECT_EQ(d.format_specific.dump(), info["format-specific"].dump());
    EXPECT_EQ(d.dirty, info["dirty-flag"].get<bool>());
    EXPECT_EQ(d.backing_filename, info.value("backing-filename", std::string()));
    EXPECT_EQ(d.backing_format, info.value("backing-filename-format", std::string()));
  }
}

// ---- check ----------------------------------------------------------------------------------

TEST_F(Qcow2CreateCheckTest, CheckCountsMatchQemuOnWrittenImages) {
  REQUIRE_QEMU();
  struct Case {
    std::string create;
    std::string io;
  };
  const std::vector<Case> cases = {
      {"", ""},
      {"", "-c 'write -P 1 0 64k' -c 'write -P 2 1M 200k' -c 'write 100M 4k' -c 'write 64k 4k'"},
      {"-o compat=0.10", "-c 'write 0 1M' -c 'write -z 2M 1M' -c 'discard 0 64k'"},
      {"-o cluster_size=512,refcount_bits=1", "-c 'write 0 100k' -c 'write 50M 7k'"},
      {"-o cluster_size=16k,refcount_bits=64,extended_l2=on", "-c 'write 1k 3k' -c 'write 1M 1M'"},
      {"-o lazy_refcounts=on", "-c 'write 0 300k' -c 'write 600M 1M'"},
      {"-o preallocation=metadata,cluster_size=16k", ""},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.create + " / " + c.io);
    must_run("qemu-img create -q -f qcow2 " + c.create + " " + path("a.qcow2") + " 1G");
    if (!c.io.empty()) must_run("qemu-io -f qcow2 " + c.io + " " + path("a.qcow2"));
    expect_same(check("a.qcow2", RepairMode::kNone), qemu_check("a.qcow2"));
  }
  // Compressed clusters (convert -c) and an internal snapshot whose L1 shares L2 tables.
  must_run("qemu-img create -q -f qcow2 " + path("a.qcow2") + " 16M");
  must_run("qemu-io -f qcow2 -c 'write -P 7 0 3M' -c 'write -P 9 8M 200k' " + path("a.qcow2"));
  must_run("qemu-img convert -c -O qcow2 " + path("a.qcow2") + " " + path("c.qcow2"));
  expect_same(check("c.qcow2", RepairMode::kNone), qemu_check("c.qcow2"));
  must_run("qemu-img snapshot -c snap1 " + path("a.qcow2"));
  must_run("qemu-io -f qcow2 -c 'write -P 3 0 128k' -c 'write 12M 64k' " + path("a.qcow2"));
  expect_same(check("a.qcow2", RepairMode::kNone), qemu_check("a.qcow2"));
  // A persistent bitmap.
  must_run("qemu-img bitmap --add " + path("a.qcow2") + " b0");
  expect_same(check("a.qcow2", RepairMode::kNone), qemu_check("a.qcow2"));
}

// A whole-header rewrite (amend's compat change) moves the backing name; header updates after
// it in the same open (a resize here) must point at where the name now is.
TEST_F(Qcow2CreateCheckTest, HeaderUpdatesAfterAmendKeepTheBackingName) {
  ASSERT_TRUE(create("a.qcow2", request(1 << 20, {{"backing_file", "base.raw"},
                                                  {"backing_fmt", "raw"}}))
                  .ok());
  auto file = open_file(path("a.qcow2"), false);
  ASSERT_TRUE(file.ok());
  FormatOpenOptions options;
  options.ignore_backing = true;
  BlockResult<BlockNodeRef> opened = run(qcow2_format().open(std::move(file).value(), options));
  ASSERT_TRUE(opened.ok()) << opened.error().message;
  BlockNodeRef node = std::move(opened).value();
  const BlockError amended = run(qcow2_format().amend(*node, {{"compat", "0.10"}}));
  ASSERT_TRUE(amended.ok()) << amended.message;
  ASSERT_EQ(run(node->truncate(2 << 20)), 0);
  ASSERT_EQ(run(node->close()), 0);
  node.reset();

  const Bytes header = header_cluster("a.qcow2");
  ASSERT_EQ(base::load_be32(header.data() + 4), 2u);
  const std::uint64_t name_offset = base::load_be64(header.data() + 8);
  const std::uint32_t name_size = base::load_be32(header.data() + 16);
  ASSERT_LE(name_offset + name_size, header.size());
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(header.data() + name_offset), name_size),
            "base.raw");
  EXPECT_EQ(base::load_be64(header.data() + 24), 2u << 20);
}

class Qcow2DamageTest : public Qcow2CreateCheckTest {
 protected:
  // A 1 GiB image with data at 0 (clusters 4 = L2, 5.. = data) and at 512M (second L2).
  void make_image() {
    must_run("qemu-img create -q -f qcow2 " + path("a.qcow2") + " 1G");
    must_run("qemu-io -f qcow2 -c 'write -P 1 0 192k' -c 'write -P 2 512M 64k' " +
             path("a.qcow2"));
  }
  std::uint64_t l1_entry(int i) { return file_be64(path("a.qcow2"), 0x30000 + 8 * i); }
  std::uint64_t l2_entry(int l1, int i) {
    return file_be64(path("a.qcow2"), (l1_entry(l1) & kL1OffsetMask) + 8 * i);
  }
  void set_refcount_of(std::uint64_t cluster, std::uint16_t value) {
    patch_be16(path("a.qcow2"), 0x20000 + 2 * cluster, value);
  }
  // Our check (and repair) against qemu-img's on an identical copy.
  void compare_all_modes() {
    must_run("cp " + path("a.qcow2") + " " + path("b.qcow2"));
    expect_same(check("a.qcow2", RepairMode::kNone), qemu_check("a.qcow2"));
    for (auto [mode, flag] : {std::pair{RepairMode::kLeaks, "-r leaks"},
                              std::pair{RepairMode::kAll, "-r all"}}) {
      SCOPED_TRACE(flag);
      must_run("cp " + path("b.qcow2") + " " + path("ours.qcow2"));
      must_run("cp " + path("b.qcow2") + " " + path("theirs.qcow2"));
      const CheckReport ours = check("ours.qcow2", mode);
      const nlohmann::json theirs = qemu_check("theirs.qcow2", flag);
      expect_same(ours, theirs);
      if (ours.check_errors) continue;  // nothing was repaired
      // After our repair, qemu-img agrees with what we report.
      const nlohmann::json after = qemu_check("ours.qcow2");
      EXPECT_EQ(after.value("corruptions", 0), ours.corruptions) << after.dump();
      EXPECT_EQ(after.value("leaks", 0), ours.leaks) << after.dump();
    }
  }
};

TEST_F(Qcow2DamageTest, Leak) {
  REQUIRE_QEMU();
  make_image();
  set_refcount_of(40, 1);  // a cluster past the end of the data: unreferenced
  set_refcount_of(5, 2);   // a data cluster with one reference
  compare_all_modes();
}

TEST_F(Qcow2DamageTest, RefcountTooLow) {
  REQUIRE_QEMU();
  make_image();
  const std::uint64_t data = (l2_entry(0, 1) & kL2OffsetMask) >> 16;
  set_refcount_of(data, 0);
  compare_all_modes();
}

TEST_F(Qcow2DamageTest, L2EntryPastEndOfFile) {
  REQUIRE_QEMU();
  make_image();
  const std::uint64_t l2 = l1_entry(0) & kL1OffsetMask;
  patch_be64(path("a.qcow2"), l2 + 8 * 5, (1ull << 40) | kEntryCopied);
  compare_all_modes();
}

TEST_F(Qcow2DamageTest, OverlappingEntries) {
  REQUIRE_QEMU();
  make_image();
  const std::uint64_t l2 = l1_entry(0) & kL1OffsetMask;
  patch_be64(path("a.qcow2"), l2 + 8 * 7, l2_entry(0, 0));  // two guest clusters, one host
  compare_all_modes();
}

TEST_F(Qcow2DamageTest, MisalignedL2Entry) {
  REQUIRE_QEMU();
  make_image();
  const std::uint64_t l2 = l1_entry(0) & kL1OffsetMask;
  patch_be64(path("a.qcow2"), l2 + 8 * 9, 0x50200 | kEntryZero);  // preallocated zero
  compare_all_modes();
}

TEST_F(Qcow2DamageTest, CopiedFlagWrong) {
  REQUIRE_QEMU();
  make_image();
  const std::uint64_t l2 = l1_entry(0) & kL1OffsetMask;
  patch_be64(path("a.qcow2"), l2 + 8 * 1, l2_entry(0, 1) & ~kEntryCopied);
  compare_all_modes();
}

}  // namespace
}  // namespace spindle::block::qcow2
