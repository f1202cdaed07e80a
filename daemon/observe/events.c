/* SPDX-License-Identifier: MIT */
#include <stdio.h>
#include <string.h>

#include "common/json.h"
#include "daemon/observe/events.h"
#include "daemon/core/server.h"
#include "proto/jsonrpc.h"

/* One sequence for the daemon's life: a gap tells a subscriber it lost
 * events (it was dropped, or reconnected). */
static uint64_t event_seq;

static json_object *event_new(const char *kind, const char *vm, json_object *fields)
{
	json_object *o = json_object_new_object();

	json_object_object_add(o, "seq", json_object_new_int64((int64_t)++event_seq));
	json_object_object_add(o, "time_usec",
			       json_object_new_int64((int64_t)now_usec(CLOCK_REALTIME)));
	json_object_object_add(o, "kind", json_object_new_string(kind));
	if (vm)
		json_object_object_add(o, "vm", json_object_new_string(vm));
	if (fields) {
		json_object_object_foreach(fields, k, v)
		{
			json_object_object_add(o, k, json_object_get(v));
		}
		json_object_put(fields);
	}
	return o;
}

/* The last word to a subscriber that does not read. */
static json_object *dropped(struct daemon *d, size_t queued)
{
	json_object *f = json_object_new_object();
	char why[160];

	snprintf(why, sizeof(why),
		 "the subscriber does not read its events: %zu bytes queued, more than the %zu "
		 "allowed",
		 queued, d->events_max_queued);
	json_object_object_add(f, "reason", json_object_new_string(why));
	json_object_object_add(f, "queued_bytes", json_object_new_int64((int64_t)queued));
	f = event_new("dropped", NULL, f);
	if (d->observe_event)
		d->observe_event(d, f);
	return jsonrpc_notification_new("event", f);
}

void events_emit(struct daemon *d, const char *kind, const char *vm, json_object *fields)
{
	json_object *ev = event_new(kind, vm, fields);
	_cleanup_json_ json_object *msg = NULL;

	if (d->observe_event)
		d->observe_event(d, ev);
	msg = jsonrpc_notification_new("event", ev);
	if (msg)
		server_notify_subscribers(d, msg, d->events_max_queued, dropped);
}

void events_subscribe(struct daemon *d, struct call *c, json_object *params)
{
	json_object *o;

	if (params && json_object_object_length(params) > 0) {
		call_fail(c, JSONRPC_INVALID_PARAMS, "events.subscribe takes no parameters");
		return;
	}
	if (call_subscribe(c) < 0) {
		call_fail(c, JSONRPC_ERR_BAD_STATE, "the connection is closing");
		return;
	}
	o = json_object_new_object();
	json_object_object_add(o, "subscribed", json_object_new_boolean(true));
	/* The next event has seq + 1: a subscriber knows it missed none since. */
	json_object_object_add(o, "seq", json_object_new_int64((int64_t)event_seq));
	json_object_object_add(o, "max_queued_bytes",
			       json_object_new_int64((int64_t)d->events_max_queued));
	call_reply(c, o);
	if (d->observe_event)
		d->observe_event(d, NULL); /* the subscriber gauge */
}
