/* SPDX-License-Identifier: MIT */
#include <fcntl.h>
#include <poll.h>
#include <grp.h>
#include <malloc.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <systemd/sd-daemon.h>

#include "common/json.h"
#include "daemon/observe/log.h"
#include "daemon/core/server.h"
#include "daemon/observe/stats.h"
#include "daemon/core/vmm.h"
#include "proto/frame.h"
#include "proto/jsonrpc.h"

#define CLIENT_MAX_MSG (256 * 1024) /* requests are small; 256 KiB is generous */
#define CLIENT_MAX_QUEUED (8 << 20) /* over this a client is dropped at once */
#define CLIENT_MAX_CALLS 64         /* calls in flight per connection */
#define TRIM_AT (1 << 20)           /* peers' memory freed since the last trim: trim again */
#define TRIM_DELAY_SEC 0.5          /* ... this long after, so that trims coalesce */
#define CLIENT_TRIM_MSG (64 << 10)  /* parsing a message this large left as much in pieces */
#define JSON_C_COST 4         /* json-c's tree of a message takes about this many times its text */
#define ACCEPT_PAUSE_SEC 0.25 /* out of fds: accept nothing for this long */
#define CLIENT_BURST 4 /* messages a privileged client runs per turn before others get theirs */
#define CLIENT_MAX_COUNT 1024
#define SUBSCRIBER_LINGER 10.0 /* a dropped subscriber's last chance to read */

struct client {
	struct daemon *d;
	int fd;
	ev_io watcher;
	proto_reader *in;
	proto_writer *out;
	struct ucred peer;
	bool privileged;
	bool closing;           /* flush what is queued, then close */
	bool eof;               /* peer sends no more: answer calls in flight, then close */
	bool dead;              /* fd closed; waiting for its calls to finish */
	bool backlog;           /* complete messages wait in the reader for their turn */
	bool subscriber;        /* events.subscribe: every event is sent here too */
	ev_timer linger;        /* a dropped subscriber is closed when it fires */
	server_drop_fn dropped; /* a subscriber's last event, when it is dropped */
	unsigned refs;
	unsigned calls;
	size_t accounted;      /* its part of d->out_queued */
	ev_tstamp last_active; /* a message came or a reply went out */
	ev_tstamp over_since;  /* over its share of the output budget; 0: not */
	ev_timer timer;        /* idle timeout, or dropped for staying over its share */
	ev_idle resume;        /* runs the backlog once the loop has nothing else */
	struct batch *running; /* a batch whose calls are being dispatched, one a turn */
	size_t held;           /* what running's parsed calls take (counted as unread replies) */
	struct client *prev, *next;
};

/* A batch answers once all its calls finished, as one array. */
struct batch {
	struct client *client;
	json_object *calls; /* the requests; NULL once all were dispatched */
	size_t next;        /* the next one to dispatch */
	char *text;         /* "[reply,reply,...": each reply is serialised when it comes */
	size_t len;
	size_t n; /* replies in text */
	unsigned pending;
	bool sealed; /* all calls dispatched */
	bool in_run; /* batch_run() is dispatching: it seals, not client_close() */
};

struct call {
	struct client *client;
	struct batch *batch;
	json_object *id; /* borrowed reference; NULL is JSON null */
	const struct method *method;
	bool notification; /* no "id" member: never answered */
	int fds[PROTO_MAX_FDS];
	size_t nfds;
	bool done;
};

static void client_unref(struct client *c);
static void client_close(struct client *c);
static void client_update_watcher(struct client *c);
static void client_process(struct client *c, unsigned max);

static bool peer_is_privileged(struct daemon *d, int fd, const struct ucred *cred)
{
	gid_t groups[256];
	socklen_t len = sizeof(groups);

	if (cred->uid == 0)
		return true;
	if (!d->have_group)
		return false;
	if (cred->gid == d->group)
		return true;
	/* SO_PEERGROUPS gives the supplementary groups the peer had at connect. */
	if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups, &len) < 0)
		return false;
	for (size_t i = 0; i < len / sizeof(gid_t); i++)
		if (groups[i] == d->group)
			return true;
	return false;
}

/* ---- memory ---- */

/* Megabytes of replies or events freed in small pieces stay in malloc's
 * free lists: RSS would stay at the peak a peer's attack reached, and the
 * next attack would find cprd larger still. Once a megabyte of what peers
 * made cprd hold was freed, malloc_trim() gives it back, a moment later,
 * so that a thousand departing peers cost one trim, not a thousand. */
static void trim_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct daemon *d = w->data;

	d->trim_released = 0;
	malloc_trim(0);
}

static void released(struct daemon *d, size_t bytes)
{
	d->trim_released += bytes;
	if (d->trim_released >= TRIM_AT && !ev_is_active(&d->trim)) {
		ev_timer_set(&d->trim, TRIM_DELAY_SEC, 0.);
		ev_timer_start(d->loop, &d->trim);
	}
}

/* ---- sending ---- */

/* Keep d->out_queued, the memory all clients' unread replies and events
 * take, in step. */
static void client_account(struct client *c)
{
	size_t q = c->dead ? 0 : proto_writer_footprint(c->out) + c->held;

	if (q < c->accounted)
		released(c->d, c->accounted - q);
	c->d->out_queued = c->d->out_queued - c->accounted + q;
	c->accounted = q;
}

