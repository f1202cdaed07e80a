/* SPDX-License-Identifier: MIT */
/*
 * Events: what happens to VMs and updates, told to every connection that
 * called events.subscribe, as JSON-RPC notifications
 * {"jsonrpc":"2.0","method":"event","params":{"seq","time_usec","kind",...}}.
 * README.md lists the kinds and their fields. The same events feed the
 * daemon-wide counters (metrics.h), so that both always agree.
 *
 * A subscriber that does not read is never allowed to grow cprd: past
 * EVENTS_MAX_QUEUED bytes still unread, it gets a last "dropped" event and
 * its connection is closed.
 */
#pragma once

#include <json-c/json.h>

#include "daemon/daemon.h"

#define EVENTS_MAX_QUEUED (1 << 20)

struct vm;
struct call;

/* Tell subscribers (and the counters) of an event: fields (taken, may be
 * NULL) get seq, time_usec, kind and, when vm is not NULL, "vm". */
void events_emit(struct daemon *d, const char *kind, const char *vm, json_object *fields);

/* The hooks the VM and update code call. */
void events_vm_created(struct vm *vm);
void events_vm_state(struct vm *vm, int old_state, int new_state);
void events_vm_crashed(struct vm *vm);
void events_vm_destroyed(struct vm *vm);
void events_update_started(struct vm *vm, const char *strategy, const char *old_vmm,
			   const char *new_vmm, int old_pid);
/* report is borrowed. */
void events_update_finished(struct vm *vm, json_object *report);

/* The events.subscribe method. */
void events_subscribe(struct daemon *d, struct call *c, json_object *params);
