#!/usr/bin/env python3
"""QED and qcow2 crash consistency: SIGKILL a process writing through Spindle at random moments.

qed_crash_writer (tests/block/qed_crash_writer.cc) opens a QED image through Spindle's QED
driver and writes recognisable data (16-byte records: u64 sequence number, u64 image offset)
at random places, flushing now and then; it reports on stdout each write before issuing it and
each completed flush. This script kills it with SIGKILL after a random delay, at least KILLS
times, on ten images (with and without a backing file, several cluster sizes), reusing each
image for a few kills so that every writer after the first opens a dirty image and repairs it.
After each kill:
  * `qemu-img check` must find no corruption (exit 0, or 3 for leaks: a killed allocating
    write leaks its clusters by design);
  * the image, read through QEMU's QED driver (`qemu-img convert -O raw`), must hold every
    write that a completed flush covered, unless a later write (whose fate is unknown) touched
    the same bytes; bytes no write touched must still hold the backing file's (or zero) data.

With --format qcow2 the images are qcow2 (qemu-img create, with and without lazy refcounts and
extended L2 entries, backing files raw or qcow2, some with compressed clusters that qemu-io wrote
before the first writer runs), and each writer is killed once it has reported a random number of
lines (0 = while it opens the image; a time cap covers a slow writer), so the kill points spread
over opening, allocating and rewriting; the assertions hold at any kill point.

Usage: test_crash.py --writer PATH [--kills N] [--seed N] [--format qed|qcow2]
Prints "SKIPPED: ..." and exits 77 (a CTest skip) if qemu-img is missing, or fails when
SPINDLE_REQUIRE_PEERS is set.
"""
import argparse
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from array import array

MiB = 1 << 20
KILLS = 50
ROUNDS = 2

# (cluster size, image size, backing file format or None, max write bytes). The writer puts half
# its writes in the first eighth of the image, which is soon allocated (in-place writes), and
# half anywhere, which keeps allocating over several kills.
IMAGES = [
    (65536, 32 * MiB, None, 2 * 65536),
    (65536, 32 * MiB, "raw", 2 * 65536),
    (4096, 16 * MiB, None, 5 * 4096),
    (4096, 16 * MiB, "qed", 5 * 4096),
    (16384, 24 * MiB, "raw", 40000),
]

# qcow2: (cluster size, image size, backing format or None, max write bytes, extra create
# options, compressed clusters written with qemu-io before the first writer).
QCOW2_IMAGES = [
    (65536, 32 * MiB, None, 2 * 65536, "", 12),
    (65536, 32 * MiB, "raw", 2 * 65536, "lazy_refcounts=on", 12),
    (4096, 16 * MiB, None, 5 * 4096, "lazy_refcounts=on", 0),
    (4096, 16 * MiB, "qcow2", 5 * 4096, "", 24),
    (65536, 24 * MiB, "raw", 40000, "extended_l2=on,lazy_refcounts=on", 8),
]


def log(message):
    print(message, flush=True)


def run(cmd, check=True, timeout=60):
    proc = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {' '.join(map(str, cmd))}\n"
                             f"{proc.stdout.decode()}{proc.stderr.decode()}")
    return proc


def records(seq, offset, length):
    """The bytes qed_crash_writer writes for write `seq` at `offset`."""
    count = length // 16
    words = array("Q", bytes(16 * count))
    words[0::2] = array("Q", [seq]) * count
    words[1::2] = array("Q", range(offset, offset + length, 16))
    if sys.byteorder != "little":
        words.byteswap()
    return words.tobytes()


class Model:
    """What the image must hold: `expected` bytes where `known` is 1; bytes whose last write's
    fate is unknown (issued but not covered by a completed flush) are 0 in `known`."""

    def __init__(self, initial):
        self.expected = bytearray(initial)
        self.known = bytearray(b"\x01") * len(initial)
        self.next_seq = 1

    def apply(self, writes, durable_seq):
        """`writes`: (kind, seq, offset, length) in issue order."""
        for kind, seq, offset, length in writes:
            end = offset + length
            if seq <= durable_seq:
                self.expected[offset:end] = (bytes(length) if kind == "Z"
                                             else records(seq, offset, length))
                self.known[offset:end] = b"\x01" * length
            else:
                self.known[offset:end] = bytes(length)
            self.next_seq = max(self.next_seq, seq + 1)

    def mismatches(self, actual):
        """Known ranges whose bytes differ: [(start, end)], first few only."""
        bad = []
        for match in re.finditer(rb"\x01+", self.known):
            start, end = match.span()
            if actual[start:end] != self.expected[start:end]:
                # Narrow down to the first differing 16-byte record for the report.
                at = start
                while at < end and actual[at:at + 16] == self.expected[at:at + 16]:
                    at += 16
                bad.append((at, end))
                if len(bad) >= 5:
                    break
        return bad


