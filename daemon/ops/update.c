/* SPDX-License-Identifier: MIT */
/*
 * The update engine: phases, deadlines, the commit, the switch, rollback,
 * the report. Strategies (strategy-*.c) move the device state; see
 * strategy.h for what each side owns and what the engine guarantees.
 */
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/file.h"
#include "common/json.h"
#include "common/proc.h"
#include "daemon/observe/events.h"
#include "daemon/observe/history.h"
#include "daemon/observe/log.h"
#include "daemon/core/server.h"
#include "daemon/strategies/strategy.h"
#include "daemon/ops/update.h"
#include "daemon/core/vm.h"
#include "proto/jsonrpc.h"

#define COMMIT_TIMEOUT 5.0 /* the new VMM has the state: it only has to run */
#define ROLLBACK_TIMEOUT 10.0
#define END_OLD_TIMEOUT 5.0      /* the old VMM has nothing left to do */
#define CONT_RETRY OP_CONT_RETRY /* the old VMM may still be finishing migration */
#define CONT_RETRIES OP_CONT_RETRIES

static const char *const phase_names[_PHASE_MAX] = {
	[PHASE_LAUNCH] = "launch", [PHASE_PREPARE] = "prepare", [PHASE_MIGRATE] = "migrate",
	[PHASE_COMMIT] = "commit", [PHASE_END_OLD] = "end-old", [PHASE_ROLLBACK] = "rollback",
	[PHASE_DONE] = "done",
};

static const char *const phase_doing[_PHASE_MAX] = {
	[PHASE_LAUNCH] = "starting the new VMM",
	[PHASE_PREPARE] = "preparing both VMMs",
	[PHASE_MIGRATE] = "moving device state",
	[PHASE_COMMIT] = "waiting for the new VMM to run the guest",
	[PHASE_END_OLD] = "ending the old VMM",
	[PHASE_ROLLBACK] = "rolling back",
	[PHASE_DONE] = "done",
};

const char *update_phase_name(int p)
{
	return p >= 0 && p < _PHASE_MAX ? phase_names[p] : "unknown";
}

const char *update_current_phase(const struct update *u)
{
	return phase_names[u->phase];
}

int update_phase_from_name(const char *name)
{
	for (int p = 0; p < _PHASE_MAX; p++)
		if (name && streq(phase_names[p], name))
			return p;
	return -EINVAL;
}

/* ---- phases and deadlines ---- */

static double elapsed_ms(const struct update *u)
{
	return (double)(now_usec(CLOCK_MONOTONIC) - u->t0_mono) / 1000.0;
}

static bool may_enter(struct update *u, enum phase p)
{
	if (p == PHASE_DONE || (u->s->next[u->phase] & PHASE_BIT(p)))
		return true;
	log_error("BUG: VM %s: %s update cannot go from phase %s to %s; refused", u->vm->cfg.name,
		  u->s->name, phase_names[u->phase], phase_names[p]);
	return false;
}

/* The strategy's table (a part of the engine's, engine_next), then
 * op_enter() writes the registry on entering a durable phase; r gets that
 * write's result. */
static bool set_phase(struct update *u, enum phase p, int *r)
{
	int w;

	if (!may_enter(u, p))
		return false;
	u->phase = p;
	w = op_enter(&u->op, (int)p);
	if (r)
		*r = w;
	log_debug("VM %s: update +%.1f ms: %s", u->vm->cfg.name, elapsed_ms(u), phase_doing[p]);
	return true;
}

bool update_set_phase(struct update *u, enum phase p)
{
	return set_phase(u, p, NULL);
}

static void arm(struct update *u, double seconds)
{
	ev_timer_stop(u->vm->d->loop, &u->timer);
	ev_timer_set(&u->timer, seconds, 0.);
	ev_timer_start(u->vm->d->loop, &u->timer);
}

const char *update_vm_dir(const struct update *u)
{
	return u->vm->run_dir;
}

/* ---- the report ---- */

/* Milliseconds with microsecond resolution, printed as such. */
static void add_str(json_object *o, const char *k, const char *v)
{
	json_object_object_add(o, k, v ? json_object_new_string(v) : NULL);
}

/* ---- events ---- */

static void emit_update_started(struct vm *vm, const char *strategy, const char *old_vmm,
				const char *new_vmm, int old_pid)
{
	json_object *f = json_object_new_object();

	add_str(f, "strategy", strategy);
	add_str(f, "old_vmm", old_vmm);
	add_str(f, "new_vmm", new_vmm);
	json_object_object_add(f, "old_pid", json_object_new_int(old_pid));
	events_emit(vm->d, "update-started", vm->cfg.name, f);
}

static void emit_update_finished(struct vm *vm, json_object *report)
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

static json_object *ms_json(double ms)
{
	char buf[32];

	snprintf(buf, sizeof(buf), "%.3f", ms);
	return json_object_new_double_s(ms, buf);
}

/* The guest's paused time: from the old VMM's STOP to whichever VMM
 * resumed it. 0 only for a rollback that provably never paused the guest
 * (the old VMM, read to the end, said no STOP); null when unknown, as for
 * a guest that was lost. */
static json_object *blackout_json(const struct update *u, const char *result)
{
	int64_t end = u->resume_us ? u->resume_us : u->old_resume_us;

	if (u->stop_us && end > u->stop_us)
		return ms_json((double)(end - u->stop_us) / 1000.0);
	if (streq(result, "rolled-back") && !u->stop_us)
		return ms_json(0);
	return NULL;
}

