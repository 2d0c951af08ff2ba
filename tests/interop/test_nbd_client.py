#!/usr/bin/env python3
"""The NBD client driver (src/block/drivers/nbd) through spindle-img and spindle-nbd, against
nbdkit (memory plugin; --no-sr for simple replies; the error and delay filters), qemu-nbd
(structured replies; TLS-forced with PSK or X.509), nbd-server (simple replies only; skipped
when it cannot run here) and spindle-nbd itself (X.509): convert from an export to QED and back,
info and map over NBD (checked against qemu-img), a QED overlay whose backing file is an NBD
URI, spindle-nbd re-exporting a remote export, a wrong CA refused, and a map of five extents
costing one BLOCK_STATUS request without REQ_ONE (counted by nbdkit's log filter).

Usage: test_nbd_client.py --spindle-nbd PATH --spindle-img PATH
"""

import json
import os
import shutil
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spindle_interop as si  # noqa: E402
from spindle_interop import MiB, KiB, run  # noqa: E402
from test_tls import make_x509  # noqa: E402

SPINDLE_IMG = None  # set below from --spindle-img


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def img(*args, check=True, timeout=60):
    """Runs spindle-img; stdout and stderr come back as text."""
    proc = run([SPINDLE_IMG] + list(args), timeout=timeout, check=check)
    proc.stdout = proc.stdout.decode("utf-8", "replace")
    proc.stderr = proc.stderr.decode("utf-8", "replace")
    return proc


