/* SPDX-License-Identifier: MIT */
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/pidfd.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#include "common/file.h"
#include "common/json.h"
#include "common/proc.h"
#include "daemon/ops/checkpoint.h"
#include "daemon/devices/devices.h"
#include "daemon/core/fdstore.h"
#include "daemon/observe/log.h"
#include "daemon/ops/recover.h"
#include "daemon/core/registry.h"
#include "daemon/ops/settle.h"
#include "daemon/strategies/strategy.h"
#include "daemon/ops/update.h"
#include "daemon/core/vm.h"
#include "memstore/memstore.h"

#define RECOVER_QMP_TIMEOUT_MS 5000

static const char *jstr(json_object *o, const char *k)
{
	json_object *v = json_object_object_get(o, k);

	return v && json_object_is_type(v, json_type_string) ? json_object_get_string(v) : NULL;
}

/* A pidfd for the process the record names, but only if it is the same
 * process: a pid alone could have been reused while cprd was down. */
static int open_vmm(json_object *rec, const char *pid_key, const char *start_key, int stored)
{
	pid_t pid = (pid_t)json_object_get_int(json_object_object_get(rec, pid_key));
	unsigned long long start =
	    (unsigned long long)json_object_get_int64(json_object_object_get(rec, start_key));
	int fd;

	if (stored >= 0) {
		if (pidfd_pid(stored) > 0 && pidfd_send_signal(stored, 0, NULL, 0) == 0)
			return stored;
		close(stored);
		return -ESRCH;
	}
	if (pid <= 0 || start == 0 || proc_start_time(pid) != start)
		return -ESRCH;
	fd = pidfd_open(pid, 0);
	if (fd < 0)
		return -errno;
	/* Re-check after opening: the pid cannot be recycled under a pidfd. */
	if (proc_start_time(pid) != start) {
		close(fd);
		return -ESRCH;
	}
	return fd;
}

/* Custody that did not come back through the fd store is copied out of the
 * VMM itself, from the fd numbers it was given at launch. */
static void reclaim_from_vmm(struct daemon *d, const char *vm, int pidfd, json_object *fdmap)
{
	const memstore_entry *e;

	if (!json_object_is_type(fdmap, json_type_object))
		return;
	json_object_object_foreach(fdmap, id, n)
	{
		const struct device_type *t = device_type_of_fd(id);
		int fd;

		/* Not at that number any more (QEMU keeps a dup in an fd set):
		 * reopened instead (reopen_fresh()). */
		if (t && t->fresh_per_vmm)
			continue;
		if (!t || !json_object_is_type(n, json_type_int) ||
		    memstore_get(d->store, vm, id, &e) == 0)
			continue;
		fd = (int)syscall(SYS_pidfd_getfd, pidfd, json_object_get_int(n), 0);
		if (fd < 0) {
			log_error("VM %s: cannot take %s back from its VMM: %m", vm, id);
			continue;
		}
		if (memstore_put(d->store, vm, id, t->custody, fd) < 0) {
			log_error("VM %s: fd %d of the VMM is not the %s it was", vm,
				  json_object_get_int(n), id);
			close(fd);
			continue;
		}
		fdstore_add(d, vm, id, fd);
	}
}

/* "running", "paused", "inmigrate", "postmigrate", ... or NULL. */
static const char *query_status(struct vmm *v, char *buf, size_t size)
{
	_cleanup_json_ json_object *ret = NULL;

	if (vmm_command_sync(v, "query-status", NULL, RECOVER_QMP_TIMEOUT_MS, &ret) < 0)
		return NULL;
	snprintf(buf, size, "%s", json_object_get_string(json_object_object_get(ret, "status")));
	return buf;
}

/* QEMU's migration status ("none", "active", "completed", ...), "" when
 * it reports none, or NULL when it does not answer. */
static const char *query_migrate(struct vmm *v, char *buf, size_t size)
{
	_cleanup_json_ json_object *ret = NULL;
	const char *st;

	if (vmm_command_sync(v, "query-migrate", NULL, RECOVER_QMP_TIMEOUT_MS, &ret) < 0)
		return NULL;
	st = json_object_get_string(json_object_object_get(ret, "status"));
	snprintf(buf, size, "%s", st ? st : "");
	return buf;
}

/* Whether the new VMM holds the whole state: its incoming migration
 * completed (it is paused, -S, waiting to be told to run). */
static bool incoming_completed(struct vmm *v)
{
	char st[32];

	return query_migrate(v, st, sizeof(st)) && streq(st, "completed");
}

static void resume(struct vmm *v, bool cancel)
{
	_cleanup_json_ json_object *ret = NULL;

	if (cancel) {
		vmm_command_sync(v, "migrate_cancel", NULL, RECOVER_QMP_TIMEOUT_MS, &ret);
		json_object_put(TAKE_PTR(ret));
	}
	vmm_command_sync(v, "cont", NULL, RECOVER_QMP_TIMEOUT_MS, &ret);
}

