// Channel::shutdown_read()/shutdown_write() from a foreign thread while the owner closes the
// channel: the shutdown must never reach a socket that took over the closed fd number.
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <memory>
#include <thread>

#include "io/channel.h"

namespace spindle::io {
namespace {

TEST(ChannelShutdownTest, ForeignShutdownNeverHitsAReusedFd) {
  // Each round: a foreign thread hammers shutdown_read() on channel A while this thread (the
  // owner) closes A and at once opens a socket pair B, which the kernel usually gives A's old
  // fd number. B must still be readable: a shutdown that loaded A's fd before the close and
  // issued it after would shut B's read side instead.
  constexpr int kRounds = 500;
  int hits = 0;
  for (int round = 0; round < kRounds; ++round) {
    int a[2];
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, a), 0);
    auto channel = std::make_unique<Channel>(a[0], nullptr);
    std::atomic<bool> go{false}, stop{false};
    std::thread foreign([&] {
      while (!go.load(std::memory_order_acquire)) {
      }
      while (!stop.load(std::memory_order_acquire)) channel->shutdown_read();
    });
    go.store(true, std::memory_order_release);
    channel->close();
    int b[2];
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, b), 0);
    for (int i = 0; i < 50; ++i) std::this_thread::yield();  // let the foreign thread run
    stop.store(true, std::memory_order_release);
    foreign.join();
    const char byte = 'x';
    ASSERT_EQ(::send(b[1], &byte, 1, MSG_NOSIGNAL), 1);
    char got = 0;
    const ssize_t n = ::recv(b[0], &got, 1, MSG_DONTWAIT);
    if (n != 1) ++hits;  // 0: B's read side was shut down by A's shutdown
    ::close(b[0]);
    ::close(b[1]);
    ::close(a[1]);
  }
  EXPECT_EQ(hits, 0) << "of " << kRounds << " rounds";
}

TEST(ChannelShutdownTest, ShutdownAfterCloseIsHarmless) {
  int a[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, a), 0);
  Channel channel(a[0], nullptr);
  channel.close();
  EXPECT_EQ(channel.shutdown_read(), -EBADF);
  EXPECT_EQ(channel.shutdown_write(), -EBADF);
  ::close(a[1]);
}

}  // namespace
}  // namespace spindle::io