class NbdClientTest(si.InteropTest):

    # ---- peers ----
    def start_peer(self, cmd, socket_path, timeout=15):
        proc = subprocess.Popen([str(c) for c in cmd], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                preexec_fn=si._die_with_parent)

        def stop():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            proc.stdout.close()
        self.addCleanup(stop)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.path.exists(socket_path):
                return proc
            if proc.poll() is not None:
                raise AssertionError(f"{cmd[0]} exited: {proc.stdout.read().decode()}")
            time.sleep(0.02)
        raise AssertionError(f"{cmd[0]} did not create {socket_path}")

    def nbdkit(self, plugin_args, extra=(), params=(), name="kit"):
        """nbdkit [extra: options, --filter=...] PLUGIN ARGS [params: filter parameters]."""
        sock = self.path(f"{name}.sock")
        self.start_peer(["nbdkit", "-f", "-U", sock] + list(extra) + list(plugin_args) +
                        list(params), sock)
        return f"nbd+unix:///?socket={sock}"

    def qemu_nbd(self, image, fmt="raw", extra=(), name="qnbd"):
        sock = self.path(f"{name}.sock")
        self.start_peer(["qemu-nbd", "-t", "-k", sock, "-f", fmt, "-x", "disk"] + list(extra) +
                        [image], sock)
        return f"nbd+unix:///disk?socket={sock}"

    def data_image(self, name="src.raw", size=16 * MiB):
        """A sparse raw image (size >= 8 MiB) with data at the start, at 5 MiB and at the end."""
        chunks = [(0, si.pattern(1, 64 * KiB)), (5 * MiB, si.pattern(2, 1 * MiB)),
                  (size - 4 * KiB, si.pattern(3, 4 * KiB))]
        return self.make_image(name, size, chunks)

    def assert_tls_refused(self, uri):
        """spindle-img cannot open `uri` (wrong CA): exit 1 and a handshake error."""
        proc = img("info", uri, check=False)
        self.assertEqual(proc.returncode, 1, proc.stdout + proc.stderr)
        self.assertIn("TLS handshake failed", proc.stderr)

    def assert_same(self, a, fmt_a, b, fmt_b):
        proc = run(["qemu-img", "compare", "-f", fmt_a, "-F", fmt_b, a, b], timeout=60,
                   check=False)
        self.assertEqual(proc.returncode, 0, proc.stdout.decode() + proc.stderr.decode())

    def map_json(self, tool, target, fmt="raw"):
        if tool == "qemu-img":
            out = run(["qemu-img", "map", "--output=json", "-f", fmt, target]).stdout
        else:
            out = img("map", "--output", "json", "-f", fmt, target).stdout
        return [(e["start"], e["length"], e["data"], e["zero"]) for e in json.loads(out)]

    # ---- tests ----
    def test_convert_from_qemu_nbd_to_qed_and_back_to_nbdkit(self):
        src = self.data_image()
        uri = self.qemu_nbd(src, extra=["-r"])
        out = self.path("out.qed")
        img("convert", "-O", "qed", uri, out)
        run(["qemu-img", "check", "-f", "qed", out])
        self.assert_same(src, "raw", out, "qed")
        # Sparse: only the written clusters are allocated (map agrees with qemu-img).
        self.assertEqual(self.map_json("spindle-img", out, "qed"),
                         self.map_json("qemu-img", out, "qed"))

        # Back into an nbdkit memory export, then read it back with qemu-img.
        kit = self.nbdkit(["memory", "16M"])
        img("convert", "-O", "raw", out, kit)
        back = self.path("back.raw")
        run(["qemu-img", "convert", "-f", "raw", "-O", "raw", kit, back])
        self.assert_same(src, "raw", back, "raw")

    def test_info_and_map_over_nbd_match_qemu_img(self):
        src = self.data_image()
        uri = self.qemu_nbd(src, extra=["-r"])
        info = json.loads(img("info", "--output", "json", uri).stdout)
        self.assertEqual(info["virtual-size"], 16 * MiB)
        self.assertEqual(info["format"], "raw")
        ours = self.map_json("spindle-img", uri)
        theirs = self.map_json("qemu-img", uri)
        # Data/zero flags per byte must agree (run boundaries may merge differently).
        def expand(extents):
            spans = []
            for start, length, data, zero in extents:
                if spans and spans[-1][2:] == (data, zero) and spans[-1][0] + spans[-1][1] == start:
                    spans[-1] = (spans[-1][0], spans[-1][1] + length, data, zero)
                else:
                    spans.append((start, length, data, zero))
            return spans
        self.assertEqual(expand(ours), expand(theirs))
        self.assertTrue(any(not data for _, _, data, _ in ours), ours)  # holes seen as holes

    def test_map_asks_for_block_status_once_per_reply(self):
        # nbdkit's log filter records every BLOCK_STATUS ("Extents ... req_one=").
        log = self.path("kit.log")
        kit = self.nbdkit(["memory", "16M"], extra=["--filter=log"], params=[f"logfile={log}"])
        src = self.data_image()  # five extents: data, hole, data, hole, data
        img("convert", "-O", "raw", src, kit)
        with open(log) as f:
            before = f.read().count("req_one=")
        ours = self.map_json("spindle-img", kit)
        with open(log) as f:
            text = f.read()
        requests = text.count("req_one=") - before
        self.assertNotIn("req_one=1", text)
        self.assertEqual(requests, 1, text[-2000:])
        self.assertEqual(len(ours), 5, ours)
        self.assertEqual(ours, self.map_json("qemu-img", kit))

    def test_nbdkit_simple_replies_only(self):
        src = self.data_image(size=8 * MiB)
        kit = self.nbdkit(["memory", "8M"], extra=["--no-sr"])
        img("convert", "-O", "raw", src, kit)
        back = self.path("back.qed")
        img("convert", "-O", "qed", kit, back)
        self.assert_same(src, "raw", back, "qed")
        # Without structured replies there is no block status: everything maps as data.
        extents = self.map_json("spindle-img", kit)
        self.assertTrue(all(data for _, _, data, _ in extents), extents)

    def test_nbdkit_error_filter_fails_the_convert_cleanly(self):
        kit = self.nbdkit(["memory", "8M"],
                          extra=["--filter=error"], params=["error=EIO", "error-pread-rate=100%"])
        out = self.path("out.raw")
        proc = img("convert", "-O", "raw", kit, out, check=False, timeout=30)
        self.assertEqual(proc.returncode, 1, proc.stdout + proc.stderr)
        self.assertIn("Input/output error", proc.stderr)

    def test_nbdkit_delay_filter(self):
        src = self.data_image(size=8 * MiB)
        kit = self.nbdkit(["memory", "8M"],
                          extra=["--filter=delay"], params=["rdelay=20ms", "wdelay=20ms"])
        img("convert", "-O", "raw", src, kit, timeout=120)
        back = self.path("back.raw")
        img("convert", "-O", "raw", kit, back, timeout=120)
        self.assert_same(src, "raw", back, "raw")

    def test_qed_overlay_with_nbd_backing_file(self):
        base = self.data_image("base.raw", 8 * MiB)
        uri = self.qemu_nbd(base, extra=["-r"])
        overlay = self.path("overlay.qed")
        run(["qemu-img", "create", "-f", "qed", "-b", uri, "-F", "raw", overlay, str(8 * MiB)])
        run(["qemu-io", "-f", "qed", "-c", "write -P 0x5a 1M 64k", overlay])
        merged = self.path("merged.raw")
        img("convert", "-O", "raw", overlay, merged)
        expected = self.path("expected.raw")
        run(["qemu-img", "convert", "-f", "qed", "-O", "raw", overlay, expected])
        self.assert_same(expected, "raw", merged, "raw")
        info = json.loads(img("info", "--output", "json", overlay).stdout)
        self.assertEqual(info.get("backing-filename"), uri)

    def test_spindle_nbd_reexports_a_remote_export(self):
        src = self.data_image(size=8 * MiB)
        kit = self.nbdkit(["memory", "8M"])
        img("convert", "-O", "raw", src, kit)
        front = self.server(kit, name="front")
        back = self.path("back.raw")
        run(["qemu-img", "convert", "-f", "raw", "-O", "raw", front.uri(), back])
        self.assert_same(src, "raw", back, "raw")
        # Writes through the front land in nbdkit.
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x77 2M 64k", front.uri()])
        proc = run(["qemu-io", "-f", "raw", "-c", "read -P 0x77 2M 64k", kit])
        self.assertNotIn("Pattern verification failed", proc.stdout.decode())

    def test_spindle_nbd_to_spindle_img(self):
        src = self.data_image(size=8 * MiB)
        server = self.server(src, name="disk")
        out = self.path("out.qed")
        img("convert", "-O", "qed", server.uri() + "&connections=4", out)
        self.assert_same(src, "raw", out, "qed")

    def test_tls_psk_with_qemu_nbd(self):
        if shutil.which("psktool") is None:
            self.skipTest("psktool not installed")
        keydir = self.path("psk")
        os.mkdir(keydir)
        run(["psktool", "-u", "alice", "-p", os.path.join(keydir, "keys.psk")])
        src = self.data_image(size=8 * MiB)
        sock = self.path("tls.sock")
        self.start_peer(["qemu-nbd", "-t", "-k", sock, "-f", "raw", "-x", "disk", "-r",
                         "--object", f"tls-creds-psk,id=tls0,endpoint=server,dir={keydir}",
                         "--tls-creds", "tls0", src], sock)
        keys = os.path.join(keydir, "keys.psk")
        uri = f"nbds+unix://alice@/disk?socket={sock}&tls-psk-file={keys}"
        out = self.path("out.raw")
        img("convert", "-O", "raw", uri, out)
        self.assert_same(src, "raw", out, "raw")
        # The same server in clear text: refused with a message, never served.
        proc = img("info", f"nbd+unix:///disk?socket={sock}", check=False)
        self.assertEqual(proc.returncode, 1)
        self.assertIn("requires TLS", proc.stderr)

    def test_tls_x509_with_spindle_nbd_and_qemu_nbd(self):
        certs = make_x509(self.path("pki"))
        other = make_x509(self.path("other"), " (impostor)")
        src = self.data_image(size=8 * MiB)
        # spindle-nbd with forced X.509 TLS: convert out and map (the same as qemu-img's).
        server = self.server(src, ["--tls-creds", certs])
        uri = f"nbds+unix:///?socket={server.socket_path}&tls-certificates={certs}"
        out = self.path("out.qed")
        img("convert", "-O", "qed", uri, out)
        self.assert_same(src, "raw", out, "qed")
        self.assert_tls_refused(f"nbds+unix:///?socket={server.socket_path}"
                                f"&tls-certificates={other}")
        proc = img("info", server.uri(), check=False)
        self.assertEqual(proc.returncode, 1)
        self.assertIn("requires TLS", proc.stderr)

        # qemu-nbd with tls-creds-x509, writable: write through TLS and read back.
        image = self.make_image("q.raw", 8 * MiB)
        sock = self.path("qx509.sock")
        self.start_peer(["qemu-nbd", "-t", "-k", sock, "-f", "raw", "-x", "disk",
                         "--object", f"tls-creds-x509,id=tls0,endpoint=server,dir={certs}",
                         "--tls-creds", "tls0", image], sock)
        quri = f"nbds+unix:///disk?socket={sock}&tls-certificates={certs}"
        img("convert", "-O", "raw", src, quri)
        self.assert_same(src, "raw", image, "raw")
        back = self.path("back.raw")
        img("convert", "-O", "raw", quri, back)
        self.assert_same(src, "raw", back, "raw")
        self.assert_tls_refused(f"nbds+unix:///disk?socket={sock}&tls-certificates={other}")

    def test_nbd_server_simple_replies_only(self):
        if shutil.which("nbd-server") is None:
            self.skipTest("nbd-server not installed (Debian package nbd-server)")
        src = self.data_image(size=8 * MiB)
        image = self.path("nbdserver.raw")
        shutil.copyfile(src, image)
        port = _free_port()
        config = self.path("nbd-server.conf")
        with open(config, "w") as f:
            f.write(f"[generic]\nlistenaddr = 127.0.0.1\nport = {port}\n"
                    f"[disk]\nexportname = {image}\n")
        # nbd-server serves one client in the foreground (-d), so let it daemonize (it forks
        # per client) and stop it through its PID file.
        pidfile = self.path("nbd-server.pid")
        proc = run(["nbd-server", "-C", config, "-p", pidfile], timeout=30, check=False)
        if proc.returncode != 0:
            self.skipTest("nbd-server cannot run here: " +
                          (proc.stdout + proc.stderr).decode(errors="replace")[-300:])

        def stop():
            try:
                with open(pidfile) as f:
                    os.kill(int(f.read().strip()), 15)
            except (OSError, ValueError):
                pass
        self.addCleanup(stop)
        uri = f"nbd://127.0.0.1:{port}/disk"
        deadline = time.monotonic() + 10
        while True:
            probe = img("info", "--output", "json", uri, check=False)
            if probe.returncode == 0:
                break
            if time.monotonic() > deadline:
                self.skipTest("nbd-server cannot run here: " + probe.stderr[-300:])
            time.sleep(0.1)
        self.assertEqual(json.loads(probe.stdout)["virtual-size"], 8 * MiB)
        back = self.path("back.qed")
        img("convert", "-O", "qed", uri, back)
        self.assert_same(src, "raw", back, "qed")
        # Writes (and zeroes, which nbd-server may not offer) through simple replies.
        other = self.data_image("other.raw", size=8 * MiB)
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x33 1M 128k", other])
        img("convert", "-O", "raw", other, uri)
        self.assert_same(other, "raw", image, "raw")
        # No structured replies, no block status: everything maps as data.
        extents = self.map_json("spindle-img", uri)
        self.assertTrue(all(data for _, _, data, _ in extents), extents)

    def test_bad_uri_is_a_clear_error(self):
        proc = img("info", "nbd+unix:///disk", check=False)
        self.assertEqual(proc.returncode, 1)
        self.assertIn("missing ?socket=PATH", proc.stderr)
        proc = img("info", f"nbd+unix:///nope?socket={self.path('none.sock')}", check=False)
        self.assertEqual(proc.returncode, 1)
        self.assertIn("cannot connect", proc.stderr)


if __name__ == "__main__":
    # --spindle-img is ours; the harness parses --spindle-nbd and hands the rest to unittest.
    argv = sys.argv[1:]
    if "--spindle-img" in argv:
        at = argv.index("--spindle-img")
        SPINDLE_IMG = os.path.abspath(argv[at + 1])
        del sys.argv[at + 1:at + 3]
    if not SPINDLE_IMG or not os.access(SPINDLE_IMG, os.X_OK):
        print("FAILED: --spindle-img PATH is required", flush=True)
        sys.exit(1)
    si.main(required_binaries=("nbdkit", "qemu-nbd", "qemu-img", "qemu-io"))
