// `spindle-img bitmap`: qemu-img bitmap's --add, --remove, --clear, --enable, --disable and
// --merge SRC [-b SRC_FILE [-F SRC_FMT]] on one persistent dirty bitmap, through the image's
// format. The actions run in command-line order on the image's bitmaps held in memory (a
// merge reads the source bits, from the image itself or from SRC_FILE opened read-only);
// the first failure stops the rest, and whatever changed before it is stored, as qemu-img
// stores its bitmaps on close. Messages and exit codes are qemu-img 7.2's.
//
// The options are read here with getopt_long rather than by main()'s CLI11 parser, because
// the order of the actions matters. Single-threaded, as the whole tool.
#include <getopt.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "commands.h"
#include "coro/block_on.h"
#include "image_opener.h"
#include "size_parser.h"
#include "tool_failure.h"

namespace spindle::img {

namespace {

using block::BlockError;
using block::BlockResult;
using block::PersistentBitmap;

struct Action {
  std::string op;      // add, remove, clear, enable, disable, merge
  std::string source;  // merge: the source bitmap's name
};

coro::Task<BlockResult<std::vector<PersistentBitmap>>> load(const block::ImageFormat& format,
                                                            block::BlockNodeRef node,
                                                            bool with_bits) {
  co_return co_await format.load_bitmaps(*node, with_bits);
}
coro::Task<BlockError> store(const block::ImageFormat& format, block::BlockNodeRef node,
                             std::vector<PersistentBitmap> bitmaps) {
  co_return co_await format.store_bitmaps(*node, std::move(bitmaps));
}
coro::Task<int> flush(block::BlockNodeRef node) {
  co_return co_await node->flush();
}
coro::Task<block::ImageDescription> describe(const block::ImageFormat& format,
                                             block::BlockNodeRef node) {
  co_return co_await format.describe(*node);
}

std::uint64_t bit_count(std::uint64_t size, std::uint64_t granularity) {
  return size / granularity + (size % granularity != 0);
}

// ORs `src`'s bits into `dst`'s (granularities may differ: a destination bit is set where
// any byte it covers is covered by a set source bit).
void merge_bits(const PersistentBitmap& src, PersistentBitmap& dst, std::uint64_t size) {
  const std::vector<std::uint8_t>& s = *src.bits;
  std::vector<std::uint8_t>& d = *dst.bits;
  d.resize((bit_count(size, dst.granularity) + 7) / 8, 0);
  const std::uint64_t n = std::min<std::uint64_t>(bit_count(size, src.granularity), s.size() * 8);
  for (std::uint64_t i = 0; i < n; ++i) {
    if (!((s[i / 8] >> (i % 8)) & 1)) continue;
    const std::uint64_t start = i * src.granularity;
    const std::uint64_t end = std::min(size, start + src.granularity);
    for (std::uint64_t j = start / dst.granularity; j * dst.granularity < end; ++j) {
      if (j / 8 < d.size()) d[j / 8] = static_cast<std::uint8_t>(d[j / 8] | (1u << (j % 8)));
    }
  }
}

int usage_error(const std::string& message) {
  std::fprintf(stderr, "spindle-img: %s\n", message.c_str());
  std::fprintf(stderr, "Try 'spindle-img --help' for more information\n");
  return 1;
}

std::vector<PersistentBitmap>::iterator find(std::vector<PersistentBitmap>& list,
                                             const std::string& name) {
  return std::find_if(list.begin(), list.end(),
                      [&](const PersistentBitmap& b) { return b.name == name; });
}

}  // namespace

int run_bitmap(int argc, char** argv) {
  static const option long_options[] = {
      {"help", no_argument, nullptr, 'h'},        {"object", required_argument, nullptr, 'O'},
      {"image-opts", no_argument, nullptr, 'I'},  {"add", no_argument, nullptr, 'A'},
      {"remove", no_argument, nullptr, 'R'},      {"clear", no_argument, nullptr, 'C'},
      {"enable", no_argument, nullptr, 'E'},      {"disable", no_argument, nullptr, 'D'},
      {"merge", required_argument, nullptr, 'M'}, {nullptr, 0, nullptr, 0}};
  std::vector<Action> actions;
  std::string format, source_file, source_format;
  bool source_format_given = false, source_file_given = false;
  std::uint64_t granularity = 0;
  bool add = false, merge = false;
  opterr = 0;
  optind = 1;
  int c;
  while ((c = getopt_long(argc, argv, ":hf:g:b:F:", long_options, nullptr)) != -1) {
    switch (c) {
      case 'h':
        std::printf(
            "usage: spindle-img bitmap (--merge SOURCE | --add | --remove | --clear | "
            "--enable | --disable)... [-b source_file [-F source_fmt]] [-g granularity] "
            "[-f fmt] filename bitmap\n");
        return 0;
      case 'f':
        format = optarg;
        break;
      case 'g': {
        const std::optional<std::uint64_t> value = parse_size(optarg);
        if (!value) {
          std::fprintf(stderr,
                       "spindle-img: Invalid granularity specified. You may use k, M, G, T, P "
                       "or E suffixes for\nspindle-img: kilobytes, megabytes, gigabytes, "
                       "terabytes, petabytes and exabytes.\n");
          return 1;
        }
        granularity = *value;
        break;
      }
      case 'b':
        source_file = optarg;
        source_file_given = true;
        break;
      case 'F':
        source_format = optarg;
        source_format_given = true;
        break;
      case 'A':
        actions.push_back({"add", ""});
        add = true;
        break;
      case 'R':
        actions.push_back({"remove", ""});
        break;
      case 'C':
        actions.push_back({"clear", ""});
        break;
      case 'E':
        actions.push_back({"enable", ""});
        break;
      case 'D':
        actions.push_back({"disable", ""});
        break;
      case 'M':
        actions.push_back({"merge", optarg});
        merge = true;
        break;
      case 'O':
      case 'I':
        return usage_error(std::string("--") + (c == 'O' ? "object" : "image-opts") +
                           " is not supported by spindle-img");
      case ':':
        return usage_error(std::string("option requires an argument -- '") +
                           (optopt ? std::string(1, static_cast<char>(optopt)) : argv[optind - 1]) +
                           "'");
      default:
        if (optopt) {
          return usage_error(std::string("invalid option -- '") + static_cast<char>(optopt) + "'");
        }
        return usage_error(std::string("unrecognized option '") + argv[optind - 1] + "'");
    }
  }
  if (actions.empty()) {
    fail("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge");
  }
  if (granularity != 0 && !add) fail("granularity only supported with --add");
  if (source_format_given && !source_file_given) fail("-F only supported with -b");
  if (source_file_given && !merge) fail("Merge bitmap source file only supported with --merge");
  if (optind != argc - 2) fail("Expecting filename and bitmap name");
  const std::string filename = argv[optind];
  const std::string name = argv[optind + 1];

  OpenedImage image =
      open_image(filename, format, ImageOpenOptions{.read_only = false, .repair_if_dirty = true});
  const block::ImageFormat& fmt = *image.format;
  const std::uint64_t size = image.root->size();
  BlockResult<std::vector<PersistentBitmap>> loaded = coro::block_on(load(fmt, image.root, merge));
  if (!loaded) fail("Could not read the bitmaps of '" + filename + "': " + loaded.error().message);
  std::vector<PersistentBitmap> bitmaps = std::move(loaded).value();
  std::vector<bool> changed(bitmaps.size(), false);

  std::optional<std::vector<PersistentBitmap>> source_bitmaps;
  std::string failure;
  bool any_change = false;
  for (const Action& action : actions) {
    auto failed = [&](const std::string& why) {
      failure = "Operation " + action.op + " on bitmap " + name + " failed: " + why;
    };
    auto inconsistent = [&](const std::string& which) {
      failed("Bitmap '" + which +
             "' is inconsistent and cannot be used\n"
             "Try block-dirty-bitmap-remove to delete this bitmap from disk");
    };
    auto it = find(bitmaps, name);
    const std::size_t index = static_cast<std::size_t>(it - bitmaps.begin());
    if (action.op == "add") {
      if (name.empty()) {
        failed("Bitmap name cannot be empty");
        break;
      }
      if (it != bitmaps.end()) {
        failed("Bitmap already exists: " + name);
        break;
      }
      std::uint64_t g = granularity;
      if (g == 0) {
        const block::ImageDescription d = coro::block_on(describe(fmt, image.root));
        g = d.cluster_size ? std::clamp<std::uint64_t>(d.cluster_size, 4096, 65536) : 65536;
      }
      g &= 0xffffffffull;  // qemu takes the granularity as 32 bits
      if (g < 512 || (g & (g - 1)) != 0) {
        failed("Granularity must be power of 2 and at least 512");
        break;
      }
      if (!fmt.supports_persistent_bitmaps(*image.root)) {
        failed(fmt.name() == "qcow2"
                   ? "Can't make bitmap '" + name + "' persistent in '" + filename +
                         "': Cannot store dirty bitmaps in qcow2 v2 files"
                   : "Can't store persistent bitmaps to " + filename + ": Operation not supported");
        break;
      }
      if (name.size() > 1023) {
        failed("Can't make bitmap '" + name + "' persistent in '" + filename +
               "': Name length exceeds maximum (1023 characters)");
        break;
      }
      PersistentBitmap b{name, g, true, false,
                         std::vector<std::uint8_t>((bit_count(size, g) + 7) / 8, 0)};
      bitmaps.push_back(std::move(b));
      changed.push_back(true);
    } else if (it == bitmaps.end()) {
      failed("Dirty bitmap '" + name + "' not found");
      break;
    } else if (action.op == "remove") {
      bitmaps.erase(it);
      changed.erase(changed.begin() + static_cast<std::ptrdiff_t>(index));
    } else if (it->in_use) {
      inconsistent(name);
      break;
    } else if (action.op == "clear") {
      it->bits = std::vector<std::uint8_t>((bit_count(size, it->granularity) + 7) / 8, 0);
      changed[index] = true;
    } else if (action.op == "enable" || action.op == "disable") {
      it->enabled = action.op == "enable";
    } else if (action.op == "merge") {
      const PersistentBitmap* src = nullptr;
      std::vector<PersistentBitmap>& pool = [&]() -> std::vector<PersistentBitmap>& {
        if (!source_file_given) return bitmaps;
        if (!source_bitmaps) {
          OpenedImage source =
              open_image(source_file, source_format, ImageOpenOptions{.read_only = true});
          BlockResult<std::vector<PersistentBitmap>> s =
              coro::block_on(load(*source.format, source.root, true));
          if (!s) fail("Could not read the bitmaps of '" + source_file + "': " + s.error().message);
          source_bitmaps = std::move(s).value();
        }
        return *source_bitmaps;
      }();
      auto s = find(pool, action.source);
      if (s == pool.end()) {
        failed("Dirty bitmap '" + action.source + "' not found");
        break;
      }
      if (s->in_use) {
        inconsistent(action.source);
        break;
      }
      src = &*s;
      it = find(bitmaps, name);  // `pool` may be `bitmaps`: look again
      if (!it->bits) {
        failed("Dirty bitmap '" + name + "' has no data");
        break;
      }
      merge_bits(*src, *it, size);
      changed[static_cast<std::size_t>(it - bitmaps.begin())] = true;
    }
    any_change = true;
  }

  if (any_change) {
    for (std::size_t i = 0; i < bitmaps.size(); ++i) {
      if (!changed[i]) bitmaps[i].bits.reset();  // keep what the image holds
    }
    const BlockError error = coro::block_on(store(fmt, image.root, std::move(bitmaps)));
    if (!error.ok() && failure.empty()) {
      failure = "Could not store the bitmaps of '" + filename + "': " + error.message;
    }
  }
  if (const int r = coro::block_on(flush(image.root)); r < 0 && failure.empty()) {
    failure = "Could not write '" + filename + "': " + std::strerror(-r);
  }
  if (!failure.empty()) fail(failure);
  return 0;
}

}  // namespace spindle::img
