#!/usr/bin/env python3
"""Hostile clients speaking the NBD wire format by hand over raw sockets. One persistent (-t)
spindle-nbd with a single IoThread serves the whole class, so every misbehaving connection
shares its event loop with the well-behaved libnbd client that checks the server during and
after each attack; the last test checks that the server is still alive, still serves nbdinfo,
and holds no more file descriptors than it started with. Handshake-timeout and connection-limit
cases start their own servers. See shared/reference/nbd.md §1.16 and §5.2."""

import os
import select
import socket
import struct
import sys
import tempfile
import shutil
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spindle_interop as si  # noqa: E402
from spindle_interop import (MiB, KiB, IHAVEOPT, OPT_ABORT, OPT_EXPORT_NAME, OPT_GO,  # noqa
                             OPT_INFO, OPT_LIST, REP_ACK, REP_ERR_INVALID, REP_ERR_TOO_BIG,
                             REP_ERR_UNKNOWN, REP_ERR_UNSUP, CMD_READ, CMD_WRITE, CMD_DISC,
                             CMD_FLUSH, recv_exact, wait_closed, read_greeting, send_option,
                             read_option_reply, info_payload, raw_handshake, request,
                             read_simple_reply)

try:
    import nbd  # noqa: F401  (assert_serving uses it for a write/read-back check)
except ImportError:
    nbd = None

# A disconnect the server chooses must come well before the (default 10 s) handshake timeout.
PROMPT_CLOSE_S = 3.0


class _Holder:
    """Stands in for a test case when the class-wide server is started."""


def safe_send(sock, data):
    """sendall that tolerates the server having hung up already."""
    try:
        sock.sendall(data)
        return True
    except (BrokenPipeError, ConnectionResetError):
        return False
    except socket.timeout:
        return False


