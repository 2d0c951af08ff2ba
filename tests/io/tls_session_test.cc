// io::TlsSession over a socketpair, server and client on different IoThreads, with PSK
// credentials written by the test (X.509 is covered with certtool-made certificates by
// tests/interop/test_tls.py): a 1 MiB echo with the client writing and reading at the same time,
// a wrong key refused on both sides without a hang, a peer that closes without close_notify,
// close() waking a blocked read, and garbage instead of a ClientHello.
#include "io/tls_session.h"

#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "aio/io_thread.h"
#include "coro/block_on.h"
#include "coro/event.h"
#include "coro/task.h"

namespace spindle::io {
namespace {

class TempKeys {
 public:
  TempKeys() {
    char pattern[] = "/tmp/spindle-tls-XXXXXX";
    directory_ = ::mkdtemp(pattern);
  }
  ~TempKeys() { std::filesystem::remove_all(directory_); }
  // A psktool-style file with one random 32-byte key for `user`.
  std::string write_key_file(const std::string& name, const std::string& user) {
    std::mt19937_64 random(std::random_device{}());
    static constexpr char kHex[] = "0123456789abcdef";
    std::string key;
    for (int i = 0; i < 64; ++i) key += kHex[random() % 16];
    const std::string path = directory_ + "/" + name;
    std::ofstream(path) << user << ":" << key << "\n";
    return path;
  }

