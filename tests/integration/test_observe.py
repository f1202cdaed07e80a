"""Metrics and events (issue 13, parts 3 and 4), against a real cprd.

Metrics are scraped through Debian's real prometheus-node-exporter, reading
the file cprd keeps with --metrics-file through its textfile collector, after
real updates. The VMs run on stand-in VMMs (standin_vmm.py, as in
test_faults.py): they take part in real handover and cpr-transfer updates, so
no guest has to boot under TCG. One events test runs the real QEMU and guest
for the crash.

Events are followed with `cprctl events` as an operator runs it and on a raw
connection, for the exact JSON-RPC notifications. A subscriber that never
reads is dropped with a last "dropped" event, and what cprd queued for it
stays bounded."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import unittest
import urllib.request

from cprdtest import (CPRCTL, CPRD, Daemon, GuestTest, RpcError, guest_accel, require_guest,
                      require_root, rss_kib, sanitized,
                      wait_until, wrapper)

# The stand-in VMMs run from the source tree, which a confined VMM's root
# does not hold: these cprds run them unconfined (test_confine covers that).
STANDINS = ["--no-confine"]

HERE = os.path.dirname(os.path.abspath(__file__))
STANDIN = os.path.join(HERE, "standin_vmm.py")
MEMORY = 32 << 20
NODE_EXPORTER = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")

SAMPLE_RE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text):
    """{(name, frozenset(labels)): value} of a text exposition; also checks
    that every sample's family was declared by a TYPE line before it."""
    out, typed = {}, set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        if not line or line.startswith("#"):
            continue
        m = SAMPLE_RE.match(line)
        if not m:
            raise AssertionError(f"not an exposition line: {line!r}")
        name, labels, value = m.groups()
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        if name not in typed and family not in typed:
            raise AssertionError(f"{name} has no TYPE line before it")
        out[(name, frozenset(LABEL_RE.findall(labels or "")))] = float(value)
    return out


def sample(metrics, name, **labels):
    key = (name, frozenset(labels.items()))
    if key not in metrics:
        raise AssertionError(f"no sample {name}{labels}; have: "
                             + ", ".join(sorted(n for n, _ in metrics if n.startswith("cprd")))[:2000])
    return metrics[key]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port




def standin_vmm(d, name, fault=""):
    return wrapper(d.dir, name, f"STANDIN_FAULT={fault} exec python3 {STANDIN} \"$@\"")


def create_standin(d, name):
    return d.call("vm.create", {"name": name, "memory": str(MEMORY), "kernel": STANDIN,
                                "vmm": standin_vmm(d, f"vmm-{name}")})


def update(d, name, strategy, vmm):
    """The update's report, whether it succeeded or not."""
    c = d.conn(timeout=120)
    try:
        reply = c.call_full("vm.update", {"name": name, "vmm": vmm, "strategy": strategy,
                                          "timeout": 30})
    finally:
        c.close()
    if "result" in reply:
        return reply["result"]
    data = reply["error"].get("data")
    if not isinstance(data, dict):
        raise RpcError(reply["error"])
    return data


