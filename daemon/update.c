/* SPDX-License-Identifier: MIT */
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <systemd/sd-journal.h>

#include "common/file.h"
#include "common/json.h"
#include "daemon/log.h"
#include "daemon/server.h"
#include "daemon/update.h"
#include "daemon/vm.h"
#include "proto/jsonrpc.h"

#define MIG_FDNAME "cprd-mig"
/* While the guest runs, the old VMM may be at most this far (doubled by the
 * kernel) ahead of the new one on the channel; once the guest is paused the
 * channel gets its original size back. See migration_channel(). */
#define MIG_PRECOPY_SNDBUF 4096
#define END_OLD_TIMEOUT 5.0 /* the old VMM has nothing left to do */
#define CONT_RETRIES 40     /* 2 s: the old VMM may still be finishing migration */
#define HISTORY_MAX_BYTES (4 << 20)

enum phase {
	PHASE_LAUNCH,   /* new VMM starting, waiting for its monitor */
	PHASE_PREPARE,  /* capabilities and channel on both */
	PHASE_MIGRATE,  /* device state moving; the guest pauses here */
	PHASE_SWITCH,   /* new VMM resumed; confirming it runs */
	PHASE_END_OLD,  /* the guest runs in the new VMM; ending the old */
	PHASE_ROLLBACK, /* new VMM ended; resuming the old */
};

static const char *const phase_names[] = {
	[PHASE_LAUNCH] = "starting the new VMM", [PHASE_PREPARE] = "preparing both VMMs",
	[PHASE_MIGRATE] = "moving device state", [PHASE_SWITCH] = "confirming the new VMM",
	[PHASE_END_OLD] = "ending the old VMM",  [PHASE_ROLLBACK] = "rolling back",
};

static const char *const strategy_names[_UPDATE_STRATEGY_MAX] = {
	[UPDATE_HANDOVER] = "handover",
	[UPDATE_CPR_TRANSFER] = "cpr-transfer",
};

struct update {
	struct vm *vm;
	char *cpr_main, *cpr_state; /* cpr-transfer channel socket paths */
	ev_timer poll;              /* cpr-transfer: waiting for the cpr socket */
	struct call *call;
	enum update_strategy strategy;
	enum phase phase;
	struct vmm *next; /* the new VMM until it is adopted */
	struct vmm *old;  /* the old VMM once the new one is adopted */
	ev_timer timer;
	int mig_sndbuf;       /* the channel's send buffer as created, to restore */
	int mig[2];           /* channel ends until both VMMs hold theirs; then
			       * mig[0], the old VMM's, until the guest pauses */
	unsigned pending;     /* replies still awaited in this phase (new VMM) */
	unsigned old_pending; /* handover: replies still awaited from the old VMM */
	unsigned cont_tries;
	bool stats_asked, stats_pending; /* query-migrate on the old VMM */
	uint64_t t0_mono, t0_real;
	int64_t stop_us, resume_us, old_resume_us; /* QEMU event timestamps */
	int64_t bytes;
	pid_t old_pid, new_pid;
	char *old_binary, *new_binary;
	char old_version[32], new_version[32];
	char error[512];
};

int update_strategy_from_string(const char *s)
{
	for (int i = 0; i < _UPDATE_STRATEGY_MAX; i++)
		if (streq(strategy_names[i], s))
			return i;
	return -EINVAL;
}

static void rollback(struct update *u, const char *fmt, ...) _printf_(2, 3);

static void set_phase(struct update *u, enum phase p)
{
	u->phase = p;
	log_debug("VM %s: update +%.1f ms: %s", u->vm->cfg.name,
		  (double)(now_usec(CLOCK_MONOTONIC) - u->t0_mono) / 1000.0, phase_names[p]);
}

/* ---- the end: report, history, log ---- */

static double ms_between(int64_t a_us, int64_t b_us)
{
	return (double)(b_us - a_us) / 1000.0;
}

/* Milliseconds with microsecond resolution, printed as such. */
static json_object *ms_json(double ms)
{
	char buf[32];

	snprintf(buf, sizeof(buf), "%.3f", ms);
	return json_object_new_double_s(ms, buf);
}

