// The NBD client driver (block/drivers/nbd): URI parsing; every operation against an in-process
// spindle exports::nbd::Server over a Unix socket (data checked against the server's file); many
// requests in flight from two contexts; several connections; TLS (PSK); a proxy that forwards
// the server's replies one byte at a time and one that stalls mid-header for a second while a
// timer on the client's context keeps firing; and a scripted fake server that vanishes
// mid-request or replies with an unknown cookie, an oversize chunk or a size >= 2^63. Then the
// handshake timeout (a server that never greets), reconnect-delay (a proxy that drops the
// connection and lets the client back in; a server that never comes back), NBD_CMD_DISC on
// close and on destruction, and whole-range block status answered from one request.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "aio/context.h"
#include "aio/io_thread.h"
#include "block/block_backend.h"
#include "block/drivers/file.h"
#include "block/drivers/nbd/nbd_node.h"
#include "block/drivers/nbd/uri.h"
#include "coro/block_on.h"
#include "coro/coroutine.h"
#include "coro/sleep.h"
#include "export/nbd/server.h"
#include "io/socket.h"
#include "io/tls_credentials.h"
#include "nbd/protocol.h"
#include "support/full_accept_queue.h"

namespace spindle::block::nbd {
namespace {

using namespace std::chrono_literals;
namespace proto = spindle::nbd;
namespace server = spindle::exports::nbd;
using Clock = std::chrono::steady_clock;

constexpr std::uint64_t kSize = 4 << 20;

std::string temp_path(const char* stem) {
  static std::atomic<int> counter{0};
  return "/tmp/spindle-nbdc-" + std::to_string(::getpid()) + "-" + stem + "-" +
         std::to_string(counter++);
}

template <typename T>
T run(coro::Task<T> task) {
  return coro::block_on(aio::main_context(), std::move(task));
}

std::vector<std::byte> pattern(std::size_t size, unsigned seed) {
  std::vector<std::byte> data(size);
  for (std::size_t i = 0; i < size; ++i) data[i] = static_cast<std::byte>((i * 7 + seed) & 0xff);
  return data;
}

NbdOpenResult open_uri(const std::string& uri, bool read_only = false) {
  return run(open_nbd(uri, read_only));
}

void close_node(const BlockNodeRef& node) { EXPECT_EQ(run(node->close()), 0); }
// After the connection died, close() cannot flush: it reports -EIO but must not hang.
void close_dead_node(const BlockNodeRef& node) { EXPECT_EQ(run(node->close()), -EIO); }

// ---------------------------------------------------------------------------------------------
// An in-process spindle server exporting a sparse temp file.

class LocalServer {
 public:
  explicit LocalServer(server::ServerOptions options = {}, bool multi_conn = true) {
    file_ = temp_path("disk");
    socket_ = temp_path("sock");
    auto node = open_file(file_, FileOptions{false, false, true});
    EXPECT_TRUE(node.ok());
    EXPECT_EQ(run(node.value()->truncate(kSize)), 0);
    server::ExportConfig config;
    config.name = "disk";
    config.backend = std::make_shared<BlockBackend>(node.value());
    config.allow_unmap = true;
    config.multi_conn = multi_conn;
    if (options.io_threads == 0) options.io_threads = 2;
    server_ = std::make_unique<server::Server>(aio::main_context(), std::move(options),
                                               std::vector<server::ExportConfig>{config});
    auto listener = io::Listener::unix_socket(socket_);
    EXPECT_TRUE(listener.ok());
    server_->listen(std::move(listener).value());
  }
  ~LocalServer() {
    run(server_->shutdown());
    ::unlink(file_.c_str());
    ::unlink(socket_.c_str());
  }
  const std::string& socket() const { return socket_; }
  std::string uri(const std::string& extra = {}) const {
    return "nbd+unix:///disk?socket=" + socket_ + extra;
  }
  // The server's file, read directly.
  std::vector<std::byte> file_bytes(std::uint64_t offset, std::size_t size) const {
    std::vector<std::byte> data(size);
    const int fd = ::open(file_.c_str(), O_RDONLY);
    EXPECT_EQ(::pread(fd, data.data(), size, static_cast<off_t>(offset)), static_cast<ssize_t>(size));
    ::close(fd);
    return data;
  }
  server::Server& server() { return *server_; }

 private:
  std::string file_;
  std::string socket_;
  std::unique_ptr<server::Server> server_;
};

// ---------------------------------------------------------------------------------------------
// Blocking socket helpers for the proxies and the fake server (they run on plain threads).

int listen_unix(const std::string& path) {
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  std::strncpy(address.sun_path, path.c_str(), sizeof address.sun_path - 1);
  ::unlink(path.c_str());
  EXPECT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address), 0);
  EXPECT_EQ(::listen(fd, 4), 0);
  return fd;
}

int connect_unix_blocking(const std::string& path) {
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  std::strncpy(address.sun_path, path.c_str(), sizeof address.sun_path - 1);
  EXPECT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof address), 0);
  return fd;
}

bool read_full(int fd, void* buffer, std::size_t size) {
  auto* bytes = static_cast<char*>(buffer);
  while (size > 0) {
    const ssize_t n = ::read(fd, bytes, size);
    if (n <= 0) return false;
    bytes += n;
    size -= static_cast<std::size_t>(n);
  }
  return true;
}

bool write_full(int fd, const void* buffer, std::size_t size) {
  const auto* bytes = static_cast<const char*>(buffer);
  while (size > 0) {
    const ssize_t n = ::send(fd, bytes, size, MSG_NOSIGNAL);
    if (n <= 0) return false;
    bytes += n;
    size -= static_cast<std::size_t>(n);
  }
  return true;
}