/*
 * The previous cprd died during an update. Both VMMs may still exist; the
 * migration between them went on without cprd. What is found out here is
 * decided by settle_decide() (settle.c, which says why). Returns the VMM
 * that keeps the VM, or NULL when none may.
 */
/* What an interrupted update of this strategy left in the VM's directory. */
static void strategy_leftovers(struct vm *vm, json_object *up)
{
	const struct strategy *s = strategy_find(jstr(up, "strategy"));

	if (s && s->settle)
		s->settle(vm->run_dir);
}

/* Whether pid runs the very file binary names. */
static bool runs_binary(pid_t pid, const char *binary)
{
	char exe[64];

	snprintf(exe, sizeof(exe), "/proc/%d/exe", (int)pid);
	return file_same(exe, binary);
}

/* Whether the process left the old image: its image id differs from the
 * one recorded when the update began; without one, its executable is
 * the new binary's file and not the old one's. */
static bool exec_happened(pid_t pid, const char *old_image, const char *old_bin,
			  const char *new_bin)
{
	uint64_t now;

	if (old_image && proc_image_id(pid, &now) == 0)
		return strtoull(old_image, NULL, 16) != now;
	return !runs_binary(pid, old_bin) && runs_binary(pid, new_bin);
}

/*
 * An update in place (cpr-exec) that cprd did not see end. There is one
 * process, v, in the old image or the new; or, once it had died, a VMM of
 * the old binary restoring the guest from the state file (the record's
 * new VMM). Neither image ever runs the guest before it holds its whole
 * state (the new one starts paused), so whichever is there goes on:
 *  - the old image still running, or in postmigrate (it saved the state but
 *    did not exec): it resumes, and the update is undone;
 *  - the new image, paused or still loading: it is told to run, which it
 *    does once loaded;
 *  - a restore VMM that runs, or holds the whole state: it keeps the guest.
 * A restore VMM that does not, with the process gone, leaves the VM
 * crashed (its memory kept): the state file is not kept for a second try.
 */
static struct vmm *settle_in_place(struct daemon *d, struct vm *vm, struct vmm *v, json_object *up,
				   int phase)
{
	char msg[320], st[32] = "";
	const char *new_bin = jstr(up, "new_vmm");
	int pidfd = open_vmm(up, "new_pid", "new_pid_start", -EBADF);
	struct vmm *restorer = NULL;
	bool is_new;

	if (pidfd >= 0 && !v && jstr(up, "new_qmp") &&
	    vmm_attach(d, pidfd_pid(pidfd), pidfd, vm->cfg.vmm, jstr(up, "new_qmp"), NULL, NULL,
		       &restorer) >= 0 &&
	    query_status(restorer, st, sizeof(st)) &&
	    (streq(st, "running") || (streq(st, "paused") && incoming_completed(restorer)))) {
		vmm_set_fd_map(restorer, json_object_object_get(up, "new_vmm_fds"));
		if (!streq(st, "running"))
			resume(restorer, false);
		strategy_leftovers(vm, up);
		snprintf(msg, sizeof(msg),
			 "cprd restarted during the update (phase %s); the guest was restored in "
			 "VMM pid %d of the old binary and stays there",
			 update_phase_name(phase), (int)restorer->pid);
		update_record_interrupted(vm, up, msg);
		return restorer;
	}
	if (restorer)
		vmm_kill(restorer);
	else if (pidfd >= 0) {
		pidfd_send_signal(pidfd, SIGKILL, NULL, 0);
		close(pidfd);
	}
	strategy_leftovers(vm, up);
	if (!v) {
		snprintf(msg, sizeof(msg),
			 "cprd restarted during the update (phase %s) and the VMM is gone; the "
			 "guest was not restored",
			 update_phase_name(phase));
		update_record_interrupted(vm, up, msg);
		return NULL;
	}
	is_new = exec_happened(v->pid, jstr(up, "old_image"), vm->cfg.vmm, new_bin);
	if (query_status(v, st, sizeof(st)) && !streq(st, "running"))
		resume(v, streq(st, "postmigrate") || streq(st, "finish-migrate"));
	if (is_new)
		vm_vmm_replaced(vm, v, new_bin);
	log_info("VM %s: interrupted cpr-exec update (phase %s): VMM pid %d in the %s image, %s",
		 vm->cfg.name, update_phase_name(phase), (int)v->pid, is_new ? "new" : "old",
		 st[0] ? st : "mute");
	snprintf(msg, sizeof(msg),
		 "cprd restarted during the update (phase %s); the %s VMM (pid %d: the process "
		 "%s) keeps the guest",
		 update_phase_name(phase), is_new ? "new" : "old", (int)v->pid,
		 is_new ? "had exec'd the new binary" : "had not exec'd");
	update_record_interrupted(vm, up, msg);
	return v;
}

