// Compression and decompression of qcow2 compressed clusters (docs/interop/qcow2.rst,
// "Compressed Clusters Descriptor"): deflate as a raw stream (no zlib header, window bits 12,
// as QEMU writes it) or zstd (one or more frames; we write one). The stored extent is rounded
// up to whole sectors, so input may carry trailing bytes: decompression stops once `out` is
// full.
//
// Thread-safety: callable from any thread at once; decompression keeps one libdeflate
// decompressor and one zstd context per thread (thread_local), compression makes its own
// stream state per call.
#pragma once

#include <cstddef>
#include <span>

#include "block/formats/qcow2/format.h"

namespace spindle::block::qcow2 {

// Fills `out` (one cluster) from `in`. 0, or -EIO when the data is not a valid stream or ends
// before `out` is full.
int decompress_cluster(CompressionType type, std::span<const std::byte> in,
                       std::span<std::byte> out) noexcept;

// Compresses `in` (one cluster) into `out`. The compressed length, or -ENOSPC when it does
// not fit in `out` (the caller then stores the cluster uncompressed), -ENOMEM when no stream
// state can be made.
int compress_cluster(CompressionType type, std::span<const std::byte> in,
                     std::span<std::byte> out) noexcept;

}  // namespace spindle::block::qcow2
