#!/usr/bin/env python3
"""cprd benchmark between two QEMU builds: Debian's QEMU 10.0 (OLD) and the
newer one `make qemu-next` builds (NEXT), per guest memory size.

  handover OLD->NEXT, NEXT->OLD   `cprctl update --vmm ...`, one guest going
                                  there and back
  cpr-transfer OLD->NEXT          `cprctl update --strategy cpr-transfer`;
                                  back (not measured) by handover, since
                                  cpr-transfer cannot go back
  cpr-exec NEXT->NEXT             `cprctl update --strategy cpr-exec` on a
                                  guest born on NEXT with --cpr-exec (QEMU
                                  10.0 has no cpr-exec)
  baseline: QEMU cpr-transfer     QEMU's cpr-transfer driven directly over
  OLD->NEXT                       QMP between the same two builds, no cprd
                                  (a fresh guest on OLD for each)

Blackout is QEMU's own event timestamps (RESUME minus STOP). Nothing is
asserted about timings; the comparison is within this run. Results:
bench/results/versions.json and a section of BENCHMARKS.md.

    python3 bench/bench_versions.py [--build DIR] [--sizes 256M,8G] [--reps N]
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import time

import bench as B
from bench import PROCS, log, mono, parse_size, size_label

BEGIN, END = B.VERS_BEGIN, B.VERS_END
HANDOVER_UP, HANDOVER_DOWN = "handover OLD->NEXT", "handover NEXT->OLD"
CPR_UP, CPR_EXEC, DIRECT = "cpr-transfer OLD->NEXT", "cpr-exec NEXT->NEXT", \
    "baseline: QEMU cpr-transfer OLD->NEXT"
METHODS = [HANDOVER_UP, HANDOVER_DOWN, CPR_UP, CPR_EXEC, DIRECT]


class Results:
    def __init__(self, args, old, new):
        self.data = {"meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host_cpus": os.cpu_count(), "kernel": platform.release(),
            "accel": B.guest_accel(), "old": old, "next": new,
            "sizes": [size_label(s) for s in args.sizes], "reps": args.reps,
            "finished": False}, "methods": {m: {} for m in METHODS}}

    def cell(self, method, size):
        return self.data["methods"][method].setdefault(size_label(size),
                                                        {"status": "ok", "samples": []})

    def save(self):
        os.makedirs(B.RESULTS, exist_ok=True)
        with open(os.path.join(B.RESULTS, "versions.json"), "w") as f:
            json.dump(self.data, f, indent=1)


def update(cprd, name, vmm, strategy):
    p = cprd.cprctl("--json", "update", name, "--vmm", vmm, "--strategy", strategy,
                    "--timeout", "300", timeout=600)
    try:
        rep = json.loads(p.stdout)
    except ValueError:
        rep = {"result": "error", "error": p.stderr.strip()[:300]}
    PROCS.adopt(rep.get("new_pid") or rep.get("restored_pid"))
    return rep


def sample(cell, method, size, i, rep):
    if rep.get("result") != "ok":
        cell["samples"].append({"rep": i, "result": rep.get("result"),
                                "error": (rep.get("error") or "")[:300]})
        log(f"{method} {size_label(size)} #{i + 1}: {rep.get('result')}: "
            f"{(rep.get('error') or '')[:200]}")
        return
    s = {"rep": i, "result": "ok", "blackout_ms": rep.get("blackout_ms"),
         "total_ms": rep.get("total_ms"), "old_version": rep.get("old_version"),
         "new_version": rep.get("new_version"), "same_pid": rep.get("old_pid") == rep.get("new_pid")}
    cell["samples"].append(s)
    log(f"{method} {size_label(size)} #{i + 1}: blackout {B.fmt(s['blackout_ms'])} ms, "
        f"total {B.fmt(s['total_ms'])} ms")


def guest(cprd, name, size, vmm, **extra):
    import cprdtest
    vm = cprd.call("vm.create", dict({"name": name, "memory": size, "kernel": cprdtest.KERNEL,
                                      "initrd": cprdtest.INITRD, "append": B.GUEST_APPEND,
                                      "vmm": vmm}, **extra), timeout=B.BOOT_TIMEOUT)
    PROCS.adopt(vm.get("pid"))
    B.wait_beats(vm["console_log"], 3)
    return vm["console_log"]


def finish(cprd, name, cells, console):
    try:
        B.wait_beats(console, 3, timeout=60)
    except RuntimeError as e:
        for c in cells:
            c["health_wait"] = str(e)
    h = B.console_health(console)
    for c in cells:
        c["health"] = h
    cprd.call("vm.destroy", {"name": name}, timeout=60)


def run_handover(bench, cprd, size, reps):
    up, down = bench.res.cell(HANDOVER_UP, size), bench.res.cell(HANDOVER_DOWN, size)
    name = f"v-handover-{size_label(size)}".lower()
    console = guest(cprd, name, size, bench.old)
    for i in range(reps):
        for method, cell, vmm in ((HANDOVER_UP, up, bench.next), (HANDOVER_DOWN, down, bench.old)):
            mono_settle()
            sample(cell, method, size, i, update(cprd, name, vmm, "handover"))
    finish(cprd, name, [up, down], console)


def run_cpr_transfer(bench, cprd, size, reps):
    cell = bench.res.cell(CPR_UP, size)
    name = f"v-cpr-{size_label(size)}".lower()
    console = guest(cprd, name, size, bench.old)
    for i in range(reps):
        mono_settle()
        sample(cell, CPR_UP, size, i, update(cprd, name, bench.next, "cpr-transfer"))
        rep = update(cprd, name, bench.old, "handover")  # back, not measured
        if rep.get("result") != "ok":
            cell["error"] = f"could not go back by handover: {rep.get('error')}"
            break
    finish(cprd, name, [cell], console)


def run_cpr_exec(bench, cprd, size, reps):
    cell = bench.res.cell(CPR_EXEC, size)
    name = f"v-exec-{size_label(size)}".lower()
    console = guest(cprd, name, size, bench.next, cpr_exec=True)
    for i in range(reps):
        mono_settle()
        sample(cell, CPR_EXEC, size, i, update(cprd, name, bench.next, "cpr-exec"))
    finish(cprd, name, [cell], console)


def run_direct(bench, size, reps):
    machine = "pc-q35-" + ".".join(bench.res.data["meta"]["old"].split(".")[:2])
    for _ in range(reps):  # a fresh guest on OLD for each: it cannot come back
        B.run_cpr_direct(bench, size, 1, DIRECT, bench.old, bench.next, machine)


def mono_settle():
    """Each update starts from a steady state (see bench.py's SETTLE_S)."""
    time.sleep(B.SETTLE_S)


def section(res):
    meta, M = res.data["meta"], res.data["methods"]
    out = [BEGIN, "", "## Between two QEMU builds (bench/bench_versions.py)", "",
           f"{meta['date']}; QEMU {meta['old']} (OLD) and {meta['next']} (NEXT); "
           f"{meta['host_cpus']} CPUs, kernel {meta['kernel']}, accel {meta['accel']}; "
           f"{meta['reps']} updates per cell."
           + ("" if meta["finished"] else " **Run interrupted: partial.**"), "",
           "| method | size | n | blackout p50 | p95 | max | total p50 | note |",
           "|---|---|---|---|---|---|---|---|"]
    for m in METHODS:
        for lab in meta["sizes"]:
            c = M[m].get(lab)
            if c is None:
                continue
            s = B.summarize(c)
            out.append(f"| {m} | {lab} | {s['n']}{' (+%d failed)' % s['failed'] if s['failed'] else ''}"
                       f" | {B.fmt(s['bo_p50'])} ms | {B.fmt(s['bo_p95'])} ms | "
                       f"{B.fmt(s['bo_max'])} ms | {B.fmt(s['tot_p50'])} ms | {B.cell_note(c)} |")
    out += ["", "cpr-exec keeps the VMM's pid: its blackout is the new image's start-up "
            "(exec, dynamic linking, machine set-up, loading the state file), which handover "
            "and cpr-transfer do in a second process beside the running guest. It does not "
            "grow with guest memory (RAM stays in cprd's memfd), but with what the new binary "
            "loads at start: the NEXT build here is configured with only what a VM needs; "
            "a distribution's full build starts slower (bench.py's start-up reference). The "
            "baseline is QEMU's cpr-transfer between the same two builds, with no cprd.",
            "", END, ""]
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", default=os.path.join(B.ROOT, "build"))
    ap.add_argument("--sizes", type=lambda s: [parse_size(x) for x in s.split(",") if x],
                    default=[256 << 20, 8 << 30])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    os.environ["CPRD_BUILD"] = os.path.abspath(args.build)
    sys.path.insert(0, os.path.join(B.ROOT, "tests", "integration"))
    import cprdtest

    if os.geteuid() != 0:
        sys.exit("bench_versions: needs root")
    bench = B.Bench()
    bench.args = args
    bench.old = bench.qemu = shutil.which("qemu-system-x86_64")
    try:
        bench.next = cprdtest.qemu_next()
    except Exception as e:  # noqa: BLE001 - SkipTest says why
        sys.exit(f"bench_versions: no second QEMU: {e}")
    bench.kernel, bench.initrd = cprdtest.KERNEL, cprdtest.INITRD
    bench.res = Results(args, cprdtest.qemu_version(bench.old), cprdtest.qemu_version(bench.next))
    cprd = cprdtest.Daemon(perturb=False).start()
    PROCS.adopt(cprd.pid)
    log(f"bench_versions: {bench.res.data['meta']['old']} and {bench.res.data['meta']['next']}, "
        f"sizes {', '.join(size_label(s) for s in args.sizes)}, {args.reps} reps")
    t0 = mono()
    try:
        for size in args.sizes:
            for run, method in ((run_handover, HANDOVER_UP), (run_cpr_transfer, CPR_UP),
                                (run_cpr_exec, CPR_EXEC), (run_direct, DIRECT)):
                try:
                    if run is run_direct:
                        run(bench, size, args.reps)
                    else:
                        run(bench, cprd, size, args.reps)
                except Exception as e:  # noqa: BLE001 - the cell says what failed
                    B.record_failure(bench, method, size, e)
                bench.res.save()
        bench.res.data["meta"]["finished"] = True
    finally:
        bench.res.data["meta"]["duration_s"] = round(mono() - t0)
        bench.res.save()
        try:
            cprd.stop()
        finally:
            PROCS.kill_all()
        B.merge_section(section(bench.res), BEGIN, END)
        log(f"bench_versions: done in {mono() - t0:.0f} s; BENCHMARKS.md updated")


if __name__ == "__main__":
    main()
