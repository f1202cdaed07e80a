/* SPDX-License-Identifier: MIT */
/*
 * Asynchronous QMP client. It owns a non-blocking connected socket but no
 * event loop: the owner calls qmp_dispatch() when the fd is readable and
 * qmp_flush() when it is writable and qmp_wants_write() says so. Commands
 * may be queued at once; they are sent after the greeting has been answered
 * with qmp_capabilities. Replies are matched to commands by "id".
 *
 * Callbacks run from inside qmp_dispatch(); they may queue or cancel
 * commands but must not free the client.
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <json-c/json.h>

typedef struct qmp qmp;

/* ret is the "return" member (borrowed) on success and NULL on failure, in
 * which case err_class / err_desc say why ("Disconnected" when the VMM went
 * away before answering). */
typedef void (*qmp_reply_fn)(qmp *q, json_object *ret, const char *err_class, const char *err_desc,
			     void *userdata);
/* ts_us: the event's own timestamp (QEMU's host clock, µs since the epoch). */
typedef void (*qmp_event_fn)(qmp *q, const char *event, json_object *data, int64_t ts_us,
			     void *userdata);
typedef void (*qmp_ready_fn)(qmp *q, void *userdata);

/* Takes fd on success; on failure it stays the caller's (now O_NONBLOCK). */
int qmp_new(int fd, qmp **ret);
qmp *qmp_free(qmp *q); /* closes fd; calls no callback; accepts NULL */
void qmp_set_handlers(qmp *q, qmp_ready_fn ready, qmp_event_fn event, void *userdata);

int qmp_fd(const qmp *q);
bool qmp_is_ready(const qmp *q);
/* "MAJOR.MINOR.MICRO" from the greeting, or NULL before it. */
const char *qmp_vmm_version(const qmp *q);
/* The greeting's package string without its parentheses ("" when the build
 * gives none), or NULL before the greeting. */
const char *qmp_vmm_package(const qmp *q);

/* Queue a command. args is taken (may be NULL). fd >= 0 is sent with the
 * command as SCM_RIGHTS (getfd, add-fd) and stays the caller's. */
int qmp_command(qmp *q, const char *cmd, json_object *args, int fd, qmp_reply_fn cb,
		void *userdata);

/* Read what is available and dispatch replies and events. Returns 0, or
 * -ECONNRESET when the VMM closed the connection, -EPROTO on a message
 * that is not QMP; the owner then calls qmp_fail_pending() and frees. */
int qmp_dispatch(qmp *q);
int qmp_flush(qmp *q); /* 1 all sent, 0 more to send, < 0 error */
bool qmp_wants_write(const qmp *q);

/* Answer every command still waiting with err_class "Disconnected".
 * Commands a callback queues meanwhile are kept, not failed with them. */
void qmp_fail_pending(qmp *q, const char *why);
size_t qmp_pending(const qmp *q);
/* Forget every command still waiting whose userdata is this one: its
 * callback is never called (not even by qmp_fail_pending() running now).
 * For an owner that is going away. Returns how many were dropped. */
size_t qmp_cancel(qmp *q, void *userdata);
/* No callback of any kind runs again: every command is forgotten, events
 * and readiness are ignored. For an owner that must let go of the client
 * from inside its dispatch, where qmp_free() is not allowed. */
void qmp_mute(qmp *q);
