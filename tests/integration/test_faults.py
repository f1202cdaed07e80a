"""The fault matrix of live update: for each strategy, each phase of an
update and each fault, the outcome cprd promises, then the same checks after
every case: cprd alive and answering, its fds and children back to where
they were, no zombie, the guest in exactly one VMM (or the VM crashed with
its memory still held), no VMM ever resumed from stale state, and the update
in history with the right result.

Both VMMs are stand-ins (standin_vmm.py): they speak QMP and move their
"device state" over the real channels, and their heartbeat counter lives in
the guest RAM memfd cprd holds, so a VMM that resumes after another one ran
the guest says STALE. A phase is reached deterministically by a `hang` at
one of the stand-in's steps; the test waits for that step's mark, injects
the fault, then releases the hang (SIGUSR2) so the update goes on.

Handover.* and CprTransfer.* are one test per fault, whose phases run at
once as subtests, each with a cprd of its own. The two faults that stop
cprd itself (CprdStopped.*) stop one cprd once, with one VM per phase held
there, so that a 5 s stop is not paid twelve times. RealQemu.* runs key
faults against real QEMU and the real guest."""

import ctypes
import glob
import json
import mmap
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
import traceback
import unittest
import zlib

from cprdtest import (Console, Daemon, QEMU, RpcError, children, fd_targets, hold_relays,
                      kill_vmms_under, require_guest, require_root, wait_until, wrapper)

HERE = os.path.dirname(os.path.abspath(__file__))
STANDIN = os.path.join(HERE, "standin_vmm.py")
MEMORY = 32 << 20

HB_RE = re.compile(r"^STANDIN hb pid=(\d+) seq=(\d+) data=(\w+)$", re.M)
STALE_RE = re.compile(r"^STANDIN STALE .*$", re.M)
STOP_RE = re.compile(r"^STANDIN stop pid=(\d+)", re.M)

STRATEGIES = {"handover": "Handover", "cpr-transfer": "CprTransfer"}

# Each phase: where the update is held (which VMM hangs at which step) and
# the step whose mark says the phase is reached (the hold's, unless given).
PHASES = {
    "starting": ("the new VMM is starting",
                 {"handover": ("new", "at-start"), "cpr-transfer": ("new", "at-start")}, None),
    # cpr-transfer prepares the old VMM before the new one exists.
    "preparing": ("capabilities and channels are being set up",
                  {"handover": ("new", "on:getfd"),
                   "cpr-transfer": ("old", "on:migrate-set-parameters")}, None),
    "migrating": ("the migration runs, the guest not yet paused",
                  {"handover": ("old", "before-stop"), "cpr-transfer": ("old", "before-stop")},
                  None),
    "paused": ("the guest is paused, its device state not yet sent",
               {"handover": ("old", "after-stop"), "cpr-transfer": ("old", "after-stop")}, None),
    "loaded": ("the new VMM has loaded the state and does not run the guest yet",
               {"handover": ("new", "after-load"), "cpr-transfer": ("new", "after-load")}, None),
    # The guest runs in the new VMM. Ending the old one is held where cprd
    # asks it for its byte count, if it does.
    "switched": ("the guest runs in the new VMM and the old one is being ended",
                 {"handover": ("old", "on:query-migrate"),
                  "cpr-transfer": ("old", "on:query-migrate")}, ("new", "after-resume")),
}

FAULTS = {
    "old_killed": "SIGKILL to the old VMM",
    "new_killed": "SIGKILL to the new VMM",
    "old_monitor_closed": "the old VMM closes its monitor and stays alive",
    "new_monitor_closed": "the new VMM closes its monitor and stays alive",
    "new_stopped": "SIGSTOP to the new VMM",
    "cprd_killed": "SIGKILL to cprd, then a restart",
    "client_gone": "the client that asked for the update disconnects",
    # CprdStopped, on one cprd for all phases:
    "cprd_stopped_5s": "SIGSTOP to cprd for 5 s, within the update's timeout",
    "cprd_stopped_past_timeout": "SIGSTOP to cprd until past the update's timeout",
}

# Update timeouts (s): long enough for a held update to reach its phase with
# a dozen VMMs starting on two cores (under ASan too), short enough to
# wait for.
TIMEOUT = {"new_stopped": 5, "cprd_stopped_5s": 10, "cprd_stopped_past_timeout": 6}
DEFAULT_TIMEOUT = 6


