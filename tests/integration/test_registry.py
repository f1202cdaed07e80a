"""The registry (STATE_DIR/registry.json) when it cannot be written: a state
directory on a small tmpfs of the test's own, filled to the last page."""

import os
import shutil
import signal
import subprocess
import tempfile
import unittest

from cprdtest import (Console, Daemon, RpcError, children, fill, mount_tmpfs, pid_alive,
                      require_guest, require_root, vm_file_holders, wait_until)


class FullStateDir(unittest.TestCase):
    def setUp(self):
        require_root(self)
        require_guest()
        self.d = Daemon()
        self.logdir = tempfile.mkdtemp(prefix="cprd-test-log-")
        self.d.log = os.path.join(self.logdir, "cprd.log")  # it needs no room on the tmpfs
        mount_tmpfs(self.d.dir, "8m")
        self.filler = os.path.join(self.d.dir, "filler")
        self.d.start()

    def tearDown(self):
        if os.path.exists(self.filler):
            os.unlink(self.filler)
        self.d.stop()
        subprocess.run(["umount", "-l", self.d.dir])
        shutil.rmtree(self.d.dir, ignore_errors=True)
        shutil.rmtree(self.logdir, ignore_errors=True)

    def registry(self):
        return self.d.call("daemon.status")["registry"]

    def qemu_children(self):
        return {p for p, (comm, _) in children(self.d.pid).items() if comm.startswith("qemu")}

    def test_create_fails_clearly_and_nothing_is_lost(self):
        keep = self.d.create_guest("keep")
        con = Console(keep["console_log"])
        con.wait_beats(2)
        gone = self.d.create_guest("gone")
        base_fds = self.d.settled_fds()

        fill(self.filler)
        # The new VM's VMM starts, but cannot be recorded: it is ended, its
        # custody released, and the caller told which file and why.
        with self.assertRaises(RpcError) as cm:
            self.d.create_guest("nope")
        err = cm.exception
        self.assertEqual(err.code, -32008)
        self.assertIn("cannot record VM 'nope' in the registry", err.message)
        self.assertIn(os.path.join(self.d.dir, "registry.json"), err.message)
        self.assertIn("No space left on device", err.message)
        # Its VMM was SIGKILLed before the answer; cprd reaps it from its
        # loop, never waiting for it there: give that a moment.
        wait_until(lambda: not vm_file_holders(self.d.dir, "nope", exclude={self.d.pid}), 10,
                   "the VMM of the VM that was not created to be gone")
        wait_until(lambda: self.qemu_children() == {keep["pid"], gone["pid"]}, 10,
                   "only the two VMs' VMMs to be cprd's children")
        wait_until(lambda: "Z" not in [st for _, st in children(self.d.pid).values()], 10,
                   "no zombie")
        self.assertFalse(os.path.exists(os.path.join(self.d.dir, "vms", "nope")))
        self.assertEqual(self.d.settled_fds(), base_fds, "the failed create leaked fds")

        # cprd serves on, says what is wrong, and the VMs it had keep running.
        reg = self.registry()
        self.assertFalse(reg["ok"])
        self.assertIn("No space left on device", reg["error"])
        self.assertIn("registry.json", reg["error"])
        self.assertGreater(reg["since_usec"], 0)
        self.assertEqual(sorted(v["name"] for v in self.d.call("vm.list")["vms"]),
                         ["gone", "keep"])
        s = self.d.call("vm.status", {"name": "keep"})
        self.assertEqual((s["state"], s["pid"]), ("running", keep["pid"]))
        self.assertTrue(pid_alive(keep["pid"]))

        # A destroy is carried out all the same (ending a guest is never held
        # back by bookkeeping); the answer says the registry lags behind.
        res = self.d.call("vm.destroy", {"name": "gone"})
        self.assertTrue(res["destroyed"])
        self.assertIn("No space left on device", res["registry_error"])
        wait_until(lambda: not pid_alive(gone["pid"]), 10, "the destroyed VM's VMM to exit")
        # A re-exec would read a registry that lags behind: refused.
        with self.assertRaises(RpcError) as cm:
            self.d.call("daemon.reexec")
        self.assertEqual(cm.exception.code, -32008)
        self.assertIn("registry", cm.exception.message)

        # Room again: the registry is written without waiting for a change,
        # and creating works.
        os.unlink(self.filler)
        wait_until(lambda: self.registry()["ok"], 10, "the registry to be written again")
        after = self.d.create_guest("after")
        self.assertTrue(self.registry()["ok"])
        self.assertIsNone(self.registry()["error"])

        # What cprd said it created is what a crashed cprd's successor knows.
        self.d.proc.send_signal(signal.SIGKILL)
        self.d.proc.wait()
        os.unlink(self.d.sock)
        self.d.start()
        vms = {v["name"]: v for v in self.d.call("vm.list")["vms"]}
        self.assertEqual(sorted(vms), ["after", "keep"])
        self.assertEqual((vms["keep"]["state"], vms["keep"]["pid"]), ("running", keep["pid"]))
        self.assertEqual((vms["after"]["state"], vms["after"]["pid"]), ("running", after["pid"]))
        self.assertEqual(self.d.call("daemon.status")["start_mode"], "recovered")
        con.wait_beats(2)  # heartbeats written while the disk was full are lost, not the guest


if __name__ == "__main__":
    unittest.main()
