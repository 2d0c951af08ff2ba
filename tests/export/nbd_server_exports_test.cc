// exports::nbd::Server's runtime export set: exports added after the server started are served;
// a duplicate name is refused; a safe removal is refused while a client uses the export and
// changes nothing; a hard removal stops that client's connection (its requests then fail) and
// completes once it is gone; a removed export is unknown to new clients and its name may be
// used again; the other exports keep serving throughout. Clients are Spindle's own NBD client
// driver over a Unix socket.
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <memory>
#include <string>
#include <vector>

#include "aio/context.h"
#include "block/block_backend.h"
#include "block/drivers/file.h"
#include "block/drivers/nbd/nbd_node.h"
#include "coro/block_on.h"
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

}  // namespace
}  // namespace spindle::exports::nbd