def expected(phase, fault, completed=None, finished=False):
    """The outcomes, (history result, where the guest is: old, new or
    crashed), that issue 8's table allows."""
    moved = phase == "switched"  # the guest already runs in the new VMM
    if fault == "old_killed":
        # In the new VMM if it already runs there, else crashed. Once the
        # new VMM holds all of the state, running the guest there is as good.
        return ({("ok", "new")} if moved else
                {("failed", "crashed"), ("ok", "new")} if phase == "loaded" else
                {("failed", "crashed")})
    if fault == "new_killed":
        # Rollback; but once the guest ran in the new VMM the old one holds
        # stale state, so the VM is crashed (the update may have ended ok).
        return {("failed", "crashed"), ("ok", "crashed")} if moved else {("rolled-back", "old")}
    if fault in ("old_monitor_closed", "new_monitor_closed"):
        return {("ok", "new")} if moved else {("ok", "new"), ("rolled-back", "old")}
    if fault == "new_stopped":
        return {("ok", "new")} if moved else {("rolled-back", "old")}
    if fault == "cprd_killed":
        if finished:
            return {("ok", "new")}
        return ({("interrupted", "new")} if moved else
                {("interrupted", "old")} if phase in ("starting", "preparing") else
                {("interrupted", "old"), ("interrupted", "new")})
    if fault == "old_exits":  # by itself, before the migration
        return {("failed", "crashed")}
    if fault == "cprd_stopped_past_timeout":
        return {("ok", "new")} if completed else {("rolled-back", "old")}
    return {("ok", "new")}  # client_gone, cprd_stopped_5s: nothing failed


def setUpModule():
    # A killed cprd leaves its VMMs to the nearest subreaper. Be that, and
    # reap them: this machine's PID 1 may not.
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


CPRDS = set()  # every cprd a test started: its Popen reaps it, to learn how it ended


def reap_our_zombies():
    """Reap the VMMs a killed cprd left to us (never a cprd)."""
    for pid, (_, state) in children(os.getpid()).items():
        if state == "Z" and pid not in CPRDS:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


def held_fds(pid):
    """What cprd holds, less a registry being rewritten at that moment."""
    return [t for t in fd_targets(pid) if not t.endswith("/.registry.json.tmp")]


def settled_fds(pid):
    """cprd's fds once connections the test just closed are gone."""
    last = None
    for _ in range(50):
        now = held_fds(pid)
        if now == last:
            return now
        last = now
        time.sleep(0.1)
    return last


def kill(pid, sig):
    """Signal a process that may have just died."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def catches(pid, sig):
    """Whether the process has a handler for sig (SigCgt in its status)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except OSError:
        pass
    return False


def proc_state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0]
    except OSError:
        return None


def standins(path_prefix):
    """Live stand-in VMMs (stopped ones too) holding a file under the path."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                if b"standin_vmm.py" not in f.read():
                    continue
            links = [os.readlink(f"/proc/{d}/fd/{fd}") for fd in os.listdir(f"/proc/{d}/fd")]
        except OSError:
            continue
        if proc_state(d) not in (None, "Z") and any(l.startswith(path_prefix) for l in links):
            out.append(int(d))
    return sorted(out)


def report_result(reply):
    if "result" in reply:
        return reply["result"]
    return (reply.get("error") or {}).get("data") or {}


def cprd_how(d):
    died = d.proc.poll()
    return ("alive" if died is None else f"killed by signal {signal.Signals(-died).name}"
            if died < 0 else f"exited with status {died}")


def log_tail(d, n=25, vm=None):
    """The end of cprd's log; with vm, of what it says about that VM."""
    try:
        lines = d.read_log().splitlines()
    except OSError:
        return "(no log)"
    if vm:
        lines = [l for l in lines if f"VM {vm}:" in l or f"vm={vm} " in l]
    return "\n".join(lines[-n:])


def explain(d, fn):
    """Run fn; a failure also says how cprd is and how its log ends."""
    try:
        fn()
    except (AssertionError, OSError, EOFError, RpcError) as e:
        msg = str(e) if isinstance(e, AssertionError) else f"{type(e).__name__}: {e}"
        if isinstance(e, (OSError, EOFError)):  # a cprd that just crashed may still be dying
            try:
                d.proc.wait(2)
            except subprocess.TimeoutExpired:
                pass
        raise AssertionError(f"{msg}\n  cprd {cprd_how(d)}; its log ends:\n{log_tail(d)}") \
            from None


