// exports::nbd::Server's runtime export set: exports added after the server started are served;
// a duplicate name is refused; a safe removal is refused while a client uses the export and
// changes nothing; a hard removal stops that client's connection (its requests then fail) and
// completes once it is gone; a removed export is unknown to new clients and its name may be
// used again; the other exports keep serving throughout. move_export() takes an export's
// connections, idle or busy, to another context (and those that connect later), and every
// request after the move runs there; data written across 60 moves under load reads back
// intact. Clients are Spindle's own NBD client driver over a Unix socket.
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <memory>
#include <string>
#include <vector>

#include "aio/context.h"
#include "aio/io_thread.h"
#include "block/block_backend.h"
#include "block/drivers/file.h"
#include "block/drivers/filter_node.h"
#include "block/drivers/nbd/nbd_node.h"
#include "coro/block_on.h"
#include "coro/coroutine.h"
#include "coro/event.h"
#include "export/nbd/server.h"
#include "io/socket.h"

namespace spindle::exports::nbd {
namespace {

constexpr std::uint64_t kSize = 1 << 20;

template <typename T>
T run(coro::Task<T> task) {
  return coro::block_on(aio::main_context(), std::move(task));
}

std::string temp_path(const std::string& stem) {
  static std::atomic<int> counter{0};
  return "/tmp/spindle-exports-" + std::to_string(::getpid()) + "-" + stem + "-" +
         std::to_string(counter++);
}

// Remembers the context each write ran on: where the server's request coroutine was.
class ContextRecordingNode final : public block::FilterNode {
 public:
  explicit ContextRecordingNode(block::BlockNodeRef child) : FilterNode(std::move(child)) {}
  const char* driver_name() const noexcept override { return "context-recording"; }
  coro::Task<int> write(std::uint64_t offset, std::span<const std::byte> buffer,
                        std::uint32_t flags) override {
    last_write_context.store(aio::current_context());
    co_return co_await child_->write(offset, buffer, flags);
  }
  std::atomic<aio::Context*> last_write_context{nullptr};
};

class ServerWithoutExports : public ::testing::Test {
 protected:
  void SetUp() override {
    ServerOptions options;
    options.io_threads = 2;
    options.drain_timeout = std::chrono::milliseconds(200);
    server_ = std::make_unique<Server>(aio::main_context(), options, std::vector<ExportConfig>{});
    auto listener = io::Listener::unix_socket(socket_);
    ASSERT_TRUE(listener.ok());
    server_->listen(std::move(listener).value());
  }
  void TearDown() override {
    run(server_->shutdown());
    for (const std::string& file : files_) ::unlink(file.c_str());
    ::unlink(socket_.c_str());
  }

  ExportConfig file_export(const std::string& name) {
    files_.push_back(temp_path(name));
    auto node = block::open_file(files_.back(), block::FileOptions{false, false, true});
    EXPECT_TRUE(node.ok());
    EXPECT_EQ(run(node.value()->truncate(kSize)), 0);
    ExportConfig config;
    config.name = name;
    config.backend = std::make_shared<block::BlockBackend>(node.value());
    return config;
  }

  // file_export() with a ContextRecordingNode over the file, returned in `recorder`.
  ExportConfig recorded_export(const std::string& name,
                               std::shared_ptr<ContextRecordingNode>& recorder) {
    ExportConfig config = file_export(name);
    recorder = std::make_shared<ContextRecordingNode>(config.backend->root());
    config.backend = std::make_shared<block::BlockBackend>(recorder);
    return config;
  }

  block::nbd::NbdOpenResult connect(const std::string& name) {
    return run(block::nbd::open_nbd("nbd+unix:///" + name + "?socket=" + socket_, false));
  }

  static int write_byte(const block::BlockNodeRef& node, std::byte value) {
    std::vector<std::byte> data(4096, value);
    return run(node->write(0, std::span<const std::byte>(data), 0));
  }

