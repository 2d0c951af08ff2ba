// Going to the background the way qemu-nbd --fork and qemu-storage-daemon --daemonize do: the
// process forks before any thread exists (threads do not survive fork()); the parent waits
// until the child reports that it is ready, or exits without reporting (it failed, and said
// why on stderr), and exits 0 or 1 accordingly; the child starts a new session and, once
// ready, lets go of the terminal (stdin, stdout and stderr become /dev/null).
//
// Thread-safety: call fork_into_background() before any thread is started, and
// report_ready() once, from the thread that called it.
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>

namespace spindle::tools {

class Background {
 public:
  // In the parent this never returns (it exits with the child's outcome); in the child it
  // returns with the report pipe open. `die` reports a failure to fork and exits.
  template <typename Die>
  static Background fork_into_background(Die&& die) {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) < 0) die(std::string("pipe: ") + std::strerror(errno));
    const pid_t child = ::fork();
    if (child < 0) die(std::string("fork: ") + std::strerror(errno));
    if (child > 0) {
      ::close(fds[1]);
      char ready = 0;
      std::exit(::read(fds[0], &ready, 1) == 1 ? 0 : 1);  // EOF: the child failed
    }
    ::close(fds[0]);
    ::setsid();
    return Background(fds[1]);
  }
  Background() = default;  // not in the background: report_ready() does nothing

  // Releases the parent and the terminal; `leave_directory`: also chdir("/"), so that the
  // daemon keeps no directory busy (qemu-storage-daemon does).
  void report_ready(bool leave_directory = false) {
    if (pipe_ < 0) return;
    const int null = ::open("/dev/null", O_RDWR | O_CLOEXEC);
    for (int fd : {STDIN_FILENO, STDOUT_FILENO, STDERR_FILENO}) ::dup2(null, fd);
    ::close(null);
    if (leave_directory && ::chdir("/") < 0) {
      // nothing to do: the daemon still runs, in its old directory
    }
    const char ready = 1;
    (void)!::write(pipe_, &ready, 1);
    ::close(pipe_);
    pipe_ = -1;
  }

 private:
  explicit Background(int pipe) : pipe_(pipe) {}
  int pipe_ = -1;
};

}  // namespace spindle::tools
