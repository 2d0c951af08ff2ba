// spindle-nbd: serves disk images over NBD. Command line modelled on qemu-nbd, plus several
// exports per process, socket activation, a stdin/stdout mode for libnbd tools, and live
// statistics. See `spindle-nbd --help` and docs/spindle-nbd.md.
#include <fcntl.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "../common/background.h"
#include "aio/context.h"
#include "aio/file_backend.h"
#include "aio/uring_probe.h"
#include "block/block_backend.h"
#include "block/cache_mode.h"
#include "block/drivers/direct_file.h"
#include "block/drivers/file.h"
#include "block/format_registry.h"
#include "block/image_chain.h"
#include "block/snapshot_param.h"
#include "coro/block_on.h"
#include "coro/coroutine.h"
#include "export/nbd/server.h"
#include "io/socket.h"
#include "io/tls_credentials.h"

namespace {

using namespace spindle;

struct ExportSpec {
  std::string name;
  std::string file;
  std::string format;
  std::string description;
  bool read_only = false;
  std::optional<block::SnapshotParam> snapshot;  // -l: serve this internal snapshot
};

[[noreturn]] void die(const std::string& message) {
  std::fprintf(stderr, "spindle-nbd: %s\n", message.c_str());
  std::exit(1);
}

// "name=foo,file=/x.img,format=qcow2,read-only=on"
ExportSpec parse_export(const std::string& text) {
  ExportSpec spec;
  std::size_t start = 0;
  while (start <= text.size()) {
    const std::size_t comma = text.find(',', start);
    const std::string item = text.substr(start, comma == std::string::npos ? std::string::npos
                                                                           : comma - start);
    const std::size_t equals = item.find('=');
    if (equals == std::string::npos) die("--export: expected key=value, got '" + item + "'");
    const std::string key = item.substr(0, equals), value = item.substr(equals + 1);
    if (key == "name") {
      spec.name = value;
    } else if (key == "file") {
      spec.file = value;
    } else if (key == "format") {
      spec.format = value;
    } else if (key == "description") {
      spec.description = value;
    } else if (key == "read-only") {
      if (value != "on" && value != "off" && value != "true" && value != "false") {
        die("--export: read-only must be on or off");
      }
      spec.read_only = value == "on" || value == "true";
    } else {
      die("--export: unknown key '" + key + "'");
    }
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  if (spec.file.empty()) die("--export: file= is required");
  return spec;
}

std::string human_size(std::uint64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  double value = static_cast<double>(bytes);
  int unit = 0;
  while (value >= 1024 && unit < 5) {
    value /= 1024;
    ++unit;
  }
  char text[32];
  std::snprintf(text, sizeof text, unit ? "%.1f %s" : "%.0f %s", value, units[unit]);
  return text;
}

std::shared_ptr<block::BlockBackend> open_export(const ExportSpec& spec,
                                                 const block::CacheMode& cache) {
  if (!spec.format.empty()) {
    const block::ImageFormat* format = block::find_format(spec.format);
    if (!format) die("Unknown file format '" + spec.format + "'");
    if (!format->can_open()) {
      die("Could not open '" + spec.file + "': image format '" + spec.format +
          "' is not supported by spindle-nbd");
    }
  }
  block::ChainOptions options;
  options.read_only = spec.read_only;
  options.open_file = [cache](const std::string& path, bool read_only) {
    // O_DIRECT files sit behind an aligning backend: image headers and format probes issue
    // requests smaller than a sector.
    base::Result<block::BlockNodeRef> node = cache.direct
                                                 ? block::open_direct_file(path, read_only)
                                                 : block::open_file(path, read_only);
    if (node.ok()) {
      node = block::wrap_flush_mode(std::move(node).value(), block::file_flush_mode(cache));
    }
    return node;
  };
  auto chain = coro::block_on(block::open_chain(spec.file, spec.format, std::move(options)));
  if (!chain) {
    std::string message = chain.error().message;
    if (message.starts_with("image format '")) message += " by spindle-nbd";
    die("Could not open '" + spec.file + "': " + message + " (" +
        std::strerror(chain.error().error) + ")");
  }
  if (spec.snapshot) {
    const block::BlockError loaded = coro::block_on(
        block::load_snapshot_view(chain.value().format(), *chain.value().root, *spec.snapshot));
    if (!loaded.ok()) die("Failed to load snapshot: " + loaded.message);
  }
  if (chain.value().probed() && !spec.read_only && chain.value().format().name() == "raw") {
    std::fprintf(stderr,
                 "WARNING: Image format was not specified for '%s' and probing guessed raw.\n"
                 "         Automatically detecting the format is dangerous for raw images, "
                 "write operations on block 0 will be restricted.\n"
                 "         Specify the 'raw' format explicitly to remove the restrictions.\n",
                 spec.file.c_str());
  }
  return std::make_shared<block::BlockBackend>(
      block::with_write_through(std::move(chain.value().root), cache));
}

// Systemd-style socket activation: LISTEN_PID is us, LISTEN_FDS sockets start at fd 3.
std::vector<int> activated_sockets() {
  const char* pid = std::getenv("LISTEN_PID");
  const char* count = std::getenv("LISTEN_FDS");
  if (!pid || !count || std::atoi(pid) != static_cast<int>(::getpid())) return {};
  std::vector<int> fds;
  for (int i = 0; i < std::atoi(count); ++i) fds.push_back(3 + i);
  ::unsetenv("LISTEN_PID");
  ::unsetenv("LISTEN_FDS");
  return fds;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"spindle-nbd: serve disk images over the Network Block Device protocol"};
  app.set_version_flag("--version", "spindle-nbd 0.1");
  std::string image, format, export_name, description, socket_path, bind = "127.0.0.1";
  std::string aio = "auto", cache = "writeback", discard = "ignore", pid_file;
  std::string zero_copy = "remote";
  std::string load_snapshot;
  std::string tls, tls_creds, tls_psk;
  bool tls_verify_peer = false;
  std::vector<std::string> export_specs;
  int port = 10809, shared = 100;
  unsigned io_threads = 0, handshake_timeout = 10;
  bool read_only = false, persistent = false, fork_server = false, stdio = false, stats = false;

  std::string readable;
  for (const block::ImageFormat* known : block::image_formats()) {
    if (known->can_open()) readable += (readable.empty() ? "" : ", ") + std::string(known->name());
  }
  app.add_option("image", image, "Image file to serve (" + readable + ")");
  app.add_option("-f,--format", format, "Image format: " + readable + " (default: probe)");
  app.add_option("-x,--export-name", export_name, "Export name (default: empty)");
  app.add_option("-D,--description", description, "Export description");
  app.add_flag("-r,--read-only", read_only, "Export read-only");
  app.add_option("-l,--load-snapshot", load_snapshot,
                 "Serve this internal snapshot of IMAGE, read-only: ID_OR_NAME or "
                 "snapshot.id=ID,snapshot.name=NAME");
  app.add_flag("-t,--persistent", persistent, "Keep serving after the last client disconnects");
  app.add_option("-e,--shared", shared,
                 "Maximum simultaneous clients (default 100; 0: unlimited, as in qemu-nbd)")
      ->check(CLI::Range(0, 100000));
  app.add_option("-k,--socket", socket_path, "Listen on this Unix socket");
  app.add_option("-b,--bind", bind, "Address to listen on (default 127.0.0.1)");
  app.add_option("-p,--port", port, "TCP port (default 10809)")->check(CLI::Range(0, 65535));
  app.add_option("--iothreads", io_threads, "Event-loop threads (default: one per CPU)");
  app.add_option("--aio", aio,
                 "File I/O engine: auto (io_uring if it works here, else the thread pool; the "
                 "default), io_uring or threads")
      ->check(CLI::IsMember({"auto", "io_uring", "threads"}));
  app.add_option("--cache", cache,
                 "Cache mode: none (O_DIRECT), writeback (the default), writethrough (every "
                 "write durable on completion), directsync (both) or unsafe (flushes ignored)")
      ->check(CLI::IsMember({"none", "writeback", "writethrough", "directsync", "unsafe"}));
  app.add_option("--discard", discard, "TRIM handling: ignore or unmap")
      ->check(CLI::IsMember({"ignore", "unmap"}));
  app.add_option("--zero-copy", zero_copy,
                 "sendfile() for large reads of raw files: remote (clients on other machines, "
                 "the default), always or never")
      ->check(CLI::IsMember({"remote", "always", "never"}));
  // One value per --export, so that a trailing IMAGE stays the positional argument.
  app.add_option("--export", export_specs,
                 "Add an export: name=N,file=F[,format=FMT][,read-only=on][,description=D]")
      ->allow_extra_args(false);
  app.add_flag("-s,--stdio", stdio, "Serve one client on stdin/stdout (for libnbd tools)");
  app.add_flag("--fork", fork_server, "Fork into the background once ready");
  app.add_option("--pid-file", pid_file, "Write the server's pid to this file");
  app.add_option("--handshake-timeout", handshake_timeout, "Seconds to finish the handshake");
  std::uint64_t max_bytes_in_flight = exports::nbd::ServerOptions{}.max_bytes_in_flight;
  app.add_option("--max-bytes-in-flight", max_bytes_in_flight,
                 "Request bytes all clients together may have in flight (default 256M; "
                 "suffixes K, M, G)")
      ->transform(CLI::AsSizeValue(false))
      ->check(CLI::Range(std::uint64_t{1} << 20, std::uint64_t{1} << 40));
  app.add_flag("--stats", stats, "Print per-export statistics at exit (also on SIGUSR1)");
  app.add_option("--tls", tls,
                 "TLS: off, on (clients choose) or require (default when credentials are given)")
      ->check(CLI::IsMember({"off", "on", "require"}));
  app.add_option("--tls-creds", tls_creds,
                 "X.509 credentials directory: ca-cert.pem, server-cert.pem, server-key.pem");
  app.add_option("--tls-psk", tls_psk, "TLS-PSK key file: username:hexkey lines (psktool)");
  app.add_flag("--tls-verify-peer", tls_verify_peer,
               "Require X.509 clients to present a certificate signed by ca-cert.pem");
  CLI11_PARSE(app, argc, argv);

  std::shared_ptr<const io::TlsCredentials> tls_credentials;
  exports::nbd::TlsMode tls_mode = exports::nbd::TlsMode::off;
  if (!tls_creds.empty() && !tls_psk.empty()) die("give --tls-creds or --tls-psk, not both");
  if (tls_verify_peer && tls_creds.empty()) die("--tls-verify-peer needs --tls-creds");
  const bool have_credentials = !tls_creds.empty() || !tls_psk.empty();
  if (tls.empty()) tls = have_credentials ? "require" : "off";
  if (tls != "off") {
    if (!have_credentials) die("--tls=" + tls + " needs --tls-creds DIR or --tls-psk FILE");
    std::string error;
    tls_credentials = tls_creds.empty()
                          ? io::TlsCredentials::server_psk(tls_psk, error)
                          : io::TlsCredentials::server_x509(tls_creds, tls_verify_peer, error);
    if (!tls_credentials) die(error);
    tls_mode = tls == "on" ? exports::nbd::TlsMode::on : exports::nbd::TlsMode::require;
  }
  std::vector<ExportSpec> specs;
  if (!load_snapshot.empty() && image.empty()) die("-l needs an IMAGE argument");
  if (!image.empty()) {
    specs.push_back({export_name, image, format, description, read_only, std::nullopt});
    if (!load_snapshot.empty()) {
      block::BlockResult<block::SnapshotParam> parsed = block::parse_snapshot_param(load_snapshot);
      if (!parsed) die(parsed.error().message);
      specs.back().snapshot = std::move(parsed).value();
      specs.back().read_only = true;  // as qemu-nbd: -l implies -r
    }
  }
  for (const auto& text : export_specs) {
    ExportSpec spec = parse_export(text);
    spec.read_only = spec.read_only || read_only;
    specs.push_back(spec);
  }
  if (specs.empty()) die("no image given (see --help)");
  // The file I/O engine, probed once: --aio=auto falls back to the thread pool where io_uring
  // is refused (seccomp, kernel.io_uring_disabled, old kernels); --aio=io_uring insists.
  std::string engine = "threads (thread pool)";
  if (aio == "threads") {
    aio::set_file_backend(aio::FileBackend::threads);
  } else if (const aio::UringProbe uring = aio::probe_uring(); uring.available) {
    aio::set_file_backend(aio == "auto" ? aio::FileBackend::automatic
                                        : aio::FileBackend::io_uring);
    engine = "io_uring";
  } else if (aio == "io_uring") {
    die(std::string("--aio=io_uring: io_uring is unavailable here (") + uring.step + ": " +
        std::strerror(uring.error) + "); use --aio=auto or --aio=threads");
  } else {
    aio::set_file_backend(aio::FileBackend::threads);
    engine = std::string("threads (thread pool; io_uring unavailable: ") + uring.step + ": " +
             std::strerror(uring.error) + ")";
  }
  const std::string engine_line = "aio: " + engine + "\n";

  // --fork: the parent exits once the daemon is listening (or has failed).
  tools::Background background;
  if (fork_server && !stdio) background = tools::Background::fork_into_background(die);

  // Signals arrive through a signalfd on the main context: block them before any thread starts.
  sigset_t signals;
  sigemptyset(&signals);
  for (int sig : {SIGINT, SIGTERM, SIGUSR1, SIGHUP}) sigaddset(&signals, sig);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  std::vector<exports::nbd::ExportConfig> export_configs;
  for (const auto& spec : specs) {
    auto backend = open_export(spec, *block::parse_cache_mode(cache));
    export_configs.push_back({spec.name, spec.description, backend,
                              spec.read_only || backend->read_only(), discard == "unmap", true});
  }

  aio::Context& main = aio::main_context();
  exports::nbd::ServerOptions options;
  options.io_threads = io_threads;
  options.max_connections = shared == 0 ? std::numeric_limits<std::size_t>::max()  // unlimited
                                         : static_cast<std::size_t>(shared);
  options.handshake_timeout = std::chrono::seconds(handshake_timeout);
  options.max_bytes_in_flight = max_bytes_in_flight;
  options.tls_mode = tls_mode;
  options.tls_credentials = tls_credentials;
  options.zero_copy_reads = zero_copy == "always"  ? exports::nbd::ZeroCopyReads::always
                            : zero_copy == "never" ? exports::nbd::ZeroCopyReads::never
                                                   : exports::nbd::ZeroCopyReads::remote;
  exports::nbd::Server server(main, options, std::move(export_configs));

  std::string uri;
  if (stdio) {
    server.serve(std::make_unique<io::Channel>(::dup(STDIN_FILENO), nullptr));
  } else if (auto fds = activated_sockets(); !fds.empty()) {
    for (int fd : fds) {
      auto listener = io::Listener::adopt(fd);
      if (!listener) die("socket activation: fd " + std::to_string(fd) + " is not a listening socket");
      server.listen(std::move(listener.value()));
    }
    uri = "(socket activation)";
  } else if (!socket_path.empty()) {
    auto listener = io::Listener::unix_socket(socket_path);
    if (!listener) die("cannot listen on " + socket_path + ": " + std::strerror(listener.error()));
    server.listen(std::move(listener.value()));
    uri = std::string(tls_mode == exports::nbd::TlsMode::require ? "nbds" : "nbd") + "+unix:///" +
          server.exports()[0].name + "?socket=" + socket_path;
  } else {
    auto listener = io::Listener::tcp(bind, static_cast<std::uint16_t>(port));
    if (!listener) {
      die("cannot listen on " + bind + ":" + std::to_string(port) + ": " +
          std::strerror(listener.error()));
    }
    const bool v6 = bind.find(':') != std::string::npos;
    uri = std::string(tls_mode == exports::nbd::TlsMode::require ? "nbds" : "nbd") + "://" +
          (v6 ? "[" + bind + "]" : bind) + ":" + std::to_string(listener.value()->port()) + "/" +
          server.exports()[0].name;
    server.listen(std::move(listener.value()));
  }

  if (!pid_file.empty()) {
    std::ofstream(pid_file) << ::getpid() << "\n";
  }
  background.report_ready();  // listening: release the parent and the terminal

  if (!stdio) {
    for (const auto& config : server.exports()) {
      std::fprintf(stderr, "spindle-nbd: export '%s' (%s%s)\n", config.name.c_str(),
                   human_size(config.backend->size()).c_str(),
                   config.read_only ? ", read-only" : "");
    }
    std::fprintf(stderr, "spindle-nbd: listening on %s (aio: %s)\n", uri.c_str(),
                 engine.c_str());
    if (tls_mode != exports::nbd::TlsMode::off) {
      std::fprintf(stderr, "spindle-nbd: TLS %s (%s); see docs/spindle-nbd.md for clients\n",
                   tls_mode == exports::nbd::TlsMode::require ? "required" : "offered",
                   tls_creds.empty() ? "PSK" : "X.509");
    } else if (uri.rfind("nbd", 0) == 0) {
      std::fprintf(stderr, "  try:  nbdinfo '%s'\n        qemu-img info '%s'\n", uri.c_str(),
                   uri.c_str());
    }
  }

  bool finished = false;
  bool shutting_down = false;
  auto begin_shutdown = [&] {
    if (shutting_down) return;
    shutting_down = true;
    coro::spawn(main, [](exports::nbd::Server& s, bool& done) -> coro::Task<void> {
      co_await s.shutdown();
      done = true;
    }(server, finished));
  };
  if (!persistent) server.set_on_idle(begin_shutdown);  // like qemu-nbd without -t

  const int signal_fd = ::signalfd(-1, &signals, SFD_NONBLOCK | SFD_CLOEXEC);
  main.set_fd_handler(signal_fd, [&] {
    signalfd_siginfo info;
    while (::read(signal_fd, &info, sizeof info) == sizeof info) {
      if (info.ssi_signo == SIGUSR1) {
        std::fputs((engine_line + server.stats_report()).c_str(), stderr);
      } else if (shutting_down && info.ssi_signo != SIGHUP) {
        // A second SIGTERM/SIGINT: the user does not want to wait for the drain. Acknowledged
        // writes are in the kernel's page cache (or on disk under --cache=none) already.
        std::fputs("spindle-nbd: second signal: exiting without waiting\n", stderr);
        if (!pid_file.empty()) ::unlink(pid_file.c_str());
        if (!socket_path.empty()) ::unlink(socket_path.c_str());
        std::_Exit(128 + static_cast<int>(info.ssi_signo));
      } else {
        begin_shutdown();
      }
    }
  }, {});

  while (!finished) main.poll(true);
  main.remove_fd_handler(signal_fd);
  ::close(signal_fd);
  if (stats) std::fputs((engine_line + server.stats_report()).c_str(), stderr);
  if (!pid_file.empty()) ::unlink(pid_file.c_str());
  if (!socket_path.empty()) ::unlink(socket_path.c_str());
  return 0;
}
