// Spindle I/O-path micro-benchmarks: coroutine locks, the per-context thread pool, file reads
// and socket channels, each next to the baseline named in its row, in one binary (same compiler,
// flags and machine state). IoThreads use their default busy-poll window (32 us, QEMU's
// IOThread default; SPINDLE_BENCH_POLL_NS=<ns> sets another maximum, 0 turns polling off).
// Rows:
//  1. Mutex — lock + increment + unlock per op, the loop of tests/coro/mutex_test.cc:
//       Mutex/<N>Contexts/<Lock>: N IoThreads (2 and 5), one coroutine each, looping until a
//         stop flag; ops/s of all contexts together over the timed slices of 20 ms. Locks:
//         CoroMutex (co_await lock()), CoroMutexSpin1000 (set_spin_limit(1000), QEMU's bounded
//         spin), StdMutex and McsLock (tests/support/mcs_lock.h, a fair futex MCS lock); the
//         last two block the IoThread while they wait. Ratios against std::mutex and MCS.
//       Mutex/Uncontended/<Lock>: one thread, no contention, wall ns per op. CoroMutex runs the
//         loop in a coroutine on the main context (block_on, 1000 ops per call); StdMutex and
//         McsLock run the same loop on the benchmark thread.
//  2. ThreadPool — co_await coro::run_blocking(pool, [] { return 0; }) on the IoThread
//     context's thread_pool():
//       ThreadPool/RoundTrip/1Coroutine: one coroutine, one job at a time; wall ns per round
//         trip (submit, a worker runs it, the completion resumes the coroutine at home).
//       ThreadPool/Throughput/32Coroutines: 32 coroutines on one IoThread doing the same
//         concurrently; ops/s. Both also show process CPU ns per op.
//  3. FileRead4K — random 4 KiB preads, 4 KiB-aligned offsets from a fixed-seed PRNG, of a
//     page-cached file (1 GiB under /tmp, or SPINDLE_BENCH_FILE_MB; written with non-zero data,
//     synced and read once at first use, unlinked at once so it goes with the process), from
//     one IoThread at queue depth 1 and 32 (that many coroutines with one read in flight each):
//       FileRead4K/IoUring/QD<n>: FileBackend::io_uring, then coro::pread.
//       FileRead4K/Threads/QD<n>: FileBackend::threads (the context's thread pool), coro::pread.
//       FileRead4K/PreadLoop: plain ::pread in a loop on the benchmark thread. It has no queue
//         depth: the same row is the baseline of both QD1 and QD32.
//     IOPS (wall) and process CPU ns per read (CLOCK_PROCESS_CPUTIME_ID: the IoThread, pool
//     workers and the benchmark thread together). Goal: io_uring at QD32 >= the pread loop.
//  4. Echo — round trips over a Unix stream socket, 64 B and 64 KiB messages: the client writes
//     a message and reads the echo, then repeats; wall ns per round trip and MB/s (10^6 bytes
//     of message per second, each message counted once).
//       Echo/<size>/Spindle: io::Listener::unix_socket + io::connect_unix; the server's echo
//         coroutine (read_exact + write_all) on one IoThread, the client's on another.
//       Echo/<size>/Asio: asio::local::stream_protocol acceptor/socket, server and client
//         coroutines each on its own io_context thread running io_context::run(), async_read +
//         async_write of the same sizes. Ratio = Asio / Spindle (> 1: Spindle is faster).
//
// Run:   build/bench/spindle-io-bench                       about 30 s on the 2-core VM
//        SPINDLE_BENCH_FILE_MB=64 build/bench/spindle-io-bench   smaller file: quicker set-up
//        ... --benchmark_filter=Echo                         a subset (regex, case-sensitive)
//        ... --benchmark_min_time=0.05                       quicker, noisier
//        ... --benchmark_repetitions=3                       the summary then uses the means
// Google Benchmark flags pass through. Without --benchmark_min_time (or BENCHMARK_MIN_TIME in
// the environment) every row runs for at least 0.5 s. Summary tables follow the console output.
// Every benchmark verifies that it did the work it claims (counters agree, every read returned
// 4096 bytes of the right block, every echo came back intact); the exit status is 1 if one of
// those checks failed.
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <fmt/core.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <system_error>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "aio/context.h"
#include "aio/file_backend.h"
#include "aio/io_thread.h"
#include "aio/thread_pool.h"
#include "asio_support.h"
#include "coro/block_on.h"
#include "coro/coroutine.h"
#include "coro/file_io.h"
#include "coro/mutex.h"
#include "coro/run_blocking.h"
#include "coro/task.h"
#include "io/channel.h"
#include "io/socket.h"
#include "summary_table.h"
#include "support/counter_loop.h"
#include "support/mcs_lock.h"

