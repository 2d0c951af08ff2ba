#include "block/formats/qcow2/format.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>

#include <fmt/format.h>

#include "base/byte_order.h"

namespace spindle::block::qcow2 {

namespace {

using base::load_be32;
using base::load_be64;
using base::store_be32;
using base::store_be64;

constexpr std::uint64_t kMaxRefcountTableBytes = 8ull << 20;  // QEMU's QCOW_MAX_REFTABLE_SIZE
constexpr std::uint64_t kMaxL1Bytes = 32ull << 20;            // QEMU's QCOW_MAX_L1_SIZE
constexpr std::uint32_t kMaxSnapshots = 65536;                // QCOW_MAX_SNAPSHOTS
constexpr std::uint32_t kSnapshotHeaderBytes = 40;            // fixed part of a table entry
constexpr std::uint32_t kMaxBitmaps = 65535;                  // QCOW2_MAX_BITMAPS
constexpr std::uint64_t kMaxBitmapDirectoryBytes = 1024ull * kMaxBitmaps;
constexpr std::size_t kFeatureNameBytes = 48;
constexpr std::size_t kFeatureNameMax = 46;
constexpr std::size_t kBackingFormatMax = 16;  // QEMU keeps it in a 16-byte buffer
constexpr std::size_t kBackingFileMax = 1023;

BlockError invalid(std::string message) { return BlockError{EINVAL, std::move(message)}; }

// The header cluster as decode_header sees it: bytes past what the caller supplied read as
// zeros (as a read past the end of the file does).
class ClusterView {
 public:
  ClusterView(std::span<const std::byte> data, std::uint64_t cluster_size)
      : data_(data), cluster_size_(cluster_size) {}
  void copy(std::uint64_t offset, std::size_t length, std::byte* out) const {
    if (length == 0) return;  // `out` may be an empty vector's null data()
    std::memset(out, 0, length);
    if (offset >= data_.size()) return;
    const std::size_t n = std::min<std::uint64_t>(length, data_.size() - offset);
    std::memcpy(out, data_.data() + offset, n);
  }
  std::uint32_t be32(std::uint64_t offset) const {
    std::byte b[4];
    copy(offset, 4, b);
    return load_be32(b);
  }
  std::uint64_t be64(std::uint64_t offset) const {
    std::byte b[8];
    copy(offset, 8, b);
    return load_be64(b);
  }
  std::string text(std::uint64_t offset, std::size_t length) const {
    std::string s(length, '\0');
    copy(offset, length, reinterpret_cast<std::byte*>(s.data()));
    return s;
  }
  std::uint64_t cluster_size() const { return cluster_size_; }

