#!/usr/bin/env python3
"""Boot the cached Debian guest (scripts/build-debian-guest.sh) and check it.

    python3 scripts/debian-guest-smoke.py [CACHEDIR] [--firmware bios,uefi]

CACHEDIR defaults to $CPRD_QEMU_CACHE/debian-guest (/var/cache/cprd-test/...).
Each boot runs plain qemu-system-x86_64 (q35, TCG unless --accel says other)
on a qcow2 overlay of CACHEDIR/debian.img (the base is never written), with
a 64 MiB raw data disk (vdb), the guest agent on a virtio-serial port behind
a unix socket, and a virtio-net NIC on an unconnected hub (no traffic leaves
the VM). Per boot, all with time limits:
  - waits for "CPRD-DEBIAN ready" on the serial console (ttyS0)
  - pings the agent (guest-ping, after guest-sync-delimited)
  - sees the NIC's static address 10.77.0.<last MAC byte> through the agent
  - reads "SEQ 0".."SEQ 2" from the stream on port 7000 (inside the guest)
  - sees at least --records "CPRD-DEBIAN disk seq=<k>" lines
  - shuts the guest down through the agent (guest-shutdown) and waits for
    QEMU to exit
  - reads the data disk: every announced record is there, in order.
The boots share one data disk, in the order given (SeaBIOS, then OVMF with a
fresh copy of OVMF_VARS): a later boot must continue after the records of
the earlier one. Prints the time to "ready" and the load average.
Exits 0 when every check passed.
"""

import argparse
import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"
MAC = "52:54:00:77:00:2a"
BLOCK = 4096
DISK_RE = re.compile(rb"CPRD-DEBIAN disk seq=(\d+)")


class Failure(Exception):
    pass


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


class Agent:
    """A QEMU guest agent client on QEMU's unix socket (chardev server)."""

    def __init__(self, path):
        self.path = path
        self.sock = None
        self.buf = b""
        self.next_id = 1000

    def close(self):
        if self.sock:
            self.sock.close()
        self.sock = None
        self.buf = b""

    def _read_until(self, pred, deadline):
        while True:
            r = pred()
            if r is not None:
                return r
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout()
            self.sock.settimeout(left)
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("agent socket closed")
            self.buf += data

    def _line(self):
        if b"\n" not in self.buf:
            return None
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def sync(self, timeout):
        """Connect and synchronise; retried until the agent answers."""
        deadline = time.monotonic() + timeout
        while True:
            self.close()
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(self.path)
                self.next_id += 1
                sid = self.next_id
                # 0xff resets the agent's parser; the answer comes after a 0xff.
                self.sock.sendall(b"\xff" + json.dumps(
                    {"execute": "guest-sync-delimited", "arguments": {"id": sid}}).encode() + b"\n")
                attempt = min(deadline, time.monotonic() + 5)

                def delim():
                    i = self.buf.find(b"\xff")
                    if i < 0:
                        return None
                    self.buf = self.buf[i + 1:]
                    return True
                self._read_until(delim, attempt)
                while True:
                    line = self._read_until(self._line, attempt)
                    try:
                        msg = json.loads(line)
                    except ValueError:
                        continue
                    if msg.get("return") == sid:
                        return
            except (OSError, socket.timeout, ConnectionError):
                if time.monotonic() >= deadline:
                    raise Failure("the guest agent did not answer guest-sync-delimited")
                time.sleep(0.5)

    def cmd(self, execute, arguments=None, timeout=30, reply=True):
        req = {"execute": execute}
        if arguments is not None:
            req["arguments"] = arguments
        self.sock.sendall(json.dumps(req).encode() + b"\n")
        if not reply:
            return None
        deadline = time.monotonic() + timeout
        while True:
            line = self._read_until(self._line, deadline)
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "error" in msg:
                raise Failure(f"agent {execute}: {msg['error']}")
            if "return" in msg:
                return msg["return"]

    def exec(self, argv, timeout=60):
        """Run argv in the guest; return (exit code, stdout, stderr)."""
        pid = self.cmd("guest-exec", {"path": argv[0], "arg": argv[1:],
                                      "capture-output": True})["pid"]
        deadline = time.monotonic() + timeout
        while True:
            st = self.cmd("guest-exec-status", {"pid": pid})
            if st.get("exited"):
                out = base64.b64decode(st.get("out-data", "")).decode(errors="replace")
                err = base64.b64decode(st.get("err-data", "")).decode(errors="replace")
                return st.get("exitcode"), out, err
            if time.monotonic() > deadline:
                raise Failure(f"guest-exec {argv} did not finish")
            time.sleep(0.5)


def disk_records(path):
    """The records at the start of the data disk: (count, first bad block)."""
    n = 0
    with open(path, "rb") as f:
        while True:
            blk = f.read(BLOCK)
            if len(blk) < BLOCK:
                break
            head = blk.split(b"\n", 1)[0]
            if head != b"CPRD-REC seq=%d" % n:
                break
            n += 1
    return n


