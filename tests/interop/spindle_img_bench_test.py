#!/usr/bin/env python3
"""Interop tests for `spindle-img bench` against `qemu-img bench` (the oracle).

Both tools run with the same arguments on the same images: the report lines must match
qemu-img's (the timing aside); -w must write the pattern where qemu-io then reads it; a
--flush-interval run must flush as often as qemu-img's rule says (counted with strace when it
is installed); bad options must exit non-zero with a message. Counts are small: the whole
script takes a few seconds.

Usage: spindle_img_bench_test.py --spindle-img PATH [unittest options]
"""
import os
import re
import shutil
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spindle_img_test as common  # noqa: E402  run(), img(), and main() (sets SPINDLE_IMG)

run, img = common.run, common.img
KiB = 1 << 10
MiB = 1 << 20
COMPLETED = re.compile(r"^Run completed in \d+\.\d{3} seconds\.$")


def qemu_io(path, fmt, *commands):
    args = ["qemu-io", "-f", fmt]
    for command in commands:
        args += ["-c", command]
    result = run(*args, path)
    # qemu-io reports a pattern mismatch on stdout and still exits 0.
    if "Pattern verification failed" in result.stdout:
        raise AssertionError(f"qemu-io {commands}: {result.stdout}")
    return result


class SpindleImgBenchTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="spindle-img-bench-test-")

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def path(self, name):
        return os.path.join(self.dir, name)

    def image(self, fmt, size=4 * MiB, name=None):
        path = self.path(name or f"disk.{fmt}")
        run("qemu-img", "create", "-q", "-f", fmt, path, str(size))
        return path

    def assert_same_report(self, fmt, *args):
        """Runs both tools with `args` on fresh images; the report lines must agree."""
        reports = []
        for tool in ("qemu-img", common.SPINDLE_IMG):
            path = self.image(fmt, name=f"{os.path.basename(str(tool))}.{fmt}")
            lines = run(tool, "bench", "-f", fmt, *args, path).stdout.splitlines()
            self.assertRegex(lines[-1], COMPLETED, f"{tool}: {lines}")
            reports.append(lines[:-1])
        self.assertEqual(reports[1], reports[0])
        return reports[1]

    # ---- output ---------------------------------------------------------------------------

    def test_report_matches_qemu_img(self):
        cases = [
            ("raw", ["-c", "100"]),
            ("qed", ["-c", "100", "-d", "1"]),
            ("raw", ["-w", "-c", "50", "-d", "4", "-s", "64k", "-S", "128k", "-o", "1M"]),
            ("qed", ["-w", "-c", "40", "-d", "8", "-s", "8k", "-S", "0", "--pattern=0x11"]),
            ("raw", ["-w", "-c", "64", "-d", "8", "--flush-interval=16"]),
            ("raw", ["-w", "-c", "64", "-d", "8", "--flush-interval=8", "--no-drain"]),
            ("raw", ["-c", "20", "-t", "none", "-i", "native", "-q", "-U"]),
        ]
        for fmt, args in cases:
            with self.subTest(fmt=fmt, args=args):
                self.assert_same_report(fmt, *args)
        first = self.assert_same_report("raw", "-c", "10")[0]
        self.assertEqual(first, "Sending 10 read requests, 4096 bytes each, 64 in parallel "
                                "(starting at offset 0, step size 4096)")

    def test_default_count_and_depth(self):
        path = self.image("raw", size=1 * MiB)
        out = img("bench", "-f", "raw", path).stdout.splitlines()
        self.assertEqual(out[0], "Sending 75000 read requests, 4096 bytes each, 64 in parallel "
                                 "(starting at offset 0, step size 4096)")
        self.assertRegex(out[1], COMPLETED)

    # ---- what -w writes -------------------------------------------------------------------

    def test_write_pattern_lands_where_qemu_io_reads_it(self):
        for fmt in ("raw", "qed"):
            with self.subTest(fmt=fmt):
                path = self.image(fmt)
                # 8 KiB every 16 KiB from 1 MiB on: written, gap, written, ...
                img("bench", "-f", fmt, "-w", "--pattern=0x5a", "-c", "8", "-d", "3", "-s", "8k",
                    "-S", "16k", "-o", "1M", path)
                commands = []
                for i in range(8):
                    start = MiB + i * 16 * KiB
                    commands += [f"read -P 0x5a {start} 8k", f"read -P 0 {start + 8 * KiB} 8k"]
                qemu_io(path, fmt, "read -P 0 0 1M", *commands)
                if fmt == "qed":
                    run("qemu-img", "check", "-f", "qed", path)

    def test_default_pattern_is_zero_and_offsets_wrap_at_the_end(self):
        path = self.image("raw", size=1 * MiB)
        with open(path, "r+b") as f:
            f.write(b"\xff" * MiB)
        # 1020k, then 0 (wrapped), 4k, 8k; 12k and beyond stay 0xff.
        img("bench", "-f", "raw", "-w", "-c", "4", "-d", "2", "-o", "1020k", path)
        qemu_io(path, "raw", "read -P 0 1020k 4k", "read -P 0 0 12k",
                "read -P 0xff 12k 1008k")

    def test_cache_and_aio_modes(self):
        for fmt in ("raw", "qed"):
            path = self.image(fmt)
            for extra in (["-t", "none"], ["-t", "directsync", "-n"], ["-t", "writethrough"],
                          ["-t", "unsafe", "--flush-interval=4"], ["-i", "threads"],
                          ["-i", "io_uring", "-t", "none"]):
                with self.subTest(fmt=fmt, extra=extra):
                    img("bench", "-f", fmt, "-w", "--pattern=7", "-c", "16", "-d", "4", "-s", "4k",
                        "-S", "12k", *extra, path)
                    img("bench", "-f", fmt, "-c", "16", "-d", "4", *extra[:2], path)
            qemu_io(path, fmt, "read -P 7 0 4k", "read -P 0 4k 8k", "read -P 7 180k 4k")
            if fmt == "qed":
                run("qemu-img", "check", "-f", "qed", path)

    # ---- flushes --------------------------------------------------------------------------

    def count_fdatasync(self, *args):
        """fdatasync calls of one `bench -i threads` run (the thread pool makes real syscalls)."""
        path = self.image("raw", size=1 * MiB, name="flush.raw")
        trace = self.path("strace.out")
        run("strace", "-f", "-qq", "-e", "trace=fdatasync", "-o", trace,
            common.SPINDLE_IMG, "bench", "-f", "raw", "-w", "-i", "threads", *args, path)
        with open(trace) as f:
            return sum(1 for line in f if "fdatasync(" in line)

    @unittest.skipIf(shutil.which("strace") is None, "strace is not installed")
    def test_flush_interval_flushes_as_qemu_img_does(self):
        base = self.count_fdatasync("-c", "100", "-d", "4")  # closing the image may flush
        # qemu-img's rule: a flush whenever a completion leaves 90, 80, ..., 10, 0 unsent.
        drained = self.count_fdatasync("-c", "100", "-d", "4", "--flush-interval=10")
        self.assertEqual(drained - base, 10)
        # Without draining, the last 4 completions all leave 0 unsent: 9 + 4 flushes.
        undrained = self.count_fdatasync("-c", "100", "-d", "4", "--flush-interval=10",
                                         "--no-drain")
        self.assertEqual(undrained - base, 13)
        unsafe = self.count_fdatasync("-c", "100", "-d", "4", "--flush-interval=10", "-t",
                                      "unsafe")
        self.assertEqual(unsafe, base)

    # ---- bad input ------------------------------------------------------------------------

    def test_bad_options_exit_non_zero_with_a_message(self):
        path = self.image("raw", size=1 * MiB)
        cases = [
            (["-c", "x"], "Invalid request count specified"),
            (["-c", "-1"], None),
            # qemu-img 7.2 hangs on -d 0 and sends empty requests for -s 0; newer versions
            # refuse both, as spindle-img does (reference/qed.md §4.7).
            (["-d", "0"], "Invalid queue depth specified"),
            (["-s", "0"], "Invalid buffer size specified"),
            (["-s", "1x"], "Invalid buffer size specified"),
            (["-S", "-4k"], None),
            (["-o", "nope"], "Invalid offset specified"),
            (["--pattern=256"], "Invalid pattern byte specified"),
            (["--flush-interval=64"], "--flush-interval is only available in write tests"),
            (["-w", "--flush-interval=8", "-d", "16"], "Flush interval can't be smaller than depth"),
            (["-w", "--flush-interval=z"], "Invalid flush interval specified"),
            (["-t", "foo"], "Invalid cache mode"),
            (["-i", "foo"], "Invalid aio option: foo"),
            (["-n"], "aio=native was specified, but it requires cache.direct=on"),
            (["-f", "vmdk"], "Unknown file format"),
            (["-o", "2M", "-c", "3"], "Failed request: Input/output error"),
            (["-s", "2M", "-c", "1"], "Failed request: Input/output error"),
            (["--frobnicate"], None),
        ]
        for args, message in cases:
            with self.subTest(args=args):
                result = img("bench", *args, path, check=False)
                self.assertNotEqual(result.returncode, 0)
                self.assertTrue(result.stderr.strip())
                self.assertNotIn("Run completed", result.stdout)
                if message:
                    self.assertIn(message, result.stderr)
                    # Where qemu-img has the same check, it fails as well (vmdk: qemu-img has it).
                    if args not in (["-d", "0"], ["-s", "0"], ["-f", "vmdk"]):
                        self.assertNotEqual(run("qemu-img", "bench", "-f", "raw", *args, path,
                                                check=False).returncode, 0)
        for args in ([], [path, path], [self.path("missing.raw")]):
            with self.subTest(args=args):
                result = img("bench", *args, check=False)
                self.assertNotEqual(result.returncode, 0)
                self.assertTrue(result.stderr.strip())

    def test_help(self):
        result = img("bench", "--help")
        self.assertIn("--flush-interval", result.stdout)
        self.assertIn("--pattern", result.stdout)


if __name__ == "__main__":
    sys.exit(common.main())
