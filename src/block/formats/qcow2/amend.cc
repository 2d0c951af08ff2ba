// Qcow2Node::amend: qemu-img amend's changes to an open image (compatibility level, lazy
// refcounts, virtual size). The header is the commit point: a downgrade first turns every
// zero cluster into something a version 2 reader understands and flushes, and only then
// rewrites the header, so a crash in between leaves a valid v3 image.
#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <iterator>
#include <vector>

#include "base/byte_order.h"
#include "block/formats/qcow2/check.h"
#include "block/formats/qcow2/create.h"
#include "block/formats/qcow2/qcow2_node.h"

namespace spindle::block::qcow2 {

BlockResult<Qcow2Node::AmendRequest> parse_amend_options(
    const std::map<std::string, std::string>& options) {
  // What qemu-img amend can change for qcow2, and what only create takes.
  static const char* const kAmendable[] = {"compat",    "lazy_refcounts", "refcount_bits",
                                           "size",      "backing_file",   "backing_fmt",
                                           "data_file", "data_file_raw"};
  static const char* const kCreateOnly[] = {"cluster_size",     "preallocation", "extended_l2",
                                            "compression_type", "encryption",    "encrypt.format"};
  const auto listed = [](const auto& list, const std::string& key) {
    return std::any_of(std::begin(list), std::end(list), [&](const char* k) { return key == k; });
  };
  for (const auto& [key, value] : options) {
    const bool encrypt = key.rfind("encrypt.", 0) == 0;
    if (listed(kCreateOnly, key) || (encrypt && key != "encrypt.keyslot" &&
                                     key != "encrypt.state" && key != "encrypt.new-secret" &&
                                     key != "encrypt.old-secret" && key != "encrypt.iter-time")) {
      return BlockError{EINVAL, fmt::format("Invalid parameter '{}'\nThis option is only "
                                            "supported for image creation", key)};
    }
    if (encrypt) {
      return BlockError{EINVAL, "Can't amend encryption options - encryption not present"};
    }
    if (!listed(kAmendable, key)) {
      return BlockError{EINVAL, fmt::format("Invalid parameter '{}'", key)};
    }
  }
  Qcow2Node::AmendRequest request;
  const auto find = [&](const char* key) -> const std::string* {
    const auto it = options.find(key);
    return it == options.end() ? nullptr : &it->second;
  };
  if (const std::string* v = find("compat")) {
    request.version = parse_compat(*v);
    if (!request.version) {
      return BlockError{EINVAL, fmt::format("Unknown compatibility level {}", *v)};
    }
  }
  if (const std::string* v = find("lazy_refcounts")) {
    request.lazy_refcounts = parse_option_bool(*v);
    if (!request.lazy_refcounts) {
      return BlockError{EINVAL, "Parameter 'lazy_refcounts' expects 'on' or 'off'"};
    }
  }
  if (const std::string* v = find("refcount_bits")) {
    const std::optional<std::uint64_t> bits = parse_option_size(*v);
    if (!bits) return BlockError{EINVAL, "Parameter 'refcount_bits' expects a number"};
    if (*bits == 0 || *bits > 64 || (*bits & (*bits - 1)) != 0) {
      return BlockError{EINVAL,
                        "Refcount width must be a power of two and may not exceed 64 bits"};
    }
    request.refcount_bits = static_cast<std::uint32_t>(*bits);
  }
  if (const std::string* v = find("size")) {
    request.size = parse_option_size(*v);
    if (!request.size) {
      return BlockError{EINVAL, "Parameter 'size' expects a non-negative number below 2^64\n"
                                "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, "
                                "tera-, peta-\nand exabytes, respectively."};
    }
  }
  if (find("backing_file") || find("backing_fmt")) {
    return BlockError{ENOTSUP,
                      "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead."};
  }
  if (find("data_file")) {
    return BlockError{EINVAL, "data-file can only be set for images that use an external data "
                              "file"};
  }
  if (find("data_file_raw")) {
    return BlockError{EINVAL, "data-file-raw cannot be set on existing images"};
  }
  return request;
}

coro::Task<int> Qcow2Node::write_header_cluster() {
  std::vector<std::byte> bytes;
  {
    std::lock_guard lock(meta_mutex_);
    BlockResult<std::vector<std::byte>> encoded = encode_header(header_);
    if (!encoded) co_return -encoded.error().error;
    bytes = std::move(encoded.value());
    // The backing name may have moved (other extensions, another header length): later
    // write_header_fields() calls write its location from header_.
    header_.backing_file_offset = base::load_be64(bytes.data() + 8);
    header_.backing_file_size = base::load_be32(bytes.data() + 16);
  }
  bytes.resize(cluster_size(), std::byte{0});  // the header cluster holds nothing else
  co_return co_await file_->write(0, std::span<const std::byte>(bytes), 0);
}

coro::Task<int> Qcow2Node::find_clusters(std::uint64_t flag, std::vector<std::uint64_t>& found) {
  const std::uint64_t cs = cluster_size();
  std::size_t l1_entries = 0;
  {
    std::lock_guard lock(meta_mutex_);
    l1_entries = l1_.size();
  }
  for (std::size_t l1_index = 0; l1_index < l1_entries; ++l1_index) {
    const std::uint64_t span_start = l1_index * l2_span();
    if (span_start >= size()) break;
    TableRef l2;
    const int result = co_await writable_l2(span_start, false, l2);
    if (result < 0) co_return result;
    if (!l2) continue;
    std::lock_guard lock(meta_mutex_);
    const std::uint64_t step = extended_ ? 2 : 1;
    for (std::uint64_t i = 0; i < l2_entries_ && span_start + i * cs < size(); ++i) {
      const std::uint64_t entry = get64(*l2, i * step);
      const bool compressed = (entry & kEntryCompressed) != 0;
      if (flag == kEntryCompressed ? compressed : (!compressed && (entry & flag))) {
        found.push_back(span_start / cs + i);
      }
    }
  }
  co_return 0;
}

coro::Task<int> Qcow2Node::expand_zero_clusters() {
  const std::uint64_t cs = cluster_size();
  std::vector<std::uint64_t> clusters;
  int result = co_await find_clusters(kEntryZero, clusters);
  if (result < 0) co_return result;
  const std::vector<std::byte> zeros(cs, std::byte{0});
  for (const std::uint64_t cluster : clusters) {
    const std::uint64_t pos = cluster * cs;
    if (backing_) {
      // Zeros that hide the backing file's data must be real zeros in v2.
      const std::uint64_t length = std::min(cs, size() - pos);
      result = co_await write_span(pos, length, std::span<const std::byte>(zeros).first(length));
    } else {
      result = co_await zero_or_discard(cluster, 1, Mode::kDiscard, 0);
    }
    if (result < 0) co_return result;
  }
  co_return 0;
}

coro::Task<BlockError> Qcow2Node::amend(AmendRequest request) {
  if (read_only_) co_return BlockError{EROFS, "the image is opened read-only"};
  if (refuses_writes()) {
    co_return BlockError{EIO, "the image is corrupt"};
  }
  const std::uint32_t version = request.version.value_or(header_.version);
  const std::uint32_t refcount_bits =
      request.refcount_bits.value_or(std::uint32_t{1} << header_.refcount_order);
  if (version < 3 && request.lazy_refcounts.value_or(false)) {
    co_return BlockError{EINVAL, "Lazy refcounts only supported with compatibility level 1.1 "
                                 "and above (use compat=1.1 or greater)"};
  }
  if (version < 3 && refcount_bits != 16) {
    co_return BlockError{EINVAL, request.refcount_bits
                                     ? "Refcount widths other than 16 bits require compatibility "
                                       "level 1.1 or above (use compat=1.1 or greater)"
                                     : "compat=0.10 requires refcount_bits=16"};
  }
  if (version < header_.version) {
    const std::uint64_t blocking =
        header_.incompatible_features & ~(kIncompatDirty | kIncompatCompression);
    if (blocking != 0) {
      co_return BlockError{
          ENOTSUP,
          fmt::format("Cannot downgrade an image with incompatible features 0x{:x} set", blocking)};
    }
    if (header_.nb_snapshots != 0) {
      co_return BlockError{ENOTSUP, "downgrading an image with internal snapshots is not "
                                    "supported yet"};
    }
    if (header_.compression_type != CompressionType::kDeflate) {
      std::vector<std::uint64_t> compressed;
      const int result = co_await find_clusters(kEntryCompressed, compressed);
      if (result < 0) {
        co_return BlockError{-result, fmt::format("Could not read the image's tables: {}",
                                                  std::strerror(-result))};
      }
      if (!compressed.empty()) {
        co_return BlockError{ENOTSUP, "Cannot downgrade an image with zstd compression type "
                                      "and existing compressed clusters"};
      }
    }
  }
  if (request.size && *request.size != size()) {
    const int result = co_await truncate(*request.size);
    if (result == -ENOTSUP) {
      co_return BlockError{ENOTSUP, "Cannot shrink the image: clusters are allocated past the "
                                    "new size"};
    }
    if (result < 0) co_return BlockError{-result, fmt::format("Could not resize image: {}",
                                                              std::strerror(-result))};
  }
  int result = 0;
  if (version < header_.version) result = co_await expand_zero_clusters();
  if (result >= 0) result = co_await flush();
  if (result < 0) {
    co_return BlockError{-result, fmt::format("Could not amend the image: {}",
                                              std::strerror(-result))};
  }
  std::uint32_t order = 0;
  while ((std::uint32_t{1} << order) < refcount_bits) ++order;
  if (order != header_.refcount_order) {
    // On the file, with the caches flushed: the node's refcount cache and geometry describe
    // the old width, so it takes no more writes (the tool closes it next).
    Header header;
    {
      std::lock_guard lock(meta_mutex_);
      header = header_;
    }
    BlockError error = co_await change_refcount_width(*file_, header, order);
    if (!error.ok()) co_return error;
    retired_.store(true, std::memory_order_release);
    std::lock_guard lock(meta_mutex_);
    header_.refcount_order = header.refcount_order;
    header_.refcount_table_offset = header.refcount_table_offset;
    header_.refcount_table_clusters = header.refcount_table_clusters;
  }
  bool whole_header = false;
  {
    std::lock_guard lock(meta_mutex_);
    Header& h = header_;
    if (version != h.version) {
      whole_header = true;
      h.version = version;
      if (version < 3) {
        h.incompatible_features = 0;
        h.compatible_features = 0;
        h.autoclear_features = 0;
        h.header_length = kVersion2HeaderLength;
        h.compression_type = CompressionType::kDeflate;
        h.feature_names.clear();
        h.unknown_header_fields.clear();
      } else {
        h.header_length = kHeaderLength;
      }
    }
    if (version >= 3) {
      const bool lazy =
          request.lazy_refcounts.value_or((h.compatible_features & kCompatLazyRefcounts) != 0);
      h.compatible_features = lazy ? (h.compatible_features | kCompatLazyRefcounts)
                                   : (h.compatible_features & ~kCompatLazyRefcounts);
      h.incompatible_features &= ~kIncompatDirty;  // flushed: the refcounts are right
    }
  }
  result = whole_header ? co_await write_header_cluster() : co_await write_header_fields();
  if (result >= 0) result = co_await file_->flush();
  if (result < 0) {
    broken_.store(true, std::memory_order_release);
    co_return BlockError{-result, fmt::format("Could not update the image header: {}",
                                              std::strerror(-result))};
  }
  co_return BlockError{};
}

}  // namespace spindle::block::qcow2