class NodeExporter:
    """Debian's node_exporter with the textfile collector alone, on a free
    loopback port."""

    def __init__(self, textfile_dir):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [NODE_EXPORTER, "--collector.disable-defaults", "--collector.textfile",
             f"--collector.textfile.directory={textfile_dir}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        def up():
            if self.proc.poll() is not None:
                raise AssertionError("node_exporter exited: "
                                     + self.proc.stderr.read().decode(errors="replace"))
            try:
                self.scrape()
                return True
            except OSError:
                return False
        wait_until(up, 30, "node_exporter to serve /metrics")

    def scrape(self):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            return r.read().decode()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stderr.close()


class MetricsTest(unittest.TestCase):
    def setUp(self):
        require_root(self)
        if not NODE_EXPORTER:
            raise unittest.SkipTest("prometheus-node-exporter not installed (make deps)")
        self.d = None
        self.ne = None
        self.textdir = None

    def tearDown(self):
        if self.ne:
            self.ne.stop()
        if self.d:
            self.d.stop()
        if self.textdir:
            shutil.rmtree(self.textdir, ignore_errors=True)

    def scraped(self, pred, what):
        """node_exporter's view once pred(metrics) holds."""
        last = {}

        def ok():
            last["m"] = parse_metrics(self.ne.scrape())
            return pred(last["m"])
        try:
            wait_until(ok, 15, what, interval=0.2)
        except AssertionError:
            cprd = {k: v for k, v in last.get("m", {}).items() if k[0].startswith("cprd")}
            raise AssertionError(f"{what}; node_exporter serves: {sorted(cprd.items())}")
        return last["m"]

    def test_node_exporter_scrape_after_updates(self):
        import tempfile
        self.textdir = tempfile.mkdtemp(prefix="cprd-textfile-")
        os.chmod(self.textdir, 0o755)
        prom = os.path.join(self.textdir, "cprd.prom")
        self.d = d = Daemon(["--metrics-file", prom, "--metrics-interval", "0.2"] + STANDINS).start()
        self.ne = NodeExporter(self.textdir)
        status = d.call("daemon.status")

        create_standin(d, "m1")
        reports = [
            update(d, "m1", "handover", standin_vmm(d, "new-1")),
            update(d, "m1", "cpr-transfer", standin_vmm(d, "new-2")),
            # The new VMM exits before its monitor exists: a rollback.
            update(d, "m1", "handover", standin_vmm(d, "new-3", "at-start:exit")),
        ]
        self.assertEqual([r["result"] for r in reports], ["ok", "ok", "rolled-back"], reports)
        fds = d.call("daemon.status")["fds_held"]

        def after_updates(m):
            return (m.get(("cprd_updates_total",
                           frozenset({("strategy", "handover"), ("result", "rolled-back")})))
                    == 1 and m.get(("cprd_fds_held", frozenset())) == fds)
        m = self.scraped(after_updates, "node_exporter to serve cprd's counts of 3 updates")
        # node_exporter read the file whole and found nothing to complain of.
        self.assertEqual(sample(m, "node_textfile_scrape_error"), 0)
        self.assertEqual(sample(m, "cprd_build_info", version=status["version"]), 1)
        self.assertEqual(sample(m, "cprd_start_info", start_mode="fresh"), 1)
        self.assertEqual(sample(m, "cprd_updates_total", strategy="handover", result="ok"), 1)
        self.assertEqual(sample(m, "cprd_updates_total", strategy="cpr-transfer", result="ok"), 1)
        self.assertEqual(sample(m, "cprd_updates_total", strategy="cpr-transfer",
                                result="rolled-back"), 0)
        self.assertEqual(sample(m, "cprd_vms", state="running"), 1)
        self.assertEqual(sample(m, "cprd_vms", state="crashed"), 0)
        self.assertEqual(sample(m, "cprd_vms_created_total"), 1)
        self.assertEqual(sample(m, "cprd_vmms_outdated"), 0)
        # The blackout histogram holds exactly the blackouts the reports gave.
        for strategy in ("handover", "cpr-transfer"):
            secs = [r["blackout_ms"] / 1000 for r in reports
                    if r["strategy"] == strategy and r["blackout_ms"] is not None]
            self.assertEqual(sample(m, "cprd_update_blackout_seconds_count",
                                    strategy=strategy), len(secs))
            self.assertAlmostEqual(sample(m, "cprd_update_blackout_seconds_sum",
                                          strategy=strategy), sum(secs), places=5)
            for le in ("0.001", "0.01", "0.1", "1", "5", "+Inf"):
                bound = float("inf") if le == "+Inf" else float(le)
                self.assertEqual(sample(m, "cprd_update_blackout_seconds_bucket",
                                        strategy=strategy, le=le),
                                 len([s for s in secs if s <= bound]), f"{strategy} le={le}")
        # Written atomically: no temp file is left where node_exporter reads.
        self.assertEqual(sorted(os.listdir(self.textdir)), ["cprd.prom"])
        self.assertEqual(os.stat(prom).st_mode & 0o777, 0o644)

        # The counters outlive the VM.
        d.call("vm.destroy", {"name": "m1"})
        # Wait for the VM to be gone in every state: a scrape taken while
        # it was still stopping shows it neither running nor destroyed.
        def gone(m):
            held = sum(v for k, v in m.items() if k[0] == "cprd_vms")
            return held == 0 and m.get(("cprd_vms_destroyed_total",
                                        frozenset({("reason", "destroyed")}))) == 1
        m = self.scraped(gone, "node_exporter to serve the VM gone")
        self.assertEqual(sample(m, "cprd_updates_total", strategy="handover", result="ok"), 1)
        self.assertEqual(sample(m, "cprd_vms_destroyed_total", reason="destroyed"), 1)
        self.assertEqual(sample(m, "cprd_fds_held"), 0)

        # ... and cprd's re-execution, from the state directory.
        before = parse_metrics(d.cprctl("metrics", check=True).stdout)
        d.call("daemon.reexec")
        wait_until(lambda: self._start_mode() == "re-exec", 30, "cprd to re-execute")
        after = parse_metrics(d.cprctl("metrics", check=True).stdout)
        self.assertEqual(sample(after, "cprd_start_info", start_mode="re-exec"), 1)
        for key, value in before.items():
            if key[0].endswith("_total") or "_blackout_" in key[0]:
                self.assertEqual(after.get(key), value, f"{key} after the re-exec")
        m = self.scraped(lambda m: m.get(("cprd_start_info",
                                          frozenset({("start_mode", "re-exec")}))) == 1,
                         "node_exporter to serve the re-executed cprd's file")
        self.assertEqual(sample(m, "cprd_updates_total", strategy="cpr-transfer", result="ok"), 1)

    def _start_mode(self):
        try:
            return self.d.call("daemon.status")["start_mode"]
        except (OSError, EOFError, RpcError):
            return None

    def test_metrics_verb_and_method(self):
        self.d = d = Daemon(STANDINS).start()
        res = d.call("daemon.metrics")
        self.assertEqual(res["content_type"], "text/plain; version=0.0.4")
        m = parse_metrics(res["text"])
        self.assertEqual(sample(m, "cprd_vms", state="running"), 0)
        out = d.cprctl("metrics", check=True).stdout
        self.assertEqual(sample(parse_metrics(out), "cprd_start_info", start_mode="fresh"), 1)
        with self.assertRaises(RpcError):
            d.call("daemon.metrics", {"bogus": 1})


class EventFollower:
    """`cprctl events` (--json or not) in the background, its lines kept."""

    def __init__(self, d, json_lines):
        env = dict(os.environ, CPRD_SOCKET=d.sock)
        self.proc = subprocess.Popen([CPRCTL, "events"] + (["--json"] if json_lines else []),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        self.lines = []
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def events(self):
        return [json.loads(l) for l in list(self.lines)]

    def wait(self, pred, what, timeout=60):
        wait_until(lambda: pred(list(self.lines)), timeout,
                   f"{what}; `cprctl events` printed: {self.lines[-20:]}", interval=0.05)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(10)
        self.t.join(5)
        err = self.proc.stderr.read()
        self.proc.stderr.close()
        self.proc.stdout.close()
        return err


def subscribe_raw(d, rcvbuf=None):
    c = d.conn(timeout=30)
    if rcvbuf:
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    res = c.call("events.subscribe")
    return c, res


class EventsTest(unittest.TestCase):
    def setUp(self):
        require_root(self)
        self.d = Daemon(STANDINS).start()
        self.followers = []

    def tearDown(self):
        for f in self.followers:
            f.stop()
        self.d.stop()

    def follow(self, json_lines):
        f = EventFollower(self.d, json_lines)
        self.followers.append(f)
        # Subscribed once cprd counts it.
        wait_until(lambda: "cprd_event_subscribers " + str(len(self.followers)) in
                   self.d.call("daemon.metrics")["text"], 10, "cprctl events to subscribe")
        return f

    def test_create_update_crash(self):
        d = self.d
        nd = self.follow(True)
        human = self.follow(False)
        raw, res = subscribe_raw(d)
        self.assertTrue(res["subscribed"])
        first_seq = res["seq"] + 1

        vm = create_standin(d, "e1")
        rep = update(d, "e1", "handover", standin_vmm(d, "new-e1"))
        self.assertEqual(rep["result"], "ok", rep)
        new_pid = d.call("vm.status", {"name": "e1"})["pid"]
        os.kill(new_pid, signal.SIGKILL)
        nd.wait(lambda ls: any(json.loads(l)["kind"] == "crashed" for l in ls), "a crashed event")

        evs = nd.events()
        kinds = [e["kind"] for e in evs]
        for k in ("created", "state", "update-started", "update-finished", "crashed"):
            self.assertIn(k, kinds)
        # In order, without gaps.
        self.assertEqual([e["seq"] for e in evs], list(range(evs[0]["seq"],
                                                             evs[0]["seq"] + len(evs))))
        created = evs[kinds.index("created")]
        self.assertEqual((created["vm"], created["state"]), ("e1", "starting"))
        self.assertLess(kinds.index("created"), kinds.index("update-started"))
        running = [e for e in evs if e["kind"] == "state" and e["state"] == "running"]
        self.assertEqual(running[0]["from"], "starting")
        started = evs[kinds.index("update-started")]
        self.assertEqual((started["strategy"], started["old_pid"]), ("handover", vm["pid"]))
        finished = evs[kinds.index("update-finished")]
        self.assertLess(kinds.index("update-started"), kinds.index("update-finished"))
        self.assertEqual(finished["result"], "ok")
        self.assertEqual(finished["report"]["new_pid"], new_pid)
        self.assertEqual(finished["report"]["blackout_ms"], rep["blackout_ms"])
        crashed = evs[kinds.index("crashed")]
        self.assertEqual((crashed["vm"], crashed["pid"], crashed["exit_code"], crashed["signal"]),
                         ("e1", new_pid, 128 + signal.SIGKILL, signal.SIGKILL), crashed)
        self.assertIn("killed by signal", crashed["exit"])
        self.assertIn({"kind": "state", "from": "running", "state": "crashed"},
                      [{k: e.get(k) for k in ("kind", "from", "state")} for e in evs])

        # The human form: one line per event, time, kind, VM, fields.
        human.wait(lambda ls: any(" crashed e1 " in l for l in ls), "the crash as a line")
        line = [l for l in human.lines if " crashed e1 " in l][0]
        self.assertRegex(line, r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}[+-]\d{4} crashed e1 ")
        self.assertIn(f"pid={new_pid}", line)
        self.assertIn("signal=9", line)
        self.assertEqual(len(human.lines), len(evs))

        # On the wire: JSON-RPC 2.0 notifications, no id, the same events.
        raw_evs = []
        while len(raw_evs) < len(evs):
            msg = raw.recv_line()
            self.assertEqual(set(msg), {"jsonrpc", "method", "params"}, msg)
            self.assertEqual((msg["jsonrpc"], msg["method"]), ("2.0", "event"))
            raw_evs.append(msg["params"])
        self.assertEqual(raw_evs, evs)
        self.assertEqual(raw_evs[0]["seq"], first_seq)

        d.call("vm.destroy", {"name": "e1"})
        nd.wait(lambda ls: any('"destroyed"' in l for l in ls), "a destroyed event")
        gone = [e for e in nd.events() if e["kind"] == "destroyed"][0]
        self.assertEqual((gone["vm"], gone["reason"]), ("e1", "destroyed"))
        raw.close()

    def test_slow_subscriber_dropped(self):
        """A subscriber that reads nothing is dropped past the cap, told why,
        and never makes cprd hold more than that."""
        self.d.stop()
        cap = 64 << 10
        self.d = d = Daemon(["--events-max-queued", str(cap)] + STANDINS).start()
        create_standin(d, "s1")
        fail = standin_vmm(d, "fail", "at-start:exit")
        # A reader that keeps up, to see that only the slow one goes.
        good = self.follow(True)
        slow, _ = subscribe_raw(d, rcvbuf=4096)
        rss0 = rss_kib(d.pid)
        t0 = time.monotonic()
        n = 0
        while "cprd_event_subscribers_dropped_total 1" not in d.call("daemon.metrics")["text"]:
            self.assertLess(time.monotonic() - t0, 120, "the slow subscriber was never dropped")
            self.assertEqual(update(d, "s1", "handover", fail)["result"], "rolled-back")
            n += 1
        # More after the drop: nothing more is queued for it. Within 4 s:
        # cprd closes a dropped subscriber that has read nothing for 10 s,
        # and the "dropped" notice would then never reach it.
        k, t1 = 0, time.monotonic()
        while k < 2 * n and time.monotonic() - t1 < 4:
            update(d, "s1", "handover", fail)
            k += 1
        rss1 = rss_kib(d.pid)
        self.assertIn("dropping its event subscription", d.read_log())
        self.assertIn("cprd_event_subscribers 1\n", d.call("daemon.metrics")["text"])

        # What it gets when it reads at last: the events up to the drop, in
        # order, then "dropped", then the end of the connection.
        got, nbytes = [], 0
        slow.sock.settimeout(10)
        try:
            while True:
                msg = slow.recv_line()
                nbytes += len(json.dumps(msg["params"])) + 1
                got.append(msg["params"])
        except EOFError:
            pass
        self.assertEqual(got[-1]["kind"], "dropped", got[-3:])
        self.assertIn("does not read", got[-1]["reason"])
        seqs = [e["seq"] for e in got]
        self.assertEqual(seqs, list(range(seqs[0], seqs[0] + len(seqs))))
        # The good reader saw every update, the slow one a third at most:
        # bounded by the cap plus what the kernel buffers.
        good.wait(lambda ls: sum('"update-finished"' in l for l in ls) == n + k,
                  "the good subscriber to see every update")
        total = sum(len(l) + 1 for l in good.lines)
        self.assertLess(nbytes, cap + (1 << 20), f"the slow subscriber got {nbytes} bytes")
        # Nothing queued after the drop: of the n + k updates, the slow one
        # saw at most the n before it.
        self.assertGreater(k, 0, "no update ran after the drop")
        seen = sum(e["kind"] == "update-finished" for e in got)
        self.assertLessEqual(seen, n, f"the slow one saw {seen} updates, {n} ran before the "
                             f"drop ({nbytes} bytes of {total})")
        # ASan keeps freed memory in quarantine: its RSS grows with every
        # allocation, bounded or not. There the bytes above are the proof.
        if not sanitized():
            self.assertLess(rss1 - rss0, 16 << 10,
                            f"cprd's RSS grew from {rss0} to {rss1} KiB over {3 * n} updates")
        slow.close()


class GuestCrashEventTest(GuestTest):
    """The real QEMU and guest: a VMM killed under a running guest is told
    as a crash with its exit status."""

    def test_qemu_killed(self):
        f = EventFollower(self.d, True)
        try:
            wait_until(lambda: "cprd_event_subscribers 1" in self.d.call("daemon.metrics")["text"],
                       10, "cprctl events to subscribe")
            vm = self.d.create_guest("g1")
            os.kill(vm["pid"], signal.SIGKILL)
            f.wait(lambda ls: any(json.loads(l)["kind"] == "crashed" for l in ls),
                   "a crashed event", timeout=30)
            evs = f.events()
            crashed = [e for e in evs if e["kind"] == "crashed"][0]
            self.assertEqual((crashed["vm"], crashed["pid"], crashed["signal"]),
                             ("g1", vm["pid"], signal.SIGKILL))
            self.assertEqual(self.d.call("vm.status", {"name": "g1"})["state"], "crashed")
            m = parse_metrics(self.d.call("daemon.metrics")["text"])
            self.assertEqual(sample(m, "cprd_vm_crashes_total"), 1)
            self.assertEqual(sample(m, "cprd_vms", state="crashed"), 1)
        finally:
            f.stop()


if __name__ == "__main__":
    unittest.main()
