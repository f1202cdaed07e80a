/* SPDX-License-Identifier: MIT */
#include "daemon/core/limits.h"

enum admit_verdict limits_admit(const struct peer_limits *l, bool privileged, uid_t uid,
				const struct peer_counts *n)
{
	unsigned open =
	    l->max_clients > l->reserved_privileged ? l->max_clients - l->reserved_privileged : 0;

	if (n->total >= l->max_clients)
		return ADMIT_FULL;
	if (uid == 0)
		return ADMIT_OK;
	if (l->max_per_uid > 0 && n->same_uid >= l->max_per_uid)
		return ADMIT_UID;
	if (!privileged && n->unprivileged >= open)
		return ADMIT_UNPRIVILEGED;
	return ADMIT_OK;
}

const char *admit_verdict_to_string(enum admit_verdict v)
{
	switch (v) {
	case ADMIT_OK:
		return "admitted";
	case ADMIT_FULL:
		return "too many connections";
	case ADMIT_UNPRIVILEGED:
		return "too many connections from unprivileged peers";
	case ADMIT_UID:
		return "too many connections from this uid";
	}
	return "?";
}

size_t limits_out_share(const struct peer_limits *l, unsigned n_clients)
{
	size_t even = n_clients > 0 ? l->out_budget / n_clients : l->out_budget;

	return even > l->out_min_share ? even : l->out_min_share;
}

enum out_verdict limits_out_check(const struct peer_limits *l, unsigned n_clients, size_t queued,
				  size_t total)
{
	if (queued <= limits_out_share(l, n_clients))
		return OUT_OK;
	if (total > l->out_budget)
		return OUT_DROP;
	return OUT_THROTTLE;
}

bool ratelimit_pass(struct ratelimit *rl, uint64_t now_usec, unsigned *ret_suppressed)
{
	if (rl->last_usec != 0 && now_usec - rl->last_usec < rl->interval_usec) {
		rl->suppressed++;
		return false;
	}
	if (ret_suppressed)
		*ret_suppressed = rl->suppressed;
	rl->suppressed = 0;
	rl->last_usec = now_usec;
	return true;
}
