// libFuzzer target for qcow2 input handling: every input is an image file. The header is
// decoded (and, when it decodes, encoded again and decoded back to the same fields); the file
// is checked without repair through the format registry's check (on the file node, so the
// checker's own reading of every table runs whatever the driver thinks of the image); then the
// image is opened read-only through the qcow2 driver and read in a few places and walked with
// block status through a BlockBackend, and the open node is checked as well; then it is opened
// writable and written (allocating, unaligned, zeroes, discard, flush) and checked again.
// Errors are fine; crashes, sanitizer reports, leaks and hangs are not.
//
// Backing and external data files never reach the file system: a relative name opens a null
// node (reads as zeros), an absolute one is reported missing (ENOENT). The snapshot table is
// listed as well.
//
// Seeds: with SPINDLE_FUZZ_WRITE_SEEDS=DIR the binary writes a few small images made by our
// own create (512 B and 4 KiB clusters, v2 and v3, a backing file, preallocated metadata)
// into DIR and exits (scripts/fuzz.sh does this first).
//
// Thread-safety: single-threaded, as libFuzzer calls it; everything runs on the main context.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "block/block_backend.h"
#include "block/drivers/file.h"
#include "block/drivers/null.h"
#include "block/formats/qcow2/format.h"
#include "block/formats/qcow2/qcow2_format.h"
#include "coro/block_on.h"
#include "coro/task.h"