static json_object *report(struct update *u, const char *result)
{
	json_object *o = json_object_new_object();
	double blackout = -1;
	int64_t end = u->resume_us ? u->resume_us : u->old_resume_us;

	if (u->stop_us && end > u->stop_us)
		blackout = ms_between(u->stop_us, end);
	else if (!u->stop_us && !u->resume_us)
		blackout = 0; /* rolled back before the guest ever paused */
	/* else unknown: a moved guest must have paused, so never claim 0 */
	json_object_object_add(o, "vm", json_object_new_string(u->vm->cfg.name));
	json_object_object_add(o, "strategy", json_object_new_string(strategy_names[u->strategy]));
	json_object_object_add(o, "result", json_object_new_string(result));
	json_object_object_add(o, "blackout_ms", blackout >= 0 ? ms_json(blackout) : NULL);
	json_object_object_add(o, "total_ms",
			       ms_json((double)(now_usec(CLOCK_MONOTONIC) - u->t0_mono) / 1000.0));
	json_object_object_add(o, "time_usec", json_object_new_int64((int64_t)u->t0_real));
	json_object_object_add(o, "old_pid", json_object_new_int(u->old_pid));
	json_object_object_add(o, "new_pid", u->new_pid ? json_object_new_int(u->new_pid) : NULL);
	json_object_object_add(o, "old_vmm", json_object_new_string(u->old_binary));
	json_object_object_add(o, "new_vmm", json_object_new_string(u->new_binary));
	json_object_object_add(o, "old_version", json_object_new_string(u->old_version));
	json_object_object_add(o, "new_version",
			       u->new_version[0] ? json_object_new_string(u->new_version) : NULL);
	json_object_object_add(o, "bytes_transferred",
			       u->bytes >= 0 ? json_object_new_int64(u->bytes) : NULL);
	if (u->error[0])
		json_object_object_add(o, "error", json_object_new_string(u->error));
	return o;
}

static void append_history(struct vm *vm, json_object *rep)
{
	_cleanup_close_ int fd =
	    open(vm->history_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);
	size_t len;
	const char *s = jsonrpc_to_string(rep, &len);
	char line[4096];

	if (fd < 0 || len + 1 > sizeof(line))
		return;
	memcpy(line, s, len);
	line[len] = '\n';
	(void)!write(fd, line, len + 1); /* one write: a line is never torn */
}

static void log_result(struct update *u, json_object *rep)
{
	const char *result = json_object_get_string(json_object_object_get(rep, "result"));
	const char *bo = json_object_get_string(json_object_object_get(rep, "blackout_ms"));
	const char *total = json_object_get_string(json_object_object_get(rep, "total_ms"));

	log_msg(streq(result, "ok") ? LOG_INFO : LOG_WARNING,
		"update vm=%s strategy=%s result=%s blackout_ms=%s total_ms=%s old_pid=%d "
		"new_pid=%d%s%s",
		u->vm->cfg.name, strategy_names[u->strategy], result, bo ? bo : "unknown", total,
		(int)u->old_pid, (int)u->new_pid, u->error[0] ? " error=" : "", u->error);
	if (getenv("JOURNAL_STREAM"))
		sd_journal_send("MESSAGE=update of %s: %s", u->vm->cfg.name, result, "PRIORITY=%d",
				streq(result, "ok") ? LOG_INFO : LOG_WARNING, "CPRD_VM=%s",
				u->vm->cfg.name, "CPRD_STRATEGY=%s", strategy_names[u->strategy],
				"CPRD_RESULT=%s", result, "CPRD_BLACKOUT_MS=%s", bo ? bo : "",
				"CPRD_TOTAL_MS=%s", total, "CPRD_ERROR=%s", u->error, NULL);
}

static void update_free(struct update *u)
{
	ev_timer_stop(u->vm->d->loop, &u->timer);
	u->next = vmm_kill(u->next);
	u->old = vmm_kill(u->old);
	close_many(u->mig, 2);
	ev_timer_stop(u->vm->d->loop, &u->poll);
	if (u->cpr_main)
		unlink(u->cpr_main);
	if (u->cpr_state)
		unlink(u->cpr_state);
	free(u->cpr_main);
	free(u->cpr_state);
	free(u->old_binary);
	free(u->new_binary);
	free(u);
}

static void finish(struct update *u, const char *result)
{
	struct vm *vm = u->vm;

	if (streq(result, "ok"))
		vm_settle_qmp_path(vm); /* the old VMM is gone now */
	json_object *rep = report(u, result);
	struct call *c = TAKE_PTR(u->call);

	vm->update = NULL;
	vm->updates++;
	append_history(vm, rep);
	log_result(u, rep);
	update_free(u);
	daemon_update_status(vm->d);
	if (!c) {
		json_object_put(rep);
		return;
	}
	if (streq(result, "ok"))
		call_reply(c, rep);
	else
		call_fail_data(c, JSONRPC_ERR_VMM, rep, "update of VM '%s' %s: %s", vm->cfg.name,
			       result,
			       json_object_get_string(json_object_object_get(rep, "error")));
}

