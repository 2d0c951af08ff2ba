// no_io_uring: runs a command with io_uring made unavailable, the way a container runtime's
// seccomp profile does it.
//
//   no_io_uring [--errno=ENOSYS|EPERM] COMMAND [ARGS...]
//
// Installs a seccomp filter (PR_SET_NO_NEW_PRIVS, then SECCOMP_SET_MODE_FILTER with a small
// classic-BPF program, no libseccomp) that fails io_uring_setup, io_uring_enter and
// io_uring_register with the given errno (default ENOSYS, as Docker's default profile does;
// EPERM is what `kernel.io_uring_disabled` gives), then execs COMMAND. The filter is inherited
// by everything COMMAND starts. Exit status 126/127 (like a shell) if the filter or the exec
// fails.
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstddef>
#include <cstdio>
#include <cstring>

namespace {

#if defined(__x86_64__)
constexpr unsigned kArch = AUDIT_ARCH_X86_64;
#elif defined(__aarch64__)
constexpr unsigned kArch = AUDIT_ARCH_AARCH64;
#else
#error "no_io_uring: add this architecture's AUDIT_ARCH_* constant"
#endif

// io_uring's numbers are the same on every architecture (the unified table since Linux 5.1).
#ifndef __NR_io_uring_setup
#define __NR_io_uring_setup 425
#endif
#ifndef __NR_io_uring_enter
#define __NR_io_uring_enter 426
#endif
#ifndef __NR_io_uring_register
#define __NR_io_uring_register 427
#endif

int install_filter(unsigned error) {
  const unsigned deny = SECCOMP_RET_ERRNO | (error & SECCOMP_RET_DATA);
  sock_filter program[] = {
      // Another architecture's system call (e.g. a 32-bit binary): let it through.
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, arch)),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, kArch, 1, 0),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_setup, 3, 0),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_enter, 2, 0),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_register, 1, 0),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
      BPF_STMT(BPF_RET | BPF_K, deny),
  };
  sock_fprog filter{};
  filter.len = static_cast<unsigned short>(sizeof program / sizeof program[0]);
  filter.filter = program;
  if (::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) {
    std::fprintf(stderr, "no_io_uring: PR_SET_NO_NEW_PRIVS: %s\n", std::strerror(errno));
    return -1;
  }
  if (::syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &filter) != 0) {
    std::fprintf(stderr, "no_io_uring: seccomp(SECCOMP_SET_MODE_FILTER): %s\n",
                 std::strerror(errno));
    return -1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  int first = 1;
  unsigned error = ENOSYS;
  if (first < argc && std::strncmp(argv[first], "--errno=", 8) == 0) {
    const char* name = argv[first] + 8;
    if (std::strcmp(name, "ENOSYS") == 0) {
      error = ENOSYS;
    } else if (std::strcmp(name, "EPERM") == 0) {
      error = EPERM;
    } else {
      std::fprintf(stderr, "no_io_uring: --errno=%s: expected ENOSYS or EPERM\n", name);
      return 126;
    }
    ++first;
  }
  if (first >= argc) {
    std::fprintf(stderr, "usage: no_io_uring [--errno=ENOSYS|EPERM] COMMAND [ARGS...]\n");
    return 126;
  }
  if (install_filter(error) != 0) return 126;
  ::execvp(argv[first], argv + first);
  std::fprintf(stderr, "no_io_uring: cannot run %s: %s\n", argv[first], std::strerror(errno));
  return 127;
}