class Case:
    """One VM on stand-ins and one update of it, held in a phase until the
    fault is in."""

    def __init__(self, tc, d, strategy, phase, fault, vm, faults=None):
        """faults: {role: STANDIN_FAULT} instead of the phase's hold."""
        self.tc, self.d, self.strategy, self.phase, self.fault, self.vm = \
            tc, d, strategy, phase, fault, vm
        _, holds, mark = PHASES[phase]
        self.hold = holds[strategy]
        self.mark = mark or self.hold
        self.faults = faults
        self.timeout = TIMEOUT.get(fault, DEFAULT_TIMEOUT)
        self.marks = os.path.join(d.dir, f"marks-{vm}")
        os.mkdir(self.marks)
        self.out = {}
        self.stopped = None
        self.finished_before_kill = False
        self.completed = None

    # ---- set-up ----

    def vmm(self, role):
        fault = f"{self.hold[1]}:hang" if self.hold[0] == role else ""
        if self.faults is not None:
            fault = self.faults.get(role, "")
        return wrapper(self.d.dir, f"{role}-vmm-{self.vm}",
                       f"STANDIN_MARK={self.marks} STANDIN_FAULT={fault} "
                       f'exec python3 {STANDIN} "$@"')

    def create(self):
        self.new_vmm = self.vmm("new")
        st = self.d.call("vm.create", {"name": self.vm, "memory": str(MEMORY),
                                       "kernel": STANDIN, "vmm": self.vmm("old")})
        self.old, self.con_path = st["pid"], st["console_log"]
        self.vmdir = os.path.dirname(self.con_path)

    def start(self):
        """Ask for the update on a connection of its own (the client that may
        go) and read the reply in the background."""
        self.con_at_start = len(self.console())
        self.conn = self.d.conn(timeout=self.timeout + 60)
        self.t0, self.t0_real = time.monotonic(), time.time()
        req = self.conn.request("vm.update", {"name": self.vm, "vmm": self.new_vmm,
                                              "strategy": self.strategy,
                                              "timeout": self.timeout})

        def wait_reply():
            try:
                while True:
                    msg = self.conn.recv_line()
                    if msg.get("id") == req:
                        self.out["reply"] = msg
                        return
            except Exception as e:  # closed under it, or cprd gone
                self.out["exc"] = e

        self.reader = threading.Thread(target=wait_reply, daemon=True)
        self.reader.start()

    def wait_phase(self):
        role, step = self.mark
        wait_until(lambda: self.reached(role, step) or "reply" in self.out, 10,
                   f"{self.vm}: the update to reach '{self.phase}' ({role} VMM at {step})")
        self.tc.assertNotIn("reply", self.out, f"{self.vm}: the update ended before it reached "
                            f"'{self.phase}': {self.out.get('reply')}")
        if self.mark != self.hold:  # cprd sends the held command, if it sends it
            end = time.monotonic() + 1
            while not self.reached(*self.hold) and time.monotonic() < end:
                time.sleep(0.01)

    # ---- what the stand-ins say ----

    def mark_pids(self, step):
        return {int(os.path.basename(p).split("-", 1)[0])
                for p in glob.glob(os.path.join(self.marks, f"*-{step}"))}

    def reached(self, role, step):
        pids = self.mark_pids(step)
        return pids & {self.old} if role == "old" else pids - {self.old}

    def new_pid(self):
        pids = self.mark_pids("at-start") - {self.old}
        return max(pids) if pids else None

    def vmms(self):
        return standins(self.vmdir + "/")

    def release(self, skip=()):
        # Only stand-ins that catch SIGUSR2: one cprd has just started (to
        # restore the guest, say) may not have its handler yet, and would
        # die of it. A hold is always in a stand-in that has one.
        for pid in self.vmms():
            if pid not in skip and proc_state(pid) != "T" and catches(pid, signal.SIGUSR2):
                kill(pid, signal.SIGUSR2)

    def close_monitor(self, pid):
        # After the switch cprd SIGKILLs the old VMM at once: it may be gone
        # before it can close anything, which leaves nothing to test.
        kill(pid, signal.SIGUSR1)
        wait_until(lambda: self.mark_pids("monitor-closed") & {pid} or
                   self.mark_pids("monitor-close-pending") & {pid} or
                   proc_state(pid) in (None, "Z"), 5,
                   f"VMM pid {pid} to close its monitor")

    def console(self):
        with open(self.con_path, errors="replace") as f:
            return f.read()

    def beats(self, text=None):
        return [(int(p), int(s), d) for p, s, d in HB_RE.findall(text or self.console())]

    def wait_beats(self, pid, n, timeout=10):
        start = len(self.beats())
        wait_until(lambda: len([b for b in self.beats()[start:] if b[0] == pid]) >= n, timeout,
                   f"{self.vm}: {n} heartbeats from VMM pid {pid}")

    def history_has_it(self):
        """Whether this update is in the history file (read directly: for
        when cprd cannot be asked)."""
        try:
            with open(os.path.join(self.vmdir, "history.jsonl")) as f:
                return any(json.loads(l).get("time_usec", 0) >= int(self.t0_real * 1e6) - 2e6
                           for l in f if l.strip())
        except OSError:
            return False

    # ---- faults on the VMMs and the client ----

    def inject(self):
        f, new = self.fault, self.new_pid()
        if f.startswith("new_") and new is None:
            self.release()
            self.tc.skipTest(f"no new VMM exists yet when {self.strategy} is {self.phase}")
        if f == "old_killed":
            os.kill(self.old, signal.SIGKILL)  # nothing released: cprd must end the update
        elif f == "new_killed":
            os.kill(new, signal.SIGKILL)
            self.release()
        elif f in ("old_monitor_closed", "new_monitor_closed"):
            self.close_monitor(self.old if f.startswith("old") else new)
            self.release()
        elif f == "new_stopped":
            os.kill(new, signal.SIGSTOP)
            self.stopped = new
            self.release(skip=(new,))
        elif f == "client_gone":
            # shutdown() first: a close() alone leaves the socket to the
            # reader thread blocked on it, and cprd would see no one go.
            self.conn.sock.shutdown(socket.SHUT_RDWR)
            self.conn.sock.close()
            self.release()
        else:
            raise AssertionError(f"{f} is not a fault of one VM")

    # ---- the end ----

    def wait_end(self):
        wait_until(lambda: not self.status()["updating"], self.timeout + 15,
                   f"{self.vm}: the update to end")
        self.ended = time.monotonic() - self.t0
        if "exc" not in self.out:
            self.reader.join(10)
        self.conn.close()

    def status(self):
        return self.d.call("vm.status", {"name": self.vm}, timeout=10)

    def check(self):
        """The outcome and every invariant of one VM; a failure lists every
        one that does not hold. Returns the VM's VMM pid (None if crashed)."""
        tc, d, problems = self.tc, self.d, []

        def expect(ok, msg):
            if not ok:
                problems.append(msg)
            return ok

        tc.assertIsNone(d.proc.poll(), "cprd died")
        tc.assertEqual(d.call("daemon.status", timeout=10)["pid"], d.pid)
        st = self.status()
        new = self.new_pid()
        where = ("crashed" if st["state"] == "crashed" else "old" if st["pid"] == self.old
                 else "new" if new and st["pid"] == new else f"pid {st['pid']}")

        # History: this update, with the right result.
        hist = d.call("vm.history", {"name": self.vm}, timeout=10)["updates"]
        tc.assertTrue(hist and hist[0].get("time_usec", 0) >= int(self.t0_real * 1e6) - 2e6,
                      f"the update is not in history: {hist[:1]}")
        rep = hist[0]
        allowed = expected(self.phase, self.fault, self.completed, self.finished_before_kill)
        expect((rep["result"], where) in allowed,
               f"result {rep['result']!r} with the guest {where} (VM {st['state']}), allowed "
               f"{sorted(allowed)}; error: {rep.get('error')}")
        reports = [rep]
        if "reply" in self.out:
            reports.append(report_result(self.out["reply"]))
            expect(reports[1].get("result") == rep["result"],
                   f"the reply says {reports[1].get('result')!r}, history {rep['result']!r}")
        if rep["result"] == "interrupted" and where in ("old", "new"):
            expect(re.search(rf"\b{where} (VMM|one)\b", rep.get("error", "")),
                   f"the history entry does not say the {where} VMM kept the guest")
        for who, other in (("old", "new"), ("new", "old")):
            if self.fault == f"{who}_killed":
                expect(f"{other} VMM killed" not in (rep.get("error") or ""),
                       f"the error blames the {other} VMM for the {who} one's death")
        if self.fault.endswith("monitor_closed"):
            expect(self.ended < self.timeout + 3,
                   f"the update took {self.ended:.1f} s, past its {self.timeout} s timeout")
        if STOP_RE.findall(self.console()[self.con_at_start:]):
            for r in reports:
                expect(r.get("blackout_ms") != 0,
                       f"blackout reported as 0 ms though the guest paused: {r}")

        # Exactly one VMM for the VM (none if it crashed), no stale resume,
        # the guest's memory intact. A VMM the update ended was sent SIGKILL
        # before the update said it ended; its exit takes the kernel a
        # moment more, and cprd reaps it from its loop: give it 2 s.
        # A new VMM whose start the update abandoned is killed once the
        # launcher answers for it, a moment after the update ended.
        keep = {st["pid"]} if st["state"] == "running" else set()
        wait_until(lambda: d.call("daemon.status", timeout=10)["vmm_starts_in_flight"] == 0, 5,
                   "cprd to hear of every VMM start it asked for")
        end = time.monotonic() + 2
        while set(self.vmms()) - keep and time.monotonic() < end:
            time.sleep(0.05)
        alive = self.vmms()
        if where == "crashed":
            expect(alive == [], f"VMM(s) {alive} outlived a crashed VM")
            expect(st["fds_held"] >= 2, f"fds_held is {st['fds_held']}")
            fds = {f["name"]: f for f in d.call("vm.fds", {"name": self.vm}, timeout=10)["fds"]}
            expect(fds.get("ram0", {}).get("size") == MEMORY, "the guest memory is not held")
        elif expect(st["state"] == "running", f"the VM is {st['state']}"):
            expect(alive == [st["pid"]],
                   f"VMMs {alive} alive, the guest must be in exactly one ({st['pid']})")
            kill(st["pid"], signal.SIGCONT)  # a new VMM stopped after the switch
            try:
                self.wait_beats(st["pid"], 2)
            except AssertionError as e:
                problems.append(str(e))
        if self.stopped and self.stopped != st["pid"]:
            try:
                wait_until(lambda: not os.path.exists(f"/proc/{self.stopped}"), 5,
                           f"the stopped VMM pid {self.stopped} to be ended and reaped")
            except AssertionError as e:
                problems.append(str(e))
        text = self.console()
        stale = STALE_RE.findall(text)
        expect(not stale, f"a VMM resumed the guest from stale state: {stale}")
        beats = self.beats(text)
        seqs = [s for _, s, _ in beats]
        expect(seqs == list(range(1, len(beats) + 1)),
               "the heartbeat sequence has a gap or a repeat: " +
               ", ".join(f"{a}->{b}" for a, b in zip(seqs, seqs[1:]) if b != a + 1)[:200])
        expect(all(ok == "ok" for _, _, ok in beats), "guest memory check failed")
        if where not in ("crashed",) and st["state"] == "running":
            expect({p for p, _, _ in beats[-2:]} == {st["pid"]}, "another VMM is still beating")
        try:
            self.check_memory(beats[-1][1], exact=where == "crashed")
        except AssertionError as e:
            problems.append(str(e))
        if problems:
            tc.fail("; ".join(problems))
        return None if where == "crashed" else st["pid"]

    def follow_up(self):
        """After a fault that cost a monitor: the VM is still cprd's to
        manage, so another update (without faults) works. Returns the VMM
        that runs the guest then."""
        plain = wrapper(self.d.dir, f"plain-vmm-{self.vm}",
                        f'STANDIN_MARK={self.marks} exec python3 {STANDIN} "$@"')
        try:
            rep = self.d.call("vm.update", {"name": self.vm, "vmm": plain,
                                            "strategy": self.strategy, "timeout": 10}, timeout=30)
        except RpcError as e:
            self.tc.fail(f"after the monitor closed, the VM can no longer be updated: {e}")
        self.tc.assertEqual(self.vmms(), [rep["new_pid"]])
        self.wait_beats(rep["new_pid"], 2)
        self.tc.assertEqual(STALE_RE.findall(self.console()), [])
        return rep["new_pid"]

    def check_memory(self, last_seq, exact):
        """Guest RAM, read through a copy of the memfd cprd holds: the
        counter where the heartbeats say and the boot pattern intact."""
        c = self.d.conn(10)
        try:
            c.call("fd.claim", {"vm": self.vm, "names": ["ram0"]})
            fd = c.take_fds()[0]
        finally:
            c.close()
        try:
            with mmap.mmap(fd, MEMORY, mmap.MAP_SHARED, mmap.PROT_READ) as m:
                seq = struct.unpack_from("<Q", m, 0)[0]
                self.tc.assertEqual(m[8:16], b"STANDIN1", "guest RAM lost its boot mark")
                self.tc.assertEqual(struct.unpack_from("<I", m, 16)[0],
                                    zlib.crc32(m[4096:4096 + 64 * 1024]), "guest RAM corrupted")
        finally:
            os.close(fd)
        if exact:
            # A stand-in killed between storing a beat's counter and
            # printing its line leaves RAM one ahead of its console.
            self.tc.assertIn(seq, (last_seq, last_seq + 1),
                             "guest RAM and the last heartbeat disagree")
        else:
            self.tc.assertGreaterEqual(seq, last_seq)


