// libFuzzer target for the NBD server itself (handshake, option handling, request loop,
// replies), through its public API: every input is what a client sends. One
// exports::nbd::Server with two null exports ("" writable, 8 GiB, asking for 512-byte alignment
// like QED so that the backend's read-modify-write paths run, and even a 4 GiB unaligned
// WRITE_ZEROES can be sent; "ro" read-only, 1 MiB) lives for the whole run; each input gets a
// fresh socketpair whose server end is handed to Server::serve(). This thread writes the input
// as the client (reading replies meanwhile, so that neither side blocks on a full socket), then
// shuts down its write side, drains the replies until the server closes the connection, and
// waits until the server has finished the connection. A server that does not close within
// kHangLimit after the client's EOF is a bug: the target traps.
//
// Seeds: with SPINDLE_FUZZ_WRITE_SEEDS=DIR the binary writes a few well-formed client streams
// (handshakes in each style, then requests of every command) into DIR and exits.
//
// Thread-safety: LLVMFuzzerTestOneInput runs on the main thread (the server's control
// context); the connections run on the server's one IoThread.
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "aio/context.h"
#include "block/block_backend.h"
#include "block/drivers/null.h"
#include "export/nbd/server.h"
#include "io/channel.h"
#include "nbd/protocol.h"

namespace spindle::exports::nbd {
namespace {

using namespace spindle::nbd;  // the client side of the wire protocol

constexpr std::uint64_t kExportSize = 1 << 20;
constexpr std::uint64_t kWritableExportSize = std::uint64_t{8} << 30;
constexpr auto kHangLimit = std::chrono::seconds(5);

Server& server() {
  // Never destroyed: its IoThread outlives every input, and libFuzzer may exit() from any point.
  static Server* const instance = [] {
    ServerOptions options;
    options.io_threads = 1;
    options.handshake_timeout = std::chrono::seconds(5);  // never reached: the client closes
    options.max_requests_per_connection = 16;
    std::vector<ExportConfig> exports;
    exports.push_back({.name = "",
                       .description = "writable null export",
                       .backend = std::make_shared<block::BlockBackend>(
                           std::make_shared<block::NullNode>(kWritableExportSize, true, 512)),
                       .allow_unmap = true});
    exports.push_back({.name = "ro",
                       .description = "read-only",
                       .backend = std::make_shared<block::BlockBackend>(
                           std::make_shared<block::NullNode>(kExportSize)),
                       .read_only = true});
    return new Server(aio::main_context(), options, std::move(exports));
  }();
  return *instance;
}

[[noreturn]] void hang(const char* what) {
  std::fprintf(stderr, "nbd_server_fuzz: %s\n", what);
  __builtin_trap();
}

// Plays the client: writes `input`, then EOF, reading (and discarding) replies throughout, until
// the server closes its end.
void play_client(int fd, std::span<const std::uint8_t> input) {
  const auto deadline = std::chrono::steady_clock::now() + kHangLimit;
  std::size_t written = 0;
  bool write_open = true;
  std::array<char, 65536> sink;
  while (true) {
    if (write_open && written == input.size()) {
      ::shutdown(fd, SHUT_WR);
      write_open = false;
    }
    pollfd poller{fd, static_cast<short>(POLLIN | (write_open ? POLLOUT : 0)), 0};
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) hang("the server did not close the connection after the client's EOF");
    const int ready = ::poll(&poller, 1, static_cast<int>(left.count()));
    if (ready < 0 && errno != EINTR) hang("poll failed");
    if (ready <= 0) continue;
    if (poller.revents & (POLLIN | POLLHUP | POLLERR)) {
      const ssize_t n = ::recv(fd, sink.data(), sink.size(), MSG_DONTWAIT);
      if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) return;  // server closed
    }
    if (write_open && (poller.revents & POLLOUT)) {
      const ssize_t n =
          ::send(fd, input.data() + written, input.size() - written, MSG_DONTWAIT | MSG_NOSIGNAL);
      if (n > 0) {
        written += static_cast<std::size_t>(n);
      } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
        write_open = false;  // the server stopped reading (EPIPE): just drain
      }
    }
  }
}

// --- seeds ---------------------------------------------------------------------------------

using Bytes = std::vector<std::byte>;

void append(Bytes& out, std::span<const std::byte> bytes) {
  out.insert(out.end(), bytes.begin(), bytes.end());
}

void append_request(Bytes& out, Command command, std::uint64_t offset, std::uint32_t length,
                    std::uint16_t flags = 0) {
  static std::uint64_t cookie = 1;
  append(out,
         encode_request({flags, static_cast<std::uint16_t>(command), cookie++, offset, length}));
  if (command == Command::kWrite) out.insert(out.end(), length, std::byte{0xab});
}

