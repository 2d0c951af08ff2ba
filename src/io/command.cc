#include "io/command.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>

#include "aio/context.h"
#include "aio/thread_pool.h"
#include "coro/run_blocking.h"

extern char** environ;

namespace spindle::io {

namespace {

int status_to_exit_code(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -EINVAL;
}

int open_pidfd(pid_t pid) {
#ifdef SYS_pidfd_open
  return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
#else
  errno = ENOSYS;
  return -1;
#endif
}

}  // namespace

base::Result<std::unique_ptr<Command>> Command::spawn(const std::vector<std::string>& argv) {
  using CommandResult = base::Result<std::unique_ptr<Command>>;
  if (argv.empty()) return CommandResult::failure(EINVAL);
  int to_child[2], from_child[2];
  if (::pipe2(to_child, O_CLOEXEC) < 0) return CommandResult::failure(errno);
  if (::pipe2(from_child, O_CLOEXEC) < 0) {
    const int error = errno;
    ::close(to_child[0]);
    ::close(to_child[1]);
    return CommandResult::failure(error);
  }
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, to_child[0], STDIN_FILENO);
  posix_spawn_file_actions_adddup2(&actions, from_child[1], STDOUT_FILENO);
  std::vector<char*> args;
  for (const auto& arg : argv) args.push_back(const_cast<char*>(arg.c_str()));
  args.push_back(nullptr);
  pid_t pid;
  const int error = ::posix_spawnp(&pid, args[0], &actions, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  ::close(to_child[0]);
  ::close(from_child[1]);
  if (error != 0) {
    ::close(to_child[1]);
    ::close(from_child[0]);
    return CommandResult::failure(error);
  }
  return std::unique_ptr<Command>(new Command(pid, to_child[1], from_child[0]));
}

Command::Command(pid_t pid, int stdin_fd, int stdout_fd)
    : pid_(pid),
      stdin_(std::make_unique<Channel>(stdin_fd, nullptr)),
      stdout_(std::make_unique<Channel>(stdout_fd, nullptr)) {}

Command::~Command() {
  stdin_.reset();
  stdout_.reset();
  if (!reaped_) {
    ::kill(pid_, SIGKILL);
    int status;
    while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
    }
  }
}

coro::Task<int> Command::wait() {
  if (reaped_) co_return -ECHILD;
  const int pidfd = open_pidfd(pid_);
  if (pidfd >= 0) {
    Channel exit_watch(pidfd, nullptr);  // readable once the child has exited
    for (;;) {
      siginfo_t info{};
      if (::waitid(static_cast<idtype_t>(P_PIDFD), static_cast<id_t>(pidfd), &info,
                   WEXITED | WNOHANG) < 0) {
        if (errno == EINTR) continue;
        co_return -errno;
      }
      if (info.si_pid != 0) {
        reaped_ = true;
        co_return info.si_code == CLD_EXITED ? info.si_status : 128 + info.si_status;
      }
      const bool exited = co_await exit_watch.readable();
      if (!exited) co_return -ECANCELED;
    }
  }
  // No pidfd (old kernel): block a pool thread in waitpid instead of this context.
  const pid_t pid = pid_;
  const int status = co_await coro::run_blocking(aio::current_context()->thread_pool(), [pid] {
    int raw;
    while (::waitpid(pid, &raw, 0) < 0) {
      if (errno != EINTR) return -errno;
    }
    return status_to_exit_code(raw);
  });
  reaped_ = true;
  co_return status;
}

}  // namespace spindle::io