/* ---- rollback ---- */

static void cont_done(qmp *q, json_object *ret, const char *cls, const char *desc, void *ud);

static void try_cont(struct update *u)
{
	if (vmm_command(u->vm->vmm, "cont", NULL, -EBADF, cont_done, u) < 0)
		finish(u, "failed");
}

static void status_for_rollback(qmp *q, json_object *ret, const char *cls, const char *desc,
				void *ud)
{
	struct update *u = ud;
	const char *st = ret ? json_object_get_string(json_object_object_get(ret, "status")) : NULL;

	if (!st) {
		finish(u, "failed");
		return;
	}
	if (streq(st, "running")) {
		u->vm->state = VM_RUNNING;
		finish(u, "rolled-back");
		return;
	}
	try_cont(u);
}

static void cont_done(qmp *q, json_object *ret, const char *cls, const char *desc, void *ud)
{
	struct update *u = ud;

	if (ret) {
		u->vm->state = VM_RUNNING;
		finish(u, "rolled-back");
		return;
	}
	/* "finish-migrate" refuses cont for a moment; ask again shortly. */
	if (++u->cont_tries < CONT_RETRIES && vmm_alive(u->vm->vmm)) {
		ev_timer_stop(u->vm->d->loop, &u->timer);
		ev_timer_set(&u->timer, 0.05, 0.);
		ev_timer_start(u->vm->d->loop, &u->timer);
		return;
	}
	snprintf(u->error + strlen(u->error), sizeof(u->error) - strlen(u->error),
		 "; resuming the old VMM failed: %s", desc ? desc : "?");
	finish(u, "failed");
}

static void rollback(struct update *u, const char *fmt, ...)
{
	va_list ap;

	if (u->phase == PHASE_ROLLBACK)
		return;
	va_start(ap, fmt);
	vsnprintf(u->error, sizeof(u->error), fmt, ap);
	va_end(ap);
	set_phase(u, PHASE_ROLLBACK);
	ev_timer_stop(u->vm->d->loop, &u->poll);
	u->next = vmm_kill(u->next);
	close_many(u->mig, 2);
	log_warning("VM %s: update failed (%s); rolling back to VMM pid %d", u->vm->cfg.name,
		    u->error, (int)u->old_pid);
	if (!vmm_alive(u->vm->vmm)) {
		finish(u, "failed");
		return;
	}
	/* Stop any outgoing migration and drop the channel end it may still
	 * hold (both may fail harmlessly), then make sure the guest runs. */
	ev_timer_stop(u->vm->d->loop, &u->timer);
	ev_timer_set(&u->timer, 10.0, 0.);
	ev_timer_start(u->vm->d->loop, &u->timer);
	if (vmm_command(u->vm->vmm, "migrate_cancel", NULL, -EBADF, NULL, NULL) < 0 ||
	    (u->strategy == UPDATE_HANDOVER &&
	     vmm_command(u->vm->vmm, "closefd",
			 json_tokener_parse("{\"fdname\": \"" MIG_FDNAME "\"}"), -EBADF, NULL,
			 NULL) < 0) ||
	    vmm_command(u->vm->vmm, "query-status", NULL, -EBADF, status_for_rollback, u) < 0)
		finish(u, "failed");
}

static void timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct update *u = w->data;

	switch (u->phase) {
	case PHASE_ROLLBACK:
		if (u->cont_tries > 0 && u->cont_tries < CONT_RETRIES) {
			try_cont(u);
			return;
		}
		snprintf(u->error + strlen(u->error), sizeof(u->error) - strlen(u->error),
			 "; the old VMM did not answer");
		finish(u, "failed");
		return;
	case PHASE_END_OLD:
		log_warning("VM %s: old VMM pid %d did not exit after SIGKILL", u->vm->cfg.name,
			    (int)u->old_pid);
		finish(u, "ok"); /* the guest runs in the new VMM regardless */
		return;
	default:
		rollback(u, "timed out while %s", phase_names[u->phase]);
	}
}

/* ---- after the switch: end the old VMM ---- */

static void old_ended(struct vmm *v, void *ud)
{
	struct update *u = ud;

	finish(u, "ok");
}

