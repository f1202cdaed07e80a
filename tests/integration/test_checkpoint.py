"""Checkpoint and restore against real QEMU and the real guest, across a
simulated host reboot: cprd and every VMM end (no memfd survives), the state
directory is wiped as /run is at boot, a fresh cprd starts on the same
checkpoint directory, and the restored guest beats on with the next sequence
number, still on its first boot, its in-RAM data check passing. Each failure
is injected for real: a full file system, a read-only directory, a truncated
and a bit-flipped checkpoint, the wrong memory size."""

import ctypes
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import unittest

from cprdtest import (BOOT_RE, CPRCTL, HB_RE, QEMU, Console, Daemon, children, fake_checkpoint,
                      fill, kill_vmms_under, hold_relays, mount_tmpfs, require_guest, require_root,
                      wait_until, wrapper)
from cprdtest import RpcError, cprd_group
from test_trust import call_as_member


def assert_one_life(tc, text):
    """One boot, heartbeats 1..N without a gap, every memory check ok."""
    beats = [(int(s), d) for s, d in HB_RE.findall(text)]
    tc.assertEqual(len(BOOT_RE.findall(text)), 1, "the guest booted more than once")
    seqs = [s for s, _ in beats]
    tc.assertEqual(seqs, list(range(1, len(seqs) + 1)), "heartbeat sequence has a gap")
    tc.assertTrue(all(d == "ok" for _, d in beats), "guest memory check failed")
    return seqs


def qemus_of(pid):
    return [p for p, (comm, _) in children(pid).items() if comm.startswith("qemu")]