static struct vmm *settle_update(struct daemon *d, struct vm *vm, struct vmm *old, json_object *up)
{
	char msg[320], st_new[32] = "", st_old[32] = "";
	struct vmm *next = NULL;
	const char *next_qmp = jstr(up, "new_qmp");
	const char *next_bin = jstr(up, "new_vmm") ? jstr(up, "new_vmm") : vm->cfg.vmm;
	int phase = update_phase_from_name(jstr(up, "phase"));
	const struct strategy *s = strategy_find(jstr(up, "strategy"));
	int pidfd;
	struct settle_facts f = { .committed = phase == update_phase_from_name("commit") };
	int r = -ESRCH;

	if (s && s->in_place)
		return settle_in_place(d, vm, old, up, phase);
	pidfd = open_vmm(up, "new_pid", "new_pid_start", -EBADF);
	if (pidfd >= 0 && next_qmp) {
		r = vmm_attach(d, pidfd_pid(pidfd), pidfd, next_bin, next_qmp, NULL, NULL, &next);
	} else if (pidfd >= 0) {
		pidfd_send_signal(pidfd, SIGKILL, NULL, 0); /* never had a monitor */
		close(pidfd);
	}
	if (next) {
		vmm_set_fd_map(next, json_object_object_get(up, "new_vmm_fds"));
		f.new_alive = true;
		if (r >= 0 && query_status(next, st_new, sizeof(st_new)))
			f.new_status = st_new;
		if (streq(st_new, "paused") || streq(st_new, "postmigrate"))
			f.new_completed = incoming_completed(next);
	}
	f.old_alive = old != NULL;
	if (old && query_status(old, st_old, sizeof(st_old)))
		f.old_status = st_old;
	strategy_leftovers(vm, up);

	enum settle_action action = settle_decide(&f);

	log_info("VM %s: interrupted update (phase %s): new VMM %s, old VMM %s: %s", vm->cfg.name,
		 update_phase_name(phase), f.new_alive ? (f.new_status ?: "mute") : "gone",
		 f.old_alive ? (f.old_status ?: "mute") : "gone", settle_action_to_string(action));
	switch (action) {
	case SETTLE_KEEP_NEW:
		if (!streq(st_new, "running"))
			resume(next, false);
		if (old)
			vmm_kill(old);
		snprintf(msg, sizeof(msg),
			 "cprd restarted during the update (phase %s); the new VMM pid %d held the "
			 "guest and keeps it%s",
			 update_phase_name(phase), (int)next->pid,
			 old ? "; the old VMM was ended" : "");
		update_record_interrupted(vm, up, msg);
		return next;
	case SETTLE_RESUME_OLD:
		next = vmm_kill(next);
		if (!streq(st_old, "running"))
			resume(old, true);
		snprintf(
		    msg, sizeof(msg),
		    "cprd restarted during the update (phase %s); rolled back: the guest stays "
		    "in the old VMM pid %d%s",
		    update_phase_name(phase), (int)old->pid,
		    pidfd >= 0 ? " and the new VMM was ended" : "");
		update_record_interrupted(vm, up, msg);
		return old;
	case SETTLE_LOST:
	default:
		next = vmm_kill(next);
		if (old)
			vmm_kill(old);
		snprintf(
		    msg, sizeof(msg),
		    "cprd restarted during the update (phase %s) and no VMM can go on with the "
		    "guest: %s",
		    update_phase_name(phase),
		    old ? "the new VMM, which may have run it, is gone, so the old VMM was not "
			  "resumed from the state the guest left, and was ended"
			: "neither VMM is left");
		update_record_interrupted(vm, up, msg);
		return NULL;
	}
}

/* QEMU unwinding a cancelled save of a large guest refuses `cont` for a
 * while: recovery, done once, gives it longer than an operation does. */
/*
 * A save that is cancelled is not over at once: QEMU's migration thread
 * unwinds it (its channels finish the writes they are in), and when it is
 * done it puts the guest back in the state it had when the save began:
 * paused, as cprd paused it. A `cont` sent before that can succeed and
 * still be undone a moment later, and one sent while the save completes
 * anyway (the cancel came too late) is undone by the save's own stop. So
 * the guest is resumed only once QEMU says the save is over (completed,
 * cancelled or failed), and it is resumed for good only when QEMU then
 * says it runs. How long recovery does this on the spot before the loop
 * takes over, and how long the loop goes on once QEMU answers: */
#define RECOVER_CONT_NOW_TRIES 20   /* x OP_CONT_RETRY: 1 s */
#define RECOVER_CONT_PATIENCE 120.0 /* s after QEMU's first answer */
#define LATER_TICK OP_CONT_RETRY    /* s: how often a resume left for later looks */

/* Whether QEMU's migration status st (query-migrate) is a save that is
 * over, or none. */
static bool save_over(const char *st)
{
	return !st || !st[0] || streq(st, "none") || streq(st, "completed") ||
	       streq(st, "cancelled") || streq(st, "failed");
}

/* The same, asked of v now; false when it does not answer. */
static bool save_over_now(struct vmm *v)
{
	char st[32];

	return query_migrate(v, st, sizeof(st)) && save_over(st);
}

