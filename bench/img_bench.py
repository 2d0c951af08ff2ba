#!/usr/bin/env python3
"""Side-by-side `spindle-img bench` and `qemu-img bench` on the same image files.

Rows: raw, QED and qcow2 images x read and write x queue depth 1 and 32 x io_uring and threads x
4 KiB and 64 KiB requests (qemu-img bench's sequential pattern: each request starts where the
previous one ended, wrapping at the end of the image). Both tools get identical arguments
(-f FMT -t CACHE -i AIO -d DEPTH -s SIZE -c COUNT [-w]); COUNT comes from a short qemu-img
pilot run so that each run lasts about --target seconds. Each row runs --repeat times per tool,
alternating the tools, and reports the median.

The images are page-cached files (default cache=writeback), fully allocated and non-zero: QED
and qcow2 reads of unallocated clusters do no I/O at all, so both images are converted from the
filled raw one (qemu-img convert, default options: 64 KiB clusters). Reads run before writes; writes overwrite the same files in place (allocated clusters),
with a sync(2) before every run so that no run pays for another's dirty pages.

Columns: IOPS and MB/s from the tool's own "Run completed in X seconds" (N / X); CPU is the
child's user+sys time from wait4() (the whole process, open and close included); ratio is
spindle/qemu IOPS, CPU ratio spindle/qemu CPU seconds; "1.3x?" says whether spindle reaches
1.3x qemu-img's IOPS.

Usage: python3 bench/img_bench.py [--spindle-img build/tools/spindle-img] [--dir /var/tmp]
                                  [--size-mb 512] [--target 1.0] [--repeat 3] [--quick]
                                  [--cache writeback] [--only SUBSTRING]
A full run takes about 5-6 minutes on the 2-vCPU reference VM; --quick about 1.5 minutes.
"""
import argparse
import itertools
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

COMPLETED = re.compile(r"Run completed in (\d+\.\d+) seconds\.")
KiB = 1 << 10
MiB = 1 << 20
SIZES = {"4k": 4 * KiB, "64k": 64 * KiB}


def parse_run(args, returncode, stdout, stderr):
    if returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {returncode}:\n{stdout}{stderr}")
    match = COMPLETED.search(stdout)
    if not match:
        raise RuntimeError(f"{' '.join(args)}: no 'Run completed' line:\n{stdout}")
    return float(match.group(1))