class HostileTest(si.InteropTest):

    @classmethod
    def setUpClass(cls):
        cls.holder = _Holder()
        cls.holder.tmp = tempfile.mkdtemp(prefix="spindle-hostile-")
        cls.holder.servers = []
        # Class cleanups run even when setUpClass fails (tearDownClass would not).
        cls.addClassCleanup(shutil.rmtree, cls.holder.tmp, ignore_errors=True)
        cls.addClassCleanup(lambda: [s.kill() for s in cls.holder.servers])
        image = os.path.join(cls.holder.tmp, "shared.img")
        with open(image, "wb") as f:
            f.truncate(64 * MiB)
        cls.shared = si.Server(cls.holder, image, ["--iothreads", "1"], persistent=True)
        # Warm up (first connection, io_uring setup...) before taking the fd/RSS baseline.
        for _ in range(3):
            si.run(["nbdinfo", "--size", cls.shared.uri()], timeout=20)
        time.sleep(0.2)
        cls.baseline_fds = cls.shared.fds()
        cls.baseline_threads = cls.shared.thread_count()

    def setUp(self):
        super().setUp()
        self.assertTrue(self.shared.alive(),
                        f"shared spindle-nbd died earlier:\n{self.shared.log_text()[-3000:]}")
        self.sockets = []

    def tearDown(self):
        for s in self.sockets:
            try:
                s.close()
            except OSError:
                pass
        if not self.shared.alive():
            si.log("--- shared spindle-nbd died; its log:\n" + self.shared.log_text()[-6000:])

    def raw(self, server=None, timeout=5.0):
        s = (server or self.shared).connect_raw(timeout)
        self.sockets.append(s)
        return s

    def healthy(self, server=None):
        self.assert_serving(server or self.shared)

    # ---- garbage -------------------------------------------------------------------------------

    def test_garbage_instead_of_client_flags(self):
        s = self.raw()
        read_greeting(s)
        safe_send(s, b"\xff" + os.urandom(64 * KiB))
        self.healthy()  # while the garbage sits in the socket
        elapsed = wait_closed(s, PROMPT_CLOSE_S)
        self.assertIsNotNone(elapsed, "server kept a connection with invalid client flags open")
        self.healthy()

    def test_unknown_client_flag_bit(self):
        # Spec: the server MUST close if the client sets a flag it does not know.
        s = self.raw()
        read_greeting(s)
        s.sendall(struct.pack(">I", 1 | (1 << 7)))
        self.assertIsNotNone(wait_closed(s, PROMPT_CLOSE_S))
        self.healthy()

    def test_garbage_instead_of_option(self):
        s = self.raw()
        read_greeting(s)
        s.sendall(struct.pack(">I", 3))
        safe_send(s, os.urandom(16) + os.urandom(64 * KiB))  # no IHAVEOPT: framing lost
        self.healthy()
        self.assertIsNotNone(wait_closed(s, PROMPT_CLOSE_S), "bad option magic: not closed")
        self.healthy()

    def test_garbage_instead_of_request(self):
        s = self.raw()
        raw_handshake(s, structured=True)
        safe_send(s, b"\x00" * 4 + os.urandom(64 * KiB))  # bad request magic
        self.healthy()
        self.assertIsNotNone(wait_closed(s, PROMPT_CLOSE_S), "bad request magic: not closed")
        self.healthy()

    def test_unknown_and_malformed_options_keep_framing(self):
        s = self.raw()
        read_greeting(s)
        s.sendall(struct.pack(">I", 3))
        send_option(s, 0x7654321, b"abcd")
        option, reply_type, _ = read_option_reply(s)
        self.assertEqual((option, reply_type), (0x7654321, REP_ERR_UNSUP))
        send_option(s, OPT_LIST, b"junk")
        option, reply_type, _ = read_option_reply(s)
        self.assertEqual((option, reply_type), (OPT_LIST, REP_ERR_INVALID))
        # GO whose name length runs past the data.
        send_option(s, OPT_GO, struct.pack(">I", 100) + b"short")
        option, reply_type, _ = read_option_reply(s)
        self.assertEqual(option, OPT_GO)
        self.assertEqual(reply_type, REP_ERR_INVALID)
        # GO with an info-request count that does not match the bytes.
        send_option(s, OPT_GO, struct.pack(">I", 0) + struct.pack(">H", 5) + b"\x00\x01")
        _, reply_type, _ = read_option_reply(s)
        self.assertEqual(reply_type, REP_ERR_INVALID)
        # Name with an embedded NUL.
        send_option(s, OPT_INFO, info_payload(b"a\x00b"))
        _, reply_type, _ = read_option_reply(s)
        self.assertEqual(reply_type, REP_ERR_INVALID)
        # Still negotiating fine: LIST works, then ABORT is acknowledged.
        send_option(s, OPT_LIST)
        while True:
            _, reply_type, _ = read_option_reply(s)
            if reply_type == REP_ACK:
                break
        send_option(s, OPT_ABORT)
        option, reply_type, _ = read_option_reply(s)
        self.assertEqual((option, reply_type), (OPT_ABORT, REP_ACK))
        self.assertIsNotNone(wait_closed(s, PROMPT_CLOSE_S))
        self.healthy()

    # ---- truncation --------------------------------------------------------------------------

    def test_truncated_request_header(self):
        s = self.raw()
        raw_handshake(s, structured=True)
        s.sendall(request(CMD_READ, 1, 0, 4096)[:10])
        self.healthy()  # while the half header is pending
        s.close()
        self.healthy()
        # Same for a truncated option header during the handshake.
        s = self.raw()
        read_greeting(s)
        s.sendall(struct.pack(">I", 3) + struct.pack(">QI", IHAVEOPT, OPT_GO))
        self.healthy()
        s.close()
        self.healthy()

    def test_write_header_promising_32mib(self):
        s = self.raw()
        raw_handshake(s, structured=True)
        s.sendall(request(CMD_WRITE, 7, 0, 32 * MiB) + b"\xab" * 100)
        self.healthy()  # the server is waiting for 32 MiB that will never come
        s.close()
        self.healthy()
        # Nothing was written from the partial payload.
        h = self.connect(self.shared.uri())
        self.assertNotEqual(h.pread(100, 0), b"\xab" * 100)

    def test_write_beyond_32mib_is_dropped(self):
        s = self.raw()
        raw_handshake(s, structured=True)
        s.sendall(request(CMD_WRITE, 8, 0, 32 * MiB + 1))
        safe_send(s, b"\xcd" * 4096)
        self.assertIsNotNone(wait_closed(s, PROMPT_CLOSE_S),
                             "a WRITE over the 32 MiB maximum must be dropped at once")
        self.healthy()

    # ---- names and lengths -------------------------------------------------------------------

    def test_5000_byte_export_name_in_go(self):
        for option in (OPT_GO, OPT_INFO):
            s = self.raw()
            read_greeting(s)
            s.sendall(struct.pack(">I", 3))
            send_option(s, option, info_payload(b"n" * 5000))
            s.settimeout(PROMPT_CLOSE_S)
            try:
                reply_option, reply_type, _ = read_option_reply(s)
            except (AssertionError, ConnectionResetError):
                reply_type = None  # disconnect: allowed
            if reply_type is not None:
                self.assertEqual(reply_option, option)
                self.assertIn(reply_type, (REP_ERR_INVALID, REP_ERR_TOO_BIG, REP_ERR_UNKNOWN),
                              f"{reply_type:#x}")
                # Framing intact: ABORT is still understood.
                send_option(s, OPT_ABORT)
                self.assertEqual(read_option_reply(s)[:2], (OPT_ABORT, REP_ACK))
            s.close()
            self.healthy()
        # A 4096-byte name is legal: it is just unknown.
        s = self.raw()
        read_greeting(s)
        s.sendall(struct.pack(">I", 3))
        send_option(s, OPT_GO, info_payload(b"m" * 4096))
        self.assertEqual(read_option_reply(s)[1], REP_ERR_UNKNOWN)
        s.close()

    def test_5000_byte_export_name_in_export_name(self):
        s = self.raw()
        read_greeting(s)
        s.sendall(struct.pack(">I", 3))
        send_option(s, OPT_EXPORT_NAME, b"e" * 5000)
        # EXPORT_NAME cannot carry an error: the only answer is to hang up.
        self.assertIsNotNone(wait_closed(s, PROMPT_CLOSE_S))
        self.healthy()

    def test_huge_option_length(self):
        rss_before = self.shared.rss_kib()
        for length in (64 * MiB, 0xFFFFFFFF, 32 * MiB + 1):
            s = self.raw()
            read_greeting(s)
            s.sendall(struct.pack(">I", 3))
            s.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, length) + b"\x00" * 64)
            elapsed = wait_closed(s, PROMPT_CLOSE_S)
            self.assertIsNotNone(elapsed, f"option length {length:#x}: not disconnected")
            self.healthy()
        grown = self.shared.rss_kib() - rss_before
        if not si.sanitized_binary():
            self.assertLess(grown, 16 * 1024, f"RSS grew by {grown} KiB: buffer allocated for "
                                              "the option payload?")

    # ---- stalled clients ---------------------------------------------------------------------

    def test_client_that_never_reads_replies(self):
        # 64 x 1 MiB reads whose replies are never read: the server's sends block on this
        # connection; the other clients on the same (only) IoThread must not notice.
        s = self.raw()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw_handshake(s, structured=True)
        s.sendall(b"".join(request(CMD_READ, 100 + i, i * MiB, 1 * MiB) for i in range(64)))
        time.sleep(0.3)
        self.healthy()
        h = self.connect(self.shared.uri())
        data = os.urandom(1 * MiB)
        h.pwrite(data, 40 * MiB)
        self.assertEqual(h.pread(1 * MiB, 40 * MiB), data)
        s.close()
        self.healthy()

    def test_many_idle_connections(self):
        # 50 clients stuck in the handshake at once (below the 100-connection default limit).
        held = []
        for i in range(50):
            s = self.raw()
            if i % 2:
                read_greeting(s)
            held.append(s)
        self.healthy()
        for s in held:
            s.close()
        self.healthy()

    def test_reset_connections(self):
        # Abortive closes (RST) at several points.
        for stage in range(3):
            s = self.raw()
            if stage >= 1:
                read_greeting(s)
            if stage >= 2:
                raw_handshake_rest(s)
                s.sendall(request(CMD_READ, 1, 0, 1 * MiB))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        self.healthy()

    def test_data_after_disconnect_command(self):
        s = self.raw()
        raw_handshake(s)
        s.sendall(request(CMD_DISC, 1, 0, 0) + os.urandom(4096))
        self.assertIsNotNone(wait_closed(s, PROMPT_CLOSE_S), "NBD_CMD_DISC did not close")
        self.healthy()

    # ---- leaks ---------------------------------------------------------------------------------

    def test_connect_disconnect_cycles(self):
        server = self.shared
        for i in range(100):  # warm-up so the allocator reaches a steady state
            one_cycle(server, i)
        settle_fds(server, len(self.baseline_fds) + 2)
        fds_before = server.fd_count()
        rss_before = server.rss_kib()
        started = time.monotonic()
        for i in range(1000):
            one_cycle(server, i)
        cycles_s = time.monotonic() - started
        fds_after = settle_fds(server, fds_before + 2)
        rss_after = server.rss_kib()
        si.log(f"1000 cycles in {cycles_s:.1f} s; fds {fds_before} -> {fds_after}; "
               f"RSS {rss_before} -> {rss_after} KiB")
        self.assertLessEqual(fds_after, fds_before + 2,
                             f"fd leak: {fds_before} -> {fds_after}\n{server.fds()}")
        if si.sanitized_binary():
            si.log("ASan build: RSS growth not checked (quarantine); LSan checks leaks at exit")
        else:
            self.assertLess(rss_after - rss_before, 4 * 1024,
                            f"RSS grew {rss_after - rss_before} KiB over 1000 connections")
        self.healthy()

    def test_zz_server_survived_everything(self):
        # Runs last (unittest sorts by name): after every attack above, the shared server is
        # alive, serves nbdinfo, and is back to its starting fds and threads.
        self.assertTrue(self.shared.alive())
        doc = si.nbdinfo_json(self.shared.uri())
        self.assertEqual(doc["exports"][0]["export-size"], 64 * MiB)
        self.healthy()
        fds = settle_fds(self.shared, len(self.baseline_fds) + 2)
        self.assertLessEqual(fds, len(self.baseline_fds) + 2,
                             f"fds: {self.baseline_fds} -> {self.shared.fds()}")
        # Large writes run on the thread pool, whose workers exit after 10 s without work.
        self.assertEqual(settle_threads(self.shared, self.baseline_threads),
                         self.baseline_threads)
        # And it still shuts down cleanly (under ASan this includes LeakSanitizer's check).
        rc, elapsed, killed = self.shared.stop(timeout=5)
        self.assertFalse(killed, "shared server ignored SIGTERM after the attacks")
        self.assertEqual(rc, 0, f"exit status {rc}:\n{self.shared.log_text()[-3000:]}")