def describe(data, at):
    seq, offset = struct.unpack_from("<QQ", data, at - at % 16)
    return f"record(seq={seq}, offset={offset:#x})"


def parse_output(text):
    """Writer stdout -> (writes, last durable seq). A torn last line is ignored."""
    writes, durable = [], 0
    lines = text.split("\n")
    for line in lines[:-1]:  # the part after the last newline is torn (or empty)
        fields = line.split()
        if not fields or fields[0] == "OPEN":
            continue
        if fields[0] in ("W", "Z"):
            writes.append((fields[0], int(fields[1]), int(fields[2]), int(fields[3])))
        elif fields[0] == "F":
            durable = int(fields[1])
        else:
            raise AssertionError(f"unexpected writer output: {line!r}")
    return writes, durable


def make_backing(directory, index, fmt, size, rng):
    """A backing file with data in some places (and holes elsewhere); returns (path, bytes)."""
    content = bytearray(size)
    for _ in range(24):
        offset = rng.randrange(0, size // 512) * 512
        length = min(size - offset, rng.randrange(1, 64) * 512)
        content[offset:offset + length] = bytes([rng.randrange(1, 256)]) * length
    raw = os.path.join(directory, f"base{index}.raw")
    with open(raw, "wb") as f:
        f.write(content)
    if fmt == "raw":
        return raw, bytes(content)
    path = os.path.join(directory, f"base{index}.{fmt}")
    run(["qemu-img", "convert", "-f", "raw", "-O", fmt, "-o", "cluster_size=4096", raw, path])
    return path, bytes(content)


def write_compressed(image, cluster_size, size, count, initial, rng):
    """Writes `count` compressed clusters with qemu-io (half in the first eighth, which the
    writer soon rewrites: copy-on-write from a compressed cluster); returns the new content."""
    content = bytearray(initial)
    clusters = size // cluster_size
    picked = set()
    while len(picked) < count:
        bound = clusters // 8 if len(picked) % 2 == 0 else clusters
        picked.add(rng.randrange(0, bound))
    commands = []
    for cluster in sorted(picked):
        pattern = rng.randrange(1, 256)
        offset = cluster * cluster_size
        commands += ["-c", f"write -c -P {pattern} {offset} {cluster_size}"]
        content[offset:offset + cluster_size] = bytes([pattern]) * cluster_size
    run(["qemu-io", "-f", "qcow2"] + commands + [image])
    return bytes(content)


def kill_after_lines(proc, report, lines, cap):
    """SIGKILLs `proc` once `report` holds `lines` lines (0: at once) or `cap` seconds passed."""
    deadline = time.monotonic() + cap
    while lines > 0 and time.monotonic() < deadline and proc.poll() is None:
        with open(report, "rb") as f:
            if f.read().count(b"\n") >= lines:
                break
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)