static bool client_over_share(const struct client *c)
{
	return limits_out_check(&c->d->limits, c->d->n_clients, c->accounted, c->d->out_queued) !=
	       OUT_OK;
}

static void client_drop(struct client *c, const char *why)
{
	log_ratelimited(&c->d->rl_dropped, LOG_WARNING,
			"client pid %d uid %u: dropping the connection: %s (%zu bytes unread, %zu "
			"by all clients)",
			(int)c->peer.pid, (unsigned)c->peer.uid, why, c->accounted,
			c->d->out_queued);
	client_close(c); /* what is queued is freed with the client */
}

static void client_queue(struct client *c, const char *s, size_t len, const int *fds, size_t nfds)
{
	int r;

	if (c->dead || c->closing)
		return;
	r = s ? proto_writer_queue(c->out, s, len, fds, nfds) : -ENOMEM;
	client_account(c);
	/* An answer is traffic: a call that ran for minutes (vm.update) must
	 * not find its connection idle the moment it ends. */
	c->last_active = ev_now(c->d->loop);
	if (r < 0) {
		client_drop(c, strerror(-r));
		return;
	}
	if (c->accounted > CLIENT_MAX_QUEUED) {
		client_drop(c, "it does not read its replies");
		return;
	}
	/* Over its share it is no longer read from (client_update_watcher);
	 * over its share while all clients together are over the budget, it
	 * goes now: memory for unread replies is bounded for the whole daemon. */
	if (limits_out_check(&c->d->limits, c->d->n_clients, c->accounted, c->d->out_queued) ==
	    OUT_DROP) {
		client_drop(c, "it does not read its replies and the budget for unread replies "
			       "is spent");
		return;
	}
	client_update_watcher(c);
}

static void client_send(struct client *c, json_object *msg, const int *fds, size_t nfds)
{
	size_t len = 0;
	const char *s = jsonrpc_to_string(msg, &len);

	client_queue(c, s, len, fds, nfds);
}

static bool batch_append(struct batch *b, const char *s, size_t len)
{
	char *t = realloc(b->text, b->len + len + 2); /* a ',' or '[' and a ']' */

	if (!t)
		return false;
	b->text = t;
	b->text[b->len++] = b->n++ ? ',' : '[';
	memcpy(b->text + b->len, s, len);
	b->len += len;
	return true;
}

/* A batch's answer is kept as text, not as json-c objects (several times
 * larger), and bounded: a call whose answer would make it larger than
 * LIMITS_BATCH_MAX_REPLY is answered with an error instead. */
static void batch_add(struct batch *b, json_object *reply)
{
	_cleanup_json_ json_object *e = NULL;
	size_t len = 0;
	const char *s = jsonrpc_to_string(reply, &len);

	if (s && b->len + len + 2 > LIMITS_BATCH_MAX_REPLY) {
		json_object *id = NULL;

		json_object_object_get_ex(reply, "id", &id);
		e = jsonrpc_error_new(id, JSONRPC_ERR_TOO_LARGE,
				      "this batch's answer would exceed 4 MiB; this call's "
				      "answer was left out (send fewer calls per batch)",
				      NULL);
		s = jsonrpc_to_string(e, &len);
	}
	/* Out of memory: this reply is lost, the batch still answers the rest. */
	if (s)
		(void)batch_append(b, s, len);
	json_object_put(reply);
}

static void batch_finish_one(struct batch *b, json_object *reply)
{
	if (reply)
		batch_add(b, reply);
	b->pending--;
	if (b->pending > 0 || !b->sealed)
		return;
	if (b->n > 0) {
		b->text[b->len++] = ']';
		client_queue(b->client, b->text, b->len, NULL, 0);
	}
	free(b->text);
	json_object_put(b->calls);
	client_unref(b->client);
	free(b);
}

static void call_free(struct call *c)
{
	close_many(c->fds, c->nfds);
	json_object_put(c->id);
	free(c);
}

/* Every finish goes through here: reply is NULL for notifications. */
static void call_finish(struct call *c, json_object *reply, const int *fds, size_t nfds)
{
	struct client *cl = c->client;

	if (c->done) {
		json_object_put(reply);
		return;
	}
	c->done = true;
	/* Fds the handler did not take are closed before the peer hears back. */
	c->nfds = (close_many(c->fds, c->nfds), 0);
	if (c->notification) {
		json_object_put(reply);
		reply = NULL;
	}
	cl->calls--;
	if (c->batch) {
		batch_finish_one(c->batch, reply); /* fds cannot ride in a batch */
	} else if (reply) {
		client_send(cl, reply, fds, nfds);
		json_object_put(reply);
	}
	call_free(c);
	client_update_watcher(cl);
	client_unref(cl);
}

void call_reply_fds(struct call *c, json_object *result, const int *fds, size_t nfds)
{
	call_finish(c, jsonrpc_result_new(c->id, result), fds, nfds);
}

void call_reply(struct call *c, json_object *result)
{
	call_reply_fds(c, result, NULL, 0);
}

/* Every error's data says its kind (and the parameter it is about): a
 * data object the caller gives (an update's report) gets them added, what
 * it already has is kept. */