namespace {

namespace aio = spindle::aio;
namespace coro = spindle::coro;
namespace io = spindle::io;
using namespace std::chrono_literals;
using spindle::bench::add;
using spindle::bench::AsioExecutor;
using spindle::bench::AsioTask;
using spindle::bench::AsioThread;
using spindle::bench::check;
using spindle::bench::kUseAwaitable;
using spindle::testing_support::McsLock;
using SteadyClock = std::chrono::steady_clock;

constexpr auto kMutexSlice = 20ms;
constexpr int kUncontendedOpsPerCall = 1000;
constexpr unsigned kQemuSpinLimit = 1000;
constexpr int kPoolRoundTripsPerIteration = 256;
constexpr int kPoolCoroutines = 32;
constexpr int kPoolRoundTripsPerCoroutine = 32;
constexpr std::size_t kBlockSize = 4096;
constexpr int kReadsPerIteration = 4096;
constexpr std::size_t kRandomBlockCount = 1 << 16;  // offsets cycled through by every variant
constexpr std::uint64_t kRandomSeed = 0x5EED'0F'F5E7;
constexpr std::size_t kDefaultFileMiB = 1024;
constexpr std::size_t kSmallMessage = 64;
constexpr std::size_t kLargeMessage = 64 * 1024;
constexpr int kSmallRoundTripsPerIteration = 500;
constexpr int kLargeRoundTripsPerIteration = 50;

constexpr const char* kOpsPerSecond = "ops_per_s";
constexpr const char* kCpuNsPerOp = "cpu_ns_per_op";

// ---- helpers ------------------------------------------------------------------------------

// IoThreads busy-poll up to 32 us by default; SPINDLE_BENCH_POLL_NS=<ns> changes the maximum
// (0 turns polling off) to show what polling costs or saves in each row.
aio::Context::PollParams io_thread_poll_params() {
  static const aio::Context::PollParams params = [] {
    aio::Context::PollParams chosen = aio::IoThread::kDefaultPollParams;
    if (const char* value = std::getenv("SPINDLE_BENCH_POLL_NS")) {
      chosen.max_ns = std::strtoll(value, nullptr, 10);
    }
    return chosen;
  }();
  return params;
}

double seconds_since(SteadyClock::time_point start) {
  return std::chrono::duration<double>(SteadyClock::now() - start).count();
}

// CPU time of the whole process (every thread), so that work moved to IoThreads and pool
// workers is counted; reported as the counter cpu_ns_per_op.
class ProcessCpuMeter {
 public:
  ProcessCpuMeter() : start_ns_(now_ns()) {}
  void report(benchmark::State& state, double operations) const {
    state.counters[kCpuNsPerOp] = static_cast<double>(now_ns() - start_ns_) / operations;
  }

 private:
  static std::int64_t now_ns() {
    timespec ts;
    ::clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return std::int64_t{ts.tv_sec} * 1'000'000'000 + ts.tv_nsec;
  }
  std::int64_t start_ns_;
};

// Waits for `count` events signalled from other threads. count_down() notifies under the lock,
// so the waiter cannot return (and free this) while a signaller still touches it.
class Countdown {
 public:
  explicit Countdown(int count) : remaining_(count) {}
  void count_down() {
    std::lock_guard lock(mutex_);
    if (--remaining_ == 0) finished_.notify_all();
  }
  void wait() {
    std::unique_lock lock(mutex_);
    finished_.wait(lock, [this] { return remaining_ == 0; });
  }