def timed_run(tool, fmt, image, op, depth, aio, size, count, cache):
    """Runs one benchmark and returns (seconds as the tool reports them, user+sys CPU seconds)."""
    args = [tool, "bench", "-f", fmt, "-t", cache, "-i", aio, "-d", str(depth), "-s", size,
            "-c", str(count)]
    if op == "write":
        args.append("-w")
    args.append(image)
    os.sync()  # the previous run's dirty pages are written back outside this run
    with tempfile.TemporaryFile(mode="w+") as out, tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(args, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        seconds = parse_run(args, proc.returncode, out.read(), err.read())
    return seconds, usage.ru_utime + usage.ru_stime


def prepare_images(directory, size_mb):
    raw = os.path.join(directory, "img-bench.raw")
    qed = os.path.join(directory, "img-bench.qed")
    qcow2 = os.path.join(directory, "img-bench.qcow2")
    block = os.urandom(MiB)
    with open(raw, "wb") as f:
        for _ in range(size_mb):
            f.write(block)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qed", raw, qed], check=True)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow2], check=True)
    for path in (raw, qed, qcow2):  # into the page cache
        subprocess.run(["cat", path], stdout=subprocess.DEVNULL, check=True)
    os.sync()
    return {"raw": raw, "qed": qed, "qcow2": qcow2}


def pick_count(image, fmt, op, depth, aio, size, cache, target):
    """A qemu-img pilot run: the request count that takes about `target` seconds."""
    pilot = 5000
    seconds, _ = timed_run("qemu-img", fmt, image, op, depth, aio, size, pilot, cache)
    per_request = max(seconds, 0.001) / pilot
    count = int(target / per_request) // 1000 * 1000
    return min(max(count, 5000), 1000000)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spindle-img", default="build/tools/spindle-img")
    parser.add_argument("--dir", default="/var/tmp", help="where the image files go")
    parser.add_argument("--size-mb", type=int, default=512)
    parser.add_argument("--target", type=float, default=1.0, help="seconds per run (about)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per tool and row (median)")
    parser.add_argument("--cache", default="writeback")
    parser.add_argument("--quick", action="store_true", help="--target 0.3 --repeat 1")
    parser.add_argument("--only", default=None, help="rows whose name contains this")
    args = parser.parse_args()
    if args.quick:
        args.target, args.repeat = 0.3, 1
    if not shutil.which("qemu-img"):
        sys.exit("img_bench: qemu-img is missing (bash scripts/install-deps.sh installs it)")
    spindle = os.path.abspath(args.spindle_img)
    if not os.access(spindle, os.X_OK):
        sys.exit(f"img_bench: {spindle} is not built (ninja -C build spindle-img)")

    qemu_version = subprocess.run(["qemu-img", "--version"], capture_output=True,
                                  text=True).stdout.splitlines()[0]
    fs = subprocess.run(["df", "-T", args.dir], capture_output=True, text=True).stdout.split()
    fs_type = fs[9] if len(fs) > 9 else "?"
    workdir = tempfile.mkdtemp(prefix="spindle-img-bench-", dir=args.dir)
    started = time.monotonic()
    rows = []
    try:
        images = prepare_images(workdir, args.size_mb)
        matrix = itertools.product(["read", "write"], ["raw", "qed", "qcow2"], [1, 32],
                                   ["io_uring", "threads"], ["4k", "64k"])
        for op, fmt, depth, aio, size in matrix:
            name = f"{fmt} {op} QD{depth} {aio} {size}"
            if args.only and args.only not in name:
                continue
            image = images[fmt]
            count = pick_count(image, fmt, op, depth, aio, size, args.cache, args.target)
            results = {"qemu": [], "spindle": []}
            for _ in range(args.repeat):
                for label, tool in (("qemu", "qemu-img"), ("spindle", spindle)):
                    results[label].append(timed_run(tool, fmt, image, op, depth, aio, size,
                                                    count, args.cache))
            row = {"name": name, "count": count, "bytes": SIZES[size]}
            for label, runs in results.items():
                row[label] = (statistics.median(s for s, _ in runs),
                              statistics.median(c for _, c in runs))
            rows.append(row)
            print(f"  {name}: {count} requests done", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\nspindle-img bench vs {qemu_version}; {os.cpu_count()} CPUs, "
          f"Linux {platform.release()}, {fs_type} page-cached {args.size_mb} MiB images in "
          f"{args.dir}, -t {args.cache}, median of {args.repeat}, "
          f"{time.monotonic() - started:.0f} s in all")
    header = (f"{'row':30} | {'count':>7} | {'qemu IOPS':>9} | {'spdl IOPS':>9} | "
              f"{'qemu MB/s':>9} | {'spdl MB/s':>9} | {'ratio':>5} | {'qemu CPU':>8} | "
              f"{'spdl CPU':>8} | {'CPU x':>5} | 1.3x?")
    print(header)
    print("-" * len(header))
    for row in rows:
        (q_s, q_cpu), (s_s, s_cpu) = row["qemu"], row["spindle"]
        q_iops, s_iops = row["count"] / max(q_s, 1e-3), row["count"] / max(s_s, 1e-3)
        ratio = s_iops / q_iops
        print(f"{row['name']:30} | {row['count']:7} | {q_iops:9.0f} | {s_iops:9.0f} | "
              f"{q_iops * row['bytes'] / 1e6:9.1f} | {s_iops * row['bytes'] / 1e6:9.1f} | "
              f"{ratio:5.2f} | {q_cpu:7.2f}s | {s_cpu:7.2f}s | {s_cpu / max(q_cpu, 1e-3):5.2f} | "
              f"{'yes' if ratio >= 1.3 else 'no'}")


if __name__ == "__main__":
    main()
