"""The fault matrix of live update, strategy cpr-exec: the VM's one VMM
process is killed, stopped or loses its monitor at each step of the update
(the old image before its exec, the new image after it), cprd is killed
and restarted mid-way, or the client goes; after each, the same checks as
test_faults.py: cprd alive and answering, its children, zombies and fds back
to where they were, the guest in exactly one VMM (or the VM crashed with
its memory still held), no VMM resumed from stale state, the heartbeat
continuous, and the update in history with a result that makes sense.

Both images are stand-ins (standin_vmm.py). The old one is started from
one wrapper, the new one is the wrapper the update names; each wrapper
sets its own STANDIN_FAULT (possibly empty: what the old image had must not
leak through the exec) and its own mark directory, so that marks tell the
images apart though they share a pid. A VMM that restores the guest after
the new image failed is a fresh one of the old binary: old wrapper, another
pid. A step is reached by a `hang` there; the test waits for its mark,
injects the fault, then releases the hang (SIGUSR2).

Steps (where the update is held):
  preparing  old image, on:migrate-set-parameters: not told to migrate yet,
             the guest runs
  paused     old image, after-stop: guest paused, no state written yet
  written    old image, after-state-written: the state file is complete,
             MIGRATION completed not yet said
  completed  old image, before-exec: MIGRATION completed said (postmigrate),
             the exec next
  execed     new image, at-start: the exec is done, nothing loaded, its
             monitor not yet served
  loaded     new image, after-load: the state is in, MIGRATION completed not
             yet said
  cont       new image, after-cont: told to run, the guest not yet running
  resumed    new image, after-resume (a mark, not a hold): the guest runs
             in the new image and the update has ended

Expected outcomes, (history result, where the guest ends): `old` is the old
image in the original process, `new` the new image in that same process,
`restored` a fresh VMM of the old binary that loaded the state file,
`crashed` no VMM at all with the guest's memory still held by cprd.

  step       vmm_killed            vmm_stopped            monitor_closed
  preparing  failed/crashed        failed/old,            rolled-back/old
                                   rolled-back/old
  paused     failed/crashed        failed/old             rolled-back/old,
                                                          rolled-back/restored,
                                                          ok/new
  written    rolled-back/restored  failed/old             as paused
  completed  rolled-back/restored  rolled-back/restored   ok/new,
                                                          rolled-back/restored
  execed     rolled-back/restored  rolled-back/restored   ok/new,
                                                          rolled-back/restored
  loaded     rolled-back/restored  rolled-back/restored   ok/new,
                                                          rolled-back/restored
  cont       rolled-back/restored  rolled-back/restored   ok/new
  resumed    ok/crashed            ok/new                 ok/new

Why: before the migrate the guest never paused, so the old image goes on;
killed, the guest went with it. After the guest paused and before the state
file exists, nothing else can run the guest: killed, the VM is crashed.
Once the file exists, a VMM of the old binary tries to load it (killed at
`written` the file happens to be whole, so that works; a partial one would
fail to load and leave the VM crashed). Once the old image said completed,
whatever the process does wrong until the new image's RESUME, cprd ends the
process and restores the guest from the file;
the old image in postmigrate is never resumed, since it execs next whatever
it is told. A VMM stopped (SIGSTOP) while the old image still saves is left
be: cprd cannot end the migration in it, gives up after the deadline
(`failed`) with the guest paused there, and once the operator continues it
the old image takes the cancel cprd sent and runs the guest again (the test
sends SIGCONT, and releases the hold, and checks exactly that). A monitor
that closes is not a failure by itself: the update may still complete, or
roll back cleanly. After RESUME the update has succeeded: a VMM killed then
is the VM crashed, and the history still says ok.

client_gone (the client that asked disconnects) at any step: ok/new.
cprd_killed (SIGKILL, the holds released, a restart) at any step: the entry
is `interrupted`, and the guest runs in exactly one VMM: the old image if
cprd died before the migrate, else whichever one the restarted cprd found
able to run it (old, new or restored), or the VM crashed where none could;
the entry must name the image that kept the guest, and the VM's binary must
be that image's; after `resumed` the entry is the update's own, ok/new.
Restore.test_restore_faults: the new image is killed once loaded, and the
VMM of the old binary that cprd starts to restore the guest is held at
at-start, after-load (from the file, on migrate-incoming) or after-cont, and
killed, stopped, or loses its monitor there: every one is failed/crashed
(no VMM is left that could load the state; a stopped one is ended at the
rollback deadline; one whose monitor closed is ended at once, since it may
run the guest unseen), with the guest's memory held and its last heartbeat
in it.

Recovery (recover.c) does not know of in-place updates yet: a cprd restarted
after the exec takes the new image for the old VMM, so those cases fail on
the binary and the entry's wording (the guest itself runs on correctly).
"""

