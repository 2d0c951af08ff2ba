#!/usr/bin/env python3
"""qcow2 internal snapshots through `spindle-img snapshot` and `spindle-img info`, with
qemu-img / qemu-io 7.2 as the oracle.

Listing: snapshots qemu-img made are listed by `spindle-img snapshot -l` and `info` (human
and JSON) exactly as qemu-img lists them (TZ=UTC). Making: snapshots spindle-img made are
listed by qemu-img as spindle-img lists them, with qemu-img's fields (dates checked to be
now). Round trips, for 4 KiB and 64 KiB clusters, compat 0.10 and 1.1 (and extended L2,
compressed clusters): write A, `snapshot -c`, write B, `snapshot -a` reads A again,
`snapshot -d`; `qemu-img check` is clean after every step, and qemu-img applies snapshots
spindle-img made and the other way round. `measure -l` and `convert -l` of a snapshot give
qemu-img's figures and bytes; `spindle-nbd -l` serves a snapshot read-only. Errors (raw and qed images, a missing snapshot,
mixed actions, -U with a change) give qemu-img's messages and exit codes.

Usage: test_qcow2_snapshots.py --spindle-img PATH --spindle-nbd PATH [unittest options]
"""

import filecmp
import json
import os
import shutil
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spindle_interop as si  # noqa: E402
from spindle_interop import MiB, KiB  # noqa: E402

SPINDLE_IMG = None  # set below from --spindle-img
UTC = dict(os.environ, TZ="UTC")

GEOMETRIES = {
    "v3-64k": ["-o", "cluster_size=64k"],
    "v3-4k": ["-o", "cluster_size=4k"],
    "v2-64k": ["-o", "compat=0.10,cluster_size=64k"],
    "v2-4k": ["-o", "compat=0.10,cluster_size=4k"],
    "v3-extended-l2": ["-o", "extended_l2=on,cluster_size=64k"],
}


def qemu_img(*args, check=True, env=None):
    return si.run_text(["qemu-img", *args], check=check, env=env)


def spindle_img(*args, check=True, env=None):
    return si.run_text([SPINDLE_IMG, *args], check=check, env=env)


def qemu_io(image, *commands):
    cmd = ["qemu-io", "-f", "qcow2"]
    for c in commands:
        cmd += ["-c", c]
    proc = si.run_text(cmd + [image])
    out = proc.stdout + proc.stderr
    if "failed" in out or "error" in out.lower() or "Pattern verification" in out:
        raise AssertionError(f"qemu-io {image} {commands}:\n{out}")
    return out


def messages(stderr, program):
    """The distinct stderr lines, in order, with the program's name taken off, so both tools'
    texts compare (qemu-img reopens a raw image to apply a snapshot, warning twice)."""
    lines = []
    for line in stderr.splitlines():
        line = line.replace(program + ": ", "", 1).replace(f"Try '{program} --help'", "Try 'X --help'")
        line = line.rstrip(".")
        if line not in lines:
            lines.append(line)
    return lines


def allocation(image):
    """`qemu-img map --output=json` without host offsets, neighbours alike merged (the copies'
    clusters may lie in another order in the file)."""
    merged = []
    for e in json.loads(qemu_img("map", "--output=json", image).stdout):
        flags = (e["depth"], e["present"], e["zero"], e["data"])
        if merged and merged[-1][2] == flags and merged[-1][1] == e["start"]:
            merged[-1][1] = e["start"] + e["length"]
        else:
            merged.append([e["start"], e["start"] + e["length"], flags])
    return merged


