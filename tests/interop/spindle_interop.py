"""Shared harness for the spindle-nbd interop and hostile-client tests (tests/interop/*.py).

Every test script calls main() with the peer binaries it needs. main() parses
`--spindle-nbd PATH`, prints "SKIPPED: ..." and exits SKIP_EXIT_CODE (77, CTest's
SKIP_RETURN_CODE for these tests) when a peer binary (or the python3-libnbd module) is missing,
otherwise runs the script's unittest cases and exits non-zero on any failure. With
SPINDLE_REQUIRE_PEERS=1 (scripts/test.sh, after installing every peer) a missing peer, or a test
case skipped because something is "not installed", is a failure instead.

A server that reports a sanitizer error (ThreadSanitizer, AddressSanitizer, UBSan) in its log, or
exits with the sanitizers' exit code (SANITIZER_EXIT_CODE), fails the test that started it, even
if every client call succeeded; servers still running at the end of a test are stopped with
SIGTERM (a clean shutdown, which the sanitizers then check) before SIGKILL.

Every test case (InteropTest) gets its own temp directory and starts its own spindle-nbd on a
fresh image. Nothing can hang: every subprocess and socket call has a timeout, a per-test
watchdog SIGKILLs the test's servers (a hung server then fails the blocked libnbd call instead of
hanging CI), every server is started with PR_SET_PDEATHSIG so it cannot outlive the test
process, and faulthandler aborts the whole script before CTest's own timeout would.
"""

import argparse
import ctypes
import faulthandler
import gc
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest

SPINDLE_NBD = None  # set by main()

# CTest's SKIP_RETURN_CODE for the interop tests (tests/CMakeLists.txt).
SKIP_EXIT_CODE = 77
# The exit status of a process TSan stopped (its default; scripts/test.sh spells out exitcode=66
# in TSAN_OPTIONS). A report in the log is what we look for first; the exit status catches a
# report that went elsewhere (log_path=...).
SANITIZER_EXIT_CODE = 66
SANITIZER_REPORT = re.compile(r"WARNING: ThreadSanitizer:|ERROR: (?:Address|Leak|Thread)Sanitizer"
                              r"|SUMMARY: UndefinedBehaviorSanitizer|: runtime error: ")

# Whole-script limit (CTest's TIMEOUT is 300 s): dump the stacks and exit non-zero before that.
SCRIPT_TIMEOUT_S = 270
# Per-test watchdog: the test's servers are SIGKILLed after this long.
DEFAULT_TEST_TIMEOUT_S = 90

MiB = 1 << 20
GiB = 1 << 30
KiB = 1 << 10

# ---- wire constants (NBD spec; see shared/reference/nbd.md §1) --------------------------------
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR_UNSUP = (1 << 31) | 1
REP_ERR_INVALID = (1 << 31) | 3
REP_ERR_UNKNOWN = (1 << 31) | 6
REP_ERR_TOO_BIG = (1 << 31) | 9

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3

CLIENT_FLAG_FIXED_NEWSTYLE = 1
CLIENT_FLAG_NO_ZEROES = 2


def log(message):
    print(message, flush=True)


# ---- entry point --------------------------------------------------------------------------------


