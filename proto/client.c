/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/time.h>
#include <time.h>

#include "common/json.h"
#include "common/macro.h"
#include "proto/client.h"
#include "proto/frame.h"
#include "proto/jsonrpc.h"

struct proto_client {
	int fd;
	proto_reader *reader;
	proto_writer *writer;
	int64_t next_id;
	proto_client_notify_fn notify;
	void *userdata;
};

DEFINE_TRIVIAL_CLEANUP_FUNC(proto_client *, proto_client_free);

static int sockaddr_un_set(const char *path, struct sockaddr_un *ret, socklen_t *ret_len)
{
	size_t n;

	if (!path || !*path)
		return -EINVAL;
	/* Keep room for the NUL: a path filling sun_path exactly is not
	 * portable and not what anybody means. */
	n = strlen(path);
	if (n >= sizeof(ret->sun_path))
		return -ENAMETOOLONG;

	*ret = (struct sockaddr_un){ .sun_family = AF_UNIX };
	memcpy(ret->sun_path, path, n + 1);
	*ret_len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + 1);
	return 0;
}

proto_client *proto_client_free(proto_client *c)
{
	if (!c)
		return NULL;
	proto_writer_free(c->writer);
	proto_reader_free(c->reader);
	safe_close(c->fd);
	free(c);
	return NULL;
}

int proto_client_connect(const char *path, proto_client **ret)
{
	return proto_client_connect_timeout(path, -1, ret);
}

int proto_client_connect_timeout(const char *path, int timeout_ms, proto_client **ret)
{
	_cleanup_(proto_client_freep) proto_client *c = NULL;
	struct sockaddr_un sa;
	socklen_t salen;
	int r;

	if (!ret)
		return -EINVAL;
	r = sockaddr_un_set(path, &sa, &salen);
	if (r < 0)
		return r;

	c = calloc(1, sizeof(*c));
	if (!c)
		return -ENOMEM;
	c->fd = -EBADF;
	c->next_id = 1;

	r = proto_reader_new(PROTO_MAX_MSG_DEFAULT, &c->reader);
	if (r < 0)
		return r;
	r = proto_writer_new(&c->writer);
	if (r < 0)
		return r;

	c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (c->fd < 0)
		return -errno;
	/* A blocking connect to a UNIX socket waits for room in the backlog
	 * at most SO_SNDTIMEO, and then fails with EAGAIN. */
	if (timeout_ms >= 0) {
		struct timeval tv = { .tv_sec = timeout_ms / 1000,
				      .tv_usec = (timeout_ms % 1000) * 1000 + (timeout_ms == 0) };

		if (setsockopt(c->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)) < 0)
			return -errno;
	}
	if (connect(c->fd, (struct sockaddr *)&sa, salen) < 0)
		return errno == EAGAIN && timeout_ms >= 0 ? -ETIMEDOUT : -errno;
	/* Connected first: a non-blocking connect could return EAGAIN when
	 * the daemon's backlog is full. Afterwards poll() does the waiting. */
	r = fcntl(c->fd, F_GETFL);
	if (r < 0 || fcntl(c->fd, F_SETFL, r | O_NONBLOCK) < 0)
		return -errno;

	*ret = TAKE_PTR(c);
	return 0;
}

void proto_client_set_notify(proto_client *c, proto_client_notify_fn fn, void *userdata)
{
	if (!c)
		return;
	c->notify = fn;
	c->userdata = userdata;
}

static int64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Waits for events until deadline (< 0: forever). */
static int wait_for(int fd, short events, int64_t deadline)
{
	for (;;) {
		struct pollfd p = { .fd = fd, .events = events };
		int timeout = -1, r;

		if (deadline >= 0) {
			int64_t left = deadline - now_ms();
			if (left <= 0)
				return -ETIMEDOUT;
			timeout = (int)MIN(left, (int64_t)INT32_MAX);
		}

		r = poll(&p, 1, timeout);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			return -errno;
		if (r == 0)
			return -ETIMEDOUT;
		return 0;
	}
}

static int send_request(proto_client *c, const char *method, json_object *params, int64_t id,
			const int *fds, size_t nfds, int64_t deadline)
{
	_cleanup_json_ json_object *req = jsonrpc_call_new(method, params, id);
	const char *s;
	size_t len;
	int r;

	if (!req)
		return -ENOMEM;
	s = jsonrpc_to_string(req, &len);
	if (!s)
		return -ENOMEM;
	r = proto_writer_queue(c->writer, s, len, fds, nfds);
	if (r < 0)
		return r;

	for (;;) {
		r = proto_writer_flush(c->writer, c->fd);
		if (r == -EPIPE)
			return -ECONNRESET;
		if (r != 0)
			return r < 0 ? r : 0;
		r = wait_for(c->fd, POLLOUT, deadline);
		if (r < 0)
			return r;
	}
}

static bool only_members(json_object *o, const char *a, const char *b, const char *d)
{
	json_object_object_foreach(o, key, val)
	{
		(void)val;
		if (!streq(key, a) && !streq(key, b) && !(d && streq(key, d)))
			return false;
	}
	return true;
}