// Forwards connections to a Unix socket `target`: one connection, or any number one after the
// other. Each chunk read from either side goes through `relay`, which writes it on (or not) and
// returns false to end that connection.
enum class Toward { server, client };
class ForwardingProxy {
 public:
  using Relay = std::function<bool(Toward, int to, const char* data, std::size_t size)>;
  ForwardingProxy(std::string target, bool many_connections, Relay relay)
      : target_(std::move(target)), many_(many_connections), relay_(std::move(relay)) {
    path_ = temp_path("proxy");
    listen_fd_ = listen_unix(path_);
    thread_ = std::thread([this] { serve(); });
  }
  ~ForwardingProxy() {
    stop_ = true;
    ::shutdown(listen_fd_, SHUT_RDWR);
    thread_.join();
    ::close(listen_fd_);
    ::unlink(path_.c_str());
  }
  const std::string& path() const { return path_; }
  int accepted() const { return accepted_.load(); }

 private:
  void serve() {
    do {
      const int client = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (client < 0) return;
      ++accepted_;
      const int server = connect_unix_blocking(target_);
      forward(client, server);
      ::close(client);
      ::close(server);
    } while (many_ && !stop_);
  }
  void forward(int client, int server) {
    char buffer[65536];
    while (!stop_) {
      pollfd fds[2] = {{client, POLLIN, 0}, {server, POLLIN, 0}};
      if (::poll(fds, 2, 50) <= 0) continue;
      if (fds[0].revents) {
        const ssize_t n = ::read(client, buffer, sizeof buffer);
        if (n <= 0 || !relay_(Toward::server, server, buffer, static_cast<std::size_t>(n))) return;
      }
      if (fds[1].revents) {
        const ssize_t n = ::read(server, buffer, sizeof buffer);
        if (n <= 0 || !relay_(Toward::client, client, buffer, static_cast<std::size_t>(n))) return;
      }
    }
  }

  const std::string target_;
  const bool many_;
  const Relay relay_;
  std::string path_;
  int listen_fd_ = -1;
  std::atomic<int> accepted_{0};
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

// A proxy in front of a Unix socket: client→server bytes pass as they come; server→client
// bytes go one at a time (`byte_at_a_time`), or, when `stall` is set, the next reply is cut
// after 10 bytes (mid-header) for one second.
class Proxy {
 public:
  Proxy(std::string target, bool byte_at_a_time)
      : byte_at_a_time_(byte_at_a_time),
        forwarder_(std::move(target), false,
                   [this](Toward toward, int to, const char* data, std::size_t size) {
                     return relay(toward, to, data, size);
                   }) {}
  std::string uri() const { return "nbd+unix:///disk?socket=" + forwarder_.path(); }
  std::atomic<bool> stall{false};
  std::atomic<int> stalls_done{0};

 private:
  bool relay(Toward toward, int to, const char* data, std::size_t size) {
    if (toward == Toward::server) return write_full(to, data, size);
    std::size_t done = 0;
    if (stall.exchange(false)) {
      const std::size_t first = std::min<std::size_t>(10, size);
      if (!write_full(to, data, first)) return false;
      std::this_thread::sleep_for(1s);
      done = first;
      ++stalls_done;
    }
    if (!byte_at_a_time_) return write_full(to, data + done, size - done);
    for (; done < size; ++done) {
      if (!write_full(to, data + done, 1)) return false;
      std::this_thread::sleep_for(20us);  // let the client see each byte on its own
    }
    return true;
  }

  const bool byte_at_a_time_;
  ForwardingProxy forwarder_;  // last: its thread stops before the members above go away
};

// A scripted server: a correct handshake (structured replies, base:allocation, GO), then
// `script` runs the transmission phase on the blocking socket.
class FakeServer {
 public:
  using Script = std::function<void(int fd)>;
  FakeServer(Script script, std::uint64_t size = kSize)
      : script_(std::move(script)), size_(size) {
    path_ = temp_path("fake");
    listen_fd_ = listen_unix(path_);
    thread_ = std::thread([this] { serve(); });
  }
  ~FakeServer() {
    ::shutdown(listen_fd_, SHUT_RDWR);
    thread_.join();
    ::close(listen_fd_);
    ::unlink(path_.c_str());
  }
  std::string uri() const { return "nbd+unix:///disk?socket=" + path_; }

  static bool read_request(int fd, proto::RequestHeader& request) {
    std::array<std::byte, proto::kRequestHeaderSize> bytes;
    if (!read_full(fd, bytes.data(), bytes.size())) return false;
    auto parsed = proto::parse_request(bytes);
    if (!parsed) return false;
    request = *parsed;
    std::vector<std::byte> payload(proto::request_payload_length(request));
    return read_full(fd, payload.data(), payload.size());
  }

 private:
  void serve() {
    const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) return;
    if (handshake(fd)) script_(fd);
    ::close(fd);
  }
  bool handshake(int fd) {
    const auto greeting = proto::encode_greeting(proto::kFlagFixedNewstyle | proto::kFlagNoZeroes);
    if (!write_full(fd, greeting.data(), greeting.size())) return false;
    std::array<std::byte, 4> flags;
    if (!read_full(fd, flags.data(), flags.size())) return false;
    for (;;) {
      std::array<std::byte, proto::kOptionHeaderSize> header_bytes;
      if (!read_full(fd, header_bytes.data(), header_bytes.size())) return false;
      auto header = proto::parse_option_header(header_bytes);
      if (!header) return false;
      std::vector<std::byte> data(header->length);
      if (!read_full(fd, data.data(), data.size())) return false;
      std::vector<std::byte> out;
      const auto option = static_cast<proto::Option>(header->option);
      if (option == proto::Option::kStructuredReply) {
        proto::append_reply_ack(out, header->option);
      } else if (option == proto::Option::kSetMetaContext) {
        proto::append_reply_meta_context(out, header->option, 7, proto::kBaseAllocation);
        proto::append_reply_ack(out, header->option);
      } else if (option == proto::Option::kGo) {
        proto::append_reply_info_export(out, header->option, size_,
                                        proto::kFlagHasFlags | proto::kFlagSendFlush);
        proto::append_reply_ack(out, header->option);
        return write_full(fd, out.data(), out.size());
      } else {
        proto::append_reply_error(out, header->option, proto::OptionReply::kErrUnsupported);
      }
      if (!write_full(fd, out.data(), out.size())) return false;
    }
  }

