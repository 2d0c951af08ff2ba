#!/usr/bin/env python3
"""--aio: spindle-nbd's file I/O engine. The default, --aio=auto, probes io_uring once at
start-up and falls back to the thread pool where it is refused; --aio=io_uring insists (and
fails with a clear message and a non-zero exit); --aio=threads never touches io_uring. The
engine is named in the start-up line ("listening on URI (aio: ...)") and in --stats output.

io_uring is taken away with tests/support/no_io_uring.cc (passed as --no-io-uring PATH): a
seccomp filter failing io_uring_setup/enter/register with ENOSYS (container runtimes) or EPERM
(kernel.io_uring_disabled), then exec of the server. Reads and writes then go through libnbd
(nbdsh's library) and qemu-img, and are checked in the image files."""

import ctypes
import errno
import os
import re
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spindle_interop as si  # noqa: E402
from spindle_interop import MiB, run  # noqa: E402

NO_IO_URING = None  # --no-io-uring PATH

_NR_IO_URING_SETUP = 425  # the same number on every architecture


def io_uring_works_here():
    """Whether this process may create an io_uring (what --aio=auto's probe will find)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    params = ctypes.create_string_buffer(120)  # struct io_uring_params, zeroed
    fd = libc.syscall(_NR_IO_URING_SETUP, ctypes.c_uint(2), params)
    if fd < 0:
        return False
    os.close(fd)
    return True


class AioTest(si.InteropTest):

    def startup_line(self, server):
        match = re.search(r"listening on \S+ \(aio: (.*)\)\n", server.log_text())
        self.assertIsNotNone(match, f"no engine in the start-up line:\n{server.log_text()}")
        return match.group(1)

    def stats_engine(self, server):
        """Asks for statistics (SIGUSR1, sent with os.kill: Server.signal() would mark any exit
        as expected) and returns the engine they name."""
        before = len(re.findall(r"^aio: .*$", server.log_text(), re.M))
        os.kill(server.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            lines = re.findall(r"^aio: (.*)$", server.log_text(), re.M)
            if len(lines) > before:
                return lines[-1]
            time.sleep(0.05)
        self.fail(f"no 'aio:' line in the SIGUSR1 statistics:\n{server.log_text()}")

    def read_write(self, server, image, export=""):
        """libnbd and qemu-img both write and read back through the server; the bytes land in
        the image file."""
        h = self.connect(server.uri(export))
        first = os.urandom(256 * 1024)
        h.pwrite(first, 0)
        h.flush()
        self.assertEqual(h.pread(len(first), 0), first, "libnbd read back wrong data")
        # qemu-io writes the second MiB, qemu-img reads the whole export back.
        run(["qemu-io", "-f", "raw", "-c", f"write -P 0x5c {MiB} {MiB}", server.uri(export)],
            timeout=60)
        copy = self.path("copy.raw")
        run(["qemu-img", "convert", "-f", "raw", "-O", "raw", server.uri(export), copy],
            timeout=60)
        with open(copy, "rb") as f:
            data = f.read()
        self.assertEqual(data[:len(first)], first, "qemu-img read back wrong data (libnbd's)")
        self.assertEqual(data[MiB:2 * MiB], b"\x5c" * MiB, "qemu-img read back wrong data")
        self.assertEqual(h.pread(MiB, MiB), b"\x5c" * MiB, "libnbd saw qemu-io's write wrong")
        h.shutdown()
        self.handles.remove(h)
        del h
        with open(image, "rb") as f:
            self.assertEqual(f.read(len(first)), first, "the image file lacks libnbd's write")
            f.seek(MiB)
            self.assertEqual(f.read(MiB), b"\x5c" * MiB, "the image file lacks qemu-io's write")

    def test_filter_takes_io_uring_away(self):
        # The helper itself: io_uring_setup fails with the chosen errno under it.
        probe = ("import ctypes, sys; l = ctypes.CDLL(None, use_errno=True); "
                 "b = ctypes.create_string_buffer(120); "
                 "r = l.syscall(425, ctypes.c_uint(2), b); "
                 "print(r, ctypes.get_errno())")
        for name, code in (("ENOSYS", errno.ENOSYS), ("EPERM", errno.EPERM)):
            proc = run([NO_IO_URING, f"--errno={name}", sys.executable, "-c", probe], timeout=30)
            self.assertEqual(proc.stdout.decode().split(), ["-1", str(code)], name)

    def test_auto_falls_back_to_thread_pool(self):
        image = self.make_image("disk.img", 4 * MiB)
        server = self.server(image, ["--stats", "--iothreads", "2"], wrapper=[NO_IO_URING])
        engine = self.startup_line(server)
        self.assertEqual(engine, "threads (thread pool; io_uring unavailable: io_uring_setup: "
                                 "Function not implemented)")
        self.read_write(server, image)
        self.assertTrue(self.stats_engine(server).startswith("threads (thread pool;"))
        # --stats at exit names it too.
        rc, _, killed = server.stop(timeout=20)
        self.assertFalse(killed)
        self.assertEqual(rc, 0, server.log_text())
        self.assertEqual(len(re.findall(r"^aio: threads \(thread pool;", server.log_text(), re.M)),
                         2, server.log_text())

    def test_auto_falls_back_for_qed_and_eperm(self):
        # kernel.io_uring_disabled gives EPERM; a QED export (metadata I/O too) falls back.
        qed = self.path("disk.qed")
        run(["qemu-img", "create", "-q", "-f", "qed", qed, "8M"])
        server = self.server(args=["--export", f"name=q,file={qed}"], name="q",
                             wrapper=[NO_IO_URING, "--errno=EPERM"])
        self.assertIn("io_uring unavailable: io_uring_setup: Operation not permitted",
                      self.startup_line(server))
        h = self.connect(server.uri("q"))
        payload = os.urandom(128 * 1024)
        h.pwrite(payload, 3 * MiB)
        h.flush()
        self.assertEqual(h.pread(len(payload), 3 * MiB), payload)
        h.shutdown()
        self.handles.remove(h)
        del h
        rc, _, _ = server.stop(timeout=20)
        self.assertEqual(rc, 0, server.log_text())
        run(["qemu-img", "check", "-q", qed])
        copy = self.path("copy.raw")
        run(["qemu-img", "convert", "-f", "qed", "-O", "raw", qed, copy])
        with open(copy, "rb") as f:
            f.seek(3 * MiB)
            self.assertEqual(f.read(len(payload)), payload, "the QED image lacks the write")

    def test_explicit_io_uring_fails_clearly(self):
        image = self.make_image("disk.img", 1 * MiB)
        sock = self.path("nbd.sock")
        started = time.monotonic()
        proc = run([NO_IO_URING, si.SPINDLE_NBD, "--aio=io_uring", "-t", "-k", sock, image],
                   timeout=60, check=False)
        stderr = proc.stderr.decode("utf-8", "replace")
        self.assertNotEqual(proc.returncode, 0, stderr)
        self.assertNotEqual(proc.returncode, si.SANITIZER_EXIT_CODE, stderr)
        self.assertIn("--aio=io_uring: io_uring is unavailable here (io_uring_setup: Function not "
                      "implemented); use --aio=auto or --aio=threads", stderr)
        self.assertNotIn("listening on", stderr)
        self.assertFalse(os.path.exists(sock), "a socket was created before failing")
        self.assertLess(time.monotonic() - started, 30)

    def test_explicit_threads(self):
        image = self.make_image("disk.img", 4 * MiB)
        server = self.server(image, ["--aio=threads"])
        self.assertEqual(self.startup_line(server), "threads (thread pool)")
        self.read_write(server, image)

    def test_auto_prefers_io_uring(self):
        if not io_uring_works_here():
            self.skipTest("io_uring is unavailable on this machine (seccomp or sysctl)")
        image = self.make_image("disk.img", 4 * MiB)
        server = self.server(image, ["--stats"])
        self.assertEqual(self.startup_line(server), "io_uring")
        self.read_write(server, image)
        self.assertEqual(self.stats_engine(server), "io_uring")
        forced = self.server(image, ["--aio=io_uring"])
        self.assertEqual(self.startup_line(forced), "io_uring")


if __name__ == "__main__":
    # Kept in the environment too: si.main() may re-exec the script under /usr/bin/python3.
    if "--no-io-uring" in sys.argv[1:]:
        at = sys.argv.index("--no-io-uring")
        os.environ["SPINDLE_NO_IO_URING"] = os.path.abspath(sys.argv[at + 1])
        del sys.argv[at:at + 2]
    NO_IO_URING = os.environ.get("SPINDLE_NO_IO_URING")
    if not NO_IO_URING or not os.access(NO_IO_URING, os.X_OK):
        print("FAILED: --no-io-uring PATH (tests/support/no_io_uring.cc) is required", flush=True)
        sys.exit(1)
    si.main(required_binaries=("nbdinfo", "qemu-img", "qemu-io"), needs_nbd_module=True)
