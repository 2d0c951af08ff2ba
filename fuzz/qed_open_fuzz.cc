// libFuzzer target for the QED driver's open, check and read paths: every input is an image
// file. It is written to a tmpfs file, opened with open_qed() (read-only, no repair), checked
// with QedNode::check(false), and, if it opened, read in a few places and walked with block
// status through a BlockBackend. A second pass opens a copy writable (repairing a dirty image)
// and does an allocating and an in-place write, a flush and a close, as a guest would. Errors
// are fine; crashes, sanitizer reports, leaks and hangs are not, and neither is an image that
// checked consistent and is no longer consistent (or no longer opens) after those writes.
//
// Backing files: the image's backing name never reaches the file system. A relative name opens
// a null node (reads as zeros), so copy-on-write and backing reads run; an absolute name is
// reported missing (ENOENT), so that error path runs too.
//
// Seeds: with SPINDLE_FUZZ_WRITE_SEEDS=DIR the binary writes a few valid images made by our own
// create_qed() and QedNode writes into DIR and exits (scripts/fuzz.sh does this first).
//
// Thread-safety: single-threaded, as libFuzzer calls it; everything runs on the main context.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "block/block_backend.h"
#include "block/drivers/file.h"
#include "block/drivers/null.h"
#include "block/formats/qed/create.h"
#include "block/formats/qed/format.h"
#include "block/formats/qed/qed_node.h"
#include "coro/block_on.h"
#include "coro/task.h"

