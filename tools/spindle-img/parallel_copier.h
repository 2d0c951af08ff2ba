// ParallelCopier: the data movement of `convert`. It splits the source's virtual size into
// chunks (2 MiB) that `workers` coroutines take in turn; for each chunk it asks chain_status()
// what the source holds and
//   * skips ranges that read as zeros (the freshly created target already reads as zeros), or
//     writes zero buffers for them when sparse_size is 0 (a fully allocated target);
//   * reads data ranges and writes them, leaving out every aligned sparse_size-byte block of
//     the buffer that is all zeros (qemu-img convert -S);
//   * or, compressing (compress_cluster_size set), writes every target cluster that is not all
//     zeros as one kWriteCompressed request (the target compresses it on its thread pool, so
//     the workers' clusters compress in parallel);
//   * with target_has_backing (convert -B), copies only what the source's top image
//     allocates (zeros as write_zeroes, so that they hide the target's backing file).
// Chunks complete out of order (qemu-img convert -W semantics).
//
// Thread-safety: one copier is driven by one run() call; its workers are coroutines on the
// calling coroutine's context and share state only between suspension points (all on one
// thread), so they need no locks.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "base/io_buffer.h"
#include "block/block_backend.h"
#include "coro/event.h"
#include "coro/task.h"

namespace spindle::img {

class ParallelCopier {
 public:
  struct Options {
    unsigned workers = 8;
    std::uint64_t sparse_size = 4096;  // 0: write zero ranges too
    std::uint64_t chunk_size = 2u << 20;
    // Non-zero: the target's cluster size, a power of two; every cluster is written compressed.
    std::uint64_t compress_cluster_size = 0;
    // The target has a backing file with the content of the source's (convert -B): only what
    // the source's top image allocates is copied, its zeros as zeroes, all else left to it.
    bool target_has_backing = false;
    // Called after every chunk with the bytes done so far (on the copying context).
    std::function<void(std::uint64_t done, std::uint64_t total)> on_progress;
  };

  ParallelCopier(std::shared_ptr<block::BlockBackend> source,
                 std::shared_ptr<block::BlockBackend> target, Options options);

  // Copies everything; returns 0 or the first -errno a read or write returned.
  coro::Task<int> run();

 private:
  coro::Task<void> worker();
  coro::Task<int> copy_chunk(std::uint64_t offset, std::uint64_t length,
                             base::IoBytes& buffer);
  coro::Task<int> write_sparse(std::uint64_t offset, std::span<const std::byte> data);
  coro::Task<int> write_compressed(std::uint64_t offset, std::span<const std::byte> data,
                                   const std::vector<bool>& top_allocated);

  const std::shared_ptr<block::BlockBackend> source_;
  const std::shared_ptr<block::BlockBackend> target_;
  Options options_;  // fixed after construction
  const std::uint64_t total_;
  std::uint64_t next_offset_ = 0;
  std::uint64_t done_bytes_ = 0;
  int first_error_ = 0;
  unsigned running_ = 0;
  coro::Event finished_;
};

}  // namespace spindle::img