 private:
  std::mutex mutex_;
  std::condition_variable finished_;
  int remaining_;
};

coro::Task<void> count_down_after(coro::Task<void> task, Countdown& finished) {
  co_await std::move(task);
  finished.count_down();
}

// Starts make_task(0) ... make_task(count - 1) as coroutines on `context` and waits for all.
template <typename MakeTask>
void run_concurrently(aio::Context& context, int count, MakeTask make_task) {
  Countdown finished(count);
  for (int i = 0; i < count; ++i) coro::spawn(context, count_down_after(make_task(i), finished));
  finished.wait();
}

// Destroys `object` in the thread of the context that runs this coroutine (channels must be
// destroyed in the thread of the context they are attached to).
template <typename T>
coro::Task<void> destroy_here(std::unique_ptr<T> object) {
  object.reset();
  co_return;
}

// ---- 1. mutex -----------------------------------------------------------------------------

// The QEMU mutex loop, shared with tests/coro/mutex_test.cc.
using spindle::testing_support::CounterLoop;

template <typename Lock>
void mutex_throughput(benchmark::State& state, int contexts, unsigned spin_limit) {
  CounterLoop<Lock> loop;
  if constexpr (std::is_same_v<Lock, coro::Mutex>) loop.lock.set_spin_limit(spin_limit);
  std::vector<std::unique_ptr<aio::IoThread>> threads;
  for (int i = 0; i < contexts; ++i) {
    threads.push_back(std::make_unique<aio::IoThread>(fmt::format("bench-mutex-{}", i),
                                                      io_thread_poll_params()));
  }
  loop.running = contexts;
  for (auto& thread : threads) coro::spawn(thread->context(), loop.body(thread->thread_id()));
  while (loop.started.load() < contexts) std::this_thread::sleep_for(100us);

  const long ops_before = loop.atomic_counter.load();
  const auto start = SteadyClock::now();
  for (auto _ : state) std::this_thread::sleep_for(kMutexSlice);
  const long ops = loop.atomic_counter.load() - ops_before;
  const double seconds = seconds_since(start);

  loop.stopping = true;
  while (loop.running.load() > 0) std::this_thread::sleep_for(1ms);
  threads.clear();  // every coroutine has finished; the mutex is free before it goes away
  state.counters[kOpsPerSecond] = static_cast<double>(ops) / seconds;
  check(state, loop.counter == loop.atomic_counter.load(), "counter != atomic_counter");
  check(state, loop.wrong_thread.load() == 0, "a waiter resumed outside its home thread");
  check(state, ops > 0, "no progress");
}

coro::Task<void> lock_unlock_loop(coro::Mutex& mutex, long& counter, int count) {
  for (int i = 0; i < count; ++i) {
    co_await mutex.lock();
    ++counter;
    mutex.unlock();
  }
}

void coro_mutex_uncontended(benchmark::State& state) {
  coro::Mutex mutex;
  long counter = 0;
  // block_on() on the main thread polls main_context(); 1000 ops per call hide its cost.
  for (auto _ : state) coro::block_on(lock_unlock_loop(mutex, counter, kUncontendedOpsPerCall));
  check(state, counter == state.iterations() * kUncontendedOpsPerCall, "lost increments");
  check(state, !mutex.is_locked(), "left locked");
}

template <typename Lock>
void thread_lock_uncontended(benchmark::State& state) {
  Lock lock;
  long counter = 0;
  for (auto _ : state) {
    for (int i = 0; i < kUncontendedOpsPerCall; ++i) {
      lock.lock();
      ++counter;
      lock.unlock();
    }
  }
  benchmark::DoNotOptimize(counter);
  check(state, counter == state.iterations() * kUncontendedOpsPerCall, "lost increments");
}

// ---- 2. thread pool -----------------------------------------------------------------------

// `count` sequential round trips through the current context's pool; returns how many jobs
// came back with the right result.
coro::Task<long> pool_round_trips(int count) {
  aio::ThreadPool& pool = aio::current_context()->thread_pool();
  long correct = 0;
  for (int i = 0; i < count; ++i) {
    const int result = co_await coro::run_blocking(pool, [] { return 0; });
    if (result == 0) ++correct;
  }
  co_return correct;
}

void pool_round_trip_latency(benchmark::State& state) {
  aio::IoThread io_thread("bench-pool", io_thread_poll_params());
  // Untimed: creates the pool and starts its first worker.
  long correct = coro::block_on(io_thread.context(), pool_round_trips(kPoolRoundTripsPerIteration));
  const ProcessCpuMeter cpu;
  for (auto _ : state) {
    correct += coro::block_on(io_thread.context(), pool_round_trips(kPoolRoundTripsPerIteration));
  }
  cpu.report(state, static_cast<double>(state.iterations() * kPoolRoundTripsPerIteration));
  check(state, correct == (state.iterations() + 1) * kPoolRoundTripsPerIteration,
        "a job was lost or returned the wrong result");
}  // ~IoThread stops the loop; ~Context then waits for the pool's workers to exit

coro::Task<void> add_pool_round_trips(int count, long& correct) {
  correct += co_await pool_round_trips(count);  // every adder runs on the same IoThread
}

void pool_throughput(benchmark::State& state) {
  aio::IoThread io_thread("bench-pool", io_thread_poll_params());
  long correct = 0;
  auto one_batch = [&] {
    run_concurrently(io_thread.context(), kPoolCoroutines, [&](int) {
      return add_pool_round_trips(kPoolRoundTripsPerCoroutine, correct);
    });
  };
  one_batch();  // untimed: starts the workers
  const ProcessCpuMeter cpu;
  for (auto _ : state) one_batch();
  constexpr long kPerBatch = long{kPoolCoroutines} * kPoolRoundTripsPerCoroutine;
  cpu.report(state, static_cast<double>(state.iterations() * kPerBatch));
  check(state, correct == (state.iterations() + 1) * kPerBatch,
        "a job was lost or returned the wrong result");
}

// ---- 3. random 4 KiB file reads -----------------------------------------------------------

std::uint64_t splitmix64(std::uint64_t& state) {
  std::uint64_t z = (state += 0x9E3779B97F4A7C15);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EB;
  return z ^ (z >> 31);
}

// The page-cached file of row 3, created at first use. Every 4 KiB block starts with its index
// + 1 (so a read can prove it got the right block) and is otherwise 0x5A. The name is unlinked
// as soon as the file is open: it disappears with the process, however that ends.
class TestFile {
 public:
  static const TestFile& get() {
    static const TestFile file;
    return file;
  }
  ~TestFile() {
    if (fd_ >= 0) ::close(fd_);
  }
  TestFile(const TestFile&) = delete;
  TestFile& operator=(const TestFile&) = delete;

  bool ok() const noexcept { return error_.empty(); }
  const std::string& error() const noexcept { return error_; }
  int fd() const noexcept { return fd_; }
  std::size_t mebibytes() const noexcept { return blocks_ * kBlockSize >> 20; }
  // The i-th block of the fixed random sequence (cycled).
  std::uint64_t random_block(std::size_t i) const noexcept {
    return random_blocks_[i % random_blocks_.size()];
  }

  static bool holds_block(const char* buffer, ssize_t bytes, std::uint64_t block) noexcept {
    std::uint64_t stamp;
    std::memcpy(&stamp, buffer, sizeof stamp);
    return bytes == static_cast<ssize_t>(kBlockSize) && stamp == block + 1;
  }

