#include "block/formats/qed/qed_format.h"

#include <cctype>
#include <cerrno>
#include <cstring>
#include <optional>

#include <fmt/format.h>

#include "block/formats/qed/create.h"
#include "block/formats/qed/format.h"
#include "block/formats/qed/qed_node.h"

namespace spindle::block::qed {

namespace {

// A number with an optional k/M/G/T suffix (powers of 1024), as qemu-img's -o sizes; `suffix`
// false: digits only.
std::optional<std::uint32_t> parse_u32(std::string_view text, bool suffix) {
  std::uint64_t value = 0;
  std::size_t pos = 0;
  while (pos < text.size() && std::isdigit(static_cast<unsigned char>(text[pos]))) {
    value = value * 10 + static_cast<unsigned>(text[pos] - '0');
    if (value > UINT32_MAX) return std::nullopt;
    ++pos;
  }
  if (pos == 0) return std::nullopt;
  if (suffix && pos + 1 == text.size()) {
    unsigned shift = 0;
    switch (std::toupper(static_cast<unsigned char>(text[pos]))) {
      case 'B': shift = 0; break;
      case 'K': shift = 10; break;
      case 'M': shift = 20; break;
      case 'G': shift = 30; break;
      default: return std::nullopt;
    }
    if ((value << shift) > UINT32_MAX) return std::nullopt;
    return static_cast<std::uint32_t>(value << shift);
  }
  if (pos != text.size()) return std::nullopt;
  return static_cast<std::uint32_t>(value);
}

// The request's options as create_qed() takes them, or the first bad option.
BlockResult<CreateOptions> parse_request(const CreateRequest& request) {
  CreateOptions options;
  options.size = request.size;
  for (const auto& [key, value] : request.options) {
    if (key == "backing_file") {
      options.backing_file = value;
    } else if (key == "backing_fmt") {
      options.backing_format = value;
    } else if (key == "cluster_size" || key == "table_size") {
      const bool is_cluster = key == "cluster_size";
      const std::optional<std::uint32_t> number = parse_u32(value, is_cluster);
      if (!number) {
        return BlockError{EINVAL, fmt::format("Parameter '{}' expects a {}, got '{}'", key,
                                              is_cluster ? "size" : "number", value)};
      }
      (is_cluster ? options.cluster_size : options.table_size) = *number;
    } else {
      return BlockError{EINVAL, fmt::format("Invalid parameter '{}' for format 'qed'", key)};
    }
  }
  return options;
}

class QedFormat final : public ImageFormat {
 public:
  std::string_view name() const noexcept override { return "qed"; }

  int probe(const ProbeInput& input) const noexcept override {
    if (input.head.size() < kHeaderBytes) return 0;
    return decode_header(input.head).magic == kMagic ? 100 : 0;
  }

  coro::Task<BlockResult<BlockNodeRef>> open(BlockNodeRef file,
                                             FormatOpenOptions options) const override {
    if (!options.options.empty()) {
      co_return BlockError{EINVAL, fmt::format("Invalid option '{}' for format 'qed'",
                                               options.options.begin()->first)};
    }
    OpenOptions open;
    open.read_only = options.read_only;
    open.repair_if_dirty = options.repair_if_dirty;
    open.ignore_backing = options.ignore_backing;
    open.open_backing = std::move(options.open_backing);
    BlockResult<QedNodeRef> node = co_await open_qed(std::move(file), std::move(open));
    if (!node.ok()) co_return node.error();
    co_return BlockNodeRef(std::move(node).value());
  }

  bool can_create() const noexcept override { return true; }

  BlockError validate_create(const CreateRequest& request) const override {
    BlockResult<CreateOptions> parsed = parse_request(request);
    return parsed.ok() ? BlockError{} : parsed.error();
  }

  coro::Task<BlockError> create(BlockNode& file, CreateRequest request) const override {
    BlockResult<CreateOptions> parsed = parse_request(request);
    if (!parsed.ok()) co_return parsed.error();
    co_return co_await create_qed(file, std::move(parsed).value());
  }

  std::string create_summary(const CreateRequest& request) const override {
    std::string line = fmt::format("size={}", request.size);
    BlockResult<CreateOptions> parsed = parse_request(request);
    if (!parsed.ok()) return line;
    const CreateOptions& options = parsed.value();
    if (!options.backing_file.empty()) line += " backing_file=" + options.backing_file;
    if (!options.backing_format.empty()) line += " backing_fmt=" + options.backing_format;
    line += fmt::format(" cluster_size={}", options.cluster_size);
    if (request.options.contains("table_size")) {
      line += fmt::format(" table_size={}", options.table_size);
    }
    return line;
  }

  coro::Task<ImageDescription> describe(BlockNode& node) const override {
    ImageDescription description;
    auto* qed = dynamic_cast<QedNode*>(&node);
    if (!qed) co_return description;
    const Header header = co_await qed->header();
    description.cluster_size = header.cluster_size;
    description.dirty = header.features & kFeatureNeedCheck;
    description.backing_filename = qed->backing_filename();
    if (!description.backing_filename.empty() &&
        (header.features & kFeatureBackingFormatNoProbe)) {
      description.backing_format = "raw";
    }
    co_return description;
  }

  coro::Task<BlockError> change_backing(BlockNode& node, std::string name,
                                        std::string format) const override {
    auto* qed = dynamic_cast<QedNode*>(&node);
    if (!qed) co_return BlockError{EINVAL, "not a qed node"};
    co_return co_await qed->change_backing(std::move(name), std::move(format));
  }

  bool can_check() const noexcept override { return true; }

  coro::Task<CheckReport> check(BlockNodeRef node, RepairMode mode) const override {
    CheckReport report;
    auto qed = std::dynamic_pointer_cast<QedNode>(node);
    if (!qed) {
      report.check_errors = 1;
      report.error = -EINVAL;
      co_return report;
    }
    const bool repair = mode != RepairMode::kNone;
    const CheckResult result = co_await qed->check(repair);
    report.corruptions = result.corruptions;
    report.leaks = result.leaks;
    report.check_errors = result.check_errors;
    report.corruptions_fixed = result.corruptions_fixed;
    report.leaks_fixed = result.leaks_fixed;
    report.total_clusters = result.total_clusters;
    report.allocated_clusters = result.allocated_clusters;
    report.fragmented_clusters = result.fragmented_clusters;
    report.error = result.error;
    if (repair && (result.corruptions_fixed || result.leaks_fixed)) {
      // The repairs are in the file's cache: make them durable before anyone re-checks.
      const int flushed = co_await qed->file()->flush();
      if (flushed < 0) {
        ++report.check_errors;
        report.error = flushed;
      }
    }
    co_return report;
  }
};

}  // namespace

const ImageFormat& qed_format() {
  static const QedFormat format;
  return format;
}

}  // namespace spindle::block::qed
