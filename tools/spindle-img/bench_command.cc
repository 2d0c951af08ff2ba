// `spindle-img bench`: qemu-img bench's sequential I/O benchmark. COUNT requests of BUFFER_SIZE
// bytes, at most DEPTH in flight; the first starts at OFFSET, each next one STEP_SIZE further on,
// wrapping modulo the image size. -w writes a buffer filled with the pattern byte, otherwise it
// reads. The output lines and error messages are qemu-img's (reference/qed.md §4.7).
//
// --flush-interval=N (writes only, N >= DEPTH): after a completion that leaves a multiple of N
// requests unsent, flush. By default sending stops until everything in flight has completed,
// then the flush runs and sending resumes; with --no-drain the flush is sent alongside the
// requests. (That is qemu-img's rule, so both tools send the same number of flushes.)
//
// min(DEPTH, COUNT) worker coroutines on the main context share one cursor; all run on one
// thread, so the state needs no locks. Each worker owns a slot of one buffer allocated up front,
// so the measured loop allocates nothing but (pooled) coroutine frames.
#include <cctype>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <span>
#include <string>

#include "aio/context.h"
#include "aio/file_backend.h"
#include "block/cache_mode.h"
#include "commands.h"
#include "coro/block_on.h"
#include "coro/coroutine.h"
#include "coro/event.h"
#include "image_opener.h"
#include "size_parser.h"
#include "tool_failure.h"

namespace spindle::img {

namespace {

// O_DIRECT needs memory aligned to the logical block size; a page covers every device.
constexpr std::size_t kBufferAlignment = 4096;

// qemu_strtoul with base 0 ("0x1f", "017", "31"), limited to [min, max].
std::optional<std::uint64_t> parse_number(const std::string& text, std::uint64_t min,
                                          std::uint64_t max) {
  if (text.empty() || text.front() == '-' || text.front() == '+' || std::isspace(static_cast<unsigned char>(text.front()))) {
    return std::nullopt;
  }
  errno = 0;
  char* end = nullptr;
  const unsigned long long value = std::strtoull(text.c_str(), &end, 0);
  if (errno != 0 || *end != '\0' || value < min || value > max) return std::nullopt;
  return value;
}

std::optional<std::uint64_t> parse_size_in(const std::string& text, std::uint64_t min,
                                           std::uint64_t max) {
  const std::optional<std::uint64_t> value = parse_size(text);
  if (!value || *value < min || *value > max) return std::nullopt;
  return value;
}

struct FreeBuffer {
  void operator()(std::byte* p) const noexcept { std::free(p); }
};

struct BenchPlan {
  bool write = false;
  std::uint64_t count = 0;
  std::uint64_t depth = 0;
  std::uint64_t buffer_size = 0;
  std::uint64_t step = 0;
  std::uint64_t offset = 0;
  std::uint64_t flush_interval = 0;  // 0: never flush
  bool drain_on_flush = true;
  block::CacheMode cache;
};

class BenchRun {
 public:
  BenchRun(std::shared_ptr<block::BlockBackend> backend, const BenchPlan& plan,
           std::byte pattern)
      : backend_(std::move(backend)),
        plan_(plan),
        workers_(std::min(plan.count, plan.depth)),
        slot_size_((plan.buffer_size + kBufferAlignment - 1) / kBufferAlignment *
                   kBufferAlignment),
        image_size_(backend_->size()),
        write_flags_(plan.cache.write_through ? block::kFua : 0u),
        unsent_(plan.count),
        next_offset_(plan.offset),
        gate_(true) {
    const std::size_t bytes = workers_ * slot_size_;
    buffers_.reset(static_cast<std::byte*>(std::aligned_alloc(kBufferAlignment, bytes)));
    if (!buffers_) fail("Could not allocate " + std::to_string(bytes) + " bytes of I/O buffers");
    std::memset(buffers_.get(), std::to_integer<int>(pattern), bytes);
  }

