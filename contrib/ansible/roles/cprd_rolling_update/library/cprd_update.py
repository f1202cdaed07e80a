#!/usr/bin/python3
# Ansible module of the cprd_rolling_update role: pre-flight and live update
# of the VMs that one cprd holds, over cprd's JSON-RPC socket.

DOCUMENTATION = r"""
module: cprd_update
short_description: Pre-flight and live-update the VMMs of one host's cprd
description:
  - Speaks JSON-RPC 2.0 to cprd's UNIX socket (newline-delimited), as cprctl does.
  - C(action=preflight) lists the VMs to update (by default those whose VMM was replaced
    on disk) and runs cprd's pre-flight (C(vm.update) with C(check)) once per binary and
    machine type among them. No guest is paused. Fails if any pre-flight fails.
  - C(action=update) updates the named VMs, C(parallel) at a time, and fails if any did
    not end C(ok) or a blackout exceeded C(max_blackout_ms). In check mode it updates
    nothing and says which VMs it would update.
  - Every cprd error reaches the play as C(error) with its C(code), C(message) and
    C(kind); each VM's report is in C(reports) and in the fact C(cprd_rollout).
options:
  socket: {description: cprd's socket, default: /run/cprd/cprd.sock, type: path}
  action: {description: preflight or update, choices: [preflight, update], required: true}
  vmm: {description: the binary to update to; default each VM's own, type: str}
  strategy: {description: handover, cpr-transfer or cpr-exec (cprd's default if unset), type: str}
  timeout: {description: seconds cprd allows one update, default: 60, type: int}
  outdated: {description: only VMs whose VMM was replaced on disk, default: true, type: bool}
  names: {description: "action=update: the VMs (default: what preflight would pick)",
          type: list, elements: str}
  parallel: {description: updates at a time, default: 1, type: int}
  max_blackout_ms: {description: a longer blackout fails the host (0 = no limit), type: float}
"""

import json
import socket
import threading

from ansible.module_utils.basic import AnsibleModule

MARGIN_S = 30  # beyond the update's own timeout: cprd rolls back, then answers


