#!/usr/bin/env python3
"""A stand-in VMM for cprd's fault tests: run by cprd instead of QEMU (through
a wrapper given as --vmm), it takes QEMU's command line, really uses the fds
cprd passes, and speaks enough QMP to take part in a live update with another
stand-in, handover or cpr-transfer, or as itself, cpr-exec. Faults are
injected at named steps, so each phase of an update can be reached at will.

cpr-exec: told `migrate` to `file:PATH` in mode cpr-exec, the stand-in stops
the guest, writes its device state to PATH, says MIGRATION completed and
execs the cpr-exec-command (as it was when `migrate` came) in its own
process (same pid; the fds cprd gave it stay, the monitor connection
closes). The new image, started with
`-incoming file:PATH`, loads the file at start; a VMM started with
`-incoming defer` loads one on `migrate-incoming` with a file: URI.

The "guest": while running, every 100 ms it increments a counter in guest
RAM (the memfd cprd holds, mapped shared) and appends
`STANDIN hb pid=P seq=S data=ok` to the console. Its "device state" is its
own copy of the last seq it wrote; a migration carries that copy to the
destination. Whenever a stand-in starts running the guest it checks that RAM
agrees with its device state; if not it prints `STANDIN STALE pid=P ram=X
state=Y`: a VMM resumed from stale state after another one ran the guest.

Environment:
  STANDIN_FAULT=STEP:ACTION[,STEP:ACTION...]   each fires once
  STANDIN_MARK=DIR   on reaching a step, create DIR/PID-STEP
Steps: at-start (before anything, even the monitor), on:COMMAND (that QMP
command arrived, before it is run), before-stop (source: precopy sent, guest
still running), after-stop (source: guest paused, device state not sent),
after-state-sent (source: all sent, before MIGRATION completed),
after-state-written (cpr-exec source: the state file written and synced,
before MIGRATION completed), before-exec (cpr-exec source: completed, the
exec next),
after-complete (source: in postmigrate), after-cpr-load (cpr-transfer
destination: fds received, before its monitor exists), after-load
(destination: state loaded, before MIGRATION completed/RESUME), after-cont
(cont arrived, before the guest runs), after-resume (the guest runs here).
Actions: die (SIGKILL self), exit (exit 1), stall (SIGSTOP self),
close-monitor (close the QMP connection, stay alive), refuse (error reply;
at a migration step the migration fails), hang (stop at the step until
SIGUSR2; on:COMMAND holds that command and every later one, as a busy QEMU
monitor would). What a VMM taken over by its guest could do: inflate-logs
(ftruncate() the console and the VMM log, both through the VMM's own fds,
to 1 GiB, then write FORGED_MARK to each), forge-shutdown (a SHUTDOWN
event whose reason is FORGED_TEXT), refuse-forged (on:COMMAND: an error
reply whose desc is FORGED_TEXT).
Marks only: monitor-closed (the connection was closed on SIGUSR1 or a fault),
monitor-close-pending (SIGUSR1 came before any connection: the next one is
closed at once).
Signals: SIGUSR1 closes the monitor connection (a monitor lost from outside),
SIGUSR2 releases every hang, SIGTERM ends the VMM as QEMU does (SHUTDOWN).
"""

import json
import mmap
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
import zlib

HB_PERIOD = 0.1
PRECOPY_BYTES = 256 * 1024  # the non-shared RAM (firmware, ROMs) a handover moves
DEVICE_PADDING = 16 * 1024  # the rest of the device state
MACHINE_INIT = 0.1  # cpr-transfer destination: from its monitor to its main channel
DATA_OFF, DATA_LEN = 4096, 64 * 1024  # a pattern in guest RAM, checked every beat
MAGIC = b"STANDIN1"
CAPS = ("xbzrle", "x-ignore-shared", "events", "return-path", "postcopy-ram",
        "switchover-ack", "multifd", "pause-before-switchover")

PID = os.getpid()

