"""JSON-RPC 2.0 conformance and hostile input over the raw socket. Every bad
request gets its specific error, the daemon keeps serving everyone else and
leaks no fd and no process."""

import json
import os
import socket
import time
import unittest

from cprdtest import KERNEL, RpcError, SharedDaemonTest, children, fd_count, wait_until

PARSE, INVALID, NO_METHOD, BAD_PARAMS = -32700, -32600, -32601, -32602
NOT_FOUND, EXISTS, PERM, VMM, BAD_FDS, TOO_LARGE = -32000, -32001, -32002, -32005, -32006, -32007


class Rpc(SharedDaemonTest):
    needs_guest = False

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        # Measured once, before any client: every test must end back here.
        cls.base_fds = cls.d.settled_fds()
        cls.base_kids = set(children(cls.d.pid))

    def tearDown(self):
        # Nothing leaks: same fds, same children (the launcher), no zombies.
        self.assertEqual(self.d.call("daemon.status")["version"], "0.1.0")
        wait_until(lambda: fd_count(self.d.pid) == self.base_fds, 5,
                   f"cprd's fd count to return to {self.base_fds}")
        self.assertEqual(set(children(self.d.pid)), self.base_kids)

    def raw(self, text, fds=()):
        c = self.d.conn()
        try:
            c.send_raw(text, fds)
            return c.recv_line()
        finally:
            c.close()

    def assertError(self, reply, code, fragment=None, id=None):
        self.assertEqual(reply.get("jsonrpc"), "2.0")
        self.assertIn("error", reply, reply)
        self.assertNotIn("result", reply)
        self.assertEqual(reply["error"]["code"], code, reply)
        self.assertEqual(reply["id"], id)
        if fragment:
            self.assertIn(fragment, reply["error"]["message"])

    def call_error(self, method, params, code, fragment=None):
        with self.assertRaises(RpcError) as cm:
            self.d.call(method, params)
        self.assertEqual(cm.exception.code, code, cm.exception.message)
        if fragment:
            self.assertIn(fragment, cm.exception.message)
        return cm.exception

    # -- JSON-RPC 2.0 ------------------------------------------------------

    def test_parse_error(self):
        self.assertError(self.raw('{"jsonrpc": "2.0", "method": "vm.list", "id": 1\n'), PARSE)
        self.assertError(self.raw('{"jsonrpc":"2.0","method":"vm.list","id":1} x\n'), PARSE)

    def test_what_json_c_would_alter_is_refused(self):
        # Issue 18: invalid UTF-8 was echoed into a reply that was not JSON
        # (recv_line's json.loads would fail), a second "method" ran instead
        # of the first, and a 5000-digit id came back as 2^64-1.
        self.assertError(self.raw(b'{"jsonrpc":"2.0","method":"vm.\xff\xfe","id":1}\n'), PARSE,
                         "not valid UTF-8")
        self.assertError(self.raw('{"jsonrpc":"2.0","method":"vm.list","method":"vm.nope",'
                                  '"id":1}\n'), INVALID, "a member name appears twice")
        self.assertError(self.raw('{"jsonrpc":"2.0","method":"vm.list","id":%s}\n' % ("9" * 5000)),
                         INVALID, "out of range")
        # What json-c keeps exactly is echoed exactly.
        reply = self.raw('{"jsonrpc":"2.0","method":"vm.list","id":18446744073709551615}\n')
        self.assertEqual(reply["id"], 18446744073709551615)

    def test_too_deep_nesting_is_a_parse_error(self):
        deep = "[" * 200 + "]" * 200
        self.assertError(self.raw('{"jsonrpc":"2.0","method":"vm.list","id":1,"params":{"a":%s}}\n'
                                  % deep), PARSE)

    def test_invalid_requests(self):
        cases = [
            '{"method":"vm.list","id":1}',                         # no jsonrpc
            '{"jsonrpc":"1.0","method":"vm.list","id":1}',         # wrong version
            '{"jsonrpc":"2.0","id":1}',                            # no method
            '{"jsonrpc":"2.0","method":5,"id":1}',                 # method not a string
            '{"jsonrpc":"2.0","method":"vm.list","params":"x","id":1}',
            '{"jsonrpc":"2.0","method":"vm.list","id":1,"extra":true}',
            '"just a string"',
        ]
        for text in cases:
            with self.subTest(text=text):
                r = self.raw(text + "\n")
                self.assertEqual(r["error"]["code"], INVALID, r)
        r = self.raw('{"jsonrpc":"2.0","method":"vm.list","id":{"a":1}}\n')
        self.assertError(r, INVALID)

    def test_unknown_method(self):
        r = self.raw('{"jsonrpc":"2.0","method":"vm.frobnicate","id":"abc"}\n')
        self.assertError(r, NO_METHOD, "vm.frobnicate", id="abc")

    def test_invalid_params(self):
        self.call_error("vm.status", {}, BAD_PARAMS, "missing parameter 'name'")
        self.call_error("vm.status", {"name": 5}, BAD_PARAMS, "'name' must be a string")
        self.call_error("vm.status", {"name": "x", "colour": "red"}, BAD_PARAMS,
                        "unknown parameter 'colour'")
        self.call_error("vm.status", ["x"], BAD_PARAMS, "params must be an object")
        self.call_error("vm.list", {"all": True}, BAD_PARAMS, "unknown parameter 'all'")

    def test_ids_are_echoed_and_null_id_answered(self):
        for id in (0, -7, "s", 2 ** 40, None):
            with self.subTest(id=id):
                r = self.raw(json.dumps({"jsonrpc": "2.0", "method": "vm.list", "id": id}) + "\n")
                self.assertEqual(r["id"], id)
                self.assertEqual(r["result"], {"vms": []})

    def test_batch(self):
        c = self.d.conn()
        try:
            c.send_raw(json.dumps([
                {"jsonrpc": "2.0", "method": "vm.list", "id": 1},
                {"jsonrpc": "2.0", "method": "vm.list"},            # notification
                {"jsonrpc": "2.0", "method": "nope", "id": 2},
                {"foo": "bar"},
                {"jsonrpc": "2.0", "method": "vm.status", "params": {"name": "x"}, "id": 3},
            ]) + "\n")
            replies = c.recv_line()
            self.assertIsInstance(replies, list)
            by_id = {r["id"]: r for r in replies}
            self.assertEqual(len(replies), 4)
            self.assertEqual(by_id[1]["result"], {"vms": []})
            self.assertEqual(by_id[2]["error"]["code"], NO_METHOD)
            self.assertEqual(by_id[None]["error"]["code"], INVALID)
            self.assertEqual(by_id[3]["error"]["code"], NOT_FOUND)

            # A batch of notifications gets no answer at all: the next thing
            # on the wire is the reply to the following request.
            c.send_raw(json.dumps([{"jsonrpc": "2.0", "method": "vm.list"}] * 3) + "\n")
            c.send_raw('{"jsonrpc":"2.0","method":"vm.list"}\n')
            self.assertEqual(c.call("daemon.status")["version"], "0.1.0")
        finally:
            c.close()
        self.assertError(self.raw("[]\n"), INVALID, "empty batch")
        r = self.raw("[1, 2]\n")
        self.assertEqual([x["error"]["code"] for x in r], [INVALID, INVALID])

    def test_many_requests_pipelined_on_one_connection(self):
        c = self.d.conn()
        try:
            c.send_raw("".join(json.dumps({"jsonrpc": "2.0", "method": "vm.list", "id": i}) + "\n"
                               for i in range(50)))
            ids = [c.recv_line()["id"] for _ in range(50)]
            self.assertEqual(ids, list(range(50)))
        finally:
            c.close()

    # -- stream abuse ------------------------------------------------------

    def test_message_over_size_limit(self):
        other = self.d.conn()
        c = self.d.conn()
        try:
            try:
                c.send_raw('{"jsonrpc":"2.0","method":"vm.list","id":1,"params":{"x":"'
                           + "a" * (400 * 1024))
            except (BrokenPipeError, ConnectionResetError):
                pass
            r = c.recv_line()
            self.assertError(r, TOO_LARGE, "size limit")
            with self.assertRaises((EOFError, ConnectionResetError)):
                c.recv_line()
            self.assertEqual(other.call("vm.list"), {"vms": []})
        finally:
            c.close()
            other.close()

    def test_connection_dropped_mid_message(self):
        c = self.d.conn()
        c.send_raw('{"jsonrpc":"2.0","method":"vm.li')
        c.close()
        time.sleep(0.2)
        self.assertEqual(self.d.call("vm.list"), {"vms": []})
        self.assertIn("hung up in the middle of a message", self.d.read_log())

    def test_fds_on_a_method_that_takes_none_are_refused_and_closed(self):
        r, w = os.pipe()
        try:
            c = self.d.conn()
            c.request("vm.list", fds=[r, w])
            reply = c.recv_line()
            c.close()
            self.assertError(reply, BAD_FDS, "takes no fds", id=1)
            # cprd closed its copies: our read end sees EOF once we close w.
            os.close(w)
            w = -1
            self.assertEqual(os.read(r, 1), b"")
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)

    def test_too_many_fds(self):
        pipes = [os.pipe() for _ in range(10)]
        fds = [fd for p in pipes for fd in p]  # 20 > 16
        try:
            c = self.d.conn()
            c.request("fd.list", {"vm": "x"}, fds=fds)
            reply = c.recv_line()
            self.assertError(reply, BAD_FDS, "at most 16")
            with self.assertRaises((EOFError, ConnectionResetError)):
                c.recv_line()
            c.close()
        finally:
            for fd in fds:
                os.close(fd)

    def test_garbage_bytes_then_valid_request(self):
        r = self.raw("\x00\xff\xfe garbage\n")
        self.assertEqual(r["error"]["code"], PARSE)
        self.assertEqual(self.d.call("vm.list"), {"vms": []})

    def test_many_clients_at_once(self):
        conns = [self.d.conn() for _ in range(40)]
        try:
            for i, c in enumerate(conns):
                c.request("daemon.status", id=i)
            for i, c in enumerate(conns):
                self.assertEqual(c.recv_line()["id"], i)
        finally:
            for c in conns:
                c.close()


