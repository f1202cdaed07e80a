"""Disks held by cprd (daemon/devices/disk.c): a real guest writes
numbered records to a raw disk while it boots from nothing and a qcow2
overlay on a shared raw base is attached beside it; the records and the
image locks must survive every way the guest moves between VMMs, and
cprd judges every image as the caller could open it."""

import json
import os
import shutil
import subprocess
import tempfile
import unittest

from cprdtest import (GUEST_APPEND, INITRD, KERNEL, QEMU, Console, RpcError,
                      SharedDaemonTest, cprd_group, disk_records, require_root, wait_until)
from test_trust import call_as_member, root_only_dir

QEMU_IO = shutil.which("qemu-io")
QEMU_IMG = shutil.which("qemu-img")
LOCKED = 'Failed to get "write" lock'


def wait_disk(con, n, timeout=120):
    """n more durable records than now, as the guest reports them."""
    start = len(con.disk_seqs())
    wait_until(lambda: len(con.disk_seqs()) >= start + n, timeout,
               f"{n} more disk records in {con.path}", interval=0.2)


def write_refused(path, fmt):
    """What qemu-io says when it tries to open path for writing."""
    p = subprocess.run([QEMU_IO, "-f", fmt, "-c", "write 0 512", path],
                       capture_output=True, text=True, timeout=60)
    return p.returncode != 0 and LOCKED in p.stdout + p.stderr


