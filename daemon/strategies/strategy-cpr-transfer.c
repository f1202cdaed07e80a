/* SPDX-License-Identifier: MIT */
/*
 * cpr-transfer: QEMU's own mode (QEMU >= 10.0). The old VMM is told
 * mode=cpr-transfer; the new one starts with a main and a cpr incoming
 * channel on socket paths, and reads the cpr channel (which carries its
 * memory-backend fds) before its monitor exists, so it is configured
 * entirely on its command line.
 *
 *   prepare  the old VMM: cpr-transfer mode, x-ignore-shared off
 *   launch   the new VMM starting, until its cpr socket listens
 *   migrate  migrate on the old VMM with both channels
 *   (commit, end-old: the engine's)
 */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "common/macro.h"
#include "common/proc.h"
#include "daemon/devices/device.h"
#include "daemon/strategies/strategy.h"
#include "daemon/core/vm.h"
#include "daemon/core/vmm.h"

#define CPR_MAIN_SOCK "cpr-main.sock"
#define CPR_STATE_SOCK "cpr-state.sock"
#define CPR_POLL_FIRST 0.002
#define CPR_POLL_EVERY 0.005

struct cpr {
	char *main_path, *state_path;
	ev_timer poll; /* waiting for the new VMM's cpr socket */
	unsigned pending;
	struct update *u;
};

static struct cpr *C(struct update *u)
{
	return u->priv;
}

static json_object *channels(const struct cpr *c)
{
	json_object *args = json_object_new_object(), *arr = json_object_new_array();
	const char *types[2] = { "main", "cpr" }, *paths[2] = { c->main_path, c->state_path };

	for (int i = 0; i < 2; i++) {
		json_object *ch = json_object_new_object(), *addr = json_object_new_object();

		json_object_object_add(addr, "transport", json_object_new_string("socket"));
		json_object_object_add(addr, "type", json_object_new_string("unix"));
		json_object_object_add(addr, "path", json_object_new_string(paths[i]));
		json_object_object_add(ch, "channel-type", json_object_new_string(types[i]));
		json_object_object_add(ch, "addr", addr);
		json_object_array_add(arr, ch);
	}
	json_object_object_add(args, "channels", arr);
	return args;
}

/* QEMU 10.0 binds the cpr channel itself (it refuses an fd), and a probe
 * connection would be taken as the channel, so the only way to know the
 * destination is ready is to watch for its socket. The check is cheap and
 * bounded by the update's deadline. */
static void poll_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct cpr *c = w->data;
	struct update *u = c->u;

	if (u->phase != PHASE_LAUNCH) {
		ev_timer_stop(loop, w);
		return;
	}
	/* Looked up in the new VMM's own network namespace (a confined one
	 * has its own): cprd's /proc/net/unix would never list the socket. */
	if (!u->next || u->next->pid <= 0 || !unix_listening(u->next->pid, c->state_path))
		return;
	ev_timer_stop(loop, w);
	update_migrate(u, channels(c));
}

static void launch(struct update *u)
{
	struct cpr *c = C(u);
	struct vmm_incoming in = { .cpr_main_path = c->main_path, .cpr_state_path = c->state_path };

	unlink(c->main_path);
	unlink(c->state_path);
	if (!update_set_phase(u, PHASE_LAUNCH))
		return;
	if (!update_launch(u, &in))
		return;
	ev_timer_set(&c->poll, CPR_POLL_FIRST, CPR_POLL_EVERY);
	ev_timer_start(u->vm->d->loop, &c->poll);
}

static void old_prepared(qmp *q, json_object *ret, const char *cls, const char *desc, void *ud)
{
	struct update *u = ud;

	if (u->phase != PHASE_PREPARE)
		return;
	if (!ret) {
		update_rollback(u, "the old VMM refused cpr-transfer: %s", desc);
		return;
	}
	if (--C(u)->pending == 0)
		launch(u);
}

/* The old VMM first: cpr-transfer mode, and x-ignore-shared off (a VMM
 * that arrived by handover has it on, and a cpr-transfer destination
 * rejects a stream that says so). */
static void start(struct update *u)
{
	struct vmm *old = u->vm->vmm;
	struct cpr *c = calloc(1, sizeof(*c));
	int r = 0;

	if (!c) {
		update_rollback(u, "out of memory");
		return;
	}
	u->priv = c;
	c->u = u;
	ev_init(&c->poll, poll_cb);
	c->poll.data = c;
	if (asprintf(&c->main_path, "%s/" CPR_MAIN_SOCK, update_vm_dir(u)) < 0 ||
	    asprintf(&c->state_path, "%s/" CPR_STATE_SOCK, update_vm_dir(u)) < 0) {
		c->main_path = c->state_path = NULL;
		update_rollback(u, "out of memory");
		return;
	}
	c->pending = 2;
	r |= vmm_command(
	    old, "migrate-set-capabilities",
	    json_tokener_parse("{\"capabilities\": ["
			       "{\"capability\": \"x-ignore-shared\", \"state\": false},"
			       "{\"capability\": \"events\", \"state\": true}]}"),
	    -EBADF, old_prepared, u);
	r |= vmm_command(old, "migrate-set-parameters",
			 json_tokener_parse("{\"mode\": \"cpr-transfer\"}"), -EBADF, old_prepared,
			 u);
	if (r < 0)
		update_rollback(u, "lost the old VMM's monitor");
}

static void rollback(struct update *u, struct vmm *old)
{
	struct cpr *c = C(u);

	if (c)
		ev_timer_stop(u->vm->d->loop, &c->poll);
}

static void remove_sockets(const char *dir)
{
	char path[4096];

	snprintf(path, sizeof(path), "%s/" CPR_MAIN_SOCK, dir);
	unlink(path);
	snprintf(path, sizeof(path), "%s/" CPR_STATE_SOCK, dir);
	unlink(path);
}

static void done(struct update *u)
{
	struct cpr *c = C(u);

	if (!c)
		return;
	ev_timer_stop(u->vm->d->loop, &c->poll);
	remove_sockets(update_vm_dir(u));
	free(c->main_path);
	free(c->state_path);
	free(c);
	u->priv = NULL;
}

const struct strategy strategy_cpr_transfer = {
	.name = "cpr-transfer",
	.carry = DEVICE_BY_CPR_TRANSFER,
	.first = PHASE_PREPARE,
	.next = {
		[PHASE_PREPARE] = PHASE_BIT(PHASE_LAUNCH) | PHASE_BIT(PHASE_ROLLBACK),
		[PHASE_LAUNCH] = PHASE_BIT(PHASE_MIGRATE) | PHASE_BIT(PHASE_ROLLBACK),
		[PHASE_MIGRATE] = PHASE_BIT(PHASE_COMMIT) | PHASE_BIT(PHASE_ROLLBACK),
		[PHASE_COMMIT] = PHASE_BIT(PHASE_END_OLD) | PHASE_BIT(PHASE_ROLLBACK),
	},
	.start = start,
	.rollback = rollback,
	.done = done,
	.settle = remove_sockets,
	.needs_caps = (const char *const[]){ "events", NULL },
	.needs_mode = "cpr-transfer",
};