static json_object *report(struct update *u, const char *result, enum phase ended_in)
{
	json_object *o = json_object_new_object();

	json_object_object_add(o, "vm", json_object_new_string(u->vm->cfg.name));
	json_object_object_add(o, "strategy", json_object_new_string(u->s->name));
	json_object_object_add(o, "result", json_object_new_string(result));
	json_object_object_add(o, "blackout_ms", blackout_json(u, result));
	json_object_object_add(o, "total_ms", ms_json(elapsed_ms(u)));
	json_object_object_add(o, "time_usec", json_object_new_int64((int64_t)u->t0_real));
	json_object_object_add(o, "phase", json_object_new_string(phase_names[ended_in]));
	json_object_object_add(o, "old_pid", json_object_new_int(u->old_pid));
	json_object_object_add(o, "new_pid", u->new_pid ? json_object_new_int(u->new_pid) : NULL);
	if (u->restored_pid)
		json_object_object_add(o, "restored_pid", json_object_new_int(u->restored_pid));
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

static void log_result(struct update *u, json_object *rep)
{
	const char *result = json_object_get_string(json_object_object_get(rep, "result"));
	const char *bo = json_object_get_string(json_object_object_get(rep, "blackout_ms"));
	const char *total = json_object_get_string(json_object_object_get(rep, "total_ms"));
	const char *phase = json_object_get_string(json_object_object_get(rep, "phase"));
	int prio = streq(result, "ok") ? LOG_INFO : LOG_WARNING;
	char f[8][sizeof(u->error) + 16];
	const char *fields[9];
	size_t n = 0;

	snprintf(f[n], sizeof(f[n]), "CPRD_VM=%s", u->vm->cfg.name), n++;
	snprintf(f[n], sizeof(f[n]), "CPRD_STRATEGY=%s", u->s->name), n++;
	snprintf(f[n], sizeof(f[n]), "CPRD_RESULT=%s", result), n++;
	snprintf(f[n], sizeof(f[n]), "CPRD_PHASE=%s", phase), n++;
	snprintf(f[n], sizeof(f[n]), "CPRD_BLACKOUT_MS=%s", bo ? bo : ""), n++;
	snprintf(f[n], sizeof(f[n]), "CPRD_TOTAL_MS=%s", total), n++;
	snprintf(f[n], sizeof(f[n]), "CPRD_NEW_PID=%d", (int)u->new_pid), n++;
	snprintf(f[n], sizeof(f[n]), "CPRD_ERROR=%s", u->error), n++;
	for (size_t i = 0; i < n; i++)
		fields[i] = f[i];
	fields[n] = NULL;
	log_struct(prio, CPRD_MESSAGE_UPDATE, fields,
		   "update vm=%s strategy=%s result=%s phase=%s blackout_ms=%s total_ms=%s "
		   "old_pid=%d new_pid=%d%s%s",
		   u->vm->cfg.name, u->s->name, result, phase, bo ? bo : "unknown", total,
		   (int)u->old_pid, (int)u->new_pid, u->error[0] ? " error=" : "", u->error);
}

_printf_(2, 0) static void add_verror(struct update *u, const char *fmt, va_list ap)
{
	size_t n = strlen(u->error);

	if (n && n + 2 < sizeof(u->error)) {
		memcpy(u->error + n, "; ", 3);
		n += 2;
	}
	vsnprintf(u->error + n, sizeof(u->error) - n, fmt, ap);
}

_printf_(2, 3) static void add_error(struct update *u, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	add_verror(u, fmt, ap);
	va_end(ap);
}

/* ---- the one end ---- */

static void update_free(struct update *u)
{
	free(u->old_binary);
	free(u->new_binary);
	free(u);
}

static void reap_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	update_free(w->data);
}

/* Every way out comes here, once. Nothing of the update's is left pending
 * on either monitor; its memory goes on the next loop iteration, after the
 * callback that ended it (on the stack now) has returned. */
static void end(struct update *u, const char *result)
{
	struct vm *vm = u->vm;
	struct ev_loop *loop = vm->d->loop;
	/* A rollback is reported by the phase it left. */
	enum phase ended_in = u->phase == PHASE_ROLLBACK ? u->failed_in : u->phase;
	json_object *rep;
	struct call *c;

	if (u->ended)
		return;
	u->ended = true;
	update_set_phase(u, PHASE_DONE);
	ev_timer_stop(loop, &u->timer);
	ev_timer_stop(loop, &u->retry);
	vmm_cancel(vm->vmm, u);
	vmm_cancel(u->next, u);
	vmm_cancel(u->old, u);
	u->next = vmm_kill(u->next); /* still ours only when it never took the guest */
	u->old = vmm_kill(u->old);   /* normally gone already */
	u->s->done(u);
	if (streq(result, "ok"))
		vm_settle_qmp_path(vm); /* the old VMM is gone now */
	vm_op_end(vm, &u->op);
	vm->updates++;
	rep = report(u, result, ended_in);
	history_append(vm->dir_fd, VM_HISTORY, rep);
	log_result(u, rep);
	emit_update_finished(vm, rep);
	daemon_changed(vm->d);

	c = TAKE_PTR(u->call);
	if (!c)
		json_object_put(rep);
	else if (streq(result, "ok"))
		call_reply(c, rep);
	else
		call_fail_data(c, JSONRPC_ERR_VMM, rep, "update of VM '%s' %s: %s", vm->cfg.name,
			       result, u->error);
	ev_timer_set(&u->reap, 0., 0.);
	ev_timer_start(loop, &u->reap);
}

/* The guest is in no VMM any more: the VM is crashed, its memory kept. */
static void end_lost(struct update *u)
{
	struct vm *vm = u->vm;

	u->next = vmm_kill(u->next);
	if (vm->vmm)
		vm->vmm = vmm_kill(vm->vmm);
	vm_vmm_lost(vm);
	end(u, "failed");
}

/* ---- rollback: only before the guest ran in the new VMM ---- */

static void resume_old(struct update *u);
static void rollback_relaunch(struct update *u);
static void in_place_ready(struct update *u);

static void cont_done(qmp *q, json_object *ret, const char *cls, const char *desc, void *ud);

static void try_cont(struct update *u)
{
	if (vmm_command(u->vm->vmm, "cont", NULL, -EBADF, cont_done, u) < 0) {
		add_error(u, "cannot resume the old VMM: its monitor is gone");
		end(u, "failed");
	}
}

static void resumed_old(struct update *u)
{
	vm_set_state(u->vm, VM_RUNNING);
	end(u, "rolled-back");
}

static void cont_done(qmp *q, json_object *ret, const char *cls, const char *desc, void *ud)
{
	struct update *u = ud;

	if (ret) {
		resumed_old(u);
		return;
	}
	/* "finish-migrate" refuses cont for a moment; ask again shortly. */
	if (++u->cont_tries < CONT_RETRIES && vmm_alive(u->vm->vmm)) {
		ev_timer_set(&u->retry, CONT_RETRY, 0.);
		ev_timer_start(u->vm->d->loop, &u->retry);
		return;
	}
	add_error(u, "resuming the old VMM failed: %s", desc ? desc : "?");
	end(u, "failed");
}

static void retry_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	try_cont(w->data);
}