class Boot:
    def __init__(self, args, work, firmware, base, data):
        self.args = args
        self.work = work
        self.firmware = firmware
        self.console = os.path.join(work, f"console-{firmware}.log")
        self.qga = os.path.join(work, f"qga-{firmware}.sock")
        self.qmp = os.path.join(work, f"qmp-{firmware}.sock")
        self.overlay = os.path.join(work, f"root-{firmware}.qcow2")
        self.base = base
        self.data = data
        self.proc = None
        self.qemu_log = os.path.join(work, f"qemu-{firmware}.log")

    def argv(self):
        a = self.args
        argv = [a.qemu, "-machine", "q35", "-accel", a.accel, "-m", str(a.mem),
                "-smp", str(a.smp), "-nodefaults", "-no-user-config", "-display", "none",
                "-chardev", f"file,id=ser0,path={self.console}", "-serial", "chardev:ser0",
                "-drive", f"if=none,id=root,file={self.overlay},format=qcow2",
                "-device", "virtio-blk-pci,drive=root,bootindex=0",
                "-drive", f"if=none,id=data,file={self.data},format=raw",
                "-device", "virtio-blk-pci,drive=data",
                "-device", "virtio-serial-pci",
                "-chardev", f"socket,id=qga,path={self.qga},server=on,wait=off",
                "-device", "virtserialport,chardev=qga,name=org.qemu.guest_agent.0",
                "-netdev", "hubport,id=n0,hubid=0",
                "-device", f"virtio-net-pci,netdev=n0,mac={MAC}",
                "-device", "virtio-rng-pci",
                "-qmp", f"unix:{self.qmp},server=on,wait=off"]
        if self.firmware == "uefi":
            vars_copy = os.path.join(self.work, "OVMF_VARS.fd")
            shutil.copyfile(a.ovmf_vars, vars_copy)
            argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={a.ovmf_code}",
                     "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}"]
        return argv

    def console_bytes(self):
        try:
            with open(self.console, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return b""

    def wait_console(self, pred, timeout, what):
        deadline = time.monotonic() + timeout
        while True:
            r = pred(self.console_bytes())
            if r:
                return r
            if self.proc.poll() is not None:
                raise Failure(f"QEMU exited ({self.proc.returncode}) before {what}")
            if time.monotonic() > deadline:
                raise Failure(f"no {what} within {timeout} s")
            time.sleep(0.1)

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def run(self, expect_from):
        """One boot; returns (result dict, last announced record)."""
        a = self.args
        res = {"firmware": self.firmware, "load_start": loadavg()}
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                        self.base, self.overlay], check=True)
        t0 = time.monotonic()
        with open(self.qemu_log, "wb") as log:
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT)
        agent = Agent(self.qga)
        try:
            # Milestones on the console: GRUB starts the kernel, the
            # initramfs has checked the root, systemd reached multi-user.
            marks = [(b"Booting `", "grub"), (b"cprd: loading the initramfs", "kernel-loaded"),
                     (b"cprd: starting the kernel", "initrd-loaded"),
                     (b"cprd-root: clean", "initramfs"),
                     (b"CPRD-DEBIAN ready", "ready")]
            seen = {}

            def milestones(b):
                for pat, name in marks:
                    if name not in seen and pat in b:
                        seen[name] = round(time.monotonic() - t0, 1)
                return "ready" in seen
            self.wait_console(milestones, a.timeout, "'CPRD-DEBIAN ready'")
            res["ready_s"] = seen["ready"]
            print(f"  {self.firmware}: ready after {res['ready_s']} s ("
                  + ", ".join(f"{n} {seen[n]} s" for _, n in marks if n in seen) + ")",
                  flush=True)

            agent.sync(a.agent_timeout)
            if agent.cmd("guest-ping") != {}:
                raise Failure("guest-ping did not return {}")
            res["agent_s"] = round(time.monotonic() - t0, 1)
            print(f"  {self.firmware}: guest-ping answered at {res['agent_s']} s", flush=True)

            want_ip = "10.77.0.%d" % int(MAC.rsplit(":", 1)[1], 16)
            deadline = time.monotonic() + a.agent_timeout
            while True:
                ips = [ip["ip-address"] for i in agent.cmd("guest-network-get-interfaces")
                       if i.get("hardware-address") == MAC
                       for ip in i.get("ip-addresses", [])]
                if want_ip in ips:
                    break
                if time.monotonic() > deadline:
                    raise Failure(f"NIC {MAC} has {ips}, not {want_ip}")
                time.sleep(1)
            res["ip"] = want_ip
            print(f"  {self.firmware}: NIC {MAC} has {want_ip}", flush=True)

            # The stream on port 7000, read inside the guest (bash's /dev/tcp).
            rc, out, err = agent.exec(["/bin/bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/7000; "
                                       "timeout 20 head -n 3 <&3"])
            if out.split("\n")[:3] != ["SEQ 0", "SEQ 1", "SEQ 2"]:
                raise Failure(f"port 7000 sent {out!r} {err!r}")
            print(f"  {self.firmware}: port 7000 sends SEQ 0, SEQ 1, SEQ 2", flush=True)

            def enough(b):
                seqs = [int(m) for m in DISK_RE.findall(b)]
                return seqs if len(seqs) >= a.records else None
            seqs = self.wait_console(enough, a.agent_timeout, f"{a.records} disk records")
            if seqs[0] != expect_from:
                raise Failure(f"the writer started at seq={seqs[0]}, not {expect_from}")
            if seqs != list(range(seqs[0], seqs[0] + len(seqs))):
                raise Failure(f"disk records out of order: {seqs[:20]}")
            print(f"  {self.firmware}: disk records from seq={seqs[0]}", flush=True)

            cmds = []
            if a.analyze:
                cmds += ["systemd-analyze time", f"systemd-analyze blame | head -n {a.analyze}",
                         "systemd-analyze critical-chain"]
            for cmd in cmds + a.guest_cmd:
                rc, out, err = agent.exec(["/bin/sh", "-c", cmd])
                print(f"  {self.firmware}: $ {cmd}   (exit {rc})", flush=True)
                for line in (out + err).rstrip().splitlines():
                    print("    " + line, flush=True)

            t_down = time.monotonic()
            agent.cmd("guest-shutdown", reply=False)
            try:
                self.proc.wait(a.shutdown_timeout)
            except subprocess.TimeoutExpired:
                raise Failure(f"QEMU still running {a.shutdown_timeout} s after guest-shutdown")
            res["shutdown_s"] = round(time.monotonic() - t_down, 1)
            print(f"  {self.firmware}: powered off {res['shutdown_s']} s after guest-shutdown",
                  flush=True)
        finally:
            agent.close()
            self.kill()
        announced = [int(m) for m in DISK_RE.findall(self.console_bytes())]
        on_disk = disk_records(self.data)
        if announced and on_disk <= announced[-1]:
            raise Failure(f"seq={announced[-1]} was announced, the disk has 0..{on_disk - 1}")
        res["records"] = f"{announced[0]}..{announced[-1]}" if announced else "-"
        res["load_end"] = loadavg()
        return res, on_disk


