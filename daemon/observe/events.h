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

#include "daemon/core/daemon.h"

#define EVENTS_MAX_QUEUED (1 << 20)

struct vm;
struct call;

/* Tell subscribers, and d->observe_event (the counters: main.c sets it to
 * the metrics), of an event: fields (taken, may be NULL) get seq,
 * time_usec, kind and, when vm is not NULL, "vm". What an event says of a
 * VM or an update is composed where they live (vm.c, update.c). */
void events_emit(struct daemon *d, const char *kind, const char *vm, json_object *fields);

/* The events.subscribe method. */
void events_subscribe(struct daemon *d, struct call *c, json_object *params);
