/* SPDX-License-Identifier: MIT */
/*
 * Blocking JSON-RPC client for cprd, used by cprctl and by VMM-side helpers
 * that store or claim fds. One call in flight at a time.
 */
#pragma once

#include <stddef.h>
#include <json-c/json.h>

typedef struct proto_client proto_client;

/* Connect to the daemon's socket at path (SOCK_CLOEXEC). */
int proto_client_connect(const char *path, proto_client **ret);
/* Same, giving up after timeout_ms (< 0: never) with -ETIMEDOUT: a daemon
 * that is stopped with a full listen backlog never accepts. */
int proto_client_connect_timeout(const char *path, int timeout_ms, proto_client **ret);
proto_client *proto_client_free(proto_client *c);

/* Called for every notification (message without "id") that arrives while a
 * call waits for its response, e.g. progress of a long operation. params may
 * be NULL and is borrowed. */
typedef void (*proto_client_notify_fn)(const char *method, json_object *params, void *userdata);
void proto_client_set_notify(proto_client *c, proto_client_notify_fn fn, void *userdata);

/*
 * Send one request and wait for its response. params is taken (may be NULL).
 * fds (nfds of them) are sent with the request and stay the caller's.
 * timeout_ms < 0 waits forever.
 * Returns 0 with *ret_result (owned) on success; -EREMOTEIO with *ret_error
 * (owned: the JSON-RPC error object with code, message, data) when the daemon
 * answered with an error; other negative errno for transport failures
 * (-ECONNRESET when the daemon hung up, -ETIMEDOUT, -EBADMSG for a reply that
 * is not JSON-RPC 2.0). Fds the response carried are returned in *ret_fds
 * (malloc'd, owned, close-on-exec) and *ret_nfds when those are non-NULL;
 * otherwise they are closed. ret_result / ret_error may be NULL.
 */
int proto_client_call(proto_client *c, const char *method, json_object *params, const int *fds,
		      size_t nfds, int timeout_ms, json_object **ret_result,
		      json_object **ret_error, int **ret_fds, size_t *ret_nfds);

/*
 * With no call in flight, hand the notifications that arrive to the notify
 * function (e.g. after events.subscribe) until timeout_ms passes (< 0:
 * forever). Returns -ETIMEDOUT then, -ECONNRESET when the daemon hung up,
 * -EBADMSG for a message that is neither a notification nor a response to
 * a call of ours (fds that came with any are closed).
 */
int proto_client_follow(proto_client *c, int timeout_ms);