  Script script_;
  std::uint64_t size_;
  std::string path_;
  int listen_fd_ = -1;
  std::thread thread_;
};

// ---------------------------------------------------------------------------------------------

TEST(NbdUri, ParsesTheFourSchemes) {
  std::string error;
  auto tcp = parse_nbd_uri("nbd://example.com:1234/my%20disk", error);
  ASSERT_TRUE(tcp) << error;
  EXPECT_EQ(tcp->host, "example.com");
  EXPECT_EQ(tcp->port, 1234);
  EXPECT_EQ(tcp->export_name, "my disk");
  EXPECT_FALSE(tcp->tls);

  auto v6 = parse_nbd_uri("nbd://[::1]/", error);
  ASSERT_TRUE(v6) << error;
  EXPECT_EQ(v6->host, "::1");
  EXPECT_EQ(v6->port, 10809);
  EXPECT_EQ(v6->export_name, "");

  auto local = parse_nbd_uri("nbd+unix:///e?socket=/tmp/s&connections=4", error);
  ASSERT_TRUE(local) << error;
  EXPECT_TRUE(local->unix_socket);
  EXPECT_EQ(local->socket_path, "/tmp/s");
  EXPECT_EQ(local->export_name, "e");
  EXPECT_EQ(local->connections, 4u);

  auto psk = parse_nbd_uri("nbds+unix://alice@/e?socket=/s&tls-psk-file=/k", error);
  ASSERT_TRUE(psk) << error;
  EXPECT_TRUE(psk->tls);
  EXPECT_EQ(psk->user, "alice");
  EXPECT_EQ(psk->tls_psk_file, "/k");

  auto x509 = parse_nbd_uri("nbds://h/e?tls-certificates=/d", error);
  ASSERT_TRUE(x509) << error;
  EXPECT_EQ(x509->tls_certificates, "/d");

  EXPECT_TRUE(is_nbd_uri("nbds+unix:///x?socket=y"));
  EXPECT_FALSE(is_nbd_uri("disk.qed"));
  EXPECT_FALSE(is_nbd_uri("nbd:localhost:10809"));
}

TEST(NbdUri, RejectsBadUris) {
  const char* bad[] = {
      "http://host/e",                            // not NBD
      "nbd:///e",                                 // no host
      "nbd://host:0/e",                           // bad port
      "nbd://host:99999/e",                       // bad port
      "nbd://host:12x/e",                         // bad port
      "nbd+unix:///e",                            // no socket
      "nbd+unix://host/e?socket=/s",              // host on a Unix URI
      "nbd://host/e?socket=/s",                   // socket on TCP
      "nbd://host/e?frobnicate=1",                // unknown key
      "nbd://host/e?connections=0",               // out of range
      "nbd://host/e?connections=99",              // out of range
      "nbd://host/%zz",                           // bad escape
      "nbd://host/a%00b",                         // NUL
      "nbds://host/e",                            // TLS without credentials
      "nbd://host/e?tls-psk-file=/k",             // TLS key on clear text
      "nbds://host/e?tls-psk-file=/k&tls-certificates=/d",
      "nbd://[::1/e",                             // unterminated IPv6
      "nbd://host/e#frag",
  };
  for (const char* text : bad) {
    std::string error;
    EXPECT_FALSE(parse_nbd_uri(text, error)) << text;
    EXPECT_NE(error.find("invalid NBD URI"), std::string::npos) << text;
  }
  NbdOpenResult opened = open_uri("nbd+unix:///e");
  EXPECT_FALSE(opened.node);
  EXPECT_EQ(opened.error, EINVAL);
}

TEST(NbdClient, ReadWriteZeroTrimFlushAndBlockStatus) {
  LocalServer server;
  NbdOpenResult opened = open_uri(server.uri());
  ASSERT_TRUE(opened.node) << opened.message;
  BlockNodeRef node = opened.node;
  EXPECT_STREQ(node->driver_name(), "nbd");
  EXPECT_EQ(node->size(), kSize);
  EXPECT_FALSE(node->read_only());
  BlockBackend backend(node);

  // Unwritten: a hole that reads as zeros.
  BlockStatus status = run(backend.block_status(0, kSize));
  EXPECT_TRUE(status.flags & kStatusZero);
  EXPECT_FALSE(status.flags & kStatusData);

  const auto data = pattern(256 << 10, 3);
  EXPECT_EQ(run(backend.write(1 << 20, data)), 0);
  EXPECT_EQ(run(backend.write(3 << 20, std::span(data).first(4096), kFua)), 0);
  EXPECT_EQ(run(backend.flush()), 0);
  EXPECT_EQ(server.file_bytes(1 << 20, data.size()), data);

  std::vector<std::byte> back(data.size());
  EXPECT_EQ(run(backend.read(1 << 20, back)), 0);
  EXPECT_EQ(back, data);
  // An unaligned read inside it and one across the hole before it.
  std::vector<std::byte> piece(1000);
  EXPECT_EQ(run(backend.read((1 << 20) + 17, piece)), 0);
  EXPECT_TRUE(std::equal(piece.begin(), piece.end(), data.begin() + 17));
  EXPECT_EQ(run(backend.read((1 << 20) - 500, piece)), 0);
  EXPECT_EQ(piece[0], std::byte{0});
  EXPECT_EQ(piece[500], data[0]);

  status = run(backend.block_status(1 << 20, 1 << 20));
  EXPECT_TRUE(status.flags & kStatusData);
  EXPECT_EQ(status.bytes, data.size());

  // Zeroing with and without unmap; trim.
  EXPECT_EQ(run(backend.write_zeroes(1 << 20, 64 << 10, 0)), 0);
  EXPECT_EQ(run(backend.write_zeroes((1 << 20) + (64 << 10), 64 << 10, kMayUnmap)), 0);
  EXPECT_EQ(run(backend.read(1 << 20, back)), 0);
  EXPECT_TRUE(std::all_of(back.begin(), back.begin() + (128 << 10),
                          [](std::byte b) { return b == std::byte{0}; }));
  EXPECT_TRUE(std::equal(back.begin() + (128 << 10), back.end(), data.begin() + (128 << 10)));
  // The unmapped range is a hole again (the server punches with allow_unmap).
  status = run(backend.block_status((1 << 20) + (64 << 10), 64 << 10));
  EXPECT_TRUE(status.flags & kStatusZero);
  EXPECT_FALSE(status.flags & kStatusData);
  EXPECT_EQ(run(backend.discard(3 << 20, 4096)), 0);
  EXPECT_EQ(run(backend.flush()), 0);
  EXPECT_EQ(server.file_bytes(1 << 20, 128 << 10), std::vector<std::byte>(128 << 10));

  // Out of bounds is the backend's -EIO; the connection stays usable.
  EXPECT_LT(run(backend.read(kSize - 10, piece)), 0);
  EXPECT_EQ(run(backend.read(0, piece)), 0);
  close_node(node);
}

