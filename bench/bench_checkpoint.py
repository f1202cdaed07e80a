#!/usr/bin/env python3
"""cprd benchmark, part 2: checkpoint and restore (host reboot), compared in
one run against QEMU driven directly and against dd on the same file system.

Per guest memory size, the guest fills --data-pct of its RAM with random
data (cprd.data_mb=...) and is then saved and restored with each method:

  qemu-plain     baseline: QEMU driven directly over QMP, `stop`, `migrate
                 file:PATH` (a sequential stream, no mapped-ram), fsync; restore
                 is a new QEMU with -incoming defer, `migrate-incoming
                 file:PATH`, `cont`. Times run from `stop` to the file fsynced,
                 and from the new QEMU's spawn to its RESUME.
  qemu-mr-N      `cprctl checkpoint NAME --method qemu --channels N`
                 (mode=cpr-reboot, mapped-ram + multifd with N channels), then
                 `cprctl restore NAME`; times are cprd's save_ms / restore_ms
  cprd           `cprctl checkpoint NAME --method cprd`, `cprctl restore NAME`
  dd             the physical limit: dd of the bytes the guest touched (cprd's
                 bytes_written at that size) to a file in the same directory
                 with conv=fsync, and back after dropping the page cache

The page cache is dropped (echo 3 > /proc/sys/vm/drop_caches) before every
restore and every dd read, as a host reboot would: restores read the disk.
The cprd-driven methods run one after the other on the same guest; the
baseline boots its own. Results: bench/results/checkpoint.json,
bench/results/checkpoint.png and a section of BENCHMARKS.md (between the
markers bench.py keeps when it rewrites the file). Nothing is asserted about
timings: the verdicts compare numbers of this same run.

    python3 bench/bench_checkpoint.py [--build DIR] [--sizes 1G,4G,8G]
        [--data-pct 25] [--channels 1,2,4] [--reps N] [--dir DIR]
"""

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import bench as B
from bench import PROCS, QMP, log, mono, parse_size, size_label

RESULTS = B.RESULTS
BENCH_MD = B.BENCH_MD
PLOT_GP = os.path.join(B.HERE, "plot_checkpoint.gp")
BEGIN, END = B.CKPT_BEGIN, B.CKPT_END
HB_S = 0.2


def append_for(size, pct):
    mb = max(1, (size >> 20) * pct // 100)
    # The md5 check of a large block keeps a TCG vCPU busy: every 50 beats.
    return mb, (f"console=ttyS0 quiet cprd.data_mb={mb} cprd.hb_ms={int(HB_S * 1000)} "
                "cprd.verify_every=50")


def boot_timeout(mb):
    # urandom into tmpfs under TCG on a busy host: be generous.
    return 240 + mb * 0.5


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def disk_usage(path):
    st = os.stat(path)
    return st.st_size, st.st_blocks * 512


def tree_usage(path):
    app = alloc = 0
    for root, _, files in os.walk(path):
        for f in files:
            a, b = disk_usage(os.path.join(root, f))
            app += a
            alloc += b
    return app, alloc


def beats(text):
    return [(int(s), d) for s, d in B.HB_RE.findall(text)]


def read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def wait_data_line(console, timeout, procs=()):
    deadline = mono() + timeout
    while "CPRD-GUEST data mb=" not in read(console):
        if "CPRD-GUEST error" in read(console):
            raise RuntimeError("the guest could not create its data block")
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"QEMU exited with status {p.returncode} while booting")
        if mono() > deadline:
            raise RuntimeError(f"no data block after {timeout:.0f}s")
        time.sleep(0.5)