  // Runs every request; returns 0 or the first failure's -errno.
  coro::Task<int> run() {
    aio::Context& context = *aio::current_context();
    running_ = workers_;
    for (std::uint64_t i = 0; i < workers_; ++i) {
      coro::spawn(context, worker(std::span(buffers_.get() + i * slot_size_, plan_.buffer_size)));
    }
    co_await finished_.wait();
    co_return error_;
  }

 private:
  coro::Task<void> worker(std::span<std::byte> buffer) {
    for (;;) {
      while (!gate_.is_set()) co_await gate_.wait();  // a drained flush is pending
      if (unsent_ == 0 || error_ != 0) break;
      const std::uint64_t offset = next_offset_;
      next_offset_ += plan_.step;
      if (image_size_ != 0) next_offset_ %= image_size_;  // size 0: every request fails anyway
      --unsent_;
      ++in_flight_;
      int result;
      if (plan_.write) {
        result = co_await backend_->write(offset, buffer, write_flags_);
      } else {
        result = co_await backend_->read(offset, buffer);
      }
      --in_flight_;
      if (result < 0) {
        if (error_ == 0) error_ = result;
        gate_.set();  // workers waiting for a drain would otherwise wait forever
        break;
      }
      if (plan_.flush_interval != 0 && unsent_ % plan_.flush_interval == 0) {
        if (!plan_.drain_on_flush) {
          ++flushes_in_flight_;
          coro::spawn(*aio::current_context(), background_flush());
        } else {
          gate_.reset();
          if (in_flight_ == 0) {  // the last request of the drain: flush, then reopen
            const int flushed = co_await flush();
            if (flushed < 0 && error_ == 0) error_ = flushed;
            gate_.set();
          }
        }
      }
    }
    --running_;
    finish_if_done();
  }

  coro::Task<int> flush() {
    if (plan_.cache.ignore_flush) co_return 0;
    co_return co_await backend_->flush();
  }

  coro::Task<void> background_flush() {
    const int flushed = co_await flush();
    if (flushed < 0 && error_ == 0) error_ = flushed;
    --flushes_in_flight_;
    finish_if_done();
  }

  void finish_if_done() {
    if (running_ == 0 && flushes_in_flight_ == 0) finished_.set();
  }

