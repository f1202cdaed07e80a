"""Group 'cprd' cannot gain root through cprd: a member runs only the VMM
binaries root allowed (a root-owned allow-list), re-executes cprd only into
its own binary, and names as kernel or initrd only files it could read
itself and cannot change. Root peers are not limited. The peers here are
real: a child that dropped to uid 65534 with group 'cprd'."""

import fcntl
import json
import os
import select
import shutil
import stat
import struct
import subprocess
import termios
import tempfile
import threading
import time
import unittest

from cprdtest import (CPRD, Daemon, cprd_group, fake_checkpoint, guest_accel, require_root,
                      wait_until, wrapper)
from test_custody import as_user

HERE = os.path.dirname(os.path.abspath(__file__))
STANDIN = os.path.join(HERE, "standin_vmm.py")
PERM, BAD_PARAMS = -32002, -32602
NOBODY = 65534
MEMORY = str(32 << 20)


def root_only_dir():
    """A fresh directory that only root can change, all the way up, or skip:
    what an allow-listed binary and a kernel a member names must live in."""
    for base in ("/run", "/var/tmp", "/root"):
        try:
            d = tempfile.mkdtemp(prefix="cprd-trust-", dir=base)
        except OSError:
            continue
        p, ok = d, True
        while True:
            st = os.stat(p)
            ok = ok and st.st_uid == 0 and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
            if p == "/":
                break
            p = os.path.dirname(p)
        os.chmod(d, 0o755)
        if ok:
            return d
        shutil.rmtree(d)
    raise unittest.SkipTest("no directory here is root's alone all the way up")


def call_as_member(d, gid, method, params):
    """(code, message) of one call made by uid 65534 in group cprd; code 0: ok."""
    def fn():
        try:
            res = d.conn().call(method, params)
            return {"r": [0, res]}
        except Exception as e:  # noqa: BLE001 - RpcError or a socket error
            return {"r": [getattr(e, "code", -1), getattr(e, "message", repr(e))]}
    out = as_user(NOBODY, NOBODY, [gid], fn)
    if "exception" in out:
        raise AssertionError(out["exception"])
    return tuple(out["r"])


