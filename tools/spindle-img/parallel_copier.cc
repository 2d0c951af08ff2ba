#include "parallel_copier.h"

#include <algorithm>
#include <vector>

#include "aio/context.h"
#include "base/is_zero.h"
#include "chain_status.h"
#include "coro/coroutine.h"

namespace spindle::img {

ParallelCopier::ParallelCopier(std::shared_ptr<block::BlockBackend> source,
                               std::shared_ptr<block::BlockBackend> target, Options options)
    : source_(std::move(source)),
      target_(std::move(target)),
      options_(std::move(options)),
      total_(source_->size()) {
  // Chunks hold whole clusters of the compressing target.
  options_.chunk_size = std::max(options_.chunk_size, options_.compress_cluster_size);
}

coro::Task<int> ParallelCopier::run() {
  const unsigned workers = std::max(1u, options_.workers);
  running_ = workers;
  for (unsigned i = 0; i < workers; ++i) coro::spawn(*aio::current_context(), worker());
  co_await finished_.wait();
  co_return first_error_;
}

coro::Task<void> ParallelCopier::worker() {
  base::IoBytes buffer(options_.chunk_size);
  while (first_error_ == 0 && next_offset_ < total_) {
    const std::uint64_t offset = next_offset_;
    const std::uint64_t length = std::min(options_.chunk_size, total_ - offset);
    next_offset_ += length;
    const int result = co_await copy_chunk(offset, length, buffer);
    if (result < 0 && first_error_ == 0) first_error_ = result;
    done_bytes_ += length;
    if (options_.on_progress) options_.on_progress(done_bytes_, total_);
  }
  if (--running_ == 0) finished_.set();
}

coro::Task<int> ParallelCopier::copy_chunk(std::uint64_t offset, std::uint64_t length,
                                           base::IoBytes& buffer) {
  const std::uint64_t end = offset + length;
  const std::uint64_t cluster = options_.compress_cluster_size;
  // Compressing over a backing file: the clusters the source's top image allocates.
  std::vector<bool> top_allocated;
  if (cluster != 0) top_allocated.assign((length + cluster - 1) / cluster, false);
  std::uint64_t pos = offset;
  while (pos < end) {
    const ChainExtent extent = co_await chain_status(source_->root(), pos, end - pos);
    if (extent.error < 0) co_return extent.error;
    const std::span<std::byte> piece(buffer.data(), extent.bytes);
    // With a backing file for the target (-B), what the source's top image does not allocate
    // is left to it.
    const bool from_top = extent.present && extent.depth == 0;
    if (cluster != 0 && from_top) {
      for (std::uint64_t c = (pos - offset) / cluster; c * cluster < pos - offset + extent.bytes;
           ++c) {
        top_allocated[c] = true;
      }
    }
    if (options_.target_has_backing && cluster == 0) {
      if (from_top && extent.zero) {
        const int zeroed = co_await target_->write_zeroes(pos, extent.bytes);
        if (zeroed < 0) co_return zeroed;
      } else if (from_top) {
        const int read = co_await source_->read(pos, piece);
        if (read < 0) co_return read;
        const int written = co_await target_->write(pos, piece);
        if (written < 0) co_return written;
      }
    } else if (cluster != 0) {
      // Whole clusters are written compressed: gather the chunk first, zeros included.
      const std::span<std::byte> place(buffer.data() + (pos - offset), extent.bytes);
      if (extent.zero) {
        std::fill(place.begin(), place.end(), std::byte{0});
      } else {
        const int read = co_await source_->read(pos, place);
        if (read < 0) co_return read;
      }
    } else if (extent.zero) {
      if (options_.sparse_size == 0) {
        std::fill(piece.begin(), piece.end(), std::byte{0});
        const int written = co_await target_->write(pos, piece);
        if (written < 0) co_return written;
      }
    } else {
      const int read = co_await source_->read(pos, piece);
      if (read < 0) co_return read;
      const int written = co_await write_sparse(pos, piece);
      if (written < 0) co_return written;
    }
    pos += extent.bytes;
  }
  if (cluster != 0) {
    co_return co_await write_compressed(offset, std::span<const std::byte>(buffer).first(length),
                                        top_allocated);
  }
  co_return 0;
}

coro::Task<int> ParallelCopier::write_compressed(std::uint64_t offset,
                                                 std::span<const std::byte> data,
                                                 const std::vector<bool>& top_allocated) {
  // `offset` is a multiple of the chunk size and so of the cluster size.
  const std::uint64_t cluster = options_.compress_cluster_size;
  for (std::uint64_t pos = 0; pos < data.size(); pos += cluster) {
    const std::span<const std::byte> piece =
        data.subspan(pos, std::min<std::uint64_t>(cluster, data.size() - pos));
    int written = 0;
    if (options_.target_has_backing && !top_allocated[pos / cluster]) {
      continue;  // the target's backing file holds it
    } else if (base::is_zero(piece)) {
      // A fresh target reads as zeros there, unless its backing file shows through.
      if (options_.target_has_backing) written = co_await target_->write_zeroes(offset + pos, piece.size());
    } else {
      written = co_await target_->write(offset + pos, piece, block::kWriteCompressed);
    }
    if (written < 0) co_return written;
  }
  co_return 0;
}

coro::Task<int> ParallelCopier::write_sparse(std::uint64_t offset,
                                             std::span<const std::byte> data) {
  const std::uint64_t block = options_.sparse_size;
  if (block == 0) co_return co_await target_->write(offset, data);
  // Walk the buffer in blocks aligned to `block` in the image; write each run of non-zero
  // blocks with one request.
  std::uint64_t pos = 0;
  std::uint64_t run_start = 0;
  bool in_run = false;
  while (pos < data.size()) {
    const std::uint64_t block_end =
        std::min<std::uint64_t>(data.size(), (offset + pos) / block * block + block - offset);
    const bool zero = base::is_zero(data.subspan(pos, block_end - pos));
    if (!zero && !in_run) {
      run_start = pos;
      in_run = true;
    }
    if (zero && in_run) {
      const int written = co_await target_->write(offset + run_start,
                                                  data.subspan(run_start, pos - run_start));
      if (written < 0) co_return written;
      in_run = false;
    }
    pos = block_end;
  }
  if (in_run) {
    const int written = co_await target_->write(offset + run_start, data.subspan(run_start));
    if (written < 0) co_return written;
  }
  co_return 0;
}

}  // namespace spindle::img