/* Its STOP may still be unread when the new VMM's RESUME comes in. */
static void old_event(struct vmm *v, const char *event, json_object *data, int64_t ts_us, void *ud)
{
	update_old_vmm_event(ud, event, data, ts_us);
}

static const struct vmm_ops old_end_ops = { .event = old_event, .exited = old_ended };

static void end_old(struct update *u);

static void migrate_stats(qmp *q, json_object *ret, const char *cls, const char *desc, void *ud)
{
	struct update *u = ud;
	json_object *ram, *x;

	u->stats_pending = false;
	if (ret && json_object_object_get_ex(ret, "ram", &ram) &&
	    json_object_object_get_ex(ram, "transferred", &x))
		u->bytes = json_object_get_int64(x);
	if (u->phase == PHASE_END_OLD)
		end_old(u);
}

static void ask_stats(struct update *u, struct vmm *old)
{
	if (u->stats_asked)
		return;
	u->stats_asked = true;
	u->stats_pending = vmm_command(old, "query-migrate", NULL, -EBADF, migrate_stats, u) >= 0;
}

/* The old VMM is in postmigrate: its device state is in the new one, guest
 * RAM and every device fd are cprd's, and migration completion already
 * flushed and released its block devices. Nothing is left for it to do, so
 * SIGKILL spares the update its slow teardown; only the byte count is
 * awaited first. */
static void end_old(struct update *u)
{
	ask_stats(u, u->old);
	if (!u->stats_pending)
		vmm_signal(u->old, SIGKILL);
}

/* The new VMM runs the guest: it becomes the VM's VMM; the old one goes. */
static void switch_over(struct update *u)
{
	struct vm *vm = u->vm;

	set_phase(u, PHASE_END_OLD);
	u->old = vm->vmm;
	vmm_set_ops(u->old, &old_end_ops, u);
	/* The well-known monitor path passes to the new VMM: the old one must
	 * not unlink it on its way out. */
	u->old->qmp_path = (free(u->old->qmp_path), NULL);
	vm_adopt_vmm(vm, TAKE_PTR(u->next));
	vm->state = VM_RUNNING;
	log_info("VM %s: now running in VMM pid %d (QEMU %s); ending pid %d", vm->cfg.name,
		 (int)vm->vmm->pid, vm->vmm->version, (int)u->old_pid);
	daemon_update_status(vm->d); /* a restart from here on keeps the new VMM */
	ev_timer_stop(vm->d->loop, &u->timer);
	ev_timer_set(&u->timer, END_OLD_TIMEOUT, 0.);
	ev_timer_start(vm->d->loop, &u->timer);
	if (!vmm_alive(u->old)) {
		finish(u, "ok");
		return;
	}
	end_old(u);
}

static void new_status(qmp *q, json_object *ret, const char *cls, const char *desc, void *ud)
{
	struct update *u = ud;
	const char *st = ret ? json_object_get_string(json_object_object_get(ret, "status")) : NULL;

	if (u->phase != PHASE_SWITCH)
		return;
	if (!st || !streq(st, "running")) {
		rollback(u, "the new VMM did not run the guest (status %s)", st ? st : desc);
		return;
	}
	switch_over(u);
}

/* ---- events ---- */

/* The guest has paused: what is left (the last dirty pages and the device
 * state) should cross in as few round trips as possible. The socket is the
 * same one the old VMM holds, so raising our end's buffer raises its. */
static void open_channel(struct update *u)
{
	int sz = u->mig_sndbuf / 2; /* setsockopt() doubles what it is given */

	if (u->mig[0] < 0)
		return;
	(void)setsockopt(u->mig[0], SOL_SOCKET, SO_SNDBUF, &sz, sizeof(sz));
	u->mig[0] = safe_close(u->mig[0]);
}

void update_old_vmm_event(struct update *u, const char *event, json_object *data, int64_t ts_us)
{
	const char *st;

	if (streq(event, "STOP") && !u->stop_us) {
		u->stop_us = ts_us;
		open_channel(u);
	} else if (streq(event, "RESUME")) {
		u->old_resume_us = ts_us;
	} else if (streq(event, "MIGRATION") && u->phase == PHASE_MIGRATE) {
		st = json_object_get_string(json_object_object_get(data, "status"));
		if (st && (streq(st, "failed") || streq(st, "cancelled")))
			rollback(u, "migration %s on the old VMM", st);
		/* Should the guest have paused on its own meanwhile, no STOP comes. */
		else if (st && streq(st, "device"))
			open_channel(u);
		/* Ask for the byte count now, while the new VMM resumes. */
		else if (st && streq(st, "completed"))
			ask_stats(u, u->vm->vmm);
	}
}

