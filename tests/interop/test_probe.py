#!/usr/bin/env python3
"""Safe format probing in spindle-img and spindle-nbd (the format registry).

Images that qemu-img makes in formats Spindle only recognises (vmdk, sparse and descriptor;
vdi, vpc, vhdx, qcow v1, parallels, luks) are refused by spindle-img info/convert/map/check/
compare and by spindle-nbd with an error naming the format, and stay byte-identical. A raw file
whose format spindle-nbd probed refuses (NBD_EPERM) a client write that would put a qcow2 or QED
header into sector 0, as qemu does, and says so at start-up; with -f raw the same write lands.

Usage: test_probe.py --spindle-nbd PATH --spindle-img PATH [unittest options]
"""

import hashlib
import os
import struct
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spindle_interop as si  # noqa: E402
from spindle_interop import MiB, run  # noqa: E402

SPINDLE_IMG = None  # set below from --spindle-img
NBD_EPERM = 1
WARNING = "probing guessed raw"

# (format, qemu-img create arguments before the file name)
RECOGNISED = [
    ("vmdk", ["-f", "vmdk"]),
    ("vmdk", ["-f", "vmdk", "-o", "subformat=monolithicFlat"]),  # a text descriptor file
    ("vdi", ["-f", "vdi"]),
    ("vpc", ["-f", "vpc"]),
    ("vhdx", ["-f", "vhdx"]),
    ("qcow", ["-f", "qcow"]),
    ("parallels", ["-f", "parallels"]),
    ("luks", ["--object", "secret,id=sec0,data=123456", "-f", "luks", "-o", "key-secret=sec0,"
              "iter-time=10"]),
]


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def img(*args):
    return run([SPINDLE_IMG] + [str(a) for a in args], timeout=60, check=False)


def qcow2_header():
    """The first sector of a qcow2 v3 image (magic, version 3, 64 KiB clusters)."""
    header = struct.pack(">IIQIIQ", 0x514649FB, 3, 0, 0, 16, 1 * MiB)
    return header + bytes(512 - len(header))


def qed_header():
    header = struct.pack("<IIII", 0x00444551, 65536, 4, 1)
    return header + bytes(512 - len(header))