static json_object *error_data(int code, json_object *data, const char *param)
{
	if (!data)
		return jsonrpc_error_data_new(code, param);
	if (!json_object_is_type(data, json_type_object))
		return data;
	if (!json_object_object_get_ex(data, "kind", NULL))
		json_object_object_add(data, "kind",
				       json_object_new_string(jsonrpc_error_kind(code)));
	if (param && !json_object_object_get_ex(data, "param", NULL))
		json_object_object_add(data, "param", json_object_new_string(param));
	return data;
}

static void call_failv(struct call *c, int code, json_object *data, const char *param,
		       const char *fmt, va_list ap)
{
	_cleanup_free_ char *msg = NULL;

	if (vasprintf(&msg, fmt, ap) < 0)
		msg = NULL;
	data = error_data(code, data, param);
	call_finish(c, jsonrpc_error_new(c->id, code, msg ? msg : "out of memory", data), NULL, 0);
}

void call_fail(struct call *c, int code, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	call_failv(c, code, NULL, NULL, fmt, ap);
	va_end(ap);
}

void call_fail_data(struct call *c, int code, json_object *data, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	call_failv(c, code, data, NULL, fmt, ap);
	va_end(ap);
}

void call_fail_param(struct call *c, int code, const char *param, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	call_failv(c, code, NULL, param, fmt, ap);
	va_end(ap);
}

const struct method *call_method(const struct call *c)
{
	return c->method;
}

const char *param_type_to_string(enum param_type t)
{
	switch (t) {
	case PARAM_STRING:
		return "string";
	case PARAM_UINT:
		return "uint";
	case PARAM_SIZE:
		return "size";
	case PARAM_BOOL:
		return "bool";
	case PARAM_STRINGS:
		return "strings";
	case PARAM_OBJECTS:
		return "objects";
	}
	return "?";
}

const char *method_permission(const struct method *m)
{
	if (!(m->flags & METHOD_MUTATING))
		return "read";
	return m->flags & METHOD_OWN_VMM ? "mutating-or-own-vmm" : "mutating";
}

size_t call_nfds(const struct call *c)
{
	return c->nfds;
}

int call_take_fd(struct call *c, size_t i)
{
	return i < c->nfds ? TAKE_FD(c->fds[i]) : -EBADF;
}

const struct ucred *call_peer(const struct call *c)
{
	return &c->client->peer;
}

bool call_peer_privileged(const struct call *c)
{
	return c->client->privileged;
}

int call_peer_creds(const struct call *c, struct creds *ret)
{
	gid_t groups[CREDS_GROUPS_MAX];
	socklen_t len = sizeof(groups);

	if (c->client->dead)
		return -ENOTCONN;
	/* The groups the peer had when it connected, as its uid and gid. */
	if (getsockopt(c->client->fd, SOL_SOCKET, SO_PEERGROUPS, groups, &len) < 0)
		return errno == ERANGE ? -E2BIG : -errno;
	*ret = (struct creds){ .uid = c->client->peer.uid, .gid = c->client->peer.gid };
	ret->ngroups = len / sizeof(gid_t);
	memcpy(ret->groups, groups, len);
	return 0;
}

/* ---- event subscribers ---- */

int call_subscribe(struct call *c)
{
	if (c->client->dead || c->client->closing)
		return -ENOTCONN;
	c->client->subscriber = true;
	return 0;
}

size_t server_subscribers(const struct daemon *d)
{
	size_t n = 0;

	for (const struct client *c = d->clients; c; c = c->next)
		n += c->subscriber && !c->closing;
	return n;
}

/* The subscriber's queue is past its cap, or past its share of the
 * budget while the budget is spent: its last message says why, and it has
 * SUBSCRIBER_LINGER seconds to read what is queued before it is closed.
 * What it holds is bounded by the cap plus two messages. */
static void subscriber_drop(struct client *c, const char *why, server_drop_fn dropped)
{
	size_t queued = proto_writer_queued_bytes(c->out);
	_cleanup_json_ json_object *last = dropped(c->d, queued);
	const char *s;
	size_t len;

	log_ratelimited(&c->d->rl_events, LOG_WARNING,
			"client pid %d uid %u: dropping its event subscription: %s (%zu bytes "
			"queued, %zu by all clients)",
			(int)c->peer.pid, (unsigned)c->peer.uid, why, queued, c->d->out_queued);
	s = last ? jsonrpc_to_string(last, &len) : NULL;
	if (!s || proto_writer_queue(c->out, s, len, NULL, 0) < 0) {
		client_close(c);
		return;
	}
	client_account(c);
	c->closing = true;
	ev_timer_set(&c->linger, SUBSCRIBER_LINGER, 0.);
	ev_timer_start(c->d->loop, &c->linger);
	client_update_watcher(c);
}

/* Events queued for a subscriber are unread replies like any other: they
 * count against the same budget (client_account()), and cost the
 * subscriber its subscription where a reply would cost a client its
 * connection. */
static void subscriber_queue(struct client *c, const char *s, size_t len, size_t max_queued,
			     server_drop_fn dropped)
{
	int r = proto_writer_queue(c->out, s, len, NULL, 0);

	c->dropped = dropped;
	client_account(c);
	if (r < 0)
		subscriber_drop(c, strerror(-r), dropped);
	else if (proto_writer_queued_bytes(c->out) > max_queued)
		subscriber_drop(c, "it does not read its events", dropped);
	else if (limits_out_check(&c->d->limits, c->d->n_clients, c->accounted, c->d->out_queued) ==
		 OUT_DROP)
		subscriber_drop(c,
				"it does not read its events and the budget for unread replies "
				"is spent",
				dropped);
	else
		client_update_watcher(c);
}

