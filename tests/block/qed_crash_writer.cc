// qed_crash_writer: the victim of tests/interop/test_crash.py. It opens a QED image (or, with
// --format qcow2, a qcow2 image) and its backing chain through open_image_chain() and a
// BlockBackend, repairing it if a previous writer was killed (QED's need-check bit, qcow2's
// lazy-refcounts dirty bit), then writes forever until it is killed (SIGKILL):
//   * batches of 1..4 concurrent writes at random, non-overlapping places of the image (half of
//     them in its first eighth), which allocate clusters (with copy-on-write from a backing
//     file), rewrite allocated clusters in place, and are sometimes unaligned (read-modify-write)
//     or write zeroes (half of those with kMayUnmap, so that qcow2 frees clusters and reuses
//     them for later writes);
//   * a flush after every 1..3 batches.
// Every write's content says what it is: 16-byte records (u64 seq, u64 image offset of the
// record), little-endian; zero writes have no content. On stdout, line by line, flushed before
// the next step:
//   W <seq> <offset> <length>   a data write is about to be issued
//   Z <seq> <offset> <length>   a write_zeroes is about to be issued
//   F <seq>                     a flush completed: every write with a sequence number <= seq
//                               is durable (they all completed before the flush began)
// Offsets and lengths are multiples of 16. Sequence numbers start at --first-seq, so that the
// test can tell the writes of successive writers on one image apart.
//
//   qed_crash_writer IMAGE --seed N --first-seq N [--max-write BYTES] [--format qed|qcow2]
//
// Thread-safety: single-threaded; everything runs on the main context.
#include <fmt/format.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "aio/context.h"
#include "base/byte_order.h"
#include "block/block_backend.h"
#include "block/drivers/file.h"
#include "block/image_chain.h"
#include "coro/block_on.h"
#include "coro/coroutine.h"
#include "coro/task.h"

namespace spindle::block {
namespace {

struct Write {
  std::uint64_t seq = 0;
  std::uint64_t offset = 0;
  std::uint64_t length = 0;
  bool zeroes = false;
  bool unmap = false;  // zeroes that may free the clusters (reused later by qcow2)
};

struct Batch {
  int pending = 0;
  int failed = 0;  // -errno of a failed request, 0 if none
};

[[noreturn]] void die(const std::string& message) {
  std::fprintf(stderr, "qed_crash_writer: %s\n", message.c_str());
  std::exit(2);
}

void emit(const std::string& line) {
  // Written and flushed before the request is issued: a kill right after leaves the line with
  // the test, so it knows the range may have changed.
  if (std::fputs(line.c_str(), stdout) < 0 || std::fflush(stdout) != 0) std::exit(3);
}

std::vector<std::byte> content(const Write& write) {
  std::vector<std::byte> data(write.length);
  for (std::uint64_t at = 0; at < write.length; at += 16) {
    base::store_le64(data.data() + at, write.seq);
    base::store_le64(data.data() + at + 8, write.offset + at);
  }
  return data;
}

coro::Task<void> run_write(BlockBackend& backend, Write write, Batch& batch) {
  int result;
  if (write.zeroes) {
    result = co_await backend.write_zeroes(write.offset, write.length,
                                           write.unmap ? std::uint32_t{kMayUnmap} : 0u);
  } else {
    const std::vector<std::byte> data = content(write);
    result = co_await backend.write(write.offset, std::span(data));
  }
  if (result < 0 && batch.failed == 0) batch.failed = result;
  --batch.pending;
}

bool overlaps(const Write& a, const Write& b) {
  return a.offset < b.offset + b.length && b.offset < a.offset + a.length;
}

int run(const std::string& path, const std::string& format, std::uint64_t seed, std::uint64_t seq,
        std::uint64_t max_write) {
  ChainOptions options;
  options.read_only = false;
  options.repair_if_dirty = true;  // a killed writer may leave the image dirty: repair it
  options.open_file = [](const std::string& file, bool read_only) {
    return open_file(file, read_only);
  };
  auto opened = coro::block_on(open_image_chain(path, format, std::move(options)));
  if (!opened.ok()) die(fmt::format("cannot open {}: {}", path, opened.error().message));
  BlockBackend backend(std::move(opened).value());
  const std::uint64_t size = backend.size() / 16 * 16;
  if (size < 16) die("the image is too small");
  max_write = std::min(max_write, size);
  emit("OPEN\n");

  std::mt19937_64 random(seed);
  auto below = [&](std::uint64_t bound) { return random() % bound; };
  aio::Context& context = aio::main_context();
  int batches_since_flush = 0;
  int flush_after = 1;
  while (true) {
    std::vector<Write> writes;
    const int count = 1 + static_cast<int>(below(4));
    for (int attempt = 0; attempt < 16 && static_cast<int>(writes.size()) < count; ++attempt) {
      Write write;
      write.seq = seq;
      // Mostly 512-aligned (the driver's alignment), sometimes only 16-aligned (read-modify-
      // write in BlockBackend); lengths from one record to max_write.
      const bool aligned = below(4) != 0;
      const std::uint64_t unit = aligned ? 512 : 16;
      write.length =
          std::min(size, unit * (1 + below(std::max<std::uint64_t>(1, max_write / unit))));
      // Half the writes go to the first eighth of the image (soon allocated: in-place writes),
      // half anywhere (allocating writes for a long time).
      const std::uint64_t span = below(2) ? size : std::max(size / 8, write.length);
      write.offset = below((span - write.length) / unit + 1) * unit;
      write.zeroes = below(10) == 0;
      write.unmap = write.zeroes && below(2) == 0;
      const bool clash = std::any_of(writes.begin(), writes.end(),
                                     [&](const Write& other) { return overlaps(write, other); });
      if (clash) continue;  // concurrent overlapping writes would have no defined result
      writes.push_back(write);
      ++seq;
    }
    Batch batch;
    batch.pending = static_cast<int>(writes.size());
    for (const Write& write : writes) {
      emit(fmt::format("{} {} {} {}\n", write.zeroes ? 'Z' : 'W', write.seq, write.offset,
                       write.length));
      coro::spawn(context, run_write(backend, write, batch));
    }
    while (batch.pending > 0) context.poll(true);
    if (batch.failed < 0) die(fmt::format("write failed: {}", std::strerror(-batch.failed)));
    if (++batches_since_flush >= flush_after) {
      const int result = coro::block_on(backend.flush());
      if (result < 0) die(fmt::format("flush failed: {}", std::strerror(-result)));
      emit(fmt::format("F {}\n", seq - 1));
      batches_since_flush = 0;
      flush_after = 1 + static_cast<int>(below(3));
    }
  }
}

}  // namespace
}  // namespace spindle::block

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s IMAGE [--seed N] [--first-seq N] [--max-write BYTES] "
                 "[--format qed|qcow2]\n",
                 argv[0]);
    return 1;
  }
  std::uint64_t seed = 1;
  std::uint64_t first_seq = 1;
  std::uint64_t max_write = 3 * 65536;
  std::string format = "qed";
  for (int i = 2; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--format") {
      format = argv[i + 1];
      continue;
    }
    const std::uint64_t value = std::strtoull(argv[i + 1], nullptr, 0);
    if (flag == "--seed") {
      seed = value;
    } else if (flag == "--first-seq") {
      first_seq = value;
    } else if (flag == "--max-write") {
      max_write = std::max<std::uint64_t>(16, value);
    } else {
      std::fprintf(stderr, "unknown option %s\n", flag.c_str());
      return 1;
    }
  }
  return spindle::block::run(argv[1], format, seed, first_seq, max_write);
}
