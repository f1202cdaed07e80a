/* SPDX-License-Identifier: MIT */
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "common/escape.h"
#include "common/file.h"
#include "common/json.h"
#include "common/proc.h"
#include "daemon/observe/events.h"
#include "daemon/core/fdstore.h"
#include "daemon/observe/log.h"
#include "daemon/core/registry.h"
#include "daemon/core/server.h"
#include "daemon/observe/archive.h"
#include "daemon/devices/devices.h"
#include "daemon/core/vm.h"
#include "proto/jsonrpc.h"

static void emit_vm_state(struct vm *vm, int old_state, int new_state);
static void emit_vm_created(struct vm *vm);
static void emit_vm_crashed(struct vm *vm);
static void emit_vm_destroyed(struct vm *vm);

#define VM_START_TIMEOUT 60.0 /* TCG boots slowly on a loaded host */
#define VM_STOP_TIMEOUT 10.0

static const char *const state_names[_VM_STATE_MAX] = {
	[VM_STARTING] = "starting", [VM_RUNNING] = "running", [VM_PAUSED] = "paused",
	[VM_STOPPING] = "stopping", [VM_CRASHED] = "crashed", [VM_CHECKPOINTED] = "checkpointed",
};

/* The lifecycle, as vm_set_state() enforces it. A crashed VM runs again
 * only when a restarted cprd finds its VMM alive after all. */
static const bool state_change_allowed[_VM_STATE_MAX][_VM_STATE_MAX] = {
	[VM_STARTING] = { [VM_RUNNING] = true, [VM_PAUSED] = true, [VM_CRASHED] = true },
	[VM_RUNNING] = { [VM_PAUSED] = true,
			 [VM_STOPPING] = true,
			 [VM_CRASHED] = true,
			 [VM_CHECKPOINTED] = true },
	[VM_PAUSED] = { [VM_RUNNING] = true,
			[VM_STOPPING] = true,
			[VM_CRASHED] = true,
			[VM_CHECKPOINTED] = true },
	[VM_STOPPING] = {},
	/* crashed -> checkpointed: a restarted cprd finds its checkpoint */
	[VM_CRASHED] = { [VM_RUNNING] = true, [VM_PAUSED] = true, [VM_CHECKPOINTED] = true },
	[VM_CHECKPOINTED] = { [VM_RUNNING] = true },
};

static const struct vmm_ops vm_vmm_ops;

const char *vm_state_to_string(enum vm_state s)
{
	return s >= 0 && s < _VM_STATE_MAX ? state_names[s] : "unknown";
}

bool vm_set_state(struct vm *vm, enum vm_state state)
{
	enum vm_state old;

	if (vm->state == state)
		return true;
	if (state < 0 || state >= _VM_STATE_MAX || !state_change_allowed[vm->state][state]) {
		log_error("VM %s: refusing the unexpected state change %s -> %s", vm->cfg.name,
			  vm_state_to_string(vm->state), vm_state_to_string(state));
		return false;
	}
	log_debug("VM %s: %s -> %s", vm->cfg.name, vm_state_to_string(vm->state),
		  vm_state_to_string(state));
	/* A guest pausing and resuming (every update's blackout) changes
	 * nothing a restarted cprd needs, which asks the VMM anyway: no write,
	 * least of all inside the blackout. */
	if (!((vm->state == VM_RUNNING && state == VM_PAUSED) ||
	      (vm->state == VM_PAUSED && state == VM_RUNNING)))
		daemon_changed(vm->d);
	old = vm->state;
	vm->state = state;
	emit_vm_state(vm, old, state);
	return true;
}

struct vm *vm_find(struct daemon *d, const char *name)
{
	for (struct vm *vm = d->vms; vm; vm = vm->next)
		if (streq(vm->cfg.name, name))
			return vm;
	return NULL;
}

size_t vm_count(struct daemon *d)
{
	size_t n = 0;

	for (struct vm *vm = d->vms; vm; vm = vm->next)
		n++;
	return n;
}

/* ---- the registry ---- */

static void add_str(json_object *o, const char *k, const char *v)
{
	json_object_object_add(o, k, v ? json_object_new_string(v) : NULL);
}

struct vm_record vm_record_of(const struct vm *vm)
{
	return (struct vm_record){ .cfg = vm->cfg,
				   .created_usec = vm->created_usec,
				   .updates = vm->updates };
}

/* ---- the VM's own requests: operations that only wait for an answer ---- */

static void request_detach(struct op *op)
{
	struct vm *vm = op->vm;

	vm_op_end(vm, op);
	if (op->call)
		call_fail(TAKE_PTR(op->call), JSONRPC_INTERNAL_ERROR, "cprd is shutting down");
}

static const struct op_type vm_create_op = {
	.name = "create",
	.busy = "starting",
	.verb = "created",
	.request = true,
	.detach = request_detach,
};

static const struct op_type vm_destroy_op = {
	.name = "destroy",
	.busy = "stopping",
	.verb = "destroyed",
	.from = OP_FROM(VM_STARTING) | OP_FROM(VM_RUNNING) | OP_FROM(VM_PAUSED) |
		OP_FROM(VM_CRASHED) | OP_FROM(VM_CHECKPOINTED),
	.request = true,
	.detach = request_detach,
};

/* Its STOP or RESUME event may come before the answer: the VM is paused
 * or running before the request ends. */