def run_image(writer, directory, index, config, kills, rng, fmt="qed"):
    cluster_size, size, backing_fmt, max_write = config[:4]
    image = os.path.join(directory, f"image{index}.{fmt}")
    initial = bytes(size)
    options = f"cluster_size={cluster_size}"
    if fmt == "qcow2" and config[4]:
        options += "," + config[4]
    create = ["qemu-img", "create", "-f", fmt, "-o", options]
    if backing_fmt:
        backing, initial = make_backing(directory, index, backing_fmt, size, rng)
        create += ["-b", os.path.basename(backing), "-F", backing_fmt]
    run(create + [image, str(size)])
    if fmt == "qcow2" and config[5]:
        initial = write_compressed(image, cluster_size, size, config[5], initial, rng)
    model = Model(initial)
    raw = os.path.join(directory, "out.raw")
    leaks = 0
    for kill in range(kills):
        # Its report goes to a file, not a pipe: a full pipe would stall the writer.
        report = os.path.join(directory, "writer.out")
        with open(report, "wb") as out, open(report + ".err", "wb") as err:
            proc = subprocess.Popen([writer, image, "--seed", str(rng.randrange(1 << 30)),
                                     "--first-seq", str(model.next_seq),
                                     "--max-write", str(max_write), "--format", fmt],
                                    stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        if fmt == "qcow2":
            # Kill points by progress, not by time: sometimes while it opens (and repairs) the
            # image, mostly after a random number of reported writes and flushes.
            kill_after_lines(proc, report, rng.choice([0, rng.randrange(1, 30),
                                                       rng.randrange(30, 600)]), cap=2.0)
        else:
            # Random moments: sometimes while it opens (and repairs) the image, mostly mid-writes.
            time.sleep(rng.choice([rng.uniform(0.0, 0.02), rng.uniform(0.02, 0.3)]))
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        if proc.returncode != -signal.SIGKILL:
            with open(report + ".err") as f:
                raise AssertionError(f"writer exited {proc.returncode} before the kill:\n"
                                     f"{f.read()}")
        with open(report) as f:
            writes, durable = parse_output(f.read())
        model.apply(writes, durable)

        check = run(["qemu-img", "check", "-f", fmt, image], check=False)
        if check.returncode not in (0, 3):
            raise AssertionError(f"image {index} kill {kill}: qemu-img check exit "
                                 f"{check.returncode}:\n"
                                 f"{check.stdout.decode()}{check.stderr.decode()}")
        leaks += check.returncode == 3
        run(["qemu-img", "convert", "-f", fmt, "-O", "raw", image, raw])
        with open(raw, "rb") as f:
            actual = f.read()
        if len(actual) != size:
            raise AssertionError(f"image {index}: size {len(actual)} != {size}")
        bad = model.mismatches(actual)
        if bad:
            details = "; ".join(f"at {start:#x}: image has {describe(actual, start)}, expected "
                                f"{describe(model.expected, start)}" for start, _ in bad)
            raise AssertionError(f"image {index} kill {kill}: durable data lost ({len(writes)} "
                                 f"writes, durable up to seq {durable}): {details}")
        allocated = re.search(rb"(\d+/\d+) = [\d.]+% allocated", check.stdout)
        log(f"  image {index} kill {kill + 1}: {len(writes)} writes issued, "
            f"durable up to seq {durable}, check exit {check.returncode}, "
            f"{allocated.group(1).decode() if allocated else '?'} clusters allocated")
    return leaks


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--writer", required=True)
    parser.add_argument("--kills", type=int, default=KILLS)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--format", choices=("qed", "qcow2"), default="qed")
    args = parser.parse_args()
    if shutil.which("qemu-img") is None:
        # 77: CTest's SKIP_RETURN_CODE; CI installs the peers and asks for them.
        if os.environ.get("SPINDLE_REQUIRE_PEERS", "") not in ("", "0"):
            log("FAILED: qemu-img (qemu-utils) not installed (SPINDLE_REQUIRE_PEERS=1)")
            return 1
        log("SKIPPED: qemu-img (qemu-utils) not installed")
        return 77
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    log(f"seed {seed} (rerun with --seed {seed})")
    rng = random.Random(seed)
    start = time.monotonic()
    # Each configuration twice, on a fresh image: the first writer on an image allocates a lot,
    # later ones mostly rewrite in place, and each of those first repairs a dirty image.
    images = (QCOW2_IMAGES if args.format == "qcow2" else IMAGES) * ROUNDS
    per_image = -(-args.kills // len(images))
    total = leaks = 0
    with tempfile.TemporaryDirectory(prefix="spindle-crash-") as directory:
        try:
            for index, config in enumerate(images):
                log(f"image {index}: {args.format}, cluster {config[0]}, size {config[1]}, "
                    f"backing {config[2] or 'none'}"
                    + (f", options '{config[4]}', {config[5]} compressed clusters"
                       if args.format == "qcow2" else ""))
                leaks += run_image(os.path.abspath(args.writer), directory, index, config,
                                   per_image, rng, args.format)
                total += per_image
        except AssertionError as error:
            keep = tempfile.mkdtemp(prefix="spindle-crash-failed-")
            for name in os.listdir(directory):
                shutil.copy(os.path.join(directory, name), keep)
            log(f"FAILED (seed {seed}; images kept in {keep}): {error}")
            return 1
    log(f"PASSED: {total} kills, {leaks} with leaks, {time.monotonic() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
