/* SPDX-License-Identifier: MIT */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>

#include "common/escape.h"
#include "common/json.h"
#include "kvm/qmp.h"
#include "proto/frame.h"

/* QMP replies to query-* commands can be large (query-qmp-schema is
 * hundreds of KiB); nothing we send or expect comes close to 4 MiB. */
#define QMP_MAX_MSG (4 * 1024 * 1024)

struct pending {
	int64_t id;
	qmp_reply_fn cb;
	void *userdata;
	char *line; /* not yet queued: waiting for the greeting */
	int fd;     /* sent with the line, owned until queued */
	struct pending *next;
};

struct qmp {
	int fd;
	proto_reader *in;
	proto_writer *out;
	bool greeted, ready;
	char version[32];
	char package[96]; /* the build's own words, e.g. "Debian 1:10.0.2+ds-2" */
	int64_t next_id;
	struct pending *head, *tail; /* in order of sending */
	struct pending *failing;     /* being failed by qmp_fail_pending() */
	qmp_ready_fn on_ready;
	qmp_event_fn on_event;
	void *userdata;
};

int qmp_new(int fd, qmp **ret)
{
	qmp *q;
	int r, fl;

	fl = fcntl(fd, F_GETFL);
	if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
		return -errno;
	q = calloc(1, sizeof(*q));
	if (!q)
		return -ENOMEM;
	q->fd = fd;
	q->next_id = 1;
	r = proto_reader_new(QMP_MAX_MSG, &q->in);
	if (r >= 0)
		r = proto_writer_new(&q->out);
	if (r < 0) {
		q->fd = -EBADF; /* the fd stays the caller's on failure */
		qmp_free(q);
		return r;
	}
	*ret = q;
	return 0;
}

static void pending_free(struct pending *p)
{
	free(p->line);
	safe_close(p->fd);
	free(p);
}

qmp *qmp_free(qmp *q)
{
	if (!q)
		return NULL;
	while (q->head) {
		struct pending *p = q->head;
		q->head = p->next;
		pending_free(p);
	}
	while (q->failing) {
		struct pending *p = q->failing;
		q->failing = p->next;
		pending_free(p);
	}
	proto_reader_free(q->in);
	proto_writer_free(q->out);
	safe_close(q->fd);
	free(q);
	return NULL;
}

void qmp_set_handlers(qmp *q, qmp_ready_fn ready, qmp_event_fn event, void *userdata)
{
	q->on_ready = ready;
	q->on_event = event;
	q->userdata = userdata;
}

int qmp_fd(const qmp *q)
{
	return q->fd;
}

bool qmp_is_ready(const qmp *q)
{
	return q->ready;
}

const char *qmp_vmm_version(const qmp *q)
{
	return q->greeted ? q->version : NULL;
}

const char *qmp_vmm_package(const qmp *q)
{
	return q->greeted ? q->package : NULL;
}

/* QEMU gives the package as " (Debian 1:10.0.2+ds-2)": keep the words. */
static void set_package(qmp *q, const char *s)
{
	size_t n;

	s += strspn(s, " (");
	n = strlen(s);
	while (n > 0 && (s[n - 1] == ')' || s[n - 1] == ' '))
		n--;
	/* Escaped already (sanitize()): this copies, cut at a character. */
	str_escape(s, n, q->package, sizeof(q->package));
}

size_t qmp_pending(const qmp *q)
{
	size_t n = 0;

	for (struct pending *p = q->head; p; p = p->next)
		n++;
	return n;
}

bool qmp_wants_write(const qmp *q)
{
	return !proto_writer_is_empty(q->out);
}

static int queue_line(qmp *q, struct pending *p)
{
	int r;

	r = proto_writer_queue(q->out, p->line, strlen(p->line), p->fd >= 0 ? &p->fd : NULL,
			       p->fd >= 0 ? 1 : 0);
	if (r < 0)
		return r;
	p->line = (free(p->line), NULL);
	p->fd = safe_close(p->fd);
	return 0;
}

