// File I/O through io_uring and through the thread-pool fallback (the same tests for both):
// data written one way reads back the other way, vectored I/O, errors (EBADF) and short reads at
// end of file propagate, sync and fallocate work, 32 operations in flight from one context, and
// a completion that arrives while the context sleeps wakes it.
#include "coro/file_io.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "aio/context.h"
#include "aio/file_backend.h"
#include "aio/io_thread.h"
#include "aio/thread_pool.h"
#include "aio/uring.h"
#include "coro/block_on.h"
#include "coro/event.h"
#include "coro/task.h"

namespace spindle::aio {
namespace {

using coro::fallocate;
using coro::fdatasync;
using coro::fsync;
using coro::pread;
using coro::preadv;
using coro::pwrite;
using coro::pwritev;

using namespace std::chrono_literals;

class TempFile {
 public:
  TempFile() {
    char path[] = "/tmp/spindle-file-io-XXXXXX";
    fd_ = ::mkstemp(path);
    EXPECT_GE(fd_, 0);
    ::unlink(path);
  }
  ~TempFile() { ::close(fd_); }
  int fd() const { return fd_; }

 private:
  int fd_;
};

class FileIoTest : public testing::TestWithParam<FileBackend> {
 protected:
  void SetUp() override {
    set_file_backend(GetParam());
    if (GetParam() == FileBackend::io_uring) {
      ContextRef probe = Context::create("probe");
      if (probe->uring() == nullptr) GTEST_SKIP() << "io_uring is not available here";
    }
  }
  void TearDown() override { set_file_backend(FileBackend::automatic); }
  IoThread io{"file-io"};
};

TEST_P(FileIoTest, UsesTheChosenBackend) {
  const std::string used = coro::block_on(
      io.context(), []() -> coro::Task<std::string> { co_return active_file_backend(); }());
  EXPECT_EQ(used, GetParam() == FileBackend::io_uring ? "io_uring" : "threads");
}

TEST_P(FileIoTest, WrittenDataReadsBackThroughPread) {
  TempFile file;
  const std::string text = "spindle writes this through its own path";
  const auto written =
      coro::block_on(io.context(), pwrite(file.fd(), text.data(), text.size(), 4096));
  EXPECT_EQ(written, static_cast<ssize_t>(text.size()));
  std::string back(text.size(), '\0');
  ASSERT_EQ(::pread(file.fd(), back.data(), back.size(), 4096), static_cast<ssize_t>(text.size()));
  EXPECT_EQ(back, text);
}

TEST_P(FileIoTest, PwriteDataReadsBackThroughTheRuntime) {
  TempFile file;
  std::vector<char> pattern(65536);
  for (std::size_t i = 0; i < pattern.size(); ++i) pattern[i] = static_cast<char>(i * 7 + 3);
  ASSERT_EQ(::pwrite(file.fd(), pattern.data(), pattern.size(), 0),
            static_cast<ssize_t>(pattern.size()));
  std::vector<char> back(pattern.size());
  EXPECT_EQ(coro::block_on(io.context(), pread(file.fd(), back.data(), back.size(), 0)),
            static_cast<ssize_t>(back.size()));
  EXPECT_EQ(back, pattern);
}

TEST_P(FileIoTest, VectoredWriteAndRead) {
  TempFile file;
  char a[] = "first-", b[] = "second";
  const iovec out[] = {{a, 6}, {b, 6}};
  EXPECT_EQ(coro::block_on(io.context(), pwritev(file.fd(), out, 10)), 12);
  char x[4], y[8];
  const iovec in[] = {{x, 4}, {y, 8}};
  EXPECT_EQ(coro::block_on(io.context(), preadv(file.fd(), in, 10)), 12);
  EXPECT_EQ(std::string(x, 4) + std::string(y, 8), "first-second");
}

TEST_P(FileIoTest, ShortReadsAtEndOfFile) {
  TempFile file;
  std::vector<char> data(100, 'z');
  ASSERT_EQ(::pwrite(file.fd(), data.data(), data.size(), 0), 100);
  std::vector<char> buffer(4096);
  EXPECT_EQ(coro::block_on(io.context(), pread(file.fd(), buffer.data(), buffer.size(), 50)), 50);
  EXPECT_EQ(coro::block_on(io.context(), pread(file.fd(), buffer.data(), buffer.size(), 100)), 0);
}

TEST_P(FileIoTest, ErrorsComeBackAsNegativeErrno) {
  char buffer[16];
  EXPECT_EQ(coro::block_on(io.context(), pread(-1, buffer, sizeof buffer, 0)), -EBADF);
  EXPECT_EQ(coro::block_on(io.context(), pwrite(-1, buffer, sizeof buffer, 0)), -EBADF);
  EXPECT_EQ(coro::block_on(io.context(), fsync(-1)), -EBADF);
  TempFile file;
  const int read_only = ::open(("/proc/self/fd/" + std::to_string(file.fd())).c_str(), O_RDONLY);
  ASSERT_GE(read_only, 0);
  EXPECT_EQ(coro::block_on(io.context(), pwrite(read_only, buffer, sizeof buffer, 0)), -EBADF);
  ::close(read_only);
}

TEST_P(FileIoTest, SyncAndFallocate) {
  TempFile file;
  EXPECT_EQ(coro::block_on(io.context(), fallocate(file.fd(), 0, 0, 1 << 20)), 0);
  struct stat info;
  ASSERT_EQ(::fstat(file.fd(), &info), 0);
  EXPECT_EQ(info.st_size, 1 << 20);
  EXPECT_EQ(coro::block_on(io.context(), fsync(file.fd())), 0);
  EXPECT_EQ(coro::block_on(io.context(), fdatasync(file.fd())), 0);
}

TEST_P(FileIoTest, ThirtyTwoOperationsInFlight) {
  TempFile file;
  constexpr int kBlocks = 256, kDepth = 32, kBlock = 4096;
  std::vector<char> source(kBlocks * kBlock);
  for (std::size_t i = 0; i < source.size(); ++i) source[i] = static_cast<char>(i % 251);
  ASSERT_EQ(::pwrite(file.fd(), source.data(), source.size(), 0),
            static_cast<ssize_t>(source.size()));
  std::vector<char> copy(source.size());
  const int errors =
      coro::block_on(io.context(), [](int fd, std::vector<char>& out) -> coro::Task<int> {
        std::atomic<int> next{0}, failures{0}, live{kDepth};
        coro::Event all_done;
        auto lane = [](int f, std::vector<char>& o, std::atomic<int>& n, std::atomic<int>& bad,
                       std::atomic<int>& remaining, coro::Event& done) -> coro::Task<void> {
          for (int block; (block = n.fetch_add(1)) < kBlocks;) {
            const ssize_t got = co_await pread(f, o.data() + block * kBlock, kBlock,
                                               static_cast<off_t>(block) * kBlock);
            if (got != kBlock) bad.fetch_add(1);
          }
          if (remaining.fetch_sub(1) == 1) done.set();
        };
        for (int i = 0; i < kDepth; ++i) {
          coro::spawn(*current_context(), lane(fd, out, next, failures, live, all_done));
        }
        co_await all_done.wait();
        co_return failures.load();
      }(file.fd(), copy));
  EXPECT_EQ(errors, 0);
  EXPECT_EQ(copy, source);
}

TEST_P(FileIoTest, CompletionWakesASleepingContext) {
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  std::thread writer([&] {
    std::this_thread::sleep_for(100ms);  // the IoThread is asleep by now
    EXPECT_EQ(::write(fds[1], "ping", 4), 4);
  });
  char buffer[8] = {};
  // Offset -1: the current position, which pipes need (they cannot seek).
  EXPECT_EQ(coro::block_on(io.context(), pread(fds[0], buffer, sizeof buffer, -1)), 4);
  writer.join();
  EXPECT_EQ(std::string(buffer, 4), "ping");
  ::close(fds[0]);
  ::close(fds[1]);
}

// 64 reads parked on empty pipes complete together, while the context sleeps: more than the
// kernel runs per io_uring_enter (20 deferred completions), with nobody submitting more. Every
// one must be delivered, on an IoThread (DEFER_TASKRUN, the completion eventfd armed only for
// sleeping) and on a private context polled by the caller (COOP_TASKRUN, eventfd always on).
TEST_P(FileIoTest, ManyCompletionsWhileTheContextSleeps) {
  constexpr int kPipes = 64;
  std::vector<std::array<int, 2>> pipes(kPipes);
  for (auto& p : pipes) ASSERT_EQ(::pipe(p.data()), 0);
  ContextRef private_context = Context::create("file-io-private");
  for (Context* context : {&io.context(), private_context.get()}) {
    std::thread writer([&] {
      std::this_thread::sleep_for(100ms);  // every read is parked by now, the context asleep
      for (auto& p : pipes) EXPECT_EQ(::write(p[1], "x", 1), 1);
    });
    const int total =
        coro::block_on(*context, [](std::vector<std::array<int, 2>>& ps) -> coro::Task<int> {
          std::atomic<int> bytes{0}, live{kPipes};
          coro::Event all_done;
          auto reader = [](int fd, std::atomic<int>& sum, std::atomic<int>& remaining,
                           coro::Event& done) -> coro::Task<void> {
            char c;
            const ssize_t got = co_await pread(fd, &c, 1, -1);
            if (got > 0) sum.fetch_add(static_cast<int>(got));
            if (remaining.fetch_sub(1) == 1) done.set();
          };
          for (auto& p : ps) coro::spawn(*current_context(), reader(p[0], bytes, live, all_done));
          co_await all_done.wait();
          co_return bytes.load();
        }(pipes));
    writer.join();
    EXPECT_EQ(total, kPipes) << context->name();
  }
  for (auto& p : pipes) {
    ::close(p[0]);
    ::close(p[1]);
  }
}

// Reads and writes longer than 4 GiB: the length must not be cut to 32 bits (2^32 + 8 KiB
// would become 8 KiB). The buffer is a MAP_NORESERVE mapping of which the kernel touches only
// what it really moves: a read stops at the end of a 16 KiB file, and /dev/null takes a write
// without reading the buffer.
class HugeBuffer {
 public:
  explicit HugeBuffer(std::size_t length) : length_(length) {
    data_ = ::mmap(nullptr, length, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    EXPECT_NE(data_, MAP_FAILED);
  }
  ~HugeBuffer() {
    if (data_ != MAP_FAILED) ::munmap(data_, length_);
  }
  char* data() const { return static_cast<char*>(data_); }
  bool ok() const { return data_ != MAP_FAILED; }

 private:
  std::size_t length_;
  void* data_;
};

constexpr std::size_t kOver4GiB = (std::size_t{1} << 32) + 8192;

TEST_P(FileIoTest, ReadLongerThan4GiBIsNotCutTo32Bits) {
  TempFile file;
  std::vector<char> content(16384);
  for (std::size_t i = 0; i < content.size(); ++i) content[i] = static_cast<char>('a' + i % 26);
  ASSERT_EQ(::pwrite(file.fd(), content.data(), content.size(), 0), 16384);
  HugeBuffer buffer(kOver4GiB);
  ASSERT_TRUE(buffer.ok());
  EXPECT_EQ(coro::block_on(io.context(), pread(file.fd(), buffer.data(), kOver4GiB, 0)), 16384);
  EXPECT_EQ(std::memcmp(buffer.data(), content.data(), content.size()), 0);
}

TEST_P(FileIoTest, WriteLongerThan4GiBIsNotCutTo32Bits) {
  const int null_fd = ::open("/dev/null", O_WRONLY | O_CLOEXEC);
  ASSERT_GE(null_fd, 0);
  HugeBuffer buffer(kOver4GiB);
  ASSERT_TRUE(buffer.ok());
  EXPECT_EQ(coro::block_on(io.context(), pwrite(null_fd, buffer.data(), kOver4GiB, 0)),
            static_cast<ssize_t>(kOver4GiB));
  ::close(null_fd);
}

INSTANTIATE_TEST_SUITE_P(Backends, FileIoTest,
                         testing::Values(FileBackend::io_uring, FileBackend::threads),
                         [](const testing::TestParamInfo<FileBackend>& info) {
                           return info.param == FileBackend::io_uring ? "IoUring" : "Threads";
                         });

// The automatic backend sends buffered writes of 1 MiB and more to the thread pool (io_uring
// would hand them to one io-wq worker per file, one at a time) and smaller ones to the ring.
TEST(FileIoRoutingTest, LargeBufferedWritesGoToThePoolSmallOnesToTheRing) {
  set_file_backend(FileBackend::automatic);
  {
    ContextRef probe = Context::create("probe");
    if (probe->uring() == nullptr) GTEST_SKIP() << "io_uring is not available here";
  }
  IoThread io{"file-io-route"};
  // (Asked on the IoThread: its ring and pool are its own.)
  const auto workers = [&io] {
    return coro::block_on(io.context(), []() -> coro::Task<std::size_t> {
      co_return current_context()->thread_pool().worker_count();
    }());
  };
  TempFile file;
  std::vector<char> small(4096, 's');
  EXPECT_EQ(coro::block_on(io.context(), pwrite(file.fd(), small.data(), small.size(), 0)), 4096);
  EXPECT_EQ(workers(), 0u);  // the ring did it

  std::vector<char> large(2u << 20);
  for (std::size_t i = 0; i < large.size(); ++i) large[i] = static_cast<char>(i % 251);
  EXPECT_EQ(coro::block_on(io.context(), pwrite(file.fd(), large.data(), large.size(), 4096)),
            static_cast<ssize_t>(large.size()));
  EXPECT_GE(workers(), 1u);
  const iovec halves[] = {{large.data(), 1u << 20}, {large.data() + (1u << 20), 1u << 20}};
  EXPECT_EQ(coro::block_on(io.context(), pwritev(file.fd(), halves, 8192 + (2u << 20))),
            static_cast<ssize_t>(large.size()));
  std::vector<char> back(large.size());
  ASSERT_EQ(::pread(file.fd(), back.data(), back.size(), 4096), static_cast<ssize_t>(back.size()));
  EXPECT_EQ(back, large);
  ASSERT_EQ(::pread(file.fd(), back.data(), back.size(), 8192 + (2u << 20)),
            static_cast<ssize_t>(back.size()));
  EXPECT_EQ(back, large);
}

// IoThread::stop() with io_uring work outstanding. The ring of an IoThread's context is
// SINGLE_ISSUER: only the IoThread may enter it, so work left when its loop ends must finish
// there, and work posted after the loop ended (run by the joining thread) must not use it.
class IoThreadStopTest : public testing::Test {
 protected:
  void SetUp() override {
    set_file_backend(FileBackend::io_uring);
    ContextRef probe = Context::create("probe");
    if (probe->uring() == nullptr) GTEST_SKIP() << "io_uring is not available here";
  }
  void TearDown() override { set_file_backend(FileBackend::automatic); }
};

// A read parked on an empty pipe when stop() is called completes on the IoThread before
// stop() returns.
TEST_F(IoThreadStopTest, RingOperationInFlightAtStopCompletesOnTheIoThread) {
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  auto io = std::make_unique<IoThread>("stop-in-flight");
  struct Outcome {
    std::atomic<bool> submitting{false};
    std::atomic<ssize_t> result{-1000};
    std::atomic<bool> on_io_thread{false};
  } outcome;
  char byte = 0;
  coro::Coroutine* co = coro::create(
      [](int fd, char& c, Outcome& out, std::thread::id io_thread) -> coro::Task<void> {
        out.submitting.store(true);
        const ssize_t got = co_await pread(fd, &c, 1, -1);
        out.on_io_thread.store(std::this_thread::get_id() == io_thread);
        out.result.store(got);
      }(fds[0], byte, outcome, io->thread_id()));
  coro::schedule(io->context(), co);
  while (!outcome.submitting.load()) std::this_thread::sleep_for(1ms);
  std::this_thread::sleep_for(20ms);  // the read is on the ring, the IoThread asleep
  std::thread writer([&] {
    std::this_thread::sleep_for(100ms);  // after stop() was called
    EXPECT_EQ(::write(fds[1], "x", 1), 1);
  });
  io->stop();
  EXPECT_EQ(outcome.result.load(), 1) << "the read had not completed when stop() returned";
  EXPECT_TRUE(outcome.on_io_thread.load());
  writer.join();
  io.reset();
  EXPECT_EQ(byte, 'x');
  ::close(fds[0]);
  ::close(fds[1]);
}

// The loop ends itself (stop() from inside); file I/O posted afterwards runs in the thread that
// joins, which must not enter the IoThread's ring.
TEST_F(IoThreadStopTest, FileIoPostedAfterTheLoopEndedWorks) {
  TempFile file;
  ASSERT_EQ(::pwrite(file.fd(), "abcd", 4, 0), 4);
  IoThread io("stop-after-end");
  char first[4] = {};
  EXPECT_EQ(coro::block_on(io.context(), pread(file.fd(), first, 4, 0)), 4);  // ring created
  io.context().run_soon([&io] { io.stop(); });  // from inside: the loop ends, nobody joins yet
  std::this_thread::sleep_for(50ms);
  std::atomic<ssize_t> result{-1000};
  char second[4] = {};
  coro::Coroutine* co =
      coro::create([](int fd, char* buffer, std::atomic<ssize_t>& out) -> coro::Task<void> {
        const ssize_t got = co_await pread(fd, buffer, 4, 0);
        out.store(got);
      }(file.fd(), second, result));
  coro::schedule(io.context(), co);
  io.stop();  // joins, then runs the coroutine here
  EXPECT_EQ(result.load(), 4);
  EXPECT_EQ(std::string(second, 4), "abcd");
}

}  // namespace
}  // namespace spindle::aio
