#!/usr/bin/python3
"""An unprivileged peer that attacks cprd, for test_limits.py. It runs as
another uid (setpriv), so it uses nothing but the standard library.

    limits_peer.py SOCKET MODE [N]

Once the attack is set up it prints one JSON line of what it saw, then
holds everything until its stdin closes (modes that keep sending go on
sending meanwhile), then prints a second line and exits."""

import json
import os
import select
import socket
import sys
import time

sock_path, mode = sys.argv[1], sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 1


def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock_path)
    return s


def first_line(s, timeout):
    """What cprd said on s within timeout (b"" if nothing, or EOF)."""
    s.settimeout(timeout)
    buf = b""
    try:
        while b"\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
    except (socket.timeout, BlockingIOError):
        pass
    except OSError:
        pass
    return buf.split(b"\n", 1)[0]


def report(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def stdin_closed(timeout=0.0):
    r, _, _ = select.select([sys.stdin], [], [], timeout)
    return bool(r) and not os.read(sys.stdin.fileno(), 1)


def hold():
    while not stdin_closed(1.0):
        pass


held = []
if mode == "flood":
    # Open n connections; count those cprd refused with an error line.
    for _ in range(n):
        held.append(connect())
    refused, errors = 0, {}
    for s in held:
        line = first_line(s, 0.02)
        if line:
            refused += 1
            err = json.loads(line).get("error", {})
            errors[err.get("message", "")] = err.get("code")
    report({"opened": n, "refused": refused, "errors": errors})
    hold()
elif mode == "hoard":
    # n connections, each leaving 16 fds in a message it never finishes.
    fds = [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC) for _ in range(16)]
    for _ in range(n):
        try:
            s = connect()
            socket.send_fds(s, [b'{"jsonrpc":"2.0","method":'], fds)
            held.append(s)
        except OSError:
            pass
    report({"opened": len(held)})
    hold()
elif mode == "unread":
    # n connections sending batches of daemon.status, never reading.
    one = '{"jsonrpc":"2.0","method":"daemon.status","id":1}'
    msg = ("[" + ",".join([one] * 256) + "]\n").encode()
    for _ in range(n):
        s = connect()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.setblocking(False)
        held.append([s, 0])
    report({"opened": n})
    dropped = 0
    while not stdin_closed(0.01):
        for e in held:
            if e[0] is None:
                continue
            try:
                e[1] += e[0].send(msg[e[1] % len(msg):])
            except BlockingIOError:
                pass
            except OSError:
                e[0] = None
                dropped += 1
    # A connection cprd closed since the last send is found by reading it
    # to its end: what cprd queued, then EOF (an open one has no end yet).
    for e in held:
        while e[0] is not None:
            try:
                if not e[0].recv(65536):
                    raise ConnectionResetError
            except BlockingIOError:
                break
            except OSError:
                e[0] = None
                dropped += 1
    report({"sent": sum(e[1] for e in held), "dropped": dropped})
    sys.exit(0)
elif mode == "batch":
    # One message as large as cprd takes: thousands of vm.list calls.
    one = '{"jsonrpc":"2.0","method":"vm.list","id":1}'
    count = (256 * 1024 - 16) // (len(one) + 1)
    s = connect()
    s.sendall(("[" + ",".join([one] * count) + "]\n").encode())
    buf = b""
    s.settimeout(60)
    while not buf.endswith(b"\n"):
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        buf += chunk
    reply = json.loads(buf)
    report({"calls": count, "replies": len(reply) if isinstance(reply, list) else 1,
            "reply": reply if isinstance(reply, dict) else None})
    s.close()
    hold()
elif mode == "idle":
    # n silent connections: how long until cprd closed each, and what it said.
    t0 = time.monotonic()
    for _ in range(n):
        held.append(connect())
    lines = [first_line(s, 30).decode() for s in held]
    report({"after": time.monotonic() - t0, "said": lines})
    hold()
elif mode == "hangup":
    # n connections, one after another, each hanging up inside a message.
    for _ in range(n):
        try:
            s = connect()
            s.sendall(b'{"jsonrpc":"2.0","method":')
            s.close()
        except OSError:
            pass
    report({"hung_up": n})
    hold()
elif mode == "subscribe":
    # n connections that subscribe to events and then never read again.
    for _ in range(n):
        s = connect()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(b'{"jsonrpc":"2.0","method":"events.subscribe","id":1}\n')
        line = first_line(s, 10)
        if b'"subscribed":true' not in line:
            sys.exit(f"events.subscribe failed: {line!r}")
        held.append(s)
    report({"subscribed": n})
    hold()
elif mode == "lister":
    # n connections, each with one batch of 256 vm.list {"outdated": true}
    # in flight at all times: the next is sent when its answer is read.
    one = '{"jsonrpc":"2.0","method":"vm.list","params":{"outdated":true},"id":1}'
    msg = ("[" + ",".join([one] * 256) + "]\n").encode()
    for _ in range(n):
        s = connect()
        s.sendall(msg)
        held.append([s, b""])
    report({"opened": n})
    answers = 0
    while not stdin_closed(0):
        r, _, _ = select.select([e[0] for e in held], [], [], 0.1)
        for e in held:
            if e[0] not in r:
                continue
            chunk = e[0].recv(1 << 20)
            if not chunk:
                sys.exit("cprd closed a lister's connection")
            e[1] += chunk
            while b"\n" in e[1]:
                _, e[1] = e[1].split(b"\n", 1)
                answers += 1
                e[0].sendall(msg)
    report({"answers": answers})
    sys.exit(0)
else:
    sys.exit(f"unknown mode {mode}")
report({"done": True})