void update_old_vmm_exited(struct update *u)
{
	struct vm *vm = u->vm;

	if (u->phase == PHASE_SWITCH && u->resume_us) {
		/* It went on its own after the guest moved: nothing is lost. */
		switch_over(u);
		return;
	}
	snprintf(u->error, sizeof(u->error), "the old VMM %s during the update",
		 vm->vmm->exit_desc);
	u->next = vmm_kill(u->next);
	vm_vmm_lost(vm);
	finish(u, "failed");
}

static void next_event(struct vmm *v, const char *event, json_object *data, int64_t ts_us, void *ud)
{
	struct update *u = ud;

	if (!streq(event, "RESUME") || u->phase != PHASE_MIGRATE)
		return;
	u->resume_us = ts_us;
	set_phase(u, PHASE_SWITCH);
	if (vmm_command(v, "query-status", NULL, -EBADF, new_status, u) < 0)
		rollback(u, "lost the new VMM's monitor");
}

static void next_exited(struct vmm *v, void *ud)
{
	struct update *u = ud;
	char tail[300];

	log_tail(u->vm->vmm_log_path, tail, sizeof(tail));
	rollback(u, "the new VMM %s while %s%s%s", v->exit_desc, phase_names[u->phase],
		 tail[0] ? "; VMM log: " : "", tail);
}

/* ---- handover: prepare both, then migrate over a socketpair ----
 *
 * The old VMM is prepared while the new one starts (migration mode,
 * capabilities, its end of the channel); the new one once its monitor
 * answers (capabilities, its end, a warm-up). Then migrate-incoming on the
 * new VMM and migrate on the old one. */

static bool preparing(const struct update *u)
{
	return u->phase == PHASE_LAUNCH || u->phase == PHASE_PREPARE;
}

static void migrate_sent(qmp *q, json_object *ret, const char *cls, const char *desc, void *ud)
{
	struct update *u = ud;

	if (!ret && u->phase == PHASE_MIGRATE)
		rollback(u, "the old VMM refused to migrate: %s", desc);
}

static void incoming_ready(qmp *q, json_object *ret, const char *cls, const char *desc, void *ud)
{
	struct update *u = ud;

	if (u->phase != PHASE_PREPARE)
		return;
	if (!ret) {
		rollback(u, "the new VMM refused the incoming migration: %s", desc);
		return;
	}
	set_phase(u, PHASE_MIGRATE);
	if (vmm_command(u->vm->vmm, "migrate",
			json_tokener_parse("{\"uri\": \"fd:" MIG_FDNAME "\"}"), -EBADF,
			migrate_sent, u) < 0)
		rollback(u, "lost the old VMM's monitor");
}

static void maybe_migrate(struct update *u)
{
	if (u->phase != PHASE_PREPARE || u->pending > 0 || u->old_pending > 0)
		return;
	/* Both VMMs hold their end of the channel now. The new VMM's copy can
	 * go; the old VMM's stays until the guest pauses (open_channel()). */
	u->mig[1] = safe_close(u->mig[1]);
	if (vmm_command(u->next, "migrate-incoming",
			json_tokener_parse("{\"uri\": \"fd:" MIG_FDNAME "\"}"), -EBADF,
			incoming_ready, u) < 0)
		rollback(u, "lost the new VMM's monitor");
}

static void old_prepared(qmp *q, json_object *ret, const char *cls, const char *desc, void *ud)
{
	struct update *u = ud;

	if (!preparing(u))
		return;
	if (!ret) {
		rollback(u, "preparing the old VMM failed: %s", desc);
		return;
	}
	u->old_pending--;
	maybe_migrate(u);
}

static void new_prepared(qmp *q, json_object *ret, const char *cls, const char *desc, void *ud)
{
	struct update *u = ud;

	if (u->phase != PHASE_PREPARE)
		return;
	if (!ret) {
		rollback(u, "preparing the new VMM failed: %s", desc);
		return;
	}
	u->pending--;
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
	u->pending--;
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
		rollback(u, "cannot read the old VMM's migration capabilities: %s", desc);
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
		rollback(u, "lost the old VMM's monitor");
}