static const struct op_type vm_pause_op = {
	.name = "pause",
	.busy = "being paused or resumed",
	.verb = "paused or resumed",
	.from = OP_FROM(VM_RUNNING) | OP_FROM(VM_PAUSED),
	.request = true,
	.detach = request_detach,
};

static void begin_request(struct vm *vm, const struct op_type *t, struct call *c)
{
	vm_op_begin(vm, &vm->request, t);
	vm->request.call = c;
}

/* The request's caller (NULL when there is none, or the VM's operation is
 * not a request); the request ends. */
static struct call *take_request(struct vm *vm)
{
	if (vm->op != &vm->request)
		return NULL;
	vm_op_end(vm, &vm->request);
	return TAKE_PTR(vm->request.call);
}

/* ---- events (events.c sends them; what they say of a VM is said here) ---- */

static void emit_vm_created(struct vm *vm)
{
	json_object *f = json_object_new_object();

	add_str(f, "state", vm_state_to_string(vm->state));
	add_str(f, "vmm", vm->cfg.vmm);
	json_object_object_add(f, "memory_bytes",
			       json_object_new_int64((int64_t)vm->cfg.memory_bytes));
	events_emit(vm->d, "created", vm->cfg.name, f);
}

static void emit_vm_state(struct vm *vm, int old_state, int new_state)
{
	json_object *f = json_object_new_object();

	add_str(f, "from", vm_state_to_string(old_state));
	add_str(f, "state", vm_state_to_string(new_state));
	json_object_object_add(f, "updating", json_object_new_boolean(vm_op_is(vm, "update")));
	events_emit(vm->d, "state", vm->cfg.name, f);
}

static void emit_vm_crashed(struct vm *vm)
{
	json_object *f = json_object_new_object();

	json_object_object_add(f, "pid", vm->last_pid ? json_object_new_int(vm->last_pid) : NULL);
	json_object_object_add(f, "exit_code", json_object_new_int(vm->exit_code));
	/* vmm.c gives a VMM killed by signal N the exit code 128 + N. */
	json_object_object_add(f, "signal",
			       vm->exit_code > 128 && strncmp(vm->exit_desc, "killed", 6) == 0
				   ? json_object_new_int(vm->exit_code - 128)
				   : NULL);
	add_str(f, "exit", vm->exit_desc);
	json_object_object_add(f, "updating", json_object_new_boolean(vm_op_is(vm, "update")));
	events_emit(vm->d, "crashed", vm->cfg.name, f);
}

static void emit_vm_destroyed(struct vm *vm)
{
	json_object *f = json_object_new_object();

	/* A VM that never ran was not destroyed by anyone: its start failed. */
	add_str(f, "reason", vm->state == VM_STARTING ? "start-failed" : "destroyed");
	add_str(f, "state", vm_state_to_string(vm->state));
	events_emit(vm->d, "destroyed", vm->cfg.name, f);
}

/* What a restarted cprd needs to find the VM again (recover.c reads it).
 * A starting VM is recorded too, with its VMM, from the moment that VMM
 * exists: a cprd that dies while a guest boots must not leave it behind
 * unknown. */
static json_object *registry_record(struct vm *vm)
{
	json_object *o = json_object_new_object();
	struct vm_record rec = vm_record_of(vm);

	vm_record_to_json(&rec, VM_VIEW_REGISTRY, o);
	add_str(o, "state", vm_state_to_string(vm->state));
	if (vmm_alive(vm->vmm))
		vmm_add_record(vm->vmm, o);
	if (vm->checkpoint_root)
		add_str(o, "checkpoint", vm->checkpoint_root);
	if (vm->op && vm->op->type->record)
		vm->op->type->record(vm->op, o);
	return o;
}

int vm_registry_commit(struct daemon *d)
{
	_cleanup_json_ json_object *root = json_object_new_object();
	json_object *arr = json_object_new_array();
	bool was_ok = registry_ok(&d->registry);
	int r;

	json_object_object_add(root, "version", json_object_new_int(REGISTRY_VERSION));
	for (struct vm *vm = d->vms; vm; vm = vm->next)
		json_object_array_add(arr, registry_record(vm));
	json_object_object_add(root, "vms", arr);
	r = registry_write(&d->registry, root);
	if (r < 0 && was_ok)
		log_error("cannot write the registry, %s; until it can be written new VMs are "
			  "refused, and a restarted cprd would not know what changed since",
			  d->registry.why);
	else if (r < 0)
		log_debug("registry still not written: %s", d->registry.why);
	else if (!was_ok)
		log_notice("registry %s written again", d->registry.path);
	if (was_ok != registry_ok(&d->registry))
		daemon_status_changed(d);
	return r;
}

/* ---- teardown ---- */

static void remove_files(struct vm *vm)
{
	const char *files[] = { VM_CONSOLE_LOG,  VM_CONSOLE_LOG ".1", VM_VMM_LOG,
				VM_VMM_LOG ".1", VM_QMP_SOCK,         VM_HISTORY };

	if (vm->dir_fd < 0)
		return;
	archive_vm(vm); /* the evidence outlives the VM */
	for (size_t i = 0; i < ELEMENTSOF(files); i++)
		(void)unlinkat(vm->dir_fd, files[i], 0);
	/* Whatever a VMM left in its own directory (its sockets) goes too:
	 * the uid is free for another VM from here on. */
	if (vm->run_dir) {
		(void)rm_dir_entries(vm->run_dir);
		(void)unlinkat(vm->dir_fd, VM_RUN_DIR, AT_REMOVEDIR);
	}
	(void)unlinkat(vm->d->vms_fd, vm->cfg.name, AT_REMOVEDIR);
}

