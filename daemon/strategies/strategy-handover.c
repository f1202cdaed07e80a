/* SPDX-License-Identifier: MIT */
/*
 * handover: the new VMM starts beside the old one with the same held fds
 * and -incoming defer; both get one end of a socketpair through QMP getfd;
 * x-ignore-shared leaves guest RAM (the memfd cprd holds) where it is, so
 * only device state and the small non-shared RAM cross the channel.
 *
 *   launch   new VMM starting; meanwhile the old VMM is prepared
 *   prepare  the new VMM's capabilities, channel end and a warm-up
 *   migrate  migrate-incoming on the new VMM, migrate on the old one
 *   (commit, end-old: the engine's)
 */
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

#include "common/macro.h"
#include "daemon/devices/device.h"
#include "daemon/strategies/strategy.h"
#include "daemon/core/vm.h"
#include "daemon/core/vmm.h"

#define MIG_FDNAME "cprd-mig"
/* While the guest runs, the old VMM may be at most this far (doubled by the
 * kernel) ahead of the new one on the channel; once the guest is paused the
 * channel gets its original size back. See migration_channel(). */
#define MIG_PRECOPY_SNDBUF 4096

struct handover {
	int mig[2];           /* channel ends until both VMMs hold theirs; then
			       * mig[0], the old VMM's, until the guest pauses */
	int mig_sndbuf;       /* the channel's send buffer as created, to restore */
	unsigned pending;     /* replies still awaited from the new VMM */
	unsigned old_pending; /* replies still awaited from the old VMM */
};

static struct handover *H(struct update *u)
{
	return u->priv;
}

/* Bounded while the guest runs: the old VMM then cannot finish its pass
 * over the non-shared RAM, and pause the guest, before the new VMM has
 * actually read it; at the default size that data would wait in the socket
 * and be loaded inside the blackout. open_channel() lifts the bound. */
static int migration_channel(int fds[2], int *ret_sndbuf)
{
	socklen_t len = sizeof(*ret_sndbuf);

	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) < 0)
		return -errno;
	if (getsockopt(fds[0], SOL_SOCKET, SO_SNDBUF, ret_sndbuf, &len) < 0 ||
	    setsockopt(fds[0], SOL_SOCKET, SO_SNDBUF, &(int){ MIG_PRECOPY_SNDBUF }, sizeof(int)) <
		0) {
		close_many(fds, 2);
		return -errno;
	}
	return 0;
}

/* The guest has paused: what is left (the last dirty pages and the device
 * state) should cross in as few round trips as possible. The socket is the
 * same one the old VMM holds, so raising our end's buffer raises its. */
static void open_channel(struct handover *h)
{
	int sz = h->mig_sndbuf / 2; /* setsockopt() doubles what it is given */

	if (h->mig[0] < 0)
		return;
	(void)setsockopt(h->mig[0], SOL_SOCKET, SO_SNDBUF, &sz, sizeof(sz));
	h->mig[0] = safe_close(h->mig[0]);
}

static void incoming_ready(qmp *q, json_object *ret, const char *cls, const char *desc, void *ud)
{
	struct update *u = ud;

	if (u->phase != PHASE_PREPARE)
		return;
	if (!ret) {
		update_rollback(u, "the new VMM refused the incoming migration: %s", desc);
		return;
	}
	update_migrate(u, json_tokener_parse("{\"uri\": \"fd:" MIG_FDNAME "\"}"));
}

static void maybe_migrate(struct update *u)
{
	struct handover *h = H(u);

	if (u->phase != PHASE_PREPARE || h->pending > 0 || h->old_pending > 0)
		return;
	/* Both VMMs hold their end of the channel now. The new VMM's copy can
	 * go; the old VMM's stays until the guest pauses (open_channel()). */
	h->mig[1] = safe_close(h->mig[1]);
	if (vmm_command(u->next, "migrate-incoming",
			json_tokener_parse("{\"uri\": \"fd:" MIG_FDNAME "\"}"), -EBADF,
			incoming_ready, u) < 0)
		update_rollback(u, "lost the new VMM's monitor");
}

static bool preparing(const struct update *u)
{
	return u->phase == PHASE_LAUNCH || u->phase == PHASE_PREPARE;
}

static void old_prepared(qmp *q, json_object *ret, const char *cls, const char *desc, void *ud)
{
	struct update *u = ud;

	if (!preparing(u))
		return;
	if (!ret) {
		update_rollback(u, "preparing the old VMM failed: %s", desc);
		return;
	}
	H(u)->old_pending--;
	maybe_migrate(u);
}

static void new_prepared(qmp *q, json_object *ret, const char *cls, const char *desc, void *ud)
{
	struct update *u = ud;

	if (u->phase != PHASE_PREPARE)
		return;
	if (!ret) {
		update_rollback(u, "preparing the new VMM failed: %s", desc);
		return;
	}
	H(u)->pending--;
	maybe_migrate(u);
}

/* Warm-up, whatever its answer. QEMU's RCU thread calls malloc_trim() once
 * it is idle, so by the time its migration starts a new VMM has handed its
 * free heap back to the kernel, and loading the device state faults it back
 * in page by page, inside the blackout (about 360 page faults, 3 ms and
 * more here). Listing the QOM types makes its main thread allocate and free
 * enough small objects that the load finds most of its heap resident (about
 * 70 faults); see docs/ARCHITECTURE.md. */
static void warmed(qmp *q, json_object *ret, const char *cls, const char *desc, void *ud)
{
	struct update *u = ud;

	if (u->phase != PHASE_PREPARE)
		return;
	H(u)->pending--;
	maybe_migrate(u);
}

/* Only what this migration needs is on: a capability left on by an earlier
 * tool (return-path, switchover-ack, multifd, postcopy...) would change the
 * protocol under a new VMM that does not expect it. */