/* The guest RAM is shared (the memfd cprd holds), so x-ignore-shared leaves
 * it in place: only device state and the small non-shared RAM (firmware,
 * option ROMs, ACPI tables) cross the channel. A VMM that was itself a
 * cpr-transfer source or destination may carry that mode: say which one
 * this migration is. */
static int prepare_old(struct update *u)
{
	struct vmm *old = u->vm->vmm;
	int r = 0;

	u->old_pending = 3;
	r |= vmm_command(old, "query-migrate-capabilities", NULL, -EBADF, old_caps_known, u);
	r |= vmm_command(old, "migrate-set-parameters",
			 json_tokener_parse("{\"mode\": \"normal\"}"), -EBADF, old_prepared, u);
	r |= vmm_command(old, "getfd", json_tokener_parse("{\"fdname\": \"" MIG_FDNAME "\"}"),
			 u->mig[0], old_prepared, u);
	return r;
}

static void next_ready(struct vmm *v, void *ud)
{
	struct update *u = ud;
	int r = 0;

	snprintf(u->new_version, sizeof(u->new_version), "%s", v->version);
	if (u->strategy == UPDATE_CPR_TRANSFER)
		return; /* its monitor appears once the cpr state has arrived */
	set_phase(u, PHASE_PREPARE);
	u->pending = 3;
	r |= vmm_command(
	    v, "migrate-set-capabilities",
	    json_tokener_parse("{\"capabilities\": [{\"capability\": \"x-ignore-shared\","
			       " \"state\": true}]}"),
	    -EBADF, new_prepared, u);
	r |= vmm_command(v, "getfd", json_tokener_parse("{\"fdname\": \"" MIG_FDNAME "\"}"),
			 u->mig[1], new_prepared, u);
	r |= vmm_command(v, "qom-list-types", NULL, -EBADF, warmed, u);
	if (r < 0)
		rollback(u, "lost the new VMM's monitor while preparing");
}

static const struct vmm_ops next_ops;

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

static void handover_start(struct update *u, const char *qmp_path)
{
	int r;

	r = migration_channel(u->mig, &u->mig_sndbuf);
	if (r < 0) {
		rollback(u, "cannot create the migration channel: %s", strerror(-r));
		return;
	}
	r = vmm_start(u->vm->d, &u->vm->cfg, u->new_binary, qmp_path, u->vm->vmm_log_path,
		      &(struct vmm_incoming){ .defer = true }, &next_ops, u, &u->next);
	if (r < 0) {
		rollback(u, "cannot start the new VMM '%s': %s", u->new_binary, strerror(-r));
		return;
	}
	u->new_pid = u->next->pid;
	daemon_update_status(u->vm->d); /* the registry now names both VMMs */
	if (prepare_old(u) < 0)
		rollback(u, "lost the old VMM's monitor");
}

/* ---- cpr-transfer: QEMU's own mode, channels on socket paths ---- */

/* Is a UNIX socket listening on path? /proc/net/unix tells without
 * connecting: a probe connection would be taken as the cpr channel. */
static bool unix_listening(const char *path)
{
	_cleanup_(fclosep) FILE *f = fopen("/proc/net/unix", "re");
	char line[512];
	size_t plen = strlen(path);

	while (f && fgets(line, sizeof(line), f)) {
		unsigned long flags;
		size_t n = strcspn(line, "\n");

		line[n] = '\0';
		if (n < plen || !streq(line + n - plen, path) || line[n - plen - 1] != ' ')
			continue;
		/* Num RefCount Protocol Flags ...: __SO_ACCEPTCON is 0x10000 */
		if (sscanf(line, "%*s %*s %*s %lx", &flags) == 1 && (flags & 0x10000))
			return true;
	}
	return false;
}

static json_object *cpr_channels(struct update *u)
{
	json_object *args = json_object_new_object(), *arr = json_object_new_array();
	const char *types[2] = { "main", "cpr" }, *paths[2] = { u->cpr_main, u->cpr_state };

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

/* QEMU 10.0 binds the cpr channel itself (it refuses an fd), so the only
 * way to know the destination is ready is to watch for its socket. The
 * check is cheap and bounded by the update's timeout. */
static void cpr_poll_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct update *u = w->data;

	if (u->phase != PHASE_LAUNCH || !unix_listening(u->cpr_state))
		return;
	ev_timer_stop(loop, w);
	set_phase(u, PHASE_MIGRATE);
	if (vmm_command(u->vm->vmm, "migrate", cpr_channels(u), -EBADF, migrate_sent, u) < 0)
		rollback(u, "lost the old VMM's monitor");
}