# A reason that ends cprd's log line and forges the next one (the line
# README tells operators to grep), with a terminal escape, a C1 CSI and
# bytes that are not UTF-8.
FORGED_TEXT = (b"guest-reset\nupdate vm=web1 strategy=handover result=ok phase=done "
               b"blackout_ms=1 total_ms=1 old_pid=1 new_pid=2\x1b[2J\xc2\x9b31m\xff\xfe")
FORGED_MARK = "STANDIN inflated"


def log(msg):
    sys.stderr.write(f"standin pid={PID}: {msg}\n")
    sys.stderr.flush()


class QmpError(Exception):
    pass


class MigrationFailed(Exception):
    pass


def json_bytes(b):
    """b inside a JSON string: control bytes as \\u escapes, the others raw."""
    return b"".join(b"\\u%04x" % c if c < 0x20 else bytes([c]) for c in b)


def opts(s):
    """'a,b=c,d=e' -> {'a': '', 'b': 'c', 'd': 'e'}"""
    out = {}
    for part in s.split(","):
        k, _, v = part.partition("=")
        out[k] = v
    return out


def size_bytes(s):
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * mult[s[-1]] if s[-1] in mult else int(s)


def send_record(sock, kind, payload):
    sock.sendall(kind + struct.pack(">I", len(payload)) + payload)


def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise MigrationFailed("channel closed mid-stream")
        buf += chunk
    return buf


def recv_record(sock):
    head = recv_exact(sock, 5)
    return head[:1], recv_exact(sock, struct.unpack(">I", head[1:])[0])


