/* SPDX-License-Identifier: MIT */
#include <json-c/json.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "common/clock.h"
#include "common/file.h"
#include "common/json.h"
#include "daemon/ops/check.h"
#include "daemon/observe/log.h"
#include "daemon/core/server.h"
#include "daemon/strategies/strategy.h"
#include "daemon/ops/update.h"
#include "daemon/core/vm.h"
#include "daemon/core/vmm.h"
#include "proto/jsonrpc.h"

#define PROBE_TIMEOUT 10.0

struct check {
	struct op op; /* the VM's operation (op.h) */
	struct vm *vm;
	const struct strategy *s;
	struct call *call;
	struct vmm *vmm;
	char *binary;
	ev_timer timer;
	ev_timer reap;
	uint64_t t0;
	double limit;      /* the check's own deadline, for its message */
	json_object *caps; /* what the VMM offers, once asked */
	double timeout;    /* a probe: the update's, which follows it */
	bool probe;        /* the first step of an update: it follows unless refused */
	bool refused;
	bool ended;
};

static void check_free(struct check *k)
{
	json_object_put(k->caps);
	free(k->binary);
	free(k);
}

static void reap_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	check_free(w->data);
}

static json_object *facts(struct check *k, bool ok)
{
	json_object *o = json_object_new_object();
	struct vmm *v = k->vmm;

	json_object_object_add(o, "vm", json_object_new_string(k->vm->cfg.name));
	json_object_object_add(o, "vmm", json_object_new_string(k->binary));
	json_object_object_add(o, "strategy", json_object_new_string(k->s->name));
	json_object_object_add(o, "ok", json_object_new_boolean(ok));
	json_object_object_add(o, "machine", json_object_new_string(k->vm->cfg.machine));
	if (v && v->version[0]) {
		json_object_object_add(o, "vmm_version", json_object_new_string(v->version));
		json_object_object_add(o, "vmm_package", json_object_new_string(v->package));
	}
	if (k->caps)
		json_object_object_add(o, "capabilities", json_object_get(k->caps));
	json_object_object_add(
	    o, "duration_ms",
	    json_object_new_double((double)(now_usec(CLOCK_MONOTONIC) - k->t0) / 1000.0));
	return o;
}

/* Once: end the VMM, answer, free on the next loop turn (this may run
 * inside the VMM's own callback). */
_printf_(2, 3) static void end(struct check *k, const char *fmt, ...)
{
	struct ev_loop *loop = k->vm->d->loop;
	char why[400] = "";
	json_object *o;

	if (k->ended)
		return;
	k->ended = true;
	if (fmt) {
		va_list ap;

		va_start(ap, fmt);
		vsnprintf(why, sizeof(why), fmt, ap);
		va_end(ap);
	}
	o = facts(k, !fmt);
	ev_timer_stop(loop, &k->timer);
	k->vmm = vmm_kill(k->vmm);
	vm_op_end(k->vm, &k->op);
	daemon_changed(k->vm->d);
	if (k->probe && k->refused) {
		log_warning("VM %s: update to %s refused: %s", k->vm->cfg.name, k->binary, why);
		call_fail_data(k->call, JSONRPC_ERR_VMM, o,
			       "VM '%s': update to '%s' refused before the guest was paused: %s; "
			       "nothing was changed",
			       k->vm->cfg.name, k->binary, why);
	} else if (k->probe) {
		/* What the probe could not learn (it did not start, say) the
		 * update finds out for itself, and reports. */
		json_object_put(o);
		if (k->vm->state == VM_RUNNING && !k->vm->op)
			update_start(k->vm, k->s, k->binary, k->timeout, k->call);
		else
			call_fail(k->call, JSONRPC_ERR_BAD_STATE,
				  "VM '%s' is %s; only a running VM can be updated",
				  k->vm->cfg.name, vm_state_to_string(k->vm->state));
	} else if (fmt) {
		log_warning("VM %s: pre-flight of %s failed: %s", k->vm->cfg.name, k->binary, why);
		call_fail_data(k->call, JSONRPC_ERR_VMM, o,
			       "pre-flight of '%s' for VM '%s' failed: %s", k->binary,
			       k->vm->cfg.name, why);
	} else {
		log_info("VM %s: pre-flight of %s (%s) passed", k->vm->cfg.name, k->binary,
			 k->s->name);
		call_reply(k->call, o);
	}
	ev_timer_init(&k->reap, reap_cb, 0., 0.);
	k->reap.data = k;
	ev_timer_start(loop, &k->reap);
}

