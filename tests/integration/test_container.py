"""cprd under a real systemd (252, PID 1 of a systemd-nspawn container), with
the units that `make install` installs, real QEMU and the real guest: socket
activation, the VM's scope in machine.slice, the fd store across kill,
restart and watchdog, custody from the running VMMs after stop + start,
reload as re-exec, the journal's fields, and the hardening score.

One container and one VM serve the ordered cases of SystemdContainerTest
(test_01 ... test_10): each leaves the VM running for the next, and each
checks that the guest's heartbeat went on without a gap and that its VMM was
never ended by systemd."""

import json
import os
import re
import subprocess
import tempfile
import time
import unittest

import container
import cprdtest
from cprdtest import Console, wait_until

VM = "vm1"
APPEND = cprdtest.GUEST_APPEND
CPRCTL = f"{container.PREFIX}/bin/cprctl"
UPDATE_ID = "ae081965fb0a44d390d312bbf3d2f862"
STARTED_ID = "e4972ca2f7b34959a65fdf99da5ec2b9"


class UnitTemplateTest(unittest.TestCase):
    """The unit follows PREFIX: nothing of /usr/local is left in it."""

    def test_unit_follows_prefix(self):
        with tempfile.TemporaryDirectory() as b:
            subprocess.run(["make", "-s", "-C", container.TOP, f"B={b}",
                            f"{b}/units/cprd.service", "PREFIX=/opt/cprd"],
                           check=True, capture_output=True, timeout=60)
            with open(f"{b}/units/cprd.service") as f:
                unit = f.read()
        self.assertIn("\nExecStart=/opt/cprd/sbin/cprd ", unit)
        self.assertIn("\nExecReload=/opt/cprd/bin/cprctl daemon reexec", unit)
        self.assertNotIn("/usr/local", unit)
        self.assertNotIn("@", unit.replace("@clock", "").replace("@cpu-emulation", "")
                         .replace("@debug", "").replace("@module", "").replace("@obsolete", "")
                         .replace("@raw-io", "").replace("@reboot", "").replace("@swap", ""),
                         "a template variable was left unreplaced")