class Disks(SharedDaemonTest):
    """One guest with a raw data disk (vda, written by the guest) and a
    qcow2 overlay on a raw base (vdb)."""

    @classmethod
    def setUpClass(cls):
        if not QEMU_IO or not QEMU_IMG:
            raise unittest.SkipTest("qemu-io and qemu-img (qemu-utils) are needed")
        super().setUpClass()
        # On a disk file system, not the state tmpfs: images are files an
        # operator keeps anywhere.
        cls.images = tempfile.mkdtemp(prefix="cprd-disks-", dir="/var/tmp")
        cls.data = os.path.join(cls.images, "data.raw")
        cls.base = os.path.join(cls.images, "base.raw")
        cls.overlay = os.path.join(cls.images, "vm.qcow2")
        with open(cls.data, "wb") as f:
            f.truncate(16 << 20)
        subprocess.run([QEMU_IMG, "create", "-q", "-f", "raw", cls.base, "8M"], check=True)
        subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", cls.base, "-F", "raw",
                        cls.overlay], check=True)
        vm = cls.d.call("vm.create", {
            "name": "dsk", "memory": "256M", "kernel": KERNEL, "initrd": INITRD,
            "append": GUEST_APPEND + " cprd.disk=vda cprd.disk_ms=100",
            "vmm": QEMU, "cpu": "max",
            "disks": [{"path": cls.data, "serial": "data1"},
                      {"path": cls.overlay, "format": "qcow2"}]})
        cls.con = Console(vm["console_log"])

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        shutil.rmtree(cls.images, ignore_errors=True)

    def status(self):
        return self.d.call("vm.status", {"name": "dsk"})

    def assert_locked(self):
        """Another QEMU may not open any image of the guest for writing."""
        self.assertTrue(write_refused(self.data, "raw"), "the data disk is not locked")
        self.assertTrue(write_refused(self.overlay, "qcow2"), "the overlay is not locked")
        self.assertTrue(write_refused(self.base, "raw"), "the base is not locked")

    def assert_records_on_disk(self):
        """Every record the guest said was durable is on the disk, in order
        (once the VM is gone: its console log is kept beside the state
        directory)."""
        kept = os.path.join(self.d.kept, "dsk", "console.log")
        said = Console(kept).disk_seqs()
        self.assertTrue(said, "the guest wrote no record")
        on_disk = disk_records(self.data)
        self.assertEqual(on_disk, list(range(1, len(on_disk) + 1)), "a gap on the disk")
        self.assertGreaterEqual(len(on_disk), max(said),
                                f"the guest said {max(said)} records were durable; "
                                f"{len(on_disk)} are on the disk")

    def test_1_the_guest_writes_and_the_images_are_locked(self):
        wait_disk(self.con, 5)
        self.assert_locked()
        # The base is shared for reading: another VM may stand on it too.
        p = subprocess.run([QEMU_IO, "-r", "-f", "raw", "-c", "read 0 512", self.base],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        st = self.status()
        layers = [[l["path"] for l in d["layers"]] for d in st["disks"]]
        self.assertEqual(layers, [[self.data], [self.overlay, self.base]])
        fds = {f["name"]: f for f in self.d.call("fd.list", {"vm": "dsk"})["fds"]}
        for name in ("disk0", "disk1", "disk1.1"):
            self.assertEqual(fds[name]["kind"], "file", fds)
        # The VMM has its own file description of each image, not cprd's.
        pid = st["pid"]
        opened = [os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")]
        for path in (self.data, self.overlay, self.base):
            self.assertIn(path, opened)

    def test_2_every_strategy_carries_them(self):
        for strategy in ("handover", "cpr-transfer"):
            with self.subTest(strategy=strategy):
                before = self.status()["pid"]
                res = self.d.call("vm.update", {"name": "dsk", "strategy": strategy})
                self.assertEqual(res["result"], "ok", res)
                self.assertNotEqual(self.status()["pid"], before)
                wait_disk(self.con, 3)
                self.assert_locked()
        # cpr-exec cannot carry them: refused before anything was done.
        pid = self.status()["pid"]
        with self.assertRaises(RpcError) as e:
            self.d.call("vm.update", {"name": "dsk", "strategy": "cpr-exec"})
        self.assertIn("its disk images cannot be carried that way", e.exception.message)
        self.assertEqual(self.status()["pid"], pid)
        self.assertEqual(self.status()["state"], "running")

    def test_2b_the_cpu_model_asked_at_create_is_kept(self):
        # (This guest was made with cpu "max" too; test_2 updated it twice.)
        pid = self.status()["pid"]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        self.assertEqual(argv[argv.index(b"-cpu") + 1], b"max")
        self.assertEqual(self.status()["cpu"], "max")

    def test_2c_dumpspec_gives_back_what_create_was_given(self):
        p = self.d.cprctl("dumpspec", "dsk", check=True)
        self.assertEqual(json.loads(p.stdout), {
            "name": "dsk", "memory": 256 << 20, "vcpus": 1, "kernel": KERNEL,
            "initrd": INITRD, "append": GUEST_APPEND + " cprd.disk=vda cprd.disk_ms=100",
            "vmm": self.status()["vmm"], "machine": "q35", "cpu": "max",
            "disks": [{"path": self.data, "serial": "data1"},
                      {"path": self.overlay, "format": "qcow2"}]})

    def test_3_a_restarted_cprd_holds_them_again(self):
        self.restart_cprd()
        fds = {f["name"] for f in self.d.call("fd.list", {"vm": "dsk"})["fds"]}
        self.assertTrue({"disk0", "disk1", "disk1.1"} <= fds, fds)
        res = self.d.call("vm.update", {"name": "dsk", "strategy": "handover"})
        self.assertEqual(res["result"], "ok", res)
        wait_disk(self.con, 3)
        self.assert_locked()

    def restart_cprd(self):
        self.d.proc.kill()
        self.d.proc.wait()
        os.unlink(self.d.sock)
        self.d.start()

    def test_3b_a_file_put_at_an_images_path_is_never_used(self):
        # Another file (a copy: the same bytes) renamed over the overlay's
        # path while the guest runs.
        aside = self.overlay + ".aside"
        os.rename(self.overlay, aside)
        shutil.copy(aside, self.overlay)
        try:
            # cprd hands over the file it holds, not the path: fine.
            res = self.d.call("vm.update", {"name": "dsk", "strategy": "handover"})
            self.assertEqual(res["result"], "ok", res)
            # A restarted cprd finds another file at the path it judged,
            # and does not take it: the guest runs on, no VMM can be
            # started for it, and the update says why.
            self.restart_cprd()
            self.assertIn("cannot hold its disk images again: another file is at a path "
                          "judged at create", self.d.read_log())
            pid = self.status()["pid"]
            with self.assertRaises(RpcError) as e:
                self.d.call("vm.update", {"name": "dsk", "strategy": "handover"})
            self.assertIn("a device's fds are not in cprd's custody", e.exception.message)
            self.assertEqual(self.status()["pid"], pid)
            wait_disk(self.con, 2)
        finally:
            os.replace(aside, self.overlay)
        # The very file back at its path: held again after a restart.
        self.restart_cprd()
        res = self.d.call("vm.update", {"name": "dsk", "strategy": "handover"})
        self.assertEqual(res["result"], "ok", res)
        self.assert_locked()

    def checkpoint(self):
        ck = tempfile.mkdtemp(prefix="cprd-disks-ck-", dir="/var/tmp")
        self.addCleanup(shutil.rmtree, ck, True)
        res = self.d.call("vm.checkpoint", {"name": "dsk", "dir": ck})
        self.assertEqual(res["result"], "ok", res)
        self.assertEqual(self.status()["state"], "checkpointed")
        return ck

    def test_4_checkpoint_and_restore(self):
        ck = self.checkpoint()
        # No VMM runs the guest: cprd keeps the images as they were saved.
        self.assert_locked()
        res = self.d.call("vm.restore", {"name": "dsk", "dir": ck})
        self.assertEqual(res["result"], "ok", res)
        wait_disk(self.con, 3)
        self.assert_locked()
        self.con.assert_healthy(self)

    def test_5_an_image_changed_while_checkpointed_is_not_restored(self):
        ck = self.checkpoint()
        # Written anyway, by a writer that ignores locks (block 0, which
        # the guest never writes).
        fd = os.open(self.data, os.O_WRONLY)
        try:
            os.pwrite(fd, b"changed", 0)
        finally:
            os.close(fd)
        with self.assertRaises(RpcError) as e:
            self.d.call("vm.restore", {"name": "dsk", "dir": ck})
        self.assertIn(f"disk0 ({self.data}) was changed after the checkpoint was written",
                      e.exception.message)
        self.assertEqual(self.status()["state"], "checkpointed")
        self.assertTrue(os.path.exists(os.path.join(ck, "dsk", "meta.json")),
                        "the checkpoint is gone")
        self.assert_locked()
        # A restarted cprd holds them again, and still refuses.
        self.restart_cprd()
        self.assertEqual(self.status()["state"], "checkpointed")
        self.assert_locked()
        with self.assertRaises(RpcError) as e:
            self.d.call("vm.restore", {"name": "dsk", "dir": ck})
        self.assertIn("was changed after the checkpoint was written", e.exception.message)

    def test_6_every_record_is_on_the_disk(self):
        self.d.call("vm.destroy", {"name": "dsk"})
        self.assert_records_on_disk()


class CreateRefusals(SharedDaemonTest):
    """What vm.create refuses about disks and the CPU model, before any VMM
    starts."""

    needs_guest = False

    @classmethod
    def setUpClass(cls):
        require_root(cls)
        if not QEMU_IMG:
            raise unittest.SkipTest("qemu-img (qemu-utils) is needed")
        cls.gid = cprd_group()  # before cprd starts: it gives its socket to the group
        super().setUpClass()
        os.chmod(cls.d.dir, 0o755)
        os.chmod(cls.d.sock, 0o660)
        cls.dir = tempfile.mkdtemp(prefix="cprd-disks-", dir="/var/tmp")
        os.chmod(cls.dir, 0o755)
        # What a member names as its kernel must be root's all the way up
        # (the clone of the tests may be anywhere): any file does, the
        # disks are refused before it is read.
        cls.root = root_only_dir()
        cls.kernel = os.path.join(cls.root, "kernel")
        with open(cls.kernel, "w") as f:
            f.write("not read\n")
        os.chmod(cls.kernel, 0o644)
        cls.secret = os.path.join(cls.dir, "root-only.raw")
        with open(cls.secret, "wb") as f:
            f.truncate(1 << 20)
        os.chmod(cls.secret, 0o600)
        cls.base = os.path.join(cls.dir, "base.raw")
        with open(cls.base, "wb") as f:
            f.truncate(1 << 20)
        os.chmod(cls.base, 0o644)
        cls.no_format = os.path.join(cls.dir, "no-format.qcow2")
        # A backing file named without its format: qemu-img refuses to make
        # one today, but older images have them. Its format's header
        # extension is turned into one nobody knows.
        subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
                        cls.no_format], check=True)
        with open(cls.no_format, "r+b") as f:
            head = f.read(4096)
            at = head.find(bytes.fromhex("e2792aca"), 72)
            assert at > 0, "no backing format extension in the qcow2 header"
            f.seek(at)
            f.write(bytes.fromhex("0badf00d"))

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        shutil.rmtree(cls.dir, ignore_errors=True)
        shutil.rmtree(cls.root, ignore_errors=True)

    def create(self, disks, as_member=False):
        params = {"name": "r1", "memory": "64M", "kernel": self.kernel, "disks": disks}
        if as_member:
            return call_as_member(self.d, self.gid, "vm.create", params)
        try:
            return 0, self.d.call("vm.create", params)
        except RpcError as e:
            return e.code, e.message

    def test_a_member_may_not_name_what_it_cannot_open(self):
        code, msg = self.create([{"path": self.secret}], as_member=True)
        self.assertNotEqual(code, 0)
        self.assertIn("disk 0: image", msg)
        self.assertIn("the caller may not open it so", msg)
        # Readable is not enough for a disk the guest writes.
        code, msg = self.create([{"path": self.base}], as_member=True)
        self.assertNotEqual(code, 0)
        self.assertIn("(read-write)", msg)
        self.assertEqual(self.d.call("vm.list")["vms"], [])

    def test_a_backing_file_without_its_format_is_not_guessed(self):
        code, msg = self.create([{"path": self.no_format, "format": "qcow2"}])
        self.assertNotEqual(code, 0)
        self.assertIn("without its format", msg)

    def test_a_cpu_model_is_a_name_without_options(self):
        params = {"name": "r2", "memory": "64M", "kernel": KERNEL, "cpu": "max,+avx"}
        with self.assertRaises(RpcError) as e:
            self.d.call("vm.create", params)
        self.assertIn("CPU model 'max,+avx' must be 1-64 letters", e.exception.message)
        self.assertEqual(e.exception.error["data"]["param"], "cpu")

    def test_create_takes_a_spec_file_and_the_command_line_wins(self):
        spec = os.path.join(self.dir, "spec.json")
        with open(spec, "w") as f:
            json.dump({"name": "ignored", "memory": "64M", "kernel": KERNEL, "cpu": "a,b",
                       "disks": [{"path": "rel.img"}]}, f)
        # The file's disks reach cprd (which refuses them)...
        p = self.d.cprctl("create", "r4", "--spec", spec)
        self.assertEqual(p.returncode, 1, p.stderr)
        self.assertIn("disk 0: 'path' must be an absolute path", p.stderr)
        # ...and what the command line says replaces them: these pass, and
        # cprd gets as far as the VMM (checked after disks and cpu).
        p = self.d.cprctl("create", "r4", "--spec", spec, "--cpu", "max", "--disk",
                          f"{self.base},readonly=on", "--vmm", "/nonexistent/qemu")
        self.assertEqual(p.returncode, 1, p.stderr)
        self.assertIn("VMM binary '/nonexistent/qemu' not found", p.stderr)
        with open(spec, "w") as f:
            json.dump({"memory": "64M", "kernle": KERNEL}, f)
        p = self.d.cprctl("create", "r4", "--spec", spec)
        self.assertEqual(p.returncode, 2, p.stderr)
        self.assertIn("unknown key 'kernle'", p.stderr)
        self.assertEqual(self.d.call("vm.list")["vms"], [])

    def test_bad_shapes(self):
        for disks, want in (([{"path": "rel.img"}], "absolute path"),
                            ([{"path": self.base, "bus": "ide"}], "unknown key 'bus'"),
                            ([{"path": self.base, "format": "vmdk"}], "'format' must be"),
                            ("/a.img", "must be an array of objects"),
                            ([{"path": os.path.join(self.dir, "none.raw")}],
                             "No such file")):
            with self.subTest(disks=disks):
                code, msg = self.create(disks)
                self.assertNotEqual(code, 0)
                self.assertIn(want, msg)


if __name__ == "__main__":
    unittest.main()
