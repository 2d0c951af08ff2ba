// The spindle-img subcommands: one options struct and one entry point each, filled in and
// called by main.cc's command line. Each entry point prints its results on stdout and returns
// the process exit status (qemu-img's codes); errors throw ToolFailure.
//
// Thread-safety: call from the main thread only (the tool is single-threaded; asynchronous
// work runs through coro::block_on on the main context).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace spindle::img {

struct CreateOptions {
  std::string format = "raw";
  std::string options;  // -o key=value,...
  std::string backing_file;
  std::string backing_format;
  std::string filename;
  std::string size;  // empty: take the backing file's size
  bool quiet = false;
};
int run_create(const CreateOptions& options);

struct InfoOptions {
  std::string format;
  std::string output = "human";
  bool backing_chain = false;
  std::string filename;
};
int run_info(const InfoOptions& options);

struct CheckOptions {
  std::string format;
  std::string output = "human";
  std::string repair;  // "", "leaks" or "all"
  std::string filename;
  bool quiet = false;
};
int run_check(const CheckOptions& options);

struct ConvertOptions {
  std::string source_format;
  std::string target_format = "raw";
  std::string options;  // -o key=value,...
  bool progress = false;
  bool compress = false;  // -c: compressed clusters (formats that can_compress())
  bool no_create = false;  // -n: the target exists (not created; zeroed over the source's size)
  std::string backing;         // -B: the target's backing file (content as the source's own)
  std::string backing_format;  // -F
  std::string sparse_size = "4k";
  bool out_of_order = false;
  int coroutines = 8;
  std::string source;
  std::string target;
  bool quiet = false;
  bool bitmaps = false;              // --bitmaps: copy the source's persistent bitmaps
  bool skip_broken_bitmaps = false;  // --skip-broken-bitmaps: ...except those in use
  std::string cache = "unsafe";            // -t: the target's (qemu-img convert's default)
  std::string source_cache = "writeback";  // -T
  std::string snapshot;                    // -l: read this internal snapshot of the source
};
int run_convert(const ConvertOptions& options);

struct CompareOptions {
  std::string format_a;
  std::string format_b;
  bool strict = false;
  bool progress = false;  // -p
  std::string image_a;
  std::string image_b;
  bool quiet = false;
};
int run_compare(const CompareOptions& options);

struct MapOptions {
  std::string format;
  std::string output = "human";
  std::string filename;
};
int run_map(const MapOptions& options);

struct ResizeOptions {
  std::string format;
  bool shrink = false;
  std::string filename;
  std::string size;  // "N", "+N" or "-N"
  bool quiet = false;
};
int run_resize(const ResizeOptions& options);

struct AmendOptions {
  std::string format;
  std::string options;  // -o key=value,...
  bool options_given = false;
  bool progress = false;
  bool quiet = false;
  std::string filename;
};
int run_amend(const AmendOptions& options);

// qemu-img rebase: safe mode copies into the image what the old and new backing chains hold
// differently where the image allocates nothing, then records the new backing file; -u only
// records it. -b "" (or -u without -b): no backing file.
struct RebaseOptions {
  std::string format;          // -f
  std::string cache = "writeback";         // -t: the image's cache mode
  std::string source_cache = "writeback";  // -T: the backing files' cache mode
  bool progress = false;
  bool quiet = false;
  bool unsafe = false;         // -u
  bool backing_given = false;  // -b was given (its value may be "")
  std::string backing;         // -b, as the image will record it
  std::string backing_format;  // -F
  std::string filename;
};
int run_rebase(const RebaseOptions& options);

// qemu-img commit: copies what the image (and, with -b, every image above the base) allocates
// into the base (default: the image's backing file); then, unless -d or -b, empties the image
// where its format can (qcow2).
struct CommitOptions {
  std::string format;              // -f
  std::string cache = "writeback";  // -t
  std::string base;                // -b: an image of the backing chain, by name
  std::string rate;                // -r: bytes per second (validated; not enforced)
  bool drop = false;               // -d: leave the image as it is
  bool progress = false;
  bool quiet = false;
  std::string filename;
};
int run_commit(const CommitOptions& options);

// qemu-img measure: exactly one of `size` (--size) and `filename`.
struct MeasureOptions {
  std::string output = "human";
  std::string target_format = "raw";  // -O
  std::vector<std::string> options;   // each -o key=value,... (later keys win)
  std::string size;                   // --size N
  std::string source_format;          // -f
  std::string snapshot;               // -l
  bool force_share = false;           // -U: accepted; spindle-img takes no image locks
  std::string filename;
};
int run_measure(const MeasureOptions& options);

// Numbers stay text here: run_bench() parses them to print qemu-img's messages.
struct BenchOptions {
  std::string count = "75000";
  std::string depth = "64";
  std::string format;
  std::string flush_interval;  // empty: never flush
  std::string aio;             // threads, native or io_uring; empty: the runtime's default
  bool native_aio = false;     // -n
  bool no_drain = false;
  std::string offset = "0";
  std::string pattern = "0";
  bool quiet = false;  // accepted; qemu-img bench prints its report anyway
  std::string buffer_size = "4096";
  std::string step_size;  // empty or 0: the buffer size
  std::string cache = "writeback";
  bool write = false;
  bool force_share = false;  // -U: accepted; spindle-img takes no image locks
  std::string filename;
};
int run_bench(const BenchOptions& options);

// qemu-img snapshot: exactly one of -l/-c/-a/-d (none: the image is opened writable and
// nothing is done, as qemu-img 7.2 does; more than one: "Cannot mix", exit 1).
struct SnapshotOptions {
  char action = 0;   // 'l', 'c', 'a', 'd' or 0
  int actions = 0;   // how many of -l/-c/-a/-d were given
  std::string name;  // -c/-a/-d's snapshot name (-a: id or name)
  std::string format;  // -f (qemu-img 7.2's snapshot probes; later versions take -f)
  bool quiet = false;        // -q: accepted; nothing is printed on success anyway
  bool force_share = false;  // -U: -l only (spindle-img takes no image locks)
  std::string filename;
};
int run_snapshot(const SnapshotOptions& options);

// qemu-img bitmap: argv[0] is "bitmap"; the options are parsed in bitmap_command.cc, where
// their order matters (the actions run in command-line order).
int run_bitmap(int argc, char** argv);

}  // namespace spindle::img
