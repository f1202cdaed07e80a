"""Live update against real QEMU and the real guest: the guest keeps beating
without a gap or a reboot and its in-RAM data check keeps passing across
updates; every failure rolls back to the old VMM with the guest running."""

import json
import os
import shutil
import threading
import unittest

from cprdtest import (Console, GuestTest, QEMU, RpcError, SharedDaemonTest, children, pid_alive,
                      wait_until, wrapper)


class Update(SharedDaemonTest):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.vm = cls.d.create_guest("upd")
        cls.con = Console(cls.vm["console_log"])
        cls.con.wait_beats(3)

    def update(self, *args):
        p = self.d.cprctl("update", "upd", "--json", *args)
        return p.returncode, json.loads(p.stdout), p.stderr

    def assert_guest_ok_in(self, pid):
        """The guest runs in exactly this VMM, one boot, no gap, data ok."""
        st = self.d.call("vm.status", {"name": "upd"})
        self.assertEqual(st["state"], "running")
        self.assertEqual(st["pid"], pid)
        qemus = [p for p, (comm, s) in children(self.d.pid).items() if comm.startswith("qemu")]
        self.assertEqual(qemus, [pid], "exactly one VMM must remain")
        self.con.wait_beats(3)
        self.con.assert_healthy(self)

    def test_1_handover_several_times(self):
        self.several_times(["handover"] * 3)

    def test_1_cpr_transfer_several_times(self):
        self.several_times(["cpr-transfer"] * 3)

    def test_1_strategies_alternate(self):
        # Each strategy leaves migration settings behind in the VMM it
        # creates (x-ignore-shared, mode); the next must not trip on them.
        self.several_times(["cpr-transfer", "handover", "cpr-transfer", "handover"])

    def several_times(self, strategies):
        fds = self.d.settled_fds()
        for strategy in strategies:
            old = self.d.call("vm.status", {"name": "upd"})["pid"]
            rc, rep, err = self.update("--strategy", strategy)
            self.assertEqual(rc, 0, err)
            for k in ("vm", "strategy", "result", "blackout_ms", "total_ms", "old_pid", "new_pid",
                      "old_vmm", "new_vmm", "bytes_transferred"):
                self.assertIn(k, rep)
            self.assertEqual(rep["result"], "ok")
            self.assertEqual(rep["strategy"], strategy)
            self.assertEqual(rep["old_pid"], old)
            self.assertNotEqual(rep["new_pid"], old)
            self.assertFalse(pid_alive(old), "old VMM still running")
            self.assertGreater(rep["blackout_ms"], 0)
            self.assertLess(rep["blackout_ms"], rep["total_ms"])
            # Only device state moved: far less than the 256 MiB of RAM.
            self.assertLess(rep["bytes_transferred"], 16 << 20)
            self.assert_guest_ok_in(rep["new_pid"])
        self.d.wait_fds(fds)
        # The monitor socket path still reaches the current VMM.
        self.assertTrue(os.path.exists(os.path.join(self.d.dir, "vms", "upd", "qmp.sock")))

    def test_2_history_newest_first(self):
        hist = self.d.call("vm.history", {"name": "upd"})["updates"]
        self.assertGreaterEqual(len(hist), 3)
        times = [h["time_usec"] for h in hist]
        self.assertEqual(times, sorted(times, reverse=True))
        human = self.d.cprctl("history", "upd", check=True).stdout
        self.assertRegex(human, r"(?m)^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \S+\s+.* ago\s+handover\s+ok")
        self.assertRegex(human, r"(?m)^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \S+\s+.* ago\s+cpr-transfer\s+ok")
        self.assertIn("update vm=upd strategy=handover result=ok", self.d.read_log())

    def test_2_history_of_a_long_lived_vm_still_shows_the_newest(self):
        # A history beyond what cprd reads at once (4 MiB): the oldest
        # entries are the ones to drop, never the newest.
        path = os.path.join(self.d.dir, "vms", "upd", "history.jsonl")
        with open(path) as f:
            recent = f.read()
        newest = self.d.call("vm.history", {"name": "upd"})["updates"][0]
        old = json.dumps({"vm": "upd", "strategy": "handover", "result": "ok",
                          "time_usec": 1, "padding": "x" * 400}) + "\n"
        with open(path, "w") as f:
            f.write(old * (5 * 1024 * 1024 // len(old)) + recent)
        hist = self.d.call("vm.history", {"name": "upd"})["updates"]
        self.assertEqual(hist[0], newest)
        self.assertEqual([h["time_usec"] for h in hist[:recent.count("\n")]],
                         sorted((json.loads(l)["time_usec"] for l in recent.splitlines()),
                                reverse=True))

    def rollback_case(self, vmm, fragment, timeout=None, paused=False, strategy="handover"):
        old = self.d.call("vm.status", {"name": "upd"})["pid"]
        fds = self.d.settled_fds()
        args = ["--vmm", vmm, "--strategy", strategy] + \
            (["--timeout", str(timeout)] if timeout else [])
        rc, rep, err = self.update(*args)
        self.assertEqual(rc, 1)
        self.assertEqual(rep["result"], "rolled-back", rep)
        self.assertIn(fragment, rep["error"])
        if paused:
            self.assertGreater(rep["blackout_ms"], 0, "the guest was paused and resumed")
        if rep.get("new_pid"):
            # Reaped, not merely dead: a zombie is still cprd's child.
            wait_until(lambda: rep["new_pid"] not in children(self.d.pid), 5,
                       "the new VMM to be gone")
        self.assert_guest_ok_in(old)
        self.d.wait_fds(fds)
        names = [f["name"] for f in self.d.call("vm.fds", {"name": "upd"})["fds"]]
        self.assertIn("ram0", names)
        return rep

    def test_3_rollback_new_binary_missing(self):
        self.rollback_case("/nonexistent/qemu", "No such file or directory")

    def test_3_rollback_new_binary_not_executable(self):
        path = os.path.join(self.d.dir, "noexec")
        with open(path, "w") as f:
            f.write("not a program\n")
        self.rollback_case(path, "Permission denied")

    def test_3_rollback_new_binary_fails_to_execute(self):
        # Executable, so the checks before the launch pass: the exec itself
        # fails, in the launcher, and its answer rolls the update back.
        path = wrapper(self.d.dir, "noprogram", "")
        with open(path, "w") as f:
            f.write("not a program either\n")
        rep = self.rollback_case(path, f"cannot start the new VMM '{path}': Exec format error")
        self.assertIsNone(rep["new_pid"])

    def test_3_rollback_new_vmm_exits_at_start(self):
        self.rollback_case(wrapper(self.d.dir, "dies", "echo dying on purpose >&2; exit 3"),
                           "exited with status 3")

    def test_3_rollback_monitor_never_appears(self):
        self.rollback_case(wrapper(self.d.dir, "silent", "exec sleep 600"),
                           "timed out while starting the new VMM", timeout=2)

    def test_3_rollback_load_fails_on_mismatched_command_line(self):
        # The new VMM lacks the serial port the old one has: loading the
        # device state fails after the guest was paused; the old VMM resumes.
        # (An extra device on the new side would load fine.)
        vmm = wrapper(self.d.dir, "mismatch", "skip=\n"
                      'for a; do shift; if [ -n "$skip" ]; then skip=; continue; fi\n'
                      '  if [ "$a" = -serial ]; then skip=1; continue; fi\n'
                      '  set -- "$@" "$a"\ndone\n'
                      f'exec {QEMU} "$@"')
        rep = self.rollback_case(vmm, "Unknown savevm section", paused=True)
        self.assertIn("the new VMM could not load the state", rep["error"])

    def test_3_rollback_timeout_mid_way(self):
        # The new VMM takes the state but never says its migration
        # completed (its MIGRATION events are off), so it is never told to
        # run: the update times out after the guest paused, and the old VMM
        # takes over.
        vmm = wrapper(self.d.dir, "frozen", f'exec {QEMU} "$@" -global migration.x-events=off')
        self.rollback_case(vmm, "timed out while moving device state", timeout=3, paused=True)

    def test_3_rollback_new_vmm_refuses_on_its_monitor(self):
        # The rollback starts inside a reply on the new VMM's own monitor,
        # which cprd must then end and free while that reply is on the stack.
        # A copy is the VMM binary itself: a confined VMM's root holds its
        # binary, not the source tree a wrapper would point into.
        fake = os.path.join(self.d.dir, "refusing_vmm.py")
        shutil.copy(os.path.join(os.path.dirname(os.path.abspath(__file__)), "refusing_vmm.py"),
                    fake)
        os.chmod(fake, 0o755)
        self.rollback_case(fake,
                           "refused the incoming migration: this VMM refuses incoming migrations")
        self.assertIsNone(self.d.proc.poll(), "cprd died")

    def test_3_cpr_rollback_new_vmm_exits_at_start(self):
        self.rollback_case(wrapper(self.d.dir, "dies2", "exit 4"), "exited with status 4",
                           strategy="cpr-transfer")

    def test_3_cpr_rollback_destination_never_listens(self):
        self.rollback_case(wrapper(self.d.dir, "silent2", "exec sleep 600"),
                           "timed out while starting the new VMM", timeout=2,
                           strategy="cpr-transfer")

    def test_3_cpr_rollback_load_fails(self):
        vmm = wrapper(self.d.dir, "mismatch2", "skip=\n"
                      'for a; do shift; if [ -n "$skip" ]; then skip=; continue; fi\n'
                      '  if [ "$a" = -serial ]; then skip=1; continue; fi\n'
                      '  set -- "$@" "$a"\ndone\n'
                      f'exec {QEMU} "$@"')
        self.rollback_case(vmm, "Unknown savevm section", strategy="cpr-transfer")

    def test_4_other_methods_answer_during_an_update(self):
        vmm = wrapper(self.d.dir, "slow", f'sleep 2; exec {QEMU} "$@"')
        out = {}

        def run():
            out["rc"], out["rep"], _ = self.update("--vmm", vmm)

        t = threading.Thread(target=run)
        t.start()
        try:
            wait_until(lambda: self.d.call("vm.status", {"name": "upd"})["updating"], 5,
                       "the update to start")
            # Answered while the update is still in flight (the new VMM
            # sleeps 2 s before it even execs QEMU): proof without a clock
            # that nothing on the loop waits for the update.
            st = self.d.call("vm.status", {"name": "upd"})
            self.assertEqual((st["state"], st["updating"]), ("running", True))
            vms = {v["name"]: v for v in self.d.call("vm.list")["vms"]}
            self.assertTrue(vms["upd"]["updating"])
            with self.assertRaises(RpcError) as cm:
                self.d.call("vm.update", {"name": "upd"})
            self.assertEqual(cm.exception.code, -32003)
            self.assertIn("already being updated", cm.exception.message)
            with self.assertRaises(RpcError) as cm:
                self.d.call("vm.destroy", {"name": "upd"})
            self.assertEqual(cm.exception.code, -32003)
        finally:
            t.join(60)
        self.assertEqual(out["rc"], 0, out)
        self.assert_guest_ok_in(out["rep"]["new_pid"])

    def test_6_cprd_stopped_past_the_deadline(self):
        # cprd is SIGSTOPped for longer than the update's timeout at several
        # points of the update while the VMMs go on; after SIGCONT the
        # update completes or rolls back, never both VMMs gone, never the
        # old one resumed after the new one ran: the guest's single boot,
        # unbroken heartbeat and in-RAM data say so.
        import signal
        import time
        phases = []
        for strategy in ("handover", "cpr-transfer"):
            for delay in (0.05, 0.15, 0.3):
                old = self.d.call("vm.status", {"name": "upd"})["pid"]
                out = {}
                t = threading.Thread(target=lambda: out.update(
                    zip(("rc", "rep", "err"), self.update("--strategy", strategy,
                                                          "--timeout", "1"))))
                t.start()
                time.sleep(delay)
                self.d.proc.send_signal(signal.SIGSTOP)
                time.sleep(2.5)
                self.d.proc.send_signal(signal.SIGCONT)
                t.join(30)
                rep = out["rep"]
                phases.append((strategy, delay, rep["result"], rep.get("phase")))
                self.assertIn(rep["result"], ("ok", "rolled-back"), rep)
                self.assertIsNone(self.d.proc.poll(), "cprd died")
                # The VMM that lost is SIGKILLed and reaped from cprd's loop.
                loser = old if rep["result"] == "ok" else rep.get("new_pid")
                if loser:
                    wait_until(lambda: loser not in children(self.d.pid), 10,
                               f"VMM {loser} to be reaped")
                self.assert_guest_ok_in(rep["new_pid"] if rep["result"] == "ok" else old)
        print(f"\n    cprd stopped during: {phases}")

    def test_5_bad_requests(self):
        for params, code, frag in (
                ({"name": "nope"}, -32000, "no VM named"),
                ({"name": "upd", "strategy": "teleport"}, -32602, "unknown strategy"),
                ({"name": "upd", "timeout": 0}, -32602, "timeout"),
        ):
            with self.assertRaises(RpcError) as cm:
                self.d.call("vm.update", params)
            self.assertEqual(cm.exception.code, code)
            self.assertIn(frag, cm.exception.message)


class Fleet(GuestTest):
    def test_update_all_in_parallel(self):
        names = ["f1", "f2", "f3"]
        cons = {}
        for n in names:
            cons[n] = Console(self.d.create_guest(n, memory="128M")["console_log"])
        for c in cons.values():
            c.wait_beats(2)
        p = self.d.cprctl("update", "--all", "--parallel", "2")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertRegex(p.stdout, r"updating 3 running VM\(s\), 2 at a time")
        self.assertEqual(len([l for l in p.stdout.splitlines() if l.startswith("[")]), 3)
        self.assertRegex(p.stdout, r"3 updated, 0 failed, 0 skipped; blackout p50 [\d.]+ ms, max [\d.]+ ms")
        js = json.loads(self.d.cprctl("update", "--all", "--json").stdout)
        self.assertEqual(js["summary"]["count"], 3)
        self.assertEqual(js["summary"]["failures"], 0)
        for n in names:
            self.assertEqual(len(self.d.call("vm.history", {"name": n})["updates"]), 2)
            cons[n].wait_beats(2)
            cons[n].assert_healthy(self)


class LeftoverCapabilities(GuestTest):
    """A VMM can carry migration capabilities that a handover does not use
    (here from its command line); left on in the old VMM, they change the
    protocol under a new VMM that lacks them."""

    def test_handover_turns_off_capabilities_it_does_not_use(self):
        # switchover-ack on the source alone would wait for an ack that the
        # new VMM never sends, until the update times out.
        vmm = wrapper(self.d.dir, "acking", f'exec {QEMU} "$@" -global migration.x-return-path=on'
                      " -global migration.x-switchover-ack=on")
        con = Console(self.d.create_guest("caps", memory="128M", vmm=vmm)["console_log"])
        con.wait_beats(2)
        p = self.d.cprctl("update", "caps", "--json", "--vmm", QEMU, "--timeout", "20")
        rep = json.loads(p.stdout)
        self.assertEqual(rep["result"], "ok", rep)
        self.assertEqual(p.returncode, 0)
        con.wait_beats(2)
        con.assert_healthy(self)


class StuckVmm(GuestTest):
    """A new VMM that SIGKILL cannot end at once (here: frozen by the cgroup
    v1 freezer, as a task in uninterruptible sleep would be) must not stall
    the daemon when a rollback ends it."""

    FREEZER = "/sys/fs/cgroup/freezer"

    def setUp(self):
        if not os.path.exists(os.path.join(self.FREEZER, "cgroup.procs")):
            self.skipTest(f"no cgroup v1 freezer at {self.FREEZER} on this host")
        super().setUp()
        self.cg = os.path.join(self.FREEZER, os.path.basename(self.d.dir))
        os.mkdir(self.cg)
        with open(os.path.join(self.cg, "freezer.state"), "w") as f:
            f.write("FROZEN")

    def tearDown(self):
        try:
            with open(os.path.join(self.cg, "freezer.state"), "w") as f:
                f.write("THAWED")
            wait_until(lambda: not open(os.path.join(self.cg, "cgroup.procs")).read().strip(),
                       10, "the frozen VMM to go once thawed")
            os.rmdir(self.cg)
        finally:
            super().tearDown()

    def test_rollback_does_not_hang_on_a_vmm_that_cannot_die(self):
        con = Console(self.d.create_guest("stuck", memory="128M")["console_log"])
        con.wait_beats(2)
        old = self.d.call("vm.status", {"name": "stuck"})["pid"]
        # The wrapper joins the frozen cgroup and is frozen on the spot.
        vmm = wrapper(self.d.dir, "freezes",
                      f"echo $$ > {self.cg}/cgroup.procs\nexec sleep 600")
        p = self.d.cprctl("update", "stuck", "--json", "--vmm", vmm, "--timeout", "2",
                          timeout=30)
        rep = json.loads(p.stdout)
        self.assertEqual(rep["result"], "rolled-back", rep)
        self.assertIn("timed out", rep["error"])
        self.assertLess(rep["total_ms"], 10000)
        self.assertEqual(self.d.call("vm.status", {"name": "stuck"})["pid"], old)
        self.assertEqual(self.d.call("daemon.status")["pid"], self.d.pid)
        con.wait_beats(2)
        con.assert_healthy(self)
        # Once it can die, it is reaped, not left a zombie under cprd.
        frozen = rep["new_pid"]
        with open(os.path.join(self.cg, "freezer.state"), "w") as f:
            f.write("THAWED")
        wait_until(lambda: frozen not in children(self.d.pid), 10, "the killed VMM to be reaped")


if __name__ == "__main__":
    unittest.main()
