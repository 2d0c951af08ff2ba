#!/usr/bin/env python3
"""Interop tests for spindle-img against qemu-img (the oracle).

Every test runs spindle-img and checks the result with qemu-img / qemu-io: images spindle-img
creates pass `qemu-img check` and `qemu-img info` agrees on them; convert output equals
qemu-img convert's; check/compare exit codes match; info and map JSON match qemu-img's; bad
input exits 1 with a message.

Usage: spindle_img_test.py --spindle-img PATH [unittest options]
"""
import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import unittest

SPINDLE_IMG = None
MiB = 1 << 20


def run(*args, check=True):
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def img(*args, check=True):
    return run(SPINDLE_IMG, *args, check=check)


def qemu_img(*args, check=True):
    return run("qemu-img", *args, check=check)


def qemu_io(path, fmt, *commands):
    args = ["qemu-io", "-f", fmt]
    for command in commands:
        args += ["-c", command]
    run(*args, path)


class SpindleImgTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="spindle-img-test-")

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def path(self, name):
        return os.path.join(self.dir, name)

    def qemu_info(self, path, fmt):
        return json.loads(qemu_img("info", "-f", fmt, "--output=json", path).stdout)

    def qemu_map(self, path, fmt):
        return json.loads(qemu_img("map", "-f", fmt, "--output=json", path).stdout)

    def make_qemu_chain(self):
        """raw base <- QED mid (data + zero clusters) <- QED top (data, zero, grown)."""
        base, mid, top = self.path("base.raw"), self.path("mid.qed"), self.path("top.qed")
        with open(base, "wb") as f:
            f.truncate(8 * MiB)
            f.write(os.urandom(100000))
            f.seek(5 * MiB)
            f.write(b"\x11" * 70000)
        qemu_img("create", "-q", "-f", "qed", "-b", base, "-F", "raw", mid)
        qemu_io(mid, "qed", "write -P 0x22 1M 200k", "write -z 0 64k")
        qemu_img("create", "-q", "-f", "qed", "-b", mid, "-F", "qed", top, "12M")
        qemu_io(top, "qed", "write -P 0x33 3M 64k", "write -z 5M 4k", "write -P 0x44 9M 4k")
        return top

    def make_qed_with_data(self, name="data.qed"):
        path = self.path(name)
        qemu_img("create", "-q", "-f", "qed", path, "10M")
        qemu_io(path, "qed", "write -P 1 0 64k")
        return path

    # ---- create -------------------------------------------------------------------------

    def test_create_qed_passes_qemu_check_and_info_agrees(self):
        path = self.path("a.qed")
        out = img("create", "-f", "qed", "-o", "cluster_size=4096,table_size=2", path, "1G")
        self.assertIn(f"Formatting '{path}', fmt=qed size=1073741824", out.stdout)
        qemu_img("check", "-f", "qed", path)
        info = self.qemu_info(path, "qed")
        self.assertEqual(info["virtual-size"], 1 << 30)
        self.assertEqual(info["cluster-size"], 4096)
        self.assertFalse(info["dirty-flag"])
        # The image works: qemu-io writes and reads back through it.
        qemu_io(path, "qed", "write -P 0x5a 100M 8k", "read -P 0x5a 100M 8k")
        qemu_img("check", "-f", "qed", path)

    def test_create_qed_with_backing_defaults_size_and_records_backing(self):
        base = self.path("base.raw")
        img("create", "-f", "raw", base, "3M")
        self.assertEqual(os.path.getsize(base), 3 * MiB)
        overlay = self.path("ovl.qed")
        out = img("create", "-f", "qed", "-b", "base.raw", "-F", "raw", overlay)
        self.assertIn("backing_file=base.raw backing_fmt=raw", out.stdout)
        qemu_img("check", "-f", "qed", overlay)
        info = self.qemu_info(overlay, "qed")
        self.assertEqual(info["virtual-size"], 3 * MiB)
        self.assertEqual(info["backing-filename"], "base.raw")
        self.assertEqual(info["backing-filename-format"], "raw")
        self.assertEqual(info["full-backing-filename"], base)

    def test_create_raw_is_sparse(self):
        path = self.path("r.raw")
        img("create", path, "1.5G")
        self.assertEqual(os.path.getsize(path), 1536 * MiB)
        self.assertLess(os.stat(path).st_blocks * 512, MiB)

    # ---- info ---------------------------------------------------------------------------

    def test_info_json_matches_qemu_img(self):
        top = self.make_qemu_chain()
        for path, fmt in ((top, "qed"), (self.path("mid.qed"), "qed"), (self.path("base.raw"), "raw")):
            ours = json.loads(img("info", "-f", fmt, "--output=json", path).stdout)
            theirs = self.qemu_info(path, fmt)
            for field in ("virtual-size", "filename", "format", "actual-size", "dirty-flag",
                          "cluster-size", "backing-filename", "full-backing-filename",
                          "backing-filename-format"):
                self.assertEqual(ours.get(field), theirs.get(field), f"{path}: {field}")
        ours = json.loads(img("info", "--output=json", "--backing-chain", top).stdout)
        theirs = json.loads(qemu_img("info", "--output=json", "--backing-chain", top).stdout)
        self.assertEqual([e["filename"] for e in ours], [e["filename"] for e in theirs])
        self.assertEqual([e["format"] for e in ours], [e["format"] for e in theirs])
        self.assertEqual([e["virtual-size"] for e in ours], [e["virtual-size"] for e in theirs])

    def test_info_human(self):
        path = self.make_qed_with_data()
        out = img("info", path).stdout
        self.assertIn("file format: qed", out)
        self.assertIn("virtual size: 10 MiB (10485760 bytes)", out)
        self.assertIn("cluster_size: 65536", out)

    # ---- check --------------------------------------------------------------------------

    def check_both(self, path, *extra):
        ours = img("check", *extra, "-f", "qed", "--output=json", path, check=False)
        theirs = qemu_img("check", *extra, "-f", "qed", "--output=json", path, check=False)
        return ours, theirs

    def test_check_clean_image(self):
        path = self.make_qed_with_data()
        ours, theirs = self.check_both(path)
        self.assertEqual(ours.returncode, 0)
        self.assertEqual(theirs.returncode, 0)
        self.assertEqual(json.loads(ours.stdout), json.loads(theirs.stdout))
        self.assertIn("No errors were found on the image.", img("check", path).stdout)

    def test_check_leaks_exit_3(self):
        path = self.make_qed_with_data()
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) + 65536)  # an unreferenced cluster
        ours, theirs = self.check_both(path)
        self.assertEqual(ours.returncode, 3)
        self.assertEqual(theirs.returncode, 3)
        self.assertEqual(json.loads(ours.stdout), json.loads(theirs.stdout))
        self.assertEqual(json.loads(ours.stdout)["leaks"], 1)

    def test_check_corruption_exit_2_and_repair(self):
        path = self.make_qed_with_data()
        with open(path, "r+b") as f:
            header = f.read(64)
            l1_offset = struct.unpack_from("<Q", header, 40)[0]
            f.seek(l1_offset)
            l2_offset = struct.unpack("<Q", f.read(8))[0]
            f.seek(l2_offset + 8)  # L2 entry of cluster 1: far past the end of the file
            f.write(struct.pack("<Q", 0x7777770000))
        ours, theirs = self.check_both(path)
        self.assertEqual(ours.returncode, 2)
        self.assertEqual(theirs.returncode, 2)
        self.assertEqual(json.loads(ours.stdout), json.loads(theirs.stdout))
        repaired = img("check", "-r", "all", path, check=False)
        self.assertEqual(repaired.returncode, 0, repaired.stdout + repaired.stderr)
        self.assertIn("1 corruptions", repaired.stdout)
        qemu_img("check", "-f", "qed", path)

    def test_check_raw_is_unsupported_63(self):
        path = self.path("r.raw")
        img("create", path, "1M")
        result = img("check", path, check=False)
        self.assertEqual(result.returncode, 63)
        self.assertIn("does not support checks", result.stderr)

    def test_check_repair_json_matches_qemu_img(self):
        paths = []
        for name in ("ours.qed", "theirs.qed"):
            path = self.make_qed_with_data(name)
            with open(path, "r+b") as f:
                l1_offset = struct.unpack_from("<Q", f.read(64), 40)[0]
                f.seek(l1_offset)
                l2_offset = struct.unpack("<Q", f.read(8))[0]
                f.seek(l2_offset + 8)
                f.write(struct.pack("<Q", 0x7777770000))
            paths.append(path)
        ours = img("check", "-r", "all", "--output=json", paths[0], check=False)
        theirs = qemu_img("check", "-f", "qed", "-r", "all", "--output=json", paths[1],
                          check=False)
        self.assertEqual(ours.returncode, theirs.returncode, ours.stderr)
        ours_json, theirs_json = json.loads(ours.stdout), json.loads(theirs.stdout)
        theirs_json["filename"] = ours_json["filename"]
        self.assertEqual(ours_json, theirs_json)
        self.assertEqual(ours_json["corruptions-fixed"], 1)

    def test_format_names_come_from_the_registry(self):
        path = self.path("r.raw")
        img("create", "-f", "raw", path, "1M")
        cases = [
            (["create", "-f", "nosuch", self.path("n.img"), "1M"], 1, "Unknown file format 'nosuch'"),
            (["create", "-f", "vmdk", self.path("n.img"), "1M"], 1, "'vmdk'"),
            (["convert", "-O", "nosuch", path, self.path("n.img")], 1, "Unknown file format"),
            (["convert", "-O", "vdi", path, self.path("n.img")], 1, "'vdi'"),
            (["info", "-f", "nosuch", path], 1, "Unknown file format 'nosuch'"),
            (["map", "-f", "vpc", path], 1, "'vpc'"),
            (["check", "-f", "raw", path], 63, "This image format does not support checks"),
            (["create", "-f", "raw", "-o", "cluster_size=64k", self.path("n.img"), "1M"], 1,
             "Invalid parameter 'cluster_size' for format 'raw'"),
            (["create", "-f", "raw", "-b", path, "-F", "raw", self.path("n.img")], 1,
             "Backing file not supported for file format 'raw'"),
            (["create", "-f", "qed", "-o", "table_size=4k", self.path("n.img"), "1M"], 1,
             "Parameter 'table_size' expects a number"),
            (["create", "-f", "qed", "-o", "preallocation=off", self.path("n.img"), "1M"], 1,
             "Invalid parameter 'preallocation' for format 'qed'"),
        ]
        for args, code, message in cases:
            with self.subTest(args=args):
                result = img(*args, check=False)
                self.assertEqual(result.returncode, code, result.stderr)
                self.assertIn(message, result.stderr)
        self.assertFalse(os.path.exists(self.path("n.img")))

    def test_create_formatting_lines_match_qemu_img(self):
        base = self.path("base.raw")
        img("create", "-q", base, "1M")
        for fmt, options in (("raw", []), ("qed", []), ("qed", ["-o", "cluster_size=4k,table_size=2"]),
                             ("qed", ["-b", base, "-F", "raw"])):
            with self.subTest(fmt=fmt, options=options):
                ours = img("create", "-f", fmt, *options, self.path("ours.img"), "2M").stdout
                theirs = qemu_img("create", "-f", fmt, *options, self.path("ours.img"), "2M").stdout
                self.assertEqual(ours, theirs)

    # ---- convert ------------------------------------------------------------------------

    def test_convert_qed_chain_to_raw_equals_qemu_img(self):
        top = self.make_qemu_chain()
        ours, theirs = self.path("ours.raw"), self.path("theirs.raw")
        result = img("convert", "-p", "-f", "qed", "-O", "raw", top, ours)
        self.assertIn("100.00/100%", result.stdout)
        qemu_img("convert", "-f", "qed", "-O", "raw", top, theirs)
        run("cmp", ours, theirs)
        # Zero ranges are not written: the output is as sparse as qemu-img's.
        self.assertLessEqual(os.stat(ours).st_blocks, os.stat(theirs).st_blocks + 16)

    def test_convert_raw_to_qed_checks_compares_and_stays_sparse(self):
        top = self.make_qemu_chain()
        flat = self.path("flat.raw")
        qemu_img("convert", "-f", "qed", "-O", "raw", top, flat)
        out = self.path("out.qed")
        img("convert", "-f", "raw", "-O", "qed", "-m", "4", "-W", flat, out)
        qemu_img("check", "-f", "qed", out)
        self.assertIn("Images are identical.",
                      qemu_img("compare", "-f", "qed", "-F", "qed", out, top).stdout)
        entries = self.qemu_map(out, "qed")
        data = sum(e["length"] for e in entries if e["data"])
        self.assertLess(data, 2 * MiB)  # ~0.5 MiB of data in a 12 MiB image
        self.assertTrue(any(not e["present"] and e["zero"] for e in entries))
        # -S 0: everything is written (fully allocated) and still identical.
        full = self.path("full.qed")
        img("convert", "-O", "qed", "-S", "0", "-m", "1", top, full)
        qemu_img("check", "-f", "qed", full)
        qemu_img("compare", "-f", "qed", "-F", "qed", full, top)
        self.assertTrue(all(e["present"] for e in self.qemu_map(full, "qed")))

    def test_convert_skips_zero_buffers(self):
        src = self.path("zeros.raw")
        with open(src, "wb") as f:
            f.write(b"\0" * (4 * MiB))  # allocated on disk but all zeros
            f.write(b"\x01" * 4096)
        out = self.path("zeros.qed")
        img("convert", "-f", "raw", "-O", "qed", src, out)
        entries = self.qemu_map(out, "qed")
        # Only the last (partial) cluster holds data; the 4 MiB of zeros stay unallocated.
        self.assertEqual([(e["start"], e["length"]) for e in entries if e["data"]],
                         [(4 * MiB, 4096)])
        qemu_img("compare", "-f", "raw", "-F", "qed", src, out)

    def convert_flushes(self, *args):
        """Runs spindle-img convert under strace; the number of fdatasync/fsync calls after the
        target was opened for the copy (creating it may flush, as qemu-img's qcow2 create
        does). With the thread-pool engine: io_uring's flushes are no system calls."""
        trace = self.path("convert.strace")
        target = args[-1]
        run("env", "SPINDLE_AIO=threads", "strace", "-f", "-qq", "-e",
            "trace=fdatasync,fsync,openat", "-o", trace, SPINDLE_IMG, "convert", *args)
        with open(trace) as f:
            lines = f.read().splitlines()
        opened = [i for i, line in enumerate(lines) if "openat(" in line and f'"{target}"' in line]
        self.assertTrue(opened, "the target was never opened")
        return sum(1 for line in lines[opened[-1]:] if "fdatasync(" in line or "fsync(" in line)

    def test_convert_target_cache_mode_defaults_to_unsafe_as_in_qemu_img(self):
        # qemu-img convert's target is cache=unsafe unless -t says otherwise: no flush at all.
        src = self.path("cache.raw")
        with open(src, "wb") as f:
            f.write(os.urandom(3 * MiB))
        for fmt in ("raw", "qcow2"):
            out = self.path("cache-out." + fmt)
            self.assertEqual(self.convert_flushes("-f", "raw", "-O", fmt, src, out), 0, fmt)
            qemu_img("compare", "-f", "raw", "-F", fmt, src, out)
            os.unlink(out)
            self.assertGreater(
                self.convert_flushes("-t", "writeback", "-f", "raw", "-O", fmt, src, out), 0, fmt)
            qemu_img("compare", "-f", "raw", "-F", fmt, src, out)
            os.unlink(out)
            img("convert", "-t", "none", "-T", "none", "-f", "raw", "-O", fmt, src, out)
            qemu_img("compare", "-f", "raw", "-F", fmt, src, out)
            os.unlink(out)
        for flag, message in (("-t", "Invalid cache option: bogus"),
                              ("-T", "Invalid source cache option: bogus")):
            result = img("convert", flag, "bogus", "-O", "raw", src, self.path("never.raw"),
                         check=False)
            self.assertEqual(result.returncode, 1)
            self.assertIn(message, result.stderr)
            self.assertFalse(os.path.exists(self.path("never.raw")))

    # ---- compare ------------------------------------------------------------------------

    def test_compare_exit_codes_and_offset(self):
        a, b = self.path("a.raw"), self.path("b.raw")
        with open(a, "wb") as f:
            f.truncate(4 * MiB)
        shutil.copy(a, b)
        self.assertIn("Images are identical.", img("compare", a, b).stdout)
        with open(b, "r+b") as f:
            f.seek(3 * MiB + 1000)
            f.write(b"x")
        ours = img("compare", a, b, check=False)
        theirs = qemu_img("compare", a, b, check=False)
        self.assertEqual(ours.returncode, 1)
        self.assertEqual(theirs.returncode, 1)
        self.assertIn(f"Content mismatch at offset {3 * MiB + 512}!", ours.stdout)
        self.assertEqual(ours.stdout, theirs.stdout)
        # Size mismatch: fine if the tail reads as zeros, a difference with -s.
        c = self.path("c.raw")
        shutil.copy(a, c)
        with open(c, "r+b") as f:
            f.truncate(6 * MiB)
        self.assertEqual(img("compare", a, c, check=False).returncode, 0)
        strict = img("compare", "-s", a, c, check=False)
        self.assertEqual(strict.returncode, 1)
        self.assertIn("Strict mode: Image size mismatch!", strict.stdout)
        # QED vs its raw conversion: identical.
        top = self.make_qemu_chain()
        flat = self.path("flat.raw")
        qemu_img("convert", "-f", "qed", "-O", "raw", top, flat)
        self.assertEqual(img("compare", "-f", "qed", "-F", "raw", top, flat).returncode, 0)
        # Errors: exit 2.
        missing = img("compare", a, self.path("missing"), check=False)
        self.assertEqual(missing.returncode, 2)
        self.assertTrue(missing.stderr)

    # ---- map ----------------------------------------------------------------------------

    def test_map_json_matches_qemu_img(self):
        top = self.make_qemu_chain()
        path = self.path("w.qed")
        img("create", "-f", "qed", path, "16M")
        qemu_io(path, "qed", "write -P 0xab 0 4k", "write -z 1M 64k", "write -P 1 4M 192k")
        for image, fmt in ((path, "qed"), (top, "qed"), (self.path("mid.qed"), "qed")):
            ours = json.loads(img("map", "-f", fmt, "--output=json", image).stdout)
            theirs = self.qemu_map(image, fmt)
            self.assertEqual(ours, theirs, image)
        human = img("map", path).stdout.splitlines()
        self.assertEqual(human, qemu_img("map", "-f", "qed", path).stdout.splitlines())

    def corrupt_qed(self, kind):
        """A 10M QED image with data at 0..64k whose L1 or L2 entry for guest 0 is bad."""
        path = self.make_qed_with_data(kind + ".qed")
        with open(path, "r+b") as f:
            l1_offset = struct.unpack_from("<Q", f.read(64), 40)[0]
            f.seek(l1_offset)
            l2_offset = struct.unpack("<Q", f.read(8))[0]
            where, value = {
                "beyond-eof": (l2_offset, os.path.getsize(path) + 4 * 65536),
                "data-at-l1": (l2_offset, l1_offset),
                "data-at-own-l2": (l2_offset, l2_offset),
                "l2-at-l1": (l1_offset, l1_offset),
            }[kind]
            f.seek(where)
            f.write(struct.pack("<Q", value))
        return path

    def test_corrupt_pointers_fail_every_command(self):
        for kind in ("beyond-eof", "data-at-l1", "data-at-own-l2", "l2-at-l1"):
            with self.subTest(kind):
                path = self.corrupt_qed(kind)
                with open(path, "rb") as f:
                    before = f.read()
                for output in ("json", "human"):
                    result = img("map", "--output=" + output, path, check=False)
                    self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
                    self.assertIn("Could not read file metadata: Input/output error",
                                  result.stderr)
                    self.assertEqual(result.stdout, "")
                # check: corrupt (2), as qemu-img says, with the same counts.
                ours, theirs = self.check_both(path)
                self.assertEqual(theirs.returncode, 2, theirs.stdout)
                self.assertEqual(ours.returncode, 2, ours.stdout + ours.stderr)
                self.assertEqual(json.loads(ours.stdout), json.loads(theirs.stdout))
                result = img("convert", "-f", "qed", "-O", "raw", path, self.path("out.raw"),
                             check=False)
                self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
                self.assertIn("Input/output error", result.stderr)
                raw = self.path("zero.raw")
                img("create", "-f", "raw", raw, "10M")
                result = img("compare", "-f", "qed", "-F", "raw", path, raw, check=False)
                self.assertEqual(result.returncode, 2, result.stdout + result.stderr)
                with open(path, "rb") as f:
                    self.assertEqual(f.read(), before)  # read-only commands changed nothing

    # ---- resize -------------------------------------------------------------------------

    def test_resize(self):
        path = self.make_qed_with_data()
        self.assertIn("Image resized.", img("resize", "-f", "qed", path, "+10M").stdout)
        qemu_img("check", "-f", "qed", path)
        self.assertEqual(self.qemu_info(path, "qed")["virtual-size"], 20 * MiB)
        self.assertEqual(img("resize", path, "5M", check=False).returncode, 1)
        self.assertEqual(img("resize", "--shrink", path, "5M", check=False).returncode, 1)
        raw = self.path("r.raw")
        img("create", raw, "4M")
        self.assertEqual(img("resize", raw, "-1M", check=False).returncode, 1)
        img("resize", "--shrink", "-f", "raw", raw, "-1M")
        self.assertEqual(os.path.getsize(raw), 3 * MiB)
        img("resize", raw, "8M")
        self.assertEqual(os.path.getsize(raw), 8 * MiB)

    # ---- bad input ----------------------------------------------------------------------

    def test_bad_input_exits_1_with_message(self):
        garbage = self.path("garbage.qed")
        with open(garbage, "wb") as f:
            f.write(b"QED\0" + os.urandom(8192))
        random_file = self.path("random.bin")
        with open(random_file, "wb") as f:
            f.write(os.urandom(8192))
        missing = self.path("missing.qed")
        cases = [
            ["info", missing],
            ["info", garbage],
            ["info", "-f", "qed", random_file],
            ["check", garbage],
            ["map", garbage],
            ["convert", garbage, self.path("x.raw")],
            ["convert", "-m", "17", random_file, self.path("x.raw")],
            ["create", "-f", "qed", self.path("n.qed"), "12Q"],
            ["create", "-f", "qed", self.path("n.qed"), "-5"],
            ["create", "-f", "qed", "-o", "cluster_size=3000", self.path("n.qed"), "1M"],
            ["create", "-f", "qed", "-b", missing, "-F", "raw", self.path("n.qed"), "1M"],
            ["create", "-f", "qed", "-b", random_file, self.path("n.qed")],
            ["resize", missing, "1M"],
            ["frobnicate", missing],
            [],
        ]
        for args in cases:
            result = img(*args, check=False)
            self.assertEqual(result.returncode, 1, f"{args}: {result.stderr}")
            self.assertTrue(result.stderr.strip(), args)
            self.assertNotIn("Traceback", result.stderr)
        self.assertFalse(os.path.exists(self.path("n.qed")))

    def test_help(self):
        for command in ("create", "info", "check", "convert", "compare", "map", "resize"):
            result = img(command, "--help")
            self.assertIn("Usage", result.stdout)


def main():
    global SPINDLE_IMG
    parser = argparse.ArgumentParser()
    parser.add_argument("--spindle-img", required=True)
    args, rest = parser.parse_known_args()
    SPINDLE_IMG = os.path.abspath(args.spindle_img)
    if shutil.which("qemu-img") is None or shutil.which("qemu-io") is None:
        # 77: CTest's SKIP_RETURN_CODE; CI installs the peers and asks for them.
        if os.environ.get("SPINDLE_REQUIRE_PEERS", "") not in ("", "0"):
            print("FAILED: qemu-img/qemu-io not installed (SPINDLE_REQUIRE_PEERS=1)")
            return 1
        print("SKIPPED: qemu-img/qemu-io not installed")
        return 77
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)


if __name__ == "__main__":
    sys.exit(main())
