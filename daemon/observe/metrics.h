/* SPDX-License-Identifier: MIT */
/*
 * Daemon-wide metrics in the Prometheus text exposition format (0.0.4):
 * counters of what happened (updates by strategy and result, blackouts,
 * VMs created, destroyed and crashed), which outlive the VMs they counted,
 * and gauges read from the daemon's state when asked. README.md lists every
 * metric.
 *
 * The counters are kept in STATE_DIR/metrics.json, so that a cprd that is
 * restarted or re-executes on the same state directory counts on; a new
 * state directory (a reboot: it is on tmpfs) starts them at zero, which
 * Prometheus reads as a counter reset.
 *
 * With --metrics-file PATH the exposition is also kept in a file, for
 * node_exporter's textfile collector: replaced atomically (a temp file in
 * the same directory, renamed over it) when something changed, at most
 * once per --metrics-interval.
 */
#pragma once

#include <json-c/json.h>

#include "daemon/core/daemon.h"

struct call;

/* file may be NULL (no metrics file); interval in seconds. Loads the
 * counters kept in the state directory. */
int metrics_start(struct daemon *d, const char *file, double interval);
void metrics_free(struct daemon *d);

/* Count an event (events.h builds it; borrowed). */
void metrics_observe(struct daemon *d, json_object *event);
/* A gauge may have changed: the metrics file is due again. */
void metrics_changed(struct daemon *d);
/* Before the loop waits: keep the counters and the metrics file current. */
void metrics_flush(struct daemon *d);

/* The exposition text, NUL-terminated; the caller frees it. */
int metrics_text(struct daemon *d, char **ret, size_t *ret_len);

/* The daemon.metrics method: {"content_type", "text"}. */
void metrics_method(struct daemon *d, struct call *c, json_object *params);