# The stand-ins and qmp_hold.py run from the source tree and leave marks in
# the test's directory: neither is inside a confined VMM's root, so these
# cprds run their VMMs unconfined (test_confine.py covers confinement).
UNCONFINED = ["--no-confine"]


class Harness:
    """A cprd of its own, its baselines, and a clean-up whatever was done to
    it."""

    def __init__(self):
        self.d = Daemon(UNCONFINED).start()
        CPRDS.add(self.d.pid)
        self.fds0 = settled_fds(self.d.pid)
        self.restarted = False

    def restart_cprd(self):
        self.d.proc.wait()
        if os.path.exists(self.d.sock):
            os.unlink(self.d.sock)
        self.d.start()
        CPRDS.add(self.d.pid)
        self.restarted = True

    def close(self):
        d = self.d
        for pid in standins(d.dir + "/"):
            kill(pid, signal.SIGCONT)
        if d.proc.poll() is None:
            os.kill(d.pid, signal.SIGCONT)
            d.destroy_all()
            d.proc.send_signal(signal.SIGTERM)
            try:
                d.proc.wait(10)
            except Exception:
                d.proc.kill()
                d.proc.wait()
        for pid in standins(d.dir + "/"):
            kill(pid, signal.SIGKILL)
        kill_vmms_under(d.dir)
        time.sleep(0.05)
        reap_our_zombies()
        if os.environ.get("CPRD_TEST_KEEP"):
            print(f"\n  state directory kept: {d.dir}")
        else:
            shutil.rmtree(d.dir, ignore_errors=True)
            shutil.rmtree(d.kept, ignore_errors=True)  # what destroyed VMs left

    def check_daemon(self, tc, cases, vmm_pids, fds1):
        """cprd's children, zombies and fds back to where they were, with the
        VMs still there and once they are destroyed."""
        d = self.d
        # (A restarted cprd is not the parent of the VMMs it took back.)
        want = set() if self.restarted else {p for p in vmm_pids if p}

        def kids_settled():
            kids = children(d.pid)
            return (not [p for p, (_, s) in kids.items() if s == "Z"] and
                    [c for c, _ in kids.values()].count("cprd-launcher") == 1 and
                    {p for p, (c, _) in kids.items() if c != "cprd-launcher"} == want)
        try:
            wait_until(kids_settled, 5, "cprd's children to settle")
        except AssertionError:
            tc.fail(f"cprd's children are {children(d.pid)}, not the launcher and {want}")
        if not self.restarted and all(vmm_pids):
            self.assert_fds(tc, fds1, "with the VMs running")
        for c in cases:
            d.call("vm.destroy", {"name": c.vm})
        self.assert_fds(tc, self.fds0, "with no VM" +
                        (" (a restarted cprd against a fresh one)" if self.restarted else ""))

    def assert_fds(self, tc, then, when):
        """As many fds as then (sockets are renumbered: a VMM's monitor
        connection is another socket after an update)."""
        try:
            wait_until(lambda: len(held_fds(self.d.pid)) == len(then), 5, "")
        except AssertionError:
            now = held_fds(self.d.pid)
            gone = [t for t in then if t not in now]
            extra = [t for t in now if t not in then]
            tc.fail(f"cprd holds {len(now)} fds {when}, not {len(then)}; lost {gone}, gained "
                    f"{extra}")