/* Forget the VM entirely: custody released, files removed. */
static void vm_free(struct vm *vm)
{
	struct daemon *d = vm->d;

	emit_vm_destroyed(vm);
	for (struct vm **pp = &d->vms; *pp; pp = &(*pp)->next)
		if (*pp == vm) {
			*pp = vm->next;
			break;
		}
	ev_timer_stop(d->loop, &vm->timer);
	vm->vmm = vmm_free(vm->vmm);
	fdstore_remove_vm(d, vm->cfg.name);
	memstore_release_vm(d->store, vm->cfg.name);
	remove_files(vm);
	safe_close(vm->dir_fd);
	free(vm->dir);
	free(vm->console_path);
	free(vm->vmm_log_path);
	free(vm->qmp_path);
	free(vm->history_path);
	free(vm->run_dir);
	free(vm->checkpoint_root);
	vm_config_done(&vm->cfg);
	free(vm);
	daemon_changed(d);
}

void vm_detach_all(struct daemon *d)
{
	for (struct vm *vm = d->vms; vm; vm = vm->next) {
		if (vm->op && vm->op->type->detach)
			vm->op->type->detach(vm->op);
		ev_timer_stop(d->loop, &vm->timer);
	}
}

/* Never leave a half-started VMM behind: end it, release the custody,
 * forget the VM. */
static void abandon_start(struct vm *vm)
{
	vm->vmm = vmm_kill(vm->vmm);
	vm_free(vm);
}

static void fail_start(struct vm *vm, int code, const char *why)
{
	char tail[400] = "";
	struct call *c;

	vm_vmm_said(vm, vm->vmm, tail, sizeof(tail));
	log_error("VM %s: start failed: %s%s%s", vm->cfg.name, why, tail[0] ? ": " : "", tail);
	if ((c = take_request(vm)))
		call_fail(c, code, "VM '%s' failed to start: %s%s%s", vm->cfg.name, why,
			  tail[0] ? "; VMM said: " : "", tail);
	abandon_start(vm);
}

/* The VM is gone: forget it, write the registry, answer c (may be NULL).
 * Nothing of this can be undone, so a registry that cannot be written does
 * not turn it into a failure: the answer says so, and until a later write
 * succeeds a restarted cprd would list the VM as crashed, holding nothing. */
static void finish_destroy(struct vm *vm, struct call *c)
{
	struct daemon *d = vm->d;
	json_object *res = json_object_new_object();

	json_object_object_add(res, "name", json_object_new_string(vm->cfg.name));
	json_object_object_add(res, "destroyed", json_object_new_boolean(1));
	vm_free(vm);
	if (vm_registry_commit(d) < 0)
		json_object_object_add(res, "registry_error",
				       json_object_new_string(d->registry.why));
	if (c)
		call_reply(c, res);
	else
		json_object_put(res);
}

/* ---- the VM's own VMM ---- */

void vm_vmm_lost(struct vm *vm)
{
	struct call *c;

	ev_timer_stop(vm->d->loop, &vm->timer);
	vm_set_state(vm, VM_CRASHED);
	if ((c = take_request(vm))) /* a pause or resume */
		call_fail(c, JSONRPC_ERR_VMM, "VM '%s': its VMM %s", vm->cfg.name, vm->exit_desc);
	log_warning("VM %s: VMM pid %d %s; guest memory stays in custody until destroy",
		    vm->cfg.name, (int)vm->last_pid, vm->exit_desc);
	emit_vm_crashed(vm);
	vm->vmm = vmm_free(vm->vmm);
	daemon_changed(vm->d); /* the record loses its VMM */
}

static void vmm_exited(struct vmm *v, void *ud)
{
	struct vm *vm = ud;
	struct call *c;

	vm->exit_code = v->exit_code;
	snprintf(vm->exit_desc, sizeof(vm->exit_desc), "%s", v->exit_desc);

	switch (vm->state) {
	case VM_STARTING:
		if (v->spawn_error) {
			char why[256];

			snprintf(why, sizeof(why), "cannot execute VMM '%s': %s", vm->cfg.vmm,
				 launcher_strerror(v->spawn_error));
			fail_start(vm, JSONRPC_ERR_VMM, why);
			return;
		}
		fail_start(vm, JSONRPC_ERR_VMM, vm->exit_desc);
		return;
	case VM_STOPPING:
		log_info("VM %s: VMM pid %d %s; custody released", vm->cfg.name, (int)v->pid,
			 vm->exit_desc);
		c = take_request(vm);
		finish_destroy(vm, c);
		return;
	default:
		/* An update decides what the VM is now; a checkpoint ends
		 * unsaved, and the VM crashed as usual. */
		if (vm->op && vm->op->type->vmm_exited && vm->op->type->vmm_exited(vm->op))
			return;
		vm_vmm_lost(vm);
	}
}

