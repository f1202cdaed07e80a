/* SPDX-License-Identifier: MIT */
/*
 * Client connections and JSON-RPC dispatch. A method handler gets a call
 * object and must finish it exactly once, at once or later (a VM that is
 * still starting answers vm.create when it runs); every other client keeps
 * being served meanwhile. A call whose client went away still has to be
 * finished; its answer is then dropped.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <sys/socket.h>
#include <json-c/json.h>

#include "common/access.h"
#include "common/macro.h"
#include "daemon/core/daemon.h"

struct call;

enum method_flags {
	METHOD_MUTATING = 1 << 0, /* only root or group cprd */
	METHOD_TAKES_FDS = 1 << 1,
	METHOD_OWN_VMM = 1 << 2, /* with MUTATING: also the VM's own VMM (the handler judges) */
	/* Its params also include each device type's parameter (an optional
	 * string, daemon/devices/), after its own; the handler reads them. */
	METHOD_DEVICE_PARAMS = 1 << 3,
};

enum param_type { PARAM_STRING, PARAM_UINT, PARAM_SIZE, PARAM_BOOL, PARAM_STRINGS, PARAM_OBJECTS };

/* One named member of a method's params. */
struct param {
	const char *name;
	enum param_type type;
	bool required;
};

/*
 * A method, as the server dispatches it and as rpc.describe tells it: the
 * one table serves both. params[] is what the handler binds, in that order
 * (methods.c: params_bind()), so what is described is what is checked.
 */
struct method {
	const char *name;
	void (*fn)(struct daemon *d, struct call *c, json_object *params);
	unsigned flags;
	const struct param *params;
	size_t n_params;
	const char *summary; /* one line, for rpc.describe */
};

#define METHOD_PARAMS(a) (a), ELEMENTSOF(a)

const char *param_type_to_string(enum param_type t);
/* "read", "mutating" or "mutating-or-own-vmm". */
const char *method_permission(const struct method *m);

/* Serve methods[0..n) (the table must outlive the server) on listen_fd
 * when one was inherited (socket activation or re-exec), else on the
 * configured path. */
int server_listen(struct daemon *d, int listen_fd, const struct method *methods, size_t n);
/* Before an exec: write out queued replies, waiting at most timeout_ms. */
void server_flush_all(struct daemon *d, int timeout_ms);
void server_stop(struct daemon *d);

/* Event subscribers (events.c): events.subscribe makes the call's
 * connection one (-ENOTCONN when it is closing). Each event is queued to
 * every subscriber; one with more than max_queued bytes still unread gets
 * dropped(d, queued_bytes) (taken) as its last message and is closed once
 * that is read, or after a short grace period. */
typedef json_object *(*server_drop_fn)(struct daemon *d, size_t queued_bytes);
int call_subscribe(struct call *c);
size_t server_subscribers(const struct daemon *d);
void server_notify_subscribers(struct daemon *d, json_object *msg, size_t max_queued,
			       server_drop_fn dropped);

/* Finishing a call. result is taken; fds are duplicated for the reply. */
void call_reply(struct call *c, json_object *result);
void call_reply_fds(struct call *c, json_object *result, const int *fds, size_t nfds);
_printf_(3, 4) void call_fail(struct call *c, int code, const char *fmt, ...);
/* Same, with a "data" member attached to the error (taken). Every error's
 * data carries "kind" (proto/jsonrpc.h), added to data when it has none. */
_printf_(4, 5) void call_fail_data(struct call *c, int code, json_object *data, const char *fmt,
				   ...);
/* Same, naming the offending parameter in data's "param". */
_printf_(4, 5) void call_fail_param(struct call *c, int code, const char *param, const char *fmt,
				    ...);

/* The method being called. */
const struct method *call_method(const struct call *c);

/* What came with the request. Fds not taken are closed when the call ends. */
size_t call_nfds(const struct call *c);
int call_take_fd(struct call *c, size_t i);
const struct ucred *call_peer(const struct call *c);
bool call_peer_privileged(const struct call *c);
/* The peer's uid, gid and supplementary groups, to act with its rights.
 * -E2BIG: more groups than struct creds holds. */
int call_peer_creds(const struct call *c, struct creds *ret);