import ctypes
import glob
import os
import re
import signal
import socket
import threading
import time
import traceback
import unittest

from cprdtest import RpcError, require_root, wait_until, wrapper
from test_faults import (HB_RE, MEMORY, STALE_RE, STANDIN, STOP_RE, Case, Harness, explain,
                         kill, proc_state, report_result, settled_fds)

STEPS = {
    "preparing": ("old", "on:migrate-set-parameters", True),
    "paused": ("old", "after-stop", True),
    "written": ("old", "after-state-written", True),
    "completed": ("old", "before-exec", True),
    "execed": ("new", "at-start", True),
    "loaded": ("new", "after-load", True),
    "cont": ("new", "after-cont", True),
    "resumed": ("new", "after-resume", False),
}
BEFORE_EXEC = ("preparing", "paused", "written", "completed")
ANSWERED = ("loaded", "cont", "resumed")  # the new image has answered on the monitor

FAULTS = {
    "vmm_killed": "SIGKILL to the VM's VMM process, whichever image it runs",
    "vmm_stopped": "SIGSTOP to the VM's VMM process (a short update timeout)",
    "monitor_closed": "the VMM process's image closes its monitor and stays alive",
    "cprd_killed": "SIGKILL to cprd, then a restart",
    "client_gone": "the client that asked for the update disconnects",
}

TIMEOUT = {"vmm_stopped": 5}
DEFAULT_TIMEOUT = 10


def expected(step, fault, finished=False):
    """(history result, where the guest is) allowed: the module's table."""
    restore = {("rolled-back", "restored")}
    if fault == "client_gone":
        return {("ok", "new")}
    if fault == "cprd_killed":
        if finished:
            return {("ok", "new")}
        if step == "resumed":
            # The new image answered cont, but cprd was killed before it
            # read the answer and recorded the end (a busy host): the
            # restarted cprd finds the guest running in the new image.
            return {("interrupted", "new")}
        if step == "preparing":
            return {("interrupted", "old")}
        return {("interrupted", w) for w in ("old", "new", "restored", "crashed")}
    if step == "resumed":
        return {("ok", "crashed")} if fault == "vmm_killed" else {("ok", "new")}
    if fault == "vmm_killed":
        return ({("failed", "crashed")} if step in ("preparing", "paused") else restore)
    if fault == "vmm_stopped":
        return ({("rolled-back", "old"), ("failed", "old")} if step == "preparing" else
                {("failed", "old")} if step in ("paused", "written") else restore)
    if fault == "monitor_closed":
        if step == "preparing":
            return {("rolled-back", "old")}
        if step in ("paused", "written"):
            return {("rolled-back", "old"), ("ok", "new")} | restore
        if step == "cont":
            return {("ok", "new")}
        return {("ok", "new")} | restore
    raise AssertionError(f"no expectation for {fault}")


