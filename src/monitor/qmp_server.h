// QmpServer: the monitors of a daemon: accepts QMP clients on listening sockets (the
// --chardev socket,server=on + --monitor pairs of qemu-storage-daemon) and runs a QmpSession
// for each, all on the control context, sharing one CommandTable. emit() sends an event to
// every client that has finished capabilities negotiation, with QEMU's timestamp.
//
// Thread-safety: every method from the control context's thread (the context passed to the
// constructor); sessions run there too.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "aio/context.h"
#include "coro/event.h"
#include "coro/task.h"
#include "io/channel.h"
#include "io/socket.h"
#include "monitor/command_table.h"
#include "monitor/qmp_session.h"
#include "monitor/qmp_text.h"

namespace spindle::monitor {

class QmpServer {
 public:
  // `greeting`: the QMP greeting ({"QMP": {"version": ..., "capabilities": []}}).
  QmpServer(aio::Context& control, const CommandTable& commands, Json greeting);
  ~QmpServer();
  QmpServer(const QmpServer&) = delete;
  QmpServer& operator=(const QmpServer&) = delete;

  void listen(std::unique_ptr<io::Listener> listener);
  void serve(std::unique_ptr<io::Channel> channel);
  // {"event": NAME, "data": DATA, "timestamp": {"seconds", "microseconds"}} to every
  // negotiated session; DATA null: no "data" member.
  void emit(const std::string& name, Json data = nullptr);
  // Closes the listeners and ends every session (output already queued is written first).
  coro::Task<void> shutdown();
  std::size_t session_count() const noexcept { return sessions_.size(); }

 private:
  coro::Task<void> accept_loop(io::Listener& listener);
  void start(std::unique_ptr<io::Channel> channel);

  aio::Context& control_;
  const CommandTable& commands_;
  const Json greeting_;
  std::vector<std::unique_ptr<io::Listener>> listeners_;
  std::vector<std::shared_ptr<QmpSession>> sessions_;
  std::size_t accept_loops_ = 0;
  coro::Event accept_loops_done_{true};
  coro::Event sessions_done_{true};
  bool stopping_ = false;
};

}  // namespace spindle::monitor
