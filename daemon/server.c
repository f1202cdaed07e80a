/* SPDX-License-Identifier: MIT */
#include <fcntl.h>
#include <poll.h>
#include <grp.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <systemd/sd-daemon.h>

#include "common/json.h"
#include "daemon/log.h"
#include "daemon/server.h"
#include "daemon/stats.h"
#include "proto/frame.h"
#include "proto/jsonrpc.h"

#define CLIENT_MAX_MSG (256 * 1024) /* requests are small; 256 KiB is generous */
#define CLIENT_MAX_QUEUED (8 << 20) /* a client that reads nothing is dropped */
#define CLIENT_MAX_CALLS 64         /* calls in flight per connection */
#define CLIENT_MAX_COUNT 1024

struct client {
	struct daemon *d;
	int fd;
	ev_io watcher;
	proto_reader *in;
	proto_writer *out;
	struct ucred peer;
	bool privileged;
	bool closing; /* flush what is queued, then close */
	bool eof;     /* peer sends no more: answer calls in flight, then close */
	bool dead;    /* fd closed; waiting for its calls to finish */
	unsigned refs;
	unsigned calls;
	struct client *prev, *next;
};

/* A batch answers once all its calls finished, as one array. */
struct batch {
	struct client *client;
	json_object *replies;
	unsigned pending;
	bool sealed; /* all calls dispatched */
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

/* ---- sending ---- */

static void client_send(struct client *c, json_object *msg, const int *fds, size_t nfds)
{
	size_t len;
	const char *s;
	int r;

	if (c->dead || c->closing)
		return;
	s = jsonrpc_to_string(msg, &len);
	r = proto_writer_queue(c->out, s, len, fds, nfds);
	if (r < 0 || proto_writer_queued_bytes(c->out) > CLIENT_MAX_QUEUED) {
		log_warning("client pid %d: dropping connection: %s", (int)c->peer.pid,
			    r < 0 ? strerror(-r) : "it does not read its replies");
		client_close(c); /* what is queued is freed with the client */
		return;
	}
	client_update_watcher(c);
}

static void batch_finish_one(struct batch *b, json_object *reply)
{
	if (reply)
		json_object_array_add(b->replies, reply);
	b->pending--;
	if (b->pending > 0 || !b->sealed)
		return;
	if (json_object_array_length(b->replies) > 0)
		client_send(b->client, b->replies, NULL, 0);
	json_object_put(b->replies);
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
		json_object_array_add(b->replies, e);
		return;
	}
	client_send(cl, e, NULL, 0);
	json_object_put(e);
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
		snprintf(msg, sizeof(msg), "unknown method '%.100s'", req.method);
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

static void dispatch_batch(struct client *cl, json_object *arr, int *fds, size_t nfds)
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
	b = calloc(1, sizeof(*b));
	if (!b || !(b->replies = json_object_new_array())) {
		free(b);
		reply_error(cl, NULL, NULL, JSONRPC_INTERNAL_ERROR, "out of memory");
		return;
	}
	b->client = cl;
	cl->refs++;
	b->pending = 1; /* held until every element is dispatched */
	for (size_t i = 0; i < n; i++)
		dispatch_one(cl, b, json_object_array_get_idx(arr, i), NULL, 0);
	b->sealed = true;
	batch_finish_one(b, NULL);
}

static void handle_message(struct client *cl, const char *line, size_t len, int *fds, size_t nfds)
{
	_cleanup_json_ json_object *o = NULL;
	const char *why = NULL;

	if (jsonrpc_parse(line, len, &o, &why) < 0) {
		reply_error(cl, NULL, NULL, JSONRPC_PARSE_ERROR, why ? why : "parse error");
		close_many(fds, nfds);
		return;
	}
	if (json_object_is_type(o, json_type_array))
		dispatch_batch(cl, o, fds, nfds);
	else
		dispatch_one(cl, NULL, o, fds, nfds);
}

/* ---- connection I/O ---- */