 private:
  TestFile() {
    std::size_t mebibytes = kDefaultFileMiB;
    if (const char* value = std::getenv("SPINDLE_BENCH_FILE_MB")) {
      mebibytes = std::strtoul(value, nullptr, 10);
      if (mebibytes == 0) {
        error_ = "SPINDLE_BENCH_FILE_MB must be a positive number of MiB";
        return;
      }
    }
    blocks_ = mebibytes << 20 >> 12;
    const std::string path = fmt::format("/tmp/spindle-io-bench-{}.dat", ::getpid());
    fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd_ < 0) {
      error_ = fmt::format("open {}: {}", path, std::strerror(errno));
      return;
    }
    ::unlink(path.c_str());
    fmt::print(stderr, "io-bench: writing, syncing and reading a {} MiB file under /tmp...\n",
               mebibytes);
    const auto start = SteadyClock::now();
    if (!fill() || !read_back()) return;
    fmt::print(stderr, "io-bench: test file ready in {:.1f} s\n", seconds_since(start));
    std::uint64_t seed = kRandomSeed;
    random_blocks_.resize(kRandomBlockCount);
    for (auto& block : random_blocks_) block = splitmix64(seed) % blocks_;
  }

  bool fill() {
    constexpr std::size_t kChunk = 1 << 20;
    std::vector<char> chunk(kChunk, 0x5A);
    for (std::uint64_t first = 0; first < blocks_; first += kChunk / kBlockSize) {
      for (std::size_t b = 0; b < kChunk / kBlockSize; ++b) {
        const std::uint64_t stamp = first + b + 1;
        std::memcpy(&chunk[b * kBlockSize], &stamp, sizeof stamp);
      }
      if (::pwrite(fd_, chunk.data(), kChunk, static_cast<off_t>(first * kBlockSize)) !=
          static_cast<ssize_t>(kChunk)) {
        error_ = fmt::format("writing the test file: {}", std::strerror(errno));
        return false;
      }
    }
    // Write back now, so that the kernel does not do it in the middle of a measurement.
    if (::fdatasync(fd_) < 0) {
      error_ = fmt::format("fdatasync of the test file: {}", std::strerror(errno));
      return false;
    }
    return true;
  }

  bool read_back() {  // puts (keeps) every page in the page cache, and checks the content
    constexpr std::size_t kChunk = 1 << 20;
    std::vector<char> chunk(kChunk);
    for (std::uint64_t first = 0; first < blocks_; first += kChunk / kBlockSize) {
      const ssize_t n = ::pread(fd_, chunk.data(), kChunk, static_cast<off_t>(first * kBlockSize));
      if (n != static_cast<ssize_t>(kChunk) ||
          !holds_block(chunk.data(), static_cast<ssize_t>(kBlockSize), first)) {
        error_ = "reading the test file back failed";
        return false;
      }
    }
    return true;
  }

  int fd_ = -1;
  std::uint64_t blocks_ = 0;
  std::vector<std::uint64_t> random_blocks_;
  std::string error_;
};

struct ReadTally {
  long good = 0;
  long bad = 0;
};

// Reads blocks first, first + stride, ... of the random sequence, one at a time.
coro::Task<void> read_random_blocks(const TestFile& file, char* buffer, std::size_t first,
                                    std::size_t stride, int count, ReadTally& tally) {
  for (int i = 0; i < count; ++i) {
    const std::uint64_t block = file.random_block(first + static_cast<std::size_t>(i) * stride);
    const ssize_t bytes = co_await spindle::coro::pread(file.fd(), buffer, kBlockSize,
                                                        static_cast<off_t>(block * kBlockSize));
    ++(TestFile::holds_block(buffer, bytes, block) ? tally.good : tally.bad);
  }
}

coro::Task<std::string> active_file_backend_name() { co_return aio::active_file_backend(); }

void spindle_random_reads(benchmark::State& state, aio::FileBackend backend, int queue_depth) {
  const TestFile& file = TestFile::get();
  if (!file.ok()) return state.SkipWithError(file.error().c_str());
  // Process-wide; every pread below chooses its backend when it starts.
  aio::set_file_backend(backend);
  {
    aio::IoThread io_thread("bench-file", io_thread_poll_params());
    const char* expected = backend == aio::FileBackend::io_uring ? "io_uring" : "threads";
    if (coro::block_on(io_thread.context(), active_file_backend_name()) != expected) {
      state.SkipWithError("the requested file backend is not available");
    } else {
      std::vector<char> buffers(static_cast<std::size_t>(queue_depth) * kBlockSize);
      ReadTally tally;  // updated only in the IoThread, read after run_concurrently() returns
      std::size_t next = 0;
      auto one_batch = [&] {
        run_concurrently(io_thread.context(), queue_depth, [&](int slot) {
          return read_random_blocks(file, &buffers[static_cast<std::size_t>(slot) * kBlockSize],
                                    next + static_cast<std::size_t>(slot),
                                    static_cast<std::size_t>(queue_depth),
                                    kReadsPerIteration / queue_depth, tally);
        });
        next += kReadsPerIteration;
      };
      one_batch();  // untimed: sets up the ring, or starts the pool's workers
      const ProcessCpuMeter cpu;
      for (auto _ : state) one_batch();
      cpu.report(state, static_cast<double>(state.iterations() * kReadsPerIteration));
      check(state, tally.bad == 0, "a read returned short, failed or read the wrong block");
      check(state, tally.good == (state.iterations() + 1) * kReadsPerIteration,
            "read count mismatch");
    }
  }  // the IoThread stops before the backend goes back to the default
  aio::set_file_backend(aio::FileBackend::automatic);
}