class SystemdContainerTest(unittest.TestCase):
    c = None

    @classmethod
    def setUpClass(cls):
        why = container.why_not()
        if why:
            raise unittest.SkipTest(why)
        cprdtest.require_guest()
        root = container.build_root()
        cls.stage = tempfile.mkdtemp(prefix="cprd-install-")
        container.install(cprdtest.BUILD, cls.stage)
        cls.c = container.Container(f"cprdt{os.getpid()}")
        cls.c.start(root, [(os.path.join(cls.stage, container.PREFIX.lstrip("/")),
                            container.PREFIX),
                           (cprdtest.GUEST, container.GUEST_DIR)])
        try:
            # The accelerator make guest found, through the unit's own knob.
            cls.c.write("/etc/systemd/system/cprd.service.d/accel.conf",
                        f'[Service]\nEnvironment="CPRD_OPTIONS=--accel {cprdtest.guest_accel()}"\n')
            cls.c.systemctl("daemon-reload")
            cls.c.run("journalctl", "--update-catalog", check=True)
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        c, cls.c = cls.c, None
        try:
            if c and c.pid1:
                c.run(CPRCTL, "destroy", VM, timeout=60)
        finally:
            if c:
                c.stop()
            import shutil
            shutil.rmtree(cls.stage, ignore_errors=True)

    def setUp(self):
        if self.c is None:
            self.skipTest("no container")

    # --- helpers -------------------------------------------------------------
    def journal_tail(self):
        return self.c.run("journalctl", "--no-pager", "-n", "40", "-u", "cprd").stdout

    def cprctl(self, *args):
        return self.c.run(CPRCTL, *args, check=True, timeout=cprdtest.BOOT_TIMEOUT).stdout

    def status(self):
        return json.loads(self.cprctl("--json", "daemon", "status"))

    def vm(self):
        return json.loads(self.cprctl("--json", "status", VM))

    def main_pid(self):
        return int(self.c.show("cprd.service", "MainPID") or 0)

    def console(self):
        return Console(self.c.path(f"/run/cprd/vms/{VM}/console.log"))

    def scope_of(self, pid):
        """The cgroup (named systemd hierarchy) of a pid of the container."""
        text = self.c.run("cat", f"/proc/{pid}/cgroup", check=True).stdout
        return re.search(r"^\d+:name=systemd:(.*)$", text, re.M).group(1)

    def wait_restarted(self, old_pid, timeout=60):
        """cprd runs again under a new main pid and answers."""
        def up():
            pid = self.main_pid()
            if pid in (0, old_pid) or self.c.show("cprd.service", "ActiveState") != "active":
                return False
            return self.c.run(CPRCTL, "daemon", "status").returncode == 0
        wait_until(up, timeout, "cprd to run again", interval=0.2)

    def assert_vm_intact(self, vmm_pid, start_mode=None):
        """The same VMM (never ended by systemd) in the VM's scope, custody
        back as start_mode says, and the guest beating on without a gap."""
        v = self.vm()
        self.assertEqual(v["state"], "running")
        self.assertEqual(v["pid"], vmm_pid, "the VMM changed")
        self.assertEqual(v["fds_held"], self.__class__.fds, "custody is not whole:\n"
                         + self.journal_tail())
        if start_mode:
            self.assertEqual(self.status()["start_mode"], start_mode)
        self.assertEqual(self.scope_of(vmm_pid), f"/machine.slice/cprd-vm-{VM}.scope")
        con = self.console()
        con.wait_beats(3)
        con.assert_healthy(self)

    # --- the cases, in order ----------------------------------------------------
    def test_01_socket_activation_and_scope(self):
        c = self.c
        c.systemctl("start", "cprd.socket")
        self.assertEqual(c.show("cprd.service", "ActiveState"), "inactive")
        st = self.status()  # the first call starts cprd
        self.assertTrue(st["socket_activated"])
        self.assertEqual(st["start_mode"], "fresh")
        self.assertEqual(c.show("cprd.service", "ActiveState"), "active")
        self.cprctl("create", VM, "--memory", "256M", "--kernel",
                    f"{container.GUEST_DIR}/vmlinuz", "--initrd",
                    f"{container.GUEST_DIR}/initrd.img", "--append", APPEND)
        v = self.vm()
        self.__class__.fds = v["fds_held"]
        self.__class__.vmm = v["pid"]
        scope = f"cprd-vm-{VM}.scope"
        wait_until(lambda: self.c.show(scope, "ActiveState") == "active", 10, scope)
        self.assertEqual(c.show(scope, "Slice"), "machine.slice")
        self.assertEqual(self.scope_of(v["pid"]), f"/machine.slice/{scope}")
        self.assertIn(str(v["pid"]), c.systemctl("status", scope).stdout)
        self.console().wait_beats(3)

    def test_02_update_keeps_the_scope(self):
        out = self.cprctl("update", VM)
        self.assertIn(": ok", out)
        v = self.vm()
        self.assertNotEqual(v["pid"], self.vmm)
        self.__class__.vmm = v["pid"]
        # The new VMM joined the VM's scope: one name for the VM's life.
        wait_until(lambda: self.scope_of(v["pid"]) == f"/machine.slice/cprd-vm-{VM}.scope",
                   10, "the new VMM in the VM's scope")
        self.assert_vm_intact(self.vmm)

    def test_03_kill_restarts_with_custody_from_the_fd_store(self):
        old = self.main_pid()
        self.c.systemctl("kill", "-s", "KILL", "cprd")
        self.wait_restarted(old)
        self.assert_vm_intact(self.vmm, "fd-store")
        self.assertIn(": ok", self.cprctl("update", VM))
        self.__class__.vmm = self.vm()["pid"]
        self.assert_vm_intact(self.vmm)

    def test_04_restart_keeps_the_fd_store(self):
        old = self.main_pid()
        self.c.systemctl("restart", "cprd")
        self.wait_restarted(old)
        self.assert_vm_intact(self.vmm, "fd-store")

    def test_05_daemon_reexec_keeps_the_fd_store(self):
        old = self.main_pid()
        self.c.systemctl("daemon-reexec")
        wait_until(lambda: self.c.run("systemctl", "is-system-running").stdout.strip()
                   in ("running", "degraded"), 30, "systemd after daemon-reexec")
        self.assertEqual(self.main_pid(), old, "daemon-reexec touched cprd")
        self.assert_vm_intact(self.vmm)
        # systemd kept the fd store over its own re-exec: the next cprd has it.
        self.c.systemctl("restart", "cprd")
        self.wait_restarted(old)
        self.assert_vm_intact(self.vmm, "fd-store")

    def test_06_stop_start_recovers_from_the_vmms(self):
        old = self.main_pid()
        self.c.systemctl("stop", "cprd")
        self.assertEqual(self.c.show(f"cprd-vm-{VM}.scope", "ActiveState"), "active")
        self.assertEqual(self.c.run("kill", "-0", str(self.vmm)).returncode, 0,
                         "stopping cprd ended the VMM")
        self.c.systemctl("start", "cprd")
        self.wait_restarted(old)
        self.assert_vm_intact(self.vmm, "recovered")

    def test_07_reload_reexecutes(self):
        old = self.main_pid()
        self.c.systemctl("reload", "cprd")
        self.assertEqual(self.main_pid(), old, "reload is a re-exec in place")
        self.assert_vm_intact(self.vmm, "re-exec")

    def test_08_watchdog_restarts_a_stuck_cprd(self):
        self.assertEqual(self.c.show("cprd.service", "WatchdogUSec"), "10s")
        old = self.main_pid()
        # A cprd whose loop turns tells systemd so: it outlives WatchdogSec.
        up = self.status()["uptime_sec"]
        if up < 12:
            time.sleep(12 - up)
        self.assertEqual(self.main_pid(), old, "a healthy cprd was restarted")
        self.assertNotIn("Watchdog timeout", self.c.run("journalctl", "--no-pager", "-u",
                                                        "cprd").stdout)
        t0 = time.monotonic()
        self.c.run("kill", "-STOP", str(old), check=True)
        # 10 s from the last WATCHDOG=1 (sent every 5 s), up to 5 s for
        # SIGABRT to a stopped process, SIGKILL, 1 s RestartSec.
        self.wait_restarted(old, timeout=60)
        took = time.monotonic() - t0
        self.assertGreaterEqual(took, 5, "cprd was restarted before the watchdog expired")
        log = self.c.run("journalctl", "--no-pager", "-u", "cprd").stdout
        self.assertIn("Watchdog timeout", log)
        self.assert_vm_intact(self.vmm, "fd-store")

    def test_09_journal_fields(self):
        self.c.run("journalctl", "--flush")
        out = self.c.run("journalctl", "-o", "json", "--no-pager", "_COMM=cprd",
                         check=True).stdout
        entries = [json.loads(l) for l in out.splitlines() if l.strip()]
        self.assertTrue(entries)
        for e in entries:
            msg = e.get("MESSAGE", "")
            if isinstance(msg, list):  # non-UTF-8: journalctl gives bytes
                msg = bytes(msg).decode(errors="replace")
            self.assertFalse(msg.startswith("<"), f"a raw priority prefix: {msg}")
            if msg.startswith(f"VM {VM}:") or msg.startswith(f"update vm={VM} "):
                self.assertEqual(e.get("CPRD_VM"), VM, f"no CPRD_VM= on: {msg}")
        updates = [e for e in entries if e.get("MESSAGE_ID") == UPDATE_ID]
        self.assertEqual(len(updates), 2, "one entry per update, with MESSAGE_ID")
        for e in updates:
            self.assertEqual(e["CPRD_VM"], VM)
            self.assertEqual(e["CPRD_RESULT"], "ok")
            self.assertGreater(float(e["CPRD_BLACKOUT_MS"]), 0)
            self.assertTrue(e["CPRD_TOTAL_MS"])
        modes = [e.get("CPRD_START_MODE") for e in entries if e.get("MESSAGE_ID") == STARTED_ID]
        self.assertEqual(modes, ["fresh", "fd-store", "fd-store", "fd-store", "recovered",
                                 "re-exec", "fd-store"])
        # No line twice: every line is one native journal entry (none also
        # through stderr's stream), each update's result one entry.
        self.assertEqual({e.get("_TRANSPORT") for e in entries}, {"journal"})
        results = [e for e in entries if str(e.get("MESSAGE")).startswith(f"update vm={VM} ")]
        self.assertEqual(len(results), len(updates))
        seen = {}
        for e in entries:
            key = (e.get("_PID"), str(e.get("MESSAGE")))
            t = int(e["__REALTIME_TIMESTAMP"])
            if key in seen:
                self.assertGreater(t - seen[key], 100_000, f"logged twice: {key}")
            seen[key] = t
        # The catalog installed with the units explains the update entries.
        x = self.c.run("journalctl", "--no-pager", "-x", f"MESSAGE_ID={UPDATE_ID}").stdout
        self.assertIn(f"VMM update of VM {VM}: ok", x)

    def test_10_security_exposure(self):
        out = self.c.run("systemd-analyze", "security", "--no-pager", "cprd.service",
                         check=True).stdout
        m = re.search(r"Overall exposure level for cprd.service: ([\d.]+)", out)
        self.assertTrue(m, out[-2000:])
        self.assertLessEqual(float(m.group(1)), 5.0, out)
        # ... and QEMU works under it: the guest ran through every case.
        self.assert_vm_intact(self.vmm)


if __name__ == "__main__":
    unittest.main()
