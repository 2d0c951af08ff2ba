// spindle-img: a qemu-img-compatible image tool for the formats of the block layer's registry
// (create, info, check, convert, compare, map, resize, amend, rebase, commit,
// measure, bench, snapshot, bitmap). Options, output formats and exit codes follow qemu-img
// (reference/qed.md §4); errors print "spindle-img: <message>" on stderr and exit 1 unless the
// subcommand's qemu-img counterpart uses another code. The tool is single-threaded: every
// subcommand drives its coroutines with coro::block_on on the main context.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "block/format_registry.h"
#include "commands.h"
#include "tool_failure.h"

namespace {

using namespace spindle::img;

// `resize IMG -1G`: a negative size looks like an option to the parser, so move it behind "--".
std::vector<std::string> protect_negative_sizes(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args.front() != "resize") return args;
  std::vector<std::string> options, sizes;
  for (const std::string& arg : args) {
    const bool negative_size = arg.size() > 1 && arg[0] == '-' && arg[1] >= '0' && arg[1] <= '9';
    (negative_size ? sizes : options).push_back(arg);
  }
  if (sizes.empty()) return args;
  options.push_back("--");
  options.insert(options.end(), sizes.begin(), sizes.end());
  return options;
}

void add_output_option(CLI::App* command, std::string& output) {
  command->add_option("--output", output, "Output format: human or json (default human)")
      ->check(CLI::IsMember({"human", "json"}));
}

// The registry's formats that can be opened (or created), as "a, b or c".
std::string format_names(bool creatable) {
  std::vector<std::string> names;
  for (const spindle::block::ImageFormat* format : spindle::block::image_formats()) {
    if (creatable ? format->can_create() : format->can_open()) names.emplace_back(format->name());
  }
  std::string text;
  for (std::size_t i = 0; i < names.size(); ++i) {
    text += (i == 0 ? "" : i + 1 == names.size() ? " or " : ", ") + names[i];
  }
  return text;
}

// Runs a subcommand; a failure it throws is printed as "spindle-img: MESSAGE" (after what it
// printed on stdout) and becomes the exit status.
template <typename Subcommand>
int run_reporting_failures(Subcommand&& subcommand) {
  try {
    return subcommand();
  } catch (const ToolFailure& failure) {
    std::fflush(stdout);
    std::fprintf(stderr, "spindle-img: %s\n", failure.what());
    return failure.exit_code();
  } catch (const std::exception& error) {
    std::fflush(stdout);
    std::fprintf(stderr, "spindle-img: %s\n", error.what());
    return 1;
  }
}

}  // namespace

