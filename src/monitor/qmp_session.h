// QmpSession: one QMP client on a monitor socket, from greeting to disconnect: capabilities
// negotiation (only qmp_capabilities is accepted before it), then commands executed one at a
// time in the order received, each answered with {"return": ...} or {"error": {"class",
// "desc"}} carrying the request's "id"; events interleave between replies once negotiated.
// Input is cut into values by JsonStream (bounded nesting and size); a value that is not a
// valid request gets an error reply and the session goes on.
//
// Output goes through an outbox drained by a writer coroutine, so events never wait for a
// command; a client that stops reading while more than kMaxPendingBytes of output pile up is
// disconnected.
//
// Thread-safety: everything runs on the monitor's control context (the session's coroutines,
// enqueue(), stop()).
#pragma once

#include <cstddef>
#include <deque>
#include <memory>
#include <string>

#include "coro/event.h"
#include "coro/task.h"
#include "io/channel.h"
#include "monitor/command_table.h"
#include "monitor/json_stream.h"
#include "monitor/qmp_text.h"

namespace spindle::monitor {

class QmpSession : public std::enable_shared_from_this<QmpSession> {
 public:
  static constexpr std::size_t kMaxPendingBytes = 16u << 20;

  QmpSession(std::unique_ptr<io::Channel> channel, const CommandTable& commands, Json greeting);

  // Runs the session to its end (the client disconnects, or stop()).
  coro::Task<void> run();
  // Ends the session: no more input is read; output already queued is still written.
  void stop();
  bool negotiated() const noexcept { return negotiated_; }
  // Queues one message (a reply or an event).
  void enqueue(const Json& message);

 private:
  coro::Task<void> write_loop();
  coro::Task<void> handle(JsonStream::Piece piece);
  coro::Task<void> execute(const Json& request);

  std::unique_ptr<io::Channel> channel_;
  const CommandTable& commands_;
  const Json greeting_;
  JsonStream stream_;
  bool negotiated_ = false;
  bool stopping_ = false;
  std::deque<std::string> outbox_;
  std::size_t pending_bytes_ = 0;
  coro::Event output_ready_;
  coro::Event writer_done_;
};

}  // namespace spindle::monitor