static void status_for_rollback(qmp *q, json_object *ret, const char *cls, const char *desc,
				void *ud)
{
	struct update *u = ud;
	const char *st = ret ? json_object_get_string(json_object_object_get(ret, "status")) : NULL;

	if (!st) {
		add_error(u, "the old VMM did not say its state: %s", desc ? desc : "?");
		end(u, "failed");
	} else if (streq(st, "running")) {
		resumed_old(u);
	} else {
		try_cont(u);
	}
}

void update_rollback(struct update *u, const char *fmt, ...)
{
	struct vm *vm = u->vm;
	va_list ap;

	if (u->ended || u->phase == PHASE_ROLLBACK)
		return;
	va_start(ap, fmt);
	vsnprintf(u->error, sizeof(u->error), fmt, ap);
	va_end(ap);
	u->failed_in = u->phase;
	if (!update_set_phase(u, PHASE_ROLLBACK)) {
		end(u, "failed");
		return;
	}
	/* The new VMM never ran the guest: nothing of it is worth keeping. */
	u->next = vmm_kill(u->next);
	/* In place, an old image that completed execs next, whatever it is
	 * told: the guest comes back from the file it wrote, not by cont. */
	if (u->s->in_place && (u->exec_seen || u->old_gone || u->state_saved)) {
		log_warning("VM %s: update failed (%s); restoring the guest in a VMM of %s",
			    vm->cfg.name, u->error, u->old_binary);
		rollback_relaunch(u);
		return;
	}
	log_warning("VM %s: update failed (%s); rolling back to VMM pid %d", vm->cfg.name, u->error,
		    (int)u->old_pid);
	if (u->old_gone || !vmm_alive(vm->vmm)) {
		add_error(u, "the old VMM is gone too");
		end_lost(u);
		return;
	}
	vmm_cancel(vm->vmm, u);
	arm(u, ROLLBACK_TIMEOUT);
	if (!vmm_connected(vm->vmm)) {
		/* Its monitor closed: either it is exiting (the exit comes and
		 * says so) or it lives on and cprd reconnects (then resume). */
		u->awaiting_old_monitor = true;
		return;
	}
	resume_old(u);
}

/* Stop any outgoing migration (harmless when there is none), let the
 * strategy drop what the old VMM holds for it, then make sure the guest
 * runs. */
static void resume_old(struct update *u)
{
	struct vmm *old = u->vm->vmm;

	u->awaiting_old_monitor = false;
	if (vmm_command(old, "migrate_cancel", NULL, -EBADF, NULL, NULL) < 0) {
		add_error(u, "cannot resume the old VMM: its monitor is gone");
		end(u, "failed");
		return;
	}
	if (u->s->rollback)
		u->s->rollback(u, old);
	if (vmm_command(old, "query-status", NULL, -EBADF, status_for_rollback, u) < 0) {
		add_error(u, "cannot resume the old VMM: its monitor is gone");
		end(u, "failed");
	}
}

static void update_vm_vmm_ready(struct update *u)
{
	if (u->s->in_place && u->exec_seen) {
		in_place_ready(u);
		return;
	}
	if (u->phase == PHASE_ROLLBACK && u->awaiting_old_monitor)
		resume_old(u);
}

/* ---- after the switch: end the old VMM ---- */

static void update_old_vmm_event(struct update *u, const char *event, json_object *data,
				 int64_t ts_us);

static void old_ended(struct vmm *v, void *ud)
{
	end(ud, "ok");
}

/* Its STOP may still be unread when the new VMM's RESUME comes in. */
static void old_event_after_switch(struct vmm *v, const char *event, json_object *data,
				   int64_t ts_us, void *ud)
{
	update_old_vmm_event(ud, event, data, ts_us);
}

static const struct vmm_ops old_end_ops = {
	.event = old_event_after_switch,
	.exited = old_ended,
};

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

	if (!may_enter(u, PHASE_END_OLD))
		return;
	u->old = TAKE_PTR(vm->vmm);
	if (u->old) {
		vmm_set_ops(u->old, &old_end_ops, u);
		/* The well-known monitor path passes to the new VMM: the old
		 * one must not unlink it on its way out. */
		u->old->qmp_path = (free(u->old->qmp_path), NULL);
	}
	vm_adopt_vmm(vm, TAKE_PTR(u->next));
	vm_set_state(vm, VM_RUNNING);
	log_info("VM %s: now running in VMM pid %d (QEMU %s); ending pid %d", vm->cfg.name,
		 (int)vm->vmm->pid, vm->vmm->version, (int)u->old_pid);
	/* Durable: a restart from here on keeps the new VMM. Nothing can be
	 * undone if the write fails: the registry's health says so, and
	 * recovery still finds the new VMM running. */
	update_set_phase(u, PHASE_END_OLD);
	arm(u, END_OLD_TIMEOUT);
	if (!vmm_alive(u->old)) {
		end(u, "ok");
		return;
	}
	end_old(u);
}

/* ---- the commit: the new VMM holds the whole state ---- */

static void cont_new_done(qmp *q, json_object *ret, const char *cls, const char *desc, void *ud)
{
	struct update *u = ud;

	/* Refused: it did not run the guest, so going back is still safe. A
	 * monitor that closed refused nothing: the VMM's exit, read to the
	 * end, or its lost monitor decides (next_exited, next_monitor_lost). */
	if (!ret && u->phase == PHASE_COMMIT && !streq(cls, "Disconnected"))
		update_rollback(u, "the new VMM refused to run the guest: %s", desc);
}

/* The new VMM was started paused (-S), so until now the guest ran nowhere
 * but in the old VMM, and a rollback was always safe. Nothing is written
 * here, inside the blackout: a cprd restarted from now on finds the old VMM
 * in postmigrate, which is all it needs to never resume it (recover.c). */
static void commit(struct update *u)
{
	struct vmm *to = u->s->in_place ? u->vm->vmm : u->next;

	if (!update_set_phase(u, PHASE_COMMIT))
		return;
	arm(u, COMMIT_TIMEOUT);
	if (vmm_command(to, "cont", NULL, -EBADF, cont_new_done, u) < 0)
		update_rollback(u, "lost the new VMM's monitor before it ran the guest");
}

/* A committed new VMM that neither confirms nor dies: end it, and judge by
 * what it said before its exit (pid_cb reads its monitor to the end). */