/*
 * A VMM whose monitor did not answer while cprd recovered (stopped, or
 * starved of CPU on a busy host), or whose guest did not run again within
 * a second, cannot be waited for: the other VMs, and every client, would.
 * The loop carries on instead: the cancel is queued (QEMU reads it
 * whenever it runs again), then, every LATER_TICK, QEMU is asked whether
 * the save is over, and once it is, `cont` is sent and the guest's state
 * asked, until the guest runs. It is given up when the VMM goes (the VM
 * then crashed as for any VMM that exits), when an operation starts on
 * the VM, after RECOVER_CONT_PATIENCE of answers, and at exit.
 */
struct resume_later {
	struct daemon *d;
	char name[MEMSTORE_NAME_MAX];
	pid_t pid;
	bool waiting;          /* a question was sent and is not answered yet */
	ev_tstamp first_reply; /* 0 until QEMU answered anything */
	bool queued_cancel;    /* remove-fd and migrate_cancel are on their way */
	bool done;
	char last[128]; /* what QEMU last said instead of running the guest */
	ev_timer tick;
	struct resume_later *next;
};

/* Let go. A question still waiting is forgotten, so that its answer finds
 * nothing freed: it can only come from the monitor of a VMM cprd still
 * knows (d->vmms). */
static void later_free(struct resume_later *l)
{
	for (struct vmm *v = l->d->vmms; v; v = v->daemon_next)
		if (v->pid == l->pid)
			vmm_cancel(v, l);
	for (struct resume_later **p = &l->d->resume_later; *p; p = &(*p)->next)
		if (*p == l) {
			*p = l->next;
			break;
		}
	ev_timer_stop(l->d->loop, &l->tick);
	free(l);
}

void recover_done(struct daemon *d)
{
	while (d->resume_later)
		later_free(d->resume_later);
}

/* An answer came: l has waited for QEMU long enough? */
static bool later_answered(struct resume_later *l, const char *said)
{
	ev_tstamp now = ev_now(l->d->loop);

	l->waiting = false;
	if (said)
		snprintf(l->last, sizeof(l->last), "%s", said);
	if (!l->first_reply) {
		l->first_reply = now;
		return false;
	}
	if (now - l->first_reply <= RECOVER_CONT_PATIENCE)
		return false;
	log_error("VM %s: VMM pid %d has not run the guest again %.0f s after the cancelled "
		  "save (%s); resume it with 'cprctl resume %s'",
		  l->name, (int)l->pid, RECOVER_CONT_PATIENCE, l->last[0] ? l->last : "?", l->name);
	l->done = true;
	return true;
}

static void later_status_cb(qmp *q, json_object *ret, const char *cls, const char *desc, void *ud)
{
	struct resume_later *l = ud;
	const char *st = ret ? json_object_get_string(json_object_object_get(ret, "status")) : NULL;

	if (later_answered(l, st ? st : desc))
		return;
	if (st && streq(st, "running")) {
		log_notice("VM %s: its VMM pid %d runs the guest again; the save cprd did not "
			   "finish was cancelled",
			   l->name, (int)l->pid);
		l->done = true;
	}
}

static void later_cont_cb(qmp *q, json_object *ret, const char *cls, const char *desc, void *ud)
{
	struct resume_later *l = ud;
	struct vm *vm = vm_find(l->d, l->name);

	if (later_answered(l, ret ? NULL : desc) || !ret || !vm || !vm->vmm)
		return;
	/* Accepted: whether it took is the guest's state, asked next. */
	l->waiting = vmm_command(vm->vmm, "query-status", NULL, -EBADF, later_status_cb, l) >= 0;
}

static void later_migrate_cb(qmp *q, json_object *ret, const char *cls, const char *desc, void *ud)
{
	struct resume_later *l = ud;
	struct vm *vm = vm_find(l->d, l->name);
	const char *st = ret ? json_object_get_string(json_object_object_get(ret, "status")) : NULL;

	if (later_answered(l, ret ? NULL : desc) || !ret || !vm || !vm->vmm)
		return;
	if (!save_over(st)) {
		snprintf(l->last, sizeof(l->last), "the save is still %s", st);
		return; /* the next tick asks again */
	}
	l->waiting = vmm_command(vm->vmm, "cont", NULL, -EBADF, later_cont_cb, l) >= 0;
}

static void later_tick_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct resume_later *l = w->data;
	struct vm *vm = vm_find(l->d, l->name);
	struct vmm *v = vm ? vm->vmm : NULL;

	/* Given up, too, once an operation starts on the VM (a pause, an
	 * update): its decision about the guest is not for a `cont` from here
	 * to undo. */
	if (l->done || !v || v->pid != l->pid || !vmm_alive(v) || vm->op) {
		later_free(l);
		return;
	}
	if (l->waiting)
		return; /* QEMU has not answered yet: it may be stopped still */
	if (!vmm_connected(v) && vmm_reconnect(v) < 0)
		return;
	if (!l->queued_cancel) {
		(void)vmm_command(
		    v, "remove-fd",
		    json_tokener_parse("{\"fdset-id\": " STRINGIFY(CHECKPOINT_FDSET) "}"), -EBADF,
		    NULL, NULL);
		(void)vmm_command(v, "migrate_cancel", NULL, -EBADF, NULL, NULL);
		l->queued_cancel = true;
	}
	l->waiting = vmm_command(v, "query-migrate", NULL, -EBADF, later_migrate_cb, l) >= 0;
}