class CprdError(Exception):
    """A JSON-RPC error from cprd, or no cprd to talk to (code None)."""

    def __init__(self, code, message, data=None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data if isinstance(data, dict) else {}

    def as_dict(self):
        return {"code": self.code, "message": self.message,
                "kind": self.data.get("kind", "unreachable" if self.code is None else None)}

    def __str__(self):
        return f"cprd error {self.code}: {self.message}" if self.code is not None \
            else self.message


def call(path, method, params=None, timeout=30):
    """One call over a connection of its own; the result, or CprdError."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except OSError as e:
            raise CprdError(None, f"cannot reach cprd at {path}: {e.strerror}") from None
        msg = {"jsonrpc": "2.0", "id": 1, "method": method}
        if params is not None:
            msg["params"] = params
        buf = b""
        try:
            s.sendall(json.dumps(msg).encode() + b"\n")
            while b"\n" not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    raise CprdError(None, f"cprd at {path} closed the connection during "
                                    f"{method}")
                buf += chunk
        except socket.timeout:
            raise CprdError(None, f"cprd at {path} did not answer {method} within "
                            f"{timeout:.0f} s") from None
        except OSError as e:
            raise CprdError(None, f"{method} to cprd at {path}: {e.strerror}") from None
    finally:
        s.close()
    try:
        reply = json.loads(buf.split(b"\n", 1)[0])
    except ValueError:
        raise CprdError(None, f"cprd at {path} answered {method} with something not "
                        "JSON") from None
    if not isinstance(reply, dict):
        raise CprdError(None, f"cprd at {path} answered {method} with a non-object")
    if "error" in reply:
        err = reply["error"] if isinstance(reply["error"], dict) else {}
        raise CprdError(err.get("code"), str(err.get("message", "unknown error")),
                        err.get("data"))
    return reply.get("result")


def base_params(p):
    out = {"timeout": p["timeout"]}
    if p["vmm"]:
        out["vmm"] = p["vmm"]
    if p["strategy"]:
        out["strategy"] = p["strategy"]
    return out


def select(p):
    """(VMs to update, VMs left alone with why): cprd updates only a running
    VM that no update holds."""
    vms = call(p["socket"], "vm.list", {"outdated": True} if p["outdated"] else None)["vms"]
    take, skipped = [], []
    for vm in vms:
        if p["names"] is not None and vm["name"] not in p["names"]:
            continue
        if vm.get("state") == "running" and not vm.get("updating"):
            take.append(vm)
        else:
            why = "already being updated" if vm.get("updating") else \
                f"{vm.get('state')}; only a running VM can be updated"
            skipped.append({"vm": vm["name"], "state": vm.get("state"), "reason": why})
    return take, skipped


def preflight(p, vms):
    """One pre-flight per binary and machine type: (checks, first failure)."""
    checks, failed, seen = [], None, set()
    for vm in vms:
        binary = p["vmm"] or vm.get("vmm")
        key = (binary, vm.get("machine"))
        if key in seen:
            continue
        seen.add(key)
        params = dict(base_params(p), name=vm["name"], check=True)
        try:
            facts = call(p["socket"], "vm.update", params, p["timeout"] + MARGIN_S)
        except CprdError as e:
            facts = dict(e.data, vm=vm["name"], vmm=binary, ok=False, error=e.as_dict())
            failed = failed or (vm["name"], e)
        checks.append(facts)
    return checks, failed


def update_all(p, names):
    reports = [None] * len(names)
    lock = threading.Lock()
    todo = list(enumerate(names))

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                i, name = todo.pop(0)
            params = dict(base_params(p), name=name)
            try:
                rep = call(p["socket"], "vm.update", params, p["timeout"] + MARGIN_S)
            except CprdError as e:
                # a rolled-back or failed update keeps its report as data
                rep = {k: v for k, v in e.data.items() if k != "kind"}
                rep.update(vm=name, result=rep.get("result", "failed"), error=e.as_dict())
            reports[i] = rep

    threads = [threading.Thread(target=worker) for _ in range(max(1, min(p["parallel"],
                                                                           len(names))))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return reports


def judge(reports, limit):
    """Why the host fails, one line per VM (empty: it does not)."""
    why = []
    for r in reports:
        if r.get("result") != "ok":
            err = r.get("error")
            if isinstance(err, dict):
                err = f"cprd error {err.get('code')}: {err.get('message')}"
            why.append(f"{r['vm']}: {r.get('result')}: {err}")
        elif limit and r.get("blackout_ms") is not None and r["blackout_ms"] > limit:
            why.append(f"{r['vm']}: blackout {r['blackout_ms']:.3f} ms exceeds "
                       f"cprd_max_blackout_ms {limit:g}")
    return why


def run(m):
    p = m.params
    fact = {"socket": p["socket"], "cprd_action": p["action"], "check_mode": m.check_mode}
    try:
        vms, skipped = select(p)
        names = [v["name"] for v in vms]
        # not "skipped": Ansible reads that key as "the task was skipped"
        fact.update(vms=names, left_alone=skipped)
        if p["action"] == "preflight":
            if not vms:
                m.exit_json(changed=False, msg="no VM runs an outdated VMM" if p["outdated"]
                            else "no running VM", checks=[], ansible_facts={"cprd_rollout": fact},
                            **fact)
            checks, failed = preflight(p, vms)
            fact["checks"] = checks
            if failed:
                fact["error"] = failed[1].as_dict()
                m.fail_json(msg=f"pre-flight on VM '{failed[0]}' failed, no VM was touched: "
                            f"{failed[1]}", **fact)
            m.exit_json(changed=False, msg=f"pre-flight passed for {len(names)} VM(s)",
                        ansible_facts={"cprd_rollout": fact}, **fact)

        if not vms:
            m.exit_json(changed=False, msg="nothing to update", reports=[],
                        ansible_facts={"cprd_rollout": dict(fact, reports=[])}, **fact)
        if m.check_mode:
            m.exit_json(changed=True, msg=f"would update {len(names)} VM(s)", reports=[],
                        ansible_facts={"cprd_rollout": dict(fact, reports=[])}, **fact)
        reports = update_all(p, names)
    except CprdError as e:
        fact["error"] = e.as_dict()
        m.fail_json(msg=str(e), **fact)
    fact["reports"] = reports
    changed = any(r.get("result") == "ok" for r in reports)
    why = judge(reports, p["max_blackout_ms"])
    if why:
        errs = [r["error"] for r in reports if isinstance(r.get("error"), dict)]
        if errs:
            fact["error"] = errs[0]
        m.fail_json(msg="; ".join(why), changed=changed, failed_vms=why, **fact)
    m.exit_json(changed=changed, msg=f"updated {len(names)} VM(s)",
                ansible_facts={"cprd_rollout": fact}, **fact)


def main():
    m = AnsibleModule(
        argument_spec=dict(
            socket=dict(type="path", default="/run/cprd/cprd.sock"),
            action=dict(type="str", required=True, choices=["preflight", "update"]),
            vmm=dict(type="str"),
            strategy=dict(type="str"),
            timeout=dict(type="int", default=60),
            outdated=dict(type="bool", default=True),
            names=dict(type="list", elements="str"),
            parallel=dict(type="int", default=1),
            max_blackout_ms=dict(type="float", default=0),
        ),
        supports_check_mode=True,
    )
    if not 1 <= m.params["parallel"] <= 64:
        m.fail_json(msg=f"parallel must be 1 to 64, not {m.params['parallel']}")
    if not 1 <= m.params["timeout"] <= 3600:
        m.fail_json(msg=f"timeout must be 1 to 3600 seconds, not {m.params['timeout']}")
    run(m)


if __name__ == "__main__":
    main()
