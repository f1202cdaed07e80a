"""No peer can starve the others (issue 9). Each attack runs as a real
unprivileged peer (uid nobody, through setpriv) against a cprd with no VMs:
one uid opening 1100 connections, connections that leave 16 fds in an
unfinished message while cprd runs out of fds, 40 connections that never
read their replies, one 256 KiB batch of vm.list calls, silent
connections. Each time root must still get answers, and cprd's RSS and fd
count must come back to where they were."""

import json
import os
import resource
import shutil
import subprocess
import time
import unittest

from cprdtest import (CPRCTL, CPRD, Conn, Daemon, fd_count, readable_copy, require_root, rss_kib,
                      sanitized,
                      wait_until, wrapper)

NOBODY = 65534
PY = "/usr/bin/python3"  # the system's: nobody may not read a user's own interpreter
PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "limits_peer.py")
BUSY, TOO_LARGE, TIMEOUT = -32003, -32007, -32010
STANDIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "standin_vmm.py")
# The stand-in VMMs run from the source tree, which a confined VMM's root
# does not hold: cprds with VMs here run them unconfined.
STANDINS = ["--no-confine"]


def create_standin(d, name):
    vmm = wrapper(d.dir, f"vmm-{name}", f"exec python3 {STANDIN} \"$@\"")
    return d.call("vm.create", {"name": name, "memory": str(32 << 20), "kernel": STANDIN,
                                "vmm": vmm})