class OwnServerHostileTest(si.InteropTest):
    """Attacks that need a server configured for them."""

    def test_handshake_timeout(self):
        image = self.make_image("disk.img", 1 * MiB)
        server = self.server(image, ["--handshake-timeout", "1", "--iothreads", "1"])
        sockets = []
        try:
            started = time.monotonic()
            silent = server.connect_raw()
            sockets.append(silent)                      # connects, never reads or writes
            after_flags = server.connect_raw()
            sockets.append(after_flags)
            read_greeting(after_flags)
            after_flags.sendall(struct.pack(">I", 3))   # then stops
            dribble = server.connect_raw()
            sockets.append(dribble)
            read_greeting(dribble)
            dribble.sendall(struct.pack(">I", 3))
            negotiated = server.connect_raw()
            sockets.append(negotiated)
            raw_handshake(negotiated)                   # finishes in time: must stay open
            # Watch all three at once; meanwhile the slowloris sends one byte of an option every
            # 0.2 s, which must not extend its deadline.
            option = struct.pack(">QII", IHAVEOPT, OPT_LIST, 0)
            watched = {silent: "silent", after_flags: "after_flags", dribble: "dribble"}
            closed_at = {}
            next_byte, next_tick = 0, started + 0.2
            while len(closed_at) < 3 and time.monotonic() < started + 3.5:
                now = time.monotonic()
                if now >= next_tick:
                    if "dribble" not in closed_at and next_byte < len(option):
                        safe_send(dribble, option[next_byte:next_byte + 1])
                        next_byte += 1
                    next_tick += 0.2
                open_socks = [sk for sk, name in watched.items() if name not in closed_at]
                readable, _, _ = select.select(open_socks, [], [],
                                               max(0.0, min(next_tick, started + 3.5) - now))
                for sk in readable:
                    try:
                        data = sk.recv(4096)
                    except (ConnectionResetError, BrokenPipeError):
                        data = b""
                    if not data:
                        closed_at[watched[sk]] = time.monotonic() - started
            for name in watched.values():
                self.assertIn(name, closed_at, f"{name}: still open 3.5 s after connecting "
                                               f"(--handshake-timeout 1)")
                self.assertGreater(closed_at[name], 0.7,
                                   f"{name}: closed too early ({closed_at[name]:.2f} s)")
            si.log("handshake timeout closes at: " +
                   ", ".join(f"{k} {v:.2f} s" for k, v in sorted(closed_at.items())))
            # The negotiated connection is not subject to the handshake deadline.
            negotiated.sendall(request(CMD_READ, 5, 0, 512))
            negotiated.settimeout(5)
            error, cookie, data = read_simple_reply(negotiated, 512)
            self.assertEqual((error, cookie, len(data)), (0, 5, 512))
            self.assert_serving(server)
        finally:
            for s in sockets:
                s.close()

    def test_option_flood_without_reading_replies(self):
        # A client that pipelines options but never reads the replies blocks the server's
        # handshake sends; the handshake deadline must still cut it off, and other clients on
        # the same IoThread must not notice.
        image = self.make_image("disk.img", 1 * MiB)
        server = self.server(image, ["--handshake-timeout", "1", "--iothreads", "1"])
        s = server.connect_raw()
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            started = time.monotonic()
            read_greeting(s)
            s.sendall(struct.pack(">I", 3))
            s.settimeout(0.5)
            sent = 0
            try:
                while time.monotonic() - started < 3:
                    s.sendall(struct.pack(">QII", IHAVEOPT, OPT_LIST, 0) * 64)
                    sent += 64
            except (socket.timeout, BrokenPipeError, ConnectionResetError):
                pass
            self.assert_serving(server)
            closed = wait_closed(s, max(0.1, started + 4 - time.monotonic()))
            self.assertIsNotNone(closed, f"option flooder ({sent} options) still connected "
                                         "4 s after connecting with --handshake-timeout 1")
        finally:
            s.close()
        self.assert_serving(server)

    def test_connection_limit(self):
        image = self.make_image("disk.img", 1 * MiB)
        server = self.server(image, ["-e", "2"])
        a = server.connect_raw()
        b = server.connect_raw()
        try:
            raw_handshake(a)
            raw_handshake(b)
            c = server.connect_raw()
            try:
                # Over the limit, with both served: dropped without a greeting.
                c.settimeout(PROMPT_CLOSE_S)
                self.assertEqual(recv_exact(c, 18), b"", "third connection was served")
            except ConnectionResetError:
                pass
            finally:
                c.close()
        finally:
            a.close()
            b.close()
        # Slots are released: a normal client gets in again.
        deadline = time.monotonic() + 5
        while True:
            proc = si.run(["nbdinfo", "--size", server.uri()], timeout=20, check=False)
            if proc.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assert_serving(server)

    def test_connection_limit_replaces_the_oldest_handshake(self):
        # At the limit, a new connection replaces the oldest one still in its handshake, so
        # connections that never authenticate cannot keep real clients out.
        image = self.make_image("disk.img", 1 * MiB)
        server = self.server(image, ["-e", "2"])
        served = server.connect_raw()
        oldest = server.connect_raw()
        try:
            raw_handshake(served)
            read_greeting(oldest)                         # and then nothing
            newcomer = server.connect_raw()
            try:
                raw_handshake(newcomer)                   # gets in
                self.assertIsNotNone(wait_closed(oldest, PROMPT_CLOSE_S),
                                     "the oldest unfinished handshake was not replaced")
                for sock, cookie in ((served, 1), (newcomer, 2)):
                    sock.sendall(request(CMD_READ, cookie, 0, 512))
                    self.assertEqual(read_simple_reply(sock, 512)[:2], (0, cookie))
            finally:
                newcomer.close()
        finally:
            served.close()
            oldest.close()
        self.assert_serving(server)


