#!/usr/bin/env python3
"""A stand-in for a new VMM that speaks QMP on the monitor socket cprd hands
it (-chardev socket,id=qmp,fd=N,server=on) and refuses the incoming
migration. It makes cprd roll back from inside a reply on the new VMM's own
monitor, a path real QEMU cannot be driven into safely."""

import json
import os
import socket
import sys
import time

fd = None
for arg in sys.argv:
    if arg.startswith("socket,id=qmp,fd="):
        fd = int(arg.split("fd=")[1].split(",")[0])
if fd is None:
    sys.exit("no monitor fd on the command line")
listener = socket.socket(fileno=fd)
conn, _ = listener.accept()
conn.sendall(b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 99}, '
             b'"package": ""}, "capabilities": []}}\r\n')
buf = b""
while True:
    data, fds, _, _ = socket.recv_fds(conn, 65536, 16)
    for f in fds:
        os.close(f)
    if not data:
        break
    buf += data
    while b"\n" in buf:
        line, buf = buf.split(b"\n", 1)
        cmd = json.loads(line)
        if cmd["execute"] == "migrate-incoming":
            reply = {"error": {"class": "GenericError",
                               "desc": "this VMM refuses incoming migrations"}}
        else:
            reply = {"return": {}}
        reply["id"] = cmd.get("id")
        conn.sendall(json.dumps(reply).encode() + b"\r\n")
time.sleep(600)  # cprd ends us
