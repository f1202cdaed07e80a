"""Integration-test support: a real cprd in a private directory, real QEMU,
the real guest from `make guest`, raw JSON-RPC over the UNIX socket with fds
as SCM_RIGHTS, and cprctl as a user runs it. Nothing here fakes the kernel."""

import grp
import array
import atexit
import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import unittest

BUILD = os.environ.get("CPRD_BUILD", os.path.join(os.path.dirname(__file__), "..", "..", "build"))
BUILD = os.path.abspath(BUILD)
CPRD = os.path.join(BUILD, "cprd")
CPRCTL = os.path.join(BUILD, "cprctl")
# The guest from `make guest`; CPRD_GUEST lets a second build (make asan) use
# the one build/guest instead of assembling its own.
GUEST = os.path.abspath(os.environ.get("CPRD_GUEST") or os.path.join(BUILD, "guest"))
KERNEL = os.path.join(GUEST, "vmlinuz")
INITRD = os.path.join(GUEST, "initrd.img")
GUEST_APPEND = "console=ttyS0 quiet cprd.data_mb=8 cprd.hb_ms=200"
BOOT_TIMEOUT = float(os.environ.get("CPRD_TEST_BOOT_TIMEOUT", "120"))

# The trailing space: the console is written a byte at a time, and a line
# read half-written must not count (data=o is not data=ok).
HB_RE = re.compile(r"^CPRD-GUEST hb seq=(\d+) data=(\w+) ", re.M)
BOOT_RE = re.compile(r"^CPRD-GUEST boot id=([0-9a-f]+)", re.M)
# With cprd.disk=<dev>: record <seq> is durable on the disk (see guest/init).
DISK_RE = re.compile(r"^CPRD-GUEST disk seq=(\d+) ", re.M)

# The guest's disk records: record k in 4096-byte block k (block 0 unused), the
# line "CPRD-REC seq=<k> boot=<boot id>\n" padded with zeros.
DISK_BLOCK = 4096
_DISK_REC_RE = re.compile(rb"CPRD-REC seq=(\d+) boot=[0-9a-f]{16}\n")


def disk_records(path):
    """The seqs of the guest's disk records in the raw image path, in block
    order from block 1, up to the first block without a whole record."""
    seqs = []
    with open(path, "rb") as f:
        f.seek(DISK_BLOCK)
        while True:
            block = f.read(DISK_BLOCK)
            m = _DISK_REC_RE.match(block)
            if len(block) < DISK_BLOCK or not m or block[m.end():].strip(b"\0"):
                return seqs
            seqs.append(int(m.group(1)))


QEMU = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"

# run.py --state-base DIR / --state-tmpfs: the temporary directories the tests
# make, every cprd's state directory first among them, go below this base, so
# that one run covers a state directory on tmpfs (the default /run/cprd is one
# on an ordinary host) and another one on a disk file system.
STATE_BASE = os.environ.get("CPRD_STATE_BASE") or None
if STATE_BASE:
    tempfile.tempdir = STATE_BASE


# The second, newer QEMU (`make qemu-next`, cached outside the clone):
# CPRD_QEMU_NEXT names a binary, else the newest build in CPRD_QEMU_CACHE.
QEMU_CACHE = os.environ.get("CPRD_QEMU_CACHE") or "/var/cache/cprd-test"


def qemu_next():
    """The newer QEMU's binary, or raise SkipTest saying why there is none."""
    path = os.environ.get("CPRD_QEMU_NEXT")
    if path:
        if not os.access(path, os.X_OK):
            raise unittest.SkipTest(f"CPRD_QEMU_NEXT={path} is not an executable")
        return path
    script = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "build-qemu-next.sh")
    p = subprocess.run(["sh", script, "--print"], capture_output=True, text=True,
                       env=dict(os.environ, CPRD_QEMU_CACHE=QEMU_CACHE))
    if p.returncode == 0 and p.stdout.strip():
        return p.stdout.strip()
    try:
        with open(os.path.join(QEMU_CACHE, "qemu-next.unavailable")) as f:
            why = f.read().strip()
    except OSError:
        why = f"not built in {QEMU_CACHE}: run `make qemu-next`"
    raise unittest.SkipTest(f"no newer QEMU: {why}")