TEST(NbdClient, ReadOnlyOpenAndRefusedWritableOpenOfReadOnlyExport) {
  LocalServer server;
  NbdOpenResult opened = open_uri(server.uri(), true);
  ASSERT_TRUE(opened.node) << opened.message;
  EXPECT_TRUE(opened.node->read_only());
  const auto data = pattern(4096, 1);
  EXPECT_EQ(run(opened.node->write(0, data, 0)), -EROFS);
  close_node(opened.node);

  NbdOpenResult missing = open_uri("nbd+unix:///nope?socket=" + server.socket());
  EXPECT_FALSE(missing.node);
  EXPECT_EQ(missing.error, ENOENT) << missing.message;
  EXPECT_NE(missing.message.find("nope"), std::string::npos) << missing.message;
}

// Many requests in flight at once, from the main context and from an IoThread (which hop to
// the connection's context and back), each checked.
TEST(NbdClient, ManyRequestsInFlightFromTwoContexts) {
  LocalServer server;
  NbdOpenResult opened = open_uri(server.uri());
  ASSERT_TRUE(opened.node) << opened.message;
  auto backend = std::make_shared<BlockBackend>(opened.node);
  aio::IoThread other("other");
  constexpr int kRequests = 64;
  std::atomic<int> failures{0};
  std::atomic<int> remaining{kRequests};
  coro::Event all_done;
  auto one = [&](int index) -> coro::Task<void> {
    const auto data = pattern(16 << 10, static_cast<unsigned>(index));
    const std::uint64_t offset = static_cast<std::uint64_t>(index) * (32 << 10);
    const int wrote = co_await backend->write(offset, data);
    std::vector<std::byte> back(data.size());
    const int read = co_await backend->read(offset, back);
    if (wrote != 0 || read != 0 || back != data) failures.fetch_add(1);
    if (remaining.fetch_sub(1) == 1) all_done.set();
  };
  for (int i = 0; i < kRequests; ++i) {
    coro::spawn(i % 2 ? other.context() : aio::main_context(), one(i));
  }
  run([](coro::Event& done) -> coro::Task<void> { co_await done.wait(); }(all_done));
  EXPECT_EQ(failures.load(), 0);
  close_node(opened.node);
}

TEST(NbdClient, SeveralConnectionsWhenMultiConnIsAdvertised) {
  LocalServer server;
  NbdOpenResult opened = open_uri(server.uri("&connections=3"));
  ASSERT_TRUE(opened.node) << opened.message;
  auto* nbd_node = dynamic_cast<NbdNode*>(opened.node.get());
  ASSERT_NE(nbd_node, nullptr);
  EXPECT_EQ(nbd_node->connection_count(), 3u);
  BlockBackend backend(opened.node);
  for (int i = 0; i < 12; ++i) {
    const auto data = pattern(8192, static_cast<unsigned>(i));
    EXPECT_EQ(run(backend.write(static_cast<std::uint64_t>(i) * 8192, data)), 0);
  }
  EXPECT_EQ(run(backend.flush()), 0);
  for (int i = 0; i < 12; ++i) {
    std::vector<std::byte> back(8192);
    EXPECT_EQ(run(backend.read(static_cast<std::uint64_t>(i) * 8192, back)), 0);
    EXPECT_EQ(back, pattern(8192, static_cast<unsigned>(i)));
  }
  close_node(opened.node);
  EXPECT_GE(server.server().total_connections(), 3u);

  LocalServer single({}, /*multi_conn=*/false);
  NbdOpenResult one = open_uri(single.uri("&connections=3"));
  ASSERT_TRUE(one.node) << one.message;
  EXPECT_EQ(dynamic_cast<NbdNode*>(one.node.get())->connection_count(), 1u);
  close_node(one.node);
}