/* A response: "jsonrpc":"2.0", "id", and exactly one of result / error. */
static int response_check(json_object *o)
{
	json_object *v, *err, *code, *message;
	bool has_result, has_error;

	if (!json_object_object_get_ex(o, "jsonrpc", &v) ||
	    !json_object_is_type(v, json_type_string) || !streq(json_object_get_string(v), "2.0"))
		return -EBADMSG;

	has_result = json_object_object_get_ex(o, "result", NULL);
	has_error = json_object_object_get_ex(o, "error", &err);
	if (has_result == has_error)
		return -EBADMSG;
	if (!only_members(o, "jsonrpc", "id", has_result ? "result" : "error"))
		return -EBADMSG;
	if (has_result)
		return 0;

	if (!json_object_is_type(err, json_type_object) ||
	    !json_object_object_get_ex(err, "code", &code) ||
	    !json_object_is_type(code, json_type_int) ||
	    !json_object_object_get_ex(err, "message", &message) ||
	    !json_object_is_type(message, json_type_string) ||
	    !only_members(err, "code", "message", "data"))
		return -EBADMSG;
	return 0;
}

/* Our response, someone else's, or one that answers us without an id:
 * the daemon sends id null when it could not read the request at all, and
 * with one call in flight that can only be ours. */
static bool response_is_ours(json_object *o, int64_t id)
{
	json_object *v = NULL;

	json_object_object_get_ex(o, "id", &v);
	if (!v)
		return json_object_object_get_ex(o, "error", NULL);
	return json_object_is_type(v, json_type_int) && json_object_get_int64(v) == id;
}

/* Handles one message. Returns 1 with the response when it answers call id,
 * 0 when it was something else (already dealt with), negative errno. */
static int handle_message(proto_client *c, const char *msg, size_t len, int64_t id,
			  json_object **ret)
{
	_cleanup_json_ json_object *o = NULL;
	json_object *method, *params = NULL;
	int r;

	r = jsonrpc_parse(msg, len, &o, NULL);
	if (r < 0)
		return r;
	if (!json_object_is_type(o, json_type_object))
		return -EBADMSG;

	if (!json_object_object_get_ex(o, "id", NULL)) {
		if (!json_object_object_get_ex(o, "method", &method) ||
		    !json_object_is_type(method, json_type_string))
			return -EBADMSG;
		json_object_object_get_ex(o, "params", &params);
		if (c->notify)
			c->notify(json_object_get_string(method), params, c->userdata);
		return 0;
	}

	if (!response_is_ours(o, id))
		return 0;
	r = response_check(o);
	if (r < 0)
		return r;
	*ret = TAKE_PTR(o);
	return 1;
}

/* Reads until the response to id arrives. */
static int read_response(proto_client *c, int64_t id, int64_t deadline, json_object **ret,
			 int **ret_fds, size_t *ret_nfds)
{
	for (;;) {
		_cleanup_free_ char *msg = NULL;
		_cleanup_free_ int *fds = NULL;
		size_t len, nfds = 0;
		ssize_t n;
		int r;

		r = proto_reader_next(c->reader, &msg, &len, &fds, &nfds);
		if (r < 0)
			return r;
		if (r > 0) {
			json_object *o = NULL;

			r = handle_message(c, msg, len, id, &o);
			if (r <= 0)
				close_many(fds, nfds);
			if (r < 0)
				return r;
			if (r > 0) {
				*ret = o;
				*ret_fds = TAKE_PTR(fds);
				*ret_nfds = nfds;
				return 0;
			}
			continue;
		}

		r = wait_for(c->fd, POLLIN, deadline);
		if (r < 0)
			return r;
		n = proto_reader_fill(c->reader, c->fd);
		if (n == 0)
			return -ECONNRESET;
		if (n < 0 && n != -EAGAIN)
			return (int)n;
	}
}

int proto_client_call(proto_client *c, const char *method, json_object *params, const int *fds,
		      size_t nfds, int timeout_ms, json_object **ret_result,
		      json_object **ret_error, int **ret_fds, size_t *ret_nfds)
{
	_cleanup_json_ json_object *p = params;
	_cleanup_json_ json_object *resp = NULL;
	_cleanup_free_ int *rfds = NULL;
	json_object *result = NULL, *error = NULL;
	size_t rnfds = 0;
	int64_t deadline = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
	int64_t id;
	int r;

	if (!c || !method)
		return -EINVAL;

	id = c->next_id++;
	r = send_request(c, method, TAKE_PTR(p), id, fds, nfds, deadline);
	if (r < 0)
		return r;

	r = read_response(c, id, deadline, &resp, &rfds, &rnfds);
	if (r < 0)
		return r;

	if (ret_fds && ret_nfds) {
		*ret_fds = TAKE_PTR(rfds);
		*ret_nfds = rnfds;
	} else
		close_many(rfds, rnfds);

	if (json_object_object_get_ex(resp, "error", &error)) {
		if (ret_error)
			*ret_error = json_object_get(error);
		return -EREMOTEIO;
	}
	json_object_object_get_ex(resp, "result", &result);
	if (ret_result)
		*ret_result = json_object_get(result);
	return 0;
}

int proto_client_follow(proto_client *c, int timeout_ms)
{
	int64_t deadline = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
	_cleanup_free_ int *fds = NULL;
	json_object *o = NULL;
	size_t nfds = 0;
	int r;

	if (!c)
		return -EINVAL;
	/* No call has id 0 (they count from 1): what "answers" it is an
	 * error the daemon sent without an id, which no call waits for. */
	r = read_response(c, 0, deadline, &o, &fds, &nfds);
	if (r < 0)
		return r;
	json_object_put(o);
	close_many(fds, nfds);
	return -EBADMSG;
}
