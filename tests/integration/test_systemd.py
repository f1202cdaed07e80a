"""Under systemd: readiness and status over NOTIFY_SOCKET, and socket
activation with LISTEN_FDS, played exactly as the service manager does."""

import os
import shutil
import socket
import subprocess
import tempfile
import unittest

from cprdtest import CPRD, guest_accel, Conn, fill, mount_tmpfs, require_root, wait_until


class Notify(unittest.TestCase):
    def setUp(self):
        require_root(self)
        self.dir = tempfile.mkdtemp(prefix="cprd-test-")

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def test_ready_and_status_are_sent(self):
        path = os.path.join(self.dir, "notify")
        ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        ns.bind(path)
        ns.settimeout(10)
        env = dict(os.environ, NOTIFY_SOCKET=path)
        # No --foreground: under a service manager cprd must not detach.
        p = subprocess.Popen([CPRD, "--state-dir", os.path.join(self.dir, "state"), "--accel", guest_accel(), "--log-dir", ""], env=env,
                             stderr=subprocess.PIPE, text=True)
        try:
            msgs = []
            while not any("READY=1" in m for m in msgs):
                msgs.append(ns.recv(4096).decode())
            while not any(m.startswith("STATUS=") for m in msgs):
                msgs.append(ns.recv(4096).decode())
            self.assertIsNone(p.poll(), "cprd detached or died under NOTIFY_SOCKET")
            status = next(m for m in msgs if m.startswith("STATUS="))
            self.assertIn("Holding 0 VM(s)", status)
            p.terminate()
            p.wait(10)
            msgs.append(ns.recv(4096).decode())
            self.assertTrue(any("STOPPING=1" in m for m in msgs), msgs)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            ns.close()

    def test_status_says_degraded_while_the_registry_cannot_be_written(self):
        state = os.path.join(self.dir, "state")
        os.mkdir(state)
        mount_tmpfs(state, "1m")
        try:
            filler = os.path.join(state, "filler")
            fill(filler)
            path = os.path.join(self.dir, "notify")
            ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            ns.bind(path)
            ns.settimeout(10)
            env = dict(os.environ, NOTIFY_SOCKET=path)
            with open(os.path.join(self.dir, "cprd.log"), "wb") as log:
                p = subprocess.Popen([CPRD, "--state-dir", state, "--accel", guest_accel(), "--log-dir", ""], env=env, stdout=log,
                                     stderr=log)
            try:
                def next_status():
                    while True:
                        m = ns.recv(4096).decode()
                        if m.startswith("STATUS="):
                            return m
                status = next_status()
                self.assertIn("Degraded", status)
                self.assertIn("registry not written", status)
                self.assertIn("No space left on device", status)
                c = Conn(os.path.join(state, "cprd.sock"))
                self.assertFalse(c.call("daemon.status")["registry"]["ok"])
                c.close()
                # Room again: cprd retries on its own and says so.
                os.unlink(filler)
                status = next_status()
                self.assertNotIn("Degraded", status)
                self.assertIn("Holding 0 VM(s)", status)
                c = Conn(os.path.join(state, "cprd.sock"))
                self.assertTrue(c.call("daemon.status")["registry"]["ok"])
                c.close()
                self.assertTrue(os.path.exists(os.path.join(state, "registry.json")))
            finally:
                p.terminate()
                p.wait(10)
                ns.close()
        finally:
            subprocess.run(["umount", "-l", state])

    def test_socket_activation(self):
        if not shutil.which("systemd-socket-activate"):
            self.skipTest("systemd-socket-activate not installed (package systemd)")
        sock = os.path.join(self.dir, "act.sock")
        p = subprocess.Popen(["systemd-socket-activate", "-l", sock, CPRD, "--foreground",
                              "--state-dir", os.path.join(self.dir, "state"), "--accel",
                              guest_accel()],
                             stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: os.path.exists(sock), 10, "the activation socket")
            c = Conn(sock)
            st = c.call("daemon.status")
            c.close()
            self.assertTrue(st["socket_activated"])
            # cprd did not create a socket of its own.
            self.assertFalse(os.path.exists(os.path.join(self.dir, "state", "cprd.sock")))
        finally:
            p.terminate()
            p.wait(10)


if __name__ == "__main__":
    unittest.main()