// Every command once, some with flags, then an orderly disconnect.
void append_requests(Bytes& out, bool structured) {
  append_request(out, Command::kWrite, 0, 1024, kCmdFlagFua);
  append_request(out, Command::kRead, 512, 4096);
  append_request(out, Command::kRead, 0, 8192, structured ? kCmdFlagDf : 0);
  append_request(out, Command::kFlush, 0, 0);
  append_request(out, Command::kTrim, 4096, 4096);
  append_request(out, Command::kWriteZeroes, 8192, 65536, kCmdFlagNoHole);
  append_request(out, Command::kWrite, 100, 1000);                      // unaligned: RMW
  append_request(out, Command::kWriteZeroes, 1, 0xfffff000u);         // 4 GiB - 4 KiB
  append_request(out, Command::kTrim, 700, 3000);
  append_request(out, Command::kCache, 0, 65536);
  append_request(out, Command::kBlockStatus, 0, kExportSize, kCmdFlagReqOne);
  append_request(out, Command::kRead, kWritableExportSize - 512, 1024);  // past the end: EINVAL
  append_request(out, Command::kDisconnect, 0, 0);
}

Bytes client_start(std::uint32_t flags = kClientFlagFixedNewstyle | kClientFlagNoZeroes) {
  Bytes out;
  append(out, encode_client_flags(flags));
  return out;
}

std::vector<std::pair<std::string, Bytes>> seeds() {
  std::vector<std::pair<std::string, Bytes>> all;
  const std::string_view allocation[] = {kBaseAllocation};
  const Info infos[] = {Info::kExport, Info::kName, Info::kDescription, Info::kBlockSize};
  {  // What a modern client does: structured replies, base:allocation, GO.
    Bytes out = client_start();
    append_option(out, Option::kStructuredReply);
    append_option_meta_context(out, Option::kListMetaContext, "", {});
    append_option_meta_context(out, Option::kSetMetaContext, "", allocation);
    append_option_info(out, Option::kGo, "", infos);
    append_requests(out, true);
    all.emplace_back("go-structured", std::move(out));
  }
  {  // Simple replies after EXPORT_NAME, without NO_ZEROES.
    Bytes out = client_start(kClientFlagFixedNewstyle);
    append_option_export_name(out, "");
    append_requests(out, false);
    all.emplace_back("export-name-simple", std::move(out));
  }
  {  // LIST, INFO on both exports and a missing one, an unknown option, ABORT.
    Bytes out = client_start();
    append_option(out, Option::kList);
    append_option_info(out, Option::kInfo, "ro", infos);
    append_option_info(out, Option::kInfo, "missing", {});
    append_option(out, static_cast<Option>(0x1234));
    append_option(out, Option::kStartTls);
    append_option(out, Option::kAbort);
    all.emplace_back("list-info-abort", std::move(out));
  }
  {  // The read-only export: writes get EPERM.
    Bytes out = client_start();
    append_option(out, Option::kStructuredReply);
    append_option_meta_context(out, Option::kSetMetaContext, "ro", allocation);
    append_option_info(out, Option::kGo, "ro", {});
    append_requests(out, true);
    all.emplace_back("go-read-only", std::move(out));
  }
  return all;
}

void write_seeds(const char* directory) {
  std::filesystem::create_directories(directory);
  for (const auto& [name, bytes] : seeds()) {
    const std::string path = std::string(directory) + "/" + name;
    std::FILE* file = std::fopen(path.c_str(), "wb");
    if (file == nullptr || std::fwrite(bytes.data(), 1, bytes.size(), file) != bytes.size()) {
      std::perror(path.c_str());
      std::exit(1);
    }
    std::fclose(file);
  }
  std::exit(0);
}

}  // namespace
}  // namespace spindle::exports::nbd

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  if (const char* directory = std::getenv("SPINDLE_FUZZ_WRITE_SEEDS")) {
    spindle::exports::nbd::write_seeds(directory);
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace spindle;
  exports::nbd::Server& server = exports::nbd::server();
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) return 0;
  // The server writes its greeting first; the channel is moved to the server's IoThread.
  server.serve(std::make_unique<io::Channel>(fds[0], nullptr));
  exports::nbd::play_client(fds[1], std::span(data, size));
  ::close(fds[1]);
  // The connection may still be finishing (closing, releasing its requests) after its socket
  // closed: wait, so that every input starts from an idle server.
  const auto deadline = std::chrono::steady_clock::now() + exports::nbd::kHangLimit;
  while (server.connection_count() != 0) {
    if (std::chrono::steady_clock::now() > deadline) {
      exports::nbd::hang("the connection never finished");
    }
    std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
  return 0;
}