 private:
  std::span<const std::byte> data_;
  std::uint64_t cluster_size_;
};

// QEMU's validate_table_offset: the table fits in a signed 64-bit file and starts on a
// cluster boundary.
bool table_offset_valid(std::uint64_t offset, std::uint64_t entries, std::uint64_t entry_bytes,
                        std::uint64_t cluster_size) {
  constexpr std::uint64_t kMax = std::numeric_limits<std::int64_t>::max();
  if (entries > kMax / entry_bytes) return false;
  const std::uint64_t bytes = entries * entry_bytes;
  if (offset > kMax - bytes) return false;
  return (offset & (cluster_size - 1)) == 0;
}

std::string trim_nul(std::string s) {
  const auto nul = s.find('\0');
  if (nul != std::string::npos) s.resize(nul);
  return s;
}

BlockError unsupported_features(const Header& h, std::uint64_t mask) {
  std::string list;
  for (const FeatureName& f : h.feature_names) {
    if (f.name.empty()) break;  // QEMU stops at the first unnamed entry
    if (f.type != 0 || f.bit >= 64) continue;
    const std::uint64_t bit = std::uint64_t{1} << f.bit;
    if (!(mask & bit)) continue;
    if (!list.empty()) list += ", ";
    list += f.name;
    mask &= ~bit;
  }
  if (mask) {
    if (!list.empty()) list += ", ";
    list += fmt::format("Unknown incompatible feature: {:x}", mask);
  }
  return BlockError{ENOTSUP, "Unsupported qcow2 feature(s): " + list};
}

BlockError read_extensions(const ClusterView& view, std::uint64_t offset, std::uint64_t end,
                           Header& h) {
  while (offset < end) {
    const std::uint32_t type = view.be32(offset);
    const std::uint32_t length = view.be32(offset + 4);
    offset += 8;
    if (offset > end || length > end - offset) return invalid("Header extension too large");
    switch (type) {
      case kExtEnd:
        return {};
      case kExtBackingFormat:
        if (length >= kBackingFormatMax) {
          return invalid(fmt::format("ERROR: ext_backing_format: len={} too large (>={})",
                                     length, kBackingFormatMax));
        }
        h.backing_format = trim_nul(view.text(offset, length));
        break;
      case kExtFeatureTable:
        h.feature_names.clear();
        for (std::uint64_t i = 0; i + kFeatureNameBytes <= length; i += kFeatureNameBytes) {
          std::byte entry[kFeatureNameBytes];
          view.copy(offset + i, kFeatureNameBytes, entry);
          FeatureName f;
          f.type = std::to_integer<std::uint8_t>(entry[0]);
          f.bit = std::to_integer<std::uint8_t>(entry[1]);
          f.name = trim_nul(std::string(reinterpret_cast<const char*>(entry + 2), kFeatureNameMax));
          h.feature_names.push_back(std::move(f));
        }
        break;
      case kExtEncryption:
        if (h.crypt_method == 0) {
          return invalid("crypto header extension only expected with encryption");
        }
        break;  // encrypted images are refused by the caller before this matters
      case kExtBitmaps: {
        if (length != 24) return invalid("bitmaps_ext: Invalid extension length");
        if (!(h.autoclear_features & kAutoclearBitmaps)) {
          break;  // written by a program that did not know bitmaps: QEMU ignores them too
        }
        BitmapsExtension b;
        b.nb_bitmaps = view.be32(offset);
        const std::uint32_t reserved = view.be32(offset + 4);
        b.bitmap_directory_size = view.be64(offset + 8);
        b.bitmap_directory_offset = view.be64(offset + 16);
        if (reserved != 0) return invalid("bitmaps_ext: Reserved field is not zero");
        if (b.nb_bitmaps > kMaxBitmaps) {
          return invalid(fmt::format(
              "bitmaps_ext: Image has {} bitmaps, exceeding the QEMU supported maximum of {}",
              b.nb_bitmaps, kMaxBitmaps));
        }
        if (b.nb_bitmaps == 0) return invalid("found bitmaps extension with zero bitmaps");
        if (b.bitmap_directory_offset & (view.cluster_size() - 1)) {
          return invalid("bitmaps_ext: invalid bitmap directory offset");
        }
        if (b.bitmap_directory_size > kMaxBitmapDirectoryBytes) {
          return invalid(fmt::format(
              "bitmaps_ext: bitmap directory size ({}) exceeds the maximum supported size ({})",
              b.bitmap_directory_size, kMaxBitmapDirectoryBytes));
        }
        h.bitmaps = b;
        break;
      }
      case kExtDataFile:
        h.data_file = trim_nul(view.text(offset, length));
        break;
      default: {
        HeaderExtension ext;
        ext.type = type;
        ext.data.resize(length);
        view.copy(offset, length, ext.data.data());
        h.unknown_extensions.push_back(std::move(ext));
        break;
      }
    }
    offset += (std::uint64_t{length} + 7) & ~std::uint64_t{7};
  }
  return {};
}

// Number of L1 entries a disk of `size` bytes needs.
std::uint64_t l1_entries_for(std::uint64_t size, const Header& h) {
  const std::uint64_t bytes_per_l1 = h.cluster_size() * h.l2_entries();
  return size / bytes_per_l1 + (size % bytes_per_l1 != 0);
}

void put_extension(std::vector<std::byte>& out, std::uint32_t type,
                   std::span<const std::byte> data) {
  const std::size_t at = out.size();
  out.resize(at + 8 + ((data.size() + 7) & ~std::size_t{7}));
  store_be32(out.data() + at, type);
  store_be32(out.data() + at + 4, static_cast<std::uint32_t>(data.size()));
  if (!data.empty()) std::memcpy(out.data() + at + 8, data.data(), data.size());
}

std::span<const std::byte> bytes_of(const std::string& s) {
  return {reinterpret_cast<const std::byte*>(s.data()), s.size()};
}

}  // namespace

const std::vector<FeatureName>& standard_feature_names() {
  static const std::vector<FeatureName> names = {
      {0, 0, "dirty bit"},           {0, 1, "corrupt bit"},
      {0, 2, "external data file"},  {0, 3, "compression type"},
      {0, 4, "extended L2 entries"}, {1, 0, "lazy refcounts"},
      {2, 0, "bitmaps"},             {2, 1, "raw external data"},
  };
  return names;
}

RefcountMetadata refcount_metadata(std::uint64_t clusters, std::uint32_t cluster_bits,
                                   std::uint32_t refcount_order, bool generous) noexcept {
  const std::uint64_t per_table_cluster = (std::uint64_t{1} << cluster_bits) / 8;
  const std::uint64_t per_block = std::uint64_t{1} << (cluster_bits + 3 - refcount_order);
  std::uint64_t table = 0, blocks = 0, n = 0, last = 0;
  do {
    last = n;
    blocks = (clusters + table + blocks + per_block - 1) / per_block;
    table = (blocks + per_table_cluster - 1) / per_table_cluster;
    n = clusters + blocks + table;
    if (n == last && generous) {
      clusters += (table + 1) / 2;
      n = 0;
      generous = false;
    }
  } while (n != last);
  return {blocks, table};
}

std::uint64_t l1_entries_needed(std::uint64_t size, std::uint32_t cluster_bits,
                                bool extended_l2) noexcept {
  Header h;
  h.cluster_bits = cluster_bits;
  h.incompatible_features = extended_l2 ? kIncompatExtendedL2 : 0;
  return l1_entries_for(size, h);
}

BlockResult<Header> decode_header(std::span<const std::byte> cluster) {
  if (cluster.size() < kVersion2HeaderLength) return invalid("Image is not in qcow2 format");
  ClusterView raw(cluster, 0);
  Header h;
  if (raw.be32(0) != kMagic) return invalid("Image is not in qcow2 format");
  h.version = raw.be32(4);
  if (h.version < 2 || h.version > 3) {
    return BlockError{ENOTSUP, fmt::format("Unsupported qcow2 version {}", h.version)};
  }
  h.backing_file_offset = raw.be64(8);
  h.backing_file_size = raw.be32(16);
  h.cluster_bits = raw.be32(20);
  h.size = raw.be64(24);
  h.crypt_method = raw.be32(32);
  h.l1_size = raw.be32(36);
  h.l1_table_offset = raw.be64(40);
  h.refcount_table_offset = raw.be64(48);
  h.refcount_table_clusters = raw.be32(56);
  h.nb_snapshots = raw.be32(60);
  h.snapshots_offset = raw.be64(64);
  if (h.cluster_bits < kMinClusterBits || h.cluster_bits > kMaxClusterBits) {
    return invalid(fmt::format("Unsupported cluster size: 2^{}", h.cluster_bits));
  }
  const std::uint64_t cluster_size = h.cluster_size();
  ClusterView view(cluster, cluster_size);

  if (h.version == 2) {
    h.incompatible_features = h.compatible_features = h.autoclear_features = 0;
    h.refcount_order = 4;
    h.header_length = kVersion2HeaderLength;
  } else {
    h.incompatible_features = view.be64(72);
    h.compatible_features = view.be64(80);
    h.autoclear_features = view.be64(88);
    h.refcount_order = view.be32(96);
    h.header_length = view.be32(100);
    if (h.header_length < kVersion3HeaderLength) return invalid("qcow2 header too short");
    if (h.header_length > cluster_size) return invalid("qcow2 header exceeds cluster size");
    if (h.header_length > kVersion3HeaderLength) {
      std::byte type{};
      view.copy(kVersion3HeaderLength, 1, &type);
      h.compression_type = static_cast<CompressionType>(std::to_integer<std::uint8_t>(type));
    } else {
      h.compression_type = CompressionType::kDeflate;
    }
    if (h.header_length > kHeaderLength) {
      h.unknown_header_fields.resize(h.header_length - kHeaderLength);
      view.copy(kHeaderLength, h.unknown_header_fields.size(), h.unknown_header_fields.data());
    }
  }

  if (h.backing_file_offset > cluster_size) return invalid("Invalid backing file offset");

  // Extensions first: the feature table names unknown incompatible features.
  const std::uint64_t ext_end = h.backing_file_offset ? h.backing_file_offset : cluster_size;
  if (BlockError e = read_extensions(view, h.header_length, ext_end, h); !e.ok()) return e;

  if (h.incompatible_features & ~kIncompatKnown) {
    return unsupported_features(h, h.incompatible_features & ~kIncompatKnown);
  }
  if (h.refcount_order > 6) {
    return invalid("Reference count entry width too large; may not exceed 64 bits");
  }
  if (h.version == 3) {
    const auto type = static_cast<unsigned>(h.compression_type);
    if (type > 1) {
      return BlockError{ENOTSUP, fmt::format("qcow2: unknown compression type: {}", type)};
    }
    const bool bit = h.incompatible_features & kIncompatCompression;
    if (type == 0 && bit) {
      return invalid("qcow2: Compression type incompatible feature bit must not be set");
    }
    if (type != 0 && !bit) {
      return invalid("qcow2: Compression type incompatible feature bit must be set");
    }
  }
  if (h.crypt_method > 2) {
    return invalid(fmt::format("Unsupported encryption method: {}", h.crypt_method));
  }
  if (h.crypt_method != 0) {
    return BlockError{ENOTSUP, h.crypt_method == 1
                                   ? "qcow2: encrypted images (AES) are not supported"
                                   : "qcow2: encrypted images (LUKS) are not supported"};
  }
  if (h.refcount_table_clusters > kMaxRefcountTableBytes >> h.cluster_bits) {
    return invalid("Reference count table too large");
  }
  if (h.refcount_table_clusters == 0) return invalid("Image does not contain a reference count table");
  if (!table_offset_valid(h.refcount_table_offset,
                          std::uint64_t{h.refcount_table_clusters} << h.cluster_bits, 1,
                          cluster_size)) {
    return invalid("Invalid reference count table offset");
  }
  if (h.nb_snapshots > kMaxSnapshots) return invalid("Too many snapshots");
  if (!table_offset_valid(h.snapshots_offset, h.nb_snapshots, kSnapshotHeaderBytes,
                          cluster_size)) {
    return invalid("Invalid snapshot table offset");
  }
  if (h.l1_size > kMaxL1Bytes / 8) return BlockError{EFBIG, "Active L1 table too large"};
  if (h.l1_size < l1_entries_for(h.size, h)) return invalid("L1 table is too small");
  if (!table_offset_valid(h.l1_table_offset, h.l1_size, 8, cluster_size)) {
    return invalid("Invalid L1 table offset");
  }
  if (h.backing_file_offset) {
    const std::uint64_t room = std::min<std::uint64_t>(kBackingFileMax,
                                                       cluster_size - h.backing_file_offset);
    if (h.backing_file_size > room) return invalid("Backing file name too long");
    h.backing_file = view.text(h.backing_file_offset, h.backing_file_size);
  } else if (h.backing_file_size != 0) {
    h.backing_file_size = 0;  // QEMU ignores a size without an offset
  }
  return h;
}

BlockResult<std::vector<std::byte>> encode_header(const Header& h) {
  if (h.version < 2 || h.version > 3 || h.cluster_bits < kMinClusterBits ||
      h.cluster_bits > kMaxClusterBits) {
    return invalid("qcow2 header: unsupported version or cluster size");
  }
  const std::uint64_t cluster_size = h.cluster_size();
  const std::uint32_t header_length =
      h.version == 2 ? kVersion2HeaderLength
                     : kHeaderLength + static_cast<std::uint32_t>(
                                           (h.unknown_header_fields.size() + 7) & ~std::size_t{7});
  std::vector<std::byte> out(header_length);
  std::byte* p = out.data();
  store_be32(p + 0, kMagic);
  store_be32(p + 4, h.version);
  // backing_file_offset/size are filled in below, once the extensions' length is known.
  store_be32(p + 20, h.cluster_bits);
  store_be64(p + 24, h.size);
  store_be32(p + 32, h.crypt_method);
  store_be32(p + 36, h.l1_size);
  store_be64(p + 40, h.l1_table_offset);
  store_be64(p + 48, h.refcount_table_offset);
  store_be32(p + 56, h.refcount_table_clusters);
  store_be32(p + 60, h.nb_snapshots);
  store_be64(p + 64, h.snapshots_offset);
  if (h.version == 3) {
    store_be64(p + 72, h.incompatible_features);
    store_be64(p + 80, h.compatible_features);
    store_be64(p + 88, h.autoclear_features);
    store_be32(p + 96, h.refcount_order);
    store_be32(p + 100, header_length);
    p[104] = static_cast<std::byte>(h.compression_type);
    if (!h.unknown_header_fields.empty()) {
      std::memcpy(p + kHeaderLength, h.unknown_header_fields.data(),
                  h.unknown_header_fields.size());
    }
  }

  if (!h.backing_format.empty()) put_extension(out, kExtBackingFormat, bytes_of(h.backing_format));
  if (!h.data_file.empty()) put_extension(out, kExtDataFile, bytes_of(h.data_file));
  if (h.version == 3 && cluster_size > 4096) {  // qemu-img leaves it out of small clusters
    const auto& names = standard_feature_names();
    std::vector<std::byte> table(names.size() * kFeatureNameBytes);
    for (std::size_t i = 0; i < names.size(); ++i) {
      std::byte* e = table.data() + i * kFeatureNameBytes;
      e[0] = static_cast<std::byte>(names[i].type);
      e[1] = static_cast<std::byte>(names[i].bit);
      std::memcpy(e + 2, names[i].name.data(), std::min(names[i].name.size(), kFeatureNameMax));
    }
    put_extension(out, kExtFeatureTable, table);
  }
  if (h.bitmaps && h.bitmaps->nb_bitmaps > 0) {
    std::byte b[24] = {};
    store_be32(b, h.bitmaps->nb_bitmaps);
    store_be64(b + 8, h.bitmaps->bitmap_directory_size);
    store_be64(b + 16, h.bitmaps->bitmap_directory_offset);
    put_extension(out, kExtBitmaps, b);
  }
  for (const HeaderExtension& ext : h.unknown_extensions) put_extension(out, ext.type, ext.data);
  put_extension(out, kExtEnd, {});

  if (!h.backing_file.empty()) {
    if (h.backing_file.size() > kBackingFileMax) return invalid("Backing file name too long");
    store_be64(out.data() + 8, out.size());
    store_be32(out.data() + 16, static_cast<std::uint32_t>(h.backing_file.size()));
    const auto name = bytes_of(h.backing_file);
    out.insert(out.end(), name.begin(), name.end());
  }
  if (out.size() > cluster_size) {
    return invalid("qcow2 header and its extensions do not fit in one cluster");
  }
  return out;
}

CompressedExtent decode_compressed_entry(std::uint64_t entry, std::uint32_t cluster_bits) noexcept {
  const std::uint32_t shift = 62 - (cluster_bits - 8);
  const std::uint64_t sectors_mask = (std::uint64_t{1} << (cluster_bits - 8)) - 1;
  const std::uint64_t offset_mask = (std::uint64_t{1} << shift) - 1;
  CompressedExtent extent;
  extent.host_offset = entry & offset_mask;
  const std::uint64_t sectors = ((entry >> shift) & sectors_mask) + 1;
  extent.length = sectors * 512 - (extent.host_offset & 511);
  return extent;
}

std::uint64_t encode_compressed_entry(std::uint64_t host_offset, std::uint64_t length,
                                      std::uint32_t cluster_bits) noexcept {
  const std::uint32_t shift = 62 - (cluster_bits - 8);
  const std::uint64_t extra_sectors =
      length == 0 ? 0 : ((host_offset + length - 1) >> 9) - (host_offset >> 9);
  return kEntryCompressed | (extra_sectors << shift) | host_offset;
}

std::uint64_t get_refcount(std::span<const std::byte> block, std::uint64_t index,
                           std::uint32_t refcount_order) noexcept {
  switch (refcount_order) {
    case 0:
    case 1:
    case 2: {
      const std::uint32_t bits = 1u << refcount_order;
      const std::uint64_t bit = index * bits;
      const auto byte = std::to_integer<std::uint32_t>(block[bit / 8]);
      return (byte >> (bit % 8)) & ((1u << bits) - 1);
    }
    case 3:
      return std::to_integer<std::uint64_t>(block[index]);
    case 4:
      return base::load_be16(block.data() + index * 2);
    case 5:
      return load_be32(block.data() + index * 4);
    default:
      return load_be64(block.data() + index * 8);
  }
}

void set_refcount(std::span<std::byte> block, std::uint64_t index, std::uint32_t refcount_order,
                  std::uint64_t value) noexcept {
  switch (refcount_order) {
    case 0:
    case 1:
    case 2: {
      const std::uint32_t bits = 1u << refcount_order;
      const std::uint64_t bit = index * bits;
      const std::uint32_t mask = ((1u << bits) - 1) << (bit % 8);
      auto byte = std::to_integer<std::uint32_t>(block[bit / 8]);
      byte = (byte & ~mask) | ((static_cast<std::uint32_t>(value) << (bit % 8)) & mask);
      block[bit / 8] = static_cast<std::byte>(byte);
      break;
    }
    case 3:
      block[index] = static_cast<std::byte>(value);
      break;
    case 4:
      base::store_be16(block.data() + index * 2, static_cast<std::uint16_t>(value));
      break;
    case 5:
      store_be32(block.data() + index * 4, static_cast<std::uint32_t>(value));
      break;
    default:
      store_be64(block.data() + index * 8, value);
      break;
  }
}

}  // namespace spindle::block::qcow2