def setUpModule():
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def image_of(pid, marks_old, marks_new):
    """Which wrapper's image a stand-in process runs: its STANDIN_MARK."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        return None
    for role, d in (("old", marks_old), ("new", marks_new)):
        if f"STANDIN_MARK={d}".encode() in env:
            return role
    return "?"


class CxCase(Case):
    """One VM on stand-ins, one cpr-exec update of it, held at a step."""

    def __init__(self, tc, d, step, fault, vm):
        self.tc, self.d, self.strategy, self.phase, self.fault, self.vm = \
            tc, d, "cpr-exec", step, fault, vm
        role, where, hang = STEPS[step]
        self.hold = self.mark = (role, where)
        self.hang = hang
        self.timeout = TIMEOUT.get(fault, DEFAULT_TIMEOUT)
        self.marks_old = os.path.join(d.dir, f"marks-old-{vm}")
        self.marks_new = os.path.join(d.dir, f"marks-new-{vm}")
        os.mkdir(self.marks_old)
        os.mkdir(self.marks_new)
        self.marks = self.marks_old  # Case.close_monitor's monitor-closed marks
        self.out = {}
        self.stopped = None
        self.finished_before_kill = False
        self.completed = None
        self.allowed = None

    def vmm(self, role):
        fault = f"{self.hold[1]}:hang" if self.hold[0] == role and self.hang else ""
        marks = self.marks_old if role == "old" else self.marks_new
        # The old image's hold is the VM's first VMM's only: one cprd
        # later starts from the same wrapper to restore the guest must not
        # stop there too (in the follow-up update nobody releases it).
        # (The new wrapper's first process is cprd's probe of the binary.)
        arm = f'F="{fault}"'
        if role == "old":
            arm = f'F=; mkdir {os.path.join(self.d.dir, "old-held")} 2>/dev/null && ' + arm
        # Both set explicitly: the old image's environment survives the exec.
        return wrapper(self.d.dir, f"{role}-vmm-{self.vm}",
                       f'{arm}\nSTANDIN_MARK={marks} STANDIN_FAULT="$F" '
                       f'exec python3 {STANDIN} "$@"')

    def create(self):
        self.new_vmm = self.vmm("new")
        self.old_vmm = self.vmm("old")
        st = self.d.call("vm.create", {"name": self.vm, "memory": str(MEMORY),
                                       "kernel": STANDIN, "vmm": self.old_vmm,
                                       "cpr_exec": True})
        self.old, self.con_path = st["pid"], st["console_log"]
        self.vmdir = os.path.dirname(self.con_path)

    def mark_pids(self, step, role=None):
        dirs = {"old": [self.marks_old], "new": [self.marks_new],
                None: [self.marks_old, self.marks_new]}[role]
        return {int(os.path.basename(p).split("-", 1)[0])
                for d in dirs for p in glob.glob(os.path.join(d, f"*-{step}"))}

    def reached(self, role, step):
        return self.mark_pids(step, role) & {self.old}

    def new_pid(self):
        return self.old  # in place: the same process

    def wait_phase(self):
        role, step = self.mark
        wait_until(lambda: self.reached(role, step) or "reply" in self.out, 20,
                   f"{self.vm}: the update to reach '{self.phase}' ({role} image at {step})")
        if self.hang:
            self.tc.assertNotIn("reply", self.out, f"{self.vm}: the update ended before it "
                                f"reached '{self.phase}': {self.out.get('reply')}")

    def inject(self):
        f, pid = self.fault, self.old
        if f == "vmm_killed":
            kill(pid, signal.SIGKILL)
            self.release()
            # After the update ended, cprd hears of the death on its own time.
            wait_until(lambda: self.status()["updating"] or self.status()["pid"] != pid or
                       self.status()["state"] != "running", 10,
                       f"cprd to hear that VMM pid {pid} died")
        elif f == "vmm_stopped":
            os.kill(pid, signal.SIGSTOP)
            self.stopped = pid
            self.release(skip=(pid,))
        elif f == "monitor_closed":
            self.close_monitor(pid)
            self.release()
        elif f == "client_gone":
            self.conn.sock.shutdown(socket.SHUT_RDWR)
            self.conn.sock.close()
            self.release()
        else:
            raise AssertionError(f"{f} is not a fault of one VM")

    def close_monitor(self, pid):
        kill(pid, signal.SIGUSR1)
        wait_until(lambda: self.mark_pids("monitor-closed") & {pid} or
                   self.mark_pids("monitor-close-pending") & {pid} or
                   proc_state(pid) in (None, "Z"), 5,
                   f"VMM pid {pid} to close its monitor")

    def where(self, st):
        if st["state"] == "crashed":
            return "crashed"
        pid = st["pid"]
        img = image_of(pid, self.marks_old, self.marks_new)
        if pid == self.old:
            return {"old": "old", "new": "new"}.get(img, f"pid {pid} image {img}")
        if img == "old" and self.mark_pids("at-start", "old") & {pid}:
            return "restored"
        return f"pid {pid} image {img}"

    def check(self):
        tc, d, problems = self.tc, self.d, []

        def expect(ok, msg):
            if not ok:
                problems.append(msg)
            return ok

        tc.assertIsNone(d.proc.poll(), "cprd died")
        tc.assertEqual(d.call("daemon.status", timeout=10)["pid"], d.pid)
        st = self.status()
        where = self.where(st)

        hist = d.call("vm.history", {"name": self.vm}, timeout=10)["updates"]
        tc.assertTrue(hist and hist[0].get("time_usec", 0) >= int(self.t0_real * 1e6) - 2e6,
                      f"the update is not in history: {hist[:1]}")
        rep = hist[0]
        allowed = self.allowed or expected(self.phase, self.fault, self.finished_before_kill)
        expect((rep["result"], where) in allowed,
               f"result {rep['result']!r} with the guest {where} (VM {st['state']}, pid "
               f"{st.get('pid')}), allowed {sorted(allowed)}; error: {rep.get('error')}")
        if rep["result"] == "interrupted" and where in ("old", "new"):
            # Both images are the same pid: the entry must name the right one.
            said = re.search(r"\b(old|new) VMM\b", rep.get("error") or "")
            expect(said and said.group(1) == where,
                   f"the history entry says the {said and said.group(1)} VMM kept the guest, "
                   f"which runs in the {where} image")
        if self.fault == "vmm_killed":
            # The error blames the image that was killed (at `completed` cprd
            # cannot tell: the old image said completed and execs next).
            wrong = ("new VMM" if self.phase in BEFORE_EXEC[:-1] else
                     "old VMM" if self.phase in ANSWERED else None)
            expect(not wrong or wrong not in (rep.get("error") or ""),
                   f"the error blames the {wrong} for a death at '{self.phase}'")
        reports = [rep]
        if "reply" in self.out:
            reports.append(report_result(self.out["reply"]))
            expect(reports[1].get("result") == rep["result"],
                   f"the reply says {reports[1].get('result')!r}, history {rep['result']!r}")
        # What the report says of the VMMs agrees with what runs.
        if rep["result"] == "ok" and where != "crashed":
            expect(rep.get("new_pid") == self.old,
                   f"ok in place, but new_pid {rep.get('new_pid')} is not {self.old}")
            expect(st["vmm"] == self.new_vmm, f"the VM's binary is {st['vmm']}")
        if where == "restored":
            expect(rep.get("restored_pid") == st["pid"],
                   f"restored_pid {rep.get('restored_pid')}, the guest runs in {st['pid']}")
        if where in ("old", "restored"):
            expect(st["vmm"] == self.old_vmm, f"the VM's binary is {st['vmm']}, the guest "
                   f"runs in the old one's image")
        if where == "new":
            expect(st["vmm"] == self.new_vmm, f"the VM's binary is {st['vmm']}, the guest "
                   f"runs in the new one's image")
        if STOP_RE.findall(self.console()[self.con_at_start:]):
            for r in reports:
                expect(r.get("blackout_ms") != 0,
                       f"blackout reported as 0 ms though the guest paused: {r}")

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
            kill(st["pid"], signal.SIGCONT)  # a VMM stopped after the update ended
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
        beats = [(int(p), int(s), ok) for p, s, ok in HB_RE.findall(text)]
        seqs = [s for _, s, _ in beats]
        expect(seqs == list(range(1, len(beats) + 1)),
               "the heartbeat sequence has a gap or a repeat: " +
               ", ".join(f"{a}->{b}" for a, b in zip(seqs, seqs[1:]) if b != a + 1)[:200])
        expect(all(ok == "ok" for _, _, ok in beats), "guest memory check failed")
        if where == "new":
            expect(self.mark_pids("after-resume", "new") & {self.old},
                   "the new image never said it runs the guest")
        if where != "crashed" and st["state"] == "running":
            expect({p for p, _, _ in beats[-2:]} == {st["pid"]}, "another VMM is still beating")
        try:
            self.check_memory(beats[-1][1], exact=where == "crashed")
        except AssertionError as e:
            problems.append(str(e))
        self.outcome = (rep["result"], where, rep.get("error") or "")
        if problems:
            tc.fail("; ".join(problems))
        return None if where == "crashed" else st["pid"]

    def follow_up(self):
        """After a monitor was lost the VM is still cprd's: another cpr-exec
        update (no faults) works. Returns the VMM pid then."""
        plain = wrapper(self.d.dir, f"plain-vmm-{self.vm}",
                        f'STANDIN_MARK={self.marks_new} STANDIN_FAULT= '
                        f'exec python3 {STANDIN} "$@"')
        pid = self.status()["pid"]
        try:
            rep = self.d.call("vm.update", {"name": self.vm, "vmm": plain,
                                            "strategy": "cpr-exec", "timeout": 20}, timeout=60)
        except RpcError as e:
            self.tc.fail(f"after the monitor closed, the VM can no longer be updated: {e}")
        self.tc.assertEqual((rep["result"], rep["new_pid"]), ("ok", pid), rep)
        self.tc.assertEqual(self.vmms(), [pid])
        self.wait_beats(pid, 2)
        self.tc.assertEqual(STALE_RE.findall(self.console()), [])
        return pid


def run_case(tc, h, step, fault):
    d = h.d
    c = CxCase(tc, d, step, fault, "cx")
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
    if fault == "vmm_stopped" and proc_state(c.old) == "T":
        # cprd gave up on it and left it be: the operator wakes it, and it
        # goes on with what cprd had asked of it before it gave up.
        kill(c.old, signal.SIGCONT)
        try:  # the cancel cprd queued is what resumes the guest
            wait_until(lambda: c.status()["state"] != "paused", 3, "")
        except AssertionError:
            pass
        kill(c.old, signal.SIGUSR2)  # and whatever hold it was in ends
        wait_until(lambda: c.status()["state"] != "paused", 10,
                   "the VM to leave 'paused' once its VMM is continued")
    pid = c.check()
    if fault == "monitor_closed" and pid:
        pid = c.follow_up()
    h.check_daemon(tc, [c], [pid], fds1)
    return c


RESTORE_STEPS = {"restore_starting": "at-start", "restore_loaded": "after-load",
                 "restore_cont": "after-cont"}
RESTORE_FAULTS = ("vmm_killed", "vmm_stopped", "monitor_closed")


class RestoreCase(CxCase):
    """The new image is killed once it has loaded the state; the VMM that
    cprd starts from the old binary to restore the guest is then held at
    a step of its own and the fault hits it. The old wrapper is rewritten
    after the VM's start, so only the restoring VMM has the hold."""

    def __init__(self, tc, d, rstep, rfault, vm):
        super().__init__(tc, d, "loaded", "vmm_killed", vm)
        self.rstep, self.rfault = rstep, rfault
        self.timeout = DEFAULT_TIMEOUT
        # Nothing of the guest is left but RAM and the state file, and the
        # one VMM that could load it failed: the VM is crashed, its memory
        # held. (Its monitor lost, cprd does not wait to learn whether it
        # ran the guest: it ends it.)
        self.allowed = {("failed", "crashed")}

    def create(self):
        super().create()
        wrapper(self.d.dir, f"old-vmm-{self.vm}",
                f"STANDIN_MARK={self.marks_old} STANDIN_FAULT={RESTORE_STEPS[self.rstep]}:hang "
                f'exec python3 {STANDIN} "$@"')

    def restorer(self):
        pids = self.mark_pids(RESTORE_STEPS[self.rstep], "old") - {self.old}
        return max(pids) if pids else None

    def inject(self):
        # The new image, loaded. Nothing is released here: the VMM cprd
        # starts next would get the SIGUSR2 before its handler exists.
        kill(self.old, signal.SIGKILL)
        pid = wait_until(self.restorer, 20, f"{self.vm}: the restoring VMM to reach "
                         f"{RESTORE_STEPS[self.rstep]}")
        if self.rfault == "vmm_killed":
            kill(pid, signal.SIGKILL)
            self.release()
        elif self.rfault == "vmm_stopped":
            os.kill(pid, signal.SIGSTOP)
            self.stopped = pid
            self.release(skip=(pid,))
        else:
            self.close_monitor(pid)
            self.release()


