"""cprctl as operators use it (virsh and systemctl habits), and the API it
stands on: rpc.describe, errors with a machine-readable data object, the
man pages and the bash completion. VMs here run the stand-in VMM
(standin_vmm.py): what is tested is the command line, not the guest."""

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import unittest

from cprdtest import CPRCTL, Daemon, RpcError, require_root, wait_until, wrapper

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.abspath(os.path.join(HERE, "..", ".."))
STANDIN = os.path.join(HERE, "standin_vmm.py")
README = os.path.join(TOP, "README.md")
MAN_CPRCTL = os.path.join(TOP, "man", "cprctl.1.scd")
MAN_CPRD = os.path.join(TOP, "man", "cprd.8.scd")
COMPLETION = os.path.join(TOP, "completion", "cprctl.bash")
LONG = "vm-with-a-name-of-36-characters-0123"
MEM = 32 << 20


def read(path):
    with open(path) as f:
        return f.read()


def verbs_and_options():
    """Every verb and every long option, from cprctl's own help."""
    top = subprocess.run([CPRCTL, "--help"], capture_output=True, text=True).stdout
    verbs = re.findall(r"(?m)^  ([a-z]+) ", top.split("Verbs:")[1].split("\n\n")[0])
    opts = {}
    for v in verbs:
        h = subprocess.run([CPRCTL, "help", v], capture_output=True, text=True).stdout
        opts[v] = sorted(set(re.findall(r"--[a-z][a-z-]+", h)))
    return verbs, opts


