#!/usr/bin/env python3
"""Resource limits against hostile clients, with the server's memory sampled from /proc:
  * one unaligned WRITE_ZEROES of 4 GiB on raw, QED and --cache=none exports (edges by
    read-modify-write, the middle passed down: no buffer as long as the request);
  * 20 clients that each pipeline 32 MiB READs and never read the replies (plain and TLS): the
    server-wide in-flight budget bounds the memory, a normal client is served throughout, and
    once they disconnect their queued work is dropped and memory and fds come back;
  * 150 connections that never finish the handshake cannot keep a real client out.
A normal client (libnbd) checks the server during and after each attack."""

import os
import socket
import ssl
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spindle_interop as si  # noqa: E402
from spindle_interop import (MiB, GiB, CMD_READ, OPT_GO, REP_ACK, REP_INFO,  # noqa: E402
                             CLIENT_FLAG_FIXED_NEWSTYLE, CLIENT_FLAG_NO_ZEROES, read_greeting,
                             send_option, read_option_reply, info_payload, raw_handshake,
                             request)

try:
    import nbd
except ImportError:  # main() re-executes with the module available, or skips
    nbd = None

OPT_STARTTLS = 5
CMD_WRITE_ZEROES = 6
# The server's default budget (spindle-nbd --max-bytes-in-flight) and per-connection reserve.
BUDGET = 256 * MiB
RESERVE = 1 * MiB
# What the process itself needs beside the budget: code, threads' stacks, per-connection
# buffers (receive buffer, buffer pool), allocator slack.
SLACK = 96 * MiB
# A 4 KiB read from a normal client while the attack runs. Generous: a loaded CI machine may
# stall a process for a while; a starved client waited for the 10 s handshake timeout.
PROMPT_S = 5.0


def instrumented():
    """Sanitizer builds keep freed memory in quarantine or shadow: RSS bounds do not apply."""
    with open(si.SPINDLE_NBD, "rb") as f:
        data = f.read()
    return b"__asan_init" in data or b"__tsan_init" in data


def anon_kib(pid):
    """Anonymous resident memory: what the server allocated (file pages of a mapped image or
    of the page cache are not its allocations)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise AssertionError("no RssAnon in /proc/PID/status")


class MemorySampler:
    """Samples the server's anonymous RSS every 20 ms in a thread; peak in bytes."""

    def __init__(self, pid):
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, anon_kib(self.pid) * 1024)
            except (OSError, AssertionError):
                return
            self._stop.wait(0.02)

    def stop(self):
        self._stop.set()
        self._thread.join()
        return self.peak


def go(sock, export=""):
    """NBD_OPT_GO on a socket past the client flags (and STARTTLS); waits for the ACK."""
    send_option(sock, OPT_GO, info_payload(export))
    while True:
        _, reply_type, _ = read_option_reply(sock)
        if reply_type == REP_ACK:
            return
        if reply_type != REP_INFO:
            raise AssertionError(f"GO answered with {reply_type:#x}")


def timed_read(test, uri, count=10):
    """`count` 4 KiB reads by a fresh libnbd client; each must finish within PROMPT_S."""
    started = time.monotonic()
    h = nbd.NBD()
    try:
        h.set_uri_allow_local_file(True)  # tls-certificates=DIR
        h.connect_uri(uri)
        connected = time.monotonic() - started
        test.assertLess(connected, PROMPT_S, f"a normal client needed {connected:.1f} s to connect")
        worst = 0.0
        for i in range(count):
            t = time.monotonic()
            h.pread(4096, i * 4096)
            worst = max(worst, time.monotonic() - t)
        test.assertLess(worst, PROMPT_S, f"a normal client's 4 KiB read took {worst:.1f} s")
        h.shutdown()
    finally:
        del h
    return time.monotonic() - started