void pread_loop(benchmark::State& state) {
  const TestFile& file = TestFile::get();
  if (!file.ok()) return state.SkipWithError(file.error().c_str());
  std::vector<char> buffer(kBlockSize);
  ReadTally tally;
  std::size_t next = 0;
  const ProcessCpuMeter cpu;
  for (auto _ : state) {
    for (int i = 0; i < kReadsPerIteration; ++i) {
      const std::uint64_t block = file.random_block(next++);
      const ssize_t bytes =
          ::pread(file.fd(), buffer.data(), kBlockSize, static_cast<off_t>(block * kBlockSize));
      ++(TestFile::holds_block(buffer.data(), bytes, block) ? tally.good : tally.bad);
    }
  }
  cpu.report(state, static_cast<double>(state.iterations() * kReadsPerIteration));
  check(state, tally.bad == 0, "a read returned short, failed or read the wrong block");
  check(state, tally.good == state.iterations() * kReadsPerIteration, "read count mismatch");
}

// ---- 4. echo over a Unix socket -----------------------------------------------------------

std::string socket_path(const char* who) {
  return fmt::format("/tmp/spindle-io-bench-{}-{}.sock", ::getpid(), who);
}

// The client's message and the reply buffer. Each round trip stamps a new sequence number into
// the first and last 8 bytes; the check compares the stamps every time and all bytes for
// messages up to 4 KiB and on every 16th round trip (a full compare of 64 KiB would cost a
// noticeable share of the round trip, the same for both sides).
class EchoMessage {
 public:
  explicit EchoMessage(std::size_t size) : message_(size), reply_(size) {
    for (std::size_t i = 0; i < size; ++i) message_[i] = static_cast<char>(i * 131 + 7);
  }
  void next_round_trip() {
    ++sequence_;
    std::memcpy(message_.data(), &sequence_, sizeof sequence_);
    std::memcpy(message_.data() + message_.size() - sizeof sequence_, &sequence_,
                sizeof sequence_);
  }
  bool reply_intact() const {
    if (message_.size() <= 4096 || sequence_ % 16 == 0) return reply_ == message_;
    const std::size_t tail = message_.size() - sizeof sequence_;
    return std::memcmp(reply_.data(), message_.data(), sizeof sequence_) == 0 &&
           std::memcmp(reply_.data() + tail, message_.data() + tail, sizeof sequence_) == 0;
  }
  std::span<const char> message() const { return message_; }
  std::span<char> reply() { return reply_; }
  std::size_t size() const { return message_.size(); }

 private:
  std::vector<char> message_;
  std::vector<char> reply_;
  std::uint64_t sequence_ = 0;
};

// What the server saw; written by the server's thread, read after it has finished.
struct EchoServerTally {
  long echoed = 0;
  int accept_error = 0;
};

coro::Task<void> spindle_echo_server(io::Listener& listener, std::size_t message_size,
                                     EchoServerTally& tally, Countdown& finished) {
  auto accepted = co_await listener.accept();
  if (accepted) {
    std::unique_ptr<io::Channel> channel = std::move(accepted.value());
    std::vector<char> buffer(message_size);
    // Ends when the client closes: read_exact() then reports -ECONNRESET.
    for (;;) {
      const int got = co_await channel->read_exact(buffer.data(), buffer.size());
      if (got != 0) break;
      const int sent = co_await channel->write_all(buffer.data(), buffer.size());
      if (sent != 0) break;
      ++tally.echoed;
    }
  } else {
    tally.accept_error = accepted.error();
  }  // the channel is destroyed here, in its own context's thread
  finished.count_down();
}

coro::Task<bool> spindle_echo_client(io::Channel& channel, EchoMessage& echo, int round_trips) {
  for (int i = 0; i < round_trips; ++i) {
    echo.next_round_trip();
    const int sent = co_await channel.write_all(echo.message().data(), echo.size());
    if (sent != 0) co_return false;
    const int got = co_await channel.read_exact(echo.reply().data(), echo.size());
    if (got != 0) co_return false;
    if (!echo.reply_intact()) co_return false;
  }
  co_return true;
}

void spindle_echo(benchmark::State& state, std::size_t message_size, int round_trips) {
  const std::string path = socket_path("spindle");
  auto listening = io::Listener::unix_socket(path);
  if (!listening) return state.SkipWithError("cannot listen on the Unix socket");
  std::unique_ptr<io::Listener> listener = std::move(listening.value());
  EchoServerTally server_tally;
  Countdown server_finished(1);
  EchoMessage echo(message_size);
  bool ok = false;
  long round_trips_done = 0;
  {
    aio::IoThread server("bench-echo-srv", io_thread_poll_params());
    aio::IoThread client("bench-echo-cli", io_thread_poll_params());
    coro::spawn(server.context(),
                spindle_echo_server(*listener, message_size, server_tally, server_finished));
    auto connected = coro::block_on(client.context(), io::connect_unix(path));
    if (connected) {
      std::unique_ptr<io::Channel> channel = std::move(connected.value());
      // Untimed warm-up round trips, then the measurement.
      ok = coro::block_on(client.context(), spindle_echo_client(*channel, echo, round_trips));
      for (auto _ : state) {
        ok &= coro::block_on(client.context(), spindle_echo_client(*channel, echo, round_trips));
      }
      round_trips_done = (state.iterations() + 1) * round_trips;
      // Closing the client's end ends the server's loop.
      coro::block_on(client.context(), destroy_here(std::move(channel)));
    } else {
      server.context().run_soon([&listener] { listener->close(); });  // accept() gives up
    }
    server_finished.wait();
    coro::block_on(server.context(), destroy_here(std::move(listener)));
  }  // both IoThreads stop before their contexts go away
  ::unlink(path.c_str());
  check(state, ok, "connect failed, or an echo failed or came back damaged");
  check(state, server_tally.accept_error == 0, "accept failed");
  check(state, server_tally.echoed == round_trips_done, "the server echoed a different count");
}