void server_notify_subscribers(struct daemon *d, json_object *msg, size_t max_queued,
			       server_drop_fn dropped)
{
	struct client *c, *next;
	const char *s = NULL;
	size_t len = 0;

	for (c = d->clients; c; c = next) {
		next = c->next; /* a dropped client may leave the list */
		if (!c->subscriber || c->closing || c->dead)
			continue;
		if (!s && !(s = jsonrpc_to_string(msg, &len)))
			return;
		subscriber_queue(c, s, len, max_queued, dropped);
	}
}

/* ---- dispatch ---- */

static struct call *call_new(struct client *cl, struct batch *b, const jsonrpc_request *req,
			     const struct method *m)
{
	struct call *c = calloc(1, sizeof(*c));

	if (!c)
		return NULL;
	c->client = cl;
	c->batch = b;
	c->method = m;
	c->id = json_object_get(req->id); /* json-c: NULL stays NULL */
	c->notification = req->is_notification;
	cl->refs++;
	cl->calls++;
	if (b)
		b->pending++;
	return c;
}

/* Answer an error for a request that never became a call. */
static void reply_error(struct client *cl, struct batch *b, json_object *id, int code,
			const char *msg)
{
	json_object *e = jsonrpc_error_new(id, code, msg, jsonrpc_error_data_new(code, NULL));

	if (b) {
		if (e)
			batch_add(b, e);
		return;
	}
	client_send(cl, e, NULL, 0);
	json_object_put(e);
}

/* The length of s cut to at most max bytes, never inside a character: a
 * reply must stay valid UTF-8. */
static size_t utf8_prefix(const char *s, size_t max)
{
	size_t n = strnlen(s, max + 1);

	if (n <= max)
		return n;
	n = max;
	while (n > 0 && ((unsigned char)s[n] & 0xc0) == 0x80)
		n--;
	return n;
}

static const struct method *method_find(const struct daemon *d, const char *name)
{
	for (size_t i = 0; i < d->n_methods; i++)
		if (streq(d->methods[i].name, name))
			return &d->methods[i];
	return NULL;
}

static void dispatch_one(struct client *cl, struct batch *b, json_object *o, int *fds, size_t nfds)
{
	jsonrpc_request req = {};
	const struct method *m;
	const char *why = NULL;
	struct stats_mark t0;
	struct call *c;
	char msg[160];

	stats_mark(&t0);
	if (jsonrpc_request_parse(o, &req, &why) < 0) {
		close_many(fds, nfds);
		reply_error(cl, b, req.id, JSONRPC_INVALID_REQUEST, why);
		return;
	}
	m = method_find(cl->d, req.method);
	if (!m) {
		close_many(fds, nfds);
		snprintf(msg, sizeof(msg), "unknown method '%.*s'",
			 (int)utf8_prefix(req.method, 100), req.method);
		if (!req.is_notification)
			reply_error(cl, b, req.id, JSONRPC_METHOD_NOT_FOUND, msg);
		return;
	}
	c = cl->calls < CLIENT_MAX_CALLS ? call_new(cl, b, &req, m) : NULL;
	if (!c) {
		close_many(fds, nfds);
		if (!req.is_notification)
			reply_error(cl, b, req.id, JSONRPC_ERR_BUSY,
				    "too many calls in flight on this connection");
		return;
	}
	if (nfds > 0) /* fds is NULL when none came: memcpy's arguments must not be */
		memcpy(c->fds, fds, nfds * sizeof(int));
	c->nfds = nfds;
	if (nfds > 0 && !(m->flags & METHOD_TAKES_FDS)) {
		call_fail(c, JSONRPC_ERR_BAD_FDS,
			  "method '%s' takes no fds, but %zu came with it (closed)", m->name, nfds);
		return;
	}
	if ((m->flags & METHOD_MUTATING) && !(m->flags & METHOD_OWN_VMM) && !cl->privileged) {
		call_fail(c, JSONRPC_ERR_PERMISSION,
			  "permission denied: '%s' changes state and needs root or group 'cprd' "
			  "(peer uid %u)",
			  m->name, (unsigned)cl->peer.uid);
		return;
	}
	if (req.params && !json_object_is_type(req.params, json_type_object)) {
		call_fail(c, JSONRPC_INVALID_PARAMS, "params must be an object with named members");
		return;
	}
	m->fn(cl->d, c, req.params);
	/* Until the reply was queued, or the handler handed the call on. */
	stats_request(cl->d, m, &t0);
}

/* Dispatch at most max more calls of the client's running batch; once
 * every call was, the batch is sealed and answers when they have. */
static void batch_run(struct batch *b, size_t max)
{
	struct client *cl = b->client;
	size_t n = json_object_array_length(b->calls);

	/* A call may close the client; client_close() then leaves the batch
	 * to this loop, which is still reading it. */
	b->in_run = true;
	for (; max > 0 && b->next < n && !cl->dead; max--)
		dispatch_one(cl, b, json_object_array_get_idx(b->calls, b->next++), NULL, 0);
	b->in_run = false;
	if (b->next < n && !cl->dead && !cl->closing)
		return;
	/* All dispatched, or the client is gone: what was not run never will. */
	cl->running = NULL;
	cl->held = 0;
	b->calls = (json_object_put(b->calls), NULL);
	client_account(cl);
	b->sealed = true;
	batch_finish_one(b, NULL);
}