def qemu_version(binary):
    """'10.0.2' from `BINARY --version`."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"version (\d+\.\d+\.\d+)", out)
    return m.group(1) if m else "?"


def fs_type(path):
    """The file system type of path as stat(1) names it (tmpfs, ext2/ext3...)."""
    p = subprocess.run(["stat", "-f", "-c", "%T", path], capture_output=True, text=True)
    return p.stdout.strip() or "unknown"


def guest_accel():
    """kvm or tcg, as `make guest` found the guest can boot here (a /dev/kvm
    that cannot boot it would only make every test time out)."""
    try:
        with open(os.path.join(BUILD, "guest", "accel")) as f:
            return f.read().strip() or "tcg"
    except OSError:
        return "tcg"


def wrapper(dir, name, body):
    """A stand-in VMM binary: a shell script, usually around the real QEMU."""
    path = os.path.join(dir, name)
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body + "\n")
    os.chmod(path, 0o755)
    return path


def require_root(test):
    if os.geteuid() != 0:
        raise unittest.SkipTest("needs root (cprd holds VMs for others)")


def require_guest():
    for f in (KERNEL, INITRD):
        if not os.path.exists(f):
            raise unittest.SkipTest(f"guest image {f} missing: run `make guest`")
    if not shutil.which("qemu-system-x86_64"):
        raise unittest.SkipTest("qemu-system-x86_64 not installed")


# --- sanitizer reports -------------------------------------------------------
# The ASan build (`make asan`: ASan, UBSan, LeakSanitizer) writes each report
# to a file log_path.PID, not to stderr where a test would never look, and
# then exits with SAN_EXIT. run.py points log_path at a directory of its own
# (CPRD_SAN_DIR) for every process of the run (cprctl, a cprd a test starts
# by hand) and fails the test during which a report appears anywhere below
# it; each Daemon points its cprd, launcher and re-executed images at a
# subdirectory, which Daemon.stop() checks too. A report fails one test,
# once. Uninstrumented programs (the normal build, QEMU) ignore all this.
SAN_EXIT = 66
SAN_DIR = os.environ.get("CPRD_SAN_DIR")
REPORTED = set()  # reports already blamed on a test
SAN_OPTIONS = {
    # symbolize=0: the seccomp filter keeps cprd from forking llvm-symbolizer;
    # sanitizer_reports() symbolizes the frames afterwards with addr2line.
    "ASAN_OPTIONS": f"exitcode={SAN_EXIT}:symbolize=0:detect_leaks=1",
    "UBSAN_OPTIONS": f"exitcode={SAN_EXIT}:symbolize=0:print_stacktrace=1:halt_on_error=1",
}


def sanitizer_env(env, report_dir):
    """env whose sanitizer options write reports into report_dir. Options the
    caller's environment already has are kept (and win), except where reports
    go and the exit status that marks them."""
    env = dict(env)
    for var, ours in SAN_OPTIONS.items():
        theirs = [o for o in env.get(var, "").split(":")
                  if o and o.split("=", 1)[0] not in ("log_path", "exitcode")]
        env[var] = ":".join([f"log_path={report_dir}/report", ours] + theirs)
    return env


_FRAME_RE = re.compile(r"^(\s*#\d+ 0x[0-9a-f]+) +(?:in \S+ )?\((/[^+()]+)\+(0x[0-9a-f]+)\)", re.M)


def _symbolize(text):
    """Frames printed as (module+offset) get function, file and line from
    addr2line (binutils) where the module has them."""
    def frame(m):
        try:
            out = subprocess.run(["addr2line", "-f", "-i", "-p", "-C", "-e", m.group(2),
                                  m.group(3)], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            return m.group(0)
        out = out.strip().replace("\n", "\n        ")
        if not out or out.startswith("??"):
            return m.group(0)
        return f"{m.group(1)} in {out} ({m.group(2)}+{m.group(3)})"
    return _FRAME_RE.sub(frame, text)


def sanitizer_reports(report_dir):
    """The reports under report_dir not yet blamed on a test, as one text,
    symbolized ("" when there are none); they now count as blamed."""
    out = []
    for top, dirs, files in os.walk(report_dir or "/nonexistent"):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(top, name)
            if path in REPORTED:
                continue
            REPORTED.add(path)
            try:
                with open(path, errors="replace") as f:
                    text = f.read()
            except OSError:
                continue
            out.append(f"--- sanitizer report {name} (the number is the pid) ---\n"
                       + _symbolize(text))
    return "\n".join(out)


_readable = {}


def readable_copy(path):
    """A copy of the file at path that any uid may read, made once per run
    and removed at its end: the source tree may sit in a directory only
    root can enter (a clone under mktemp -d)."""
    if path not in _readable:
        d = tempfile.mkdtemp(prefix="cprd-readable-")
        atexit.register(shutil.rmtree, d, True)
        os.chmod(d, 0o755)
        copy = os.path.join(d, os.path.basename(path))
        shutil.copy(path, copy)
        os.chmod(copy, 0o644)
        _readable[path] = copy
    return _readable[path]


def rss_kib(pid):
    """A process's resident memory, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def sanitized():
    """Whether CPRD is the ASan build. ASan's allocator keeps freed memory
    in quarantine and maps shadow memory: RSS says nothing about cprd's own
    memory there."""
    with open(CPRD, "rb") as f:
        return b"__asan_init" in f.read()


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_targets(pid):
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return sorted(out)


