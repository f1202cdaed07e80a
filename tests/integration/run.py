#!/usr/bin/env python3
"""Run the integration tests and close with one summary line that CI reads:
'integration: N passed, N failed, N skipped' ('LABEL integration: ...' with
--label). Skips print their reason. A process the tests started (each has
this run's CPRD_TEST_RUN) or a mount they made, left after the last test,
fails the run too, and is then ended.

Every process the tests start gets sanitizer options that write a report to
a file (see cprdtest.sanitizer_env): with the ASan build a report fails the
test during which it was written. The normal build ignores them."""

import argparse
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)


def _as_failure(msg):
    try:
        raise AssertionError(msg)
    except AssertionError:
        return sys.exc_info()


class Result(unittest.TextTestResult):
    san_dir = None  # the run's sanitizer report directory

    def _reports(self):
        import cprdtest
        return cprdtest.sanitizer_reports(self.san_dir)

    def startTest(self, test):
        import cprdtest
        cprdtest.STOPPED_LOGS.clear()
        self._t0 = time.monotonic()
        super().startTest(test)

    def _exc_info_to_string(self, err, test):
        """The failure, and the end of the log of each cprd that runs or
        that the test stopped: what a failure on a CI machine is read with."""
        import cprdtest
        text = super()._exc_info_to_string(err, test)
        for d, log in cprdtest.daemon_logs():
            text += f"\n--- the end of cprd's log ({os.path.basename(d)}) ---\n{log}"
        return text

    def _took(self):
        # A class's setUpClass failing is reported before any test started.
        t0 = getattr(self, "_t0", None)
        return f" ({time.monotonic() - t0:.1f}s)" if t0 is not None else ""

    def addSuccess(self, test):
        reports = self._reports()
        if reports:
            self.addFailure(test, _as_failure(
                "a sanitizer report was written during this test:\n" + reports))
            return
        super().addSuccess(test)
        self.stream.write(f"PASS {test.id()}{self._took()}\n")

    def _also_reports(self):
        reports = self._reports()
        if reports:
            self.stream.write("a sanitizer report was written during this test:\n"
                              + reports + "\n")

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self.stream.write(f"FAIL {test.id()}{self._took()}\n")
        self._also_reports()

    def addError(self, test, err):
        super().addError(test, err)
        self.stream.write(f"ERROR {test.id()}{self._took()}\n")
        self._also_reports()

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            self.stream.write(f"FAIL {subtest.id()}{self._took()}\n")

    def addSkip(self, test, reason):
        reports = self._reports()
        if reports:
            self.addFailure(test, _as_failure(
                f"skipped ({reason}), but a sanitizer report was written:\n" + reports))
            return
        super().addSkip(test, reason)
        self.stream.write(f"SKIP {test.id()}: {reason}\n")

    def printErrors(self):
        self.printErrorList("ERROR", self.errors)
        self.printErrorList("FAIL", self.failures)


class Timed(unittest.TestSuite):
    """One module's tests, timed as a whole: its classes' set-up and
    tear-down (a guest booted once for a class) included."""
    times = []

    def __init__(self, name, tests):
        super().__init__(tests)
        self.name = name

    def run(self, result, debug=False):
        t0 = time.monotonic()
        try:
            return super().run(result, debug)
        finally:
            Timed.times.append((self.name, time.monotonic() - t0))


def first_id(suite):
    for t in suite:
        if isinstance(t, unittest.TestSuite):
            i = first_id(t)
            if i:
                return i
        else:
            return t.id()
    return None


def by_module(suite, exclude):
    """The suite with each module's tests timed apart, less the excluded
    modules (named as test_x)."""
    out = unittest.TestSuite()
    for s in suite:
        i = first_id(s)
        if i and i.split(".")[0] not in exclude:
            name = i.split(".")[0]
            out.addTest(Timed(name, s))
    return out


def state_base(args):
    """Set CPRD_STATE_BASE from the options; returns the tmpfs it mounted."""
    base, mounted = args.state_base, None
    if args.state_tmpfs:
        # short: the VMs' monitor sockets are below it (sun_path is 108 bytes)
        base = tempfile.mkdtemp(prefix="cprd-tmpfs-")
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1g,mode=0755", "cprd-test",
                            base], capture_output=True, text=True)
        if p.returncode == 0:
            mounted = base
        else:
            os.rmdir(base)
            base = tempfile.mkdtemp(prefix="cprd-", dir="/dev/shm")
            print(f"cannot mount a tmpfs ({p.stderr.strip()}); state directories in {base}")
    if base:
        os.environ["CPRD_STATE_BASE"] = os.path.abspath(base)
    return mounted


def _ours(pid, mark):
    """Whether pid is a live process of this run: it has the run's mark."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return mark in f.read().split(b"\0")
    except OSError:  # gone, or a zombie's environment is no longer there
        return False


def _describe(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        with open(f"/proc/{pid}/stat") as f:
            ppid = f.read().rsplit(") ", 1)[1].split()[1]
    except (OSError, IndexError):
        return f"pid {pid} (gone)"
    return f"pid {pid} (parent {ppid}): {cmd[:300]}"


def left_processes(mark, grace=10.0):
    """The processes of this run still alive once every test has ended, by
    the mark each one inherited (other runs have other marks). A process
    being killed by the last clean-up gets a moment to go."""
    mark = f"CPRD_TEST_RUN={mark}".encode()
    deadline = time.monotonic() + grace
    while True:
        pids = [int(p) for p in os.listdir("/proc")
                if p.isdigit() and int(p) != os.getpid() and _ours(p, mark)]
        if not pids or time.monotonic() > deadline:
            return pids
        time.sleep(0.2)


def left_mounts(source, under):
    """Mounts the tests made and left: their source is this run's, or they are
    below the run's own state tmpfs (under). Deepest first."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            rest = fields[fields.index("-") + 1:]
            point = fields[4].encode().decode("unicode_escape")
            if rest[1] == source or (under and point.startswith(under.rstrip("/") + "/")):
                out.append(point)
    return sorted(set(out), key=len, reverse=True)