def percentile(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def cpu_sec(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def nofile_limits(pid):
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError("no Max open files")


class Peer:
    """limits_peer.py as uid nobody; ready is what it reported once set up."""

    def __init__(self, d, mode, *args):
        self.p = subprocess.Popen(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", PY,
             readable_copy(PEER),
             d.sock, mode] + [str(a) for a in args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.p.stdout.readline()
        if not line:
            self.p.wait(10)
            raise AssertionError(f"the {mode} peer failed (status {self.p.returncode})")
        self.ready = json.loads(line)

    def release(self):
        """Let go of everything; returns its last report."""
        self.p.stdin.close()
        out = self.p.stdout.read()
        self.p.wait(30)
        lines = [json.loads(x) for x in out.splitlines() if x.strip()]
        return lines[0] if lines else {}

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


class Limits(unittest.TestCase):
    def setUp(self):
        require_root(self)
        if not shutil.which("setpriv") or not os.access(PY, os.X_OK):
            self.skipTest("needs setpriv and /usr/bin/python3 to run a peer as nobody")
        self.d = None
        self.peers = []

    def tearDown(self):
        for p in self.peers:
            p.kill()
        if self.d:
            self.d.stop()

    def start(self, *args, soft_nofile=None):
        """cprd that nobody may connect to. soft_nofile: the soft limit it
        is started with (the hard one stays)."""
        saved = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft_nofile:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft_nofile, saved[1]))
        try:
            self.d = Daemon(list(args)).start()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, saved)
        os.chmod(self.d.dir, 0o755)
        os.chmod(self.d.sock, 0o666)
        self.d.call("daemon.status")  # warm: what any first call allocates
        time.sleep(0.2)
        self.base_rss = rss_kib(self.d.pid)
        self.base_fds = self.d.settled_fds()

    def peer(self, mode, *args):
        p = Peer(self.d, mode, *args)
        self.peers.append(p)
        return p

    def assert_root_answers(self, timeout=10):
        p = self.d.cprctl("status", timeout=timeout)
        self.assertEqual(p.returncode, 0, f"root's cprctl status failed: {p.stderr}")
        self.assertIn("version", p.stdout)

    def assert_back_to_baseline(self, rss_slack_kib=8192):
        wait_until(lambda: fd_count(self.d.pid) <= self.base_fds, 20,
                   f"cprd's fds to return to {self.base_fds} (are {fd_count(self.d.pid)})")
        if sanitized():
            return
        wait_until(lambda: rss_kib(self.d.pid) <= self.base_rss + rss_slack_kib, 20,
                   f"cprd's RSS to return near {self.base_rss} KiB "
                   f"(is {rss_kib(self.d.pid)} KiB)")

    def test_one_uid_cannot_lock_root_out(self):
        self.start()
        flood = self.peer("flood", 1100)
        # Its share (64 by default); the rest hear why and are closed.
        self.assertGreaterEqual(flood.ready["refused"], 1100 - 64, flood.ready)
        self.assertIn(f"too many connections from uid {NOBODY} (at most 64); closed",
                      flood.ready["errors"])
        self.assertEqual(set(flood.ready["errors"].values()), {BUSY})
        self.assert_root_answers()
        # And another unprivileged uid is not locked out by this one either.
        self.assertLessEqual(fd_count(self.d.pid), self.base_fds + 64 + 2)
        # Logged, but not once per refusal.
        self.assertLessEqual(self.d.read_log().count("refused a connection"), 2)
        flood.release()
        self.assert_back_to_baseline()

    def test_soft_fd_limit_is_raised_to_the_hard_one(self):
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if hard != resource.RLIM_INFINITY and hard <= 1024:
            self.skipTest(f"the hard RLIMIT_NOFILE here is {hard}: nothing to raise to")
        self.start(soft_nofile=1024)
        self.assertEqual(nofile_limits(self.d.pid)[0], nofile_limits(self.d.pid)[1])
        # Now 64 connections with 16 fds each in an unfinished message fit.
        hoard = self.peer("hoard", 64)
        self.assertEqual(hoard.ready["opened"], 64)
        wait_until(lambda: fd_count(self.d.pid) >= self.base_fds + 64 * 17, 10,
                   "cprd to hold the peer's connections and fds")
        self.assert_root_answers()
        hoard.release()
        self.assert_back_to_baseline()

    def test_out_of_fds_accepting_pauses_instead_of_spinning(self):
        self.start()
        # Few fds to run out of: the peer's connections take them all, and
        # more wait in the listening socket's backlog. (Fds sent with a
        # message would not do: out of fds, the kernel truncates them and
        # cprd closes that connection.)
        resource.prlimit(self.d.pid, resource.RLIMIT_NOFILE, (self.base_fds + 40,) * 2)
        hoard = self.peer("flood", 60)
        wait_until(lambda: fd_count(self.d.pid) >= self.base_fds + 40 - 1, 10,
                   "cprd to run out of fds")
        # cprd still has connections it cannot accept waiting: it must wait too.
        c0, t0 = cpu_sec(self.d.pid), time.monotonic()
        time.sleep(2)
        used = (cpu_sec(self.d.pid) - c0) / (time.monotonic() - t0)
        self.assertLess(used, 0.25, f"cprd used {used:.0%} of a CPU while out of fds")
        # Root asks meanwhile and gets its answer once the peer lets go.
        root = subprocess.Popen([CPRCTL, "status"], env=dict(os.environ, CPRD_SOCKET=self.d.sock),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
        hoard.release()
        out, err = root.communicate(timeout=20)
        self.assertEqual(root.returncode, 0, err)
        self.assertIn("version", out)
        self.assert_root_answers()
        log = self.d.read_log()
        self.assertIn("cannot accept a connection: Too many open files", log)
        self.assertLessEqual(log.count("cannot accept a connection"), 2, log[-2000:])
        self.assert_back_to_baseline()

    def test_unread_replies_are_bounded_for_all_clients_together(self):
        self.start()
        unread = self.peer("unread", 40)
        peak, end = 0, time.monotonic() + 8
        while time.monotonic() < end:
            peak = max(peak, rss_kib(self.d.pid))
            time.sleep(0.1)
        self.assert_root_answers()
        # Over its share for 10 s, or over it with the budget spent: dropped.
        # (How soon depends on how fast the peer can send: slow on a busy
        # host, the more so against the ASan build.)
        wait_until(lambda: "does not read its replies" in self.d.read_log()
                   or "stayed over its share" in self.d.read_log(), 90,
                   "cprd to drop a peer that does not read")
        out = unread.release()
        # 64 MiB for all clients' unread replies, plus what is being built.
        if not sanitized():
            self.assertLess(peak - self.base_rss, 120 * 1024,
                            f"cprd grew by {(peak - self.base_rss) // 1024} MiB")
        self.assertGreater(out["dropped"], 0, "cprd never dropped a peer that does not read")
        self.assert_back_to_baseline()

    def test_a_batch_is_capped_and_costs_little(self):
        self.start()
        batch = self.peer("batch")
        self.assertGreater(batch.ready["calls"], 256)
        self.assertEqual(batch.ready["replies"], 1, "one error, not an answer per call")
        err = batch.ready["reply"]["error"]
        self.assertEqual(err["code"], TOO_LARGE)
        self.assertIn("exceeds the limit of 256 calls per batch", err["message"])
        self.assert_root_answers()
        batch.release()
        self.assert_back_to_baseline(rss_slack_kib=4096)
        # 256 calls are still one answer each.
        c = Conn(self.d.sock)
        c.send_raw("[" + ",".join(f'{{"jsonrpc":"2.0","method":"vm.list","id":{i}}}'
                                  for i in range(256)) + "]\n")
        reply = c.recv_line()
        c.close()
        self.assertEqual(sorted(r["id"] for r in reply), list(range(256)))

    def test_idle_connections_are_closed_active_ones_are_not(self):
        self.start("--idle-timeout", "2")
        idle = self.peer("idle", 5)
        self.assertGreaterEqual(idle.ready["after"], 1.5)
        self.assertLess(idle.ready["after"], 6)
        for line in idle.ready["said"]:
            err = json.loads(line)["error"]
            self.assertEqual(err["code"], TIMEOUT)
            self.assertIn("idle for 2 s", err["message"])
        # A connection that keeps asking is not cut.
        busy = Conn(self.d.sock)
        for _ in range(8):
            busy.call("vm.list")
            time.sleep(0.5)
        busy.close()
        idle.release()
        self.assert_back_to_baseline()

    def test_subscribers_count_against_the_reply_budget(self):
        # Each subscriber may queue 16 MiB of events, 60 of them together
        # far more than the 64 MiB budget for unread replies. (Issue 18: 640
        # subscribers held 1.17 GB, and kept it after they left.)
        self.start("--events-max-queued", str(16 << 20), *STANDINS)
        create_standin(self.d, "ev")
        subs = self.peer("subscribe", 60)
        self.assertEqual(subs.ready["subscribed"], 60)
        c = self.d.conn()
        peak = 0
        # About 20000 events of about 160 bytes: 3 MiB for each subscriber,
        # 190 MiB for all of them were they not bounded together.
        for i in range(10000):
            c.call("vm.pause", {"name": "ev"})
            c.call("vm.resume", {"name": "ev"})
            if i % 500 == 0:
                peak = max(peak, rss_kib(self.d.pid))
        peak = max(peak, rss_kib(self.d.pid))
        c.close()
        self.assert_root_answers()
        if not sanitized():
            # 64 MiB for all unread replies and events, and what is in flight.
            self.assertLess(peak - self.base_rss, 100 * 1024,
                            f"cprd grew by {(peak - self.base_rss) // 1024} MiB")
        self.assertTrue("dropping its event subscription: it does not read its events and the "
                        "budget for unread replies is spent" in self.d.read_log(),
                        "no subscriber was dropped for the budget")
        self.d.destroy_all()
        subs.release()
        # Back within 10% (at least 8 MiB) of where it started.
        self.assert_back_to_baseline(rss_slack_kib=max(8192, self.base_rss // 10))

    def test_root_waits_behind_one_call_per_unprivileged_connection(self):
        self.start(*STANDINS)
        for name in ("l1", "l2", "l3", "l4"):
            create_standin(self.d, name)
        c = self.d.conn()

        def root_latencies(n):
            out = []
            for _ in range(n):
                t0 = time.monotonic()
                c.call("vm.list")
                out.append(time.monotonic() - t0)
                time.sleep(0.02)
            return out
        quiet = root_latencies(20)
        # 64 connections (all one uid may have), each with one batch of 256
        # vm.list {"outdated": true} in flight: issue 18 measured root
        # waiting 16 s behind them.
        flood = self.peer("lister", 64)
        time.sleep(1)
        busy = root_latencies(40)
        report = flood.release()
        c.close()
        # The flood lasted the whole measurement: no lister connection was
        # closed (the peer would have exited non-zero), so each had its
        # batch in flight (resent as soon as answered) all along.
        self.assertEqual(flood.p.returncode, 0, f"a lister's connection was closed: {report}")
        p95 = percentile(busy, 0.95)
        # A bound that holds on a loaded 2-core host: root waits behind one
        # call of each of 64 connections, not behind 64 batches of 256.
        self.assertLess(p95, 0.25 if not sanitized() else 1.0,
                        f"root's vm.list took {p95 * 1000:.0f} ms (p95) under the flood, "
                        f"{percentile(quiet, 0.95) * 1000:.1f} ms without; max "
                        f"{max(busy) * 1000:.0f} ms")
        self.d.destroy_all()

    def test_hangups_mid_message_are_logged_at_most_once_in_a_while(self):
        self.start()
        hang = self.peer("hangup", 2000)
        self.assertEqual(hang.ready["hung_up"], 2000)
        self.assert_root_answers()  # the hang-ups before it were handled
        log = self.d.read_log()
        lines = log.count("hung up in the middle of a message")
        self.assertGreaterEqual(lines, 1, log[-2000:])
        # One a 10 s; the run takes a few seconds at most.
        self.assertLessEqual(lines, 2, f"{lines} lines for 2000 hang-ups")
        hang.release()
        self.assert_back_to_baseline()


if __name__ == "__main__":
    unittest.main()
