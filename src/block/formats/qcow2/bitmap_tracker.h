// BitmapTracker: the in-memory bits of a writable qcow2 image's enabled ("auto") persistent
// dirty bitmaps while guest writes change the image (qcow2_node.h, "Persistent bitmaps").
// Each bitmap's bits live in 64-bit words; bit i of word w is bitmap bit 64 * w + i, which
// is byte 8 * w + i / 8, bit i % 8 in qcow2's serialization (bitmap_directory.h).
//
// Thread-safety: build it (add()) before publishing it to other threads (the node publishes
// it with a release store of its state); after that the list is immutable and mark() may be
// called from any thread at once: it sets bits with relaxed atomic fetch_or, so concurrent
// writers never lose each other's bits. serialize() is for when no mark() runs (close, with
// no request in flight); a bit set by a mark() that finished before it is always included.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace spindle::block::qcow2 {

class BitmapTracker {
 public:
  // Adds a bitmap of `granularity` bytes per bit over `image_size` bytes, starting with
  // `bits` (serialized; shorter input reads as zeros).
  void add(std::string name, std::uint64_t granularity, std::uint64_t image_size,
           const std::vector<std::uint8_t>& bits);
  // Sets, in every bitmap, the bits covering guest bytes [offset, offset + bytes).
  void mark(std::uint64_t offset, std::uint64_t bytes) noexcept;
  std::size_t count() const noexcept { return bitmaps_.size(); }
  const std::string& name(std::size_t i) const noexcept { return bitmaps_[i].name; }
  // Bitmap i's bits in qcow2's serialization (its data bytes, whole).
  std::vector<std::uint8_t> serialize(std::size_t i) const;

 private:
  struct Tracked {
    std::string name;
    std::uint32_t granularity_bits = 16;
    std::uint64_t bit_count = 0;
    std::uint64_t byte_count = 0;
    std::unique_ptr<std::atomic<std::uint64_t>[]> words;
    std::uint64_t word_count = 0;
  };
  std::vector<Tracked> bitmaps_;
};

}  // namespace spindle::block::qcow2