  const std::shared_ptr<block::BlockBackend> backend_;
  const BenchPlan plan_;
  const std::uint64_t workers_;
  const std::size_t slot_size_;
  const std::uint64_t image_size_;
  const std::uint32_t write_flags_;
  std::unique_ptr<std::byte, FreeBuffer> buffers_;
  std::uint64_t unsent_;
  std::uint64_t next_offset_;
  std::uint64_t in_flight_ = 0;
  std::uint64_t running_ = 0;
  std::uint64_t flushes_in_flight_ = 0;
  int error_ = 0;
  coro::Event gate_;  // reset while a drained flush waits for the requests in flight
  coro::Event finished_;
};

coro::Task<int> close_image(OpenedImage& image) {
  // Writes back metadata and marks the image clean.
  co_return co_await image.root->close();
}

}  // namespace

int run_bench(const BenchOptions& options) {
  BenchPlan plan;
  plan.write = options.write;
  const auto count = parse_number(options.count, 1, INT_MAX);
  if (!count) fail("Invalid request count specified");
  plan.count = *count;
  const auto depth = parse_number(options.depth, 1, INT_MAX);
  if (!depth) fail("Invalid queue depth specified");
  plan.depth = *depth;
  const auto buffer_size = parse_size_in(options.buffer_size, 1, INT_MAX);
  if (!buffer_size) {
    fail("Invalid buffer size specified. You may use k, M, G, T, P or E suffixes for kilobytes, "
         "megabytes, gigabytes, terabytes, petabytes and exabytes.");
  }
  plan.buffer_size = *buffer_size;
  std::uint64_t step = 0;
  if (!options.step_size.empty()) {
    const auto parsed = parse_size_in(options.step_size, 0, INT_MAX);
    if (!parsed) fail("Invalid step size specified");
    step = *parsed;
  }
  plan.step = step != 0 ? step : plan.buffer_size;  // -S 0 also means "the buffer size"
  const auto offset = parse_size_in(options.offset, 0, INT64_MAX);
  if (!offset) fail("Invalid offset specified");
  plan.offset = *offset;
  const auto pattern = parse_number(options.pattern, 0, 0xff);
  if (!pattern) fail("Invalid pattern byte specified");
  if (!options.flush_interval.empty()) {
    const auto interval = parse_number(options.flush_interval, 0, INT_MAX);
    if (!interval) fail("Invalid flush interval specified");
    plan.flush_interval = *interval;
  }
  plan.drain_on_flush = !options.no_drain;
  if (plan.flush_interval != 0 && !plan.write) {
    fail("--flush-interval is only available in write tests");
  }
  if (plan.flush_interval != 0 && plan.flush_interval < plan.depth) {
    fail("Flush interval can't be smaller than depth");
  }
  const std::optional<block::CacheMode> cache = block::parse_cache_mode(options.cache);
  if (!cache) fail("Invalid cache mode");
  plan.cache = *cache;
  std::string aio_mode = options.aio;
  if (aio_mode.empty() && options.native_aio) aio_mode = "native";
  if (!aio_mode.empty() && aio_mode != "threads" && aio_mode != "native" &&
      aio_mode != "io_uring") {
    fail("Invalid aio option: " + aio_mode);
  }
  if (aio_mode == "native" && !plan.cache.direct) {
    fail("Could not open '" + options.filename +
         "': aio=native was specified, but it requires cache.direct=on, which was not "
         "specified.");
  }
  // Linux AIO ("native") has no counterpart here: io_uring is the kernel's native interface.
  // Without -i the runtime's default stays (SPINDLE_AIO, else io_uring when available).
  if (aio_mode == "threads") aio::set_file_backend(aio::FileBackend::threads);
  if (aio_mode == "native" || aio_mode == "io_uring") {
    aio::set_file_backend(aio::FileBackend::io_uring);
  }
  if (std::strcmp(aio::active_file_backend(), "unavailable") == 0) {
    fail("Could not open '" + options.filename + "': io_uring is not available on this system");
  }

  OpenedImage image = open_image(options.filename, options.format,
                                 ImageOpenOptions{.read_only = !plan.write,
                                                  .with_backing = true,
                                                  .repair_if_dirty = plan.write,
                                                  .cache = {.direct = plan.cache.direct}});

  std::printf("Sending %llu %s requests, %llu bytes each, %llu in parallel (starting at offset "
              "%llu, step size %llu)\n",
              static_cast<unsigned long long>(plan.count), plan.write ? "write" : "read",
              static_cast<unsigned long long>(plan.buffer_size),
              static_cast<unsigned long long>(plan.depth),
              static_cast<unsigned long long>(plan.offset),
              static_cast<unsigned long long>(plan.step));
  if (plan.flush_interval != 0) {
    std::printf("Sending flush every %llu requests\n",
                static_cast<unsigned long long>(plan.flush_interval));
  }
  std::fflush(stdout);

  BenchRun bench(image.backend, plan, static_cast<std::byte>(*pattern));
  const auto start = std::chrono::steady_clock::now();
  const int result = coro::block_on(bench.run());
  const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - start;
  if (result < 0) fail(std::string("Failed request: ") + std::strerror(-result));
  std::printf("Run completed in %.3f seconds.\n", elapsed.count());
  std::fflush(stdout);

  const int closed = coro::block_on(close_image(image));
  if (closed < 0) fail(std::string("Could not close the image: ") + std::strerror(-closed));
  return 0;
}

}  // namespace spindle::img
