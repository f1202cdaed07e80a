"""Updates between two QEMU versions with the real guest: Debian's QEMU 10.0
(bookworm-backports) and a newer one built from Debian's source package
(`make qemu-next`). The machine type is pinned at birth, so the guest moves
to the newer QEMU and back; what cannot work is refused before the guest is
paused, and a failed update says what QEMU said."""

import json
import os
import tempfile
import unittest

from cprdtest import (Console, Daemon, GuestTest, QEMU, RpcError, SharedDaemonTest, qemu_next,
                      qemu_version, require_guest, require_root, wrapper)


def cmdline(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().split(b"\0")


def machine_arg(pid):
    args = cmdline(pid)
    return args[args.index(b"-machine") + 1].decode().split(",")[0]


def base_machine(version):
    """pc-q35-10.0 for QEMU 10.0.2."""
    return "pc-q35-" + ".".join(version.split(".")[:2])


class Pinned(SharedDaemonTest):
    """The alias is pinned to the first QEMU's versioned type (QEMU 10.0 only)."""

    def test_alias_pinned_and_kept(self):
        vm = self.d.create_guest("pin")
        want = base_machine(qemu_version(QEMU))
        st = self.d.call("vm.status", {"name": "pin"})
        self.assertEqual(st["machine"], want)
        self.assertEqual(st["machine_alias"], "q35")
        self.assertRegex(self.d.cprctl("status", "pin", check=True).stdout,
                         rf"(?m)^\s*machine:?\s+{want}\b")
        Console(vm["console_log"]).wait_beats(2)
        p = self.d.cprctl("update", "pin", "--json", check=True)
        rep = json.loads(p.stdout)
        self.assertEqual(rep["result"], "ok")
        self.assertEqual(machine_arg(rep["new_pid"]), want)
        self.d.call("vm.destroy", {"name": "pin"})


class OwnLog(GuestTest):
    """A failed update's error holds that VMM's own last words, never what an
    earlier VMM of the VM wrote to the shared vmm.log."""

    def setUp(self):
        require_root(self)
        require_guest()
        # Wrappers in a temporary directory: not visible to a confined VMM.
        self.d = Daemon(extra_args=["--no-confine"]).start()
        self.tmp = tempfile.mkdtemp()

    def test_error_from_that_vmms_run(self):
        vm = self.d.create_guest("own")
        Console(vm["console_log"]).wait_beats(2)
        loud = wrapper(self.tmp, "loud", "echo 'qemu-system-x86_64: EARLIER-VMM-FAILURE' >&2; exit 1")
        quiet = wrapper(self.tmp, "quiet", "echo 'qemu-system-x86_64: THIS-VMM-FAILURE' >&2; exit 1")
        rep = json.loads(self.d.cprctl("update", "own", "--json", "--vmm", loud).stdout)
        self.assertEqual(rep["result"], "rolled-back")
        self.assertIn("EARLIER-VMM-FAILURE", rep["error"])
        rep = json.loads(self.d.cprctl("update", "own", "--json", "--vmm", quiet).stdout)
        self.assertEqual(rep["result"], "rolled-back")
        self.assertIn("VMM log: qemu-system-x86_64: THIS-VMM-FAILURE", rep["error"])
        self.assertNotIn("EARLIER", rep["error"])


class CrossVersion(SharedDaemonTest):
    """10.0.2 -> newer -> 10.0.2, confined, with the real guest."""

    @classmethod
    def setUpClass(cls):
        cls.next = qemu_next()  # skips with the reason when there is none
        super().setUpClass()
        cls.old_version = qemu_version(QEMU)
        cls.new_version = qemu_version(cls.next)

    def update(self, name, *args):
        p = self.d.cprctl("update", name, "--json", *args)
        return p.returncode, json.loads(p.stdout) if p.stdout.strip() else None, p.stderr

    def guest(self, name, **extra):
        vm = self.d.create_guest(name, **extra)
        con = Console(vm["console_log"])
        con.wait_beats(3)
        return con

    def assert_runs_in(self, name, con, pid, version):
        st = self.d.call("vm.status", {"name": name})
        self.assertEqual(st["state"], "running")
        self.assertEqual(st["pid"], pid)
        self.assertEqual(st["vmm_version"], version)
        con.wait_beats(3)
        con.assert_healthy(self)

    def to_newer(self, name, forward):
        con = self.guest(name)
        pinned = base_machine(self.old_version)
        self.assertEqual(self.d.call("vm.status", {"name": name})["machine"], pinned)
        rc, rep, err = self.update(name, "--vmm", self.next, "--strategy", forward)
        self.assertEqual(rc, 0, (rep, err))
        self.assertEqual((rep["old_version"], rep["new_version"]),
                         (self.old_version, self.new_version))
        self.assertEqual(machine_arg(rep["new_pid"]), pinned)
        self.assert_runs_in(name, con, rep["new_pid"], self.new_version)
        return con

    def test_handover_there_and_back(self):
        con = self.to_newer("hv", "handover")
        rc, rep, err = self.update("hv", "--vmm", QEMU)
        self.assertEqual(rc, 0, (rep, err))
        self.assertEqual(rep["new_version"], self.old_version)
        self.assert_runs_in("hv", con, rep["new_pid"], self.old_version)
        self.d.call("vm.destroy", {"name": "hv"})

    def test_cpr_transfer_forward_refused_back(self):
        con = self.to_newer("cpr", "cpr-transfer")
        pid = self.d.call("vm.status", {"name": "cpr"})["pid"]
        beats = len(con.beats())
        with self.assertRaises(RpcError) as cm:
            self.d.call("vm.update", {"name": "cpr", "vmm": QEMU, "strategy": "cpr-transfer"})
        err = cm.exception.message
        self.assertIn("refused before the guest was paused", err)
        self.assertIn(f"cpr-transfer cannot go back from QEMU {self.new_version}", err)
        self.assertIn("use the handover strategy", err)
        # Nothing happened: same VMM, no update in the history.
        self.assertEqual(self.d.call("vm.status", {"name": "cpr"})["pid"], pid)
        hist = self.d.call("vm.history", {"name": "cpr"})["updates"]
        self.assertEqual(len(hist), 1)
        con.wait_beats(2)
        self.assertGreater(len(con.beats()), beats)
        # Handover takes it back.
        rc, rep, err = self.update("cpr", "--vmm", QEMU)
        self.assertEqual(rc, 0, (rep, err))
        self.assert_runs_in("cpr", con, rep["new_pid"], self.old_version)
        self.d.call("vm.destroy", {"name": "cpr"})

    def test_born_on_newer_refused_on_older(self):
        # Created on the newer QEMU: its type does not exist in 10.0.
        con = self.guest("new", vmm=self.next)
        st = self.d.call("vm.status", {"name": "new"})
        self.assertEqual(st["machine"], base_machine(self.new_version))
        for strategy in ("handover", "cpr-transfer"):
            with self.assertRaises(RpcError) as cm:
                self.d.call("vm.update", {"name": "new", "vmm": QEMU, "strategy": strategy})
            self.assertIn("refused before the guest was paused", cm.exception.message)
            self.assertIn(f"lacks the machine type '{st['machine']}'", cm.exception.message)
        self.assertEqual(self.d.call("vm.status", {"name": "new"})["pid"], st["pid"])
        self.assertEqual(self.d.call("vm.history", {"name": "new"})["updates"], [])
        con.wait_beats(2)
        con.assert_healthy(self)
        self.d.call("vm.destroy", {"name": "new"})

    def test_update_all_to_newer(self):
        cons = {n: self.guest(n) for n in ("all1", "all2", "all3")}
        p = self.d.cprctl("update", "--all", "--vmm", self.next, "--json", timeout=600)
        self.assertEqual(p.returncode, 0, p.stderr)
        for n, con in cons.items():
            st = self.d.call("vm.status", {"name": n})
            self.assertEqual(st["vmm_version"], self.new_version)
            self.assertEqual(machine_arg(st["pid"]), base_machine(self.old_version))
            con.wait_beats(2)
            con.assert_healthy(self)
        for n in cons:
            self.d.call("vm.destroy", {"name": n})


if __name__ == "__main__":
    unittest.main()