TEST(NbdClient, TlsWithPsk) {
  const std::string keys = temp_path("keys");
  {
    const int fd = ::open(keys.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    const std::string line = "alice:0123456789abcdef0123456789abcdef\n";
    ASSERT_EQ(::write(fd, line.data(), line.size()), static_cast<ssize_t>(line.size()));
    ::close(fd);
  }
  std::string error;
  server::ServerOptions options;
  options.tls_mode = server::TlsMode::require;
  options.tls_credentials = io::TlsCredentials::server_psk(keys, error);
  ASSERT_TRUE(options.tls_credentials) << error;
  LocalServer server(options);

  NbdOpenResult opened = open_uri("nbds+unix://alice@/disk?socket=" + server.socket() +
                                  "&tls-psk-file=" + keys);
  ASSERT_TRUE(opened.node) << opened.message;
  BlockBackend backend(opened.node);
  const auto data = pattern(64 << 10, 9);
  EXPECT_EQ(run(backend.write(0, data)), 0);
  std::vector<std::byte> back(data.size());
  EXPECT_EQ(run(backend.read(0, back)), 0);
  EXPECT_EQ(back, data);
  close_node(opened.node);

  // Clear text to a TLS-only server is refused with a clear message, not served.
  NbdOpenResult clear = open_uri(server.uri());
  EXPECT_FALSE(clear.node);
  EXPECT_NE(clear.message.find("requires TLS"), std::string::npos) << clear.message;
  ::unlink(keys.c_str());
}

TEST(NbdClient, RepliesForwardedOneByteAtATime) {
  LocalServer server;
  Proxy proxy(server.socket(), /*byte_at_a_time=*/true);
  NbdOpenResult opened = open_uri(proxy.uri());
  ASSERT_TRUE(opened.node) << opened.message;
  BlockBackend backend(opened.node);
  const auto data = pattern(512, 5);
  EXPECT_EQ(run(backend.write(8192, data)), 0);
  std::vector<std::byte> back(512);
  EXPECT_EQ(run(backend.read(8192, back)), 0);
  EXPECT_EQ(back, data);
  const BlockStatus status = run(backend.block_status(8192, 4096));
  EXPECT_TRUE(status.flags & kStatusData);
  close_node(opened.node);
}

// A reply header stalls halfway for a second: the reader waits in a coroutine, and a timer on
// the same context keeps firing meanwhile.
TEST(NbdClient, ReplyStalledMidHeaderDoesNotBlockTheLoop) {
  LocalServer server;
  Proxy proxy(server.socket(), /*byte_at_a_time=*/false);
  NbdOpenResult opened = open_uri(proxy.uri());
  ASSERT_TRUE(opened.node) << opened.message;
  BlockBackend backend(opened.node);
  const auto data = pattern(4096, 6);
  EXPECT_EQ(run(backend.write(0, data)), 0);

  std::atomic<int> ticks{0};
  std::atomic<bool> stop{false};
  coro::Event ticker_done;
  coro::spawn(aio::main_context(), [](std::atomic<int>& t, std::atomic<bool>& s,
                                      coro::Event& d) -> coro::Task<void> {
    while (!s.load()) {
      co_await coro::sleep(50ms);
      t.fetch_add(1);
    }
    d.set();
  }(ticks, stop, ticker_done));

  proxy.stall = true;
  const auto start = Clock::now();
  std::vector<std::byte> back(4096);
  EXPECT_EQ(run(backend.read(0, back)), 0);
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  EXPECT_EQ(back, data);
  EXPECT_EQ(proxy.stalls_done.load(), 1);
  EXPECT_GE(seconds, 0.9);
  // About 20 ticks in the 1 s stall; a blocked loop gets at most one. Each tick sleeps 50 ms
  // after the last, so a loaded machine's wake-up latency adds up: 5 still shows the loop ran.
  EXPECT_GE(ticks.load(), 5) << "the timer did not fire while the reply was stalled";
  stop = true;
  run([](coro::Event& d) -> coro::Task<void> { co_await d.wait(); }(ticker_done));
  close_node(opened.node);
}

// The server reads a READ and then disappears: the request fails with -EIO promptly, and so
// does every later request.
TEST(NbdClient, ServerVanishingMidRequestFailsWithEio) {
  FakeServer fake([](int fd) {
    proto::RequestHeader request;
    FakeServer::read_request(fd, request);
    // Half a reply header, then gone.
    const auto header = proto::encode_offset_data_header(request.cookie, request.offset, 4096, true);
    write_full(fd, header.data(), 10);
  });
  NbdOpenResult opened = open_uri(fake.uri());
  ASSERT_TRUE(opened.node) << opened.message;
  std::vector<std::byte> buffer(4096);
  const auto start = Clock::now();
  EXPECT_EQ(run(opened.node->read(0, buffer, 0)), -EIO);
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - start).count(), 5.0);
  EXPECT_EQ(run(opened.node->read(0, buffer, 0)), -EIO);
  EXPECT_EQ(run(opened.node->write(0, buffer, 0)), -EIO);
  close_dead_node(opened.node);
}

// Several reads in flight when the server goes: all of them fail.
TEST(NbdClient, ServerVanishingFailsEveryRequestInFlight) {
  FakeServer fake([](int fd) {
    proto::RequestHeader request;
    for (int i = 0; i < 4; ++i) FakeServer::read_request(fd, request);
  });
  NbdOpenResult opened = open_uri(fake.uri());
  ASSERT_TRUE(opened.node) << opened.message;
  std::atomic<int> eio{0};
  std::atomic<int> remaining{4};
  coro::Event done;
  for (int i = 0; i < 4; ++i) {
    coro::spawn(aio::main_context(), [](BlockNodeRef node, std::atomic<int>& count,
                                        std::atomic<int>& left, coro::Event& all) -> coro::Task<void> {
      std::vector<std::byte> buffer(4096);
      const int result = co_await node->read(0, buffer, 0);
      if (result == -EIO) count.fetch_add(1);
      if (left.fetch_sub(1) == 1) all.set();
    }(opened.node, eio, remaining, done));
  }
  run([](coro::Event& all) -> coro::Task<void> { co_await all.wait(); }(done));
  EXPECT_EQ(eio.load(), 4);
  close_dead_node(opened.node);
}

// Hostile replies end the connection (-EIO) without the client allocating or reading on.
TEST(NbdClient, ReplyWithUnknownCookieEndsTheConnection) {
  FakeServer fake([](int fd) {
    proto::RequestHeader request;
    FakeServer::read_request(fd, request);
    const auto reply = proto::encode_simple_reply(proto::Error::kNone, request.cookie + 1000);
    write_full(fd, reply.data(), reply.size());
    std::this_thread::sleep_for(200ms);
  });
  NbdOpenResult opened = open_uri(fake.uri());
  ASSERT_TRUE(opened.node) << opened.message;
  EXPECT_EQ(run(opened.node->flush()), -EIO);
  EXPECT_EQ(run(opened.node->flush()), -EIO);
  close_dead_node(opened.node);
}

