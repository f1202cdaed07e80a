"""The state directory and what peers hand cprd: a directory others can write
to is refused, no file in it is written through a planted symlink, a FIFO
given as the kernel is answered at once, the logs stay bounded while a guest
writes to its console, and names, sizes and tap names that would not mean what
they say are refused with a message that says why."""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import unittest

from cprdtest import (CPRD, GUEST_APPEND, HB_RE, INITRD, KERNEL, Console, Daemon, RpcError,
                      STATE_BASE, SharedDaemonTest, fs_type, guest_accel, mount_tmpfs,
                      require_guest, require_root, wait_until, wrapper)

HERE = os.path.dirname(os.path.abspath(__file__))
STANDIN = os.path.join(HERE, "standin_vmm.py")


def start_refused(state, *extra):
    """cprd on state in the foreground; it must exit at once. Returns stderr."""
    p = subprocess.run([CPRD, "--foreground", "--state-dir", state, "--accel", guest_accel(), "--log-dir", ""]
                       + list(extra), capture_output=True, text=True, timeout=20)
    if p.returncode == 0:
        raise AssertionError(f"cprd started on {state}: {p.stderr}")
    return p.stderr


class StateDirectory(unittest.TestCase):
    """Whom the state directory belongs to; symlinks planted before cprd starts."""

    def setUp(self):
        require_root(self)
        self.dir = tempfile.mkdtemp(prefix="cprd-test-")
        self.victim = os.path.join(tempfile.mkdtemp(prefix="cprd-victim-"), "victim")
        with open(self.victim, "w") as f:
            f.write("precious\n")

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(os.path.dirname(self.victim), ignore_errors=True)

    def test_a_state_directory_everyone_can_write_to_is_refused(self):
        os.chmod(self.dir, 0o777)
        err = start_refused(self.dir)
        self.assertIn(f"refusing state directory {self.dir}: mode 0777 lets everyone write", err)
        self.assertFalse(os.path.exists(os.path.join(self.dir, "cprd.lock")), "it wrote there")

    def test_a_group_writable_state_directory_is_refused(self):
        os.chmod(self.dir, 0o770)
        self.assertIn("mode 0770 lets its group write", start_refused(self.dir))

    def test_a_state_directory_owned_by_another_uid_is_refused(self):
        os.chown(self.dir, 4321, 4321)
        os.chmod(self.dir, 0o755)
        err = start_refused(self.dir)
        self.assertIn(f"refusing state directory {self.dir}: it is owned by uid 4321, not by "
                      f"uid {os.geteuid()}", err)

    def test_a_vms_directory_others_can_write_to_is_refused(self):
        os.mkdir(os.path.join(self.dir, "vms"), 0o750)
        os.chmod(os.path.join(self.dir, "vms"), 0o757)
        self.assertIn(f"refusing state directory {self.dir}/vms: mode 0757",
                      start_refused(self.dir))

    def test_a_symlink_as_the_state_directorys_lock_is_not_followed(self):
        os.symlink(self.victim, os.path.join(self.dir, "cprd.lock"))
        err = start_refused(self.dir)
        self.assertIn("cprd.lock: Too many levels of symbolic links", err)
        self.assertEqual(open(self.victim).read(), "precious\n")

    def test_a_symlink_planted_as_cprd_log_is_not_written_through(self):
        os.symlink(self.victim, os.path.join(self.dir, "cprd.log"))
        # Detached, cprd logs to STATE_DIR/cprd.log: it must fail to
        # detach rather than append its log to the victim.
        p = subprocess.run([CPRD, "--state-dir", self.dir, "--accel", guest_accel(), "--log-dir", ""],
                           capture_output=True, text=True, timeout=20)
        try:
            self.assertNotEqual(p.returncode, 0, "cprd started with cprd.log a symlink")
            self.assertEqual(open(self.victim).read(), "precious\n")
        finally:
            if p.returncode == 0:  # detached: its pid is in no file, ask it
                d = Daemon()
                d.sock = os.path.join(self.dir, "cprd.sock")
                os.kill(d.call("daemon.status")["pid"], signal.SIGTERM)

    def test_a_registry_temp_file_planted_as_a_symlink_is_not_written_through(self):
        d = Daemon().start()
        try:
            tmp = os.path.join(d.dir, ".registry.json.tmp")
            os.symlink(self.victim, tmp)
            # A VM that fails to start is written into the registry as its
            # VMM is spawned: /bin/false is one.
            with self.assertRaises(RpcError):
                d.call("vm.create", {"name": "reg", "memory": "16M", "kernel": self.victim,
                                     "vmm": "/bin/false"})
            self.assertEqual(open(self.victim).read(), "precious\n")
            self.assertFalse(os.path.islink(tmp))
            with open(os.path.join(d.dir, "registry.json")) as f:
                self.assertEqual(json.load(f)["version"], 1)
        finally:
            d.stop()


