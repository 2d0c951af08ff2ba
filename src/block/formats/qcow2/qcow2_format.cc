#include "block/formats/qcow2/qcow2_format.h"

#include <cerrno>
#include <cstring>
#include <vector>

#include "base/byte_order.h"
#include "block/formats/qcow2/check.h"
#include "block/formats/qcow2/create.h"
#include "block/formats/qcow2/format.h"
#include "block/formats/qcow2/measure.h"
#include "block/formats/qcow2/qcow2_node.h"

namespace spindle::block::qcow2 {

namespace {

// Reads and decodes the header cluster of a qcow2 file node.
coro::Task<BlockResult<Header>> read_header(BlockNode& file) {
  const std::uint64_t size = file.size();
  std::vector<std::byte> head(std::min<std::uint64_t>(size, std::uint64_t{1} << kMaxClusterBits));
  if (head.size() < kVersion2HeaderLength) {
    co_return BlockError{EINVAL, "Image is not in qcow2 format"};
  }
  // The cluster size is in the first 72 bytes; read no more than one cluster.
  if (int r = co_await file.read(0, std::span(head).first(kVersion2HeaderLength), 0); r < 0) {
    co_return BlockError{-r, std::string("Could not read qcow2 header: ") + std::strerror(-r)};
  }
  const std::uint32_t bits = base::load_be32(head.data() + 20);
  if (bits >= kMinClusterBits && bits <= kMaxClusterBits) {
    head.resize(std::min<std::uint64_t>(head.size(), std::uint64_t{1} << bits));
  }
  if (int r = co_await file.read(0, head, 0); r < 0) {
    co_return BlockError{-r, std::string("Could not read qcow2 header: ") + std::strerror(-r)};
  }
  co_return decode_header(head);
}

// Recognises qcow2 by its magic (every version, as QEMU does; versions other than 2 and 3 are
// refused on open with their number), opens, creates, describes and checks qcow2 images, and
// lists, creates, applies and removes their internal snapshots; changes the backing file an
// image records (rebase) and empties an image (commit); lists and stores their persistent
// dirty bitmaps (bitmap_directory.h, Qcow2Node::store_bitmaps).
class Qcow2Format final : public ImageFormat {
 public:
  std::string_view name() const noexcept override { return "qcow2"; }
  int probe(const ProbeInput& input) const noexcept override {
    if (input.head.size() < 8) return 0;
    const std::uint32_t magic = base::load_be32(input.head.data());
    const std::uint32_t version = base::load_be32(input.head.data() + 4);
    return magic == kMagic && version >= 2 ? 100 : 0;
  }

  bool can_open() const noexcept override { return true; }
  coro::Task<BlockResult<BlockNodeRef>> open(BlockNodeRef file,
                                             FormatOpenOptions options) const override {
    co_return co_await open_qcow2(std::move(file), std::move(options));
  }

  bool can_create() const noexcept override { return true; }
  coro::Task<BlockError> create(BlockNode& file, CreateRequest request) const override {
    BlockResult<CreateOptions> options = parse_create_options(request);
    if (!options) co_return options.error();
    BlockNodeRef data;
    if (!options.value().data_file.empty()) {
      if (!request.create_file) {
        co_return BlockError{ENOTSUP, "qcow2 create: cannot create an external data file here"};
      }
      BlockResult<BlockNodeRef> created = request.create_file(options.value().data_file);
      if (!created) co_return created.error();
      data = std::move(created).value();
    }
    co_return co_await create_image(file, data.get(), std::move(options).value());
  }
  std::string create_summary(const CreateRequest& request) const override {
    return create_summary_text(request);
  }

  BlockResult<std::uint64_t> measure_granularity(const CreateRequest& request) const override {
    return measure_cluster_size(request);
  }
  BlockResult<SizeMeasurement> measure(const CreateRequest& request,
                                       const std::optional<MeasureSource>& source) const override {
    return measure_size(request, source);
  }
  bool supports_persistent_bitmaps(const BlockNode& node) const noexcept override {
    const auto* image = dynamic_cast<const Qcow2Node*>(&node);
    return image && image->header().version >= 3;
  }