class SnapshotTest(si.InteropTest):
    def image(self, name, geometry="v3-64k", size="16M"):
        path = self.path(name)
        qemu_img("create", "-q", "-f", "qcow2", *GEOMETRIES[geometry], path, size)
        return path

    def assert_clean(self, image):
        proc = qemu_img("check", image, check=False)
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        ours = spindle_img("check", image, check=False)
        self.assertEqual(ours.returncode, 0, ours.stdout + ours.stderr)

    def assert_listed_alike(self, image):
        for args in (["snapshot", "-l"], ["info"], ["info", "--output=json"]):
            theirs = qemu_img(*args, image, env=UTC).stdout
            ours = spindle_img(*args, image, env=UTC).stdout
            self.assertEqual(ours, theirs, f"{args} {image}")

    # ---- listing --------------------------------------------------------------------------

    def test_qemu_made_snapshots_list_identically(self):
        for geometry in GEOMETRIES:
            with self.subTest(geometry=geometry):
                image = self.image(f"l-{geometry}.qcow2", geometry)
                self.assert_listed_alike(image)  # none: no "Snapshot list" at all
                self.assertEqual(spindle_img("snapshot", "-l", image).stdout, "")
                qemu_io(image, "write -P 0x11 0 1M")
                qemu_img("snapshot", "-c", "s1", image)
                qemu_io(image, "write -P 0x22 512k 1M")
                qemu_img("snapshot", "-c", "a rather long snapshot name", image)
                qemu_img("snapshot", "-c", "s3", image)
                qemu_img("snapshot", "-d", "s1", image)  # ids 2 and 3 left
                self.assert_listed_alike(image)
                self.assert_listed_alike_with_backing(geometry)

    def assert_listed_alike_with_backing(self, geometry):
        base = self.image(f"base-{geometry}.qcow2", geometry)
        top = self.path(f"top-{geometry}.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", "-b", os.path.basename(base), "-F", "qcow2", top)
        qemu_img("snapshot", "-c", "over", top)
        self.assert_listed_alike(top)

    def test_spindle_made_snapshots_list_in_qemu(self):
        for geometry in ("v3-64k", "v2-4k"):
            with self.subTest(geometry=geometry):
                image = self.image(f"m-{geometry}.qcow2", geometry)
                qemu_io(image, "write -P 0x33 0 256k")
                before = time.time()
                spindle_img("snapshot", "-c", "first", image)
                spindle_img("snapshot", "-c", "first", image)  # duplicate names: as qemu-img
                spindle_img("snapshot", "-q", "-c", "third one", image)
                after = time.time()
                self.assert_clean(image)
                self.assert_listed_alike(image)
                listed = json.loads(qemu_img("info", "--output=json", image).stdout)["snapshots"]
                self.assertEqual([s["id"] for s in listed], ["1", "2", "3"])
                self.assertEqual([s["name"] for s in listed], ["first", "first", "third one"])
                for s in listed:
                    self.assertEqual((s["vm-state-size"], s["vm-clock-sec"], s["vm-clock-nsec"],
                                      s["icount"]), (0, 0, 0, 0))
                    self.assertGreaterEqual(s["date-sec"], int(before) - 1)
                    self.assertLessEqual(s["date-sec"], int(after) + 1)
                    self.assertLess(s["date-nsec"], 10**9)
                # qemu-img's own snapshot taken next gets the next id.
                qemu_img("snapshot", "-c", "by qemu", image)
                self.assert_listed_alike(image)
                self.assertIn("4         by qemu", spindle_img("snapshot", "-l", image).stdout)

    # ---- round trips ----------------------------------------------------------------------

    def test_round_trips(self):
        for geometry in ("v3-64k", "v3-4k", "v2-64k", "v2-4k", "v3-extended-l2"):
            with self.subTest(geometry=geometry):
                image = self.image(f"r-{geometry}.qcow2", geometry)
                compressed = "write -c -P 0x4c 8M 64k" if geometry != "v3-extended-l2" \
                    else "write -P 0x4c 8M 64k"
                qemu_io(image, "write -P 0xa1 0 3M", "write -P 0xa2 5M 12k", compressed)
                spindle_img("snapshot", "-c", "s1", image)
                self.assert_clean(image)
                qemu_io(image, "write -P 0xb1 1M 2M", "write -z 5M 64k", "discard 8M 64k")
                self.assert_clean(image)
                spindle_img("snapshot", "-a", "s1", image)
                self.assert_clean(image)
                qemu_io(image, "read -P 0xa1 0 3M", "read -P 0xa2 5M 12k", "read -P 0x4c 8M 64k")
                # Apply by id, again: nothing changes.
                spindle_img("snapshot", "-a", "1", image)
                self.assert_clean(image)
                qemu_io(image, "read -P 0xa1 0 3M")
                qemu_io(image, "write -P 0xc1 0 64k")
                spindle_img("snapshot", "-c", "s2", image)
                spindle_img("snapshot", "-d", "s1", image)
                self.assert_clean(image)
                qemu_io(image, "read -P 0xc1 0 64k", "read -P 0xa1 64k 2M")
                qemu_io(image, "write -P 0xd1 0 3M")
                # qemu-img applies what spindle-img made.
                qemu_img("snapshot", "-a", "s2", image)
                self.assert_clean(image)
                qemu_io(image, "read -P 0xc1 0 64k", "read -P 0xa1 64k 2M")
                # spindle-img applies and deletes what qemu-img made.
                qemu_img("snapshot", "-c", "q1", image)
                qemu_io(image, "write -P 0xe1 0 1M")
                spindle_img("snapshot", "-a", "q1", image)
                qemu_io(image, "read -P 0xc1 0 64k")
                spindle_img("snapshot", "-d", "q1", image)
                spindle_img("snapshot", "-d", "s2", image)
                self.assert_clean(image)
                self.assertEqual(qemu_img("snapshot", "-l", image).stdout, "")
                qemu_io(image, "read -P 0xc1 0 64k", "read -P 0xa1 64k 2M")

    def test_apply_restores_the_snapshots_virtual_size(self):
        image = self.image("size.qcow2", "v3-64k", "4M")
        qemu_io(image, "write -P 0x5a 0 1M")
        spindle_img("snapshot", "-c", "small", image)
        qemu_img("resize", "-q", image, "64M")
        qemu_io(image, "write -P 0x6b 60M 1M")
        twin = self.path("size-twin.qcow2")
        shutil.copyfile(image, twin)
        spindle_img("snapshot", "-a", "small", image)
        qemu_img("snapshot", "-a", "small", twin)
        for path in (image, twin):
            info = json.loads(qemu_img("info", "--output=json", path).stdout)
            self.assertEqual(info["virtual-size"], 4 * MiB, path)
            self.assert_clean(path)
        qemu_io(image, "read -P 0x5a 0 1M")

    def test_measure_of_a_snapshot_matches_qemu_img(self):
        # measure -l: the snapshot's size and allocation, not the active image's; both forms
        # of the parameter, and qemu's messages for what cannot be measured.
        image = self.image("m.qcow2", "v3-64k", "4M")
        qemu_io(image, "write -P 0x5a 0 1M")
        qemu_img("snapshot", "-c", "small", image)
        qemu_img("resize", "-q", image, "64M")
        qemu_io(image, "write -P 0x6b 8M 8M", "write -z 0 64k")
        qemu_img("snapshot", "-c", "big", image)
        raw = self.path("m.raw")
        qemu_img("create", "-q", "-f", "raw", raw, "1M")
        cases = [
            ["-O", "qcow2", "-l", "small", image],
            ["-O", "qcow2", "-l", "2", image],
            ["-O", "qcow2", "-l", "snapshot.name=big", image],
            ["-O", "qcow2", "-l", "snapshot.id=1,snapshot.name=small", image],
            ["-O", "raw", "--output=json", "-l", "small", image],
            ["-O", "qcow2", "-o", "cluster_size=4096", "-l", "big", image],
            ["-O", "qcow2", image],
            ["-O", "qcow2", "-l", "snapshot.id=1,snapshot.name=big", image],
            ["-O", "qcow2", "-l", "nosuch", image],
            ["-O", "qcow2", "-l", "snapshot.size=1", image],
            ["-O", "qcow2", "-l", "small", raw],
            ["-O", "qcow2", "-l", "small", "--size", "1M"],
        ]
        for args in cases:
            theirs = qemu_img("measure", *args, check=False)
            ours = spindle_img("measure", *args, check=False)
            self.assertEqual(ours.stdout, theirs.stdout, args)
            self.assertEqual(ours.returncode, theirs.returncode, args)
            self.assertEqual(messages(ours.stderr, "spindle-img"),
                             messages(theirs.stderr, "qemu-img"), args)

    def snapshot_chain(self, name):
        """An image with snapshots "small" (id 1, 4 MiB) and "big" (id 2, 64 MiB), each holding
        other data than the active image, over a backing file the snapshots see through."""
        base = self.image(f"{name}-base.qcow2", "v3-64k", "64M")
        qemu_io(base, "write -P 0x0b 0 64M")
        image = self.path(f"{name}.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", "-b", os.path.basename(base), "-F", "qcow2",
                 image, "4M")
        qemu_io(image, "write -P 0x5a 64k 1M", "write -z 2M 64k")
        qemu_img("snapshot", "-c", "small", image)
        qemu_img("resize", "-q", image, "64M")
        qemu_io(image, "write -P 0x6b 0 2M", "write -P 0x6c 8M 8M")
        qemu_img("snapshot", "-c", "big", image)
        qemu_io(image, "write -P 0x7d 0 16M")
        return image

    def test_convert_of_a_snapshot_matches_qemu_img(self):
        # convert -l: the snapshot's data (through the backing file), the active image's size;
        # both forms of the parameter; qemu's messages for what cannot be loaded.
        image = self.snapshot_chain("c")
        raw = self.path("c.raw")
        qemu_img("create", "-q", "-f", "raw", raw, "1M")
        cases = [
            ["-l", "small", image], ["-l", "2", image], ["-l", "snapshot.name=big", image],
            ["-l", "snapshot.id=1,snapshot.name=small", image], ["-l", "snapshot.id=2", image],
            ["-l", "snapshot.id=1,snapshot.name=big", image], ["-l", "nosuch", image],
            ["-l", "snapshot.size=1", image], ["-l", "small", raw],
        ]
        for index, args in enumerate(cases):
            for target_format in ("raw", "qcow2"):
                with self.subTest(args=args, target_format=target_format):
                    theirs, ours = self.path(f"theirs-{index}"), self.path(f"ours-{index}")
                    for path in (theirs, ours):
                        if os.path.exists(path):
                            os.unlink(path)
                    q = qemu_img("convert", "-O", target_format, *args, theirs, check=False)
                    s = spindle_img("convert", "-O", target_format, *args, ours, check=False)
                    self.assertEqual(s.returncode, q.returncode, s.stderr + q.stderr)
                    self.assertEqual(messages(s.stderr, "spindle-img"),
                                     messages(q.stderr, "qemu-img"))
                    self.assertEqual(os.path.exists(ours), os.path.exists(theirs))
                    if q.returncode != 0:
                        continue
                    if target_format == "raw":
                        self.assertTrue(filecmp.cmp(theirs, ours, shallow=False), "raw copies")
                    else:
                        proc = qemu_img("compare", theirs, ours, check=False)
                        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
                        self.assertEqual(allocation(ours), allocation(theirs))
                        self.assert_clean(ours)
        # The data is the snapshot's: "small" holds 0x5a at 64k and base's 0x0b past it.
        small = self.path("small.raw")
        spindle_img("convert", "-O", "raw", "-l", "small", image, small)
        with open(small, "rb") as f:
            data = f.read()
        self.assertEqual(len(data), 64 * MiB)  # the active image's size, as qemu-img
        self.assertEqual(data[64 * KiB:64 * KiB + MiB], b"\x5a" * MiB)
        self.assertEqual(data[2 * MiB:2 * MiB + 64 * KiB], bytes(64 * KiB))
        self.assertEqual(data[:64 * KiB], b"\x0b" * (64 * KiB))

    def test_spindle_nbd_serves_a_snapshot_read_only(self):
        image = self.snapshot_chain("n")
        with open(image, "rb") as f:
            before = f.read()
        expected = self.path("big.raw")
        qemu_img("convert", "-O", "raw", "-l", "big", image, expected)
        for param in ("big", "snapshot.id=2"):
            with self.subTest(param=param):
                server = self.server(image, args=["-f", "qcow2", "-l", param])
                self.assertIn("read-only", server.log_text())
                served = self.path(f"served-{param}.raw")
                qemu_img("convert", "-f", "raw", "-O", "raw", server.uri(), served)
                self.assertTrue(filecmp.cmp(expected, served, shallow=False))
                # Read-only: a write is refused (qemu-io reports the error, the image is intact).
                proc = si.run_text(["qemu-io", "-f", "raw", "-c", "write -P 1 0 4k",
                                    server.uri()], check=False)
                self.assertTrue(proc.returncode != 0 or "failed" in proc.stdout + proc.stderr,
                                proc.stdout + proc.stderr)
                server.stop()
        with open(image, "rb") as f:
            self.assertEqual(f.read(), before)
        for param, message in (("nosuch", "Failed to load snapshot: Can't find snapshot"),
                               ("snapshot.size=1", "Invalid parameter 'snapshot.size'")):
            proc = si.run_text([si.SPINDLE_NBD, "-k", self.path("x.sock"), "-l", param, image],
                               check=False)
            self.assertEqual(proc.returncode, 1, proc.stderr)
            self.assertIn(message, proc.stderr)

    def test_a_table_over_several_clusters(self):
        # 4 KiB clusters: 60 entries of about 72 bytes take two clusters of table.
        image = self.image("many.qcow2", "v3-4k", "4M")
        qemu_io(image, "write -P 0x01 0 64k")
        for i in range(60):
            maker = qemu_img if i % 3 == 2 else spindle_img
            maker("snapshot", "-c", f"snapshot number {i}", image)
        for i in (4, 17, 40):
            spindle_img("snapshot", "-d", f"snapshot number {i}", image)
        qemu_img("snapshot", "-d", "snapshot number 41", image)
        self.assert_listed_alike(image)
        self.assert_clean(image)
        qemu_io(image, "write -P 0x02 0 64k")
        spindle_img("snapshot", "-a", "snapshot number 59", image)
        qemu_io(image, "read -P 0x01 0 64k")
        self.assert_clean(image)

    # ---- errors ---------------------------------------------------------------------------

    def test_errors_match_qemu(self):
        raw = self.path("r.raw")
        qemu_img("create", "-q", "-f", "raw", raw, "1M")
        qed = self.path("q.qed")
        qemu_img("create", "-q", "-f", "qed", qed, "1M")
        image = self.image("e.qcow2")
        qemu_img("snapshot", "-c", "there", image)
        cases = [
            [raw, "-l"], [raw, "-c", "x"], [raw, "-a", "x"], [raw, "-d", "x"],
            [qed, "-l"], [qed, "-c", "x"], [qed, "-a", "x"], [qed, "-d", "x"],
            [image, "-a", "nope"], [image, "-d", "nope"], [image, "-d", "1"],
            [image, "-c", "a", "-d", "b"], [image, "-l", "-a", "there"],
            [image, "-U", "-c", "x"], [image, "-U", "-l"], [image],
        ]
        for case in cases:
            with self.subTest(case=case):
                path, args = case[0], case[1:]
                theirs = qemu_img("snapshot", *args, path, check=False, env=UTC)
                ours = spindle_img("snapshot", *args, path, check=False, env=UTC)
                self.assertEqual(ours.returncode, theirs.returncode, ours.stderr)
                self.assertEqual(ours.stdout, theirs.stdout)
                self.assertEqual(messages(ours.stderr, "spindle-img"),
                                 messages(theirs.stderr, "qemu-img"))
        self.assert_clean(image)

    def test_bad_snapshot_table_is_refused_cleanly(self):
        image = self.image("bad.qcow2")
        qemu_img("snapshot", "-c", "s", image)
        with open(image, "r+b") as f:
            header = f.read(72)
            table = int.from_bytes(header[64:72], "big")
            f.seek(table + 36)
            f.write((5000).to_bytes(4, "big"))  # extra data over QEMU's 1024-byte limit
        with open(image, "rb") as f:
            before = f.read()
        for args in (["snapshot", "-l"], ["info"], ["snapshot", "-c", "x"],
                     ["snapshot", "-a", "s"], ["snapshot", "-d", "s"]):
            with self.subTest(args=args):
                proc = spindle_img(*args, image, check=False)
                self.assertEqual(proc.returncode, 1, proc.stdout + proc.stderr)
                self.assertIn("extra metadata", proc.stderr)
        with open(image, "rb") as f:
            self.assertEqual(f.read(), before)


if __name__ == "__main__":
    # --spindle-img is ours; the harness parses --spindle-nbd and hands the rest to unittest.
    SPINDLE_IMG = si.spindle_img_argument()
    si.main(required_binaries=("qemu-img", "qemu-io", "cmp"))