using AsioLocalSocket = asio::basic_stream_socket<asio::local::stream_protocol, AsioExecutor>;
using AsioLocalAcceptor =
    asio::basic_socket_acceptor<asio::local::stream_protocol, AsioExecutor>;

AsioTask<void> asio_echo_server(AsioLocalAcceptor& acceptor, std::size_t message_size,
                                EchoServerTally& tally) {
  std::error_code error;
  AsioLocalSocket socket =
      co_await acceptor.async_accept(asio::redirect_error(kUseAwaitable, error));
  if (error) {
    tally.accept_error = error.value();
    co_return;
  }
  std::vector<char> buffer(message_size);
  // Ends when the client closes (asio::error::eof).
  for (;;) {
    co_await asio::async_read(socket, asio::buffer(buffer),
                              asio::redirect_error(kUseAwaitable, error));
    if (error) break;
    co_await asio::async_write(socket, asio::buffer(buffer),
                               asio::redirect_error(kUseAwaitable, error));
    if (error) break;
    ++tally.echoed;
  }
}

AsioTask<std::error_code> asio_connect(AsioLocalSocket& socket,
                                       asio::local::stream_protocol::endpoint endpoint) {
  std::error_code error;
  co_await socket.async_connect(endpoint, asio::redirect_error(kUseAwaitable, error));
  co_return error;
}

AsioTask<bool> asio_echo_client(AsioLocalSocket& socket, EchoMessage& echo, int round_trips) {
  std::error_code error;
  for (int i = 0; i < round_trips; ++i) {
    echo.next_round_trip();
    co_await asio::async_write(socket, asio::buffer(echo.message().data(), echo.size()),
                               asio::redirect_error(kUseAwaitable, error));
    if (error) co_return false;
    co_await asio::async_read(socket, asio::buffer(echo.reply().data(), echo.size()),
                              asio::redirect_error(kUseAwaitable, error));
    if (error || !echo.reply_intact()) co_return false;
  }
  co_return true;
}

// Runs `function` in the thread of `io` and waits for it (Asio I/O objects are not
// thread-safe: each is touched only by its own io_context's thread once that runs).
template <typename Function>
void run_in(asio::io_context& io, Function function) {
  Countdown done(1);
  asio::post(io, [&] {
    function();
    done.count_down();
  });
  done.wait();
}

void asio_echo(benchmark::State& state, std::size_t message_size, int round_trips) {
  const std::string path = socket_path("asio");
  const asio::local::stream_protocol::endpoint endpoint(path);
  EchoServerTally server_tally;
  Countdown server_finished(1);
  EchoMessage echo(message_size);
  bool ok = false;
  long round_trips_done = 0;
  {
    AsioThread server(AsioThread::Mode::sleep);  // io_context::run(): Asio's usual loop
    AsioThread client(AsioThread::Mode::sleep);
    AsioLocalAcceptor acceptor(server.io());
    AsioLocalSocket socket(client.io());
    ::unlink(path.c_str());
    std::error_code error;
    acceptor.open(endpoint.protocol(), error);
    if (!error) acceptor.bind(endpoint, error);
    if (!error) acceptor.listen(asio::socket_base::max_listen_connections, error);
    if (!error) {
      asio::co_spawn(server.io(), asio_echo_server(acceptor, message_size, server_tally),
                     [&server_finished](std::exception_ptr) { server_finished.count_down(); });
      error = asio::co_spawn(client.io(), asio_connect(socket, endpoint), asio::use_future).get();
      if (!error) {
        ok = asio::co_spawn(client.io(), asio_echo_client(socket, echo, round_trips),
                            asio::use_future)
                 .get();  // untimed warm-up
        for (auto _ : state) {
          ok &= asio::co_spawn(client.io(), asio_echo_client(socket, echo, round_trips),
                               asio::use_future)
                    .get();
        }
        round_trips_done = (state.iterations() + 1) * round_trips;
      }
      // Closing the client's end ends the server's loop; closing the acceptor ends a server
      // that is still waiting to accept (the connect failed).
      run_in(client.io(), [&socket] { socket.close(); });
      if (error) run_in(server.io(), [&acceptor] { acceptor.close(); });
      server_finished.wait();
    }
    run_in(server.io(), [&acceptor] { acceptor.close(); });
  }  // socket and acceptor go before their io_contexts stop
  ::unlink(path.c_str());
  check(state, ok, "setup failed, or an echo failed or came back damaged");
  check(state, server_tally.accept_error == 0, "accept failed");
  check(state, server_tally.echoed == round_trips_done, "the server echoed a different count");
}

// ---- registration and summary -------------------------------------------------------------

