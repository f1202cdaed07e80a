"""The service manager's side of sd_notify and the fd store, as systemd
documents it (sd_notify(3), sd_listen_fds(3), systemd.service(5)):

- NOTIFY_SOCKET is an AF_UNIX datagram socket; the service sends
  newline-separated KEY=VALUE assignments, fds riding along as SCM_RIGHTS.
- FDSTORE=1 with FDNAME=... keeps the attached fds (several may share a name);
  FDSTOREREMOVE=1 with FDNAME=... drops every fd of that name.
- On the next start the stored fds are passed from fd 3 on, with
  LISTEN_FDS=<count>, LISTEN_FDNAMES=<names joined by ':'> and
  LISTEN_PID=<the service's pid>.
"""

import os
import signal
import socket
import subprocess
import threading

HIGH_FD = 200  # where fds wait before the shell moves them to 3, 4, ...


class ServiceManager:
    def __init__(self, dir, argv):
        self.dir = dir
        self.argv = argv
        self.path = os.path.join(dir, "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.store = []          # [(name, fd)], in the order received
        self.messages = []       # every assignment received, in order
        self.cond = threading.Condition()
        self.proc = None
        self.starts = 0
        self._stop = False
        self.thread = threading.Thread(target=self._receive, daemon=True)
        self.thread.start()

    # -- receiving ----------------------------------------------------------

    def _receive(self):
        while not self._stop:
            try:
                msg, fds, _, _ = socket.recv_fds(self.sock, 65536, 253)
            except OSError:
                return
            fields = dict(l.split("=", 1) for l in msg.decode().split("\n") if "=" in l)
            with self.cond:
                self.messages.append(fields)
                if fields.get("FDSTORE") == "1":
                    name = fields.get("FDNAME", "stored")
                    self.store.extend((name, fd) for fd in fds)
                else:
                    for fd in fds:
                        os.close(fd)
                if fields.get("FDSTOREREMOVE") == "1":
                    name = fields.get("FDNAME")
                    for n, fd in [x for x in self.store if x[0] == name]:
                        os.close(fd)
                    self.store = [x for x in self.store if x[0] != name]
                self.cond.notify_all()

    def wait_for(self, pred, timeout=30):
        with self.cond:
            if not self.cond.wait_for(lambda: pred(self), timeout):
                raise AssertionError("service manager: timed out waiting")

    def names(self):
        with self.cond:
            return sorted(n for n, _ in self.store)

    def stored_fd(self, name):
        with self.cond:
            return next(fd for n, fd in self.store if n == name)

    # -- running the service -----------------------------------------------

    def start(self, env=None):
        """Start the service with the stored fds, and wait for READY=1."""
        with self.cond:
            store = list(self.store)
            ready_before = sum(1 for m in self.messages if m.get("READY") == "1")
        high = []
        for i, (_, fd) in enumerate(store):
            os.dup2(fd, HIGH_FD + i, inheritable=True)
            high.append(HIGH_FD + i)
        moves = " ".join(f"{3 + i}<&{h} {h}<&-" for i, h in enumerate(high))
        e = dict(os.environ if env is None else env, NOTIFY_SOCKET=self.path)
        e.pop("LISTEN_FDS", None)
        if store:
            e["LISTEN_FDS"] = str(len(store))
            e["LISTEN_FDNAMES"] = ":".join(n for n, _ in store)
        # bash (dash takes only one-digit fds in redirections) puts the fds in place, sets LISTEN_PID to its own pid and
        # execs the service, which keeps that pid.
        script = (f"exec {moves}\n" if moves else "") + \
            ('LISTEN_PID=$$ exec "$0" "$@"' if store else 'exec "$0" "$@"')
        log = open(os.path.join(self.dir, "service.log"), "ab")
        self.proc = subprocess.Popen(["/bin/bash", "-c", script] + self.argv, env=e,
                                     pass_fds=high, stdout=log, stderr=log)
        log.close()
        for h in high:
            os.close(h)
        self.starts += 1
        self.wait_for(lambda s: sum(1 for m in s.messages if m.get("READY") == "1") > ready_before
                      or s.proc.poll() is not None)
        if self.proc.poll() is not None:
            raise AssertionError(f"service exited at start with {self.proc.returncode}")
        return self.proc.pid

    def stop(self, sig=signal.SIGTERM):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(20)

    def restart(self):
        self.stop()
        return self.start()

    def close(self):
        self.stop()
        self._stop = True
        self.sock.close()
        with self.cond:
            for _, fd in self.store:
                os.close(fd)
            self.store = []
