#!/usr/bin/env python3
"""qcow2 images through spindle-img and spindle-nbd, with qemu-img / qemu-io 7.2, nbdinfo,
nbdcopy, fio and libnbd as the oracle.

Reading: images qemu-img and qemu-io make in every option combination that matters (compat 0.10
and 1.1, cluster sizes 512 B to 2 MiB, refcount widths 1/16/64, lazy refcounts clean and dirty,
extended L2, zlib and zstd compressed clusters, zero clusters, discarded ranges, backing chains
qcow2 -> raw and qcow2 -> qcow2 -> qed with relative names, a backing file shorter than its
overlay) convert, compare, map and describe themselves in spindle-img exactly as in qemu-img,
and read the same over a spindle-nbd export (nbdcopy, nbdinfo --map).
Writing: `spindle-img create -f qcow2` writes qemu-img's bytes and prints its "Formatting" line;
`convert -O qcow2` (plain and -c) passes `qemu-img check` and compares identical; writes
through spindle-nbd (qemu-io patterns, write -z, discard, nbdcopy multi-conn, fio verify with 4
jobs, copy-on-write into overlays) leave an image that `qemu-img check` accepts and whose
content equals a model qemu-io built on a separate copy; resize grows.
Checking and bad input: spindle-img check gives qemu-img check's text, counts and exit codes
(clean 0, leaks 3 and -r leaks, corruption 2); damaged headers, encryption, bad table pointers
and backing loops give a clean error from spindle-img and spindle-nbd, never a crash, a hang,
silent zeroes or a changed file.

Usage: test_qcow2.py --spindle-nbd PATH --spindle-img PATH [unittest options]
"""

import errno
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spindle_interop as si  # noqa: E402
from spindle_interop import MiB, KiB, run  # noqa: E402

SPINDLE_IMG = None  # set below from --spindle-img

# The keys of `qemu-img map --output=json` entries compared as they are; "offset" is compared
# where both tools print one.
MAP_KEYS = ("start", "length", "depth", "present", "zero", "data")
# The keys of `qemu-img info --output=json` compared (plus every key spindle-img prints).
INFO_KEYS = ("format", "filename", "virtual-size", "actual-size", "cluster-size", "dirty-flag",
             "backing-filename", "full-backing-filename", "backing-filename-format",
             "format-specific", "encrypted")

# qemu-io commands that leave data clusters, partial clusters, zero clusters and a discarded
# range in a 16 MiB image (whatever its cluster size).
STANDARD_WRITES = ["write -P 0xab 0 200k", "write -P 0x17 1000k 12k", "write -z 2M 128k",
                   "write -P 0x5c 3M 1M", "discard 3M 256k", "write -P 0xef 15M 1M",
                   "write -z 8M 4k"]


def img(*args, check=True, timeout=60, cwd=None):
    """Runs spindle-img; stdout and stderr come back as text."""
    return si.run_text([SPINDLE_IMG, *args], timeout=timeout, check=check, cwd=cwd)


def qemu_img(*args, check=True, timeout=60, cwd=None):
    return si.run_text(["qemu-img", *args], timeout=timeout, check=check, cwd=cwd)


_SIZE_SUM = re.compile(r"^\d+[kKMG]?(?:[+-]\d+[kKMG]?)+$")
_UNITS = {"": 1, "k": KiB, "K": KiB, "M": MiB, "G": 1 << 30}


def expand(command):
    """qemu-io takes no arithmetic: "write -P 1 1M+512 4k" becomes "write -P 1 1049088 4k"."""
    def value(term):
        unit = term[-1] if term[-1] in "kKMG" else ""
        return int(term[:len(term) - len(unit)]) * _UNITS[unit]

    words = []
    for word in command.split():
        if _SIZE_SUM.match(word):
            total = 0
            for sign, term in re.findall(r"([+-]?)(\d+[kKMG]?)", word):
                total += -value(term) if sign == "-" else value(term)
            word = str(total)
        words.append(word)
    return " ".join(words)


def qemu_io(fmt, target, commands, extra=(), timeout=60):
    cmd = ["qemu-io", "-f", fmt] + list(extra)
    for c in commands:
        cmd += ["-c", expand(c)]
    proc = si.run_text(cmd + [target], timeout=timeout)
    out = proc.stdout + proc.stderr
    if "failed" in out or "error" in out.lower():
        raise AssertionError(f"qemu-io {target} {commands}:\n{out}")
    return out


def qcow2_header(path):
    """The qcow2 header fields (docs/interop/qcow2.rst), by name."""
    with open(path, "rb") as f:
        raw = f.read(104)
    names = ("magic", "version", "backing_file_offset", "backing_file_size", "cluster_bits",
             "size", "crypt_method", "l1_size", "l1_table_offset", "refcount_table_offset",
             "refcount_table_clusters", "nb_snapshots", "snapshots_offset")
    header = dict(zip(names, struct.unpack_from(">IIQIIQIIQQIIQ", raw, 0)))
    if header["version"] >= 3:
        header.update(zip(("incompatible_features", "compatible_features",
                           "autoclear_features", "refcount_order", "header_length"),
                          struct.unpack_from(">QQQII", raw, 72)))
    return header


def poke(path, offset, fmt, value):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