  coro::Task<ImageDescription> describe(BlockNode& node) const override {
    ImageDescription d;
    Header header;
    bool corrupt = false;
    if (auto* q = dynamic_cast<Qcow2Node*>(&node)) {
      header = q->header();
      corrupt = q->corrupt() || (header.incompatible_features & kIncompatCorrupt);
    } else {
      BlockResult<Header> h = co_await read_header(node);
      if (!h) co_return d;
      header = std::move(h).value();
      corrupt = header.incompatible_features & kIncompatCorrupt;
    }
    d.cluster_size = static_cast<std::uint32_t>(header.cluster_size());
    d.dirty = header.incompatible_features & kIncompatDirty;
    d.backing_filename = header.backing_file;
    d.backing_format = header.backing_format;
    nlohmann::ordered_json data;
    data["compat"] = header.version == 2 ? "0.10" : "1.1";
    data["compression-type"] = header.compression_type == CompressionType::kZstd ? "zstd" : "zlib";
    if (header.version >= 3) {
      data["lazy-refcounts"] = (header.compatible_features & kCompatLazyRefcounts) != 0;
    }
    if (auto* q = dynamic_cast<Qcow2Node*>(&node); q && header.bitmaps) {
      // As qemu-img info: the directory's bitmaps, each with its flags, name, granularity.
      BlockResult<std::vector<BitmapEntry>> dir = co_await q->bitmap_directory();
      if (dir && !dir.value().empty()) {
        nlohmann::ordered_json list = nlohmann::ordered_json::array();
        for (const BitmapEntry& e : dir.value()) {
          nlohmann::ordered_json flags = nlohmann::ordered_json::array();
          if (e.in_use()) flags.push_back("in-use");
          if (e.enabled()) flags.push_back("auto");
          list.push_back({{"flags", std::move(flags)}, {"name", e.name},
                          {"granularity", e.granularity()}});
        }
        data["bitmaps"] = std::move(list);
      }
    }
    data["refcount-bits"] = header.refcount_bits();
    if (header.version >= 3) {
      if (!header.data_file.empty()) {
        data["data-file"] = header.data_file;
        data["data-file-raw"] = (header.autoclear_features & kAutoclearDataFileRaw) != 0;
      }
      data["corrupt"] = corrupt;
      data["extended-l2"] = header.extended_l2();
    }
    d.format_specific = {{"type", "qcow2"}, {"data", std::move(data)}};
    co_return d;
  }

  bool can_snapshot() const noexcept override { return true; }
  coro::Task<BlockResult<std::vector<SnapshotDescription>>> list_snapshots(
      BlockNode& node) const override {
    auto* q = dynamic_cast<Qcow2Node*>(&node);
    if (!q) co_return BlockError{EINVAL, "not a qcow2 node"};
    BlockResult<std::vector<SnapshotEntry>> table = co_await q->snapshots();
    if (!table) co_return table.error();
    std::vector<SnapshotDescription> list;
    for (const SnapshotEntry& s : table.value()) {
      list.push_back({s.id, s.name, s.vm_state_size, s.date_sec, s.date_nsec, s.vm_clock_nsec,
                      s.icount});
    }
    co_return list;
  }
  coro::Task<BlockError> create_snapshot(BlockNode& node,
                                         SnapshotDescription snapshot) const override {
    auto* q = dynamic_cast<Qcow2Node*>(&node);
    if (!q) co_return BlockError{EINVAL, "not a qcow2 node"};
    SnapshotEntry entry;
    entry.id = std::move(snapshot.id);
    entry.name = std::move(snapshot.name);
    entry.vm_state_size = snapshot.vm_state_size;
    entry.date_sec = snapshot.date_sec;
    entry.date_nsec = snapshot.date_nsec;
    entry.vm_clock_nsec = snapshot.vm_clock_nsec;
    entry.icount = snapshot.icount;
    co_return co_await q->create_snapshot(std::move(entry));
  }
  coro::Task<BlockError> apply_snapshot(BlockNode& node, std::string id_or_name) const override {
    auto* q = dynamic_cast<Qcow2Node*>(&node);
    if (!q) co_return BlockError{EINVAL, "not a qcow2 node"};
    // As qemu: no snapshot is applied under persistent bitmaps (they would not tell what the
    // switch changed).
    BlockResult<std::vector<BitmapEntry>> dir = co_await q->bitmap_directory();
    if (!dir) co_return dir.error();
    if (!dir.value().empty()) co_return BlockError{EBUSY, "Device has active dirty bitmaps"};
    co_return co_await q->apply_snapshot(std::move(id_or_name));
  }
  coro::Task<BlockError> load_snapshot_view(BlockNode& node, std::string id,
                                            std::string name) const override {
    auto* q = dynamic_cast<Qcow2Node*>(&node);
    if (!q) co_return BlockError{EINVAL, "not a qcow2 node"};
    co_return co_await q->view_snapshot(std::move(id), std::move(name));
  }
  coro::Task<BlockError> remove_snapshot(BlockNode& node, std::string name) const override {
    auto* q = dynamic_cast<Qcow2Node*>(&node);
    if (!q) co_return BlockError{EINVAL, "not a qcow2 node"};
    co_return co_await q->delete_snapshot(std::move(name));
  }

