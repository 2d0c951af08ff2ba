#!/usr/bin/env python3
"""Bulk copies through spindle-nbd: nbdcopy both ways with 4 connections (multi-conn), and
qemu-img convert / compare / map / info over nbd+unix:// and nbd://127.0.0.1:PORT."""

import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spindle_interop as si  # noqa: E402
from spindle_interop import MiB, KiB, run  # noqa: E402


def sparse_source(test, name, size=24 * MiB):
    """Random data with holes and zero runs: [0,3M) data, [3M,8M) hole, [8M,8M+64K) zeros
    written as data, then scattered 4K/1M pieces, tail data."""
    chunks = [(0, os.urandom(3 * MiB)), (8 * MiB, bytes(64 * KiB)),
              (10 * MiB + 512, os.urandom(4096 - 512)), (13 * MiB, os.urandom(1 * MiB)),
              (size - 1 * MiB, os.urandom(1 * MiB))]
    return test.make_image(name, size, chunks)


class CopyTest(si.InteropTest):

    def assert_same_file(self, a, b):
        self.assertEqual(os.path.getsize(a), os.path.getsize(b), f"{a} and {b} differ in size")
        proc = run(["cmp", a, b], timeout=60, check=False)
        self.assertEqual(proc.returncode, 0, f"cmp {a} {b}: {proc.stdout!r} {proc.stderr!r}")

    def assert_connections(self, verbose_log, side, count):
        """nbdcopy -v really used `count` connections to the server (multi-conn advertised)."""
        text = verbose_log.decode("utf-8", "replace")
        self.assertIn(f"connections={count}", text, "nbdcopy did not use multi-conn")
        opened = set(re.findall(rf"\b({side}\d+): nbd_connect_uri: enter", text))
        self.assertEqual(len(opened), count, f"nbdcopy opened {sorted(opened)}")

    def nbdcopy_roundtrip(self, tcp):
        source = sparse_source(self, "source.img")
        target = self.make_image("served.img", os.path.getsize(source))
        server = self.server(target, ["-f", "raw"], tcp=tcp)
        uri = server.uri()
        # Upload: local file -> NBD, 4 connections, 4 requests in flight each, flush at the end.
        # (nbdcopy caps connections at its thread count, which defaults to the CPU count.)
        proc = run(["nbdcopy", "-v", "--threads=4", "--connections=4", "--requests=4",
                    "--request-size=262144", "--flush", source, uri], timeout=60)
        self.assert_connections(proc.stderr, "dst", 4)
        # Download: NBD -> local file, also 4 connections.
        downloaded = self.path("downloaded.img")
        proc = run(["nbdcopy", "-v", "--threads=4", "--connections=4", "--flush", uri,
                    downloaded], timeout=60)
        self.assert_connections(proc.stderr, "src", 4)
        self.assert_same_file(source, downloaded)
        # The data also reached the served file once the server exits cleanly.
        rc, elapsed, killed = server.stop()
        self.assertFalse(killed, "spindle-nbd ignored SIGTERM")
        self.assertEqual(rc, 0)
        self.assert_same_file(source, target)

    def test_nbdcopy_unix_multiconn(self):
        self.nbdcopy_roundtrip(tcp=False)

    def test_nbdcopy_tcp_multiconn(self):
        self.nbdcopy_roundtrip(tcp=True)

    def test_nbdcopy_null_and_stdin(self):
        # Read benchmark path (nbdcopy URI null:), then an upload from a pipe.
        image = self.make_image("img.raw", 8 * MiB, [(0, os.urandom(8 * MiB))])
        server = self.server(image)
        run(["nbdcopy", "--connections=4", server.uri(), "null:"], timeout=60)
        # Upload from a stream (stdin): nbdcopy must write sequentially over one connection.
        data = os.urandom(2 * MiB)
        run(["nbdcopy", "-", server.uri()], input=data, timeout=60)
        h = self.connect(server.uri())
        self.assertEqual(h.pread(2 * MiB, 0), data)

    def qemu_img_roundtrip(self, tcp):
        source = sparse_source(self, "source.img", 16 * MiB)
        served = self.make_image("served.img", 16 * MiB)
        server = self.server(served, ["-f", "raw"], tcp=tcp)
        uri = server.uri()
        info = json.loads(run(["qemu-img", "info", "--output=json", uri], timeout=30).stdout)
        self.assertEqual(info["virtual-size"], 16 * MiB)
        # local raw -> NBD (into the existing export: -n), with pipelined out-of-order writes.
        run(["qemu-img", "convert", "-n", "-W", "-m", "8", "-f", "raw", "-O", "raw", source, uri],
            timeout=60)
        # NBD -> local raw.
        back = self.path("back.img")
        run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, back], timeout=60)
        self.assert_same_file(source, back)
        # compare: identical, then one byte different -> exit 1.
        proc = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", source, uri], timeout=60)
        self.assertIn(b"Images are identical", proc.stdout)
        with open(back, "r+b") as f:
            f.seek(13 * MiB + 12345)
            old = f.read(1)
            f.seek(13 * MiB + 12345)
            f.write(bytes([old[0] ^ 0xFF]))
        proc = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", back, uri], timeout=60,
                   check=False)
        self.assertEqual(proc.returncode, 1, f"compare should report a mismatch: {proc.stdout!r}")
        # qemu-img reports the first differing 512-byte sector.
        expected = (13 * MiB + 12345) // 512 * 512
        self.assertIn(f"Content mismatch at offset {expected}!".encode(), proc.stdout)

    def test_qemu_img_convert_compare_unix(self):
        self.qemu_img_roundtrip(tcp=False)

    def test_qemu_img_convert_compare_tcp(self):
        self.qemu_img_roundtrip(tcp=True)

    def test_qemu_img_map_sparse(self):
        image = self.make_image("sparse.img", 32 * MiB,
                                [(2 * MiB, os.urandom(256 * KiB)), (20 * MiB, os.urandom(4096))])
        for tcp in (False, True):
            server = self.server(image, ["-f", "raw"], tcp=tcp)
            proc = run(["qemu-img", "map", "--output=json", "-f", "raw", server.uri()],
                       timeout=30)
            extents = json.loads(proc.stdout)
            pos = 0
            for e in extents:
                self.assertEqual(e["start"], pos, f"map not contiguous: {extents}")
                pos += e["length"]
            self.assertEqual(pos, 32 * MiB)

            def at(offset):
                for e in extents:
                    if e["start"] <= offset < e["start"] + e["length"]:
                        return e
                raise AssertionError(f"no extent at {offset}")
            for offset in (2 * MiB, 2 * MiB + 255 * KiB, 20 * MiB):
                e = at(offset)
                self.assertTrue(e["data"] and not e["zero"], f"{offset}: {e}")
            for offset in (0, 1 * MiB, 2 * MiB + 256 * KiB, 10 * MiB, 31 * MiB):
                e = at(offset)
                self.assertTrue(e["zero"] and not e["data"], f"{offset}: {e}")
            data = sum(e["length"] for e in extents if e["data"])
            self.assertLessEqual(data, 1 * MiB, f"sparseness lost: {extents}")
            server.stop()

    def test_qemu_img_convert_preserves_sparseness(self):
        # A sparse source copied to NBD and back must stay sparse when the target is a new
        # file: qemu-img uses block status on the NBD side.
        source = sparse_source(self, "source.img", 16 * MiB)
        server = self.server(source, ["-r"])
        out = self.path("out.img")
        run(["qemu-img", "convert", "-f", "raw", "-O", "raw", server.uri(), out], timeout=60)
        self.assert_same_file(source, out)
        extents, _ = si.file_extents(out)
        allocated = sum(length for _, length in extents)
        self.assertLess(allocated, 8 * MiB, f"copy lost sparseness: {extents}")


if __name__ == "__main__":
    si.main(required_binaries=["nbdcopy", "qemu-img", "cmp"], needs_nbd_module=True)