TEST(NbdClient, OversizeChunkEndsTheConnection) {
  FakeServer fake([](int fd) {
    proto::RequestHeader request;
    FakeServer::read_request(fd, request);
    // 0xfffffff0 bytes of "data" for a 4 KiB read: refused from the header alone.
    const auto header = proto::encode_chunk_header(proto::kReplyFlagDone, proto::ChunkType::kOffsetData,
                                                   request.cookie, 0xfffffff0u);
    write_full(fd, header.data(), header.size());
    std::this_thread::sleep_for(200ms);
  });
  NbdOpenResult opened = open_uri(fake.uri());
  ASSERT_TRUE(opened.node) << opened.message;
  std::vector<std::byte> buffer(4096);
  EXPECT_EQ(run(opened.node->read(0, buffer, 0)), -EIO);
  close_dead_node(opened.node);
}

TEST(NbdClient, DataChunkOutsideItsRequestEndsTheConnection) {
  FakeServer fake([](int fd) {
    proto::RequestHeader request;
    FakeServer::read_request(fd, request);
    const auto header = proto::encode_offset_data_header(request.cookie, request.offset + 4096, 4096, true);
    std::vector<std::byte> data(4096);
    write_full(fd, header.data(), header.size());
    write_full(fd, data.data(), data.size());
    std::this_thread::sleep_for(200ms);
  });
  NbdOpenResult opened = open_uri(fake.uri());
  ASSERT_TRUE(opened.node) << opened.message;
  std::vector<std::byte> buffer(4096, std::byte{0x55});
  EXPECT_EQ(run(opened.node->read(0, buffer, 0)), -EIO);
  EXPECT_EQ(buffer[0], std::byte{0x55});  // nothing written into the caller's buffer
  close_dead_node(opened.node);
}

TEST(NbdClient, ErrorChunkFailsOnlyThatRequest) {
  FakeServer fake([](int fd) {
    proto::RequestHeader request;
    FakeServer::read_request(fd, request);
    std::vector<std::byte> out;
    proto::append_error_chunk(out, request.cookie, proto::Error::kNoSpace, "disk full", true);
    write_full(fd, out.data(), out.size());
    // Then success for everything until NBD_CMD_DISC.
    while (FakeServer::read_request(fd, request) && request.command() != proto::Command::kDisconnect) {
      const auto ok = proto::encode_simple_reply(proto::Error::kNone, request.cookie);
      write_full(fd, ok.data(), ok.size());
    }
  });
  NbdOpenResult opened = open_uri(fake.uri());
  ASSERT_TRUE(opened.node) << opened.message;
  std::vector<std::byte> buffer(4096);
  EXPECT_EQ(run(opened.node->write(0, buffer, 0)), -ENOSPC);
  EXPECT_EQ(run(opened.node->flush()), 0);
  close_node(opened.node);
}

TEST(NbdClient, ExportSizeOf2To63IsRefused) {
  FakeServer fake([](int) {}, std::uint64_t{1} << 63);
  NbdOpenResult opened = open_uri(fake.uri());
  EXPECT_FALSE(opened.node);
  EXPECT_EQ(opened.error, EPROTO) << opened.message;
}


// ---------------------------------------------------------------------------------------------
// Handshake timeout, reconnection, NBD_CMD_DISC, whole-range block status.

TEST(NbdUri, ParsesTimeoutKeys) {
  std::string error;
  auto uri = parse_nbd_uri("nbd://h/e?connect-timeout=0.5&reconnect-delay=10", error);
  ASSERT_TRUE(uri) << error;
  EXPECT_DOUBLE_EQ(uri->connect_timeout, 0.5);
  EXPECT_DOUBLE_EQ(uri->reconnect_delay, 10.0);
  auto defaults = parse_nbd_uri("nbd://h/e", error);
  ASSERT_TRUE(defaults) << error;
  EXPECT_DOUBLE_EQ(defaults->connect_timeout, 30.0);
  EXPECT_DOUBLE_EQ(defaults->reconnect_delay, 0.0);
  for (const char* text : {"nbd://h/e?connect-timeout=x", "nbd://h/e?connect-timeout=-1",
                           "nbd://h/e?reconnect-delay=1e3", "nbd://h/e?reconnect-delay=",
                           "nbd://h/e?reconnect-delay=999999"}) {
    EXPECT_FALSE(parse_nbd_uri(text, error)) << text;
  }
}

// Accepts connections and never says a word.
class SilentServer {
 public:
  SilentServer() {
    path_ = temp_path("silent");
    listen_fd_ = listen_unix(path_);
    thread_ = std::thread([this] {
      for (;;) {
        const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
        if (fd < 0) return;
        accepted_.push_back(fd);  // held open, silent
      }
    });
  }
  ~SilentServer() {
    ::shutdown(listen_fd_, SHUT_RDWR);
    thread_.join();
    for (const int fd : accepted_) ::close(fd);
    ::close(listen_fd_);
    ::unlink(path_.c_str());
  }
  std::string uri(const std::string& extra) const {
    return "nbd+unix:///disk?socket=" + path_ + extra;
  }

 private:
  std::string path_;
  int listen_fd_ = -1;
  std::vector<int> accepted_;  // the accept thread's
  std::thread thread_;
};

// Opens `uri` (which sets connect-timeout=0.3) and expects it to fail with ETIMEDOUT after
// about that long, naming the option.
void expect_open_times_out(const std::string& uri) {
  const auto start = Clock::now();
  NbdOpenResult opened = open_uri(uri);
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  EXPECT_FALSE(opened.node);
  EXPECT_EQ(opened.error, ETIMEDOUT) << opened.message;
  EXPECT_NE(opened.message.find("connect-timeout"), std::string::npos) << opened.message;
  EXPECT_GE(seconds, 0.25);
  EXPECT_LT(seconds, 5.0);
}

TEST(NbdClient, SilentServerTimesOutTheHandshake) {
  SilentServer silent;
  expect_open_times_out(silent.uri("&connect-timeout=0.3"));
}

