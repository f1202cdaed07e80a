/* SPDX-License-Identifier: MIT */
/*
 * libFuzzer harness for proto/: the bytes a client could send travel the
 * same path the daemon's connection handling uses.
 *
 *   input A --(socketpair, chunked, optional SCM_RIGHTS)--> B
 *   B: proto_reader_fill / proto_reader_next (max_msg 4096)
 *      -> jsonrpc_parse -> jsonrpc_request_parse (object, or each element
 *         of a batch) -> jsonrpc_result_new / jsonrpc_error_new
 *      -> jsonrpc_to_string (must hold no raw '\n' and parse back)
 *      -> proto_writer_queue (with the request's fds) / proto_writer_flush
 *   A: a second reader takes every reply back and checks it arrived
 *      whole, with exactly the fds it was queued with (every other reply
 *      is taken without asking for its fds, which must then be closed).
 *
 * Input layout (deterministic; shorter inputs use mode 0, param 0):
 *   byte 0  mode:  bits 0-2 chunking pattern, bits 3-4 fd attach mode,
 *                  bits 5-7 fd count selector
 *   byte 1  param: bits 0-6 chunk size / PRNG seed; bit 7 flushes each
 *                  reply at once instead of after each read (as the
 *                  daemon does, so several replies share a sendmsg)
 *   rest    the bytes written to the socket
 *
 * Every iteration must leave the fd table exactly as it found it: the
 * lowest free fd and the open/closed state of the next FD_PROBE fds are
 * compared with their state at the start, and any change aborts.
 *
 * Build and run: make fuzz [FUZZ_SECONDS=n]
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <json-c/json.h>
#include <sanitizer/common_interface_defs.h>

#include "common/macro.h"
#include "proto/frame.h"
#include "proto/jsonrpc.h"

#define FUZZ_MAX_MSG 4096 /* small, so the size limit is reached */
#define REPLY_MAX_MSG (1 << 20)
#define FD_PROBE 128    /* fds above the lowest free one that are checked */
#define MAX_SEND_FDS 20 /* a few more than PROTO_MAX_FDS */
#define REPLY_RING 64   /* more than the replies ever in flight at once */

