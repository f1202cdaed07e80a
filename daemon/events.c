/* SPDX-License-Identifier: MIT */
#include <stdio.h>
#include <string.h>

#include "common/json.h"
#include "daemon/events.h"
#include "daemon/metrics.h"
#include "daemon/server.h"
#include "daemon/vm.h"
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
	metrics_observe(d, f);
	return jsonrpc_notification_new("event", f);
}

void events_emit(struct daemon *d, const char *kind, const char *vm, json_object *fields)
{
	json_object *ev = event_new(kind, vm, fields);
	_cleanup_json_ json_object *msg = NULL;

	metrics_observe(d, ev);
	msg = jsonrpc_notification_new("event", ev);
	if (msg)
		server_notify_subscribers(d, msg, d->events_max_queued, dropped);
}

static void add_str(json_object *o, const char *k, const char *v)
{
	json_object_object_add(o, k, v ? json_object_new_string(v) : NULL);
}

void events_vm_created(struct vm *vm)
{
	json_object *f = json_object_new_object();

	add_str(f, "state", vm_state_to_string(vm->state));
	add_str(f, "vmm", vm->cfg.vmm);
	json_object_object_add(f, "memory_bytes",
			       json_object_new_int64((int64_t)vm->cfg.memory_bytes));
	events_emit(vm->d, "created", vm->cfg.name, f);
}

void events_vm_state(struct vm *vm, int old_state, int new_state)
{
	json_object *f = json_object_new_object();

	add_str(f, "from", vm_state_to_string(old_state));
	add_str(f, "state", vm_state_to_string(new_state));
	json_object_object_add(f, "updating", json_object_new_boolean(vm->update != NULL));
	events_emit(vm->d, "state", vm->cfg.name, f);
}

void events_vm_crashed(struct vm *vm)
{
	json_object *f = json_object_new_object();

	json_object_object_add(f, "pid", vm->last_pid ? json_object_new_int(vm->last_pid) : NULL);
	json_object_object_add(f, "exit_code", json_object_new_int(vm->exit_code));
	/* vmm.c gives a VMM killed by signal N the exit code 128 + N. */
	json_object_object_add(f, "signal",
			       vm->exit_code > 128 && strncmp(vm->exit_desc, "killed", 6) == 0
				   ? json_object_new_int(vm->exit_code - 128)
				   : NULL);
	add_str(f, "exit", vm->exit_desc);
	json_object_object_add(f, "updating", json_object_new_boolean(vm->update != NULL));
	events_emit(vm->d, "crashed", vm->cfg.name, f);
}

void events_vm_destroyed(struct vm *vm)
{
	json_object *f = json_object_new_object();

	/* A VM that never ran was not destroyed by anyone: its start failed. */
	add_str(f, "reason", vm->state == VM_STARTING ? "start-failed" : "destroyed");
	add_str(f, "state", vm_state_to_string(vm->state));
	events_emit(vm->d, "destroyed", vm->cfg.name, f);
}

void events_update_started(struct vm *vm, const char *strategy, const char *old_vmm,
			   const char *new_vmm, int old_pid)
{
	json_object *f = json_object_new_object();

	add_str(f, "strategy", strategy);
	add_str(f, "old_vmm", old_vmm);
	add_str(f, "new_vmm", new_vmm);
	json_object_object_add(f, "old_pid", json_object_new_int(old_pid));
	events_emit(vm->d, "update-started", vm->cfg.name, f);
}

void events_update_finished(struct vm *vm, json_object *report)
{
	json_object *f = json_object_new_object();
	const char *keys[] = { "strategy", "result", "blackout_ms", "total_ms", "error" };
	json_object *v;

	/* The summary flat, for one-line readers; the whole report beside it. */
	for (size_t i = 0; i < ELEMENTSOF(keys); i++)
		if (json_object_object_get_ex(report, keys[i], &v))
			json_object_object_add(f, keys[i], json_object_get(v));
	json_object_object_add(f, "report", json_object_get(report));
	events_emit(vm->d, "update-finished", vm->cfg.name, f);
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
	metrics_changed(d); /* the subscriber gauge */
}
