#!/usr/bin/env python3
"""qcow2 persistent dirty bitmaps through `spindle-img bitmap`, `spindle-img info` and
spindle-nbd, with qemu-img / qemu-io / qemu-nbd 7.2 as the oracle.

Info: bitmaps qemu-img made (enabled, disabled, in use after a qemu-io abort, several
granularities) are listed by `spindle-img info` (human and JSON) exactly as qemu-img lists
them. Commands: each `bitmap` command line is run by qemu-img on one copy of an image and by
spindle-img on another; messages, exit codes and the resulting `info` agree, and both
copies check clean. Bits: after qemu-io writes and the same --merge (across granularities,
and from another file with -b/-F) and --clear on both copies, qemu-nbd -B exports each bitmap
and `nbdinfo --map=qemu:dirty-bitmap:NAME` shows the same extents. Tracking: writes through
spindle-nbd mark the enabled bitmaps (not the disabled ones); after a clean stop qemu reads
them consistent with those bits, after SIGKILL they are in use.

Usage: test_qcow2_bitmaps.py --spindle-img PATH --spindle-nbd PATH [unittest options]
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spindle_interop as si  # noqa: E402
from spindle_interop import run  # noqa: E402

SPINDLE_IMG = None  # set below from --spindle-img


def text(data):
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else data


def tool(binary, *args, check=True):
    return si.run_text([binary, *args], check=check)


def qemu_img(*args, check=True):
    return tool("qemu-img", *args, check=check)


def spindle_img(*args, check=True):
    return tool(SPINDLE_IMG, *args, check=check)


def qemu_io(image, *commands, check=True, fmt="qcow2"):
    cmd = ["qemu-io", "-f", fmt]
    for c in commands:
        cmd += ["-c", c]
    return run(cmd + [image], check=check)


def bitmaps_section(info_text):
    """The lines of qemu-img info's human output from "bitmaps:" to the next top-level key."""
    lines, inside = [], False
    for line in info_text.splitlines():
        if line.startswith("    bitmaps:"):
            inside = True
        elif inside and line.startswith("    ") and not line.startswith("        "):
            break
        if inside:
            lines.append(line)
    return lines


def messages(stderr, program, image):
    """stderr lines without the program's name, the image's name and qemu's node names
    ("#block123") both read IMAGE."""
    lines = [line.replace(program + ": ", "").replace(image, "IMAGE")
             for line in stderr.splitlines()]
    return [re.sub(r"#block[0-9]+", "IMAGE", line) for line in lines]


