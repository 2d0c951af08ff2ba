// fd handlers driven by EventNotifiers: the /aio/event/* scenarios of QEMU's test-aio
// (reference/qemu-aio.md §3.2) with the same assertions, plus cross-thread registration.
#include <gtest/gtest.h>
#include <unistd.h>

#include <thread>

#include "aio/context.h"
#include "aio/event_notifier.h"

namespace spindle::aio {
namespace {

// Handler data: asserts the notifier was set, counts, and optionally sets it again while still
// active (QEMU's EventNotifierTestData).
struct NotifierData {
  EventNotifier notifier;
  int n = 0;
  int active = 0;
  bool auto_set = false;

  void on_readable() {
    EXPECT_TRUE(notifier.test_and_clear());
    ++n;
    if (active > 0) --active;
    if (auto_set && active > 0) notifier.set();
  }
  void attach(Context& ctx) {
    ctx.set_fd_handler(notifier.fd(), [this] { on_readable(); }, {});
  }
};

class EventTest : public testing::Test {
 protected:
  ContextRef ctx = Context::create("event-test");
  void wait_until_inactive(NotifierData& data) {
    while (data.active > 0) ctx->poll(true);
  }
};

TEST_F(EventTest, AddRemove) {
  NotifierData data;
  data.attach(*ctx);
  EXPECT_FALSE(ctx->poll(false));  // registering an unset notifier is not progress
  EXPECT_EQ(data.n, 0);
  ctx->remove_fd_handler(data.notifier.fd());
  EXPECT_FALSE(ctx->poll(false));
  EXPECT_EQ(data.n, 0);
}

TEST_F(EventTest, Wait) {
  NotifierData data;
  data.active = 1;
  data.attach(*ctx);
  data.notifier.set();
  EXPECT_TRUE(ctx->poll(false));
  EXPECT_EQ(data.n, 1);
  EXPECT_EQ(data.active, 0);
  EXPECT_FALSE(ctx->poll(false));
  EXPECT_EQ(data.n, 1);
  ctx->remove_fd_handler(data.notifier.fd());
  EXPECT_FALSE(ctx->poll(false));
}

TEST_F(EventTest, WaitNoFlushCallback) {
  NotifierData data;
  data.active = 1;
  data.attach(*ctx);
  data.notifier.set();
  EXPECT_TRUE(ctx->poll(true));  // a set notifier must not make a blocking poll sleep
  EXPECT_EQ(data.n, 1);
  EXPECT_EQ(data.active, 0);

  NotifierData dummy;
  dummy.active = 1;
  dummy.attach(*ctx);
  data.notifier.set();
  EXPECT_TRUE(ctx->poll(false));
  EXPECT_FALSE(ctx->poll(false));
  EXPECT_EQ(data.n, 2);
  EXPECT_EQ(dummy.n, 0);

  dummy.notifier.set();
  wait_until_inactive(dummy);
  EXPECT_EQ(data.n, 2);
  EXPECT_EQ(dummy.n, 1);
  EXPECT_EQ(dummy.active, 0);
  ctx->remove_fd_handler(dummy.notifier.fd());
  ctx->remove_fd_handler(data.notifier.fd());
  EXPECT_FALSE(ctx->poll(false));
}

TEST_F(EventTest, FlushWithAutoSet) {
  NotifierData data;
  data.active = 10;
  data.auto_set = true;
  data.attach(*ctx);
  data.notifier.set();
  EXPECT_TRUE(ctx->poll(false));
  EXPECT_EQ(data.n, 1);
  EXPECT_EQ(data.active, 9);
  EXPECT_TRUE(ctx->poll(false));  // it set itself again
  wait_until_inactive(data);
  EXPECT_EQ(data.n, 10);
  EXPECT_EQ(data.active, 0);
  EXPECT_FALSE(ctx->poll(false));
  ctx->remove_fd_handler(data.notifier.fd());
}

TEST_F(EventTest, ReplacingAHandlerUsesTheNewCallback) {
  EventNotifier notifier;
  int first = 0, second = 0;
  ctx->set_fd_handler(notifier.fd(), [&] { ++first; notifier.test_and_clear(); }, {});
  ctx->set_fd_handler(notifier.fd(), [&] { ++second; notifier.test_and_clear(); }, {});
  notifier.set();
  EXPECT_TRUE(ctx->poll(false));
  EXPECT_EQ(first, 0);
  EXPECT_EQ(second, 1);
  ctx->remove_fd_handler(notifier.fd());
}

TEST_F(EventTest, HandlerMayRemoveItselfDuringDispatch) {
  EventNotifier notifier;
  int runs = 0;
  ctx->set_fd_handler(notifier.fd(), [&] {
    ++runs;
    ctx->remove_fd_handler(notifier.fd());  // freed only after dispatch
  }, {});
  notifier.set();
  EXPECT_TRUE(ctx->poll(false));
  EXPECT_FALSE(ctx->poll(false));  // still set, but no longer watched
  EXPECT_EQ(runs, 1);
}

TEST_F(EventTest, WriteHandlerRunsWhenWritable) {
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  int writable = 0;
  ctx->set_fd_handler(fds[1], {}, [&] { ++writable; });
  EXPECT_TRUE(ctx->poll(false));
  EXPECT_EQ(writable, 1);
  ctx->remove_fd_handler(fds[1]);
  ::close(fds[0]);
  ::close(fds[1]);
}

TEST_F(EventTest, ReadHandlerRunsOnHangUp) {
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  int readable = 0;
  ctx->set_fd_handler(fds[0], [&] { ++readable; }, {});
  EXPECT_FALSE(ctx->poll(false));
  ::close(fds[1]);  // EOF counts as readable: readers must see it
  EXPECT_TRUE(ctx->poll(false));
  EXPECT_GE(readable, 1);
  ctx->remove_fd_handler(fds[0]);
  ::close(fds[0]);
}

TEST_F(EventTest, HandlerRegisteredFromAnotherThreadWakesBlockingPoll) {
  NotifierData data;
  data.notifier.set();
  std::thread other([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    data.attach(*ctx);
  });
  while (data.n == 0) ctx->poll(true);
  other.join();
  EXPECT_EQ(data.n, 1);
  ctx->remove_fd_handler(data.notifier.fd());
}

}  // namespace
}  // namespace spindle::aio
