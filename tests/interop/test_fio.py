#!/usr/bin/env python3
"""fio 3.33 --ioengine=nbd (libnbd) against spindle-nbd: random 4k writes/reads at iodepth 32
with crc32c verification, several jobs (one connection each), a verify-only re-run on fresh
connections, and a negative control proving that verification really checks the data."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spindle_interop as si  # noqa: E402
from spindle_interop import MiB, run  # noqa: E402


class FioTest(si.InteropTest):

    def fio(self, uri, *args, expect_ok=True):
        cmd = ["fio", "--ioengine=nbd", f"--uri={uri}", "--bs=4k", "--iodepth=32",
               "--verify=crc32c", "--verify_fatal=1", "--runtime=60", "--output-format=json",
               "--randseed=1234", *args]
        proc = run(cmd, timeout=90, check=False)
        text = proc.stdout.decode("utf-8", "replace")
        # fio's nbd engine prints "fio: connected to NBD server" before the JSON.
        start = text.find("{")
        try:
            doc = json.loads(text[start:]) if start >= 0 else None
        except json.JSONDecodeError:
            doc = None
        if expect_ok:
            self.assertEqual(proc.returncode, 0,
                             f"fio failed ({proc.returncode}): {' '.join(cmd)}\n{text[-3000:]}\n"
                             f"{proc.stderr.decode('utf-8', 'replace')[-3000:]}")
            self.assertIsNotNone(doc, f"fio printed no JSON:\n{text[-3000:]}")
            for job in doc["jobs"]:
                self.assertEqual(job["error"], 0, f"fio job {job['jobname']} error {job['error']}")
        return proc.returncode, doc, proc.stderr.decode("utf-8", "replace")

    def test_randwrite_verify_then_verify_only(self):
        image = self.make_image("disk.img", 64 * MiB)
        server = self.server(image)
        uri = server.uri()
        size = 32 * MiB
        _, doc, _ = self.fio(uri, "--name=randwrite", "--rw=randwrite", f"--size={size}")
        job = doc["jobs"][0]
        blocks = size // 4096
        self.assertEqual(job["write"]["io_bytes"], size)
        self.assertEqual(job["write"]["total_ios"], blocks)
        # A write-only job reads only to verify: every block written was read back and checked.
        self.assertEqual(job["read"]["io_bytes"], size, "fio did not run its verify phase")
        self.assertEqual(job["read"]["total_ios"], blocks)

        # Fresh connection, verify only: what the first run wrote is still there.
        _, doc, _ = self.fio(uri, "--name=randwrite", "--rw=randwrite", f"--size={size}",
                             "--verify_only")
        job = doc["jobs"][0]
        self.assertEqual(job["read"]["io_bytes"], size)

        # Negative control: corrupt one block behind fio's back; verification must catch it.
        h = self.connect(uri)
        h.pwrite(b"\x5a" * 4096, 100 * 4096, 0)
        h.flush()
        rc, doc, stderr = self.fio(uri, "--name=randwrite", "--rw=randwrite", f"--size={size}",
                                   "--verify_only", expect_ok=False)
        self.assertNotEqual(rc, 0, "fio verify_only did not notice a corrupted block")
        self.assertTrue(doc is None or any(j["error"] != 0 for j in doc["jobs"]))
        self.assert_serving(server)

    def test_randrw_multijob_verify(self):
        image = self.make_image("disk.img", 64 * MiB)
        server = self.server(image)
        # Two jobs, each with its own NBD connection, on disjoint halves; random mixed reads and
        # writes, every written block verified at the end.
        _, doc, _ = self.fio(server.uri(), "--name=randrw", "--rw=randrw", "--rwmixread=50",
                             "--size=24m", "--numjobs=2", "--offset_increment=32m")
        self.assertEqual(len(doc["jobs"]), 2)
        for job in doc["jobs"]:
            written = job["write"]["io_bytes"]
            read = job["read"]["io_bytes"]
            self.assertGreater(written, 0)
            # Regular reads + verify reads of every written block.
            self.assertGreaterEqual(read, written, f"verify phase missing: {job['jobname']}")
            self.assertEqual(job["read"]["short_ios"] if "short_ios" in job["read"] else 0, 0)
        self.assert_serving(server)

    def test_randread_tcp(self):
        image = self.make_image("disk.img", 32 * MiB, [(0, os.urandom(32 * MiB))])
        server = self.server(image, ["-r"], tcp=True)
        _, doc, _ = self.fio(server.uri(), "--name=randread", "--rw=randread", "--size=32m",
                             "--verify=0")
        job = doc["jobs"][0]
        self.assertEqual(job["read"]["io_bytes"], 32 * MiB)
        self.assertEqual(job["write"]["io_bytes"], 0)


if __name__ == "__main__":
    si.main(required_binaries=["fio", "nbdinfo"], needs_nbd_module=True)