class Cli(unittest.TestCase):
    """One cprd with stand-in VMs: 'run1' running, 'dead1' crashed, and one
    with a 36-character name."""

    @classmethod
    def setUpClass(cls):
        require_root(cls)
        cls.d = Daemon(["--no-confine"]).start()  # stand-in VMMs live in the source tree
        cls.vmm = wrapper(cls.d.dir, "standin", f'exec python3 {STANDIN} "$@"')
        for n in ("run1", "dead1", LONG):
            cls.create(n)
        pid = cls.d.call("vm.status", {"name": "dead1"})["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: cls.d.call("vm.status", {"name": "dead1"})["state"] == "crashed",
                   10, "dead1 to be crashed")

    @classmethod
    def create(cls, name):
        return cls.d.call("vm.create", {"name": name, "memory": str(MEM), "kernel": STANDIN,
                                        "vmm": cls.vmm})

    @classmethod
    def tearDownClass(cls):
        cls.d.stop()

    def ctl(self, *args, timeout=60):
        return self.d.cprctl(*args, timeout=timeout)

    # -- habits --------------------------------------------------------------

    def test_version_names_client_and_server(self):
        p = self.ctl("--version")
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertRegex(p.stdout, r"(?m)^cprctl 0\.1\.0 \(protocol 1\)$")
        self.assertRegex(p.stdout, r"(?m)^cprd 0\.1\.0 \(protocol 1\) at ")
        js = json.loads(self.ctl("--version", "--json").stdout)
        self.assertEqual(js["server"]["version"], "0.1.0")
        # Without a cprd: the client's version all the same.
        p = subprocess.run([CPRCTL, "--socket", "/nonexistent.sock", "--version"],
                           capture_output=True, text=True, timeout=30)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("cprctl 0.1.0", p.stdout)
        self.assertIn("cprd not reachable at /nonexistent.sock", p.stdout)

    def test_help_in_every_form(self):
        for args in (("-h",), ("--help",), ("help",)):
            p = self.ctl(*args)
            self.assertEqual(p.returncode, 0, args)
            self.assertIn("Usage: cprctl", p.stdout)
            self.assertIn("update", p.stdout)
        for args in (("help", "update"), ("update", "--help"), ("update", "-h")):
            p = self.ctl(*args)
            self.assertEqual(p.returncode, 0, args)
            self.assertIn("Usage: cprctl update NAME|--all", p.stdout, args)
            self.assertIn("--parallel N", p.stdout, args)
        p = self.ctl("help", "nosuch")
        self.assertEqual(p.returncode, 2)
        self.assertIn("no verb 'nosuch'", p.stderr)

    def test_required_options_are_the_clients_to_check(self):
        p = self.ctl("create", "x1", "--kernel", STANDIN)
        self.assertEqual(p.returncode, 2, p.stderr)
        self.assertIn("create needs --memory SIZE", p.stderr)
        self.assertIn("Usage: cprctl create NAME --memory SIZE --kernel PATH", p.stderr)
        p = self.ctl("create", "x1", "--memory", "64M")
        self.assertEqual(p.returncode, 2, p.stderr)
        self.assertIn("create needs --kernel PATH", p.stderr)
        for args in (("status", "a", "b"), ("fds",), ("update",), ("list", "extra"),
                     ("daemon", "bogus"), ("--timeout", "never", "list")):
            self.assertEqual(self.ctl(*args).returncode, 2, args)
        self.assertNotIn("x1", [v["name"] for v in self.d.call("vm.list")["vms"]])

    def test_json_failures_are_one_error_object_on_stdout(self):
        cases = {
            ("status", "nope"): ("not-found", -32000),
            ("fds", "nope"): ("not-found", -32000),
            ("history", "nope"): ("not-found", -32000),
            ("destroy", "nope"): ("not-found", -32000),
            ("update", "nope"): ("not-found", -32000),
            ("create", "run1", "--memory", "64M", "--kernel", STANDIN, "--vmm", "/x/y"):
                ("exists", -32001),
            ("create", "x2", "--kernel", STANDIN): ("usage", None),
            ("list", "--state", "bogus"): ("usage", None),
            ("bogusverb",): ("usage", None),
            ("--socket", "/nonexistent.sock", "list"): ("unreachable", None),
        }
        for args, (kind, code) in cases.items():
            p = self.ctl("--json", *args)
            self.assertNotEqual(p.returncode, 0, args)
            try:
                err = json.loads(p.stdout)
            except ValueError:
                self.fail(f"cprctl --json {' '.join(args)}: stdout is not JSON: {p.stdout!r}")
            self.assertEqual(set(err), {"code", "message", "data"}, args)
            self.assertEqual(err["data"]["kind"], kind, args)
            self.assertEqual(err["code"], code, args)
            self.assertTrue(err["message"], args)
        err = json.loads(self.ctl("--json", "status", "nope").stdout)
        self.assertEqual(err["data"]["param"], "name")

    def test_status_exits_3_for_a_vm_not_running_and_shows_its_memory(self):
        p = self.ctl("status", "run1")
        self.assertEqual(p.returncode, 0, p.stderr)
        p = self.ctl("status", "dead1")
        self.assertEqual(p.returncode, 3, p.stderr)
        self.assertRegex(p.stdout, r"(?m)^state\s+crashed$")
        self.assertRegex(p.stdout, r"(?m)^memory\s+32 MiB$")
        self.assertRegex(p.stdout, r"(?m)^exit\s+\S")
        self.assertEqual(self.ctl("status", "nope").returncode, 1)

    def test_list_by_state(self):
        def names(*args):
            p = self.ctl("list", *args)
            self.assertEqual(p.returncode, 0, p.stderr)
            return [l.split()[0] for l in p.stdout.splitlines()[1:]]
        self.assertEqual(names("--state", "crashed"), ["dead1"])
        self.assertEqual(sorted(names("--state", "running")), sorted(["run1", LONG]))
        self.assertEqual(self.ctl("list", "--state", "paused").stdout, "(no paused VMs)\n")
        p = self.ctl("list", "--state", "crashed", "--name")
        self.assertEqual(p.stdout, "dead1\n")
        js = json.loads(self.ctl("list", "--state", "running", "--json").stdout)
        self.assertEqual(sorted(v["name"] for v in js["vms"]), sorted(["run1", LONG]))

    def test_tables_fit_long_names(self):
        out = self.ctl("list").stdout.splitlines()
        head = out[0]
        for col in ("STATE", "MEMORY", "VMM"):
            start = head.index(col)
            for line in out[1:]:
                # Every row has a column boundary where the header has one.
                self.assertEqual(line[start - 2:start], "  ", f"{col} misaligned:\n" +
                                 "\n".join(out))
        row = [l for l in out if l.startswith(LONG)][0]
        self.assertRegex(row, LONG + r"\s+running\s+\d+\s+32 MiB\s+1\s")
        self.assertRegex(self.ctl("fds", LONG).stdout, r"(?m)^ram0\s+memfd\s+32 MiB\s+\d+$")

    def test_times_are_local_with_zone_and_age(self):
        p = self.ctl("status", "run1")
        zone = time.strftime("%Z")
        self.assertRegex(p.stdout, r"(?m)^created\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "
                         + re.escape(zone) + r" \((\d+[dhms] ?)+ ago\)$")
        p = self.ctl("daemon", "status")
        self.assertRegex(p.stdout, r"(?m)^started\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "
                         + re.escape(zone) + r" \(.* ago\)$")

    def test_update_all_says_what_it_skipped_and_fails(self):
        p = self.ctl("update", "--all", "--timeout", "20", timeout=180)
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertRegex(p.stdout, r"(?m)^  skipped dead1: crashed \(")
        self.assertRegex(p.stdout, r"2 updated, 0 failed, 1 skipped")
        js = json.loads(self.ctl("update", "--all", "--json", timeout=180).stdout)
        self.assertEqual([s["vm"] for s in js["skipped"]], ["dead1"])
        self.assertEqual(js["skipped"][0]["state"], "crashed")
        self.assertEqual(js["summary"]["skipped"], 1)

    # -- completion ------------------------------------------------------------

    def complete(self, *words):
        env = dict(os.environ, PATH=os.path.dirname(CPRCTL) + ":" + os.environ["PATH"])
        arr = " ".join(f"'{w}'" for w in words)
        script = (f"source {COMPLETION}; COMP_WORDS=({arr}); COMP_CWORD={len(words) - 1}; "
                  "_cprctl; echo ${COMPREPLY[@]}")
        p = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env,
                           timeout=30)
        self.assertEqual(p.returncode, 0, p.stderr)
        return p.stdout.split()

    def test_bash_completion(self):
        self.assertEqual(self.complete("cprctl", "up"), ["update"])
        verbs, opts = verbs_and_options()
        self.assertEqual(sorted(self.complete("cprctl", "")),
                         sorted(verbs + ["--socket", "--json", "--timeout", "--help",
                                         "--version"]))
        self.assertEqual(sorted(self.complete("cprctl", "create", "x", "--m")),
                         ["--machine", "--memory"])
        for v in verbs:
            got = set(self.complete("cprctl", v, "--"))
            self.assertTrue(set(opts[v]) <= got, f"{v}: {set(opts[v]) - got} not completed")
        self.assertEqual(self.complete("cprctl", "list", "--state", "cr"), ["crashed"])
        self.assertEqual(sorted(self.complete("cprctl", "update", "x", "--strategy", "c")),
                         ["cpr-exec", "cpr-transfer"])
        self.assertEqual(sorted(self.complete("cprctl", "--socket", self.d.sock, "status", "")),
                         sorted(["run1", "dead1", LONG]))
        self.assertEqual(self.complete("cprctl", "--socket", self.d.sock, "destroy", "ru"),
                         ["run1"])

    # -- the API ---------------------------------------------------------------

    def test_describe_is_what_the_server_checks(self):
        desc = self.d.call("rpc.describe")
        self.assertEqual(desc["protocol_version"], 1)
        names = [m["name"] for m in desc["methods"]]
        self.assertIn("rpc.describe", names)
        samples = {"string": "x", "uint": 1, "size": "64M", "bool": True, "strings": ["x"],
                   "objects": [{}]}
        wrong = {"string": 1, "uint": "x", "size": True, "bool": "x", "strings": "x",
                 "objects": ["x"]}
        for m in desc["methods"]:
            self.assertIn(m["permission"], ("read", "mutating", "mutating-or-own-vmm"))
            required = {p["name"]: samples[p["type"]] for p in m["params"] if p["required"]}
            # A member the table does not name is refused, and named.
            with self.assertRaises(RpcError, msg=m["name"]) as cm:
                self.d.call(m["name"], dict(required, zzz=1))
            self.assertEqual(cm.exception.code, -32602, m["name"])
            self.assertEqual(cm.exception.error["data"],
                             {"kind": "invalid-params", "param": "zzz"}, m["name"])
            for p in m["params"]:
                with self.assertRaises(RpcError, msg=(m["name"], p)) as cm:
                    self.d.call(m["name"], dict(required, **{p["name"]: wrong[p["type"]]}))
                self.assertEqual(cm.exception.error["data"]["param"], p["name"])
                if p["required"]:
                    rest = {k: v for k, v in required.items() if k != p["name"]}
                    with self.assertRaises(RpcError) as cm:
                        self.d.call(m["name"], rest)
                    self.assertIn(f"missing parameter '{p['name']}'", cm.exception.message)
        perms = {m["name"]: m["permission"] for m in desc["methods"]}
        self.assertEqual(perms["vm.list"], "read")
        self.assertEqual(perms["vm.create"], "mutating")
        self.assertEqual(perms["fd.claim"], "mutating-or-own-vmm")

    def test_readme_documents_every_method_and_error(self):
        readme = read(README)
        desc = self.d.call("rpc.describe")
        for m in desc["methods"]:
            row = re.search(r"(?m)^\| `" + re.escape(m["name"]) + r"` \|([^|]*)\|", readme)
            self.assertTrue(row, f"README's method table lacks {m['name']}")
            for p in m["params"]:
                self.assertIn(f"`{p['name']}`", row.group(1),
                              f"README: {m['name']} lacks param {p['name']}")
        for e in desc["errors"]:
            self.assertRegex(readme, rf"(?m)^\| {e['code']} \| `{e['kind']}` \|",
                             f"README's error table lacks {e['code']}")

    def test_errors_carry_kind_and_param(self):
        with self.assertRaises(RpcError) as cm:
            self.create("run1")
        self.assertEqual(cm.exception.error["data"], {"kind": "exists", "param": "name"})
        with self.assertRaises(RpcError) as cm:
            self.d.call("vm.update", {"name": "run1", "strategy": "bogus"})
        self.assertEqual(cm.exception.error["data"], {"kind": "invalid-params",
                                                      "param": "strategy"})
        with self.assertRaises(RpcError) as cm:
            self.d.call("no.such")
        self.assertEqual(cm.exception.error["data"], {"kind": "unknown-method"})
        # An update's report stays the data, and says its kind too.
        with self.assertRaises(RpcError) as cm:
            self.d.call("vm.update", {"name": "run1", "vmm": "/nonexistent/qemu"})
        data = cm.exception.error["data"]
        self.assertEqual(cm.exception.code, -32005)
        self.assertEqual(data["result"], "rolled-back")
        self.assertEqual(data["kind"], "vmm-failed")