static void dispatch_batch(struct client *cl, json_object *arr, size_t len, int *fds, size_t nfds)
{
	size_t n = json_object_array_length(arr);
	struct batch *b;

	if (n == 0) {
		reply_error(cl, NULL, NULL, JSONRPC_INVALID_REQUEST, "empty batch");
		close_many(fds, nfds);
		return;
	}
	if (nfds > 0) {
		reply_error(cl, NULL, NULL, JSONRPC_ERR_BAD_FDS,
			    "fds may only accompany a single request, not a batch (closed)");
		close_many(fds, nfds);
		return;
	}
	/* Each call costs what its answer costs: a batch may not multiply
	 * that without bound (thousands of vm.list fit in one message). */
	if (n > LIMITS_BATCH_MAX_CALLS) {
		char msg[128];

		snprintf(msg, sizeof(msg),
			 "batch of %zu calls exceeds the limit of %d calls per batch; none was run",
			 n, LIMITS_BATCH_MAX_CALLS);
		reply_error(cl, NULL, NULL, JSONRPC_ERR_TOO_LARGE, msg);
		return;
	}
	b = calloc(1, sizeof(*b));
	if (!b) {
		reply_error(cl, NULL, NULL, JSONRPC_INTERNAL_ERROR, "out of memory");
		return;
	}
	b->client = cl;
	cl->refs++;
	b->calls = json_object_get(arr);
	b->pending = 1; /* held until every element is dispatched */
	cl->running = b;
	/* Root and group cprd have the whole batch run now; anyone else one
	 * call of it per turn, from the client's idle watcher: what its
	 * calls take meanwhile counts against the budget, as its replies do. */
	if (!cl->privileged) {
		cl->held = len * JSON_C_COST;
		client_account(cl);
	}
	batch_run(b, cl->privileged ? n : 1);
}

static void handle_message(struct client *cl, const char *line, size_t len, int *fds, size_t nfds)
{
	_cleanup_json_ json_object *o = NULL;
	const char *why = NULL;
	int r;

	r = jsonrpc_parse(line, len, &o, &why);
	if (r < 0) {
		/* Valid JSON, but no request can be read from it as sent. */
		reply_error(cl, NULL, NULL,
			    r == -ERANGE || r == -ENOTUNIQ ? JSONRPC_INVALID_REQUEST
							   : JSONRPC_PARSE_ERROR,
			    why ? why : "parse error");
		close_many(fds, nfds);
		return;
	}
	if (json_object_is_type(o, json_type_array))
		dispatch_batch(cl, o, len, fds, nfds);
	else
		dispatch_one(cl, NULL, o, fds, nfds);
}

/* ---- connection I/O ---- */

static void client_close(struct client *c)
{
	if (c->dead)
		return;
	ev_io_stop(c->d->loop, &c->watcher); /* before the fd goes */
	ev_timer_stop(c->d->loop, &c->timer);
	ev_idle_stop(c->d->loop, &c->resume);
	ev_timer_stop(c->d->loop, &c->linger);
	c->fd = safe_close(c->fd);
	c->dead = true;
	if (c->running && !c->running->in_run)
		batch_run(c->running, 0); /* the calls not run yet never will be */
	client_account(c);                /* no longer counted: its replies go nowhere */
	c->d->n_clients--;
	if (c->prev)
		c->prev->next = c->next;
	else
		c->d->clients = c->next;
	if (c->next)
		c->next->prev = c->prev;
	c->prev = c->next = NULL;
	client_unref(c);
}

static void client_unref(struct client *c)
{
	if (--c->refs > 0)
		return;
	proto_reader_free(c->in);
	proto_writer_free(c->out);
	free(c);
}

/* The VMM of one of our VMs: its connection is never idle-closed. */
static bool client_is_vmm(const struct client *c)
{
	for (const struct vmm *v = c->d->vmms; v; v = v->daemon_next)
		if (v->pid > 0 && v->pid == c->peer.pid)
			return true;
	return false;
}

/* One timer per client, at whichever comes first: the end of its grace
 * over its share of the output budget, or its idle timeout (only while no
 * call is in flight: vm.create and vm.update may take minutes). */
static void client_arm_timer(struct client *c)
{
	struct daemon *d = c->d;
	ev_tstamp now = ev_now(d->loop), at = 0;

	if (c->dead)
		return;
	if (client_over_share(c)) {
		if (c->over_since == 0)
			c->over_since = now;
		at = c->over_since + LIMITS_OUT_OVER_SEC;
	} else {
		c->over_since = 0;
	}
	if (d->limits.idle_timeout_sec > 0 && c->calls == 0) {
		ev_tstamp idle = c->last_active + d->limits.idle_timeout_sec;

		if (at == 0 || idle < at)
			at = idle;
	}
	ev_timer_stop(d->loop, &c->timer);
	if (at == 0)
		return;
	ev_timer_set(&c->timer, at > now ? at - now : 0, 0);
	ev_timer_start(d->loop, &c->timer);
}

