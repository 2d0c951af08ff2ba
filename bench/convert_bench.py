#!/usr/bin/env python3
"""Side-by-side `spindle-img convert` and `qemu-img convert` on the same source image.

Rows: raw -> qcow2, raw -> qcow2 -c (zlib), raw -> qcow2 -c (zstd, -o compression_type=zstd),
qcow2 -> raw, qcow2 (compressed) -> raw. The source is a page-cached raw file of --size-mb with
compressible data (a repeated 64 KiB chunk of text-like bytes, varied per MiB so that clusters
are not identical), 10% random (incompressible) and 10% zeros; the qcow2 sources are made from
it by qemu-img. Both tools get the same arguments (-f, -O, -o, -c; qemu-img also -W, since
spindle-img always writes out of order; -m is left at both tools' default of 8). Each row runs
--repeat times per tool, alternating, the target deleted and sync(2) before every run; the
median wall time is reported with the child's user+sys CPU time (wait4) and the ratio
qemu/spindle of the wall times (above 1: spindle is faster). The outputs are checked with
qemu-img compare once per row, and the compressed targets' sizes are printed.

Usage: python3 bench/convert_bench.py [--spindle-img build/tools/spindle-img] [--dir /var/tmp]
                                      [--size-mb 256] [--repeat 3] [--only SUBSTRING]
About 2 minutes on the 2-vCPU reference VM with the defaults.
"""
import argparse
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

MiB = 1 << 20


def make_source(path, size_mb):
    rng = random.Random(1)
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(400)]
    chunk = b" ".join(rng.choice(words) for _ in range(20000))[:64 * 1024]
    with open(path, "wb") as f:
        for mib in range(size_mb):
            if mib % 10 == 3:
                f.write(os.urandom(MiB))
            elif mib % 10 == 7:
                f.seek(MiB, os.SEEK_CUR)
            else:
                tag = f"{mib:08d}".encode()
                f.write((tag + chunk[len(tag):]) * 16)
        f.truncate(size_mb * MiB)


def timed(args):
    start = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    stderr = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{stderr}")
    return wall, usage.ru_utime + usage.ru_stime


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spindle-img", default="build/tools/spindle-img")
    parser.add_argument("--dir", default="/var/tmp", help="where the image files go")
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3, help="runs per tool and row (median)")
    parser.add_argument("--only", default=None, help="rows whose name contains this")
    options = parser.parse_args()
    spindle = os.path.abspath(options.spindle_img)
    work = tempfile.mkdtemp(prefix="spindle-convert-bench-", dir=options.dir)
    try:
        raw = os.path.join(work, "source.raw")
        make_source(raw, options.size_mb)
        qcow2 = os.path.join(work, "source.qcow2")
        qcow2c = os.path.join(work, "source-c.qcow2")
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow2], check=True)
        subprocess.run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", raw, qcow2c],
                       check=True)
        rows = [
            ("raw -> qcow2", ["-f", "raw", "-O", "qcow2"], raw),
            ("raw -> qcow2 -c zlib", ["-c", "-f", "raw", "-O", "qcow2"], raw),
            ("raw -> qcow2 -c zstd", ["-c", "-f", "raw", "-O", "qcow2", "-o",
                                      "compression_type=zstd"], raw),
            ("qcow2 -> raw", ["-f", "qcow2", "-O", "raw"], qcow2),
            ("qcow2 compressed -> raw", ["-f", "qcow2", "-O", "raw"], qcow2c),
        ]
        print(f"# {platform.node()} {os.cpu_count()} CPUs, {options.size_mb} MiB source, "
              f"median of {options.repeat}")
        print(f"{'row':26} {'spindle s':>10} {'cpu':>6} {'qemu s':>8} {'cpu':>6} "
              f"{'ratio':>6} {'sizes (MiB) spindle/qemu':>26}")
        for name, args, source in rows:
            if options.only and options.only not in name:
                continue
            fmt = args[args.index("-O") + 1]
            results = {"spindle": [], "qemu": []}
            targets = {}
            for _ in range(options.repeat):
                for tool in ("spindle", "qemu"):
                    target = os.path.join(work, f"{tool}.{fmt}")
                    if os.path.exists(target):
                        os.unlink(target)
                    os.sync()
                    command = ([spindle, "convert"] if tool == "spindle"
                               else ["qemu-img", "convert", "-W"]) + args + [source, target]
                    results[tool].append(timed(command))
                    targets[tool] = target
            subprocess.run(["qemu-img", "compare", "-q", "-f", fmt, "-F", fmt,
                            targets["spindle"], targets["qemu"]], check=True)
            sizes = "/".join(f"{os.path.getsize(targets[t]) / MiB:.1f}" for t in ("spindle", "qemu"))
            wall = {t: statistics.median(r[0] for r in results[t]) for t in results}
            cpu = {t: statistics.median(r[1] for r in results[t]) for t in results}
            print(f"{name:26} {wall['spindle']:10.2f} {cpu['spindle']:6.2f} {wall['qemu']:8.2f} "
                  f"{cpu['qemu']:6.2f} {wall['qemu'] / wall['spindle']:5.2f}x {sizes:>26}",
                  flush=True)
            for target in targets.values():
                os.unlink(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