static void client_close(struct client *c)
{
	if (c->dead)
		return;
	ev_io_stop(c->d->loop, &c->watcher); /* before the fd goes */
	c->fd = safe_close(c->fd);
	c->dead = true;
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

static void client_update_watcher(struct client *c)
{
	int events = c->closing || c->eof ? 0 : EV_READ;

	if (c->dead)
		return;
	if (!proto_writer_is_empty(c->out))
		events |= EV_WRITE;
	if (events == 0) {
		/* Nothing to read or write: done unless calls still owe answers. */
		if (c->closing || c->calls == 0)
			client_close(c);
		else
			ev_io_stop(c->d->loop, &c->watcher);
		return;
	}
	if (c->watcher.events == events && ev_is_active(&c->watcher))
		return;
	ev_io_stop(c->d->loop, &c->watcher);
	ev_io_set(&c->watcher, c->fd, events);
	ev_io_start(c->d->loop, &c->watcher);
}

static void client_fail_stream(struct client *c, int code, const char *msg)
{
	log_warning("client pid %d: %s; closing the connection", (int)c->peer.pid, msg);
	reply_error(c, NULL, NULL, code, msg);
	c->closing = true;
	client_update_watcher(c);
}

static void client_read(struct client *c)
{
	ssize_t n = proto_reader_fill(c->in, c->fd);

	if (n == -EAGAIN || n == -EINTR)
		return;
	if (n == 0) {
		if (proto_reader_has_partial(c->in))
			log_warning("client pid %d hung up in the middle of a message",
				    (int)c->peer.pid);
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
	c->refs++; /* a handler may end up closing the client */
	while (!c->dead && !c->closing) {
		_cleanup_free_ char *line = NULL;
		_cleanup_free_ int *fds = NULL;
		size_t len, nfds = 0;
		int r = proto_reader_next(c->in, &line, &len, &fds, &nfds);

		if (r == 0)
			break;
		if (r < 0) {
			client_fail_stream(c, JSONRPC_ERR_BAD_FDS,
					   "fds attached to an empty line (closed)");
			break;
		}
		handle_message(c, line, len, fds, nfds);
	}
	client_unref(c);
}

static void client_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	struct client *c = w->data;
	int r;

	c->refs++;
	if (revents & EV_WRITE) {
		r = proto_writer_flush(c->out, c->fd);
		if (r < 0) {
			client_close(c);
			goto out;
		}
	}
	if ((revents & EV_READ) && !c->dead)
		client_read(c);
	client_update_watcher(c);
out:
	client_unref(c);
}

static void accept_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	struct daemon *d = w->data;
	socklen_t len = sizeof(struct ucred);
	size_t count = 0;
	struct client *c;
	int fd;

	fd = accept4(d->listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
	if (fd < 0)
		return;
	for (c = d->clients; c; c = c->next)
		count++;
	c = calloc(1, sizeof(*c));
	if (!c || count >= CLIENT_MAX_COUNT ||
	    getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &c->peer, &len) < 0 ||
	    proto_reader_new(CLIENT_MAX_MSG, &c->in) < 0 || proto_writer_new(&c->out) < 0) {
		if (c) {
			proto_reader_free(c->in);
			free(c);
		}
		close(fd);
		log_warning("refused a connection: %s",
			    count >= CLIENT_MAX_COUNT ? "too many clients" : "out of resources");
		return;
	}
	c->d = d;
	c->fd = fd;
	c->refs = 1;
	c->privileged = peer_is_privileged(d, fd, &c->peer);
	c->next = d->clients;
	if (d->clients)
		d->clients->prev = c;
	d->clients = c;
	ev_io_init(&c->watcher, client_cb, fd, EV_READ);
	c->watcher.data = c;
	ev_io_start(loop, &c->watcher);
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
	return 0;
}

void server_stop(struct daemon *d)
{
	ev_io_stop(d->loop, &d->listen_watcher);
	d->listen_fd = safe_close(d->listen_fd);
	if (d->socket_path && !d->socket_activated)
		unlink(d->socket_path);
	while (d->clients)
		client_close(d->clients);
}