struct LockVariant {
  const char* name;   // benchmark name part
  const char* label;  // summary label
};
constexpr LockVariant kCoroMutex{"CoroMutex", "coro::Mutex"};
constexpr LockVariant kCoroMutexSpin{"CoroMutexSpin1000", "coro::Mutex, spin 1000"};
constexpr LockVariant kStdMutex{"StdMutex", "std::mutex"};
constexpr LockVariant kMcsLock{"McsLock", "MCS lock"};
constexpr LockVariant kContendedVariants[] = {kCoroMutex, kCoroMutexSpin, kStdMutex, kMcsLock};
constexpr LockVariant kUncontendedVariants[] = {kCoroMutex, kStdMutex, kMcsLock};
constexpr int kContextCounts[] = {2, 5};

std::string contended_name(int contexts, const LockVariant& variant) {
  return fmt::format("Mutex/{}Contexts/{}", contexts, variant.name);
}
std::string uncontended_name(const LockVariant& variant) {
  return fmt::format("Mutex/Uncontended/{}", variant.name);
}

struct FileVariant {
  const char* name;
  const char* label;
  int queue_depth;  // 0: the plain pread loop, which has none
  aio::FileBackend backend;
};
constexpr FileVariant kFileVariants[] = {
    {"FileRead4K/IoUring/QD1", "io_uring", 1, aio::FileBackend::io_uring},
    {"FileRead4K/IoUring/QD32", "io_uring", 32, aio::FileBackend::io_uring},
    {"FileRead4K/Threads/QD1", "thread pool", 1, aio::FileBackend::threads},
    {"FileRead4K/Threads/QD32", "thread pool", 32, aio::FileBackend::threads},
    {"FileRead4K/PreadLoop", "pread loop, 1 thread", 0, aio::FileBackend::automatic},
};
constexpr const char* kPreadLoop = "FileRead4K/PreadLoop";
constexpr const char* kIoUringQd32 = "FileRead4K/IoUring/QD32";

struct EchoSize {
  std::size_t bytes;
  const char* name;
  int round_trips;
};
constexpr EchoSize kEchoSizes[] = {{kSmallMessage, "64B", kSmallRoundTripsPerIteration},
                                   {kLargeMessage, "64KiB", kLargeRoundTripsPerIteration}};

std::string echo_name(const EchoSize& size, const char* side) {
  return fmt::format("Echo/{}/{}", size.name, side);
}

void register_benchmarks() {
  // The benchmark thread sleeps or blocks while IoThreads work: wall time everywhere.
  for (int contexts : kContextCounts) {
    add(contended_name(contexts, kCoroMutex), 1, mutex_throughput<coro::Mutex>, contexts, 0u)
        ->UseRealTime();
    add(contended_name(contexts, kCoroMutexSpin), 1, mutex_throughput<coro::Mutex>, contexts,
        kQemuSpinLimit)
        ->UseRealTime();
    add(contended_name(contexts, kStdMutex), 1, mutex_throughput<std::mutex>, contexts, 0u)
        ->UseRealTime();
    add(contended_name(contexts, kMcsLock), 1, mutex_throughput<McsLock>, contexts, 0u)
        ->UseRealTime();
  }
  add(uncontended_name(kCoroMutex), kUncontendedOpsPerCall, coro_mutex_uncontended);
  add(uncontended_name(kStdMutex), kUncontendedOpsPerCall, thread_lock_uncontended<std::mutex>);
  add(uncontended_name(kMcsLock), kUncontendedOpsPerCall, thread_lock_uncontended<McsLock>);

  add("ThreadPool/RoundTrip/1Coroutine", kPoolRoundTripsPerIteration, pool_round_trip_latency)
      ->UseRealTime();
  add("ThreadPool/Throughput/32Coroutines", kPoolCoroutines * kPoolRoundTripsPerCoroutine,
      pool_throughput)
      ->UseRealTime();

  for (const FileVariant& variant : kFileVariants) {
    if (variant.queue_depth == 0) {
      add(variant.name, kReadsPerIteration, pread_loop)->UseRealTime();
    } else {
      add(variant.name, kReadsPerIteration, spindle_random_reads, variant.backend,
          variant.queue_depth)
          ->UseRealTime();
    }
  }

  for (const EchoSize& size : kEchoSizes) {
    add(echo_name(size, "Spindle"), size.round_trips, spindle_echo, size.bytes, size.round_trips)
        ->UseRealTime();
    add(echo_name(size, "Asio"), size.round_trips, asio_echo, size.bytes, size.round_trips)
        ->UseRealTime();
  }
}

std::string format_rate(std::optional<double> per_second) {
  if (!per_second) return "-";
  if (*per_second >= 1e6) return fmt::format("{:.2f} M", *per_second / 1e6);
  return fmt::format("{:.1f} k", *per_second / 1e3);
}

