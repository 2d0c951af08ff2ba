// chain_status(): what a range of an image reads as, looking through its backing chain — the
// allocation view that `map`, `convert` and `compare` share (QEMU's block status "above" a
// base, with the depth at which the answer was found). Starting at the top node, a range the
// level does not allocate (no kStatusAllocated) is looked up in that level's backing node; a
// range past the end of the backing node, or with no backing node, reads as zeros and is not
// present.
//
// Thread-safety: a coroutine; as thread-safe as the nodes it queries (all of them may be used
// from any number of coroutines at once).
#pragma once

#include <cstdint>

#include "block/block_node.h"
#include "coro/task.h"

namespace spindle::img {

struct ChainExtent {
  std::uint64_t bytes = 0;   // length of the run from the query offset (never 0 for bytes > 0)
  unsigned depth = 0;        // 0: the top image; 1: its backing file; ...
  bool present = false;      // some level allocates the range
  bool zero = false;         // the range reads as zeros
  bool data = false;         // the range holds data to read
  bool has_offset = false;   // `offset` says where the data lives in `level`'s file
  std::uint64_t offset = 0;
  const block::BlockNode* level = nullptr;  // the node that answered
  int error = 0;  // negative errno: `level` cannot say what the range holds (corrupt metadata)
};

coro::Task<ChainExtent> chain_status(block::BlockNodeRef top, std::uint64_t offset,
                                     std::uint64_t bytes);

}  // namespace spindle::img