def main():
    cache = os.path.join(os.environ.get("CPRD_QEMU_CACHE") or "/var/cache/cprd-test",
                         "debian-guest")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("cache", nargs="?", default=cache)
    p.add_argument("--firmware", default="bios,uefi", help="bios, uefi or both, in order")
    p.add_argument("--qemu", default="qemu-system-x86_64")
    p.add_argument("--accel", default="tcg")
    p.add_argument("--mem", type=int, default=1024, help="MiB")
    p.add_argument("--smp", type=int, default=1)
    p.add_argument("--timeout", type=int, default=600, help="seconds to 'ready'")
    p.add_argument("--agent-timeout", type=int, default=120)
    p.add_argument("--shutdown-timeout", type=int, default=120)
    p.add_argument("--records", type=int, default=5)
    p.add_argument("--analyze", type=int, default=0, metavar="N",
                   help="print systemd-analyze time and the N slowest units")
    p.add_argument("--guest-cmd", action="append", default=[], metavar="CMD",
                   help="run CMD in the guest (sh -c, through the agent) and print its output")
    p.add_argument("--ovmf-code", default=OVMF_CODE)
    p.add_argument("--ovmf-vars", default=OVMF_VARS)
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    a = p.parse_args()

    base = os.path.join(a.cache, "debian.img")
    if not os.path.exists(base):
        sys.exit(f"debian-guest-smoke: no {base} (make debian-guest builds it)")
    firmwares = [f for f in a.firmware.split(",") if f]
    for f in firmwares:
        if f not in ("bios", "uefi"):
            sys.exit(f"debian-guest-smoke: unknown firmware {f}")
    if "uefi" in firmwares and not os.path.exists(a.ovmf_code):
        sys.exit(f"debian-guest-smoke: no {a.ovmf_code} (package ovmf)")

    work = tempfile.mkdtemp(prefix="cprd-debian-smoke.")
    data = os.path.join(work, "data.raw")
    with open(data, "wb") as f:
        f.truncate(64 << 20)
    print(f"debian-guest-smoke: {base}, {os.path.getsize(base) >> 20} MiB, "
          f"{os.stat(base).st_blocks * 512 >> 20} MiB on disk; {a.accel}, {a.smp} vCPU, "
          f"{a.mem} MiB; {os.cpu_count()} host cores, load {loadavg()}", flush=True)
    passed = failed = 0
    on_disk = 0
    for fw in firmwares:
        boot = Boot(a, work, fw, base, data)
        try:
            res, on_disk = boot.run(on_disk)
            passed += 1
            print(f"ok {fw}: ready {res['ready_s']} s, agent {res['agent_s']} s, "
                  f"records {res['records']}, shutdown {res['shutdown_s']} s, "
                  f"load {res['load_start']} -> {res['load_end']}", flush=True)
        except Failure as e:
            failed += 1
            tail = boot.console_bytes()[-2000:].decode(errors="replace")
            print(f"FAIL {fw}: {e}\n--- console tail ({boot.console}) ---\n{tail}\n---",
                  flush=True)
            on_disk = disk_records(data)
    if a.keep or failed:
        print(f"debian-guest-smoke: work directory kept: {work}")
    else:
        shutil.rmtree(work)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
