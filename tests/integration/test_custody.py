"""fd.store / fd.claim / fd.list / fd.release with real fds, and who may call
what: trust comes from SO_PEERCRED, checked per method."""

import grp
import json
import os
import socket
import unittest

from cprdtest import Conn, Daemon, RpcError, SharedDaemonTest, cprd_group


NOT_FOUND, EXISTS, PERM, BAD_FDS, BAD_PARAMS, BAD_STATE = -32000, -32001, -32002, -32006, -32602, -32004


class Custody(SharedDaemonTest):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.vm = cls.d.create_guest("cust")
        cls.base_fds = cls.d.settled_fds()

    def tearDown(self):
        for f in self.d.call("fd.list", {"vm": "cust"})["fds"]:
            if f["name"] not in ("ram0", "console", "net0"):
                self.d.call("fd.release", {"vm": "cust", "name": f["name"]})
        self.d.wait_fds(self.base_fds)

    def test_store_then_claim_returns_the_same_pipe(self):
        r, w = os.pipe()
        res = self.d.call("fd.store", {"vm": "cust", "names": ["chan0"]}, fds=[w])
        os.close(w)  # cprd holds the only write end now
        self.assertIn({"name": "chan0", "kind": "pipe"},
                      [{k: f[k] for k in ("name", "kind")} for f in res["fds"]])
        self.d.wait_fds(self.base_fds + 1)

        c = self.d.conn()
        c.call("fd.claim", {"vm": "cust", "names": ["chan0"]})
        (w2,) = c.take_fds()
        c.close()
        os.write(w2, b"through custody")
        os.close(w2)
        self.assertEqual(os.read(r, 100), b"through custody")

        # Release closes cprd's copy: the read end finally sees EOF.
        self.d.call("fd.release", {"vm": "cust", "name": "chan0"})
        self.assertEqual(os.read(r, 1), b"")
        os.close(r)

    def test_store_several_with_kinds_all_or_nothing(self):
        a, b = socket.socketpair()
        r, w = os.pipe()
        try:
            # Second fd is a pipe claimed to be a socket: nothing is stored.
            with self.assertRaises(RpcError) as cm:
                self.d.call("fd.store", {"vm": "cust", "names": ["s0", "p0"],
                                         "kinds": ["socket", "socket"]}, fds=[a.fileno(), w])
            self.assertEqual(cm.exception.code, BAD_FDS)
            self.assertIn("not of the kind claimed", cm.exception.message)
            names = [f["name"] for f in self.d.call("fd.list", {"vm": "cust"})["fds"]]
            self.assertNotIn("s0", names)
            self.d.wait_fds(self.base_fds)

            res = self.d.call("fd.store", {"vm": "cust", "names": ["s0", "p0"],
                                           "kinds": ["socket", "pipe"]}, fds=[a.fileno(), w])
            kinds = {f["name"]: f["kind"] for f in res["fds"]}
            self.assertEqual((kinds["s0"], kinds["p0"]), ("socket", "pipe"))
        finally:
            a.close(), b.close(), os.close(r), os.close(w)

    def test_store_errors(self):
        r, w = os.pipe()
        try:
            cases = [
                ({"vm": "cust", "names": ["x", "y"]}, [w], BAD_FDS, "one fd per name"),
                ({"vm": "cust", "names": ["x"]}, [], BAD_FDS, "one fd per name"),
                ({"vm": "cust", "names": ["ram0"]}, [w], BAD_PARAMS, "reserved"),
                ({"vm": "cust", "names": ["../x"]}, [w], BAD_PARAMS, "invalid"),
                ({"vm": "nope", "names": ["x"]}, [w], NOT_FOUND, "no VM named 'nope'"),
                ({"vm": "cust", "names": ["x"], "kinds": ["floppy"]}, [w], BAD_PARAMS,
                 "unknown fd kind"),
            ]
            for params, fds, code, frag in cases:
                with self.subTest(params=params):
                    with self.assertRaises(RpcError) as cm:
                        self.d.call("fd.store", params, fds=fds)
                    self.assertEqual(cm.exception.code, code, cm.exception.message)
                    self.assertIn(frag, cm.exception.message)
                    self.d.wait_fds(self.base_fds)
            self.d.call("fd.store", {"vm": "cust", "names": ["x"]}, fds=[w])
            with self.assertRaises(RpcError) as cm:
                self.d.call("fd.store", {"vm": "cust", "names": ["x"]}, fds=[w])
            self.assertEqual(cm.exception.code, EXISTS)
        finally:
            os.close(r), os.close(w)

    def test_claim_and_release_errors(self):
        with self.assertRaises(RpcError) as cm:
            self.d.call("fd.claim", {"vm": "cust", "names": ["nothing"]})
        self.assertEqual(cm.exception.code, NOT_FOUND)
        with self.assertRaises(RpcError) as cm:
            self.d.call("fd.release", {"vm": "cust", "name": "ram0"})
        self.assertEqual(cm.exception.code, BAD_STATE)
        self.assertIn("released by vm.destroy", cm.exception.message)

    def test_memory_region_is_sealed(self):
        c = self.d.conn()
        c.call("fd.claim", {"vm": "cust", "names": ["ram0"]})
        (fd,) = c.take_fds()
        c.close()
        try:
            size = os.fstat(fd).st_size
            with self.assertRaises(PermissionError):
                os.ftruncate(fd, size // 2)  # shrinking under a guest is refused
            with self.assertRaises(PermissionError):
                os.ftruncate(fd, size * 2)
        finally:
            os.close(fd)


def as_user(uid, gid, groups, fn):
    """Run fn() in a child that has dropped to uid/gid; return what it prints."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            out = fn()
        except Exception as e:  # noqa: BLE001 - report anything to the parent
            out = {"exception": repr(e)}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data)


class Permissions(SharedDaemonTest):
    """Unprivileged peers may look but not touch. The socket file is opened up
    to everyone here so that SO_PEERCRED, not the file mode, is what is tested."""

    needs_guest = False

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        os.chmod(cls.d.dir, 0o755)
        os.chmod(cls.d.sock, 0o666)

    def calls(self):
        out = {}
        c = Conn(self.d.sock)
        for method, params in (("vm.list", None), ("daemon.status", None),
                               ("vm.create", {"name": "x", "memory": "64M", "kernel": "/x"}),
                               ("vm.destroy", {"name": "x"}),
                               ("fd.claim", {"vm": "x", "names": ["ram0"]})):
            reply = c.call_full(method, params)
            out[method] = reply.get("error", {}).get("code", 0), reply.get("error", {}).get("message", "")
        c.close()
        return out

    def test_nobody_may_read_but_not_change(self):
        out = as_user(65534, 65534, [], self.calls)
        self.assertNotIn("exception", out, out)
        self.assertEqual(out["vm.list"][0], 0)
        self.assertEqual(out["daemon.status"][0], 0)
        for m in ("vm.create", "vm.destroy"):
            self.assertEqual(out[m][0], PERM, out[m])
            self.assertIn("needs root or group 'cprd' (peer uid 65534)", out[m][1])
        # fd.claim is refused for anyone but root, cprd and the VM's own VMM
        # (here the VM does not even exist, which must not leak first).
        self.assertIn(out["fd.claim"][0], (PERM, NOT_FOUND))

    def test_member_of_group_cprd_may_change(self):
        gid = cprd_group()
        # The daemon reads the group at start: use a fresh one.
        d = Daemon().start()
        try:
            os.chmod(d.dir, 0o755)
            os.chmod(d.sock, 0o666)
            self.assertEqual(grp.getgrgid(os.stat(d.sock).st_gid).gr_name, "cprd")
            saved, self.d = self.d, d
            try:
                out = as_user(65534, 65534, [gid], self.calls)  # supplementary group
            finally:
                self.d = saved
            self.assertNotIn("exception", out, out)
            # Allowed through: the errors are about the request, not the peer.
            self.assertEqual(out["vm.create"][0], BAD_PARAMS, out["vm.create"])
            self.assertEqual(out["vm.destroy"][0], NOT_FOUND)
        finally:
            d.stop()


if __name__ == "__main__":
    unittest.main()