class BitmapTest(si.InteropTest):
    def image(self, name, size="64M", options=()):
        path = self.path(name)
        qemu_img("create", "-q", "-f", "qcow2", *options, path, size)
        return path

    def assert_clean(self, image):
        proc = qemu_img("check", image, check=False)
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)

    def dirty_map(self, image, bitmap):
        sock = self.path("map.sock")
        if os.path.exists(sock):
            os.unlink(sock)
        server = subprocess.Popen(["qemu-nbd", "-r", "-f", "qcow2", "-B", bitmap, "-k", sock,
                                   image], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            for _ in range(200):
                if os.path.exists(sock):
                    break
                if server.poll() is not None:
                    self.fail(f"qemu-nbd -B {bitmap}: {text(server.stderr.read())}")
                time.sleep(0.02)
            proc = run(["nbdinfo", f"--map=qemu:dirty-bitmap:{bitmap}",
                        f"nbd+unix:///?socket={sock}"])
            return text(proc.stdout)
        finally:
            server.communicate(timeout=10)

    # ---- info -----------------------------------------------------------------------------

    def test_info_lists_bitmaps_as_qemu(self):
        image = self.image("i.qcow2")
        qemu_img("bitmap", "--add", image, "on")
        qemu_img("bitmap", "--add", "-g", "128k", "--disable", image, "off [x]")
        qemu_img("bitmap", "--add", "-g", "512", image, "fine")
        for args in (["info"], ["info", "--output=json"]):
            self.assertEqual(spindle_img(*args, image).stdout, qemu_img(*args, image).stdout)
        # In use: qemu-io aborted while the image was open for writing.
        qemu_io(image, "write 0 4k", "abort", check=False)
        theirs = qemu_img("info", image).stdout
        self.assertIn("in-use", theirs)
        self.assertEqual(spindle_img("info", image).stdout, theirs)
        self.assertEqual(spindle_img("info", "--output=json", image).stdout,
                         qemu_img("info", "--output=json", image).stdout)

    # ---- commands -------------------------------------------------------------------------

    CASES = [
        ["--add", "b1"],                      # exists
        ["--add", "new"],
        ["--add", "-g", "1M", "--disable", "new"],
        ["--add", "-g", "1000", "x"],
        ["--add", "-g", "4G", "x"],
        ["--add", "-g", "abc", "x"],
        ["--add", ""],
        ["--add", "x" * 1024],
        ["--remove", "b1"],
        ["--remove", "nosuch"],
        ["--clear", "b1"],
        ["--enable", "off"],
        ["--disable", "b1"],
        ["--clear", "-g", "64k", "b1"],
        ["--merge", "b1", "off"],
        ["--merge", "nosuch", "b1"],
        ["--merge", "b1", "nosuch"],
        ["--add", "--remove", "z"],
        ["--remove", "--add", "z"],
        ["--add", "--disable", "--merge", "b1", "z"],
        ["-F", "qcow2", "--add", "y"],
        ["--foo", "y"],
        ["--add"],
        ["b1"],
    ]

    def test_commands_match_qemu(self):
        base = self.image("base.qcow2")
        qemu_img("bitmap", "--add", base, "b1")
        qemu_img("bitmap", "--add", "-g", "256k", "--disable", base, "off")
        qemu_io(base, "write 64k 64k", "write 5M 3M")
        for case in self.CASES:
            with self.subTest(case=case[:4]):
                theirs_image, ours_image = self.path("q.qcow2"), self.path("s.qcow2")
                shutil.copy(base, theirs_image)
                shutil.copy(base, ours_image)
                *options, name = case if len(case) > 1 else (case + [None])
                tail = [name] if name is not None else []
                theirs = qemu_img("bitmap", *options, theirs_image, *tail, check=False)
                ours = spindle_img("bitmap", *options, ours_image, *tail, check=False)
                self.assertEqual(ours.returncode, theirs.returncode, ours.stderr + theirs.stderr)
                if theirs.returncode == 0 or "Operation" in theirs.stderr:
                    self.assertEqual(messages(ours.stderr, "spindle-img", ours_image),
                                     messages(theirs.stderr, "qemu-img", theirs_image))
                self.assertEqual(bitmaps_section(qemu_img("info", ours_image).stdout),
                                 bitmaps_section(qemu_img("info", theirs_image).stdout))
                self.assert_clean(ours_image)

    def test_v2_and_raw_images_refuse_bitmaps(self):
        v2 = self.image("v2.qcow2", options=["-o", "compat=0.10"])
        proc = spindle_img("bitmap", "--add", v2, "x", check=False)
        self.assertEqual(proc.returncode, 1)
        self.assertIn("Cannot store dirty bitmaps in qcow2 v2 files", proc.stderr)
        raw = self.path("r.raw")
        qemu_img("create", "-q", "-f", "raw", raw, "1M")
        proc = spindle_img("bitmap", "--add", "-f", "raw", raw, "x", check=False)
        self.assertEqual(proc.returncode, 1)
        self.assertIn("Operation not supported", proc.stderr)

    def test_snapshot_apply_refused_under_bitmaps(self):
        image = self.image("sn.qcow2", size="8M")
        qemu_img("snapshot", "-c", "s", image)
        spindle_img("bitmap", "--add", "--disable", image, "b")
        with open(image, "rb") as f:
            before = f.read()
        for program, name in ((SPINDLE_IMG, "spindle-img"), ("qemu-img", "qemu-img")):
            proc = tool(program, "snapshot", "-a", "s", image, check=False)
            self.assertEqual(proc.returncode, 1)
            self.assertEqual(proc.stderr, f"{name}: Could not apply snapshot 's': Device has "
                                          "active dirty bitmaps\n")
            if program == SPINDLE_IMG:
                with open(image, "rb") as f:
                    self.assertEqual(f.read(), before)  # refused before anything is written

    # ---- bits -----------------------------------------------------------------------------

    def test_merged_and_cleared_bits_read_back_by_qemu(self):
        base = self.image("bits.qcow2")
        qemu_img("bitmap", "--add", base, "b1")
        qemu_img("bitmap", "--add", "-g", "1M", "--disable", base, "b2")
        qemu_img("bitmap", "--add", "-g", "4k", base, "b3")
        qemu_io(base, "write 100k 4k", "write 3M 1500k", "write 63M 1M")
        source = self.path("src.qcow2")
        shutil.copy(base, source)
        copies = {"qemu-img": self.path("q.qcow2"), SPINDLE_IMG: self.path("s.qcow2")}
        for binary, image in copies.items():
            shutil.copy(base, image)
            tool(binary, "bitmap", "--merge", "b1", image, "b2")
            tool(binary, "bitmap", "--disable", "--merge", "b2", image, "b3")
            tool(binary, "bitmap", "--add", "-g", "512", "--merge", "b3", "-b", source,
                 "-F", "qcow2", image, "b4")
            tool(binary, "bitmap", "--clear", image, "b1")
        ours, theirs = copies[SPINDLE_IMG], copies["qemu-img"]
        self.assert_clean(ours)
        for bitmap in ("b1", "b2", "b3", "b4"):
            with self.subTest(bitmap=bitmap):
                self.assertEqual(self.dirty_map(ours, bitmap), self.dirty_map(theirs, bitmap))
        self.assertIn("dirty", self.dirty_map(ours, "b4"))

    def test_resize_keeps_bits(self):
        base = self.image("r.qcow2")
        qemu_img("bitmap", "--add", base, "b1")
        qemu_img("bitmap", "--add", "-g", "1M", "--disable", base, "b2")
        qemu_io(base, "write 1M 64k", "write 60M 4M")
        qemu_img("bitmap", "--merge", "b1", base, "b2")
        theirs, ours = self.path("q.qcow2"), self.path("s.qcow2")
        shutil.copy(base, theirs)
        shutil.copy(base, ours)
        qemu_img("resize", theirs, "100M")
        spindle_img("resize", ours, "100M")
        self.assert_clean(ours)
        self.assertNotIn("in-use", qemu_img("info", ours).stdout)
        for bitmap in ("b1", "b2"):
            self.assertEqual(self.dirty_map(ours, bitmap), self.dirty_map(theirs, bitmap))

    # ---- convert --bitmaps ----------------------------------------------------------------

    def test_convert_copies_bitmaps(self):
        source = self.image("c.qcow2")
        qemu_img("bitmap", "--add", source, "first")
        qemu_img("bitmap", "--add", "-g", "1M", "--disable", source, "second")
        qemu_img("bitmap", "--add", "-g", "4k", source, "third")
        qemu_io(source, "write 1M 64k", "write 9M 100k")
        theirs, ours = self.path("q.qcow2"), self.path("s.qcow2")
        qemu_img("convert", "--bitmaps", "-O", "qcow2", source, theirs)
        spindle_img("convert", "--bitmaps", "-O", "qcow2", source, ours)
        self.assert_clean(ours)
        self.assertEqual(bitmaps_section(qemu_img("info", ours).stdout),
                         bitmaps_section(qemu_img("info", theirs).stdout))
        for bitmap in ("first", "second", "third"):
            self.assertEqual(self.dirty_map(ours, bitmap), self.dirty_map(theirs, bitmap))
        # -n into an image that has one of the names already.
        for image in (theirs, ours):
            qemu_img("create", "-q", "-f", "qcow2", image, "64M")
            qemu_img("bitmap", "--add", image, "third")
        broken = self.image("broken.qcow2")
        qemu_img("bitmap", "--add", broken, "b")
        qemu_io(broken, "write 0 4k", "abort", check=False)
        raw = self.path("r.raw")
        qemu_img("create", "-q", "-f", "raw", raw, "1M")
        cases = [
            ["-n", "-O", "qcow2", source, "TARGET"],
            ["-O", "raw", source, "TARGET.raw"],
            ["-O", "qcow2", "-o", "compat=0.10", source, "TARGET"],
            ["-O", "qcow2", broken, "TARGET.new"],
            ["--skip-broken-bitmaps", "-O", "qcow2", broken, "TARGET.new"],
            ["-O", "qcow2", "-f", "raw", raw, "TARGET.new"],
        ]
        for case in cases:
            with self.subTest(case=case):
                results = []
                for program, target in (("qemu-img", theirs), (SPINDLE_IMG, ours)):
                    args = [a.replace("TARGET", target) for a in case]
                    proc = tool(program, "convert", "--bitmaps", *args, check=False)
                    lines = messages(proc.stderr, os.path.basename(program), target)
                    results.append((proc.returncode, [line.replace("qemu-img", "spindle-img")
                                                      for line in lines]))
                self.assertEqual(results[1], results[0])
        proc = spindle_img("convert", "--skip-broken-bitmaps", "-O", "qcow2", source,
                           ours + ".x", check=False)
        self.assertEqual(proc.returncode, 1)
        self.assertIn("Use of --skip-broken-bitmaps requires --bitmaps", proc.stderr)

    # ---- tracking writes ------------------------------------------------------------------

    def test_spindle_nbd_writes_are_tracked(self):
        image = self.image("t.qcow2")
        spindle_img("bitmap", "--add", image, "on")
        spindle_img("bitmap", "--add", "--disable", image, "off")
        server = self.server(image, args=["-f", "qcow2"])
        qemu_io(server.uri(), "write 5M 4k", "write -z 20M 1M", fmt="raw")
        listed = qemu_img("info", "-U", image).stdout
        self.assertIn("in-use", listed)  # set on disk before the first write
        rc, _, killed = server.stop()
        self.assertEqual((rc, killed), (0, False))
        self.assertNotIn("in-use", qemu_img("info", image).stdout)
        self.assert_clean(image)
        self.assertEqual(self.dirty_map(image, "on").split("\n")[1].split(),
                         ["5242880", "65536", "1", "dirty"])
        self.assertIn("20971520     1048576    1  dirty", self.dirty_map(image, "on"))
        self.assertNotIn(" dirty", self.dirty_map(image, "off"))
        # A killed server leaves the tracked bitmap in use (qemu: inconsistent).
        server = self.server(image, args=["-f", "qcow2"])
        qemu_io(server.uri(), "write 40M 4k", fmt="raw")
        server.kill()
        info = json.loads(qemu_img("info", "--output=json", image).stdout)
        flags = {b["name"]: b["flags"] for b in info["format-specific"]["data"]["bitmaps"]}
        self.assertEqual(flags, {"on": ["in-use", "auto"], "off": []})
        self.assert_clean(image)


if __name__ == "__main__":
    # --spindle-img is ours; the harness parses --spindle-nbd and hands the rest to unittest.
    SPINDLE_IMG = si.spindle_img_argument()
    si.main(required_binaries=("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo"))