class StoppedDaemon(unittest.TestCase):
    """A cprd that is stopped (SIGSTOP) accepts connections and never
    answers: cprctl gives up, says why and exits 4."""

    def setUp(self):
        require_root(self)
        self.d = Daemon().start()
        os.kill(self.d.pid, signal.SIGSTOP)

    def tearDown(self):
        os.kill(self.d.pid, signal.SIGCONT)
        self.d.stop()

    def test_list_times_out(self):
        env = dict(os.environ, CPRD_SOCKET=self.d.sock)
        t0 = time.monotonic()
        # The default (30 s) and an explicit one, at once.
        default = subprocess.Popen([CPRCTL, "list"], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=env)
        p = subprocess.run([CPRCTL, "--timeout", "1.5", "list"], capture_output=True, text=True,
                           env=env, timeout=30)
        self.assertLess(time.monotonic() - t0, 15)
        self.assertEqual(p.returncode, 4, p.stderr)
        self.assertIn("did not answer vm.list within 1.5 s", p.stderr)
        p = subprocess.run([CPRCTL, "--json", "--timeout", "1", "status", "x"],
                           capture_output=True, text=True, env=env, timeout=30)
        self.assertEqual(json.loads(p.stdout)["data"]["kind"], "timeout")
        try:
            out, err = default.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            default.kill()
            self.fail("cprctl list waited past 60 s on a stopped cprd")
        self.assertEqual(default.returncode, 4, err)
        self.assertIn("within 30.0 s", err)