class Trust(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        require_root(cls)
        cls.gid = cprd_group()
        cls.root = root_only_dir()
        cls.vmm_ok = wrapper(cls.root, "vmm-ok", f'exec python3 {STANDIN} "$@"')
        cls.kernel = os.path.join(cls.root, "kernel")
        shutil.copy(STANDIN, cls.kernel)
        os.chmod(cls.kernel, 0o644)
        # An allowed VMM that writes down what its kernel fd holds.
        cls.reports = os.path.join(cls.root, "reports")
        os.mkdir(cls.reports, 0o700)
        cls.vmm_report = wrapper(
            cls.root, "vmm-report",
            'prev=\nfor a in "$@"; do\n'
            f'  [ "$prev" = -kernel ] && head -c 64 "$a" > {cls.reports}/$$\n'
            '  prev=$a\ndone\n'
            f'exec python3 {STANDIN} "$@"')
        cls.allow = os.path.join(cls.root, "vmm.allow")
        with open(cls.allow, "w") as f:
            f.write("# VMMs a member of group cprd may run\n\n" + cls.vmm_ok + "\n" +
                    cls.vmm_report + "\n")
        # The stand-ins run from the source tree, which a confined VMM's
        # root does not hold; what is tested here is who may name what.
        cls.d = Daemon(["--vmm-allow", cls.allow, "--no-confine"]).start()
        os.chmod(cls.d.dir, 0o755)
        os.chmod(cls.d.sock, 0o660)
        # Not allowed, and somewhere anyone may write.
        cls.vmm_other = wrapper(cls.d.dir, "vmm-other", f'exec python3 {STANDIN} "$@"')

    @classmethod
    def tearDownClass(cls):
        cls.d.destroy_all()
        cls.d.stop()
        shutil.rmtree(cls.root, ignore_errors=True)

    def create(self, name, vmm=None, kernel=None):
        return {"name": name, "memory": MEMORY, "kernel": kernel or self.kernel,
                "vmm": vmm or self.vmm_ok}

    def member(self, method, params):
        return call_as_member(self.d, self.gid, method, params)

    def test_member_runs_only_allowed_vmms(self):
        code, res = self.member("vm.create", self.create("allowed"))
        self.assertEqual(code, 0, res)
        self.assertTrue(res["pid"] > 0)

        code, msg = self.member("vm.create", self.create("other", vmm=self.vmm_other))
        self.assertEqual(code, PERM, msg)
        self.assertIn("is not in the allow-list of VMM binaries", msg)
        code, msg = self.member("vm.update", {"name": "allowed", "vmm": self.vmm_other})
        self.assertEqual(code, PERM, msg)
        self.assertIn("is not in the allow-list", msg)
        # Nothing was started for either: the VM still runs its first VMM.
        st = self.d.call("vm.status", {"name": "allowed"})
        self.assertEqual((st["state"], st["pid"]), ("running", res["pid"]))
        self.assertNotIn("other", [v["name"] for v in self.d.call("vm.list")["vms"]])

        # Root chooses freely.
        res = self.d.call("vm.create", self.create("by-root", vmm=self.vmm_other))
        self.assertTrue(res["pid"] > 0)

    def test_allowed_binary_that_others_can_change_is_refused(self):
        changeable = wrapper(self.root, "vmm-changeable", f'exec python3 {STANDIN} "$@"')
        os.chmod(changeable, 0o775)
        with open(self.allow, "a") as f:
            f.write(changeable + "\n")
        # The list is read at start: a cprd of its own.
        d = Daemon(["--vmm-allow", self.allow, "--no-confine"]).start()
        try:
            os.chmod(d.dir, 0o755)
            code, msg = call_as_member(d, self.gid, "vm.create",
                                       self.create("changeable", vmm=changeable))
            self.assertEqual(code, PERM, msg)
            self.assertIn("can be changed by others than root", msg)
        finally:
            d.destroy_all()
            d.stop()

    def test_member_reexecutes_only_into_cprd_itself(self):
        code, msg = self.member("daemon.reexec", {"binary": "/bin/true"})
        self.assertEqual(code, PERM, msg)
        self.assertIn("is not cprd's own", msg)
        self.assertIsNone(self.d.proc.poll())

    def test_kernel_is_opened_with_the_members_rights(self):
        code, msg = self.member("vm.create", self.create("shadow", kernel="/etc/shadow"))
        self.assertEqual(code, PERM, msg)
        self.assertIn("not readable by you", msg)

        # Readable, but in a directory the member owns: it could swap the
        # file for a link to /etc/shadow before the next VMM starts.
        own = tempfile.mkdtemp(dir=self.root)
        os.chmod(own, 0o755)
        os.chown(own, NOBODY, NOBODY)
        mine = os.path.join(own, "kernel")
        shutil.copy(STANDIN, mine)
        os.chmod(mine, 0o644)
        code, msg = self.member("vm.create", self.create("swappable", kernel=mine))
        self.assertEqual(code, PERM, msg)
        self.assertIn("is yours or writable by you", msg)

        # Root may name it: root reads what it likes.
        self.assertTrue(self.d.call("vm.create", self.create("root-kernel", kernel=mine))["pid"])

    def test_fifo_as_kernel_is_refused_without_blocking(self):
        fifo = os.path.join(self.root, "fifo")
        os.mkfifo(fifo, 0o644)
        for who in ("root", "member"):
            done = {}

            def ask():
                if who == "root":
                    try:
                        self.d.call("vm.create", self.create("fifo", kernel=fifo))
                        done["r"] = (0, "created")
                    except Exception as e:  # noqa: BLE001
                        done["r"] = (getattr(e, "code", -1), str(e))
                else:
                    done["r"] = self.member("vm.create", self.create("fifo", kernel=fifo))
            t = threading.Thread(target=ask, daemon=True)
            t.start()
            t.join(10)
            self.assertFalse(t.is_alive(), f"{who}: cprd blocked opening a FIFO")
            code, msg = done["r"]
            self.assertEqual(code, BAD_PARAMS, msg)
            self.assertIn(": not a regular file", msg)
        self.d.call("daemon.status")  # and serves everyone still

    def test_member_uses_no_checkpoint_directory_but_cprds(self):
        # A root-owned stand-in for /etc, holding a file named as the VM:
        # cprd as root would create the directory, rename the file aside
        # and empty it, and destroy would remove what came in its place.
        etc = tempfile.mkdtemp(dir=self.root)
        os.chmod(etc, 0o755)
        passwd = os.path.join(etc, "passwd")
        with open(passwd, "w") as f:
            f.write("root:x:0:0:root:/root:/bin/sh\n")
        before = os.stat(passwd)
        code, res = self.member("vm.create", self.create("passwd"))
        self.assertEqual(code, 0, res)
        for method in ("vm.checkpoint", "vm.restore"):
            for where in (etc, os.path.join(etc, "new")):
                code, msg = self.member(method, {"name": "passwd", "dir": where})
                self.assertEqual(code, PERM, f"{method} {where}: {msg}")
                self.assertIn("is not cprd's checkpoint directory", msg)
        self.assertEqual(sorted(os.listdir(etc)), ["passwd"])
        after = os.stat(passwd)
        self.assertEqual((after.st_ino, after.st_size, after.st_mtime_ns),
                         (before.st_ino, before.st_size, before.st_mtime_ns))
        st = self.d.call("vm.status", {"name": "passwd"})
        self.assertEqual((st["state"], st["pid"]), ("running", res["pid"]))

    def members_dir(self):
        """A directory of the member's own inside root's: where it plants links."""
        own = tempfile.mkdtemp(dir=self.root)
        os.chmod(own, 0o755)
        os.chown(own, NOBODY, NOBODY)
        return own

    def repoint(self, link, target):
        """What the member does between two steps: its link names another file."""
        tmp = link + ".new"
        os.symlink(target, tmp)
        os.chown(tmp, NOBODY, NOBODY, follow_symlinks=False)
        os.replace(tmp, link)

    def test_vmm_link_swapped_after_create_is_not_run(self):
        own = self.members_dir()
        marker = os.path.join(self.reports, "member-script-ran")
        evil = wrapper(own, "evil", f'touch {marker}\nexec python3 {STANDIN} "$@"')
        os.chown(evil, NOBODY, NOBODY)
        link = os.path.join(own, "vmm")
        os.symlink(self.vmm_ok, link)
        code, res = self.member("vm.create", self.create("vmm-link", vmm=link))
        self.assertEqual(code, 0, res)

        self.repoint(link, evil)
        # Root's routine update (update --all) and the member's own: each
        # runs the binary judged at create, never the member's script.
        res = self.d.call("vm.update", {"name": "vmm-link"})
        self.assertFalse(os.path.exists(marker), "the member's script ran as a VMM")
        self.assertEqual(res["result"], "ok", res)
        code, res = self.member("vm.update", {"name": "vmm-link"})
        self.assertEqual(code, 0, res)
        self.assertEqual(res["result"], "ok", res)
        st = self.d.call("vm.status", {"name": "vmm-link"})
        self.assertEqual((st["state"], st["vmm"]), ("running", self.vmm_ok))
        self.assertFalse(os.path.exists(marker), "the member's script ran as a VMM")
        # Named by the member at update time, the link is judged by what it
        # names now, and refused.
        code, msg = self.member("vm.update", {"name": "vmm-link", "vmm": link})
        self.assertEqual(code, PERM, msg)
        self.assertFalse(os.path.exists(marker), "the member's script ran as a VMM")

    def test_vmm_link_swapped_before_restore_is_not_run(self):
        # A checkpoint whose VM runs the member's link, which named an
        # allowed VMM when the VM was created: a cprd that starts adopts it.
        own = self.members_dir()
        marker = os.path.join(self.reports, "member-script-ran-at-restore")
        evil = wrapper(own, "evil", f'touch {marker}\nexec python3 {STANDIN} "$@"')
        os.chown(evil, NOBODY, NOBODY)
        link = os.path.join(own, "vmm")
        os.symlink(self.vmm_ok, link)
        ckdir = tempfile.mkdtemp(dir=self.root)
        # A kernel that opens: an old cprd would get as far as the exec.
        fake_checkpoint(ckdir, "vmm-restore", vmm=link, kernel=self.kernel)
        d = Daemon(["--vmm-allow", self.allow, "--no-confine", "--checkpoint-dir", ckdir]).start()
        self.addCleanup(d.stop)
        os.chmod(d.dir, 0o755)
        self.assertEqual(d.call("vm.status", {"name": "vmm-restore"})["state"], "checkpointed")

        # The link now names the member's script: the restore judges the
        # stored binary again, by what it names now, and refuses it.
        self.repoint(link, evil)
        code, msg = call_as_member(d, self.gid, "vm.restore", {"name": "vmm-restore"})
        self.assertFalse(os.path.exists(marker), "the member's script ran as a VMM")
        self.assertEqual(code, PERM, msg)
        self.assertIn("is not in the allow-list of VMM binaries", msg)
        self.assertEqual(d.call("vm.status", {"name": "vmm-restore"})["state"], "checkpointed")

    def kernel_report(self, name):
        pid = self.d.call("vm.status", {"name": name})["pid"]
        with open(os.path.join(self.reports, str(pid)), "rb") as f:
            return f.read()

    def test_kernel_link_swapped_after_create_is_not_reopened(self):
        own = self.members_dir()
        readable = os.path.join(self.root, "readable-kernel")
        with open(readable, "w") as f:
            f.write("READABLE kernel\n")
        os.chmod(readable, 0o644)
        secret = os.path.join(self.root, "secret")
        with open(secret, "w") as f:
            f.write("root:SECRET:19000:0:99999:7:::\n")
        os.chmod(secret, 0o600)
        link = os.path.join(own, "kernel")
        os.symlink(readable, link)
        code, res = self.member("vm.create", self.create("kernel-link", vmm=self.vmm_report,
                                                         kernel=link))
        self.assertEqual(code, 0, res)
        self.assertEqual(self.kernel_report("kernel-link"), b"READABLE kernel\n")

        # The link now names root's secret: the next VMM still gets the
        # file judged at create.
        self.repoint(link, secret)
        code, res = self.member("vm.update", {"name": "kernel-link"})
        self.assertEqual(code, 0, res)
        self.assertEqual(self.kernel_report("kernel-link"), b"READABLE kernel\n")
        # What was judged is what is kept: the file, not the link.
        self.assertEqual(self.d.call("vm.status", {"name": "kernel-link"})["kernel"], readable)

        # Another file renamed over the judged path is refused, not handed
        # on: the update fails before the guest is paused and the VMM stays.
        pid = self.d.call("vm.status", {"name": "kernel-link"})["pid"]
        other = os.path.join(self.root, "other")
        shutil.copy(secret, other)
        os.replace(other, readable)
        code, msg = self.member("vm.update", {"name": "kernel-link"})
        self.assertNotEqual(code, 0, msg)
        self.assertIn("not the file that was judged when the VM was created", str(msg))
        st = self.d.call("vm.status", {"name": "kernel-link"})
        self.assertEqual((st["state"], st["pid"]), ("running", pid))
        self.assertEqual(self.kernel_report("kernel-link"), b"READABLE kernel\n")

    def test_name_too_long_for_the_sockets_is_refused_up_front(self):
        # sun_path holds 107 bytes; the longest socket is vmm/cpr-state.sock.
        room = 107 - len(self.d.dir) - len("/vms//vmm/cpr-state.sock")
        if room >= 63:
            self.skipTest(f"state directory {self.d.dir} is short enough for any name")
        name = "n" * (room + 1)
        code, msg = self.member("vm.create", self.create(name))
        self.assertEqual(code, BAD_PARAMS, msg)
        self.assertIn(f"use a name of at most {room} characters", msg)
        self.assertNotIn(name, [v["name"] for v in self.d.call("vm.list")["vms"]])
        if room > 0:
            code, res = self.member("vm.create", self.create("m" * room))
            self.assertEqual(code, 0, res)


class ReexecSwap(unittest.TestCase):
    """daemon.reexec execs the very file it judged. The member's link names
    cprd's own binary when the request is judged and the member's ELF from
    the moment the reply is out: cprd writes every reply before it execs
    and waits (up to a second) for a client that does not read; that
    client is held until the link is swapped, then let go."""

    def setUp(self):
        require_root(self)
        self.gid = cprd_group()
        self.root = root_only_dir()
        self.addCleanup(shutil.rmtree, self.root, True)
        # A member may re-execute cprd only into a binary that root alone
        # can change, all the way up: a copy in root's directory, wherever
        # the build is (a clone below /tmp is not).
        self.cprd = os.path.join(self.root, "cprd")
        shutil.copy(CPRD, self.cprd)
        os.chmod(self.cprd, 0o755)
        self.d = Daemon(binary=self.cprd).start()
        self.addCleanup(self.d.stop)
        os.chmod(self.d.dir, 0o755)
        os.chmod(self.d.sock, 0o660)

    def test_link_swapped_after_the_check_does_not_win(self):
        own = tempfile.mkdtemp(dir=self.root)
        os.chmod(own, 0o755)
        os.chown(own, NOBODY, NOBODY)
        elf = os.path.join(own, "not-cprd")
        shutil.copy("/bin/true", elf)
        os.chown(elf, NOBODY, NOBODY)
        link = os.path.join(own, "cprd")
        os.symlink(self.cprd, link)
        pid = self.d.pid

        # A slow reader: replies cprd cannot write out yet.
        slow = self.d.conn()
        slow.send_raw("".join(json.dumps({"jsonrpc": "2.0", "method": "daemon.status",
                                          "id": i}) + "\n" for i in range(2000)))
        last = -1
        for _ in range(100):
            self.d.call("daemon.status")
            n = struct.unpack("i", fcntl.ioctl(slow.sock, termios.FIONREAD, b"\0" * 4))[0]
            if n == last and n > 0:
                break
            last = n
        self.assertTrue(n == last and n > 0, "the slow reader's buffer never filled")
        try:
            code, res = call_as_member(self.d, self.gid, "daemon.reexec", {"binary": link})
            self.assertEqual(code, 0, res)
            tmp = link + ".new"
            os.symlink(elf, tmp)
            os.replace(tmp, link)
            # The swap came before the exec only while cprd still holds the
            # slow reader's connection (it waits at most 1 s to write it
            # out): on a host too slow for that, nothing was tested.
            p = select.poll()
            p.register(slow.sock, select.POLLRDHUP)
            if any(ev & select.POLLRDHUP for _, ev in p.poll(0)):
                self.skipTest("cprd re-executed before the link was swapped (it waits 1 s "
                              "for a slow reader): the host was too slow to test the swap")
        finally:
            slow.close()
        wait_until(lambda: self.d.proc.poll() is not None or self.started_again(),
                   30, "cprd to re-execute")
        self.assertIsNone(self.d.proc.poll(), "cprd became the member's binary and ended")
        self.assertEqual(self.d.pid, pid)
        self.assertTrue(file_same(f"/proc/{pid}/exe", self.cprd))

    def started_again(self):
        try:
            return self.d.call("daemon.status")["start_mode"] == "re-exec"
        except Exception:  # noqa: BLE001 - between the two images
            return False


def file_same(a, b):
    sa, sb = os.stat(a), os.stat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


class AllowListFile(unittest.TestCase):
    """The allow-list is root's: cprd will not start on one that others can
    change, or on one it cannot read as a list of absolute paths."""

    def setUp(self):
        require_root(self)
        self.root = root_only_dir()
        self.allow = os.path.join(self.root, "vmm.allow")
        self.state = tempfile.mkdtemp(prefix="cprd-test-")

    def tearDown(self):
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.state, ignore_errors=True)

    def start(self):
        p = subprocess.run([CPRD, "--foreground", "--state-dir", self.state,
                            "--accel", guest_accel(), "--vmm-allow", self.allow],
                           capture_output=True, text=True, timeout=20)
        return p.returncode, p.stderr

    def test_writable_by_others_is_refused(self):
        with open(self.allow, "w") as f:
            f.write("/usr/bin/qemu-system-*\n")
        os.chmod(self.allow, 0o666)
        code, err = self.start()
        self.assertEqual(code, 1, err)
        self.assertIn("can be changed by others than root", err)

    def test_relative_line_is_refused_with_its_number(self):
        with open(self.allow, "w") as f:
            f.write("# ok\n/usr/bin/qemu-system-x86_64\nqemu-system-x86_64\n")
        os.chmod(self.allow, 0o644)
        code, err = self.start()
        self.assertEqual(code, 1, err)
        self.assertIn(f"{self.allow}:3:", err)

    def test_missing_file_named_explicitly_is_refused(self):
        code, err = self.start()
        self.assertEqual(code, 1, err)
        self.assertIn("cannot read the allow-list", err)