namespace spindle::block::qcow2 {
namespace {

constexpr std::uint64_t kBackingSize = 1 << 20;
constexpr std::size_t kReadBytes = 64 * 1024;  // per read; bounds the work per input
constexpr int kStatusSteps = 32;

const std::string& scratch_path() {
  static const std::string path = [] {
    const char* directory = ::access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
    return std::string(directory) + "/spindle-qcow2-fuzz-" + std::to_string(::getpid());
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

FormatOpenOptions open_options() {
  FormatOpenOptions options;
  options.read_only = true;
  options.repair_if_dirty = false;
  options.open_backing = [](std::string name,
                            std::string format) -> coro::Task<BlockResult<BlockNodeRef>> {
    if (name.starts_with('/')) co_return BlockError{ENOENT, "backing file missing"};
    co_return BlockNodeRef(std::make_shared<NullNode>(kBackingSize));
  };
  options.open_data_file = [](const std::string& name, bool) -> BlockResult<BlockNodeRef> {
    if (name.starts_with('/')) return BlockError{ENOENT, "data file missing"};
    return BlockNodeRef(std::make_shared<NullNode>(kBackingSize));
  };
  return options;
}

// Decoding what encode_header wrote gives the same header back.
void round_trip(std::span<const std::byte> head) {
  BlockResult<Header> decoded = decode_header(head);
  if (!decoded.ok()) return;
  BlockResult<std::vector<std::byte>> encoded = encode_header(decoded.value());
  if (!encoded.ok()) return;  // e.g. unknown extensions that no longer fit
  std::vector<std::byte> cluster = std::move(encoded).value();
  cluster.resize(decoded->cluster_size());
  BlockResult<Header> again = decode_header(cluster);
  if (!again.ok() || again->size != decoded->size || again->l1_size != decoded->l1_size ||
      again->l1_table_offset != decoded->l1_table_offset ||
      again->refcount_order != decoded->refcount_order ||
      again->incompatible_features != decoded->incompatible_features ||
      again->backing_file != decoded->backing_file ||
      again->backing_format != decoded->backing_format) {
    std::fprintf(stderr, "qcow2_open_fuzz: header changed in an encode/decode round trip\n");
    __builtin_trap();
  }
}

coro::Task<void> read_some(BlockBackend& backend, std::uint64_t offset) {
  const std::uint64_t size = backend.size();
  if (offset >= size) co_return;
  std::vector<std::byte> buffer(std::min<std::uint64_t>(kReadBytes, size - offset));
  (void)co_await backend.read(offset, std::span(buffer));
}

// The image that opened read-only, opened writable (no repair) and written: allocating and
// unaligned writes, zeroes and a discard, a flush, a close; then checked again.
coro::Task<void> write_some(const ImageFormat& format) {
  base::Result<BlockNodeRef> file = open_file(scratch_path(), false);
  if (!file.ok()) co_return;
  FormatOpenOptions options = open_options();
  options.read_only = false;
  BlockResult<BlockNodeRef> opened = co_await format.open(std::move(file).value(), options);
  if (!opened.ok()) co_return;
  BlockNodeRef node = std::move(opened).value();
  {
    BlockBackend backend(node);
    const std::uint64_t disk = backend.size();
    std::vector<std::byte> pattern(5000, std::byte{0x5a});
    auto write_at = [&](std::uint64_t offset, std::size_t bytes) -> coro::Task<void> {
      if (offset >= disk) co_return;
      const std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(bytes, disk - offset));
      (void)co_await backend.write(offset, std::span<const std::byte>(pattern).first(n));
    };
    co_await write_at(0, 4096);
    co_await write_at(disk / 2 + 1, 5000);
    if (disk >= 2 * 65536) {
      (void)co_await backend.write_zeroes(disk / 4 / 512 * 512, 65536, kMayUnmap);
      (void)co_await backend.discard(disk / 8 / 512 * 512, 65536);
    }
    co_await write_at(disk - std::min<std::uint64_t>(disk, 700), 700);
    (void)co_await backend.flush();
  }
  (void)co_await node->close();
  node.reset();
  base::Result<BlockNodeRef> again = open_file(scratch_path(), true);
  if (again.ok()) (void)co_await format.check(again.value(), RepairMode::kNone);
}

coro::Task<void> exercise(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  round_trip(bytes);
  if (!write_scratch(data, size)) co_return;
  const ImageFormat& format = qcow2_format();
  {
    base::Result<BlockNodeRef> file = open_file(scratch_path(), true);
    if (!file.ok()) co_return;
    (void)co_await format.check(file.value(), RepairMode::kNone);
  }
  base::Result<BlockNodeRef> file = open_file(scratch_path(), true);
  if (!file.ok()) co_return;
  BlockResult<BlockNodeRef> opened = co_await format.open(std::move(file).value(), open_options());
  if (!opened.ok()) co_return;
  BlockNodeRef node = std::move(opened).value();
  {
    BlockBackend backend(node);
    const std::uint64_t disk = backend.size();
    co_await read_some(backend, 0);
    co_await read_some(backend, disk / 2 + 1);
    co_await read_some(backend, disk - std::min<std::uint64_t>(disk, 5000));
    std::uint64_t offset = 0;
    for (int step = 0; step < kStatusSteps && offset < disk; ++step) {
      const BlockStatus status = co_await backend.block_status(offset, disk - offset);
      if (status.bytes == 0 || status.error) break;
      if (step < 4 && (status.flags & kStatusData)) co_await read_some(backend, offset);
      offset += status.bytes;
    }
  }
  (void)co_await format.describe(*node);
  (void)co_await format.list_snapshots(*node);
  (void)co_await format.check(node, RepairMode::kNone);
  (void)co_await node->close();
  node.reset();
  co_await write_some(format);
}

struct Seed {
  const char* name;
  std::uint64_t size;
  std::map<std::string, std::string> options;
};

void write_seeds(const char* directory) {
  std::filesystem::create_directories(directory);
  const Seed seeds[] = {
      {"v3-512", 1 << 20, {{"cluster_size", "512"}}},
      {"v2-512", 1 << 20, {{"cluster_size", "512"}, {"compat", "0.10"}}},
      {"v3-4k-rc1", 4 << 20, {{"cluster_size", "4096"}, {"refcount_bits", "1"}}},
      {"v3-512-prealloc", 24 << 10, {{"cluster_size", "512"}, {"preallocation", "metadata"}}},
      {"v3-1k-backing", 1 << 20,
       {{"cluster_size", "1024"}, {"backing_file", "base.raw"}, {"backing_fmt", "raw"}}},
      {"v3-16k-extl2", 1 << 20, {{"cluster_size", "16384"}, {"extended_l2", "on"}}},
  };
  for (const Seed& seed : seeds) {
    const std::string path = std::string(directory) + "/" + seed.name;
    base::Result<BlockNodeRef> file = open_file(path, FileOptions{false, false, true});
    if (!file.ok()) std::exit(1);
    CreateRequest request;
    request.size = seed.size;
    request.options = seed.options;
    const BlockError created =
        coro::block_on(qcow2_format().create(*file.value(), std::move(request)));
    if (!created.ok()) {
      std::fprintf(stderr, "seed %s: %s\n", seed.name, created.message.c_str());
      std::exit(1);
    }
    (void)coro::block_on(file.value()->close());
  }
  std::exit(0);
}

}  // namespace
}  // namespace spindle::block::qcow2

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  if (const char* directory = std::getenv("SPINDLE_FUZZ_WRITE_SEEDS")) {
    spindle::block::qcow2::write_seeds(directory);
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace spindle;
  coro::block_on(block::qcow2::exercise(data, size));
  ::unlink(block::qcow2::scratch_path().c_str());
  return 0;
}