class Guest:
    def __init__(self, ram_path, size, console_path):
        fd = os.open(ram_path, os.O_RDWR)
        try:
            self.mem = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.con = os.open(console_path, os.O_WRONLY | os.O_APPEND)
        self.seq = 0  # device state: the last seq this VMM wrote
        self.running = False

    def say(self, line):
        os.write(self.con, (line + "\n").encode())

    def ram_seq(self):
        return struct.unpack_from("<Q", self.mem, 0)[0]

    def boot(self):
        """A fresh guest: a pattern in RAM whose checksum sits beside it."""
        seed = os.urandom(8)
        pattern = (seed * (DATA_LEN // 8 + 1))[:DATA_LEN]
        self.mem[DATA_OFF:DATA_OFF + DATA_LEN] = bytes(b ^ (i & 0xff) for i, b in
                                                       enumerate(pattern))
        self.mem[8:16] = MAGIC
        struct.pack_into("<I", self.mem, 16, zlib.crc32(self.mem[DATA_OFF:DATA_OFF + DATA_LEN]))
        struct.pack_into("<Q", self.mem, 0, 0)
        self.say(f"STANDIN boot pid={PID} id={seed.hex()}")

    def data_ok(self):
        return (self.mem[8:16] == MAGIC and struct.unpack_from("<I", self.mem, 16)[0] ==
                zlib.crc32(self.mem[DATA_OFF:DATA_OFF + DATA_LEN]))

    def start(self):
        ram = self.ram_seq()
        if ram != self.seq:
            self.say(f"STANDIN STALE pid={PID} ram={ram} state={self.seq}")
        self.running = True
        self.say(f"STANDIN run pid={PID} seq={self.seq}")

    def stop(self):
        self.running = False
        self.say(f"STANDIN stop pid={PID} seq={self.seq}")

    def beat(self):
        self.seq += 1
        struct.pack_into("<Q", self.mem, 0, self.seq)
        self.say(f"STANDIN hb pid={PID} seq={self.seq} data={'ok' if self.data_ok() else 'bad'}")


class StandIn:
    def __init__(self, argv):
        self.parse(argv)
        self.faults = {}
        for spec in filter(None, os.environ.get("STANDIN_FAULT", "").split(",")):
            step, _, action = spec.rpartition(":")
            self.faults[step] = action
        self.markdir = os.environ.get("STANDIN_MARK")
        # cprd's pre-flight or probe of the binary: not the VMM the faults
        # and marks are meant for.
        if any(a.endswith(",process=cprd-check") for a in argv):
            self.faults, self.markdir = {}, None
        self.lock = threading.RLock()  # guest, run state, monitor output
        self.released = threading.Event()  # SIGUSR2: every hang ends
        # Signal handlers and threads tell the main loop what to do by a
        # byte on this pipe: c(lose monitor), r(elease), t(erminate),
        # m(onitor may open).
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.lose_next_monitor = False
        self.conn = None
        self.negotiated = False
        self.inbuf = b""
        self.pending_fds = []
        self.held = None  # a command whose on: step hangs, and what follows it
        self.fds = {}  # getfd
        self.caps = {c: False for c in CAPS}
        self.caps["events"] = self.x_events
        self.params = {"mode": "normal"}
        self.exec_command = []
        self.mig_status = None
        self.transferred = 0
        self.source = None  # the outgoing migration, while it runs
        self.incoming_started = False
        self.autostart = not self.start_paused
        self.guest = None
        self.runstate = "inmigrate" if self.incoming else "prelaunch"

    def parse(self, argv):
        self.qmp_fd = self.ram_path = self.console_path = None
        self.ram_size = 0
        self.incoming = []
        self.start_paused = "-S" in argv
        self.x_events = "migration.x-events=on" in argv
        for i, a in enumerate(argv[:-1]):
            v = argv[i + 1]
            if a == "-chardev" and v.startswith("socket,") and opts(v).get("id") == "qmp":
                self.qmp_fd = int(opts(v)["fd"])
            elif a == "-chardev" and v.startswith("file,") and opts(v).get("id") == "con0":
                self.console_path = opts(v)["path"]
            elif a == "-object" and v.startswith("memory-backend-file,"):
                self.ram_path, self.ram_size = opts(v)["mem-path"], size_bytes(opts(v)["size"])
            elif a == "-incoming":
                self.incoming.append(v)
        if None in (self.qmp_fd, self.ram_path, self.console_path):
            sys.exit("standin: no monitor, RAM or console on the command line")
        self.defer = "defer" in self.incoming
        self.cpr_main = self.cpr_state = self.incoming_file = None
        for v in self.incoming:
            if v.startswith("file:"):
                self.incoming_file = v[5:]
            elif v.startswith("unix:"):
                self.cpr_main = v[5:]
            elif v.startswith("{"):
                self.cpr_state = json.loads(v)["addr"]["path"]

    # ---- faults ----

    def wake(self, what):
        try:
            os.write(self.wake_w, what)
        except BlockingIOError:
            pass

    def wait_release(self, cancelled=lambda: False):
        while not self.released.is_set() and not cancelled():
            time.sleep(0.02)

    def reach(self, step, block=True, cancelled=lambda: False):
        """Mark the step and run its fault. Returns the action the caller
        carries out itself: 'refuse', and 'hang' and 'close-monitor' when
        block is False (the main thread)."""
        if self.markdir:
            try:
                open(os.path.join(self.markdir, f"{PID}-{step}"), "x").close()
            except OSError:
                pass
        action = self.faults.pop(step, None)
        if not action:
            return None
        log(f"fault at {step}: {action}")
        if action == "die":
            os.kill(PID, signal.SIGKILL)
        elif action == "exit":
            os._exit(1)
        elif action == "stall":
            os.kill(PID, signal.SIGSTOP)
        elif action == "close-monitor" and block:
            self.wake(b"c")
        elif action == "hang" and block:
            self.wait_release(cancelled)
            log(f"released at {step}")
        elif action == "inflate-logs":
            for fd in (self.guest.con, 2):
                os.ftruncate(fd, 1 << 30)
                os.write(fd, f"{FORGED_MARK} pid={PID}\n".encode())
        elif action == "forge-shutdown":
            self.send_raw(b'{"event": "SHUTDOWN", "data": {"guest": true, "reason": "' +
                          json_bytes(FORGED_TEXT) + b'"}, "timestamp": {"seconds": 1, '
                          b'"microseconds": 0}}')
        elif action in ("refuse", "refuse-forged", "hang", "close-monitor"):
            return action
        else:
            log(f"unknown fault action '{action}' ignored")
        return None

    # ---- monitor ----

    def send(self, obj):
        with self.lock:
            if self.conn:
                try:
                    self.conn.sendall(json.dumps(obj).encode() + b"\r\n")
                except OSError:
                    pass

    def send_raw(self, line):
        """A line of bytes as it is: JSON cannot carry bytes that are not UTF-8."""
        with self.lock:
            if self.conn:
                self.conn.sendall(line + b"\r\n")

    def event(self, name, data=None):
        if not self.negotiated:
            return  # QEMU sends no event before capabilities are negotiated
        now = time.time()
        ev = {"event": name, "timestamp": {"seconds": int(now),
                                           "microseconds": int(now % 1 * 1e6)}}
        if data is not None:
            ev["data"] = data
        self.send(ev)

    def mig_event(self, status):
        with self.lock:
            self.mig_status = status
            if self.caps["events"]:
                self.event("MIGRATION", {"status": status})

    def accept(self):
        conn, _ = self.listener.accept()
        if self.lose_next_monitor:  # asked to lose it before it came
            self.lose_next_monitor = False
            log("closing the monitor connection at once")
            conn.close()
            self.reach("monitor-closed")
            return
        with self.lock:
            self.conn, self.negotiated, self.inbuf = conn, False, b""
        self.send({"QMP": {"version": {"qemu": {"major": 99, "minor": 0, "micro": 0},
                                       "package": "standin"}, "capabilities": []}})

    def close_monitor(self):
        """The client is gone; like QEMU, keep running and accept the next."""
        with self.lock:
            if self.conn:
                self.conn.close()
            self.conn, self.negotiated, self.inbuf = None, False, b""
            for fd in self.pending_fds:
                os.close(fd)
            self.pending_fds = []

    def read_monitor(self):
        try:
            data, fds, _, _ = socket.recv_fds(self.conn, 65536, 16)
        except OSError:
            data, fds = b"", []
        self.pending_fds += fds
        if not data:
            self.close_monitor()
            return
        self.inbuf += data
        self.run_commands()

    def run_commands(self):
        while self.conn and not self.held and b"\n" in self.inbuf:
            line, self.inbuf = self.inbuf.split(b"\n", 1)
            if line.strip():
                self.command(json.loads(line))

    def command(self, msg, stepped=False):
        name, id = msg.get("execute"), msg.get("id")
        if not stepped:
            action = self.reach(f"on:{name}", block=False)
            if action == "hang":
                self.held = lambda: self.command(msg, stepped=True)
                return
            if action == "refuse":
                self.send({"error": {"class": "GenericError", "desc": f"{name} refused by "
                                     "STANDIN_FAULT"}, "id": id})
                return
            if action == "refuse-forged":
                self.send_raw(b'{"error": {"class": "GenericError", "desc": "' +
                              json_bytes(FORGED_TEXT) + b'"}, "id": ' +
                              json.dumps(id).encode() + b'}')
                return
            if action == "close-monitor":
                self.close_monitor()  # lost before it could answer
                return
        fn = getattr(self, "qmp_" + str(name).replace("-", "_"), None)
        if fn is None:
            self.send({"error": {"class": "CommandNotFound",
                                 "desc": f"The command {name} has not been found"}, "id": id})
            return
        try:
            ret = fn(msg.get("arguments", {}), id)
        except QmpError as e:
            self.send({"error": {"class": "GenericError", "desc": str(e)}, "id": id})
            return
        if ret is not None:
            self.send({"return": ret, "id": id})

    # ---- QMP commands: return the reply, or None when it is sent later ----

    def qmp_qmp_capabilities(self, a, id):
        self.negotiated = True
        return {}

    def qmp_query_status(self, a, id):
        return {"status": self.runstate, "running": self.runstate == "running"}

    def qmp_stop(self, a, id):
        with self.lock:
            if self.runstate == "running":
                self.guest.stop()
                self.runstate = "paused"
                self.event("STOP")
        return {}

    def qmp_cont(self, a, id):
        with self.lock:
            if self.runstate == "inmigrate":
                self.autostart = True  # QEMU: run once the state is in
                return {}
            if self.runstate == "finish-migrate":
                raise QmpError("Migration is not finalized yet")  # cprd retries
            if self.runstate == "running":
                return {}
        action = self.reach("after-cont", block=False)
        if action == "refuse":
            raise QmpError("cont refused by STANDIN_FAULT")
        if action == "hang":
            self.held = lambda: self.finish_cont(id)
            return None
        if action == "close-monitor":
            self.close_monitor()
            return None
        return self.finish_cont(id)

    def finish_cont(self, id):
        self.run_guest()
        self.send({"return": {}, "id": id})
        self.reach("after-resume")

    def run_guest(self):
        with self.lock:
            self.guest.start()
            self.runstate = "running"
            self.event("RESUME")

    def qmp_query_migrate_capabilities(self, a, id):
        return [{"capability": c, "state": s} for c, s in self.caps.items()]

    def qmp_migrate_set_capabilities(self, a, id):
        if self.source:
            raise QmpError("There's a migration process in progress")
        for c in a.get("capabilities", []):
            if c["capability"] not in self.caps:
                raise QmpError(f"Capability '{c['capability']}' not found")
            self.caps[c["capability"]] = bool(c["state"])
        return {}

    def qmp_migrate_set_parameters(self, a, id):
        if self.source:
            raise QmpError("There's a migration process in progress")
        self.params.update(a)
        return {}

    def qmp_getfd(self, a, id):
        if not self.pending_fds:
            raise QmpError("No file descriptor supplied via SCM_RIGHTS")
        name = a["fdname"]
        if name in self.fds:
            os.close(self.fds[name])
        self.fds[name] = self.pending_fds.pop(0)
        return {}

    def qmp_closefd(self, a, id):
        fd = self.fds.pop(a["fdname"], None)
        if fd is None:
            raise QmpError(f"File descriptor named '{a['fdname']}' not found")
        os.close(fd)
        return {}

    def qmp_qom_list_types(self, a, id):
        return []

    def take_fd(self, uri):
        """fd:NAME, consumed as QEMU's monitor_get_fd() does."""
        if not uri.startswith("fd:") or uri[3:] not in self.fds:
            raise QmpError(f"unsupported or unknown migration URI '{uri}'")
        return socket.socket(fileno=self.fds.pop(uri[3:]))

    def qmp_migrate_incoming(self, a, id):
        if not self.defer:
            raise QmpError("'-incoming' was not specified on the command line")
        if self.incoming_started:
            raise QmpError("The incoming migration has already been started")
        uri = a.get("uri", "")
        if uri.startswith("file:"):
            self.incoming_started = True
            threading.Thread(target=self.file_incoming_thread, args=(uri[5:],),
                             daemon=True).start()
            return {}
        sock = self.take_fd(uri)
        self.incoming_started = True
        threading.Thread(target=self.incoming_thread, args=(sock,), daemon=True).start()
        return {}

    def qmp_migrate(self, a, id):
        if self.source or self.runstate not in ("running", "paused"):
            raise QmpError("There's a migration process in progress" if self.source else
                           f"cannot migrate in state {self.runstate}")
        if "channels" in a:
            paths = {c["channel-type"]: c["addr"]["path"] for c in a["channels"]}
            if "cpr" in paths and self.params.get("mode") != "cpr-transfer":
                raise QmpError("a cpr channel needs migration mode cpr-transfer")
            if "cpr" not in paths and self.params.get("mode") == "cpr-transfer":
                raise QmpError("cpr-transfer mode requires setting the cpr channel")
            target = ("cpr", paths.get("main"), paths.get("cpr"))
        elif self.params.get("mode") == "cpr-exec":
            uri = a.get("uri", "")
            if not uri.startswith("file:"):
                raise QmpError("cpr-exec mode needs a file: URI")
            if not self.params.get("cpr-exec-command"):
                raise QmpError("cpr-exec mode requires setting cpr-exec-command")
            target = ("file", uri[5:], None)
            # Fixed now: what is set once the migration runs is not used.
            self.exec_command = [str(c) for c in self.params["cpr-exec-command"]]
        else:
            if self.params.get("mode") != "normal":
                raise QmpError("cpr-transfer mode requires setting the cpr channel")
            target = ("fd", self.take_fd(a.get("uri", "")), None)
        self.source = Source(self, *target)
        self.transferred = 0
        threading.Thread(target=self.source.run, daemon=True).start()
        return {}

    def qmp_migrate_cancel(self, a, id):
        if self.source:
            self.source.cancel()
        return {}

    def qmp_query_migrate(self, a, id):
        if not self.mig_status:
            return {}
        return {"status": self.mig_status, "ram": {"transferred": self.transferred}}

    def qmp_quit(self, a, id):
        self.send({"return": {}, "id": id})
        self.event("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
        os._exit(0)

    # ---- incoming migration ----

    def file_incoming_thread(self, path):
        """Load the device state a cpr-exec source wrote to path (-incoming
        file:PATH at start, or migrate-incoming with a file: URI)."""
        try:
            self.mig_event("active")
            with open(path, "rb") as f:
                data = f.read()
            self.transferred = len(data)
            dev = json.loads(data[:data.index(b"\0")])
            with self.lock:
                self.guest.seq = dev["seq"]
                self.guest.say(f"STANDIN load pid={PID} seq={dev['seq']} from={dev['pid']} "
                               f"file")
            if self.reach("after-load") == "refuse":
                raise MigrationFailed("load refused by STANDIN_FAULT")
        except (OSError, MigrationFailed, ValueError, KeyError) as e:
            log(f"load of migration failed: {e}")
            os._exit(1)
        self.loaded()

    def loaded(self):
        with self.lock:
            running = self.autostart
            if running:
                self.run_guest()
            else:
                self.runstate = "paused"
            self.mig_event("completed")
        if running:
            self.reach("after-resume")

    def cpr_exec(self):
        """The source's last act: the new binary in this very process. The
        fds cprd passed (RAM, console, the monitor's listening socket, ...)
        stay; everything this image opened itself is close-on-exec, the
        monitor connection too."""
        cmd = self.exec_command
        log(f"cpr-exec: exec {cmd[0] if cmd else '?'}")
        with self.lock:
            self.conn = None  # closed by the exec, not before
        try:
            os.execv(cmd[0], cmd)
        except (OSError, IndexError) as e:
            # QEMU: the exec failed, and it cannot go on in either image.
            log(f"cpr-exec failed: {e}")
            os._exit(1)

    def incoming_thread(self, sock):
        try:
            self.mig_event("active")
            dev = None
            while True:
                kind, payload = recv_record(sock)
                self.transferred += len(payload)
                if kind == b"D":
                    dev = json.loads(payload[:payload.index(b"\0")])
                elif kind == b"E":
                    break
            if dev is None:
                raise MigrationFailed("no device state in the stream")
            with self.lock:
                self.guest.seq = dev["seq"]
                self.guest.say(f"STANDIN load pid={PID} seq={dev['seq']} from={dev['pid']}")
            if self.reach("after-load") == "refuse":
                raise MigrationFailed("load refused by STANDIN_FAULT")
        except (OSError, MigrationFailed, ValueError) as e:
            # QEMU: "load of migration failed", and the destination exits.
            log(f"load of migration failed: {e}")
            os._exit(1)
        sock.close()
        self.loaded()

    def cpr_incoming_thread(self):
        """cpr-transfer destination: the cpr state (the RAM fd) comes before
        the monitor exists; then the main channel carries device state."""
        try:
            cl = self.listen(self.cpr_state)
            conn, _ = cl.accept()
            cl.close()
            msg, fds, _, _ = socket.recv_fds(conn, 4096, 4)
            if not msg.startswith(b"CPR1") or len(fds) != 1:
                raise MigrationFailed(f"bad cpr state ({len(fds)} fds)")
            got, mine = os.fstat(fds[0]), os.stat(self.ram_path)
            os.close(fds[0])
            if (got.st_dev, got.st_ino) != (mine.st_dev, mine.st_ino):
                raise MigrationFailed("the cpr channel passed another RAM than mine")
            if self.reach("after-cpr-load") == "refuse":
                raise MigrationFailed("cpr load refused by STANDIN_FAULT")
            # As QEMU: the monitor now exists; the machine is built; then
            # the main channel listens and the cpr channel is closed, which
            # tells the source to connect.
            self.wake(b"m")
            time.sleep(MACHINE_INIT)
            ml = self.listen(self.cpr_main)
            conn.close()
        except (OSError, MigrationFailed) as e:
            log(f"cpr load failed: {e}")
            os._exit(1)
        main, _ = ml.accept()
        ml.close()
        self.incoming_thread(main)

    @staticmethod
    def listen(path):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        s.bind(path)
        s.listen(1)
        return s

    # ---- main loop ----

    def on_signal(self, sig, frame):
        if sig == signal.SIGUSR2:
            self.released.set()
        if sig == signal.SIGUSR1 and not self.conn:
            # No monitor yet (a hang at-start, a cpr-transfer destination
            # before its state): the first one is closed as it comes.
            self.lose_next_monitor = True
            self.reach("monitor-close-pending")
            return
        self.wake({signal.SIGUSR1: b"c", signal.SIGUSR2: b"r", signal.SIGTERM: b"t"}[sig])

    def run(self):
        for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
            signal.signal(s, self.on_signal)
        self.reach("at-start")
        self.listener = socket.socket(fileno=self.qmp_fd)
        self.guest = Guest(self.ram_path, self.ram_size, self.console_path)
        log(f"started{' (incoming)' if self.incoming else ''}"
            f"{' paused (-S)' if self.start_paused else ''}")
        monitor_open = True
        if self.cpr_state:
            monitor_open = False
            threading.Thread(target=self.cpr_incoming_thread, daemon=True).start()
        elif self.incoming_file:
            self.incoming_started = True
            threading.Thread(target=self.file_incoming_thread, args=(self.incoming_file,),
                             daemon=True).start()
        elif not self.incoming:
            self.guest.boot()
            if self.autostart:
                self.run_guest()
            else:
                self.runstate = "prelaunch"
        next_hb = time.monotonic() + HB_PERIOD
        while True:
            rl = [self.wake_r]
            if monitor_open and not self.conn:
                rl.append(self.listener)
            if self.conn and not self.held:
                rl.append(self.conn)
            r, _, _ = select.select(rl, [], [], max(0.0, next_hb - time.monotonic()))
            flags = os.read(self.wake_r, 4096) if self.wake_r in r else b""
            if b"t" in flags:
                self.event("SHUTDOWN", {"guest": False, "reason": "host-signal"})
                log("SIGTERM: exiting")
                os._exit(0)
            if b"m" in flags:
                monitor_open = True
            if b"c" in flags:
                if self.conn:
                    log("closing the monitor connection")
                    self.close_monitor()
                    self.reach("monitor-closed")
                else:
                    self.lose_next_monitor = True
                    self.reach("monitor-close-pending")
            if self.held and self.released.is_set():
                held, self.held = self.held, None
                log("released a held command")
                held()
                self.run_commands()
            if self.listener in r and not self.conn:
                self.accept()
            elif self.conn and self.conn in r:
                self.read_monitor()
            if time.monotonic() >= next_hb:
                next_hb = max(next_hb + HB_PERIOD, time.monotonic())
                with self.lock:
                    if self.guest.running:
                        self.guest.beat()


class Source:
    """The outgoing migration, in its own thread like QEMU's."""

    def __init__(self, vmm, kind, main, cpr):
        self.v, self.kind, self.cancelled = vmm, kind, False
        self.sock = main if kind == "fd" else None
        self.main_path, self.cpr_path = main, cpr
        self.file_path = main if kind == "file" else None
        self.cpr_sock = None

    def cancel(self):
        self.cancelled = True
        for s in (self.sock, self.cpr_sock):
            if s:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def step(self, name):
        if self.v.reach(name, cancelled=lambda: self.cancelled) == "refuse":
            raise MigrationFailed(f"{name} refused by STANDIN_FAULT")
        if self.cancelled:
            raise MigrationFailed("cancelled")

    def send(self, kind, payload):
        send_record(self.sock, kind, payload)
        self.v.transferred += len(payload)

    def connect(self, path):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        return s

    def run(self):
        v = self.v
        was_running = v.runstate == "running"
        try:
            v.mig_event("setup")
            if self.kind == "cpr":
                # The RAM fd over the cpr channel, then wait until the
                # destination hangs up: it has read the state.
                self.cpr_sock = self.connect(self.cpr_path)
                fd = os.open(v.ram_path, os.O_RDWR)
                try:
                    socket.send_fds(self.cpr_sock, [b"CPR1"], [fd])
                finally:
                    os.close(fd)
                while self.cpr_sock.recv(4096):
                    pass
                if self.cancelled:
                    raise MigrationFailed("cancelled")
                self.cpr_sock.close()
                self.sock = self.connect(self.main_path)
            v.mig_event("active")
            if self.kind == "fd":
                # Precopy of the small non-shared RAM while the guest runs;
                # cprd keeps this channel narrow, so it paces us.
                chunk = b"\xa5" * 4096
                for _ in range(PRECOPY_BYTES // len(chunk)):
                    self.send(b"R", chunk)
            self.step("before-stop")
            with v.lock:
                if v.runstate == "running":
                    v.guest.stop()
                    v.event("STOP")
                v.runstate = "finish-migrate"
                seq = v.guest.seq
            self.step("after-stop")
            v.mig_event("device")
            state = json.dumps({"seq": seq, "pid": PID}).encode() + b"\0"
            if self.kind == "file":
                fd = os.open(self.file_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    os.write(fd, state + b"\x5a" * DEVICE_PADDING)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                v.transferred += len(state) + DEVICE_PADDING
                self.step("after-state-written")
            else:
                self.send(b"D", state + b"\x5a" * DEVICE_PADDING)
                self.send(b"E", b"")
                self.step("after-state-sent")
                self.sock.close()
        except (OSError, MigrationFailed) as e:
            log(f"outgoing migration {'cancelled' if self.cancelled else 'failed'}: {e}")
            with v.lock:
                v.source = None
                v.mig_event("cancelled" if self.cancelled else "failed")
                if v.runstate == "finish-migrate":
                    # QEMU restarts a guest that ran before the migration.
                    if was_running:
                        v.run_guest()
                    else:
                        v.runstate = "paused"
            return
        with v.lock:
            v.runstate = "postmigrate"
            v.source = None
            v.mig_event("completed")
        log("outgoing migration completed")
        if self.kind == "file":
            # cpr-exec: no postmigrate; the exec comes at once.
            v.reach("before-exec")
            v.cpr_exec()
        v.reach("after-complete")


if __name__ == "__main__":
    StandIn(sys.argv).run()