  std::string socket_ = temp_path("sock");
  std::vector<std::string> files_;
  std::unique_ptr<Server> server_;
};

TEST_F(ServerWithoutExports, AddedExportsAreServedAndDuplicatesRefused) {
  block::nbd::NbdOpenResult none = connect("a");
  EXPECT_EQ(none.node, nullptr);
  ASSERT_EQ(server_->add_export(file_export("a")), 0);
  EXPECT_EQ(server_->add_export(file_export("a")), -EEXIST);
  ASSERT_EQ(server_->add_export(file_export("b")), 0);
  ASSERT_EQ(server_->exports().size(), 2u);
  block::nbd::NbdOpenResult a = connect("a");
  ASSERT_NE(a.node, nullptr) << a.message;
  EXPECT_EQ(a.node->size(), kSize);
  EXPECT_EQ(write_byte(a.node, std::byte{1}), 0);
  EXPECT_EQ(server_->export_connections("a"), 1u);
  EXPECT_EQ(server_->export_connections("b"), 0u);
  EXPECT_EQ(run(a.node->close()), 0);
}

TEST_F(ServerWithoutExports, SafeRemovalIsRefusedWhileAClientUsesTheExport) {
  ASSERT_EQ(server_->add_export(file_export("a")), 0);
  block::nbd::NbdOpenResult a = connect("a");
  ASSERT_NE(a.node, nullptr) << a.message;
  EXPECT_EQ(run(server_->remove_export("a", false)), -EBUSY);
  EXPECT_EQ(server_->exports().size(), 1u);
  EXPECT_EQ(write_byte(a.node, std::byte{2}), 0);  // still served
  EXPECT_EQ(run(a.node->close()), 0);
  // Once the client is gone the same removal succeeds.
  for (int i = 0; i < 60000 && server_->export_connections("a") != 0; ++i) {  // up to a minute
    aio::main_context().poll(false);
    ::usleep(1000);
  }
  EXPECT_EQ(run(server_->remove_export("a", false)), 0);
  EXPECT_TRUE(server_->exports().empty());
  EXPECT_EQ(run(server_->remove_export("a", false)), -ENOENT);
}

TEST_F(ServerWithoutExports, HardRemovalStopsItsClientsAndLeavesTheOthers) {
  ASSERT_EQ(server_->add_export(file_export("a")), 0);
  ASSERT_EQ(server_->add_export(file_export("b")), 0);
  block::nbd::NbdOpenResult a = connect("a");
  block::nbd::NbdOpenResult b = connect("b");
  ASSERT_NE(a.node, nullptr) << a.message;
  ASSERT_NE(b.node, nullptr) << b.message;
  EXPECT_EQ(run(server_->remove_export("a", true)), 0);
  EXPECT_EQ(server_->export_connections("a"), 0u);
  EXPECT_LT(write_byte(a.node, std::byte{3}), 0);  // its connection is gone
  EXPECT_EQ(write_byte(b.node, std::byte{4}), 0);  // the other export is untouched
  EXPECT_EQ(connect("a").node, nullptr);           // unknown to new clients
  // The name may be served again, by a new export.
  ASSERT_EQ(server_->add_export(file_export("a")), 0);
  block::nbd::NbdOpenResult again = connect("a");
  ASSERT_NE(again.node, nullptr) << again.message;
  EXPECT_EQ(run(again.node->close()), 0);
  run(a.node->close());
  EXPECT_EQ(run(b.node->close()), 0);
}

TEST_F(ServerWithoutExports, MovedExportsServeEveryRequestOnTheirNewHome) {
  aio::IoThread first("move-1");
  aio::IoThread second("move-2");
  std::shared_ptr<ContextRecordingNode> recorder;
  ASSERT_EQ(server_->add_export(recorded_export("a", recorder)), 0);
  block::nbd::NbdOpenResult idle = connect("a");  // waits for its next request while moved
  block::nbd::NbdOpenResult busy = connect("a");
  ASSERT_NE(idle.node, nullptr) << idle.message;
  ASSERT_NE(busy.node, nullptr) << busy.message;
  EXPECT_EQ(write_byte(busy.node, std::byte{1}), 0);
  aio::Context* before = recorder->last_write_context.load();
  EXPECT_NE(before, nullptr);
  EXPECT_NE(before, &first.context());
  EXPECT_NE(before, &second.context());

  for (aio::Context* target : {&first.context(), &second.context(), &aio::main_context()}) {
    EXPECT_EQ(run(server_->move_export("a", *target)), 0);
    for (const block::nbd::NbdOpenResult* client : {&idle, &busy}) {
      recorder->last_write_context.store(nullptr);
      EXPECT_EQ(write_byte(client->node, std::byte{2}), 0);
      EXPECT_EQ(recorder->last_write_context.load(), target);
    }
    block::nbd::NbdOpenResult late = connect("a");  // selects the export after the move
    ASSERT_NE(late.node, nullptr) << late.message;
    recorder->last_write_context.store(nullptr);
    EXPECT_EQ(write_byte(late.node, std::byte{3}), 0);
    EXPECT_EQ(recorder->last_write_context.load(), target);
    EXPECT_EQ(run(late.node->close()), 0);
  }
  EXPECT_EQ(run(server_->move_export("nosuch", first.context())), -ENOENT);
  EXPECT_EQ(run(idle.node->close()), 0);
  EXPECT_EQ(run(busy.node->close()), 0);
  // Connections that ended while on an IoThread are gone before it stops.
  for (int i = 0; i < 60000 && server_->connection_count() != 0; ++i) {
    aio::main_context().poll(false);
    ::usleep(1000);
  }
  run(server_->remove_export("a", true));
}

// Writers keep several requests in flight each, and read every block back, while the export
// moves between two IoThreads and the main context 60 times.
TEST_F(ServerWithoutExports, DataSurvivesMovesUnderLoad) {
  aio::IoThread first("move-1");
  aio::IoThread second("move-2");
  std::shared_ptr<ContextRecordingNode> recorder;
  ASSERT_EQ(server_->add_export(recorded_export("a", recorder)), 0);
  std::vector<block::BlockNodeRef> clients;
  for (int i = 0; i < 3; ++i) {
    block::nbd::NbdOpenResult client = connect("a");
    ASSERT_NE(client.node, nullptr) << client.message;
    clients.push_back(client.node);
  }
  constexpr int kWritersPerClient = 4;
  constexpr std::uint64_t kBlock = 4096;
  std::atomic<bool> moving{true};
  std::atomic<int> failures{0};
  std::atomic<int> writers{0};
  coro::Event writers_done;
  std::uint64_t slot = 0;
  for (const block::BlockNodeRef& client : clients) {
    for (int w = 0; w < kWritersPerClient; ++w, ++slot) {
      writers.fetch_add(1);
      // Each writer owns one block: it writes a new value and reads it back, over and over.
      coro::spawn(aio::main_context(),
                  [](block::BlockNodeRef node, std::uint64_t offset, std::atomic<bool>& keep_going,
                     std::atomic<int>& failed, std::atomic<int>& live,
                     coro::Event& done) -> coro::Task<void> {
                    std::vector<std::byte> data(kBlock);
                    std::vector<std::byte> back(kBlock);
                    for (unsigned round = 0; keep_going.load(); ++round) {
                      std::fill(data.begin(), data.end(),
                                static_cast<std::byte>(round * 7 + offset / kBlock));
                      const int wrote =
                          co_await node->write(offset, std::span<const std::byte>(data), 0);
                      const int read = co_await node->read(offset, std::span<std::byte>(back), 0);
                      if (wrote != 0 || read != 0 || back != data) failed.fetch_add(1);
                    }
                    if (live.fetch_sub(1) == 1) done.set();
                  }(client, slot * kBlock, moving, failures, writers, writers_done));
    }
  }
  run([](Server& server, aio::Context& a, aio::Context& b, std::atomic<bool>& keep_going,
         coro::Event& done) -> coro::Task<int> {
    aio::Context* targets[] = {&a, &b, &aio::main_context()};
    for (int i = 0; i < 60; ++i) {
      const int moved = co_await server.move_export("a", *targets[i % 3]);
      if (moved != 0) co_return moved;
    }
    keep_going.store(false);
    co_await done.wait();
    co_return 0;
  }(*server_, first.context(), second.context(), moving, writers_done));
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(server_->export_connections("a"), clients.size());  // no connection was dropped
  for (const block::BlockNodeRef& client : clients) EXPECT_EQ(run(client->close()), 0);
  for (int i = 0; i < 60000 && server_->connection_count() != 0; ++i) {
    aio::main_context().poll(false);
    ::usleep(1000);
  }
  run(server_->remove_export("a", true));
}

}  // namespace
}  // namespace spindle::exports::nbd