static void client_update_watcher(struct client *c)
{
	/* Back-pressure: a client over its share of the output budget is not
	 * read from (no new calls) until it has read its replies. */
	bool waiting = c->backlog || c->running; /* work it sent waits for its turn */
	int events = c->closing || c->eof || waiting || client_over_share(c) ? 0 : EV_READ;

	if (c->dead)
		return;
	if (!proto_writer_is_empty(c->out))
		events |= EV_WRITE;
	if (events == 0) {
		/* Nothing to read or write: done unless calls still owe answers
		 * or messages wait for their turn. */
		if (!waiting && (c->closing || c->calls == 0)) {
			client_close(c);
			return;
		}
		ev_io_stop(c->d->loop, &c->watcher);
	} else if (c->watcher.events != events || !ev_is_active(&c->watcher)) {
		ev_io_stop(c->d->loop, &c->watcher);
		ev_io_set(&c->watcher, c->fd, events);
		ev_io_start(c->d->loop, &c->watcher);
	}
	client_arm_timer(c);
}

/* A last word to a peer about to be closed: best effort, never waits. */
static void notice_and_close(int fd, int code, const char *msg)
{
	_cleanup_json_ json_object *e = jsonrpc_error_new(NULL, code, msg, NULL);
	size_t len = 0;
	const char *s = e ? jsonrpc_to_string(e, &len) : NULL;
	struct iovec iov[2] = { { (void *)s, len }, { (void *)"\n", 1 } };
	struct msghdr mh = { .msg_iov = iov, .msg_iovlen = 2 };

	if (s)
		(void)sendmsg(fd, &mh, MSG_DONTWAIT | MSG_NOSIGNAL);
	safe_close(fd);
}

static void client_timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct client *c = w->data;
	struct daemon *d = c->d;
	ev_tstamp now = ev_now(loop);
	char msg[96];

	if (c->over_since > 0 && client_over_share(c) &&
	    now >= c->over_since + LIMITS_OUT_OVER_SEC) {
		/* A subscriber is told, as when it passes its cap. */
		if (c->subscriber && c->dropped && !c->closing)
			subscriber_drop(c,
					"it stayed over its share of the budget for unread replies",
					c->dropped);
		else
			client_drop(c, "it stayed over its share of the budget for unread replies");
		return;
	}
	if (d->limits.idle_timeout_sec > 0 && c->calls == 0 &&
	    now >= c->last_active + d->limits.idle_timeout_sec) {
		if (client_is_vmm(c)) {
			c->last_active = now;
		} else {
			log_ratelimited(
			    &d->rl_idle, LOG_INFO,
			    "client pid %d uid %u: idle for %u s; closing the connection",
			    (int)c->peer.pid, (unsigned)c->peer.uid, d->limits.idle_timeout_sec);
			snprintf(msg, sizeof(msg),
				 "connection idle for %u s with no call in flight; closed",
				 d->limits.idle_timeout_sec);
			ev_io_stop(loop, &c->watcher);
			ev_timer_stop(loop, &c->timer);
			notice_and_close(TAKE_FD(c->fd), JSONRPC_ERR_TIMEOUT, msg);
			client_close(c);
			return;
		}
	}
	client_arm_timer(c);
}

static void client_fail_stream(struct client *c, int code, const char *msg)
{
	/* A peer can make this happen on every connection it has. */
	log_ratelimited(&c->d->rl_stream, LOG_WARNING,
			"client pid %d uid %u: %s; closing the connection", (int)c->peer.pid,
			(unsigned)c->peer.uid, msg);
	reply_error(c, NULL, NULL, code, msg);
	c->closing = true;
	client_update_watcher(c);
}

/* Run at most max of the complete messages buffered, and none once the
 * client is over its share of the output budget (the rest wait in the
 * reader, with their fds). What is left runs from an idle watcher, one
 * step per turn, which libev runs only when no I/O is pending; the client
 * is not read from meanwhile. A step is one message, or one call of a
 * batch an unprivileged peer sent. So a peer that pipelines hundreds of
 * batches, or 64 connections that each send one, cannot keep root's
 * request waiting behind more than one call of each: unprivileged peers'
 * messages run only from there (max 0 from their I/O callbacks),
 * privileged peers' at once. */
static void client_process(struct client *c, unsigned max)
{
	unsigned n = 0;

	c->refs++; /* a handler may end up closing the client */
	c->backlog = false;
	if (max == 0)
		c->backlog = true;
	while (!c->backlog && !c->dead && !c->closing && !client_over_share(c)) {
		_cleanup_free_ char *line = NULL;
		_cleanup_free_ int *fds = NULL;
		size_t len, nfds = 0;
		int r;

		if (c->running) {
			batch_run(c->running, 1);
			if (++n >= max) {
				c->backlog = true;
				break;
			}
			continue;
		}
		r = proto_reader_next(c->in, &line, &len, &fds, &nfds);
		if (r == 0)
			break;
		if (r < 0) {
			client_fail_stream(c, JSONRPC_ERR_BAD_FDS,
					   "fds attached to an empty line (closed)");
			break;
		}
		c->last_active = ev_now(c->d->loop);
		handle_message(c, line, len, fds, nfds);
		/* json-c's thousands of small pieces; a batch still held gives
		 * them back when it is done (client_account()). */
		if (len >= CLIENT_TRIM_MSG && !c->held)
			released(c->d, len * JSON_C_COST);
		if (++n >= max) {
			c->backlog = true;
			break;
		}
	}
	if (c->running && c->closing)
		batch_run(c->running, 0); /* its subscription was dropped meanwhile */
	if ((c->backlog || c->running) && !c->dead && !c->closing)
		ev_idle_start(c->d->loop, &c->resume);
	else
		ev_idle_stop(c->d->loop, &c->resume);
	client_unref(c);
}