static void mode_set(qmp *q, json_object *ret, const char *cls, const char *desc, void *ud)
{
	struct check *k = ud;

	if (!ret)
		end(k, "it does not accept migration mode '%s': %s", k->s->needs_mode, desc);
	else
		end(k, NULL);
}

static bool offers(json_object *caps, const char *name)
{
	for (size_t i = 0; i < json_object_array_length(caps); i++) {
		json_object *c = json_object_array_get_idx(caps, i);
		const char *n = json_object_get_string(json_object_object_get(c, "capability"));

		if (n && streq(n, name))
			return true;
	}
	return false;
}

static void caps_known(qmp *q, json_object *ret, const char *cls, const char *desc, void *ud)
{
	struct check *k = ud;
	json_object *args;

	if (!ret || !json_object_is_type(ret, json_type_array)) {
		end(k, "it does not list its migration capabilities: %s", desc ? desc : "?");
		return;
	}
	k->caps = json_object_new_array();
	for (size_t i = 0; i < json_object_array_length(ret); i++) {
		const char *n = json_object_get_string(
		    json_object_object_get(json_object_array_get_idx(ret, i), "capability"));

		if (n)
			json_object_array_add(k->caps, json_object_new_string(n));
	}
	for (const char *const *c = k->s->needs_caps; c && *c; c++)
		if (!offers(ret, *c)) {
			end(k, "it lacks the migration capability '%s' that %s needs", *c,
			    k->s->name);
			return;
		}
	if (!k->s->needs_mode) {
		end(k, NULL);
		return;
	}
	args = json_object_new_object();
	json_object_object_add(args, "mode", json_object_new_string(k->s->needs_mode));
	if (vmm_command(k->vmm, "migrate-set-parameters", args, -EBADF, mode_set, k) < 0)
		end(k, "it closed its monitor");
}

static void ask_caps(struct check *k)
{
	if (vmm_command(k->vmm, "query-migrate-capabilities", NULL, -EBADF, caps_known, k) < 0)
		end(k, "it closed its monitor");
}

/* "10.2.2" -> 10002: major and minor only. */
static long version_mm(const char *v)
{
	unsigned major = 0, minor = 0;

	return sscanf(v, "%u.%u", &major, &minor) == 2 ? (long)major * 1000 + minor : -1;
}

/* A refusal of the update that the probe stands for. */
_printf_(2, 3) static void refuse(struct check *k, const char *fmt, ...)
{
	char why[400];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(why, sizeof(why), fmt, ap);
	va_end(ap);
	k->refused = true;
	end(k, "%s", why);
}

static void machines_known(qmp *q, json_object *ret, const char *cls, const char *desc, void *ud)
{
	struct check *k = ud;
	const char *machine = k->vm->cfg.machine, *have = k->vm->vmm ? k->vm->vmm->version : "";
	long from = version_mm(have), to = version_mm(k->vmm->version);

	/* Not a refusal: a probe that learns nothing lets the update find out,
	 * a pre-flight goes on to what it can learn. */
	if (!ret || !json_object_is_type(ret, json_type_array)) {
		if (k->probe)
			end(k, "it does not list its machine types: %s",
			    desc ? desc : "not a list");
		else
			ask_caps(k);
		return;
	}
	if (!vm_machine_resolve(ret, machine)) {
		refuse(k, "QEMU %s lacks the machine type '%s' that the VM was created with",
		       k->vmm->version, machine);
		return;
	}
	/* The cpr channel's state (CprState) is not versioned by the machine
	 * type as the main stream is: a newer QEMU sends subsections an older
	 * one cannot load (10.2 -> 10.0 fails so), and then the guest has
	 * been paused already. Handover has no cpr channel. */
	if (k->s->needs_mode && streq(k->s->needs_mode, "cpr-transfer") && from > 0 && to > 0 &&
	    to < from) {
		refuse(k,
		       "cpr-transfer cannot go back from QEMU %s to the older %s (the cpr state of "
		       "a newer QEMU is not one an older QEMU loads); use the handover strategy",
		       have, k->vmm->version);
		return;
	}
	if (k->probe)
		end(k, NULL);
	else
		ask_caps(k);
}

/* Its machine types and version first (what a probe is for, and what the
 * update would refuse), then, for a pre-flight, its migration capabilities. */
static void k_ready(struct vmm *v, void *ud)
{
	struct check *k = ud;

	if (vmm_command(v, "query-machines", NULL, -EBADF, machines_known, k) < 0)
		end(k, "it closed its monitor");
}

static void k_spawned(struct vmm *v, void *ud)
{
	/* Recorded, so that a cprd restarted from here on ends it. */
	daemon_changed(((struct check *)ud)->vm->d);
}

