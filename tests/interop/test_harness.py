#!/usr/bin/env python3
"""The interop harness itself (spindle_interop.py): a server that exits non-zero during a test,
reports a sanitizer error (at any time, including at exit), or fails its SIGTERM shutdown at the
end of a test fails that test, even when every client call succeeded; an exit status the test
asked for (stop(), kill(), wait()) is the test's business. Uses fake servers (shell scripts that
print the start-up line), so it needs no peer tool."""

import os
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spindle_interop as si  # noqa: E402

READY = 'echo "spindle-nbd: listening on nbd+unix:///?socket=/dev/null (aio: threads)" >&2\n'
FAKES = {  # (set-up, then READY, then body): traps go in before the start-up line
    # A race reported while serving; TSan's halt_on_error then exits 66.
    "race": READY + 'sleep 0.1\necho "WARNING: ThreadSanitizer: data race (pid=$$)" >&2\n'
                    'exit 66\n',
    # A report at exit (after SIGTERM), with exitcode=0 so that only the log shows it.
    "race_at_exit": "trap 'echo \"WARNING: ThreadSanitizer: data race\" >&2; exit 0' TERM\n"
                    + READY + "while :; do sleep 0.05; done\n",
    "dies": READY + "sleep 0.1\nexit 3\n",
    "crashes": READY + "sleep 0.1\nkill -SEGV $$\n",
    "bad_shutdown": "trap 'exit 1' TERM\n" + READY + "while :; do sleep 0.05; done\n",
    "clean": "trap 'exit 0' TERM\n" + READY + "while :; do sleep 0.05; done\n",
    "exits_3": "trap 'exit 3' TERM\n" + READY + "while :; do sleep 0.05; done\n",
}


def inner_test(mode, name):
    """A test case run by HarnessTest with a fake server in place of spindle-nbd (made here, not
    at module level, so that unittest.main() does not run it on its own)."""

    class Inner(si.InteropTest):
        def _serve(self):
            path = self.path(f"fake-{mode}.sh")
            with open(path, "w") as f:
                f.write("#!/bin/sh\n" + FAKES[mode])
            os.chmod(path, 0o755)
            saved = si.SPINDLE_NBD
            si.SPINDLE_NBD = path
            try:
                return self.server()
            finally:
                si.SPINDLE_NBD = saved

        def test_passive(self):  # starts a server and lets the harness end it
            self._serve()
            time.sleep(0.5)

        def test_stops_itself(self):  # asks for the exit status and checks it
            server = self._serve()
            rc, _, killed = server.stop(timeout=5)
            self.assertFalse(killed)
            self.assertEqual(rc, 3)

    return Inner(name)


class HarnessTest(unittest.TestCase):

    def outcome(self, mode, test="test_passive"):
        result = unittest.TestResult()
        with open(os.devnull, "w") as devnull:
            saved, sys.stdout = sys.stdout, devnull  # the harness logs server output
            try:
                inner_test(mode, test).run(result)
            finally:
                sys.stdout = saved
        problems = [text for _, text in result.failures + result.errors]
        return result.wasSuccessful(), "\n".join(problems)

    def test_clean_server_passes(self):
        ok, problems = self.outcome("clean")
        self.assertTrue(ok, problems)

    def test_sanitizer_report_fails(self):
        ok, problems = self.outcome("race")
        self.assertFalse(ok, "a server that reported a data race (exit 66) passed")
        self.assertIn("sanitizer report", problems)

    def test_sanitizer_report_at_exit_fails(self):
        ok, problems = self.outcome("race_at_exit")
        self.assertFalse(ok, "a data race reported at SIGTERM shutdown passed")
        self.assertIn("sanitizer report", problems)

    def test_unexpected_exit_fails(self):
        ok, problems = self.outcome("dies")
        self.assertFalse(ok, "a server that exited 3 during the test passed")
        self.assertIn("exited with status 3 during the test", problems)

    def test_crash_fails(self):
        ok, problems = self.outcome("crashes")
        self.assertFalse(ok, "a server killed by SIGSEGV during the test passed")
        self.assertIn(f"exited with status -{int(si.signal.SIGSEGV)}", problems)

    def test_failed_shutdown_fails(self):
        ok, problems = self.outcome("bad_shutdown")
        self.assertFalse(ok, "a server that exited 1 after SIGTERM passed")
        self.assertIn("exit status 1 after SIGTERM", problems)

    def test_status_the_test_checked_is_its_own(self):
        ok, problems = self.outcome("exits_3", "test_stops_itself")
        self.assertTrue(ok, problems)


SKIPPING_SCRIPT = """
import sys, unittest
sys.path.insert(0, {here!r})
import spindle_interop as si
class T(unittest.TestCase):
    def test_a(self):
        if {case_skip}:
            self.skipTest("frobnicator not installed")
    def test_b(self):
        pass
si.main(required_binaries={binaries!r})
"""


class SkipTest(unittest.TestCase):
    """A missing peer is reported to CTest as a skip (exit 77, SKIP_RETURN_CODE), and as a
    failure when SPINDLE_REQUIRE_PEERS=1 (CI, after scripts/install-deps.sh)."""

    def script(self, binaries=(), case_skip=False, require=False):
        text = SKIPPING_SCRIPT.format(here=os.path.dirname(os.path.abspath(__file__)),
                                      binaries=list(binaries), case_skip=case_skip)
        env = dict(os.environ)
        env.pop("SPINDLE_REQUIRE_PEERS", None)
        if require:
            env["SPINDLE_REQUIRE_PEERS"] = "1"
        proc = si.run([sys.executable, "-c", text, "--spindle-nbd", si.SPINDLE_NBD], timeout=60,
                      check=False, env=env)
        return proc.returncode, (proc.stdout + proc.stderr).decode("utf-8", "replace")

    def test_missing_peer_is_a_skip(self):
        rc, out = self.script(binaries=["spindle-no-such-peer"])
        self.assertEqual(rc, si.SKIP_EXIT_CODE, out)
        self.assertIn("SKIPPED: peer binaries not installed: spindle-no-such-peer", out)

    def test_missing_peer_fails_when_required(self):
        rc, out = self.script(binaries=["spindle-no-such-peer"], require=True)
        self.assertEqual(rc, 1, out)
        self.assertIn("FAILED", out)

    def test_skipped_case_fails_when_required(self):
        rc, out = self.script(case_skip=True)
        self.assertEqual(rc, 0, out)
        self.assertIn("1 skipped", out)
        rc, out = self.script(case_skip=True, require=True)
        self.assertEqual(rc, 1, out)
        self.assertIn("frobnicator not installed", out)

    def test_all_present_passes(self):
        rc, out = self.script(binaries=["sh"], require=True)
        self.assertEqual(rc, 0, out)


if __name__ == "__main__":
    # No peers: the fake servers stand in for spindle-nbd (--spindle-nbd is still required).
    si.main()