class Qcow2Test(si.InteropTest):

    maxDiff = None  # map, info and check mismatches are only readable in full

    # ---- building images with qemu ----
    def create_qcow2(self, name, size, options=(), backing=None, backing_fmt=None, cwd=None):
        path = self.path(name)
        cmd = ["create", "-q", "-f", "qcow2"]
        if options:
            cmd += ["-o", ",".join(options)]
        if backing:
            cmd += ["-b", backing, "-F", backing_fmt]
        cmd.append(name if cwd else path)
        if size is not None:
            cmd.append(str(size))
        qemu_img(*cmd, cwd=cwd)
        return path

    def qemu_raw(self, image, fmt="qcow2", name="reference.raw", cwd=None):
        """qemu-img's raw conversion of `image`: the expected guest-visible bytes."""
        out = self.path(name)
        qemu_img("convert", "-f", fmt, "-O", "raw", image, out, cwd=cwd)
        return out

    # ---- oracles ----
    def assert_same_file(self, a, b):
        proc = si.run_text(["cmp", a, b], timeout=60, check=False)
        self.assertEqual(proc.returncode, 0, f"cmp {a} {b}: {proc.stdout}")

    def qemu_check_clean(self, path, fmt="qcow2", cwd=None):
        """qemu-img check exits 0 and counts nothing (cwd: where relative data files are)."""
        proc = qemu_img("check", "-f", fmt, "--output=json", path, check=False, cwd=cwd)
        self.assertEqual(proc.returncode, 0, f"qemu-img check {path} -> {proc.returncode}:\n"
                                             f"{proc.stdout}{proc.stderr}")
        doc = json.loads(proc.stdout)
        for key in ("corruptions", "leaks", "check-errors"):
            self.assertEqual(doc.get(key, 0), 0, f"{path}: {doc}")

    def qemu_compare(self, a, fmt_a, b, fmt_b):
        proc = qemu_img("compare", "-f", fmt_a, "-F", fmt_b, a, b, check=False)
        self.assertEqual(proc.returncode, 0, f"qemu-img compare {a} {b}: "
                                             f"{proc.stdout}{proc.stderr}")

    def assert_map_matches(self, ours, theirs, what):
        self.assertEqual([{k: e.get(k) for k in MAP_KEYS} for e in ours],
                         [{k: e.get(k) for k in MAP_KEYS} for e in theirs], what)
        for a, b in zip(ours, theirs):
            if "offset" in a and "offset" in b:
                self.assertEqual(a["offset"], b["offset"], f"{what}: {a} vs {b}")

    def assert_info_matches(self, image, fmt="qcow2", cwd=None):
        ours = json.loads(img("info", "-f", fmt, "--output=json", image, cwd=cwd).stdout)
        theirs = json.loads(qemu_img("info", "-f", fmt, "--output=json", image,
                                     cwd=cwd).stdout)
        for key in sorted(set(INFO_KEYS) | set(ours)):
            self.assertEqual(ours.get(key), theirs.get(key), f"info {image}: key {key!r}")

    def assert_nbd_map_matches(self, server, qemu_map):
        """base:allocation agrees with qemu's map: data is data, everything else a hole; zero
        where qemu says the range reads as zeros (as qemu-nbd reports it)."""
        nbd_map = si.nbdinfo_json(server.uri(), "--map")
        for extent in qemu_map:
            expected = (0 if extent["data"] else 1) | (2 if extent["zero"] else 0)
            for probe in (extent["start"], extent["start"] + extent["length"] - 1):
                found = next(e["type"] for e in nbd_map
                             if e["offset"] <= probe < e["offset"] + e["length"])
                self.assertEqual(found, expected,
                                 f"offset {probe}: qemu says {extent}, nbd map {nbd_map}")

    def write_through_nbd_like_qemu_io(self, image, model, writes, unmap=False):
        """Writes `writes` through spindle-nbd serving `image` and with qemu-io into `model` (a
        copy of it): the export reads as the model, and once the server has stopped the image
        checks clean and reads as the model."""
        server = self.server(image, ["-f", "qcow2"] + (["--discard=unmap"] if unmap else []))
        qemu_io("raw", server.uri(), writes)
        qemu_io("qcow2", model, writes, extra=["-d", "unmap"] if unmap else [])
        self.qemu_compare(model, "qcow2", server.uri(), "raw")
        self.stop_cleanly(server)
        self.qemu_check_clean(image)
        self.qemu_compare(image, "qcow2", model, "qcow2")

    def stop_cleanly(self, server):
        rc, _, killed = server.stop()
        self.assertFalse(killed, "spindle-nbd ignored SIGTERM")
        self.assertEqual(rc, 0)

    def assert_data_ranges_match(self, ours, theirs, what):
        def data_ranges(entries):
            ranges = []
            for e in entries:
                if not e["data"]:
                    continue
                if ranges and ranges[-1][1] == e["start"]:
                    ranges[-1][1] = e["start"] + e["length"]
                else:
                    ranges.append([e["start"], e["start"] + e["length"]])
            return ranges
        self.assertEqual(data_ranges(ours), data_ranges(theirs), what)

    def assert_reads_like_qemu(self, image, fmt="qcow2", cwd=None, exact_map=True):
        """Everything spindle reads from `image` (relative to `cwd`, where the tools run)
        equals what qemu reads from it."""
        file_path = os.path.join(cwd or os.getcwd(), image)
        before = read_file(file_path)
        reference = self.qemu_raw(image, fmt, cwd=cwd)
        ours = self.path("spindle.raw")
        img("convert", "-f", fmt, "-O", "raw", image, ours, cwd=cwd)
        self.assert_same_file(reference, ours)
        os.unlink(ours)
        ours = self.path("spindle-probed.raw")
        img("convert", "-O", "raw", image, ours, cwd=cwd)  # probing the format
        self.assert_same_file(reference, ours)
        os.unlink(ours)
        compared = img("compare", "-f", fmt, "-F", "raw", image, reference, check=False,
                       cwd=cwd)
        self.assertEqual(compared.returncode, 0, compared.stdout + compared.stderr)
        self.assertIn("Images are identical.", compared.stdout)
        qemu_map = json.loads(qemu_img("map", "-f", fmt, "--output=json", image,
                                       cwd=cwd).stdout)
        our_map = json.loads(img("map", "-f", fmt, "--output=json", image, cwd=cwd).stdout)
        if exact_map:
            self.assert_map_matches(our_map, qemu_map, f"map {image}")
        else:
            self.assert_data_ranges_match(our_map, qemu_map, f"map {image}")
        self.assert_info_matches(image, fmt, cwd=cwd)
        for args in (["-f", fmt, "-r"], ["-r"]):  # explicit format, then probing
            server = self.server(file_path, args)
            out = self.path("nbd.raw")
            run(["nbdcopy", "--connections=2", server.uri(), out], timeout=60)
            self.assert_same_file(reference, out)
            os.unlink(out)
            self.assert_nbd_map_matches(server, qemu_map)
            self.stop_cleanly(server)
        self.assertEqual(read_file(file_path), before, "reading changed the image")
        return reference

    # ---- reading images qemu made ----------------------------------------------------------

    def read_variant(self, options, writes=STANDARD_WRITES, size=16 * MiB, exact_map=True):
        image = self.create_qcow2("disk.qcow2", size, options)
        qemu_io("qcow2", image, writes)
        self.assert_reads_like_qemu(image, exact_map=exact_map)
        self.qemu_check_clean(image)

    def test_read_compat_0_10(self):
        self.read_variant(["compat=0.10"])

    def test_read_compat_1_1_defaults(self):
        self.read_variant(["compat=1.1"])

    def test_read_cluster_512(self):
        self.read_variant(["cluster_size=512"], size=4 * MiB,
                          writes=["write -P 0xab 0 3000", "write -z 64k 4k",
                                  "write -P 0x5c 1M 100k", "discard 1M 8k",
                                  "write -P 1 4095k 1k"])

    def test_read_cluster_4k_refcount_bits_1(self):
        self.read_variant(["cluster_size=4096", "refcount_bits=1"])

    def test_read_cluster_2M_refcount_bits_64(self):
        self.read_variant(["cluster_size=2M", "refcount_bits=64"],
                          writes=["write -P 0xab 0 200k", "write -z 4M 2M",
                                  "write -P 0x5c 6M 2M", "discard 6M 2M",
                                  "write -P 0xef 15M 1M"])

    def test_read_lazy_refcounts(self):
        self.read_variant(["lazy_refcounts=on"])

    def test_external_data_files_read_and_write(self):
        # qemu-img made images whose data clusters live in a separate file (data_file), raw
        # (the file is the guest view itself) or not: read as qemu reads them, written through
        # spindle-nbd as qemu-io writes a copy, qemu-img check clean. (Absolute names: qemu 7.2
        # resolves a relative data file name against its current directory, spindle against
        # the image's.)
        for index, options in enumerate((["data_file_raw=on"], [], ["cluster_size=4096"],
                                         ["data_file_raw=on", "cluster_size=2M"],
                                         ["extended_l2=on"])):
            with self.subTest(options=options):
                copies = []
                for side in ("ours", "model"):
                    directory = self.path(f"{side}{index}")
                    os.mkdir(directory)
                    image = os.path.join(directory, "disk.qcow2")
                    data = os.path.join(directory, "data.raw")
                    qemu_img("create", "-q", "-f", "qcow2", "-o",
                             ",".join([f"data_file={data}"] + options), image, "16M")
                    qemu_io("qcow2", image, STANDARD_WRITES)
                    copies.append(image)
                image, model = copies
                self.assert_reads_like_qemu(image)
                mine = json.loads(img("check", "--output=json", image).stdout)
                theirs = json.loads(qemu_img("check", "--output=json", image).stdout)
                self.assertEqual(mine, theirs)
                info = json.loads(img("info", "--output=json", image).stdout)
                self.assertEqual(info["format-specific"]["data"]["data-file"],
                                 os.path.join(os.path.dirname(image), "data.raw"))
                self.write_through_nbd_like_qemu_io(image, model, self.NBD_WRITES, unmap=True)
                if "data_file_raw=on" in options:
                    data = os.path.join(os.path.dirname(image), "data.raw")
                    self.qemu_compare(data, "raw", image, "qcow2")
                # Growing the image grows its data file.
                img("resize", image, "20M")
                self.assertGreaterEqual(
                    os.path.getsize(os.path.join(os.path.dirname(image), "data.raw")), 20 * MiB)
                self.qemu_check_clean(image)

    def test_read_extended_l2_subclusters(self):
        # 64 KiB clusters of 32 subclusters of 2 KiB: writes, zeroes and discards of single
        # subclusters inside one cluster.
        self.read_variant(["extended_l2=on"],
                          writes=["write -P 0xab 0 2k", "write -P 0xac 6k 2k",
                                  "write -z 10k 4k", "write -P 0xad 64k 64k",
                                  "write -z 70k 2k", "discard 96k 32k",
                                  "write -P 0xae 1M 3k", "write -P 0xaf 15M 1M"])
        # The unallocated subclusters of an allocated cluster are separate map entries with
        # their offset in the host cluster, as qemu-img shows them.
        image = self.path("disk.qcow2")
        ours = json.loads(img("map", "--output=json", image).stdout)
        self.assertIn({"start": 2048, "length": 4096, "depth": 0, "present": False,
                       "zero": True, "data": False, "offset": ours[0]["offset"] + 2048}, ours)

    def compressed_variant(self, compression_type):
        # Repeating patterns compress; random data does not, and qemu stores those clusters
        # uncompressed: the image mixes both, plus zeros and a plain cluster written after.
        source = self.make_image("source.raw", 8 * MiB, [
            (0, b"\x41" * MiB), (2 * MiB, si.pattern(3, 100 * KiB)),
            (3 * MiB, os.urandom(256 * KiB)), (6 * MiB + 512, si.pattern(4, 5000))])
        compressed = self.path("compressed.qcow2")
        qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
                 f"compression_type={compression_type}", source, compressed)
        qemu_io("qcow2", compressed, ["write -P 0x43 5M 4k", "write -z 64k 64k"])
        check = json.loads(qemu_img("check", "--output=json", compressed).stdout)
        self.assertGreater(check.get("compressed-clusters", 0), 0, check)
        self.assert_reads_like_qemu(compressed)
        self.qemu_check_clean(compressed)

    def test_read_compressed_zlib(self):
        self.compressed_variant("zlib")

    def test_read_compressed_zstd(self):
        self.compressed_variant("zstd")

    def test_read_dirty_lazy_refcounts_image(self):
        # qemu-io killed after allocating writes with lazy refcounts: the dirty bit stays set
        # and the refcounts are stale. Reading needs no repair; opening it writable repairs it.
        image = self.create_qcow2("dirty.qcow2", 8 * MiB, ["lazy_refcounts=on"])
        proc = si.run_text(["qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 200k",
                            "-c", "write -P 0xcd 4M 64k", "-c", "sigraise 9", image],
                           timeout=30, check=False)
        self.assertEqual(proc.returncode, -signal.SIGKILL, proc.stderr)
        self.assertTrue(qcow2_header(image)["incompatible_features"] & 1, "not dirty")
        ours = img("check", "-f", "qcow2", "--output=json", image, check=False)
        theirs = qemu_img("check", "-f", "qcow2", "--output=json", image, check=False)
        self.assertEqual(ours.returncode, theirs.returncode, ours.stdout + ours.stderr)
        self.assertEqual(json.loads(ours.stdout), json.loads(theirs.stdout))
        reference = self.assert_reads_like_qemu(image)
        server = self.server(image, ["-f", "qcow2"])
        self.stop_cleanly(server)
        self.qemu_check_clean(image)
        self.assertFalse(qcow2_header(image)["incompatible_features"] & 1, "still dirty")
        self.qemu_compare(image, "qcow2", reference, "raw")

    def test_read_qcow2_on_raw_backing(self):
        base = self.make_image("base.raw", 8 * MiB, [(0, os.urandom(3 * MiB)),
                                                     (6 * MiB, os.urandom(100 * KiB))])
        base_before = read_file(base)
        overlay = self.create_qcow2("overlay.qcow2", None, backing="base.raw",
                                    backing_fmt="raw", cwd=self.tmp)
        qemu_io("qcow2", overlay, ["write -P 0x11 1M+512 4k", "write -z 2M 64k",
                                   "write -P 0x12 7M 64k"])
        self.assert_reads_like_qemu(overlay)
        self.assertEqual(read_file(base), base_before)
        ours = json.loads(img("info", "--output=json", "--backing-chain", overlay).stdout)
        theirs = json.loads(qemu_img("info", "--output=json", "--backing-chain",
                                     overlay).stdout)
        for key in ("filename", "format", "virtual-size", "backing-filename"):
            self.assertEqual([e.get(key) for e in ours], [e.get(key) for e in theirs], key)

    def test_read_chain_qcow2_qcow2_qed_relative_names(self):
        # images/top.qcow2 -> mid.qcow2 -> base.qed, every name relative to its image's folder;
        # the tools run from the test's temp dir, so only relative-to-the-image resolves them.
        folder = self.path("images")
        os.mkdir(folder)
        qemu_img("create", "-q", "-f", "qed", "base.qed", "8M", cwd=folder)
        qemu_io("qed", os.path.join(folder, "base.qed"),
                ["write -P 0x01 0 1M", "write -P 0x02 5M 64k"])
        qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "base.qed",
                 "-F", "qed", "mid.qcow2", cwd=folder)
        qemu_io("qcow2", os.path.join(folder, "mid.qcow2"),
                ["write -P 0x03 512k 8k", "write -z 5M 4k", "discard 6M 64k"])
        qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2",
                 "12M", cwd=folder)
        top = os.path.join("images", "top.qcow2")
        qemu_io("qcow2", self.path(top), ["write -P 0x04 100k 4k", "write -P 0x05 9M 64k"])
        self.assert_reads_like_qemu(top, cwd=self.tmp)
        ours = json.loads(img("info", "--output=json", "--backing-chain", top,
                              cwd=self.tmp).stdout)
        theirs = json.loads(qemu_img("info", "--output=json", "--backing-chain", top,
                                     cwd=self.tmp).stdout)
        for key in ("filename", "format", "virtual-size", "backing-filename",
                    "full-backing-filename", "backing-filename-format"):
            self.assertEqual([e.get(key) for e in ours], [e.get(key) for e in theirs], key)

    def test_read_backing_file_shorter_than_overlay(self):
        base = self.create_qcow2("base.qcow2", 2 * MiB)
        qemu_io("qcow2", base, ["write -P 0x61 0 2M"])
        overlay = self.create_qcow2("overlay.qcow2", 6 * MiB, backing="base.qcow2",
                                    backing_fmt="qcow2", cwd=self.tmp)
        # A write straddling the end of the backing file copies the part below it.
        qemu_io("qcow2", overlay, ["write -P 0x62 2040k 16k", "write -P 0x63 5M 4k"])
        self.assert_reads_like_qemu(overlay)

    def test_info_human_matches_qemu_img(self):
        base = self.make_image("base.raw", 8 * MiB, [(0, os.urandom(64 * KiB))])
        self.create_qcow2("overlay.qcow2", None, ["cluster_size=4096"], backing="base.raw",
                          backing_fmt="raw", cwd=self.tmp)
        self.create_qcow2("v2.qcow2", 8 * MiB, ["compat=0.10"])
        self.create_qcow2("v3.qcow2", 1 << 30, ["lazy_refcounts=on", "extended_l2=on",
                                                "compression_type=zstd"])
        for name in ("overlay.qcow2", "v2.qcow2", "v3.qcow2"):
            with self.subTest(name):
                qemu_io("qcow2", self.path(name), ["write -P 1 0 64k"])
                ours = img("info", name, cwd=self.tmp)
                theirs = qemu_img("info", name, cwd=self.tmp)
                self.assertEqual(ours.stdout, theirs.stdout)
        self.assertTrue(os.path.exists(base))

    def test_info_of_an_image_whose_data_file_is_missing_matches_qemu_img(self):
        # qemu-img info reads only the metadata (BDRV_O_NO_IO): a missing data file is shown,
        # not an error; anything that reads data fails with qemu's message.
        qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=gone.data", "gone.qcow2", "4M",
                 cwd=self.tmp)
        os.unlink(self.path("gone.data"))
        for output in ("human", "json"):
            ours = img("info", f"--output={output}", "gone.qcow2", cwd=self.tmp)
            theirs = qemu_img("info", f"--output={output}", "gone.qcow2", cwd=self.tmp)
            self.assertEqual(ours.stdout, theirs.stdout, output)
        for command in (["check"], ["map"], ["convert", "-O", "raw"]):
            args = command + ["gone.qcow2"] + (["out.raw"] if command[0] == "convert" else [])
            ours = img(*args, cwd=self.tmp, check=False)
            self.assertEqual(ours.returncode, 1, command)
            self.assertIn("Could not open 'gone.qcow2': Could not open 'gone.data': No such "
                          "file or directory", ours.stderr, command)

    # ---- create ----------------------------------------------------------------------------

    def test_create_matches_qemu_img_byte_for_byte(self):
        cases = [
            ([], "64M"),
            (["compat=0.10"], "64M"),
            (["cluster_size=512"], "16M"),
            (["cluster_size=4096", "refcount_bits=1"], "64M"),
            (["cluster_size=2M", "refcount_bits=64"], "64M"),
            (["refcount_bits=8"], "100G"),
            (["lazy_refcounts=on"], "1G"),
            (["extended_l2=on"], "64M"),
            (["compression_type=zstd"], "64M"),
            (["preallocation=metadata"], "16M"),
            (["preallocation=falloc"], "4M"),
            (["preallocation=full", "cluster_size=4096"], "4M"),
            (["backing_file=base.raw", "backing_fmt=raw"], None),
            (["backing_file=base.qcow2", "backing_fmt=qcow2"], "32M"),
            (["data_file=disk.data"], "64M"),
            (["data_file=disk.data", "data_file_raw=on"], "16M"),
            (["data_file=disk.data", "preallocation=metadata", "cluster_size=512"], "3M"),
            (["data_file=disk.data", "preallocation=falloc", "extended_l2=on"], "8M"),
            (["data_file=disk.data", "preallocation=full", "cluster_size=4096"], "4M"),
            (["data_file=disk.data", "backing_file=base.qcow2", "backing_fmt=qcow2"], None),
        ]
        for index, (options, size) in enumerate(cases):
            with self.subTest(options=options, size=size):
                outputs = []
                for tool in ("qemu", "spindle"):
                    folder = self.path(f"{tool}-{index}")
                    os.mkdir(folder)
                    qemu_img("create", "-q", "-f", "raw", "base.raw", "8M", cwd=folder)
                    qemu_img("create", "-q", "-f", "qcow2", "base.qcow2", "8M", cwd=folder)
                    args = ["create", "-f", "qcow2"] + (["-o", ",".join(options)]
                                                        if options else [])
                    args += ["disk.qcow2"] + ([size] if size else [])
                    runner = qemu_img if tool == "qemu" else img
                    proc = runner(*args, cwd=folder)
                    outputs.append((proc.stdout, os.path.join(folder, "disk.qcow2")))
                (qemu_out, qemu_file), (our_out, our_file) = outputs
                self.assertEqual(our_out, qemu_out)
                self.assertTrue(qemu_out.startswith("Formatting 'disk.qcow2', fmt=qcow2 "))
                self.assert_same_file(qemu_file, our_file)
                self.qemu_check_clean(our_file, cwd=os.path.dirname(our_file))
                if any(o.startswith("data_file=") for o in options):
                    # The data file: the virtual size, allocated with falloc and full.
                    theirs, ours = (os.path.join(os.path.dirname(f), "disk.data")
                                    for f in (qemu_file, our_file))
                    self.assert_same_file(theirs, ours)
                    if any(o in options for o in ("preallocation=falloc", "preallocation=full")):
                        self.assertGreaterEqual(os.stat(ours).st_blocks * 512,
                                                os.stat(ours).st_size)

    def test_create_with_backing_flag_defaults_size(self):
        base = self.make_image("base.raw", 3 * MiB)
        out = img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "ovl.qcow2",
                  cwd=self.tmp)
        theirs = qemu_img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "q.qcow2",
                          cwd=self.tmp)
        self.assertEqual(out.stdout.replace("ovl.qcow2", "q.qcow2"), theirs.stdout)
        self.assert_same_file(self.path("ovl.qcow2"), self.path("q.qcow2"))
        info = json.loads(qemu_img("info", "--output=json", self.path("ovl.qcow2")).stdout)
        self.assertEqual(info["virtual-size"], 3 * MiB)
        self.assertEqual(info["full-backing-filename"], base)

    # ---- convert ---------------------------------------------------------------------------

    def pattern_source(self, size=12 * MiB):
        """A raw image of data runs (random and repeating), holes and allocated zeros."""
        return self.make_image("source.raw", size, [
            (0, os.urandom(300 * KiB)), (1 * MiB + 512, si.pattern(1, 700 * KiB)),
            (4 * MiB, bytes(256 * KiB)), (4 * MiB + 256 * KiB, b"\x5a" * 4096),
            (7 * MiB - 2048, os.urandom(64 * KiB)), (size - 4096, si.pattern(2, 4096))])

    def test_convert_to_qcow2_checks_and_compares(self):
        source = self.pattern_source()
        for options in ([], ["compat=0.10"], ["cluster_size=4096", "refcount_bits=1"],
                        ["cluster_size=2M"], ["extended_l2=on"]):
            with self.subTest(options=options):
                out = self.path("out.qcow2")
                extra = ["-o", ",".join(options)] if options else []
                img("convert", "-f", "raw", "-O", "qcow2", *extra, source, out)
                self.qemu_check_clean(out)
                self.qemu_compare(out, "qcow2", source, "raw")
                info = json.loads(qemu_img("info", "--output=json", out).stdout)
                self.assertEqual(info["virtual-size"], os.path.getsize(source))
                # Holes and zeros stay unallocated: no more data than qemu-img's conversion.
                theirs = self.path("theirs.qcow2")
                qemu_img("convert", "-f", "raw", "-O", "qcow2", *extra, source, theirs)

                def data_bytes(image):
                    return sum(e["length"] for e in
                               json.loads(qemu_img("map", "--output=json", image).stdout)
                               if e["data"])
                self.assertLessEqual(data_bytes(out), data_bytes(theirs))
                os.unlink(out)
                os.unlink(theirs)

    @staticmethod
    def layout(image):
        """qemu-img map of `image` without host offsets, adjacent equal runs merged: what is
        data, zero, compressed (data without an offset) or a hole, whatever the packing."""
        runs = []
        for e in json.loads(qemu_img("map", "--output=json", image).stdout):
            key = (e["data"], e["zero"], e["present"], e["data"] and "offset" not in e)
            if runs and runs[-1][2] == key and runs[-1][0] + runs[-1][1] == e["start"]:
                runs[-1][1] += e["length"]
            else:
                runs.append([e["start"], e["length"], key])
        return runs

    def test_convert_compressed_checks_and_compares(self):
        # Random (incompressible: stored as plain clusters), repeating, zero and hole ranges;
        # the size leaves the last 64k and 2M clusters short.
        source = self.pattern_source(12 * MiB - 3 * 512)
        cases = [("zlib", []), ("zstd", []), ("zlib", ["compat=0.10"]),
                 ("zlib", ["cluster_size=4096"]), ("zstd", ["cluster_size=2M"]),
                 ("zlib", ["cluster_size=512"]), ("zlib", ["cluster_size=4096", "refcount_bits=1"]),
                 ("zstd", ["extended_l2=on"])]
        for compression_type, options in cases:
            with self.subTest(compression_type=compression_type, options=options):
                opts = list(options)
                if "compat=0.10" not in options:
                    opts.append(f"compression_type={compression_type}")
                out = self.path("ours.qcow2")
                theirs = self.path("theirs.qcow2")
                plain = self.path("plain.qcow2")
                img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", ",".join(opts), source, out)
                qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", ",".join(opts),
                         source, theirs)
                img("convert", "-f", "raw", "-O", "qcow2", "-o", ",".join(opts), source, plain)
                self.qemu_check_clean(out)
                self.qemu_compare(out, "qcow2", source, "raw")
                self.assertEqual(img("compare", "-f", "qcow2", "-F", "raw", out, source,
                                     check=False).returncode, 0)
                check = json.loads(qemu_img("check", "--output=json", out).stdout)
                self.assertGreater(check.get("compressed-clusters", 0), 0, check)
                info = json.loads(qemu_img("info", "--output=json", out).stdout)
                if "compat=0.10" not in options:
                    self.assertEqual(info["format-specific"]["data"]["compression-type"],
                                     compression_type)
                # The same clusters compressed, stored plain (incompressible) and left out
                # (zeros) as qemu-img convert -c decides.
                self.assertEqual(self.layout(out), self.layout(theirs))
                # Packed byte-wise: smaller than the plain copy, close to qemu's file.
                self.assertLess(os.path.getsize(out), os.path.getsize(plain))
                self.assertLessEqual(os.path.getsize(out), os.path.getsize(theirs) * 1.05 + 65536)
                for path in (out, theirs, plain):
                    os.unlink(path)

    def test_convert_into_an_existing_image(self):
        # -n: old data where the source has zeros or holes is zeroed; what lies past the
        # source's size stays; the same result as qemu-img convert -n.
        source = self.pattern_source(12 * MiB)
        for fmt in ("qcow2", "raw"):
            with self.subTest(fmt=fmt):
                ours = self.path(f"existing.{fmt}")
                qemu_img("create", "-q", "-f", fmt, ours, "14M")
                qemu_io(fmt, ours, ["write -P 0x99 0 14M"])
                theirs = self.path(f"theirs.{fmt}")
                shutil.copy(ours, theirs)
                img("convert", "-n", "-f", "raw", "-O", fmt, source, ours)
                qemu_img("convert", "-n", "-f", "raw", "-O", fmt, source, theirs)
                if fmt == "qcow2":
                    self.qemu_check_clean(ours)
                self.qemu_compare(ours, fmt, theirs, fmt)
        small = self.path("small.raw")
        qemu_img("create", "-q", "-f", "raw", small, "1M")
        for args, message in ((["-n", "-O", "raw", source, small],
                               "output file is smaller than input file"),
                              (["-n", "-o", "cluster_size=4k", "-O", "qcow2", source, small],
                               "-o has no effect when skipping image creation")):
            proc = img("convert", *args, check=False)
            self.assertEqual(proc.returncode, 1)
            self.assertIn(message, proc.stderr)

    def test_convert_compressed_refuses_formats_without_compression(self):
        source = self.pattern_source(1 * MiB)
        for fmt in ("raw", "qed"):
            with self.subTest(fmt=fmt):
                out = self.path(f"out.{fmt}")
                proc = img("convert", "-c", "-O", fmt, source, out, check=False)
                self.assertEqual(proc.returncode, 1)
                self.assertIn("Compression not supported for this file format", proc.stderr)
                self.assertFalse(os.path.exists(out))

    def test_compressed_image_from_spindle_written_through_spindle_nbd(self):
        # Overwrites of compressed clusters (whole and partial) allocate plain clusters and
        # release the shared host clusters' references: check stays clean.
        source = self.pattern_source(4 * MiB)
        image = self.path("c.qcow2")
        img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", source,
            image)
        model = self.path("model.qcow2")
        shutil.copy(image, model)
        writes = ["write -P 0x61 1M+512 8k", "write -P 0x62 4k 4k", "write -z 1M+64k 64k",
                  "discard 1M+256k 64k", "flush"]
        self.write_through_nbd_like_qemu_io(image, model, writes, unmap=True)

    def test_convert_qcow2_chain_to_qcow2(self):
        base = self.make_image("base.raw", 8 * MiB, [(0, os.urandom(2 * MiB))])
        overlay = self.create_qcow2("overlay.qcow2", None, backing="base.raw",
                                    backing_fmt="raw", cwd=self.tmp)
        qemu_io("qcow2", overlay, ["write -P 0x11 1M 64k", "write -z 1536k 8k"])
        out = self.path("flat.qcow2")
        img("convert", "-O", "qcow2", overlay, out)
        self.qemu_check_clean(out)
        self.qemu_compare(out, "qcow2", overlay, "qcow2")
        self.assertNotIn("backing-filename",
                         json.loads(qemu_img("info", "--output=json", out).stdout))
        self.assertTrue(os.path.exists(base))

    def test_convert_with_backing_file_as_qemu_img(self):
        # -B: the target has the given backing file and holds only what differs from it
        # (zeros over backing data written as zeros); the same guest view as the source.
        base = self.make_image("b.raw", 4 * MiB, [(0, os.urandom(2 * MiB))])
        top = self.create_qcow2("top.qcow2", None, backing="b.raw", backing_fmt="raw",
                                cwd=self.tmp)
        qemu_io("qcow2", top, ["write -P 0x11 1M 64k", "write -z 256k 64k",
                               "write -P 0x22 3M 8k"])
        flat = self.path("flat.raw")
        qemu_img("convert", "-O", "raw", top, flat)
        ours, theirs = self.path("ours.qcow2"), self.path("theirs.qcow2")
        img("convert", "-O", "qcow2", "-B", base, "-F", "raw", flat, ours)
        qemu_img("convert", "-O", "qcow2", "-B", base, "-F", "raw", flat, theirs)
        self.qemu_check_clean(ours)
        self.qemu_compare(ours, "qcow2", flat, "raw")
        info = json.loads(qemu_img("info", "--output=json", ours).stdout)
        self.assertEqual(info["backing-filename"], base)
        self.assertEqual(info["backing-filename-format"], "raw")
        self.assertEqual(self.data_clusters(ours), self.data_clusters(theirs))
        proc = img("convert", "-O", "qcow2", "-B", base, flat, self.path("nofmt.qcow2"),
                   check=False)
        self.assertEqual(proc.returncode, 1)
        self.assertIn("Use of backing file requires explicit backing format", proc.stderr)

    def test_convert_into_an_external_data_file(self):
        # -o data_file: the data lands in the data file at its guest offsets; qemu-img reads
        # the result as the source (from the image's directory, where qemu-img 7.2 looks).
        source = self.pattern_source(6 * MiB)
        for options in ("data_file=out.data", "data_file=out.data,data_file_raw=on"):
            with self.subTest(options=options):
                img("convert", "-f", "raw", "-O", "qcow2", "-o", options, source, "out.qcow2",
                    cwd=self.tmp)
                self.qemu_check_clean("out.qcow2", cwd=self.tmp)
                proc = qemu_img("compare", "-f", "raw", source, "out.qcow2", cwd=self.tmp,
                                check=False)
                self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
                if "data_file_raw=on" in options:
                    self.qemu_compare(self.path("out.data"), "raw", source, "raw")

    def data_clusters(self, image):
        """The guest ranges the image itself allocates (qemu-img map, depth 0)."""
        entries = json.loads(qemu_img("map", "--output=json", image).stdout)
        return [(e["start"], e["length"], e["zero"]) for e in entries
                if e["depth"] == 0 and (e["data"] or e["zero"])]

    PROGRESS = re.compile(r"^(    \(\d{1,3}\.\d\d/100%\)\r)+")

    def assert_progress(self, stdout, result=""):
        """-p as qemu-img prints it on stdout: lines rewritten with \\r, from 0% to 100%."""
        self.assertTrue(stdout.startswith("    (0.00/100%)\r"), repr(stdout))
        match = self.PROGRESS.match(stdout)
        self.assertIsNotNone(match, repr(stdout))
        self.assertTrue(match.group(0).endswith("    (100.00/100%)\r"), repr(stdout))
        self.assertEqual(stdout[match.end():], result + "\n", repr(stdout))

    def test_progress_on_stdout_as_qemu_img(self):
        source = self.pattern_source(4 * MiB)
        out = self.path("p.qcow2")
        for tool in (img, qemu_img):
            with self.subTest(tool=tool.__name__):
                self.assert_progress(tool("convert", "-p", "-f", "raw", "-O", "qcow2", source,
                                          out).stdout)
                self.assert_progress(tool("compare", "-p", "-f", "raw", source, out).stdout,
                                     "Images are identical.\n")
                self.assert_progress(tool("amend", "-p", "-o", "lazy_refcounts=on", out).stdout)
                self.assertEqual(tool("convert", "-p", "-q", "-f", "raw", "-O", "qcow2", source,
                                      out).stdout, "")
        qemu_io("qcow2", out, ["write -P 0x77 3M 4k"])
        for tool in (img, qemu_img):
            with self.subTest(tool=tool.__name__, what="mismatch"):
                proc = tool("compare", "-p", "-f", "raw", source, out, check=False)
                self.assertEqual(proc.returncode, 1)
                self.assertTrue(proc.stdout.endswith("Content mismatch at offset 3145728!\n\n"),
                                repr(proc.stdout))

    # ---- measure ---------------------------------------------------------------------------

    def assert_measures_like_qemu(self, *args):
        for output in ("human", "json"):
            mine = img("measure", f"--output={output}", *args, check=False)
            qemus = qemu_img("measure", f"--output={output}", *args, check=False)
            self.assertEqual((mine.returncode, mine.stdout), (qemus.returncode, qemus.stdout),
                             (args, mine.stderr))
            self.assertEqual(mine.stderr.replace("spindle-img: ", ""),
                             qemus.stderr.replace("qemu-img: ", ""), args)

    def test_measure_sizes_as_qemu_img(self):
        for options in ([], ["-o", "cluster_size=512"], ["-o", "cluster_size=2M,refcount_bits=1"],
                        ["-o", "extended_l2=on"], ["-o", "preallocation=metadata"],
                        ["-o", "preallocation=falloc"], ["-o", "preallocation=full"],
                        ["-o", "compat=0.10", "-o", "cluster_size=4k"],
                        ["-o", "refcount_bits=64,lazy_refcounts=on"],
                        ["-o", "backing_file=x,backing_fmt=raw"],
                        ["-o", "compat=0.10,extended_l2=on"]):
            for size in ("0", "1000", "1G", "3T"):
                with self.subTest(options=options, size=size):
                    self.assert_measures_like_qemu("-O", "qcow2", *options, "--size", size)
        for size in ("1000", "1G"):
            self.assert_measures_like_qemu("--size", size)
            self.assert_measures_like_qemu("-O", "raw", "-o", "preallocation=full",
                                           "--size", size)

    def test_measure_images_as_qemu_img(self):
        image = self.create_qcow2("m.qcow2", 10 * MiB)
        qemu_io("qcow2", image, ["write 0 1k", "write -z 1M 64k", "write 3M 70k",
                                 "write 9M 4k"])
        old = self.create_qcow2("m2.qcow2", 10 * MiB, ["compat=0.10"])
        qemu_io("qcow2", old, ["write 5M 4k"])
        top = self.create_qcow2("top.qcow2", None, backing="m.qcow2", backing_fmt="qcow2",
                                cwd=self.tmp)
        qemu_io("qcow2", top, ["write 5M 4k", "write -z 3M 64k"])
        flat = self.path("m.raw")
        qemu_img("convert", "-O", "raw", image, flat)
        odd = self.make_image("odd.raw", 0, [(0, os.urandom(1000))])
        bitmaps = self.create_qcow2("bm.qcow2", 100 * MiB)
        qemu_img("bitmap", "--add", "-g", "64k", bitmaps, "b0")
        qemu_img("bitmap", "--add", "-g", "512", bitmaps, "a-longer-name-123")
        for source in (image, old, top, flat, odd, bitmaps):
            for options in ([], ["-O", "qcow2"], ["-O", "qcow2", "-o", "cluster_size=4k"],
                            ["-O", "qcow2", "-o", "compat=0.10"],
                            ["-O", "qcow2", "-o", "extended_l2=on,cluster_size=2M"],
                            ["-O", "qcow2", "-o", "backing_file=x,backing_fmt=raw"]):
                with self.subTest(source=os.path.basename(source), options=options):
                    self.assert_measures_like_qemu(*options, source)

    def test_measure_refuses_what_qemu_img_refuses(self):
        image = self.create_qcow2("r.qcow2", 1 * MiB)
        for args in (["-O", "qcow2"], ["--size", "1G", image], ["-O", "qcow2", "-f", "qcow2",
                                                                "--size", "1G"],
                     ["-O", "qed", "--size", "1G"], ["-O", "vmdk", "--size", "1G"],
                     ["-O", "bogus", "--size", "1G"],
                     ["--size", "abc"], ["--size", "100E"], ["--size", "9223372036854775808"],
                     ["-O", "qcow2", "--size", "4P", "-o", "cluster_size=512"],
                     ["-O", "raw", "-o", "backing_file=x", "--size", "1M"]):
            with self.subTest(args=args):
                self.assert_measures_like_qemu(*args)
        for option in ("foo=bar", "cluster_size=abc", "cluster_size=1000",
                       "extended_l2=maybe", "extended_l2=on,cluster_size=4k", "compat=0.9",
                       "compat=v3",
                       "refcount_bits=3", "refcount_bits=abc", "refcount_bits=8,compat=0.10",
                       "preallocation=bogus", "lazy_refcounts=x"):
            with self.subTest(option=option):
                mine = img("measure", "-O", "qcow2", "-o", option, "--size", "1G", check=False)
                qemus = qemu_img("measure", "-O", "qcow2", "-o", option, "--size", "1G",
                                 check=False)
                self.assertEqual((mine.returncode, qemus.returncode), (1, 1))
                # qemu adds a hint after a bad number (the suffixes it takes): not repeated.
                theirs = [line for line in qemus.stderr.replace("qemu-img: ", "").splitlines()
                          if not line.startswith(("Optional suffix", "and exabytes"))]
                self.assertEqual(mine.stderr.replace("spindle-img: ", "").splitlines(), theirs)

    # ---- amend -----------------------------------------------------------------------------

    def amend_pair(self, name, create_options, writes, backing=None):
        """Two copies of one image (qemu-io writes), for spindle-img and qemu-img amend."""
        image = self.create_qcow2(name, 4 * MiB, create_options, backing=backing,
                                  backing_fmt="raw" if backing else None, cwd=self.tmp)
        if writes:
            qemu_io("qcow2", image, writes)
        theirs = self.path("theirs-" + name)
        shutil.copy(image, theirs)
        return image, theirs

    def assert_same_header_cluster(self, ours, theirs, cluster_size=65536):
        with open(ours, "rb") as a, open(theirs, "rb") as b:
            self.assertEqual(a.read(cluster_size), b.read(cluster_size))

    def test_amend_compat_and_lazy_refcounts_as_qemu_img(self):
        writes = ["write -P 1 0 64k", "write -z 128k 64k", "write -z 320k 4k",
                  "write -P 2 1M 100k", "write -z -u 2M 64k"]
        steps = [["compat=0.10"], ["compat=1.1"], ["lazy_refcounts=on"], ["lazy_refcounts=off"],
                 ["compat=0.10,lazy_refcounts=off"], ["compat=v3,lazy_refcounts=on"],
                 ["size=8M"], ["refcount_bits=8"], ["refcount_bits=16,compat=0.10"]]
        for create_options in ([], ["lazy_refcounts=on"], ["cluster_size=4096"]):
            with self.subTest(create_options=create_options):
                ours, theirs = self.amend_pair("amend.qcow2", create_options, writes)
                for step in steps:
                    img("amend", "-o", step[0], ours)
                    qemu_img("amend", "-o", step[0], theirs)
                    self.qemu_check_clean(ours)
                    self.qemu_compare(ours, "qcow2", theirs, "qcow2")
                    if not step[0].startswith(("size=", "refcount_bits=")) and \
                            "refcount_bits=" not in " ".join(s[0] for s in steps[:steps.index(step)]):
                        # (qemu-img moves the L1 table on every growth, we keep it where it
                        # fits; the refcount structures of a width change are placed
                        # differently: from those steps on the headers may differ.)
                        cluster = 4096 if "cluster_size=4096" in create_options else 65536
                        self.assert_same_header_cluster(ours, theirs, cluster)
                    ours_info = json.loads(qemu_img("info", "--output=json", ours).stdout)
                    theirs_info = json.loads(qemu_img("info", "--output=json", theirs).stdout)
                    for key in ("virtual-size", "format-specific"):
                        self.assertEqual(ours_info[key], theirs_info[key], step)
                # 1- and 64-bit refcounts (qemu-img takes seconds to widen 1-bit ones: ours
                # alone).
                for step, bits in (("compat=1.1,refcount_bits=1", 1), ("refcount_bits=64", 64)):
                    img("amend", "-o", step, ours)
                    self.qemu_check_clean(ours)
                    self.qemu_compare(ours, "qcow2", theirs, "qcow2")
                    self.assertEqual(json.loads(qemu_img("info", "--output=json", ours).stdout)
                                     ["format-specific"]["data"]["refcount-bits"], bits)
                os.unlink(ours)
                os.unlink(theirs)

    def test_amend_downgrade_over_a_backing_file_keeps_the_zeros(self):
        # v3 zero clusters hide the backing file's data; v2 has no zero flag, so they become
        # allocated zeros.
        backing = self.make_image("base.raw", 4 * MiB, [(0, b"\x77" * (4 * MiB))])
        ours, theirs = self.amend_pair("over.qcow2", [], ["write -z 64k 128k", "write -P 3 1M 4k",
                                                          "write -z 2M+4k 4k"],
                                       backing=os.path.basename(backing))
        img("amend", "-o", "compat=0.10", ours)
        qemu_img("amend", "-o", "compat=0.10", theirs)
        self.qemu_check_clean(ours)
        self.qemu_compare(ours, "qcow2", theirs, "qcow2")
        info = json.loads(qemu_img("info", "--output=json", ours).stdout)
        self.assertEqual(info["format-specific"]["data"]["compat"], "0.10")
        zeros = [e for e in json.loads(qemu_img("map", "--output=json", ours).stdout)
                 if e["depth"] == 0 and e["start"] == 64 * KiB]
        self.assertTrue(zeros and zeros[0]["data"], zeros)  # allocated, not a zero flag

    def test_amend_refuses_what_qemu_img_refuses(self):
        cases = [  # (create options, amend -o, reason)
            ([], "cluster_size=4096", "create-only option"),
            ([], "preallocation=full", "create-only option"),
            ([], "encrypt.format=luks", "create-only option"),
            ([], "encrypt.state=active", "no encryption"),
            ([], "foo=1", "unknown option"),
            ([], "compat=2", "unknown level"),
            (["compat=0.10"], "lazy_refcounts=on", "v2 lazy refcounts"),
            ([], "compat=0.10,lazy_refcounts=on", "v2 lazy refcounts"),
            ([], "lazy_refcounts=maybe", "bad boolean"),
            ([], "refcount_bits=abc", "bad number"),
            ([], "refcount_bits=3", "not a power of two"),
            ([], "refcount_bits=8,compat=0.10", "v2 refcount width"),
            (["refcount_bits=8"], "compat=0.10", "v2 refcount width"),
            (["extended_l2=on"], "compat=0.10", "extended L2"),
            ([], "size=abc", "bad size"),
            ([], "backing_file=x.qcow2", "backing file"),
            ([], "data_file=x", "no data file"),
            ([], "data_file_raw=on", "no data file"),
        ]
        # Three compressed clusters share a host cluster: its refcount is 3.
        shared = ["write -c -P 1 0 4k", "write -c -P 2 4k 4k", "write -c -P 3 8k 4k"]
        cases.append((["cluster_size=4096"], "refcount_bits=1", "refcount too large", shared))
        for create_options, amend, reason, *writes in cases:
            with self.subTest(amend=amend, reason=reason):
                ours, theirs = self.amend_pair("refused.qcow2", create_options,
                                               writes[0] if writes else ["write 0 4k"])
                before = read_file(ours)
                mine = img("amend", "-o", amend, ours, check=False)
                qemus = qemu_img("amend", "-o", amend, theirs, check=False)
                self.assertEqual(qemus.returncode, 1, qemus.stderr)
                self.assertEqual(mine.returncode, 1, mine.stderr)
                self.assertEqual(mine.stderr.replace("spindle-img: ", ""),
                                 qemus.stderr.replace("qemu-img: ", ""))
                self.assertEqual(read_file(ours), before)
                os.unlink(ours)
                os.unlink(theirs)
        raw = self.make_image("plain.raw", 1 * MiB, [])
        mine = img("amend", "-f", "raw", "-o", "size=2M", raw, check=False)
        self.assertEqual(mine.returncode, 1)
        self.assertIn("Format driver 'raw' does not support option amendment", mine.stderr)
        mine = img("amend", raw, check=False)
        self.assertEqual(mine.returncode, 1)
        self.assertIn("Must specify options (-o)", mine.stderr)

    # ---- writing through spindle-nbd -------------------------------------------------------

    NBD_WRITES = ["write -P 0x11 100k 300k",      # overwrite and allocate, unaligned
                  "write -P 0x22 3M+512 5000",    # partial clusters at both ends
                  "write -z 0 64k",               # zero allocated data
                  "write -z -u 200k 1M",          # zero with unmap across allocated clusters
                  "write -z 9M 4k",               # zero inside an unallocated cluster
                  "discard 15M 1M",               # discard allocated clusters
                  "write -P 0x33 15M+4k 4k",      # ...and write into the discarded range
                  "write -f -P 0x44 12M 64k",     # FUA
                  "flush"]

    def test_nbd_writes_match_a_qemu_io_model(self):
        for index, options in enumerate(
                ([], ["compat=0.10"], ["cluster_size=4096", "refcount_bits=1"],
                 ["cluster_size=512"], ["extended_l2=on"], ["lazy_refcounts=on"])):
            with self.subTest(options=options):
                image = self.create_qcow2(f"disk{index}.qcow2", 16 * MiB, options)
                qemu_io("qcow2", image, STANDARD_WRITES)
                model = self.path(f"model{index}.qcow2")
                shutil.copy(image, model)
                self.write_through_nbd_like_qemu_io(image, model, self.NBD_WRITES, unmap=True)

    def test_nbdcopy_multi_conn_upload(self):
        size = 32 * MiB
        image = self.create_qcow2("disk.qcow2", size)
        qemu_io("qcow2", image, ["write -P 0x99 0 4M", "write -P 0x98 20M 2M"])
        source = self.make_image("source.raw", size, [
            (0, os.urandom(3 * MiB)), (5 * MiB, os.urandom(64 * KiB)),
            (9 * MiB + 4096, os.urandom(2 * MiB)), (21 * MiB + 512, os.urandom(1 * MiB)),
            (size - 64 * KiB, os.urandom(64 * KiB))])
        server = self.server(image, ["-f", "qcow2"])
        h = self.connect(server.uri())
        self.assertTrue(h.can_multi_conn())
        del h
        self.handles.clear()
        run(["nbdcopy", "--connections=4", "--threads=4", "--flush", source, server.uri()],
            timeout=90)
        self.qemu_compare(source, "raw", server.uri(), "raw")
        self.stop_cleanly(server)
        self.qemu_check_clean(image)
        self.qemu_compare(image, "qcow2", source, "raw")

    def test_fio_verify_4_jobs(self):
        # Concurrent allocating writes from 4 connections (iodepth 16 each) on a fresh image.
        image = self.create_qcow2("disk.qcow2", 64 * MiB)
        server = self.server(image, ["-f", "qcow2"])
        proc = si.run_text(["fio", "--name=qcow2", "--ioengine=nbd", f"--uri={server.uri()}",
                            "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=6m",
                            "--numjobs=4", "--offset_increment=16m", "--verify=crc32c",
                            "--verify_fatal=1", "--randseed=99", "--output-format=json"],
                           timeout=120, check=False)
        out = proc.stdout
        self.assertEqual(proc.returncode, 0, out[-3000:] + proc.stderr[-2000:])
        doc = json.loads(out[out.find("{"):])
        self.assertEqual(len(doc["jobs"]), 4)
        for job in doc["jobs"]:
            self.assertEqual(job["error"], 0)
            self.assertEqual(job["write"]["io_bytes"], 6 * MiB)
            self.assertEqual(job["read"]["io_bytes"], 6 * MiB, "verify phase did not run")
        dump = self.path("dump.raw")
        run(["nbdcopy", server.uri(), dump], timeout=60)
        self.stop_cleanly(server)
        self.qemu_check_clean(image)
        self.qemu_compare(image, "qcow2", dump, "raw")

    OVERLAY_WRITES = ["write -P 0x11 1M+512 4k",     # partial cluster: copy-on-write
                      "write -P 0x12 3M 64k",        # a whole cluster
                      "write -z 5M+4k 8k",           # zeroes inside a backed cluster
                      "write -P 0x13 6M-2k 4k",      # across a cluster boundary
                      "write -P 0x14 7M+1 3",        # tiny and unaligned
                      "discard 2M 128k",             # discarded overlay over backing data
                      "flush"]

    def test_overlay_writes_copy_on_write(self):
        cases = (("qcow2", []), ("raw", ["extended_l2=on"]), ("qcow2", ["cluster_size=4096"]),
                 ("raw", ["compat=0.10"]))
        for index, (backing_fmt, options) in enumerate(cases):
            with self.subTest(backing_fmt=backing_fmt, options=options):
                folder = self.path(str(index))
                os.mkdir(folder)
                random_base = self.make_image(f"{index}/random.raw", 8 * MiB,
                                              [(0, os.urandom(7 * MiB))])
                base = self.path(f"{index}/base.{backing_fmt}")
                if backing_fmt == "qcow2":
                    qemu_img("convert", "-f", "raw", "-O", "qcow2", random_base, base)
                else:
                    os.rename(random_base, base)
                base_before = read_file(base)
                overlay = self.create_qcow2(f"{index}/overlay.qcow2", None, options,
                                            backing=os.path.basename(base),
                                            backing_fmt=backing_fmt, cwd=self.tmp)
                qemu_io("qcow2", overlay, ["write -P 0x10 64k 4k"])
                model = self.path(f"{index}/model.qcow2")
                shutil.copy(overlay, model)  # same folder: the relative backing name holds
                self.write_through_nbd_like_qemu_io(overlay, model, self.OVERLAY_WRITES, unmap=True)
                self.assertEqual(read_file(base), base_before, "the backing file changed")
                # Copy-on-write really copied: the overlay alone holds the backing bytes
                # around the partial write.
                rebased = self.path(f"{index}/alone.qcow2")
                shutil.copy(overlay, rebased)
                qemu_img("rebase", "-u", "-b", "", rebased)
                alone = self.qemu_raw(rebased, name=f"{index}/alone.raw")
                full = self.qemu_raw(overlay, name=f"{index}/full.raw")
                self.assertEqual(read_file(alone)[1 * MiB:1 * MiB + 512],
                                 read_file(full)[1 * MiB:1 * MiB + 512],
                                 "partial cluster not copied")

    SUBCLUSTER_WRITES = ["write -P 0x21 0 4k",           # subclusters of a fresh cluster
                         "write -P 0x22 64k+3k 1k",      # inside one: the rest copied
                         "write -P 0x23 128k+10k-1 2",   # across two subclusters, a zero cluster
                         "write -P 0x24 8k 6k",          # more of a partly allocated cluster
                         "write -P 0x25 192k+1 100",     # inside an allocated subcluster
                         "write -P 0x26 192k+2k-100 4k",  # from one into the next two
                         "write -P 0x27 1M-1k 130k",     # across clusters: tail, whole, head
                         "flush"]
    # Zeroes inside clusters: whole subclusters get zero bits, the rest is written as zeros.
    SUBCLUSTER_ZEROES = ["write -z 8k 6k",               # allocated subclusters, aligned
                         "write -z 64k+2k+1 6k",         # unaligned at both ends
                         "write -z 2M+4k 8k",            # a cluster with nothing allocated
                         "write -z 1M-1k 4k+512",        # across a cluster boundary
                         "flush"]

    def test_extended_l2_writes_as_sparse_as_qemu(self):
        # Allocating writes through spindle-nbd allocate only the subclusters written: the same
        # L2 bitmaps and host offsets as qemu-io's, so qemu-img map is the same, entry for entry.
        cases = ((["extended_l2=on"], True), (["extended_l2=on", "cluster_size=128k"], False))
        for index, (options, with_backing) in enumerate(cases):
            with self.subTest(options=options, backing=with_backing):
                folder = self.path(str(index))
                os.mkdir(folder)
                backing, backing_fmt = None, None
                if with_backing:
                    self.make_image(f"{index}/base.raw", 4 * MiB, [(0, os.urandom(3 * MiB))])
                    backing, backing_fmt = "base.raw", "raw"
                image = self.create_qcow2(f"{index}/disk.qcow2", 4 * MiB, options,
                                          backing=backing, backing_fmt=backing_fmt,
                                          cwd=self.tmp)
                qemu_io("qcow2", image, ["write -z 128k 128k", "write -P 0x10 192k 2k"])
                model = self.path(f"{index}/model.qcow2")
                shutil.copy(image, model)
                self.write_through_nbd_like_qemu_io(image, model, self.SUBCLUSTER_WRITES)
                self.write_through_nbd_like_qemu_io(image, model, self.SUBCLUSTER_ZEROES)
                ours = json.loads(qemu_img("map", "--output=json", image).stdout)
                theirs = json.loads(qemu_img("map", "--output=json", model).stdout)
                self.assert_map_matches(ours, theirs, f"map {options}")
                # Not whole clusters: the first write's 4k stand alone.
                self.assertEqual((ours[0]["start"], ours[0]["length"], ours[0]["data"]),
                                 (0, 4 * KiB, True))

    SNAPSHOT_WRITES = ["write -P 0xcc 4k 8k",      # partial: copies the shared data cluster
                       "write -P 0xdd 3M 64k",     # a fresh cluster in a shared L2 table
                       "write -P 0xee 2M 4k",      # a shared cluster again
                       "write -P 0x11 1020k 8k"]   # across a cluster boundary

    def test_writes_into_an_image_with_an_internal_snapshot(self):
        # The snapshot shares every L2 table and data cluster with the active image: writes
        # copy the tables and clusters they touch and leave the snapshot's content intact.
        for cluster in (65536, 4096):
            with self.subTest(cluster_size=cluster):
                image = self.create_qcow2(f"snap{cluster}.qcow2", 4 * MiB,
                                          [f"cluster_size={cluster}"])
                qemu_io("qcow2", image, ["write -P 0xaa 0 1M", "write -P 0xbb 2M 64k"])
                qemu_img("snapshot", "-c", "s1", image)
                model = self.path(f"model{cluster}.qcow2")
                shutil.copy(image, model)
                self.write_through_nbd_like_qemu_io(image, model, self.SNAPSHOT_WRITES)
                qemu_img("snapshot", "-a", "s1", image)
                qemu_io("qcow2", image, ["read -P 0xaa 0 1M", "read -P 0xbb 2M 64k",
                                         "read -P 0 3M 64k"])
                self.qemu_check_clean(image)

    def test_resize_grow(self):
        image = self.create_qcow2("disk.qcow2", 4 * MiB, ["cluster_size=4096"])
        qemu_io("qcow2", image, ["write -P 0x71 0 1M", "write -P 0x72 4M-4k 4k"])
        model = self.path("model.qcow2")
        shutil.copy(image, model)
        out = img("resize", "-f", "qcow2", image, "+60M")
        self.assertIn("Image resized.", out.stdout)
        qemu_img("resize", "-f", "qcow2", model, "+60M")
        self.qemu_check_clean(image)
        info = json.loads(qemu_img("info", "--output=json", image).stdout)
        self.assertEqual(info["virtual-size"], 64 * MiB)
        self.qemu_compare(image, "qcow2", model, "qcow2")
        # The grown range (L1 grew from 2 to 32 entries) reads zeros and takes writes.
        qemu_io("qcow2", image, ["read -P 0x72 4M-4k 4k", "read -P 0 4M 60M",
                                 "write -P 0x73 60M 1M", "read -P 0x73 60M 1M"])
        self.qemu_check_clean(image)
        self.assertEqual(img("resize", "-f", "qcow2", image, "8M", check=False).returncode, 1)

    # ---- check -----------------------------------------------------------------------------

    def make_image_with_data(self, name="data.qcow2"):
        image = self.create_qcow2(name, 4 * MiB)
        qemu_io("qcow2", image, ["write -P 0xab 0 200k", "write -P 0xcd 2M 64k"])
        return image

    def check_both(self, image, *extra):
        ours = img("check", *extra, "-f", "qcow2", "--output=json", image, check=False)
        theirs = qemu_img("check", *extra, "-f", "qcow2", "--output=json", image, check=False)
        return ours, theirs

    def test_check_clean_image(self):
        image = self.make_image_with_data()
        ours, theirs = self.check_both(image)
        self.assertEqual(theirs.returncode, 0)
        self.assertEqual(ours.returncode, 0, ours.stderr)
        self.assertEqual(json.loads(ours.stdout), json.loads(theirs.stdout))
        ours = img("check", image, check=False)
        theirs = qemu_img("check", image, check=False)
        self.assertEqual(ours.returncode, 0)
        self.assertEqual(ours.stdout, theirs.stdout)
        self.assertIn("No errors were found on the image.", ours.stdout)

    def test_check_matches_qemu_on_every_variant(self):
        # Clean images of every layout: the same counts (allocated, fragmented, compressed
        # clusters, image end offset) and the same text as qemu-img check.
        variants = {
            "v2": (["compat=0.10"], STANDARD_WRITES),
            "c512": (["cluster_size=512"], ["write -P 1 0 3000", "write -P 2 1M 100k"]),
            "rc1": (["cluster_size=4096", "refcount_bits=1"], STANDARD_WRITES),
            "c2M_rc64": (["cluster_size=2M", "refcount_bits=64"], ["write -P 1 0 3M"]),
            "ext_l2": (["extended_l2=on"], ["write -P 1 0 2k", "write -z 10k 4k"]),
            "lazy": (["lazy_refcounts=on"], STANDARD_WRITES),
        }
        for name, (options, writes) in variants.items():
            with self.subTest(name):
                image = self.create_qcow2(name + ".qcow2", 16 * MiB, options)
                qemu_io("qcow2", image, writes)
                ours, theirs = self.check_both(image)
                self.assertEqual(theirs.returncode, 0)
                self.assertEqual(ours.returncode, 0, ours.stdout + ours.stderr)
                self.assertEqual(json.loads(ours.stdout), json.loads(theirs.stdout))
                human_ours = img("check", image, check=False)
                self.assertEqual(human_ours.stdout, qemu_img("check", image).stdout)
        with self.subTest("compressed"):
            source = self.make_image("source.raw", 4 * MiB, [(0, b"\x41" * MiB),
                                                            (2 * MiB, os.urandom(128 * KiB))])
            image = self.path("compressed.qcow2")
            qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", source, image)
            ours, theirs = self.check_both(image)
            self.assertEqual(ours.returncode, 0, ours.stdout + ours.stderr)
            self.assertEqual(json.loads(ours.stdout), json.loads(theirs.stdout))
            self.assertGreater(json.loads(ours.stdout).get("compressed-clusters", 0), 0)

    def leak_one_cluster(self, image):
        """Appends a cluster and gives it refcount 1: one leaked cluster, nothing else."""
        header = qcow2_header(image)
        self.assertEqual(header["refcount_order"], 4)
        cluster = 1 << header["cluster_bits"]
        with open(image, "r+b") as f:
            f.seek(header["refcount_table_offset"])
            block = struct.unpack(">Q", f.read(8))[0]
            size = os.path.getsize(image)
            f.truncate(size + cluster)
            f.seek(block + (size // cluster) * 2)
            f.write(struct.pack(">H", 1))

    def test_check_leaks_exit_3_and_repair(self):
        image = self.make_image_with_data()
        self.leak_one_cluster(image)
        ours, theirs = self.check_both(image)
        self.assertEqual(theirs.returncode, 3)
        self.assertEqual(ours.returncode, 3, ours.stdout + ours.stderr)
        self.assertEqual(json.loads(ours.stdout), json.loads(theirs.stdout))
        self.assertEqual(json.loads(ours.stdout)["leaks"], 1)
        human_ours = img("check", image, check=False)
        human_theirs = qemu_img("check", image, check=False)
        self.assertEqual(human_ours.returncode, 3)
        self.assertEqual(human_ours.stdout, human_theirs.stdout)
        # -r leaks, on two copies: the same report, and both repaired.
        copy = self.path("copy.qcow2")
        shutil.copy(image, copy)
        ours = img("check", "-r", "leaks", "-f", "qcow2", "--output=json", image, check=False)
        theirs = qemu_img("check", "-r", "leaks", "-f", "qcow2", "--output=json", copy,
                          check=False)
        self.assertEqual(theirs.returncode, 0)
        self.assertEqual(ours.returncode, 0, ours.stdout + ours.stderr)
        ours_doc, theirs_doc = json.loads(ours.stdout), json.loads(theirs.stdout)
        ours_doc.pop("filename"), theirs_doc.pop("filename")
        self.assertEqual(ours_doc, theirs_doc)
        self.assertEqual(ours_doc["leaks-fixed"], 1)
        self.qemu_check_clean(image)
        self.qemu_compare(image, "qcow2", copy, "qcow2")

    def corrupt_l2_entry_past_eof(self, image):
        """Points the L2 entry of guest cluster 1 (data, 0xab) 16 clusters past the end."""
        header = qcow2_header(image)
        with open(image, "r+b") as f:
            f.seek(header["l1_table_offset"])
            l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
            f.seek(l2 + 8)
            f.write(struct.pack(">Q", (1 << 63) | (os.path.getsize(image) + 16 * 65536)))

    def test_check_corrupt_l2_entry_past_eof(self):
        import nbd
        image = self.make_image_with_data()
        self.corrupt_l2_entry_past_eof(image)
        before = read_file(image)
        ours, theirs = self.check_both(image)
        self.assertEqual(theirs.returncode, 2)
        self.assertEqual(ours.returncode, 2, ours.stdout + ours.stderr)
        self.assertEqual(json.loads(ours.stdout), json.loads(theirs.stdout))
        # qemu-img convert reads zeros through the bad pointer; spindle-img refuses.
        result = img("convert", "-f", "qcow2", "-O", "raw", image, self.path("out.raw"),
                     check=False)
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn("Input/output error", result.stderr)
        server = self.server(image, ["-f", "qcow2", "-r"])
        h = self.connect(server.uri())
        self.assertEqual(h.pread(4096, 0), b"\xab" * 4096)
        with self.assertRaises(nbd.Error) as caught:
            h.pread(4096, 64 * KiB)
        self.assertEqual(caught.exception.errnum, errno.EIO)
        self.assertEqual(h.pread(4096, 2 * MiB), b"\xcd" * 4096)
        del h
        self.handles.clear()
        self.stop_cleanly(server)
        self.assertEqual(read_file(image), before, "read-only commands changed the image")

    def test_writable_export_refuses_the_bad_pointer(self):
        # qemu-nbd 7.2 reads zeros through the bad L2 entry and writes guest data past the end
        # of the file there. spindle-nbd fails reads, writes and zeroing of that cluster with
        # EIO and leaves every byte of the file as it was, but for the header's corrupt bit
        # (where it may record what it found).
        import nbd
        image = self.make_image_with_data()
        self.corrupt_l2_entry_past_eof(image)
        before = bytearray(read_file(image))
        server = self.server(image, ["-f", "qcow2"])
        h = self.connect(server.uri())
        self.assertEqual(h.pread(4096, 0), b"\xab" * 4096)
        for call in (lambda: h.pread(4096, 64 * KiB), lambda: h.pwrite(b"\x5a" * 4096, 64 * KiB),
                     lambda: h.zero(4096, 64 * KiB)):
            with self.assertRaises(nbd.Error) as caught:
                call()
            self.assertEqual(caught.exception.errnum, errno.EIO)
        del h
        self.handles.clear()
        self.stop_cleanly(server)
        after = bytearray(read_file(image))
        features = slice(72, 80)  # incompatible features: only bit 1 (corrupt) may change
        self.assertEqual(struct.unpack(">Q", after[features])[0] & ~2,
                         struct.unpack(">Q", before[features])[0] & ~2)
        after[features] = before[features]
        self.assertTrue(after == before, "spindle-nbd wrote to the corrupt image")
        self.assertEqual(qemu_img("check", "-f", "qcow2", image, check=False).returncode, 2)

    # ---- bad input -------------------------------------------------------------------------

    def assert_nbd_refuses(self, image, args):
        """spindle-nbd exits non-zero at start-up (not by a signal) instead of serving."""
        log_path = self.path("refused.log")
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen([si.SPINDLE_NBD, "-k", self.path("refused.sock")] + args +
                                    [image], stdin=subprocess.DEVNULL, stdout=log_file,
                                    stderr=log_file, preexec_fn=si._die_with_parent)
            deadline = time.monotonic() + 15
            try:
                while proc.poll() is None and time.monotonic() < deadline:
                    if b"listening on" in read_file(log_path):
                        break
                    time.sleep(0.02)
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait(10)
        log = read_file(log_path).decode("utf-8", "replace")
        self.assertNotIn("listening on", log, f"spindle-nbd {args} served {image}")
        self.assertGreater(proc.returncode, 0, f"spindle-nbd {args} {image}: {log}")
        self.assertNotEqual(proc.returncode, si.SANITIZER_EXIT_CODE, log)
        self.assertIsNone(si.SANITIZER_REPORT.search(log), log)
        self.assertTrue(log.strip(), "no error message")

    def assert_refused_everywhere(self, image, info_may_succeed=False, info_chain=False):
        before = read_file(image)
        info = img("info", *(["--backing-chain"] if info_chain else []), "--output=json",
                   image, check=False, timeout=30)
        if not (info_may_succeed and info.returncode == 0):
            self.assertEqual(info.returncode, 1, f"info: {info.stdout}{info.stderr}")
            self.assertTrue(info.stderr.strip())
            self.assertEqual(info.stdout, "")
        for fmt in (["-f", "qcow2"], []):
            result = img("convert", *fmt, "-O", "raw", image, self.path("out.raw"),
                         check=False, timeout=30)
            self.assertEqual(result.returncode, 1, f"convert {fmt}: {result.stderr}")
            self.assertTrue(result.stderr.strip())
        for args in (["-f", "qcow2"], ["-f", "qcow2", "-r"], []):
            self.assert_nbd_refuses(image, args)
        self.assertEqual(read_file(image), before, f"{image} changed")
        return info

    def test_damaged_headers_are_refused(self):
        l1_beyond_eof = 1 << 40
        cases = {
            # name: (offset, struct format, value, qemu-img info refuses it too)
            "cluster_bits_8": (20, ">I", 8, True),
            "cluster_bits_22": (20, ">I", 22, True),
            "cluster_bits_63": (20, ">I", 63, True),
            "version_4": (4, ">I", 4, True),
            "size_2_62": (24, ">Q", 1 << 62, True),
            "l1_size_huge": (36, ">I", 0x7FFFFFFF, True),
            # qemu 7.2 reads the L1 table past the end as zeros: silent zeroes, refused here.
            "l1_offset_beyond_eof": (40, ">Q", l1_beyond_eof, False),
            "l1_offset_misaligned": (40, ">Q", 3 * 65536 + 8, True),
            "unknown_incompatible_bit": (72, ">Q", 1 << 20, True),
            "refcount_order_7": (96, ">I", 7, True),
            "refcount_table_misaligned": (48, ">Q", 65536 + 512, True),
        }
        for name, (offset, fmt, value, qemu_refuses) in cases.items():
            with self.subTest(name):
                image = self.make_image_with_data(name + ".qcow2")
                poke(image, offset, fmt, value)
                if qemu_refuses:
                    self.assertEqual(qemu_img("info", image, check=False).returncode, 1)
                self.assert_refused_everywhere(image)

    def test_encrypted_images_are_refused(self):
        # AES (crypt_method 1, made by hand: qemu 7.2 no longer creates it) and LUKS. qemu-img
        # info describes them (it reads no data); everything that reads data refuses them.
        aes = self.make_image_with_data("aes.qcow2")
        poke(aes, 32, ">I", 1)
        luks = self.path("luks.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=secret",
                 "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
                 luks, "4M", timeout=60)
        for image in (aes, luks):
            with self.subTest(os.path.basename(image)):
                info = self.assert_refused_everywhere(image, info_may_succeed=True)
                if info.returncode == 0:
                    self.assertTrue(json.loads(info.stdout).get("encrypted"), info.stdout)
                    self.assertTrue(json.loads(qemu_img("info", "--output=json",
                                                        image).stdout).get("encrypted"))

    def test_backing_loop_is_refused(self):
        a = self.create_qcow2("a.qcow2", 4 * MiB)
        self.create_qcow2("b.qcow2", None, backing="a.qcow2", backing_fmt="qcow2", cwd=self.tmp)
        qemu_img("rebase", "-u", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", a)
        # (qemu-img convert of this chain does not return; its info --backing-chain refuses.)
        self.assertEqual(qemu_img("info", "--backing-chain", a, check=False).returncode, 1)
        self.assert_refused_everywhere(a, info_chain=True)


if __name__ == "__main__":
    # --spindle-img is ours; the harness parses --spindle-nbd and hands the rest to unittest.
    SPINDLE_IMG = si.spindle_img_argument()
    si.main(required_binaries=("qemu-img", "qemu-io", "nbdcopy", "nbdinfo", "fio", "cmp"),
            needs_nbd_module=True)