class Input(SharedDaemonTest):
    """What vm.create refuses before it starts anything; and a FIFO as the
    kernel, which must not stop cprd in open()."""

    needs_guest = False

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp(prefix="cprd-test-input-")
        cls.kernel = os.path.join(cls.tmp, "kernel")
        with open(cls.kernel, "wb") as f:
            f.write(b"\0" * 4096)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)
        super().tearDownClass()

    def refused(self, **params):
        p = {"name": "in1", "memory": "64M", "kernel": self.kernel, "vmm": "/bin/false"}
        p.update(params)
        with self.assertRaises(RpcError) as cm:
            self.d.call("vm.create", p)
        self.assertEqual(cm.exception.code, -32602, cm.exception.message)
        self.assertEqual(self.d.call("vm.list")["vms"], [], "something was created")
        self.assertEqual(os.listdir(os.path.join(self.d.dir, "vms")), [])
        return cm.exception.message

    def test_a_name_with_a_nul_byte_is_refused_not_cut_short(self):
        self.assertEqual(self.refused(name="x\u0000y"),
                         "parameter 'name' must not contain a NUL byte")
        self.assertEqual(self.refused(kernel=self.kernel + "\u0000.ignored"),
                         "parameter 'kernel' must not contain a NUL byte")

    def test_names_with_control_bytes_or_a_slash_are_refused(self):
        for name in ("a\nb", "a\x1bb", "a/b", "..", "x\x7f"):
            with self.subTest(name=name):
                self.assertIn("invalid VM name", self.refused(name=name))

    def test_a_size_that_would_wrap_is_refused_as_given(self):
        big = 2**64 - 1
        # As a JSON number and as a string: rounded up to whole MiB first,
        # it used to wrap to "0 bytes".
        msg = self.refused(memory=big)
        self.assertRegex(msg, r"^memory \d+\.\d GiB exceeds this host's physical memory")
        self.assertIn("exceeds this host's physical memory", self.refused(memory=str(big)))
        self.assertIn("parameter 'memory' must be a size",
                      self.refused(memory="18446744073709551616"))
        self.assertIn("parameter 'memory' must be a size", self.refused(memory="16777216T"))

    def test_a_bare_number_is_bytes_and_reported_as_given(self):
        self.assertEqual(self.refused(memory="16"),
                         "memory must be at least 16 MiB (got 16 bytes; a number without a "
                         "unit is bytes: say \"16M\" for MiB)")
        self.assertIn("(got 16 bytes;", self.refused(memory=16))

    def test_tap_names_the_kernel_would_rewrite_are_refused(self):
        self.assertEqual(self.refused(tap="tap%d"),
                         "tap interface name 'tap%d' must not contain '%': the kernel would "
                         "choose the name itself")
        self.assertIn("must be 1-15 characters", self.refused(tap="t" * 16))
        self.assertIn("must not contain '/' or ':'", self.refused(tap="a:b"))
        self.assertIn("printable ASCII without spaces", self.refused(tap="a b"))

    def test_append_and_machine_with_control_bytes_are_refused(self):
        self.assertIn("without control characters", self.refused(append="quiet\x1b[2J"))
        self.assertIn("machine type", self.refused(machine="q35,accel=kvm"))

    def test_a_fifo_as_the_kernel_is_refused_at_once_while_others_are_served(self):
        fifo = os.path.join(self.tmp, "fifo")
        os.mkfifo(fifo)
        a = self.d.conn(timeout=10)
        b = self.d.conn(timeout=10)
        try:
            t0 = time.monotonic()
            a.request("vm.create", {"name": "fifo1", "memory": "64M", "kernel": fifo})
            # cprd opened the FIFO (or is stuck in open() on it): another
            # client must be answered all the same.
            self.assertEqual(b.call("daemon.status")["vms"], 0)
            reply = a.recv_line()
            self.assertLess(time.monotonic() - t0, 5)
            self.assertEqual(reply["error"]["message"],
                             f"kernel '{fifo}': not a regular file")
            with self.assertRaises(RpcError) as cm:
                b.call("vm.create", {"name": "fifo2", "memory": "64M", "kernel": self.kernel,
                                     "initrd": fifo})
            self.assertEqual(cm.exception.message, f"initrd '{fifo}': not a regular file")
        finally:
            a.close()
            b.close()
            # If cprd is stuck, opening the FIFO for writing sets it free.
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
            os.unlink(fifo)


