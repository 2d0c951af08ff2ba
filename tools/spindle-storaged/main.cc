// spindle-storaged: a storage daemon with qemu-storage-daemon's command line, driven over QMP.
// Options are applied in the order given, as qemu-storage-daemon applies them:
//   --blockdev OPTIONS    a block node (keyval "driver=file,node-name=f0,..." or JSON "{...}")
//   --object iothread|tls-creds-x509|tls-creds-psk|throttle-group,id=ID,...   a named object
//   --nbd-server addr.type=unix,addr.path=P | addr.type=inet,addr.host=H,addr.port=N
//                [,max-connections=N][,tls-creds=ID]
//   --export type=nbd,id=ID,node-name=N[,name=NAME][,writable=on][,description=D]
//   --chardev socket,id=ID,path=P,server=on,wait=off (or host=H,port=N)
//   --monitor [chardev=]ID   a QMP monitor on that socket
//   --pidfile PATH, --daemonize
// Every failure is "spindle-storaged: --OPTION VALUE: MESSAGE" on stderr and exit status 1.
// SIGTERM, SIGINT and SIGHUP (and QMP's "quit") end the daemon cleanly: SHUTDOWN is sent, exports
// drained, images flushed and closed. See docs/spindle-storaged.md.
#include <fcntl.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "../common/background.h"
#include "aio/context.h"
#include "coro/block_on.h"
#include "coro/coroutine.h"
#include "io/socket.h"
#include "monitor/arguments.h"
#include "monitor/keyval.h"
#include "monitor/storage_daemon.h"

namespace {

using namespace spindle;
using monitor::Json;
using monitor::QmpResult;

[[noreturn]] void die(const std::string& message) {
  std::fprintf(stderr, "spindle-storaged: %s\n", message.c_str());
  std::exit(1);
}

constexpr const char* kUsage =
    "Usage: spindle-storaged [options]\n"
    "A storage daemon with qemu-storage-daemon's command line and QMP.\n"
    "\n"
    "  -h, --help             display this help and exit\n"
    "  -V, --version          output version information and exit\n"
    "  --blockdev [driver=]<driver>[,node-name=<N>][,read-only=on|off][,cache.direct=on|off]\n"
    "             [,driver specific parameters...]   (or a JSON object)\n"
    "                         add a block node: file, host_device, raw, qcow2, qed,\n"
    "                         null-co, null-aio, nbd, throttle\n"
    "  --chardev socket,id=<id>,path=<path>,server=on,wait=off\n"
    "  --chardev socket,id=<id>,host=<host>,port=<port>,server=on,wait=off\n"
    "                         a listening socket for --monitor\n"
    "  --daemonize            run in the background once startup is complete\n"
    "  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]\n"
    "           [,writable=on|off][,description=<text>]\n"
    "                         export a block node over NBD (requires --nbd-server)\n"
    "  --monitor [chardev=]<id>[,mode=control][,pretty=off]\n"
    "                         a QMP monitor on the --chardev <id>\n"
    "  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>[,max-connections=<n>]\n"
    "               [,tls-creds=<id>]\n"
    "  --nbd-server addr.type=unix,addr.path=<path>[,max-connections=<n>][,tls-creds=<id>]\n"
    "                         start an NBD server for the exports\n"
    "  --object iothread,id=<id>[,poll-max-ns=<ns>][,poll-grow=<n>][,poll-shrink=<n>]\n"
    "                         add a named IoThread\n"
    "  --object tls-creds-x509,id=<id>,dir=<dir>,endpoint=server[,verify-peer=on|off]\n"
    "  --object tls-creds-psk,id=<id>,dir=<dir>,endpoint=server\n"
    "                         TLS credentials for --nbd-server tls-creds=<id>\n"
    "  --object throttle-group,id=<id>[,x-iops-total=<n>][,x-bps-total=<n>][,...]\n"
    "                         an I/O budget for driver=throttle nodes\n"
    "  --pidfile <path>       write the daemon's pid to this file\n";

// One command-line option being applied: failures name it as qemu-storage-daemon does
// ("--blockdev VALUE: DESC").
struct Option {
  std::string name;
  std::string text;

