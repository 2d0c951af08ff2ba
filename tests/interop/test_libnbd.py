#!/usr/bin/env python3
"""Protocol edge cases through libnbd's Python binding (the `nbd` module nbdsh uses):
out-of-range requests and their errno, zero-length and unaligned requests, the 32 MiB payload
limit, large reads from cached and uncached pages (sendfile and its fallback), 64+ requests in flight, multi-conn flush visibility, read-only exports, base:allocation
block status, structured reads of holes, option negotiation (LIST/INFO/GO) and the
EXPORT_NAME / simple-reply fallbacks. Strict mode is switched off where the point is to see
what the *server* answers rather than what libnbd refuses locally."""

import errno
import json
import os
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spindle_interop as si  # noqa: E402
from spindle_interop import MiB, KiB  # noqa: E402

try:
    import nbd
except ImportError:  # main() re-executes under /usr/bin/python3, or skips
    nbd = None


class LibnbdTest(si.InteropTest):

    def assert_nbd_error(self, expected_errnos, fn, *args, what=""):
        if isinstance(expected_errnos, int):
            expected_errnos = (expected_errnos,)
        try:
            fn(*args)
        except nbd.Error as e:
            self.assertIn(e.errnum, expected_errnos,
                          f"{what}: expected {[errno.errorcode.get(x, x) for x in expected_errnos]}, "
                          f"got {e.errno} ({e.string})")
            return e
        self.fail(f"{what}: succeeded, expected "
                  f"{[errno.errorcode.get(x, x) for x in expected_errnos]}")

    def wait_all(self, h, cookies, timeout=30):
        """Polls until every cookie completed; returns {cookie: None or nbd.Error}."""
        results = {}
        deadline = time.monotonic() + timeout
        pending = set(cookies)
        while pending:
            if time.monotonic() > deadline:
                self.fail(f"{len(pending)} of {len(cookies)} requests still in flight after "
                          f"{timeout} s")
            for cookie in list(pending):
                try:
                    done = h.aio_command_completed(cookie)
                except nbd.Error as e:
                    results[cookie] = e
                    pending.discard(cookie)
                    continue
                if done:
                    results[cookie] = None
                    pending.discard(cookie)
            if pending:
                h.poll(200)
        return results

    # ---- bounds ----------------------------------------------------------------------------

    def test_out_of_range_errors(self):
        image = self.make_image("disk.img", 1 * MiB)
        server = self.server(image)
        for structured in (True, False):
            h = nbd.NBD()
            self.handles.append(h)
            h.set_request_structured_replies(structured)
            h.connect_uri(server.uri())
            self.assertEqual(h.get_structured_replies_negotiated(), structured)
            size = h.get_size()
            self.assertEqual(size, 1 * MiB)
            # libnbd refuses these itself in strict mode...
            self.assert_nbd_error(errno.EINVAL, h.pread, 512, size - 256, what="strict pread")
            # ...so turn that off and let the server answer (spec: EINVAL for reads, trims and
            # caches past the end, ENOSPC for writes and write-zeroes).
            h.set_strict_mode(0)
            tag = f"structured={structured}"
            self.assert_nbd_error(errno.EINVAL, h.pread, 512, size - 256,
                                  what=f"pread across the end ({tag})")
            self.assert_nbd_error(errno.EINVAL, h.pread, 1, size + 4096,
                                  what=f"pread beyond the end ({tag})")
            self.assert_nbd_error(errno.EINVAL, h.pread, 4096, (1 << 63) - 1,
                                  what=f"pread at 2^63-1 ({tag})")
            self.assert_nbd_error(errno.ENOSPC, h.pwrite, b"a" * 512, size - 256,
                                  what=f"pwrite across the end ({tag})")
            # A big refused payload is drained, not parsed as requests.
            self.assert_nbd_error(errno.ENOSPC, h.pwrite, si.pattern(3, 2 * MiB), size - MiB,
                                  what=f"2 MiB pwrite across the end ({tag})")
            self.assert_nbd_error(errno.ENOSPC, h.zero, 512, size - 256,
                                  what=f"zero across the end ({tag})")
            self.assert_nbd_error(errno.EINVAL, h.trim, 512, size - 256,
                                  what=f"trim across the end ({tag})")
            self.assert_nbd_error(errno.EINVAL, h.cache, 512, size - 256,
                                  what=f"cache across the end ({tag})")
            # Unknown / misplaced command flags: EINVAL, and the connection survives.
            self.assert_nbd_error(errno.EINVAL, h.pread, 4096, 0, nbd.CMD_FLAG_NO_HOLE,
                                  what=f"pread with NO_HOLE ({tag})")
            self.assert_nbd_error(errno.EINVAL, h.pwrite, b"x", 0, nbd.CMD_FLAG_REQ_ONE,
                                  what=f"pwrite with REQ_ONE ({tag})")
            if not structured:
                self.assert_nbd_error(errno.EINVAL, h.pread, 4096, 0, nbd.CMD_FLAG_DF,
                                      what="DF without structured replies")
            # After all of that the connection still works, and nothing was written past the
            # boundary checks.
            self.assertEqual(h.pread(512, size - 512), bytes(512))
            h.shutdown()
        self.assertEqual(os.path.getsize(image), 1 * MiB, "image grew")
        self.assert_serving(server)

    def test_zero_length_requests(self):
        image = self.make_image("disk.img", 1 * MiB)
        server = self.server(image)
        h = self.connect(server.uri())
        self.assert_nbd_error(errno.EINVAL, h.pread, 0, 0, what="strict zero-length pread")
        h.set_strict_mode(0)
        size = h.get_size()
        self.assertEqual(h.pread(0, 0), b"")
        self.assertEqual(h.pread(0, size), b"", "zero-length read at the very end")
        h.pwrite(b"", 0)
        h.pwrite(b"", size)
        h.zero(0, 4096)
        h.trim(0, 4096)
        h.cache(0, 4096)
        h.flush()
        self.assertEqual(h.pread(4096, 0), bytes(4096))

    def test_unaligned_io_matches_model(self):
        self.unaligned_io_matches_model([])

    def test_unaligned_io_matches_model_threads(self):
        self.unaligned_io_matches_model(["--aio=threads"])

    def test_unaligned_io_matches_model_cache_none(self):
        # O_DIRECT underneath, while the export still advertises a 1-byte minimum block size.
        self.unaligned_io_matches_model(["--cache=none", "-f", "raw"], size=256 * KiB)

    def test_cache_none_keeps_unaligned_image_size(self):
        # With --cache=none a write to the last partial 512-byte block of a 1000-byte raw image
        # is a padded O_DIRECT read-modify-write: the file must still be 1000 bytes afterwards.
        image = self.make_image("odd.img", 1000)
        server = self.server(image, ["--cache=none", "-f", "raw"])
        h = self.connect(server.uri())
        self.assertEqual(h.get_size(), 1000)
        h.pwrite(b"x" * 5, 995)
        self.assertEqual(h.pread(6, 994), b"\0xxxxx")
        h.shutdown()
        server.stop()
        self.assertEqual(os.path.getsize(image), 1000, "the image file changed size")

    def test_cache_none_with_format_probe(self):
        # The format probe reads 4 bytes: through the O_DIRECT file's aligning backend.
        image = self.make_image("disk.img", 1 * MiB, [(0, b"abcd")])
        server = self.server(image, ["--cache=none"])
        self.assert_serving(server)

    def unaligned_io_matches_model(self, args, size=256 * KiB + 7):
        image = self.make_image("disk.img", size)
        server = self.server(image, args)
        h = self.connect(server.uri())
        self.assertEqual(h.get_size(), size)
        self.assertEqual(h.get_block_size(nbd.SIZE_MINIMUM), 1)
        model = bytearray(size)
        rng = __import__("random").Random(42)
        for i in range(200):
            offset = rng.randrange(0, size - 1)
            length = rng.randrange(1, min(size - offset, 9000) + 1)
            if i % 3 == 0:
                data = os.urandom(length)
                h.pwrite(data, offset)
                model[offset:offset + length] = data
            elif i % 3 == 1:
                h.zero(length, offset)
                model[offset:offset + length] = bytes(length)
            else:
                self.assertEqual(h.pread(length, offset), bytes(model[offset:offset + length]),
                                 f"read {length} at {offset}")
        self.assertEqual(h.pread(size, 0), bytes(model))
        # The last byte alone.
        h.pwrite(b"\x7f", size - 1)
        self.assertEqual(h.pread(1, size - 1), b"\x7f")
        h.flush()
        server.stop()
        model[size - 1] = 0x7F
        with open(image, "rb") as f:
            self.assertEqual(f.read(), bytes(model))

    def test_max_size_requests(self):
        image = self.make_image("disk.img", 40 * MiB)
        server = self.server(image)
        h = self.connect(server.uri())
        self.assertEqual(h.get_block_size(nbd.SIZE_MAXIMUM), 32 * MiB)
        big = si.pattern(7, 32 * MiB)
        h.pwrite(big, 4 * MiB)
        self.assertEqual(h.pread(32 * MiB, 4 * MiB), big)
        # 32 MiB + 1 read: rejected (EINVAL by the server; libnbd 1.14 sends it) and the
        # connection survives.
        h.set_strict_mode(0)
        self.assert_nbd_error((errno.EINVAL, errno.ERANGE), h.pread, 32 * MiB + 1, 0,
                              what="32 MiB + 1 read")
        self.assertEqual(h.pread(4096, 4 * MiB), big[:4096])
        # 32 MiB + 1 write: the server cannot drain it safely, so it may drop the connection
        # (like qemu-nbd) or answer EINVAL; either way nothing is written.
        self.assert_nbd_error((errno.EINVAL, errno.ERANGE, errno.ENOTCONN, errno.ESHUTDOWN,
                               errno.ECONNRESET, errno.EPIPE),
                              h.pwrite, b"\xee" * (32 * MiB + 1), 0, what="32 MiB + 1 write")
        h2 = self.connect(server.uri())
        self.assertEqual(h2.pread(32 * MiB, 4 * MiB), big, "data changed by a rejected write")
        self.assertEqual(h2.pread(4 * MiB, 0), bytes(4 * MiB))
        self.assert_serving(server)

    def test_large_reads_from_the_page_cache(self):
        # Reads of 64 KiB and more of a raw file export whose pages are cached are written from
        # a mapping of the file (local clients, the default), sent with sendfile()
        # (--zero-copy=always) or read into a pooled buffer (--zero-copy=never, and whenever
        # the pages are not cached): every way must give the same bytes, with structured and
        # simple replies, over Unix and TCP sockets, at odd offsets and up to the last byte,
        # after writes through the server, and many in flight.
        size = 8 * MiB + 4097
        content = bytearray(si.pattern(11, size))
        image = self.make_image("disk.img", size, [(0, bytes(content))])
        for tcp, zero_copy in ((False, "always"), (True, "always"), (False, "remote"),
                               (True, "never")):
            where = f"tcp={tcp}, --zero-copy={zero_copy}"
            server = self.server(image, ["-f", "raw", f"--zero-copy={zero_copy}"], tcp=tcp)
            structured = self.connect(server.uri())
            simple = nbd.NBD()
            self.handles.append(simple)
            simple.set_request_structured_replies(False)
            simple.connect_uri(server.uri())
            self.assertFalse(simple.get_structured_replies_negotiated())
            cases = [(0, MiB), (12345, 3 * MiB + 17), (size - MiB, MiB), (size - 65536, 65536),
                     (4 * MiB - 1, 2 * MiB)]
            for evicted in (False, True):
                if evicted:
                    fd = os.open(image, os.O_RDONLY)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    os.close(fd)
                for h in (structured, simple):
                    for offset, length in cases:
                        self.assertEqual(h.pread(length, offset),
                                         bytes(content[offset:offset + length]),
                                         f"read {length} at {offset} ({where}, "
                                         f"evicted={evicted})")
            # A write through the server, then a large read of the same range.
            data = si.pattern(12, 300 * KiB)
            structured.pwrite(data, 2 * MiB + 3)
            content[2 * MiB + 3:2 * MiB + 3 + len(data)] = data
            self.assertEqual(structured.pread(MiB, 2 * MiB), bytes(content[2 * MiB:3 * MiB]),
                             where)
            # 32 reads of 1 MiB in flight on one connection.
            buffers = [nbd.Buffer(MiB) for _ in range(32)]
            offsets = [(i * 769 * KiB + i) % (size - MiB) for i in range(32)]
            cookies = [structured.aio_pread(buffers[i], offsets[i]) for i in range(32)]
            results = self.wait_all(structured, cookies)
            self.assertEqual([r for r in results.values() if r is not None], [])
            for i in range(32):
                self.assertEqual(bytes(buffers[i].to_bytearray()),
                                 bytes(content[offsets[i]:offsets[i] + MiB]), f"read {i} ({where})")
            structured.shutdown()
            simple.shutdown()
            server.stop()
        # The image shrinks under the server (another process truncates it) while a mapping
        # of it is in use: reads may fail or see zeros, but the server must not die.
        server = self.server(image, ["-f", "raw"])
        h = self.connect(server.uri())
        self.assertEqual(h.pread(MiB, 0), bytes(content[:MiB]))
        os.truncate(image, 2 * MiB)
        for offset in (0, 4 * MiB, 8 * MiB - MiB):
            try:
                h.pread(MiB, offset)
            except nbd.Error:
                break  # an error reply, or the connection dropped: both acceptable
        self.assert_serving(server)
        proc = subprocess.run([si.SPINDLE_NBD, "-k", os.path.join(self.tmp, "x.sock"),
                               "--zero-copy=sometimes", image], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
        self.assertNotEqual(proc.returncode, 0, "--zero-copy=sometimes accepted")
        self.assertIn("zero-copy", proc.stderr.decode())

    # ---- concurrency ------------------------------------------------------------------------

    def test_64_requests_in_flight(self):
        image = self.make_image("disk.img", 16 * MiB)
        server = self.server(image)
        h = self.connect(server.uri())
        n, length = 64, 64 * KiB
        payloads = [si.pattern(i, length) for i in range(n)]
        buffers = [nbd.Buffer.from_bytearray(p) for p in payloads]
        cookies = [h.aio_pwrite(buffers[i], i * length) for i in range(n)]
        self.assertGreaterEqual(h.aio_in_flight(), 1)
        results = self.wait_all(h, cookies)
        self.assertEqual([r for r in results.values() if r is not None], [])
        # 64 reads in flight, each checked.
        read_buffers = [nbd.Buffer(length) for _ in range(n)]
        cookies = [h.aio_pread(read_buffers[i], i * length) for i in range(n)]
        results = self.wait_all(h, cookies)
        self.assertEqual([r for r in results.values() if r is not None], [])
        for i in range(n):
            self.assertEqual(bytes(read_buffers[i].to_bytearray()), payloads[i], f"block {i}")
        # Mixed and more than the server's per-connection window (64): 160 requests, reads of
        # the first half interleaved with FUA writes to the second half and flushes.
        cookies, checks = [], []
        for i in range(160):
            if i % 2 == 0:
                buf = nbd.Buffer(length)
                block = (i // 2) % n
                cookies.append(h.aio_pread(buf, block * length))
                checks.append((buf, payloads[block]))
            elif i % 10 == 9:
                cookies.append(h.aio_flush())
            else:
                data = si.pattern(1000 + i, 4 * KiB)
                cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(data),
                                            8 * MiB + i * 4 * KiB, flags=nbd.CMD_FLAG_FUA))
                checks.append((None, (8 * MiB + i * 4 * KiB, data)))
        results = self.wait_all(h, cookies)
        self.assertEqual([r for r in results.values() if r is not None], [])
        for buf, expected in checks:
            if buf is not None:
                self.assertEqual(bytes(buf.to_bytearray()), expected)
            else:
                offset, data = expected
                self.assertEqual(h.pread(len(data), offset), data)

    def test_multi_conn_flush_visibility(self):
        image = self.make_image("disk.img", 4 * MiB)
        server = self.server(image)
        a = self.connect(server.uri())
        b = self.connect(server.uri())
        c = self.connect(server.uri())
        for h in (a, b, c):
            self.assertTrue(h.can_multi_conn())
        # Prime B's view of the block (a caching server would now serve stale data).
        self.assertEqual(b.pread(4096, 0), bytes(4096))
        for round_ in range(20):
            data = si.pattern(round_, 4096)
            offset = (round_ % 8) * 4096
            a.pwrite(data, offset)
            a.flush()
            self.assertEqual(b.pread(4096, offset), data, f"round {round_}: B missed A's flush")
            # FUA write on C, visible on A.
            data2 = si.pattern(100 + round_, 4096)
            c.pwrite(data2, 1 * MiB + offset, nbd.CMD_FLAG_FUA)
            self.assertEqual(a.pread(4096, 1 * MiB + offset), data2)
            # Flush on B covers A's completed write (multi-conn: any flush covers all).
            data3 = si.pattern(200 + round_, 512)
            a.pwrite(data3, 2 * MiB + offset)
            b.flush()
            self.assertEqual(c.pread(512, 2 * MiB + offset), data3)

    # ---- read-only ---------------------------------------------------------------------------

    def test_read_only_export(self):
        image = self.make_image("disk.img", 1 * MiB, [(0, b"\x42" * 4096)])
        server = self.server(image, ["-r"])
        h = self.connect(server.uri())
        self.assertTrue(h.is_read_only())
        self.assertFalse(h.can_trim())
        self.assertFalse(h.can_zero())
        self.assertTrue(h.can_flush())
        self.assertEqual(h.pread(4096, 0), b"\x42" * 4096)
        # libnbd refuses locally in strict mode...
        self.assert_nbd_error(errno.EPERM, h.pwrite, b"x" * 512, 0, what="strict pwrite")
        # ...and the server refuses with EPERM when asked anyway.
        h.set_strict_mode(0)
        self.assert_nbd_error(errno.EPERM, h.pwrite, b"x" * 512, 0, what="pwrite on -r")
        self.assert_nbd_error(errno.EPERM, h.pwrite, b"x" * 512, 0, nbd.CMD_FLAG_FUA,
                              what="FUA pwrite on -r")
        self.assert_nbd_error((errno.EPERM, errno.EINVAL), h.zero, 512, 0, what="zero on -r")
        self.assert_nbd_error((errno.EPERM, errno.EINVAL), h.trim, 512, 0, what="trim on -r")
        # A refused WRITE's payload is drained: a 4 MiB one must not desynchronise the stream.
        self.assert_nbd_error(errno.EPERM, h.pwrite, b"y" * (4 * MiB), 0, what="4 MiB pwrite")
        self.assertEqual(h.pread(4096, 0), b"\x42" * 4096)
        h.flush()
        self.assertEqual(h.pread(4096, 0), b"\x42" * 4096)
        server.stop()
        with open(image, "rb") as f:
            self.assertEqual(f.read(4096), b"\x42" * 4096)

    def test_read_only_export_via_export_option(self):
        image = self.make_image("disk.img", 1 * MiB)
        other = self.make_image("other.img", 1 * MiB)
        server = self.server(image, [f"--export=name=ro,file={other},read-only=on"], name="rw")
        rw = self.connect(server.uri("rw"))
        ro = self.connect(server.uri("ro"))
        self.assertFalse(rw.is_read_only())
        self.assertTrue(ro.is_read_only())
        rw.pwrite(b"ok", 0)
        ro.set_strict_mode(0)
        self.assert_nbd_error(errno.EPERM, ro.pwrite, b"no", 0, what="pwrite on ro export")

    def test_every_qemu_nbd_cache_mode_serves_and_keeps_the_data(self):
        # qemu-nbd's five --cache modes: each serves writes, FUA writes, zeroes and flushes, and
        # the file holds the data once the server is gone (how each treats flushes and FUA is
        # the flush filter's unit test, FlushModeTest).
        for mode in ("none", "writeback", "writethrough", "directsync", "unsafe"):
            image = self.make_image(f"disk-{mode}.img", 1 * MiB)
            server = self.server(image, [f"--cache={mode}", "-f", "raw"])
            h = self.connect(server.uri())
            payload = os.urandom(8192)
            h.pwrite(payload, 0)
            h.pwrite(payload, 65536, nbd.CMD_FLAG_FUA)
            h.zero(4096, 8192)
            h.flush()
            self.assertEqual(h.pread(8192, 65536), payload, mode)
            h.shutdown()
            self.handles.remove(h)
            server.stop()
            with open(image, "rb") as f:
                data = f.read(1 * MiB)
            self.assertEqual(data[:4096], payload[:4096], mode)
            self.assertEqual(data[8192:12288], bytes(4096), mode)
            self.assertEqual(data[65536:65536 + 8192], payload, mode)
        bad = si.run([si.SPINDLE_NBD, "--cache=bogus", image], check=False)
        self.assertNotEqual(bad.returncode, 0)
        self.assertIn("bogus", bad.stderr.decode(errors="replace"))

    def test_writethrough_qcow2_export_writes_the_mapping_before_replying(self):
        # --cache=writethrough: a reply means the write and the L2 entry naming it are in the
        # file (and flushed), with no flush from the client. Checked from outside while the
        # client is still connected: qemu-img sees the cluster mapped and holding the data.
        image = self.path("wt.qcow2")
        si.run(["qemu-img", "create", "-q", "-f", "qcow2", image, "8M"])
        server = self.server(image, ["--cache=writethrough", "-f", "qcow2"])
        h = self.connect(server.uri())
        h.pwrite(b"\x5a" * 65536, 1 * MiB)
        mapped = json.loads(si.run(["qemu-img", "map", "-U", "--output=json", "-f", "qcow2",
                                    image]).stdout)
        data = [(e["start"], e["length"]) for e in mapped if e["data"]]
        self.assertIn((1 * MiB, 65536), data, mapped)
        read = si.run(["qemu-io", "-U", "-r", "-f", "qcow2", "-c", "read -P 0x5a 1M 64k", image])
        self.assertNotIn(b"Pattern verification failed", read.stdout + read.stderr)

    # ---- block status and sparse reads ------------------------------------------------------

    def collect_extents(self, h, size, flags=0, step=None):
        extents = []
        offset = 0
        while offset < size:
            got = []

            def callback(metacontext, off, entries, err):
                if metacontext == "base:allocation":
                    got.append((off, list(entries)))
                return 0
            h.block_status(min(size - offset, step or size - offset), offset, callback, flags)
            self.assertEqual(len(got), 1, "expected one base:allocation reply")
            off, entries = got[0]
            self.assertEqual(off, offset)
            self.assertTrue(entries and len(entries) % 2 == 0)
            for i in range(0, len(entries), 2):
                length, status = entries[i], entries[i + 1]
                self.assertGreater(length, 0)
                extents.append((offset, length, status))
                offset += length
        return extents

    def status_at(self, extents, offset):
        for o, l, s in extents:
            if o <= offset < o + l:
                return s
        raise AssertionError(f"no extent for {offset}")

    def test_block_status_base_allocation(self):
        size = 16 * MiB
        image = self.make_image("disk.img", size, [(1 * MiB, os.urandom(64 * KiB)),
                                                   (5 * MiB, os.urandom(4096))])
        server = self.server(image, ["--discard=unmap"])
        h = self.connect(server.uri(), meta_contexts=["base:allocation"])
        self.assertTrue(h.can_meta_context("base:allocation"))
        hole_zero = nbd.STATE_HOLE | nbd.STATE_ZERO
        extents = self.collect_extents(h, size)
        self.assertEqual(extents[-1][0] + extents[-1][1], size)
        for offset in (0, 512 * KiB, 2 * MiB, 6 * MiB, size - 1):
            self.assertEqual(self.status_at(extents, offset), hole_zero, f"{offset}: {extents}")
        for offset in (1 * MiB, 1 * MiB + 64 * KiB - 1, 5 * MiB):
            self.assertEqual(self.status_at(extents, offset), 0, f"{offset}: {extents}")
        # Neighbouring extents differ (the server merges equal ones).
        for (_, _, s1), (_, _, s2) in zip(extents, extents[1:]):
            self.assertNotEqual(s1, s2, f"unmerged extents: {extents}")
        # REQ_ONE: exactly one extent, not longer than asked.
        got = []
        h.block_status(4 * MiB, 0, lambda ctx, off, entries, err: got.append(list(entries)) or 0,
                       nbd.CMD_FLAG_REQ_ONE)
        self.assertEqual(len(got[0]), 2, f"REQ_ONE returned {got}")
        self.assertEqual((got[0][0], got[0][1]), (1 * MiB, hole_zero))
        # Small steps (count as a hint) still tile the export.
        stepped = self.collect_extents(h, 2 * MiB, step=300 * KiB)
        self.assertEqual(self.status_at(stepped, 1 * MiB), 0)
        self.assertEqual(self.status_at(stepped, 0), hole_zero)
        # Writing makes a range data; trimming (--discard=unmap) makes it a hole again.
        h.pwrite(os.urandom(64 * KiB), 8 * MiB)
        extents = self.collect_extents(h, size)
        self.assertEqual(self.status_at(extents, 8 * MiB), 0)
        h.trim(64 * KiB, 8 * MiB)
        h.trim(64 * KiB, 1 * MiB)
        extents = self.collect_extents(h, size)
        self.assertEqual(self.status_at(extents, 8 * MiB), hole_zero, f"{extents}")
        self.assertEqual(self.status_at(extents, 1 * MiB), hole_zero, f"{extents}")
        self.assertEqual(h.pread(64 * KiB, 8 * MiB), bytes(64 * KiB))
        # Block status past the end: EINVAL from the server.
        h.set_strict_mode(0)
        self.assert_nbd_error(errno.EINVAL, h.block_status, 4096, size, lambda *a: 0,
                              what="block status past the end")
        with open(image, "rb") as f:
            f.seek(5 * MiB)
            self.assertEqual(h.pread(4, 5 * MiB), f.read(4))

    def test_block_status_needs_meta_context(self):
        image = self.make_image("disk.img", 1 * MiB)
        server = self.server(image)
        h = self.connect(server.uri())
        self.assertFalse(h.can_meta_context("base:allocation"))
        h.set_strict_mode(0)
        self.assert_nbd_error(errno.EINVAL, h.block_status, 4096, 0, lambda *a: 0,
                              what="block status without a negotiated context")
        self.assertEqual(h.pread(4096, 0), bytes(4096))

    def test_structured_read_of_hole_and_df(self):
        image = self.make_image("disk.img", 4 * MiB, [(1 * MiB, b"\x31" * (128 * KiB))])
        server = self.server(image)
        h = self.connect(server.uri())
        self.assertTrue(h.can_df())
        chunks = []

        def chunk(subbuf, offset, status, err):
            chunks.append((offset, len(subbuf), status, bytes(subbuf[:16])))
            return 0
        data = h.pread_structured(256 * KiB, 2 * MiB, chunk)
        self.assertEqual(data, bytes(256 * KiB))
        self.assertTrue(all(c[2] in (nbd.READ_HOLE, nbd.READ_DATA) for c in chunks), chunks)
        self.assertEqual(sum(c[1] for c in chunks), 256 * KiB, chunks)
        chunks.clear()
        data = h.pread_structured(128 * KiB, 1 * MiB, chunk, nbd.CMD_FLAG_DF)
        self.assertEqual(data, b"\x31" * (128 * KiB))
        self.assertEqual(len(chunks), 1, f"DF read must come in one chunk: {chunks}")
        self.assertEqual(chunks[0][:3], (1 * MiB, 128 * KiB, nbd.READ_DATA))

    # ---- negotiation -------------------------------------------------------------------------

    def test_option_negotiation(self):
        a = self.make_image("a.img", 1 * MiB)
        b = self.make_image("b.img", 2 * MiB)
        server = self.server(a, ["-D", "first", f"--export=name=b,file={b},description=second"],
                             name="a")
        h = nbd.NBD()
        self.handles.append(h)
        h.set_opt_mode(True)
        h.connect_uri(server.uri(""))
        listed = []
        count = h.opt_list(lambda name, description: listed.append((name, description)) or 0)
        self.assertEqual(count, 2)
        self.assertEqual(listed, [("a", "first"), ("b", "second")])
        h.set_export_name("b")
        h.set_full_info(True)
        h.opt_info()
        self.assertEqual(h.get_size(), 2 * MiB)
        self.assertEqual(h.get_export_description(), "second")
        self.assertEqual(h.get_canonical_export_name(), "b")
        h.set_export_name("missing")
        # NBD_REP_ERR_UNKNOWN, which libnbd reports as ENOENT; the handle stays in option mode.
        self.assert_nbd_error(errno.ENOENT, h.opt_info, what="INFO unknown")
        contexts = []
        h.set_export_name("a")
        h.opt_list_meta_context(lambda name: contexts.append(name) or 0)
        self.assertIn("base:allocation", contexts)
        h.opt_go()
        self.assertEqual(h.get_size(), 1 * MiB)
        self.assertEqual(h.pread(16, 0), bytes(16))
        # Abort path: a second handle gives up during negotiation; the server stays healthy.
        h2 = nbd.NBD()
        self.handles.append(h2)
        h2.set_opt_mode(True)
        h2.connect_uri(server.uri(""))
        h2.opt_abort()
        self.assert_serving(server, "a")

    def test_stdio_mode_and_socket_activation(self):
        image = self.make_image("disk.img", 2 * MiB)
        # -s: one client on stdin/stdout (libnbd's nbd_connect_command, like nbdkit -s).
        h = nbd.NBD()
        self.handles.append(h)
        h.connect_command([si.SPINDLE_NBD, "-s", "-f", "raw", image])
        self.assertEqual(h.get_size(), 2 * MiB)
        data = os.urandom(64 * KiB)
        h.pwrite(data, 1 * MiB, nbd.CMD_FLAG_FUA)
        self.assertEqual(h.pread(64 * KiB, 1 * MiB), data)
        h.shutdown()
        # Socket activation (LISTEN_PID/LISTEN_FDS), as nbdinfo '-- [ ... ]' uses.
        h2 = nbd.NBD()
        self.handles.append(h2)
        h2.connect_systemd_socket_activation([si.SPINDLE_NBD, "-r", image])
        self.assertTrue(h2.is_read_only())
        self.assertEqual(h2.pread(64 * KiB, 1 * MiB), data)
        h2.shutdown()
        self.handles.clear()
        del h, h2
        self.assertEqual(self.kill_strays(), {}, "spawned spindle-nbd did not exit")
        with open(image, "rb") as f:
            f.seek(1 * MiB)
            self.assertEqual(f.read(64 * KiB), data)

    def test_export_name_and_simple_reply_fallbacks(self):
        image = self.make_image("disk.img", 3 * MiB, [(0, b"\x55" * 4096)])
        server = self.server(image, name="disk")
        # Plain newstyle (no FIXED_NEWSTYLE): libnbd must use NBD_OPT_EXPORT_NAME.
        h = nbd.NBD()
        self.handles.append(h)
        h.set_handshake_flags(0)
        h.connect_uri(server.uri())
        self.assertEqual(h.get_protocol(), "newstyle")
        self.assertEqual(h.get_size(), 3 * MiB)
        self.assertFalse(h.get_structured_replies_negotiated())
        self.assertEqual(h.pread(4096, 0), b"\x55" * 4096)
        h.pwrite(b"\x66" * 4096, 4096)
        self.assertEqual(h.pread(8192, 0), b"\x55" * 4096 + b"\x66" * 4096)
        # Fixed newstyle without NO_ZEROES, no structured replies.
        h2 = nbd.NBD()
        self.handles.append(h2)
        h2.set_handshake_flags(nbd.HANDSHAKE_FLAG_FIXED_NEWSTYLE)
        h2.set_request_structured_replies(False)
        h2.connect_uri(server.uri())
        self.assertEqual(h2.get_protocol(), "newstyle-fixed")
        self.assertFalse(h2.can_df())
        self.assertEqual(h2.pread(8192, 0), b"\x55" * 4096 + b"\x66" * 4096)
        # Unknown export over EXPORT_NAME: the server can only hang up.
        h3 = nbd.NBD()
        self.handles.append(h3)
        h3.set_handshake_flags(0)
        with self.assertRaises(nbd.Error):
            h3.connect_uri(server.uri("nosuch"))
        self.assert_serving(server)


if __name__ == "__main__":
    si.main(required_binaries=["nbdinfo"], needs_nbd_module=True)