LOG_MAX = 16 << 10


class Logs(unittest.TestCase):
    """A guest that writes to its console as fast as it can, under a cprd
    whose logs may not pass 16 KiB."""

    @classmethod
    def setUpClass(cls):
        require_root(cls)
        require_guest()
        cls.d = Daemon(["--log-max-size", str(LOG_MAX)]).start()
        cls.vmdir = os.path.join(cls.d.dir, "vms", "chatty")
        cls.tail = None

    @classmethod
    def tearDownClass(cls):
        if cls.tail:
            cls.tail.kill()
            cls.tail.wait()
        cls.d.stop()

    def test_the_console_log_stays_bounded_and_tail_f_follows_it(self):
        console = os.path.join(self.vmdir, "console.log")
        kept = console + ".1"
        append = GUEST_APPEND.replace("cprd.hb_ms=200", "cprd.hb_ms=2")
        self.d.call("vm.create", {"name": "chatty", "memory": "256M", "kernel": KERNEL,
                                  "initrd": INITRD, "append": append})
        out = tempfile.TemporaryFile()
        type(self).tail = subprocess.Popen(["tail", "-f", console], stdout=out,
                                           stderr=subprocess.DEVNULL)
        # The guest alone: rotated once it has written 16 KiB.
        wait_until(lambda: os.path.exists(kept), 120, f"{kept} to appear", interval=0.2)
        # Then a burst far past the bound, as from a guest that floods its
        # serial port: cut back within a few seconds, never left to grow.
        with open(console, "ab") as f:
            f.write(b"flood " * 100000 + b"\n")
        # Its newest part alone is kept: console.log.1 is bounded too.
        wait_until(lambda: b"flood" in open(kept, "rb").read(), 10,
                   "the flood to be rotated into console.log.1")
        self.assertLessEqual(os.path.getsize(kept), LOG_MAX)
        sizes = []
        for _ in range(20):
            sizes.append(os.path.getsize(console))
            time.sleep(0.25)
        # The bound plus what the guest writes between two checks: nowhere
        # near the flood.
        self.assertLess(max(sizes), LOG_MAX + (256 << 10), f"console.log sizes seen: {sizes}")
        # The guest goes on writing into the same file; tail -f follows it.
        def newest():
            seqs = [int(n) for n, _ in HB_RE.findall(open(console, errors="replace").read())]
            return max(seqs) if seqs else 0
        seen = newest()
        last = wait_until(lambda: newest() > seen and newest(), 60,
                          "a new heartbeat in console.log", interval=0.2)
        def followed():
            out.seek(0)
            return f"hb seq={last} ".encode() in out.read()
        wait_until(followed, 10, f"tail -f to show heartbeat {last}")
        # The VMM log is bounded the same way.
        vmm_log = os.path.join(self.vmdir, "vmm.log")
        with open(vmm_log, "ab") as f:
            f.write(b"x" * (LOG_MAX * 3))
        wait_until(lambda: os.path.getsize(vmm_log) <= LOG_MAX, 10, "vmm.log to be rotated")
        self.assertEqual(open(vmm_log + ".1", "rb").read(), b"x" * LOG_MAX)
        self.d.call("vm.destroy", {"name": "chatty"})

    def test_a_symlink_planted_as_the_kept_copy_is_replaced_not_written_through(self):
        self.d.call("vm.create", {"name": "chatty2", "memory": "256M", "kernel": KERNEL,
                                  "initrd": INITRD, "append": GUEST_APPEND})
        vmdir = os.path.join(self.d.dir, "vms", "chatty2")
        victim = os.path.join(self.d.dir, "victim")
        with open(victim, "w") as f:
            f.write("precious\n")
        os.symlink(victim, os.path.join(vmdir, "vmm.log.1"))
        with open(os.path.join(vmdir, "vmm.log"), "ab") as f:
            f.write(b"y" * (LOG_MAX * 2))
        wait_until(lambda: not os.path.islink(os.path.join(vmdir, "vmm.log.1")), 10,
                   "vmm.log to be rotated")
        self.assertEqual(open(victim).read(), "precious\n")
        # A symlink planted as the log itself is left alone, and so is its target.
        os.rename(os.path.join(vmdir, "console.log"), os.path.join(vmdir, "console.log.moved"))
        with open(victim, "a") as f:
            f.write("z" * (LOG_MAX * 2))
        loops = self.d.read_log().count("Too many levels of symbolic links")
        os.symlink(victim, os.path.join(vmdir, "console.log"))
        # The next check of the logs (every 2 s) refuses to rotate it.
        wait_until(lambda: self.d.read_log().count("Too many levels of symbolic links") > loops,
                   20, "cprd to refuse to rotate console.log through the symlink")
        self.assertEqual(os.path.getsize(victim), len("precious\n") + LOG_MAX * 2)
        self.assertIn("cannot rotate", self.d.read_log())
        self.d.call("vm.destroy", {"name": "chatty2"})