namespace spindle::block::qed {
namespace {

constexpr std::uint64_t kBackingSize = 1 << 20;
constexpr std::size_t kReadBytes = 64 * 1024;  // per read; bounds the work per input
constexpr int kStatusSteps = 32;

// The file the input is copied to; on tmpfs when there is one (no disk I/O).
const std::string& scratch_path() {
  static const std::string path = [] {
    const char* directory = ::access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
    return std::string(directory) + "/spindle-qed-fuzz-" + std::to_string(::getpid());
  }();
  return path;
}

bool write_scratch(const std::uint8_t* data, std::size_t size) {
  const int fd = ::open(scratch_path().c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return false;
  std::size_t done = 0;
  while (done < size) {
    const ssize_t n = ::pwrite(fd, data + done, size - done, static_cast<off_t>(done));
    if (n <= 0) break;
    done += static_cast<std::size_t>(n);
  }
  ::close(fd);
  return done == size;
}

OpenOptions open_options(bool read_only) {
  OpenOptions options;
  options.read_only = read_only;
  options.repair_if_dirty = !read_only;
  options.open_backing = [](std::string name,
                            std::string format) -> coro::Task<BlockResult<BlockNodeRef>> {
    if (name.starts_with('/')) co_return BlockError{ENOENT, "backing file missing"};
    co_return BlockNodeRef(std::make_shared<NullNode>(kBackingSize));
  };
  return options;
}

coro::Task<void> read_some(BlockBackend& backend, std::uint64_t offset) {
  const std::uint64_t size = backend.size();
  if (offset >= size) co_return;
  std::vector<std::byte> buffer(std::min<std::uint64_t>(kReadBytes, size - offset));
  (void)co_await backend.read(offset, std::span(buffer));
}

// Reads the start, an unaligned middle, and the end of the image, and the start of the first
// few extents that block status reports.
coro::Task<void> exercise_reads(BlockBackend& backend) {
  const std::uint64_t size = backend.size();
  co_await read_some(backend, 0);
  co_await read_some(backend, size / 2 + 1);
  co_await read_some(backend, size - std::min<std::uint64_t>(size, 5000));
  std::uint64_t offset = 0;
  for (int step = 0; step < kStatusSteps && offset < size; ++step) {
    const BlockStatus status = co_await backend.block_status(offset, size - offset);
    if (status.bytes == 0) break;
    if (step < 4 && (status.flags & kStatusData)) co_await read_some(backend, offset);
    offset += status.bytes;
  }
}

// Opens the scratch file; null if it is not an image we open.
coro::Task<QedNodeRef> open_scratch(bool read_only) {
  base::Result<BlockNodeRef> file = open_file(scratch_path(), read_only);
  if (!file.ok()) co_return nullptr;
  BlockResult<QedNodeRef> opened =
      co_await open_qed(std::move(file).value(), open_options(read_only));
  if (!opened.ok()) co_return nullptr;
  co_return std::move(opened).value();
}

bool consistent(const CheckResult& check) {
  return check.corruptions == 0 && !check.check_errors;
}

// Returns whether the image opened and its check found it consistent.
coro::Task<bool> read_only_pass() {
  QedNodeRef node = co_await open_scratch(true);
  if (!node) co_return false;
  const CheckResult check = co_await node->check(false);
  {
    BlockBackend backend(node);
    co_await exercise_reads(backend);
  }
  (void)co_await node->close();
  co_return consistent(check);
}

// What a guest does after opening: repair if dirty, write (allocating and, the second time, in
// place, unaligned), write zeroes, flush, close. The scratch file is a copy, so writing to it is
// harmless. Writing to an image that checked consistent must leave it consistent.
coro::Task<void> writable_pass(bool was_consistent) {
  QedNodeRef node = co_await open_scratch(false);
  if (!node) co_return;
  bool all_ok = true;
  {
    BlockBackend backend(node);
    const std::uint64_t size = backend.size();
    std::array<std::byte, 6000> pattern;
    pattern.fill(std::byte{0x5a});
    const std::uint64_t offset =
        size >= pattern.size() ? std::min(size / 3, size - pattern.size()) : 0;
    for (int i = 0; i < 2 && size >= pattern.size(); ++i) {
      const int result = co_await backend.write(offset, std::span(pattern));
      all_ok = all_ok && result >= 0;
    }
    if (size >= 8192) {
      const int result = co_await backend.write_zeroes(size - 8192, 8192);
      all_ok = all_ok && result >= 0;
    }
    const int result = co_await backend.flush();
    all_ok = all_ok && result >= 0;
    co_await read_some(backend, offset);
  }
  const int closed = co_await node->close();
  node.reset();
  if (!was_consistent || !all_ok || closed < 0) co_return;
  QedNodeRef reopened = co_await open_scratch(true);
  if (!reopened) __builtin_trap();  // our own writes made it unopenable
  const CheckResult check = co_await reopened->check(false);
  if (!consistent(check)) {
    std::fprintf(stderr,
                 "qed_open_fuzz: %lu corruptions, %lu check errors after writing to a "
                 "consistent image\n",
                 static_cast<unsigned long>(check.corruptions),
                 static_cast<unsigned long>(check.check_errors));
    __builtin_trap();
  }
  (void)co_await reopened->close();
}

// --- seeds ---------------------------------------------------------------------------------

struct Seed {
  const char* name;
  CreateOptions options;
  bool write_data;
  bool dirty;  // set NEED_CHECK in the header afterwards
};

coro::Task<int> make_seed(const Seed& seed, const std::string& path) {
  base::Result<BlockNodeRef> file = open_file(path, FileOptions{false, false, true});
  if (!file.ok()) co_return -file.error();
  const BlockError created = co_await create_qed(*file.value(), seed.options);
  if (!created.ok()) co_return -created.error;
  if (seed.write_data) {
    BlockResult<QedNodeRef> opened = co_await open_qed(file.value(), open_options(false));
    if (!opened.ok()) co_return -opened.error().error;
    QedNodeRef node = std::move(opened).value();
    {
      BlockBackend backend(node);
      std::vector<std::byte> data(3 * seed.options.cluster_size / 2, std::byte{0xa5});
      int result = co_await backend.write(0, std::span(data));
      if (result >= 0)
        result = co_await backend.write(seed.options.size / 2 + 512, std::span(data));
      if (result >= 0) {
        result = co_await backend.write_zeroes(seed.options.size - seed.options.cluster_size,
                                               seed.options.cluster_size);
      }
      if (result < 0) co_return result;
    }
    const int result = co_await node->close();
    if (result < 0) co_return result;
  }
  co_return 0;
}

void write_seeds(const char* directory) {
  std::filesystem::create_directories(directory);
  // Table size 1 only once: QEMU refuses it (a bug of its own), our driver must not.
  const Seed seeds[] = {
      {"empty-4k-t1", {.size = 1 << 20, .cluster_size = 4096, .table_size = 1}, false, false},
      {"data-4k-t2", {.size = 1 << 20, .cluster_size = 4096, .table_size = 2}, true, false},
      {"dirty-4k-t2", {.size = 1 << 20, .cluster_size = 4096, .table_size = 2}, true, true},
      {"data-4k-t2-odd-size",
       {.size = 3 * (1 << 20) + 1536, .cluster_size = 4096, .table_size = 2},
       true,
       false},
      {"backing-raw-4k-t2",
       {.size = 1 << 20,
        .cluster_size = 4096,
        .table_size = 2,
        .backing_file = "base.raw",
        .backing_format = "raw"},
       true,
       false},
      {"backing-probe-8k-t2",
       {.size = 1 << 20, .cluster_size = 8192, .table_size = 2, .backing_file = "base.img"},
       false,
       false},
      {"backing-absolute-4k-t2",
       {.size = 1 << 20, .cluster_size = 4096, .table_size = 2, .backing_file = "/missing.img"},
       false,
       false},
  };
  for (const Seed& seed : seeds) {
    const std::string path = std::string(directory) + "/" + seed.name;
    const int result = coro::block_on(make_seed(seed, path));
    if (result < 0) {
      std::fprintf(stderr, "seed %s: %s\n", seed.name, std::strerror(-result));
      std::exit(1);
    }
    if (seed.dirty) {
      const int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
      std::byte header[kHeaderBytes];
      if (fd < 0 || ::pread(fd, header, sizeof header, 0) != sizeof header) std::exit(1);
      Header decoded = decode_header(header);
      decoded.features |= kFeatureNeedCheck;
      encode_header(decoded, header);
      if (::pwrite(fd, header, sizeof header, 0) != sizeof header) std::exit(1);
      ::close(fd);
    }
  }
  std::exit(0);
}

}  // namespace
}  // namespace spindle::block::qed

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  if (const char* directory = std::getenv("SPINDLE_FUZZ_WRITE_SEEDS")) {
    spindle::block::qed::write_seeds(directory);
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace spindle;
  if (!block::qed::write_scratch(data, size)) return 0;
  const bool consistent = coro::block_on(block::qed::read_only_pass());
  coro::block_on(block::qed::writable_pass(consistent));
  // Removed after every input: libFuzzer ends with _Exit(), which runs no atexit handlers.
  ::unlink(block::qed::scratch_path().c_str());
  return 0;
}
