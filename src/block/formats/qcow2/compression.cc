#include "block/formats/qcow2/compression.h"

#include <libdeflate.h>
#include <zlib.h>
#include <zstd.h>
#include <zstd_errors.h>

#include <cerrno>
#include <memory>

namespace spindle::block::qcow2 {

namespace {

// zlib's inflate, for the streams libdeflate does not take: one that goes on past the cluster
// (qemu accepts it and keeps the cluster's worth) and every invalid one (for the verdict).
int inflate_raw(std::span<const std::byte> in, std::span<std::byte> out) noexcept {
  z_stream stream{};
  if (inflateInit2(&stream, -12) != Z_OK) return -EIO;
  stream.next_in = reinterpret_cast<Bytef*>(const_cast<std::byte*>(in.data()));
  stream.avail_in = static_cast<uInt>(in.size());
  stream.next_out = reinterpret_cast<Bytef*>(out.data());
  stream.avail_out = static_cast<uInt>(out.size());
  const int status = inflate(&stream, Z_FINISH);
  const bool full = stream.avail_out == 0;
  inflateEnd(&stream);
  // Z_BUF_ERROR with a full output: the stream goes on past the cluster (trailing bytes).
  if ((status == Z_STREAM_END || status == Z_BUF_ERROR || status == Z_OK) && full) return 0;
  return -EIO;
}

// libdeflate inflates a cluster 2-3x faster than zlib (docs/benchmarks.md, "Compressed
// reads"); it takes only a stream that fills the cluster exactly, which is what qemu-img and
// spindle-img write. One decompressor per thread (they are not thread-safe, and making one
// costs tens of kilobytes), freed when the thread ends.
struct DecompressorDeleter {
  void operator()(libdeflate_decompressor* d) const noexcept { libdeflate_free_decompressor(d); }
};

int inflate_cluster(std::span<const std::byte> in, std::span<std::byte> out) noexcept {
  thread_local std::unique_ptr<libdeflate_decompressor, DecompressorDeleter> decompressor;
  if (!decompressor) decompressor.reset(libdeflate_alloc_decompressor());  // (again if it failed)
  if (decompressor &&
      libdeflate_deflate_decompress(decompressor.get(), in.data(), in.size(), out.data(),
                                    out.size(), nullptr) == LIBDEFLATE_SUCCESS) {
    return 0;
  }
  return inflate_raw(in, out);
}

struct DecompressionContextDeleter {
  void operator()(ZSTD_DCtx* context) const noexcept { ZSTD_freeDCtx(context); }
};

int zstd_stream(std::span<const std::byte> in, std::span<std::byte> out) noexcept {
  // One context per thread, as for deflate; reset before each cluster.
  thread_local std::unique_ptr<ZSTD_DCtx, DecompressionContextDeleter> kept;
  if (!kept) kept.reset(ZSTD_createDCtx());  // (again if it failed)
  ZSTD_DCtx* context = kept.get();
  if (context == nullptr) return -ENOMEM;
  ZSTD_DCtx_reset(context, ZSTD_reset_session_only);
  ZSTD_inBuffer input{in.data(), in.size(), 0};
  ZSTD_outBuffer output{out.data(), out.size(), 0};
  int result = 0;
  while (output.pos < output.size) {
    const std::size_t status = ZSTD_decompressStream(context, &output, &input);
    if (ZSTD_isError(status)) {
      result = -EIO;
      break;
    }
    // The input ran out before the cluster was full (output is drained as far as room
    // allows, so nothing more can come).
    if (input.pos == input.size && output.pos < output.size) {
      result = -EIO;
      break;
    }
  }
  return result;
}

int deflate_raw(std::span<const std::byte> in, std::span<std::byte> out) noexcept {
  z_stream stream{};
  if (deflateInit2(&stream, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY) !=
      Z_OK) {
    return -ENOMEM;
  }
  stream.next_in = reinterpret_cast<Bytef*>(const_cast<std::byte*>(in.data()));
  stream.avail_in = static_cast<uInt>(in.size());
  stream.next_out = reinterpret_cast<Bytef*>(out.data());
  stream.avail_out = static_cast<uInt>(out.size());
  const int status = deflate(&stream, Z_FINISH);
  const std::size_t length = out.size() - stream.avail_out;
  deflateEnd(&stream);
  // Anything but a finished stream means the output ran out first.
  return status == Z_STREAM_END ? static_cast<int>(length) : -ENOSPC;
}

int zstd_compress(std::span<const std::byte> in, std::span<std::byte> out) noexcept {
  ZSTD_CCtx* context = ZSTD_createCCtx();
  if (context == nullptr) return -ENOMEM;
  const std::size_t length = ZSTD_compress2(context, out.data(), out.size(), in.data(), in.size());
  ZSTD_freeCCtx(context);
  if (ZSTD_isError(length)) {
    return ZSTD_getErrorCode(length) == ZSTD_error_memory_allocation ? -ENOMEM : -ENOSPC;
  }
  return static_cast<int>(length);
}

}  // namespace

int compress_cluster(CompressionType type, std::span<const std::byte> in,
                     std::span<std::byte> out) noexcept {
  switch (type) {
    case CompressionType::kDeflate:
      return deflate_raw(in, out);
    case CompressionType::kZstd:
      return zstd_compress(in, out);
  }
  return -EINVAL;
}

int decompress_cluster(CompressionType type, std::span<const std::byte> in,
                       std::span<std::byte> out) noexcept {
  switch (type) {
    case CompressionType::kDeflate:
      return inflate_cluster(in, out);
    case CompressionType::kZstd:
      return zstd_stream(in, out);
  }
  return -EIO;
}

}  // namespace spindle::block::qcow2
