// `spindle-img info`: what an image is (qemu-img info), as text or as qemu-img's JSON
// (ImageInfo field names, internal snapshots included), optionally for every image of the
// backing chain.
#include <sys/stat.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "commands.h"
#include "coro/block_on.h"
#include "human_size.h"
#include "image_opener.h"
#include "snapshot_listing.h"
#include "tool_failure.h"

namespace spindle::img {

namespace {

struct ImageDescription {
  std::string filename;
  std::string format;
  std::uint64_t virtual_size = 0;
  std::uint64_t actual_size = 0;
  bool dirty = false;
  std::uint32_t cluster_size = 0;  // 0: not a clustered format
  std::string backing_filename;    // as recorded in the image
  std::string full_backing_filename;
  std::string backing_format;      // only when the image records it
  nlohmann::ordered_json format_specific;  // {"type": ..., "data": {...}} or null
  std::vector<block::SnapshotDescription> snapshots;  // internal snapshots, table order
};

coro::Task<block::ImageDescription> describe_node(const block::ImageFormat& format,
                                                  block::BlockNodeRef node) {
  co_return co_await format.describe(*node);
}

ImageDescription describe(const std::string& filename, const std::string& format) {
  const OpenedImage image = open_image(
      filename, format, ImageOpenOptions{.with_backing = false, .metadata_only = true});
  ImageDescription description;
  description.filename = filename;
  description.format = std::string(image.format->name());
  description.virtual_size = image.backend->size();
  struct stat info;
  if (::stat(filename.c_str(), &info) == 0) {
    description.actual_size = static_cast<std::uint64_t>(info.st_blocks) * 512;
  }
  block::ImageDescription found = coro::block_on(describe_node(*image.format, image.root));
  description.dirty = found.dirty;
  description.cluster_size = found.cluster_size;
  description.backing_filename = found.backing_filename;
  if (!description.backing_filename.empty()) {
    description.full_backing_filename =
        block::combine_backing_path(filename, description.backing_filename);
    description.backing_format = found.backing_format;
  }
  description.format_specific = std::move(found.format_specific);
  description.snapshots = image_snapshots(image);
  return description;
}

// qemu-img's human layout of format-specific data: "key: value" with dashes in keys shown as
// spaces, nested objects and lists indented by four, list elements named "[i]".
void print_specific(int indent, const std::string& key, const nlohmann::ordered_json& value) {
  if (value.is_object() || value.is_array()) {
    std::printf("%*s%s:\n", indent, "", key.c_str());
    std::size_t index = 0;
    for (auto it = value.begin(); it != value.end(); ++it, ++index) {
      std::string name = value.is_object() ? it.key() : "[" + std::to_string(index) + "]";
      if (value.is_object()) std::replace(name.begin(), name.end(), '-', ' ');
      print_specific(indent + 4, name, *it);
    }
    return;
  }
  const std::string text = value.is_string() ? value.get<std::string>() : value.dump();
  std::printf("%*s%s: %s\n", indent, "", key.c_str(), text.c_str());
}

// json.dump(4), but with empty arrays as qemu prints them: "[", then "]" on its own line at
// the indentation of the line that opened it.
std::string qemu_json_text(const nlohmann::ordered_json& json) {
  const std::string text = json.dump(4);
  std::string out;
  bool in_string = false;
  std::size_t line_start = 0;
  for (std::size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\') {
        out += c;
        if (i + 1 < text.size()) out += text[++i];
        continue;
      }
      if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '\n') {
      line_start = out.size() + 1;
    } else if (c == '[' && i + 1 < text.size() && text[i + 1] == ']') {
      std::size_t indent = 0;
      while (line_start + indent < out.size() && out[line_start + indent] == ' ') ++indent;
      out += "[\n" + std::string(indent, ' ') + "]";
      ++i;
      continue;
    }
    out += c;
  }
  return out;
}

nlohmann::ordered_json to_json(const ImageDescription& image) {
  nlohmann::ordered_json json;
  if (!image.backing_format.empty()) json["backing-filename-format"] = image.backing_format;
  if (!image.snapshots.empty()) json["snapshots"] = snapshots_json(image.snapshots);
  json["virtual-size"] = image.virtual_size;
  json["filename"] = image.filename;
  if (image.cluster_size) json["cluster-size"] = image.cluster_size;
  json["format"] = image.format;
  json["actual-size"] = image.actual_size;
  if (!image.format_specific.is_null()) json["format-specific"] = image.format_specific;
  if (!image.backing_filename.empty()) {
    json["full-backing-filename"] = image.full_backing_filename;
    json["backing-filename"] = image.backing_filename;
  }
  json["dirty-flag"] = image.dirty;
  return json;
}

void print_human(const ImageDescription& image) {
  std::printf("image: %s\n", image.filename.c_str());
  std::printf("file format: %s\n", image.format.c_str());
  std::printf("virtual size: %s (%llu bytes)\n", human_size(image.virtual_size).c_str(),
              static_cast<unsigned long long>(image.virtual_size));
  std::printf("disk size: %s\n", human_size(image.actual_size).c_str());
  if (image.cluster_size) std::printf("cluster_size: %u\n", image.cluster_size);
  if (image.dirty) std::printf("cleanly shut down: no\n");
  if (!image.backing_filename.empty()) {
    if (image.full_backing_filename != image.backing_filename) {
      std::printf("backing file: %s (actual path: %s)\n", image.backing_filename.c_str(),
                  image.full_backing_filename.c_str());
    } else {
      std::printf("backing file: %s\n", image.backing_filename.c_str());
    }
    if (!image.backing_format.empty()) {
      std::printf("backing file format: %s\n", image.backing_format.c_str());
    }
  }
  std::fputs(snapshot_table_text(image.snapshots).c_str(), stdout);
  const auto data = image.format_specific.find("data");
  if (image.format_specific.is_object() && data != image.format_specific.end() &&
      data->is_object()) {
    std::printf("Format specific information:\n");
    for (auto it = data->begin(); it != data->end(); ++it) {
      std::string name = it.key();
      std::replace(name.begin(), name.end(), '-', ' ');
      print_specific(4, name, *it);
    }
  }
}

}  // namespace

int run_info(const InfoOptions& options) {
  constexpr unsigned kMaxChainDepth = 16;
  std::vector<ImageDescription> chain;
  chain.push_back(describe(options.filename, options.format));
  while (options.backing_chain && !chain.back().backing_filename.empty()) {
    if (chain.size() >= kMaxChainDepth) {
      fail("backing chain of '" + options.filename + "' is deeper than 16 images (a loop?)");
    }
    const ImageDescription& last = chain.back();
    // A backing format the image does not record is probed, as qemu-img does.
    chain.push_back(describe(last.full_backing_filename, last.backing_format));
  }

  if (options.output == "json") {
    nlohmann::ordered_json json;
    if (options.backing_chain) {
      json = nlohmann::ordered_json::array();
      for (const ImageDescription& image : chain) json.push_back(to_json(image));
    } else {
      json = to_json(chain.front());
    }
    std::printf("%s\n", qemu_json_text(json).c_str());
  } else {
    for (std::size_t i = 0; i < chain.size(); ++i) {
      if (i) std::printf("\n");
      print_human(chain[i]);
    }
  }
  return 0;
}

}  // namespace spindle::img