 private:
  std::string directory_;
};

struct Endpoints {
  int server_fd = -1;
  int client_fd = -1;
  Endpoints() {
    int fds[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds), 0);
    server_fd = fds[0];
    client_fd = fds[1];
  }
};

std::shared_ptr<const TlsCredentials> psk_server(const std::string& file) {
  std::string error;
  auto creds = TlsCredentials::server_psk(file, error);
  EXPECT_TRUE(creds) << error;
  return creds;
}

std::shared_ptr<const TlsCredentials> psk_client(const std::string& file) {
  std::string error;
  auto creds = TlsCredentials::client_psk(file, "alice", error);
  EXPECT_TRUE(creds) << error;
  return creds;
}

struct ServerResult {
  int handshake = 1;
  std::string username;
  std::size_t echoed = 0;
  coro::Event done;
};

// Handshakes, then echoes everything back until the client's stream ends.
coro::Task<void> echo_server(int fd, std::shared_ptr<const TlsCredentials> creds,
                             ServerResult& result) {
  Channel channel(fd);
  std::string error;
  auto tls = TlsSession::create(channel, creds, {}, error);
  result.handshake = co_await tls->handshake();
  if (result.handshake == 0) {
    result.username = tls->psk_username();
    std::vector<char> buffer(20000);  // not a multiple of the record size
    for (;;) {
      const ssize_t n = co_await tls->read_some(buffer.data(), buffer.size());
      if (n <= 0) break;
      const int written = co_await tls->write_all(buffer.data(), static_cast<std::size_t>(n));
      if (written != 0) break;
      result.echoed += static_cast<std::size_t>(n);
    }
  }
  result.done.set();
}

void wait_until_done(aio::IoThread& thread, ServerResult& server) {
  coro::block_on(thread.context(), [](ServerResult& s) -> coro::Task<void> {
    co_await s.done.wait();
  }(server));
}

coro::Task<int> write_in_pieces(TlsSession& tls, const std::vector<char>& data) {
  std::size_t at = 0, piece = 1;
  while (at < data.size()) {
    // Mix tiny gathered writes (two iovecs) with large single ones.
    const std::size_t length = std::min(piece, data.size() - at);
    const std::size_t half = length / 2;
    const iovec parts[] = {{const_cast<char*>(data.data() + at), half},
                           {const_cast<char*>(data.data() + at + half), length - half}};
    const int rc = co_await tls.writev_all(parts);
    if (rc != 0) co_return rc;
    at += length;
    piece = piece * 3 + 1;
    if (piece > 300000) piece = 7;
  }
  co_return 0;
}

TEST(TlsSession, PskEchoWhileWritingAndReadingAtOnce) {
  TempKeys keys;
  const std::string file = keys.write_key_file("keys.psk", "alice");
  aio::IoThread server_thread("tls-server"), client_thread("tls-client");
  Endpoints ends;
  ServerResult server;
  coro::spawn(server_thread.context(), echo_server(ends.server_fd, psk_server(file), server));

  std::vector<char> data(1 << 20);
  std::mt19937 random(42);
  for (char& c : data) c = static_cast<char>(random());
  std::vector<char> echoed(data.size());
  auto client = [&]() -> coro::Task<int> {
    Channel channel(ends.client_fd);
    std::string error;
    auto tls = TlsSession::create(channel, psk_client(file), {}, error);
    const int shaken = co_await tls->handshake();
    if (shaken != 0) co_return shaken;
    coro::Event written;
    int write_result = 1;
    coro::spawn(*aio::current_context(), [](TlsSession& session, const std::vector<char>& bytes,
                                            int& result, coro::Event& done) -> coro::Task<void> {
      result = co_await write_in_pieces(session, bytes);
      done.set();
    }(*tls, data, write_result, written));
    const int read = co_await tls->read_exact(echoed.data(), echoed.size());
    co_await written.wait();
    channel.shutdown_write();
    co_return read != 0 ? read : write_result;
  };
  EXPECT_EQ(coro::block_on(client_thread.context(), client()), 0);
  EXPECT_TRUE(data == echoed);
  wait_until_done(server_thread, server);
  EXPECT_EQ(server.handshake, 0);
  EXPECT_EQ(server.username, "alice");
  EXPECT_EQ(server.echoed, data.size());
}

TEST(TlsSession, WrongKeyIsRefusedOnBothSides) {
  TempKeys keys;
  const std::string good = keys.write_key_file("good.psk", "alice");
  const std::string wrong = keys.write_key_file("wrong.psk", "alice");
  aio::IoThread server_thread("tls-server"), client_thread("tls-client");
  Endpoints ends;
  ServerResult server;
  coro::spawn(server_thread.context(), echo_server(ends.server_fd, psk_server(good), server));
  auto client = [&]() -> coro::Task<int> {
    Channel channel(ends.client_fd);
    std::string error;
    auto tls = TlsSession::create(channel, psk_client(wrong), {}, error);
    const int shaken = co_await tls->handshake();
    co_return shaken;
  };
  const int client_result = coro::block_on(client_thread.context(), client());
  EXPECT_LT(client_result, 0);
  wait_until_done(server_thread, server);
  EXPECT_LT(server.handshake, 0);
  EXPECT_EQ(server.echoed, 0u);
}

TEST(TlsSession, PeerClosingWithoutCloseNotifyEndsTheStream) {
  TempKeys keys;
  const std::string file = keys.write_key_file("keys.psk", "alice");
  aio::IoThread server_thread("tls-server"), client_thread("tls-client");
  Endpoints ends;
  ServerResult server;
  coro::spawn(server_thread.context(), echo_server(ends.server_fd, psk_server(file), server));
  auto client = [&]() -> coro::Task<int> {
    Channel channel(ends.client_fd);
    std::string error;
    auto tls = TlsSession::create(channel, psk_client(file), {}, error);
    const int shaken = co_await tls->handshake();
    if (shaken != 0) co_return shaken;
    const int written = co_await tls->write_all("hello", 5);
    char reply[5];
    const int read = co_await tls->read_exact(reply, sizeof reply);
    channel.close();  // no close_notify: the socket just goes away
    co_return written != 0 ? written : read;
  };
  EXPECT_EQ(coro::block_on(client_thread.context(), client()), 0);
  wait_until_done(server_thread, server);
  EXPECT_EQ(server.echoed, 5u);  // the server saw end-of-stream and finished
}

TEST(TlsSession, CloseWakesABlockedRead) {
  TempKeys keys;
  const std::string file = keys.write_key_file("keys.psk", "alice");
  aio::IoThread server_thread("tls-server"), client_thread("tls-client");
  Endpoints ends;
  ServerResult server;
  coro::spawn(server_thread.context(), echo_server(ends.server_fd, psk_server(file), server));
  Channel channel(ends.client_fd, &client_thread.context());
  std::atomic<bool> reading{false};
  auto client = [&]() -> coro::Task<ssize_t> {
    std::string error;
    auto tls = TlsSession::create(channel, psk_client(file), {}, error);
    const int shaken = co_await tls->handshake();
    if (shaken != 0) co_return shaken;
    reading.store(true);
    char byte;
    const ssize_t n = co_await tls->read_some(&byte, 1);  // the server sends nothing
    co_return n;
  };
  coro::Event finished;
  ssize_t result = 1;
  coro::spawn(client_thread.context(), [](auto make, ssize_t& out, coro::Event& done)
                                           -> coro::Task<void> {
    out = co_await make();
    done.set();
  }(client, result, finished));
  while (!reading.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  // Close from the client's context: the item runs only once the coroutine has suspended, and
  // after `reading` its only suspension is the wait in read_some. (A close from this thread
  // 20 ms later could land before the wait on a loaded machine, and a read that has not
  // parked yet gets the fd's -EBADF, not -ECANCELED.)
  client_thread.context().run_soon([&] { channel.close(); });
  coro::block_on(client_thread.context(), [](coro::Event& done) -> coro::Task<void> {
    co_await done.wait();
  }(finished));
  EXPECT_EQ(result, -ECANCELED);
  wait_until_done(server_thread, server);
}

TEST(TlsSession, GarbageInsteadOfClientHelloFailsTheHandshake) {
  TempKeys keys;
  const std::string file = keys.write_key_file("keys.psk", "alice");
  aio::IoThread server_thread("tls-server");
  Endpoints ends;
  ServerResult server;
  std::vector<char> garbage(4096);
  std::mt19937 random(7);
  for (char& c : garbage) c = static_cast<char>(random());
  ASSERT_EQ(::write(ends.client_fd, garbage.data(), garbage.size()),
            static_cast<ssize_t>(garbage.size()));
  // Then end the stream: random bytes may announce a record longer than what follows, and a
  // peer that stalls is the caller's timeout to handle (the NBD handshake deadline).
  ::shutdown(ends.client_fd, SHUT_WR);
  coro::spawn(server_thread.context(), echo_server(ends.server_fd, psk_server(file), server));
  wait_until_done(server_thread, server);
  EXPECT_LT(server.handshake, 0);
  ::close(ends.client_fd);
}

TEST(TlsCredentials, MissingFilesAreReportedByName) {
  std::string error;
  EXPECT_FALSE(TlsCredentials::server_x509("/nonexistent/pki", false, error));
  EXPECT_NE(error.find("/nonexistent/pki/server-cert.pem"), std::string::npos) << error;
  EXPECT_FALSE(TlsCredentials::server_psk("/nonexistent/keys.psk", error));
  EXPECT_NE(error.find("/nonexistent/keys.psk"), std::string::npos) << error;
  TempKeys keys;
  const std::string file = keys.write_key_file("keys.psk", "alice");
  EXPECT_FALSE(TlsCredentials::client_psk(file, "bob", error));
  EXPECT_NE(error.find("bob"), std::string::npos) << error;
}

}  // namespace
}  // namespace spindle::io