static int add_command(qmp *q, const char *cmd, json_object *args, int fd, qmp_reply_fn cb,
		       void *userdata, bool now)
{
	_cleanup_json_ json_object *o = json_object_new_object();
	_cleanup_json_ json_object *a = args;
	struct pending *p;
	int r;

	if (!o)
		return -ENOMEM;
	json_object_object_add(o, "execute", json_object_new_string(cmd));
	if (a)
		json_object_object_add(o, "arguments", TAKE_PTR(a));
	json_object_object_add(o, "id", json_object_new_int64(q->next_id));

	p = calloc(1, sizeof(*p));
	if (!p)
		return -ENOMEM;
	p->fd = -EBADF;
	p->id = q->next_id++;
	p->cb = cb;
	p->userdata = userdata;
	p->line = strdup(json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN));
	if (!p->line) {
		pending_free(p);
		return -ENOMEM;
	}
	if (fd >= 0) {
		p->fd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
		if (p->fd < 0) {
			r = -errno;
			pending_free(p);
			return r;
		}
	}
	if (now) {
		r = queue_line(q, p);
		if (r < 0) {
			pending_free(p);
			return r;
		}
	}
	if (q->tail)
		q->tail->next = p;
	else
		q->head = p;
	q->tail = p;
	return 0;
}

int qmp_command(qmp *q, const char *cmd, json_object *args, int fd, qmp_reply_fn cb, void *userdata)
{
	if (!cmd)
		return -EINVAL;
	return add_command(q, cmd, args, fd, cb, userdata, q->ready);
}

static void capabilities_done(qmp *q, json_object *ret, const char *cls, const char *desc,
			      void *userdata)
{
	if (!ret)
		return; /* the owner sees the connection fail or time out */
	q->ready = true;
	for (struct pending *p = q->head; p; p = p->next)
		if (p->line && queue_line(q, p) < 0)
			break; /* ENOMEM; the reply never comes and the owner times out */
	if (q->on_ready)
		q->on_ready(q, q->userdata);
}

static int handle_greeting(qmp *q, json_object *greeting)
{
	json_object *v, *qemu, *x;
	int maj = 0, min = 0, mic = 0;

	if (json_object_object_get_ex(greeting, "version", &v) &&
	    json_object_object_get_ex(v, "qemu", &qemu)) {
		if (json_object_object_get_ex(qemu, "major", &x))
			maj = json_object_get_int(x);
		if (json_object_object_get_ex(qemu, "minor", &x))
			min = json_object_get_int(x);
		if (json_object_object_get_ex(qemu, "micro", &x))
			mic = json_object_get_int(x);
		if (json_object_object_get_ex(v, "package", &x) &&
		    json_object_is_type(x, json_type_string))
			set_package(q, json_object_get_string(x));
	}
	snprintf(q->version, sizeof(q->version), "%d.%d.%d", maj, min, mic);
	q->greeted = true;

	/* qmp_capabilities goes straight to the socket; commands queued earlier
	 * are held back until it has been answered (capabilities_done). */
	return add_command(q, "qmp_capabilities", NULL, -EBADF, capabilities_done, NULL, true);
}

static struct pending *take_pending(qmp *q, int64_t id)
{
	for (struct pending **pp = &q->head; *pp; pp = &(*pp)->next) {
		struct pending *p = *pp;
		if (p->id != id)
			continue;
		*pp = p->next;
		if (q->tail == p) {
			q->tail = NULL;
			for (struct pending *t = q->head; t; t = t->next)
				q->tail = t;
		}
		return p;
	}
	return NULL;
}

static void handle_reply(qmp *q, json_object *msg, json_object *idv)
{
	json_object *ret = NULL, *err, *x;
	const char *cls = "GenericError", *desc = "malformed error";
	struct pending *p;

	p = take_pending(q, json_object_get_int64(idv));
	if (!p)
		return; /* not ours (or already failed); nothing to tell anyone */
	if (!json_object_object_get_ex(msg, "return", &ret)) {
		ret = NULL;
		if (json_object_object_get_ex(msg, "error", &err)) {
			if (json_object_object_get_ex(err, "class", &x))
				cls = json_object_get_string(x);
			if (json_object_object_get_ex(err, "desc", &x))
				desc = json_object_get_string(x);
		}
	}
	if (p->cb)
		p->cb(q, ret, ret ? NULL : cls, ret ? NULL : desc, p->userdata);
	pending_free(p);
}

static void handle_event(qmp *q, json_object *msg, json_object *ev)
{
	json_object *data = NULL, *ts, *x;
	int64_t us = 0;

	if (json_object_object_get_ex(msg, "timestamp", &ts)) {
		if (json_object_object_get_ex(ts, "seconds", &x))
			us = json_object_get_int64(x) * 1000000;
		if (json_object_object_get_ex(ts, "microseconds", &x))
			us += json_object_get_int64(x);
	}
	json_object_object_get_ex(msg, "data", &data);
	if (q->on_event)
		q->on_event(q, json_object_get_string(ev), data, us, q->userdata);
}

