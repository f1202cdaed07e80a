#!/usr/bin/env python3
"""cprd benchmark: live-update blackout and total time, compared in one run
against QEMU driven directly over QMP.

Methods (each per guest memory size, on one guest per size and method):

  cprd-handover      `cprctl --json update NAME` (strategy handover)
  cprd-cpr-transfer  `cprctl --json update NAME --strategy cpr-transfer`
  qemu-migrate-copy  baseline A: normal migration of private RAM between two
                     QEMUs over a UNIX socket, no cprd
  qemu-cpr-transfer  baseline B: QEMU's cpr-transfer mode on a memfd this
                     script creates and both QEMUs inherit, no cprd
  qemu-startup       reference: a new QEMU with cprd's command line
                     (-incoming defer) from spawn to its monitor answering
                     its first command (the greeting comes earlier, from the
                     monitor's own thread, before the machine is set up)
  cprd-loop          cprd's own time (daemon.stats) for `vm.list` sent every
                     ~10 ms while `cprctl update --all --parallel 4` runs
                     over 4 VMs, against the same while idle; and the event
                     loop's longest turn in each case (smallest size only)

Blackout is always QEMU's own event timestamps: RESUME on the new VMM minus
STOP on the old one. Results: bench/results/results.json (every sample),
bench/results/{blackout,total}.png, and BENCHMARKS.md at the project root.
Nothing is asserted about timings: the verdicts compare numbers taken in
this same run.

    python3 bench/bench.py [--build DIR] [--quick] [--sizes 256M,1G] [--reps N]
"""

import argparse
import datetime
import fcntl
import json
import math
import os
import platform
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
PLOT_GP = os.path.join(HERE, "plot.gp")
BENCH_MD = os.path.join(ROOT, "BENCHMARKS.md")
# bench_checkpoint.py's section of BENCHMARKS.md: kept when this rewrites it.
CKPT_BEGIN = "<!-- bench-checkpoint: begin -->"
CKPT_END = "<!-- bench-checkpoint: end -->"
# bench_versions.py's section, kept likewise.
VERS_BEGIN = "<!-- bench-versions: begin -->"
VERS_END = "<!-- bench-versions: end -->"

GUEST_APPEND = "console=ttyS0 quiet cprd.data_mb=8 cprd.hb_ms=200"
HB_RE = re.compile(r"^CPRD-GUEST hb seq=(\d+) data=(\w+)", re.M)
BOOT_RE = re.compile(r"^CPRD-GUEST boot id=([0-9a-f]+)", re.M)
UNSUPPORTED_RE = re.compile(r"unsupported|not supported|unknown strategy|not implemented|"
                            r"not yet", re.I)

METHODS = ["cprd-handover", "cprd-cpr-transfer", "qemu-migrate-copy", "qemu-cpr-transfer",
           "qemu-startup", "cprd-loop"]
TITLES = {
    "cprd-handover": "cprd handover (`cprctl update`)",
    "cprd-cpr-transfer": "cprd cpr-transfer (`cprctl update --strategy cpr-transfer`)",
    "qemu-migrate-copy": "Baseline A: QEMU migration with RAM copied (no cprd)",
    "qemu-cpr-transfer": "Baseline B: QEMU cpr-transfer driven directly (no cprd)",
    "qemu-startup": "Reference: new QEMU start-up (cprd's command line, spawn to its monitor "
                    "answering a command, "
                    "taken while the cprd handover guest of that size runs)",
    "cprd-loop": "cprd's own time while `update --all --parallel 4` runs",
}
LOOP_VMS = 4
LOOP_PERIOD_S = 0.010  # a vm.list every ~10 ms
LOOP_IDLE_S = 5.0
BOOT_TIMEOUT = 180.0
# Before each measured update, every method lets the host settle: the
# previous update's old QEMU is still being torn down by the kernel and the
# new one has just started. The start-up reference is taken in steady state
# too, so totals compare like with like.
SETTLE_S = 0.5


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def mono():
    return time.monotonic()


# ---------------------------------------------------------------- sizes, stats