def clean_up_after_tests(mark, source, under):
    """Fail the run, listing them, when processes, network namespaces or
    mounts of it are left; then end them, so that the machine stays clean
    either way. Returns the number of problems (0 or 1 per kind)."""
    failed = 0
    pids = left_processes(mark)
    if pids:
        failed += 1
        print("FAIL processes the tests started are still alive after the last test:\n  " +
              "\n  ".join(_describe(p) for p in pids))
        for p in pids:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(p, sig)
                except OSError:
                    pass
    # Whatever was left to this process (a subreaper for some tests) is reaped.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            if os.waitpid(-1, os.WNOHANG) == (0, 0):
                time.sleep(0.1)
        except ChildProcessError:
            break
    try:
        spaces = sorted(n for n in os.listdir("/run/netns") if n.startswith(f"cprd-test-{mark}-"))
    except OSError:
        spaces = []
    if spaces:
        failed += 1
        print("FAIL network namespaces the tests added are still there after the last test:\n  " +
              "\n  ".join(spaces))
        for n in spaces:
            subprocess.run(["ip", "netns", "delete", n], capture_output=True)
    mounts = left_mounts(source, under)
    if mounts:
        failed += 1
        print("FAIL mounts the tests made are still mounted after the last test:\n  " +
              "\n  ".join(mounts))
        for m in mounts:
            subprocess.run(["umount", "-l", m], capture_output=True)
    return failed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=os.path.join(here, "..", "..", "build"),
                    help="where cprd and cprctl are (default build)")
    ap.add_argument("--guest", help="the guest from `make guest` (default BUILD/guest)")
    ap.add_argument("--label", default="", help="prefix of the summary line, e.g. asan")
    ap.add_argument("--counts", help="also write 'PASSED FAILED SKIPPED' to this file")
    ap.add_argument("--state-base", metavar="DIR",
                    help="make the state directories (every temp directory of the tests) "
                         "below DIR")
    ap.add_argument("--state-tmpfs", action="store_true",
                    help="make them on a tmpfs of this run's own (mounted, as root; else "
                         "/dev/shm)")
    ap.add_argument("-k", dest="pattern", action="append", help="only tests matching")
    ap.add_argument("--exclude", action="append", default=[], metavar="MODULE",
                    help="leave out this module (test_x); may be repeated")
    ap.add_argument("modules", nargs="*")
    args = ap.parse_args()
    os.environ["CPRD_BUILD"] = os.path.abspath(args.build)
    if args.guest:
        os.environ["CPRD_GUEST"] = os.path.abspath(args.guest)

    # Every process the run starts inherits this; what still has it at the
    # end was left behind (see clean_up_after_tests).
    mark = os.environ["CPRD_TEST_RUN"] = f"{os.getpid()}-{secrets.token_hex(8)}"
    Result.san_dir = os.environ["CPRD_SAN_DIR"] = tempfile.mkdtemp(prefix="cprd-san-run-")
    mounted = state_base(args)
    import cprdtest
    if cprdtest.STATE_BASE:
        print(f"state directories below {cprdtest.STATE_BASE} "
              f"({cprdtest.fs_type(cprdtest.STATE_BASE)})")
    os.environ.update(cprdtest.sanitizer_env(os.environ, Result.san_dir))

    loader = unittest.TestLoader()
    if args.pattern:
        loader.testNamePatterns = [f"*{p}*" for p in args.pattern]
    if args.modules:
        suite = loader.loadTestsFromNames([m.removesuffix(".py") for m in args.modules])
    else:
        suite = loader.discover(here, pattern="test_*.py", top_level_dir=here)
    suite = by_module(suite, {m.removesuffix(".py") for m in args.exclude})
    runner = unittest.TextTestRunner(stream=sys.stdout, verbosity=0, resultclass=Result)
    res = runner.run(suite)
    # A test whose subtests fail is one failed test, however many failed; a
    # test is skipped when it was skipped as a whole, not one of its subtests.
    failed = len({getattr(t, "test_case", t).id() for t, _ in res.failures + res.errors} |
                 {t.id() for t in res.unexpectedSuccesses})
    skipped = len([t for t, _ in res.skipped if not hasattr(t, "test_case")])
    passed = res.testsRun - failed - skipped
    # Reports that no test was left to take (written in the last class's
    # tearDownClass, say) still fail the run.
    late = cprdtest.sanitizer_reports(Result.san_dir)
    if late:
        print("FAIL a sanitizer report was written after the last test:\n" + late)
        failed += 1
    failed += clean_up_after_tests(mark, cprdtest.MOUNT_SOURCE, mounted)
    shutil.rmtree(Result.san_dir, ignore_errors=True)
    if mounted:
        subprocess.run(["umount", "-l", mounted])
        os.rmdir(mounted)
    elif args.state_tmpfs:
        shutil.rmtree(os.environ["CPRD_STATE_BASE"], ignore_errors=True)
    label = f"{args.label} " if args.label else ""
    if Timed.times:
        print(f"{label}integration: time per module, longest first")
        for name, secs in sorted(Timed.times, key=lambda x: -x[1]):
            print(f"  {name:28s} {secs:7.1f} s")
    if args.exclude:
        print(f"{label}integration: left out {', '.join(sorted(args.exclude))}")
    print(f"{label}integration: {passed} passed, {failed} failed, {skipped} skipped")
    if args.counts:
        with open(args.counts, "w") as f:
            f.write(f"{passed} {failed} {skipped}\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