def raw_handshake_rest(sock):
    """raw_handshake() for a socket whose greeting was already read."""
    sock.sendall(struct.pack(">I", 3))
    send_option(sock, OPT_GO, info_payload(""))
    while True:
        _, reply_type, _ = read_option_reply(sock)
        if reply_type == REP_ACK:
            return
        if reply_type & (1 << 31):
            raise AssertionError(f"GO failed: {reply_type:#x}")


def one_cycle(server, i):
    """One short-lived connection that stops at stage i % 8."""
    stage = i % 8
    s = server.connect_raw(timeout=5)
    try:
        if stage == 0:
            return
        read_greeting(s)
        if stage == 1:
            return
        if stage == 2:
            s.sendall(struct.pack(">I", 3))
            return
        if stage == 3:
            s.sendall(struct.pack(">I", 3) + struct.pack(">QI", IHAVEOPT, OPT_GO))
            return
        if stage == 4:
            s.sendall(struct.pack(">I", 3))
            send_option(s, OPT_ABORT)
            read_option_reply(s)
            return
        raw_handshake_rest(s)
        if stage == 5:
            return
        if stage == 6:
            s.sendall(request(CMD_READ, 1, 4096, 4096))  # reply never read
            return
        s.sendall(request(CMD_FLUSH, 2, 0, 0))
        error, cookie, _ = read_simple_reply(s)
        if (error, cookie) != (0, 2):
            raise AssertionError(f"FLUSH reply {error} {cookie}")
        s.sendall(request(CMD_DISC, 3, 0, 0))
    finally:
        s.close()


def settle(measure, target, timeout):
    """Polls measure() until it is at most `target` or `timeout` passes; returns its value."""
    deadline = time.monotonic() + timeout
    count = measure()
    while count > target and time.monotonic() < deadline:
        time.sleep(0.05)
        count = measure()
    return count


def settle_fds(server, target, timeout=5.0):
    """Waits for the server to close connections it is tearing down; returns the fd count."""
    return settle(server.fd_count, target, timeout)


def settle_threads(server, target, timeout=20.0):
    """Waits for idle thread-pool workers to exit; returns the thread count."""
    return settle(server.thread_count, target, timeout)


if __name__ == "__main__":
    si.main(required_binaries=["nbdinfo"], needs_nbd_module=True)