static void k_exited(struct vmm *v, void *ud)
{
	struct check *k = ud;

	char tail[240];

	if (v->spawn_error) {
		end(k, "cannot start it: %s", launcher_strerror(v->spawn_error));
		return;
	}
	/* Its last words: what it wrote to the VM's log since it started. */
	vm_vmm_said(k->vm, v, tail, sizeof(tail));
	end(k, "it %s%s%s", v->exit_desc, tail[0] ? "; it said: " : "", tail);
}

static void k_monitor_lost(struct vmm *v, void *ud)
{
	end(ud, "it closed its monitor");
}

static const struct vmm_ops check_ops = {
	.spawned = k_spawned,
	.ready = k_ready,
	.exited = k_exited,
	.monitor_lost = k_monitor_lost,
};

static void timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct check *k = w->data;

	if (k->vmm)
		vmm_drain(k->vmm); /* what it said already counts */
	end(k, "it did not get through in %g s", k->limit);
}

static const struct op_type check_op_type;

static void start(struct vm *vm, const struct strategy *s, const char *binary, double timeout,
		  bool probe, struct call *c)
{
	const struct vmm_incoming in = { .defer = true, .check = true };
	_cleanup_free_ char *qmp_path = NULL;
	struct check *k = calloc(1, sizeof(*k));
	struct vm_config cfg = vm->cfg;
	int r;

	if (!k || !(k->binary = strdup(binary)) ||
	    asprintf(&qmp_path, "%s/qmp-check.sock", vm->dir) < 0) {
		if (k)
			free(k->binary);
		free(k);
		call_fail(c, JSONRPC_ERR_RESOURCE, "out of memory");
		return;
	}
	k->vm = vm;
	k->s = s;
	k->call = c;
	k->probe = probe;
	k->timeout = timeout;
	k->t0 = now_usec(CLOCK_MONOTONIC);
	/* The probe asks which machine types the binary has: it is started
	 * with the alias, which every QEMU of the family knows. */
	if (probe && cfg.machine_alias)
		cfg.machine = cfg.machine_alias;
	r = vmm_start(vm->d, &cfg, binary, qmp_path, vm->dir_fd, &in, &check_ops, k, &k->vmm);
	if (r < 0 && probe) {
		check_free(k);
		update_start(vm, s, binary, timeout, c);
		return;
	}
	if (r < 0) {
		call_fail(c, JSONRPC_ERR_VMM,
			  "pre-flight of '%s' for VM '%s' failed: cannot start it: %s", binary,
			  vm->cfg.name, vmm_start_strerror(r));
		check_free(k);
		return;
	}
	vm_op_begin(vm, &k->op, &check_op_type);
	if (probe && timeout > PROBE_TIMEOUT)
		timeout = PROBE_TIMEOUT;
	k->limit = timeout;
	ev_timer_init(&k->timer, timer_cb, timeout, 0.);
	k->timer.data = k;
	ev_timer_start(vm->d->loop, &k->timer);
	log_info("VM %s: %s of %s (%s)", vm->cfg.name, probe ? "probe" : "pre-flight", binary,
		 s->name);
}

void check_start(struct vm *vm, const struct strategy *s, const char *binary, double timeout,
		 struct call *c)
{
	start(vm, s, binary, timeout, false, c);
}

void check_then_update(struct vm *vm, const struct strategy *s, const char *binary, double timeout,
		       struct call *c)
{
	start(vm, s, binary, timeout, true, c);
}

static void check_abandon(struct check *k)
{
	k->refused = true; /* a probe's update does not follow */
	end(k, "cprd is shutting down");
}

static json_object *check_to_record(const struct check *k)
{
	json_object *o = json_object_new_object();

	if (k->vmm && k->vmm->pid > 0) {
		json_object_object_add(o, "pid", json_object_new_int(k->vmm->pid));
		json_object_object_add(o, "pid_start",
				       json_object_new_int64((int64_t)k->vmm->start_time));
	}
	return o;
}

/* ---- the operation (op.h) ---- */

static struct check *of(const struct op *op)
{
	return container_of(op, struct check, op);
}

static void op_detach(struct op *op)
{
	check_abandon(of(op));
}

/* Its VMM, so that a restarted cprd ends it. */
static void op_record(const struct op *op, json_object *rec)
{
	json_object_object_add(rec, "check", check_to_record(of(op)));
}

/* A probe before an update, and a pre-flight, alike. */
static const struct op_type check_op_type = {
	.name = "check",
	.busy = "being checked for an update",
	.verb = "checked for an update",
	.from = OP_FROM(VM_RUNNING),
	.detach = op_detach,
	.record = op_record,
};