static void cpr_prepared(qmp *q, json_object *ret, const char *cls, const char *desc, void *ud)
{
	struct update *u = ud;
	_cleanup_free_ char *qmp_path = NULL;
	struct vmm_incoming in = { .cpr_main_path = u->cpr_main, .cpr_state_path = u->cpr_state };
	int r;

	if (u->phase != PHASE_PREPARE)
		return;
	if (!ret) {
		rollback(u, "the old VMM refused cpr-transfer: %s", desc);
		return;
	}
	if (--u->pending > 0)
		return;
	if (asprintf(&qmp_path, "%s/qmp-next.sock", u->vm->dir) < 0) {
		rollback(u, "out of memory");
		return;
	}
	unlink(u->cpr_main);
	unlink(u->cpr_state);
	set_phase(u, PHASE_LAUNCH);
	r = vmm_start(u->vm->d, &u->vm->cfg, u->new_binary, qmp_path, u->vm->vmm_log_path, &in,
		      &next_ops, u, &u->next);
	if (r < 0) {
		rollback(u, "cannot start the new VMM '%s': %s", u->new_binary, strerror(-r));
		return;
	}
	u->new_pid = u->next->pid;
	daemon_update_status(u->vm->d);
	ev_timer_set(&u->poll, 0.002, 0.005);
	ev_timer_start(u->vm->d->loop, &u->poll);
}

/* The old VMM first: cpr-transfer mode, and x-ignore-shared off (a VMM
 * that arrived by handover has it on, and a cpr-transfer destination
 * rejects a stream that says so). */
static void cpr_start(struct update *u)
{
	struct vmm *old = u->vm->vmm;
	int r = 0;

	set_phase(u, PHASE_PREPARE);
	if (asprintf(&u->cpr_main, "%s/cpr-main.sock", u->vm->dir) < 0 ||
	    asprintf(&u->cpr_state, "%s/cpr-state.sock", u->vm->dir) < 0) {
		rollback(u, "out of memory");
		return;
	}
	u->pending = 2;
	r |= vmm_command(
	    old, "migrate-set-capabilities",
	    json_tokener_parse("{\"capabilities\": ["
			       "{\"capability\": \"x-ignore-shared\", \"state\": false},"
			       "{\"capability\": \"events\", \"state\": true}]}"),
	    -EBADF, cpr_prepared, u);
	r |= vmm_command(old, "migrate-set-parameters",
			 json_tokener_parse("{\"mode\": \"cpr-transfer\"}"), -EBADF, cpr_prepared,
			 u);
	if (r < 0)
		rollback(u, "lost the old VMM's monitor");
}

static const struct vmm_ops next_ops = {
	.ready = next_ready,
	.event = next_event,
	.exited = next_exited,
};

/* ---- start ---- */

void update_start(struct vm *vm, enum update_strategy s, const char *binary, double timeout,
		  struct call *c)
{
	_cleanup_free_ char *qmp_path = NULL;
	struct update *u;

	u = calloc(1, sizeof(*u));
	if (!u || asprintf(&qmp_path, "%s/qmp-next.sock", vm->dir) < 0) {
		free(u);
		call_fail(c, JSONRPC_ERR_RESOURCE, "out of memory");
		return;
	}
	u->vm = vm;
	u->call = c;
	u->strategy = s;
	u->mig[0] = u->mig[1] = -EBADF;
	u->bytes = -1;
	u->t0_mono = now_usec(CLOCK_MONOTONIC);
	u->t0_real = now_usec(CLOCK_REALTIME);
	u->old_pid = vm->vmm->pid;
	u->old_binary = strdup(vm->cfg.vmm);
	u->new_binary = strdup(binary);
	snprintf(u->old_version, sizeof(u->old_version), "%s", vm->vmm->version);
	ev_init(&u->timer, timer_cb);
	u->timer.data = u;
	ev_init(&u->poll, cpr_poll_cb);
	u->poll.data = u;
	vm->update = u;
	if (!u->old_binary || !u->new_binary) {
		rollback(u, "out of memory");
		return;
	}
	ev_timer_set(&u->timer, timeout, 0.);
	ev_timer_start(vm->d->loop, &u->timer);