  [[noreturn]] void fail(const std::string& desc) const { die(name + " " + text + ": " + desc); }
  void check(const QmpResult& result) const {
    if (result.ok()) return;
    const monitor::QmpError& error = result.error();
    fail(error.hint.empty() ? error.desc : error.desc + "\n" + error.hint);
  }
  // The value as keyval (with `implied` for a first item without '=') or, when it starts with
  // '{', as JSON; `keyval` says which.
  Json value(std::string_view implied, bool& keyval) const {
    keyval = text.empty() || text[0] != '{';
    if (!keyval) {
      Json parsed = Json::parse(text, nullptr, false);
      if (parsed.is_discarded() || !parsed.is_object()) fail("JSON parse error");
      return parsed;
    }
    QmpResult parsed = monitor::parse_keyval(text, implied);
    check(parsed);
    return parsed.value();
  }
};

struct Chardev {
  std::unique_ptr<io::Listener> listener;
  std::string path;  // a Unix socket to remove at exit
};

Chardev open_chardev(const Option& option, std::string& id) {
  bool keyval = true;
  const Json options = option.value("backend", keyval);
  monitor::Arguments args(options, keyval);
  const std::optional<std::string> backend = args.string("backend", true);
  id = args.string("id", true).value_or("");
  if (args.error()) option.fail(args.error()->desc);
  if (*backend != "socket") option.fail("chardev backend '" + *backend + "' is not supported");
  const std::optional<std::string> path = args.string("path");
  const std::optional<std::string> host = args.string("host");
  const std::optional<std::string> port = args.string("port");
  const bool server = args.boolean("server").value_or(false);
  args.boolean("wait");
  args.boolean("telnet");
  args.boolean("nodelay");
  if (std::optional<monitor::QmpError> error = args.finish()) option.fail(error->desc);
  if (!server) option.fail("only server=on sockets are supported");
  Chardev chardev;
  if (path) {
    auto listener = io::Listener::unix_socket(*path);
    if (!listener.ok()) {
      option.fail("Failed to bind socket to " + *path + ": " + std::strerror(listener.error()));
    }
    chardev.listener = std::move(listener).value();
    chardev.path = *path;
  } else if (port) {
    auto listener = io::Listener::tcp(host.value_or("0.0.0.0"),
                                      static_cast<std::uint16_t>(std::atoi(port->c_str())));
    if (!listener.ok())
      option.fail("Failed to bind socket: " + std::string(std::strerror(listener.error())));
    chardev.listener = std::move(listener).value();
  } else {
    option.fail("socket requires path= or host= and port=");
  }
  return chardev;
}

// qemu's pidfile: mode 0600, locked for the daemon's life (a second daemon with the same file
// fails), removed at a clean exit.
int create_pid_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) die("cannot create PID file: " + std::string(std::strerror(errno)));
  if (::lockf(fd, F_TLOCK, 0) < 0) {
    die("cannot create PID file: Cannot lock pid file: " + std::string(std::strerror(errno)));
  }
  const std::string text = std::to_string(::getpid()) + "\n";
  if (::ftruncate(fd, 0) < 0 ||
      ::write(fd, text.data(), text.size()) != static_cast<ssize_t>(text.size())) {
    die("cannot create PID file: " + std::string(std::strerror(errno)));
  }
  return fd;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<Option> options;  // in order
  std::string pid_file;
  bool daemonize = false;
  const std::string program = argv[0];
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "-h" || arg == "--help") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (arg == "-V" || arg == "--version") {
      std::puts("spindle-storaged 0.1 (qemu-storage-daemon 7.2 command line and QMP)");
      return 0;
    }
    if (arg == "--daemonize") {
      daemonize = true;
      continue;
    }
    if (!arg.starts_with("-")) die("positional: Unexpected argument");
    std::string value;
    const std::size_t equals = arg.find('=');
    const bool known = arg.starts_with("--pidfile") || arg.starts_with("--blockdev") ||
                       arg.starts_with("--object") || arg.starts_with("--nbd-server") ||
                       arg.starts_with("--export") || arg.starts_with("--chardev") ||
                       arg.starts_with("--monitor");
    if (arg.starts_with("--") && equals != std::string::npos) {
      value = arg.substr(equals + 1);
      arg = arg.substr(0, equals);
    } else if (known && i + 1 < argc) {
      value = argv[++i];
    } else if (known) {
      std::fprintf(stderr, "%s: option '%s' requires an argument\n", program.c_str(), arg.c_str());
      return 1;
    }
    if (arg == "--pidfile") {
      pid_file = value;
    } else if (arg == "--blockdev" || arg == "--object" || arg == "--nbd-server" ||
               arg == "--export" || arg == "--chardev" || arg == "--monitor") {
      options.push_back({arg, value});
    } else {
      std::fprintf(stderr, "%s: unrecognized option '%s'\n", program.c_str(), argv[i]);
      return 1;
    }
  }

  // --daemonize: the parent exits once every option is applied (or one failed).
  tools::Background background;
  if (daemonize) background = tools::Background::fork_into_background(die);

  sigset_t signals;
  sigemptyset(&signals);
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) sigaddset(&signals, sig);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  ::signal(SIGPIPE, SIG_IGN);

  aio::Context& main_context = aio::main_context();
  monitor::StorageDaemon daemon(main_context);
  std::map<std::string, Chardev> chardevs;
  std::vector<std::string> socket_files;
  std::vector<std::unique_ptr<io::Listener>> monitor_listeners;
  for (const Option& option : options) {
    bool keyval = true;
    if (option.name == "--blockdev") {
      const Json value = option.value("driver", keyval);
      option.check(coro::block_on(main_context, daemon.blockdev_add(value, keyval)));
    } else if (option.name == "--object") {
      const Json value = option.value("qom-type", keyval);
      option.check(daemon.object_add(value, keyval));
    } else if (option.name == "--nbd-server") {
      const Json value = option.value("", keyval);
      option.check(daemon.nbd_server_start(value, keyval, false));
      if (value.contains("addr") && value["addr"].value("type", "") == "unix") {
        socket_files.push_back(value["addr"].value("path", ""));
      }
    } else if (option.name == "--export") {
      const Json value = option.value("type", keyval);
      option.check(coro::block_on(main_context, daemon.block_export_add(value, keyval)));
    } else if (option.name == "--chardev") {
      std::string id;
      Chardev chardev = open_chardev(option, id);
      if (chardevs.contains(id)) option.fail("Duplicate chardev '" + id + "'");
      if (!chardev.path.empty()) socket_files.push_back(chardev.path);
      chardevs[id] = std::move(chardev);
    } else if (option.name == "--monitor") {
      const Json value = option.value("chardev", keyval);
      monitor::Arguments args(value, keyval);
      const std::optional<std::string> id = args.string("chardev", true);
      args.choice("mode", {"control", "readline"});
      args.boolean("pretty");
      args.string("id");
      if (std::optional<monitor::QmpError> error = args.finish()) option.fail(error->desc);
      const auto it = chardevs.find(*id);
      if (it == chardevs.end() || !it->second.listener) {
        option.fail("chardev \"" + *id + "\" not found");
      }
      monitor_listeners.push_back(std::move(it->second.listener));
    }
  }
  // Monitors serve only once every option is applied: a QMP client that connects early must
  // not see a half-built daemon (the options' block_on() runs the loop that would serve it).
  for (auto& listener : monitor_listeners) daemon.monitors().listen(std::move(listener));

  const int pid_fd = pid_file.empty() ? -1 : create_pid_file(pid_file);
  background.report_ready(true);  // as qemu-storage-daemon, also leaving the directory

  bool finished = false, stopping = false;
  auto stop = [&](std::string reason) {
    if (stopping) return;
    stopping = true;
    coro::spawn(main_context,
                [](monitor::StorageDaemon& d, std::string why, bool& done) -> coro::Task<void> {
                  co_await d.shutdown(std::move(why));
                  done = true;
                }(daemon, std::move(reason), finished));
  };
  daemon.set_on_quit([&] { stop("host-qmp-quit"); });
  const int signal_fd = ::signalfd(-1, &signals, SFD_NONBLOCK | SFD_CLOEXEC);
  main_context.set_fd_handler(signal_fd,
                              [&] {
                                signalfd_siginfo info;
                                while (::read(signal_fd, &info, sizeof info) == sizeof info)
                                  stop("host-signal");
                              },
                              {});
  while (!finished) main_context.poll(true);
  while (main_context.poll(false)) {
  }  // what shutdown() left to the loop: servers and IoThreads being destroyed
  main_context.remove_fd_handler(signal_fd);
  ::close(signal_fd);
  for (const std::string& path : socket_files) ::unlink(path.c_str());
  if (pid_fd >= 0) {
    ::unlink(pid_file.c_str());
    ::close(pid_fd);
  }
  return 0;
}