TEST(NbdClient, ConnectTimeoutCoversATcpConnectThatNeverCompletes) {
  // A listener that nobody accepts from, its queue full: the kernel drops further SYNs, and
  // without a deadline the connect would wait out minutes of retries.
  auto listener = io::Listener::tcp("127.0.0.1", 0, /*backlog=*/0);
  ASSERT_TRUE(listener);
  const std::uint16_t port = listener.value()->port();
  const testing_support::FullAcceptQueue full(port);
  expect_open_times_out("nbd://127.0.0.1:" + std::to_string(port) + "/disk?connect-timeout=0.3");
}

// A proxy in front of a Unix socket that serves any number of client connections one after
// the other. `drop_on_request`: the next client→server bytes (a request) are swallowed and
// both sockets closed; `drop_on_reply`: the same for the next server→client bytes (the server
// did the work, the reply is lost).
class DroppingProxy {
 public:
  explicit DroppingProxy(std::string target)
      : forwarder_(std::move(target), true,
                   [this](Toward toward, int to, const char* data, std::size_t size) {
                     auto& drop = toward == Toward::server ? drop_on_request : drop_on_reply;
                     if (drop.exchange(false)) {
                       ++drops;
                       return false;
                     }
                     return write_full(to, data, size);
                   }) {}
  std::string uri(const std::string& extra) const {
    return "nbd+unix:///disk?socket=" + forwarder_.path() + extra;
  }
  int accepted() const { return forwarder_.accepted(); }
  std::atomic<bool> drop_on_request{false};
  std::atomic<bool> drop_on_reply{false};
  std::atomic<int> drops{0};

 private:
  ForwardingProxy forwarder_;  // last: its thread stops before the members above go away
};

// The connection drops with requests unanswered; the client reconnects through the same
// socket path and resends them: every request completes with the right data.
TEST(NbdClient, ReconnectsAndResendsAfterTheConnectionDrops) {
  LocalServer server;
  DroppingProxy proxy(server.socket());
  NbdOpenResult opened = open_uri(proxy.uri("&reconnect-delay=10"));
  ASSERT_TRUE(opened.node) << opened.message;
  auto backend = std::make_shared<BlockBackend>(opened.node);

  // A write swallowed before the server saw it, then a read whose reply is lost.
  const auto data = pattern(64 << 10, 11);
  proxy.drop_on_request = true;
  EXPECT_EQ(run(backend->write(1 << 20, data)), 0);
  EXPECT_EQ(proxy.drops.load(), 1);
  EXPECT_EQ(server.file_bytes(1 << 20, data.size()), data);
  proxy.drop_on_reply = true;
  std::vector<std::byte> back(data.size());
  EXPECT_EQ(run(backend->read(1 << 20, back)), 0);
  EXPECT_EQ(back, data);
  EXPECT_EQ(proxy.drops.load(), 2);

  // Many requests in flight from two contexts when the connection drops.
  aio::IoThread other("other");
  constexpr int kRequests = 32;
  std::atomic<int> failures{0};
  std::atomic<int> remaining{kRequests};
  coro::Event all_done;
  auto one = [&](int index) -> coro::Task<void> {
    const auto mine = pattern(16 << 10, static_cast<unsigned>(index + 100));
    const std::uint64_t offset = static_cast<std::uint64_t>(index) * (32 << 10);
    const int wrote = co_await backend->write(offset, mine);
    std::vector<std::byte> got(mine.size());
    const int read = co_await backend->read(offset, got);
    if (wrote != 0 || read != 0 || got != mine) failures.fetch_add(1);
    if (remaining.fetch_sub(1) == 1) all_done.set();
  };
  proxy.drop_on_reply = true;
  for (int i = 0; i < kRequests; ++i) {
    coro::spawn(i % 2 ? other.context() : aio::main_context(), one(i));
  }
  run([](coro::Event& done) -> coro::Task<void> { co_await done.wait(); }(all_done));
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(proxy.drops.load(), 3);
  EXPECT_GE(proxy.accepted(), 4);
  for (int i = 0; i < kRequests; ++i) {
    EXPECT_EQ(server.file_bytes(static_cast<std::uint64_t>(i) * (32 << 10), 16 << 10),
              pattern(16 << 10, static_cast<unsigned>(i + 100)));
  }
  close_node(opened.node);
}

// Without the key a drop fails the request at once, as before.
TEST(NbdClient, WithoutReconnectDelayADropFailsPromptly) {
  LocalServer server;
  DroppingProxy proxy(server.socket());
  NbdOpenResult opened = open_uri(proxy.uri(""));
  ASSERT_TRUE(opened.node) << opened.message;
  proxy.drop_on_request = true;
  std::vector<std::byte> buffer(4096);
  const auto start = Clock::now();
  EXPECT_EQ(run(opened.node->read(0, buffer, 0)), -EIO);
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - start).count(), 2.0);
  EXPECT_EQ(run(opened.node->read(0, buffer, 0)), -EIO);
  EXPECT_EQ(proxy.accepted(), 1);
  close_dead_node(opened.node);
}

// The server goes and never comes back (its socket still accepts, but nothing answers): the
// requests fail with -EIO once the delay has passed, not before and not much after.
TEST(NbdClient, ReconnectGivesUpAfterTheDelay) {
  FakeServer fake([](int fd) {
    proto::RequestHeader request;
    FakeServer::read_request(fd, request);
  });
  NbdOpenResult opened = open_uri(fake.uri() + "&reconnect-delay=1&connect-timeout=0.2");
  ASSERT_TRUE(opened.node) << opened.message;
  std::vector<std::byte> buffer(4096);
  const auto start = Clock::now();
  EXPECT_EQ(run(opened.node->read(0, buffer, 0)), -EIO);
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  EXPECT_GE(seconds, 0.9);
  EXPECT_LT(seconds, 4.0);
  EXPECT_EQ(run(opened.node->read(0, buffer, 0)), -EIO);  // dead now: at once
  close_dead_node(opened.node);
}