def new_beats_after(console, last_seq, n=2, timeout=180):
    """Wait for n heartbeats after last_seq; their sequence must go on
    (not restart at 1) and their data check pass."""
    deadline = mono() + timeout
    while True:
        bs = [b for b in beats(read(console)) if b[0] > last_seq]
        if len(bs) >= n:
            break
        if mono() > deadline:
            return {"ok": False, "problem": f"fewer than {n} heartbeats after seq {last_seq} "
                                            f"within {timeout}s"}
        time.sleep(0.2)
    text = read(console)
    problems = []
    if bs[0][0] != last_seq + 1 and bs[0][0] - last_seq > 3:
        problems.append(f"heartbeat jumped {last_seq} -> {bs[0][0]}")
    if len(B.BOOT_RE.findall(text)) > 1:
        problems.append("the guest booted again")
    if any(d != "ok" for _, d in bs):
        problems.append("memory check failed")
    return {"ok": not problems, "last_seq": bs[-1][0], "problem": "; ".join(problems) or None}


# ---------------------------------------------------------------- methods through cprd

def cprd_cycle(bench, cprd, name, method, channels, root, cell):
    """One checkpoint and restore through cprctl; a sample dict."""
    st = cprd.call("vm.status", {"name": name})
    last = max([s for s, _ in beats(read(st["console_log"]))] or [0])
    args = ["--json", "checkpoint", name, "--method", method, "--timeout", "3600"]
    if channels:
        args += ["--channels", str(channels)]
    t0 = mono()
    p = cprd.cprctl(*args, timeout=3700)
    wall = (mono() - t0) * 1000
    rep = json.loads(p.stdout) if p.stdout.strip().startswith("{") else {}
    if p.returncode != 0 or rep.get("result") != "ok":
        raise RuntimeError(f"checkpoint: {rep.get('error') or p.stderr.strip()[:300]}")
    path = rep["path"]
    files = {f: disk_usage(os.path.join(path, f)) for f in os.listdir(path)}
    s = {"save_ms": rep.get("save_ms"), "save_wall_ms": wall,
         "bytes_written": rep.get("bytes_written"), "file_bytes": rep.get("file_bytes"),
         "disk_bytes": rep.get("disk_bytes"), "files": files}
    drop_caches()
    t0 = mono()
    p = cprd.cprctl("--json", "restore", name, "--timeout", "3600", timeout=3700)
    wall = (mono() - t0) * 1000
    rep = json.loads(p.stdout) if p.stdout.strip().startswith("{") else {}
    if p.returncode != 0 or rep.get("result") != "ok":
        raise RuntimeError(f"restore: {rep.get('error') or p.stderr.strip()[:300]}")
    PROCS.adopt_descendants(cprd.pid)
    s.update({"restore_ms": rep.get("restore_ms"), "restore_wall_ms": wall,
              "bytes_read": rep.get("bytes_read")})
    st = cprd.call("vm.status", {"name": name})
    s["health"] = new_beats_after(st["console_log"], last)
    log(f"{cell} : checkpoint {s['save_ms'] / 1000:.1f} s, restore {s['restore_ms'] / 1000:.1f} s,"
        f" file {s['file_bytes'] / 2**30:.2f} GiB apparent {s['disk_bytes'] / 2**30:.2f} GiB "
        f"allocated; guest {'ok' if s['health']['ok'] else s['health']['problem']}")
    return s


def run_cprd_methods(bench, cprd, size):
    import cprdtest
    mb, append = append_for(size, bench.args.data_pct)
    name = f"ck-{size_label(size)}".lower()
    log(f"{size_label(size)}: booting the cprd guest ({mb} MiB of random data)")
    vm = cprd.call("vm.create", {"name": name, "memory": size, "kernel": cprdtest.KERNEL,
                                 "initrd": cprdtest.INITRD, "append": append},
                   timeout=B.BOOT_TIMEOUT)
    PROCS.adopt(vm.get("pid"))
    try:
        wait_data_line(vm["console_log"], boot_timeout(mb))
        B.wait_beats(vm["console_log"], 2)
        for method, channels in [("qemu", c) for c in bench.channels] + [("cprd", 0)]:
            key = f"qemu-mr-{channels}" if method == "qemu" else "cprd"
            cell = bench.cell(key, size)
            for i in range(bench.args.reps):
                try:
                    s = cprd_cycle(bench, cprd, name, method, channels, bench.root,
                                   f"{key} {size_label(size)} #{i + 1}")
                    cell["samples"].append(s)
                except Exception as e:  # noqa: BLE001 - the next method goes on
                    cell["status"] = f"error ({str(e)[:300]})"
                    log(f"{key} {size_label(size)}: FAILED: {e}")
                    st = cprd.call("vm.status", {"name": name})
                    if st.get("state") not in ("running", "paused"):
                        raise
                    break
                bench.save()
    finally:
        PROCS.adopt_descendants(cprd.pid)
        try:
            cprd.call("vm.destroy", {"name": name}, timeout=120)
        except Exception as e:  # noqa: BLE001
            log(f"destroy {name}: {e}")