static void kill_unconfirmed(struct update *u)
{
	if (u->killing_new) {
		/* SIGKILLed and still not gone (frozen, or in D state): it can
		 * never run guest code again, and it had not said it did. */
		update_rollback(u,
				"the new VMM neither ran the guest nor exited within %.0f s "
				"of being told to run",
				2 * COMMIT_TIMEOUT);
		return;
	}
	u->killing_new = true;
	vmm_signal(u->s->in_place ? u->vm->vmm : u->next, SIGKILL);
	arm(u, COMMIT_TIMEOUT);
}

/* ---- the new VMM ---- */

/* What the new VMM wrote last says why better than cprd can: QEMU's own
 * words, from that VMM's run only (the log is shared by the VM's VMMs). */
static void rollback_with_log(struct update *u, const char *why)
{
	char note[VM_VMM_SAID_NOTE] = "";
	struct vmm *said = u->s->in_place && !u->next ? u->vm->vmm : u->next;

	if (said)
		vm_vmm_said_note(u->vm, said, note, sizeof(note));
	update_rollback(u, "%s%s", why, note);
}

static void incoming_status(qmp *q, json_object *ret, const char *cls, const char *desc, void *ud)
{
	struct update *u = ud;
	const char *st = ret ? json_object_get_string(json_object_object_get(ret, "status")) : NULL;

	if (u->phase == PHASE_MIGRATE && st && streq(st, "completed"))
		commit(u);
}

static void next_ready(struct vmm *v, void *ud)
{
	struct update *u = ud;

	snprintf(u->new_version, sizeof(u->new_version), "%s", v->version);
	/* A monitor that appears only once the state has arrived (cpr-transfer)
	 * has missed the MIGRATION events of its own start: ask. */
	if (u->phase == PHASE_MIGRATE &&
	    vmm_command(v, "query-migrate", NULL, -EBADF, incoming_status, u) < 0) {
		update_rollback(u, "lost the new VMM's monitor");
		return;
	}
	if (u->s->new_ready)
		u->s->new_ready(u);
}

static void switched_in_place(struct update *u);

/* What the new VMM (in place: the new image) said. */
static void new_vmm_event(struct update *u, const char *event, json_object *data, int64_t ts_us)
{
	const char *st;

	if (streq(event, "RESUME") && (u->phase == PHASE_COMMIT || u->phase == PHASE_MIGRATE)) {
		/* It runs the guest (a VMM that ignored -S runs it in MIGRATE):
		 * from here on the old VMM is never resumed. */
		u->resume_us = ts_us;
		if (u->phase == PHASE_MIGRATE && !update_set_phase(u, PHASE_COMMIT))
			return;
		if (u->s->in_place)
			switched_in_place(u);
		else
			switch_over(u);
		return;
	}
	if (!streq(event, "MIGRATION") || u->phase != PHASE_MIGRATE)
		return;
	st = json_object_get_string(json_object_object_get(data, "status"));
	if (st && streq(st, "completed"))
		commit(u);
	else if (st && streq(st, "failed"))
		rollback_with_log(u, "the new VMM could not load the state");
}

static void next_event(struct vmm *v, const char *event, json_object *data, int64_t ts_us, void *ud)
{
	new_vmm_event(ud, event, data, ts_us);
}

static void next_spawned(struct vmm *v, void *ud)
{
	struct update *u = ud;

	u->new_pid = v->pid;
	/* A cprd restarted from here on must know of this VMM, or it would
	 * run on unmanaged. */
	if (vm_registry_commit(u->vm->d) < 0)
		update_rollback(u, "cannot record the new VMM in the registry: %s",
				u->vm->d->registry.why);
}

static void next_exited(struct vmm *v, void *ud)
{
	struct update *u = ud;
	char why[160];

	if (v->spawn_error) {
		update_rollback(u, "cannot start the new VMM '%s': %s", u->new_binary,
				launcher_strerror(v->spawn_error));
		return;
	}

	/* In COMMIT: pid_cb read what it said to the end, and no RESUME was
	 * there: QEMU announces RESUME before it starts the vCPUs, so the guest
	 * did not run in it. */
	if (u->killing_new)
		snprintf(
		    why, sizeof(why),
		    "the new VMM did not confirm within %.0f s that it runs the guest, and was "
		    "ended before it did",
		    COMMIT_TIMEOUT);
	else
		snprintf(why, sizeof(why), "the new VMM %s while %s", v->exit_desc,
			 phase_doing[u->phase]);
	rollback_with_log(u, why);
}

static void next_monitor_lost(struct vmm *v, void *ud)
{
	struct update *u = ud;

	if (u->phase == PHASE_COMMIT)
		kill_unconfirmed(u);
	else
		update_rollback(u, "the new VMM closed its monitor while %s",
				phase_doing[u->phase]);
}

static const struct vmm_ops next_ops = {
	.spawned = next_spawned,
	.ready = next_ready,
	.event = next_event,
	.exited = next_exited,
	.monitor_lost = next_monitor_lost,
};

bool update_launch(struct update *u, const struct vmm_incoming *in)
{
	struct daemon *d = u->vm->d;
	_cleanup_free_ char *qmp_path = NULL;
	char why[512];
	int r;

	/* The kernel and initrd are opened anew for every VMM: the files may
	 * have changed since the VM was created. */
	if (vm_check_images(&u->vm->cfg, why, sizeof(why)) < 0) {
		update_rollback(u, "cannot start the new VMM: %s", why);
		return false;
	}
	r = asprintf(&qmp_path, "%s/qmp-next.sock", u->vm->dir) < 0 ? -ENOMEM : 0;
	if (r >= 0)
		r = vmm_start(d, &u->vm->cfg, u->new_binary, qmp_path, u->vm->dir_fd, in, &next_ops,
			      u, &u->next);
	if (r < 0) {
		update_rollback(u, "cannot start the new VMM '%s': %s", u->new_binary,
				vmm_start_strerror(r));
		return false;
	}
	/* Spawning: next_spawned() records it, or next_exited() says why it
	 * did not start. */
	return true;
}

/* ---- the old VMM ---- */

static void migrate_sent(qmp *q, json_object *ret, const char *cls, const char *desc, void *ud)
{
	struct update *u = ud;

	/* In place, a monitor that closes before the reply is most likely the
	 * exec, which may come before QEMU has flushed that reply: what answers
	 * on the monitor once it is back says which (in_place_status). */
	if (!ret && u->s->in_place && streq(cls, "Disconnected"))
		return;
	if (!ret && u->phase == PHASE_MIGRATE)
		update_rollback(u, "the old VMM refused to migrate: %s", desc);
}