/* Leave resuming the guest in v to the loop; why is said in the log. */
static void resume_later(struct vm *vm, struct vmm *v, const char *why)
{
	struct resume_later *l = calloc(1, sizeof(*l));

	if (!l) {
		log_error("VM %s: out of memory; resume the guest with 'cprctl resume %s'",
			  vm->cfg.name, vm->cfg.name);
		return;
	}
	l->d = vm->d;
	l->pid = v->pid;
	snprintf(l->name, sizeof(l->name), "%s", vm->cfg.name);
	ev_timer_init(&l->tick, later_tick_cb, 0., LATER_TICK);
	l->tick.data = l;
	ev_timer_start(l->d->loop, &l->tick);
	l->next = l->d->resume_later;
	l->d->resume_later = l;
	log_warning("VM %s: cprd restarted while it saved the VM's checkpoint, and VMM pid %d %s; "
		    "the guest is resumed once it does",
		    vm->cfg.name, (int)v->pid, why);
}

/* cprd died while it saved this VM's checkpoint: that checkpoint is not
 * finished (its files are gone, see recover_one), so the guest goes on in
 * its VMM as if the checkpoint had failed: the save is cancelled, the
 * checkpoint file given back, and the guest resumed if it ran before,
 * once the save is over (see above). A VMM that does not answer
 * (stopped, starved of CPU), or does not run the guest again within a
 * second, gets that done on the loop (resume_later) rather than hold up
 * every other VM. Returns whether the VMM answered; st is its status
 * then. */
static bool settle_checkpoint(struct vm *vm, struct vmm *v, json_object *rec, char *st,
			      size_t st_size)
{
	_cleanup_json_ json_object *ret = NULL;
	bool was_running =
	    json_object_get_boolean(json_object_object_get(rec, "checkpoint_was_running"));

	if (!query_status(v, st, st_size)) {
		if (was_running)
			resume_later(vm, v, "does not answer its monitor");
		return false;
	}
	if (!was_running)
		return true;
	vmm_command_sync(v, "remove-fd",
			 json_tokener_parse("{\"fdset-id\": " STRINGIFY(CHECKPOINT_FDSET) "}"),
			 RECOVER_QMP_TIMEOUT_MS, &ret);
	json_object_put(TAKE_PTR(ret));
	vmm_command_sync(v, "migrate_cancel", NULL, RECOVER_QMP_TIMEOUT_MS, &ret);
	for (int i = 0; i < RECOVER_CONT_NOW_TRIES; i++) {
		if (save_over_now(v)) {
			resume(v, false);
			if (query_status(v, st, st_size) && streq(st, "running"))
				break;
		}
		usleep(OP_CONT_RETRY * 1e6);
	}
	if (!streq(st, "running") || !save_over_now(v))
		resume_later(vm, v, "has not unwound the cancelled save yet");
	else
		log_notice(
		    "VM %s: cprd restarted while it saved the VM's checkpoint, which was not "
		    "finished; the guest runs on in VMM pid %d",
		    vm->cfg.name, (int)v->pid);
	return true;
}

/*
 * cprd died while it restored this VM from its checkpoint. The VMM it had
 * started keeps the guest if it runs it (it was told to, so the guest went
 * on past its checkpoint, which is stale and goes). Otherwise, loading or
 * paused with the state loaded but never run, it is ended: the checkpoint
 * is still the guest, and the VM is checkpointed again (checkpoint.c).
 */
static struct vmm *settle_restore(struct daemon *d, struct vm *vm, json_object *r)
{
	int pidfd = open_vmm(r, "pid", "pid_start", -EBADF);
	const char *bin = jstr(r, "vmm") ? jstr(r, "vmm") : vm->cfg.vmm;
	struct vmm *v = NULL;
	char st[32] = "";

	if (pidfd < 0)
		return NULL;
	reclaim_from_vmm(d, vm->cfg.name, pidfd, json_object_object_get(r, "vmm_fds"));
	if (jstr(r, "qmp") &&
	    vmm_attach(d, pidfd_pid(pidfd), pidfd, bin, jstr(r, "qmp"), NULL, NULL, &v) >= 0 &&
	    query_status(v, st, sizeof(st)) && streq(st, "running")) {
		vmm_set_fd_map(v, json_object_object_get(r, "vmm_fds"));
		if (jstr(r, "checkpoint"))
			checkpoint_retire(vm, jstr(r, "checkpoint"));
		log_notice("VM %s: cprd restarted while it restored the VM; its new VMM pid %d "
			   "already ran the guest and keeps it",
			   vm->cfg.name, (int)v->pid);
		return v;
	}
	if (v)
		vmm_kill(v);
	else {
		pidfd_send_signal(pidfd, SIGKILL, NULL, 0);
		close(pidfd);
	}
	log_notice("VM %s: cprd restarted while it restored the VM; the VMM it had started was "
		   "%s and was ended, the checkpoint stays",
		   vm->cfg.name, st[0] ? st : "mute");
	return NULL;
}

