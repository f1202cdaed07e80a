/* SPDX-License-Identifier: MIT */
/*
 * cprd's own time, measured on its event loop: how long each turn of the
 * loop kept it busy (from the poll returning to the next poll), and how
 * long each JSON-RPC request took to handle (from its parse until its
 * handler returned: for a call answered at once, until its reply was
 * queued; for one answered later, such as vm.create, the wait for the VMM
 * is not cprd's time and is not counted). Kept since the last reset as
 * histograms whose buckets are at most 12.5% wide; percentiles are given
 * as the upper bound of their bucket. Each is kept twice: wall-clock time,
 * and the CPU time cprd's thread used meanwhile (on a loaded host the
 * first also holds the time cprd waited for a CPU).
 */
#pragma once

#include <json-c/json.h>
#include <stdint.h>

#include "daemon/core/daemon.h"

struct method;

int stats_start(struct daemon *d);
void stats_free(struct daemon *d);
/* A request's start: wall-clock and thread CPU time. */
struct stats_mark {
	uint64_t wall, cpu;
};
void stats_mark(struct stats_mark *t);
void stats_request(struct daemon *d, const struct method *m, const struct stats_mark *t0);
/* The "loop" object of daemon.status and daemon.stats. */
json_object *stats_to_json(struct daemon *d);
void stats_reset(struct daemon *d);