static void client_resume_cb(struct ev_loop *loop, ev_idle *w, int revents)
{
	struct client *c = w->data;

	c->refs++;
	client_process(c, 1);
	client_update_watcher(c);
	client_unref(c);
}

static void client_read(struct client *c)
{
	ssize_t n = proto_reader_fill(c->in, c->fd);

	if (n == -EAGAIN || n == -EINTR)
		return;
	if (n == 0) {
		if (proto_reader_has_partial(c->in))
			log_ratelimited(&c->d->rl_hangup, LOG_WARNING,
					"client pid %d uid %u hung up in the middle of a message",
					(int)c->peer.pid, (unsigned)c->peer.uid);
		c->eof = true; /* replies to calls in flight still go out */
		return;
	}
	if (n == -EMSGSIZE) {
		char msg[96];
		snprintf(msg, sizeof(msg), "message exceeds the size limit of %d bytes",
			 CLIENT_MAX_MSG);
		client_fail_stream(c, JSONRPC_ERR_TOO_LARGE, msg);
		return;
	}
	if (n == -EBADMSG || n == -ETOOMANYREFS) {
		client_fail_stream(
		    c, JSONRPC_ERR_BAD_FDS,
		    "too many or malformed fds attached (at most 16 per message); all were closed");
		return;
	}
	if (n < 0) {
		client_close(c);
		return;
	}
	client_process(c, c->privileged ? CLIENT_BURST : 0);
}

static void client_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	struct client *c = w->data;
	int r;

	c->refs++;
	if (revents & EV_WRITE) {
		r = proto_writer_flush(c->out, c->fd);
		client_account(c);
		if (r < 0) {
			client_close(c);
			goto out;
		}
		c->last_active = ev_now(loop);
		/* Back under its share: what it sent meanwhile runs now. */
		client_process(c, c->privileged ? CLIENT_BURST : 0);
	}
	if ((revents & EV_READ) && !c->dead)
		client_read(c);
	client_update_watcher(c);
out:
	client_unref(c);
}

/* Out of fds (EMFILE, ENFILE) or kernel memory: the pending connection
 * stays in the backlog and the listening socket stays readable, so
 * accepting again at once would spin. Stop for a moment instead (the
 * libev documentation's advice); idle timeouts and departing peers free
 * fds meanwhile. */
static void accept_pause(struct daemon *d, int err)
{
	ev_io_stop(d->loop, &d->listen_watcher);
	ev_timer_set(&d->accept_pause, ACCEPT_PAUSE_SEC, 0);
	ev_timer_start(d->loop, &d->accept_pause);
	log_ratelimited(&d->rl_nofile, LOG_WARNING,
			"cannot accept a connection: %s; not accepting for %.0f ms (%u connections "
			"open)",
			strerror(err), ACCEPT_PAUSE_SEC * 1000, d->n_clients);
}

static void accept_resume_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct daemon *d = w->data;

	ev_io_start(loop, &d->listen_watcher);
}

static struct peer_counts count_peers(const struct daemon *d, uid_t uid)
{
	struct peer_counts n = {};

	for (const struct client *c = d->clients; c; c = c->next) {
		n.total++;
		n.unprivileged += !c->privileged;
		n.same_uid += c->peer.uid == uid;
	}
	return n;
}

/* Refused: the peer hears why, and the log says so once in a while. */
static void refuse(struct daemon *d, int fd, const struct ucred *peer, enum admit_verdict v)
{
	char msg[160];

	if (v == ADMIT_UID)
		snprintf(msg, sizeof(msg), "too many connections from uid %u (at most %u); closed",
			 (unsigned)peer->uid, d->limits.max_per_uid);
	else
		snprintf(msg, sizeof(msg), "%s (%u open); closed", admit_verdict_to_string(v),
			 d->n_clients);
	log_ratelimited(&d->rl_refused, LOG_WARNING, "refused a connection from pid %d uid %u: %s",
			(int)peer->pid, (unsigned)peer->uid, msg);
	notice_and_close(fd, JSONRPC_ERR_BUSY, msg);
}

static void linger_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct client *c = w->data;

	log_ratelimited(&c->d->rl_events, LOG_WARNING,
			"client pid %d uid %u: closing the dropped event subscription: it read "
			"nothing for %.0f s",
			(int)c->peer.pid, (unsigned)c->peer.uid, SUBSCRIBER_LINGER);
	client_close(c);
}