/* cprd died while ending a VMM the guest had already left: finish that. */
static void end_leftover(struct vm *vm, json_object *up)
{
	int fd = open_vmm(up, "ending_pid", "ending_pid_start", -EBADF);

	if (fd < 0)
		return;
	pidfd_send_signal(fd, SIGKILL, NULL, 0);
	close(fd);
	update_record_interrupted(vm, up,
				  "cprd restarted while ending the old VMM; the guest had "
				  "moved to the new one, and the old one was ended");
}

/* The previous cprd stopped while this VM's guest was starting (vm.create
 * not yet answered). Its VMM is kept only if its monitor says the guest
 * runs (or is paused); one that does not answer within the bound, or
 * answers anything else, never became ready, and it is ended here: nobody
 * was told the VM exists, and a VMM nobody manages must not run on. The
 * VM stays, crashed, so that its name and memory remain accounted for
 * until it is destroyed. Returns the VMM that keeps the VM, or NULL. */
static struct vmm *settle_start(struct vm *vm, struct vmm *v, char *st, size_t st_size)
{
	pid_t pid = v->pid;

	if (query_status(v, st, st_size) && (streq(st, "running") || streq(st, "paused"))) {
		log_notice("VM %s: cprd stopped while it was starting; its VMM pid %d is %s, so "
			   "the VM is kept",
			   vm->cfg.name, (int)pid, st);
		return v;
	}
	log_warning("VM %s: cprd stopped while it was starting, and its VMM pid %d %s; ended it, "
		    "the VM is reported crashed with its memory kept until destroy",
		    vm->cfg.name, (int)pid,
		    st[0] ? "is not running the guest" : "does not answer on its monitor");
	vmm_kill(v);
	snprintf(vm->exit_desc, sizeof(vm->exit_desc),
		 "never became ready; ended after cprd restarted");
	return NULL;
}

/* cprd died during a pre-flight: its VMM is nobody's, end it. */
static void end_check(struct vm *vm, json_object *chk)
{
	int fd = open_vmm(chk, "pid", "pid_start", -EBADF);
	char *sock = NULL;

	if (fd >= 0) {
		pidfd_send_signal(fd, SIGKILL, NULL, 0);
		close(fd);
		log_notice("VM %s: ended the VMM of a pre-flight that cprd's restart interrupted",
			   vm->cfg.name);
	}
	if (asprintf(&sock, "%s/qmp-check.sock", vm->dir) >= 0)
		unlink(sock);
	free(sock);
}

/* What custody lost of the devices of which each VMM has a file
 * description of its own (disks) is opened again by path: the very files
 * judged at create, or nothing (disk.c). The VMM has its own; this is
 * what the next VMM is given. */
static void reopen_fresh(struct vm *vm)
{
	const char *what = "its devices";
	int r = devices_reacquire(vm, true, &what);

	if (r < 0)
		log_error("VM %s: cannot hold %s again: %s; the guest runs on, but no new VMM "
			  "can be started for it until they can be opened",
			  vm->cfg.name, what,
			  r == -ESTALE ? "another file is at a path judged at create"
				       : strerror(-r));
}