def _maybe_reexec_for_nbd_module():
    """The nbd module comes from Debian's python3-libnbd, i.e. /usr/bin/python3's dist-packages.
    If `python3` on PATH is another interpreter (pyenv, venv), re-run the script under
    /usr/bin/python3. Returns True if the module is importable here."""
    try:
        import nbd  # noqa: F401  (imported for the caller)
        return True
    except ImportError:
        pass
    system_python = "/usr/bin/python3"
    if (os.environ.get("SPINDLE_INTEROP_REEXEC") != "1" and os.path.exists(system_python)
            and os.path.realpath(sys.executable) != os.path.realpath(system_python)):
        probe = subprocess.run([system_python, "-c", "import nbd"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=30)
        if probe.returncode == 0:
            os.environ["SPINDLE_INTEROP_REEXEC"] = "1"
            sys.stdout.flush()
            sys.stderr.flush()
            os.execv(system_python, [system_python] + sys.argv)
    return False


def binary_argument(flag, variable):
    """Takes FLAG PATH (e.g. --spindle-img) out of sys.argv and returns the absolute path; exits
    (a failure, not a skip: it is our own binary) when it is missing. The path also goes into
    the environment as `variable`: main() may re-run the script under the system python (for
    the nbd module) with the remaining arguments."""
    argv = sys.argv[1:]
    if flag in argv:
        at = argv.index(flag)
        os.environ[variable] = os.path.abspath(argv[at + 1])
        del sys.argv[at + 1:at + 3]
    path = os.environ.get(variable)
    if not path or not os.access(path, os.X_OK):
        log(f"FAILED: {flag} PATH is required")
        sys.exit(1)
    return path


def spindle_img_argument():
    return binary_argument("--spindle-img", "SPINDLE_IMG")


def main(required_binaries=(), needs_nbd_module=False):
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--spindle-nbd", required=True)
    args, rest = parser.parse_known_args()
    global SPINDLE_NBD
    SPINDLE_NBD = os.path.abspath(args.spindle_nbd)
    if not (os.path.isfile(SPINDLE_NBD) and os.access(SPINDLE_NBD, os.X_OK)):
        # Our own binary is not a peer: a missing one is a failure, not a skip.
        log(f"FAILED: spindle-nbd binary not found or not executable: {SPINDLE_NBD}")
        sys.exit(1)
    missing = [b for b in required_binaries if shutil.which(b) is None]
    if missing:
        skip(f"peer binaries not installed: {', '.join(missing)}")
    if needs_nbd_module and not _maybe_reexec_for_nbd_module():
        skip("the python3 'nbd' module (python3-libnbd) is not installed")
    faulthandler.dump_traceback_later(SCRIPT_TIMEOUT_S, exit=True)
    started = time.monotonic()
    program = unittest.main(argv=[sys.argv[0]] + rest, exit=False, verbosity=2)
    result = program.result
    elapsed = time.monotonic() - started
    missing_peers = [reason for _, reason in result.skipped if "not installed" in reason]
    if result.wasSuccessful() and missing_peers and peers_required():
        log(f"FAILED: SPINDLE_REQUIRE_PEERS=1 and {len(missing_peers)} tests skipped for a "
            f"missing peer: {'; '.join(sorted(set(missing_peers)))}")
        sys.exit(1)
    if result.wasSuccessful() and result.testsRun > 0:
        if len(result.skipped) == result.testsRun:
            log(f"SKIPPED: all {result.testsRun} tests skipped")
            sys.exit(SKIP_EXIT_CODE)
        skipped = f", {len(result.skipped)} skipped" if result.skipped else ""
        log(f"PASSED: {result.testsRun} tests in {elapsed:.1f} s{skipped}")
        sys.exit(0)
    if result.testsRun == 0:
        log("FAILED: no tests ran")
    else:
        log(f"FAILED: {len(result.failures)} failures, {len(result.errors)} errors "
            f"out of {result.testsRun} tests ({elapsed:.1f} s)")
    sys.exit(1)


def peers_required():
    return os.environ.get("SPINDLE_REQUIRE_PEERS", "") not in ("", "0")


def skip(reason):
    """The whole script cannot run here (a peer is missing): exit SKIP_EXIT_CODE, or fail when
    SPINDLE_REQUIRE_PEERS is set (CI installed every peer, so a missing one is a broken setup)."""
    if peers_required():
        log(f"FAILED: {reason} (SPINDLE_REQUIRE_PEERS=1: scripts/install-deps.sh installs it)")
        sys.exit(1)
    log(f"SKIPPED: {reason}")
    sys.exit(SKIP_EXIT_CODE)


_sanitized = None


def sanitized_binary():
    """True if spindle-nbd was built with AddressSanitizer (its quarantine makes RSS grow by
    design, so RSS-growth checks do not apply; LeakSanitizer checks leaks at exit instead)."""
    global _sanitized
    if _sanitized is None:
        with open(SPINDLE_NBD, "rb") as f:
            _sanitized = b"__asan_init" in f.read()
    return _sanitized


# ---- processes ----------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_parent():
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def run(cmd, timeout=60, check=True, input=None, env=None, cwd=None):
    """Runs a peer tool with a timeout; on failure (or timeout) raises AssertionError with the
    command and its output."""
    cmd = [str(c) for c in cmd]
    try:
        stdin = {} if input is not None else {"stdin": subprocess.DEVNULL}
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, input=input,
                              timeout=timeout, env=env, cwd=cwd, **stdin)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"timed out after {timeout} s: {' '.join(cmd)}\n"
                             f"stdout: {_text(e.stdout)}\nstderr: {_text(e.stderr)}") from None
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {' '.join(cmd)}\n"
                             f"stdout: {_text(proc.stdout)}\nstderr: {_text(proc.stderr)}")
    return proc