static void timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct vm *vm = w->data;

	if (vm->state == VM_STARTING) {
		fail_start(vm, JSONRPC_ERR_TIMEOUT,
			   "the VMM's monitor did not become ready in time");
	} else if (vm->state == VM_STOPPING && vm->vmm) {
		log_warning("VM %s: VMM pid %d ignored SIGTERM; sending SIGKILL", vm->cfg.name,
			    (int)vm->vmm->pid);
		vmm_signal(vm->vmm, SIGKILL);
	}
}

static void vmm_event(struct vmm *v, const char *event, json_object *data, int64_t ts_us, void *ud)
{
	struct vm *vm = ud;

	if (vm->op && vm->op->type->vmm_event)
		vm->op->type->vmm_event(vm->op, event, data, ts_us);
	if (streq(event, "STOP") && vm->state == VM_RUNNING)
		vm_set_state(vm, VM_PAUSED);
	else if (streq(event, "RESUME") && vm->state == VM_PAUSED)
		vm_set_state(vm, VM_RUNNING);
	else if (streq(event, "SHUTDOWN"))
		/* The reason is the VMM's text, escaped as it arrived (kvm/qmp.c). */
		log_info("VM %s: guest shut down (%s)", vm->cfg.name,
			 json_object_get_string(json_object_object_get(data, "reason"))
			     ?: "no reason given");
}

static void started(qmp *q, json_object *ret, const char *cls, const char *desc, void *userdata)
{
	struct vm *vm = userdata;
	struct call *c;
	json_object *st;

	if (vm->state != VM_STARTING)
		return;
	if (!ret) {
		fail_start(vm, JSONRPC_ERR_VMM, desc);
		return;
	}
	st = json_object_object_get(ret, "status");
	/* The VM has been in the registry since its VMM was spawned, so this
	 * change need not be written before the answer: a restarted cprd asks
	 * the VMM itself. */
	vm_set_state(vm,
		     st && streq(json_object_get_string(st), "running") ? VM_RUNNING : VM_PAUSED);
	ev_timer_stop(vm->d->loop, &vm->timer);
	log_info("VM %s: running, VMM pid %d (QEMU %s), %" PRIu64 " MiB", vm->cfg.name,
		 (int)vm->vmm->pid, vm->vmm->version, vm->cfg.memory_bytes >> 20);
	if ((c = take_request(vm)))
		call_reply(c, vm_to_json(vm));
}

const char *vm_machine_resolve(json_object *machines, const char *type)
{
	for (size_t i = 0; json_object_is_type(machines, json_type_array) &&
			   i < json_object_array_length(machines);
	     i++) {
		json_object *m = json_object_array_get_idx(machines, i);
		const char *name = json_object_get_string(json_object_object_get(m, "name"));
		const char *alias = json_object_get_string(json_object_object_get(m, "alias"));

		if (name && (streq(name, type) || (alias && streq(alias, type))))
			return name;
	}
	return NULL;
}

/* The machine type is pinned at birth: an alias (q35) names the newest
 * type of the first VMM's QEMU, and every later VMM of the VM, whatever its
 * version, must be given that same versioned type (as libvirt records it). */
static void machines_known(qmp *q, json_object *ret, const char *cls, const char *desc,
			   void *userdata)
{
	struct vm *vm = userdata;
	const char *name;
	char *pinned;

	if (vm->state != VM_STARTING)
		return;
	name = ret ? vm_machine_resolve(ret, vm->cfg.machine) : NULL;
	/* A VMM that does not say (not QEMU, or not this QMP) keeps the type
	 * as given; later VMMs then get that. */
	if (!name)
		log_warning("VM %s: the VMM does not list machine type %s (%s); it stays unpinned",
			    vm->cfg.name, vm->cfg.machine, desc ? desc : "no such type");
	else if (!streq(name, vm->cfg.machine)) {
		pinned = strdup(name);
		if (!pinned) {
			fail_start(vm, JSONRPC_ERR_RESOURCE, "out of memory");
			return;
		}
		log_info("VM %s: machine type %s is %s", vm->cfg.name, vm->cfg.machine, name);
		free(vm->cfg.machine_alias);
		vm->cfg.machine_alias = vm->cfg.machine;
		vm->cfg.machine = pinned;
		daemon_changed(vm->d);
	}
	if (vmm_command(vm->vmm, "query-status", NULL, -EBADF, started, vm) < 0)
		fail_start(vm, JSONRPC_ERR_RESOURCE, "out of memory");
}

static void vmm_ready(struct vmm *v, void *ud)
{
	struct vm *vm = ud;

	if (vm->op && vm->op->type->vmm_ready && vm->op->type->vmm_ready(vm->op))
		return;
	if (vm->state != VM_STARTING)
		return;
	if (vmm_command(v, "query-machines", NULL, -EBADF, machines_known, vm) < 0)
		fail_start(vm, JSONRPC_ERR_RESOURCE, "out of memory");
}

static void store_pidfd(struct vm *vm);

static void vmm_spawned(struct vmm *v, void *ud)
{
	struct vm *vm = ud;
	struct daemon *d = vm->d;

	vm->last_pid = v->pid;
	store_pidfd(vm);
	/* From here on a guest may run: before anything else the registry
	 * names this VMM (pid and start time), so that a cprd that dies while
	 * the guest boots leaves nothing its successor does not know. If that
	 * cannot be written, the VM is not created. */
	if (vm_registry_commit(d) < 0) {
		log_error("VM %s: start abandoned: cannot record it in the registry", vm->cfg.name);
		struct call *c = take_request(vm);

		if (c)
			call_fail(
			    c, JSONRPC_ERR_RESOURCE,
			    "cannot record VM '%s' in the registry: %s; the VM was not created",
			    vm->cfg.name, d->registry.why);
		abandon_start(vm);
		return;
	}
	log_info("VM %s: VMM %s started, pid %d", vm->cfg.name, vm->cfg.vmm, (int)v->pid);
}

