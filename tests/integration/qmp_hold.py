#!/usr/bin/env python3
"""Real QEMU with its monitor behind a relay that can hold QEMU's side back:
a VMM wrapper, `exec python3 qmp_hold.py QEMU ARGS...`. QEMU is exec'd here,
so it keeps the pid cprd launched; the relay runs in a detached process.

QEMU gets a monitor socket of the relay's (an abstract one, at the very fd
number cprd gave); the relay keeps cprd's listening socket and joins each
connection cprd makes to one it makes to QEMU, fds (getfd) included. Once
QEMU has answered the command named in QMP_HOLD_AFTER, nothing QEMU says
reaches cprd (replies and events are held) until the relay gets SIGUSR2, so
cprd cannot see a migration progress that really happens; with a "!" after
the command's name (QMP_HOLD_AFTER=cont!), its answer is held too. Meanwhile the
relay asks QEMU for its run state itself and creates QMP_HOLD_MARK/PID-STATE
(PID: QEMU's) for each state it sees (inmigrate, paused, running, ...).
A connection that ends drops what was held; the next one is relayed as is.
The relay ends with QEMU (it watches a pidfd of QEMU's pid, opened before
the exec): a cprd that is killed or restarted may never connect again, and
a relay waiting for it would outlive the test."""

import json
import os
import select
import signal
import socket
import sys
import time


def relay(listener, qemu, qemu_addr, qemu_pid, hold_after, markdir):
    released = []
    signal.signal(signal.SIGUSR2, lambda *_: released.append(True))
    while True:
        try:
            r, _, _ = select.select([listener, qemu], [], [])
            if qemu in r:
                return  # QEMU is gone
            client, _ = listener.accept()
        except InterruptedError:
            continue
        q = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            q.connect(qemu_addr)
        except OSError:
            return  # QEMU is gone
        if not join(client, q, qemu, qemu_pid, hold_after if not released else None,
                    released, markdir):
            return
        hold_after = None  # held once only


def join(client, q, qemu, qemu_pid, hold_after, released, markdir):
    """Relay one connection; False once QEMU has gone."""
    names, cbuf, qbuf, held = {}, b"", b"", []
    muted, polled, n = False, 0.0, 0
    while True:
        if muted and released:
            for line in held:
                client.sendall(line)
            held, muted = [], False
        if muted and time.monotonic() - polled > 0.05:
            n += 1
            q.sendall(json.dumps({"execute": "query-status", "id": f"hold-{n}"}).encode() +
                      b"\n")
            polled = time.monotonic()
        try:
            r, _, _ = select.select([client, q, qemu], [], [], 0.05)
        except InterruptedError:
            continue
        if qemu in r:
            client.close()
            q.close()
            return False
        if client in r:
            data, fds, _, _ = socket.recv_fds(client, 65536, 16)
            if not data:
                q.close()
                client.close()
                return True
            socket.send_fds(q, [data], fds) if fds else q.sendall(data)
            for fd in fds:
                os.close(fd)
            cbuf += data
            while b"\n" in cbuf:
                line, cbuf = cbuf.split(b"\n", 1)
                try:
                    cmd = json.loads(line)
                    names[json.dumps(cmd.get("id"))] = cmd.get("execute")
                except ValueError:
                    pass
        if q in r:
            data = q.recv(65536)
            if not data:
                client.close()
                return False
            qbuf += data
            while b"\n" in qbuf:
                line, qbuf = qbuf.split(b"\n", 1)
                line += b"\n"
                try:
                    msg = json.loads(line)
                except ValueError:
                    msg = {}
                if str(msg.get("id", "")).startswith("hold-"):
                    st = (msg.get("return") or {}).get("status")
                    if st and markdir:
                        open(os.path.join(markdir, f"{qemu_pid}-{st}"), "a").close()
                    continue
                if muted:
                    held.append(line)
                    continue
                if hold_after and "id" in msg and \
                        names.get(json.dumps(msg["id"])) == hold_after.rstrip("!"):
                    muted = True
                    if hold_after.endswith("!"):  # its own answer is held too
                        held.append(line)
                        hold_after = None
                        continue
                    hold_after = None
                client.sendall(line)


def main():
    argv = sys.argv[1:]
    spec = next(a for a in argv if a.startswith("socket,id=qmp,fd="))
    fd = int(spec.split("fd=")[1].split(",")[0])
    listener = socket.socket(fileno=os.dup(fd))  # cprd's, the relay's from now on
    addr = f"\0qmp-hold-{os.getpid()}"
    inner = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    inner.bind(addr)
    inner.listen(4)
    os.dup2(inner.fileno(), fd)  # QEMU's monitor, at the number on its command line
    inner.close()
    qemu_pid = os.getpid()
    qemu = os.pidfd_open(qemu_pid)  # close-on-exec: QEMU does not get it
    if os.fork() == 0:
        if os.fork() == 0:  # detached: cprd, a subreaper, reaps it
            os.setsid()
            keep = (listener.fileno(), qemu)
            for i in range(3, 1024):  # not the guest's RAM, console, ...
                if i not in keep:
                    try:
                        os.close(i)
                    except OSError:
                        pass
            relay(listener, qemu, addr, qemu_pid, os.environ.get("QMP_HOLD_AFTER"),
                  os.environ.get("QMP_HOLD_MARK"))
        os._exit(0)
    os.wait()
    listener.close()
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main()
