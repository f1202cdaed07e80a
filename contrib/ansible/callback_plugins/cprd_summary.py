# The fleet summary of a cprd roll-out: every host of the play that ran the
# cprd_update module, done, failed or skipped (never reached: the roll-out
# stopped before its batch), with its VMs' blackouts; printed as a table at
# the end of the run and written as JSON to cprd_summary_file (an extra var;
# default cprd-summary.json in the current directory).
#
# A callback rather than a last play: once max_fail_percentage stops a
# roll-out, Ansible runs no further task or play, but a callback still sees
# the end of the run.

import json
import math
import os

from ansible import context
from ansible.plugins.callback import CallbackBase

DOCUMENTATION = r"""
name: cprd_summary
type: aggregate
short_description: fleet summary of a cprd rolling update (JSON and a table)
description:
  - Collects the results of the cprd_update module per host and, at the end of the run,
    prints hosts done, failed and skipped with blackout p50/p95/max per host and overall,
    and writes the same as JSON to the extra var cprd_summary_file.
"""

MODULE = "cprd_update"


def quantiles(values):
    """p50, p95 and max by nearest rank; None for each when there are none."""
    v = sorted(values)
    if not v:
        return {"p50": None, "p95": None, "max": None}

    def rank(q):
        return v[max(0, math.ceil(q * len(v)) - 1)]
    return {"p50": rank(0.50), "p95": rank(0.95), "max": v[-1]}


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "cprd_summary"
    CALLBACK_NEEDS_ENABLED = False

    def __init__(self):
        super().__init__()
        self.hosts = []  # inventory order, of the plays that run the module
        self.seen = {}  # host -> {"preflight": result, "update": result, "failed": ...}
        self.play_hosts = []
        self.extra = {}
        self.active = False

    def v2_playbook_on_play_start(self, play):
        vm = play.get_variable_manager()
        self.extra = dict(vm.extra_vars) if vm else {}
        try:
            # every host of the play (and --limit), not only this batch's
            self.play_hosts = [h.name for h in
                               vm._inventory.get_hosts(play.hosts, ignore_restrictions=True)]
        except Exception:  # the summary must never break the run
            self.play_hosts = []

    def v2_playbook_on_task_start(self, task, is_conditional):
        if task.action.split(".")[-1] == MODULE:
            self.active = True
            self.hosts.extend(h for h in self.play_hosts if h not in self.hosts)

    def _host(self, result):
        name = result._host.get_name()
        if name not in self.hosts:
            self.hosts.append(name)
        return self.seen.setdefault(name, {})

    def _record(self, result, failed):
        if not self.active:
            return
        h = self._host(result)
        r = result._result
        if result._task.action.split(".")[-1] == MODULE:
            step = (r.get("cprd_action") or
                    result._task.args.get("action") or "update")
            h[step] = r
        if failed:
            h.setdefault("failed", {"task": result._task.get_name(), "msg": r.get("msg"),
                                    "error": r.get("error")})

    def v2_runner_on_ok(self, result):
        self._record(result, False)

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._record(result, not ignore_errors)

    def v2_runner_on_unreachable(self, result):
        if self.active:
            self._host(result).setdefault(
                "failed", {"task": result._task.get_name(),
                           "msg": result._result.get("msg", "unreachable"), "error": None})

    def host_summary(self, name):
        h = self.seen.get(name, {})
        pre, upd = h.get("preflight"), h.get("update")
        reports = (upd or {}).get("reports") or []
        blackouts = [r["blackout_ms"] for r in reports
                     if r.get("result") == "ok" and isinstance(r.get("blackout_ms"), (int, float))]
        out = {
            "status": "skipped",
            "socket": (pre or upd or {}).get("socket"),
            "vms": (pre or {}).get("vms", []),
            "checks": (pre or {}).get("checks", []),
            "reports": reports,
            "updated": sum(r.get("result") == "ok" for r in reports),
            "not_updated": sum(r.get("result") != "ok" for r in reports),
            "blackout_ms": quantiles(blackouts),
            "note": "",
            "error": None,
        }
        if "failed" in h:
            f = h["failed"]
            out.update(status="failed", note=f["msg"] or f["task"], error=f.get("error"))
        elif pre is None:
            out["note"] = "not reached: the roll-out stopped before this host's batch"
        elif not out["vms"]:
            out.update(status="done", note=pre.get("msg", "nothing to update"))
        elif upd is not None and upd.get("check_mode"):
            out.update(status="checked", note=f"pre-flight passed; {upd.get('msg')}")
        elif upd is not None:
            out.update(status="done", note=upd.get("msg", ""))
        else:
            out.update(status="done", note=pre.get("msg", ""))
        return out, blackouts

    def v2_playbook_on_stats(self, stats):
        if not self.active:
            return
        hosts, every = {}, []
        for name in self.hosts:
            hosts[name], b = self.host_summary(name)
            every.extend(b)
        count = {s: sum(h["status"] == s for h in hosts.values())
                 for s in ("done", "checked", "failed", "skipped")}
        summary = {
            "check_mode": bool(context.CLIARGS.get("check")),
            "hosts": hosts,
            "totals": dict(count, hosts=len(hosts),
                           vms_updated=sum(h["updated"] for h in hosts.values()),
                           vms_not_updated=sum(h["not_updated"] for h in hosts.values())),
            "stopped": count["skipped"] > 0,
            "changed": any(h["updated"] for h in hosts.values()),
            "blackout_ms": quantiles(every),
        }
        path = self.extra.get("cprd_summary_file") or "cprd-summary.json"
        try:
            with open(path + ".tmp", "w") as f:
                json.dump(summary, f, indent=2, sort_keys=True)
                f.write("\n")
            os.replace(path + ".tmp", path)
            where = f"(JSON: {path})"
        except OSError as e:
            where = f"(cannot write {path}: {e.strerror})"
        self._display.banner("CPRD ROLL-OUT SUMMARY")
        self._display.display("\n".join(table(summary)) + "\n" + where)


def ms(q):
    if q["max"] is None:
        return "-"
    return "/".join(f"{q[k]:.1f}" for k in ("p50", "p95", "max"))


def table(s):
    t = s["totals"]
    head = (f"{t['done']} done, {t['failed']} failed, {t['skipped']} skipped"
            + (f", {t['checked']} checked (check mode)" if s["check_mode"] else "")
            + f"; {t['vms_updated']} VM(s) updated, {t['vms_not_updated']} not"
            + ("; the roll-out stopped before every host was reached" if s["stopped"] else "")
            + ("" if s["changed"] or s["check_mode"] else "; nothing changed"))
    rows = [("host", "status", "vms", "updated", "blackout ms p50/p95/max", "note")]
    for name, h in s["hosts"].items():
        rows.append((name, h["status"], str(len(h["vms"])), str(h["updated"]),
                     ms(h["blackout_ms"]), (h["note"] or "")[:100]))
    rows.append(("all", "", "", str(t["vms_updated"]), ms(s["blackout_ms"]), ""))
    w = [max(len(r[i]) for r in rows) for i in range(5)]
    return [head] + ["  ".join(c.ljust(w[i]) for i, c in enumerate(r[:5])) + "  " + r[5]
                     for r in rows]
