"""Nothing on cprd's event loop waits for a VMM: a VMM's start is a request
to the launcher whose answer arrives on the loop, so cprd answers everyone
else while starts are in flight, and a start let go of meanwhile leaves no
process behind. The launcher is held still with SIGSTOP, so "in flight" is
a state the tests set up, not a race they hope to win. Also: the loop's own
counters (daemon.status "loop", daemon.stats) exist, count and reset.
Timings are never asserted here."""

import json
import os
import signal
import unittest

from cprdtest import (INITRD, KERNEL, GUEST_APPEND, Daemon, GuestTest, RpcError,
                      SharedDaemonTest, children, fd_count, require_root, wait_until)
from test_custody import as_user

VMM_FAILED, PERM = -32005, -32002


def launcher_pid(d):
    pids = [p for p, (comm, _) in children(d.pid).items() if comm == "cprd-launcher"]
    assert len(pids) == 1, children(d.pid)
    return pids[0]


def proc_state(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(") ", 1)[1][0]


def guest_params(name, **extra):
    p = {"name": name, "memory": "256M", "kernel": KERNEL, "initrd": INITRD,
         "append": GUEST_APPEND}
    p.update(extra)
    return p


def not_a_program(dir):
    """Executable, so every check before the exec passes; the exec itself
    then fails with ENOEXEC, inside the launcher."""
    path = os.path.join(dir, "not-a-program")
    with open(path, "w") as f:
        f.write("this is text, not a program\n")
    os.chmod(path, 0o755)
    return path


class HeldLauncher(GuestTest):
    """Each test has its own cprd, and may stop or kill its launcher."""

    def setUp(self):
        super().setUp()
        self.launcher = launcher_pid(self.d)
        self.stopped = False

    def tearDown(self):
        if self.stopped:
            self.resume_launcher()
        super().tearDown()

    def stop_launcher(self):
        os.kill(self.launcher, signal.SIGSTOP)
        self.stopped = True
        wait_until(lambda: proc_state(self.launcher) == "T", 5, "the launcher to stop")

    def resume_launcher(self):
        self.stopped = False
        try:
            os.kill(self.launcher, signal.SIGCONT)
        except ProcessLookupError:
            pass

    def vm(self, name):
        for vm in self.d.call("vm.list", timeout=5)["vms"]:
            if vm["name"] == name:
                return vm
        return None

    def settled_children(self, expected):
        """cprd's children come back to exactly these pids, none a zombie."""
        wait_until(lambda: set(children(self.d.pid)) == set(expected), 10,
                   f"cprd's children to be {sorted(expected)} (are {children(self.d.pid)})")
        self.assertFalse([p for p, (_, st) in children(self.d.pid).items() if st == "Z"])

    def test_vm_list_is_answered_while_a_start_is_in_flight(self):
        self.stop_launcher()
        creating = self.d.conn()
        creating.request("vm.create", guest_params("inflight"))
        # cprd answers others while the launcher holds the start; with a
        # 5 s timeout, a cprd that waited for the launcher fails here.
        vm = wait_until(lambda: self.vm("inflight"), 5, "the VM to be listed")
        self.assertEqual(vm["state"], "starting")
        self.assertIsNone(vm["pid"], "no pid before the launcher has answered")
        self.assertEqual(self.d.call("daemon.status", timeout=5)["vms"], 1)
        self.assertEqual(proc_state(self.launcher), "T", "the start was in flight throughout")
        # The registry never names a VM that is only starting.
        with open(os.path.join(self.d.dir, "registry.json")) as f:
            self.assertEqual(json.load(f)["vms"], [])
        self.resume_launcher()
        reply = creating.recv_line()
        creating.close()
        self.assertNotIn("error", reply, reply)
        self.assertEqual(reply["result"]["state"], "running")
        self.assertIn(reply["result"]["pid"], children(self.d.pid))
        self.d.call("vm.destroy", {"name": "inflight"})

    def test_starts_in_flight_at_once_each_get_their_own_answer(self):
        bad = not_a_program(self.d.dir)
        self.stop_launcher()
        conns = {}
        for name, extra in (("a", {"vmm": bad}), ("b", {}), ("c", {"vmm": "/bin/false"}),
                            ("d", {"vmm": bad})):
            conns[name] = self.d.conn()
            conns[name].request("vm.create", guest_params(name, **extra))
        wait_until(lambda: len(self.d.call("vm.list", timeout=5)["vms"]) == 4, 5,
                   "four VMs starting")
        self.resume_launcher()
        replies = {}
        for name, c in conns.items():
            replies[name] = c.recv_line()
            c.close()
        for name in ("a", "d"):
            self.assertEqual(replies[name]["error"]["code"], VMM_FAILED)
            self.assertIn(f"cannot execute VMM '{bad}': Exec format error",
                          replies[name]["error"]["message"])
        self.assertEqual(replies["c"]["error"]["code"], VMM_FAILED)
        self.assertIn("exited with status 1", replies["c"]["error"]["message"])
        self.assertEqual(replies["b"]["result"]["state"], "running")
        self.assertEqual([vm["name"] for vm in self.d.call("vm.list")["vms"]], ["b"])
        self.d.call("vm.destroy", {"name": "b"})
        self.settled_children([self.launcher])

    def test_update_given_up_while_its_vmm_is_starting_leaves_nothing(self):
        old = self.d.create_guest("ab")["pid"]
        self.stop_launcher()
        p = self.d.cprctl("update", "ab", "--json", "--timeout", "1")
        rep = json.loads(p.stdout)
        self.assertEqual(p.returncode, 1, p.stderr)
        self.assertEqual(rep["result"], "rolled-back")
        self.assertIn("timed out while starting the new VMM", rep["error"])
        self.assertIsNone(rep["new_pid"], "the new VMM never had a pid")
        self.assertEqual(self.d.call("vm.status", {"name": "ab"})["pid"], old)
        # The launcher starts the new VMM only now, after the update gave
        # it up: its answer must end that VMM, and cprd reap it.
        self.resume_launcher()
        wait_until(lambda: "its start was abandoned; killed it" in self.d.read_log(), 10,
                   "cprd to kill the VMM nobody wants")
        self.settled_children([self.launcher, old])
        # The launcher still serves, and answers are not mixed up.
        p = self.d.cprctl("update", "ab", "--json")
        rep = json.loads(p.stdout)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(self.d.call("vm.status", {"name": "ab"})["pid"], rep["new_pid"])
        self.settled_children([self.launcher, rep["new_pid"]])

    def test_a_launcher_that_dies_fails_what_is_in_flight_and_cprd_keeps_serving(self):
        self.stop_launcher()
        creating = self.d.conn()
        creating.request("vm.create", guest_params("orphan"))
        wait_until(lambda: self.vm("orphan"), 5, "the VM to be listed")
        os.kill(self.launcher, signal.SIGKILL)
        self.stopped = False
        reply = creating.recv_line()
        creating.close()
        self.assertEqual(reply["error"]["code"], VMM_FAILED)
        self.assertIn("launcher has exited", reply["error"]["message"])
        # The dead launcher is reaped; cprd answers, and says why it cannot
        # start anything now.
        self.settled_children([])
        self.assertEqual(self.d.call("vm.list", timeout=5)["vms"], [])
        with self.assertRaises(RpcError) as cm:
            self.d.create_guest("later")
        self.assertEqual(cm.exception.code, VMM_FAILED)
        self.assertIn("launcher has exited", cm.exception.message)
        self.assertIn("the VMM launcher has exited", self.d.read_log())


class Churn(SharedDaemonTest):
    def test_fd_count_and_children_return_to_baseline_after_many_starts(self):
        base_fds = self.d.settled_fds()
        base_kids = set(children(self.d.pid))
        bad = not_a_program(self.d.dir)
        for i in range(10):
            for vmm, fragment in ((bad, "Exec format error"), ("/bin/false", "status 1")):
                with self.assertRaises(RpcError) as cm:
                    self.d.create_guest(f"bad{i}", vmm=vmm)
                self.assertIn(fragment, cm.exception.message)
        for i in range(3):
            self.d.create_guest(f"good{i}")
            self.d.call("vm.destroy", {"name": f"good{i}"})
        wait_until(lambda: fd_count(self.d.pid) == base_fds, 10,
                   f"cprd's fd count to return to {base_fds} (is {fd_count(self.d.pid)})")
        wait_until(lambda: set(children(self.d.pid)) == base_kids, 10,
                   f"cprd's children to be {base_kids} (are {children(self.d.pid)})")


class LoopStats(SharedDaemonTest):
    needs_guest = False

    def test_counters_exist_count_up_and_reset(self):
        before = self.d.call("daemon.status")["loop"]
        for k in ("iterations", "busy_max_us", "busy_p99_us", "busy_cpu_max_us", "requests",
                  "request_max_us", "request_p99_us", "window_us", "methods"):
            self.assertIn(k, before)
        for _ in range(5):
            self.d.call("vm.list")
        after = self.d.call("daemon.stats")["loop"]
        self.assertGreater(after["iterations"], before["iterations"])
        self.assertGreaterEqual(after["requests"], before["requests"] + 6)
        self.assertGreaterEqual(after["methods"]["vm.list"]["count"], 5)
        self.assertGreaterEqual(after["busy_max_us"], after["busy_p99_us"])
        # Reset: the answer is the window that ends, the next starts empty.
        last = self.d.call("daemon.stats", {"reset": True})["loop"]
        self.assertGreaterEqual(last["requests"], after["requests"] + 1)
        fresh = self.d.call("daemon.stats")["loop"]
        self.assertLessEqual(fresh["requests"], 1)  # the reset call itself, at most
        self.assertNotIn("vm.list", fresh["methods"])
        self.assertLess(fresh["window_us"], last["window_us"])

    def test_reset_needs_privilege_reading_does_not(self):
        os.chmod(self.d.dir, 0o755)
        os.chmod(self.d.sock, 0o666)

        def calls():
            from cprdtest import Conn
            c = Conn(self.d.sock)
            out = {k: c.call_full("daemon.stats", p).get("error", {}).get("code", 0)
                   for k, p in (("read", None), ("reset", {"reset": True}))}
            c.close()
            return out

        out = as_user(65534, 65534, [], calls)
        self.assertEqual(out, {"read": 0, "reset": PERM})

    def test_cprctl_prints_them(self):
        p = self.d.cprctl("daemon", "stats", check=True)
        self.assertIn("busy", p.stdout)
        p = self.d.cprctl("daemon", "stats", "--reset", "--json", check=True)
        self.assertIn("iterations", json.loads(p.stdout)["loop"])


if __name__ == "__main__":
    unittest.main()