def written_by(pid):
    """Bytes a process handed to write() and the like, from /proc/PID/io."""
    with open(f"/proc/{pid}/io") as f:
        return int(next(l for l in f if l.startswith("wchar:")).split()[1])


class WhatAVmmControls(unittest.TestCase):
    """A VMM taken over by its guest holds its console and VMM log fds and
    speaks QMP as it likes: neither makes cprd write without bound nor put
    its words in cprd's log as cprd's own. Stand-in VMMs (unconfined: they
    live in the source tree; the fds and the monitor are the same)."""

    BOUND = 1 << 20

    def setUp(self):
        require_root(self)
        self.d = Daemon(["--no-confine", "--log-max-size", str(self.BOUND)])
        # A small state directory of its own, as /run is; cprd's log beside it.
        self.logdir = tempfile.mkdtemp(prefix="cprd-test-log-")
        self.d.log = os.path.join(self.logdir, "cprd.log")
        mount_tmpfs(self.d.dir, "64m")
        self.d.start()

    def tearDown(self):
        self.d.stop()
        subprocess.run(["umount", "-l", self.d.dir])
        shutil.rmtree(self.d.dir, ignore_errors=True)
        shutil.rmtree(self.logdir, ignore_errors=True)

    def standin(self, name, fault):
        vmm = wrapper(self.d.dir, f"vmm-{name}",
                      f'STANDIN_FAULT={fault} exec python3 {STANDIN} "$@"')
        st = self.d.call("vm.create", {"name": name, "memory": str(32 << 20),
                                       "kernel": STANDIN, "vmm": vmm})
        return dict(st, vmm=vmm)

    def test_logs_inflated_by_ftruncate_cost_cprd_their_data_alone(self):
        before = written_by(self.d.pid)
        st = self.standin("big", "on:query-status:inflate-logs")
        vmdir = os.path.dirname(st["console_log"])
        logs = [os.path.join(vmdir, n) for n in ("console.log", "vmm.log")]
        # Both were 1 GiB (sparse: free for the VMM) when it answered; the
        # next check (every 2 s) rotates them.
        wait_until(lambda: all(os.path.exists(l + ".1") or os.path.getsize(l) < self.BOUND
                               and os.path.getsize(l) < (1 << 30) for l in logs), 20,
                   "the inflated logs to be rotated")
        wait_until(lambda: all(os.path.exists(l + ".1") for l in logs), 5,
                   "both logs to be rotated", interval=0.1)
        for log in logs:
            kept = open(log + ".1", "rb").read()
            self.assertLessEqual(len(kept), self.BOUND, log)
            self.assertIn(b"STANDIN inflated", kept, log)
            self.assertNotIn(b"\0" * 4096, kept, f"{log}.1 holds the hole as zeros")
        vfs = os.statvfs(self.d.dir)
        used = (vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize
        self.assertLess(used, 4 * self.BOUND, "the state directory's tmpfs filled up")
        # cprd wrote two copies of at most the bound each, and its replies:
        # not 2 GiB of zeros, nor the 64 MiB the tmpfs would take.
        self.assertLess(written_by(self.d.pid) - before, 3 * self.BOUND)
        self.assertNotIn("cannot rotate", self.d.read_log())

    def assert_not_forged(self):
        log = open(self.d.log, "rb").read()
        self.assertNotIn(b"\x1b", log)
        self.assertNotIn(b"\xc2\x9b", log)
        for line in log.split(b"\n"):
            self.assertFalse(line.startswith(b"update vm=web1"), line)
            line.decode("utf-8")  # raises on bytes that are not UTF-8
        return log.decode()

    def test_a_forged_shutdown_reason_stays_on_its_own_line_escaped(self):
        self.standin("liar", "on:query-status:forge-shutdown")
        log = self.assert_not_forged()
        # It was logged: escaped, on cprd's own line about the VM.
        self.assertIn("VM liar: guest shut down (guest-reset\\x0aupdate vm=web1 ", log)
        self.assertIn("\\x1b[2J\\xc2\\x9b31m\\xff\\xfe)", log)

    def test_a_forged_error_reaches_log_events_and_history_escaped(self):
        st = self.standin("liar2", "on:migrate-set-capabilities:refuse-forged")
        ev = self.d.conn(timeout=30)
        self.addCleanup(ev.close)
        ev.call("events.subscribe")
        with self.assertRaises(RpcError) as cm:
            self.d.call("vm.update", {"name": "liar2", "vmm": st["vmm"]})
        self.assertIn("rolled-back", cm.exception.message)
        self.assertIn("guest-reset\\x0aupdate vm=web1", cm.exception.message)
        self.assertNotIn("\x1b", cm.exception.message)
        log = self.assert_not_forged()
        self.assertIn("update vm=liar2 ", log)
        # Events and history are JSON, which would carry an ESC as \u001b
        # to a terminal that prints it: they hold the escaped text too.
        while True:
            msg = ev.recv_line()
            if msg.get("params", {}).get("kind") == "update-finished":
                break
        text = json.dumps(msg["params"], ensure_ascii=False)
        self.assertIn("guest-reset\\\\x0aupdate vm=web1", text)
        for bad in ("\x1b", "\x9b", "\\n"):
            self.assertNotIn(bad, text)
        h = self.d.cprctl("history", "liar2")
        self.assertNotIn("\x1b", h.stdout)
        self.assertIn("\\x0aupdate vm=web1", h.stdout)


class StatePlacement(unittest.TestCase):
    """The run says where its state directories are (run.py --state-tmpfs for
    the normal build): a VM starts there, whatever the file system."""

    def test_a_vm_starts_with_its_state_directory_where_the_run_put_it(self):
        require_root(self)
        require_guest()
        d = Daemon().start()
        try:
            print(f"\nstate directory {d.dir} on {fs_type(d.dir)}", end=" ")
            if STATE_BASE:
                self.assertTrue(d.dir.startswith(STATE_BASE + "/"), d.dir)
            vm = d.create_guest("where")
            self.assertEqual(vm["state"], "running")
            Console(vm["console_log"]).wait_beats(2)
        finally:
            d.stop()


if __name__ == "__main__":
    unittest.main()
