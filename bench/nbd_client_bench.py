#!/usr/bin/env python3
"""`spindle-img bench` against `qemu-img bench` over NBD: both tools as NBD clients of the same
nbdkit memory export (`nbdkit -U SOCK memory 1G`, started here), 4 KiB requests, queue depth 32,
read and write (-w). Rows: qemu-img (one connection), spindle-img with one connection, and
spindle-img with `connections=4` (nbdkit's memory plugin advertises CAN_MULTI_CONN; Spindle
spreads the connections over IoThreads, QEMU's client has no such option).

Both tools get identical arguments (-f raw -d 32 -s 4k -c COUNT [-w] URI). qemu-img bench's
pattern is sequential (each request starts where the previous one ended, wrapping at the end),
not random; -S would change the step for both alike. The tools alternate, --repeat runs each,
median reported. The export is written once in full before the reads, so reads move data.

Columns: IOPS from the tool's own "Run completed in X seconds" (COUNT / X); CPU is the client's
user+sys time from wait4() (nbdkit's time is not counted); ratio is spindle/qemu IOPS.

Usage: python3 bench/nbd_client_bench.py [--spindle-img build/tools/spindle-img] [--count 200000]
                                  [--repeat 3] [--depth 32] [--size 4k]
Check that the machine is quiet first (uptime load < 1.5): the numbers are CPU-bound.
"""
import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from img_bench import parse_run  # noqa: E402


def timed_run(tool, uri, op, depth, size, count):
    """(seconds as the tool reports them, user+sys CPU seconds of the client)."""
    args = [tool, "bench", "-f", "raw", "-d", str(depth), "-s", size, "-c", str(count)]
    if op == "write":
        args.append("-w")
    args.append(uri)
    with tempfile.TemporaryFile(mode="w+") as out, tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(args, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        seconds = parse_run(args, returncode, out.read(), err.read())
    return seconds, usage.ru_utime + usage.ru_stime


def start_nbdkit(directory):
    sock = os.path.join(directory, "nbdkit.sock")
    proc = subprocess.Popen(["nbdkit", "-f", "-U", sock, "memory", "1G"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit("nbd_client_bench: nbdkit did not start")
        time.sleep(0.02)
    return proc, f"nbd+unix:///?socket={sock}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spindle-img", default="build/tools/spindle-img")
    parser.add_argument("--count", type=int, default=200000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--size", default="4k")
    args = parser.parse_args()
    for tool in ("qemu-img", "nbdkit"):
        if not shutil.which(tool):
            sys.exit(f"nbd_client_bench: {tool} is missing (scripts/install-deps.sh)")
    spindle = os.path.abspath(args.spindle_img)
    if not os.access(spindle, os.X_OK):
        sys.exit(f"nbd_client_bench: {spindle} is not built (ninja -C build spindle-img)")
    qemu_version = subprocess.run(["qemu-img", "--version"], capture_output=True,
                                  text=True).stdout.splitlines()[0]
    nbdkit_version = subprocess.run(["nbdkit", "--version"], capture_output=True,
                                    text=True).stdout.strip()
    load = os.getloadavg()[0]

    workdir = tempfile.mkdtemp(prefix="spindle-nbd-client-bench-")
    nbdkit, uri = start_nbdkit(workdir)
    started = time.monotonic()
    clients = [("qemu-img", "qemu-img", uri), ("spindle-img", spindle, uri),
               ("spindle-img connections=4", spindle, uri + "&connections=4")]
    rows = []
    try:
        # Fill the export so that reads return data, not holes.
        subprocess.run(["qemu-img", "bench", "-f", "raw", "-w", "-d", "32", "-s", "1M", "-c",
                        "1024", "--pattern=165", uri], check=True, stdout=subprocess.DEVNULL)
        for op in ("read", "write"):
            results = {label: [] for label, _, _ in clients}
            for _ in range(args.repeat):
                for label, tool, target in clients:
                    results[label].append(timed_run(tool, target, op, args.depth, args.size,
                                                    args.count))
            for label, _, _ in clients:
                runs = results[label]
                rows.append((op, label, statistics.median(s for s, _ in runs),
                             statistics.median(c for _, c in runs)))
            print(f"  {op} done", file=sys.stderr, flush=True)
    finally:
        nbdkit.terminate()
        nbdkit.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\nNBD clients vs {nbdkit_version} memory 1G over a Unix socket; {qemu_version}; "
          f"{os.cpu_count()} CPUs, Linux {platform.release()}; -d {args.depth} -s {args.size} "
          f"-c {args.count}; median of {args.repeat}; load {load:.2f} at start; "
          f"{time.monotonic() - started:.0f} s in all")
    header = (f"{'op':5} | {'client':26} | {'IOPS':>8} | {'MB/s':>7} | {'CPU':>7} | "
              f"{'vs qemu':>7}")
    print(header)
    print("-" * len(header))
    size_bytes = int(args.size[:-1]) * 1024 if args.size.endswith("k") else int(args.size)
    qemu_iops = {}
    for op, label, seconds, cpu in rows:
        iops = args.count / max(seconds, 1e-3)
        if label == "qemu-img":
            qemu_iops[op] = iops
        print(f"{op:5} | {label:26} | {iops:8.0f} | {iops * size_bytes / 1e6:7.1f} | "
              f"{cpu:6.2f}s | {iops / qemu_iops[op]:6.2f}x")


if __name__ == "__main__":
    main()