  coro::Task<BlockResult<std::vector<PersistentBitmap>>> load_bitmaps(
      BlockNode& node, bool with_bits) const override {
    auto* q = dynamic_cast<Qcow2Node*>(&node);
    if (!q) co_return BlockError{EINVAL, "not a qcow2 node"};
    BlockResult<std::vector<BitmapEntry>> dir = co_await q->bitmap_directory();
    if (!dir) co_return dir.error();
    std::uint64_t memory = 0;
    for (const BitmapEntry& e : dir.value()) {
      if (with_bits && !e.in_use()) memory += bitmap_data_bytes(q->size(), e.granularity_bits);
    }
    if (memory > kMaxBitmapMemoryBytes) {
      co_return BlockError{ENOMEM, "the image's bitmaps take more than 1 GiB of memory"};
    }
    std::vector<PersistentBitmap> list;
    for (const BitmapEntry& e : dir.value()) {
      PersistentBitmap b{e.name, e.granularity(), e.enabled(), e.in_use(), std::nullopt};
      if (with_bits && !e.in_use()) {
        BlockResult<std::vector<std::uint8_t>> bits = co_await q->read_bitmap_bits(e);
        if (!bits) co_return bits.error();
        b.bits = std::move(bits).value();
      }
      list.push_back(std::move(b));
    }
    co_return list;
  }
  coro::Task<BlockError> store_bitmaps(BlockNode& node,
                                       std::vector<PersistentBitmap> bitmaps) const override {
    auto* q = dynamic_cast<Qcow2Node*>(&node);
    if (!q) co_return BlockError{EINVAL, "not a qcow2 node"};
    std::vector<Qcow2Node::StoredBitmap> list;
    for (PersistentBitmap& b : bitmaps) {
      Qcow2Node::StoredBitmap s;
      s.entry.name = std::move(b.name);
      std::uint32_t bits = 0;
      while (bits < 63 && (std::uint64_t{1} << bits) < b.granularity) ++bits;
      s.entry.granularity_bits = static_cast<std::uint8_t>(bits);
      s.entry.flags = (b.enabled ? kBitmapFlagAuto : 0) | (b.in_use ? kBitmapFlagInUse : 0);
      s.bits = std::move(b.bits);
      list.push_back(std::move(s));
    }
    co_return co_await q->store_bitmaps(std::move(list));
  }

  bool can_check() const noexcept override { return true; }
  bool can_compress() const noexcept override { return true; }
  coro::Task<BlockError> amend(BlockNode& node,
                               std::map<std::string, std::string> options) const override {
    auto* q = dynamic_cast<Qcow2Node*>(&node);
    if (!q) co_return BlockError{EINVAL, "not a qcow2 node"};
    BlockResult<Qcow2Node::AmendRequest> request = parse_amend_options(options);
    if (!request) co_return request.error();
    co_return co_await q->amend(request.value());
  }
  coro::Task<BlockError> change_backing(BlockNode& node, std::string name,
                                        std::string format) const override {
    auto* q = dynamic_cast<Qcow2Node*>(&node);
    if (!q) co_return BlockError{EINVAL, "not a qcow2 node"};
    co_return co_await q->change_backing(std::move(name), std::move(format));
  }
  coro::Task<BlockError> make_empty(BlockNode& node) const override {
    auto* q = dynamic_cast<Qcow2Node*>(&node);
    if (!q) co_return BlockError{EINVAL, "not a qcow2 node"};
    co_return co_await q->make_empty();
  }
  // For an open node: its metadata is flushed, then the file is checked with the header as
  // the file holds it (a repair may have moved the refcount table since the node opened).
  coro::Task<CheckReport> check(BlockNodeRef node, RepairMode mode) const override {
    BlockNode* file = node.get();
    if (auto* q = dynamic_cast<Qcow2Node*>(node.get())) {
      if (int r = co_await q->flush(); r < 0) {
        CheckReport report;
        report.check_errors = 1;
        report.error = r;
        co_return report;
      }
      file = q->file().get();
    }
    BlockResult<Header> header = co_await read_header(*file);
    if (!header) {
      CheckReport report;
      report.check_errors = 1;
      report.error = -header.error().error;
      co_return report;
    }
    co_return co_await check_image(*file, std::move(header).value(), mode);
  }
};

}  // namespace

const ImageFormat& qcow2_format() {
  static const Qcow2Format format;
  return format;
}

}  // namespace spindle::block::qcow2
