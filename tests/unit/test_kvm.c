/* SPDX-License-Identifier: MIT */
/*
 * kvm/ without a VMM: the QMP client against a scripted QMP peer on a real
 * UNIX socketpair (the test writes QEMU's side of the protocol line by line
 * and reads what the client sends), QEMU command lines, and size parsing.
 */
#include <check.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

#include "common/json.h"
#include "common/macro.h"
#include "kvm/qemu.h"
#include "kvm/qmp.h"

#define GREETING                                                                           \
	"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}, " \
	"\"package\": \"\"}, \"capabilities\": []}}\r\n"

static bool fd_is_closed(int fd)
{
	return fcntl(fd, F_GETFD) == -1 && errno == EBADF;
}

/* ---- the scripted peer (QEMU's side) ----------------------------------- */

struct peer {
	int fd;
	char buf[65536];
	size_t len;
	int fds[16]; /* fds received and not yet taken */
	size_t nfds;
	int rights_msgs; /* SCM_RIGHTS control messages seen */
	int other_msgs;  /* any other control message, or truncation */
};

/* One recvmsg, waiting up to timeout_ms. Returns bytes, 0 on EOF, -EAGAIN. */
static ssize_t peer_recv(struct peer *p, int timeout_ms)
{
	union {
		char buf[CMSG_SPACE(16 * sizeof(int))];
		struct cmsghdr align;
	} ctl;
	struct pollfd pfd = { .fd = p->fd, .events = POLLIN };
	struct iovec iov = { .iov_base = p->buf + p->len, .iov_len = sizeof(p->buf) - p->len };
	struct msghdr mh = { .msg_iov = &iov,
			     .msg_iovlen = 1,
			     .msg_control = ctl.buf,
			     .msg_controllen = sizeof(ctl.buf) };
	ssize_t n;

	ck_assert_uint_gt(iov.iov_len, 0);
	if (poll(&pfd, 1, timeout_ms) == 0)
		return -EAGAIN;
	n = recvmsg(p->fd, &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
	if (n < 0)
		return -errno;
	if (mh.msg_flags & MSG_CTRUNC)
		p->other_msgs++;
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) {
			p->other_msgs++;
			continue;
		}
		p->rights_msgs++;
		for (size_t i = 0; i < (c->cmsg_len - CMSG_LEN(0)) / sizeof(int); i++) {
			ck_assert_uint_lt(p->nfds, ELEMENTSOF(p->fds));
			memcpy(&p->fds[p->nfds++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
		}
	}
	p->len += (size_t)n;
	return n;
}

/* The next line the client sent (without its "\n"); fails the test if none
 * arrives within two seconds. */
static char *peer_line(struct peer *p)
{
	for (;;) {
		char *nl = memchr(p->buf, '\n', p->len);

		if (nl) {
			size_t l = (size_t)(nl - p->buf);
			char *line = strndup(p->buf, l);

			ck_assert_ptr_nonnull(line);
			memmove(p->buf, nl + 1, p->len - l - 1);
			p->len -= l + 1;
			return line;
		}
		ck_assert_int_gt(peer_recv(p, 2000), 0);
	}
}

static json_object *peer_json(struct peer *p)
{
	_cleanup_free_ char *line = peer_line(p);
	json_object *o = json_tokener_parse(line);

	ck_assert_msg(o && json_object_is_type(o, json_type_object), "not a JSON object: %s", line);
	return o;
}

/* Read one command; check its "execute" and return its "id". */
static int64_t peer_expect(struct peer *p, const char *execute)
{
	_cleanup_json_ json_object *o = peer_json(p);
	json_object *x;

	ck_assert(json_object_object_get_ex(o, "execute", &x));
	ck_assert_str_eq(json_object_get_string(x), execute);
	ck_assert(json_object_object_get_ex(o, "id", &x));
	ck_assert(json_object_is_type(x, json_type_int));
	return json_object_get_int64(x);
}

/* Nothing (no complete line, no byte on the socket) has been sent. */
static void peer_expect_quiet(struct peer *p)
{
	ck_assert_ptr_null(memchr(p->buf, '\n', p->len));
	ck_assert_int_eq(peer_recv(p, 0), -EAGAIN);
}

static void peer_send(struct peer *p, const char *s)
{
	size_t len = strlen(s);

	ck_assert_int_eq(write(p->fd, s, len), (ssize_t)len);
}

_printf_(2, 3) static void peer_sendf(struct peer *p, const char *fmt, ...)
{
	_cleanup_free_ char *s = NULL;
	va_list ap;
	int r;

	va_start(ap, fmt);
	r = vasprintf(&s, fmt, ap);
	va_end(ap);
	ck_assert_int_ge(r, 0);
	peer_send(p, s);
}

/* ---- the client under test and what its callbacks saw ----------------- */

struct reply {
	int calls;
	int seq; /* order among all replies of the test, from 1 */
	bool ok;
	char ret[256], cls[64], desc[128];
};

struct t {
	qmp *q;
	struct peer peer;
	int seq;
	int ready_calls;
	int event_calls;
	char ev_name[32];
	int64_t ev_ts;
	bool ev_has_data;
	char ev_data[256];
};

static struct t *current; /* the test's context, for reply callbacks */

static void on_reply(_unused_ qmp *q, json_object *ret, const char *cls, const char *desc,
		     void *userdata)
{
	struct reply *r = userdata;

	r->calls++;
	r->seq = ++current->seq;
	r->ok = ret != NULL;
	snprintf(r->ret, sizeof(r->ret), "%s",
		 ret ? json_object_to_json_string_ext(ret, JSON_C_TO_STRING_PLAIN) : "");
	snprintf(r->cls, sizeof(r->cls), "%s", cls ? cls : "(null)");
	snprintf(r->desc, sizeof(r->desc), "%s", desc ? desc : "(null)");
}

static void on_ready(qmp *q, void *userdata)
{
	struct t *t = userdata;

	ck_assert_ptr_eq(q, t->q);
	t->ready_calls++;
}

static void on_event(_unused_ qmp *q, const char *event, json_object *data, int64_t ts_us,
		     void *userdata)
{
	struct t *t = userdata;

	t->event_calls++;
	snprintf(t->ev_name, sizeof(t->ev_name), "%s", event);
	t->ev_ts = ts_us;
	t->ev_has_data = data != NULL;
	snprintf(t->ev_data, sizeof(t->ev_data), "%s",
		 data ? json_object_to_json_string_ext(data, JSON_C_TO_STRING_PLAIN) : "");
}

static void start(struct t *t)
{
	int sv[2];

	memset(t, 0, sizeof(*t));
	current = t;
	ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
	t->peer.fd = sv[1];
	ck_assert_int_eq(qmp_new(sv[0], &t->q), 0);
	ck_assert_int_eq(qmp_fd(t->q), sv[0]);
	qmp_set_handlers(t->q, on_ready, on_event, t);
}

static void stop(struct t *t)
{
	t->q = qmp_free(t->q);
	t->peer.fd = safe_close(t->peer.fd);
	close_many(t->peer.fds, t->peer.nfds);
	current = NULL;
}

/* What the owner's event loop does: read, then write what is queued. */
static void drive(struct t *t)
{
	ck_assert_int_eq(qmp_dispatch(t->q), 0);
	ck_assert_int_eq(qmp_flush(t->q), 1);
	ck_assert(!qmp_wants_write(t->q));
}

/* Greeting, qmp_capabilities and its answer. */
static void greet(struct t *t)
{
	int64_t id;

	peer_send(&t->peer, GREETING);
	drive(t);
	id = peer_expect(&t->peer, "qmp_capabilities");
	peer_sendf(&t->peer, "{\"return\": {}, \"id\": %" PRId64 "}\r\n", id);
	drive(t);
	ck_assert(qmp_is_ready(t->q));
}

/* ---- QMP client -------------------------------------------------------- */

START_TEST(qmp_command_waits_for_capabilities)
{
	struct t t;
	struct reply r = {};
	int64_t id;

	start(&t);
	ck_assert_int_eq(qmp_command(t.q, "query-status", NULL, -1, on_reply, &r), 0);
	ck_assert_int_eq(qmp_flush(t.q), 1);
	peer_expect_quiet(&t.peer);

	/* After the greeting only qmp_capabilities goes out... */
	peer_send(&t.peer, GREETING);
	drive(&t);
	id = peer_expect(&t.peer, "qmp_capabilities");
	peer_expect_quiet(&t.peer);
	ck_assert(!qmp_is_ready(t.q));

	/* ...and the held command once it has been answered. */
	peer_sendf(&t.peer, "{\"return\": {}, \"id\": %" PRId64 "}\r\n", id);
	drive(&t);
	ck_assert(qmp_is_ready(t.q));
	ck_assert_int_ne(peer_expect(&t.peer, "query-status"), id);
	peer_expect_quiet(&t.peer);
	ck_assert_int_eq(r.calls, 0);
	stop(&t);
}
END_TEST

START_TEST(qmp_ready_fires_once)
{
	struct t t;
	struct reply r = {};
	int64_t id;

	start(&t);
	ck_assert_int_eq(t.ready_calls, 0);
	greet(&t);
	ck_assert_int_eq(t.ready_calls, 1);

	/* Later replies and events do not make it ready again. */
	ck_assert_int_eq(qmp_command(t.q, "query-status", NULL, -1, on_reply, &r), 0);
	ck_assert_int_eq(qmp_flush(t.q), 1);
	id = peer_expect(&t.peer, "query-status");
	peer_sendf(&t.peer, "{\"return\": {\"running\": true}, \"id\": %" PRId64 "}\r\n", id);
	peer_send(&t.peer, "{\"timestamp\": {\"seconds\": 1700000000, \"microseconds\": 123456}, "
			   "\"event\": \"RESUME\"}\r\n");
	drive(&t);
	ck_assert_int_eq(r.calls, 1);
	ck_assert_int_eq(t.event_calls, 1);
	ck_assert_int_eq(t.ready_calls, 1);
	stop(&t);
}
END_TEST

START_TEST(qmp_vmm_version_comes_from_greeting)
{
	struct t t;

	start(&t);
	ck_assert_ptr_null(qmp_vmm_version(t.q));
	peer_send(&t.peer, GREETING);
	drive(&t);
	ck_assert_str_eq(qmp_vmm_version(t.q), "10.0.2");
	stop(&t);
}
END_TEST

START_TEST(qmp_replies_matched_by_id_out_of_order)
{
	struct t t;
	struct reply a = {}, b = {};
	int64_t ida, idb;

	start(&t);
	greet(&t);
	ck_assert_int_eq(qmp_command(t.q, "query-status", NULL, -1, on_reply, &a), 0);
	ck_assert_int_eq(qmp_command(t.q, "query-name", NULL, -1, on_reply, &b), 0);
	ck_assert_int_eq(qmp_flush(t.q), 1);
	ida = peer_expect(&t.peer, "query-status");
	idb = peer_expect(&t.peer, "query-name");
	ck_assert_int_ne(ida, idb);
	ck_assert_uint_eq(qmp_pending(t.q), 2);

	peer_sendf(&t.peer, "{\"return\": {\"name\": \"vm1\"}, \"id\": %" PRId64 "}\r\n", idb);
	peer_sendf(&t.peer, "{\"return\": {\"status\": \"running\"}, \"id\": %" PRId64 "}\r\n",
		   ida);
	drive(&t);
	ck_assert_int_eq(a.calls, 1);
	ck_assert_int_eq(b.calls, 1);
	ck_assert(a.ok && b.ok);
	ck_assert_str_eq(b.ret, "{\"name\":\"vm1\"}");
	ck_assert_str_eq(a.ret, "{\"status\":\"running\"}");
	ck_assert_int_eq(b.seq, 1);
	ck_assert_int_eq(a.seq, 2);
	ck_assert_uint_eq(qmp_pending(t.q), 0);
	stop(&t);
}
END_TEST

START_TEST(qmp_error_reply_reaches_callback)
{
	struct t t;
	struct reply r = {};
	int64_t id;

	start(&t);
	greet(&t);
	ck_assert_int_eq(qmp_command(t.q, "cont", NULL, -1, on_reply, &r), 0);
	ck_assert_int_eq(qmp_flush(t.q), 1);
	id = peer_expect(&t.peer, "cont");
	peer_sendf(&t.peer,
		   "{\"error\": {\"class\": \"GenericError\", \"desc\": \"Migration is not "
		   "finalized yet\"}, \"id\": %" PRId64 "}\r\n",
		   id);
	drive(&t);
	ck_assert_int_eq(r.calls, 1);
	ck_assert(!r.ok);
	ck_assert_str_eq(r.cls, "GenericError");
	ck_assert_str_eq(r.desc, "Migration is not finalized yet");
	ck_assert_uint_eq(qmp_pending(t.q), 0);
	stop(&t);
}
END_TEST

START_TEST(qmp_event_reaches_handler_with_timestamp_and_data)
{
	struct t t;

	start(&t);
	greet(&t);
	peer_send(&t.peer, "{\"timestamp\": {\"seconds\": 1700000000, \"microseconds\": 123456}, "
			   "\"event\": \"STOP\"}\r\n");
	drive(&t);
	ck_assert_int_eq(t.event_calls, 1);
	ck_assert_str_eq(t.ev_name, "STOP");
	ck_assert_int_eq(t.ev_ts, 1700000000123456LL);
	ck_assert(!t.ev_has_data);

	peer_send(&t.peer, "{\"timestamp\": {\"seconds\": 1700000001, \"microseconds\": 5}, "
			   "\"event\": \"SHUTDOWN\", \"data\": {\"guest\": true, "
			   "\"reason\": \"guest-shutdown\"}}\r\n");
	drive(&t);
	ck_assert_int_eq(t.event_calls, 2);
	ck_assert_str_eq(t.ev_name, "SHUTDOWN");
	ck_assert_int_eq(t.ev_ts, 1700000001000005LL);
	ck_assert(t.ev_has_data);
	ck_assert_str_eq(t.ev_data, "{\"guest\":true,\"reason\":\"guest-shutdown\"}");
	stop(&t);
}
END_TEST

/* A VMM taken over by its guest writes whatever it likes: every string it
 * sends reaches cprd escaped, a key that would need escaping not at all. */
START_TEST(qmp_vmm_text_arrives_escaped)
{
	struct t t;
	struct reply r = {};
	int64_t id;

	start(&t);
	greet(&t);
	peer_send(&t.peer, "{\"event\": \"SHUTDOWN\", \"data\": {\"reason\": \"x\\nupdate vm=web1 "
			   "result=ok\\u001b[2J\xff\", \"bad\\u0007key\": 1, \"list\": "
			   "[\"\\r\"]}}\r\n");
	drive(&t);
	ck_assert_int_eq(t.event_calls, 1);
	ck_assert_str_eq(t.ev_data, "{\"reason\":\"x\\\\x0aupdate vm=web1 result=ok\\\\x1b[2J"
				    "\\\\xff\",\"list\":[\"\\\\x0d\"]}");
	ck_assert_int_eq(qmp_command(t.q, "cont", NULL, -1, on_reply, &r), 0);
	ck_assert_int_eq(qmp_flush(t.q), 1);
	id = peer_expect(&t.peer, "cont");
	peer_sendf(&t.peer,
		   "{\"error\": {\"class\": \"Generic\\nError\", \"desc\": \"no\\n2024 cprd: "
		   "forged\"}, \"id\": %" PRId64 "}\r\n",
		   id);
	drive(&t);
	ck_assert_str_eq(r.cls, "Generic\\x0aError");
	ck_assert_str_eq(r.desc, "no\\x0a2024 cprd: forged");
	stop(&t);
}
END_TEST

START_TEST(qmp_command_fd_arrives_once_as_scm_rights)
{
	struct t t;
	struct reply r = {};
	int p[2];
	char c = 0;
	json_object *args;

	ck_assert_int_eq(pipe2(p, O_CLOEXEC), 0);
	start(&t);
	greet(&t);
	args = json_object_new_object();
	json_object_object_add(args, "fdname", json_object_new_string("mig"));
	ck_assert_int_eq(qmp_command(t.q, "getfd", args, p[1], on_reply, &r), 0);
	ck_assert_int_eq(qmp_flush(t.q), 1);
	peer_expect(&t.peer, "getfd");
	ck_assert_int_eq(t.peer.rights_msgs, 1);
	ck_assert_int_eq(t.peer.other_msgs, 0);
	ck_assert_uint_eq(t.peer.nfds, 1);
	/* The fd stays the caller's. */
	ck_assert(!fd_is_closed(p[1]));

	/* The received fd is the pipe's write end. */
	ck_assert_int_eq(write(t.peer.fds[0], "x", 1), 1);
	ck_assert_int_eq(read(p[0], &c, 1), 1);
	ck_assert_int_eq(c, 'x');

	/* ...and once it and ours are closed the client holds no copy: EOF. */
	t.peer.fds[0] = safe_close(t.peer.fds[0]);
	t.peer.nfds = 0;
	p[1] = safe_close(p[1]);
	ck_assert_int_eq(read(p[0], &c, 1), 0);
	close(p[0]);
	stop(&t);
}
END_TEST

START_TEST(qmp_hangup_gives_econnreset_and_fails_pending_once)
{
	struct t t;
	struct reply a = {}, b = {};

	start(&t);
	greet(&t);
	ck_assert_int_eq(qmp_command(t.q, "query-status", NULL, -1, on_reply, &a), 0);
	ck_assert_int_eq(qmp_command(t.q, "query-name", NULL, -1, on_reply, &b), 0);
	ck_assert_int_eq(qmp_flush(t.q), 1);
	peer_expect(&t.peer, "query-status");
	peer_expect(&t.peer, "query-name");

	t.peer.fd = safe_close(t.peer.fd);
	ck_assert_int_eq(qmp_dispatch(t.q), -ECONNRESET);
	ck_assert_int_eq(a.calls + b.calls, 0);

	qmp_fail_pending(t.q, "VMM exited");
	ck_assert_int_eq(a.calls, 1);
	ck_assert_int_eq(b.calls, 1);
	ck_assert(!a.ok && !b.ok);
	ck_assert_str_eq(a.cls, "Disconnected");
	ck_assert_str_eq(b.cls, "Disconnected");
	ck_assert_str_eq(a.desc, "VMM exited");
	ck_assert_uint_eq(qmp_pending(t.q), 0);

	qmp_fail_pending(t.q, "again");
	ck_assert_int_eq(a.calls, 1);
	ck_assert_int_eq(b.calls, 1);
	stop(&t);
}
END_TEST

START_TEST(qmp_non_json_line_gives_eproto)
{
	struct t t;

	start(&t);
	greet(&t);
	peer_send(&t.peer, "this is not json\r\n");
	ck_assert_int_eq(qmp_dispatch(t.q), -EPROTO);
	stop(&t);
}
END_TEST

START_TEST(qmp_split_reply_is_assembled)
{
	struct t t;
	struct reply r = {};
	_cleanup_free_ char *id = NULL;
	int64_t n;

	start(&t);
	greet(&t);
	ck_assert_int_eq(qmp_command(t.q, "query-balloon", NULL, -1, on_reply, &r), 0);
	ck_assert_int_eq(qmp_flush(t.q), 1);
	n = peer_expect(&t.peer, "query-balloon");
	ck_assert_int_ge(asprintf(&id, "%" PRId64, n), 1);

	const char *pieces[] = { "{\"return\": {\"act", "ual\": 42}, \"id\": ", id, "}\r", "\n" };
	for (size_t i = 0; i < ELEMENTSOF(pieces); i++) {
		ck_assert_int_eq(r.calls, 0);
		peer_send(&t.peer, pieces[i]);
		ck_assert_int_eq(qmp_dispatch(t.q), 0);
	}
	ck_assert_int_eq(r.calls, 1);
	ck_assert(r.ok);
	ck_assert_str_eq(r.ret, "{\"actual\":42}");
	stop(&t);
}
END_TEST

START_TEST(qmp_free_closes_fd)
{
	struct t t;
	int fd;

	start(&t);
	fd = qmp_fd(t.q);
	t.q = qmp_free(t.q);
	ck_assert(fd_is_closed(fd));
	ck_assert_ptr_null(qmp_free(NULL));
	stop(&t);
}
END_TEST

/* ---- qemu_build_argv --------------------------------------------------- */

static struct qemu_config base_config(void)
{
	return (struct qemu_config){
		.name = "vm1",
		.binary = "/usr/bin/qemu-system-x86_64",
		.machine = "pc-q35-8.2",
		.memory_bytes = 256ULL << 20,
		.vcpus = 2,
		.kernel = "/var/lib/cprd/vmlinuz",
		.initrd = "/var/lib/cprd/initrd.img",
		.append = "console=ttyS0",
		.kvm = false,
		.qmp_fd = 5,
		.memory_backend = "ram0",
		.incoming = false,
	};
}

/* What the devices hand qemu_build_argv (their own arguments are tested
 * with their types, tests/unit/test_devices.c). */
static void add_devices(struct qemu_config *c)
{
	qemu_args_add(&c->devices[QEMU_PLACE_MEMORY], "-object");
	qemu_args_add(&c->devices[QEMU_PLACE_MEMORY], "memory-backend-file,id=ram0");
	qemu_args_add(&c->devices[QEMU_PLACE_SERIAL], "-serial");
	qemu_args_add(&c->devices[QEMU_PLACE_SERIAL], "chardev:con0");
	qemu_args_add(&c->devices[QEMU_PLACE_DEVICE], "-netdev");
	qemu_args_add(&c->devices[QEMU_PLACE_DEVICE], "tap,id=net0,fd=6");
}

static size_t index_of(char **argv, const char *arg)
{
	for (size_t i = 0; argv[i]; i++)
		if (streq(argv[i], arg))
			return i;
	ck_abort_msg("%s is not in the command line", arg);
	return 0;
}

/* How often argv holds opt immediately followed by val (val NULL: any). */
static int count_pair(char **argv, const char *opt, const char *val)
{
	int n = 0;

	for (size_t i = 0; argv[i]; i++)
		if (streq(argv[i], opt) && argv[i + 1] && (!val || streq(argv[i + 1], val)))
			n++;
	return n;
}

static char **build(const struct qemu_config *c)
{
	char **argv = NULL;

	ck_assert_int_eq(qemu_build_argv(c, &argv), 0);
	ck_assert_ptr_nonnull(argv);
	return argv;
}

START_TEST(argv_machine_names_the_memory_backend)
{
	struct qemu_config c = base_config();
	char **argv = build(&c);

	ck_assert_int_eq(
	    count_pair(argv, "-machine", "pc-q35-8.2,memory-backend=ram0,aux-ram-share=on"), 1);
	strv_free(argv);
}
END_TEST

/* Memory backends before the monitor, serial ports after it, other
 * devices after the boot images: each at its place, in the order given. */
START_TEST(argv_device_args_at_their_places)
{
	struct qemu_config c = base_config();
	char **argv;

	add_devices(&c);
	argv = build(&c);
	ck_assert_uint_eq(index_of(argv, "memory-backend-file,id=ram0"),
			  index_of(argv, "-object") + 1);
	ck_assert_uint_lt(index_of(argv, "-m"), index_of(argv, "-object"));
	ck_assert_uint_lt(index_of(argv, "-object"),
			  index_of(argv, "socket,id=qmp,fd=5,server=on,wait=off"));
	ck_assert_uint_lt(index_of(argv, "chardev=qmp,mode=control"), index_of(argv, "-serial"));
	ck_assert_uint_lt(index_of(argv, "chardev:con0"), index_of(argv, "-kernel"));
	ck_assert_uint_lt(index_of(argv, "console=ttyS0"), index_of(argv, "-netdev"));
	ck_assert_int_eq(count_pair(argv, "-netdev", "tap,id=net0,fd=6"), 1);
	strv_free(argv);
	qemu_config_done(&c);
	ck_assert_ptr_null(c.devices[QEMU_PLACE_MEMORY].v);
}
END_TEST

/* A device whose arguments could not be built fails the command line. */
START_TEST(argv_device_error_fails_it)
{
	char **sentinel = (char **)&sentinel, **argv = sentinel;
	struct qemu_config c = base_config();

	c.devices[QEMU_PLACE_DEVICE].error = -ENOMEM;
	ck_assert_int_eq(qemu_build_argv(&c, &argv), -ENOMEM);
	ck_assert_ptr_eq(argv, sentinel);
}
END_TEST

START_TEST(argv_qmp_chardev_is_qmp_fd)
{
	struct qemu_config c = base_config();
	char **argv = build(&c);

	ck_assert_int_eq(count_pair(argv, "-chardev", "socket,id=qmp,fd=5,server=on,wait=off"), 1);
	strv_free(argv);
}
END_TEST

START_TEST(argv_accel_follows_kvm_flag)
{
	struct qemu_config c = base_config();
	char **argv = build(&c);

	ck_assert_int_eq(count_pair(argv, "-accel", "tcg"), 1);
	ck_assert_int_eq(count_pair(argv, "-accel", NULL), 1);
	strv_free(argv);

	c.kvm = true;
	argv = build(&c);
	ck_assert_int_eq(count_pair(argv, "-accel", "kvm"), 1);
	ck_assert_int_eq(count_pair(argv, "-accel", NULL), 1);
	strv_free(argv);
}
END_TEST

START_TEST(argv_incoming_only_when_requested)
{
	struct qemu_config c = base_config();
	char **argv = build(&c);

	ck_assert_int_eq(count_pair(argv, "-incoming", NULL), 0);
	strv_free(argv);

	c.incoming = true;
	argv = build(&c);
	ck_assert_int_eq(count_pair(argv, "-incoming", "defer"), 1);
	ck_assert_int_eq(count_pair(argv, "-incoming", NULL), 1);
	strv_free(argv);
}
END_TEST

START_TEST(argv_incoming_uri_replaces_defer_and_starts_paused)
{
	struct qemu_config c = base_config();
	char **argv;

	c.incoming = true;
	c.incoming_uri = "file:/run/cprd/vms/a/vmm/cpr-exec.state";
	argv = build(&c);
	ck_assert_int_eq(count_pair(argv, "-incoming", "file:/run/cprd/vms/a/vmm/cpr-exec.state"),
			 1);
	ck_assert_int_eq(count_pair(argv, "-incoming", NULL), 1);
	ck_assert_int_eq(count_pair(argv, "-S", NULL), 1);
	strv_free(argv);
}
END_TEST

START_TEST(argv_sandbox_allows_exec_only_when_asked)
{
	struct qemu_config c = base_config();
	char **argv;

	c.sandbox = true;
	argv = build(&c);
	ck_assert_int_eq(
	    count_pair(argv, "-sandbox",
		       "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"),
	    1);
	strv_free(argv);
	c.allow_exec = true;
	argv = build(&c);
	ck_assert_int_eq(
	    count_pair(argv, "-sandbox",
		       "on,obsolete=deny,elevateprivileges=deny,spawn=allow,resourcecontrol=deny"),
	    1);
	strv_free(argv);
}
END_TEST

START_TEST(argv_starts_with_binary_and_is_null_terminated)
{
	struct qemu_config c = base_config();
	char **argv;
	size_t n = 0;

	c.incoming = true;
	argv = build(&c);
	ck_assert_str_eq(argv[0], "/usr/bin/qemu-system-x86_64");
	while (n < 256 && argv[n])
		n++;
	ck_assert_uint_lt(n, 256);
	ck_assert_ptr_null(argv[n]);
	ck_assert_str_eq(argv[n - 2], "-incoming");
	ck_assert_str_eq(argv[n - 1], "defer");
	strv_free(argv);
}
END_TEST

START_TEST(argv_rejects_invalid_configs)
{
	char **sentinel = (char **)&sentinel, **argv = sentinel;
	struct qemu_config c;

	c = base_config();
	c.memory_bytes = QEMU_MIN_MEMORY - (1 << 20);
	ck_assert_int_eq(qemu_build_argv(&c, &argv), -EINVAL);
	c = base_config();
	c.memory_bytes = (256ULL << 20) + 4096;
	ck_assert_int_eq(qemu_build_argv(&c, &argv), -EINVAL);
	c = base_config();
	c.vcpus = 0;
	ck_assert_int_eq(qemu_build_argv(&c, &argv), -EINVAL);
	c = base_config();
	c.kernel = NULL;
	ck_assert_int_eq(qemu_build_argv(&c, &argv), -EINVAL);
	c = base_config();
	c.qmp_fd = 2;
	ck_assert_int_eq(qemu_build_argv(&c, &argv), -EINVAL);
	c = base_config();
	c.memory_backend = NULL;
	ck_assert_int_eq(qemu_build_argv(&c, &argv), -EINVAL);
	c = base_config();
	c.memory_backend = "ram0,mem-path=/etc";
	ck_assert_int_eq(qemu_build_argv(&c, &argv), -EINVAL);
	c = base_config();
	c.name = "vm1,mem-path=/etc";
	ck_assert_int_eq(qemu_build_argv(&c, &argv), -EINVAL);
	ck_assert_ptr_eq(argv, sentinel);

	/* The boundary itself is fine. */
	c = base_config();
	c.memory_bytes = QEMU_MIN_MEMORY;
	ck_assert_int_eq(qemu_build_argv(&c, &argv), 0);
	strv_free(argv);
}
END_TEST

/* ---- qemu_parse_size --------------------------------------------------- */

START_TEST(parse_size_accepts_units)
{
	static const struct {
		const char *s;
		uint64_t v;
	} ok[] = {
		{ "268435456", 268435456ULL }, { "256M", 256ULL << 20 }, { "256MiB", 256ULL << 20 },
		{ "1G", 1ULL << 30 },          { "1g", 1ULL << 30 },     { "512K", 512ULL << 10 },
		{ "1T", 1ULL << 40 },
	};

	for (size_t i = 0; i < ELEMENTSOF(ok); i++) {
		uint64_t v = 0;

		ck_assert_msg(qemu_parse_size(ok[i].s, &v) == 0, "%s", ok[i].s);
		ck_assert_msg(v == ok[i].v, "%s gave %" PRIu64, ok[i].s, v);
	}
}
END_TEST

START_TEST(parse_size_rejects_malformed)
{
	static const char *const bad[] = { "", "abc", "-1", "12X", "1.5G", " 1G" };

	for (size_t i = 0; i < ELEMENTSOF(bad); i++) {
		uint64_t v = 7;

		ck_assert_msg(qemu_parse_size(bad[i], &v) == -EINVAL, "\"%s\"", bad[i]);
		ck_assert_uint_eq(v, 7);
	}
}
END_TEST

START_TEST(parse_size_reports_overflow)
{
	uint64_t v = 7;

	ck_assert_int_eq(qemu_parse_size("99999999999999999999", &v), -ERANGE);
	ck_assert_int_eq(qemu_parse_size("20000000T", &v), -ERANGE);
	ck_assert_uint_eq(v, 7);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("kvm");
	TCase *t = tcase_create("core");
	SRunner *sr;
	int failed;

	tcase_add_test(t, qmp_command_waits_for_capabilities);
	tcase_add_test(t, qmp_ready_fires_once);
	tcase_add_test(t, qmp_vmm_version_comes_from_greeting);
	tcase_add_test(t, qmp_replies_matched_by_id_out_of_order);
	tcase_add_test(t, qmp_error_reply_reaches_callback);
	tcase_add_test(t, qmp_event_reaches_handler_with_timestamp_and_data);
	tcase_add_test(t, qmp_vmm_text_arrives_escaped);
	tcase_add_test(t, qmp_command_fd_arrives_once_as_scm_rights);
	tcase_add_test(t, qmp_hangup_gives_econnreset_and_fails_pending_once);
	tcase_add_test(t, qmp_non_json_line_gives_eproto);
	tcase_add_test(t, qmp_split_reply_is_assembled);
	tcase_add_test(t, qmp_free_closes_fd);
	tcase_add_test(t, argv_machine_names_the_memory_backend);
	tcase_add_test(t, argv_device_args_at_their_places);
	tcase_add_test(t, argv_device_error_fails_it);
	tcase_add_test(t, argv_qmp_chardev_is_qmp_fd);
	tcase_add_test(t, argv_accel_follows_kvm_flag);
	tcase_add_test(t, argv_incoming_only_when_requested);
	tcase_add_test(t, argv_incoming_uri_replaces_defer_and_starts_paused);
	tcase_add_test(t, argv_sandbox_allows_exec_only_when_asked);
	tcase_add_test(t, argv_starts_with_binary_and_is_null_terminated);
	tcase_add_test(t, argv_rejects_invalid_configs);
	tcase_add_test(t, parse_size_accepts_units);
	tcase_add_test(t, parse_size_rejects_malformed);
	tcase_add_test(t, parse_size_reports_overflow);
	suite_add_tcase(s, t);
	sr = srunner_create(s);
	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? 1 : 0;
}
