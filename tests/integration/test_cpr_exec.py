"""cpr-exec as an update strategy (QEMU 10.2 and later), with the real guest:
the VMM process execs the new binary and keeps its pid, namespaces, cgroup
and every fd cprd gave it. Where QEMU itself has no way back (the new image
cannot load the state, or exits at once), cprd restores the guest from the
state file and the RAM it holds into a fresh VMM of the old binary."""

import json
import os
import tempfile

from cprdtest import (Console, Daemon, GuestTest, QEMU, RpcError, SharedDaemonTest, qemu_next,
                      qemu_version, require_guest, require_root, wrapper)


def identity(pid):
    """What cpr-exec must keep: namespaces and cgroup."""
    ns = {n: os.readlink(f"/proc/{pid}/ns/{n}") for n in ("mnt", "pid", "ipc", "uts")}
    with open(f"/proc/{pid}/cgroup") as f:
        return ns, f.read()


def exe(pid):
    return os.readlink(f"/proc/{pid}/exe")


class Confined(SharedDaemonTest):
    """cprd's default: confined VMMs, each in a root of its own."""

    @classmethod
    def setUpClass(cls):
        cls.next = qemu_next()  # skips with the reason when there is none
        super().setUpClass()
        cls.next_version = qemu_version(cls.next)

    def guest(self, name, **extra):
        vm = self.d.create_guest(name, **extra)
        con = Console(vm["console_log"])
        con.wait_beats(3)
        return vm, con

    def held(self, name):
        """What cprd holds for the VM: the same fds, guest RAM the same size
        (the console's size grows with what the guest writes)."""
        return [(f["name"], f["kind"], f["fd"], f["size"] if f["name"] == "ram0" else None)
                for f in self.d.call("vm.fds", {"name": name})["fds"]]

    def refused(self, name, vmm, *words):
        st = self.d.call("vm.status", {"name": name})
        with self.assertRaises(RpcError) as cm:
            self.d.call("vm.update", {"name": name, "vmm": vmm, "strategy": "cpr-exec"})
        for w in ("refused before the guest was paused",) + words:
            self.assertIn(w, cm.exception.message)
        self.assertEqual(self.d.call("vm.status", {"name": name})["pid"], st["pid"])
        self.assertEqual(self.d.call("vm.history", {"name": name})["updates"], [])

    def test_1_same_process_new_image(self):
        vm, con = self.guest("cx", vmm=self.next, cpr_exec=True)
        pid = vm["pid"]
        before = identity(pid)
        fds = self.held("cx")
        for _ in range(2):  # twice: a VMM that came by cpr-exec can exec again
            p = self.d.cprctl("update", "cx", "--strategy", "cpr-exec", "--vmm", self.next,
                              "--json")
            self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
            rep = json.loads(p.stdout)
            self.assertEqual(rep["result"], "ok", rep)
            self.assertEqual((rep["old_pid"], rep["new_pid"]), (pid, pid))
            self.assertEqual(rep["new_version"], self.next_version)
            self.assertGreater(rep["blackout_ms"], 0)
        st = self.d.call("vm.status", {"name": "cx"})
        self.assertEqual((st["state"], st["pid"], st["vmm"]), ("running", pid, self.next))
        self.assertEqual(identity(pid), before)
        self.assertEqual(self.held("cx"), fds)
        con.wait_beats(3)
        con.assert_healthy(self)
        self.d.call("vm.destroy", {"name": "cx"})

    def test_2_refused_where_it_cannot_work(self):
        # QEMU 10.0 has no cpr-exec.
        self.guest("old")
        self.refused("old", QEMU, f"runs QEMU {qemu_version(QEMU)}, which cannot cpr-exec")
        # A VM created without it: its VMM may not exec.
        self.guest("plain", vmm=self.next)
        self.refused("plain", self.next, "created without cpr_exec")
        # A binary outside the VMM's root.
        _, con = self.guest("rooted", vmm=self.next, cpr_exec=True)
        tmp = tempfile.mkdtemp()
        os.chmod(tmp, 0o755)
        outside = wrapper(tmp, "qemu", f'exec {self.next} "$@"')
        self.refused("rooted", outside, "is not inside the root")
        # The downgrade to 10.0: the pre-flight finds its machine type gone.
        self.refused("rooted", QEMU, "lacks the machine type")
        con.wait_beats(2)
        con.assert_healthy(self)
        for n in ("old", "plain", "rooted"):
            self.d.call("vm.destroy", {"name": n})


class Rollback(GuestTest):
    """The new image fails after the exec: the guest comes back from the
    state file in a fresh VMM of the old binary. Unconfined, so that the
    failing binaries can be wrappers in a temporary directory."""

    def setUp(self):
        require_root(self)
        require_guest()
        self.next = qemu_next()
        self.d = Daemon(extra_args=["--no-confine"]).start()
        self.tmp = tempfile.mkdtemp()

    def tearDown(self):
        self.d.stop()

    def fails(self, name, body, words):
        vm = self.d.create_guest(name, vmm=self.next, cpr_exec=True)
        con = Console(vm["console_log"])
        con.wait_beats(3)
        bad = wrapper(self.tmp, name, body)
        p = self.d.cprctl("update", name, "--strategy", "cpr-exec", "--vmm", bad, "--json")
        self.assertNotEqual(p.returncode, 0)
        rep = json.loads(p.stdout)
        self.assertEqual(rep["result"], "rolled-back", rep)
        self.assertIn(words, rep["error"])
        self.assertGreater(rep["blackout_ms"], 0)
        st = self.d.call("vm.status", {"name": name})
        self.assertEqual(st["state"], "running")
        self.assertEqual(st["pid"], rep["restored_pid"])
        self.assertNotEqual(st["pid"], vm["pid"])
        self.assertEqual((st["vmm"], exe(st["pid"])), (self.next, os.path.realpath(self.next)))
        hist = self.d.call("vm.history", {"name": name})["updates"]
        self.assertEqual([(h["result"], h["blackout_ms"]) for h in hist],
                         [("rolled-back", rep["blackout_ms"])])
        con.wait_beats(3)
        con.assert_healthy(self)
        self.assertFalse(os.path.exists(os.path.join(os.path.dirname(vm["console_log"]), "vmm",
                                                     "cpr-exec.state")))
        # And it can still be updated, this time for good.
        p = self.d.cprctl("update", name, "--strategy", "cpr-exec", "--json")
        self.assertEqual(json.loads(p.stdout)["result"], "ok", p.stdout)
        con.wait_beats(2)
        con.assert_healthy(self)

    def test_new_image_exits_at_once(self):
        self.fails("quits", "echo 'qemu-system-x86_64: GAVE-UP' >&2; exit 1",
                   "VMM log: qemu-system-x86_64: GAVE-UP")

    def test_new_image_cannot_load_the_state(self):
        # It reads another stream than the one the old image wrote.
        junk = os.path.join(self.tmp, "junk")
        with open(junk, "wb") as f:
            f.write(b"\x00not a migration stream" * 100)
        self.fails("junk", 'for a; do shift; case "$a" in file:*) set -- "$@" "file:'
                   + junk + '";; *) set -- "$@" "$a";; esac; done; exec ' + self.next
                   + ' "$@"', "the new VMM")
