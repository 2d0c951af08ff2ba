#include "monitor/qmp_session.h"

#include <sys/uio.h>

#include <array>
#include <vector>

#include "coro/coroutine.h"
#include "monitor/arguments.h"

namespace spindle::monitor {

namespace {

Json error_reply(const QmpError& error) {
  Json reply = Json::object();
  reply["error"] = Json{{"class", error.error_class}, {"desc", error.desc}};
  return reply;
}

// qmp_capabilities' "enable": the capabilities a client asks for. None is offered (no "oob").
std::optional<QmpError> check_capabilities(const Json& arguments) {
  Arguments reader(arguments, false);
  if (const Json* enable = reader.raw("enable")) {
    if (!enable->is_array())
      return generic_error("Invalid parameter type for 'enable', expected: array");
    // Only the first capability matters: none is offered, so any one is an error.
    if (!enable->empty()) {
      const Json& item = enable->front();
      if (!item.is_string()) {
        return generic_error("Invalid parameter type for 'enable[0]', expected: string");
      }
      if (item.get<std::string>() != "oob") {
        return generic_error("Parameter 'enable[0]' does not accept value '" +
                             item.get<std::string>() + "'");
      }
      return generic_error("Capability 'oob' not available");
    }
  }
  return reader.finish();
}

}  // namespace

QmpSession::QmpSession(std::unique_ptr<io::Channel> channel, const CommandTable& commands,
                       Json greeting)
    : channel_(std::move(channel)), commands_(commands), greeting_(std::move(greeting)) {}

void QmpSession::enqueue(const Json& message) {
  if (stopping_ && writer_done_.is_set()) return;
  std::string text = to_qmp_text(message);
  text += "\r\n";
  pending_bytes_ += text.size();
  outbox_.push_back(std::move(text));
  if (pending_bytes_ > kMaxPendingBytes) {
    // The client does not read what it asked for: cut it off rather than buffer forever.
    outbox_.clear();
    pending_bytes_ = 0;
    channel_->shutdown_read();
    channel_->shutdown_write();
    stopping_ = true;
  }
  output_ready_.set();
}

void QmpSession::stop() {
  stopping_ = true;
  channel_->shutdown_read();
  output_ready_.set();
}

coro::Task<void> QmpSession::write_loop() {
  while (true) {
    if (outbox_.empty()) {
      if (stopping_) break;
      output_ready_.reset();
      co_await output_ready_.wait();
      continue;
    }
    // Everything queued so far goes out in one writev.
    std::vector<std::string> batch(std::make_move_iterator(outbox_.begin()),
                                   std::make_move_iterator(outbox_.end()));
    outbox_.clear();
    std::vector<iovec> parts;
    std::size_t bytes = 0;
    for (std::string& text : batch) {
      parts.push_back({text.data(), text.size()});
      bytes += text.size();
    }
    const int written = co_await channel_->writev_all(parts);
    pending_bytes_ -= std::min(pending_bytes_, bytes);
    if (written < 0) {
      stopping_ = true;
      channel_->shutdown_read();
      outbox_.clear();
      break;
    }
  }
  writer_done_.set();
}

coro::Task<void> QmpSession::run() {
  coro::spawn(*aio::current_context(), [](std::shared_ptr<QmpSession> self) -> coro::Task<void> {
    co_await self->write_loop();
  }(shared_from_this()));
  enqueue(greeting_);
  std::array<char, 65536> buffer;
  std::vector<JsonStream::Piece> pieces;
  while (!stopping_) {
    const ssize_t got = co_await channel_->read_some(buffer.data(), buffer.size());
    if (got <= 0) break;
    stream_.feed(std::string_view(buffer.data(), static_cast<std::size_t>(got)),
                 [&pieces](JsonStream::Piece piece) { pieces.push_back(std::move(piece)); });
    for (JsonStream::Piece& piece : pieces) {
      if (stopping_) break;
      co_await handle(std::move(piece));
    }
    pieces.clear();
  }
  stopping_ = true;
  output_ready_.set();
  co_await writer_done_.wait();
  channel_->close();
}

coro::Task<void> QmpSession::handle(JsonStream::Piece piece) {
  if (!piece.ok) {
    enqueue(error_reply(generic_error(piece.error)));
    co_return;
  }
  Json request = Json::parse(piece.text, nullptr, false);
  if (request.is_discarded()) {
    enqueue(error_reply(generic_error("JSON parse error, invalid JSON syntax")));
    co_return;
  }
  co_await execute(request);
}

coro::Task<void> QmpSession::execute(const Json& request) {
  if (!request.is_object()) {
    enqueue(error_reply(generic_error("QMP input must be a JSON object")));
    co_return;
  }
  const Json* id = nullptr;
  const Json* name = nullptr;
  const Json* arguments = nullptr;
  std::optional<QmpError> error;
  for (const auto& [key, value] : request.items()) {
    if (key == "execute") {
      name = &value;
      if (!value.is_string() && !error) {
        error = generic_error("QMP input member 'execute' must be a string");
      }
    } else if (key == "arguments") {
      arguments = &value;
      if (!value.is_object() && !error) {
        error = generic_error("QMP input member 'arguments' must be an object");
      }
    } else if (key == "id") {
      id = &value;
    } else if (!error) {
      error = generic_error("QMP input member '" + key + "' is unexpected");
    }
  }
  if (!error && !name) error = generic_error("QMP input lacks member 'execute'");
  Json reply;
  if (error) {
    reply = error_reply(*error);
  } else {
    static const Json no_arguments = Json::object();
    const Json& args = arguments ? *arguments : no_arguments;
    const std::string command = name->get<std::string>();
    if (!negotiated_) {
      if (command != "qmp_capabilities") {
        reply = error_reply(
            command_not_found("Expecting capabilities negotiation with 'qmp_capabilities'"));
      } else if (std::optional<QmpError> refused = check_capabilities(args)) {
        reply = error_reply(*refused);
      } else {
        negotiated_ = true;
        reply = Json{{"return", Json::object()}};
      }
    } else if (command == "qmp_capabilities") {
      reply = error_reply(
          command_not_found("Capabilities negotiation is already complete, command ignored"));
    } else if (const CommandTable::Handler* handler = commands_.find(command)) {
      const QmpResult result = co_await (*handler)(args);
      reply = result.ok() ? Json{{"return", result.value()}} : error_reply(result.error());
    } else {
      reply = error_reply(command_not_found("The command " + command + " has not been found"));
    }
  }
  if (id) reply["id"] = *id;
  enqueue(reply);
}

}  // namespace spindle::monitor
