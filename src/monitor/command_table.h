// CommandTable: the QMP commands a monitor offers, by name. A handler is a coroutine on the
// monitor's context that receives the command's "arguments" object (an empty object when the
// request had none) and returns its result or a QmpError.
//
// Thread-safety: fill it before the monitor serves clients; afterwards it is read-only and may
// be read from any thread.
#pragma once

#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "coro/task.h"
#include "monitor/qmp_error.h"
#include "monitor/qmp_text.h"

namespace spindle::monitor {

class CommandTable {
 public:
  using Handler = std::function<coro::Task<QmpResult>(const Json& arguments)>;

  void add(std::string name, Handler handler) { handlers_[std::move(name)] = std::move(handler); }
  const Handler* find(std::string_view name) const {
    const auto it = handlers_.find(name);
    return it == handlers_.end() ? nullptr : &it->second;
  }
  std::vector<std::string> names() const {
    std::vector<std::string> list;
    for (const auto& [name, handler] : handlers_) list.push_back(name);
    return list;
  }

 private:
  std::map<std::string, Handler, std::less<>> handlers_;
};

}  // namespace spindle::monitor