def parse_size(s):
    m = re.fullmatch(r"(\d+)\s*([KMGT]?)(i?B)?", s.strip(), re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {s!r}")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2).upper()]


def size_label(b):
    for shift, suf in ((40, "T"), (30, "G"), (20, "M")):
        if b >= 1 << shift and b % (1 << shift) == 0:
            return f"{b >> shift}{suf}"
    return str(b)


def pct(vals, p):
    """Nearest-rank percentile; None for no samples."""
    v = sorted(x for x in vals if x is not None)
    if not v:
        return None
    k = max(1, math.ceil(p / 100.0 * len(v)))
    return v[k - 1]


def fmt(x, nd=1):
    return "—" if x is None else f"{x:.{nd}f}"


# ---------------------------------------------------------------- processes we start

class Procs:
    """Every process this script starts (and the VMMs cprd starts for it),
    with its start time so a recycled pid is never killed."""

    def __init__(self):
        self.popens = []
        self.pids = {}  # pid -> starttime
        self.lock = threading.Lock()

    @staticmethod
    def starttime(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return int(f.read().rsplit(")", 1)[1].split()[19])
        except (OSError, IndexError, ValueError):
            return None

    def spawn(self, argv, **kw):
        p = subprocess.Popen(argv, **kw)
        with self.lock:
            self.popens.append(p)
            self.pids[p.pid] = self.starttime(p.pid)
        return p

    def adopt(self, pid):
        """A process someone else (cprd) started on our behalf."""
        if pid:
            st = self.starttime(pid)
            if st is not None:
                with self.lock:
                    self.pids.setdefault(pid, st)

    def adopt_descendants(self, root):
        kids = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                kids.setdefault(ppid, []).append(int(d))
        todo = [root]
        while todo:
            for k in kids.get(todo.pop(), []):
                self.adopt(k)
                todo.append(k)

    def kill(self, p, sig=signal.SIGKILL):
        if isinstance(p, subprocess.Popen):
            if p.poll() is None:
                try:
                    p.send_signal(sig)
                    p.wait(10)
                except (OSError, subprocess.TimeoutExpired):
                    pass

    def kill_all(self):
        with self.lock:
            popens = list(self.popens)
            pids = dict(self.pids)
        for p in popens:
            self.kill(p)
        for pid, st in pids.items():
            if st is not None and self.starttime(pid) == st:
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                            continue
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass


PROCS = Procs()


# ---------------------------------------------------------------- QMP

class QmpError(Exception):
    pass


class QMP:
    """A QMP connection with a reader thread; events keep QEMU's timestamps."""

    def __init__(self, path, name, proc=None, timeout=60.0):
        self.name = name
        self.events = []
        self.q = queue.Queue()
        deadline = mono() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                break
            except OSError as e:
                s.close()
                if proc is not None and proc.poll() is not None:
                    raise QmpError(f"{name}: QEMU exited with status {proc.returncode} "
                                   f"before its monitor came up")
                if mono() > deadline:
                    raise QmpError(f"{name}: no monitor at {path} after {timeout:.0f}s: {e}")
                time.sleep(0.002)
        self.sock = s
        self.f = s.makefile("rb")
        threading.Thread(target=self._reader, daemon=True).start()
        g = self._get(timeout)
        if "QMP" not in g:
            raise QmpError(f"{name}: no greeting: {g}")
        self.greeting_at = g["_rx"]
        self.cmd("qmp_capabilities")
        # QEMU's monitor thread greets as soon as it runs; commands are only
        # executed once the main loop runs, after the machine is set up.
        self.ready_at = mono()

    def _reader(self):
        try:
            for line in self.f:
                now = mono()
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                msg["_rx"] = now
                if "event" in msg:
                    self.events.append(msg)
                else:
                    self.q.put(msg)
        except (OSError, ValueError):
            pass
        self.q.put({"_eof": True, "_rx": mono()})

    def _get(self, timeout):
        try:
            m = self.q.get(timeout=timeout)
        except queue.Empty:
            raise QmpError(f"{self.name}: no answer within {timeout:.0f}s")
        if m.get("_eof"):
            raise QmpError(f"{self.name}: monitor closed")
        return m

    def cmd(self, execute, arguments=None, fds=(), timeout=60.0):
        msg = {"execute": execute}
        if arguments is not None:
            msg["arguments"] = arguments
        data = (json.dumps(msg) + "\n").encode()
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.sendall(data)
        r = self._get(timeout)
        if "error" in r:
            raise QmpError(f"{self.name}: {execute}: {r['error'].get('desc', r['error'])}")
        return r.get("return")

    def send_quit(self):
        try:
            self.sock.sendall(b'{"execute": "quit"}\n')
        except OSError:
            pass

    def wait_event(self, name, start=0, timeout=60.0, pred=None, procs=()):
        """The event, or None after timeout or once one of procs has exited."""
        deadline = mono() + timeout
        while True:
            for e in self.events[start:]:
                if e["event"] == name and (pred is None or pred(e)):
                    return e
            if mono() > deadline or any(p.poll() is not None for p in procs):
                return None
            time.sleep(0.002)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def ev_ts(e):
    t = e["timestamp"]
    return t["seconds"] + t["microseconds"] / 1e6


# ---------------------------------------------------------------- guest console

def console_health(path):
    """One boot, heartbeats 1..N without a gap, every memory check ok."""
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError as e:
        return {"ok": False, "problem": f"console unreadable: {e}"}
    beats = [(int(s), d) for s, d in HB_RE.findall(text)]
    seqs = [s for s, _ in beats]
    boots = len(BOOT_RE.findall(text))
    gaps = [(a, b) for a, b in zip(seqs, seqs[1:]) if b != a + 1]
    if seqs and seqs[0] != 1:
        gaps.insert(0, (0, seqs[0]))
    bad = sum(1 for _, d in beats if d != "ok")
    problems = []
    if boots != 1:
        problems.append(f"{boots} boots")
    if not beats:
        problems.append("no heartbeat")
    if gaps:
        problems.append("heartbeat gap " + ", ".join(f"{a}->{b}" for a, b in gaps[:3]))
    if bad:
        problems.append(f"{bad} failed memory checks")
    return {"ok": not problems, "boots": boots, "heartbeats": len(beats),
            "gaps": gaps[:10], "bad_data": bad, "problem": "; ".join(problems) or None}


def count_beats(path):
    try:
        with open(path, errors="replace") as f:
            return len(HB_RE.findall(f.read()))
    except OSError:
        return 0


def wait_beats(path, n, timeout=BOOT_TIMEOUT, procs=()):
    start = count_beats(path)
    deadline = mono() + timeout
    while count_beats(path) < start + n:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"QEMU {p.pid} exited with status {p.returncode} "
                                   f"while waiting for heartbeats")
        if mono() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {n} heartbeats")
        time.sleep(0.1)


# ---------------------------------------------------------------- results

class Results:
    def __init__(self, args, qemu_version):
        self.data = {
            "meta": {
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "host_cpus": os.cpu_count(),
                "host_mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                                      / (1 << 30), 1),
                "kernel": platform.release(),
                "accel": guest_accel(),
                "qemu_version": qemu_version,
                "guest_append": GUEST_APPEND,
                "sizes": [size_label(s) for s in args.sizes],
                "reps": args.reps,
                "copy_reps_large": args.copy_reps_large,
                "quick": args.quick,
                "finished": False,
            },
            "methods": {m: {} for m in METHODS},
        }

    def cell(self, method, size):
        return self.data["methods"][method].setdefault(
            size_label(size), {"status": "ok", "samples": []})

    def save(self):
        os.makedirs(RESULTS, exist_ok=True)
        tmp = os.path.join(RESULTS, ".results.json.tmp")
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1)
        os.replace(tmp, os.path.join(RESULTS, "results.json"))


def guest_accel():
    """The accelerator `make guest` found able to boot the guest here."""
    import cprdtest
    return cprdtest.guest_accel()


# ---------------------------------------------------------------- cprd methods

