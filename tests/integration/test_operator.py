"""What an operator needs around an update: a pre-flight that starts the new
binary beside the running guest and ends it (never pausing the guest, never
writing history), and which VMs still run a QEMU that was replaced on disk
(a package upgrade renames the new binary over the old one)."""

import os
import shutil
import tempfile
import time
import unittest

from cprdtest import (Console, Daemon, RpcError, children, require_guest, require_root,
                      wait_until, wrapper)

QEMU = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
HERE = os.path.dirname(os.path.abspath(__file__))
VMM_FAILED = -32005


class Operator(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        require_root(cls)
        require_guest()
        cls.tmp = tempfile.mkdtemp(prefix="cprd-op-")
        # The guest's VMM is a copy, so that the test can replace it on disk.
        cls.qemu = os.path.join(cls.tmp, "qemu-system-x86_64")
        shutil.copy2(QEMU, cls.qemu)
        cls.d = Daemon().start()
        cls.vm = cls.d.create_guest("op", memory="128M", vmm=cls.qemu)
        cls.con = Console(cls.vm["console_log"])
        cls.con.wait_beats(2)
        # A second guest on the distribution's QEMU, which nothing replaces.
        cls.side = Console(cls.d.create_guest("side", memory="128M", vmm=QEMU)["console_log"])
        cls.side.wait_beats(1)

    @classmethod
    def tearDownClass(cls):
        cls.d.destroy_all()
        cls.d.stop()
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def status(self, name="op"):
        return self.d.call("vm.status", {"name": name})

    def history(self):
        return self.d.call("vm.history", {"name": "op"})["updates"]

    def check(self, **params):
        return self.d.call("vm.update", dict({"name": "op", "check": True}, **params))

    def assert_untouched(self, pid, n_history, before_check):
        """The guest ran on in its VMM, nothing went into history, and the
        pre-flight's VMM is gone."""
        st = self.status()
        self.assertEqual((st["state"], st["pid"]), ("running", pid))
        self.assertEqual(len(self.history()), n_history, "a pre-flight is no update")
        self.assertFalse(st["updating"])
        wait_until(lambda: set(children(self.d.pid)) <= before_check, 10,
                   "the pre-flight's VMM to be gone")
        self.con.wait_beats(2)
        self.con.assert_healthy(self)

    # ---- pre-flight ----

    def test_1_good_binary_passes_both_strategies(self):
        pid, n, before = self.status()["pid"], len(self.history()), set(children(self.d.pid))
        for strategy in ("handover", "cpr-transfer"):
            res = self.check(vmm=QEMU, strategy=strategy)
            self.assertTrue(res["ok"], res)
            self.assertEqual(res["strategy"], strategy)
            self.assertRegex(res["vmm_version"], r"^\d+\.\d+\.\d+$")
            self.assertTrue(res["vmm_package"], "Debian's QEMU names its package")
            self.assertIn("x-ignore-shared", res["capabilities"])
            self.assert_untouched(pid, n, before)
        # The CLI says the same, and exits 0.
        p = self.d.cprctl("update", "op", "--check", "--vmm", QEMU)
        self.assertIn("pre-flight of", p.stdout)
        self.assertIn("passed", p.stdout)

    def test_2_missing_binary(self):
        pid, n, before = self.status()["pid"], len(self.history()), set(children(self.d.pid))
        with self.assertRaises(RpcError) as cm:
            self.check(vmm="/nonexistent/qemu")
        self.assertEqual(cm.exception.code, VMM_FAILED)
        self.assertIn("pre-flight of '/nonexistent/qemu'", cm.exception.message)
        self.assertIn("cannot start it", cm.exception.message)
        self.assertFalse(cm.exception.error["data"]["ok"])
        self.assert_untouched(pid, n, before)
        p = self.d.cprctl("update", "op", "--check", "--vmm", "/nonexistent/qemu",
                          check=False)
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)

    def test_3_binary_that_exits(self):
        pid, n, before = self.status()["pid"], len(self.history()), set(children(self.d.pid))
        bad = wrapper(self.tmp, "exits", "echo 'this build is broken' >&2; exit 3")
        with self.assertRaises(RpcError) as cm:
            self.check(vmm=bad)
        self.assertIn("exited with status 3", cm.exception.message)
        self.assertIn("this build is broken", cm.exception.message)
        self.assert_untouched(pid, n, before)

    def test_4_wrong_machine_type(self):
        """A QEMU without the VM's machine type (made here by a wrapper that
        asks the real one for a machine no QEMU has, in place of the VM's
        pinned pc-q35-X.Y)."""
        pid, n, before = self.status()["pid"], len(self.history()), set(children(self.d.pid))
        old = wrapper(self.tmp, "old-qemu",
                      'for a; do shift; case "$a" in pc-q35-*,*) a="pc-q35-0.1,${a#*,}";; esac; '
                      f'set -- "$@" "$a"; done; exec {QEMU} "$@"')
        with self.assertRaises(RpcError) as cm:
            self.check(vmm=old)
        self.assertIn("pc-q35-0.1", cm.exception.message)  # QEMU's own words, in the tail
        self.assert_untouched(pid, n, before)

    def test_5_fleet_checks_before_it_touches_any_vm(self):
        pid, n = self.status()["pid"], len(self.history())
        side = self.status("side")["pid"]
        p = self.d.cprctl("update", "--all", "--vmm", "/nonexistent/qemu", check=False)
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertIn("no VM was updated", p.stdout)
        self.assertEqual((self.status()["pid"], self.status("side")["pid"]), (pid, side))
        self.assertEqual(len(self.history()), n)
        # --check alone: one pre-flight per binary (the QEMU copy, the
        # distribution's QEMU), and nothing else.
        p = self.d.cprctl("update", "--all", "--check")
        self.assertEqual(p.stdout.count("passed"), 2, p.stdout)
        self.assertEqual((self.status()["pid"], self.status("side")["pid"]), (pid, side))
        self.assertEqual(len(self.history()), n)

    # ---- outdated ----

    def test_6_replaced_binary_makes_the_vm_outdated(self):
        st = self.status()
        self.assertIs(st["outdated"], False, st)
        self.assertIs(self.status("side")["outdated"], False)
        self.assertEqual(self.d.call("vm.list", {"outdated": True})["vms"], [])

        # What a package upgrade does: the new file renamed over the old.
        new = self.qemu + ".dpkg-new"
        shutil.copy2(QEMU, new)
        os.rename(new, self.qemu)
        st = self.status()
        self.assertIs(st["outdated"], True, st)
        self.assertIn("qemu-system-x86_64", st["outdated_files"])
        self.assertEqual([v["name"] for v in self.d.call("vm.list", {"outdated": True})["vms"]],
                         ["op"])
        p = self.d.cprctl("list", "--outdated")
        self.assertIn("op", p.stdout)
        self.assertNotIn("side", p.stdout)
        self.assertIn("\ncprd_vmms_outdated 1\n", self.d.call("daemon.metrics")["text"])

        # Updating the outdated ones runs the new binary: nothing is left.
        side = self.status("side")["pid"]
        p = self.d.cprctl("update", "--all", "--outdated")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        st = self.status()
        self.assertIs(st["outdated"], False, st)
        self.assertNotEqual(st["pid"], self.vm["pid"])
        self.assertEqual(self.status("side")["pid"], side, "only the outdated VM is updated")
        self.assertIn("\ncprd_vmms_outdated 0\n", self.d.call("daemon.metrics")["text"])
        self.con.wait_beats(2)
        self.con.assert_healthy(self)


if __name__ == "__main__":
    unittest.main()
