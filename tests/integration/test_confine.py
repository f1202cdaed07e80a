"""Confined VMMs against real QEMU and the real guest: each VM's VMM runs as
a uid of its own with no capabilities, no_new_privs and QEMU's seccomp
sandbox, in namespaces of its own with a minimal root; from inside that
identity the host's secrets, other VMs and cprd are out of reach; both
update strategies keep the guest alive and the VM's uid."""

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import unittest

from cprdtest import (KERNEL, Console, Daemon, NetNsDaemonTest, SharedDaemonTest, children, pid_alive,
                      require_guest, require_root, wait_until)

# Run inside the VMM's namespaces and identity: what can it reach?
PROBE = r"""
import json, os, socket, sys
out = {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups()}
for key, path in (("shadow", "/etc/shadow"), ("other_console", sys.argv[1])):
    try:
        open(path, "rb").close()
        out[key] = "read"
    except OSError as e:
        out[key] = e.strerror
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[2])
    out["cprd_socket"] = "connected"
except OSError as e:
    out["cprd_socket"] = e.strerror
# The host's network: an abstract unix socket and a TCP service on the
# loopback, both listening in the test's (the host's) network namespace.
for key, family, addr in (("abstract", socket.AF_UNIX, "\0" + sys.argv[4]),
                          ("loopback_tcp", socket.AF_INET, ("127.0.0.1", int(sys.argv[5])))):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(addr)
        out[key] = "connected"
    except OSError as e:
        out[key] = e.strerror or str(e)
    s.close()
try:
    out["own_dir"] = os.listdir(sys.argv[3])
except OSError as e:
    out["own_dir"] = e.strerror
out["root"] = sorted(os.listdir("/"))
print(json.dumps(out))
"""