class Docs(unittest.TestCase):
    """README and the man pages document every verb and option, and the
    pages render without a warning."""

    def test_every_verb_and_option_is_documented(self):
        verbs, opts = verbs_and_options()
        self.assertIn("methods", verbs)
        readme, man = read(README), read(MAN_CPRCTL)
        for v in verbs:
            self.assertRegex(readme, rf"(?m)^\| `{v}\b", f"README's verb table lacks {v}")
            self.assertRegex(man, rf"(?m)^\*{v}[* ]", f"cprctl(1) lacks verb {v}")
            for o in opts[v]:
                self.assertTrue(f"`{o}" in readme or re.search(
                    rf"(?m)^\| `{v}[^|]*{o}\b", readme), f"README lacks {v} {o}")
                self.assertTrue(f"*{o}*" in man, f"cprctl(1) lacks {v} {o}")
        cprd_help = subprocess.run([os.path.join(os.path.dirname(CPRCTL), "cprd"), "--help"],
                                   capture_output=True, text=True).stdout
        for o in sorted(set(re.findall(r"--[a-z][a-z-]+", cprd_help))):
            self.assertTrue(f"*{o}*" in read(MAN_CPRD), f"cprd(8) lacks {o}")

    def test_man_pages_render(self):
        if not shutil.which("scdoc"):
            self.skipTest("scdoc is not installed (make deps installs it)")
        with tempfile.TemporaryDirectory() as tmp:
            pages = []
            for src in (MAN_CPRCTL, MAN_CPRD):
                out = os.path.join(tmp, os.path.basename(src)[:-4])
                with open(src) as i, open(out, "w") as o:
                    p = subprocess.run(["scdoc"], stdin=i, stdout=o, stderr=subprocess.PIPE,
                                       text=True)
                self.assertEqual(p.returncode, 0, f"scdoc {src}: {p.stderr}")
                pages.append(out)
            p = subprocess.run(["sh", os.path.join(TOP, "tests", "check-man.sh")] + pages,
                               capture_output=True, text=True, timeout=60)
            self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
            # A page that warns fails the check.
            bad = os.path.join(tmp, "bad.1")
            with open(bad, "w") as f:
                f.write(".TH BAD 1\n.SH NAME\nbad\n.NOSUCHMACRO\n")
            p = subprocess.run(["sh", os.path.join(TOP, "tests", "check-man.sh"), bad],
                               capture_output=True, text=True, timeout=60)
            self.assertNotEqual(p.returncode, 0, "check-man.sh passed a page that warns")
