#!/usr/bin/env python3
"""Side-by-side NBD server benchmark: spindle-nbd, qemu-nbd (--aio=threads and io_uring) and
nbdkit's file plugin serve the same page-cached raw file over a Unix socket, and fio's nbd
engine drives each in turn with the same jobs. Prints IOPS, MB/s, mean latency, server CPU
(% of one core, from /proc/PID/stat) and fio's own CPU (from wait4) per row, and the ratio of
Spindle's IOPS to the best peer's, plus server CPU-seconds per million requests. Two QED rows (4 KiB
random and 1 MiB sequential reads) compare spindle-nbd with qemu-nbd -f qed. The qcow2 rows compare
spindle-nbd -f qcow2 with qemu-nbd -f qcow2 (--aio=threads and io_uring): the four raw jobs on a
fully allocated image converted from the raw one ("qcow2 ..."), sequential 4 KiB writes that
allocate into a fresh, empty image created again before every run ("qcow2 4k write alloc"), and
reads of a compressed image made by qemu-img convert -c from compressible data ("qcow2c ...").
After the table, spindle-nbd's qcow2 IOPS over its own raw IOPS for the same jobs. The
"storaged" rows run the four raw jobs against spindle-storaged and qemu-storage-daemon (file +
raw nodes; qemu's file node with aio=threads and io_uring), both started from the same
command line, the export in the main loop (see storaged_command for why not in an IoThread).

With --repeat N every job runs N rounds (all servers in turn each round): the table shows the
median of each column and the range of Spindle's IOPS ratio over the rounds, since a shared
2-core VM swings by tens of percent between runs. The 1 MiB row also shows "spindle zero-copy"
(--zero-copy=always: sendfile from the page cache), which spends less server CPU but, with the
client on the same machine, delivers less than the default (a writev from a mapping of the
image, one kernel copy).

Usage: python3 bench/nbd_bench.py [--spindle-nbd build/tools/spindle-nbd] [--size-mb 1024]
                                  [--runtime 5] [--repeat 1] [--only NAME or PREFIX]
                                  [--baseline-spindle-nbd OTHER_BUILD [--no-peers]]
Everything runs on this machine (Unix sockets only); the image lives under /tmp.
"""
import argparse, json, os, shutil, signal, statistics, subprocess, sys, tempfile, threading
import time

JOBS = [
    # name, fio arguments
    ("4k randread QD32", ["--rw=randread", "--bs=4k", "--iodepth=32"]),
    ("4k randwrite QD32", ["--rw=randwrite", "--bs=4k", "--iodepth=32"]),
    ("1M seqread QD8", ["--rw=read", "--bs=1M", "--iodepth=8"]),
    ("4k randread 4 conns", ["--rw=randread", "--bs=4k", "--iodepth=32", "--numjobs=4",
                             "--group_reporting"]),
]


# The allocating row writes sequentially into a fresh qcow2 image this large, so that no run
# reaches its end (at 100k IOPS of 4 KiB, 10 s write 4 GiB): every 16th request allocates a
# 64 KiB cluster, the others write into the cluster just allocated.
ALLOCATING_SIZE_GB = 16


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


def wait_for_socket(path, proc, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        time.sleep(0.05)
    raise RuntimeError("server did not create its socket")


def run_fio(socket, job_args, runtime, size_mb):
    """Runs one fio job; returns IOPS, MB/s, mean latency (us), requests, and fio's own CPU %
    (user+sys of one core): the client shares the machine, so it shows who is the bottleneck."""
    uri = f"nbd+unix:///?socket={socket}"
    cmd = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--size={size_mb}M",
           "--time_based", f"--runtime={runtime}", "--output-format=json", "--norandommap",
           "--randrepeat=0"] + job_args
    started = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    watchdog = threading.Timer(runtime + 60, proc.kill)
    watchdog.start()
    try:
        stdout = proc.stdout.read()
        # wait4 rather than Popen.wait: its rusage is fio's CPU (with its job processes).
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        watchdog.cancel()
    wall = time.time() - started
    if proc.returncode != 0:
        raise RuntimeError(f"fio failed with {proc.returncode}")
    client_cpu = usage.ru_utime + usage.ru_stime
    data = json.loads(stdout[stdout.index("{"):])
    job = data["jobs"][0]
    iops = job["read"]["iops"] + job["write"]["iops"]
    bw = (job["read"]["bw_bytes"] + job["write"]["bw_bytes"]) / 1e6
    ops = job["read"]["total_ios"] + job["write"]["total_ios"]
    lat_ns = max(job["read"]["lat_ns"]["mean"], job["write"]["lat_ns"]["mean"])
    return iops, bw, lat_ns / 1000, ops, 100 * client_cpu / wall


