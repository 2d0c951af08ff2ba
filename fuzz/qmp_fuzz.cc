// libFuzzer target for QMP input: every input is what a monitor client sends, through a real
// QmpSession (JsonStream, request checks, negotiation, dispatch, replies) over a socketpair,
// all on the main context. The commands exercise the argument checking and the blockdev
// options parser: "echo" returns its arguments, "keyval" parses arguments.text as a
// command-line option and then as blockdev options, "blockdev-add" / "blockdev-del" /
// "query-named-block-nodes" act on a NodeTable. Drivers that reach outside the process (file,
// host_device, nbd) are refused before add_blockdev sees them, so only null and format nodes
// over null nodes are opened; the table is emptied after every input.
//
// Seeds: with SPINDLE_FUZZ_WRITE_SEEDS=DIR the binary writes a few sessions into DIR and exits.
//
// Thread-safety: everything runs on the main thread.
#include <sys/socket.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "aio/context.h"
#include "coro/block_on.h"
#include "coro/coroutine.h"
#include "io/channel.h"
#include "monitor/blockdev.h"
#include "monitor/command_table.h"
#include "monitor/keyval.h"
#include "monitor/node_table.h"
#include "monitor/qmp_server.h"

namespace spindle::monitor {
namespace {

// Whether `value` names a driver anywhere that would open files or sockets.
bool reaches_outside(const Json& value) {
  if (value.is_object()) {
    for (const auto& [key, member] : value.items()) {
      if (key == "driver" && member.is_string()) {
        const std::string driver = member.get<std::string>();
        if (driver == "file" || driver == "host_device" || driver == "nbd") return true;
      }
      if (reaches_outside(member)) return true;
    }
  } else if (value.is_array()) {
    for (const Json& element : value) {
      if (reaches_outside(element)) return true;
    }
  }
  return false;
}

NodeTable& nodes() {
  static NodeTable* const table = new NodeTable;
  return *table;
}

coro::Task<QmpResult> add(const Json& options, bool from_keyval) {
  if (reaches_outside(options)) co_return generic_error("refused by the fuzz target");
  co_return co_await add_blockdev(nodes(), options, from_keyval);
}

const CommandTable& commands() {
  static CommandTable* const table = [] {
    auto* t = new CommandTable;
    t->add("echo", [](const Json& arguments) -> coro::Task<QmpResult> { co_return arguments; });
    t->add("keyval", [](const Json& arguments) -> coro::Task<QmpResult> {
      if (!arguments.contains("text") || !arguments["text"].is_string()) {
        co_return generic_error("text");
      }
      QmpResult parsed = parse_keyval(arguments["text"].get<std::string>(), "driver");
      if (!parsed.ok()) co_return parsed;
      co_return co_await add(parsed.value(), true);
    });
    t->add("blockdev-add", [](const Json& arguments) -> coro::Task<QmpResult> {
      co_return co_await add(arguments, false);
    });
    t->add("blockdev-del", [](const Json& arguments) -> coro::Task<QmpResult> {
      if (!arguments.contains("node-name") || !arguments["node-name"].is_string()) {
        co_return generic_error("node-name");
      }
      NodeEntry* entry = nodes().find(arguments["node-name"].get<std::string>());
      if (!entry || !entry->parents.empty()) co_return generic_error("busy or missing");
      for (const auto& removed : nodes().remove(entry->name)) co_await removed->node->close();
      co_return Json::object();
    });
    t->add("query-named-block-nodes", [](const Json&) -> coro::Task<QmpResult> {
      Json list = Json::array();
      for (const auto& entry : nodes().entries()) list.push_back(entry->name);
      co_return list;
    });
    return t;
  }();
  return *table;
}

QmpServer& server() {
  static QmpServer* const instance = new QmpServer(
      aio::main_context(), commands(), Json{{"QMP", {{"capabilities", Json::array()}}}});
  return *instance;
}

coro::Task<void> play_client(io::Channel& channel, const std::uint8_t* data, std::size_t size) {
  co_await channel.write_all(data, size);
  channel.shutdown_write();
  char sink[65536];
  while (co_await channel.read_some(sink, sizeof sink) > 0) {
  }
}

coro::Task<void> empty_table() {
  while (!nodes().entries().empty()) {
    for (const auto& removed : nodes().remove(nodes().entries().back()->name)) {
      co_await removed->node->close();
    }
  }
}

const char* const kSeeds[][2] = {
    {"negotiate-query", R"({"execute": "qmp_capabilities"}
{"execute": "query-named-block-nodes", "id": 1}
)"},
    {"blockdev", R"({"execute": "qmp_capabilities"}
{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n0", "size": 1048576}}
{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "r0", "file": "n0"}}
{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "q0",
  "file": {"driver": "null-co", "read-zeroes": true}, "backing": null}}
{"execute": "blockdev-del", "arguments": {"node-name": "n0"}}
{"execute": "blockdev-del", "arguments": {"node-name": "r0"}}
)"},
    {"keyval", R"({'execute': 'qmp_capabilities'}
{'execute': 'keyval', 'arguments': {'text': 'null-co,node-name=k,size=1M,cache.direct=on'}}
{'execute': 'keyval', 'arguments': {'text': 'raw,node-name=k2,file.driver=null-co,read-only=on'}}
)"},
    {"errors", R"([1] {"execute": 1} {"execute": "echo", "arguments": [], "x": 2}
{"execute": "qmp_capabilities", "arguments": {"enable": ["oob", "x"]}}
{"execute": "qmp_capabilities"} {"execute": "nosuch"} [[[[[[[[]]]]]]]] }
{"execute": "echo", "arguments": {"a": {"b": [1, 2.5, "c", null, true]}}, "id": [1]}
)"},
};

void write_seeds(const char* directory) {
  std::filesystem::create_directories(directory);
  for (const auto& [name, text] : kSeeds) {
    const std::string path = std::string(directory) + "/" + name;
    std::FILE* file = std::fopen(path.c_str(), "wb");
    if (!file || std::fputs(text, file) < 0) {
      std::perror(path.c_str());
      std::exit(1);
    }
    std::fclose(file);
  }
  std::exit(0);
}

}  // namespace
}  // namespace spindle::monitor

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  if (const char* directory = std::getenv("SPINDLE_FUZZ_WRITE_SEEDS")) {
    spindle::monitor::write_seeds(directory);
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace spindle;
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) return 0;
  monitor::server().serve(std::make_unique<io::Channel>(fds[0], nullptr));
  io::Channel client(fds[1], &aio::main_context());
  coro::block_on(aio::main_context(), monitor::play_client(client, data, size));
  client.close();
  // The session ends once it has seen the EOF and written its last replies.
  while (monitor::server().session_count() != 0) aio::main_context().poll(true);
  coro::block_on(aio::main_context(), monitor::empty_table());
  return 0;
}