class CreateErrors(SharedDaemonTest):
    """vm.create refuses what cannot work, with a reason, and leaks nothing."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.base_fds = cls.d.settled_fds()
        cls.base_kids = set(children(cls.d.pid))

    def tearDown(self):
        self.d.destroy_all()
        wait_until(lambda: fd_count(self.d.pid) == self.base_fds, 5, "fd count to settle")
        wait_until(lambda: set(children(self.d.pid)) == self.base_kids, 5,
                   "no VMM or zombie left")
        self.assertFalse(os.listdir(os.path.join(self.d.dir, "vms")))

    def create_error(self, code, fragment, **params):
        p = {"name": "bad", "memory": "256M", "kernel": KERNEL}
        p.update(params)
        with self.assertRaises(RpcError) as cm:
            self.d.call("vm.create", p)
        self.assertEqual(cm.exception.code, code, cm.exception.message)
        self.assertIn(fragment, cm.exception.message)

    def test_name_already_used(self):
        self.d.create_guest("dup")
        self.create_error(EXISTS, "a VM named 'dup' already exists", name="dup")
        self.assertEqual(self.d.call("vm.status", {"name": "dup"})["state"], "running")

    def test_bad_names(self):
        for name in ("", "../x", "a b", ".hidden", "x" * 64):
            with self.subTest(name=name):
                self.create_error(BAD_PARAMS, "invalid VM name", name=name)

    def test_memory_zero_or_absurd(self):
        self.create_error(BAD_PARAMS, "at least 16 MiB", memory=0)
        self.create_error(BAD_PARAMS, "at least 16 MiB", memory="1M")
        self.create_error(BAD_PARAMS, "exceeds this host's physical memory", memory="64T")
        self.create_error(BAD_PARAMS, "must be a size", memory="lots")
        self.create_error(BAD_PARAMS, "must be a size", memory=-5)

    def test_kernel_missing_or_relative(self):
        self.create_error(BAD_PARAMS, "No such file or directory", kernel="/nonexistent/vmlinuz")
        self.create_error(BAD_PARAMS, "must be an absolute path", kernel="vmlinuz")
        self.create_error(BAD_PARAMS, "initrd '/nonexistent/initrd'", initrd="/nonexistent/initrd")

    def test_vmm_missing(self):
        self.create_error(VMM, "not found", vmm="/nonexistent/qemu")
        self.create_error(VMM, "not found", vmm="no-such-qemu-binary")

    def test_vmm_exits_at_start(self):
        self.create_error(VMM, "exited with status 1", vmm="/bin/false")
        self.create_error(VMM, "unsupported machine type", machine="no-such-machine")

    def test_vmm_not_executable(self):
        path = os.path.join(self.d.dir, "not-a-vmm")
        with open(path, "w") as f:
            f.write("this is text, not a program\n")
        os.chmod(path, 0o644)
        self.create_error(VMM, "Permission denied", vmm=path)
        os.chmod(path, 0o755)
        self.create_error(VMM, "Exec format error", vmm=path)

    def test_missing_tap_device_is_a_clear_error(self):
        if os.path.exists("/dev/net/tun"):
            self.skipTest("this host has /dev/net/tun, so a missing tap device cannot be "
                          "produced; test_lifecycle.Tap covers taps")
        self.create_error(-32008, "tap device", tap="cprdtap0")


if __name__ == "__main__":
    unittest.main()
