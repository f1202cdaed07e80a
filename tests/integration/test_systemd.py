"""Under systemd: readiness and status over NOTIFY_SOCKET, and socket
activation with LISTEN_FDS, played exactly as the service manager does."""

import os
import shutil
import socket
import subprocess
import tempfile
import unittest

from cprdtest import CPRD, Conn, require_root, wait_until


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
        p = subprocess.Popen([CPRD, "--state-dir", os.path.join(self.dir, "state")], env=env,
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

    def test_socket_activation(self):
        if not shutil.which("systemd-socket-activate"):
            self.skipTest("systemd-socket-activate not installed (package systemd)")
        sock = os.path.join(self.dir, "act.sock")
        p = subprocess.Popen(["systemd-socket-activate", "-l", sock, CPRD, "--foreground",
                              "--state-dir", os.path.join(self.dir, "state")],
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
