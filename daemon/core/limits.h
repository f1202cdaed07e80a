/* SPDX-License-Identifier: MIT */
/*
 * What one peer may take of cprd: connections (per uid, with slots kept for
 * root and group cprd), memory for replies it has not read, and how often
 * cprd says so in its log. Pure decisions: no loop, no logging, so the
 * rules can be tested on their own (server.c applies them).
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define LIMITS_MAX_CLIENTS 1024           /* connections, everyone together */
#define LIMITS_RESERVED_PRIVILEGED 64     /* of those, only root and group cprd */
#define LIMITS_MAX_CLIENTS_PER_UID 64     /* per uid other than 0 (--max-clients-per-uid) */
#define LIMITS_IDLE_TIMEOUT_SEC 60        /* nothing in flight this long (--idle-timeout) */
#define LIMITS_OUT_BUDGET (64u << 20)     /* unread replies, all clients together */
#define LIMITS_OUT_MIN_SHARE (1u << 20)   /* a client's share never drops below this */
#define LIMITS_OUT_OVER_SEC 10            /* over its share this long: dropped */
#define LIMITS_BATCH_MAX_CALLS 256        /* calls in one batch */
#define LIMITS_BATCH_MAX_REPLY (4u << 20) /* bytes of one batch's answer */
#define LIMITS_LOG_INTERVAL_SEC 10        /* one line per reason per interval */

struct peer_limits {
	unsigned max_clients;
	unsigned reserved_privileged;
	unsigned max_per_uid;      /* 0: no per-uid limit */
	unsigned idle_timeout_sec; /* 0: never */
	size_t out_budget;
	size_t out_min_share;
};

#define PEER_LIMITS_DEFAULT                                                       \
	((struct peer_limits){ .max_clients = LIMITS_MAX_CLIENTS,                 \
			       .reserved_privileged = LIMITS_RESERVED_PRIVILEGED, \
			       .max_per_uid = LIMITS_MAX_CLIENTS_PER_UID,         \
			       .idle_timeout_sec = LIMITS_IDLE_TIMEOUT_SEC,       \
			       .out_budget = LIMITS_OUT_BUDGET,                   \
			       .out_min_share = LIMITS_OUT_MIN_SHARE })

/* Connections open now, as counted when a new one arrives. */
struct peer_counts {
	unsigned total;        /* every client */
	unsigned unprivileged; /* neither root nor group cprd */
	unsigned same_uid;     /* of the new peer's uid */
};

enum admit_verdict {
	ADMIT_OK,
	ADMIT_FULL,         /* every slot is taken */
	ADMIT_UNPRIVILEGED, /* the slots open to unprivileged peers are taken */
	ADMIT_UID,          /* this uid holds its share */
};

/* Whether a new peer gets a connection. Root is limited only by the total;
 * group cprd also by the per-uid limit, but may use the reserved slots;
 * everyone else by both, outside the reserved slots. */
enum admit_verdict limits_admit(const struct peer_limits *l, bool privileged, uid_t uid,
				const struct peer_counts *n);
const char *admit_verdict_to_string(enum admit_verdict v);

/* How many unread bytes one of n_clients clients may have queued before
 * cprd stops reading from it: an even part of the budget, never less
 * than the minimum share (so one large answer always fits). */
size_t limits_out_share(const struct peer_limits *l, unsigned n_clients);

/* What to do about a client with `queued` unread bytes while all clients
 * have `total` queued. */
enum out_verdict {
	OUT_OK,       /* read from it as usual */
	OUT_THROTTLE, /* over its share: stop reading until it catches up */
	OUT_DROP,     /* over its share while the budget is spent: drop it now */
};
enum out_verdict limits_out_check(const struct peer_limits *l, unsigned n_clients, size_t queued,
				  size_t total);

/* At most one event per interval; the ones in between are counted. */
struct ratelimit {
	uint64_t interval_usec;
	uint64_t last_usec; /* 0: never */
	unsigned suppressed;
};

/* True when this event may be logged now; *ret_suppressed (when not NULL)
 * then says how many were held back since the last one. */
bool ratelimit_pass(struct ratelimit *rl, uint64_t now_usec, unsigned *ret_suppressed);