#define fuzz_assert(cond, ...)                                                                  \
	do {                                                                                    \
		if (!(cond)) {                                                                  \
			fprintf(stderr, "fuzz_proto: %s:%d: assertion '%s' failed: ", __FILE__, \
				__LINE__, #cond);                                               \
			fprintf(stderr, __VA_ARGS__);                                           \
			fputc('\n', stderr);                                                    \
			abort();                                                                \
		}                                                                               \
	} while (0)

static bool verbose; /* FUZZ_PROTO_VERBOSE=1: one line per input */

typedef struct fuzz_ctx {
	int a, b;              /* a: client end, b: daemon end */
	int devnull;           /* the fd sent as SCM_RIGHTS payload */
	proto_reader *in;      /* daemon side */
	proto_writer *out;     /* daemon side */
	proto_reader *replies; /* client side */
	bool in_dead;          /* the daemon would close the connection */
	int dead_why;          /* the errno it gave up on */
	bool in_eof;
	bool flush_each; /* flush after every reply, not after each read */
	uint64_t messages, replies_sent, replies_seen;
	size_t reply_nfds[REPLY_RING]; /* fds each reply in flight was queued with */
} fuzz_ctx;

/* ---- fd accounting ---------------------------------------------------- */

static int lowest_free_fd(void)
{
	int fd = open("/dev/null", O_RDONLY | O_CLOEXEC);

	fuzz_assert(fd >= 0, "open /dev/null: %s", strerror(errno));
	close(fd);
	return fd;
}

/* One poll() tells which of [base, base + FD_PROBE) are open. */
static void fd_snapshot(int base, bool open_fds[FD_PROBE])
{
	struct pollfd p[FD_PROBE];

	for (int i = 0; i < FD_PROBE; i++)
		p[i] = (struct pollfd){ .fd = base + i, .events = 0 };
	(void)poll(p, FD_PROBE, 0);
	for (int i = 0; i < FD_PROBE; i++)
		open_fds[i] = !(p[i].revents & POLLNVAL);
}

/* ---- deterministic chunking ------------------------------------------- */

static uint32_t prng_next(uint32_t *s)
{
	/* xorshift32; the state must not be 0. */
	uint32_t x = *s ? *s : 0x9e3779b9u;
	x ^= x << 13;
	x ^= x >> 17;
	x ^= x << 5;
	*s = x;
	return x;
}

static size_t chunk_len(unsigned pattern, uint8_t param, uint32_t *rng, size_t idx,
			const uint8_t *p, size_t left)
{
	static const size_t fib[] = { 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987 };
	size_t n;

	switch (pattern) {
	case 0: /* all at once */
		n = left;
		break;
	case 1: /* one byte at a time */
		n = 1;
		break;
	case 2: /* fixed size 1..128 */
		n = (size_t)(param & 0x7f) + 1;
		break;
	case 3: /* pseudo-random sizes 1..64 */
		n = 1 + prng_next(rng) % 64;
		break;
	case 4: { /* line by line, '\n' ends a chunk */
		const uint8_t *nl = memchr(p, '\n', left);
		n = nl ? (size_t)(nl - p) + 1 : left;
		break;
	}
	case 5: { /* chunks end param % 4 bytes after each '\n' (crossing lines) */
		const uint8_t *nl = memchr(p, '\n', left);
		n = nl ? (size_t)(nl - p) + 1 + param % 4 : left;
		break;
	}
	case 6: /* growing sizes */
		n = fib[(idx + param) % ELEMENTSOF(fib)];
		break;
	default: /* around the size limit */
		n = FUZZ_MAX_MSG - 2 + param % 5;
		break;
	}
	return MAX((size_t)1, MIN(n, left));
}

/* How many fds travel with chunk idx. */
static size_t chunk_nfds(unsigned fd_mode, unsigned fd_sel, uint32_t *rng, size_t idx)
{
	static const size_t counts[] = { 1, 1, 2, 3, 15, 16, 17, MAX_SEND_FDS };
	size_t n = counts[fd_sel];

	switch (fd_mode) {
	case 0:
		return 0;
	case 1: /* the first chunk only */
		return idx == 0 ? n : 0;
	case 2: /* every chunk */
		return n;
	default: /* some chunks, 1..n fds */
		return prng_next(rng) % 3 == 0 ? 1 + prng_next(rng) % n : 0;
	}
}

/* ---- replies ---------------------------------------------------------- */

static bool drain_replies(fuzz_ctx *c);
static void flush_replies(fuzz_ctx *c);

/* Serialise, check, and send one reply (taken) back with the request's fds
 * (borrowed; the writer dups them). */
static void send_reply(fuzz_ctx *c, json_object *reply, const int *fds, size_t nfds)
{
	const char *s, *why = NULL;
	size_t len = 0;
	json_object *back = NULL;
	int r;

	fuzz_assert(reply, "reply builder returned NULL");
	s = jsonrpc_to_string(reply, &len);
	if (!s) {
		const char *raw = json_object_to_json_string_ext(reply, JSON_C_TO_STRING_PLAIN);
		fuzz_assert(false, "jsonrpc_to_string failed (raw newline: %s)",
			    raw && strchr(raw, '\n') ? "yes" : "no");
	}
	fuzz_assert(strlen(s) == len, "length %zu != strlen %zu", len, strlen(s));
	fuzz_assert(!memchr(s, '\n', len), "raw newline in serialisation: %s", s);
	fuzz_assert(len > 0 && len <= REPLY_MAX_MSG, "odd reply length %zu", len);

	/* What the daemon sends, its clients must be able to read. */
	r = jsonrpc_parse(s, len, &back, &why);
	fuzz_assert(r == 0, "reply does not parse back (%s): %s", why ? why : "?", s);
	json_object_put(back);

	r = proto_writer_queue(c->out, s, len, fds, nfds);
	fuzz_assert(r == 0, "proto_writer_queue: %s", strerror(-r));
	json_object_put(reply);
	fuzz_assert(c->replies_sent - c->replies_seen < REPLY_RING, "too many replies in flight");
	c->reply_nfds[c->replies_sent++ % REPLY_RING] = nfds;
	if (c->flush_each || c->replies_sent - c->replies_seen >= REPLY_RING / 2)
		flush_replies(c);
}

/* Write every queued reply, reading them back whenever the socket is full. */
static void flush_replies(fuzz_ctx *c)
{
	int r;

	for (int tries = 0;; tries++) {
		r = proto_writer_flush(c->out, c->b);
		fuzz_assert(r >= 0, "proto_writer_flush: %s", strerror(-r));
		if (r == 1)
			break;
		fuzz_assert(tries < 1000, "writer makes no progress");
		fuzz_assert(drain_replies(c), "EOF while the daemon side is open");
	}
	fuzz_assert(drain_replies(c), "EOF while the daemon side is open");
}

/* Takes every reply the socket has now; returns false at EOF. */
static bool drain_replies(fuzz_ctx *c)
{
	for (;;) {
		ssize_t n = proto_reader_fill(c->replies, c->a);

		if (n == -EAGAIN)
			return true;
		if (n == 0)
			return false;
		/* The daemon side closed with input unread (it gave up on the
		 * stream): the kernel reports a reset after the last reply. */
		if (n == -ECONNRESET && c->in_dead && c->b < 0)
			return false;
		fuzz_assert(n > 0, "reply reader fill: %zd (%s)", n, strerror((int)-n));

		for (;;) {
			_cleanup_free_ char *msg = NULL;
			_cleanup_free_ int *fds = NULL;
			size_t len = 0, nfds = 0,
			       want = c->reply_nfds[c->replies_seen % REPLY_RING];
			bool take_fds = c->replies_seen % 2 == 0;
			int r = proto_reader_next(c->replies, &msg, &len, take_fds ? &fds : NULL,
						  &nfds);

			if (r == 0)
				break;
			fuzz_assert(r == 1, "reply reader next: %s", strerror(-r));
			fuzz_assert(c->replies_seen < c->replies_sent,
				    "more replies than were sent");
			fuzz_assert(len == strlen(msg), "reply with embedded NUL");
			if (!take_fds)
				want = 0; /* the reader closed them */
			fuzz_assert(nfds == want, "reply %llu came with %zu fds, was sent with %zu",
				    (unsigned long long)c->replies_seen, nfds, want);
			for (size_t i = 0; i < nfds; i++) {
				int fl = fcntl(fds[i], F_GETFD);
				fuzz_assert(fl >= 0 && (fl & FD_CLOEXEC), "bad reply fd %d",
					    fds[i]);
			}
			close_many(fds, nfds);
			c->replies_seen++;
		}
	}
}

/* One request (an element of a batch or the whole message). */
static json_object *answer_one(json_object *o)
{
	jsonrpc_request req;
	const char *why = NULL;
	int r;

	r = jsonrpc_request_parse(o, &req, &why);
	if (r < 0) {
		fuzz_assert(r == -EINVAL && why, "request_parse: %d without reason", r);
		fuzz_assert(!req.is_notification, "invalid request marked as notification");
		return jsonrpc_error_new(req.id, JSONRPC_INVALID_REQUEST, why, NULL);
	}
	fuzz_assert(req.method, "valid request without method");
	fuzz_assert(req.is_notification == !json_object_object_get_ex(o, "id", NULL),
		    "is_notification does not match the \"id\" member");

	/* Echo what came in, so that arbitrary strings and numbers from the
	 * input get serialised. params go back only at the depth they came
	 * in at ("result" sits where "params" sat), so the reply stays within
	 * the parser's depth limit. */
	if (req.method[0] & 1)
		return jsonrpc_error_new(req.id, JSONRPC_METHOD_NOT_FOUND, req.method,
					 json_object_new_string(req.method));
	return jsonrpc_result_new(req.id, req.params ? json_object_get(req.params)
						     : json_object_new_string(req.method));
}

static json_object *answer(const char *msg, size_t len)
{
	json_object *o = NULL, *reply;
	const char *why = NULL;
	int r;

	r = jsonrpc_parse(msg, len, &o, &why);
	if (r < 0) {
		fuzz_assert((r == -EBADMSG || r == -ERANGE || r == -ENOTUNIQ) && why,
			    "jsonrpc_parse: %d without reason", r);
		/* Carry the raw bytes as data: they hold '\r' and control bytes
		 * that the serialisation must still keep on one line. Bytes that
		 * are not UTF-8 no reply may carry (it would not be JSON), so a
		 * message refused for them is answered without them, as cprd
		 * answers it. */
		return jsonrpc_error_new(
		    NULL, r == -EBADMSG ? JSONRPC_PARSE_ERROR : JSONRPC_INVALID_REQUEST, why,
		    jsonrpc_utf8_valid(msg, len) ? json_object_new_string_len(msg, (int)len)
						 : NULL);
	}

	if (json_object_is_type(o, json_type_array)) {
		size_t n = json_object_array_length(o);

		if (n == 0) {
			reply =
			    jsonrpc_error_new(NULL, JSONRPC_INVALID_REQUEST, "empty batch", NULL);
		} else {
			reply = json_object_new_array();
			fuzz_assert(reply, "out of memory");
			for (size_t i = 0; i < n; i++) {
				json_object *e = answer_one(json_object_array_get_idx(o, i));
				fuzz_assert(e, "reply builder returned NULL");
				fuzz_assert(json_object_array_add(reply, e) == 0, "array_add");
			}
		}
	} else {
		reply = answer_one(o);
	}
	json_object_put(o);
	return reply;
}

/* ---- the daemon side -------------------------------------------------- */

static void take_messages(fuzz_ctx *c)
{
	while (!c->in_dead) {
		_cleanup_free_ char *msg = NULL;
		_cleanup_free_ int *fds = NULL;
		size_t len = 0, nfds = 0;
		int r = proto_reader_next(c->in, &msg, &len, &fds, &nfds);

		if (r == 0)
			break;
		if (r < 0) {
			/* -EBADMSG (fds on a blank line) or -EMSGSIZE: the daemon
			 * answers with an error and closes the connection. */
			fuzz_assert(r == -EBADMSG || r == -EMSGSIZE, "reader next: %s",
				    strerror(-r));
			c->in_dead = true;
			c->dead_why = -r;
			send_reply(c,
				   jsonrpc_error_new(NULL, JSONRPC_ERR_BAD_FDS, strerror(-r), NULL),
				   NULL, 0);
			break;
		}
		fuzz_assert(r == 1 && msg, "reader next returned %d", r);
		fuzz_assert(len > 0 && len <= FUZZ_MAX_MSG, "message length %zu", len);
		fuzz_assert(msg[len] == '\0', "message not NUL-terminated");
		fuzz_assert(!memchr(msg, '\n', len), "message holds a newline");
		fuzz_assert(nfds <= PROTO_MAX_FDS && (nfds == 0) == (fds == NULL),
			    "nfds %zu fds %p", nfds, (void *)fds);
		for (size_t i = 0; i < nfds; i++) {
			int fl = fcntl(fds[i], F_GETFD);
			fuzz_assert(fl >= 0 && (fl & FD_CLOEXEC), "bad received fd %d", fds[i]);
		}
		c->messages++;

		send_reply(c, answer(msg, len), fds, nfds);
		close_many(fds, nfds);
	}
	flush_replies(c);
}

/* What the daemon does when the socket is readable, until it would block. */
static void daemon_read(fuzz_ctx *c)
{
	while (!c->in_dead && !c->in_eof) {
		ssize_t n = proto_reader_fill(c->in, c->b);

		if (n == -EAGAIN)
			return;
		if (n == 0) {
			c->in_eof = true;
			(void)proto_reader_has_partial(c->in);
			return;
		}
		if (n < 0) {
			fuzz_assert(n == -EMSGSIZE || n == -EBADMSG || n == -ETOOMANYREFS,
				    "reader fill: %s", strerror((int)-n));
			c->in_dead = true;
			c->dead_why = (int)-n;
			send_reply(c,
				   jsonrpc_error_new(NULL,
						     n == -EMSGSIZE ? JSONRPC_ERR_TOO_LARGE
								    : JSONRPC_ERR_BAD_FDS,
						     strerror((int)-n), NULL),
				   NULL, 0);
			flush_replies(c);
			return;
		}
		take_messages(c);
	}
}

/* ---- entry points ----------------------------------------------------- */

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	char buf[256];

	signal(SIGPIPE, SIG_IGN);
	verbose = getenv("FUZZ_PROTO_VERBOSE") != NULL;
	/* The sanitizers symbolize lazily (for a report, or to match a
	 * suppression) and keep the external symbolizer's pipes open from
	 * then on; start it now so its fds exist before any fd snapshot. */
	__sanitizer_symbolize_pc((void *)(uintptr_t)LLVMFuzzerTestOneInput, "%p %F %L", buf,
				 sizeof(buf));
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	bool before[FD_PROBE], after[FD_PROBE];
	int lo = lowest_free_fd(), sv[2], r;
	uint8_t mode = size >= 2 ? data[0] : 0, param = size >= 2 ? data[1] : 0;
	unsigned pattern = mode & 7, fd_mode = (mode >> 3) & 3, fd_sel = mode >> 5;
	const uint8_t *p = size >= 2 ? data + 2 : data;
	size_t left = size >= 2 ? size - 2 : size, idx = 0;
	uint32_t rng = 0x01000193u * (param + 1u);
	int fdv[MAX_SEND_FDS];
	fuzz_ctx c = { .a = -1, .b = -1, .devnull = -1, .flush_each = param & 0x80 };

	fd_snapshot(lo, before);

	r = socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv);
	fuzz_assert(r == 0, "socketpair: %s", strerror(errno));
	c.a = sv[0];
	c.b = sv[1];
	c.devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
	fuzz_assert(c.devnull >= 0, "open /dev/null: %s", strerror(errno));
	for (size_t i = 0; i < ELEMENTSOF(fdv); i++)
		fdv[i] = c.devnull;

	fuzz_assert(proto_reader_new(FUZZ_MAX_MSG, &c.in) == 0, "proto_reader_new");
	fuzz_assert(proto_reader_new(REPLY_MAX_MSG, &c.replies) == 0, "proto_reader_new");
	fuzz_assert(proto_writer_new(&c.out) == 0, "proto_writer_new");

	while (left > 0 && !c.in_dead) {
		size_t n = chunk_len(pattern, param, &rng, idx, p, left);
		size_t nfds = chunk_nfds(fd_mode, fd_sel, &rng, idx);
		ssize_t k;

		for (int tries = 0;; tries++) {
			k = proto_send_fds(c.a, p, n, nfds > 0 ? fdv : NULL, nfds);
			if (k != -EAGAIN)
				break;
			fuzz_assert(tries < 1000, "sender makes no progress");
			daemon_read(&c);
			if (c.in_dead)
				break;
		}
		if (c.in_dead)
			break;
		fuzz_assert(k > 0 && (size_t)k <= n, "proto_send_fds: %zd (%s)", k,
			    k < 0 ? strerror((int)-k) : "short");
		p += k;
		left -= (size_t)k;
		idx++;
		daemon_read(&c);
	}

	/* The client hangs up; the daemon reads to EOF (unless it gave up). */
	fuzz_assert(shutdown(c.a, SHUT_WR) == 0, "shutdown: %s", strerror(errno));
	daemon_read(&c);
	fuzz_assert(c.in_dead || c.in_eof, "daemon side neither at EOF nor closed");
	fuzz_assert(proto_writer_is_empty(c.out), "replies left unsent");
	fuzz_assert(proto_writer_queued_bytes(c.out) == 0, "queued bytes without messages");

	/* The daemon closes; the client reads every reply to EOF. */
	c.out = proto_writer_free(c.out);
	c.in = proto_reader_free(c.in);
	c.b = safe_close(c.b);
	for (int tries = 0; drain_replies(&c); tries++)
		fuzz_assert(tries < 1000, "no EOF after the daemon side closed");
	fuzz_assert(!proto_reader_has_partial(c.replies), "a reply arrived cut off");
	fuzz_assert(c.replies_seen == c.replies_sent && c.replies_sent >= c.messages,
		    "%llu messages, %llu replies sent, %llu received",
		    (unsigned long long)c.messages, (unsigned long long)c.replies_sent,
		    (unsigned long long)c.replies_seen);

	if (verbose)
		fprintf(
		    stderr,
		    "fuzz_proto: mode %#x param %u: %zu chunks, %llu messages, %llu replies, %s\n",
		    mode, param, idx, (unsigned long long)c.messages,
		    (unsigned long long)c.replies_seen, c.in_dead ? strerror(c.dead_why) : "EOF");
	c.replies = proto_reader_free(c.replies);
	c.a = safe_close(c.a);
	c.devnull = safe_close(c.devnull);

	/* No fd may outlive the iteration. */
	r = lowest_free_fd();
	fuzz_assert(r == lo, "lowest free fd was %d, now %d: an fd leaked", lo, r);
	fd_snapshot(lo, after);
	for (int i = 0; i < FD_PROBE; i++)
		fuzz_assert(before[i] == after[i], "fd %d was %s and is now %s", lo + i,
			    before[i] ? "open" : "closed", after[i] ? "open" : "closed");
	return 0;
}