def serve(name, command, socket):
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # A storage daemon writes its pid file once every option (the export too) is applied;
        # its NBD socket exists before that.
        ready = command[command.index("--pidfile") + 1] if "--pidfile" in command else socket
        wait_for_socket(ready, proc)
    except Exception:
        proc.kill()
        raise
    return proc


def stop(proc, socket):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for leftover in (socket, socket + ".pid"):  # a daemon that crashed leaves them
        if os.path.exists(leftover):
            os.unlink(leftover)


def best_other(results):
    """The strongest comparison in one round: the best peer by IOPS, else the baseline."""
    peers = [v for k, v in results.items() if not k.startswith("spindle")]
    if peers:
        return max(peers, key=lambda v: v[0]), "best peer"
    if "spindle baseline" in results:
        return results["spindle baseline"], "baseline"
    return None, ""


def compare(rounds, medians):
    """Spindle's median IOPS, CPU % and CPU per request against those of the peer with the
    highest median IOPS, plus the range of the per-round ratio to each round's best peer."""
    if best_other(rounds[0])[0] is None:
        return ""
    versus = best_other(rounds[0])[1]
    if versus == "baseline":
        others = ["spindle baseline"]
    else:
        others = [name for name in rounds[0] if not name.startswith("spindle")]
    median_of = {name: [statistics.median(r[name][i] for r in rounds) for i in range(6)]
                 for name in others}
    best = max(median_of.values(), key=lambda v: v[0])
    text = (f"{medians[0] / best[0]:.2f}x IOPS, {medians[3] / best[3]:.2f}x CPU, "
            f"{medians[4] / best[4]:.2f}x CPU/req vs {versus}")
    if len(rounds) > 1:
        ours = next(iter(rounds[0]))  # each row's first server is Spindle's
        ratios = [r[ours][0] / best_other(r)[0][0] for r in rounds]
        text += f" (IOPS ratio {min(ratios):.2f}-{max(ratios):.2f})"
    return text


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--spindle-nbd", default="build/tools/spindle-nbd")
    parser.add_argument("--spindle-storaged", default="build/tools/spindle-storaged")
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--runtime", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds per job; the table shows medians and the ratio's range")
    parser.add_argument("--only", default=None, help="run only the job with this name")
    parser.add_argument("--baseline-spindle-nbd", default=None,
                        help="another spindle-nbd build to run as an extra row (A/B comparisons)")
    parser.add_argument("--no-peers", action="store_true",
                        help="skip qemu-nbd and nbdkit (with --baseline-spindle-nbd: A/B only)")
    args = parser.parse_args()
    for tool in ("fio", "qemu-nbd", "nbdkit", "qemu-img"):
        if not shutil.which(tool):
            sys.exit(f"nbd_bench: {tool} is missing (bash scripts/install-deps.sh installs it)")
    spindle = os.path.abspath(args.spindle_nbd)
    workdir = tempfile.mkdtemp(prefix="spindle-nbd-bench-")
    image = os.path.join(workdir, "disk.img")
    qed = os.path.join(workdir, "disk.qed")
    qcow2 = os.path.join(workdir, "disk.qcow2")
    compressed = os.path.join(workdir, "compressed.qcow2")
    fresh = os.path.join(workdir, "fresh.qcow2")
    socket = os.path.join(workdir, "nbd.sock")
    try:
        # Non-zero data everywhere, then read once so the page cache holds it.
        with open(image, "wb") as f:
            block = os.urandom(1 << 20)
            for _ in range(args.size_mb):
                f.write(block)
        subprocess.run(["cat", image], stdout=subprocess.DEVNULL, check=True)
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qed", image, qed], check=True)
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", image, qcow2],
                       check=True)
        # Compressible but not zero (zeros would become holes): text-like data, about 3:1.
        text = os.path.join(workdir, "text.img")
        with open(text, "wb") as f:
            words = [os.urandom(3).hex().encode() for _ in range(4096)]
            chunk = b" ".join(words[i % 4096] for i in range(150000))[:1 << 20]
            for _ in range(args.size_mb):
                f.write(chunk)
        subprocess.run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", text,
                        compressed], check=True)
        os.unlink(text)
        cores = os.cpu_count()

        def format_servers(fmt, path, qemu_aio):
            """spindle-nbd and qemu-nbd serving `path` as `fmt` (qemu-nbd with each AIO mode)."""
            listed = [("spindle-nbd", [spindle, "-t", "-f", fmt, "-k", socket, path])]
            for aio in qemu_aio:
                listed.append((f"qemu-nbd {aio}", ["qemu-nbd", "-t", "-f", fmt, f"--aio={aio}",
                                                   "-e", "8", "--cache=writeback", "-k", socket,
                                                   path]))
            if args.no_peers:
                listed = listed[:1]
            if args.baseline_spindle_nbd:
                baseline = os.path.abspath(args.baseline_spindle_nbd)
                listed.insert(1, ("spindle baseline", [baseline, "-t", "-f", fmt, "-k", socket,
                                                       path]))
            return listed

        servers = format_servers("raw", image, ["threads", "io_uring"])

        def storaged_command(binary, aio=None):
            """A storage daemon exporting `image` as the default export "". No IoThread for the
            export: qemu-storage-daemon 7.2 aborts when a client disconnects from an export in
            an IoThread (fio connects once to size the export before the job)."""
            file_node = f"driver=file,node-name=f0,filename={image}" + (f",aio={aio}" if aio else "")
            return [binary, "--pidfile", socket + ".pid", "--blockdev", file_node,
                    "--blockdev", "driver=raw,node-name=d0,file=f0",
                    "--nbd-server", f"addr.type=unix,addr.path={socket}",
                    "--export", "type=nbd,id=e0,node-name=d0,name=,writable=on"]

        storaged_servers = [("spindle-storaged",
                             storaged_command(os.path.abspath(args.spindle_storaged)))]
        if shutil.which("qemu-storage-daemon") and not args.no_peers:
            for aio in ("threads", "io_uring"):
                storaged_servers.append((f"qemu-storage-daemon {aio}",
                                         storaged_command("qemu-storage-daemon", aio)))
        if not args.no_peers:
            servers.append(("nbdkit file", ["nbdkit", "-f", "-U", socket, "file", image]))
        qed_servers = format_servers("qed", qed, ["threads"])
        qcow2_servers = format_servers("qcow2", qcow2, ["threads", "io_uring"])
        compressed_servers = format_servers("qcow2", compressed, ["threads", "io_uring"])
        fresh_servers = format_servers("qcow2", fresh, ["threads", "io_uring"])

        def make_fresh():
            # Each server starts from an empty image, so every run allocates.
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", fresh,
                            f"{ALLOCATING_SIZE_GB}G"], check=True)

        rows = []
        # name, fio arguments, servers, image (page-cached before each round), per-run setup
        jobs = [(n, a, servers, image, None) for n, a in JOBS] + [
            ("QED 4k randread QD32", JOBS[0][1], qed_servers, qed, None),
            ("QED 1M seqread QD8", JOBS[2][1], qed_servers, qed, None)] + [
            ("qcow2 " + n, a, qcow2_servers, qcow2, None) for n, a in JOBS] + [
            ("qcow2 4k write alloc QD32", ["--rw=write", "--bs=4k", "--iodepth=32",
                                           f"--size={ALLOCATING_SIZE_GB}G"],
             fresh_servers, None, make_fresh),
            ("qcow2c 4k randread QD32", JOBS[0][1], compressed_servers, compressed, None),
            ("qcow2c 1M seqread QD8", JOBS[2][1], compressed_servers, compressed, None)] + [
            ("storaged " + n, a, storaged_servers, image, None) for n, a in JOBS]
        for job_name, job_args, server_list, served, setup in jobs:
            if args.only and args.only != job_name and not job_name.startswith(args.only + " "):
                continue
            rounds = []  # one {server: (iops, MB/s, lat us, CPU %, CPU s/Mreq)} per round
            for _ in range(max(args.repeat, 1)):
                # Read the image again first: some hosts reclaim page cache that went unused
                # for minutes (this VM's DAMON did, to the QED image), and every row is meant
                # to measure page-cached data.
                if served:
                    subprocess.run(["cat", served], stdout=subprocess.DEVNULL, check=True)
                results = {}
                extra = []
                if job_name.startswith("1M seqread"):
                    extra = [("spindle zero-copy", [spindle, "-t", "-f", "raw", "--zero-copy=always",
                                                    "-k", socket, image])]
                for server_name, command in server_list[:1] + extra + server_list[1:]:
                    if setup:
                        setup()
                    proc = serve(server_name, command, socket)
                    try:
                        cpu_before, wall_before = cpu_seconds(proc.pid), time.time()
                        iops, bw, lat_us, ops, fio_cpu = run_fio(socket, job_args,
                                                                 args.runtime, args.size_mb)
                        cpu = cpu_seconds(proc.pid) - cpu_before
                        wall = time.time() - wall_before
                    finally:
                        stop(proc, socket)
                    results[server_name] = (iops, bw, lat_us, 100 * cpu / wall,
                                            cpu / ops * 1e6 if ops else 0, fio_cpu)
                rounds.append(results)
            rows.append((job_name, rounds))
        rounds_note = f", median of {args.repeat} rounds" if args.repeat > 1 else ""
        print(f"\nNBD servers over a Unix socket, fio --ioengine=nbd, {args.size_mb} MiB page-cached "
              f"image, {args.runtime} s per run{rounds_note}, {cores} CPUs")
        header = (f"{'job':26} | {'server':28} | {'IOPS':>9} | {'MB/s':>8} | {'lat us':>7} | "
                  f"{'CPU %':>6} | {'CPU s/Mreq':>10} | {'fio CPU %':>9} | ratio")
        print(header)
        print("-" * len(header))
        for job_name, rounds in rows:
            for server_name in rounds[0]:
                medians = [statistics.median(r[server_name][i] for r in rounds) for i in range(6)]
                iops, bw, lat, cpu, cpu_per_m, fio_cpu = medians
                ratio = ""
                if server_name == next(iter(rounds[0])):  # Spindle's, against the peers
                    ratio = compare(rounds, medians)
                print(f"{job_name:26} | {server_name:28} | {iops:9.0f} | {bw:8.1f} | {lat:7.1f} | "
                      f"{cpu:6.1f} | {cpu_per_m:10.1f} | {fio_cpu:9.1f} | {ratio}")
        # qcow2 over allocated data against spindle-nbd's own raw rows of the same run.
        spindle_iops = {name: statistics.median(r[next(iter(rounds[0]))][0] for r in rounds)
                        for name, rounds in rows}
        for name, _ in JOBS:
            if name in spindle_iops and "qcow2 " + name in spindle_iops:
                print(f"spindle-nbd qcow2 / raw, {name}: "
                      f"{spindle_iops['qcow2 ' + name] / spindle_iops[name]:.2f}x")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