class LimitsTest(si.InteropTest):

    def qed_image(self, name, size):
        path = self.path(name)
        si.run(["qemu-img", "create", "-q", "-f", "qed", path, str(size)])
        return path

    def check_huge_unaligned_zero(self, image, args):
        server = self.server(image, ["--iothreads", "1"] + args)
        h = self.connect(server.uri())
        length = 4 * GiB - 4096
        h.pwrite(b"\xaa" * 8192, 0)
        h.pwrite(b"\xbb" * 8192, length - 4096)
        sampler = MemorySampler(server.pid)
        h.zero(length, 1)
        peak = sampler.stop()
        si.log(f"{os.path.basename(image)} {' '.join(args)}: peak RssAnon "
               f"{peak / MiB:.0f} MiB during a 4 GiB unaligned WRITE_ZEROES")
        self.assertEqual(h.pread(2, 0), b"\xaa\x00")   # byte 0 kept, byte 1 zeroed
        self.assertEqual(h.pread(4096, 4096), bytes(4096))
        tail = h.pread(8192, length - 4096)
        self.assertEqual(tail[:4097], bytes(4097))    # up to length + 1 (exclusive) zeroed
        self.assertEqual(tail[4097:], b"\xbb" * (8192 - 4097))
        if not instrumented():
            self.assertLess(peak, 64 * MiB, "the server allocated memory for the whole range")
        self.assert_serving(server)

    def test_unaligned_zero_of_4g_on_qed(self):
        self.check_huge_unaligned_zero(self.qed_image("big.qed", 8 * GiB), ["-f", "qed"])

    def test_unaligned_zero_of_4g_on_raw_cache_none(self):
        image = self.make_image("big.img", 8 * GiB)
        self.check_huge_unaligned_zero(image, ["--cache=none"])

    def test_unaligned_zero_of_4g_on_qed_cache_none(self):
        self.check_huge_unaligned_zero(self.qed_image("big.qed", 8 * GiB),
                                       ["-f", "qed", "--cache=none"])

    # ---- clients that pipeline large READs and never read the replies ---------------------

    def open_flooders(self, server, count, tls_certs=None, reads=8):
        """`count` connections that each send `reads` 32 MiB READs and read nothing back."""
        sockets = []
        for i in range(count):
            s = server.connect_raw(timeout=10)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            if tls_certs:
                read_greeting(s)
                s.sendall(struct.pack(">I", CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES))
                send_option(s, OPT_STARTTLS)
                _, reply_type, _ = read_option_reply(s)
                self.assertEqual(reply_type, REP_ACK)
                context = ssl.create_default_context(
                    cafile=os.path.join(tls_certs, "ca-cert.pem"))
                s = context.wrap_socket(s, server_hostname="localhost")
                s.settimeout(10)
                go(s)
            else:
                raw_handshake(s)
            s.settimeout(0.5)
            for r in range(reads):
                try:
                    s.sendall(request(CMD_READ, r + 1, (r % 4) * 32 * MiB, 32 * MiB))
                except (socket.timeout, BrokenPipeError, ConnectionResetError, ssl.SSLError):
                    break
            sockets.append(s)
        return sockets

    def settle(self, server, baseline_kib, baseline_fds, what):
        """After the attack: anonymous memory and fds come back within 10 s."""
        deadline = time.monotonic() + 10
        while True:
            anon, fds = anon_kib(server.pid), server.fd_count()
            settled = fds <= baseline_fds and (instrumented() or
                                               anon <= baseline_kib + 48 * 1024)
            if settled or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        si.log(f"{what}: after disconnect RssAnon {anon / 1024:.0f} MiB "
               f"(baseline {baseline_kib / 1024:.0f}), fds {fds} (baseline {baseline_fds})")
        self.assertLessEqual(fds, baseline_fds, f"{what}: fds still held 10 s after disconnect")
        if not instrumented():
            self.assertLessEqual(anon, baseline_kib + 48 * 1024,
                                 f"{what}: memory still held 10 s after disconnect")

    def check_unread_reads(self, server, uri, tls_certs=None, what=""):
        for _ in range(2):
            timed_read(self, uri, count=2)  # warm up before the baseline
        time.sleep(0.3)
        baseline_kib, baseline_fds = anon_kib(server.pid), server.fd_count()
        sampler = MemorySampler(server.pid)
        flooders = self.open_flooders(server, 20, tls_certs)
        try:
            time.sleep(1.0)  # let the server read and execute what it admits
            elapsed = timed_read(self, uri)
        finally:
            peak = sampler.stop()
            for s in flooders:
                s.close()
        si.log(f"{what}: 20 clients with unread 32 MiB READs: peak RssAnon {peak / MiB:.0f} MiB"
               f" (baseline {baseline_kib / 1024:.0f}); a normal client's 10 reads took "
               f"{elapsed:.2f} s")
        if not instrumented():
            self.assertLess(peak, baseline_kib * 1024 + BUDGET + 20 * RESERVE + SLACK,
                            f"{what}: the in-flight budget did not bound the memory")
        # Right after they disconnect: served at once, and their work is dropped.
        timed_read(self, uri)
        self.settle(server, baseline_kib, baseline_fds, what)
        if not tls_certs:
            self.assert_serving(server)

    def data_image(self, name, size):
        path = self.path(name)
        with open(path, "wb") as f:
            for _ in range(size // MiB):
                f.write(os.urandom(64) * (MiB // 64))
        return path

    def test_unread_reads_on_qed(self):
        image = self.qed_image("disk.qed", 128 * MiB)
        si.run(["qemu-io", "-f", "qed", "-c", "write -P 0x5a 0 128M", image], timeout=120)
        server = self.server(image, ["-f", "qed", "--zero-copy=never", "--iothreads", "2"])
        self.check_unread_reads(server, server.uri(), what="qed")

    def test_unread_reads_on_raw_without_zero_copy(self):
        image = self.data_image("disk.img", 128 * MiB)
        server = self.server(image, ["--zero-copy=never", "--iothreads", "2"])
        self.check_unread_reads(server, server.uri(), what="raw")

    def test_unread_reads_on_raw_cache_none(self):
        image = self.data_image("disk.img", 128 * MiB)
        server = self.server(image, ["--cache=none", "--iothreads", "2"])
        self.check_unread_reads(server, server.uri(), what="raw --cache=none")

    def test_unread_reads_over_tls(self):
        from test_tls import make_x509  # the module's directory is on sys.path (top)
        certs = make_x509(self.path("pki"))
        image = self.data_image("disk.img", 128 * MiB)
        server = self.server(image, ["--tls-creds", certs, "--iothreads", "2"])
        uri = server.uri() + f"&tls-certificates={certs}"
        uri = uri.replace("nbd+unix://", "nbds+unix://", 1)
        self.check_unread_reads(server, uri, tls_certs=certs, what="tls")

    def test_small_budget_is_respected(self):
        if instrumented():
            self.skipTest("RSS bounds do not apply to sanitizer builds")
        image = self.data_image("disk.img", 128 * MiB)
        server = self.server(image, ["--zero-copy=never", "--iothreads", "2",
                                     "--max-bytes-in-flight", "64M"])
        baseline = anon_kib(server.pid) * 1024
        sampler = MemorySampler(server.pid)
        flooders = self.open_flooders(server, 20)
        try:
            time.sleep(1.0)
            timed_read(self, server.uri())
        finally:
            peak = sampler.stop()
            for s in flooders:
                s.close()
        si.log(f"--max-bytes-in-flight 64M: peak RssAnon {peak / MiB:.0f} MiB "
               f"(baseline {baseline / MiB:.0f})")
        self.assertLess(peak, baseline + 64 * MiB + 20 * RESERVE + SLACK)
        self.assert_serving(server)

    # ---- handshakes that never finish --------------------------------------------------------

    def test_unfinished_handshakes_do_not_starve_real_clients(self):
        image = self.make_image("disk.img", 16 * MiB)
        server = self.server(image, ["--iothreads", "1"])   # 100 connections, 10 s handshakes
        idle = []
        try:
            for _ in range(150):
                try:
                    idle.append(server.connect_raw(timeout=5))  # never says anything
                except OSError:
                    break
            time.sleep(0.5)
            # Each of these must get in at once, not after the 10 s handshake timeout.
            for attempt in range(5):
                started = time.monotonic()
                proc = si.run(["nbdinfo", "--size", server.uri()], timeout=20, check=False)
                elapsed = time.monotonic() - started
                self.assertEqual(proc.returncode, 0,
                                 f"attempt {attempt}: a real client was refused while 150 "
                                 f"handshakes were open: {proc.stderr}")
                self.assertLess(elapsed, PROMPT_S, f"attempt {attempt} took {elapsed:.1f} s")
            h = self.connect(server.uri())   # a served client is never the one replaced
            for _ in range(120):
                idle.append(server.connect_raw(timeout=5))
            time.sleep(0.5)
            self.assertEqual(len(h.pread(4096, 0)), 4096)
        finally:
            for s in idle:
                s.close()
        self.assert_serving(server)


if __name__ == "__main__":
    si.main(required_binaries=("nbdinfo", "qemu-img", "qemu-io", "certtool"),
            needs_nbd_module=True)