class Restore(unittest.TestCase):
    """Faults in the VMM that restores the guest after the new image failed:
    each of its steps, each fault, at once, each with a cprd of its own."""

    def setUp(self):
        require_root(self)

    def test_restore_faults(self):
        cases = [(s, f) for s in RESTORE_STEPS for f in RESTORE_FAULTS]
        results = {}

        def one(step, fault):
            h = None
            try:
                h = Harness()

                def case():
                    c = RestoreCase(self, h.d, step, fault, "cx")
                    c.create()
                    c.wait_beats(c.old, 2)
                    fds1 = settled_fds(h.d.pid)
                    c.start()
                    c.wait_phase()
                    c.inject()
                    c.wait_end()
                    h.check_daemon(self, [c], [c.check()], fds1)
                    if os.environ.get("CX_SHOW_OUTCOMES"):
                        print(f"\n  {fault} at {step}: {'/'.join(c.outcome[:2])} "
                              f"{c.outcome[2]}", flush=True)
                explain(h.d, case)
                results[step, fault] = None
            except AssertionError as e:
                results[step, fault] = str(e)
            except Exception:
                results[step, fault] = traceback.format_exc()
            finally:
                if h:
                    h.close()

        threads = [threading.Thread(target=one, args=c) for c in cases]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for step, fault in cases:
            with self.subTest(step=step, fault=fault):
                if results[step, fault]:
                    self.fail(f"cpr-exec, {fault} at {step}: {results[step, fault]}")


