"""A Debian bookworm container with systemd as PID 1 (systemd-nspawn), with
cprd installed into it by `make install`, driven from outside with
nsenter -t <its PID 1> -a (machinectl and systemd-run -M need a host bus,
which these machines do not have).

The root comes from tests/container/mkroot.sh (built once, in a cache outside
the clone). Each container gets a cgroup of its own, nspawn-NAME, under both
the named systemd hierarchy and the unified one (there is no host systemd to
give it one); runs with --volatile=overlay, so nothing it does reaches the
cached root; and is stopped with SIGTERM to nspawn, everything still in its
cgroups killed, and the cgroups removed, whatever the test did."""

import os
import shutil
import signal
import subprocess
import tempfile
import time
import unittest

import cprdtest

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.abspath(os.path.join(HERE, "..", ".."))
MKROOT = os.path.join(TOP, "tests", "container", "mkroot.sh")
ROOT = os.environ.get("CPRD_CONTAINER_ROOT", "/var/cache/cprd-test/root")
CGROUP_HIERARCHIES = ("/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified")
PREFIX = "/usr/local"
GUEST_DIR = "/srv/guest"  # where the guest is bound in the container


def why_not():
    """None where a container can run here, else the reason."""
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn)"
    for tool in ("systemd-nspawn", "nsenter", "debootstrap"):
        if not shutil.which(tool):
            return f"{tool} not installed (make check-deps installs it)"
    for h in CGROUP_HIERARCHIES:
        if not os.path.isdir(h):
            return (f"no cgroup hierarchy {h}: the nspawn recipe needs the hybrid "
                    "layout (named systemd + unified)")
    if os.path.basename(cprdtest.BUILD) == "asan":
        return "the container suite installs and runs the normal build only"
    return None


def build_root():
    """The cached root, built on first use (about a minute)."""
    p = subprocess.run(["sh", MKROOT, ROOT], capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        raise unittest.SkipTest(f"cannot build the container root {ROOT}: "
                                f"{(p.stderr or p.stdout).strip()[-500:]}")
    return ROOT


def install(build, stage):
    """`make install` of this build into stage, as PREFIX lays it out."""
    p = subprocess.run(["make", "-s", "-C", TOP, "install", f"B={build}", f"DESTDIR={stage}",
                        f"PREFIX={PREFIX}"], capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise AssertionError(f"make install failed: {p.stderr[-2000:]}")


class Container:
    def __init__(self, name):
        self.name = name
        self.cgroups = [os.path.join(h, f"nspawn-{name}") for h in CGROUP_HIERARCHIES]
        self.proc = None
        self.pid1 = None
        self.tmp = tempfile.mkdtemp(prefix=f"cprd-{name}-")
        self.log_path = os.path.join(self.tmp, "nspawn.log")

    # --- life ---------------------------------------------------------------
    def start(self, root, binds_ro, timeout=60):
        for cg in self.cgroups:
            os.makedirs(cg, exist_ok=True)
        # The shell joins both cgroups, then becomes nspawn.
        join = "; ".join(f"echo $$ > {cg}/cgroup.procs" for cg in self.cgroups)
        args = ["systemd-nspawn", "-q", "-D", root, "-M", self.name, "--register=no",
                "--keep-unit", "--boot", "--volatile=overlay",
                # nspawn's own seccomp allow list (systemd 252) lacks
                # pidfd_getfd, cprd's way to take custody back from VMMs.
                "--system-call-filter=pidfd_getfd"]
        args += [f"--bind-ro={src}:{dst}" for src, dst in binds_ro]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(["sh", "-c", f"{join}; exec \"$@\"", "sh"] + args,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
        try:
            cprdtest.wait_until(self._find_pid1, timeout, "the container's PID 1")
            # Until PID 1 has its private socket, systemctl answers nothing.
            cprdtest.wait_until(lambda: self.run("systemctl", "is-system-running", "--wait",
                                                 timeout=timeout).stdout.strip()
                                in ("running", "degraded"), timeout,
                                "the container's systemd to finish booting", interval=0.2)
        except BaseException:
            self.stop()
            raise
        return self

    def _find_pid1(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"systemd-nspawn exited ({self.proc.returncode}):\n"
                                 + self.nspawn_log()[-2000:])
        for pid in cprdtest.children(self.proc.pid):
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().strip() == "systemd":
                        self.pid1 = pid
                        return True
            except OSError:
                pass
        return False

    def nspawn_log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def _procs(self):
        pids = set()
        for cg in self.cgroups:
            for d, _, files in os.walk(cg):
                if "cgroup.procs" in files:
                    try:
                        with open(os.path.join(d, "cgroup.procs")) as f:
                            pids.update(int(x) for x in f.read().split())
                    except OSError:
                        pass
        return pids

    def stop(self):
        """SIGTERM to nspawn (the container shuts down), then SIGKILL to all
        that is left in its cgroups, then the cgroups go."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for _ in range(50):
            pids = self._procs()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.1)
        for cg in self.cgroups:
            for d, _, _ in sorted(os.walk(cg), key=lambda w: -w[0].count("/")):
                try:
                    os.rmdir(d)
                except OSError:
                    pass
        shutil.rmtree(self.tmp, ignore_errors=True)
        left = [cg for cg in self.cgroups if os.path.exists(cg)]
        if left:
            raise AssertionError(f"cgroups left behind: {left}")

    # --- inside ---------------------------------------------------------------
    def run(self, *cmd, check=False, timeout=120):
        p = subprocess.run(["nsenter", "-t", str(self.pid1), "-a"] + list(cmd),
                           capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}): "
                                 f"{p.stdout[-1000:]}{p.stderr[-1000:]}")
        return p

    def path(self, p):
        """A path of the container's file system, seen from outside."""
        return f"/proc/{self.pid1}/root{p}"

    def write(self, p, text):
        full = self.path(p)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w") as f:
            f.write(text)

    def systemctl(self, *args, check=True):
        return self.run("systemctl", "--no-pager", *args, check=check)

    def show(self, unit, prop):
        return self.systemctl("show", "-p", prop, "--value", unit).stdout.strip()