static void old_caps_known(qmp *q, json_object *ret, const char *cls, const char *desc, void *ud)
{
	struct update *u = ud;
	json_object *caps, *args;
	size_t n = json_object_is_type(ret, json_type_array) ? json_object_array_length(ret) : 0;

	if (!preparing(u))
		return;
	if (!ret) {
		update_rollback(u, "cannot read the old VMM's migration capabilities: %s", desc);
		return;
	}
	caps = json_tokener_parse("[{\"capability\": \"x-ignore-shared\", \"state\": true},"
				  "{\"capability\": \"events\", \"state\": true}]");
	for (size_t i = 0; i < n; i++) {
		json_object *c = json_object_array_get_idx(ret, i), *off;
		const char *name = json_object_get_string(json_object_object_get(c, "capability"));

		if (!name || !json_object_get_boolean(json_object_object_get(c, "state")) ||
		    streq(name, "x-ignore-shared") || streq(name, "events"))
			continue;
		off = json_object_new_object();
		json_object_object_add(off, "capability", json_object_new_string(name));
		json_object_object_add(off, "state", json_object_new_boolean(false));
		json_object_array_add(caps, off);
	}
	args = json_object_new_object();
	json_object_object_add(args, "capabilities", caps);
	if (vmm_command(u->vm->vmm, "migrate-set-capabilities", args, -EBADF, old_prepared, u) < 0)
		update_rollback(u, "lost the old VMM's monitor");
}

/* A VMM that was itself a cpr-transfer source or destination may carry
 * that mode: say which one this migration is. */
static int prepare_old(struct update *u)
{
	struct vmm *old = u->vm->vmm;
	int r = 0;

	H(u)->old_pending = 3;
	r |= vmm_command(old, "query-migrate-capabilities", NULL, -EBADF, old_caps_known, u);
	r |= vmm_command(old, "migrate-set-parameters",
			 json_tokener_parse("{\"mode\": \"normal\"}"), -EBADF, old_prepared, u);
	r |= vmm_command(old, "getfd", json_tokener_parse("{\"fdname\": \"" MIG_FDNAME "\"}"),
			 H(u)->mig[0], old_prepared, u);
	return r;
}

static void new_ready(struct update *u)
{
	struct handover *h = H(u);
	int r = 0;

	if (!update_set_phase(u, PHASE_PREPARE))
		return;
	h->pending = 3;
	r |= vmm_command(
	    u->next, "migrate-set-capabilities",
	    json_tokener_parse("{\"capabilities\": [{\"capability\": \"x-ignore-shared\","
			       " \"state\": true}]}"),
	    -EBADF, new_prepared, u);
	r |= vmm_command(u->next, "getfd", json_tokener_parse("{\"fdname\": \"" MIG_FDNAME "\"}"),
			 h->mig[1], new_prepared, u);
	r |= vmm_command(u->next, "qom-list-types", NULL, -EBADF, warmed, u);
	if (r < 0)
		update_rollback(u, "lost the new VMM's monitor while preparing");
}

static void start(struct update *u)
{
	struct handover *h = calloc(1, sizeof(*h));
	int r;

	if (!h) {
		update_rollback(u, "out of memory");
		return;
	}
	h->mig[0] = h->mig[1] = -EBADF;
	u->priv = h;
	r = migration_channel(h->mig, &h->mig_sndbuf);
	if (r < 0) {
		update_rollback(u, "cannot create the migration channel: %s", strerror(-r));
		return;
	}
	if (!update_launch(u, &(struct vmm_incoming){ .defer = true }))
		return;
	/* The old VMM is prepared while the new one starts. */
	if (prepare_old(u) < 0)
		update_rollback(u, "lost the old VMM's monitor");
}

static void old_event(struct update *u, const char *event, json_object *data)
{
	const char *st;

	if (streq(event, "STOP")) {
		open_channel(H(u));
	} else if (streq(event, "MIGRATION")) {
		/* Should the guest have paused on its own meanwhile, no STOP comes. */
		st = json_object_get_string(json_object_object_get(data, "status"));
		if (st && streq(st, "device"))
			open_channel(H(u));
	}
}

/* The old VMM may still hold its end of the channel (both may fail
 * harmlessly). */
static void rollback(struct update *u, struct vmm *old)
{
	struct handover *h = H(u);

	if (h)
		close_many(h->mig, 2);
	vmm_command(old, "closefd", json_tokener_parse("{\"fdname\": \"" MIG_FDNAME "\"}"), -EBADF,
		    NULL, NULL);
}

static void done(struct update *u)
{
	struct handover *h = H(u);

	if (!h)
		return;
	close_many(h->mig, 2);
	free(h);
	u->priv = NULL;
}

const struct strategy strategy_handover = {
	.name = "handover",
	.carry = DEVICE_BY_HANDOVER,
	.first = PHASE_LAUNCH,
	.next = {
		[PHASE_LAUNCH] = PHASE_BIT(PHASE_PREPARE) | PHASE_BIT(PHASE_ROLLBACK),
		[PHASE_PREPARE] = PHASE_BIT(PHASE_MIGRATE) | PHASE_BIT(PHASE_ROLLBACK),
		[PHASE_MIGRATE] = PHASE_BIT(PHASE_COMMIT) | PHASE_BIT(PHASE_ROLLBACK),
		[PHASE_COMMIT] = PHASE_BIT(PHASE_END_OLD) | PHASE_BIT(PHASE_ROLLBACK),
	},
	.start = start,
	.new_ready = new_ready,
	.old_event = old_event,
	.rollback = rollback,
	.done = done,
	.needs_caps = (const char *const[]){ "x-ignore-shared", "events", NULL },
};
