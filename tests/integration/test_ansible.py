"""The Ansible role (contrib/ansible) rolling a QEMU update across a fleet:
three "hosts" that are three cprd instances on this machine (each its own
socket and state directory, ansible_connection=local), two real guests on
each, all on a copy of QEMU that a "package upgrade" replaces on disk. One
host is broken (its wrapper no longer adds a device one guest has: the new
VMM cannot load that guest's state); the roll-out with serial 1 stops there
and leaves the host after it alone. Fixed, a second run finishes it, and a
third changes nothing."""

import json
import os
import shutil
import subprocess
import tempfile
import unittest

from cprdtest import (QEMU, Console, Daemon, require_guest, require_root, vm_file_holders,
                      wait_until, wrapper)

HERE = os.path.dirname(os.path.abspath(__file__))
PLAYBOOK = os.path.join(HERE, "..", "..", "contrib", "ansible", "rolling-update.yml")
ANSIBLE = shutil.which("ansible-playbook")
HOSTS = ("h1", "h2", "h3")
VMS = ("a", "b")
WITH_RNG = 'exec {q} -device virtio-rng-pci "$@"'
WITHOUT_RNG = 'exec {q} "$@"'


class RollingUpdate(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if not ANSIBLE:
            raise unittest.SkipTest("ansible-playbook not installed (ansible-core: "
                                    "make check-deps installs it)")
        require_root(cls)
        require_guest()
        cls.tmp = tempfile.mkdtemp(prefix="cprd-ans-")
        # Readable by the confined VMMs' own uids; a bin/ directory, so that
        # cprd lets a confined VMM see the whole prefix (the wrapper execs
        # the copy beside it).
        os.chmod(cls.tmp, 0o755)
        bindir = os.path.join(cls.tmp, "bin")
        os.mkdir(bindir, 0o755)
        cls.qemu = os.path.join(bindir, "qemu-system-x86_64")
        shutil.copy2(QEMU, cls.qemu)
        cls.rng = wrapper(bindir, "qemu-h2", WITH_RNG.format(q=cls.qemu))
        cls.d, cls.con = {}, {}
        try:
            for h in HOSTS:
                cls.d[h] = Daemon().start()
            for h in HOSTS:
                for v in VMS:
                    # h2's b runs with a device the others do not have
                    vmm = cls.rng if (h, v) == ("h2", "b") else cls.qemu
                    vm = cls.d[h].create_guest(v, memory="128M", vmm=vmm)
                    cls.con[h, v] = Console(vm["console_log"])
            for c in cls.con.values():
                c.wait_beats(2)
        except BaseException:
            cls.tearDownClass()
            raise
        # The package upgrade: a new QEMU renamed over the old one (every
        # VM is now outdated) and, on h2, a wrapper that lost the device.
        new = cls.qemu + ".dpkg-new"
        shutil.copy2(QEMU, new)
        os.rename(new, cls.qemu)
        cls.set_wrapper(WITHOUT_RNG)
        cls.inventory = os.path.join(cls.tmp, "inventory.ini")
        with open(cls.inventory, "w") as f:
            f.write("[cprd]\n")
            for h in HOSTS:
                f.write(f"{h} ansible_connection=local ansible_python_interpreter=/usr/bin/python3"
                        f" cprd_socket={cls.d[h].sock}\n")
        cls.env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0",
                       ANSIBLE_CONFIG=os.path.join(cls.tmp, "none.cfg"),
                       ANSIBLE_LOCAL_TEMP=os.path.join(cls.tmp, "ansible-local"),
                       ANSIBLE_REMOTE_TMP=os.path.join(cls.tmp, "ansible-remote"),
                       ANSIBLE_HOME=os.path.join(cls.tmp, "ansible-home"))

    @classmethod
    def tearDownClass(cls):
        errors = []
        for d in getattr(cls, "d", {}).values():
            try:
                d.stop()
            except AssertionError as e:
                errors.append(str(e))
        shutil.rmtree(cls.tmp, ignore_errors=True)
        if errors:
            raise AssertionError("\n".join(errors))

    @classmethod
    def set_wrapper(cls, body):
        new = wrapper(os.path.dirname(cls.rng), "qemu-h2.new", body.format(q=cls.qemu))
        os.rename(new, cls.rng)

    def play(self, *args):
        """ansible-playbook on the three hosts; (exit status, output, summary)."""
        summary = os.path.join(self.tmp, "summary.json")
        if os.path.exists(summary):
            os.unlink(summary)
        p = subprocess.run([ANSIBLE, "-i", self.inventory, PLAYBOOK, "-e", "cprd_serial=1",
                            "-e", "cprd_parallel=2", "-e", f"cprd_summary_file={summary}"]
                           + list(args), capture_output=True, text=True, env=self.env,
                           timeout=900)
        out = p.stdout + p.stderr
        self.assertTrue(os.path.exists(summary), "no summary was written:\n" + out)
        if os.environ.get("CPRD_TEST_SHOW"):
            print(out)
        with open(summary) as f:
            return p.returncode, out, json.load(f)

    def pids(self, h):
        return {v: self.d[h].call("vm.status", {"name": v})["pid"] for v in VMS}

    def outdated(self, h):
        return sorted(v["name"] for v in self.d[h].call("vm.list", {"outdated": True})["vms"])

    def assert_fleet_unbroken(self):
        """Every guest runs on, in exactly one VMM (the one cprd names)."""
        for (h, v), c in self.con.items():
            st = self.d[h].call("vm.status", {"name": v})
            self.assertEqual(st["state"], "running", (h, v))
            wait_until(lambda: vm_file_holders(self.d[h].dir, v, exclude={self.d[h].pid})
                       == [st["pid"]], 10, f"{h}/{v} to be in exactly one VMM, {st['pid']}")
        for (h, v), c in self.con.items():
            c.wait_beats(2)
            with self.subTest(host=h, vm=v):
                c.assert_healthy(self)

    def test_1_check_mode_runs_only_the_preflights(self):
        before = {h: self.pids(h) for h in HOSTS}
        rc, out, s = self.play("--check")
        self.assertEqual(rc, 0, out)
        self.assertTrue(s["check_mode"])
        self.assertEqual({h: s["hosts"][h]["status"] for h in HOSTS},
                         {h: "checked" for h in HOSTS}, out)
        for h in HOSTS:
            self.assertEqual(sorted(s["hosts"][h]["vms"]), list(VMS))
            self.assertTrue(all(c["ok"] for c in s["hosts"][h]["checks"]), s["hosts"][h])
            self.assertEqual(self.pids(h), before[h], f"check mode touched {h}")
            self.assertEqual(self.outdated(h), list(VMS))
        self.assertIn("would update 2 VM(s)", out)
        self.assert_fleet_unbroken()

    def test_2_rollout_stops_at_the_failing_host(self):
        before = {h: self.pids(h) for h in HOSTS}
        rc, out, s = self.play()
        self.assertNotEqual(rc, 0, out)
        hosts = s["hosts"]
        self.assertEqual({h: hosts[h]["status"] for h in HOSTS},
                         {"h1": "done", "h2": "failed", "h3": "skipped"}, out)
        self.assertEqual({k: s["totals"][k] for k in ("done", "failed", "skipped")},
                         {"done": 1, "failed": 1, "skipped": 1})
        self.assertTrue(s["stopped"])
        # h1: both updated, each to a new VMM
        self.assertEqual(hosts["h1"]["updated"], 2)
        self.assertEqual(self.outdated("h1"), [])
        for v, pid in self.pids("h1").items():
            self.assertNotEqual(pid, before["h1"][v])
        self.assertIsNotNone(hosts["h1"]["blackout_ms"]["max"])
        # h2: a went over, b rolled back with cprd's error and QEMU's words
        rep = {r["vm"]: r for r in hosts["h2"]["reports"]}
        self.assertEqual((rep["a"]["result"], rep["b"]["result"]), ("ok", "rolled-back"))
        self.assertEqual(rep["b"]["error"]["code"], -32005)
        self.assertEqual(rep["b"]["error"]["kind"], "vmm-failed")
        self.assertIn("virtio-rng", rep["b"]["error"]["message"])
        self.assertEqual(hosts["h2"]["error"]["code"], -32005)
        self.assertIn("cprd error -32005", out)
        self.assertEqual(self.pids("h2")["b"], before["h2"]["b"])
        self.assertEqual(self.outdated("h2"), ["b"])
        # h3: never touched, not even pre-flighted
        self.assertEqual(self.pids("h3"), before["h3"])
        self.assertEqual(self.outdated("h3"), list(VMS))
        self.assertEqual(hosts["h3"]["checks"], [])
        self.assertIn("1 done, 1 failed, 1 skipped", out)
        self.assert_fleet_unbroken()

    def test_3_second_run_after_the_fix_finishes(self):
        self.set_wrapper(WITH_RNG)
        before = {h: self.pids(h) for h in HOSTS}
        rc, out, s = self.play()
        self.assertEqual(rc, 0, out)
        hosts = s["hosts"]
        self.assertEqual({h: (hosts[h]["status"], hosts[h]["updated"]) for h in HOSTS},
                         {"h1": ("done", 0), "h2": ("done", 1), "h3": ("done", 2)}, out)
        self.assertFalse(s["stopped"])
        self.assertEqual(self.pids("h1"), before["h1"])
        self.assertEqual(self.pids("h2")["a"], before["h2"]["a"])
        self.assertNotEqual(self.pids("h2")["b"], before["h2"]["b"])
        for h in HOSTS:
            self.assertEqual(self.outdated(h), [], h)
        self.assertEqual(s["totals"]["vms_updated"], 3)
        self.assertIsNotNone(s["blackout_ms"]["p95"])
        self.assert_fleet_unbroken()

    def test_4_nothing_outdated_changes_nothing(self):
        before = {h: self.pids(h) for h in HOSTS}
        rc, out, s = self.play()
        self.assertEqual(rc, 0, out)
        self.assertFalse(s["changed"])
        self.assertEqual({h: s["hosts"][h]["status"] for h in HOSTS}, {h: "done" for h in HOSTS})
        self.assertIn("nothing changed", out)
        self.assertEqual(out.count("changed=0"), 3, out)
        self.assertEqual({h: self.pids(h) for h in HOSTS}, before)

    def test_5_limits_fail_a_host(self):
        """A pre-flight that fails touches nothing; a blackout over the limit
        fails the host although its VMs were updated."""
        before = self.pids("h1")
        rc, out, s = self.play("--limit", "h1", "-e", "cprd_outdated_only=false",
                               "-e", "cprd_vmm=/nonexistent/qemu")
        self.assertNotEqual(rc, 0, out)
        h1 = s["hosts"]["h1"]
        self.assertEqual((h1["status"], h1["error"]["code"]), ("failed", -32005), out)
        self.assertIn("cannot start it", h1["error"]["message"])
        self.assertEqual(self.pids("h1"), before)
        rc, out, s = self.play("--limit", "h1", "-e", "cprd_outdated_only=false",
                               "-e", "cprd_max_blackout_ms=0.001")
        self.assertNotEqual(rc, 0, out)
        h1 = s["hosts"]["h1"]
        self.assertEqual((h1["status"], h1["updated"]), ("failed", 2), out)
        self.assertIn("exceeds cprd_max_blackout_ms", h1["note"])
        self.assertEqual(list(s["hosts"]), ["h1"])
        self.assert_fleet_unbroken()

    def test_6_max_fail_percentage_decides_between_batches(self):
        """Two hosts a batch: h2's failure is half of the first batch, so
        max_fail_percentage 49 stops the roll-out before h3, and 50 (not
        exceeded) lets it go on to h3."""
        # Another package upgrade, with h2's wrapper losing the device again.
        new = self.qemu + ".dpkg-new"
        shutil.copy2(QEMU, new)
        os.rename(new, self.qemu)
        self.set_wrapper(WITHOUT_RNG)
        before = self.pids("h3")
        rc, out, s = self.play("-e", "cprd_serial=2", "-e", "cprd_max_fail_percentage=49")
        self.assertNotEqual(rc, 0, out)
        self.assertEqual({h: s["hosts"][h]["status"] for h in HOSTS},
                         {"h1": "done", "h2": "failed", "h3": "skipped"}, out)
        self.assertEqual(self.pids("h3"), before)
        rc, out, s = self.play("-e", "cprd_serial=2", "-e", "cprd_max_fail_percentage=50")
        self.assertEqual({h: s["hosts"][h]["status"] for h in HOSTS},
                         {"h1": "done", "h2": "failed", "h3": "done"}, out)
        self.assertEqual(s["hosts"]["h3"]["updated"], 2)
        self.assertEqual(self.outdated("h3"), [])
        self.set_wrapper(WITH_RNG)
        self.assert_fleet_unbroken()


if __name__ == "__main__":
    unittest.main()