void update_migrate(struct update *u, json_object *args)
{
	struct stat st;
	int r = 0;

	/* Durable in place (strategy-cpr-exec.c says why). */
	if (!set_phase(u, PHASE_MIGRATE, &r)) {
		json_object_put(args);
		return;
	}
	if (u->s->in_place) {
		if (r < 0) {
			json_object_put(args);
			update_rollback(u,
					"cannot record the update of VM '%s' in the registry: %s",
					u->vm->cfg.name, u->vm->d->registry.why);
			return;
		}
		u->vm->vmm->exec_expected = true;
		/* What the new image will write to the VM's VMM log starts here
		 * (it may write and exit before cprd hears of the exec). */
		if (fstatat(u->vm->dir_fd, VM_VMM_LOG, &st, 0) == 0)
			u->vm->vmm->log_start = st.st_size;
	}
	if (vmm_command(u->vm->vmm, "migrate", args, -EBADF, migrate_sent, u) < 0)
		update_rollback(u, "lost the old VMM's monitor");
}

/* ---- in place (cpr-exec): one process, two images ----
 *
 * The old image, told to migrate, writes the device state to a file and
 * execs the new binary, which starts paused (-S) and loads that file. The
 * pid, pidfd and monitor socket stay; the monitor connection closes at the
 * exec, and cprd connects again at once. What answers then says which
 * image it is: the new one is paused or still loading, the old one (a
 * close without an exec) is running or in postmigrate. From the new
 * image's RESUME on, the update has succeeded; before it, the guest has
 * run nowhere since the old image stopped it, and a rollback restores it
 * from the state file into a fresh VMM of the old binary (rollback_relaunch()). */

static void switched_in_place(struct update *u)
{
	struct vm *vm = u->vm;

	if (!may_enter(u, PHASE_END_OLD))
		return;
	vm_vmm_replaced(vm, vm->vmm, u->new_binary);
	vm_set_state(vm, VM_RUNNING);
	log_info("VM %s: now running in QEMU %s, the same VMM pid %d", vm->cfg.name,
		 vm->vmm->version, (int)vm->vmm->pid);
	/* Durable: the record names the new binary from here on. */
	update_set_phase(u, PHASE_END_OLD);
	end(u, "ok");
}

static void in_place_status(qmp *q, json_object *ret, const char *cls, const char *desc, void *ud)
{
	struct update *u = ud;
	const char *st = ret ? json_object_get_string(json_object_object_get(ret, "status")) : NULL;

	if (u->phase == PHASE_COMMIT && st) {
		/* Its monitor closed after it was told to run: its RESUME may
		 * have gone with that connection. Running, it is the guest's
		 * VMM now (restoring the state file would resume the guest from
		 * stale state); otherwise the cont may never have arrived. */
		if (streq(st, "running"))
			switched_in_place(u);
		else if (vmm_command(u->vm->vmm, "cont", NULL, -EBADF, cont_new_done, u) < 0)
			update_rollback(u, "lost the new VMM's monitor before it ran the guest");
		return;
	}
	if (u->phase != PHASE_MIGRATE)
		return;
	if (!st) {
		update_rollback(u, "the new VMM did not say its state: %s", desc ? desc : "?");
		return;
	}
	if (streq(st, "postmigrate")) {
		/* The old image: it closed its monitor, but has completed and
		 * execs next (QEMU does so whatever it is told). Wait for that
		 * exec; the deadline, or a rollback, restores from the file. */
		u->exec_seen = false;
		u->state_saved = true;
		u->new_pid = 0;
		u->new_version[0] = '\0';
		u->vm->vmm->exec_expected = true;
		return;
	}
	if (streq(st, "running") || streq(st, "finish-migrate")) {
		u->exec_seen = false;
		u->new_pid = 0;
		u->new_version[0] = '\0';
		update_rollback(u,
				"the old VMM closed its monitor without starting the new one (it "
				"is %s)",
				st);
		return;
	}
	/* Loading, or loaded before cprd was connected to hear of it. */
	if (vmm_command(u->vm->vmm, "query-migrate", NULL, -EBADF, incoming_status, u) < 0)
		update_rollback(u, "lost the new VMM's monitor");
}

static void in_place_ready(struct update *u)
{
	struct vmm *v = u->vm->vmm;

	if (u->ended || u->restoring || u->killing_new)
		return;
	if (u->phase == PHASE_ROLLBACK) {
		/* It exec'd while the rollback asked the old image to resume. */
		rollback_relaunch(u);
		return;
	}
	u->new_pid = v->pid;
	snprintf(u->new_version, sizeof(u->new_version), "%s", v->version);
	if (vmm_command(v, "query-status", NULL, -EBADF, in_place_status, u) < 0)
		update_rollback(u, "lost the new VMM's monitor");
}

static void update_vm_vmm_monitor_lost(struct update *u)
{
	if (!u->s->in_place || u->ended || u->exec_seen)
		return;
	if (u->phase != PHASE_MIGRATE &&
	    !(u->phase == PHASE_ROLLBACK && u->failed_in == PHASE_MIGRATE))
		return;
	u->exec_seen = true;
}

/* ---- rollback in place: the relaunch QEMU itself lacks ----
 *
 * Past the exec there is no old process to resume; but the old image left
 * the device state in a file, and cprd holds guest RAM and every device
 * fd: a fresh VMM of the old binary loads that file and the guest goes on.
 * It is started only once the failed image is certainly gone (killed and
 * reaped), so the guest never has two VMMs that could run it. */

static const struct vmm_ops rollback_vmm_ops;

_printf_(2, 3) static void rollback_failed(struct update *u, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	add_verror(u, fmt, ap);
	va_end(ap);
	end_lost(u);
}

static void rollback_launch(struct update *u)
{
	struct vm *vm = u->vm;
	struct vmm_incoming in = { .defer = true };
	_cleanup_free_ char *qmp_path = NULL;
	char why[512];
	int r;

	if (!u->s->restore_uri || !u->s->restore_uri(u)) {
		rollback_failed(u, "the old VMM left no state to restore the guest from");
		return;
	}
	if (vm_check_images(&vm->cfg, why, sizeof(why)) < 0) {
		rollback_failed(u, "cannot restore the guest: %s", why);
		return;
	}
	r = asprintf(&qmp_path, "%s/qmp-next.sock", vm->dir) < 0 ? -ENOMEM : 0;
	if (r >= 0)
		r = vmm_start(vm->d, &vm->cfg, u->old_binary, qmp_path, vm->dir_fd, &in,
			      &rollback_vmm_ops, u, &u->next);
	if (r < 0)
		rollback_failed(u, "cannot start a VMM of %s to restore the guest: %s",
				u->old_binary, vmm_start_strerror(r));
}

