#!/usr/bin/env python3
"""QED images through spindle-nbd, cross-checked with QEMU's own QED driver: images written by
qemu-io read back identically over NBD (nbdcopy vs qemu-img convert), allocation maps agree,
writes through NBD (multi-conn nbdcopy, qemu-io, fio with verification) leave an image that
`qemu-img check` accepts and `qemu-img compare` finds identical to an independently built
reference, read-only QED exports, QED overlays on a raw backing file, and large reads of data
clusters served from the page cache in every --zero-copy mode."""

import errno
import json
import os
import struct
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spindle_interop as si  # noqa: E402
from spindle_interop import MiB, KiB, run  # noqa: E402

QEMU_IO_WRITES = ["write -P 0xab 0 1M", "write -P 0xcd 10M 64k", "write -P 0x17 20000k 12k",
                  "write -P 0xef 63M 1M"]


class QedTest(si.InteropTest):

    def create_qed(self, name, size, backing=None):
        path = self.path(name)
        cmd = ["qemu-img", "create", "-f", "qed"]
        if backing:
            cmd += ["-b", backing, "-F", "raw"]
        run(cmd + [path, str(size)], timeout=30)
        return path

    def qemu_io(self, fmt, target, commands):
        cmd = ["qemu-io", "-f", fmt]
        for c in commands:
            cmd += ["-c", c]
        proc = run(cmd + [target], timeout=60)
        out = proc.stdout.decode() + proc.stderr.decode()
        self.assertNotIn("failed", out, out)
        return out

    def qemu_img_check(self, path):
        proc = run(["qemu-img", "check", "-f", "qed", path], timeout=60, check=False)
        self.assertEqual(proc.returncode, 0, f"qemu-img check {path} -> {proc.returncode}:\n"
                                             f"{proc.stdout.decode()}{proc.stderr.decode()}")
        self.assertIn(b"No errors were found on the image", proc.stdout)

    def qemu_img_compare(self, a, fmt_a, b, fmt_b):
        proc = run(["qemu-img", "compare", "-f", fmt_a, "-F", fmt_b, a, b], timeout=60,
                   check=False)
        self.assertEqual(proc.returncode, 0, f"qemu-img compare {a} {b}: "
                                             f"{proc.stdout.decode()}{proc.stderr.decode()}")

    def assert_same_file(self, a, b):
        proc = run(["cmp", a, b], timeout=60, check=False)
        self.assertEqual(proc.returncode, 0, f"cmp: {proc.stdout!r}")

    def stop_cleanly(self, server):
        rc, elapsed, killed = server.stop()
        self.assertFalse(killed, "spindle-nbd ignored SIGTERM")
        self.assertEqual(rc, 0)

    def test_read_image_written_by_qemu(self):
        image = self.create_qed("disk.qed", 64 * MiB)
        self.qemu_io("qed", image, QEMU_IO_WRITES)
        reference = self.path("reference.raw")
        run(["qemu-img", "convert", "-f", "qed", "-O", "raw", image, reference], timeout=60)
        qemu_map = json.loads(run(["qemu-img", "map", "--output=json", "-f", "qed", image],
                                  timeout=30).stdout)
        for args in (["-f", "qed"], []):  # explicit format, then probing
            server = self.server(image, args + ["-r"])
            out = self.path("out.raw")
            run(["nbdcopy", "--connections=4", "--threads=4", server.uri(), out], timeout=60)
            self.assert_same_file(reference, out)
            os.unlink(out)
            self.qemu_img_compare(reference, "raw", server.uri(), "raw")
            # base:allocation agrees with QEMU's view of the QED file: allocated clusters are
            # data, everything else reads as zero and is a hole.
            nbd_map = si.nbdinfo_json(server.uri(), "--map")
            for extent in qemu_map:
                for probe in (extent["start"], extent["start"] + extent["length"] - 1):
                    nbd_type = next(e["type"] for e in nbd_map
                                    if e["offset"] <= probe < e["offset"] + e["length"])
                    expected = 0 if extent["data"] else 3
                    self.assertEqual(nbd_type, expected,
                                     f"offset {probe}: qemu says {extent}, nbd map {nbd_map}")
            self.stop_cleanly(server)
        self.qemu_img_check(image)

    def test_write_through_nbd_then_qemu_img_check(self):
        size = 48 * MiB
        image = self.create_qed("disk.qed", size)
        self.qemu_io("qed", image, ["write -P 0x99 0 4M", "write -P 0x98 40M 2M"])
        server = self.server(image, ["-f", "qed", "--discard=unmap"])
        uri = server.uri()
        # Multi-connection upload of a sparse random source over the whole export: nbdcopy
        # writes the data and zeroes the rest (including the clusters qemu-io allocated).
        source = self.make_image("source.raw", size,
                                 [(0, os.urandom(3 * MiB)), (5 * MiB, os.urandom(64 * KiB)),
                                  (9 * MiB + 4096, os.urandom(2 * MiB)),
                                  (40 * MiB + 512, os.urandom(1 * MiB))])
        run(["nbdcopy", "--connections=4", "--threads=4", "--flush", source, uri], timeout=60)
        reference = self.path("reference.raw")
        with open(source, "rb") as f, open(reference, "wb") as g:
            g.write(f.read())
        h = self.connect(uri)
        ops = ["write -P 0x11 1M 3M",          # overwrite allocated clusters
               "write -P 0x22 30000k 100k",    # unaligned, allocating
               "write -z 2M 64k",              # zero inside data
               "write -z -u 40M 1M",           # zero/unmap allocated clusters
               "discard 41M 64k",              # TRIM must succeed (QED may ignore it)...
               "write -P 0x44 41M 64k",        # ...and contents after it are undefined
               "write -f -P 0x33 47M 512k",    # FUA, allocating at the end
               "flush"]
        self.qemu_io("raw", uri, ops)
        self.qemu_io("raw", reference, [op for op in ops if not op.startswith("discard")])
        self.assertEqual(h.pread(4096, 47 * MiB), b"\x33" * 4096)
        del h
        self.handles.clear()
        self.stop_cleanly(server)
        self.qemu_img_check(image)
        self.qemu_img_compare(image, "qed", reference, "raw")

    def test_fio_verify_on_qed(self):
        # Concurrent allocating writes (2 connections, iodepth 32) on a fresh QED image.
        image = self.create_qed("disk.qed", 64 * MiB)
        server = self.server(image, ["-f", "qed"])
        proc = run(["fio", "--name=qed", "--ioengine=nbd", f"--uri={server.uri()}",
                    "--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=24m", "--numjobs=2",
                    "--offset_increment=32m", "--verify=crc32c", "--verify_fatal=1",
                    "--randseed=99", "--output-format=json"], timeout=120, check=False)
        text = proc.stdout.decode()
        self.assertEqual(proc.returncode, 0, text[-3000:] + proc.stderr.decode()[-2000:])
        doc = json.loads(text[text.find("{"):])
        for job in doc["jobs"]:
            self.assertEqual(job["error"], 0)
            self.assertEqual(job["read"]["io_bytes"], 24 * MiB, "verify phase did not run")
        dump = self.path("dump.raw")
        run(["nbdcopy", server.uri(), dump], timeout=60)
        self.stop_cleanly(server)
        self.qemu_img_check(image)
        # What QEMU reads from the file equals what the server served.
        self.qemu_img_compare(image, "qed", dump, "raw")

    def test_read_only_qed(self):
        image = self.create_qed("disk.qed", 8 * MiB)
        self.qemu_io("qed", image, ["write -P 0x42 0 1M"])
        with open(image, "rb") as f:
            before = f.read()
        server = self.server(image, ["-f", "qed", "-r"])
        h = self.connect(server.uri())
        self.assertTrue(h.is_read_only())
        self.assertEqual(h.pread(4096, 0), b"\x42" * 4096)
        h.set_strict_mode(0)
        with self.assertRaises(Exception):
            h.pwrite(b"x" * 4096, 2 * MiB)
        self.stop_cleanly(server)
        with open(image, "rb") as f:
            self.assertEqual(f.read(), before, "read-only export modified the QED file")
        self.qemu_img_check(image)

    def test_overlay_on_raw_backing_file(self):
        base = self.make_image("base.raw", 8 * MiB, [(0, os.urandom(4 * MiB))])
        with open(base, "rb") as f:
            base_before = f.read()
        overlay = self.create_qed("overlay.qed", 8 * MiB, backing=base)
        server = self.server(overlay, ["-f", "qed"])
        # Unallocated overlay clusters read from the backing file.
        out = self.path("out.raw")
        run(["nbdcopy", server.uri(), out], timeout=60)
        self.assert_same_file(base, out)
        # Writes go to the overlay only (including a partial cluster: copy-on-write).
        self.qemu_io("raw", server.uri(), ["write -P 0x11 1M 4k", "write -P 0x12 6M 64k",
                                           "flush"])
        expected = bytearray(base_before)
        expected[1 * MiB:1 * MiB + 4096] = b"\x11" * 4096
        expected[6 * MiB:6 * MiB + 64 * KiB] = b"\x12" * (64 * KiB)
        h = self.connect(server.uri())
        self.assertEqual(h.pread(8 * MiB, 0), bytes(expected))
        del h
        self.handles.clear()
        self.stop_cleanly(server)
        with open(base, "rb") as f:
            self.assertEqual(f.read(), base_before, "the backing file was modified")
        self.qemu_img_check(overlay)
        reference = self.path("reference.raw")
        with open(reference, "wb") as f:
            f.write(expected)
        self.qemu_img_compare(overlay, "qed", reference, "raw")

    def test_large_reads_of_data_clusters_from_the_page_cache(self):
        # Large reads that stay inside a run of allocated clusters contiguous in the file go out
        # straight from where QED stores them (a mapping of the image, or sendfile with
        # --zero-copy=always); reads that touch a hole, a zero cluster or clusters allocated
        # out of order fall back to reading into a buffer. Every way must give the same bytes.
        image = self.create_qed("disk.qed", 16 * MiB)
        self.qemu_io("qed", image, ["write -P 0x31 0 2M", "write -P 0x32 5M 64k",
                                    "write -P 0x33 4M 64k", "write -z 6M 1M"])
        reference = self.path("reference.raw")
        run(["qemu-img", "convert", "-f", "qed", "-O", "raw", image, reference], timeout=60)
        for zero_copy in ("remote", "always", "never"):
            server = self.server(image, ["-f", "qed", f"--zero-copy={zero_copy}"])
            self.qemu_io("raw", server.uri(), [
                "read -P 0x31 0 2M", "read -P 0x31 12345 1M", "read -P 0x31 1984k 64k",
                "read -P 0x33 4M 64k", "read -P 0x32 5M 64k", "read -P 0 6M 1M",
                "read -P 0 3M 1M"])
            self.qemu_img_compare(reference, "raw", server.uri(), "raw")  # crossing reads
            self.stop_cleanly(server)
        self.qemu_img_check(image)

    def test_qed_with_threads_backend(self):
        image = self.create_qed("disk.qed", 8 * MiB)
        server = self.server(image, ["-f", "qed", "--aio=threads"])
        self.qemu_io("raw", server.uri(), ["write -P 0x61 100k 300k", "write -z 1M 64k",
                                           "read -P 0x61 100k 300k", "flush"])
        self.stop_cleanly(server)
        self.qemu_img_check(image)
        self.qemu_io("qed", image, ["read -P 0x61 100k 300k", "read -P 0 0 100k"])

    def test_qed_with_cache_none(self):
        # QED's header and table I/O is not sector-aligned: the O_DIRECT file sits behind an
        # aligning backend (block/drivers/direct_file.h).
        image = self.create_qed("disk.qed", 8 * MiB)
        server = self.server(image, ["-f", "qed", "--cache=none"])
        self.qemu_io("raw", server.uri(), ["write -P 0x61 100k 300k", "read -P 0x61 100k 300k"])
        self.stop_cleanly(server)
        self.qemu_img_check(image)

    def test_overlay_block_status_reports_backing_data(self):
        # Clusters the overlay does not allocate take their status from the backing file, as
        # with qemu-nbd (backing data = data, backing holes = hole,zero): QEMU's NBD client
        # treats HOLE as unallocated, so anything else breaks `qemu-img compare` and `map`.
        base = self.make_image("base.raw", 8 * MiB, [(0, os.urandom(4 * MiB))])
        overlay = self.create_qed("overlay.qed", 8 * MiB, backing=base)
        server = self.server(overlay, ["-f", "qed", "-r"])
        nbd_map = si.nbdinfo_json(server.uri(), "--map")

        def type_at(offset):
            return next(e["type"] for e in nbd_map
                        if e["offset"] <= offset < e["offset"] + e["length"])
        self.assertEqual(type_at(0), 0, f"backing data not reported as data: {nbd_map}")
        self.assertEqual(type_at(6 * MiB), 3, f"backing hole not hole,zero: {nbd_map}")
        self.qemu_img_compare(base, "raw", server.uri(), "raw")


    def test_table_entries_pointing_at_metadata_give_eio(self):
        # qemu-nbd 7.2 serves the L1 table as guest data here and lets writes land in it.
        # spindle-nbd refuses the range with EIO (reads, writes, zeroing, in every zero-copy
        # mode), leaves every table byte as it was and marks the image NEED_CHECK.
        import nbd
        for kind, zero_copy in (("data-at-l1", "always"), ("data-at-own-l2", "never"),
                                ("l2-at-l1", "remote"), ("beyond-eof", "always")):
            with self.subTest(kind):
                image = self.create_qed(kind + ".qed", 8 * MiB)
                self.qemu_io("qed", image, ["write -P 0x41 0 64k", "write -P 0x42 4M 64k"])
                size = os.path.getsize(image)
                with open(image, "r+b") as f:
                    l1 = struct.unpack_from("<Q", f.read(64), 40)[0]
                    f.seek(l1)
                    l2 = struct.unpack("<Q", f.read(8))[0]
                    where, value = {"data-at-l1": (l2, l1), "data-at-own-l2": (l2, l2),
                                    "l2-at-l1": (l1, l1),
                                    "beyond-eof": (l2, size + 2 * 64 * KiB)}[kind]
                    f.seek(where)
                    f.write(struct.pack("<Q", value))
                    f.seek(0)
                    before = bytearray(f.read())
                server = self.server(image, ["-f", "qed", f"--zero-copy={zero_copy}"])
                h = self.connect(server.uri(), meta_contexts=["base:allocation"])
                if kind == "beyond-eof":
                    # Allocate past the bad pointer: it must stay refused.
                    h.pwrite(b"\x43" * (4 * 64 * KiB), 6 * MiB)
                    h.flush()
                    self.assertGreater(os.path.getsize(image), value + 64 * KiB)
                    with open(image, "rb") as f:
                        before = bytearray(f.read())
                for length, offset in ((512, 0), (64 * KiB, 0), (128 * KiB, 0)):
                    with self.assertRaises(nbd.Error) as caught:
                        h.pread(length, offset)
                    self.assertEqual(caught.exception.errnum, errno.EIO)
                for call in (lambda: h.pwrite(b"\x5a" * 4096, 0),
                             lambda: h.zero(64 * KiB, 0)):
                    with self.assertRaises(nbd.Error) as caught:
                        call()
                    self.assertEqual(caught.exception.errnum, errno.EIO)
                # Block status cannot say what the range holds: an error, not "data".
                with self.assertRaises(nbd.Error) as caught:
                    h.block_status(64 * KiB, 0, lambda context, offset, entries, err: 0)
                self.assertEqual(caught.exception.errnum, errno.EIO)
                if kind != "l2-at-l1":  # else the bad L1 entry covers the whole image
                    self.assertEqual(h.pread(4096, 4 * MiB), b"\x42" * 4096)
                    entries = []
                    h.block_status(64 * KiB, 4 * MiB,
                                   lambda context, offset, found, err: entries.extend(found))
                    self.assertTrue(entries and entries[1] == 0, f"4M: {entries}")
                # nbdsh (python3 -m nbd, with the interpreter that has the module).
                proc = run([sys.executable, "-m", "nbd", "-u", server.uri(), "-c",
                            "h.pread(512, 0)"], timeout=30, check=False)
                self.assertNotEqual(proc.returncode, 0)
                self.assertIn(b"Input/output error", proc.stderr + proc.stdout)
                del h
                self.handles.clear()
                self.stop_cleanly(server)
                with open(image, "rb") as f:
                    after = bytearray(f.read())
                features = struct.unpack_from("<Q", after, 16)[0]
                self.assertTrue(features & 2, "NEED_CHECK not set")
                after[16:24] = before[16:24]
                self.assertTrue(after == before, "table or data bytes changed")
                proc = run(["qemu-img", "check", "-f", "qed", image], timeout=60, check=False)
                self.assertEqual(proc.returncode, 2, proc.stdout + proc.stderr)


if __name__ == "__main__":
    si.main(required_binaries=["qemu-img", "qemu-io", "nbdcopy", "nbdinfo", "fio", "cmp"],
            needs_nbd_module=True)
