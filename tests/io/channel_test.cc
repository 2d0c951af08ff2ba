// io::Channel and its kinds: an echo server with 200 concurrent clients over TCP and Unix
// sockets; a reader moved between IoThreads mid-stream (nothing lost or duplicated, and it
// continues on the new thread); a peer that sends one byte at a time; a peer that vanishes;
// close() waking a blocked reader; connects bounded by a deadline (SYNs dropped, a full Unix
// backlog); send_file() of ranges larger than the socket buffer, past
// the end of the file, to a vanished peer, and by copying where pages cannot be passed on;
// child processes (output to EOF, exit codes, signals); interrupt_read().
#include "io/channel.h"

#include <gtest/gtest.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "aio/io_thread.h"
#include "aio/timer.h"
#include "coro/block_on.h"
#include "coro/event.h"
#include "coro/task.h"
#include "io/command.h"
#include "io/socket.h"
#include "support/full_accept_queue.h"
#include "support/thread_identity.h"

namespace spindle::io {
namespace {

using namespace std::chrono_literals;

coro::Task<void> echo_session(std::unique_ptr<Channel> channel, std::atomic<int>& live) {
  char buffer[4096];
  for (;;) {
    const ssize_t n = co_await channel->read_some(buffer, sizeof buffer);
    if (n <= 0) break;
    const int written = co_await channel->write_all(buffer, static_cast<std::size_t>(n));
    if (written != 0) break;
  }
  channel.reset();  // in this context's thread, before the test may stop it
  live.fetch_sub(1);
}

// `live` counts the echo sessions not finished yet.
coro::Task<void> accept_loop(Listener& listener, std::atomic<int>& accepted,
                             std::atomic<int>& live, coro::Event& done) {
  for (;;) {
    auto connection = co_await listener.accept();
    if (!connection) break;  // closed
    accepted.fetch_add(1);
    live.fetch_add(1);
    coro::spawn(*aio::current_context(), echo_session(std::move(connection.value()), live));
  }
  done.set();
}

struct ClientStats {
  std::atomic<int> succeeded{0};
  std::atomic<int> failed{0};
  std::atomic<int> finished{0};
};

template <typename Connect>
coro::Task<void> echo_client(Connect connect, int id, ClientStats& stats) {
  auto connection = co_await connect();
  bool ok = static_cast<bool>(connection);
  if (ok) {
    Channel& channel = *connection.value();
    for (int round = 0; round < 10 && ok; ++round) {
      const std::string message = "client " + std::to_string(id) + " round " +
                                  std::to_string(round) + std::string(40, '.');
      std::string reply(message.size(), '\0');
      ok = co_await channel.write_all(message.data(), message.size()) == 0 &&
           co_await channel.read_exact(reply.data(), reply.size()) == 0 && reply == message;
    }
  }
  (ok ? stats.succeeded : stats.failed).fetch_add(1);
  stats.finished.fetch_add(1);
}

template <typename Connect>
void run_echo_test(std::unique_ptr<Listener> listener, Connect connect) {
  aio::IoThread server("echo-server"), clients("echo-clients");
  std::atomic<int> accepted{0};
  std::atomic<int> live_sessions{0};
  coro::Event server_done;
  coro::spawn(server.context(), accept_loop(*listener, accepted, live_sessions, server_done));
  constexpr int kClients = 200;
  ClientStats stats;
  for (int i = 0; i < kClients; ++i) coro::spawn(clients.context(), echo_client(connect, i, stats));
  for (int i = 0; i < 3000 && stats.finished.load() < kClients; ++i) std::this_thread::sleep_for(5ms);
  EXPECT_EQ(stats.succeeded.load(), kClients);
  EXPECT_EQ(stats.failed.load(), 0);
  EXPECT_EQ(accepted.load(), kClients);
  server.context().run_soon([&] { listener->close(); });  // accept() ends with ECANCELED
  coro::block_on(server.context(), [](coro::Event& done) -> coro::Task<void> {
    co_await done.wait();
  }(server_done));
  // Every client has closed its end: wait until every echo session has seen EOF and ended
  // (a fixed sleep could stop the server thread with sessions still parked, leaking them).
  const auto deadline = std::chrono::steady_clock::now() + 60s;
  while (live_sessions.load() > 0 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(1ms);
  }
  EXPECT_EQ(live_sessions.load(), 0);
}

TEST(ChannelTest, EchoServerWithTwoHundredTcpClients) {
  auto listener = Listener::tcp("127.0.0.1", 0);
  ASSERT_TRUE(listener) << std::strerror(listener.error());
  const std::uint16_t port = listener.value()->port();
  ASSERT_NE(port, 0);
  run_echo_test(std::move(listener.value()), [port] { return connect_tcp("127.0.0.1", port); });
}

TEST(ChannelTest, EchoServerWithTwoHundredUnixClients) {
  const std::string path = "/tmp/spindle-echo-" + std::to_string(::getpid()) + ".sock";
  auto listener = Listener::unix_socket(path);
  ASSERT_TRUE(listener) << std::strerror(listener.error());
  run_echo_test(std::move(listener.value()), [path] { return connect_unix(path); });
  ::unlink(path.c_str());
}

TEST(ChannelTest, TcpOverIpv6Loopback) {
  auto listener = Listener::tcp("::1", 0);
  if (!listener) GTEST_SKIP() << "no IPv6 loopback here";
  aio::IoThread io("ipv6");
  const std::uint16_t port = listener.value()->port();
  const bool echoed = coro::block_on(io.context(), [](Listener& l, std::uint16_t p) -> coro::Task<bool> {
    auto client = co_await connect_tcp("::1", p);
    auto server = co_await l.accept();
    if (!client || !server) co_return false;
    char byte = 'x', back = 0;
    co_return co_await client.value()->write_all(&byte, 1) == 0 &&
        co_await server.value()->read_exact(&back, 1) == 0 && back == 'x';
  }(*listener.value(), port));
  EXPECT_TRUE(echoed);
}

TEST(ChannelTest, ConnectionRefusedIsAnError) {
  auto listener = Listener::tcp("127.0.0.1", 0);
  ASSERT_TRUE(listener);
  const std::uint16_t port = listener.value()->port();
  listener.value().reset();  // nobody listens there now
  aio::IoThread io("refused");
  const int error = coro::block_on(io.context(), [](std::uint16_t p) -> coro::Task<int> {
    auto result = co_await connect_tcp("127.0.0.1", p);
    co_return result ? 0 : result.error();
  }(port));
  EXPECT_EQ(error, ECONNREFUSED);
}

TEST(ChannelTest, ConnectToAPeerDroppingSynsEndsAtTheDeadline) {
  auto listener = Listener::tcp("127.0.0.1", 0, /*backlog=*/0);
  ASSERT_TRUE(listener);
  const std::uint16_t port = listener.value()->port();
  const testing_support::FullAcceptQueue full(port);
  aio::IoThread io("deadline");
  const std::int64_t start = aio::now_ns(aio::Clock::monotonic);
  const int error = coro::block_on(io.context(), [](std::uint16_t p, std::int64_t deadline)
                                                     -> coro::Task<int> {
    auto result = co_await connect_tcp("127.0.0.1", p, deadline);
    co_return result ? 0 : result.error();
  }(port, start + 300'000'000));
  const double seconds = static_cast<double>(aio::now_ns(aio::Clock::monotonic) - start) / 1e9;
  EXPECT_EQ(error, ETIMEDOUT);
  EXPECT_GE(seconds, 0.29);
  EXPECT_LT(seconds, 3.0);  // the kernel's own SYN retries would take minutes
}

TEST(ChannelTest, ConnectToAFullUnixBacklogEndsAtTheDeadline) {
  const std::string path = "/tmp/spindle-backlog-" + std::to_string(::getpid());
  auto listener = Listener::unix_socket(path, /*backlog=*/0);
  ASSERT_TRUE(listener);
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  std::strncpy(address.sun_path, path.c_str(), sizeof address.sun_path - 1);
  std::vector<int> queued;
  for (int i = 0; i < 64; ++i) {  // until the backlog refuses with EAGAIN
    const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    queued.push_back(fd);
    if (::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0 &&
        errno == EAGAIN) {
      break;
    }
  }
  aio::IoThread io("unix-deadline");
  const std::int64_t start = aio::now_ns(aio::Clock::monotonic);
  const int error = coro::block_on(io.context(), [](std::string where, std::int64_t deadline)
                                                     -> coro::Task<int> {
    auto result = co_await connect_unix(where, deadline);
    co_return result ? 0 : result.error();
  }(path, start + 200'000'000));
  const double seconds = static_cast<double>(aio::now_ns(aio::Clock::monotonic) - start) / 1e9;
  EXPECT_EQ(error, ETIMEDOUT);
  EXPECT_GE(seconds, 0.19);
  EXPECT_LT(seconds, 2.0);  // not the five seconds of retries without a deadline
  for (const int fd : queued) ::close(fd);
  ::unlink(path.c_str());
}

struct SocketPair {
  int ours, theirs;
  SocketPair() {
    int fds[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds), 0);
    ours = fds[0];
    theirs = fds[1];
  }
};

TEST(ChannelTest, ReaderMovedBetweenIoThreadsMidStreamLosesAndDuplicatesNothing) {
  aio::IoThread a("move-a"), b("move-b");
  const auto thread_of = [](aio::IoThread& t) {
    return coro::block_on(t.context(), []() -> coro::Task<std::thread::id> {
      co_return testing_support::this_thread_id();
    }());
  };
  const auto a_id = thread_of(a), b_id = thread_of(b);
  SocketPair pair;
  Channel channel(pair.ours, &a.context());
  constexpr int kValues = 4000;
  std::atomic<int> received{0};
  std::atomic<int> out_of_order{0};
  std::atomic<int> after_move_on_b{0}, after_move_elsewhere{0};
  std::atomic<bool> moved{false};
  coro::Event reader_done;
  coro::spawn(a.context(), [](Channel& ch, std::atomic<int>& count, std::atomic<int>& bad,
                              std::atomic<bool>& was_moved, std::atomic<int>& on_b,
                              std::atomic<int>& elsewhere, std::thread::id b_thread,
                              coro::Event& done) -> coro::Task<void> {
    for (int expected = 0; expected < kValues; ++expected) {
      int value;
      const int got = co_await ch.read_exact(&value, sizeof value);
      if (got != 0) break;
      if (value != expected) bad.fetch_add(1);
      if (was_moved.load()) {
        (testing_support::this_thread_id() == b_thread ? on_b : elsewhere).fetch_add(1);
      }
      count.fetch_add(1);
    }
    done.set();
  }(channel, received, out_of_order, moved, after_move_on_b, after_move_elsewhere, b_id,
                                                           reader_done));
  std::thread writer([&] {
    for (int i = 0; i < kValues; ++i) {
      const char* bytes = reinterpret_cast<const char*>(&i);
      // Split some values across writes so the reader sees partial values, too.
      if (i % 7 == 0) {
        ASSERT_EQ(::write(pair.theirs, bytes, 1), 1);
        ASSERT_EQ(::write(pair.theirs, bytes + 1, 3), 3);
      } else {
        ASSERT_EQ(::write(pair.theirs, bytes, 4), 4);
      }
      if (i == kValues / 2) {
        while (received.load() < kValues / 2) std::this_thread::sleep_for(1ms);
        moved = true;
        channel.attach(b.context());  // the reader is blocked in the channel right now
      }
      if (i % 64 == 0) std::this_thread::sleep_for(200us);
    }
  });
  writer.join();
  coro::block_on(b.context(), [](coro::Event& done) -> coro::Task<void> {
    co_await done.wait();
  }(reader_done));
  EXPECT_EQ(received.load(), kValues);
  EXPECT_EQ(out_of_order.load(), 0);
  EXPECT_GT(after_move_on_b.load(), kValues / 4);
  EXPECT_LE(after_move_elsewhere.load(), 1);  // at most the value being read as it moved
  (void)a_id;
  channel.detach();
  ::close(pair.theirs);
}

TEST(ChannelTest, PeerSendingOneByteAtATime) {
  aio::IoThread io("trickle");
  SocketPair pair;
  std::string message(1000, '\0');
  for (std::size_t i = 0; i < message.size(); ++i) message[i] = static_cast<char>('a' + i % 26);
  std::thread writer([&] {
    for (std::size_t i = 0; i < message.size(); ++i) {
      ASSERT_EQ(::write(pair.theirs, &message[i], 1), 1);
      if (i % 100 == 0) std::this_thread::sleep_for(1ms);
    }
  });
  std::string received(message.size(), '\0');
  auto channel = std::make_unique<Channel>(pair.ours, nullptr);
  const int result = coro::block_on(io.context(), [](Channel& ch, std::string& out) -> coro::Task<int> {
    co_return co_await ch.read_exact(out.data(), out.size());
  }(*channel, received));
  writer.join();
  EXPECT_EQ(result, 0);
  EXPECT_EQ(received, message);
  ::close(pair.theirs);
  coro::block_on(io.context(), [](std::unique_ptr<Channel> ch) -> coro::Task<void> {
    ch.reset();  // destroyed in its context's thread
    co_return;
  }(std::move(channel)));
}

TEST(ChannelTest, PeerThatVanishesGivesErrorsNotSignals) {
  aio::IoThread io("vanish");
  SocketPair pair;
  ASSERT_EQ(::write(pair.theirs, "partial", 7), 7);
  ::close(pair.theirs);
  const auto results = coro::block_on(io.context(), [](int fd) -> coro::Task<std::vector<int>> {
    Channel ch(fd);
    std::vector<int> out;
    char buffer[100];
    out.push_back(co_await ch.read_exact(buffer, sizeof buffer));  // 7 bytes, then EOF
    out.push_back(static_cast<int>(co_await ch.read_some(buffer, sizeof buffer)));
    out.push_back(co_await ch.write_all("hello?", 6));
    co_return out;
  }(pair.ours));
  EXPECT_EQ(results, (std::vector<int>{-ECONNRESET, 0, -EPIPE}));
}

TEST(ChannelTest, CloseWakesABlockedReader) {
  aio::IoThread io("close-wakes");
  SocketPair pair;
  Channel channel(pair.ours, nullptr);
  std::atomic<ssize_t> result{1};
  coro::Event done;
  coro::spawn(io.context(), [](Channel& ch, std::atomic<ssize_t>& r, coro::Event& d) -> coro::Task<void> {
    char byte;
    r = co_await ch.read_some(&byte, 1);
    d.set();
  }(channel, result, done));
  std::this_thread::sleep_for(30ms);  // blocked in read_some
  io.context().run_soon([&] { channel.close(); });
  coro::block_on(io.context(), [](coro::Event& d) -> coro::Task<void> { co_await d.wait(); }(done));
  EXPECT_EQ(result.load(), -ECANCELED);
  ::close(pair.theirs);
}

// interrupt_read() calls away a read_some_or_interrupt() that waits (or is about to wait) for
// data, once; a plain read_some() just keeps waiting; data already there is returned first.
TEST(ChannelTest, InterruptReadCallsAWaitingReaderAwayOnce) {
  aio::IoThread io("interrupt");
  SocketPair pair;
  Channel channel(pair.ours, nullptr);
  std::atomic<int> stage{0};
  coro::Event go_on;
  std::vector<ssize_t> results;  // read by this thread once `done` is set
  std::string bytes;
  coro::Event done;
  coro::spawn(
      io.context(),
      [](Channel& ch, std::atomic<int>& at, coro::Event& go, std::vector<ssize_t>& out,
         std::string& got, coro::Event& d) -> coro::Task<void> {
        char byte = 0;
        out.push_back(co_await ch.read_some_or_interrupt(&byte, 1));  // interrupted
        at.store(1);
        out.push_back(co_await ch.read_some(&byte, 1));  // interrupted too, waits for 'x'
        got += byte;
        out.push_back(co_await ch.read_some_or_interrupt(&byte, 1));  // the pending interrupt
        at.store(2);
        co_await go.wait();  // 'y' has arrived, and another interrupt
        out.push_back(co_await ch.read_some_or_interrupt(&byte, 1));  // data first
        got += byte;
        out.push_back(co_await ch.read_some_or_interrupt(&byte, 1));  // then the interrupt
        at.store(3);
        out.push_back(co_await ch.read_some_or_interrupt(&byte, 1));  // EOF
        d.set();
      }(channel, stage, go_on, results, bytes, done));
  std::this_thread::sleep_for(20ms);  // (whether it waits yet or not, it sees the interrupt)
  channel.interrupt_read();
  while (stage.load() < 1) std::this_thread::sleep_for(1ms);
  channel.interrupt_read();
  std::this_thread::sleep_for(20ms);
  ASSERT_EQ(::write(pair.theirs, "x", 1), 1);
  while (stage.load() < 2) std::this_thread::sleep_for(1ms);
  ASSERT_EQ(::write(pair.theirs, "y", 1), 1);
  channel.interrupt_read();
  go_on.set();
  while (stage.load() < 3) std::this_thread::sleep_for(1ms);
  ::close(pair.theirs);
  coro::block_on(io.context(), [](coro::Event& d) -> coro::Task<void> { co_await d.wait(); }(done));
  EXPECT_EQ(results, (std::vector<ssize_t>{-EINTR, 1, -EINTR, 1, -EINTR, 0}));
  EXPECT_EQ(bytes, "xy");
  io.context().run_soon([&] { channel.detach(); });
  coro::block_on(io.context(), []() -> coro::Task<void> { co_return; }());
}

// A temporary file of `size` patterned bytes (unlinked; the fd stays open).
struct PatternFile {
  int fd = -1;
  std::string bytes;
  explicit PatternFile(std::size_t size) : bytes(size, '\0') {
    for (std::size_t i = 0; i < size; ++i) bytes[i] = static_cast<char>(i * 13 + i / 1000);
    char path[] = "/tmp/spindle-sendfile-XXXXXX";
    fd = ::mkstemp(path);
    EXPECT_GE(fd, 0);
    ::unlink(path);
    EXPECT_EQ(::write(fd, bytes.data(), size), static_cast<ssize_t>(size));
  }
  ~PatternFile() { ::close(fd); }
};

TEST(ChannelTest, SendFileMovesARangeLargerThanTheSocketBuffer) {
  aio::IoThread io("sendfile");
  PatternFile file(8 << 20);
  SocketPair pair;
  const std::uint64_t offset = 12345, length = 6 << 20;
  std::string received(length, '\0');
  std::thread reader([&] {  // a slow reader: the sender must wait for room several times
    std::size_t done = 0;
    while (done < length) {
      const ssize_t n = ::read(pair.theirs, received.data() + done,
                               std::min<std::size_t>(length - done, 100000));
      ASSERT_GT(n, 0);
      done += static_cast<std::size_t>(n);
      std::this_thread::sleep_for(100us);
    }
  });
  const int result = coro::block_on(io.context(), [](int fd, int file_fd, std::uint64_t at, std::uint64_t bytes) -> coro::Task<int> {
    Channel channel(fd);
    EXPECT_TRUE(channel.can_send_file());
    co_return co_await channel.send_file(file_fd, at, bytes);
  }(pair.ours, file.fd, offset, length));
  reader.join();
  EXPECT_EQ(result, 0);
  EXPECT_TRUE(received == file.bytes.substr(offset, length));
  EXPECT_EQ(::lseek(file.fd, 0, SEEK_CUR), static_cast<off_t>(file.bytes.size()));  // untouched
  ::close(pair.theirs);
}

TEST(ChannelTest, SendFilePastTheEndOfTheFileOrToAVanishedPeerFails) {
  aio::IoThread io("sendfile-errors");
  PatternFile file(1000);
  SocketPair pair;
  const auto results = coro::block_on(io.context(), [](int fd, int file_fd, int peer) -> coro::Task<std::vector<int>> {
    Channel channel(fd);
    std::vector<int> out;
    out.push_back(co_await channel.send_file(file_fd, 500, 1000));  // only 500 bytes exist
    ::close(peer);
    out.push_back(co_await channel.send_file(file_fd, 0, 100));
    co_return out;
  }(pair.ours, file.fd, pair.theirs));
  EXPECT_EQ(results, (std::vector<int>{-EIO, -EPIPE}));
}

TEST(ChannelTest, SendFileCopiesWhereThePagesCannotBePassedOn) {
  aio::IoThread io("sendfile-pipe");
  PatternFile file(300000);  // more than one copy chunk
  int fds[2];
  ASSERT_EQ(::pipe2(fds, O_CLOEXEC), 0);
  std::string received;
  std::thread reader([&] {
    char buffer[65536];
    for (;;) {
      const ssize_t n = ::read(fds[0], buffer, sizeof buffer);
      if (n <= 0) break;
      received.append(buffer, static_cast<std::size_t>(n));
    }
  });
  const auto results = coro::block_on(io.context(), [](int fd, int file_fd) -> coro::Task<std::vector<int>> {
    Channel pipe_end(fd);
    EXPECT_FALSE(pipe_end.can_send_file());
    std::vector<int> out;
    out.push_back(co_await pipe_end.send_file(file_fd, 7, 299990));
    out.push_back(co_await pipe_end.send_file(file_fd, 299990, 11));  // one byte short
    co_return out;
  }(fds[1], file.fd));
  reader.join();
  EXPECT_EQ(results, (std::vector<int>{0, -EIO}));
  EXPECT_TRUE(received == file.bytes.substr(7, 299990) + file.bytes.substr(299990));
  ::close(fds[0]);
}

coro::Task<std::string> read_to_end(Channel& channel);

TEST(ChannelTest, PlainFileReadsToEndOfFile) {
  aio::IoThread io("file-channel");
  char path[] = "/tmp/spindle-channel-file-XXXXXX";
  const int fd = ::mkstemp(path);
  ASSERT_GE(fd, 0);
  ::unlink(path);
  const std::string content(10000, 'f');
  ASSERT_EQ(::write(fd, content.data(), content.size()), static_cast<ssize_t>(content.size()));
  ASSERT_EQ(::lseek(fd, 0, SEEK_SET), 0);
  const std::string read_back = coro::block_on(io.context(), [](int f) -> coro::Task<std::string> {
    Channel file(f);
    co_return co_await read_to_end(file);
  }(fd));
  EXPECT_EQ(read_back, content);
}

coro::Task<std::string> read_to_end(Channel& channel) {
  std::string all;
  char buffer[256];
  for (;;) {
    const ssize_t n = co_await channel.read_some(buffer, sizeof buffer);
    if (n <= 0) break;
    all.append(buffer, static_cast<std::size_t>(n));
  }
  co_return all;
}

TEST(CommandTest, OutputToEndOfFileAndExitCode) {
  aio::IoThread io("command");
  auto command = Command::spawn({"sh", "-c", "printf 'hello from a child'; exit 3"});
  ASSERT_TRUE(command);
  const auto [output, status] = coro::block_on(
      io.context(), [](Command& c) -> coro::Task<std::pair<std::string, int>> {
        std::string text = co_await read_to_end(c.output());
        const int code = co_await c.wait();
        co_return std::pair<std::string, int>{text, code};
      }(*command.value()));
  EXPECT_EQ(output, "hello from a child");
  EXPECT_EQ(status, 3);
}

TEST(CommandTest, InputRoundTripThroughCat) {
  aio::IoThread io("cat");
  auto command = Command::spawn({"cat"});
  ASSERT_TRUE(command);
  const auto [output, status] = coro::block_on(
      io.context(), [](Command& c) -> coro::Task<std::pair<std::string, int>> {
        const std::string text(100000, 'q');  // larger than a pipe buffer
        coro::Event written;
        coro::spawn(*aio::current_context(), [](Command& cmd, const std::string& t,
                                                coro::Event& w) -> coro::Task<void> {
          co_await cmd.input().write_all(t.data(), t.size());
          cmd.input().close();  // EOF for cat
          w.set();
        }(c, text, written));
        std::string echoed = co_await read_to_end(c.output());
        co_await written.wait();
        const int code = co_await c.wait();
        co_return std::pair<std::string, int>{echoed == text ? "same" : "different", code};
      }(*command.value()));
  EXPECT_EQ(output, "same");
  EXPECT_EQ(status, 0);
}

TEST(CommandTest, KilledBySignal) {
  aio::IoThread io("signal");
  auto command = Command::spawn({"sh", "-c", "kill -9 $$"});
  ASSERT_TRUE(command);
  const int status = coro::block_on(io.context(), [](Command& c) -> coro::Task<int> {
    co_return co_await c.wait();
  }(*command.value()));
  EXPECT_EQ(status, 128 + 9);
}

TEST(CommandTest, MissingProgramIsAnError) {
  auto command = Command::spawn({"/nonexistent/spindle-no-such-program"});
  EXPECT_FALSE(command);
  EXPECT_EQ(command.error(), ENOENT);
}

}  // namespace
}  // namespace spindle::io
