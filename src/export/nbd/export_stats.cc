#include "export/nbd/export_stats.h"

#include <fmt/format.h>

#include <bit>

namespace spindle::exports::nbd {

void ExportStats::record(Kind kind, std::uint64_t bytes, std::int64_t latency_ns,
                         bool failed) noexcept {
  requests_.fetch_add(1, std::memory_order_relaxed);
  if (failed) errors_.fetch_add(1, std::memory_order_relaxed);
  if (kind == Kind::read) bytes_read_.fetch_add(bytes, std::memory_order_relaxed);
  if (kind == Kind::write) bytes_written_.fetch_add(bytes, std::memory_order_relaxed);
  const auto micros = static_cast<std::uint64_t>(latency_ns > 0 ? latency_ns / 1000 : 0);
  const int bucket = std::min(kBuckets - 1, static_cast<int>(std::bit_width(micros)));
  latency_buckets_[static_cast<std::size_t>(bucket)].fetch_add(1, std::memory_order_relaxed);
  std::int64_t seen = max_latency_ns_.load(std::memory_order_relaxed);
  while (latency_ns > seen &&
         !max_latency_ns_.compare_exchange_weak(seen, latency_ns, std::memory_order_relaxed)) {
  }
}

std::string ExportStats::report() const {
  std::array<std::uint64_t, kBuckets> counts;
  std::uint64_t total = 0;
  for (int i = 0; i < kBuckets; ++i) {
    counts[static_cast<std::size_t>(i)] =
        latency_buckets_[static_cast<std::size_t>(i)].load(std::memory_order_relaxed);
    total += counts[static_cast<std::size_t>(i)];
  }
  // The upper bound of the bucket holding the given fraction of requests.
  auto percentile = [&](double fraction) -> std::uint64_t {
    if (total == 0) return 0;
    const auto target = static_cast<std::uint64_t>(fraction * static_cast<double>(total));
    std::uint64_t seen = 0;
    for (int i = 0; i < kBuckets; ++i) {
      seen += counts[static_cast<std::size_t>(i)];
      if (seen > target) return std::uint64_t{1} << i;
    }
    return std::uint64_t{1} << (kBuckets - 1);
  };
  return fmt::format(
      "requests={} read={} written={} errors={} latency_us(p50<={} p90<={} p99<={} max={})",
      requests_.load(), bytes_read_.load(), bytes_written_.load(), errors_.load(),
      percentile(0.5), percentile(0.9), percentile(0.99), max_latency_ns_.load() / 1000);
}

}  // namespace spindle::exports::nbd