/* The VMM lives on without a monitor (something closed the connection):
 * QEMU's monitor listens again, so connect anew. */
static void vmm_monitor_lost(struct vmm *v, void *ud)
{
	struct vm *vm = ud;
	int r;

	if (vm->op && vm->op->type->monitor_lost)
		vm->op->type->monitor_lost(vm->op);
	r = vmm_reconnect(v);

	if (r < 0)
		log_warning("VM %s: VMM pid %d closed its monitor and cprd cannot reconnect to %s: "
			    "%s; retrying",
			    vm->cfg.name, (int)v->pid, v->qmp_path ? v->qmp_path : "?",
			    strerror(-r));
	else
		log_notice("VM %s: VMM pid %d closed its monitor; reconnected", vm->cfg.name,
			   (int)v->pid);
}

static const struct vmm_ops vm_vmm_ops = {
	.spawned = vmm_spawned,
	.ready = vmm_ready,
	.event = vmm_event,
	.exited = vmm_exited,
	.monitor_lost = vmm_monitor_lost,
};

static void store_pidfd(struct vm *vm)
{
	fdstore_remove(vm->d, vm->cfg.name, "pidfd");
	if (vmm_alive(vm->vmm))
		fdstore_add(vm->d, vm->cfg.name, "pidfd", vm->vmm->pidfd);
}

void vm_adopt_vmm(struct vm *vm, struct vmm *v)
{
	char *p;

	vm->vmm = v;
	vm->last_pid = v->pid;
	vmm_set_ops(v, &vm_vmm_ops, vm);
	store_pidfd(vm);
	daemon_changed(vm->d); /* the record names this VMM now */
	if (!streq(v->binary, vm->cfg.vmm)) {
		p = strdup(v->binary);
		if (p) {
			free(vm->cfg.vmm);
			vm->cfg.vmm = p;
		}
	}
}

void vm_vmm_replaced(struct vm *vm, struct vmm *v, const char *binary)
{
	char *a = strdup(binary), *b = strdup(binary);

	if (!a || !b) { /* kept as it was: only what is shown is out of date */
		free(a);
		free(b);
		return;
	}
	free(vm->cfg.vmm);
	vm->cfg.vmm = a;
	free(v->binary);
	v->binary = b;
	daemon_changed(vm->d);
}

void vm_settle_qmp_path(struct vm *vm)
{
	char *p;

	/* Only once the predecessor is gone: a QEMU that exits unlinks the path
	 * its listening socket was bound to, which would be this one. */
	if (!vm->vmm || streq(vm->vmm->qmp_path, vm->qmp_path))
		return;
	if (rename(vm->vmm->qmp_path, vm->qmp_path) < 0) {
		log_warning("VM %s: cannot move the monitor socket to %s: %m", vm->cfg.name,
			    vm->qmp_path);
		return;
	}
	p = strdup(vm->qmp_path);
	if (p) {
		free(vm->vmm->qmp_path);
		vm->vmm->qmp_path = p;
	}
	daemon_changed(vm->d);
}

/* ---- start ---- */

/* dir/vmm, 0700 and the VM's uid's: where its VMMs may create what they
 * must (cpr-transfer's sockets), and the only host directory a confined VMM
 * sees. Made anew for a new VM of an old name: nothing of a predecessor's,
 * perhaps owned by another uid, stays in it. */
