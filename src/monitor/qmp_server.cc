#include "monitor/qmp_server.h"

#include <sys/time.h>

#include <algorithm>

#include "base/fatal.h"
#include "coro/coroutine.h"

namespace spindle::monitor {

QmpServer::QmpServer(aio::Context& control, const CommandTable& commands, Json greeting)
    : control_(control), commands_(commands), greeting_(std::move(greeting)) {}

QmpServer::~QmpServer() {
  if (!sessions_.empty() || accept_loops_ != 0) {
    base::fatal("monitor::QmpServer destroyed before shutdown() finished");
  }
}

void QmpServer::listen(std::unique_ptr<io::Listener> listener) {
  io::Listener& ref = *listener;
  listeners_.push_back(std::move(listener));
  if (accept_loops_++ == 0) accept_loops_done_.reset();
  coro::spawn(control_, accept_loop(ref));
}

coro::Task<void> QmpServer::accept_loop(io::Listener& listener) {
  while (!stopping_) {
    auto channel = co_await listener.accept();
    if (!channel) {
      if (channel.error() == ECANCELED || stopping_) break;
      continue;  // a transient accept failure (EMFILE...): keep serving the others
    }
    start(std::move(channel).value());
  }
  if (--accept_loops_ == 0) accept_loops_done_.set();
}

void QmpServer::serve(std::unique_ptr<io::Channel> channel) {
  start(std::move(channel));
}

void QmpServer::start(std::unique_ptr<io::Channel> channel) {
  if (stopping_) return;  // closes it
  channel->attach(control_);
  auto session = std::make_shared<QmpSession>(std::move(channel), commands_, greeting_);
  if (sessions_.empty()) sessions_done_.reset();
  sessions_.push_back(session);
  coro::spawn(control_,
              [](QmpServer& server, std::shared_ptr<QmpSession> self) -> coro::Task<void> {
                co_await self->run();
                auto& list = server.sessions_;
                list.erase(std::remove(list.begin(), list.end(), self), list.end());
                if (list.empty()) server.sessions_done_.set();
              }(*this, std::move(session)));
}

void QmpServer::emit(const std::string& name, Json data) {
  timeval now{};
  ::gettimeofday(&now, nullptr);
  Json event = Json::object();
  event["timestamp"] = Json{{"seconds", now.tv_sec}, {"microseconds", now.tv_usec}};
  event["event"] = name;
  if (!data.is_null()) event["data"] = std::move(data);
  for (const auto& session : sessions_) {
    if (session->negotiated()) session->enqueue(event);
  }
}

coro::Task<void> QmpServer::shutdown() {
  stopping_ = true;
  for (auto& listener : listeners_) listener->close();
  co_await accept_loops_done_.wait();
  for (const auto& session : sessions_) session->stop();
  co_await sessions_done_.wait();
}

}  // namespace spindle::monitor