def run_case(tc, h, strategy, phase, fault):
    """One case of the matrix on the harness's cprd."""
    d = h.d
    c = Case(tc, d, strategy, phase, fault, "fx")
    c.create()
    c.wait_beats(c.old, 2)
    fds1 = settled_fds(d.pid)
    c.start()
    c.wait_phase()
    if fault == "cprd_killed":
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        c.finished_before_kill = c.history_has_it()
        c.release()
        time.sleep(0.5)  # the VMMs carry on without cprd
        h.restart_cprd()
    else:
        c.inject()
    c.wait_end()
    pid = c.check()
    if fault.endswith("monitor_closed") and pid:
        pid = c.follow_up()
    h.check_daemon(tc, [c], [pid], fds1)


class Matrix(unittest.TestCase):
    """One test per fault; its phases run at once, each with a cprd of its
    own, and report as subtests. Subclasses set the strategy."""

    strategy = None

    def setUp(self):
        require_root(self)

    def run_fault(self, fault):
        results = {}

        def one(phase):
            h = None
            try:
                h = Harness()
                explain(h.d, lambda: run_case(self, h, self.strategy, phase, fault))
                results[phase] = ("pass", None)
            except unittest.SkipTest as e:
                results[phase] = ("skip", str(e))
            except AssertionError as e:
                results[phase] = ("fail", str(e))
            except Exception:
                results[phase] = ("fail", traceback.format_exc())
            finally:
                if h:
                    h.close()

        threads = [threading.Thread(target=one, args=(p,)) for p in PHASES]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for phase in PHASES:
            with self.subTest(phase=phase):
                kind, why = results[phase]
                if kind == "skip":
                    self.skipTest(why)
                if kind == "fail":
                    self.fail(f"{self.strategy}, {phase}, {fault}: {why}")