// A fake server that answers FLUSH and records whether NBD_CMD_DISC arrived.
struct DiscRecorder {
  std::atomic<bool> got_disc{false};
  std::atomic<bool> ended{false};
  FakeServer::Script script() {
    return [this](int fd) {
      proto::RequestHeader request;
      while (FakeServer::read_request(fd, request)) {
        if (request.command() == proto::Command::kDisconnect) {
          got_disc = true;
          break;
        }
        const auto ok = proto::encode_simple_reply(proto::Error::kNone, request.cookie);
        write_full(fd, ok.data(), ok.size());
      }
      ended = true;
    };
  }
  bool wait_ended() const {
    for (int i = 0; i < 300 && !ended.load(); ++i) std::this_thread::sleep_for(10ms);
    return ended.load();
  }
};

TEST(NbdClient, CloseAndDestructionSendDisconnect) {
  {
    DiscRecorder recorder;
    FakeServer fake(recorder.script());
    NbdOpenResult opened = open_uri(fake.uri());
    ASSERT_TRUE(opened.node) << opened.message;
    EXPECT_EQ(run(opened.node->flush()), 0);
    close_node(opened.node);
    EXPECT_TRUE(recorder.wait_ended());
    EXPECT_TRUE(recorder.got_disc.load());
  }
  {
    DiscRecorder recorder;
    FakeServer fake(recorder.script());
    NbdOpenResult opened = open_uri(fake.uri());
    ASSERT_TRUE(opened.node) << opened.message;
    EXPECT_EQ(run(opened.node->flush()), 0);
    const auto start = Clock::now();
    opened.node.reset();  // no close(): the destructor says goodbye without waiting
    EXPECT_LT(std::chrono::duration<double>(Clock::now() - start).count(), 1.0);
    EXPECT_TRUE(recorder.wait_ended());
    EXPECT_TRUE(recorder.got_disc.load());
  }
}

// A fake server with a fixed extent map: BLOCK_STATUS requests must not carry REQ_ONE and are
// answered with every extent from the offset to the end; a whole map walk takes one request.
TEST(NbdClient, BlockStatusAsksForTheWholeRangeOnce) {
  constexpr std::uint32_t kExtent = 64 << 10;  // alternating data / hole+zero
  constexpr std::uint64_t kMapSize = 1 << 20;
  std::atomic<int> requests{0};
  std::atomic<int> with_req_one{0};
  FakeServer fake(
      [&](int fd) {
        proto::RequestHeader request;
        while (FakeServer::read_request(fd, request) &&
               request.command() != proto::Command::kDisconnect) {
          std::vector<std::byte> out;
          if (request.command() != proto::Command::kBlockStatus) {
            const auto ok = proto::encode_simple_reply(proto::Error::kNone, request.cookie);
            write_full(fd, ok.data(), ok.size());
            continue;
          }
          ++requests;
          if (request.flags & proto::kCmdFlagReqOne) ++with_req_one;
          std::vector<proto::Extent> extents;
          for (std::uint64_t at = request.offset; at < request.offset + request.length;) {
            const std::uint64_t index = at / kExtent;
            const std::uint64_t end =
                std::min((index + 1) * kExtent, request.offset + request.length);
            extents.push_back({static_cast<std::uint32_t>(end - at),
                               index % 2 ? proto::kStateHole | proto::kStateZero : 0u});
            at = end;
          }
          proto::append_block_status_chunk(out, request.cookie, 7, extents, true);
          write_full(fd, out.data(), out.size());
        }
      },
      kMapSize);
  NbdOpenResult opened = open_uri(fake.uri());
  ASSERT_TRUE(opened.node) << opened.message;
  BlockBackend backend(opened.node);
  std::uint64_t offset = 0;
  int runs = 0;
  while (offset < kMapSize) {
    const BlockStatus status = run(backend.block_status(offset, kMapSize - offset));
    ASSERT_GT(status.bytes, 0u);
    const bool hole = (offset / kExtent) % 2 == 1;
    EXPECT_EQ(status.bytes, kExtent) << offset;
    EXPECT_EQ((status.flags & kStatusData) == 0, hole) << offset;
    EXPECT_EQ((status.flags & kStatusZero) != 0, hole) << offset;
    offset += status.bytes;
    ++runs;
  }
  EXPECT_EQ(runs, static_cast<int>(kMapSize / kExtent));
  EXPECT_EQ(requests.load(), 1);
  EXPECT_EQ(with_req_one.load(), 0);
  // A write of ours drops the cache: the next query asks again.
  const auto data = pattern(4096, 2);
  EXPECT_EQ(run(backend.write(0, data)), 0);
  run(backend.block_status(kExtent, kExtent));
  EXPECT_EQ(requests.load(), 2);
  close_node(opened.node);
}

// A server that cannot describe a range (qemu-nbd and spindle-nbd answer EIO for corrupt image
// metadata) makes the status an error: a tool must not copy such a range as data.
TEST(NbdClient, BlockStatusErrorReplyIsTheStatusError) {
  FakeServer fake(
      [&](int fd) {
        proto::RequestHeader request;
        while (FakeServer::read_request(fd, request) &&
               request.command() != proto::Command::kDisconnect) {
          std::vector<std::byte> out;
          if (request.command() != proto::Command::kBlockStatus) {
            const auto ok = proto::encode_simple_reply(proto::Error::kNone, request.cookie);
            write_full(fd, ok.data(), ok.size());
            continue;
          }
          proto::append_error_chunk(out, request.cookie, proto::Error::kIo, "corrupt", true);
          write_full(fd, out.data(), out.size());
        }
      },
      1 << 20);
  NbdOpenResult opened = open_uri(fake.uri());
  ASSERT_TRUE(opened.node) << opened.message;
  BlockBackend backend(opened.node);
  const BlockStatus status = run(backend.block_status(0, 1 << 20));
  EXPECT_EQ(status.error, -EIO);
  close_node(opened.node);
}

}  // namespace
}  // namespace spindle::block::nbd
