// CheckResult: what a QED consistency check found (reference/qed.md §1.11), with the same
// meaning as the fields of `qemu-img check --output=json` (ImageCheck), so tests can compare
// them one for one. QedNode::check() fills it.
//
// Thread-safety: a plain value type.
#pragma once

#include <cstdint>

namespace spindle::block::qed {

struct CheckResult {
  std::uint64_t corruptions = 0;        // invalid or doubly referenced offsets left in place
  std::uint64_t leaks = 0;              // clusters past the header that nothing references
  std::uint64_t check_errors = 0;       // tables that could not be read or rewritten
  std::uint64_t corruptions_fixed = 0;  // invalid offsets dropped by a repairing check
  std::uint64_t leaks_fixed = 0;        // always 0: QED cannot reclaim leaked clusters
  std::uint64_t total_clusters = 0;     // ceil(image_size / cluster_size)
  std::uint64_t allocated_clusters = 0;
  std::uint64_t fragmented_clusters = 0;
  int error = 0;  // -errno of the last table I/O failure, 0 if none

  // qemu-img check's exit code for this result: 0 clean, 1 not completed, 2 corruptions, 3 leaks.
  int exit_code() const noexcept {
    if (check_errors) return 1;
    if (corruptions) return 2;
    if (leaks) return 3;
    return 0;
  }
};

}  // namespace spindle::block::qed