def run_cprd(bench, cprd, strategy, size, reps):
    import cprdtest
    method = "cprd-handover" if strategy == "handover" else "cprd-cpr-transfer"
    cell = bench.res.cell(method, size)
    name = f"bench-{strategy}-{size_label(size)}".lower()
    log(f"{method} {size_label(size)}: creating the VM")
    vm = cprd.call("vm.create", {"name": name, "memory": size, "kernel": cprdtest.KERNEL,
                                 "initrd": cprdtest.INITRD, "append": GUEST_APPEND},
                   timeout=BOOT_TIMEOUT)
    PROCS.adopt(vm.get("pid"))
    console = vm["console_log"]
    try:
        wait_beats(console, 3)
        if strategy == "handover" and "qemu-startup" in bench.methods:
            # The start-up reference is taken here, with this guest running,
            # so that it sees the same load as the new QEMU of an update.
            try:
                run_startup(bench, size, reps)
            except Exception as e:  # noqa: BLE001
                record_failure(bench, "qemu-startup", size, e)
        for i in range(reps):
            time.sleep(SETTLE_S)  # each update starts from a steady state
            args = ["--json", "update", name, "--timeout", "300"]
            if strategy != "handover":
                args += ["--strategy", strategy]
            t0 = mono()
            p = cprd.cprctl(*args, timeout=600)
            wall = (mono() - t0) * 1000
            try:
                rep = json.loads(p.stdout) if p.stdout.strip() else {}
            except ValueError:
                rep = {}
            PROCS.adopt(rep.get("new_pid"))
            err = rep.get("error") or p.stderr.strip()
            if p.returncode != 0 or rep.get("result") != "ok":
                if i == 0 and UNSUPPORTED_RE.search(err or ""):
                    cell["status"] = f"n/a ({err.strip()[:160]})"
                    log(f"{method} {size_label(size)}: {cell['status']}")
                    return
                cell["samples"].append({"rep": i, "result": rep.get("result", "error"),
                                        "error": (err or f"exit {p.returncode}")[:400],
                                        "cprctl_wall_ms": wall})
                log(f"{method} {size_label(size)} #{i + 1}: FAILED: {(err or '')[:200]}")
                if not rep:  # nothing ran (cprd unreachable, bad arguments): stop this cell
                    cell["status"] = f"error ({(err or 'no report')[:160]})"
                    return
                continue
            s = {"rep": i, "result": "ok", "blackout_ms": rep.get("blackout_ms"),
                 "total_ms": rep.get("total_ms"), "cprctl_wall_ms": wall,
                 "bytes_transferred": rep.get("bytes_transferred"),
                 "old_pid": rep.get("old_pid"), "new_pid": rep.get("new_pid"),
                 "strategy_reported": rep.get("strategy"), "new_version": rep.get("new_version")}
            cell["samples"].append(s)
            log(f"{method} {size_label(size)} #{i + 1}/{reps}: blackout {fmt(s['blackout_ms'])} ms, "
                f"total {fmt(s['total_ms'])} ms")
        try:
            wait_beats(console, 3, timeout=60)
        except RuntimeError as e:
            cell["health_wait"] = str(e)
        cell["health"] = console_health(console)
        log(f"{method} {size_label(size)}: guest "
            f"{'healthy' if cell['health']['ok'] else 'NOT healthy: ' + cell['health']['problem']}")
    finally:
        try:
            st = cprd.call("vm.status", {"name": name}, timeout=30)
            PROCS.adopt(st.get("pid"))
        except Exception:  # noqa: BLE001 - best effort
            pass
        PROCS.adopt_descendants(cprd.pid)
        try:
            cprd.call("vm.destroy", {"name": name}, timeout=60)
        except Exception as e:  # noqa: BLE001
            log(f"{method} {size_label(size)}: destroy failed: {e}")


# ---------------------------------------------------------------- cprd's own time

class Lister(threading.Thread):
    """Sends vm.list every LOOP_PERIOD_S on one connection until stopped;
    keeps the round trips it saw from the client's side."""

    def __init__(self, cprd):
        super().__init__(daemon=True)
        self.conn = cprd.conn(timeout=30)
        self.stop_ev = threading.Event()
        self.rtt_ms = []
        self.errors = 0

    def run(self):
        nxt = mono()
        while not self.stop_ev.is_set():
            t0 = mono()
            try:
                self.conn.call("vm.list")
                self.rtt_ms.append((mono() - t0) * 1000)
            except Exception:  # noqa: BLE001 - counted, the run goes on
                self.errors += 1
            nxt += LOOP_PERIOD_S
            time.sleep(max(0.0, nxt - mono()))

    def finish(self):
        self.stop_ev.set()
        self.join(30)
        self.conn.close()


def loop_phase(cprd, work):
    """Reset cprd's counters, run work() while a Lister runs, and return
    what cprd counted meanwhile plus the client's round trips."""
    cprd.call("daemon.stats", {"reset": True})
    lister = Lister(cprd)
    lister.start()
    try:
        extra = work()
    finally:
        lister.finish()
    loop = cprd.call("daemon.stats", {"reset": True})["loop"]
    vl = loop.get("methods", {}).get("vm.list", {})
    keys = ("count", "request_p50_us", "request_p99_us", "request_max_us", "request_cpu_p50_us",
            "request_cpu_p99_us", "request_cpu_max_us")
    return {"vm_list": {k: vl.get(k) for k in keys},
            "loop": {k: v for k, v in loop.items() if k != "methods"},
            "methods": loop.get("methods", {}),
            "client_rtt_ms": {"n": len(lister.rtt_ms), "p50": pct(lister.rtt_ms, 50),
                              "p99": pct(lister.rtt_ms, 99), "max": pct(lister.rtt_ms, 100)},
            "client_errors": lister.errors, **(extra or {})}


def run_loop(bench, cprd, size, reps):
    import cprdtest
    cell = bench.res.cell("cprd-loop", size)
    names = [f"bench-loop-{i}" for i in range(LOOP_VMS)]
    consoles = []
    try:
        log(f"cprd-loop {size_label(size)}: creating {LOOP_VMS} VMs")
        for name in names:
            vm = cprd.call("vm.create", {"name": name, "memory": size,
                                         "kernel": cprdtest.KERNEL, "initrd": cprdtest.INITRD,
                                         "append": GUEST_APPEND}, timeout=BOOT_TIMEOUT)
            PROCS.adopt(vm.get("pid"))
            consoles.append(vm["console_log"])
        for c in consoles:
            wait_beats(c, 3)
        time.sleep(SETTLE_S)
        log(f"cprd-loop {size_label(size)}: idle, {LOOP_IDLE_S:.0f} s of vm.list")
        cell["idle"] = loop_phase(cprd, lambda: time.sleep(LOOP_IDLE_S))

        def updates():
            rounds = []
            for i in range(reps):
                time.sleep(SETTLE_S)
                t0 = mono()
                p = cprd.cprctl("update", "--all", "--parallel", str(LOOP_VMS), timeout=600)
                rounds.append({"rc": p.returncode, "wall_ms": (mono() - t0) * 1000,
                               "summary": (p.stdout.strip().splitlines() or [""])[-1][:300]})
                PROCS.adopt_descendants(cprd.pid)
                log(f"cprd-loop {size_label(size)}: update --all #{i + 1}/{reps}: rc "
                    f"{p.returncode}, {rounds[-1]['wall_ms']:.0f} ms")
            return {"rounds": rounds}

        cell["busy"] = loop_phase(cprd, updates)
        cell["samples"] = [{"result": "ok" if r["rc"] == 0 else "failed", **r}
                           for r in cell["busy"]["rounds"]]
        for c in consoles:
            try:
                wait_beats(c, 3, timeout=60)
            except RuntimeError as e:
                cell["health_wait"] = str(e)
        healths = [console_health(c) for c in consoles]
        bad = [h for h in healths if not h["ok"]]
        cell["health"] = bad[0] if bad else healths[0]
        for phase in ("idle", "busy"):
            v, lp = cell[phase]["vm_list"], cell[phase]["loop"]
            log(f"cprd-loop {phase}: vm.list n={v['count']} p50 {v['request_p50_us']} us p99 "
                f"{v['request_p99_us']} us max {v['request_max_us']} us; loop busy max "
                f"{lp.get('busy_max_us')} us (CPU {lp.get('busy_cpu_max_us')} us)")
    finally:
        PROCS.adopt_descendants(cprd.pid)
        for name in names:
            try:
                cprd.call("vm.destroy", {"name": name}, timeout=60)
            except Exception:  # noqa: BLE001 - it may never have been created
                pass


# ---------------------------------------------------------------- direct QEMU

