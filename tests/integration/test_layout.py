"""How the daemon's files depend on each other, read from what the build
made: a file depends on another when it calls a function (or uses data)
the other defines. The picture (docs/ARCHITECTURE.md): main -> methods ->
{update, check, checkpoint} -> {op, vm} -> vmm -> {launcher, scope, kvm/, memstore/}, with the registry,
the fd store, the server and the log below whoever uses them.

And which folders of daemon/ may include which: main.c, then rpc/, ops/,
strategies/, then the base (core/, devices/, host/, observe/); a file
includes headers of its own folder and of the folders below it, never
above."""

import glob
import os
import re
import shutil
import subprocess
import unittest

from cprdtest import BUILD

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.abspath(os.path.join(HERE, "..", ".."))

# Edges that close a circle and are known: none. The VM routes its VMM's
# events to whatever operation runs on it through that operation's type
# (daemon/core/op.h), and knows no operation by name.
KNOWN_CIRCLES = set()

# The operations, by the files that implement them: vm.c depends on none
# of them and includes none of their headers (nor any header that declares
# an operation's type).
OPERATIONS = {"update", "check", "checkpoint", "strategies", "strategy-handover",
              "strategy-cpr-transfer", "strategy-cpr-exec", "settle", "op"}
OPERATION_HEADERS = {"ops/update.h", "ops/check.h", "ops/checkpoint.h", "strategies/strategy.h",
                     "ops/settle.h"}
INCLUDE = re.compile(r'^\s*#\s*include\s+"daemon/([^"]+)"', re.M)

# The folders of daemon/ by rank: a file includes headers of its own
# folder and of lower ranks only. The four of the base include each other
# (a VM's devices, its VMM's launcher and its events are parts of the VM),
# but nothing above them.
RANK = {"main.c": 4, "rpc": 3, "ops": 2, "strategies": 1,
        "core": 0, "devices": 0, "host": 0, "observe": 0}
# Includes that go up, each for a reason (docs/ARCHITECTURE.md).
INCLUDES_UP = {
    # The update counters start at zero for every strategy in the table.
    ("observe/metrics.c", "strategies/strategy.h"),
}
# What host/ may include of the rest of the daemon: its shared state and
# the log. Running things on the host needs nothing of VMs or operations.
HOST_NEEDS = {"core/daemon.h", "observe/log.h"}


def sources():
    """Every file of daemon/, as its path below daemon/."""
    out = []
    for top, dirs, files in os.walk(os.path.join(SRC, "daemon")):
        dirs.sort()
        for f in sorted(files):
            if f.endswith((".c", ".h")):
                out.append(os.path.relpath(os.path.join(top, f), os.path.join(SRC, "daemon")))
    return out


def folder(path):
    """The folder of a path below daemon/ ("main.c" for the files at its top)."""
    return path.split("/")[0] if "/" in path else path


def includes():
    """{file below daemon/: {daemon headers it includes, below daemon/}}."""
    out = {}
    for rel in sources():
        with open(os.path.join(SRC, "daemon", rel)) as f:
            out[rel] = set(INCLUDE.findall(f.read()))
    return out


def includes_up(incs):
    """The includes that go to a higher rank than their file's, and the
    headers that are in no known folder."""
    bad = []
    for src, hs in sorted(incs.items()):
        for h in sorted(hs):
            if folder(h) not in RANK or folder(src) not in RANK:
                bad.append((src, h))
            elif RANK[folder(h)] > RANK[folder(src)] and (src, h) not in INCLUDES_UP:
                bad.append((src, h))
    return bad


def operation_headers():
    """The headers named above, and any other that declares an op_type."""
    found = set(OPERATION_HEADERS)
    for h in glob.glob(os.path.join(SRC, "daemon", "**", "*.h"), recursive=True):
        with open(h) as f:
            if re.search(r"\bextern\s+const\s+struct\s+op_type\b", f.read()):
                found.add(os.path.relpath(h, os.path.join(SRC, "daemon")))
    return found


def symbols(obj):
    out = subprocess.run(["nm", obj], capture_output=True, text=True, check=True).stdout
    defined, used = set(), set()
    for line in out.splitlines():
        f = line.split()
        if len(f) == 2 and f[0] == "U":
            used.add(f[1])
        elif len(f) == 3 and f[1] in "TDBRC":
            defined.add(f[2])
    return defined, used


