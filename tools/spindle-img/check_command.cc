// `spindle-img check`: the format's consistency check and repair (qemu-img check), with
// qemu-img's exit codes (0 clean, 1 check not completed, 2 corruptions, 3 leaks, 63 no check
// for the format) and its human and JSON (ImageCheck) output.
#include <nlohmann/json.hpp>

#include <cstdio>
#include <cstring>

#include "commands.h"
#include "coro/block_on.h"
#include "image_opener.h"
#include "tool_failure.h"

namespace spindle::img {

namespace {

constexpr int kNoCheckSupport = 63;

coro::Task<block::CheckReport> check_image(const OpenedImage& image, block::RepairMode mode) {
  co_return co_await image.format->check(image.root, mode);
}

void print_human(const block::CheckReport& result) {
  if (result.corruptions == 0 && result.leaks == 0 && result.check_errors == 0) {
    std::printf("No errors were found on the image.\n");
  } else {
    if (result.corruptions) {
      std::printf("\n%llu errors were found on the image.\n"
                  "Data may be corrupted, or further writes to the image may corrupt it.\n",
                  static_cast<unsigned long long>(result.corruptions));
    }
    if (result.leaks) {
      std::printf("\n%llu leaked clusters were found on the image.\n"
                  "This means waste of disk space, but no harm to data.\n",
                  static_cast<unsigned long long>(result.leaks));
    }
    if (result.check_errors) {
      std::printf("\n%llu internal errors have occurred during the check.\n",
                  static_cast<unsigned long long>(result.check_errors));
    }
  }
  if (result.total_clusters != 0 && result.allocated_clusters != 0) {
    const double total = static_cast<double>(result.total_clusters);
    const double allocated = static_cast<double>(result.allocated_clusters);
    std::printf("%llu/%llu = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed clusters\n",
                static_cast<unsigned long long>(result.allocated_clusters),
                static_cast<unsigned long long>(result.total_clusters),
                allocated * 100.0 / total,
                static_cast<double>(result.fragmented_clusters) * 100.0 / allocated,
                static_cast<double>(result.compressed_clusters) * 100.0 / allocated);
  }
  if (result.image_end_offset) {
    std::printf("Image end offset: %llu\n",
                static_cast<unsigned long long>(result.image_end_offset));
  }
}

void print_json(const std::string& filename, std::string_view format,
                const block::CheckReport& result) {
  nlohmann::ordered_json json;
  auto put_nonzero = [&json](const char* key, std::uint64_t value) {
    if (value) json[key] = value;
  };
  // qemu-img's key order (its dictionary's bucket order).
  put_nonzero("image-end-offset", result.image_end_offset);
  put_nonzero("compressed-clusters", result.compressed_clusters);
  put_nonzero("total-clusters", result.total_clusters);
  put_nonzero("corruptions", result.corruptions);
  json["check-errors"] = result.check_errors;
  put_nonzero("leaks", result.leaks);
  put_nonzero("corruptions-fixed", result.corruptions_fixed);
  put_nonzero("leaks-fixed", result.leaks_fixed);
  put_nonzero("allocated-clusters", result.allocated_clusters);
  json["filename"] = filename;
  json["format"] = format;
  put_nonzero("fragmented-clusters", result.fragmented_clusters);
  std::printf("%s\n", json.dump(4).c_str());
}

}  // namespace

int run_check(const CheckOptions& options) {
  const bool repair = !options.repair.empty();
  const block::RepairMode mode = options.repair == "all"     ? block::RepairMode::kAll
                                 : options.repair == "leaks" ? block::RepairMode::kLeaks
                                                             : block::RepairMode::kNone;
  if (!options.format.empty() && !require_format(options.format).can_check()) {
    fail("This image format does not support checks", kNoCheckSupport);
  }
  const OpenedImage image = open_image(
      options.filename, options.format,
      ImageOpenOptions{.read_only = !repair, .with_backing = true, .repair_if_dirty = false});
  if (!image.format->can_check()) {
    fail("This image format does not support checks", kNoCheckSupport);
  }

  block::CheckReport result = coro::block_on(check_image(image, mode));
  if (repair && (result.corruptions_fixed || result.leaks_fixed)) {
    if (options.output == "human" && !options.quiet) {
      std::printf("The following inconsistencies were found and repaired:\n\n"
                  "    %llu leaked clusters\n    %llu corruptions\n\n"
                  "Double checking the fixed image now...\n",
                  static_cast<unsigned long long>(result.leaks_fixed),
                  static_cast<unsigned long long>(result.corruptions_fixed));
    }
    const block::CheckReport repaired = result;
    result = coro::block_on(check_image(image, block::RepairMode::kNone));
    result.corruptions_fixed = repaired.corruptions_fixed;
    result.leaks_fixed = repaired.leaks_fixed;
  }
  if (result.check_errors && result.error) {
    std::fprintf(stderr, "spindle-img: Check failed: %s\n", std::strerror(-result.error));
  }
  if (options.output == "json") {
    print_json(options.filename, image.format->name(), result);
  } else if (!options.quiet) {
    print_human(result);
  }
  return result.exit_code();
}

}  // namespace spindle::img