class Direct:
    """Common bits for QEMUs this script drives without cprd."""

    def __init__(self, bench, tag, size):
        self.bench = bench
        self.size = size
        self.dir = tempfile.mkdtemp(prefix=f"cprd-bench-{tag}-")
        self.console = os.path.join(self.dir, "console.log")
        self.n = 0
        self.procs = []

    def qmp_path(self):
        self.n += 1
        return os.path.join(self.dir, f"qmp{self.n}.sock")

    def base_argv(self, qmp, memory, machine_extra="", binary=None, machine="q35"):
        mib = self.size >> 20
        return [binary or self.bench.qemu, "-name", "guest=bench", "-nodefaults", "-no-user-config",
                "-display", "none", "-accel", guest_accel(), "-smp", "1", "-m", f"{mib}M",
                "-object", memory, "-machine", f"{machine},memory-backend=ram0" + machine_extra,
                "-chardev", f"socket,id=qmp,path={qmp},server=on,wait=off",
                "-mon", "chardev=qmp,mode=control",
                "-chardev", f"file,id=con0,path={self.console},append=on",
                "-serial", "chardev:con0",
                "-kernel", self.bench.kernel, "-initrd", self.bench.initrd,
                "-append", GUEST_APPEND]

    def spawn(self, argv, pass_fds=()):
        err = open(os.path.join(self.dir, f"qemu{len(self.procs)}.log"), "wb")
        p = PROCS.spawn(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                        pass_fds=tuple(pass_fds), start_new_session=True)
        err.close()
        p.log = err.name
        self.procs.append(p)
        return p

    def tail(self, p, n=300):
        try:
            with open(p.log, errors="replace") as f:
                return f.read()[-n:].strip()
        except OSError:
            return ""

    def cleanup(self):
        for p in self.procs:
            PROCS.kill(p)
        shutil.rmtree(self.dir, ignore_errors=True)

    def wait_migrated(self, oq, n_old, new, timeout):
        """The old QEMU's migration has completed, or a RuntimeError says how
        it ended, with the new QEMU's last words."""
        done = oq.wait_event("MIGRATION", n_old, timeout=timeout, procs=[new],
                             pred=lambda e: e["data"]["status"] in
                             ("completed", "failed", "cancelled"))
        if not done or done["data"]["status"] != "completed":
            raise RuntimeError(f"migration {done['data']['status'] if done else 'timed out'}:"
                               f" {self.tail(new)}")

    def finish(self, cell, vmm, q):
        """Record the guest's health after the last update, then end it."""
        wait_beats(self.console, 3, timeout=60, procs=[vmm])
        cell["health"] = console_health(self.console)
        quit_and_wait(q, vmm)

    def note_health(self, cell):
        """After a failure: what the console says, if nothing was recorded."""
        if "health" not in cell and os.path.exists(self.console):
            cell["health"] = console_health(self.console)


def quit_and_wait(q, p, timeout=60):
    q.send_quit()
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        PROCS.kill(p)
    q.close()


def run_copy(bench, size, reps):
    """Baseline A: migration with guest RAM copied (private memfd RAM)."""
    cell = bench.res.cell("qemu-migrate-copy", size)
    d = Direct(bench, "copy", size)
    mem = f"memory-backend-memfd,id=ram0,size={size >> 20}M,share=off"
    cell["params"] = {"max-bandwidth": bench.args.copy_bandwidth, "downtime-limit": "default"}
    try:
        qp = d.qmp_path()
        old = d.spawn(d.base_argv(qp, mem))
        oq = QMP(qp, "old", old)
        log(f"qemu-migrate-copy {size_label(size)}: booting")
        wait_beats(d.console, 3, procs=[old])
        for i in range(reps):
            time.sleep(SETTLE_S)  # each update starts from a steady state
            oq.cmd("migrate-set-capabilities",
                   {"capabilities": [{"capability": "events", "state": True}]})
            oq.cmd("migrate-set-parameters", {"max-bandwidth": bench.args.copy_bandwidth})
            qp = d.qmp_path()
            mig = os.path.join(d.dir, f"mig{d.n}.sock")
            t_spawn = mono()
            new = d.spawn(d.base_argv(qp, mem) + ["-incoming", "defer"])
            try:
                nq = QMP(qp, "new", new)
            except QmpError as e:
                raise RuntimeError(f"{e}: {d.tail(new)}")
            startup = (nq.ready_at - t_spawn) * 1000
            n_old = len(oq.events)
            t0 = mono()
            nq.cmd("migrate-incoming", {"uri": f"unix:{mig}"})
            oq.cmd("migrate", {"uri": f"unix:{mig}"})
            d.wait_migrated(oq, n_old, new, 1800)
            resume = nq.wait_event("RESUME", 0, timeout=60)
            stop = oq.wait_event("STOP", n_old, timeout=1)
            info = oq.cmd("query-migrate")
            quit_and_wait(oq, old)
            t_end = mono()
            if not resume or not stop:
                raise RuntimeError("no STOP/RESUME event")
            s = {"rep": i, "blackout_ms": (ev_ts(resume) - ev_ts(stop)) * 1000,
                 "total_ms": (t_end - t0) * 1000, "startup_ms": startup,
                 "qemu_downtime_ms": info.get("downtime"), "qemu_total_time_ms": info.get("total-time"),
                 "ram_transferred": info.get("ram", {}).get("transferred"),
                 "ram_normal_pages": info.get("ram", {}).get("normal"),
                 "ram_zero_pages": info.get("ram", {}).get("duplicate")}
            cell["samples"].append(s)
            log(f"qemu-migrate-copy {size_label(size)} #{i + 1}/{reps}: blackout "
                f"{fmt(s['blackout_ms'])} ms, total {fmt(s['total_ms'])} ms, "
                f"start-up {fmt(startup)} ms")
            old, oq = new, nq
        d.finish(cell, old, oq)
    finally:
        d.note_health(cell)
        d.cleanup()


