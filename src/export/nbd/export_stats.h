// ExportStats: live counters for one export — requests, bytes, errors and a latency histogram
// with power-of-two microsecond buckets, from which percentiles are estimated.
//
// Thread-safety: record() from any thread (relaxed atomics: each counter is exact, a report
// taken while requests complete may mix slightly different moments); report() from any thread.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <string>

namespace spindle::exports::nbd {

class ExportStats {
 public:
  enum class Kind { read, write, other };
  void record(Kind kind, std::uint64_t bytes, std::int64_t latency_ns, bool failed) noexcept;
  // One line: "requests=N read=B written=B errors=E p50=.. p90=.. p99=.. max=.. us".
  std::string report() const;
  std::uint64_t requests() const noexcept { return requests_.load(std::memory_order_relaxed); }

 private:
  static constexpr int kBuckets = 32;  // bucket i: latency < 2^i microseconds
  std::atomic<std::uint64_t> requests_{0}, bytes_read_{0}, bytes_written_{0}, errors_{0};
  std::atomic<std::int64_t> max_latency_ns_{0};
  std::array<std::atomic<std::uint64_t>, kBuckets> latency_buckets_{};
};

}  // namespace spindle::exports::nbd