static void rollback_relaunch(struct update *u)
{
	struct vm *vm = u->vm;

	u->restoring = true;
	arm(u, ROLLBACK_TIMEOUT);
	if (vm->vmm) {
		vmm_cancel(vm->vmm, u);
		if (vmm_alive(vm->vmm)) {
			/* Its exit comes back through update_vm_vmm_exited(). */
			vmm_signal(vm->vmm, SIGKILL);
			return;
		}
		vm->vmm = vmm_free(vm->vmm);
	}
	rollback_launch(u);
}

static void rollback_relaunched(struct update *u)
{
	struct vm *vm = u->vm;

	vm_adopt_vmm(vm, TAKE_PTR(u->next));
	vm_settle_qmp_path(vm);
	vm_set_state(vm, VM_RUNNING);
	log_info("VM %s: the guest runs again in VMM pid %d (QEMU %s), restored from the state "
		 "the old one left",
		 vm->cfg.name, (int)vm->vmm->pid, vm->vmm->version);
	(void)vm_registry_commit(vm->d);
	end(u, "rolled-back");
}

static void rollback_vmm_sent(qmp *q, json_object *ret, const char *cls, const char *desc, void *ud)
{
	struct update *u = ud;

	if (!ret && !u->ended)
		rollback_failed(u, "the VMM restoring the guest refused its state: %s", desc);
}

static void rollback_vmm_cont_done(qmp *q, json_object *ret, const char *cls, const char *desc,
				   void *ud)
{
	struct update *u = ud;

	if (!ret && !u->ended && !streq(cls, "Disconnected"))
		rollback_failed(u, "the VMM restoring the guest refused to run it: %s", desc);
}

static void rollback_vmm_spawned(struct vmm *v, void *ud)
{
	struct update *u = ud;

	u->restored_pid = v->pid;
	/* A restarted cprd must know of it (the update record names it). */
	(void)vm_registry_commit(u->vm->d);
}

static void rollback_vmm_ready(struct vmm *v, void *ud)
{
	struct update *u = ud;
	json_object *args = json_object_new_object();

	json_object_object_add(args, "uri", json_object_new_string(u->s->restore_uri(u)));
	if (vmm_command(v, "migrate-incoming", args, -EBADF, rollback_vmm_sent, u) < 0)
		rollback_failed(u, "lost the monitor of the VMM restoring the guest");
}

static void rollback_vmm_event(struct vmm *v, const char *event, json_object *data, int64_t ts_us,
			       void *ud)
{
	struct update *u = ud;
	const char *st;
	char note[VM_VMM_SAID_NOTE];

	if (streq(event, "RESUME")) {
		u->old_resume_us = ts_us;
		rollback_relaunched(u);
		return;
	}
	if (!streq(event, "MIGRATION"))
		return;
	st = json_object_get_string(json_object_object_get(data, "status"));
	if (st && streq(st, "completed")) {
		if (vmm_command(v, "cont", NULL, -EBADF, rollback_vmm_cont_done, u) < 0)
			rollback_failed(u, "lost the monitor of the VMM restoring the guest");
	} else if (st && streq(st, "failed")) {
		vm_vmm_said_note(u->vm, v, note, sizeof(note));
		rollback_failed(u, "the VMM of %s could not load the state either%s", u->old_binary,
				note);
	}
}

static void rollback_vmm_exited(struct vmm *v, void *ud)
{
	struct update *u = ud;
	char note[VM_VMM_SAID_NOTE];

	vm_vmm_said_note(u->vm, v, note, sizeof(note));
	rollback_failed(u, "the VMM restoring the guest %s%s", v->exit_desc, note);
}

static void rollback_vmm_monitor_lost(struct vmm *v, void *ud)
{
	rollback_failed(ud, "the VMM restoring the guest closed its monitor");
}

static const struct vmm_ops rollback_vmm_ops = {
	.spawned = rollback_vmm_spawned,
	.ready = rollback_vmm_ready,
	.event = rollback_vmm_event,
	.exited = rollback_vmm_exited,
	.monitor_lost = rollback_vmm_monitor_lost,
};

static void update_vm_vmm_event(struct update *u, const char *event, json_object *data,
				int64_t ts_us)
{
	/* After the switch the VM's own VMM is the new one, whose events are
	 * no longer the update's business. */
	if (u->phase != PHASE_END_OLD)
		update_old_vmm_event(u, event, data, ts_us);
}

static void update_old_vmm_event(struct update *u, const char *event, json_object *data,
				 int64_t ts_us)
{
	const char *st;

	if (u->ended)
		return;
	if (u->s->in_place && u->exec_seen) {
		new_vmm_event(u, event, data, ts_us);
		return;
	}
	if (streq(event, "STOP") && !u->stop_us) {
		u->stop_us = ts_us;
	} else if (streq(event, "RESUME")) {
		u->old_resume_us = ts_us;
	} else if (streq(event, "MIGRATION") && u->phase == PHASE_MIGRATE) {
		st = json_object_get_string(json_object_object_get(data, "status"));
		if (st && (streq(st, "failed") || streq(st, "cancelled"))) {
			/* The reason is the new VMM's (a machine type or a
			 * section it does not know), if it said one. */
			if (u->next)
				vmm_drain(u->next);
			if (!u->ended)
				rollback_with_log(u, streq(st, "failed")
							 ? "migration failed on the old VMM"
							 : "migration cancelled on the old VMM");
			return;
		}
		/* Ask for the byte count now, while the new VMM resumes (in
		 * place, the old image is about to be replaced: not asked). */
		if (st && streq(st, "completed") && !u->s->in_place)
			ask_stats(u, u->vm->vmm);
		else if (st && streq(st, "completed"))
			u->state_saved = true;
	}
	if (u->s->old_event && !u->ended)
		u->s->old_event(u, event, data);
}

/* In place, the VM's one process exited once the old image was told to
 * migrate: whichever image it was, the guest can only come back from the
 * state file. true when that is taken care of. */
