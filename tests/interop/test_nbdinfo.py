#!/usr/bin/env python3
"""nbdinfo (libnbd 1.14) against spindle-nbd: --list with several exports, --json fields,
--map on a sparse image, --can/--is exit codes, --size; over a Unix socket and TCP."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spindle_interop as si  # noqa: E402
from spindle_interop import MiB, KiB, run  # noqa: E402


class NbdinfoTest(si.InteropTest):

    def three_exports(self):
        main_img = self.make_image("main.img", 64 * MiB, [(1 * MiB, b"x" * 4096)])
        second = self.make_image("second.img", 8 * MiB)
        ro = self.make_image("ro.img", 3 * MiB + 512)
        # "--export VALUE" (space form) before the trailing IMAGE, as in the usage line: each
        # --export takes exactly one value and IMAGE stays the positional argument.
        server = self.server(main_img, ["-D", "main disk",
                                        "--export", f"name=second,file={second},"
                                                    "description=Second disk",
                                        "--export", f"name=ro,file={ro},read-only=on"],
                             name="main")
        return server

    def test_list_text(self):
        server = self.three_exports()
        out = run(["nbdinfo", "--list", server.uri("")], timeout=30).stdout.decode()
        self.assertIn("newstyle-fixed", out)
        self.assertIn("structured", out)
        for name in ("main", "second", "ro"):
            self.assertIn(f'export="{name}":', out)
        self.assertIn("description: main disk", out)
        self.assertIn("description: Second disk", out)
        self.assertIn("export-size: 67108864", out)
        self.assertIn("export-size: 8388608", out)
        self.assertIn("export-size: 3146240", out)

    def test_list_json(self):
        server = self.three_exports()
        doc = si.nbdinfo_json(server.uri(""), "--list")
        self.assertEqual(doc["protocol"], "newstyle-fixed")
        self.assertIs(doc["TLS"], False)
        self.assertIs(doc["structured"], True)
        exports = {e["export-name"]: e for e in doc["exports"]}
        self.assertEqual(list(exports), ["main", "second", "ro"], "LIST order or names differ")
        self.assertEqual(exports["main"].get("description"), "main disk")
        self.assertEqual(exports["second"].get("description"), "Second disk")
        self.assertNotIn("description", exports["ro"], "an empty description must not be sent")
        self.assertEqual(exports["main"]["export-size"], 64 * MiB)
        self.assertEqual(exports["second"]["export-size"], 8 * MiB)
        self.assertEqual(exports["ro"]["export-size"], 3 * MiB + 512)
        self.assertIs(exports["ro"]["is_read_only"], True)
        self.assertIs(exports["second"]["is_read_only"], False)
        for e in exports.values():
            self.assertIn("base:allocation", e["contexts"])

    def check_rw_fields(self, e, size):
        self.assertEqual(e["export-size"], size)
        self.assertIs(e["is_read_only"], False)
        self.assertIs(e["is_rotational"], False)
        for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero",
                     "can_multi_conn", "can_cache", "can_df"):
            self.assertIs(e[flag], True, flag)
        self.assertEqual(e["block_size_minimum"], 1)
        self.assertEqual(e["block_size_preferred"], 4096)
        self.assertEqual(e["block_size_maximum"], 32 * MiB)
        self.assertEqual(e["contexts"], ["base:allocation"])

    def test_json_fields(self):
        server = self.three_exports()
        doc = si.nbdinfo_json(server.uri("main"))
        self.assertEqual(len(doc["exports"]), 1)
        e = doc["exports"][0]
        self.assertEqual(e["export-name"], "main")
        self.assertEqual(e["description"], "main disk")
        self.check_rw_fields(e, 64 * MiB)

        ro = si.nbdinfo_json(server.uri("ro"))["exports"][0]
        self.assertIs(ro["is_read_only"], True)
        for flag in ("can_trim", "can_zero", "can_fast_zero"):
            self.assertIs(ro[flag], False, f"read-only export advertises {flag}")
        for flag in ("can_flush", "can_multi_conn"):
            self.assertIs(ro[flag], True, flag)

    def test_default_export_and_unknown_export(self):
        server = self.three_exports()
        # The empty name selects the first export.
        e = si.nbdinfo_json(server.uri(""))["exports"][0]
        self.assertEqual(e["export-size"], 64 * MiB)
        proc = run(["nbdinfo", "--size", server.uri("nosuch")], timeout=30, check=False)
        self.assertNotEqual(proc.returncode, 0, "unknown export must be refused")
        self.assertIn(b"nosuch", proc.stderr + proc.stdout)
        self.assert_serving(server, "main")

    def test_map_sparse(self):
        image = self.make_image("sparse.img", 16 * MiB,
                                [(1 * MiB, os.urandom(64 * KiB)), (9 * MiB, os.urandom(4 * KiB)),
                                 (16 * MiB - 4096, b"\xff" * 4096)])
        server = self.server(image, ["-f", "raw"])
        doc = si.nbdinfo_json(server.uri(), "--map")
        extents = [(e["offset"], e["length"], e["type"], e["description"]) for e in doc]
        # Contiguous, covering the whole export.
        pos = 0
        for offset, length, _, _ in extents:
            self.assertEqual(offset, pos, f"map not contiguous: {extents}")
            pos += length
        self.assertEqual(pos, 16 * MiB, f"map does not cover the export: {extents}")

        def type_at(offset):
            for o, l, t, d in extents:
                if o <= offset < o + l:
                    return t, d
            raise AssertionError(f"no extent at {offset}")
        for data_offset in (1 * MiB, 1 * MiB + 60 * KiB, 9 * MiB, 16 * MiB - 1):
            self.assertEqual(type_at(data_offset), (0, "data"), f"offset {data_offset}: {extents}")
        for hole_offset in (0, 512 * KiB, 2 * MiB, 8 * MiB, 12 * MiB):
            self.assertEqual(type_at(hole_offset), (3, "hole,zero"),
                             f"offset {hole_offset}: {extents}")
        data_total = sum(l for _, l, t, _ in extents if t == 0)
        self.assertLessEqual(data_total, 1 * MiB, f"too much reported as data: {extents}")

        text = run(["nbdinfo", "--map", "--totals", server.uri()], timeout=30).stdout.decode()
        self.assertRegex(text, r"\d+\s+[\d.]+%\s+0 data")
        self.assertRegex(text, r"\d+\s+[\d.]+%\s+3 hole,zero")

    def test_map_fully_allocated(self):
        image = self.make_image("full.img", 2 * MiB, [(0, os.urandom(2 * MiB))])
        server = self.server(image)
        doc = si.nbdinfo_json(server.uri(), "--map")
        self.assertEqual([(e["offset"], e["length"], e["type"]) for e in doc],
                         [(0, 2 * MiB, 0)])

    def test_can_and_is_exit_codes(self):
        server = self.three_exports()
        rw_true = ["flush", "fua", "trim", "zero", "fast-zero", "multi-conn", "cache", "df",
                   "structured-reply"]
        for what in rw_true:
            rc = run(["nbdinfo", "--can", what, server.uri("second")], timeout=20,
                     check=False).returncode
            self.assertEqual(rc, 0, f"nbdinfo --can {what} on a writable export: exit {rc}")
        for what in ("trim", "zero", "fast-zero"):
            rc = run(["nbdinfo", "--can", what, server.uri("ro")], timeout=20,
                     check=False).returncode
            self.assertEqual(rc, 2, f"nbdinfo --can {what} on a read-only export: exit {rc}")
        for what in ("flush", "multi-conn"):
            rc = run(["nbdinfo", "--can", what, server.uri("ro")], timeout=20,
                     check=False).returncode
            self.assertEqual(rc, 0, f"nbdinfo --can {what} on a read-only export: exit {rc}")
        rc = run(["nbdinfo", "--is", "read-only", server.uri("ro")], timeout=20,
                 check=False).returncode
        self.assertEqual(rc, 0)
        rc = run(["nbdinfo", "--is", "read-only", server.uri("second")], timeout=20,
                 check=False).returncode
        self.assertEqual(rc, 2)
        rc = run(["nbdinfo", "--is", "rotational", server.uri("second")], timeout=20,
                 check=False).returncode
        self.assertEqual(rc, 2)
        rc = run(["nbdinfo", "--is", "tls", server.uri("second")], timeout=20,
                 check=False).returncode
        self.assertEqual(rc, 2)

    def test_global_read_only_flag(self):
        image = self.make_image("ro.img", 1 * MiB)
        server = self.server(image, ["-r"])
        e = si.nbdinfo_json(server.uri())["exports"][0]
        self.assertIs(e["is_read_only"], True)
        self.assertIs(e["can_trim"], False)
        self.assertIs(e["can_zero"], False)

    def test_unusual_export_names(self):
        image = self.make_image("a.img", 1 * MiB)
        other = self.make_image("b.img", 2 * MiB)
        long_name = "n" * 4096  # the protocol's maximum
        server = self.server(image, ["--export", f"name={long_name},file={other}"],
                             name="my disk/\u03b1")
        # Percent-encoded in the URI: space, '/', UTF-8.
        uri = f"nbd+unix:///my%20disk/%CE%B1?socket={server.socket_path}"
        self.assertEqual(run(["nbdinfo", "--size", uri], timeout=20).stdout.strip(), b"1048576")
        doc = si.nbdinfo_json(server.uri(""), "--list")
        names = [e["export-name"] for e in doc["exports"]]
        self.assertEqual(names, ["my disk/\u03b1", long_name])
        self.assertEqual(run(["nbdinfo", "--size", server.uri(long_name)],
                             timeout=20).stdout.strip(), b"2097152")

    def test_socket_activation(self):
        # nbdinfo/nbdcopy '-- [ server args ]' start the server with LISTEN_FDS (systemd socket
        # activation); without -t it exits when the tool disconnects.
        data = os.urandom(3 * MiB)
        image = self.make_image("sa.img", 4 * MiB, [(0, data)])
        size = run(["nbdinfo", "--size", "--", "[", si.SPINDLE_NBD, "-f", "raw", image, "]"],
                   timeout=30).stdout.strip()
        self.assertEqual(size, b"4194304")
        doc = json.loads(run(["nbdinfo", "--json", "--", "[", si.SPINDLE_NBD, "-r", image, "]"],
                             timeout=30).stdout)
        self.assertIs(doc["exports"][0]["is_read_only"], True)
        out = self.path("out.img")
        run(["nbdcopy", "--", "[", si.SPINDLE_NBD, "-r", image, "]", out], timeout=30)
        with open(out, "rb") as f:
            self.assertEqual(f.read(), data + bytes(1 * MiB))
        self.assertEqual(self.kill_strays(), {}, "socket-activated server did not exit")

    def test_tcp_size_and_json(self):
        image = self.make_image("tcp.img", 5 * MiB + 4096)
        server = self.server(image, tcp=True, name="tcpdisk")
        self.assertTrue(server.uri().startswith("nbd://127.0.0.1:"))
        size = run(["nbdinfo", "--size", server.uri()], timeout=20).stdout.decode().strip()
        self.assertEqual(int(size), 5 * MiB + 4096)
        e = si.nbdinfo_json(server.uri())["exports"][0]
        self.assertEqual(e["export-name"], "tcpdisk")
        self.check_rw_fields(e, 5 * MiB + 4096)


if __name__ == "__main__":
    si.main(required_binaries=["nbdinfo"], needs_nbd_module=False)
