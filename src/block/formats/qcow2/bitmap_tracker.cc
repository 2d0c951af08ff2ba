#include "block/formats/qcow2/bitmap_tracker.h"

namespace spindle::block::qcow2 {

void BitmapTracker::add(std::string name, std::uint64_t granularity, std::uint64_t image_size,
                        const std::vector<std::uint8_t>& bits) {
  Tracked t;
  t.name = std::move(name);
  while ((std::uint64_t{1} << t.granularity_bits) < granularity) ++t.granularity_bits;
  while (t.granularity_bits > 0 && (std::uint64_t{1} << t.granularity_bits) > granularity) {
    --t.granularity_bits;
  }
  t.bit_count = (image_size >> t.granularity_bits) +
                ((image_size & ((std::uint64_t{1} << t.granularity_bits) - 1)) != 0);
  t.byte_count = (t.bit_count + 7) / 8;
  t.word_count = (t.bit_count + 63) / 64;
  t.words = std::make_unique<std::atomic<std::uint64_t>[]>(t.word_count);
  for (std::uint64_t w = 0; w < t.word_count; ++w) {
    std::uint64_t value = 0;
    for (std::uint64_t b = 0; b < 8; ++b) {
      const std::uint64_t at = w * 8 + b;
      if (at < bits.size() && at < t.byte_count) value |= std::uint64_t{bits[at]} << (8 * b);
    }
    t.words[w].store(value, std::memory_order_relaxed);
  }
  bitmaps_.push_back(std::move(t));
}

void BitmapTracker::mark(std::uint64_t offset, std::uint64_t bytes) noexcept {
  if (bytes == 0) return;
  for (Tracked& t : bitmaps_) {
    const std::uint64_t first = offset >> t.granularity_bits;
    std::uint64_t last = (offset + bytes - 1) >> t.granularity_bits;
    if (first >= t.bit_count) continue;
    if (last >= t.bit_count) last = t.bit_count - 1;
    for (std::uint64_t w = first / 64; w <= last / 64; ++w) {
      const std::uint64_t lo = w == first / 64 ? first % 64 : 0;
      const std::uint64_t hi = w == last / 64 ? last % 64 : 63;
      const std::uint64_t mask =
          (hi == 63 ? ~std::uint64_t{0} : ((std::uint64_t{1} << (hi + 1)) - 1)) &
          ~((std::uint64_t{1} << lo) - 1);
      if ((t.words[w].load(std::memory_order_relaxed) & mask) != mask) {
        t.words[w].fetch_or(mask, std::memory_order_relaxed);
      }
    }
  }
}

std::vector<std::uint8_t> BitmapTracker::serialize(std::size_t i) const {
  const Tracked& t = bitmaps_[i];
  std::vector<std::uint8_t> out(t.byte_count, 0);
  for (std::uint64_t at = 0; at < t.byte_count; ++at) {
    const std::uint64_t word = t.words[at / 8].load(std::memory_order_relaxed);
    out[at] = static_cast<std::uint8_t>(word >> (8 * (at % 8)));
  }
  return out;
}

}  // namespace spindle::block::qcow2
