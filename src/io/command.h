// Command: a child process with its standard input and output connected to Channels, and a
// coroutine wait for its exit status. The exit is watched through a pidfd on the waiting
// coroutine's context (no thread blocks in waitpid), or on the thread pool where pidfds are
// unavailable.
//
// Thread-safety: one owner. The channels follow the Channel rules; wait() from one coroutine.
// Destroying a Command whose child has not been waited for kills it (SIGKILL) and reaps it.
#pragma once

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "base/result.h"
#include "coro/task.h"
#include "io/channel.h"

namespace spindle::io {

class Command {
 public:
  // Starts argv[0] (searched in PATH) with pipes for stdin and stdout; stderr is inherited.
  static base::Result<std::unique_ptr<Command>> spawn(const std::vector<std::string>& argv);
  ~Command();
  Command(const Command&) = delete;
  Command& operator=(const Command&) = delete;

  Channel& input() noexcept { return *stdin_; }    // the child's stdin (we write)
  Channel& output() noexcept { return *stdout_; }  // the child's stdout (we read)
  pid_t pid() const noexcept { return pid_; }

  // Waits for the child to exit: its exit code, 128 + signal number if a signal killed it, or
  // -errno if waiting failed.
  coro::Task<int> wait();

 private:
  Command(pid_t pid, int stdin_fd, int stdout_fd);

  pid_t pid_;
  bool reaped_ = false;
  std::unique_ptr<Channel> stdin_;
  std::unique_ptr<Channel> stdout_;
};

}  // namespace spindle::io