def dependencies():
    """{file: {files it depends on}} over daemon/'s .c files, by name."""
    mods = {}
    for rel in sources():
        if not rel.endswith(".c"):
            continue
        name = os.path.basename(rel)[:-2]
        assert name not in mods, f"two files named {name}.c in daemon/"
        obj = os.path.join(BUILD, "obj", "daemon", rel[:-2] + ".o")
        if not os.path.exists(obj):
            raise unittest.SkipTest(f"{obj} missing: run `make`")
        mods[name] = symbols(obj)
    return {m: {n for n in mods if n != m and mods[m][1] & mods[n][0]} for m in mods}


def circles(deps, ignore):
    """Strongly connected groups of more than one file, edges in ignore left out."""
    graph = {m: {n for n in ns if (m, n) not in ignore} for m, ns in deps.items()}
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


class Layout(unittest.TestCase):
    def setUp(self):
        if not shutil.which("nm"):
            self.skipTest("nm (binutils) not installed")

    def test_no_file_depends_on_itself_through_others(self):
        deps = dependencies()
        self.assertEqual(circles(deps, KNOWN_CIRCLES), [],
                         f"the daemon's files depend on each other in a circle: {deps}")
        for edge in KNOWN_CIRCLES:
            self.assertIn(edge[1], deps[edge[0]], f"{edge} is gone: drop it from KNOWN_CIRCLES")

    def test_lower_layers_do_not_call_up(self):
        deps = dependencies()
        upper = {"main", "methods", "recover"}
        for low in ("server", "registry", "fdstore", "inherit", "log", "launcher", "scope",
                    "sandbox", "vmm", "vm", "update"):
            calls_up = deps[low] & upper
            self.assertEqual(calls_up, set(), f"{low} calls up")
        # The registry file, the VM record's codec and the launcher need
        # nothing of the daemon (the codec reads the device table; the
        # launcher's confinement of a VMM is its own leaf).
        self.assertEqual(deps["registry"], set())
        self.assertLessEqual(deps["vmrecord"], {"devices"})
        self.assertEqual(deps["launcher"], {"confine"})
        self.assertEqual(deps["confine"], set())

    def test_vm_knows_no_operation(self):
        with open(os.path.join(SRC, "daemon", "core", "vm.c")) as f:
            included = set(INCLUDE.findall(f.read()))
        self.assertEqual(included & operation_headers(), set(),
                         "vm.c includes an operation's header: route through vm->op->type")
        self.assertEqual(dependencies()["vm"] & OPERATIONS, set(),
                         "vm.c calls into an operation")

    def test_vm_state_changes_in_one_place(self):
        assign = re.compile(r"\bvm->state\s*=[^=]")
        for src in glob.glob(os.path.join(SRC, "daemon", "**", "*.c"), recursive=True):
            name = os.path.basename(src)
            with open(src) as f:
                lines = [l.strip() for l in f if assign.search(l)]
            if name != "vm.c":
                self.assertEqual(lines, [], f"{name} sets a VM's state itself")
                continue
            # vm_set_state() itself, and the two constructors.
            self.assertEqual(len(lines), 3, lines)
            self.assertIn("vm->state = state;", lines)

    def test_folders_include_down(self):
        # By rank: devices/, core/, host/ and observe/ include nothing of
        # ops/, strategies/ or rpc/, and only main.c includes rpc/.
        incs = includes()
        self.assertEqual(includes_up(incs), [],
                         "a file includes a header of a folder above its own (or of none)")
        for edge in INCLUDES_UP:
            self.assertIn(edge[1], incs[edge[0]], f"{edge} is gone: drop it from INCLUDES_UP")

    def test_folder_rules(self):
        incs = includes()
        for src, hs in sorted(incs.items()):
            if folder(src) == "host":
                self.assertEqual({h for h in hs if folder(h) != "host"} - HOST_NEEDS, set(),
                                 f"{src} needs more of the daemon than its state and log")
        # The folders are the ones the rule names.
        self.assertEqual({folder(s) for s in incs}, set(RANK))


if __name__ == "__main__":
    unittest.main()