class CprExec(unittest.TestCase):
    """One test per fault; its steps run at once, each with a cprd of its
    own, and report as subtests."""

    def setUp(self):
        require_root(self)

    def run_fault(self, fault, steps=STEPS):
        results = {}

        def one(step):
            h = None
            try:
                h = Harness()
                box = []
                explain(h.d, lambda: box.append(run_case(self, h, step, fault)))
                results[step] = ("pass", None)
                if os.environ.get("CX_SHOW_OUTCOMES"):
                    print(f"\n  {fault} at {step}: {'/'.join(box[0].outcome[:2])} "
                          f"{box[0].outcome[2]}", flush=True)
            except unittest.SkipTest as e:
                results[step] = ("skip", str(e))
            except AssertionError as e:
                results[step] = ("fail", str(e))
            except Exception:
                results[step] = ("fail", traceback.format_exc())
            finally:
                if h:
                    h.close()

        threads = [threading.Thread(target=one, args=(s,)) for s in steps]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for step in steps:
            with self.subTest(step=step):
                kind, why = results[step]
                if kind == "skip":
                    self.skipTest(why)
                if kind == "fail":
                    self.fail(f"cpr-exec, {step}, {fault}: {why}")

    def test_no_fault(self):
        """The stand-ins' cpr-exec itself: held nowhere, the update ends ok
        in the same process, the new image running the guest."""
        h = Harness()
        try:
            def case():
                c = CxCase(self, h.d, "resumed", "none", "cx")
                c.create()
                c.wait_beats(c.old, 2)
                fds1 = settled_fds(h.d.pid)
                c.start()
                c.wait_end()
                rep = report_result(c.out["reply"])
                self.assertEqual((rep["result"], rep["new_pid"]), ("ok", c.old), rep)
                self.assertEqual(image_of(c.old, c.marks_old, c.marks_new), "new")
                self.assertTrue(c.mark_pids("after-load", "new") & {c.old})
                self.assertTrue(c.mark_pids("before-exec", "old") & {c.old})
                c.fault = "client_gone"  # expected: ok/new
                h.check_daemon(self, [c], [c.check()], fds1)
            explain(h.d, case)
        finally:
            h.close()


def _fault_test(fault):
    def test(self):
        self.run_fault(fault)
    test.__name__ = f"test_{fault}"
    test.__doc__ = f"cpr-exec, every step: {FAULTS[fault]}"
    return test


for _fault in FAULTS:
    setattr(CprExec, f"test_{_fault}", _fault_test(_fault))