def _matrix_test(fault):
    def test(self):
        self.run_fault(fault)
    return test


for _strategy, _cls in STRATEGIES.items():
    _ns = {"strategy": _strategy, "__doc__": f"The fault matrix, strategy {_strategy}."}
    for _fault, _fdoc in FAULTS.items():
        if _fault.startswith("cprd_stopped"):
            continue  # CprdStopped
        _t = _matrix_test(_fault)
        _t.__name__ = f"test_{_fault}"
        _t.__doc__ = f"{_strategy}, every phase: {_fdoc}"
        _ns[_t.__name__] = _t
    globals()[_cls] = type(_cls, (Matrix,), _ns)


# What the old VMM is asked while an update prepares, per strategy.
PREPARE_COMMANDS = {
    "handover": ["query-migrate-capabilities", "migrate-set-capabilities",
                 "migrate-set-parameters", "getfd"],
    "cpr-transfer": ["migrate-set-capabilities", "migrate-set-parameters"],
}


class OldVmmExits(unittest.TestCase):
    """The old VMM exits by itself (exit 1) as each command that prepares it
    arrives, the new one being started or prepared meanwhile: the VM is
    crashed with its memory held, the update failed, and cprd goes on (it
    used to crash with SIGSEGV here)."""

    def setUp(self):
        require_root(self)

    def exits(self, strategy):
        results = {}

        def one(cmd):
            h = None
            try:
                h = Harness()

                def case():
                    c = Case(self, h.d, strategy, "preparing", "old_exits", "fx",
                             faults={"old": f"on:{cmd}:exit"})
                    c.create()
                    c.wait_beats(c.old, 2)
                    fds1 = settled_fds(h.d.pid)
                    c.start()
                    c.wait_end()
                    h.check_daemon(self, [c], [c.check()], fds1)
                explain(h.d, case)
                results[cmd] = None
            except AssertionError as e:
                results[cmd] = str(e)
            except Exception:
                results[cmd] = traceback.format_exc()
            finally:
                if h:
                    h.close()

        threads = [threading.Thread(target=one, args=(c,)) for c in PREPARE_COMMANDS[strategy]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for cmd in PREPARE_COMMANDS[strategy]:
            with self.subTest(on=cmd):
                if results[cmd]:
                    self.fail(f"{strategy}, old VMM exits on {cmd}: {results[cmd]}")

    def test_handover(self):
        self.exits("handover")

    def test_cpr_transfer(self):
        self.exits("cpr-transfer")


class CprdStopped(unittest.TestCase):
    """cprd SIGSTOPped mid-update, one VM per phase on one cprd. After
    SIGCONT every update completes if its source completed, else rolls
    back; never both VMMs dead, never the stale one resumed."""

    def setUp(self):
        require_root(self)
        self.h = Harness()

    def tearDown(self):
        self.h.close()

    def stop_cprd(self, strategy, fault):
        # explain() covers the set-up; each phase's outcome is a subtest.
        explain(self.h.d, lambda: self._stop_cprd(strategy, fault))

    def _stop_cprd(self, strategy, fault):
        d = self.h.d
        cases = [Case(self, d, strategy, p, fault, f"p{i}") for i, p in enumerate(PHASES, 1)]
        for c in cases:
            c.create()
        for c in cases:
            c.wait_beats(c.old, 2)
        fds1 = settled_fds(d.pid)
        for c in cases:
            c.start()
        for c in cases:
            c.wait_phase()
        os.kill(d.pid, signal.SIGSTOP)
        try:
            for c in cases:
                c.release()
            if fault == "cprd_stopped_5s":
                time.sleep(5)
            else:  # past every update's deadline
                time.sleep(max(c.t0 + c.timeout for c in cases) + 1.5 - time.monotonic())
            for c in cases:
                c.completed = bool(c.mark_pids("after-complete") & {c.old})
        finally:
            os.kill(d.pid, signal.SIGCONT)
        pids, failures = [], []  # a subtest's failure does not stop the others
        for c in cases:
            with self.subTest(strategy=strategy, phase=c.phase, fault=fault):
                try:
                    c.wait_end()
                    pids.append(c.check())
                except (AssertionError, OSError, EOFError, RpcError) as e:
                    failures.append(c.phase)
                    msg = str(e) if isinstance(e, AssertionError) else \
                        f"{type(e).__name__}: {e}"
                    raise AssertionError(f"{msg}\n  cprd {cprd_how(d)}; what its log says "
                                         f"of VM {c.vm}:\n{log_tail(d, 12, c.vm)}") from None
        if not failures:
            self.h.check_daemon(self, cases, pids, fds1)

    def test_handover_stopped_5s(self):
        self.stop_cprd("handover", "cprd_stopped_5s")

    def test_handover_stopped_past_timeout(self):
        self.stop_cprd("handover", "cprd_stopped_past_timeout")

    def test_cpr_transfer_stopped_5s(self):
        self.stop_cprd("cpr-transfer", "cprd_stopped_5s")

    def test_cpr_transfer_stopped_past_timeout(self):
        self.stop_cprd("cpr-transfer", "cprd_stopped_past_timeout")


class RealQemu(unittest.TestCase):
    """Key faults against real QEMU and the real guest, one guest for all.
    The new QEMU runs behind qmp_hold.py, which keeps everything it says
    from cprd after a given command, so the fault lands once the device
    state has really moved: with cprd none the wiser. (Faults while the new
    QEMU starts are test_restart.Crash's and test_update's.)"""

    HOLD = os.path.join(HERE, "qmp_hold.py")
    unsound = False
    n = 0

    @classmethod
    def setUpClass(cls):
        require_root(cls)
        require_guest()
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)
        cls.d = Daemon(UNCONFINED).start()
        cls.vm = cls.d.create_guest("rq", memory="128M")
        cls.con = Console(cls.vm["console_log"])
        cls.con.wait_beats(2)

    @classmethod
    def tearDownClass(cls):
        if cls.d.proc.poll() is None:
            os.kill(cls.d.pid, signal.SIGCONT)
        cls.d.stop()
        for pid in cls.relays(cls.d.dir):
            kill(pid, signal.SIGKILL)
        reap_our_zombies()

    relays = staticmethod(hold_relays)

    def qemus(self):
        """Live QEMU processes of this VM, by their command line."""
        out = []
        for p in os.listdir("/proc"):
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if cmd.startswith(QEMU.encode()) and b"guest=rq\0" in cmd and \
                    proc_state(p) not in (None, "Z"):
                out.append(int(p))
        return sorted(out)

    def held_update(self, strategy, after):
        """Start an update whose new QEMU is heard until it has answered
        `after`, and wait until it has loaded the state. Returns the old
        pid, the new pid, whether the new QEMU ran the guest, the reply box
        and the connection."""
        if self.unsound:  # an earlier test resumed a QEMU from stale state
            self.fresh_guest()
        self.__class__.n += 1
        self.marks = os.path.join(self.d.dir, f"marks-{self.n}")
        os.mkdir(self.marks)
        vmm = wrapper(self.d.dir, f"held-{strategy}",
                      f"QMP_HOLD_AFTER={after} QMP_HOLD_MARK={self.marks} "
                      f'exec python3 {self.HOLD} {QEMU} "$@"')
        old = self.d.call("vm.status", {"name": "rq"})["pid"]
        self.hist0 = len(self.d.call("vm.history", {"name": "rq"})["updates"])
        conn = self.d.conn(120)
        out = {}
        req = conn.request("vm.update", {"name": "rq", "vmm": vmm, "strategy": strategy,
                                         "timeout": 60})

        def wait_reply():
            try:
                while True:
                    msg = conn.recv_line()
                    if msg.get("id") == req:
                        out["reply"] = msg
                        return
            except Exception as e:
                out["exc"] = e
        threading.Thread(target=wait_reply, daemon=True).start()

        def loaded():
            for p in glob.glob(os.path.join(self.marks, "*-*")):
                pid, st = os.path.basename(p).split("-", 1)
                if st in ("paused", "running", "postmigrate"):
                    return int(pid)
            return "reply" in out
        new = wait_until(loaded, 60, "the new QEMU to load the guest's state")
        self.assertNotIn("reply", out, f"the update ended first: {out.get('reply')}")
        time.sleep(0.3)  # a QEMU that resumes by itself has done so by now
        ran = os.path.exists(os.path.join(self.marks, f"{new}-running"))
        return old, new, ran, out, conn

    def history0(self):
        hist = self.d.call("vm.history", {"name": "rq"})["updates"]
        self.assertEqual(len(hist), self.hist0 + 1, "the update is not in history")
        return hist[0]

    def fresh_guest(self):
        self.d.call("vm.destroy", {"name": "rq"})
        self.__class__.vm = self.d.create_guest("rq", memory="128M")
        self.__class__.con = Console(self.vm["console_log"])
        self.__class__.unsound = False
        self.con.wait_beats(2)

    def new_killed(self, strategy, after):
        old, new, ran, out, conn = self.held_update(strategy, after)
        # Whatever becomes of it, a guest that ran in the new QEMU is not
        # one to go on with.
        self.__class__.unsound = ran
        explain(self.d, lambda: self._new_killed(old, new, ran, conn))

    def _new_killed(self, old, new, ran, conn):
        os.kill(new, signal.SIGKILL)
        wait_until(lambda: not self.d.call("vm.status", {"name": "rq"})["updating"], 70,
                   "the update to end")
        conn.close()
        rep, st = self.history0(), self.d.call("vm.status", {"name": "rq"})
        self.assertIsNone(self.d.proc.poll(), "cprd died")
        if ran:
            # The guest ran in the new QEMU: the old one's state is stale
            # and must not be resumed.
            self.assertEqual(st["state"], "crashed",
                             f"the old QEMU was resumed after the guest ran in the new one "
                             f"(result {rep['result']}: {rep.get('error')})")
            self.assertEqual(self.qemus(), [])
            self.assertIn("ram0", [f["name"] for f in
                                   self.d.call("vm.fds", {"name": "rq"})["fds"]])
            return
        self.assertEqual((rep["result"], st["state"], st["pid"]), ("rolled-back", "running", old),
                         rep.get("error"))
        self.assertGreater(rep["blackout_ms"], 0, "the guest was paused")
        self.assertEqual(self.qemus(), [old], "the guest must be in exactly one QEMU")
        wait_until(lambda: new not in children(self.d.pid), 5, "the killed QEMU to be reaped")
        self.con.wait_beats(2)
        self.con.assert_healthy(self)

    def test_2_handover_new_killed_after_load(self):
        self.new_killed("handover", "migrate-incoming")

    def test_3_cpr_transfer_new_killed_after_load(self):
        self.new_killed("cpr-transfer", "qmp_capabilities")

    def test_1_handover_cprd_killed_after_load(self):
        old, new, ran, out, conn = self.held_update("handover", "migrate-incoming")
        explain(self.d, lambda: self._cprd_killed(old, new, ran, conn))

    def _cprd_killed(self, old, new, ran, conn):
        d = self.d
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        conn.close()
        for pid in self.relays(d.dir):
            kill(pid, signal.SIGUSR2)
        os.unlink(d.sock)
        d.start()
        st = d.call("vm.status", {"name": "rq"})
        rep = self.history0()
        self.assertEqual(rep["result"], "interrupted")
        self.assertEqual(self.qemus(), [st["pid"]], "the guest must be in exactly one QEMU")
        if ran:  # it ran there: it must stay there
            self.assertEqual(st["pid"], new, rep.get("error"))
        self.assertIn(f"{'new' if st['pid'] == new else 'old'} VMM", rep["error"])
        self.assertEqual(st["state"], "running")
        self.con.wait_beats(3)
        self.con.assert_healthy(self)
