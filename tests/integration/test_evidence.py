"""Evidence kept: destroying a VM (crashed or not) releases its custody but
keeps its console log, VMM log and history under the log directory, where
`history` still finds them, until `purge` removes them."""

import json
import os
import signal
import stat
import tempfile
import unittest

from cprdtest import Daemon, RpcError, require_root, wait_until, wrapper

HERE = os.path.dirname(os.path.abspath(__file__))
STANDIN = os.path.join(HERE, "standin_vmm.py")
NOT_FOUND, BAD_STATE = -32000, -32004


class Evidence(unittest.TestCase):
    def setUp(self):
        require_root(self)
        self.kept = tempfile.mkdtemp(prefix="cprd-kept-")
        # Stand-in VMMs live in the source tree: unconfined (test_confine
        # covers confinement).
        self.d = Daemon(["--no-confine", "--log-dir", self.kept]).start()
        self.vmm = wrapper(self.d.dir, "standin", f'exec python3 {STANDIN} "$@"')

    def tearDown(self):
        self.d.destroy_all()
        self.d.stop()

    def create(self, name, vmm=None):
        return self.d.call("vm.create", {"name": name, "memory": str(32 << 20),
                                         "kernel": STANDIN, "vmm": vmm or self.vmm})

    def kept_file(self, name, f):
        with open(os.path.join(self.kept, name, f), errors="replace") as fh:
            return fh.read()

    def test_crash_destroy_then_history_and_logs_are_still_there(self):
        st = self.create("gone")
        wait_until(lambda: "STANDIN hb" in open(st["console_log"]).read(), 10,
                   "the stand-in's heartbeat on the console")
        rep = self.d.call("vm.update", {"name": "gone"})
        self.assertEqual(rep["result"], "ok")
        os.kill(self.d.call("vm.status", {"name": "gone"})["pid"], signal.SIGKILL)
        wait_until(lambda: self.d.call("vm.status", {"name": "gone"})["state"] == "crashed",
                   10, "the VM to be crashed")
        self.d.call("vm.destroy", {"name": "gone"})
        self.assertFalse(os.path.exists(os.path.dirname(st["console_log"])),
                         "the state directory keeps nothing of it")

        # What it wrote is kept, after a line that says when and why.
        con = self.kept_file("gone", "console.log")
        self.assertIn("==== cprd: VM gone destroyed at", con)
        self.assertIn("STANDIN hb", con)
        self.assertIn("destroyed at", self.kept_file("gone", "vmm.log"))
        d = os.stat(os.path.join(self.kept, "gone"))
        self.assertFalse(d.st_mode & (stat.S_IWGRP | stat.S_IWOTH))

        h = self.d.call("vm.history", {"name": "gone"})
        self.assertTrue(h["destroyed"])
        self.assertEqual([u["result"] for u in h["updates"]], ["ok"])
        p = self.d.cprctl("history", "gone")
        self.assertIn("was destroyed", p.stdout)
        self.assertIn("handover", p.stdout)

        # --all: across VMs, live and destroyed, newest first.
        self.create("live")
        self.d.call("vm.update", {"name": "live"})
        every = self.d.call("vm.history", {"all": True})["updates"]
        self.assertEqual([u["vm"] for u in every], ["live", "gone"])
        p = self.d.cprctl("history", "--all", "--json")
        self.assertEqual(len(json.loads(p.stdout)["updates"]), 2)

    def test_a_name_used_again_appends_and_purge_removes(self):
        for _ in range(2):
            self.create("again")
            self.d.call("vm.destroy", {"name": "again"})
        self.assertEqual(self.kept_file("again", "console.log").count("==== cprd: VM again"), 2)

        self.create("again")
        with self.assertRaises(RpcError) as cm:
            self.d.call("vm.purge", {"name": "again"})
        self.assertEqual(cm.exception.code, BAD_STATE)
        self.assertIn("destroy it first", cm.exception.message)
        self.d.call("vm.destroy", {"name": "again"})

        p = self.d.cprctl("purge", "again")
        self.assertIn("is removed", p.stdout)
        self.assertFalse(os.path.exists(os.path.join(self.kept, "again")))
        with self.assertRaises(RpcError) as cm:
            self.d.call("vm.history", {"name": "again"})
        self.assertEqual(cm.exception.code, NOT_FOUND)
        with self.assertRaises(RpcError) as cm:
            self.d.call("vm.purge", {"name": "again"})
        self.assertEqual(cm.exception.code, NOT_FOUND)

    def test_a_failed_start_leaves_its_last_words(self):
        bad = wrapper(self.d.dir, "broken", "echo 'this build cannot start' >&2; exit 3")
        with self.assertRaises(RpcError):
            self.create("broken", vmm=bad)
        log = self.kept_file("broken", "vmm.log")
        self.assertIn("failed to start", log)
        self.assertIn("this build cannot start", log)


class UnusableLogDir(unittest.TestCase):
    def test_a_log_dir_others_can_write_keeps_nothing_and_says_so(self):
        require_root(self)
        kept = tempfile.mkdtemp(prefix="cprd-kept-")
        os.chmod(kept, 0o777)
        d = Daemon(["--no-confine", "--log-dir", kept]).start()
        try:
            self.assertIn("refusing log directory", d.read_log())
            vmm = wrapper(d.dir, "standin", f'exec python3 {STANDIN} "$@"')
            d.call("vm.create", {"name": "x", "memory": str(32 << 20), "kernel": STANDIN,
                                 "vmm": vmm})
            d.call("vm.destroy", {"name": "x"})
            self.assertEqual(os.listdir(kept), [])
        finally:
            d.destroy_all()
            d.stop()
            os.rmdir(kept)


if __name__ == "__main__":
    unittest.main()
