// `spindle-img map`: where each range of an image comes from (qemu-img map): JSON MapEntry
// objects {start, length, depth, present, zero, data[, offset]} with equal neighbours merged,
// or the human table of ranges that hold data. A range whose metadata is corrupt (a table entry
// pointing past EOF or at metadata) fails the command, as qemu-img does for what it detects.
#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "chain_status.h"
#include "commands.h"
#include "coro/block_on.h"
#include "image_opener.h"
#include "tool_failure.h"

namespace spindle::img {

namespace {

struct MapEntry {
  std::uint64_t start = 0;
  ChainExtent extent;

  bool continues_with(const MapEntry& next) const {
    const ChainExtent& a = extent;
    const ChainExtent& b = next.extent;
    return start + a.bytes == next.start && a.depth == b.depth && a.present == b.present &&
           a.zero == b.zero && a.data == b.data && a.has_offset == b.has_offset &&
           a.level == b.level && (!a.has_offset || a.offset + a.bytes == b.offset);
  }
};

struct Map {
  std::vector<MapEntry> entries;
  int error = 0;  // -errno of the first corrupt range
  std::uint64_t error_offset = 0;
};

coro::Task<Map> collect_map(block::BlockNodeRef root, std::uint64_t size) {
  Map map;
  std::vector<MapEntry>& entries = map.entries;
  std::uint64_t pos = 0;
  while (pos < size) {
    const ChainExtent extent = co_await chain_status(root, pos, size - pos);
    if (extent.error < 0) {
      map.error = extent.error;
      map.error_offset = pos;
      co_return map;
    }
    const MapEntry entry{pos, extent};
    if (!entries.empty() && entries.back().continues_with(entry)) {
      entries.back().extent.bytes += entry.extent.bytes;
    } else {
      entries.push_back(entry);
    }
    pos += entry.extent.bytes;
  }
  co_return map;
}

// The file name qemu-img shows for each level of the chain: the image as named on the command
// line, then each backing name resolved against the image that records it.
std::map<const block::BlockNode*, std::string> level_names(const OpenedImage& image) {
  std::map<const block::BlockNode*, std::string> names;
  for (const block::ChainLevel& level : image.levels) names[level.node] = level.filename;
  return names;
}

const char* boolean(bool value) { return value ? "true" : "false"; }

}  // namespace

int run_map(const MapOptions& options) {
  const OpenedImage image = open_image(options.filename, options.format, ImageOpenOptions{});
  const Map map = coro::block_on(collect_map(image.root, image.backend->size()));
  if (map.error < 0) {
    fail("Could not read file metadata: " + std::string(std::strerror(-map.error)) +
         " (corrupt image table entry for offset " + std::to_string(map.error_offset) +
         "; run 'spindle-img check')");
  }
  const std::vector<MapEntry>& entries = map.entries;
  if (options.output == "json") {
    std::printf("[");
    for (std::size_t i = 0; i < entries.size(); ++i) {
      const ChainExtent& e = entries[i].extent;
      std::printf("%s{ \"start\": %llu, \"length\": %llu, \"depth\": %u, \"present\": %s, "
                  "\"zero\": %s, \"data\": %s",
                  i ? ",\n" : "", static_cast<unsigned long long>(entries[i].start),
                  static_cast<unsigned long long>(e.bytes), e.depth, boolean(e.present),
                  boolean(e.zero), boolean(e.data));
      if (e.has_offset) std::printf(", \"offset\": %llu", static_cast<unsigned long long>(e.offset));
      std::printf("}");
    }
    std::printf("]\n");
    return 0;
  }
  const auto names = level_names(image);
  std::printf("%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File");
  for (const MapEntry& entry : entries) {
    const ChainExtent& e = entry.extent;
    if (!e.data || e.zero) continue;
    const auto name = names.find(e.level);
    std::printf("%#-16llx%#-16llx%#-16llx%s\n", static_cast<unsigned long long>(entry.start),
                static_cast<unsigned long long>(e.bytes),
                static_cast<unsigned long long>(e.has_offset ? e.offset : 0),
                name == names.end() ? image.filename.c_str() : name->second.c_str());
  }
  return 0;
}

}  // namespace spindle::img