static bool in_place_exited(struct update *u)
{
	struct vm *vm = u->vm;
	char note[VM_VMM_SAID_NOTE];

	if (u->phase == PHASE_PREPARE ||
	    (u->phase == PHASE_ROLLBACK && u->failed_in == PHASE_PREPARE))
		return false; /* never told to migrate: the guest was running in it */
	vm_vmm_said_note(vm, vm->vmm, note, sizeof(note));
	vm->vmm = vmm_free(vm->vmm);
	u->old_gone = true;
	if (u->restoring) {
		rollback_launch(u); /* killed for it */
		return true;
	}
	if (u->phase == PHASE_ROLLBACK) {
		add_error(u, "the old VMM %s while rolling back", vm->exit_desc);
		rollback_relaunch(u);
		return true;
	}
	/* A monitor that closed is no proof of the exec (a VMM killed closes
	 * it too): the new image is named once it answered there, or once the
	 * old one said it completed (it execs at once then). */
	update_rollback(u, "the %s %s while %s%s",
			u->new_pid || (u->exec_seen && u->state_saved) ? "new VMM"
			: u->exec_seen ? "VMM (the old image, or the new one before it answered)"
				       : "old VMM",
			vm->exit_desc, phase_doing[u->phase], note);
	return true;
}

static void update_vm_vmm_exited(struct update *u)
{
	struct vm *vm = u->vm;

	if (u->phase == PHASE_END_OLD) {
		/* The VM's VMM is the new one by now: it is the one that died,
		 * after the guest moved to it. The update still ends the old. */
		vm_vmm_lost(vm);
		return;
	}
	if (u->s->in_place && in_place_exited(u))
		return;
	add_error(u, "the old VMM %s while %s", vm->exit_desc, phase_doing[u->phase]);
	if (u->phase == PHASE_MIGRATE) {
		/* It may have sent everything before it went: if the new VMM
		 * has the whole state, the guest goes on there. */
		vmm_drain(u->next);
		if (u->ended)
			return;
	}
	if (u->phase != PHASE_MIGRATE && u->phase != PHASE_COMMIT) {
		end_lost(u); /* the guest was in the old VMM, and went with it */
		return;
	}
	/* The guest is the new VMM's to run, or nobody's: the deadline, the
	 * new VMM's RESUME or its failure decides. */
	u->old_gone = true;
	vm->vmm = vmm_free(vm->vmm);
	log_warning("VM %s: the old VMM %s during the update; waiting for the new one",
		    vm->cfg.name, vm->exit_desc);
}

/* ---- deadlines ---- */

static void timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct update *u = w->data;

	/* cprd itself may have been stopped past the deadline while the VMMs
	 * went on: judge by what they already said, not by the clock alone. */
	vmm_drain(u->next);
	vmm_drain(u->vm->vmm);
	vmm_drain(u->old);
	if (u->ended || ev_is_active(&u->timer))
		return; /* what they said ended the update or moved it on */

	switch (u->phase) {
	case PHASE_COMMIT:
		kill_unconfirmed(u);
		return;
	case PHASE_ROLLBACK:
		if (u->restoring) {
			add_error(u, "the guest was not restored within %.0f s", ROLLBACK_TIMEOUT);
			end_lost(u);
			return;
		}
		if (u->awaiting_old_monitor && u->failed_in < PHASE_MIGRATE &&
		    vmm_alive(u->vm->vmm)) {
			/* Never told to migrate: the guest never paused. */
			add_error(u, "the old VMM's monitor is gone; the guest never paused and "
				     "runs on in it");
			end(u, "rolled-back");
			return;
		}
		add_error(u, u->awaiting_old_monitor ? "the old VMM's monitor did not come back"
						     : "the old VMM did not resume in time");
		end(u, "failed");
		return;
	case PHASE_END_OLD:
		log_warning("VM %s: old VMM pid %d did not exit after SIGKILL", u->vm->cfg.name,
			    (int)u->old_pid);
		end(u, "ok"); /* the guest runs in the new VMM regardless */
		return;
	default:
		if (u->old_gone)
			end_lost(u);
		else
			update_rollback(u, "timed out while %s (after %g s)", phase_doing[u->phase],
					u->timeout);
	}
}

/* ---- start ---- */

void update_start(struct vm *vm, const struct strategy *s, const char *binary, double timeout,
		  struct call *c)
{
	struct update *u;
	int r;

	/* A monitor connection that closed a moment ago is taken up again
	 * now rather than by the reconnect timer. */
	if (!vmm_connected(vm->vmm) && (r = vmm_reconnect(vm->vmm)) < 0) {
		call_fail(c, JSONRPC_ERR_VMM,
			  "VM '%s': cannot reach its VMM's monitor (%s); nothing was changed",
			  vm->cfg.name, strerror(-r));
		return;
	}
	u = calloc(1, sizeof(*u));
	if (!u) {
		call_fail(c, JSONRPC_ERR_RESOURCE, "out of memory");
		return;
	}
	u->vm = vm;
	u->s = s;
	u->call = c;
	u->phase = s->first;
	u->timeout = timeout;
	u->bytes = -1;
	u->t0_mono = now_usec(CLOCK_MONOTONIC);
	u->t0_real = now_usec(CLOCK_REALTIME);
	u->old_pid = vm->vmm->pid;
	u->old_binary = strdup(vm->cfg.vmm);
	u->new_binary = strdup(binary);
	snprintf(u->old_version, sizeof(u->old_version), "%s", vm->vmm->version);
	/* In place, a restarted cprd tells the images of the one process
	 * apart by this (recover.c). */
	if (s->in_place && proc_image_id(u->old_pid, &u->old_image) < 0)
		u->old_image = 0;
	ev_init(&u->timer, timer_cb);
	ev_init(&u->retry, retry_cb);
	ev_init(&u->reap, reap_cb);
	u->timer.data = u->retry.data = u->reap.data = u;
	vm_op_begin(vm, &u->op, &update_op_type);
	u->op.phase = s->first;
	u->op.durable |= s->durable;
	/* Written before anything happens: a restarted cprd must know. */
	if (vm_registry_commit(vm->d) < 0) {
		vm_op_end(vm, &u->op);
		call_fail(c, JSONRPC_ERR_RESOURCE,
			  "cannot record the update of VM '%s' in the registry: %s; nothing was "
			  "changed",
			  vm->cfg.name, vm->d->registry.why);
		update_free(u);
		return;
	}
	arm(u, timeout);
	emit_update_started(vm, s->name, u->old_binary, binary, u->old_pid);