	log_info("VM %s: %s update from %s (pid %d) to %s", vm->cfg.name, strategy_names[s],
		 vm->cfg.vmm, (int)u->old_pid, binary);
	if (binary[0] != '/' || access(binary, X_OK) < 0) {
		rollback(u, "new VMM binary '%s': %s", binary,
			 binary[0] != '/' ? "not found in PATH" : strerror(errno));
		return;
	}
	if (s == UPDATE_CPR_TRANSFER)
		cpr_start(u);
	else
		handover_start(u, qmp_path);
}

json_object *update_to_record(const struct update *u)
{
	json_object *o = json_object_new_object();

	json_object_object_add(o, "strategy", json_object_new_string(strategy_names[u->strategy]));
	json_object_object_add(o, "time_usec", json_object_new_int64((int64_t)u->t0_real));
	json_object_object_add(o, "old_pid", json_object_new_int(u->old_pid));
	json_object_object_add(o, "old_vmm", json_object_new_string(u->old_binary));
	json_object_object_add(o, "old_version", json_object_new_string(u->old_version));
	json_object_object_add(o, "new_vmm", json_object_new_string(u->new_binary));
	if (vmm_alive(u->old)) { /* the guest moved; this one is being ended */
		json_object_object_add(o, "ending_pid", json_object_new_int(u->old->pid));
		json_object_object_add(o, "ending_pid_start",
				       json_object_new_int64((int64_t)u->old->start_time));
	}
	if (vmm_alive(u->next)) {
		json_object_object_add(o, "new_pid", json_object_new_int(u->next->pid));
		json_object_object_add(o, "new_pid_start",
				       json_object_new_int64((int64_t)u->next->start_time));
		json_object_object_add(o, "new_qmp", json_object_new_string(u->next->qmp_path));
		json_object_object_add(o, "new_vmm_fds", vmm_fd_map(u->next));
	}
	return o;
}

void update_record_interrupted(struct vm *vm, json_object *rec, const char *resolution)
{
	json_object *o = json_object_new_object();

	json_object_object_foreach(rec, k, v)
	{
		if (!strstr(k, "_start") && !streq(k, "new_qmp") && !streq(k, "new_vmm_fds"))
			json_object_object_add(o, k, json_object_get(v));
	}
	json_object_object_add(o, "result", json_object_new_string("interrupted"));
	json_object_object_add(o, "blackout_ms", NULL);
	json_object_object_add(o, "error", json_object_new_string(resolution));
	vm->updates++;
	append_history(vm, o);
	log_warning("update vm=%s result=interrupted error=%s", vm->cfg.name, resolution);
	json_object_put(o);
}

void update_abandon(struct update *u)
{
	/* End no process here: the new VMM may already run the guest. The
	 * registry on disk still describes this update (it was written when
	 * the update started and at the switch), and the next cprd settles it
	 * the way it settles an update interrupted by a crash. */
	u->vm->update = NULL;
	if (u->call)
		call_fail(TAKE_PTR(u->call), JSONRPC_INTERNAL_ERROR,
			  "cprd is shutting down; the next cprd settles this update");
	u->next = vmm_free(u->next);
	u->old = vmm_free(u->old);
	update_free(u);
}

/* The newest HISTORY_MAX_BYTES of the file: a long-lived VM's history can
 * outgrow that, and it is the recent updates that matter. */
json_object *update_history(struct vm *vm)
{
	_cleanup_close_ int fd = open(vm->history_path, O_RDONLY | O_CLOEXEC);
	_cleanup_free_ char *buf = NULL;
	json_object *arr = json_object_new_array();
	struct stat st;
	off_t from;
	char *line, *save = NULL, *start;

	if (fd < 0 || fstat(fd, &st) < 0)
		return arr;
	from = st.st_size > HISTORY_MAX_BYTES ? st.st_size - HISTORY_MAX_BYTES : 0;
	if (read_at_most(fd, from, HISTORY_MAX_BYTES, &buf) <= 0)
		return arr;
	/* Starting mid-file, the first line is a fragment. */
	start = from > 0 ? strchrnul(buf, '\n') : buf;
	for (line = strtok_r(start, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
		json_object *o = json_tokener_parse(line);

		if (o)
			json_object_array_put_idx(arr, json_object_array_length(arr), o);
	}
	/* newest first */
	for (size_t i = 0, j = json_object_array_length(arr); j > 0 && i < --j; i++) {
		json_object *a = json_object_get(json_object_array_get_idx(arr, i));
		json_object *b = json_object_get(json_object_array_get_idx(arr, j));

		json_object_array_put_idx(arr, i, b);
		json_object_array_put_idx(arr, j, a);
	}
	return arr;
}