static void recover_one(struct daemon *d, json_object *rec, int stored_pidfd)
{
	struct vm_record record;
	char why[256];
	struct vmm *v = NULL;
	struct vm *vm;
	json_object *up = json_object_object_get(rec, "update");
	const char *state = jstr(rec, "state");
	bool starting = state && streq(state, "starting");
	bool mute = false; /* its VMM did not answer when asked */
	char st[32] = "";
	int pidfd, r;

	if (vm_record_from_json(rec, VM_VIEW_REGISTRY, NULL, &record, why, sizeof(why)) < 0) {
		log_error("registry entry '%.64s' skipped: %s", jstr(rec, "name") ?: "?", why);
		safe_close(stored_pidfd);
		return;
	}
	vm = vm_recover(d, &record.cfg, record.created_usec, record.updates);
	if (!vm) {
		safe_close(stored_pidfd);
		return;
	}
	if (json_object_object_get(rec, "check"))
		end_check(vm, json_object_object_get(rec, "check"));
	if (jstr(rec, "checkpointing_in")) /* a checkpoint cprd did not finish */
		checkpoint_discard_unfinished(jstr(rec, "checkpointing_in"), vm->cfg.name);
	if (jstr(rec, "checkpoint")) /* checkpoint_recover() looks at it */
		vm->checkpoint_root = strdup(jstr(rec, "checkpoint"));
	vm->last_pid = (pid_t)json_object_get_int(json_object_object_get(rec, "pid"));
	pidfd = open_vmm(rec, "pid", "pid_start", stored_pidfd);
	if (pidfd >= 0) {
		const char *qmp_path = jstr(rec, "qmp") ? jstr(rec, "qmp") : vm->qmp_path;

		reclaim_from_vmm(d, vm->cfg.name, pidfd, json_object_object_get(rec, "vmm_fds"));
		r = vmm_attach(d, pidfd_pid(pidfd), pidfd, vm->cfg.vmm, qmp_path, NULL, NULL, &v);
		if (!v) {
			log_error("VM %s: cannot take its VMM back: %s", vm->cfg.name,
				  strerror(-r));
			safe_close(pidfd);
		} else {
			if (r < 0 && !starting)
				log_error(
				    "VM %s: VMM pid %d runs but its monitor %s is unreachable; "
				    "keeping it, updates will fail until it answers",
				    vm->cfg.name, (int)v->pid, qmp_path);
			vmm_set_fd_map(v, json_object_object_get(rec, "vmm_fds"));
		}
	}
	if (!v && json_object_object_get(rec, "restore"))
		v = settle_restore(d, vm, json_object_object_get(rec, "restore"));
	if (up && json_object_object_get(up, "ending_pid"))
		end_leftover(vm, up);
	else if (up)
		v = settle_update(d, vm, v, up);
	if (v && jstr(rec, "checkpointing_in") && !settle_checkpoint(vm, v, rec, st, sizeof(st)))
		mute = true; /* asked once: not again */
	if (v && starting) {
		v = settle_start(vm, v, st, sizeof(st));
		if (!v)
			return; /* ended, and said so */
	} else if (v && (mute || !query_status(v, st, sizeof(st)))) {
		snprintf(st, sizeof(st), "running"); /* alive, monitor or not: never ended here */
	}
	reopen_fresh(vm);
	if (!v && vm->checkpoint_root)
		return; /* checkpointed: checkpoint_recover() says so */
	if (!v) {
		log_warning(
		    "VM %s: its VMM (pid %d) is gone; reported crashed, custody kept until destroy",
		    vm->cfg.name, (int)vm->last_pid);
		return;
	}
	vm_recover_vmm(vm, v, streq(st, "running"));
	vm_settle_qmp_path(vm);
	log_info("VM %s: recovered, VMM pid %d (QEMU %s) %s, %zu fds in custody", vm->cfg.name,
		 (int)v->pid, v->version, st, memstore_count(d->store, vm->cfg.name));
}

/* The registry, or NULL when there is none or it is unusable. An unusable
 * one is kept aside for a person to look at, as the next write would
 * replace it. */
static json_object *load_registry(struct daemon *d)
{
	_cleanup_free_ char *aside = NULL;
	json_object *root = NULL;
	char why[256];
	int r;

	r = registry_read(&d->registry, &root, why, sizeof(why));
	if (r >= 0 || r == -ENOENT)
		return root;
	if (asprintf(&aside, "%s.bad", d->registry.path) < 0 ||
	    rename(d->registry.path, aside) < 0) {
		log_error("cannot use the registry %s: %s; starting without it", d->registry.path,
			  why);
		return NULL;
	}
	log_error("cannot use the registry %s: %s; moved it to %s and starting without it: VMMs "
		  "it named are not taken back",
		  d->registry.path, why, aside);
	return NULL;
}

/* The VM a process's command line names: cprd starts every VMM, and a
 * wrapper around one, with "-name guest=NAME[,...]". 0 with the name in
 * buf, or -ENOENT. */
static int cmdline_guest(pid_t pid, char *buf, size_t size)
{
	_cleanup_free_ char *args = NULL;
	_cleanup_close_ int fd = -EBADF;
	char path[64];
	ssize_t n;

	snprintf(path, sizeof(path), "/proc/%d/cmdline", (int)pid);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -ENOENT;
	n = read_at_most(fd, 0, 64 << 10, &args);
	if (n <= 0)
		return -ENOENT;
	for (char *a = args; a < args + n; a += strlen(a) + 1) {
		char *next = a + strlen(a) + 1;
		size_t len;

		if (!streq(a, "-name") || next >= args + n || strncmp(next, "guest=", 6) != 0)
			continue;
		len = strcspn(next + 6, ",");
		if (len == 0 || len >= size)
			return -ENOENT;
		memcpy(buf, next + 6, len);
		buf[len] = '\0';
		return 0;
	}
	return -ENOENT;
}

/* Whether pid holds an fd to the file (dev, ino). */
static bool holds(pid_t pid, dev_t dev, ino_t ino)
{
	char path[64];
	DIR *dir;
	struct dirent *de;
	bool yes = false;

	snprintf(path, sizeof(path), "/proc/%d/fd", (int)pid);
	dir = opendir(path);
	while (dir && !yes && (de = readdir(dir))) {
		struct stat st;

		yes = de->d_name[0] != '.' && fstatat(dirfd(dir), de->d_name, &st, 0) == 0 &&
		      st.st_dev == dev && st.st_ino == ino;
	}
	if (dir)
		closedir(dir);
	return yes;
}