	log_info("VM %s: %s update from %s (pid %d) to %s", vm->cfg.name, s->name, vm->cfg.vmm,
		 (int)u->old_pid, binary);
	if (!u->old_binary || !u->new_binary) {
		update_rollback(u, "out of memory");
		return;
	}
	if (binary[0] != '/' || access(binary, X_OK) < 0) {
		update_rollback(u, "new VMM binary '%s': %s", binary,
				binary[0] != '/' ? "not found in PATH" : strerror(errno));
		return;
	}
	s->start(u);
}

/* ---- cprd going away and coming back ---- */

json_object *update_to_record(const struct update *u)
{
	json_object *o = json_object_new_object();

	json_object_object_add(o, "strategy", json_object_new_string(u->s->name));
	json_object_object_add(o, "phase", json_object_new_string(phase_names[u->phase]));
	json_object_object_add(o, "time_usec", json_object_new_int64((int64_t)u->t0_real));
	json_object_object_add(o, "old_pid", json_object_new_int(u->old_pid));
	json_object_object_add(o, "old_vmm", json_object_new_string(u->old_binary));
	json_object_object_add(o, "old_version", json_object_new_string(u->old_version));
	json_object_object_add(o, "new_vmm", json_object_new_string(u->new_binary));
	if (u->old_image) {
		char id[24];

		snprintf(id, sizeof(id), "%016" PRIx64, u->old_image);
		json_object_object_add(o, "old_image", json_object_new_string(id));
	}
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
		if (!strstr(k, "_start") && !streq(k, "new_qmp") && !streq(k, "new_vmm_fds") &&
		    !streq(k, "old_image"))
			json_object_object_add(o, k, json_object_get(v));
	}
	json_object_object_add(o, "result", json_object_new_string("interrupted"));
	json_object_object_add(o, "blackout_ms", NULL);
	json_object_object_add(o, "error", json_object_new_string(resolution));
	vm->updates++;
	history_append(vm->dir_fd, VM_HISTORY, o);
	log_warning("update vm=%s result=interrupted error=%s", vm->cfg.name, resolution);
	emit_update_finished(vm, o);
	json_object_put(o);
}

static void update_abandon(struct update *u)
{
	struct vm *vm = u->vm;

	/* End no process here: the new VMM may already run the guest. The
	 * registry on disk still describes this update, and the next cprd
	 * settles it the way it settles an update interrupted by a crash. */
	u->ended = true;
	ev_timer_stop(vm->d->loop, &u->timer);
	ev_timer_stop(vm->d->loop, &u->retry);
	vmm_cancel(vm->vmm, u);
	if (u->call)
		call_fail(TAKE_PTR(u->call), JSONRPC_INTERNAL_ERROR,
			  "cprd is shutting down; the next cprd settles this update");
	u->next = vmm_free(u->next);
	u->old = vmm_free(u->old);
	u->s->done(u);
	vm_op_end(vm, &u->op);
	update_free(u); /* from a signal watcher: nothing of it is on the stack */
}

json_object *update_history(struct vm *vm)
{
	return history_read(vm->dir_fd, VM_HISTORY);
}

/* ---- the operation (op.h) ---- */

static struct update *of(const struct op *op)
{
	return container_of(op, struct update, op);
}

static void op_vmm_event(struct op *op, const char *event, json_object *data, int64_t ts_us)
{
	update_vm_vmm_event(of(op), event, data, ts_us);
}

static bool op_vmm_exited(struct op *op)
{
	update_vm_vmm_exited(of(op)); /* decides what the VM is now */
	return true;
}

static bool op_vmm_ready(struct op *op)
{
	update_vm_vmm_ready(of(op));
	return true;
}

static void op_monitor_lost(struct op *op)
{
	update_vm_vmm_monitor_lost(of(op));
}

static void op_detach(struct op *op)
{
	update_abandon(of(op));
}

static void op_record(const struct op *op, json_object *rec)
{
	json_object_object_add(rec, "update", update_to_record(of(op)));
}

static void op_status(const struct op *op, json_object *o)
{
	json_object_object_add(o, "update_phase",
			       json_object_new_string(update_current_phase(of(op))));
}

/* Every move some strategy makes; each strategy's own table (its next[])
 * allows fewer. Any phase may end (done). */
#define TO_DONE PHASE_BIT(PHASE_DONE)
static const unsigned engine_next[_PHASE_MAX] = {
	[PHASE_LAUNCH] = PHASE_BIT(PHASE_PREPARE) | PHASE_BIT(PHASE_MIGRATE) |
			 PHASE_BIT(PHASE_ROLLBACK) | TO_DONE,
	[PHASE_PREPARE] = PHASE_BIT(PHASE_LAUNCH) | PHASE_BIT(PHASE_MIGRATE) |
			  PHASE_BIT(PHASE_ROLLBACK) | TO_DONE,
	[PHASE_MIGRATE] = PHASE_BIT(PHASE_COMMIT) | PHASE_BIT(PHASE_ROLLBACK) | TO_DONE,
	[PHASE_COMMIT] = PHASE_BIT(PHASE_END_OLD) | PHASE_BIT(PHASE_ROLLBACK) | TO_DONE,
	[PHASE_END_OLD] = TO_DONE,
	[PHASE_ROLLBACK] = TO_DONE,
	[PHASE_DONE] = TO_DONE, /* end() of an update that ended already */
};

const struct op_type update_op_type = {
	.name = "update",
	.phases = phase_names,
	.n_phases = _PHASE_MAX,
	.next = engine_next,
	/* The guest runs in the new VMM: a restarted cprd keeps it. The
	 * commit itself is not written (inside the blackout; recover.c). */
	.durable = PHASE_BIT(PHASE_END_OLD),
	.busy = "being updated",
	.verb = "updated",
	.from = OP_FROM(VM_RUNNING),
	.vmm_event = op_vmm_event,
	.vmm_exited = op_vmm_exited,
	.vmm_ready = op_vmm_ready,
	.monitor_lost = op_monitor_lost,
	.detach = op_detach,
	.record = op_record,
	.status = op_status,
};

struct update *update_of(const struct vm *vm)
{
	return vm_op_is(vm, "update") ? of(vm->op) : NULL;
}