# ---------------------------------------------------------------- the plain stream, direct

def run_plain(bench, size):
    cell = bench.cell("qemu-plain", size)
    mb, append = append_for(size, bench.args.data_pct)
    d = B.Direct(bench, "plain", size)
    mem = f"memory-backend-memfd,id=ram0,size={size >> 20}M,share=off"

    def argv(qmp):
        a = d.base_argv(qmp, mem)
        a[a.index("-append") + 1] = append
        return a

    try:
        for i in range(bench.args.reps):
            img = os.path.join(bench.root, f"plain-{size_label(size)}.img")
            d.console = os.path.join(d.dir, f"console{i}.log")  # one boot per log
            qp = d.qmp_path()
            old = d.spawn(argv(qp))
            oq = QMP(qp, "old", old)
            log(f"qemu-plain {size_label(size)}: booting ({mb} MiB of random data)")
            wait_data_line(d.console, boot_timeout(mb), procs=[old])
            B.wait_beats(d.console, 2, procs=[old])
            last = max(s for s, _ in beats(read(d.console)))
            oq.cmd("migrate-set-capabilities",
                   {"capabilities": [{"capability": "events", "state": True}]})
            n = len(oq.events)
            t0 = mono()
            oq.cmd("stop")
            oq.cmd("migrate", {"uri": f"file:{img}"})
            d.wait_migrated(oq, n, old, 3600)
            fd = os.open(img, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            save_ms = (mono() - t0) * 1000
            info = oq.cmd("query-migrate")
            B.quit_and_wait(oq, old)
            app, alloc = disk_usage(img)
            drop_caches()
            qp = d.qmp_path()
            t0 = mono()
            new = d.spawn(argv(qp) + ["-incoming", "defer"])
            nq = QMP(qp, "new", new)
            nq.cmd("migrate-set-capabilities",
                   {"capabilities": [{"capability": "events", "state": True}]})
            nq.cmd("migrate-incoming", {"uri": f"file:{img}"})
            done = nq.wait_event("MIGRATION", 0, timeout=3600, procs=[new],
                                 pred=lambda e: e["data"]["status"] in ("completed", "failed"))
            if not done or done["data"]["status"] != "completed":
                raise RuntimeError(f"incoming migration "
                                   f"{done['data']['status'] if done else 'timed out'}: "
                                   f"{d.tail(new)}")
            if nq.cmd("query-status").get("status") != "running":
                nq.cmd("cont")
            if not nq.wait_event("RESUME", 0, timeout=60, procs=[new]):
                raise RuntimeError("the restored QEMU never resumed")
            restore_ms = (mono() - t0) * 1000
            s = {"save_ms": save_ms, "restore_ms": restore_ms,
                 "bytes_written": info.get("ram", {}).get("transferred"),
                 "file_bytes": app, "disk_bytes": alloc,
                 "health": new_beats_after(d.console, last)}
            cell["samples"].append(s)
            log(f"qemu-plain {size_label(size)} #{i + 1}: checkpoint {save_ms / 1000:.1f} s, "
                f"restore {restore_ms / 1000:.1f} s, file {app / 2**30:.2f} GiB; guest "
                f"{'ok' if s['health']['ok'] else s['health']['problem']}")
            B.quit_and_wait(nq, new)
            os.unlink(img)
            bench.save()
    finally:
        d.cleanup()


# ---------------------------------------------------------------- dd

def run_dd(bench, size):
    cell = bench.cell("dd", size)
    touched = [s.get("bytes_written") for s in bench.cell("cprd", size)["samples"]]
    nbytes = max([t for t in touched if t] or [(size * bench.args.data_pct) // 100])
    mib = math.ceil(nbytes / (1 << 20))
    f = os.path.join(bench.root, "dd.img")
    for _ in range(bench.args.reps):
        t0 = mono()
        subprocess.run(["dd", "if=/dev/zero", f"of={f}", "bs=1M", f"count={mib}", "conv=fsync"],
                       check=True, capture_output=True)
        w = (mono() - t0) * 1000
        drop_caches()
        t0 = mono()
        subprocess.run(["dd", f"if={f}", "of=/dev/null", "bs=1M"], check=True,
                       capture_output=True)
        r = (mono() - t0) * 1000
        os.unlink(f)
        cell["samples"].append({"save_ms": w, "restore_ms": r, "bytes": mib << 20})
        log(f"dd {size_label(size)}: {mib} MiB write+fsync {w / 1000:.1f} s, "
            f"read (cold) {r / 1000:.1f} s")
    bench.save()


# ---------------------------------------------------------------- report

def med(cell, key):
    v = sorted(s[key] for s in (cell or {}).get("samples", []) if s.get(key) is not None)
    return v[len(v) // 2] if v else None


def gib(b):
    return "—" if b is None else f"{b / 2**30:.2f}"


def sec(ms):
    return "—" if ms is None else f"{ms / 1000:.1f}"


def method_title(m):
    if m == "qemu-plain":
        return "QEMU plain stream (`migrate file:`, direct; baseline)"
    if m.startswith("qemu-mr-"):
        n = m.rsplit("-", 1)[1]
        return f"cprd `--method qemu --channels {n}` (mapped-ram + multifd)"
    if m == "cprd":
        return "cprd `--method cprd` (memfd copy)"
    return "`dd`, same bytes (write conv=fsync / cold read)"


def write_section(data):
    M, meta = data["methods"], data["meta"]
    order = [m for m in meta["methods"] if m in M]
    out = [BEGIN, "## Checkpoint and restore (host reboot)", ""]
    out.append(f"Generated by `make bench-checkpoint` (`bench/bench_checkpoint.py`, also run by "
               f"`make bench`); raw samples in `bench/results/checkpoint.json`. Date "
               f"{meta['date']}; {meta['qemu_version']}; accel {meta['accel']}; "
               f"{meta['host_cpus']} CPUs; file system `{meta['fs']}`. Each guest fills "
               f"{meta['data_pct']}% of its RAM with random data (`cprd.data_mb`) before it is "
               f"saved; {meta['reps']} run(s) per size and method (median shown). The page "
               "cache is dropped before every restore and every `dd` read. Checkpoint time "
               "runs from the guest's pause to the checkpoint fsynced; restore time from the "
               "new QEMU's spawn to the guest running (for cprd's methods: `save_ms` / "
               "`restore_ms` of the report). Sizes in GiB (2^30 bytes).")
    if not meta.get("finished"):
        out.append("")
        out.append("**This run did not finish**: the table holds what was measured.")
    out.append("")
    out.append("![checkpoint and restore](bench/results/checkpoint.png)")
    out.append("")
    out.append("| size | method | checkpoint (s) | restore (s) | written (GiB) | file apparent | "
               "file allocated | guest after restore |")
    out.append("|---|---|---|---|---|---|---|---|")
    for lab in meta["sizes"]:
        for m in order:
            cell = M[m].get(lab)
            if not cell:
                continue
            if not cell["samples"]:
                out.append(f"| {lab} | {method_title(m)} | {cell.get('status', '—')} | | | | | |")
                continue
            hs = [s.get("health") for s in cell["samples"] if s.get("health")]
            bad = [h["problem"] for h in hs if not h["ok"]]
            health = "—" if not hs else ("ok" if not bad else bad[0])
            written = med(cell, "bytes_written") if m != "dd" else med(cell, "bytes")
            out.append(f"| {lab} | {method_title(m)} | {sec(med(cell, 'save_ms'))} | "
                       f"{sec(med(cell, 'restore_ms'))} | {gib(written)} | "
                       f"{gib(med(cell, 'file_bytes'))} | {gib(med(cell, 'disk_bytes'))} | "
                       f"{health} |")
    out.append("")
    out.append("\"written\" is what the method wrote: for the plain stream QEMU's RAM "
               "transferred, for cprd's methods `bytes_written` of the report, for `dd` its "
               "bytes. A restore includes starting a QEMU (and, for mapped-ram, its multifd "
               "threads), a fixed cost that `dd` does not pay and that weighs most at small "
               "sizes. The methods run one after another on one guest, so the host's load "
               "(shared, see above) varies between rows.")
    if any("boot count not judged" in ((s.get("health") or {}).get("problem") or "")
           for c in M.get("qemu-plain", {}).values() for s in c["samples"]):
        out.append("")
        out.append("\"boot count not judged\": in this run the baseline's boots of one size "
                   "shared a console log (fixed since), so a second boot could not be told from "
                   "a reboot; its heartbeats went on after each restore and its data check "
                   "passed.")
    out.append("")
    verdicts = verdict_lines(data, out)
    out.append(END)
    return "\n".join(out) + "\n", verdicts


def verdict_lines(data, out):
    M, meta = data["methods"], data["meta"]
    new = [m for m in meta["methods"] if m.startswith("qemu-mr-") or m == "cprd"]
    out.append("### Targets (from this run's numbers)")
    out.append("")
    res = {}

    def get(m, lab, k):
        return med(M.get(m, {}).get(lab), k)

    def fastest(lab, k):
        c = [(get(m, lab, k), m) for m in new if get(m, lab, k) is not None]
        return min(c) if c else (None, None)

    for key, k, factor, what in (("restore-4x", "restore_ms", 4, "restore"),
                                 ("checkpoint-2x", "save_ms", 2, "checkpoint")):
        rows, ok_all, ev = [], True, False
        for lab in meta["sizes"]:
            base = get("qemu-plain", lab, k)
            best, bm = fastest(lab, k)
            if base is None or best is None:
                rows.append(f"  - {lab}: not evaluable")
                ok_all = False
                continue
            ev = True
            ok = best * factor <= base
            ok_all &= ok
            each = ", ".join(f"{m} {base / get(m, lab, k):.1f}×" for m in new
                             if get(m, lab, k))
            rows.append(f"  - {lab}: plain {sec(base)} s, fastest {bm} {sec(best)} s = "
                        f"{base / best:.1f}× — {'met' if ok else 'NOT met'} ({each})")
        v = "met" if ev and ok_all else "not met" if ev else "not evaluable"
        res[key] = v
        out.append(f"**{what.capitalize()} at least {factor}× faster than the plain stream: "
                   f"{v.upper()}**")
        out += rows
        out.append("")
    rows, ok_all, ev = [], True, False
    for lab in meta["sizes"]:
        parts = []
        for k, ddk in (("save_ms", "write"), ("restore_ms", "read")):
            best, bm = fastest(lab, k)
            dd = get("dd", lab, k)
            if best is None or dd is None:
                parts.append(f"{ddk}: not evaluable")
                ok_all = False
                continue
            ev = True
            ok = best <= 2 * dd
            ok_all &= ok
            parts.append(f"{'checkpoint' if k == 'save_ms' else 'restore'} {bm} {sec(best)} s vs "
                         f"dd {ddk} {sec(dd)} s = {best / dd:.1f}× — {'met' if ok else 'NOT met'}")
        rows.append(f"  - {lab}: " + "; ".join(parts))
    v = "met" if ev and ok_all else "not met" if ev else "not evaluable"
    res["within-2x-dd"] = v
    out.append(f"**Fastest method within 2× of `dd` for the same bytes, both ways: {v.upper()}**")
    out += rows
    out.append("")
    rows, ok_all, ev = [], True, False
    for lab in meta["sizes"]:
        touched = get("cprd", lab, "bytes_written")
        if touched is None:
            rows.append(f"  - {lab}: not evaluable (no cprd checkpoint to tell touched RAM)")
            ok_all = False
            continue
        alloc = [(s["disk_bytes"], m) for m in new
                 for s in M.get(m, {}).get(lab, {}).get("samples", [])]
        if alloc:
            ev = True
            worst, wm = max(alloc)
            ok = worst <= touched * 1.01
            ok_all &= ok
            rows.append(f"  - {lab}: the largest of {len(alloc)} checkpoints ({wm}) allocates "
                        f"{worst / 2**20:.1f} MiB, touched RAM {touched / 2**20:.1f} MiB + 1% = "
                        f"{touched * 1.01 / 2**20:.1f} MiB — {'met' if ok else 'NOT met'}")
    v = "met" if ev and ok_all else "not met" if ev else "not evaluable"
    res["disk-touched"] = v
    out.append(f"**A checkpoint never allocates more disk than touched RAM + 1%: {v.upper()}** "
               "(touched RAM: the bytes cprd's method copies, i.e. the memfd's allocated pages)")
    out += rows
    out.append("")
    return res


def merge_section(section):
    B.merge_section(section, BEGIN, END)


def plot(data):
    M, meta = data["methods"], data["meta"]
    order = [m for m in meta["methods"] if m in M]
    rows = ["# size_mib " + " ".join(f"save:{m}" for m in order) + " "
            + " ".join(f"restore:{m}" for m in order)]
    for lab in meta["sizes"]:
        r = [str(parse_size(lab) >> 20)]
        for k in ("save_ms", "restore_ms"):
            for m in order:
                v = med(M[m].get(lab), k)
                r.append("?" if v is None else f"{v / 1000:.3f}")
        rows.append(" ".join(r))
    dat = os.path.join(RESULTS, "checkpoint.dat")
    with open(dat, "w") as f:
        f.write("\n".join(rows) + "\n")
    gp = shutil.which("gnuplot")
    if not gp:
        log("gnuplot not found: no PNG")
        return
    terms = subprocess.run([gp, "-e", "set terminal"], capture_output=True, text=True)
    term = "pngcairo" if "pngcairo" in terms.stdout + terms.stderr else "png"
    titles = "|".join(method_title(m).replace("`", "") for m in order)
    p = subprocess.run([gp, "-e", f"datafile='{dat}'; out='{RESULTS}/checkpoint.png'; "
                        f"term='{term}'; n={len(order)}; titles='{titles}'", PLOT_GP],
                       capture_output=True, text=True)
    if p.returncode != 0:
        log(f"gnuplot failed: {p.stderr.strip()[:500]}")


# ---------------------------------------------------------------- main

class Bench:
    def cell(self, m, size):
        return self.data["methods"].setdefault(m, {}).setdefault(
            size_label(size), {"status": "ok", "samples": []})

    def save(self):
        os.makedirs(RESULTS, exist_ok=True)
        tmp = os.path.join(RESULTS, ".checkpoint.json.tmp")
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1)
        os.replace(tmp, os.path.join(RESULTS, "checkpoint.json"))


def fs_of(path):
    p = subprocess.run(["df", "--output=fstype", path], capture_output=True, text=True)
    return (p.stdout.split() or ["?", "?"])[-1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", default=os.path.join(B.ROOT, "build"))
    ap.add_argument("--sizes", type=lambda s: [parse_size(x) for x in s.split(",") if x],
                    default=[1 << 30, 4 << 30, 8 << 30],
                    help="comma-separated guest memory sizes (default 1G,4G,8G)")
    ap.add_argument("--data-pct", type=int, default=25,
                    help="percent of guest RAM the guest fills with random data (default 25)")
    ap.add_argument("--channels", default="1,2,4",
                    help="multifd channel counts for --method qemu (default 1,2,4)")
    ap.add_argument("--reps", type=int, default=1, help="runs per size and method (default 1)")
    ap.add_argument("--dir", help="where checkpoints and dd's file go; on a disk, not a tmpfs "
                                  "(default a new directory under /var/tmp)")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the BENCHMARKS.md section and plot from checkpoint.json")
    args = ap.parse_args()
    if args.report_only:
        with open(os.path.join(RESULTS, "checkpoint.json")) as f:
            data = json.load(f)
        section, verdicts = write_section(data)
        merge_section(section)
        plot(data)
        log("report rewritten: " + ", ".join(f"{k} {v}" for k, v in verdicts.items()))
        return
    if not 1 <= args.data_pct <= 45:
        ap.error("--data-pct must be 1 to 45 (the guest's tmpfs holds at most half its RAM)")
    os.environ["CPRD_BUILD"] = os.path.abspath(args.build)
    sys.path.insert(0, os.path.join(B.ROOT, "tests", "integration"))
    import cprdtest

    bench = Bench()
    bench.args = args
    bench.channels = [int(c) for c in args.channels.split(",") if c]
    bench.qemu = shutil.which("qemu-system-x86_64")
    bench.kernel, bench.initrd = cprdtest.KERNEL, cprdtest.INITRD
    for f in (cprdtest.CPRD, cprdtest.CPRCTL, bench.kernel, bench.initrd):
        if not os.path.exists(f):
            sys.exit(f"bench: {f} missing: run `make all guest` first")
    if not bench.qemu:
        sys.exit("bench: qemu-system-x86_64 not found")
    if os.geteuid() != 0:
        sys.exit("bench: needs root (cprd, drop_caches)")
    bench.root = tempfile.mkdtemp(prefix="cprd-bench-ckpt-", dir=args.dir or "/var/tmp")
    methods = (["qemu-plain"] + [f"qemu-mr-{c}" for c in bench.channels] + ["cprd", "dd"])
    qv = subprocess.run([bench.qemu, "--version"], capture_output=True, text=True).stdout
    bench.data = {"meta": {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host_cpus": os.cpu_count(), "kernel": platform.release(), "accel": B.guest_accel(),
        "qemu_version": qv.splitlines()[0] if qv else "unknown", "fs": fs_of(bench.root),
        "sizes": [size_label(s) for s in args.sizes], "data_pct": args.data_pct,
        "reps": args.reps, "methods": methods, "finished": False},
        "methods": {m: {} for m in methods}}

    def on_signal(sig, frame):
        raise KeyboardInterrupt(f"signal {sig}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    t_start = mono()
    interrupted = False
    cprd = None
    log(f"bench-checkpoint: sizes {', '.join(size_label(s) for s in args.sizes)}, "
        f"{args.data_pct}% random data, channels {args.channels}, in {bench.root}")
    try:
        cprd = cprdtest.Daemon(["--checkpoint-dir", os.path.join(bench.root, "ckpt")],
                               perturb=False)
        cprd.start()
        PROCS.adopt(cprd.pid)
        for size in args.sizes:
            for step in (run_plain, lambda b, s: run_cprd_methods(b, cprd, s), run_dd):
                try:
                    step(bench, size)
                except Exception as e:  # noqa: BLE001 - one failure must not end the run
                    log(f"{size_label(size)}: FAILED: {e}")
                    bench.data.setdefault("failures", []).append(
                        {"size": size_label(size), "error": str(e)[:500]})
                bench.save()
        bench.data["meta"]["finished"] = True
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
        shutil.rmtree(bench.root, ignore_errors=True)
        bench.data["meta"]["duration_s"] = round(mono() - t_start, 1)
        bench.save()
    section, verdicts = write_section(bench.data)
    merge_section(section)
    plot(bench.data)
    log(f"bench-checkpoint: done in {mono() - t_start:.0f}s; verdicts: "
        + ", ".join(f"{k} {v}" for k, v in verdicts.items()))
    if interrupted:
        sys.exit(130)


if __name__ == "__main__":
    main()