class CheckpointTest(unittest.TestCase):
    def setUp(self):
        require_root(self)
        require_guest()
        self.ckdir = tempfile.mkdtemp(prefix="cprd-ckpt-")
        self.d = Daemon(["--checkpoint-dir", self.ckdir]).start()

    def tearDown(self):
        self.d.stop()
        subprocess.run(["umount", "-l", self.ckdir], capture_output=True)
        shutil.rmtree(self.ckdir, ignore_errors=True)

    def ctl(self, *args, ok=True):
        p = self.d.cprctl(*args, "--json")
        if ok and p.returncode != 0:
            self.fail(f"cprctl {' '.join(args)} failed ({p.returncode}): {p.stdout} {p.stderr}")
        try:
            return p.returncode, json.loads(p.stdout) if p.stdout.strip() else None, p.stderr
        except json.JSONDecodeError:
            self.fail(f"cprctl {' '.join(args)}: not JSON: {p.stdout!r} {p.stderr}")

    def guest(self, name, memory="256M"):
        con = Console(self.d.create_guest(name, memory=memory)["console_log"])
        con.wait_beats(3)
        return con

    def reboot(self, extra=()):
        """End cprd and every VMM, wipe the state directory (as /run is
        wiped), start a fresh cprd on the same directories."""
        d = self.d
        d.proc.send_signal(signal.SIGTERM)
        d.proc.wait(20)
        kill_vmms_under(d.dir)
        wait_until(lambda: not [p for p in os.listdir("/proc") if p.isdigit()
                                and _is_qemu_of(p, d.dir)], 10, "every VMM to be gone")
        log = d.read_log()
        shutil.rmtree(d.dir)
        os.mkdir(d.dir, 0o700)
        with open(d.log, "w") as f:
            f.write(log + "\n--- reboot ---\n")
        d.extra_args = ["--checkpoint-dir", self.ckdir, "--log-dir", d.kept] + list(extra)
        d.start()

    def status(self, name):
        return self.d.call("vm.status", {"name": name})

    def checkpoint_reboot_restore(self, method, vmm=None):
        con = self.guest("ck")
        rc, rep, _ = self.ctl("checkpoint", "ck", "--method", method)
        self.assertEqual(rep["result"], "ok", rep)
        self.assertEqual(rep["method"], method)
        self.assertEqual(rep["path"], os.path.join(self.ckdir, "ck"))
        self.assertGreater(rep["bytes_written"], 0)
        # Sparse: the guest touched far less than its 256 MiB.
        self.assertLess(rep["disk_bytes"], 200 << 20, rep)
        self.assertEqual(self.status("ck")["state"], "checkpointed")
        # SIGKILLed: the kernel may take a moment to reap it.
        wait_until(lambda: qemus_of(self.d.pid) == [], 5, "the VMM to be gone")
        held = [f["name"] for f in self.d.call("vm.fds", {"name": "ck"})["fds"]]
        self.assertNotIn("ram0", held, "the guest's RAM must be released")
        self.assertIn("meta.json", os.listdir(rep["path"]))
        before = con.text()
        last = assert_one_life(self, before)[-1]

        self.reboot()
        listed = {v["name"]: v for v in self.d.call("vm.list")["vms"]}
        self.assertEqual(listed["ck"]["state"], "checkpointed")
        sub = self.d.conn()
        self.addCleanup(sub.close)
        self.assertTrue(sub.call("events.subscribe")["subscribed"])
        args = ["restore", "ck"] + (["--vmm", vmm] if vmm else [])
        rc, rep, _ = self.ctl(*args)
        # Subscribers saw it begin, the guest run, and the same report.
        seen = []
        while not seen or seen[-1]["kind"] != "restore-finished":
            seen.append(sub.recv_line()["params"])
        self.assertEqual([(e["kind"], e.get("state")) for e in seen],
                         [("restore-started", None), ("state", "running"),
                          ("restore-finished", None)])
        self.assertEqual(seen[-1]["result"], "ok")
        self.assertEqual(seen[-1]["restore_ms"], rep["restore_ms"])
        self.assertEqual(rep["result"], "ok", rep)
        self.assertEqual(rep["method"], method)
        self.assertGreater(rep["blackout_ms"], 0)
        self.assertEqual(rep["new_vmm"], vmm or QEMU)
        st = self.status("ck")
        self.assertEqual(st["state"], "running")
        self.assertEqual(st["vmm"], vmm or QEMU)
        con2 = Console(st["console_log"])
        con2.wait_beats(3)
        seqs = assert_one_life(self, before + con2.text())
        self.assertGreater(seqs[-1], last + 2)
        self.assertFalse(os.path.exists(os.path.join(self.ckdir, "ck")),
                         "a restored checkpoint must be retired")
        hist = self.d.call("vm.history", {"name": "ck"})["updates"]
        ops = [h.get("operation") for h in hist]
        self.assertIn("checkpoint", ops)
        self.assertIn("restore", ops)

    def test_cprd_method_across_reboot(self):
        self.checkpoint_reboot_restore("cprd")

    def test_qemu_method_across_reboot(self):
        self.checkpoint_reboot_restore("qemu")

    def test_restore_with_another_vmm(self):
        tmp = tempfile.mkdtemp(prefix="cprd-vmm-")
        self.addCleanup(shutil.rmtree, tmp, True)
        os.chmod(tmp, 0o755)
        vmm = wrapper(tmp, "qemu-next", f'exec {QEMU} "$@"')
        self.checkpoint_reboot_restore("cprd", vmm=vmm)

    def assert_rolled_back(self, con, args, why):
        rc, rep, _ = self.ctl("checkpoint", "ck", *args, ok=False)
        self.assertEqual(rc, 1)
        self.assertEqual(rep["result"], "rolled-back", rep)
        self.assertIn(why, rep["error"])
        self.assertEqual(self.status("ck")["state"], "running")
        con.wait_beats(2)
        con.assert_healthy(self)

    def test_failed_checkpoints_roll_back(self):
        con = self.guest("ck")
        # A full file system: a small tmpfs, filled.
        full = tempfile.mkdtemp(prefix="cprd-full-")
        self.addCleanup(shutil.rmtree, full, True)
        self.addCleanup(subprocess.run, ["umount", "-l", full], capture_output=True)
        mount_tmpfs(full, "4M")
        os.mkdir(os.path.join(full, "ck"))
        fill(os.path.join(full, "filler"))
        self.assert_rolled_back(con, ["--dir", full + "/ck"], "No space left")
        self.assertEqual(sorted(os.listdir(full + "/ck")), [], "a half-written checkpoint")
        # A read-only directory (root ignores modes: a read-only mount).
        ro = tempfile.mkdtemp(prefix="cprd-ro-")
        self.addCleanup(shutil.rmtree, ro, True)
        self.addCleanup(subprocess.run, ["umount", "-l", ro], capture_output=True)
        mount_tmpfs(ro, "1M", "ro,")
        self.assert_rolled_back(con, ["--dir", ro], "Read-only file system")
        for method in ("cprd", "qemu"):
            self.assert_rolled_back(con, ["--dir", full + "/ck", "--method", method],
                                    "No space left")
            self.assertEqual(os.listdir(full + "/ck"), [])

    def test_what_is_not_a_checkpoint_is_never_replaced(self):
        # Root may name any directory, but cprd replaces there only a
        # checkpoint of its own: not a file under the VM's name (as
        # /etc/passwd would be for a VM 'passwd'), not a directory of
        # another program's files (as /etc/cron.d), not a link.
        con = self.guest("ck", memory="128M")
        base = tempfile.mkdtemp(prefix="cprd-etc-")
        self.addCleanup(shutil.rmtree, base, True)
        dirs = {k: os.path.join(base, k) for k in ("file", "dir", "link")}
        for d in dirs.values():
            os.mkdir(d)
        with open(os.path.join(dirs["file"], "ck"), "w") as f:
            f.write("root:x:0:0:root:/root:/bin/sh\n")
        os.mkdir(os.path.join(dirs["dir"], "ck"))
        with open(os.path.join(dirs["dir"], "ck", "job"), "w") as f:
            f.write("* * * * * root true\n")
        os.symlink(dirs["dir"], os.path.join(dirs["link"], "ck"))

        def tree():
            return {r: (sorted(ds), {f: os.lstat(os.path.join(r, f)).st_ino for f in fs})
                    for r, ds, fs in os.walk(base)}
        before = tree()
        for d in dirs.values():
            rc, rep, err = self.ctl("checkpoint", "ck", "--dir", d, ok=False)
            self.assertEqual(rc, 1, err)
            self.assertEqual(rep["result"], "rolled-back", rep)
            self.assertIn(f"{d}/ck is there and is not a checkpoint of this VM", rep["error"])
            self.assertEqual(tree(), before, f"{d}: something was changed")
            self.assertEqual(self.status("ck")["state"], "running")
        con.wait_beats(2)
        con.assert_healthy(self)

    def test_bad_checkpoints_are_refused(self):
        con = self.guest("ck")
        rc, rep, _ = self.ctl("checkpoint", "ck")
        ram = os.path.join(rep["path"], "ram0.img")
        good = ram + ".good"
        shutil.copyfile(ram, good)
        size = os.path.getsize(ram)

        def refused(why, *args):
            rc, rep, err = self.ctl("restore", "ck", *args, ok=False)
            self.assertEqual(rc, 1, err)
            if rep and "result" in rep:
                self.assertEqual(rep["result"], "refused", rep)
                self.assertIn(why, rep["error"])
            else:
                self.assertIn(why, err)
            self.assertEqual(self.status("ck")["state"], "checkpointed")
            self.assertTrue(os.path.exists(ram), "the checkpoint must stay")
            held = [f["name"] for f in self.d.call("vm.fds", {"name": "ck"})["fds"]]
            self.assertNotIn("ram0", held)
            # A corrupt RAM is found while the new QEMU starts beside the
            # copy; it is SIGKILLed, and reaped on cprd's own time.
            wait_until(lambda: qemus_of(self.d.pid) == [], 10,
                       "the refused restore's VMM to be gone")

        os.truncate(ram, size // 2)
        refused("truncated")
        shutil.copyfile(good, ram)
        with open(ram, "r+b") as f:   # flip a byte the guest wrote
            fd = f.fileno()
            off = os.lseek(fd, 1 << 20, os.SEEK_DATA)
            while os.pread(fd, 4096, off) == bytes(4096):
                off += 4096
            b = os.pread(fd, 4096, off)
            i = next(i for i, x in enumerate(b) if x)
            os.pwrite(fd, bytes([b[i] ^ 0x5a]), off + i)
        refused("corrupt")
        shutil.copyfile(good, ram)
        refused("bytes of RAM", "--memory", "512M")
        meta = os.path.join(rep["path"], "meta.json")
        with open(meta) as f:
            m = json.load(f)
        m["vm"] = "other"
        with open(meta + ".good", "w") as f:
            json.dump(json.load(open(meta)), f)
        with open(meta, "w") as f:
            json.dump(m, f)
        refused("of VM 'other'")
        m["vm"] = "ck"
        m["config"]["machine"] = "pc-q35-9.9"
        with open(meta, "w") as f:
            json.dump(m, f)
        refused("of machine type 'pc-q35-9.9'")
        os.replace(meta + ".good", meta)
        os.unlink(good)
        rc, rep, _ = self.ctl("restore", "ck")
        self.assertEqual(rep["result"], "ok", rep)
        con.wait_beats(3)
        con.assert_healthy(self)

    def test_other_methods_answer_during_a_large_copy(self):
        # 256 MiB of random data: cprd's method copies guest RAM in 64 MiB
        # steps, one per turn of the loop, so requests are answered between
        # them, and vm.status says how far the copy is.
        vm = self.d.create_guest("big", memory="1G",
                                 append="console=ttyS0 quiet cprd.data_mb=256 cprd.hb_ms=200")
        Console(vm["console_log"]).wait_beats(3)
        seen, errors, stop = [], [], threading.Event()

        def poll():
            while not stop.is_set():
                try:
                    p = self.d.call("vm.status", {"name": "big"}).get("checkpoint_progress")
                    self.d.call("daemon.status")
                except Exception as e:  # noqa: BLE001 - reported below
                    errors.append(e)
                    return
                if p and p["operation"] == "checkpoint":
                    seen.append(p["copied_bytes"])

        th = threading.Thread(target=poll)
        th.start()
        try:
            rc, rep, _ = self.ctl("checkpoint", "big", "--method", "cprd")
        finally:
            stop.set()
            th.join(30)
        self.assertEqual(rep["result"], "ok", rep)
        self.assertEqual(errors, [])
        during = sorted({b for b in seen if b > 0})
        self.assertGreaterEqual(len(during), 2,
                                f"requests were not answered between the copy's steps: {seen}")
        self.assertEqual(self.status("big")["state"], "checkpointed")
        self.assertIsNone(self.status("big").get("checkpoint_progress"))

    def test_cprd_killed_mid_checkpoint(self):
        # In a directory of its own (--dir): the restarted cprd must find
        # the unfinished checkpoint there, not only in --checkpoint-dir.
        other = tempfile.mkdtemp(prefix="cprd-ckpt-other-")
        self.addCleanup(shutil.rmtree, other, True)
        con = Console(self.d.create_guest(
            "mid", memory="1G",
            append="console=ttyS0 quiet cprd.data_mb=128 cprd.hb_ms=200")["console_log"])
        con.wait_beats(3)
        tmp = os.path.join(other, ".mid.tmp")
        p = subprocess.Popen([CPRCTL, "--socket", self.d.sock, "checkpoint", "mid", "--dir", other,
                              "--method", "qemu", "--channels", "1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: os.path.exists(tmp), 30, "the checkpoint to begin")
        self.d.proc.kill()
        self.d.proc.wait()
        p.wait(30)
        self.assertTrue(os.path.exists(tmp), "the checkpoint finished before cprd was killed")
        os.unlink(self.d.sock)
        self.d.start()
        self.assertFalse(os.path.exists(tmp), "the unfinished checkpoint was left behind")
        self.assertFalse(os.path.exists(os.path.join(other, "mid")))
        st = self.status("mid")
        self.assertEqual(st["state"], "running", st)
        con.wait_beats(3)
        con.assert_healthy(self)
        # The VMM is usable again: a checkpoint now goes through.
        rc, rep, _ = self.ctl("checkpoint", "mid", "--dir", other)
        self.assertEqual(rep["result"], "ok", rep)

    def test_cprd_killed_mid_checkpoint_while_its_qemu_is_stopped(self):
        # A busy host, made deterministic: QEMU gets no CPU (SIGSTOP) from
        # the moment the save began until after the restarted cprd has
        # recovered, so it answers no monitor command during recovery.
        # The guest must still run on once QEMU does, not stay paused by a
        # save nobody finishes.
        con = Console(self.d.create_guest(
            "stp", memory="1G",
            append="console=ttyS0 quiet cprd.data_mb=128 cprd.hb_ms=200")["console_log"])
        con.wait_beats(3)
        pid = self.status("stp")["pid"]
        tmp = os.path.join(self.ckdir, ".stp.tmp")
        img = os.path.join(tmp, "memory.img")
        p = subprocess.Popen([CPRCTL, "--socket", self.d.sock, "checkpoint", "stp",
                              "--method", "qemu", "--channels", "1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # QEMU writes the save (so it took the pause and the migration)
        # before it is stopped; cprd made the directory before either.
        wait_until(lambda: os.path.exists(img) and os.stat(img).st_blocks > 0, 30,
                   "QEMU to write the checkpoint")
        os.kill(pid, signal.SIGSTOP)
        self.addCleanup(os.kill, pid, signal.SIGCONT)  # whatever happens below
        self.d.proc.kill()
        self.d.proc.wait()
        p.wait(30)
        self.assertTrue(os.path.exists(tmp), "the checkpoint finished before cprd was killed")
        os.unlink(self.d.sock)
        self.d.start()
        self.assertEqual(self.status("stp")["pid"], pid)
        os.kill(pid, signal.SIGCONT)
        con.wait_beats(3, timeout=60)
        con.assert_healthy(self)
        wait_until(lambda: self.status("stp")["state"] == "running", 30, "stp to be running")
        self.assertFalse(os.path.exists(tmp), "the unfinished checkpoint was left behind")
        # The VMM is usable again: a checkpoint now goes through.
        rc, rep, _ = self.ctl("checkpoint", "stp")
        self.assertEqual(rep["result"], "ok", rep)

    def test_all_and_restore_on_start(self):
        cons = {n: self.guest(n, memory="128M") for n in ("a1", "a2")}
        rc, out, _ = self.ctl("checkpoint", "--all", "--parallel", "2")
        self.assertEqual([r["result"] for r in out["checkpoints"]], ["ok", "ok"], out)
        before = {n: c.text() for n, c in cons.items()}
        self.reboot(extra=["--restore-on-start"])
        for n in cons:
            wait_until(lambda: self.status(n)["state"] == "running", 120, f"{n} to run")
            con = Console(self.status(n)["console_log"])
            con.wait_beats(3)
            assert_one_life(self, before[n] + con.text())
        rc, out, _ = self.ctl("checkpoint", "--all")
        rc, out, _ = self.ctl("restore", "--all", "--parallel", "2")
        self.assertEqual([r["result"] for r in out["restores"]], ["ok", "ok"], out)


class CheckpointFiles(unittest.TestCase):
    """What cprd does with the files in a checkpoint directory, on
    checkpoints written by hand (no VMM runs): it opens none of them in a
    way that can block, and removes none that are not its own."""

    def setUp(self):
        require_root(self)
        self.gid = cprd_group()
        self.ckdir = tempfile.mkdtemp(prefix="cprd-ckpt-")
        self.addCleanup(shutil.rmtree, self.ckdir, True)
        for name in ("fm", "gone"):
            fake_checkpoint(self.ckdir, name)
        # A member's restore has its VMM binary judged first (the default
        # allow-list): one it may run, so that the files are reached.
        fake_checkpoint(self.ckdir, "fr", vmm=QEMU)
        fake_checkpoint(self.ckdir, "extra", extra=["notes"])
        self.d = Daemon(["--checkpoint-dir", self.ckdir]).start()
        self.addCleanup(self.d.stop)
        os.chmod(self.d.dir, 0o755)
        os.chmod(self.d.sock, 0o660)

    def state(self, name):
        return self.d.call("vm.status", {"name": name})["state"]

    def test_destroy_removes_only_cprds_own_files(self):
        # The checkpoint was replaced by a directory of someone else's.
        gone = os.path.join(self.ckdir, "gone")
        self.assertEqual(self.state("gone"), "checkpointed")
        shutil.rmtree(gone)
        os.mkdir(gone)
        with open(os.path.join(gone, "keep"), "w") as f:
            f.write("not cprd's\n")
        self.d.call("vm.destroy", {"name": "gone"})
        self.assertEqual(os.listdir(gone) if os.path.isdir(gone) else None, ["keep"],
                         "destroy removed what is not a checkpoint")
        # In a checkpoint, what cprd did not write stays (and so does the
        # directory, which it keeps from being empty).
        self.assertEqual(self.state("extra"), "checkpointed")
        self.d.call("vm.destroy", {"name": "extra"})
        extra = os.path.join(self.ckdir, "extra")
        self.assertEqual(os.listdir(extra) if os.path.isdir(extra) else None, ["notes"])

    def test_fifo_in_a_checkpoint_blocks_nobody(self):
        fifos = {"fm": "meta.json", "fr": "ram0.img"}
        for name, file in fifos.items():
            path = os.path.join(self.ckdir, name, file)
            os.unlink(path)
            os.mkfifo(path, 0o600)
            self.addCleanup(_open_fifo_end, path)  # frees a cprd stuck in open()
        # fr by a member naming cprd's own checkpoint directory: allowed.
        # Raw calls, not cprctl: a member may not reach the build's cprctl
        # (a clone in a 0700 directory, as README's check command makes).
        for name, member in (("fm", False), ("fr", True)):
            done = {}
            params = {"name": name, "dir": self.ckdir}

            def restore():
                if member:
                    done["r"] = call_as_member(self.d, self.gid, "vm.restore", params)
                    return
                try:
                    done["r"] = (0, self.d.call("vm.restore", params, timeout=30))
                except RpcError as e:
                    done["r"] = (e.code, e.message)
            t = threading.Thread(target=restore, daemon=True)
            t.start()
            # Another connection is answered meanwhile, whichever cprd
            # reads first: before, cprd sat in open() of the FIFO.
            c = self.d.conn(5)
            try:
                self.assertIn(name, [v["name"] for v in c.call("vm.list")["vms"]])
            finally:
                c.close()
            t.join(5)
            self.assertFalse(t.is_alive(), f"the restore of {name} was not answered in 5 s")
            code, msg = done["r"]
            self.assertNotEqual(code, 0, msg)
            self.assertIn("refused", msg)
            self.assertIn(f"cannot open its {fifos[name]}: not a regular file"
                          if name == "fm" else
                          f"cannot open the checkpoint's {fifos[name]}: not a regular file",
                          msg)
            self.assertEqual(self.state(name), "checkpointed")


def _open_fifo_end(path):
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass  # no reader: nobody is stuck in it


class RestoreInterrupted(unittest.TestCase):
    """cprd killed while it restores, at the two points that differ: the
    new QEMU has loaded the checkpoint but not run the guest (it is ended,
    and the checkpoint is still the guest), and the new QEMU runs the guest
    (it keeps it, and the checkpoint, now stale, is retired). The new QEMU
    runs behind qmp_hold.py, which hides from cprd what QEMU says after a
    given command, so cprd dies with the restore unfinished in its eyes."""

    HOLD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qmp_hold.py")

    def setUp(self):
        require_root(self)
        require_guest()
        # The relays and the VMMs of a killed cprd are reaped here.
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)
        self.ckdir = tempfile.mkdtemp(prefix="cprd-ckpt-")
        self.addCleanup(shutil.rmtree, self.ckdir, True)
        self.d = Daemon(["--no-confine", "--checkpoint-dir", self.ckdir])
        self.addCleanup(self.no_relay_left)
        self.d.start()
        self.addCleanup(self.d.stop)
        self.marks = os.path.join(self.d.dir, "marks")
        os.mkdir(self.marks)
        self.con = Console(self.d.create_guest("ri", memory="256M")["console_log"])
        self.con.wait_beats(3)
        rc, rep, _ = CheckpointTest.ctl(self, "checkpoint", "ri", "--method", "cprd")
        self.assertEqual(rep["result"], "ok", rep)

    def no_relay_left(self):
        """Once cprd and its VMMs are gone, the relays went with their QEMUs
        (they used to wait for a cprd that never came back, for ever)."""
        try:
            wait_until(lambda: not hold_relays(self.d.dir), 10,
                       "the qmp_hold.py relays to end with their QEMUs")
        finally:
            for pid in hold_relays(self.d.dir):
                os.kill(pid, signal.SIGKILL)

    def held_restore(self, after, state):
        """Restore with a QEMU heard by cprd until it has answered `after`;
        wait until it is in `state`, then kill cprd. Returns its pid."""
        vmm = wrapper(self.d.dir, "held", f"QMP_HOLD_AFTER={after} QMP_HOLD_MARK={self.marks} "
                                          f'exec python3 {self.HOLD} {QEMU} "$@"')
        p = subprocess.Popen([CPRCTL, "--socket", self.d.sock, "restore", "ri", "--vmm", vmm],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(p.wait, 30)

        def reached():
            for m in os.listdir(self.marks):
                pid, st = m.split("-", 1)
                if st == state:
                    return int(pid)
            self.assertIsNone(p.poll(), "the restore ended before it was held")
            return None
        new = wait_until(reached, 120, f"the new QEMU to be {state}")
        with open(os.path.join(self.d.dir, "registry.json")) as f:
            rec = [v for v in json.load(f)["vms"] if v["name"] == "ri"][0]
        self.assertEqual(rec.get("restore", {}).get("pid"), new,
                         "the registry does not name the restore's VMM")
        self.d.proc.kill()
        self.d.proc.wait()
        p.wait(30)
        os.unlink(self.d.sock)
        self.d.start()
        return new

    def test_killed_while_the_new_vmm_holds_the_state_unrun(self):
        new = self.held_restore("migrate-incoming", "paused")
        wait_until(lambda: not os.path.exists(f"/proc/{new}/status") or
                   "zombie" in open(f"/proc/{new}/status").read(), 10,
                   "the unrun restore VMM to be ended")
        st = self.d.call("vm.status", {"name": "ri"})
        self.assertEqual(st["state"], "checkpointed", st)
        self.assertTrue(os.path.exists(os.path.join(self.ckdir, "ri", "meta.json")),
                        "the checkpoint must stay")
        held = [f["name"] for f in self.d.call("vm.fds", {"name": "ri"})["fds"]]
        self.assertNotIn("ram0", held, "RAM of an unfinished restore must not stay in custody")
        # The checkpoint is taken up again, and the guest goes on from it.
        rc, rep, _ = CheckpointTest.ctl(self, "restore", "ri")
        self.assertEqual(rep["result"], "ok", rep)
        self.con.wait_beats(3)  # the same console log, from the first boot on
        assert_one_life(self, self.con.text())

    def test_killed_once_the_new_vmm_runs_the_guest(self):
        new = self.held_restore("cont!", "running")
        st = self.d.call("vm.status", {"name": "ri"})
        self.assertEqual((st["state"], st["pid"]), ("running", new), st)
        self.assertFalse(os.path.exists(os.path.join(self.ckdir, "ri")),
                         "a checkpoint the guest ran past must be retired")
        held = [f["name"] for f in self.d.call("vm.fds", {"name": "ri"})["fds"]]
        self.assertIn("ram0", held, "the guest's RAM must be back in custody")
        self.con.wait_beats(3)
        assert_one_life(self, self.con.text())
        # The VM is whole again: it can be checkpointed once more.
        rc, rep, _ = CheckpointTest.ctl(self, "checkpoint", "ri")
        self.assertEqual(rep["result"], "ok", rep)


def _is_qemu_of(pid, state_dir):
    try:
        with open(f"/proc/{pid}/comm") as f:
            if not f.read().startswith("qemu"):
                return False
        return any(os.readlink(f"/proc/{pid}/fd/{fd}").startswith(state_dir + "/")
                   for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


if __name__ == "__main__":
    unittest.main()