int vm_prepare_run_dir(struct vm *vm)
{
	_cleanup_close_ int fd = -EBADF;

	if (vm->dir_fd < 0)
		return -EBADF;
	if (mkdirat(vm->dir_fd, VM_RUN_DIR, 0700) < 0 && errno != EEXIST)
		return -errno;
	fd = openat(vm->dir_fd, VM_RUN_DIR, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	if ((vm->cfg.uid > 0 && fchown(fd, vm->cfg.uid, vm->cfg.uid) < 0) || fchmod(fd, 0700) < 0)
		return -errno;
	return 0;
}

int vm_check_images(const struct vm_config *cfg, char *why, size_t size)
{
	for (int i = 0; i < 2; i++) {
		const char *img = i == 0 ? cfg->kernel : cfg->initrd;
		int fd = -EBADF, r;

		if (!img)
			continue;
		r = vmm_open_image(img, i == 0 ? &cfg->kernel_id : &cfg->initrd_id, &fd);
		if (r < 0) {
			snprintf(why, size, "cannot use %s %s: %s", i == 0 ? "kernel" : "initrd",
				 img, vmm_image_strerror(r));
			return r;
		}
		close(fd);
	}
	return 0;
}

int vm_pick_uid(struct vm *vm)
{
	struct daemon *d = vm->d;

	/* No range (a daemon built by a unit test, never cprd: --vmm-ids
	 * has COUNT >= 1): the VMMs stay root's, unconfined. */
	if (vm->cfg.uid > 0 || d->vmm_id_count == 0)
		return 0;
	for (uint32_t i = 0; i < d->vmm_id_count; i++) {
		uid_t uid = d->vmm_id_base + i;
		bool taken = false;

		for (struct vm *o = d->vms; o && !taken; o = o->next)
			taken = o != vm && o->cfg.uid == uid;
		if (!taken) {
			vm->cfg.uid = uid;
			return 0;
		}
	}
	return -EUSERS;
}

/* The VM's directory, STATE_DIR/vms/NAME, created if need be and opened
 * without following a symlink; its paths, for people. */
static int vm_paths(struct vm *vm)
{
	struct daemon *d = vm->d;

	if (asprintf(&vm->dir, "%s/vms/%s", d->state_dir, vm->cfg.name) < 0 ||
	    asprintf(&vm->console_path, "%s/" VM_CONSOLE_LOG, vm->dir) < 0 ||
	    asprintf(&vm->vmm_log_path, "%s/" VM_VMM_LOG, vm->dir) < 0 ||
	    asprintf(&vm->qmp_path, "%s/" VM_QMP_SOCK, vm->dir) < 0 ||
	    asprintf(&vm->history_path, "%s/" VM_HISTORY, vm->dir) < 0 ||
	    asprintf(&vm->run_dir, "%s/" VM_RUN_DIR, vm->dir) < 0)
		return -ENOMEM;
	if (mkdirat(d->vms_fd, vm->cfg.name, 0750) < 0 && errno != EEXIST)
		return -errno;
	vm->dir_fd =
	    openat(d->vms_fd, vm->cfg.name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	return vm->dir_fd < 0 ? -errno : 0;
}

/* Each VM's console and VMM logs, and cprd's own log when it writes one in
 * the state directory, are cut back to d->log_max (file_rotate()). */
void vm_rotate_logs(struct daemon *d)
{
	static const char *const logs[] = { VM_CONSOLE_LOG, VM_VMM_LOG };
	int r;

	if (d->log_max <= 0)
		return;
	for (struct vm *vm = d->vms; vm; vm = vm->next)
		for (size_t i = 0; vm->dir_fd >= 0 && i < ELEMENTSOF(logs); i++) {
			r = file_rotate(vm->dir_fd, logs[i], d->log_max);
			if (r < 0)
				log_warning("VM %s: cannot rotate %s/%s: %s", vm->cfg.name, vm->dir,
					    logs[i], strerror(-r));
			else if (r > 0)
				log_debug("VM %s: %s grew past %lld bytes; its content is now in "
					  "%s.1",
					  vm->cfg.name, logs[i], (long long)d->log_max, logs[i]);
		}
	if (d->own_log) {
		r = file_rotate(d->state_fd, "cprd.log", d->log_max);
		if (r < 0)
			log_warning("cannot rotate %s/cprd.log: %s", d->state_dir, strerror(-r));
	}
}

void vm_create(struct daemon *d, struct vm_config *cfg, struct call *c)
{
	const char *what = NULL;
	struct vm *vm;
	char why[256];
	int r;

	vm = calloc(1, sizeof(*vm));
	if (!vm) {
		vm_config_done(cfg);
		call_fail(c, JSONRPC_ERR_RESOURCE, "out of memory");
		return;
	}
	vm->d = d;
	vm->cfg = *cfg;
	*cfg = (struct vm_config){};
	vm->state = VM_STARTING; /* born so; vm_set_state() from here on */
	vm->exit_code = -1;
	begin_request(vm, &vm_create_op, c);
	vm->created_usec = now_usec(CLOCK_REALTIME);
	ev_init(&vm->timer, timer_cb);
	vm->timer.data = vm;
	vm->next = d->vms;
	d->vms = vm;
	emit_vm_created(vm);

	vm->dir_fd = -EBADF;
	/* Said now, by name, rather than as the VMM's failure to start. */
	r = vm_check_images(&vm->cfg, why, sizeof(why));
	if (r < 0) {
		fail_start(vm, JSONRPC_ERR_RESOURCE, why);
		return;
	}
	r = vm_pick_uid(vm);
	if (r < 0) {
		snprintf(why, sizeof(why),
			 "no free VMM uid: all %u of the range from %u are taken (cprd --vmm-ids)",
			 (unsigned)d->vmm_id_count, (unsigned)d->vmm_id_base);
		fail_start(vm, JSONRPC_ERR_RESOURCE, why);
		return;
	}
	r = vm_paths(vm);
	if (r >= 0 && unlinkat(vm->dir_fd, VM_HISTORY, 0) < 0 && errno != ENOENT)
		r = -errno; /* a new VM of an old name starts a new history */
	if (r >= 0)
		r = vm_prepare_run_dir(vm);
	if (r < 0) {
		snprintf(why, sizeof(why), "cannot create %s: %s",
			 vm->dir ? vm->dir : "its directory", strerror(-r));
		fail_start(vm, JSONRPC_ERR_RESOURCE, why);
		return;
	}
	r = devices_acquire(vm, &what);
	if (r < 0) {
		snprintf(why, sizeof(why), "cannot acquire %s: %s", what, strerror(-r));
		fail_start(vm, JSONRPC_ERR_RESOURCE, why);
		return;
	}
	r = vmm_start(d, &vm->cfg, vm->cfg.vmm, vm->qmp_path, vm->dir_fd, NULL, &vm_vmm_ops, vm,
		      &vm->vmm);
	if (r < 0) {
		snprintf(why, sizeof(why), "cannot execute VMM '%s': %s", vm->cfg.vmm,
			 launcher_strerror(r));
		fail_start(vm, JSONRPC_ERR_VMM, why);
		return;
	}
	/* Spawning: vmm_spawned() or vmm_exited() follows. The deadline
	 * covers the launcher's answer too. */
	ev_timer_set(&vm->timer, VM_START_TIMEOUT, 0.);
	ev_timer_start(d->loop, &vm->timer);
}

void vm_destroy(struct vm *vm, struct call *c)
{
	if (vm_busy(vm)) {
		call_fail(c, JSONRPC_ERR_BUSY, "VM '%s' is %s; try again when that has finished",
			  vm->cfg.name, vm_busy(vm));
		return;
	}
	if (!vmm_alive(vm->vmm)) { /* crashed: nothing runs */
		log_info("VM %s: destroyed; custody released", vm->cfg.name);
		finish_destroy(vm, c);
		return;
	}
	vm_set_state(vm, VM_STOPPING);
	begin_request(vm, &vm_destroy_op, c);
	/* QEMU treats SIGTERM as a host-requested shutdown and exits cleanly. */
	vmm_signal(vm->vmm, SIGTERM);
	ev_timer_stop(vm->d->loop, &vm->timer);
	ev_timer_set(&vm->timer, VM_STOP_TIMEOUT, 0.);
	ev_timer_start(vm->d->loop, &vm->timer);
}

/* ---- pause and resume ---- */

static json_object *pause_result(const struct vm *vm, bool changed)
{
	json_object *res = json_object_new_object();

	json_object_object_add(res, "name", json_object_new_string(vm->cfg.name));
	json_object_object_add(res, "state", json_object_new_string(vm_state_to_string(vm->state)));
	json_object_object_add(res, "changed", json_object_new_boolean(changed));
	return res;
}

static void paused_or_resumed(struct vm *vm, json_object *ret, const char *desc, bool pause)
{
	struct call *c = take_request(vm);

	if (!c)
		return; /* answered already: the VMM exited meanwhile */
	if (!ret) {
		call_fail(c, JSONRPC_ERR_VMM, "VM '%s': the VMM did not %s the guest: %s",
			  vm->cfg.name, pause ? "pause" : "resume", desc ? desc : "?");
		return;
	}
	/* The STOP or RESUME event came before the answer, and set the state
	 * already; this only makes sure. */
	vm_set_state(vm, pause ? VM_PAUSED : VM_RUNNING);
	log_info("VM %s: %s on request", vm->cfg.name, pause ? "paused" : "resumed");
	call_reply(c, pause_result(vm, true));
}

static void stop_done(qmp *q, json_object *ret, const char *cls, const char *desc, void *ud)
{
	paused_or_resumed(ud, ret, desc, true);
}

static void cont_done(qmp *q, json_object *ret, const char *cls, const char *desc, void *ud)
{
	paused_or_resumed(ud, ret, desc, false);
}

void vm_pause(struct vm *vm, bool pause, struct call *c)
{
	enum vm_state want = pause ? VM_PAUSED : VM_RUNNING;

	if (vm_busy(vm)) {
		call_fail(c, JSONRPC_ERR_BUSY, "VM '%s' is %s; try again when that has finished",
			  vm->cfg.name, vm_busy(vm));
		return;
	}
	if (!op_may_start_in(&vm_pause_op, vm->state) || !vmm_alive(vm->vmm)) {
		call_fail(c, JSONRPC_ERR_BAD_STATE,
			  "VM '%s' is %s; only a running or paused VM can be %s", vm->cfg.name,
			  vm_state_to_string(vm->state), pause ? "paused" : "resumed");
		return;
	}
	if (vm->state == want) {
		call_reply(c, pause_result(vm, false));
		return;
	}
	if (vmm_command(vm->vmm, pause ? "stop" : "cont", NULL, -EBADF,
			pause ? stop_done : cont_done, vm) < 0) {
		call_fail(c, JSONRPC_ERR_VMM, "VM '%s': its VMM's monitor is not connected",
			  vm->cfg.name);
		return;
	}
	begin_request(vm, &vm_pause_op, c);
}

/* ---- recovery ---- */

struct vm *vm_recover(struct daemon *d, struct vm_config *cfg, uint64_t created_usec,
		      unsigned updates)
{
	struct vm *vm = calloc(1, sizeof(*vm));
	int r;

	if (!vm) {
		vm_config_done(cfg);
		return NULL;
	}
	vm->d = d;
	vm->cfg = *cfg;
	*cfg = (struct vm_config){};
	vm->state = VM_CRASHED; /* born so; vm_set_state() from here on */
	vm->exit_code = -1;
	snprintf(vm->exit_desc, sizeof(vm->exit_desc), "exited while cprd was not running");
	vm->created_usec = created_usec;
	vm->updates = updates;
	ev_init(&vm->timer, timer_cb);
	vm->timer.data = vm;
	vm->dir_fd = -EBADF;
	r = vm_paths(vm);
	if (r == -ENOMEM) {
		free(vm->dir);
		free(vm->console_path);
		free(vm->vmm_log_path);
		free(vm->qmp_path);
		free(vm->history_path);
		vm_config_done(&vm->cfg);
		free(vm);
		return NULL;
	}
	/* Kept all the same: a VM is never dropped for want of its files. */
	if (r < 0)
		log_warning("VM %s: cannot open %s: %s", vm->cfg.name, vm->dir, strerror(-r));
	vm->next = d->vms;
	d->vms = vm;
	return vm;
}

void vm_recover_vmm(struct vm *vm, struct vmm *v, bool running)
{
	vm_adopt_vmm(vm, v);
	vm_set_state(vm, running ? VM_RUNNING : VM_PAUSED);
	vm->exit_desc[0] = '\0';
	vmm_watch(v);
}

/* ---- views ---- */

const char *vm_busy(const struct vm *vm)
{
	return vm->op ? vm->op->type->busy : NULL;
}

void vm_vmm_said(const struct vm *vm, const struct vmm *v, char *buf, size_t size)
{
	file_tail_from(vm->dir_fd, VM_VMM_LOG, v ? v->log_start : 0, buf, size);
}

/* Reading the VMM's maps is the dear part of a vm.list, and any peer may
 * send hundreds at once: it is read once per loop turn, however many ask
 * in that turn (vm.list, an update's decision, a scrape). The names are
 * the VMM's to choose (what it maps), so they are escaped. */
void vm_vmm_said_note(const struct vm *vm, const struct vmm *v, char *buf, size_t size)
{
	char tail[VM_VMM_SAID_MAX];

	vm_vmm_said(vm, v, tail, sizeof(tail));
	snprintf(buf, size, "%s%s", tail[0] ? "; VMM log: " : "", tail);
}

int vm_outdated(struct vm *vm, char *buf, size_t size)
{
	ev_tstamp now = ev_now(vm->d->loop);
	pid_t pid = vmm_alive(vm->vmm) ? vm->vmm->pid : 0;
	char raw[sizeof(vm->outdated.files)];

	if (pid <= 0) {
		buf[0] = '\0';
		return -ESRCH;
	}
	if (vm->outdated.pid != pid || vm->outdated.at != now) {
		vm->outdated.n = proc_replaced_files(pid, raw, sizeof(raw));
		str_escape(raw, vm->outdated.n > 0 ? strlen(raw) : 0, vm->outdated.files,
			   sizeof(vm->outdated.files));
		vm->outdated.pid = pid;
		vm->outdated.at = now;
	}
	snprintf(buf, size, "%s", vm->outdated.files);
	return vm->outdated.n;
}

/* "outdated": whether the running VMM's binary or a library it maps was
 * replaced on disk since it started (null when that cannot be read, or
 * nothing runs), with the files' names. */
static void add_outdated(json_object *o, struct vm *vm)
{
	char files[sizeof(vm->outdated.files)];
	int n = vm_outdated(vm, files, sizeof(files));

	json_object_object_add(o, "outdated", n >= 0 ? json_object_new_boolean(n > 0) : NULL);
	if (n > 0)
		add_str(o, "outdated_files", files);
}

json_object *vm_to_json(struct vm *vm)
{
	json_object *o = json_object_new_object();
	bool alive = vmm_alive(vm->vmm);
	struct vm_record rec = vm_record_of(vm);

	vm_record_to_json(&rec, VM_VIEW_STATUS, o);
	add_str(o, "state", vm_state_to_string(vm->state));
	add_str(o, "busy", vm_busy(vm));
	if (vm->op && vm->op->type->status)
		vm->op->type->status(vm->op, o);
	json_object_object_add(o, "pid", alive ? json_object_new_int(vm->vmm->pid) : NULL);
	add_str(o, "vmm_version", vm->vmm && vm->vmm->version[0] ? vm->vmm->version : NULL);
	add_str(o, "vmm_package", vm->vmm && vm->vmm->version[0] ? vm->vmm->package : NULL);
	add_outdated(o, vm);
	add_str(o, "accel", vm->d->kvm ? "kvm" : "tcg");
	json_object_object_add(o, "confined", json_object_new_boolean(vm->d->confine));
	add_str(o, "console_log", vm->console_path);
	add_str(o, "vmm_log", vm->vmm_log_path);
	add_str(o, "qmp_socket", vm->qmp_path);
	json_object_object_add(
	    o, "fds_held", json_object_new_int((int)memstore_count(vm->d->store, vm->cfg.name)));
	json_object_object_add(o, "updating", json_object_new_boolean(vm_op_is(vm, "update")));
	if (vm->state == VM_CRASHED) {
		json_object_object_add(o, "exit_code", json_object_new_int(vm->exit_code));
		add_str(o, "exit", vm->exit_desc);
	}
	return o;
}

json_object *vm_fds_to_json(struct vm *vm)
{
	json_object *arr = json_object_new_array();
	const memstore_entry *e;

	for (size_t i = 0; (e = memstore_nth(vm->d->store, vm->cfg.name, i)); i++) {
		json_object *o = json_object_new_object();
		struct stat st;
		/* Files (logs) grow; regions are sealed, so their size is fixed. */
		int64_t size = e->kind == MEMSTORE_KIND_FILE && fstat(e->fd, &st) == 0
				   ? st.st_size
				   : (int64_t)e->size;

		add_str(o, "name", e->name);
		add_str(o, "kind", memstore_kind_to_string(e->kind));
		json_object_object_add(o, "size", json_object_new_int64(size));
		json_object_object_add(o, "fd", json_object_new_int(e->fd));
		json_object_array_add(arr, o);
	}
	return arr;
}