/* Every string a VMM sends (an error's desc, an event's reason, its
 * version's package) ends up in a log line, a journal field, an event or a
 * reply that a person reads on a terminal: a VMM taken over by its guest
 * must not put a newline (a forged log line) or an escape sequence there.
 * So each is escaped as it arrives, once, for every user of this library;
 * a key that would need it is dropped (nothing looks such a key up). */
static int sanitize(json_object *o)
{
	if (json_object_is_type(o, json_type_string)) {
		const char *s = json_object_get_string(o);
		size_t len = (size_t)json_object_get_string_len(o);
		_cleanup_free_ char *e = NULL;

		if (!str_needs_escape(s, len))
			return 0;
		e = malloc(4 * len + 1);
		if (!e)
			return -ENOMEM;
		len = str_escape(s, len, e, 4 * len + 1);
		return json_object_set_string_len(o, e, (int)len) ? 0 : -ENOMEM;
	}
	if (json_object_is_type(o, json_type_array)) {
		for (size_t i = 0; i < json_object_array_length(o); i++)
			if (sanitize(json_object_array_get_idx(o, i)) < 0)
				return -ENOMEM;
		return 0;
	}
	if (!json_object_is_type(o, json_type_object))
		return 0;
	/* The foreach has the next entry before the body runs: deleting the
	 * current one is safe. */
	json_object_object_foreach(o, k, v)
	{
		if (str_needs_escape(k, strlen(k)))
			json_object_object_del(o, k);
		else if (sanitize(v) < 0)
			return -ENOMEM;
	}
	return 0;
}

static int handle_message(qmp *q, const char *line, size_t len)
{
	_cleanup_json_ json_object *msg = NULL;
	json_object *x;

	msg = json_tokener_parse(line);
	if (!msg || !json_object_is_type(msg, json_type_object))
		return -EPROTO;
	if (sanitize(msg) < 0)
		return -ENOMEM;
	if (json_object_object_get_ex(msg, "QMP", &x))
		return q->greeted ? -EPROTO : handle_greeting(q, x);
	if (json_object_object_get_ex(msg, "event", &x))
		handle_event(q, msg, x);
	else if (json_object_object_get_ex(msg, "id", &x))
		handle_reply(q, msg, x);
	/* A reply without id answers a command QEMU could not parse; we never
	 * send such a command, so there is nobody to give it to. */
	return 0;
}

int qmp_dispatch(qmp *q)
{
	for (;;) {
		_cleanup_free_ char *line = NULL;
		_cleanup_free_ int *fds = NULL;
		size_t len, nfds = 0;
		ssize_t n;
		int r;

		r = proto_reader_next(q->in, &line, &len, &fds, &nfds);
		if (r < 0)
			return r;
		if (r > 0) {
			close_many(fds, nfds); /* QEMU never sends fds */
			r = handle_message(q, line, len);
			if (r < 0)
				return r;
			continue;
		}
		n = proto_reader_fill(q->in, q->fd);
		if (n == -EAGAIN)
			return 0;
		if (n == 0)
			return -ECONNRESET;
		if (n < 0)
			return (int)n;
	}
}

int qmp_flush(qmp *q)
{
	return proto_writer_flush(q->out, q->fd);
}

void qmp_fail_pending(qmp *q, const char *why)
{
	/* Detach the list first: a callback that queues a retry must not have
	 * it failed in this same sweep (that would never end). Entries are
	 * taken one at a time, so a callback may still cancel later ones. */
	struct pending *p;

	q->failing = q->head;
	q->head = q->tail = NULL;
	while ((p = q->failing)) {
		q->failing = p->next;
		if (p->cb)
			p->cb(q, NULL, "Disconnected", why, p->userdata);
		pending_free(p);
	}
}

static size_t cancel_in(struct pending **pp, struct pending **tail, void *userdata, bool all)
{
	size_t n = 0;

	while (*pp) {
		struct pending *p = *pp;

		if (!all && p->userdata != userdata) {
			if (tail)
				*tail = p;
			pp = &p->next;
			continue;
		}
		*pp = p->next;
		/* A command already written still gets its reply; with no
		 * entry left for its id, the reply is dropped unseen. */
		pending_free(p);
		n++;
	}
	return n;
}

size_t qmp_cancel(qmp *q, void *userdata)
{
	size_t n;

	if (!q || !userdata)
		return 0;
	q->tail = NULL;
	n = cancel_in(&q->head, &q->tail, userdata, false);
	return n + cancel_in(&q->failing, NULL, userdata, false);
}

void qmp_mute(qmp *q)
{
	q->on_ready = NULL;
	q->on_event = NULL;
	q->tail = NULL;
	cancel_in(&q->head, &q->tail, NULL, true);
	cancel_in(&q->failing, NULL, NULL, true);
}