def children(pid):
    """Direct children of pid, zombies included, as {pid: (comm, state)}."""
    kids = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        rest = stat[stat.rindex(")") + 2:].split()
        if int(rest[1]) == pid:
            kids[int(d)] = (stat[stat.index("(") + 1:stat.rindex(")")], rest[0])
    return kids


def vm_file_holders(state_dir, name, exclude=()):
    """Processes (but those in exclude, e.g. cprd itself) that hold a file of
    the VM's directory, such as its console or its VMM's log: the VM's VMMs,
    whatever they are called. Unlike a search for "guest=NAME" over every
    process, it never counts a VM of the same name that another cprd on this
    machine runs."""
    prefix = os.path.join(state_dir, "vms", name) + "/"
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) in exclude or int(d) == os.getpid():
            continue
        try:
            links = [os.readlink(f"/proc/{d}/fd/{fd}") for fd in os.listdir(f"/proc/{d}/fd")]
        except OSError:
            continue
        if any(l.startswith(prefix) for l in links):
            found.append(int(d))
    return sorted(found)


def hold_relays(state_dir):
    """The qmp_hold.py relays of the VMs of the cprd in state_dir: their
    marks are below it."""
    out = []
    for p in os.listdir("/proc"):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if b"qmp_hold.py" not in f.read():
                    continue
            with open(f"/proc/{p}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if any(e.startswith(b"QMP_HOLD_MARK=" + state_dir.encode() + b"/") for e in env):
            out.append(int(p))
    return out


# run.py gives every process of a run CPRD_TEST_RUN=<a value of this run's
# own>, and fails the run when one of them, or a mount of MOUNT_SOURCE, is
# still there at its end (another run's have another value). A test mounts
# through mount_tmpfs() so that its mounts carry the mark.
RUN_MARK = os.environ.get("CPRD_TEST_RUN")
MOUNT_SOURCE = f"cprd-test-{RUN_MARK}" if RUN_MARK else "tmpfs"


def cprd_group():
    """The gid of group cprd (added when there is none), or the test is skipped."""
    try:
        return grp.getgrnam("cprd").gr_gid
    except KeyError:
        pass
    # Another run of the tests (the ASan one runs beside the normal one)
    # may add it at the same moment: then it is there all the same.
    subprocess.run(["groupadd", "--system", "cprd"], stderr=subprocess.DEVNULL)
    try:
        return grp.getgrnam("cprd").gr_gid
    except KeyError:
        raise unittest.SkipTest("no group 'cprd' and groupadd failed") from None


def mount_tmpfs(path, size, options=""):
    """A tmpfs of its own on path (root only), or the test is skipped, saying why."""
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"{options}size={size},mode=0755",
                        MOUNT_SOURCE, path], capture_output=True, text=True)
    if p.returncode != 0:
        raise unittest.SkipTest(f"cannot mount a tmpfs for the state directory: "
                                f"{p.stderr.strip() or p.returncode}")


def fill(path):
    """Write zeros to path until its file system is full."""
    block = bytes(65536)
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                f.write(block)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                break
    # tmpfs takes a partial write before it refuses: fill the last page too.
    with open(path, "ab", buffering=0) as f:
        try:
            while f.write(b"\0" * 512):
                pass
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise


def pid_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def wait_until(pred, timeout, what, interval=0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class RpcError(Exception):
    def __init__(self, error):
        super().__init__(f"{error.get('code')}: {error.get('message')}")
        self.code = error.get("code")
        self.message = error.get("message")
        self.error = error


class Conn:
    """One raw connection to cprd: newline-delimited JSON, fds as SCM_RIGHTS."""

    def __init__(self, path, timeout=30):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""
        self.fds = []
        self.next_id = 1

    def close(self):
        self.sock.close()
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def send_raw(self, data, fds=()):
        if isinstance(data, str):
            data = data.encode()
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.sendall(data)

    def recv_line(self):
        """One message; fds that came with it are collected in self.fds."""
        while b"\n" not in self.buf:
            msg, fds, flags, _ = socket.recv_fds(self.sock, 65536, 32)
            self.fds.extend(fds)
            if not msg:
                raise EOFError("cprd closed the connection")
            self.buf += msg
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def request(self, method, params=None, fds=(), id=None):
        if id is None:
            id = self.next_id
            self.next_id += 1
        msg = {"jsonrpc": "2.0", "method": method, "id": id}
        if params is not None:
            msg["params"] = params
        self.send_raw(json.dumps(msg) + "\n", fds)
        return id

    def call_full(self, method, params=None, fds=()):
        id = self.request(method, params, fds)
        while True:
            reply = self.recv_line()
            if reply.get("id") == id:
                return reply

    def call(self, method, params=None, fds=()):
        reply = self.call_full(method, params, fds)
        if "error" in reply:
            raise RpcError(reply["error"])
        return reply["result"]

    def take_fds(self):
        fds, self.fds = self.fds, []
        return fds


# What the test runner (run.py) adds to the report of a test that fails:
# the end of the log of every cprd that runs (a failure is reported before
# the test's tearDown stops its cprd) and of every cprd the test stopped
# (whose state directory, and log, are gone by then).
LIVE_DAEMONS = []
STOPPED_LOGS = []
LOG_TAIL = 6000  # bytes of each log


def daemon_logs():
    """[(state directory, the end of its cprd's log)] for a failure's report."""
    out = list(STOPPED_LOGS)
    for d in LIVE_DAEMONS:
        try:
            out.append((d.dir, d.read_log()[-LOG_TAIL:]))
        except OSError:
            pass
    return out


class Daemon:
    """cprd in the foreground in a private state directory."""

    def __init__(self, extra_args=(), env=None, perturb=True, prefix=(), binary=CPRD):
        self.dir = tempfile.mkdtemp(prefix="cprd-test-")
        self.binary = binary  # cprd, or a copy of it elsewhere
        # What destroyed VMs leave (--log-dir), kept beside the state
        # directory rather than in the host's /var/log/cprd.
        self.kept = self.dir + ".kept"
        if not any(a == "--log-dir" or a.startswith("--log-dir=") for a in extra_args):
            extra_args = list(extra_args) + ["--log-dir", self.kept]
        self.sock = os.path.join(self.dir, "cprd.sock")
        self.log = os.path.join(self.dir, "cprd.log")
        self.extra_args = list(extra_args)
        self.env = env
        self.perturb = perturb
        self.prefix = list(prefix)  # a command that execs cprd (unshare --net)
        self.proc = None
        self.san_dir = None  # where this cprd's sanitizer reports go

    def start(self):
        logf = open(self.log, "ab")
        # glibc fills freed memory with this byte: a use after free in cprd
        # then reads garbage and fails loudly instead of passing by luck.
        # (The VMMs inherit it too, which slows them: the benchmark asks for
        # perturb=False.)
        env = dict(self.env if self.env is not None else os.environ)
        if self.perturb:
            env["MALLOC_PERTURB_"] = "165"
        if self.san_dir is None:
            self.san_dir = tempfile.mkdtemp(prefix="cprd-san-", dir=SAN_DIR)
        env = sanitizer_env(env, self.san_dir)
        self.proc = subprocess.Popen(
            self.prefix + [self.binary, "--foreground", "--state-dir", self.dir, "--accel", guest_accel()]
            + self.extra_args,
            stdout=logf, stderr=logf, env=env)
        logf.close()
        def serving():
            if self.proc.poll() is not None:
                return True
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(self.sock)
                s.close()
                return True
            except OSError:
                return False
        # Connectable, not merely present: a crashed cprd leaves its socket
        # file behind, and recovery runs before the new one listens.
        wait_until(serving, 60, "cprd to accept connections")
        if self.proc.poll() is not None:
            raise AssertionError(f"cprd exited at start: {self.read_log()}")
        if self not in LIVE_DAEMONS:
            LIVE_DAEMONS.append(self)
        return self

    @property
    def pid(self):
        return self.proc.pid

    def read_log(self):
        with open(self.log, errors="replace") as f:
            return f.read()

    def wait_fds(self, n, timeout=5):
        """cprd's fd count settles at n (a closed client is noticed a moment
        after the client has its answer)."""
        wait_until(lambda: fd_count(self.pid) == n, timeout,
                   f"cprd's fd count to be {n} (is {fd_count(self.pid)})")

    def settled_fds(self):
        """cprd's fd count once connections the test just closed are gone."""
        last = -1
        for _ in range(50):
            n = fd_count(self.pid)
            if n == last:
                return n
            last = n
            time.sleep(0.1)
        return last

    def conn(self, timeout=30):
        return Conn(self.sock, timeout)

    def call(self, method, params=None, fds=(), timeout=BOOT_TIMEOUT):
        c = self.conn(timeout)
        try:
            return c.call(method, params, fds)
        finally:
            c.close()

    def cprctl(self, *args, check=False, timeout=BOOT_TIMEOUT):
        env = dict(os.environ, CPRD_SOCKET=self.sock)
        p = subprocess.run([CPRCTL] + list(args), capture_output=True, text=True, env=env,
                           timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"cprctl {' '.join(args)} failed ({p.returncode}): {p.stderr}")
        return p

    def create_guest(self, name, memory="256M", **extra):
        params = {"name": name, "memory": memory, "kernel": KERNEL, "initrd": INITRD,
                  "append": GUEST_APPEND}
        params.update(extra)
        return self.call("vm.create", params)

    def destroy_all(self):
        try:
            for vm in self.call("vm.list")["vms"]:
                try:
                    self.call("vm.destroy", {"name": vm["name"]})
                except RpcError:
                    pass
        except (OSError, EOFError):
            pass

    def stop(self):
        """Stop cprd; anything it left behind is killed so no test leaks a VMM.
        Then fail the test if cprd ended badly: a sanitizer report in its
        report directory, or an exit status other than 0 after SIGTERM (the
        ASan build reports leaks at exit and then exits with SAN_EXIT)."""
        problems = []
        if self.proc and self.proc.poll() is None:
            self.destroy_all()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
                # -SIGTERM: it was stopped before its handler was installed.
                if self.proc.returncode not in (0, -signal.SIGTERM):
                    problems.append(f"cprd exited with status {self.proc.returncode} on SIGTERM")
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        elif self.proc and self.proc.returncode == SAN_EXIT:
            problems.append(f"cprd exited with status {SAN_EXIT} (a sanitizer's; the report "
                            "fails the test that was running then)")
        kill_vmms_under(self.dir)
        reports = sanitizer_reports(self.san_dir)
        try:
            log = self.read_log()[-LOG_TAIL:]
        except OSError:
            log = "(no log)"
        STOPPED_LOGS.append((self.dir, log))
        if self in LIVE_DAEMONS:
            LIVE_DAEMONS.remove(self)
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(self.kept, ignore_errors=True)
        if self.san_dir:
            shutil.rmtree(self.san_dir, ignore_errors=True)
            self.san_dir = None
        if reports:
            problems.append("the sanitizer reported:\n" + reports)
        if problems:
            raise AssertionError("\n".join(problems) + "\n--- end of cprd's log ---\n" + log)


def fake_checkpoint(root, name, extra=(), vmm="/nonexistent/vmm", kernel="/nonexistent/kernel"):
    """A checkpoint of the cprd method written by hand, whole as far as
    meta.json says (no VMM ever ran it): what a cprd that starts adopts."""
    d = os.path.join(root, name)
    os.mkdir(d, 0o700)
    state, ram = b"\0" * 4096, 64 << 20
    meta = {"version": 1, "vm": name, "method": "cprd", "state_bytes": len(state),
            "ram_bytes": ram, "channels": 1, "paused_at_usec": 0,
            # RAM of zeros only: the digest skips zero pages, so it is
            # XXH3-64 of no input.
            "digest": "xxh3-64:2d06800538d394c2",
            "config": {"vmm": vmm, "kernel": kernel,
                       "machine": "q35", "memory_bytes": ram, "vcpus": 1,
                       "created_usec": 1, "updates": 0}}
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump(meta, f)
    with open(os.path.join(d, "device.state"), "wb") as f:
        f.write(state)
    with open(os.path.join(d, "ram0.img"), "wb") as f:
        f.truncate(ram)
    for e in extra:
        with open(os.path.join(d, e), "w") as f:
            f.write("not cprd's\n")
    return d


class NetNs:
    """A network namespace the test makes (ip netns) for whatever makes a
    network interface: cprd runs in it (Daemon(prefix=ns.prefix)), so its
    taps never appear on the host and nothing is sent anywhere else.
    delete() removes it; a namespace left is named with the run's mark."""

    count = 0

    def __init__(self):
        if not shutil.which("ip"):
            raise unittest.SkipTest("ip (iproute2) not installed")
        NetNs.count += 1
        self.name = f"cprd-test-{RUN_MARK or os.getpid()}-{NetNs.count}"
        p = subprocess.run(["ip", "netns", "add", self.name], capture_output=True, text=True)
        if p.returncode != 0:
            raise unittest.SkipTest(f"cannot add a network namespace: "
                                    f"{p.stderr.strip() or p.returncode}")

    @property
    def prefix(self):
        """Runs a command in the namespace (execs it: the pid stays the command's)."""
        return ["ip", "netns", "exec", self.name]

    def link(self, ifname):
        """Whether the namespace has an interface of that name."""
        p = subprocess.run(["ip", "-n", self.name, "-o", "link", "show", "dev", ifname],
                           capture_output=True, text=True)
        return p.returncode == 0

    def delete(self):
        subprocess.run(["ip", "netns", "delete", self.name], capture_output=True)


class NetNsDaemonTest(unittest.TestCase):
    """A cprd of the test's own in a network namespace the test makes
    (self.ns), for tests that give VMs a tap: it never appears on the host."""

    def setUp(self):
        require_root(self)
        require_guest()
        if not os.path.exists("/dev/net/tun"):
            self.skipTest("no /dev/net/tun on this host")
        self.ns = NetNs()
        self.addCleanup(self.ns.delete)
        self.d = Daemon(prefix=self.ns.prefix).start()
        self.addCleanup(self.d.stop)


def kill_vmms_under(state_dir):
    """Kill any VMM that still holds a file of this test's state directory
    (its console or log): a failed test must not leave guests behind."""
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/comm") as f:
                if not f.read().startswith("qemu"):
                    continue
            links = [os.readlink(f"/proc/{d}/fd/{fd}") for fd in os.listdir(f"/proc/{d}/fd")]
        except OSError:
            continue
        if any(l.startswith(state_dir + "/") for l in links):
            try:
                os.kill(int(d), signal.SIGKILL)
            except OSError:
                pass


class Console:
    """The guest's serial console log, as written by QEMU into cprd's fd."""

    def __init__(self, path):
        self.path = path

    def text(self):
        with open(self.path, errors="replace") as f:
            return f.read()

    def beats(self):
        return [(int(s), d) for s, d in HB_RE.findall(self.text())]

    def boots(self):
        return BOOT_RE.findall(self.text())

    def disk_seqs(self):
        """The disk records the guest reported durable, in console order."""
        return [int(s) for s in DISK_RE.findall(self.text())]

    def wait_beats(self, n, timeout=BOOT_TIMEOUT):
        """Wait until n more heartbeats than now have appeared."""
        start = len(self.beats())
        wait_until(lambda: len(self.beats()) >= start + n, timeout,
                   f"{n} guest heartbeats in {self.path}", interval=0.2)
        return self.beats()

    def assert_healthy(self, tc):
        """One boot, heartbeats 1..N without a gap, every memory check ok."""
        beats = self.beats()
        tc.assertEqual(len(self.boots()), 1, "the guest booted more than once")
        tc.assertTrue(beats, "no heartbeat")
        seqs = [s for s, _ in beats]
        tc.assertEqual(seqs, list(range(1, len(seqs) + 1)), "heartbeat sequence has a gap")
        tc.assertTrue(all(d == "ok" for _, d in beats), "guest memory check failed")


class GuestTest(unittest.TestCase):
    """A test that needs root, the guest image and a cprd of its own."""

    def setUp(self):
        require_root(self)
        require_guest()
        self.d = Daemon().start()

    def tearDown(self):
        self.d.stop()


class SharedDaemonTest(unittest.TestCase):
    """A test class that shares one cprd; it needs root and, unless
    needs_guest is False, the guest image."""

    needs_guest = True

    @classmethod
    def setUpClass(cls):
        require_root(cls)
        if cls.needs_guest:
            require_guest()
        cls.d = Daemon().start()

    @classmethod
    def tearDownClass(cls):
        cls.d.stop()