def status_fields(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.split()
    return out


def ns(pid, kind):
    return os.readlink(f"/proc/{pid}/ns/{kind}")


class Confined(SharedDaemonTest):
    @classmethod
    def setUpClass(cls):
        for tool in ("nsenter", "setpriv"):
            if not shutil.which(tool):
                raise unittest.SkipTest(f"{tool} (util-linux) not installed")
        super().setUpClass()
        cls.a = cls.d.create_guest("ca")
        cls.b = cls.d.create_guest("cb")
        Console(cls.a["console_log"]).wait_beats(2)

    def status(self, name):
        return self.d.call("vm.status", {"name": name})

    def assert_confined(self, name):
        st = self.status(name)
        pid, uid = st["pid"], st["uid"]
        self.assertTrue(st["confined"])
        f = status_fields(pid)
        self.assertGreater(uid, 0)
        self.assertEqual(f["Uid"], [str(uid)] * 4)
        self.assertEqual(f["Gid"], [str(uid)] * 4)
        self.assertEqual(f.get("Groups", []), [])
        for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            self.assertEqual(int(f[cap][0], 16), 0, f"{cap} of VMM pid {pid}")
        self.assertEqual(f["NoNewPrivs"], ["1"])
        self.assertEqual(f["Seccomp"], ["2"])
        # pid 1 of its own pid namespace, as cprd still sees it by its pid
        self.assertEqual(f["NSpid"], [str(pid), "1"])
        for kind in ("mnt", "pid", "ipc", "uts", "net"):
            self.assertNotEqual(ns(pid, kind), ns(os.getpid(), kind), kind)
        with open(f"/proc/{pid}/cmdline", "rb") as c:
            argv = c.read().split(b"\0")
        self.assertIn(b"-sandbox", argv)
        return pid, uid

    def test_each_vmm_is_its_own_unprivileged_uid(self):
        pa, ua = self.assert_confined("ca")
        pb, ub = self.assert_confined("cb")
        self.assertNotEqual(ua, ub)
        # Nothing of the host's tree in its root beyond what it must use:
        # /usr, the loader's links and cache, a few devices, /proc, and the
        # VM's own directory (under the state directory's top component).
        root = set(os.listdir(f"/proc/{pa}/root/"))
        allowed = {"usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "dev", "proc",
                   self.d.dir.split("/")[1]}
        self.assertLessEqual(root, allowed)
        self.assertLessEqual(set(os.listdir(f"/proc/{pa}/root/etc")), {"ld.so.cache"})
        self.assertLessEqual(set(os.listdir(f"/proc/{pa}/root/dev")),
                             {"null", "zero", "full", "random", "urandom", "kvm"})
        self.assertFalse(os.path.exists(f"/proc/{pa}/root{self.d.sock}"))
        vmdir = os.path.dirname(self.status("ca")["console_log"])
        self.assertEqual(os.listdir(f"/proc/{pa}/root{vmdir}"), ["vmm"])

    def probe(self, name, other):
        st = self.status(name)
        pid, uid = st["pid"], st["uid"]
        run_dir = os.path.join(os.path.dirname(st["console_log"]), "vmm")
        other_console = self.status(other)["console_log"]
        abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(abstract.close)
        self.addCleanup(tcp.close)
        abstract_name = f"cprd-test-host-{os.getpid()}"
        abstract.bind("\0" + abstract_name)
        abstract.listen(4)
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(4)
        cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
               "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs",
               "python3", "-c", PROBE, other_console, self.d.sock, run_dir, abstract_name,
               str(tcp.getsockname()[1])]
        inside = subprocess.run(["nsenter", "-t", str(pid), "-m", "-p", "-i", "-u", "-n", "--"]
                                + cmd, capture_output=True, text=True, timeout=30)
        self.assertEqual(inside.returncode, 0, inside.stderr)
        host = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        self.assertEqual(host.returncode, 0, host.stderr)
        return uid, json.loads(inside.stdout), json.loads(host.stdout)

    def test_host_secrets_other_vms_and_cprd_are_out_of_reach(self):
        uid, inside, host = self.probe("ca", "cb")
        for where in (inside, host):
            self.assertEqual((where["uid"], where["gid"], where["groups"]), (uid, uid, []))
        # Inside its mount namespace none of them even exists...
        self.assertEqual(inside["shadow"], "No such file or directory")
        self.assertEqual(inside["other_console"], "No such file or directory")
        self.assertEqual(inside["cprd_socket"], "No such file or directory")
        # In its own network namespace the host's abstract sockets and
        # loopback services do not exist (its loopback is down).
        self.assertEqual(inside["abstract"], "Connection refused")
        self.assertEqual(inside["loopback_tcp"], "Network is unreachable")
        # ...while its own directory does (so the probe really ran there).
        self.assertIsInstance(inside["own_dir"], list)
        self.assertIn("usr", inside["root"])
        self.assertNotIn("home", inside["root"])
        # and with the same uid in the host's namespaces, permissions hold.
        self.assertEqual(host["shadow"], "Permission denied")
        self.assertEqual(host["other_console"], "Permission denied")
        self.assertEqual(host["cprd_socket"], "Permission denied")
        self.assertEqual(host["own_dir"], "Permission denied")
        # The same uid in the host's namespace reaches both: the namespace,
        # not the uid, is what keeps the VMM out.
        self.assertEqual((host["abstract"], host["loopback_tcp"]), ("connected", "connected"))

    def test_fd_claim_is_the_vms_own_vmms_alone(self):
        # Let the VM's uid reach the socket at all (the state directory is
        # the test's, 0700), to ask: a process of that uid that is not the
        # VMM is refused; root is not.
        st = self.status("ca")
        uid = st["uid"]
        mode = stat.S_IMODE(os.stat(self.d.dir).st_mode)
        sock_mode = stat.S_IMODE(os.stat(self.d.sock).st_mode)
        os.chmod(self.d.dir, 0o711)
        os.chmod(self.d.sock, 0o666)
        try:
            # Nothing of the source tree: the VM's uid may not read it (a
            # clone in a 0700 directory), nor the first python3 on PATH.
            code = ("import json, socket, sys\n"
                    "s = socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\n"
                    "s.sendall(json.dumps({'jsonrpc': '2.0', 'id': 1, 'method': 'fd.claim', "
                    "'params': {'vm': sys.argv[2], 'names': ['ram0']}}).encode() + b'\\n')\n"
                    "r = json.loads(s.makefile().readline())\n"
                    "print('granted' if 'result' in r else 'refused ' + r['error']['message'])\n")
            for vm in ("ca", "cb"):
                p = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}",
                                    "--clear-groups", "/usr/bin/python3", "-c", code,
                                    self.d.sock, vm], capture_output=True, text=True, timeout=30)
                self.assertEqual(p.returncode, 0, p.stderr)
                self.assertTrue(p.stdout.startswith("refused"), p.stdout)
                self.assertIn("permission denied", p.stdout)
        finally:
            os.chmod(self.d.sock, sock_mode)
            os.chmod(self.d.dir, mode)
        c = self.d.conn()
        try:
            c.call("fd.claim", {"vm": "ca", "names": ["ram0"]})
            for fd in c.take_fds():
                os.close(fd)
        finally:
            c.close()

    def test_updates_keep_the_guest_and_the_uid(self):
        con = Console(self.a["console_log"])
        _, uid = self.assert_confined("ca")
        for strategy in ("handover", "cpr-transfer", "handover"):
            old = self.status("ca")["pid"]
            p = self.d.cprctl("update", "ca", "--json", "--strategy", strategy)
            rep = json.loads(p.stdout)
            self.assertEqual((p.returncode, rep["result"]), (0, "ok"), p.stderr)
            wait_until(lambda: not pid_alive(old), 10, "the old VMM to be gone")
            pid, now = self.assert_confined("ca")
            self.assertEqual(pid, rep["new_pid"])
            self.assertEqual(now, uid, f"{strategy} changed the VM's uid")
            con.wait_beats(3)
            con.assert_healthy(self)
        qemus = [p for p, (comm, s) in children(self.d.pid).items() if comm.startswith("qemu")]
        self.assertEqual(sorted(qemus), sorted([self.status("ca")["pid"],
                                                self.status("cb")["pid"]]))

    def test_z_restarted_cprd_takes_back_the_vmm_and_its_uid(self):
        # The uid is the VM's, in the registry: a restarted cprd finds the
        # confined VMM (another uid, other namespaces) and its next VMM is
        # that uid again.
        before = self.status("ca")
        self.d.proc.send_signal(signal.SIGTERM)
        self.d.proc.wait(timeout=30)
        self.assertTrue(pid_alive(before["pid"]), "the VMM did not outlive cprd")
        self.d.start()
        after = self.status("ca")
        self.assertEqual((after["state"], after["pid"], after["uid"]),
                         ("running", before["pid"], before["uid"]))
        p = self.d.cprctl("update", "ca", "--json", "--strategy", "cpr-transfer")
        self.assertEqual(json.loads(p.stdout)["result"], "ok", p.stdout)
        self.assertEqual(self.assert_confined("ca")[1], before["uid"])
        Console(self.a["console_log"]).wait_beats(2)

    def test_uid_is_freed_at_destroy_and_reused(self):
        vm = self.d.create_guest("cc")
        uid = vm["uid"]
        self.assertNotIn(uid, (self.status("ca")["uid"], self.status("cb")["uid"]))
        run_dir = os.path.join(os.path.dirname(vm["console_log"]), "vmm")
        self.assertEqual(os.stat(run_dir).st_uid, uid)
        self.assertEqual(stat.S_IMODE(os.stat(run_dir).st_mode), 0o700)
        self.d.cprctl("destroy", "cc", check=True)
        self.assertFalse(os.path.exists(run_dir))
        again = self.d.create_guest("cd")
        self.assertEqual(again["uid"], uid)
        self.d.cprctl("destroy", "cd", check=True)

    def test_a_kernel_replaced_by_a_fifo_fails_the_update_not_cprd(self):
        # cprd opens the kernel for every VMM it starts: a FIFO planted at
        # the path after create must neither hang cprd in open() nor reach
        # the VMM; the update rolls back and the guest runs on.
        kdir = os.path.join(self.d.dir, "kernels")
        os.makedirs(kdir, exist_ok=True)
        kernel = os.path.join(kdir, "vmlinuz")
        shutil.copy(KERNEL, kernel)
        vm = self.d.create_guest("cf", kernel=kernel)
        con = Console(vm["console_log"])
        con.wait_beats(2)
        os.unlink(kernel)
        os.mkfifo(kernel)
        p = self.d.cprctl("update", "cf", "--json", timeout=30)
        rep = json.loads(p.stdout)
        self.assertEqual(rep["result"], "rolled-back", p.stdout)
        self.assertIn(f"cannot use kernel {kernel}: not a regular file", rep["error"])
        self.assertEqual(self.status("cf")["pid"], vm["pid"])
        con.wait_beats(2)
        con.assert_healthy(self)
        self.d.cprctl("destroy", "cf", check=True)