int main(int argc, char** argv) {
  const std::string readable = format_names(false), creatable = format_names(true);
  CLI::App app{"spindle-img: create, inspect, check, convert and compare disk images "
               "(qemu-img compatible; formats: " + readable + ")"};
  app.set_version_flag("-V,--version", "spindle-img 0.1");
  app.require_subcommand(1);

  CreateOptions create;
  CLI::App* create_command = app.add_subcommand("create", "Create a new image");
  create_command->add_option("-f", create.format,
                             "Image format: " + creatable + " (default raw)");
  create_command->add_option("-o", create.options,
                             "Creation options key=value,... with qemu-img's names (cluster_size, "
                             "backing_file, backing_fmt, preallocation, ...)");
  create_command->add_option("-b", create.backing_file, "Backing file");
  create_command->add_option("-F", create.backing_format, "Backing file format");
  create_command->add_flag("-q", create.quiet, "Quiet: print nothing on success");
  create_command->add_option("filename", create.filename, "Image to create")->required();
  create_command->add_option("size", create.size,
                             "Virtual size, with an optional k, M, G, T, P or E suffix "
                             "(default: the backing file's size)");

  InfoOptions info;
  CLI::App* info_command = app.add_subcommand("info", "Show information about an image");
  info_command->add_option("-f", info.format, "Image format: " + readable + " (default: probe)");
  add_output_option(info_command, info.output);
  info_command->add_flag("--backing-chain", info.backing_chain,
                         "Show every image of the backing chain");
  info_command->add_option("filename", info.filename, "Image")->required();

  CheckOptions check;
  CLI::App* check_command = app.add_subcommand(
      "check", "Check an image's consistency (exit 0 clean, 1 check failed, 2 corruptions, "
               "3 leaks, 63 not supported by the format)");
  check_command->add_option("-f", check.format, "Image format (default: probe)");
  check_command->add_option("-r", check.repair, "Repair: leaks or all")
      ->check(CLI::IsMember({"leaks", "all"}));
  add_output_option(check_command, check.output);
  check_command->add_flag("-q", check.quiet, "Quiet");
  check_command->add_option("filename", check.filename, "Image")->required();

  ConvertOptions convert;
  CLI::App* convert_command = app.add_subcommand("convert", "Copy an image into a new image");
  convert_command->add_option("-f", convert.source_format, "Source format (default: probe)");
  convert_command->add_option("-O", convert.target_format,
                              "Target format: " + creatable + " (default raw)");
  convert_command->add_option("-o", convert.options, "Target creation options (see create)");
  convert_command->add_flag("-p", convert.progress, "Show progress on stdout");
  convert_command->add_option("-B", convert.backing,
                              "Backing file of the target (as the source's backing file): only "
                              "what the source's top image allocates is copied");
  convert_command->add_option("-F", convert.backing_format, "Format of the -B backing file");
  convert_command->add_option("-t", convert.cache,
                              "The target's cache mode: none, writeback, writethrough, directsync "
                              "or unsafe (the default: no flushes, as qemu-img)");
  convert_command->add_option("-T", convert.source_cache,
                              "The source's cache mode (default writeback)");
  convert_command->add_flag("-n", convert.no_create,
                            "Write into the existing TARGET instead of creating it");
  convert_command->add_flag("-c", convert.compress,
                            "Compress the target's clusters (qcow2; -o compression_type=zlib|zstd)");
  convert_command->add_option("-S", convert.sparse_size,
                              "Zero-filled blocks of this size are left unallocated "
                              "(default 4k; 0: allocate everything)");
  convert_command->add_flag("-W", convert.out_of_order,
                            "Allow out-of-order writes (always the case here)");
  convert_command->add_option("-m", convert.coroutines,
                              "Parallel copying coroutines, 1..16 (default 8)");
  convert_command->add_flag("-q", convert.quiet, "Quiet");
  convert_command->add_option("-l", convert.snapshot,
                              "Copy this internal snapshot of the source: ID_OR_NAME or "
                              "snapshot.id=ID,snapshot.name=NAME");
  convert_command->add_flag("--bitmaps", convert.bitmaps,
                            "Copy the source's persistent dirty bitmaps (qcow2 to qcow2)");
  convert_command->add_flag("--skip-broken-bitmaps", convert.skip_broken_bitmaps,
                            "With --bitmaps: skip the source's bitmaps that are in use");
  convert_command->add_option("source", convert.source, "Source image")->required();
  convert_command->add_option("target", convert.target, "Target image (created)")->required();

  CompareOptions compare;
  CLI::App* compare_command = app.add_subcommand(
      "compare", "Compare two images' contents (exit 0 identical, 1 different, 2 error)");
  compare_command->add_option("-f", compare.format_a, "First image's format (default: probe)");
  compare_command->add_option("-F", compare.format_b, "Second image's format (default: probe)");
  compare_command->add_flag("-s", compare.strict,
                            "Strict: sizes and allocation must match as well");
  compare_command->add_flag("-p", compare.progress, "Show progress on stdout");
  compare_command->add_flag("-q", compare.quiet, "Quiet");
  compare_command->add_option("image1", compare.image_a, "First image")->required();
  compare_command->add_option("image2", compare.image_b, "Second image")->required();

  MapOptions map;
  CLI::App* map_command = app.add_subcommand("map", "Show where an image's data lives");
  map_command->add_option("-f", map.format, "Image format (default: probe)");
  add_output_option(map_command, map.output);
  map_command->add_option("filename", map.filename, "Image")->required();

  AmendOptions amend;
  CLI::App* amend_command =
      app.add_subcommand("amend", "Change an image's format options (qcow2: compat, "
                                  "lazy_refcounts, size)");
  amend_command->add_option("-f", amend.format, "Image format (default: probe)");
  CLI::Option* amend_options =
      amend_command->add_option("-o", amend.options, "Options to change: key=value,...");
  amend_command->add_flag("-p", amend.progress, "Show progress on stdout");
  amend_command->add_flag("-q", amend.quiet, "Quiet");
  amend_command->add_option("filename", amend.filename, "Image")->required();

  RebaseOptions rebase;
  CLI::App* rebase_command = app.add_subcommand(
      "rebase", "Change an image's backing file (safe: the guest view is kept; -u: the header "
                "only)");
  rebase_command->add_option("-f", rebase.format, "Image format (default: probe)");
  rebase_command->add_option("-t", rebase.cache, "The image's cache mode (default writeback)");
  rebase_command->add_option("-T", rebase.source_cache,
                             "The backing files' cache mode (default writeback)");
  rebase_command->add_flag("-p", rebase.progress, "Show progress on stdout");
  rebase_command->add_flag("-q", rebase.quiet, "Quiet");
  rebase_command->add_flag("-u", rebase.unsafe,
                           "Unsafe: only record the new backing file (it need not exist)");
  CLI::Option* rebase_backing = rebase_command->add_option(
      "-b", rebase.backing, "New backing file, relative to the image's directory (\"\": none)");
  rebase_command->add_option("-F", rebase.backing_format, "New backing file's format");
  rebase_command->add_option("filename", rebase.filename, "Image")->required();

  CommitOptions commit;
  CLI::App* commit_command = app.add_subcommand(
      "commit", "Copy an image's data into its backing file (or -b base) and empty it");
  commit_command->add_option("-f", commit.format, "Image format (default: probe)");
  commit_command->add_option("-t", commit.cache, "Cache mode (default writeback)");
  commit_command->add_option("-b", commit.base,
                             "Base image of the backing chain to commit into (implies -d)");
  commit_command->add_option("-r", commit.rate,
                             "Rate limit in bytes per second (accepted; not enforced)");
  commit_command->add_flag("-d", commit.drop, "Do not empty the image afterwards");
  commit_command->add_flag("-p", commit.progress, "Show progress on stdout");
  commit_command->add_flag("-q", commit.quiet, "Quiet");
  commit_command->add_option("filename", commit.filename, "Image")->required();

  MeasureOptions measure;
  CLI::App* measure_command = app.add_subcommand(
      "measure", "Show how large a new image of a format would be, for a size or an image");
  add_output_option(measure_command, measure.output);
  measure_command->add_option("-O", measure.target_format, "Target format (default raw)");
  measure_command->add_option("-o", measure.options, "Target options key=value,...")
      ->allow_extra_args(false);
  measure_command->add_option("--size", measure.size, "Virtual size (k/M/G/T/P/E suffixes)");
  measure_command->add_option("-f", measure.source_format, "Source format (default: probe)");
  measure_command->add_option("-l", measure.snapshot, "Internal snapshot of the source");
  measure_command->add_flag("-U,--force-share", measure.force_share, "Open without locks");
  measure_command->add_option("filename", measure.filename, "Image to measure");

  ResizeOptions resize;
  CLI::App* resize_command = app.add_subcommand("resize", "Change an image's virtual size");
  resize_command->add_option("-f", resize.format, "Image format (default: probe)");
  resize_command->add_flag("--shrink", resize.shrink, "Allow shrinking (raw images only)");
  resize_command->add_flag("-q", resize.quiet, "Quiet");
  resize_command->add_option("filename", resize.filename, "Image")->required();
  resize_command->add_option("size", resize.size, "New size: N, +N or -N (k/M/G/T/P/E suffixes)")
      ->required();

  BenchOptions bench;
  CLI::App* bench_command = app.add_subcommand(
      "bench", "Run a sequential read or write benchmark on an image (qemu-img bench)");
  bench_command->add_option("-c", bench.count, "Number of requests (default 75000)");
  bench_command->add_option("-d", bench.depth, "Requests in flight (default 64)");
  bench_command->add_option("-f", bench.format, "Image format (default: probe)");
  bench_command->add_option("--flush-interval", bench.flush_interval,
                            "Write tests: flush whenever the unsent requests are a multiple of "
                            "this (at least the depth)");
  bench_command->add_option("-i", bench.aio,
                            "AIO backend: threads (thread pool), native or io_uring (io_uring); "
                            "default: SPINDLE_AIO, else io_uring when available");
  bench_command->add_flag("-n", bench.native_aio, "Native AIO (io_uring; needs -t none/directsync)");
  bench_command->add_flag("--no-drain", bench.no_drain,
                          "Flush without waiting for the requests in flight first");
  bench_command->add_option("-o", bench.offset, "Offset of the first request (default 0)");
  bench_command->add_option("--pattern", bench.pattern, "Byte written by -w (default 0)");
  bench_command->add_flag("-q", bench.quiet, "Quiet (accepted; the report is printed anyway)");
  bench_command->add_option("-s", bench.buffer_size, "Request size (default 4096)");
  bench_command->add_option("-S", bench.step_size,
                            "Offset step between requests (default and 0: the request size)");
  bench_command->add_option("-t", bench.cache,
                            "Cache mode: none, writeback (default), writethrough, directsync, "
                            "unsafe");
  bench_command->add_flag("-w", bench.write, "Write instead of read");
  bench_command->add_flag("-U,--force-share", bench.force_share,
                          "Open shared (accepted; spindle-img takes no image locks)");
  bench_command->add_option("filename", bench.filename, "Image")->required();

  SnapshotOptions snapshot;
  std::string snapshot_create, snapshot_apply, snapshot_delete;
  CLI::App* snapshot_command = app.add_subcommand(
      "snapshot", "List, create, apply or delete internal snapshots (qcow2)");
  bool snapshot_list = false;
  CLI::Option* snapshot_list_option =
      snapshot_command->add_flag("-l", snapshot_list, "List the snapshots");
  CLI::Option* snapshot_create_option =
      snapshot_command->add_option("-c", snapshot_create, "Create a snapshot of this name");
  CLI::Option* snapshot_apply_option = snapshot_command->add_option(
      "-a", snapshot_apply, "Apply (revert the image to) the snapshot of this id or name");
  CLI::Option* snapshot_delete_option =
      snapshot_command->add_option("-d", snapshot_delete, "Delete the snapshot of this name");
  snapshot_command->add_option("-f", snapshot.format, "Image format (default: probe)");
  snapshot_command->add_flag("-q", snapshot.quiet, "Quiet");
  snapshot_command->add_flag("-U,--force-share", snapshot.force_share,
                             "Open shared (-l only; spindle-img takes no image locks)");
  snapshot_command->add_option("filename", snapshot.filename, "Image")->required();

  // `bitmap` reads its own options: the order of its actions matters (bitmap_command.cc).
  app.add_subcommand("bitmap",
                     "Add, remove, clear, enable, disable or merge persistent dirty bitmaps "
                     "(qcow2)")
      ->allow_extras();
  if (argc > 1 && std::strcmp(argv[1], "bitmap") == 0) {
    return run_reporting_failures([&] { return run_bitmap(argc - 1, argv + 1); });
  }

  if (argc > 1 && argv[1][0] != '-') {
    bool known = false;
    for (const CLI::App* command : app.get_subcommands({})) known |= command->get_name() == argv[1];
    if (!known) {
      std::fprintf(stderr, "spindle-img: Command not found: %s\n", argv[1]);
      std::fprintf(stderr, "Try 'spindle-img --help' for more information.\n");
      return 1;
    }
  }
  std::vector<std::string> args = protect_negative_sizes(argc, argv);
  std::reverse(args.begin(), args.end());  // CLI11 takes a vector in reverse order
  try {
    app.parse(args);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "spindle-img: %s\n", e.what());
    std::fprintf(stderr, "Try 'spindle-img --help' for more information.\n");
    return 1;
  }

  return run_reporting_failures([&]() -> int {
    if (create_command->parsed()) return run_create(create);
    if (info_command->parsed()) return run_info(info);
    if (measure_command->parsed()) return run_measure(measure);
    if (check_command->parsed()) return run_check(check);
    if (convert_command->parsed()) return run_convert(convert);
    if (compare_command->parsed()) return run_compare(compare);
    if (map_command->parsed()) return run_map(map);
    if (resize_command->parsed()) return run_resize(resize);
    if (amend_command->parsed()) {
      amend.options_given = amend_options->count() > 0;
      return run_amend(amend);
    }
    if (rebase_command->parsed()) {
      rebase.backing_given = rebase_backing->count() > 0;
      return run_rebase(rebase);
    }
    if (commit_command->parsed()) return run_commit(commit);
    if (bench_command->parsed()) return run_bench(bench);
    if (snapshot_command->parsed()) {
      const std::pair<CLI::Option*, char> actions[] = {{snapshot_list_option, 'l'},
                                                       {snapshot_create_option, 'c'},
                                                       {snapshot_apply_option, 'a'},
                                                       {snapshot_delete_option, 'd'}};
      for (const auto& [option, action] : actions) {
        if (option->count() == 0) continue;
        snapshot.actions += static_cast<int>(option->count());
        snapshot.action = action;
      }
      snapshot.name = snapshot.action == 'c'   ? snapshot_create
                      : snapshot.action == 'a' ? snapshot_apply
                                               : snapshot_delete;
      return run_snapshot(snapshot);
    }
    return 1;
  });
}
