#!/usr/bin/env python3
"""spindle-storaged against qemu-storage-daemon 7.2 (the oracle), and its exports against real
NBD clients.

Conformance: both daemons start from the same command line in folders holding the same images
(relative names, so the replies name the same files); the same QMP requests, one after another
(bad envelopes, every command's bad arguments, block nodes added and deleted, the NBD server
started twice, exports added, refused and deleted), get replies that are equal as text once
timestamps and sizes that depend on the file system are masked. Command-line errors give
qemu-storage-daemon's messages (program name aside) and exit status.

TLS: tls-creds-x509 and tls-creds-psk objects make the NBD server require TLS (nbdinfo with the
credentials succeeds, a clear-text client is refused).

Exports: data written through an export by qemu-io is in the image after SIGTERM (with the
client still connected) and `qemu-img check` is clean; exports are added and removed 100 times
over QMP, some with a client reading them, while fio verifies another export; a safe
block-export-del is refused while a client is connected and a hard one disconnects it, with
BLOCK_EXPORT_DELETED; a hostile monitor client (garbage, nesting beyond the limit, an oversized
value, a client that never reads) does not stop another monitor or the exports; the exported
node moves live between IoThreads 100 times under fio verify (x-blockdev-set-iothread; over TLS
too, with qemu-io as the client), and a
throttle filter goes in under it and out again (blockdev-reopen, whose replies are compared
with qemu-storage-daemon's too); --daemonize
returns once the sockets and the pid file exist, and the pid file is locked.

The facts about qemu-storage-daemon that the expectations rest on are in qsd_facts.md here.

Usage: test_storaged.py --spindle-storaged PATH --spindle-nbd PATH [unittest options]
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spindle_interop as si  # noqa: E402

STORAGED = None  # set below from --spindle-storaged
QSD = "qemu-storage-daemon"
MiB = 1 << 20


class Monitor:
    """A QMP client: reply() returns the next reply line as text; events met on the way are
    kept in `events` (as text)."""

    def __init__(self, path, negotiate=True, timeout=30):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buffer = b""
        self.events = []
        self.greeting = json.loads(self.line())
        if negotiate:
            assert "return" in json.loads(self.command('{"execute": "qmp_capabilities"}'))

    def line(self):
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise EOFError("monitor closed")
            self.buffer += chunk
        text, self.buffer = self.buffer.split(b"\r\n", 1)
        return text.decode()

    def reply(self):
        while True:
            text = self.line()
            if '"event": ' in text and '"timestamp": ' in text and not text.startswith('{"return'):
                self.events.append(text)
                continue
            return text

    def send(self, text):
        self.sock.sendall(text.encode() + b"\n")

    def command(self, text):
        self.send(text)
        return self.reply()

    def execute(self, _command, **arguments):
        request = {"execute": _command}
        if arguments:
            request["arguments"] = arguments
        return json.loads(self.command(json.dumps(request)))

    def wait_event(self, name, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            for text in self.events:
                if json.loads(text)["event"] == name:
                    self.events.remove(text)
                    return json.loads(text)
            if time.monotonic() > deadline:
                raise AssertionError(f"no {name} event")
            self.events.append(self.line())

    def close(self):
        self.sock.close()


class Daemon:
    """A storage daemon (ours or qemu's) in `folder` with a QMP socket qmp.sock there."""

    def __init__(self, test, binary, folder, args=(), monitors=1):
        self.folder = folder
        # The pid file is written once every option has been applied: waiting for it (not
        # for a socket, which the first options create) means the daemon is fully set up.
        self.pid_path = os.path.join(folder, "daemon.pid")
        if os.path.exists(self.pid_path):
            os.unlink(self.pid_path)
        cmd = [binary, "--pidfile", self.pid_path]
        for i in range(monitors):
            cmd += ["--chardev", f"socket,path=qmp{i}.sock,server=on,wait=off,id=m{i}",
                    "--monitor", f"chardev=m{i}"]
        cmd += list(args)
        self.log_path = os.path.join(folder, "daemon.log")
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=folder, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=self.log)
        test.addCleanup(self.kill)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.pid_path):
            if self.proc.poll() is not None:
                raise AssertionError(f"{binary} exited with {self.proc.returncode}: {self.log_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{binary} did not write its pid file")
            time.sleep(0.02)

    def qmp_path(self, index=0):
        return os.path.join(self.folder, f"qmp{index}.sock")

    def monitor(self, index=0, negotiate=True):
        return Monitor(self.qmp_path(index), negotiate)

    def log_text(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def stop(self, sig=signal.SIGTERM, timeout=30):
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def mask(text):
    """A reply with what may differ between two runs masked: times, host allocation sizes."""
    text = re.sub(r'"seconds": \d+, "microseconds": \d+', '"seconds": S, "microseconds": U', text)
    text = re.sub(r'"actual-size": \d+', '"actual-size": A', text)
    return text


def qemu_img(*args):
    return si.run_text(["qemu-img", *args])


def start_verifying_fio(folder, export, uri=None):
    """fio writing 4 KiB blocks at random into two 16 MiB ranges of `export` (one job each),
    reading each block back soon after and checking it (verify_backlog), until stop_fio()."""
    uri = uri or f"nbd+unix:///{export}?socket={folder}/nbd.sock"
    return subprocess.Popen(
        ["fio", "--name=verify", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
         "--size=16M", "--offset_increment=16M", "--numjobs=2", "--iodepth=16",
         "--verify=crc32c", "--verify_backlog=64", "--verify_fatal=1",
         "--time_based", "--runtime=600"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def stop_fio(fio):
    if fio.poll() is None:
        fio.send_signal(signal.SIGINT)
    output, _ = fio.communicate(timeout=120)
    return output


class StoragedTest(si.InteropTest):
    def wait_for_writes(self, proc, has_written, what):
        """Waits until `has_written()` (the client's writes reach the image), while `proc` runs."""
        deadline = time.monotonic() + 60
        while not has_written():
            self.assertIsNone(proc.poll(), f"{what} ended before the moves")
            self.assertLess(time.monotonic(), deadline, f"{what} wrote nothing")
            time.sleep(0.01)

    def assert_fio_verified(self, output):
        # fio exits non-zero after SIGINT; its jobs' own status is what counts.
        self.assertEqual(len(re.findall(r"\berr= 0\b", output)), 2, output[-4000:])
        self.assertNotRegex(output, r"(?i)verify failed|bad magic|bad header|error", output[-4000:])
        # Every job read blocks back and checked them.
        self.assertEqual(len(re.findall(r"issued rwts: total=[1-9]\d*,[1-9]", output)), 2, output)

    def folder(self, name, images=True):
        path = self.path(name)
        os.makedirs(path)
        if images:
            qemu_img("create", "-q", "-f", "qcow2", os.path.join(path, "disk.qcow2"), "64M")
            qemu_img("create", "-q", "-f", "raw", os.path.join(path, "raw.img"), "1M")
        return path

    def twins(self, args):
        ours = Daemon(self, STORAGED, self.folder("ours"), args)
        theirs = Daemon(self, QSD, self.folder("theirs"), args)
        return ours, theirs

    # ---- conformance against qemu-storage-daemon ----------------------------------------------

    def test_replies_match_qemu_storage_daemon(self):
        args = ["--blockdev", "driver=file,node-name=f0,filename=disk.qcow2",
                "--blockdev", "driver=qcow2,node-name=disk0,file=f0",
                "--object", "iothread,id=io0"]
        ours, theirs = self.twins(args)
        a, b = ours.monitor(), theirs.monitor()
        blockdev = '{"execute": "blockdev-add", "arguments": %s}'
        requests = [
            '{"execute": "foo", "id": 1}', '[1, 2]', '{"id": 9}', '{"execute": 5, "id": "a"}',
            '{"execute": "query-block-exports", "arguments": [1], "id": [2]}',
            '{"execute": "query-block-exports", "bogus": 1}',
            '{"execute": "query-block-exports", "arguments": {"x": 1}}',
            "{'execute': 'query-block-exports', 'id': {'b': 1, 'a': 'it\\'s'}}",
            '{"execute": "qmp_capabilities"}',
            blockdev % '{}',
            blockdev % '{"driver": "nosuch", "node-name": "x"}',
            blockdev % '{"driver": "file", "node-name": "x"}',
            blockdev % '{"driver": "file", "node-name": "x", "filename": "missing.img"}',
            blockdev % '{"driver": "file", "filename": "raw.img"}',
            blockdev % '{"driver": "file", "node-name": "1abc", "filename": "raw.img"}',
            blockdev % '{"driver": "file", "node-name": "%s", "filename": "raw.img"}' % ("n" * 32),
            blockdev % '{"driver": "file", "node-name": "disk0", "filename": "raw.img"}',
            blockdev % '{"driver": "file", "node-name": "x", "filename": "raw.img", "read-only": "yes"}',
            blockdev % '{"driver": "file", "node-name": "x", "filename": "raw.img", "discard": "bogus"}',
            blockdev % '{"driver": "raw", "node-name": "x", "file": "nosuch"}',
            blockdev % '{"driver": "file", "node-name": "rawf", "filename": "raw.img"}',
            blockdev % '{"driver": "raw", "node-name": "raw0", "file": "rawf"}',
            blockdev % '{"driver": "null-co", "node-name": "null0"}',
            '{"execute": "query-named-block-nodes", "id": "q"}',
            '{"execute": "query-named-block-nodes", "arguments": {"flat": true}}',
            '{"execute": "blockdev-del", "arguments": {"node-name": "f0"}}',
            '{"execute": "blockdev-del", "arguments": {"node-name": "nosuch"}}',
            '{"execute": "blockdev-del", "arguments": {}}',
            '{"execute": "nbd-server-stop"}',
            '{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", "node-name": "disk0"}}',
            '{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "path": "nbd.sock"}}}',
            '{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "nbd.sock"}}}}',
            '{"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "nbd.sock"}}}}',
            '{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", "node-name": "disk0", "writable": true}}',
            '{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", "node-name": "raw0"}}',
            '{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e1", "node-name": "nosuch"}}',
            '{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e2", "node-name": "raw0", "name": "disk0"}}',
            '{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e3", "node-name": "raw0", "iothread": "nosuch"}}',
            '{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e4", "node-name": "raw0", "name": "%s"}}' % ("x" * 4097),
            '{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e5", "node-name": "null0"}}',
            '{"execute": "query-block-exports"}',
            '{"execute": "x-blockdev-set-iothread", "arguments": {}}',
            '{"execute": "x-blockdev-set-iothread", "arguments": {"node-name": "disk0"}}',
            '{"execute": "x-blockdev-set-iothread", "arguments": {"node-name": "disk0", "iothread": 5}}',
            '{"execute": "x-blockdev-set-iothread", "arguments": {"node-name": "nosuch", "iothread": "io0"}}',
            '{"execute": "x-blockdev-set-iothread", "arguments": {"node-name": "disk0", "iothread": "nosuch"}}',
            '{"execute": "x-blockdev-set-iothread", "arguments": {"node-name": "disk0", "iothread": "nosuch", "force": true}}',
            '{"execute": "x-blockdev-set-iothread", "arguments": {"node-name": "disk0", "iothread": "io0", "force": true}}',
            '{"execute": "x-blockdev-set-iothread", "arguments": {"node-name": "f0", "iothread": null}}',
            '{"execute": "x-blockdev-set-iothread", "arguments": {"node-name": "raw0", "iothread": "io0", "bogus": 1}}',
            '{"execute": "x-blockdev-set-iothread", "arguments": {"node-name": "raw0", "iothread": "io0"}}',
            '{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e6", "node-name": "raw0", "name": "r6", "iothread": "io0", "fixed-iothread": true}}',
            '{"execute": "x-blockdev-set-iothread", "arguments": {"node-name": "rawf", "iothread": null}}',
            '{"execute": "x-blockdev-set-iothread", "arguments": {"node-name": "raw0", "iothread": "io0", "force": true}}',
            '{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e7", "node-name": "disk0", "name": "d7", "iothread": "io0", "fixed-iothread": true}}',
            '{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e8", "node-name": "rawf", "name": "r8", "iothread": "nosuch"}}',
            '{"execute": "block-export-del", "arguments": {"id": "e6"}}',
            '{"execute": "block-export-del", "arguments": {"id": "e7"}}',
            '{"execute": "x-blockdev-set-iothread", "arguments": {"node-name": "rawf", "iothread": null}}',
            '{"execute": "block-export-del", "arguments": {"id": "nosuch"}}',
            '{"execute": "block-export-del", "arguments": {"id": "e5", "mode": "bogus"}}',
            '{"execute": "block-export-del", "arguments": {"id": "e5"}}',
            '{"execute": "blockdev-del", "arguments": {"node-name": "disk0"}}',
            '{"execute": "blockdev-del", "arguments": {"node-name": "raw0"}}',
            '{"execute": "blockdev-del", "arguments": {"node-name": "rawf"}}',
            '{"execute": "object-add", "arguments": {"qom-type": "iothread", "id": "io0"}}',
            '{"execute": "object-add", "arguments": {"qom-type": "iothread", "id": "1x"}}',
            '{"execute": "object-add", "arguments": {"qom-type": "nosuch", "id": "x"}}',
            '{"execute": "object-add", "arguments": {"qom-type": "iothread"}}',
            '{"execute": "object-add", "arguments": {"qom-type": "iothread", "id": "io1"}}',
            '{"execute": "object-del", "arguments": {"id": "io1"}}',
            '{"execute": "object-del", "arguments": {"id": "io1"}}',
            '{"execute": "nbd-server-stop"}',
            '{"execute": "nbd-server-stop"}',
        ]
        for request in requests:
            with self.subTest(request=request[:120]):
                mine, reference = a.command(request), b.command(request)
                self.assertEqual(mask(mine), mask(reference))
                self.assertEqual([mask(e) for e in a.events], [mask(e) for e in b.events])
                a.events.clear()
                b.events.clear()

    def test_reopen_replies_match_qemu_storage_daemon(self):
        qemu_img("create", "-q", "-f", "qcow2", self.path("base.qcow2"), "64M")
        args = ["--blockdev", "driver=file,node-name=f0,filename=raw.img",
                "--blockdev", "driver=raw,node-name=disk0,file=f0",
                "--blockdev", "driver=file,node-name=qf,filename=disk.qcow2",
                "--blockdev", "driver=qcow2,node-name=q0,file=qf",
                "--blockdev", f"driver=file,node-name=bf,filename={self.path('base.qcow2')}",
                "--blockdev", "driver=qcow2,node-name=b0,file=bf",
                "--object", "throttle-group,id=tg,x-iops-total=1000",
                "--nbd-server", "addr.type=unix,addr.path=nbd.sock",
                "--export", "type=nbd,id=e0,node-name=disk0,writable=on"]
        ours, theirs = self.twins(args)
        a, b = ours.monitor(), theirs.monitor()
        reopen = '{"execute": "blockdev-reopen", "arguments": {"options": [%s]}}'
        requests = [
            '{"execute": "blockdev-add", "arguments": {"driver": "throttle", "node-name": "t0", "throttle-group": "tg", "file": "f0"}}',
            reopen % '{"driver": "raw", "node-name": "disk0", "file": "t0"}',
            '{"execute": "blockdev-del", "arguments": {"node-name": "t0"}}',
            reopen % '{"driver": "raw", "node-name": "disk0", "file": "f0"}',
            reopen % '{"driver": "raw", "node-name": "disk0"}',
            reopen % '{"driver": "qcow2", "node-name": "disk0", "file": "f0"}',
            reopen % '{"driver": "raw", "node-name": "nosuch", "file": "f0"}',
            reopen % '{"driver": "raw", "file": "f0"}',
            '{"execute": "blockdev-reopen"}',
            '{"execute": "blockdev-reopen", "arguments": {"options": 5}}',
            reopen % '{"driver": "raw", "node-name": "disk0", "file": "nosuch"}',
            reopen % '{"driver": "qcow2", "node-name": "q0", "file": "qf", "backing": "b0"}',
            reopen % '{"driver": "qcow2", "node-name": "q0", "file": "qf", "backing": null}',
            reopen % '{"driver": "qcow2", "node-name": "q0", "file": "qf"}',
            reopen % '{"driver": "raw", "node-name": "disk0", "file": {"driver": "file", "filename": "raw.img"}}',
            reopen % '{"driver": "raw", "node-name": "disk0", "file": "disk0"}',
            reopen % '{"driver": "raw", "node-name": "disk0", "file": "f0", "bogus": 1}',
            reopen % '{"driver": "file", "node-name": "f0", "filename": "raw.img"}',
            '{"execute": "blockdev-del", "arguments": {"node-name": "t0"}}',
        ]
        for request in requests:
            with self.subTest(request=request[:120]):
                self.assertEqual(mask(a.command(request)), mask(b.command(request)))

    def test_blkdebug_fails_the_requests_qemu_storage_daemon_fails(self):
        rules = [{"event": "read_aio", "sector": 8, "errno": 5},
                 {"event": "write_aio", "sector": 16, "errno": 28, "once": True},
                 {"event": "flush_to_disk", "errno": 5, "once": True}]
        debug = {"driver": "blkdebug", "node-name": "dbg", "image": "f0", "inject-error": rules}
        args = ["--blockdev", "driver=file,node-name=f0,filename=raw.img",
                "--blockdev", json.dumps(debug),
                "--blockdev", "driver=raw,node-name=disk0,file=dbg",
                "--nbd-server", "addr.type=unix,addr.path=nbd.sock",
                "--export", "type=nbd,id=e0,node-name=disk0,writable=on"]
        ours, theirs = self.twins(args)
        outputs = []
        for daemon in (ours, theirs):
            # Data everywhere: qemu-storage-daemon answers reads of holes without reading.
            with open(os.path.join(daemon.folder, "raw.img"), "r+b") as image:
                image.write(b"\x05" * MiB)
            uri = f"nbd+unix:///disk0?socket={daemon.folder}/nbd.sock"
            lines = []
            for command in ["read 0 4k", "read 4096 512", "read 3584 1k", "read 4608 512",
                            "write 8192 512", "write 8192 512", "write 8192 512", "flush",
                            "flush"]:
                result = subprocess.run(["qemu-io", "-f", "raw", "-c", command, uri],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, timeout=60)
                first = result.stdout.splitlines()[0] if result.stdout else ""
                lines.append((command, first if "fail" in first else "ok"))
            outputs.append(lines)
        self.assertEqual(outputs[0], outputs[1])
        self.assertIn(("read 4096 512", "read failed: Input/output error"), outputs[0])
        a, b = ours.monitor(), theirs.monitor()
        bad = '{"execute": "blockdev-add", "arguments": %s}'
        for request in [
                bad % '{"driver": "blkdebug", "node-name": "d2"}',
                bad % '{"driver": "blkdebug", "node-name": "d2", "image": "nosuch"}',
                bad % '{"driver": "blkdebug", "node-name": "d2", "image": "f0", "inject-error": [{"sector": 1}]}',
                bad % '{"driver": "blkdebug", "node-name": "d2", "image": "f0", "inject-error": [{"event": "read_aio", "iotype": "bogus"}]}',
                bad % '{"driver": "blkdebug", "node-name": "d2", "image": "f0", "inject-error": [{"event": "read_aio", "bogus": 1}]}']:
            with self.subTest(request=request[:120]):
                self.assertEqual(a.command(request), b.command(request))

    def test_detect_zeroes_unmap_frees_what_qemu_storage_daemon_frees(self):
        args = ["--blockdev", "driver=file,node-name=f0,filename=raw.img,discard=unmap",
                "--blockdev", "driver=raw,node-name=disk0,file=f0,discard=unmap,detect-zeroes=unmap",
                "--nbd-server", "addr.type=unix,addr.path=nbd.sock",
                "--export", "type=nbd,id=e0,node-name=disk0,writable=on"]
        ours, theirs = self.twins(args)
        maps = []
        for daemon in (ours, theirs):
            uri = f"nbd+unix:///disk0?socket={daemon.folder}/nbd.sock"
            # Data, then zeros written as data (not write -z) over part of it.
            out = si.run_text(["qemu-io", "-f", "raw", "-c", "write -P 0x7 0 1M",
                               "-c", "write -P 0 128k 512k", uri]).stdout
            self.assertNotIn("fail", out)
            image = os.path.join(daemon.folder, "raw.img")
            maps.append(json.loads(qemu_img("map", "--output=json", "-f", "raw", image).stdout))
        self.assertEqual(maps[0], maps[1])
        self.assertIn({"start": 131072, "length": 524288, "depth": 0, "present": True,
                       "zero": True, "data": False, "offset": 131072}, maps[0])
        a, b = ours.monitor(), theirs.monitor()
        for request in [
                '{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "r1", "file": "f0", "detect-zeroes": "unmap"}}',
                '{"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "r2", "file": "f0", "detect-zeroes": "on"}}',
                '{"execute": "query-named-block-nodes", "arguments": {"flat": true}}']:
            with self.subTest(request=request[:120]):
                self.assertEqual(mask(a.command(request)), mask(b.command(request)))

    def test_command_line_errors_match_qemu_storage_daemon(self):
        cases = [
            ["--blockdev", "driver=nosuch,node-name=x"],
            ["--blockdev", "driver=file,node-name=x"],
            ["--blockdev", "driver=file,node-name=x,filename=missing.img"],
            ["--blockdev", '{"driver": "file", "node-name": "f", "filename": "missing.img"}'],
            ["--object", "iothread"],
            ["--object", "iothread,id=1x"],
            ["--export", "type=nbd,id=e,node-name=missing"],
            ["--nbd-server", "addr.type=unix"],
            ["--blockdev", "driver=file,node-name=f,filename=raw.img,read-only=maybe"],
            ["positional"],
        ]
        folder = self.folder("cli")
        for args in cases:
            with self.subTest(args=args):
                q = si.run_text([QSD, *args], check=False, cwd=folder)
                s = si.run_text([STORAGED, *args], check=False, cwd=folder)
                self.assertEqual(s.returncode, q.returncode, s.stderr + q.stderr)
                self.assertEqual(s.stderr.replace("spindle-storaged", "X"),
                                 q.stderr.replace("qemu-storage-daemon", "X"))

    # ---- exports ------------------------------------------------------------------------------

    def test_export_writes_reach_the_image_and_sigterm_drains(self):
        folder = self.folder("data")
        daemon = Daemon(self, STORAGED, folder, [
            "--blockdev", "driver=file,node-name=f0,filename=disk.qcow2",
            "--blockdev", "driver=qcow2,node-name=disk0,file=f0",
            "--nbd-server", "addr.type=unix,addr.path=nbd.sock",
            "--export", "type=nbd,id=e0,node-name=disk0,writable=on"])
        uri = f"nbd+unix:///disk0?socket={folder}/nbd.sock"
        out = si.run_text(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 3M", uri]).stdout
        self.assertNotIn("failed", out)
        # A client still connected when SIGTERM comes: the daemon drains it and exits 0.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(os.path.join(folder, "nbd.sock"))
        si.raw_handshake(sock, "disk0")
        self.assertEqual(daemon.stop(), 0, daemon.log_text())
        sock.close()
        image = os.path.join(folder, "disk.qcow2")
        check = si.run_text(["qemu-img", "check", image], check=False)
        self.assertEqual(check.returncode, 0, check.stdout + check.stderr)
        out = si.run_text(["qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 1M 3M", image]).stdout
        self.assertNotIn("fail", out)
        self.assertFalse(os.path.exists(os.path.join(folder, "qmp0.sock")))

    def test_node_options_reach_the_export(self):
        # discard=unmap: a client's trim punches a hole in the file (ignored without it);
        # read-only=on: the export is read-only whatever block-export-add says.
        folder = self.folder("options")
        for name in ("trim.img", "keep.img"):
            with open(os.path.join(folder, name), "wb") as f:
                f.write(b"\x01" * (4 * MiB))
        daemon = Daemon(self, STORAGED, folder, [
            "--blockdev", "driver=file,node-name=t0,filename=trim.img,discard=unmap",
            "--blockdev", "driver=file,node-name=k0,filename=keep.img",
            "--blockdev", "driver=file,node-name=r0,filename=raw.img,read-only=on",
            "--nbd-server", "addr.type=unix,addr.path=nbd.sock",
            "--export", "type=nbd,id=t,node-name=t0,writable=on",
            "--export", "type=nbd,id=k,node-name=k0,writable=on"])
        for export in ("t0", "k0"):
            si.run_text(["qemu-io", "-f", "raw", "-c", "discard 1M 2M",
                         f"nbd+unix:///{export}?socket={folder}/nbd.sock"])
        trimmed, _ = si.file_extents(os.path.join(folder, "trim.img"))
        kept, _ = si.file_extents(os.path.join(folder, "keep.img"))
        self.assertEqual(trimmed, [(0, MiB), (3 * MiB, MiB)])
        self.assertEqual(kept, [(0, 4 * MiB)])
        qmp = daemon.monitor()
        reply = qmp.execute("block-export-add", type="nbd", id="r", writable=True,
                            **{"node-name": "r0"})
        self.assertEqual(reply["error"]["desc"], "Cannot export read-only node as writable")
        self.assertEqual(qmp.execute("block-export-add", type="nbd", id="r",
                                     **{"node-name": "r0"}), {"return": {}})
        info = si.run_text(["nbdinfo", "--json", f"nbd+unix:///r0?socket={folder}/nbd.sock"])
        self.assertTrue(json.loads(info.stdout)["exports"][0]["is_read_only"])
        self.assertEqual(daemon.stop(), 0)

    def test_throttle_group_limits_an_export(self):
        # A throttle node over a throttle-group object: four 1 MiB reads at 1 MiB/s (a burst
        # of 100 KiB) take at least 2.7 s, each one waiting for the debt of the one before (a
        # lower bound only: a slow machine makes it longer, never shorter),
        # and the data is the file's. The group cannot be deleted while the node uses it.
        folder = self.folder("throttle")
        with open(os.path.join(folder, "raw.img"), "wb") as f:
            f.write(b"\x07" * MiB)
        daemon = Daemon(self, STORAGED, folder, [
            "--object", "throttle-group,id=tg0,x-bps-total=1048576",
            "--blockdev", "driver=file,node-name=f0,filename=raw.img",
            "--blockdev", "driver=throttle,node-name=t0,throttle-group=tg0,file=f0",
            "--nbd-server", "addr.type=unix,addr.path=nbd.sock",
            "--export", "type=nbd,id=e0,node-name=t0"])
        started = time.monotonic()
        out = si.run_text(["qemu-io", "-r", "-f", "raw"] + ["-c", "read -P 7 0 1M"] * 4 +
                          [f"nbd+unix:///t0?socket={folder}/nbd.sock"], timeout=120).stdout
        self.assertNotIn("fail", out)
        self.assertGreaterEqual(time.monotonic() - started, 2.5)
        qmp = daemon.monitor()
        self.assertIn("in use", qmp.execute("object-del", id="tg0")["error"]["desc"])
        reply = qmp.execute("blockdev-add", driver="throttle", **{"node-name": "t1",
                            "throttle-group": "nosuch", "file": "f0"})
        self.assertEqual(reply["error"]["desc"], "Cannot find throttle group 'nosuch'")
        self.assertEqual(daemon.stop(), 0)

    def test_tls_credentials_objects(self):
        # tls-creds-x509 / tls-creds-psk objects and nbd-server-start's tls-creds: clients must
        # start TLS (nbdinfo with the CA or the key succeeds, a clear-text client is refused).
        from test_tls import make_psk, make_x509
        folder = self.folder("tls")
        pki = make_x509(os.path.join(folder, "pki"))
        make_psk(os.path.join(folder, "psk"))
        for creds, uri in (
                (f"tls-creds-x509,id=tls0,dir={pki},endpoint=server,verify-peer=off",
                 f"nbds+unix:///r0?socket={folder}/nbd.sock&tls-certificates={pki}"),
                (f"tls-creds-psk,id=tls0,dir={folder}/psk,endpoint=server",
                 f"nbds+unix://alice@/r0?socket={folder}/nbd.sock"
                 f"&tls-psk-file={folder}/psk/keys.psk")):
            with self.subTest(creds=creds.split(",")[0]):
                daemon = Daemon(self, STORAGED, folder, [
                    "--object", creds,
                    "--blockdev", "driver=file,node-name=r0,filename=raw.img",
                    "--nbd-server", "addr.type=unix,addr.path=nbd.sock,tls-creds=tls0",
                    "--export", "type=nbd,id=e0,node-name=r0"])
                size = si.run_text(["nbdinfo", "--size", uri]).stdout.strip()
                self.assertEqual(size, str(MiB))
                clear = si.run_text(["nbdinfo", "--size",
                                     f"nbd+unix:///r0?socket={folder}/nbd.sock"], check=False)
                self.assertNotEqual(clear.returncode, 0)
                qmp = daemon.monitor()
                self.assertIn("in use", qmp.execute("object-del", id="tls0")["error"]["desc"])
                self.assertEqual(daemon.stop(), 0)
        # Credentials for the wrong end, and a missing object.
        daemon = Daemon(self, STORAGED, folder, [
            "--object", f"tls-creds-x509,id=client0,dir={pki},endpoint=client"])
        qmp = daemon.monitor()
        for creds, desc in (("client0", "Expecting TLS credentials with a server endpoint"),
                            ("nosuch", "No TLS credentials with id 'nosuch'")):
            reply = qmp.execute("nbd-server-start", addr={"type": "unix", "data": {
                "path": os.path.join(folder, "nbd2.sock")}}, **{"tls-creds": creds})
            self.assertEqual(reply["error"]["desc"], desc)
        self.assertEqual(daemon.stop(), 0)

    def test_tls_authz_admits_only_the_named_client(self):
        # authz-simple and nbd-server-start's tls-authz: an X.509 client whose certificate's
        # DN is the object's identity is served, any other is cut off after the handshake,
        # as by qemu-storage-daemon (same log line). PSK usernames are checked too (stricter
        # than qemu-storage-daemon 7.2, which ignores tls-authz for PSK).
        from test_tls import make_psk, make_x509
        folder = self.folder("authz")
        pki = make_x509(os.path.join(folder, "pki"))
        make_psk(os.path.join(folder, "psk"))
        x509_uri = f"nbds+unix:///r0?socket={folder}/nbd.sock&tls-certificates={pki}"
        psk_uri = (f"nbds+unix://alice@/r0?socket={folder}/nbd.sock"
                   f"&tls-psk-file={folder}/psk/keys.psk")
        cases = [
            (f"tls-creds-x509,id=tls0,dir={pki},endpoint=server,verify-peer=on",
             "O=Spindle,,CN=client", x509_uri, True, (STORAGED, QSD)),
            (f"tls-creds-x509,id=tls0,dir={pki},endpoint=server,verify-peer=on",
             "CN=other", x509_uri, False, (STORAGED, QSD)),
            (f"tls-creds-psk,id=tls0,dir={folder}/psk,endpoint=server", "alice", psk_uri, True,
             (STORAGED,)),
            (f"tls-creds-psk,id=tls0,dir={folder}/psk,endpoint=server", "bob", psk_uri, False,
             (STORAGED,)),
        ]
        for creds, identity, uri, allowed, binaries in cases:
            for binary in binaries:
                with self.subTest(creds=creds.split(",")[0], identity=identity, binary=binary):
                    daemon = Daemon(self, binary, folder, [
                        "--object", creds, "--object", f"authz-simple,id=a0,identity={identity}",
                        "--blockdev", "driver=file,node-name=r0,filename=raw.img",
                        "--nbd-server", "addr.type=unix,addr.path=nbd.sock,tls-creds=tls0,tls-authz=a0",
                        "--export", "type=nbd,id=e0,node-name=r0"])
                    result = si.run_text(["nbdinfo", "--size", uri], check=False)
                    self.assertEqual(result.returncode == 0, allowed, result.stderr)
                    if allowed:
                        self.assertEqual(result.stdout.strip(), str(MiB))
                    daemon.stop()
                    if not allowed:
                        self.assertIn("authz check for", daemon.log_text())
                        self.assertIn("is denied", daemon.log_text())

    def test_exports_come_and_go_while_another_serves_fio(self):
        folder = self.folder("churn")
        qemu_img("create", "-q", "-f", "raw", os.path.join(folder, "fio.img"), "64M")
        daemon = Daemon(self, STORAGED, folder, [
            "--blockdev", "driver=file,node-name=fio0,filename=fio.img",
            "--blockdev", "driver=file,node-name=f0,filename=disk.qcow2",
            "--blockdev", "driver=qcow2,node-name=disk0,file=f0",
            "--nbd-server", "addr.type=unix,addr.path=nbd.sock",
            "--export", "type=nbd,id=fio,node-name=fio0,writable=on"])
        qmp = daemon.monitor()
        fio = subprocess.Popen(
            ["fio", "--name=verify", "--ioengine=nbd",
             f"--uri=nbd+unix:///fio0?socket={folder}/nbd.sock", "--rw=randrw", "--bs=4k",
             "--size=32M", "--iodepth=8", "--verify=crc32c", "--verify_fatal=1",
             "--do_verify=1", "--loops=4"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(100):
            reply = qmp.execute("block-export-add", type="nbd", id=f"e{i}", **{"node-name": "disk0"},
                                name=f"n{i}", writable=bool(i % 2))
            self.assertEqual(reply, {"return": {}}, reply)
            if i % 10 == 0:  # a client reads the new export before it goes
                out = si.run_text(["qemu-io", "-r", "-f", "raw", "-c", "read 0 64k",
                                   f"nbd+unix:///n{i}?socket={folder}/nbd.sock"]).stdout
                self.assertNotIn("fail", out)
            # The server sees a client's disconnect a moment after the client exits: until
            # then a safe deletion is refused, as QEMU's is.
            deadline = time.monotonic() + 60
            while True:
                reply = qmp.execute("block-export-del", id=f"e{i}")
                if "still in use" not in json.dumps(reply) or time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            self.assertEqual(reply, {"return": {}}, reply)
            self.assertEqual(qmp.wait_event("BLOCK_EXPORT_DELETED")["data"], {"id": f"e{i}"})
        output, _ = fio.communicate(timeout=300)
        self.assertEqual(fio.returncode, 0, output)
        self.assertEqual(qmp.execute("query-block-exports")["return"],
                         [{"type": "nbd", "id": "fio", "node-name": "fio0", "shutting-down": False}])
        self.assertEqual(daemon.stop(), 0, daemon.log_text())

    def test_live_move_between_iothreads_under_fio_verify(self):
        """The exported node moves 100 times between two IoThreads and the main loop (by
        itself with force, or through its child without) while fio verifies random writes
        through the export: no verify or I/O error, and a client connected before the first
        move, idle throughout, is still served after the last."""
        folder = self.folder("move")
        qemu_img("create", "-q", "-f", "qcow2", os.path.join(folder, "fio.qcow2"), "64M")
        daemon = Daemon(self, STORAGED, folder, [
            "--object", "iothread,id=io1", "--object", "iothread,id=io2",
            "--blockdev", "driver=file,node-name=file0,filename=fio.qcow2",
            "--blockdev", "driver=qcow2,node-name=fio0,file=file0",
            "--nbd-server", "addr.type=unix,addr.path=nbd.sock",
            "--export", "type=nbd,id=fio,node-name=fio0,writable=on,iothread=io1"])
        qmp = daemon.monitor()
        idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        idle.settimeout(60)
        idle.connect(os.path.join(folder, "nbd.sock"))
        si.raw_handshake(idle, "fio0")
        image = os.path.join(folder, "fio.qcow2")
        empty_size = os.path.getsize(image)
        # Random writes, each block read back and checked soon after (verify_backlog), until
        # SIGINT: the load lasts as long as the moves do, however long they take.
        fio = start_verifying_fio(folder, "fio0")
        try:
            # (clusters allocated: the qcow2 file grows)
            self.wait_for_writes(fio, lambda: os.path.getsize(image) != empty_size, "fio")
            targets = ["io2", None, "io1"]
            for i in range(100):
                target = targets[i % 3]
                if i % 2:  # through the child: the graph moves, and no force is needed
                    reply = qmp.execute("x-blockdev-set-iothread",
                                        **{"node-name": "file0", "iothread": target})
                else:
                    reply = qmp.execute("x-blockdev-set-iothread",
                                        **{"node-name": "fio0", "iothread": target, "force": True})
                self.assertEqual(reply, {"return": {}}, reply)
                time.sleep(0.005)  # some I/O between moves (not needed for correctness)
            self.assertIsNone(fio.poll(), "fio ended during the moves")
        finally:
            output = stop_fio(fio)
        self.assert_fio_verified(output)
        # The idle client, connected since before the first move.
        idle.sendall(si.request(si.CMD_WRITE, 1, 0, 4096, payload=b"\x5a" * 4096))
        self.assertEqual(si.read_simple_reply(idle)[0], 0)
        idle.sendall(si.request(si.CMD_READ, 2, 0, 4096))
        error, cookie, data = si.read_simple_reply(idle, 4096)
        self.assertEqual((error, cookie, data), (0, 2, b"\x5a" * 4096))
        idle.close()
        # An IoThread that the graph is on cannot be deleted; one it left can.
        self.assertIn("can't be deleted", json.dumps(qmp.execute("object-del", id="io2")))
        self.assertEqual(qmp.execute("object-del", id="io1"), {"return": {}})
        self.assertEqual(daemon.stop(), 0, daemon.log_text())
        check = subprocess.run(["qemu-img", "check", os.path.join(folder, "fio.qcow2")],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.assertEqual(check.returncode, 0, check.stdout)

    def test_live_move_over_tls(self):
        """TLS connections move too: qemu-io writes patterns over TLS (fio's libnbd refuses
        certificate paths in URIs), 256 requests in flight, while the node moves 30 times
        between two IoThreads and the main loop; every write succeeds and the image holds the
        last pattern."""
        from test_tls import make_x509
        folder = self.folder("move-tls")
        pki = make_x509(os.path.join(folder, "pki"))
        image = os.path.join(folder, "fio.img")
        qemu_img("create", "-q", "-f", "raw", image, "16M")
        daemon = Daemon(self, STORAGED, folder, [
            "--object", f"tls-creds-x509,id=tls0,dir={pki},endpoint=server",
            "--object", "iothread,id=io1", "--object", "iothread,id=io2",
            "--blockdev", "driver=file,node-name=fio0,filename=fio.img",
            "--nbd-server", "addr.type=unix,addr.path=nbd.sock,tls-creds=tls0",
            "--export", "type=nbd,id=fio,node-name=fio0,writable=on,iothread=io1"])
        qmp = daemon.monitor()
        target = (f"driver=raw,file.driver=nbd,file.server.type=unix,"
                  f"file.server.path={folder}/nbd.sock,file.export=fio0,file.tls-creds=tls0,"
                  f"file.tls-hostname=localhost")
        # 24 passes over the image, each 256 writes of 64 KiB in flight at once.
        passes = 24
        commands = "".join(
            "".join(f"aio_write -P {0xa0 + n} {offset} 64k\n" for offset in range(0, 16 * MiB, 64 * 1024))
            + "aio_flush\n" for n in range(passes))
        # Through files: qemu-io's output (a line per write) would fill a pipe nobody reads yet.
        with open(os.path.join(folder, "commands"), "w") as f:
            f.write(commands + "quit\n")
        commands_in = open(os.path.join(folder, "commands"))
        log_path = os.path.join(folder, "qemu-io.log")
        log = open(log_path, "w")
        self.addCleanup(commands_in.close)
        self.addCleanup(log.close)
        writer = subprocess.Popen(
            ["qemu-io", "--object", f"tls-creds-x509,id=tls0,dir={pki},endpoint=client",
             "--image-opts", target], stdin=commands_in, stdout=log, stderr=subprocess.STDOUT)
        try:
            self.wait_for_writes(writer, lambda: si.file_extents(image)[0], "qemu-io")
            for i in range(30):
                reply = qmp.execute("x-blockdev-set-iothread", **{
                    "node-name": "fio0", "iothread": ["io2", None, "io1"][i % 3], "force": True})
                self.assertEqual(reply, {"return": {}}, reply)
                time.sleep(0.005)
        finally:
            writer.wait(timeout=300)
        with open(log_path) as f:
            output = f.read()
        self.assertEqual(writer.returncode, 0, output[-3000:])
        self.assertNotIn("fail", output)
        self.assertEqual(output.count("wrote 65536/65536 bytes"), passes * 256, output[-3000:])
        self.assertEqual(daemon.stop(), 0, daemon.log_text())
        with open(image, "rb") as f:  # the last pass's pattern everywhere
            self.assertEqual(f.read(), bytes([0xa0 + passes - 1]) * (16 * MiB))

    def test_throttle_filter_inserted_and_removed_live_under_fio_verify(self):
        """blockdev-reopen puts a throttle filter under the exported raw node and takes it out
        again, 20 times, while fio verifies random writes through the export: no verify or I/O
        error, and the filter can be deleted once it is out."""
        folder = self.folder("reopen")
        qemu_img("create", "-q", "-f", "raw", os.path.join(folder, "fio.img"), "64M")
        daemon = Daemon(self, STORAGED, folder, [
            "--object", "iothread,id=io1",
            "--object", "throttle-group,id=tg,x-iops-total=100000",
            "--blockdev", "driver=file,node-name=file0,filename=fio.img",
            "--blockdev", "driver=raw,node-name=fio0,file=file0",
            "--blockdev", "driver=throttle,node-name=t0,throttle-group=tg,file=file0",
            "--nbd-server", "addr.type=unix,addr.path=nbd.sock",
            "--export", "type=nbd,id=fio,node-name=fio0,writable=on,iothread=io1"])
        qmp = daemon.monitor()
        fio = start_verifying_fio(folder, "fio0")
        try:
            image = os.path.join(folder, "fio.img")
            self.wait_for_writes(fio, lambda: si.file_extents(image)[0], "fio")
            for i in range(20):
                for child in ("t0", "file0"):
                    reply = qmp.execute("blockdev-reopen", options=[
                        {"driver": "raw", "node-name": "fio0", "file": child}])
                    self.assertEqual(reply, {"return": {}}, reply)
                    time.sleep(0.01)
            self.assertIsNone(fio.poll(), "fio ended during the changes")
        finally:
            output = stop_fio(fio)
        self.assert_fio_verified(output)
        self.assertEqual(qmp.execute("blockdev-del", **{"node-name": "t0"}), {"return": {}})
        self.assertEqual(daemon.stop(), 0, daemon.log_text())

    def test_safe_delete_is_refused_with_a_client_and_hard_disconnects_it(self):
        folder = self.folder("del")
        daemon = Daemon(self, STORAGED, folder, [
            "--blockdev", "driver=file,node-name=r0,filename=raw.img",
            "--nbd-server", "addr.type=unix,addr.path=nbd.sock",
            "--export", "type=nbd,id=e0,node-name=r0"])
        qmp = daemon.monitor()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(os.path.join(folder, "nbd.sock"))
        size, _ = si.raw_handshake(sock, "r0")
        self.assertEqual(size, MiB)
        refused = qmp.execute("block-export-del", id="e0")
        self.assertEqual(refused["error"]["desc"], "export 'e0' still in use")
        self.assertEqual(qmp.execute("block-export-del", id="e0", mode="hard"), {"return": {}})
        self.assertEqual(qmp.wait_event("BLOCK_EXPORT_DELETED")["data"], {"id": "e0"})
        self.assertEqual(sock.recv(16), b"")  # the server closed the client's connection
        self.assertEqual(qmp.execute("query-block-exports"), {"return": []})
        self.assertEqual(qmp.execute("blockdev-del", **{"node-name": "r0"}), {"return": {}})
        self.assertEqual(daemon.stop(), 0)

    def test_hostile_monitor_client_stops_nothing_else(self):
        folder = self.folder("hostile")
        daemon = Daemon(self, STORAGED, folder, [
            "--blockdev", "driver=file,node-name=r0,filename=raw.img",
            "--nbd-server", "addr.type=unix,addr.path=nbd.sock",
            "--export", "type=nbd,id=e0,node-name=r0,writable=on"], monitors=2)
        good = daemon.monitor(1)
        bad = daemon.monitor(0)
        bad.send("garbage } ]")
        bad.send("[" * 5000 + "]" * 5000)
        replies = [bad.reply() for _ in range(4)]
        self.assertTrue(all('"GenericError"' in r for r in replies), replies)
        self.assertIn("nesting depth limit exceeded", replies[-1])
        # An oversized value: one error, and the session goes on.
        huge = b'{"execute": "x", "arguments": {"s": "' + b"a" * (65 << 20) + b'"}}\n'
        sender = threading.Thread(target=bad.sock.sendall, args=(huge,))
        sender.start()
        self.assertEqual(good.execute("query-block-exports")["return"][0]["id"], "e0")
        sender.join()
        replies = []
        while True:
            replies.append(bad.reply())
            if "size limit" in replies[-1]:
                break
        self.assertIn("token size limit exceeded", replies[-1])
        self.assertIn("return", bad.command('{"execute": "query-block-exports"}'))
        # A client that sends requests and never reads the replies is cut off, alone.
        flood = daemon.monitor(0)
        request = b'{"execute": "query-named-block-nodes"}\n' * 2000
        try:
            for _ in range(100):
                flood.sock.sendall(request)
        except OSError:
            pass  # disconnected: what we wanted
        self.assertIn("return", good.command('{"execute": "query-block-exports"}'))
        out = si.run_text(["qemu-io", "-f", "raw", "-c", "write -P 1 0 64k", "-c", "read -P 1 0 64k",
                           f"nbd+unix:///r0?socket={folder}/nbd.sock"]).stdout
        self.assertNotIn("fail", out)
        self.assertEqual(daemon.stop(), 0)

    def test_daemonize_waits_for_startup_and_the_pid_file_is_locked(self):
        folder = self.folder("daemon")
        args = [STORAGED, "--daemonize", "--pidfile", os.path.join(folder, "pid"),
                "--chardev", f"socket,path={folder}/qmp.sock,server=on,wait=off,id=m0",
                "--monitor", "chardev=m0",
                "--blockdev", f"driver=file,node-name=r0,filename={folder}/raw.img",
                "--nbd-server", f"addr.type=unix,addr.path={folder}/nbd.sock",
                "--export", "type=nbd,id=e0,node-name=r0"]
        self.assertEqual(subprocess.run(args, timeout=60).returncode, 0)
        for name in ("qmp.sock", "nbd.sock", "pid"):
            self.assertTrue(os.path.exists(os.path.join(folder, name)), name)
        with open(os.path.join(folder, "pid")) as f:
            pid = int(f.read())
        self.addCleanup(lambda: os.kill(pid, signal.SIGKILL) if os.path.exists(f"/proc/{pid}") else None)
        second = si.run_text([STORAGED, "--pidfile", os.path.join(folder, "pid")], check=False)
        self.assertEqual(second.returncode, 1)
        self.assertIn("cannot create PID file: Cannot lock pid file", second.stderr)
        self.assertEqual(si.run_text(["nbdinfo", "--size",
                                      f"nbd+unix:///r0?socket={folder}/nbd.sock"]).stdout.strip(),
                         str(MiB))
        qmp = Monitor(os.path.join(folder, "qmp.sock"))
        self.assertEqual(qmp.execute("quit"), {"return": {}})
        deadline = time.monotonic() + 30
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertFalse(os.path.exists(os.path.join(folder, "pid")))


if __name__ == "__main__":
    STORAGED = si.binary_argument("--spindle-storaged", "SPINDLE_STORAGED")
    si.spindle_img_argument()  # given to every tools test; not used here
    si.main(required_binaries=(QSD, "qemu-img", "qemu-io", "nbdinfo", "fio"))