def make_memfd(size):
    fd = os.memfd_create("cprd-bench-ram", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    return fd


def unix_listening(path):
    """Whether a UNIX socket is listening on path, without connecting to it
    (a probe connection would be taken for the old QEMU's). Flag 0x10000
    in /proc/net/unix is __SO_ACCEPTCON: listen() has been called."""
    try:
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                parts = line.split()
                if len(parts) >= 8 and parts[7] == path and int(parts[3], 16) & 0x10000:
                    return True
    except (OSError, ValueError, StopIteration):
        pass
    return False


def run_cpr_direct(bench, size, reps, method="qemu-cpr-transfer", src=None, dst=None,
                   machine="q35"):
    """Baseline B: QEMU's cpr-transfer mode. Guest RAM is a memfd this script
    creates; both QEMUs inherit it and map it through /proc/self/fd/N
    (share=on, aux-ram-share=on). The new QEMU listens on two UNIX sockets,
    -incoming unix:MAIN and a cpr channel; the old one gets
    mode=cpr-transfer and migrates with both channels. (An inherited fd as
    the main channel fails in QEMU 10.0 with "Not a migration stream", and
    the cpr channel must be a UNIX socket.) Between two QEMU builds: src
    boots the guest, dst takes it (machine: a type both have)."""
    cell = bench.res.cell(method, size)
    d = Direct(bench, "cpr", size)
    memfd = make_memfd(size)
    mem = f"memory-backend-file,id=ram0,size={size >> 20}M,mem-path=/proc/self/fd/{memfd},share=on"
    aux = ",aux-ram-share=on"
    try:
        qp = d.qmp_path()
        old = d.spawn(d.base_argv(qp, mem, aux, src, machine), pass_fds=[memfd])
        oq = QMP(qp, "old", old)
        log(f"{method} {size_label(size)}: booting")
        wait_beats(d.console, 3, procs=[old])
        for i in range(reps):
            time.sleep(SETTLE_S)  # each update starts from a steady state
            oq.cmd("migrate-set-capabilities",
                   {"capabilities": [{"capability": "events", "state": True}]})
            oq.cmd("migrate-set-parameters", {"mode": "cpr-transfer"})
            qp = d.qmp_path()
            cpr = {"transport": "socket", "type": "unix",
                   "path": os.path.join(d.dir, f"cpr{d.n}.sock")}
            mig = os.path.join(d.dir, f"mig{d.n}.sock")
            argv = d.base_argv(qp, mem, aux, dst, machine) + [
                "-incoming", f"unix:{mig}",
                "-incoming", json.dumps({"channel-type": "cpr", "addr": cpr})]
            t_spawn = mono()
            new = d.spawn(argv, pass_fds=[memfd])
            # The new monitor appears only once the cpr state has been read;
            # connect from a thread now, so that RESUME is not missed.
            conn = {}

            def connect():
                try:
                    conn["q"] = QMP(qp, "new", new, timeout=120)
                except Exception as e:  # noqa: BLE001
                    conn["e"] = e

            th = threading.Thread(target=connect, daemon=True)
            th.start()
            deadline = mono() + 60
            while not unix_listening(cpr["path"]):  # main listens after cpr load
                if new.poll() is not None:
                    raise RuntimeError(f"new QEMU exited with status {new.returncode}: "
                                       f"{d.tail(new)}")
                if mono() > deadline:
                    raise RuntimeError("new QEMU never listened on its cpr channel")
                time.sleep(0.001)
            listen_ms = (mono() - t_spawn) * 1000
            n_old = len(oq.events)
            t0 = mono()
            oq.cmd("migrate", {"channels": [
                {"channel-type": "main", "addr": {"transport": "socket", "type": "unix",
                                                  "path": mig}},
                {"channel-type": "cpr", "addr": cpr}]})
            th.join(130)
            if "q" not in conn:
                raise RuntimeError(f"{conn.get('e', 'no monitor')}: {d.tail(new)}")
            nq = conn["q"]
            greeting_ms = (nq.greeting_at - t_spawn) * 1000
            d.wait_migrated(oq, n_old, new, 300)
            resume = nq.wait_event("RESUME", 0, timeout=30)
            stop = oq.wait_event("STOP", n_old, timeout=1)
            info = oq.cmd("query-migrate")
            quit_and_wait(oq, old)
            t_end = mono()
            st = nq.cmd("query-status")
            if not st.get("running"):
                raise RuntimeError(f"the new QEMU is not running: {st}")
            s = {"rep": i, "blackout_ms": (ev_ts(resume) - ev_ts(stop)) * 1000
                 if resume and stop else None,
                 "total_ms": (t_end - t0) * 1000, "total_from_spawn_ms": (t_end - t_spawn) * 1000,
                 "cpr_listen_ms": listen_ms, "qmp_greeting_ms": greeting_ms,
                 "resume_seen": bool(resume),
                 "qemu_downtime_ms": info.get("downtime"), "qemu_total_time_ms": info.get("total-time"),
                 "ram_transferred": info.get("ram", {}).get("transferred")}
            cell["samples"].append(s)
            log(f"{method} {size_label(size)} #{i + 1}/{reps}: blackout "
                f"{fmt(s['blackout_ms'])} ms, total {fmt(s['total_ms'])} ms "
                f"(cpr listen {fmt(listen_ms)} ms after spawn)")
            old, oq = new, nq
        d.finish(cell, old, oq)
    finally:
        d.note_health(cell)
        os.close(memfd)
        d.cleanup()


def run_startup(bench, size, reps):
    """A fresh QEMU with cprd's command line (memfd RAM, share=on,
    -incoming defer): spawn to its monitor answering qmp_capabilities, and
    to its greeting for comparison. No guest runs in it, but when
    cprd-handover is measured too this runs while that guest runs."""
    cell = bench.res.cell("qemu-startup", size)
    d = Direct(bench, "startup", size)
    memfd = make_memfd(size)
    mem = f"memory-backend-file,id=ram0,size={size >> 20}M,mem-path=/proc/self/fd/{memfd},share=on"
    try:
        for i in range(reps):
            qp = d.qmp_path()
            t0 = mono()
            p = d.spawn(d.base_argv(qp, mem, ",aux-ram-share=on") + ["-msg", "timestamp=on", "-incoming", "defer"],
                        pass_fds=[memfd])
            q = QMP(qp, "new", p)
            cell["samples"].append({"rep": i, "startup_ms": (q.ready_at - t0) * 1000,
                                    "greeting_ms": (q.greeting_at - t0) * 1000})
            quit_and_wait(q, p)
        v = [s["startup_ms"] for s in cell["samples"]]
        log(f"qemu-startup {size_label(size)}: p50 {fmt(pct(v, 50))} ms over {len(v)}")
    finally:
        os.close(memfd)
        d.cleanup()


def record_failure(bench, method, size, e):
    cell = bench.res.cell(method, size)
    msg = f"{type(e).__name__}: {e}".replace("\n", " ")
    if not cell["samples"]:
        cell["status"] = f"n/a ({msg[:200]})"
    else:
        cell["error"] = msg[:400]
    cell["traceback"] = traceback.format_exc()
    log(f"{method} {size_label(size)}: FAILED: {msg[:300]}")


# ---------------------------------------------------------------- report

def summarize(cell, key="blackout_ms"):
    ok = [s for s in cell.get("samples", []) if s.get("result", "ok") == "ok"]
    bo = [s.get("blackout_ms") for s in ok if s.get("blackout_ms") is not None]
    tot = [s.get("total_ms") for s in ok if s.get("total_ms") is not None]
    return {"n": len(ok), "failed": len(cell.get("samples", [])) - len(ok),
            "bo_p50": pct(bo, 50), "bo_p95": pct(bo, 95), "bo_max": pct(bo, 100),
            "tot_p50": pct(tot, 50),
            "startup_p50": pct([s.get("startup_ms") for s in ok], 50),
            "listen_p50": pct([s.get("cpr_listen_ms") for s in ok], 50),
            "tot_spawn_p50": pct([s.get("total_from_spawn_ms") for s in ok], 50)}


def cell_note(cell):
    if cell is None:
        return "not run"
    st = cell.get("status", "ok")
    if st != "ok":
        return st
    h = cell.get("health")
    note = ("guest health not checked" if h is None else
            "guest ok" if h.get("ok") else f"guest NOT ok: {h.get('problem')}")
    if cell.get("error"):
        note += f"; stopped early: {cell['error'][:160]}"
    return note


def write_report(res, sizes):
    meta = res["meta"]
    M = res["methods"]
    labels = [size_label(s) for s in sizes]
    out = ["# Benchmarks", "",
           "Generated by `make bench` (`bench/bench.py`); every raw sample is in "
           "`bench/results/results.json`. Do not edit by hand: re-run the benchmark.", "",
           f"- Date: {meta['date']}" + ("" if meta.get("finished") else " (run did not finish)"),
           f"- Machine: {meta['host_cpus']} CPUs, {meta['host_mem_gib']} GiB RAM, Linux "
           f"{meta['kernel']}, shared and noisy; QEMU runs under "
           f"{meta['accel'].upper()} (no /dev/kvm that boots the guest)" if meta["accel"] == "tcg" else
           f"- Machine: {meta['host_cpus']} CPUs, {meta['host_mem_gib']} GiB RAM, KVM",
           f"- QEMU: {meta['qemu_version']}",
           f"- Guest: Debian kernel + busybox initramfs, 1 vCPU, q35, append `{meta['guest_append']}`;"
           " guest RAM is sparse (the guest touches little of it)",
           f"- Repetitions: {meta['reps']} per size and method"
           f" (RAM-copy migration at sizes above 1G: {meta['copy_reps_large']})"
           + (" — `--quick` run" if meta.get("quick") else ""),
           "",
           "Blackout is QEMU's own event timestamps: `RESUME` on the new QEMU minus `STOP` on the "
           "old one (for cprd, as reported by `cprctl --json update`). Times in ms. "
           "Only numbers from this one run are compared with each other. p95 is nearest-rank, so "
           "with fewer than 20 samples it is the maximum.", "",
           "![blackout p50](bench/results/blackout.png)", "",
           "![total p50](bench/results/total.png)", ""]

    def table(method, extra=None):
        out.append(f"## {TITLES[method]}")
        out.append("")
        hdr = "| size | n | blackout p50 | p95 | max | total p50 |"
        sep = "|---|---|---|---|---|---|"
        if extra:
            for h, _ in extra:
                hdr += f" {h} |"
                sep += "---|"
        out.append(hdr + " notes |")
        out.append(sep + "---|")
        for lab in labels:
            cell = M.get(method, {}).get(lab)
            if cell is None:
                out.append(f"| {lab} | 0 | — | — | — | — |" + " — |" * len(extra or []) +
                           " not run |")
                continue
            s = summarize(cell)
            row = (f"| {lab} | {s['n']}{' (+' + str(s['failed']) + ' failed)' if s['failed'] else ''}"
                   f" | {fmt(s['bo_p50'])} | {fmt(s['bo_p95'])} | {fmt(s['bo_max'])} | "
                   f"{fmt(s['tot_p50'])} |")
            for _, k in extra or []:
                row += f" {fmt(s[k])} |"
            out.append(row + f" {cell_note(cell)} |")
        out.append("")

    table("cprd-handover")
    out.append("cprd's total is from the daemon receiving `vm.update` to its reply: it includes "
               "starting the new QEMU.")
    out.append("")
    table("cprd-cpr-transfer")
    table("qemu-migrate-copy", [("new QEMU start-up p50", "startup_p50")])
    out.append("Total: from `migrate-incoming` on the already started new QEMU to the old one "
               "having exited after `quit`. Start-up: spawn to the monitor answering a command "
               "(`-incoming defer`). "
               f"`max-bandwidth` set to {M['qemu-migrate-copy'] and next(iter(M['qemu-migrate-copy'].values())).get('params', {}).get('max-bandwidth')} B/s.")
    out.append("")
    table("qemu-cpr-transfer", [("cpr listen p50", "listen_p50"),
                                ("total incl. spawn p50", "tot_spawn_p50")])
    out.append("Total: from `migrate` on the old QEMU (the new one already listening) to the old "
               "one having exited. The new QEMU's monitor only answers once it has read the cpr "
               "state, so its start-up is given as spawn to its cpr socket listening, and the "
               "total also from spawn.")
    out.append("")
    out.append(f"## {TITLES['qemu-startup']}")
    out.append("")
    out.append("| size | n | start-up p50 | p95 | max | greeting p50 |")
    out.append("|---|---|---|---|---|---|")
    for lab in labels:
        cell = M["qemu-startup"].get(lab)
        v = [x.get("startup_ms") for x in (cell or {}).get("samples", [])]
        g = [x.get("greeting_ms") for x in (cell or {}).get("samples", [])]
        out.append(f"| {lab} | {len(v)} | {fmt(pct(v, 50))} | {fmt(pct(v, 95))} | "
                   f"{fmt(pct(v, 100))} | {fmt(pct(g, 50))} |")
    out.append("")
    out.append("Start-up ends when the new QEMU executes its first QMP command (`qmp_capabilities`): "
               "only then can it take a migration. Its greeting comes earlier because QEMU's "
               "monitor has its own I/O thread, which greets while the main thread is still "
               "reading the kernel and setting up the machine; commands wait for the main loop.")
    out.append("")

    loop_section(out, M.get("cprd-loop", {}))

    # verdicts
    out.append("## Verdict (from this run's numbers)")
    out.append("")
    verdicts = {}

    def get(method, lab, key):
        cell = M.get(method, {}).get(lab)
        if not cell or cell.get("status", "ok") != "ok":
            return None
        return summarize(cell)[key]

    # (a)
    rows = []
    met_all = True
    evaluable = False
    for lab in labels:
        h = get("cprd-handover", lab, "bo_p50")
        c = get("qemu-cpr-transfer", lab, "bo_p50")
        if h is None or c is None:
            why = M.get("qemu-cpr-transfer", {}).get(lab, {}).get("status", "no samples")
            rows.append(f"  - {lab}: not evaluable (handover {fmt(h)} ms, cpr-transfer: "
                        f"{fmt(c) if c is not None else why})")
            met_all = False
            continue
        evaluable = True
        ok = h <= c
        met_all &= ok
        rows.append(f"  - {lab}: handover {h:.1f} ms vs cpr-transfer {c:.1f} ms — "
                    f"{'met' if ok else 'not met'}")
    va = "met" if met_all and evaluable else "not met" if evaluable else "not evaluable"
    verdicts["a"] = va
    out.append(f"**(a) cprd handover blackout p50 ≤ directly driven cpr-transfer p50, per size: "
               f"{va.upper()}**")
    out += rows
    out.append("")
    # (b)
    lo, hi = labels[0] if labels else None, labels[-1] if labels else None
    h_lo = get("cprd-handover", "256M", "bo_p50")
    h_hi = get("cprd-handover", "8G", "bo_p50")
    if h_lo is not None and h_hi is not None:
        ok = h_hi <= 1.3 * h_lo
        vb = "met" if ok else "not met"
        out.append(f"**(b) handover blackout p50 at 8G within 1.3× of 256M: {vb.upper()}** — "
                   f"8G {h_hi:.1f} ms vs 256M {h_lo:.1f} ms (ratio {h_hi / h_lo:.2f}, "
                   f"limit {1.3 * h_lo:.1f} ms)")
    else:
        vb = "not evaluable"
        r = ""
        if lo and hi and lo != hi:
            a_, b_ = get("cprd-handover", lo, "bo_p50"), get("cprd-handover", hi, "bo_p50")
            if a_ and b_:
                r = f" (this run: {hi} {b_:.1f} ms vs {lo} {a_:.1f} ms, ratio {b_ / a_:.2f})"
        out.append(f"**(b) handover blackout p50 at 8G within 1.3× of 256M: NOT EVALUABLE** — "
                   f"this run did not measure both 256M and 8G{r}")
    verdicts["b"] = vb
    out.append("")
    # (c)
    rows = []
    met_all = True
    evaluable = False
    for lab in labels:
        t = get("cprd-handover", lab, "tot_p50")
        su = get("qemu-startup", lab, "startup_p50")
        if t is None or su is None:
            rows.append(f"  - {lab}: not evaluable (total {fmt(t)} ms, start-up {fmt(su)} ms)")
            met_all = False
            continue
        evaluable = True
        ok = t <= su + 100
        met_all &= ok
        rows.append(f"  - {lab}: total {t:.1f} ms vs start-up {su:.1f} + 100 = {su + 100:.1f} ms "
                    f"(overhead beyond start-up {t - su:.1f} ms) — {'met' if ok else 'not met'}")
    vc = "met" if met_all and evaluable else "not met" if evaluable else "not evaluable"
    verdicts["c"] = vc
    out.append(f"**(c) cprd total update time p50 ≤ new QEMU start-up p50 + 100 ms, per size: "
               f"{vc.upper()}**")
    out += rows
    out.append("")
    # (d)
    lc = next((c for c in M.get("cprd-loop", {}).values() if c.get("busy")), None)
    if lc:
        v = lc["busy"]["vm_list"]
        p99, mx = v.get("request_p99_us"), v.get("request_max_us")
        vd = "met" if p99 is not None and p99 < 1000 else "not met"
        out.append(f"**(d) `vm.list` handled in well under 1 ms of cprd's own time while "
                   f"`update --all --parallel {LOOP_VMS}` runs (p99 < 1000 us): {vd.upper()}** — "
                   f"p99 {p99} us, max {mx} us over {v.get('count')} requests (CPU time p99 "
                   f"{v.get('request_cpu_p99_us')} us); idle p99 "
                   f"{lc['idle']['vm_list'].get('request_p99_us')} us")
    else:
        vd = "not evaluable"
        out.append("**(d) `vm.list` handled in well under 1 ms of cprd's own time during "
                   "`update --all`: NOT EVALUABLE** — the cprd-loop case did not run")
    verdicts["d"] = vd
    out.append("")
    ct = [lab for lab in labels if get("cprd-cpr-transfer", lab, "tot_p50") is not None]
    if ct:
        out.append("For reference, the same for cprd's cpr-transfer strategy: " + "; ".join(
            f"{lab} blackout p50 {fmt(get('cprd-cpr-transfer', lab, 'bo_p50'))} ms, total p50 "
            f"{fmt(get('cprd-cpr-transfer', lab, 'tot_p50'))} ms" for lab in ct) + ".")
        out.append("")
    kept = kept_checkpoint_section()  # before the file is truncated
    with open(BENCH_MD, "w") as f:
        f.write("\n".join(out) + kept)
    return verdicts


def kept_checkpoint_section():
    """The other benchmarks' sections of the current BENCHMARKS.md
    (bench_checkpoint.py's, bench_versions.py's)."""
    try:
        with open(BENCH_MD) as f:
            text = f.read()
    except OSError:
        return ""
    out = ""
    for begin, end in ((CKPT_BEGIN, CKPT_END), (VERS_BEGIN, VERS_END)):
        if begin in text and end in text:
            out += "\n" + text[text.index(begin):text.index(end) + len(end)] + "\n"
    return out


def merge_section(section, begin, end):
    """Put section (which starts with begin and ends with end) in place of
    the one BENCHMARKS.md has, or at its end."""
    try:
        with open(BENCH_MD) as f:
            text = f.read()
    except OSError:
        text = "# Benchmarks\n"
    if begin in text and end in text:
        a = text.index(begin)
        b = text.index(end) + len(end)
        text = text[:a] + section.rstrip("\n") + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(BENCH_MD, "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")


def loop_section(out, cells):
    out.append(f"## {TITLES['cprd-loop']}")
    out.append("")
    cell = next(iter(cells.values()), None)
    if not cell or not cell.get("busy"):
        out.append(f"Not run ({cell.get('status') if cell else 'not selected'}).")
        out.append("")
        return
    lab = next(iter(cells))
    rounds = cell["busy"].get("rounds", [])
    out.append(f"{LOOP_VMS} VMs of {lab}; one client sends `vm.list` every "
               f"{LOOP_PERIOD_S * 1000:.0f} ms on one connection, for {LOOP_IDLE_S:.0f} s while "
               f"idle, then throughout {len(rounds)} runs of `cprctl update --all --parallel "
               f"{LOOP_VMS}` ({sum(r['rc'] == 0 for r in rounds)} succeeded). cprd's own "
               "time comes from its counters (`daemon.stats`): a request from its parse to its "
               "reply queued; a loop turn from the poll returning to the next poll. Wall-clock "
               "time on this shared host also holds the time cprd waited for a CPU; CPU time is "
               "what cprd's thread used. In µs; percentiles are bucket upper bounds "
               "(within 12.5%).")
    out.append("")
    out.append("| | requests | vm.list p50 | p99 | max | CPU p50 | CPU p99 | CPU max | "
               "loop turns | turn p99 | turn max | turn CPU max | client round trip p50 / p99 "
               "/ max (ms) |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for phase in ("idle", "busy"):
        c = cell[phase]
        v, lp, rt = c["vm_list"], c["loop"], c["client_rtt_ms"]
        out.append(f"| {'idle' if phase == 'idle' else 'update --all'} | {v.get('count')} | "
                   f"{v.get('request_p50_us')} | {v.get('request_p99_us')} | "
                   f"{v.get('request_max_us')} | {v.get('request_cpu_p50_us')} | "
                   f"{v.get('request_cpu_p99_us')} | {v.get('request_cpu_max_us')} | "
                   f"{lp.get('iterations')} | {lp.get('busy_p99_us')} | {lp.get('busy_max_us')} | "
                   f"{lp.get('busy_cpu_max_us')} | {fmt(rt.get('p50'), 2)} / {fmt(rt.get('p99'), 2)}"
                   f" / {fmt(rt.get('max'), 2)} |")
    out.append("")
    others = {m: h for m, h in cell["busy"].get("methods", {}).items() if m != "vm.list"}
    if others:
        out.append("Other requests handled meanwhile (their handler's own time; an update's "
                   "wait for its VMMs is not cprd's): " + "; ".join(
                       f"`{m}` n={h.get('count')} max {h.get('request_max_us')} µs"
                       for m, h in sorted(others.items())) + ".")
        out.append("")


def plot(res, sizes):
    M = res["methods"]
    lines_ = ["# size_mib " + " ".join(f"bo:{m}" for m in METHODS[:4]) + " " +
              " ".join(f"tot:{m}" for m in METHODS[:4]) + " startup"]
    for s in sizes:
        lab = size_label(s)
        row = [str(s >> 20)]
        for key in ("bo_p50", "tot_p50"):
            for m in METHODS[:4]:
                cell = M[m].get(lab)
                v = summarize(cell)[key] if cell and cell.get("status", "ok") == "ok" else None
                row.append("?" if v is None else f"{v:.3f}")
        cell = M["qemu-startup"].get(lab)
        v = summarize(cell)["startup_p50"] if cell else None
        row.append("?" if v is None else f"{v:.3f}")
        lines_.append(" ".join(row))
    dat = os.path.join(RESULTS, "p50.dat")
    with open(dat, "w") as f:
        f.write("\n".join(lines_) + "\n")
    gp = shutil.which("gnuplot")
    if not gp:
        log("gnuplot not found: no PNGs")
        return
    terms = subprocess.run([gp, "-e", "set terminal"], capture_output=True, text=True)
    term = "pngcairo" if "pngcairo" in terms.stdout + terms.stderr else "png"
    p = subprocess.run([gp, "-e", f"datafile='{dat}'; outdir='{RESULTS}'; term='{term}'", PLOT_GP],
                       capture_output=True, text=True)
    if p.returncode != 0:
        log(f"gnuplot failed: {p.stderr.strip()[:500]}")


# ---------------------------------------------------------------- main

class Bench:
    pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--quick", action="store_true", help="sizes 256M and 1G, 3 repetitions")
    ap.add_argument("--sizes", type=lambda s: [parse_size(x) for x in s.split(",") if x],
                    help="comma-separated guest memory sizes (default 256M,1G,4G,8G)")
    ap.add_argument("--reps", type=int, help="updates per size and method (default 10)")
    ap.add_argument("--copy-reps-large", type=int,
                    help="RAM-copy migrations at sizes above 1G (default 3, at most --reps)")
    ap.add_argument("--copy-bandwidth", type=int, default=100 << 30,
                    help="max-bandwidth for the RAM-copy baseline in B/s (QEMU's default is "
                         "128 MiB/s; default here 100 GiB/s, i.e. unthrottled)")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="comma-separated subset of " + ",".join(METHODS))
    args = ap.parse_args()
    if args.quick:
        args.sizes = args.sizes or [256 << 20, 1 << 30]
        args.reps = args.reps or 3
    args.sizes = args.sizes or [256 << 20, 1 << 30, 4 << 30, 8 << 30]
    args.reps = args.reps or 10
    args.copy_reps_large = min(args.copy_reps_large or 3, args.reps)
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m}")

    os.environ["CPRD_BUILD"] = os.path.abspath(args.build)
    sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
    import cprdtest

    bench = Bench()
    bench.args = args
    bench.methods = methods
    bench.qemu = shutil.which("qemu-system-x86_64")
    bench.kernel, bench.initrd = cprdtest.KERNEL, cprdtest.INITRD
    for f in (cprdtest.CPRD, cprdtest.CPRCTL, bench.kernel, bench.initrd):
        if not os.path.exists(f):
            sys.exit(f"bench: {f} missing: run `make all guest` first")
    if not bench.qemu:
        sys.exit("bench: qemu-system-x86_64 not found")
    if os.geteuid() != 0:
        sys.exit("bench: needs root (cprd holds VMs for others)")
    qv = subprocess.run([bench.qemu, "--version"], capture_output=True, text=True).stdout
    bench.res = Results(args, qv.splitlines()[0] if qv else "unknown")
    res = bench.res

    def on_signal(sig, frame):
        raise KeyboardInterrupt(f"signal {sig}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    cprd = None
    interrupted = False
    t_start = mono()
    log(f"bench: sizes {', '.join(size_label(s) for s in args.sizes)}; {args.reps} repetitions; "
        f"methods {', '.join(methods)}; {res.data['meta']['qemu_version']}")
    try:
        if any(m.startswith("cprd-") for m in methods):
            cprd = cprdtest.Daemon(perturb=False)  # MALLOC_PERTURB_ would slow every VMM too
            cprd.start()
            PROCS.adopt(cprd.pid)
            log(f"cprd running (pid {cprd.pid})")
        for size in args.sizes:
            for m in methods:
                reps = args.reps
                if m == "qemu-migrate-copy" and size > (1 << 30):
                    reps = args.copy_reps_large
                try:
                    if m == "cprd-handover":
                        run_cprd(bench, cprd, "handover", size, reps)
                    elif m == "cprd-cpr-transfer":
                        run_cprd(bench, cprd, "cpr-transfer", size, reps)
                    elif m == "qemu-migrate-copy":
                        run_copy(bench, size, reps)
                    elif m == "qemu-cpr-transfer":
                        run_cpr_direct(bench, size, reps)
                    elif m == "qemu-startup" and "cprd-handover" not in methods:
                        run_startup(bench, size, reps)
                    elif m == "cprd-loop" and size == args.sizes[0]:
                        run_loop(bench, cprd, size, min(reps, 5))
                except Exception as e:  # noqa: BLE001 - one failure must not end the run
                    record_failure(bench, m, size, e)
                res.save()
        res.data["meta"]["finished"] = True
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: cleaning up")
    finally:
        if cprd is not None:
            try:
                PROCS.adopt_descendants(cprd.pid)
                cprd.stop()
            except Exception as e:  # noqa: BLE001
                log(f"stopping cprd: {e}")
        PROCS.kill_all()
        if cprd is not None:
            shutil.rmtree(cprd.dir, ignore_errors=True)
        res.data["meta"]["duration_s"] = round(mono() - t_start, 1)
        res.save()
    verdicts = write_report(res.data, args.sizes)
    plot(res.data, args.sizes)
    log(f"bench: done in {mono() - t_start:.0f}s; results in bench/results/, report in "
        f"BENCHMARKS.md; verdicts: " + ", ".join(f"({k}) {v}" for k, v in verdicts.items()))
    if interrupted:
        sys.exit(130)


if __name__ == "__main__":
    main()
