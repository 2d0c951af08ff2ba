// monitor::QmpServer / QmpSession over a socketpair, driven by a client coroutine on the same
// context: the greeting, nothing but qmp_capabilities before negotiation, ids echoed on
// replies and errors, QEMU's errors for malformed requests (and the session goes on after
// them), events only to negotiated clients, commands answered in order, and a client that
// stops reading is cut off instead of buffered without bound.
#include <gtest/gtest.h>
#include <sys/socket.h>

#include <memory>
#include <string>

#include "aio/context.h"
#include "coro/block_on.h"
#include "coro/sleep.h"
#include "io/channel.h"
#include "monitor/command_table.h"
#include "monitor/qmp_server.h"

namespace spindle::monitor {
namespace {

using namespace std::chrono_literals;

class Client {
 public:
  explicit Client(std::unique_ptr<io::Channel> channel) : channel_(std::move(channel)) {}
  coro::Task<Json> read() {
    for (;;) {
      const std::size_t end = buffered_.find("\r\n");
      if (end != std::string::npos) {
        Json message = Json::parse(buffered_.substr(0, end));
        buffered_.erase(0, end + 2);
        co_return message;
      }
      char chunk[4096];
      const ssize_t got = co_await channel_->read_some(chunk, sizeof chunk);
      if (got <= 0) co_return Json();  // null: the server closed the connection
      buffered_.append(chunk, static_cast<std::size_t>(got));
    }
  }
  coro::Task<void> send(const std::string& text) {
    co_await channel_->write_all(text.data(), text.size());
  }
  coro::Task<Json> call(const std::string& text) {
    co_await send(text);
    co_return co_await read();
  }
  io::Channel& channel() { return *channel_; }

 private:
  std::unique_ptr<io::Channel> channel_;
  std::string buffered_;
};

class QmpSessionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    commands_.add("echo",
                  [](const Json& arguments) -> coro::Task<QmpResult> { co_return arguments; });
    commands_.add("fail", [](const Json&) -> coro::Task<QmpResult> {
      co_return device_not_found("no such thing");
    });
    server_ = std::make_unique<QmpServer>(aio::main_context(), commands_,
                                          Json{{"QMP", {{"capabilities", Json::array()}}}});
  }
  void TearDown() override { coro::block_on(aio::main_context(), server_->shutdown()); }

  std::unique_ptr<Client> connect() {
    int fds[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds), 0);
    server_->serve(std::make_unique<io::Channel>(fds[0], nullptr));
    return std::make_unique<Client>(std::make_unique<io::Channel>(fds[1], &aio::main_context()));
  }

  template <typename T>
  T run(coro::Task<T> task) {
    return coro::block_on(aio::main_context(), std::move(task));
  }

  CommandTable commands_;
  std::unique_ptr<QmpServer> server_;
};

TEST_F(QmpSessionTest, NegotiationThenCommandsWithIds) {
  auto client = connect();
  EXPECT_TRUE(run(client->read()).contains("QMP"));
  Json early = run(client->call(R"({"execute": "echo", "id": 7})"));
  EXPECT_EQ(early["error"]["class"], "CommandNotFound");
  EXPECT_EQ(early["error"]["desc"], "Expecting capabilities negotiation with 'qmp_capabilities'");
  EXPECT_EQ(early["id"], 7);
  EXPECT_EQ(run(client->call(R"({"execute": "qmp_capabilities"})")),
            Json::parse(R"({"return": {}})"));
  Json again = run(client->call(R"({"execute": "qmp_capabilities"})"));
  EXPECT_EQ(again["error"]["desc"],
            "Capabilities negotiation is already complete, command ignored");
  Json echoed =
      run(client->call(R"({"execute": "echo", "arguments": {"a": [1]}, "id": {"x": "y"}})"));
  EXPECT_EQ(echoed["return"], Json::parse(R"({"a": [1]})"));
  EXPECT_EQ(echoed["id"], Json::parse(R"({"x": "y"})"));
  Json failed = run(client->call(R"({"execute": "fail", "id": "f"})"));
  EXPECT_EQ(failed["error"]["class"], "DeviceNotFound");
  EXPECT_EQ(failed["id"], "f");
  Json unknown = run(client->call(R"({"execute": "nosuch"})"));
  EXPECT_EQ(unknown["error"]["desc"], "The command nosuch has not been found");
}

TEST_F(QmpSessionTest, MalformedRequestsGetErrorsAndTheSessionGoesOn) {
  auto client = connect();
  run(client->read());
  run(client->call(R"({"execute": "qmp_capabilities"})"));
  const std::pair<const char*, const char*> cases[] = {
      {"[1, 2]", "QMP input must be a JSON object"},
      {R"({"id": 1})", "QMP input lacks member 'execute'"},
      {R"({"execute": 5})", "QMP input member 'execute' must be a string"},
      {R"({"execute": "echo", "arguments": [1]})",
       "QMP input member 'arguments' must be an object"},
      {R"({"execute": "echo", "bogus": 1})", "QMP input member 'bogus' is unexpected"},
  };
  for (const auto& [request, desc] : cases) {
    Json reply = run(client->call(request));
    EXPECT_EQ(reply["error"]["class"], "GenericError") << request;
    EXPECT_EQ(reply["error"]["desc"], desc) << request;
  }
  Json parse_error = run(client->call("{\"execute\": tru}"));
  EXPECT_EQ(parse_error["error"]["class"], "GenericError");
  EXPECT_EQ(run(client->call(R"({'execute': 'echo', 'arguments': {'q': 'it\'s'}})"))["return"]["q"],
            "it's");
  // Several requests in one write: answered in order.
  run(client->send(R"({"execute": "echo", "id": 1}{"execute": "echo", "id": 2})"));
  EXPECT_EQ(run(client->read())["id"], 1);
  EXPECT_EQ(run(client->read())["id"], 2);
}

TEST_F(QmpSessionTest, EventsGoOnlyToNegotiatedSessions) {
  auto early = connect();
  auto ready = connect();
  run(early->read());
  run(ready->read());
  run(ready->call(R"({"execute": "qmp_capabilities"})"));
  server_->emit("TEST_EVENT", Json{{"n", 1}});
  Json event = run(ready->read());
  EXPECT_EQ(event["event"], "TEST_EVENT");
  EXPECT_EQ(event["data"]["n"], 1);
  EXPECT_TRUE(event["timestamp"].contains("seconds"));
  EXPECT_TRUE(event["timestamp"].contains("microseconds"));
  // The other one sees its own reply first: no event was queued for it.
  EXPECT_TRUE(run(early->call(R"({"execute": "qmp_capabilities"})")).contains("return"));
}

TEST_F(QmpSessionTest, AClientThatStopsReadingIsCutOff) {
  auto client = connect();
  run(client->read());
  run(client->call(R"({"execute": "qmp_capabilities"})"));
  const std::string big(1 << 20, 'x');
  for (int i = 0; i < 64; ++i) server_->emit("BIG", Json{{"blob", big}});  // never read
  // The server gave up on the session: reading now ends at EOF after what was written.
  Json last;
  for (int i = 0; i < 100; ++i) {
    last = run(client->read());
    if (last.is_null()) break;
  }
  EXPECT_TRUE(last.is_null());
  EXPECT_EQ(server_->session_count(), 0u);
}

}  // namespace
}  // namespace spindle::monitor
