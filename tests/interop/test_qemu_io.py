#!/usr/bin/env python3
"""qemu-io (QEMU 7.2's NBD client) against spindle-nbd: WRITE/READ with pattern verification,
WRITE_ZEROES (NO_HOLE, may-unmap, FAST_ZERO), TRIM with and without --discard=unmap, FLUSH, FUA,
pipelined aio_* requests, a read-only export, and TCP. Results are checked through NBD and, after
the server exits, in the image file itself (contents and holes)."""

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spindle_interop as si  # noqa: E402
from spindle_interop import MiB, KiB, run  # noqa: E402


class QemuIoTest(si.InteropTest):

    def qemu_io(self, uri, *commands, read_only=False, expect_ok=True):
        cmd = ["qemu-io", "-f", "raw"]
        if read_only:
            cmd.append("-r")
        for c in commands:
            cmd += ["-c", c]
        cmd.append(uri)
        proc = run(cmd, timeout=60, check=False)
        out = (proc.stdout + proc.stderr).decode("utf-8", "replace")
        if expect_ok:
            self.assertEqual(proc.returncode, 0, f"qemu-io failed ({proc.returncode}):\n{out}")
            for bad in ("Pattern verification failed", "failed:", "error", "Error"):
                self.assertNotIn(bad, out, f"qemu-io reported a problem:\n{out}")
        return proc.returncode, out

    def file_bytes(self, path, offset, length):
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def assert_hole(self, path, offset, length):
        extents, _ = si.file_extents(path)
        for start, size in extents:
            self.assertFalse(start < offset + length and offset < start + size,
                             f"[{offset}, {offset + length}) still allocated in {path}: {extents}")

    def assert_allocated(self, path, offset, length):
        extents, _ = si.file_extents(path)
        self.assertTrue(any(start <= offset and offset + length <= start + size
                            for start, size in extents),
                        f"[{offset}, {offset + length}) not allocated in {path}: {extents}")

    def test_write_read_patterns(self):
        image = self.make_image("disk.img", 8 * MiB)
        server = self.server(image)
        uri = server.uri()
        _, out = self.qemu_io(uri,
                              "write -P 0x11 0 64k", "read -P 0x11 0 64k",
                              "write -P 0xa5 1m 1m", "read -P 0xa5 1m 1m",
                              # unaligned offset and length (block_size_minimum is 1)
                              "write -P 0x5a 3001 7777", "read -P 0x5a 3001 7777",
                              "read -P 0x11 0 3001", "read -P 0x11 10778 54758",
                              # the last byte of the export
                              "write -P 0xee 8388607 1", "read -P 0xee 8388607 1",
                              "read -P 0 64k 960k")
        self.assertEqual(len(re.findall(r"wrote \d+/\d+ bytes", out)), 4, out)
        self.assertEqual(len(re.findall(r"read \d+/\d+ bytes", out)), 7, out)
        # Negative control: qemu-io really does verify (and reports it in its exit status).
        rc, out = self.qemu_io(uri, "read -P 0x12 0 64k", expect_ok=False)
        self.assertNotEqual(rc, 0)
        self.assertIn("Pattern verification failed", out)
        # Past the end: QEMU's block layer refuses it before it reaches the wire.
        rc, out = self.qemu_io(uri, "read 8388607 2", expect_ok=False)
        self.assertNotEqual(rc, 0, out)
        rc, _, killed = server.stop()
        self.assertEqual((rc, killed), (0, False))
        data = self.file_bytes(image, 0, 64 * KiB)
        self.assertEqual(data[:3001], b"\x11" * 3001)
        self.assertEqual(data[3001:3001 + 7777], b"\x5a" * 7777)
        self.assertEqual(data[10778:], b"\x11" * (64 * KiB - 10778))
        self.assertEqual(self.file_bytes(image, 1 * MiB, 1 * MiB), b"\xa5" * MiB)
        self.assertEqual(self.file_bytes(image, 8 * MiB - 1, 1), b"\xee")

    def test_zero_discard_flush_fua_with_unmap(self):
        image = self.make_image("disk.img", 4 * MiB, [(0, os.urandom(4 * MiB))])
        server = self.server(image, ["--discard=unmap"])
        uri = server.uri()
        self.qemu_io(uri,
                     "write -P 0x11 0 64k",
                     "write -z 64k 64k", "read -P 0 64k 64k",            # NO_HOLE zeroes
                     "write -P 0x22 128k 64k", "discard 128k 64k",       # TRIM
                     "read -P 0 128k 64k",
                     "write -f -P 0x33 192k 64k", "read -P 0x33 192k 64k",  # FUA
                     "write -z -u 256k 64k", "read -P 0 256k 64k",       # zeroes, may unmap
                     "write -z -n 320k 64k", "read -P 0 320k 64k",       # FAST_ZERO
                     "write -z -f 384k 4k", "read -P 0 384k 4k",         # zeroes + FUA
                     "flush",
                     "read -P 0x11 0 64k")
        # A second client (new connection) sees everything.
        self.qemu_io(uri, "read -P 0x11 0 64k", "read -P 0 64k 64k", "read -P 0 128k 64k",
                     "read -P 0x33 192k 64k", "read -P 0 256k 132k")
        rc, _, killed = server.stop()
        self.assertEqual((rc, killed), (0, False))
        self.assertEqual(self.file_bytes(image, 0, 64 * KiB), b"\x11" * (64 * KiB))
        self.assertEqual(self.file_bytes(image, 64 * KiB, 64 * KiB), bytes(64 * KiB))
        self.assertEqual(self.file_bytes(image, 128 * KiB, 64 * KiB), bytes(64 * KiB))
        self.assertEqual(self.file_bytes(image, 192 * KiB, 64 * KiB), b"\x33" * (64 * KiB))
        self.assertEqual(self.file_bytes(image, 256 * KiB, 132 * KiB), bytes(132 * KiB))
        # --discard=unmap: TRIM and may-unmap zeroing punched holes in the file.
        self.assert_hole(image, 128 * KiB, 64 * KiB)
        self.assert_hole(image, 256 * KiB, 64 * KiB)
        # Untouched data beyond is intact and allocated.
        self.assert_allocated(image, 1 * MiB, 1 * MiB)

    def test_discard_ignored_by_default(self):
        image = self.make_image("disk.img", 1 * MiB)
        server = self.server(image)
        # TRIM is advertised and succeeds, but without --discard=unmap it leaves the data.
        _, out = self.qemu_io(server.uri(), "write -P 0x22 128k 64k", "discard 128k 64k",
                              "write -z -u 256k 64k", "read -P 0 256k 64k", "flush")
        self.assertIn("discard 65536/65536 bytes at offset 131072", out)
        server.stop()
        self.assertEqual(self.file_bytes(image, 128 * KiB, 64 * KiB), b"\x22" * (64 * KiB))
        self.assert_allocated(image, 128 * KiB, 64 * KiB)
        self.assertEqual(self.file_bytes(image, 256 * KiB, 64 * KiB), bytes(64 * KiB))

    def test_aio_pipelined(self):
        image = self.make_image("disk.img", 4 * MiB)
        server = self.server(image)
        uri = server.uri()
        writes = [f"aio_write -P {0x40 + i} {i * 64}k 64k" for i in range(32)]
        writes.append("aio_write -f -P 0x99 3m 512k")
        self.qemu_io(uri, *writes, "aio_flush")
        reads = [f"aio_read -P {0x40 + i} {i * 64}k 64k" for i in range(32)]
        _, out = self.qemu_io(uri, *reads, "aio_read -P 0x99 3m 512k", "aio_flush")
        self.assertEqual(len(re.findall(r"read 65536/65536 bytes", out)), 32, out)
        server.stop()
        for i in range(32):
            self.assertEqual(self.file_bytes(image, i * 64 * KiB, 64 * KiB),
                             bytes([0x40 + i]) * (64 * KiB), f"block {i}")

    def test_read_only_export(self):
        image = self.make_image("disk.img", 1 * MiB, [(0, b"\x77" * (64 * KiB))])
        server = self.server(image, ["-r"])
        self.qemu_io(server.uri(), "read -P 0x77 0 64k", "read -P 0 64k 64k", read_only=True)
        # A read-write open is refused: the export advertises READ_ONLY.
        rc, out = self.qemu_io(server.uri(), "write -P 0x11 0 4k", expect_ok=False)
        self.assertNotEqual(rc, 0)
        self.assertIn("Permission denied", out)
        # Opened read-only, a write is refused by qemu's block layer.
        rc, out = self.qemu_io(server.uri(), "write -P 0x11 0 4k", read_only=True,
                               expect_ok=False)
        self.assertNotEqual(rc, 0)
        self.assertIn("read-only", out)
        self.assert_serving(server, write=False)
        server.stop()
        self.assertEqual(self.file_bytes(image, 0, 64 * KiB), b"\x77" * (64 * KiB))

    def test_tcp(self):
        image = self.make_image("disk.img", 2 * MiB)
        server = self.server(image, ["--discard=unmap"], tcp=True, name="disk")
        uri = server.uri()
        self.assertTrue(uri.startswith("nbd://127.0.0.1:"))
        self.qemu_io(uri, "write -P 0x61 0 1m", "write -f -P 0x62 1m 512k",
                     "write -z 1536k 512k", "flush", "read -P 0x61 0 1m",
                     "read -P 0x62 1m 512k", "read -P 0 1536k 512k")
        server.stop()
        self.assertEqual(self.file_bytes(image, 0, 1 * MiB), b"\x61" * MiB)
        self.assertEqual(self.file_bytes(image, 1 * MiB, 512 * KiB), b"\x62" * (512 * KiB))


if __name__ == "__main__":
    si.main(required_binaries=["qemu-io", "nbdinfo"], needs_nbd_module=True)
