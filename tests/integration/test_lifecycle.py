"""A VM's life through cprctl, as an operator drives it: create a real guest,
see it run, inspect it, lose its VMM, destroy it; nothing may leak."""

import json
import mmap
import os
import signal
import stat
import time
import unittest

from cprdtest import (CPRD, guest_accel, Console, Daemon, GuestTest, GUEST_APPEND, INITRD, KERNEL, NetNsDaemonTest, QEMU, RpcError,
                      SharedDaemonTest,                      children, pid_alive, require_guest, require_root, wait_until, wrapper)


class Lifecycle(SharedDaemonTest):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.baseline_fds = cls.d.settled_fds()

    def create(self, name, *extra):
        p = self.d.cprctl("create", name, "--memory", "256M", "--kernel", KERNEL,
                          "--initrd", INITRD, "--append", GUEST_APPEND, *extra)
        self.assertEqual(p.returncode, 0, p.stderr)
        return json.loads(self.d.cprctl("status", name, "--json", check=True).stdout)

    def test_create_run_inspect_destroy(self):
        vm = self.create("life1")
        for key in ("name", "state", "pid", "vmm", "memory_bytes", "console_log"):
            self.assertIn(key, vm)
        self.assertEqual(vm["state"], "running")
        self.assertEqual(vm["memory_bytes"], 256 << 20)
        self.assertTrue(pid_alive(vm["pid"]))

        # The guest really runs: heartbeats on the console cprd holds.
        con = Console(vm["console_log"])
        con.wait_beats(5)
        con.assert_healthy(self)

        # The VMM is cprd's (subreaper) child and got exactly the held fds.
        self.assertIn(vm["pid"], children(self.d.pid))
        qemu_fds = {fd: os.readlink(f"/proc/{vm['pid']}/fd/{fd}")
                    for fd in os.listdir(f"/proc/{vm['pid']}/fd")}
        self.assertTrue(qemu_fds["3"].startswith("/memfd:ram0"), qemu_fds)
        self.assertEqual(qemu_fds["4"], vm["console_log"])

        listing = self.d.cprctl("list", check=True).stdout
        self.assertRegex(listing, r"(?m)^NAME\s+STATE\s+PID")
        self.assertRegex(listing, rf"(?m)^life1\s+running\s+{vm['pid']}\s+256 MiB\s")

        fds = json.loads(self.d.cprctl("fds", "life1", "--json", check=True).stdout)["fds"]
        by_name = {f["name"]: f for f in fds}
        self.assertEqual(by_name["ram0"]["kind"], "memfd")
        self.assertEqual(by_name["ram0"]["size"], 256 << 20)
        self.assertEqual(by_name["console"]["kind"], "file")
        human = self.d.cprctl("fds", "life1", check=True).stdout
        self.assertRegex(human, r"(?m)^ram0\s+memfd\s+256 MiB\s")

        p = self.d.cprctl("destroy", "life1")
        self.assertEqual(p.returncode, 0, p.stderr)
        wait_until(lambda: not pid_alive(vm["pid"]), 10, "the VMM to exit")
        self.assertNotIn(vm["pid"], children(self.d.pid), "VMM left as a zombie")
        self.assertNotIn("life1", self.d.cprctl("list", check=True).stdout)
        self.assertFalse(os.path.exists(os.path.dirname(vm["console_log"])))
        self.d.wait_fds(self.baseline_fds)
        p = self.d.cprctl("status", "life1")
        self.assertEqual(p.returncode, 1)
        self.assertIn("no VM named 'life1'", p.stderr)

    def test_guest_ram_is_the_daemons_memfd(self):
        vm = self.create("life2")
        con = Console(vm["console_log"])
        con.wait_beats(2)
        c = self.d.conn()
        c.call("fd.claim", {"vm": "life2", "names": ["ram0"]})
        (fd,) = c.take_fds()
        c.close()
        try:
            st = os.fstat(fd)
            self.assertTrue(stat.S_ISREG(st.st_mode))
            self.assertEqual(st.st_size, 256 << 20)
            # The guest kernel's own console text sits in these pages: the
            # memfd cprd holds is the guest's RAM, not a copy.
            with mmap.mmap(fd, st.st_size, prot=mmap.PROT_READ) as m:
                self.assertNotEqual(m.find(b"CPRD-GUEST hb seq="), -1)
        finally:
            os.close(fd)
        self.d.call("vm.destroy", {"name": "life2"})

    def test_crashed_vmm_keeps_memory_in_custody(self):
        vm = self.create("life3")
        os.kill(vm["pid"], signal.SIGKILL)
        st = wait_until(lambda: (lambda s: s if s["state"] == "crashed" else None)(
            self.d.call("vm.status", {"name": "life3"})), 10, "state crashed")
        self.assertEqual(st["exit"], "killed by signal KILL")
        self.assertIsNone(st["pid"])
        self.assertNotIn(vm["pid"], children(self.d.pid), "crashed VMM not reaped")
        names = [f["name"] for f in self.d.call("vm.fds", {"name": "life3"})["fds"]]
        self.assertIn("ram0", names)
        p = self.d.cprctl("status", "life3")
        self.assertEqual(p.returncode, 3, "status of a VM not running exits 3")
        self.assertRegex(p.stdout, r"(?m)^state\s+crashed")
        self.d.cprctl("destroy", "life3", check=True)
        self.assertEqual(self.d.call("vm.list")["vms"], [])

    def test_pause_and_resume(self):
        vm = self.create("life7")
        con = Console(vm["console_log"])
        con.wait_beats(2)
        p = self.d.cprctl("pause", "life7")
        self.assertEqual((p.returncode, p.stdout), (0, "VM life7 paused\n"), p.stderr)
        st = self.d.call("vm.status", {"name": "life7"})
        self.assertEqual((st["state"], st["pid"]), ("paused", vm["pid"]))
        # The guest really stands still: no heartbeat (one each 0.2 s) for 2 s.
        beats = len(con.beats())
        time.sleep(2)
        self.assertEqual(len(con.beats()), beats, "the paused guest beat on")
        # Asked again: nothing to do, and said so.
        self.assertEqual(self.d.call("vm.pause", {"name": "life7"}),
                         {"name": "life7", "state": "paused", "changed": False})
        # A paused guest is not updated.
        with self.assertRaises(RpcError) as e:
            self.d.call("vm.update", {"name": "life7"})
        self.assertEqual(e.exception.code, -32004)
        p = self.d.cprctl("resume", "life7", "--json")
        self.assertEqual(json.loads(p.stdout), {"name": "life7", "state": "running",
                                                "changed": True}, p.stderr)
        con.wait_beats(3)
        con.assert_healthy(self)  # the same boot, no beat lost
        self.assertEqual(self.d.cprctl("resume", "life7").stdout, "VM life7 was already running\n")
        # Only a VM with a VMM can be paused.
        os.kill(vm["pid"], signal.SIGKILL)
        wait_until(lambda: self.d.call("vm.status", {"name": "life7"})["state"] == "crashed", 10,
                   "state crashed")
        p = self.d.cprctl("pause", "life7")
        self.assertEqual(p.returncode, 1)
        self.assertIn("VM 'life7' is crashed; only a running or paused VM can be paused", p.stderr)
        self.d.cprctl("destroy", "life7", check=True)

    def test_update_refused_while_a_pause_is_in_flight(self):
        # The pause is held in flight: its VMM, stopped, cannot answer
        # `stop`. An update then is refused as busy, saying why, not as
        # "running; only a running VM can be updated".
        vm = self.create("life8")
        Console(vm["console_log"]).wait_beats(2)
        os.kill(vm["pid"], signal.SIGSTOP)

        def cont():
            try:
                os.kill(vm["pid"], signal.SIGCONT)
            except ProcessLookupError:
                pass
        self.addCleanup(cont)
        conn = self.d.conn(60)
        self.addCleanup(conn.close)
        req = conn.request("vm.pause", {"name": "life8"})
        wait_until(lambda: self.d.call("vm.status", {"name": "life8"})["busy"] ==
                   "being paused or resumed", 10, "the pause to be in flight")
        with self.assertRaises(RpcError) as e:
            self.d.call("vm.update", {"name": "life8"})
        self.assertEqual(e.exception.code, -32003, e.exception)  # busy
        self.assertIn("VM 'life8' is being paused or resumed; try again when that has "
                      "finished", str(e.exception))
        cont()
        while (rep := conn.recv_line()).get("id") != req:
            pass
        self.assertEqual(rep.get("result"), {"name": "life8", "state": "paused",
                                             "changed": True}, rep)
        self.d.cprctl("destroy", "life8", check=True)

    def test_two_vms_are_independent(self):
        a = self.create("life4")
        b = self.create("life5")
        self.assertNotEqual(a["pid"], b["pid"])
        self.d.cprctl("destroy", "life4", check=True)
        self.assertEqual(self.d.call("vm.status", {"name": "life5"})["state"], "running")
        Console(b["console_log"]).wait_beats(2)
        self.d.cprctl("destroy", "life5", check=True)