class ProbeTest(si.InteropTest):

    def make_recognised(self, index, fmt, args):
        path = self.path(f"image{index}.{fmt}")
        cmd = ["qemu-img", "create", "-q"] + args + [path, "1M"]
        for _ in range(10):
            proc = run(cmd, timeout=60, check=False)
            # LUKS: QEMU's PBKDF2 calibration gives up when its first round measures 0 ms of
            # thread CPU time (a coarse clock); it is a property of the peer, so try again.
            if proc.returncode == 0 or b"Unable to get accurate CPU usage" not in proc.stderr:
                break
        self.assertEqual(proc.returncode, 0, f"{' '.join(cmd)}: {proc.stderr.decode()}")
        return path

    def test_spindle_img_refuses_recognised_formats_by_name(self):
        for index, (fmt, args) in enumerate(RECOGNISED):
            with self.subTest(format=fmt, args=args):
                path = self.make_recognised(index, fmt, args)
                before = digest(path)
                target = self.path(f"out{index}.raw")
                for command in (["info", path], ["info", "--output=json", path],
                                ["map", "--output=json", path], ["check", path],
                                ["convert", "-O", "raw", path, target],
                                ["compare", path, path], ["resize", path, "2M"]):
                    proc = img(*command)
                    stderr = proc.stderr.decode()
                    self.assertNotEqual(proc.returncode, 0, f"{command}: {stderr}")
                    self.assertIn(f"image format '{fmt}' is not supported", stderr, command)
                    self.assertIn(f"Could not open '{path}'", stderr, command)
                self.assertFalse(os.path.exists(target), "convert created its target")
                # -f with a format we only recognise: refused before the file is touched.
                proc = img("info", "-f", fmt, path)
                self.assertNotEqual(proc.returncode, 0)
                self.assertIn(f"'{fmt}'", proc.stderr.decode())
                self.assertEqual(digest(path), before)

    def test_spindle_nbd_refuses_recognised_formats_by_name(self):
        for index, (fmt, args) in enumerate(RECOGNISED):
            with self.subTest(format=fmt, args=args):
                path = self.make_recognised(index, fmt, args)
                before = digest(path)
                for extra in ([], ["-r"]):
                    proc = run([si.SPINDLE_NBD, "-k", self.path("refused.sock")] + extra + [path],
                               timeout=30, check=False)
                    stderr = proc.stderr.decode()
                    self.assertEqual(proc.returncode, 1, stderr)
                    self.assertIn(f"image format '{fmt}' is not supported", stderr)
                self.assertEqual(digest(path), before)

    def test_unknown_format_names(self):
        path = self.make_image("disk.raw", 1 * MiB)
        proc = img("info", "-f", "nosuch", path)
        self.assertEqual(proc.returncode, 1)
        self.assertIn("Unknown file format 'nosuch'", proc.stderr.decode())
        proc = run([si.SPINDLE_NBD, "-k", self.path("x.sock"), "-f", "nosuch", path], timeout=30,
                   check=False)
        self.assertEqual(proc.returncode, 1)
        self.assertIn("Unknown file format 'nosuch'", proc.stderr.decode())

    def write_sector0(self, server, payload):
        """An NBD_CMD_WRITE of `payload` at offset 0; returns the reply's error code."""
        sock = server.connect_raw()
        try:
            si.raw_handshake(sock)
            sock.sendall(si.request(si.CMD_WRITE, 7, 0, len(payload), payload=payload))
            error, cookie, _ = si.read_simple_reply(sock)
            self.assertEqual(cookie, 7)
            sock.sendall(si.request(si.CMD_DISC, 8, 0, 0))
            return error
        finally:
            sock.close()

    def test_probed_raw_refuses_format_headers_in_sector0(self):
        path = self.make_image("disk.img", 4 * MiB)
        server = self.server(path)
        self.assertIn(WARNING, server.log_text())
        for header in (qcow2_header(), qed_header()):
            self.assertEqual(self.write_sector0(server, header), NBD_EPERM)
            with open(path, "rb") as f:
                self.assertEqual(f.read(512), bytes(512))
        # An ordinary first sector is fine, and so is a header anywhere else.
        self.assertEqual(self.write_sector0(server, b"\xeb\x3c\x90" + bytes(509)), 0)
        sock = server.connect_raw()
        si.raw_handshake(sock)
        sock.sendall(si.request(si.CMD_WRITE, 9, 4096, 512, payload=qcow2_header()))
        self.assertEqual(si.read_simple_reply(sock)[0], 0)
        sock.sendall(si.request(si.CMD_DISC, 10, 0, 0))
        sock.close()
        server.stop()
        info = run(["qemu-img", "info", path], timeout=30).stdout.decode()
        self.assertIn("file format: raw", info)

    def test_explicit_raw_allows_any_sector0(self):
        path = self.make_image("disk.img", 4 * MiB)
        server = self.server(path, ["-f", "raw"])
        self.assertNotIn(WARNING, server.log_text())
        self.assertEqual(self.write_sector0(server, qcow2_header()), 0)
        server.stop()
        with open(path, "rb") as f:
            self.assertEqual(f.read(512), qcow2_header())

    def test_read_only_probed_raw_has_no_warning(self):
        path = self.make_image("disk.img", 1 * MiB)
        server = self.server(path, ["-r"])
        self.assertNotIn(WARNING, server.log_text())
        server.stop()

    def test_spindle_img_warns_for_writable_probed_raw(self):
        path = self.make_image("disk.img", 1 * MiB)
        proc = img("resize", path, "2M")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn(f"Image format was not specified for '{path}' and probing guessed raw",
                      proc.stderr.decode())
        proc = img("resize", "-f", "raw", path, "3M")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertNotIn(WARNING, proc.stderr.decode())
        proc = img("info", path)  # read-only: nothing restricted, nothing said
        self.assertNotIn(WARNING, proc.stderr.decode())


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
    si.main(required_binaries=("qemu-img",))