if __name__ == "__main__":
    unittest.main()


def proc_status(pid):
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


class Narrow(unittest.TestCase):
    """cprd keeps only the capabilities it uses, in every set, and keeps
    them so across a re-exec (the bounding set does not give them back)."""

    # CHOWN, DAC_OVERRIDE, DAC_READ_SEARCH, FOWNER, KILL, NET_ADMIN,
    # SYS_PTRACE, SYS_RESOURCE: why each, in daemon/host/sandbox.c.
    KEPT = sum(1 << c for c in (0, 1, 2, 3, 5, 12, 19, 24))

    def setUp(self):
        require_root(self)
        self.d = Daemon().start()

    def tearDown(self):
        self.d.stop()

    def check(self, when):
        st = proc_status(self.d.proc.pid)
        # What this machine grants root at all (a container may hold back some).
        kept = self.KEPT & int(proc_status(os.getpid())["CapBnd"], 16)
        for s in ("CapEff", "CapPrm", "CapBnd"):
            self.assertEqual(int(st[s], 16), kept, f"{when}: {s} {st[s]}")
        self.assertEqual(int(st["CapInh"], 16), 0, when)
        self.assertEqual(int(st["CapAmb"], 16), 0, when)
        self.assertEqual(st["Seccomp"], "2", when)

    def test_only_the_capabilities_it_uses(self):
        self.check("at start")
        self.d.cprctl("daemon", "reexec")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.d.call("daemon.status")["start_mode"] == "re-exec":
                    break
            except Exception:  # noqa: BLE001 - between the two images
                pass
            time.sleep(0.1)
        self.check("after a re-exec")
