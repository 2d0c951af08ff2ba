#!/usr/bin/env python3
"""Clean shutdown and statistics: SIGTERM/SIGINT with clients connected (writing, idle, stuck in
the handshake, not reading their replies) must make spindle-nbd exit 0 within 5 s with every
acknowledged FUA/flushed write in the image; without -t it exits after the last client; SIGUSR1
prints a stats line and --stats prints one at exit; socket and pid files are removed."""

import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spindle_interop as si  # noqa: E402
from spindle_interop import MiB, run  # noqa: E402

try:
    import nbd
except ImportError:
    nbd = None

EXIT_LIMIT_S = 5.0
BLOCK = 4096


class ShutdownTest(si.InteropTest):

    def assert_clean_exit(self, server, sig=signal.SIGTERM):
        started = time.monotonic()
        server.signal(sig)
        rc = server.wait(EXIT_LIMIT_S)
        elapsed = time.monotonic() - started
        if rc is None:
            server.kill()
            self.fail(f"spindle-nbd still running {EXIT_LIMIT_S} s after "
                      f"{signal.Signals(sig).name}")
        self.assertEqual(rc, 0, f"exit status {rc} after {signal.Signals(sig).name}")
        return elapsed

    def test_sigterm_while_writing(self):
        blocks = 16384
        image = self.make_image("disk.img", blocks * BLOCK)
        server = self.server(image, ["--stats"])
        h = self.connect(server.uri())
        acked_fua, acked_plain, flushed = set(), set(), set()
        pending = {}  # cookie -> ("write", index, fua) or ("flush", snapshot)
        next_block = 0
        sent_signal_at = None
        started = time.monotonic()
        connection_dead = False
        while not connection_dead:
            now = time.monotonic()
            if sent_signal_at is None and now - started > 0.5:
                server.signal(signal.SIGTERM)
                sent_signal_at = now
            if now - started > 20:
                self.fail("writer loop did not end 20 s after starting (server ignored SIGTERM?)")
            # Keep 32 requests in flight; every 8th is a flush.
            try:
                while len(pending) < 32 and next_block < blocks:
                    if next_block % 8 == 7 and not any(p[0] == "flush" for p in pending.values()):
                        cookie = h.aio_flush()
                        pending[cookie] = ("flush", frozenset(acked_plain))
                    fua = next_block % 2 == 0
                    buf = nbd.Buffer.from_bytearray(si.pattern(next_block + 1, BLOCK))
                    cookie = h.aio_pwrite(buf, next_block * BLOCK,
                                          flags=nbd.CMD_FLAG_FUA if fua else 0)
                    pending[cookie] = ("write", next_block, fua, buf)
                    next_block += 1
                h.poll(100)
            except nbd.Error:
                connection_dead = True
            for cookie in list(pending):
                try:
                    done = h.aio_command_completed(cookie)
                except nbd.Error:
                    pending.pop(cookie)  # failed (server going away): no promise made
                    continue
                if done:
                    kind = pending.pop(cookie)
                    if kind[0] == "flush":
                        flushed |= kind[1]
                    elif kind[2]:
                        acked_fua.add(kind[1])
                    else:
                        acked_plain.add(kind[1])
            if next_block >= blocks and not pending:
                break
            if sent_signal_at is not None and not server.alive():
                # Drain whatever libnbd already received, then stop.
                try:
                    h.poll(0)
                except nbd.Error:
                    pass
                connection_dead = True
        self.assertIsNotNone(sent_signal_at, "the writer finished before SIGTERM was sent")
        rc = server.wait(max(0.1, sent_signal_at + EXIT_LIMIT_S - time.monotonic()))
        if rc is None:
            server.kill()
            self.fail(f"spindle-nbd did not exit within {EXIT_LIMIT_S} s of SIGTERM while a "
                      f"client was writing")
        exit_s = time.monotonic() - sent_signal_at
        self.assertEqual(rc, 0)
        si.log(f"SIGTERM -> exit in {exit_s:.2f} s; acked {len(acked_fua)} FUA + "
               f"{len(acked_plain)} plain writes, {len(flushed)} covered by a flush")
        self.assertGreater(len(acked_fua), 10, "too few writes before SIGTERM to mean anything")
        with open(image, "rb") as f:
            contents = f.read()

        def block_ok(i):
            return contents[i * BLOCK:(i + 1) * BLOCK] == si.pattern(i + 1, BLOCK)
        lost_fua = sorted(i for i in acked_fua if not block_ok(i))
        lost_flushed = sorted(i for i in flushed if not block_ok(i))
        lost_plain = sorted(i for i in acked_plain if not block_ok(i))
        self.assertEqual(lost_fua, [], "acknowledged FUA writes missing from the image")
        self.assertEqual(lost_flushed, [], "flushed writes missing from the image")
        self.assertEqual(lost_plain, [], "acknowledged writes missing after a clean shutdown")
        # --stats printed at exit.
        self.assertRegex(server.log_text(), r"export '': requests=\d+ read=\d+ written=\d+")

    def test_sigterm_with_idle_and_stuck_clients(self):
        image = self.make_image("disk.img", 4 * MiB)
        server = self.server(image)
        idle = self.connect(server.uri())
        self.assertEqual(idle.pread(512, 0), bytes(512))
        stuck = server.connect_raw()          # never answers the greeting
        half = server.connect_raw()           # negotiated, then half a request header
        si.raw_handshake(half)
        half.sendall(si.request(si.CMD_READ, 1, 0, 512)[:9])
        try:
            elapsed = self.assert_clean_exit(server)
            si.log(f"exit after {elapsed:.2f} s")
            for s in (stuck, half):
                self.assertIsNotNone(si.wait_closed(s, 2), "socket still open after exit")
        finally:
            stuck.close()
            half.close()
        self.assertFalse(os.path.exists(server.socket_path), "socket file left behind")
        with self.assertRaises(nbd.Error):
            idle.pread(512, 0)

    def test_sigterm_with_client_not_reading_replies(self):
        image = self.make_image("disk.img", 64 * MiB, [(0, os.urandom(64 * MiB))])
        server = self.server(image)
        s = server.connect_raw()
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            si.raw_handshake(s, structured=True)
            s.sendall(b"".join(si.request(si.CMD_READ, i + 1, i * MiB, 1 * MiB)
                               for i in range(64)))
            time.sleep(0.3)  # the server is now blocked sending replies nobody reads
            self.assert_clean_exit(server)
        finally:
            s.close()

    def unread_readers(self, server, count, reads, length=32 * MiB):
        """`count` clients that pipeline `reads` READs of `length` and never read a reply."""
        sockets = []
        for _ in range(count):
            s = server.connect_raw()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            si.raw_handshake(s)
            s.settimeout(0.5)
            sent = 0
            try:
                for i in range(reads):
                    s.sendall(si.request(si.CMD_READ, i + 1, (i % 2) * length, length))
                    sent += 1
            except (socket.timeout, BrokenPipeError, ConnectionResetError):
                pass  # the server stopped reading: the rest would not be read either
            sockets.append(s)
        return sockets

    def acked_writer(self, server, blocks=256):
        """A libnbd client that writes `blocks` FUA blocks; returns them (all acknowledged)."""
        h = self.connect(server.uri())
        written = {}
        for i in range(blocks):
            data = si.pattern(i + 7, BLOCK)
            h.pwrite(data, (64 * MiB) + i * BLOCK, nbd.CMD_FLAG_FUA)
            written[i] = data
        return written

    def check_acked_on_disk(self, image, written):
        with open(image, "rb") as f:
            for i, data in written.items():
                f.seek(64 * MiB + i * BLOCK)
                self.assertEqual(f.read(BLOCK), data, f"acknowledged block {i} lost")

    def test_sigterm_with_pipelines_beyond_the_request_cap(self):
        # Two clients with 64 unread 32 MiB READs each (beyond the 64 MiB per-connection budget
        # and, for the second pair, far beyond the 64-request cap, so the receive loop is parked
        # in admission), beside two writers: the server must still exit within the drain
        # deadline, with every acknowledged write in the image.
        image = self.make_image("disk.img", 128 * MiB, [(0, os.urandom(64 * MiB))])
        server = self.server(image, ["--iothreads", "2", "--zero-copy=never"])
        readers = self.unread_readers(server, 2, 64)
        flooders = (self.unread_readers(server, 1, 65, length=4096) +     # the cap + 1
                    self.unread_readers(server, 1, 500, length=4096))    # far beyond it
        written = self.acked_writer(server)
        try:
            time.sleep(0.3)
            elapsed = self.assert_clean_exit(server)
            si.log(f"exit {elapsed:.2f} s after SIGTERM with 4 clients not reading replies")
        finally:
            for s in readers + flooders:
                s.close()
        self.check_acked_on_disk(image, written)

    def test_sigterm_with_handshakes_in_flight(self):
        # 40 clients in the middle of the handshake (cf. CVE-2024-7409): some silent, some
        # between options, one flooding options without reading the replies.
        image = self.make_image("disk.img", 4 * MiB)
        server = self.server(image, ["--iothreads", "2"])
        sockets = []
        try:
            for i in range(40):
                s = server.connect_raw()
                sockets.append(s)
                if i % 3 == 0:
                    continue                              # silent
                si.read_greeting(s)
                s.sendall(struct.pack(">I", 3))
                if i % 3 == 1:
                    s.sendall(struct.pack(">QII", si.IHAVEOPT, si.OPT_LIST, 0)[:10])  # half
                    continue
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.settimeout(0.3)
                try:
                    for _ in range(50):                   # the server blocks sending replies
                        s.sendall(struct.pack(">QII", si.IHAVEOPT, si.OPT_LIST, 0) * 64)
                except (socket.timeout, BrokenPipeError, ConnectionResetError):
                    pass
            h = self.connect(server.uri())
            h.pwrite(b"\x42" * BLOCK, 0, nbd.CMD_FLAG_FUA)
            elapsed = self.assert_clean_exit(server)
            si.log(f"exit {elapsed:.2f} s after SIGTERM with 40 handshakes in flight")
        finally:
            for s in sockets:
                s.close()
        with open(image, "rb") as f:
            self.assertEqual(f.read(BLOCK), b"\x42" * BLOCK)

    def test_second_sigterm_exits_at_once(self):
        image = self.make_image("disk.img", 128 * MiB, [(0, os.urandom(64 * MiB))])
        # A long drain (a client that never reads keeps the first SIGTERM waiting for it).
        server = self.server(image, ["--zero-copy=never"])
        readers = self.unread_readers(server, 1, 64)
        try:
            time.sleep(0.3)
            server.signal(signal.SIGTERM)
            time.sleep(0.2)
            if not server.alive():  # only if this machine stalled us past the 2 s deadline
                self.skipTest("the first SIGTERM's drain ended before the second signal")
            started = time.monotonic()
            server.signal(signal.SIGTERM)
            rc = server.wait(EXIT_LIMIT_S)
            self.assertIsNotNone(rc, "a second SIGTERM did not end the server")
            self.assertEqual(rc, 128 + signal.SIGTERM)
            si.log(f"second SIGTERM: exit {time.monotonic() - started:.2f} s later")
        finally:
            for s in readers:
                s.close()
        self.assertFalse(os.path.exists(server.socket_path), "socket file left behind")

    def test_sigint(self):
        image = self.make_image("disk.img", 1 * MiB)
        server = self.server(image)
        h = self.connect(server.uri())
        h.pwrite(b"\x21" * 4096, 0, nbd.CMD_FLAG_FUA)
        self.assert_clean_exit(server, signal.SIGINT)
        with open(image, "rb") as f:
            self.assertEqual(f.read(4096), b"\x21" * 4096)

    def test_exits_after_last_client_without_t(self):
        image = self.make_image("disk.img", 1 * MiB)
        pid_file = self.path("server.pid")
        server = self.server(image, ["--pid-file", pid_file], persistent=False)
        with open(pid_file) as f:
            self.assertEqual(int(f.read().strip()), server.pid)
        a = self.connect(server.uri())
        b = self.connect(server.uri())
        a.pwrite(b"\x01" * 512, 0)
        a.shutdown()
        time.sleep(0.3)
        self.assertTrue(server.alive(), "exited while a client was still connected")
        self.assertEqual(b.pread(512, 0), b"\x01" * 512)
        b.shutdown()
        rc = server.wait(EXIT_LIMIT_S)
        self.assertEqual(rc, 0, "without -t the server must exit 0 after the last client")
        self.assertFalse(os.path.exists(server.socket_path), "socket file left behind")
        self.assertFalse(os.path.exists(pid_file), "pid file left behind")

    def test_fork_and_pid_file(self):
        # --fork returns once the daemon listens; the daemon serves, lets go of the caller's
        # stdout/stderr, and stops cleanly on SIGTERM.
        image = self.make_image("disk.img", 1 * MiB)
        pid_file = self.path("daemon.pid")
        sock = self.path("daemon.sock")
        try:
            proc = subprocess.run([si.SPINDLE_NBD, "--fork", "--pid-file", pid_file, "-t", "-k",
                                   sock, image], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  timeout=20)
            self.assertEqual(proc.returncode, 0)
            with open(pid_file) as f:
                pid = int(f.read().strip())
            self.assertIn(pid, self.strays(), "no daemon running")
            uri = f"nbd+unix:///?socket={sock}"
            self.assertEqual(run(["nbdinfo", "--size", uri], timeout=20).stdout.strip(),
                             b"1048576")
            h = self.connect(uri)
            h.pwrite(b"\x5f" * 512, 0, nbd.CMD_FLAG_FUA)
            h.shutdown()
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + EXIT_LIMIT_S
            while time.monotonic() < deadline and pid in self.strays():
                time.sleep(0.05)
            self.assertNotIn(pid, self.strays(), "forked server ignored SIGTERM")
            self.assertFalse(os.path.exists(pid_file), "pid file left behind")
            self.assertFalse(os.path.exists(sock), "socket file left behind")
            with open(image, "rb") as f:
                self.assertEqual(f.read(512), b"\x5f" * 512)
            # With stdout/stderr captured, the parent's exit must end the capture (a daemon
            # holding them would hang this until the timeout: 20 s, room for a loaded machine).
            run([si.SPINDLE_NBD, "--fork", "-t", "-k", sock, image], timeout=20)
        finally:
            self.kill_strays(grace=0)

    def test_sigusr1_and_exit_stats(self):
        image = self.make_image("disk.img", 8 * MiB, [(0, os.urandom(8 * MiB))])
        server = self.server(image, ["--stats"], name="disk")
        h = self.connect(server.uri())
        h.pwrite(b"\x11" * MiB, 0)
        h.pread(2 * MiB, 2 * MiB)
        h.flush()
        line_re = re.compile(r"export 'disk': requests=(\d+) read=(\d+) written=(\d+) "
                             r"errors=(\d+) latency_us\(p50<=\d+ p90<=\d+ p99<=\d+ max=\d+\)")
        # A request is counted just after its reply goes out, so the very last one may still
        # be missing from an immediate report: ask again until all three are in.
        deadline = time.monotonic() + 5
        lines = []
        while time.monotonic() < deadline:
            server.signal(signal.SIGUSR1)
            wanted = len(lines) + 1
            while len(line_re.findall(server.log_text())) < wanted and \
                    time.monotonic() < deadline:
                time.sleep(0.05)
            lines = line_re.findall(server.log_text())
            if lines and int(lines[-1][0]) >= 3:
                break
        self.assertTrue(lines, f"no stats line after SIGUSR1:\n{server.log_text()}")
        requests, read, written, errors = map(int, lines[-1])
        self.assertGreaterEqual(requests, 3)
        self.assertEqual(read, 2 * MiB)
        self.assertEqual(written, 1 * MiB)
        self.assertEqual(errors, 0)
        reports = len(lines)
        # SIGUSR1 does not stop the server.
        time.sleep(0.2)
        self.assertTrue(server.alive())
        self.assertEqual(h.pread(16, 0), b"\x11" * 16)
        h.shutdown()
        self.assert_clean_exit(server)
        lines = line_re.findall(server.log_text())
        self.assertEqual(len(lines), reports + 1, "--stats must print a line at exit too")
        self.assertGreaterEqual(int(lines[-1][1]), 2 * MiB + 16)

    def test_no_stats_without_flag(self):
        image = self.make_image("disk.img", 1 * MiB)
        server = self.server(image)
        run(["nbdinfo", "--size", server.uri()], timeout=20)
        self.assert_clean_exit(server)
        self.assertNotIn("requests=", server.log_text())


if __name__ == "__main__":
    si.main(required_binaries=["nbdinfo"], needs_nbd_module=True)