class Strays(GuestTest):
    """cprd is a subreaper: a VMM's stray child comes to it when its own
    parent is gone, and must not stay a zombie in a long-lived daemon. A
    confined VMM is pid 1 of its own namespace and takes its strays itself,
    so this cprd runs its VMMs unconfined, where they do come to cprd."""

    def setUp(self):
        require_root(self)
        require_guest()
        self.d = Daemon(["--no-confine"]).start()

    def test_processes_a_vmm_leaves_behind_are_reaped(self):
        # The stray outlives QEMU's start, however slow: it is seen.
        vmm = wrapper(self.d.dir, "stray", f'(sleep 8 &)\nexec {QEMU} "$@"')
        vm = self.d.create_guest("life6", vmm=vmm)
        strays = lambda: [p for p, (comm, st) in children(self.d.pid).items() if comm == "sleep"]
        # It does come to cprd (running, or a zombie not yet reaped)...
        wait_until(lambda: strays(), 5, "the stray child to come to cprd", interval=0.02)
        # ...and is reaped once it exits.
        wait_until(lambda: not strays(), 20, "the stray child to be reaped")
        st = self.d.call("vm.status", {"name": "life6"})
        self.assertEqual((st["state"], st["pid"]), ("running", vm["pid"]))


class Tap(NetNsDaemonTest):
    """cprd runs in a network namespace the test makes: the taps it creates
    never appear on the host."""

    def test_tap_fd_is_held_passed_to_qemu_and_kept_across_an_update(self):
        ifname = "cprdtap0"
        p = self.d.cprctl("create", "net", "--memory", "256M", "--kernel", KERNEL, "--initrd",
                          INITRD, "--append", GUEST_APPEND, "--tap", ifname)
        self.assertEqual(p.returncode, 0, p.stderr)
        vm = self.d.call("vm.status", {"name": "net"})
        self.assertEqual(vm["tap"], ifname)
        fds = {f["name"]: f for f in self.d.call("vm.fds", {"name": "net"})["fds"]}
        self.assertEqual(fds["net0"]["kind"], "tap")
        self.assertTrue(self.ns.link(ifname), "tap interface missing")
        self.assertFalse(os.path.exists(f"/sys/class/net/{ifname}"), "the tap leaked to the host")
        self.assertEqual(os.readlink(f"/proc/{vm['pid']}/fd/6"), "/dev/net/tun")
        with open(f"/proc/{vm['pid']}/cmdline", "rb") as f:
            self.assertIn(b"tap,id=net0,fd=6", f.read())
        con = Console(vm["console_log"])
        con.wait_beats(3)
        rep = self.d.call("vm.update", {"name": "net"})
        self.assertEqual(rep["result"], "ok")
        self.assertEqual(os.readlink(f"/proc/{rep['new_pid']}/fd/6"), "/dev/net/tun")
        con.wait_beats(2)
        con.assert_healthy(self)
        self.d.call("vm.destroy", {"name": "net"})
        # cprd held the last reference: the interface goes with it.
        wait_until(lambda: not self.ns.link(ifname), 5, "the tap interface to disappear")

    def test_tap_name_in_use_by_a_non_tap_is_a_clear_error(self):
        p = self.d.cprctl("create", "lo-vm", "--memory", "64M", "--kernel", KERNEL, "--tap", "lo")
        self.assertEqual(p.returncode, 1)
        self.assertIn("cannot acquire its tap device: Invalid argument", p.stderr)
        self.assertEqual(self.d.call("vm.list")["vms"], [])