/* Whether the registry names pid anywhere (a VMM, an update's old or new
 * one, a pre-flight's: every "..pid" member), or cprd already knows it. */
static bool recorded(json_object *o, pid_t pid)
{
	if (json_object_is_type(o, json_type_array)) {
		for (size_t i = 0; i < json_object_array_length(o); i++)
			if (recorded(json_object_array_get_idx(o, i), pid))
				return true;
		return false;
	}
	if (!json_object_is_type(o, json_type_object))
		return false;
	json_object_object_foreach(o, k, v)
	{
		size_t n = strlen(k);

		if (n >= 3 && streq(k + n - 3, "pid") && json_object_is_type(v, json_type_int) &&
		    json_object_get_int(v) == pid)
			return true;
		if (recorded(v, pid))
			return true;
	}
	return false;
}

static bool known_vmm(const struct daemon *d, json_object *registry, pid_t pid)
{
	for (const struct vmm *v = d->vmms; v; v = v->daemon_next)
		if (v->pid == pid)
			return true;
	return recorded(registry, pid);
}

/* A VMM that a killed cprd had asked the launcher for, and not yet
 * recorded, runs on unknown: paused, holding the VM's memory and console,
 * and nobody would ever end it. It is found by its command line (cprd names
 * every VMM "-name guest=NAME") and by what it holds (that VM's own RAM
 * memfd, the same inode), and ended: the guest runs in the VMM the registry
 * names, or in none. */
static void end_strays(struct daemon *d, json_object *registry)
{
	DIR *proc = opendir("/proc");
	struct dirent *de;

	while (proc && (de = readdir(proc))) {
		pid_t pid = (pid_t)atoi(de->d_name);
		const memstore_entry *ram;
		char name[MEMSTORE_NAME_MAX];
		struct stat st;
		int fd;

		if (pid <= 1 || pid == getpid() || known_vmm(d, registry, pid) ||
		    cmdline_guest(pid, name, sizeof(name)) < 0 || !vm_find(d, name) ||
		    memstore_get(d->store, name, DEVICE_RAM_ID, &ram) < 0 ||
		    fstat(ram->fd, &st) < 0 || !holds(pid, st.st_dev, st.st_ino))
			continue;
		fd = pidfd_open(pid, 0);
		if (fd >= 0 && pidfd_send_signal(fd, SIGKILL, NULL, 0) == 0)
			log_warning("VM %s: ended pid %d, a VMM that holds its memory but that no "
				    "record names (a cprd that died while starting it)",
				    name, (int)pid);
		safe_close(fd);
	}
	if (proc)
		closedir(proc);
}

int recover(struct daemon *d, json_object *pidfds)
{
	_cleanup_json_ json_object *root = load_registry(d);
	json_object *vms = json_object_object_get(root, "vms");
	size_t n = vms ? json_object_array_length(vms) : 0;

	for (size_t i = 0; i < n; i++) {
		json_object *rec = json_object_array_get_idx(vms, i), *pfd;
		const char *name = jstr(rec, "name");
		int stored = -EBADF;

		if (name && json_object_object_get_ex(pidfds, name, &pfd)) {
			stored = json_object_get_int(pfd);
			json_object_object_del(pidfds, name);
		}
		recover_one(d, rec, stored);
	}
	checkpoint_recover(d);
	json_object_object_foreach(pidfds, k, v)
	{
		(void)k;
		close(json_object_get_int(v));
	}
	for (struct vm *vm = d->vms; vm; vm = vm->next) {
		int r = vm_pick_uid(vm);

		if (r >= 0)
			r = vm_prepare_run_dir(vm);
		/* A console log from before the VM had a uid: its next VMM
		 * reopens it as that uid. */
		if (r >= 0)
			r = devices_own(vm);
		if (r < 0)
			log_error(
			    "VM %s: cannot give it a VMM uid and directory %s: %s; its updates "
			    "will fail",
			    vm->cfg.name, vm->run_dir, strerror(-r));
	}
	/* Fds inherited for VMs the registry does not know are not ours to keep. */
	for (size_t i = 0; i < memstore_count(d->store, NULL);) {
		const memstore_entry *e = memstore_nth(d->store, NULL, i);

		if (!vm_find(d, e->vm)) {
			char vm[MEMSTORE_NAME_MAX], fd[MEMSTORE_NAME_MAX];

			snprintf(vm, sizeof(vm), "%s", e->vm);
			snprintf(fd, sizeof(fd), "%s", e->name);
			log_warning("releasing inherited fd %s/%s: no such VM in the registry", vm,
				    fd);
			fdstore_remove(d, vm, fd);
			memstore_remove(d->store, vm, fd);
			continue;
		}
		i++;
	}
	end_strays(d, root);
	/* Also when there was none: a state directory that cannot take the
	 * registry shows up now, in daemon.status, not at the first create. */
	(void)vm_registry_commit(d);
	return (int)n;
}
