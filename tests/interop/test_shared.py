#!/usr/bin/env python3
"""-e/--shared: the limit on simultaneous clients. As in qemu-nbd, `-e 0` means no limit: three
libnbd clients at once read and write, and more raw connections than the default limit (100)
all get a greeting; a non-zero limit still drops the connection over it (when the clients in
the way are past their handshake)."""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spindle_interop as si  # noqa: E402
from spindle_interop import MiB, read_greeting, recv_exact  # noqa: E402

DEFAULT_LIMIT = 100


class SharedTest(si.InteropTest):

    def test_zero_means_unlimited(self):
        image = self.make_image("disk.img", 4 * MiB)
        server = self.server(image, ["-e", "0"])
        handles = [self.connect(server.uri()) for _ in range(3)]
        for i, h in enumerate(handles):  # all three connected at once
            h.pwrite(bytes([0x41 + i]) * 65536, i * MiB)
        for h in handles:
            h.flush()
        for h in handles:  # each sees every client's write
            for i in range(3):
                self.assertEqual(h.pread(65536, i * MiB), bytes([0x41 + i]) * 65536)
        # More than the default limit at once: every one is greeted.
        sockets = []
        try:
            for _ in range(DEFAULT_LIMIT + 10):
                sockets.append(server.connect_raw(timeout=20))
            for s in sockets:
                read_greeting(s)
        finally:
            for s in sockets:
                s.close()
        for h in handles:
            h.shutdown()
        self.handles.clear()
        si.run(["nbdinfo", "--size", server.uri()], timeout=20)

    def test_long_option_zero(self):
        image = self.make_image("disk.img", 1 * MiB)
        server = self.server(image, ["--shared=0"])
        handles = [self.connect(server.uri()) for _ in range(3)]
        for h in handles:
            self.assertEqual(h.get_size(), 1 * MiB)
            h.shutdown()
        self.handles.clear()

    def test_limit_still_applies(self):
        image = self.make_image("disk.img", 1 * MiB)
        server = self.server(image, ["-e", "1"])
        a = server.connect_raw()
        try:
            si.raw_handshake(a)  # in transmission: not a handshake the server may evict
            time.sleep(0.1)
            b = server.connect_raw()
            try:
                b.settimeout(5)
                self.assertEqual(recv_exact(b, 18), b"", "second connection served with -e 1")
            except ConnectionResetError:
                pass
            finally:
                b.close()
        finally:
            a.close()

    def test_negative_is_refused(self):
        image = self.make_image("disk.img", 1 * MiB)
        proc = si.run([si.SPINDLE_NBD, "-e", "-1", "-k", self.path("s"), image], timeout=30,
                      check=False)
        self.assertNotEqual(proc.returncode, 0)


if __name__ == "__main__":
    si.main(required_binaries=("nbdinfo",), needs_nbd_module=True)