class DaemonProcess(unittest.TestCase):
    def setUp(self):
        require_root(self)

    def test_socket_is_0660_and_state_dir_locked(self):
        d = Daemon().start()
        try:
            mode = stat.S_IMODE(os.stat(d.sock).st_mode)
            self.assertEqual(mode, 0o660)
            # A second daemon on the same state dir must refuse, not steal it.
            import subprocess
            p = subprocess.run([CPRD, "--foreground", "--state-dir", d.dir, "--accel", guest_accel(), "--log-dir", ""],
                               capture_output=True, text=True, timeout=10)
            self.assertNotEqual(p.returncode, 0)
            self.assertIn("another cprd already uses state directory", p.stderr)
            self.assertEqual(d.call("daemon.status")["version"], "0.1.0")
        finally:
            d.stop()

    def test_detached_daemon_is_ready_when_the_command_returns(self):
        import subprocess
        import tempfile
        import shutil
        state = tempfile.mkdtemp(prefix="cprd-test-")
        try:
            p = subprocess.run([CPRD, "--state-dir", state, "--accel", guest_accel(), "--log-dir", ""], capture_output=True, text=True,
                               timeout=20)
            self.assertEqual(p.returncode, 0, p.stderr)
            d = Daemon()
            d.sock = os.path.join(state, "cprd.sock")
            st = d.call("daemon.status")
            self.assertEqual(st["start_mode"], "fresh")
            os.kill(st["pid"], signal.SIGTERM)
            wait_until(lambda: not pid_alive(st["pid"]), 10, "cprd to exit on SIGTERM")
            self.assertFalse(os.path.exists(d.sock), "socket left behind")
        finally:
            shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    unittest.main()