def run_text(cmd, **kwargs):
    """run() with stdout and stderr decoded as text (bytes that are not UTF-8 replaced)."""
    proc = run(cmd, **kwargs)
    proc.stdout, proc.stderr = (data.decode("utf-8", "replace") for data in (proc.stdout,
                                                                              proc.stderr))
    return proc


def _text(data, limit=4000):
    if data is None:
        return ""
    if isinstance(data, bytes):
        data = data.decode("utf-8", "replace")
    return data if len(data) <= limit else data[:limit] + f"... ({len(data)} chars)"


class Server:
    """One spindle-nbd process. Listens on a Unix socket in the test's temp dir, or on
    127.0.0.1 with a kernel-picked port (-p 0; the port is read from the startup banner)."""

    def __init__(self, test, image=None, args=(), tcp=False, persistent=True, name="",
                 start_timeout=15, wrapper=()):
        self.test = test
        self.tcp = tcp
        self.name = name
        self.port = None
        self.returncode = None
        # Set once the test signals, stops, kills or waits for the server: from then on its exit
        # status is the test's business. An exit nobody asked for must be 0 (see _cleanup).
        self.exit_expected = False
        index = len(test.servers)
        self.log_path = os.path.join(test.tmp, f"server{index}.log")
        self.socket_path = None if tcp else os.path.join(test.tmp, f"nbd{index}.sock")
        cmd = list(wrapper) + [SPINDLE_NBD]  # wrapper: e.g. [no_io_uring] (test_aio.py)
        if persistent:
            cmd.append("-t")
        if name:
            cmd += ["-x", name]
        if tcp:
            cmd += ["-b", "127.0.0.1", "-p", "0"]
        else:
            cmd += ["-k", self.socket_path]
        cmd += list(args)
        if image is not None:
            cmd.append(image)  # last, as in the usage line (and after any --export)
        self.cmd = [str(c) for c in cmd]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=self._log, preexec_fn=_die_with_parent)
        test.servers.append(self)
        self._wait_ready(start_timeout)

    @property
    def pid(self):
        return self.proc.pid

    def _wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_text()
            match = re.search(r"listening on (\S+)", text)
            if match:
                if self.tcp:
                    port = re.search(r"nbds?://127\.0\.0\.1:(\d+)/", match.group(1))
                    if not port:
                        raise AssertionError(f"cannot parse the port from: {match.group(1)}")
                    self.port = int(port.group(1))
                    if self.port == 0:
                        raise AssertionError("server reported port 0 for -p 0")
                return
            if self.proc.poll() is not None:
                self.exit_expected = True  # reported here (a test may expect it)
                raise AssertionError(f"spindle-nbd exited with {self.proc.returncode} at startup: "
                                     f"{' '.join(self.cmd)}\n{text}")
            time.sleep(0.02)
        raise AssertionError(f"spindle-nbd not ready after {timeout} s: {' '.join(self.cmd)}\n"
                             f"{self.log_text()}")

    def uri(self, export=None):
        name = self.name if export is None else export
        if self.tcp:
            return f"nbd://127.0.0.1:{self.port}/{name}"
        return f"nbd+unix:///{name}?socket={self.socket_path}"

    def address(self):
        return ("127.0.0.1", self.port) if self.tcp else self.socket_path

    def connect_raw(self, timeout=5.0):
        family = socket.AF_INET if self.tcp else socket.AF_UNIX
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(self.address())
        return sock

    def log_text(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def alive(self):
        return self.proc.poll() is None

    def signal(self, sig):
        self.exit_expected = True
        if self.alive():
            self.proc.send_signal(sig)

    def wait(self, timeout):
        """Waits for exit; returns the exit status or None on timeout (the server keeps running)."""
        self.exit_expected = True
        try:
            self.returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        return self.returncode

    def stop(self, timeout=5.0):
        """SIGTERM, then SIGKILL if it has not exited within `timeout`. Returns
        (exit status, seconds to exit after SIGTERM, was it killed)."""
        self.exit_expected = True
        if not self.alive():
            self.returncode = self.proc.returncode
            self._close_log()
            return self.returncode, 0.0, False
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        rc = self.wait(timeout)
        elapsed = time.monotonic() - started
        killed = False
        if rc is None:
            self.kill()
            killed = True
        self._close_log()
        return self.returncode, elapsed, killed

    def kill(self):
        self.exit_expected = True
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.returncode = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._close_log()

    def _close_log(self):
        if not self._log.closed:
            self._log.close()

    # /proc views used by the leak checks.
    def fd_count(self):
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def fds(self):
        result = {}
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                result[int(fd)] = os.readlink(f"/proc/{self.pid}/fd/{fd}")
            except OSError:
                pass
        return result

    def rss_kib(self):
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS in /proc/PID/status")

    def thread_count(self):
        """Threads of the server itself; io_uring's kernel workers (iou-wrk-*, iou-sqp-*) come
        and go on demand and are not counted."""
        count = 0
        for tid in os.listdir(f"/proc/{self.pid}/task"):
            try:
                with open(f"/proc/{self.pid}/task/{tid}/comm") as f:
                    if f.read().startswith("iou-"):
                        continue
            except OSError:
                continue
            count += 1
        return count


class InteropTest(unittest.TestCase):
    """Base class: a temp dir per test, servers that are always cleaned up, and a watchdog."""

    test_timeout_s = DEFAULT_TEST_TIMEOUT_S

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="spindle-interop-")
        self.servers = []
        self.handles = []
        self.watchdog_fired = False
        self._watchdog = threading.Timer(self.test_timeout_s, self._on_watchdog)
        self._watchdog.daemon = True
        self._watchdog.start()
        self.addCleanup(self._cleanup)

    def _on_watchdog(self):
        self.watchdog_fired = True
        log(f"WATCHDOG: {self.id()} still running after {self.test_timeout_s} s: "
            f"killing its servers")
        for server in list(self.servers):
            try:
                server.proc.kill()
            except OSError:
                pass

    def _cleanup(self):
        self._watchdog.cancel()
        # libnbd 1.14's Python handles have no close(): dropping the last reference closes them.
        self.handles.clear()
        gc.collect()
        failed = self._outcome_failed()
        bad_exits = []
        for server in self.servers:
            problem = None
            if server.alive() and not self.watchdog_fired:
                # A clean shutdown, so that the sanitizers see it (and report at exit).
                rc, _, killed = server.stop(timeout=10)
                if killed:
                    log(f"note: spindle-nbd ignored SIGTERM for 10 s, killed: {server.cmd}")
                elif rc != 0:
                    problem = f"exit status {rc} after SIGTERM at the end of the test"
            elif server.alive():
                server.kill()
            else:
                server.returncode = server.proc.returncode
                server._close_log()
                if not server.exit_expected and server.returncode != 0:
                    problem = f"exited with status {server.returncode} during the test"
            text = server.log_text()
            report = SANITIZER_REPORT.search(text)
            if report or server.returncode == SANITIZER_EXIT_CODE:
                problem = f"sanitizer report (exit status {server.returncode})"
            if problem:
                bad_exits.append(f"{' '.join(server.cmd)}: {problem}")
            if failed or self.watchdog_fired or problem:
                log(f"--- spindle-nbd log ({' '.join(server.cmd)}), exit {server.returncode}:")
                if report and report.start() < len(text) - 6000:
                    log(text[report.start():report.start() + 6000])  # the first report
                    log("--- ... (log tail)")
                log(text[-6000:])
        strays = self.kill_strays()
        shutil.rmtree(self.tmp, ignore_errors=True)
        if strays:
            raise AssertionError(f"processes left running by the test (killed): {strays}")
        if bad_exits:
            raise AssertionError("spindle-nbd (log above): " + "; ".join(bad_exits))
        if self.watchdog_fired:
            raise AssertionError(f"test exceeded its {self.test_timeout_s} s watchdog "
                                 "(server hung?)")

    def _outcome_failed(self):
        outcome = getattr(self, "_outcome", None)
        if outcome is None:
            return False
        result = getattr(outcome, "result", None)
        if result is not None:  # Python ≥ 3.11
            return any(t is self for t, _ in result.failures + result.errors)
        errors = getattr(outcome, "errors", [])  # Python ≤ 3.10
        return any(exc is not None for _, exc in errors)

    def strays(self):
        """{pid: cmdline} of processes whose command line names this test's temp dir (servers
        spawned by libnbd, nbdinfo/nbdcopy '-- [ ... ]', or --fork): all started by this test."""
        found = {}
        me = os.getpid()
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
                with open(f"/proc/{entry}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if self.tmp in cmdline and state != "Z":
                found[int(entry)] = cmdline.strip()
        return found

    def kill_strays(self, grace=2.0):
        """Waits up to `grace` s for stray processes to exit on their own, then SIGKILLs them by
        pid. Returns the ones that had to be killed."""
        deadline = time.monotonic() + grace
        strays = self.strays()
        while strays and time.monotonic() < deadline:
            time.sleep(0.05)
            strays = self.strays()
        for pid in strays:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        return strays

    # ---- helpers ----
    def path(self, name):
        return os.path.join(self.tmp, name)

    def make_image(self, name, size, chunks=()):
        """A sparse raw image of `size` bytes with (offset, bytes) written into it."""
        path = self.path(name)
        with open(path, "wb") as f:
            f.truncate(size)
            for offset, data in chunks:
                f.seek(offset)
                f.write(data)
        return path

    def server(self, image=None, args=(), **kwargs):
        return Server(self, image, args, **kwargs)

    def connect(self, uri, meta_contexts=(), strict=True):
        """A libnbd handle connected to `uri`, closed at cleanup."""
        import nbd
        h = nbd.NBD()
        self.handles.append(h)
        for context in meta_contexts:
            h.add_meta_context(context)
        if not strict:
            h.set_strict_mode(0)
        h.connect_uri(uri)
        return h

    def assert_serving(self, server, export=None, write=True):
        """The server is alive and a normal client can use it (nbdinfo, plus a libnbd write and
        read-back when the nbd module is loaded and `write` is set)."""
        self.assertTrue(server.alive(), f"spindle-nbd died (exit {server.proc.returncode})")
        proc = run(["nbdinfo", "--size", server.uri(export)], timeout=20, check=False)
        self.assertEqual(proc.returncode, 0,
                         f"nbdinfo --size failed: {_text(proc.stderr)}")
        self.assertGreater(int(proc.stdout.strip()), 0)
        if write and "nbd" in sys.modules:
            h = self.connect(server.uri(export))
            payload = os.urandom(4096)
            h.pwrite(payload, 0)
            self.assertEqual(h.pread(4096, 0), payload, "normal client read back wrong data")
            h.shutdown()
            self.handles.remove(h)
            del h


def nbdinfo_json(uri, *extra, timeout=30):
    proc = run(["nbdinfo", "--json", *extra, uri], timeout=timeout)
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError as e:
        raise AssertionError(f"nbdinfo --json printed invalid JSON ({e}):\n{_text(proc.stdout)}")


def file_extents(path):
    """(data_extents, size): the file's allocated ranges by SEEK_DATA/SEEK_HOLE."""
    extents = []
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        offset = 0
        while offset < size:
            try:
                data = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            extents.append((data, hole - data))
            offset = hole
    return extents, size


def pattern(seed, length):
    """Deterministic, position-dependent bytes (not all-equal, so misplaced data shows)."""
    head = struct.pack(">Q", seed & 0xFFFFFFFFFFFFFFFF)
    block = bytes((seed * 131 + i * 7) & 0xFF for i in range(256))
    out = bytearray((head + block) * (length // (len(head) + len(block)) + 1))
    return bytes(out[:length])


# ---- raw wire helpers for the hostile tests ----------------------------------------------------


def recv_exact(sock, n):
    """n bytes, or fewer if the peer closed (returned as is)."""
    chunks = []
    got = 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def wait_closed(sock, timeout):
    """Reads and discards until EOF. Returns seconds until EOF/reset, or None if the connection
    was still open after `timeout`."""
    started = time.monotonic()
    deadline = started + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except socket.timeout:
            return None
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - started
        if not data:
            return time.monotonic() - started


def read_greeting(sock):
    greeting = recv_exact(sock, 18)
    if len(greeting) != 18:
        raise AssertionError(f"short greeting: {greeting!r}")
    magic, ihaveopt, flags = struct.unpack(">QQH", greeting)
    if magic != NBDMAGIC or ihaveopt != IHAVEOPT:
        raise AssertionError(f"bad greeting: {greeting.hex()}")
    return flags


def send_option(sock, option, data=b""):
    sock.sendall(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)


def read_option_reply(sock):
    """(option, reply type, data); raises AssertionError on EOF or bad magic."""
    header = recv_exact(sock, 20)
    if len(header) != 20:
        raise AssertionError(f"connection closed during an option reply (got {header!r})")
    magic, option, reply_type, length = struct.unpack(">QIII", header)
    if magic != OPT_REPLY_MAGIC:
        raise AssertionError(f"bad option reply magic {magic:#x}")
    if length > 1 << 20:
        raise AssertionError(f"implausible option reply length {length}")
    data = recv_exact(sock, length)
    if len(data) != length:
        raise AssertionError("connection closed inside an option reply")
    return option, reply_type, data


def info_payload(name, requests=()):
    name = name.encode() if isinstance(name, str) else name
    return (struct.pack(">I", len(name)) + name + struct.pack(">H", len(requests))
            + b"".join(struct.pack(">H", r) for r in requests))


def raw_handshake(sock, export="", structured=False):
    """Fixed-newstyle handshake up to transmission via NBD_OPT_GO. Returns (size, flags)."""
    read_greeting(sock)
    sock.sendall(struct.pack(">I", CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES))
    if structured:
        send_option(sock, OPT_STRUCTURED_REPLY)
        _, reply_type, _ = read_option_reply(sock)
        if reply_type != REP_ACK:
            raise AssertionError(f"STRUCTURED_REPLY answered with {reply_type:#x}")
    send_option(sock, OPT_GO, info_payload(export))
    size = flags = None
    while True:
        option, reply_type, data = read_option_reply(sock)
        if reply_type == REP_INFO and len(data) >= 2 and struct.unpack(">H", data[:2])[0] == 0:
            size, flags = struct.unpack(">QH", data[2:12])
        elif reply_type == REP_ACK:
            break
        else:
            raise AssertionError(f"GO answered with reply type {reply_type:#x}: {data!r}")
    if size is None:
        raise AssertionError("GO finished without NBD_INFO_EXPORT")
    return size, flags


def request(command, cookie, offset, length, flags=0, payload=b""):
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, command, cookie, offset, length) + payload


def read_simple_reply(sock, data_length=0):
    header = recv_exact(sock, 16)
    if len(header) != 16:
        raise AssertionError(f"connection closed before a reply (got {header!r})")
    magic, error, cookie = struct.unpack(">IIQ", header)
    if magic != SIMPLE_REPLY_MAGIC:
        raise AssertionError(f"expected a simple reply, magic {magic:#x}")
    data = recv_exact(sock, data_length) if error == 0 and data_length else b""
    return error, cookie, data
