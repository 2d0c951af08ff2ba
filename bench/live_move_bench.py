#!/usr/bin/env python3
"""What a live move costs: spindle-storaged exports a page-cached raw image from IoThread io1,
and fio (nbd engine, 4 KiB random reads or writes, QD32) drives it for --runtime seconds twice
per round: once undisturbed, once while a QMP client moves the node between io1 and io2 every
--interval seconds (x-blockdev-set-iothread with force: the connection drains and re-homes
between two requests). Prints, per phase, IOPS and completion latency percentiles from fio's
per-request latency log (the requests in flight across a move wait for it: the max is the
pause a move causes), and how long the move command took as the QMP client saw it (the time
from asking to every connection running on the new IoThread): median, 90th percentile and
the longest, over all rounds.

With --repeat N the phases alternate N times and the table shows medians over the rounds.

Usage: python3 bench/live_move_bench.py [--spindle-storaged build/tools/spindle-storaged]
                                        [--size-mb 1024] [--runtime 5] [--interval 0.1]
                                        [--repeat 3] [--rw randread|randwrite]
Everything runs on this machine (Unix sockets); the image lives under /tmp.
"""
import argparse, glob, json, os, socket, statistics, subprocess, sys, tempfile, threading, time


class Monitor:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.file = self.sock.makefile("rw")
        self.file.readline()  # greeting
        self.execute("qmp_capabilities")

    def execute(self, command, **arguments):
        self.file.write(json.dumps({"execute": command, "arguments": arguments}) + "\n")
        self.file.flush()
        while True:
            reply = json.loads(self.file.readline())
            if "event" not in reply:
                return reply


def percentile(values, fraction):
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def read_latencies_us(prefix):
    latencies = []
    for path in glob.glob(prefix + "_clat.*.log"):
        with open(path) as log:
            for line in log:
                fields = line.split(",")
                if len(fields) >= 2:
                    latencies.append(int(fields[1]) / 1000.0)  # ns -> us
        os.unlink(path)
    return latencies


def run_fio(args, folder, socket_path, tag):
    prefix = os.path.join(folder, tag)
    result = subprocess.run(
        ["fio", "--name=move", "--ioengine=nbd", f"--uri=nbd+unix:///d0?socket={socket_path}",
         f"--rw={args.rw}", "--bs=4k", "--iodepth=32", "--time_based",
         f"--runtime={args.runtime}", f"--size={args.size_mb}M", "--output-format=json",
         f"--write_lat_log={prefix}", "--log_avg_msec=0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, check=True)
    for path in glob.glob(prefix + "_lat.*.log") + glob.glob(prefix + "_slat.*.log"):
        os.unlink(path)
    # (the nbd engine prints "fio: connected to NBD server" before the JSON)
    job = json.loads(result.stdout[result.stdout.index("{"):])["jobs"][0]
    side = job["read"] if args.rw == "randread" else job["write"]
    return side["iops"], read_latencies_us(prefix)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spindle-storaged", default="build/tools/spindle-storaged")
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--runtime", type=float, default=5)
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rw", choices=["randread", "randwrite"], default="randread")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="spindle-move-bench-")
    image = os.path.join(folder, "disk.img")
    with open(image, "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(args.size_mb):
            f.write(chunk)
    nbd_socket = os.path.join(folder, "nbd.sock")
    qmp_socket = os.path.join(folder, "qmp.sock")
    pid_file = os.path.join(folder, "daemon.pid")
    daemon = subprocess.Popen(
        [os.path.abspath(args.spindle_storaged), "--pidfile", pid_file,
         "--object", "iothread,id=io1", "--object", "iothread,id=io2",
         "--blockdev", f"driver=file,node-name=f0,filename={image}",
         "--blockdev", "driver=raw,node-name=d0,file=f0",
         "--nbd-server", f"addr.type=unix,addr.path={nbd_socket}",
         "--export", "type=nbd,id=e0,node-name=d0,writable=on,iothread=io1",
         "--chardev", f"socket,path={qmp_socket},server=on,wait=off,id=m0",
         "--monitor", "chardev=m0"])
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(pid_file):
            if daemon.poll() is not None or time.monotonic() > deadline:
                sys.exit("spindle-storaged did not start")
            time.sleep(0.02)
        qmp = Monitor(qmp_socket)
        rounds = {"still": [], "moving": []}
        for round_number in range(args.repeat):
            iops, latencies = run_fio(args, folder, nbd_socket, "still")
            rounds["still"].append((iops, latencies, []))
            move_times = []
            stop = threading.Event()

            def mover():
                targets = ["io2", "io1"]
                i = 0
                while not stop.is_set():
                    started = time.monotonic()
                    reply = qmp.execute("x-blockdev-set-iothread", **{
                        "node-name": "d0", "iothread": targets[i % 2], "force": True})
                    if "return" not in reply:
                        sys.exit(f"move failed: {reply}")
                    move_times.append((time.monotonic() - started) * 1e3)
                    i += 1
                    stop.wait(args.interval)

            thread = threading.Thread(target=mover)
            thread.start()
            iops, latencies = run_fio(args, folder, nbd_socket, "moving")
            stop.set()
            thread.join()
            rounds["moving"].append((iops, latencies, move_times))
            print(f"round {round_number + 1}: {len(move_times)} moves", file=sys.stderr)
        print(f"4k {args.rw} QD32, {args.runtime:g} s per phase, a move every "
              f"{args.interval * 1e3:g} ms, {args.repeat} rounds (medians)")
        print(f"{'phase':8} {'IOPS':>9} {'p50 us':>8} {'p99 us':>8} {'p99.9 us':>9} "
              f"{'max us':>9} {'moves':>6} {'move ms p50':>12} {'p90':>6} {'max':>6}")
        for phase, results in rounds.items():
            median = lambda f: statistics.median(f(r) for r in results)
            moves = [m for r in results for m in r[2]]
            print(f"{phase:8} {median(lambda r: r[0]):9.0f} "
                  f"{median(lambda r: percentile(r[1], 0.5)):8.0f} "
                  f"{median(lambda r: percentile(r[1], 0.99)):8.0f} "
                  f"{median(lambda r: percentile(r[1], 0.999)):9.0f} "
                  f"{median(lambda r: max(r[1]) if r[1] else 0):9.0f} "
                  f"{median(lambda r: len(r[2])):6.0f} "
                  f"{percentile(moves, 0.5):12.2f} {percentile(moves, 0.9):6.2f} "
                  f"{max(moves) if moves else 0:6.1f}")
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)
        for path in glob.glob(os.path.join(folder, "*")):
            os.unlink(path)
        os.rmdir(folder)


if __name__ == "__main__":
    main()