void print_summary(const spindle::bench::SummaryReporter& results) {
  using spindle::bench::format_ratio;
  using spindle::bench::format_value;
  using spindle::bench::Table;
  fmt::print("\nIoThreads busy-poll for up to {} ns before sleeping (SPINDLE_BENCH_POLL_NS).\n",
             io_thread_poll_params().max_ns);

  Table contended({{"lock", 22, true},
                   {"contexts", 8},
                   {"ops/s", 10},
                   {"/ std::mutex", 12},
                   {"/ MCS lock", 10}});
  for (int contexts : kContextCounts) {
    const auto std_mutex = results.counter(contended_name(contexts, kStdMutex), kOpsPerSecond);
    const auto mcs = results.counter(contended_name(contexts, kMcsLock), kOpsPerSecond);
    for (const LockVariant& variant : kContendedVariants) {
      const auto ops = results.counter(contended_name(contexts, variant), kOpsPerSecond);
      if (!ops) continue;
      contended.add_row({variant.label, std::to_string(contexts), format_rate(ops),
                         format_ratio(ops, std_mutex), format_ratio(ops, mcs)});
    }
  }
  if (!contended.empty()) {
    fmt::print("\n1. Mutex throughput, lock + increment + unlock per op, one coroutine per "
               "IoThread (ops/s of all contexts; ratio = lock / baseline, > 1: faster)\n");
    contended.print();
  }

  Table uncontended(
      {{"lock", 22, true}, {"ns/op", 8}, {"/ std::mutex", 12}, {"/ MCS lock", 10}});
  const auto std_mutex_ns = results.ns_per_operation(uncontended_name(kStdMutex));
  const auto mcs_ns = results.ns_per_operation(uncontended_name(kMcsLock));
  for (const LockVariant& variant : kUncontendedVariants) {
    const auto ns = results.ns_per_operation(uncontended_name(variant));
    if (!ns) continue;
    uncontended.add_row({variant.label, format_value(ns), format_ratio(ns, std_mutex_ns),
                         format_ratio(ns, mcs_ns)});
  }
  if (!uncontended.empty()) {
    fmt::print("\n1b. Uncontended lock + increment + unlock, one thread (wall ns per op; "
               "ratio = lock / baseline, < 1: cheaper)\n");
    uncontended.print();
  }

  Table pool({{"thread pool: co_await run_blocking(pool, noop)", 48, true},
              {"ns/op", 8},
              {"ops/s", 10},
              {"CPU ns/op", 9}});
  for (const auto& [name, label] :
       {std::pair{"ThreadPool/RoundTrip/1Coroutine", "round trip, 1 coroutine"},
        std::pair{"ThreadPool/Throughput/32Coroutines", "throughput, 32 coroutines"}}) {
    const auto ns = results.ns_per_operation(name);
    if (!ns) continue;
    pool.add_row({label, format_value(ns), format_rate(results.operations_per_second(name)),
                  format_value(results.counter(name, kCpuNsPerOp), 0)});
  }
  if (!pool.empty()) {
    fmt::print("\n2. Thread pool, one IoThread (wall ns per op; CPU = process CPU time)\n");
    pool.print();
  }

  Table files({{"backend", 20, true},
               {"queue depth", 11},
               {"IOPS", 10},
               {"CPU ns/IO", 9},
               {"IOPS / pread", 12},
               {"CPU / pread", 11}});
  const auto pread_iops = results.operations_per_second(kPreadLoop);
  const auto pread_cpu = results.counter(kPreadLoop, kCpuNsPerOp);
  for (const FileVariant& variant : kFileVariants) {
    const auto iops = results.operations_per_second(variant.name);
    if (!iops) continue;
    const auto cpu = results.counter(variant.name, kCpuNsPerOp);
    files.add_row({variant.label,
                   variant.queue_depth ? std::to_string(variant.queue_depth) : "none",
                   format_rate(iops), format_value(cpu, 0), format_ratio(iops, pread_iops),
                   format_ratio(cpu, pread_cpu)});
  }
  if (!files.empty()) {
    fmt::print("\n3. Random 4 KiB reads of a page-cached {} MiB file from one context (IOPS = "
               "wall; CPU = process CPU time per read; the pread loop has no queue depth and "
               "is the baseline of every row)\n",
               TestFile::get().mebibytes());
    files.print();
    const auto uring_iops = results.operations_per_second(kIoUringQd32);
    if (uring_iops && pread_iops) {
      fmt::print("goal: io_uring at QD32 at least as fast as the pread loop: {} ({} vs {} "
                 "IOPS)\n",
                 *uring_iops >= *pread_iops ? "met" : "NOT met", format_rate(uring_iops),
                 format_rate(pread_iops));
    }
  }

  Table echo({{"message", 7, true},
              {"Spindle ns/rt", 13},
              {"Asio ns/rt", 10},
              {"ratio", 5},
              {"Spindle MB/s", 12},
              {"Asio MB/s", 9}});
  for (const EchoSize& size : kEchoSizes) {
    const auto spindle = results.ns_per_operation(echo_name(size, "Spindle"));
    const auto asio = results.ns_per_operation(echo_name(size, "Asio"));
    if (!spindle && !asio) continue;
    auto megabytes_per_second = [&](std::optional<double> ns) -> std::optional<double> {
      if (!ns) return std::nullopt;
      return static_cast<double>(size.bytes) * 1e3 / *ns;
    };
    echo.add_row({size.bytes < 1024 ? fmt::format("{} B", size.bytes)
                                    : fmt::format("{} KiB", size.bytes / 1024),
                  format_value(spindle), format_value(asio), format_ratio(asio, spindle),
                  format_value(megabytes_per_second(spindle)),
                  format_value(megabytes_per_second(asio))});
  }
  if (!echo.empty()) {
    fmt::print("\n4. Echo over a Unix socket, client and server on two event-loop threads "
               "(wall ns per round trip; ratio = Asio / Spindle, > 1: Spindle is faster)\n");
    echo.print();
  }
}

}  // namespace

int main(int argc, char** argv) {
  return spindle::bench::run_benchmarks(argc, argv, "0.5", register_benchmarks, print_summary);
}