class ConfinedTap(NetNsDaemonTest):
    """A confined VMM in its own network namespace still drives the tap it
    is handed, across both update strategies. cprd runs in a network
    namespace the test makes, so the tap never appears on the host."""

    def test_tap_works_across_namespaces_through_both_strategies(self):
        ifname = "cprdtap0"
        self.assertNotEqual(ns(self.d.pid, "net"), ns(os.getpid(), "net"))
        vm = self.d.create_guest("nt", tap=ifname)
        self.assertTrue(self.ns.link(ifname), "the tap is not in cprd's namespace")
        self.assertFalse(os.path.exists(f"/sys/class/net/{ifname}"), "the tap leaked to the host")
        con = Console(vm["console_log"])
        con.wait_beats(2)
        for strategy in ("handover", "cpr-transfer"):
            old = self.d.call("vm.status", {"name": "nt"})["pid"]
            rep = self.d.call("vm.update", {"name": "nt", "strategy": strategy})
            self.assertEqual(rep["result"], "ok", rep)
            wait_until(lambda: not pid_alive(old), 10, "the old VMM to be gone")
            pid = rep["new_pid"]
            # Its own network namespace, neither the host's nor cprd's...
            self.assertNotIn(ns(pid, "net"), (ns(self.d.pid, "net"), ns(os.getpid(), "net")))
            # ...holding the tap cprd created in cprd's.
            self.assertEqual(os.readlink(f"/proc/{pid}/fd/6"), "/dev/net/tun")
            with open(f"/proc/{pid}/fdinfo/6") as f:
                self.assertIn(f"iff:\t{ifname}", f.read())
            con.wait_beats(2)
            con.assert_healthy(self)
        self.d.call("vm.destroy", {"name": "nt"})
        wait_until(lambda: not self.ns.link(ifname), 5, "the tap interface to disappear")


if __name__ == "__main__":
    unittest.main()