static void accept_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	struct daemon *d = w->data;
	socklen_t len = sizeof(struct ucred);
	_cleanup_close_ int fd = -EBADF;
	struct ucred peer = {};
	struct peer_counts counts;
	enum admit_verdict v;
	bool privileged;
	struct client *c;

	fd = accept4(d->listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
	if (fd < 0) {
		if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM)
			accept_pause(d, errno);
		return;
	}
	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &peer, &len) < 0) {
		log_ratelimited(&d->rl_refused, LOG_WARNING,
				"refused a connection: cannot read its credentials: %m");
		return;
	}
	privileged = peer_is_privileged(d, fd, &peer);
	counts = count_peers(d, peer.uid);
	v = limits_admit(&d->limits, privileged, peer.uid, &counts);
	if (v != ADMIT_OK) {
		refuse(d, TAKE_FD(fd), &peer, v);
		return;
	}
	c = calloc(1, sizeof(*c));
	if (!c || proto_reader_new(CLIENT_MAX_MSG, &c->in) < 0 || proto_writer_new(&c->out) < 0) {
		if (c)
			proto_reader_free(c->in);
		free(c);
		log_ratelimited(&d->rl_refused, LOG_WARNING,
				"refused a connection from pid %d: out of memory", (int)peer.pid);
		return;
	}
	c->d = d;
	c->fd = TAKE_FD(fd);
	c->refs = 1;
	c->peer = peer;
	c->privileged = privileged;
	c->last_active = ev_now(loop);
	c->next = d->clients;
	if (d->clients)
		d->clients->prev = c;
	d->clients = c;
	d->n_clients++;
	ev_io_init(&c->watcher, client_cb, c->fd, EV_READ);
	c->watcher.data = c;
	ev_init(&c->linger, linger_cb);
	c->linger.data = c;
	ev_io_start(loop, &c->watcher);
	ev_init(&c->timer, client_timer_cb);
	c->timer.data = c;
	ev_idle_init(&c->resume, client_resume_cb);
	c->resume.data = c;
	client_arm_timer(c);
}

static int socket_bind(struct daemon *d)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	_cleanup_close_ int fd = -EBADF, probe = -EBADF;
	struct group *g;

	if (strlen(d->socket_path) >= sizeof(sa.sun_path))
		return -ENAMETOOLONG;
	strcpy(sa.sun_path, d->socket_path);

	/* A socket file nobody listens on is a leftover of a crash. */
	probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (probe < 0)
		return -errno;
	if (connect(probe, (struct sockaddr *)&sa, sizeof(sa)) == 0)
		return -EADDRINUSE;
	if (errno == ECONNREFUSED)
		unlink(d->socket_path);

	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0)
		return -errno;
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
		return -errno;
	g = getgrnam("cprd");
	if (chown(d->socket_path, 0, g ? g->gr_gid : 0) < 0 && geteuid() == 0)
		return -errno;
	if (chmod(d->socket_path, 0660) < 0)
		return -errno;
	if (listen(fd, 128) < 0)
		return -errno;
	d->listen_fd = TAKE_FD(fd);
	return 0;
}

void server_flush_all(struct daemon *d, int timeout_ms)
{
	uint64_t deadline = now_usec(CLOCK_MONOTONIC) + (uint64_t)timeout_ms * 1000;

	for (struct client *c = d->clients; c; c = c->next) {
		while (!c->dead && !proto_writer_is_empty(c->out) &&
		       now_usec(CLOCK_MONOTONIC) < deadline) {
			struct pollfd p = { .fd = c->fd, .events = POLLOUT };

			if (poll(&p, 1, 50) < 0 || proto_writer_flush(c->out, c->fd) < 0)
				break;
		}
	}
}

int server_listen(struct daemon *d, int listen_fd, const struct method *methods, size_t n)
{
	int r, fl;

	d->methods = methods;
	d->n_methods = n;
	d->rl_refused = d->rl_nofile = d->rl_dropped = d->rl_idle = d->rl_stream = d->rl_hangup =
	    d->rl_events =
		(struct ratelimit){ .interval_usec = LIMITS_LOG_INTERVAL_SEC * 1000000ULL };
	ev_init(&d->trim, trim_cb);
	d->trim.data = d;
	if (listen_fd >= 0) {
		d->listen_fd = listen_fd;
		/* After a re-exec the socket is still our own bound path. */
		d->socket_activated = !getenv("CPRD_SOCKET_OWNED");
		unsetenv("CPRD_SOCKET_OWNED");
		fl = fcntl(d->listen_fd, F_GETFL);
		if (fl < 0 || fcntl(d->listen_fd, F_SETFL, fl | O_NONBLOCK) < 0 ||
		    fcntl(d->listen_fd, F_SETFD, FD_CLOEXEC) < 0)
			return -errno;
	} else {
		r = socket_bind(d);
		if (r < 0)
			return r;
	}
	ev_io_init(&d->listen_watcher, accept_cb, d->listen_fd, EV_READ);
	d->listen_watcher.data = d;
	ev_io_start(d->loop, &d->listen_watcher);
	ev_init(&d->accept_pause, accept_resume_cb);
	d->accept_pause.data = d;
	return 0;
}

void server_stop(struct daemon *d)
{
	ev_timer_stop(d->loop, &d->trim);
	ev_timer_stop(d->loop, &d->accept_pause);
	ev_io_stop(d->loop, &d->listen_watcher);
	d->listen_fd = safe_close(d->listen_fd);
	if (d->socket_path && !d->socket_activated)
		unlink(d->socket_path);
	while (d->clients)
		client_close(d->clients);
}
