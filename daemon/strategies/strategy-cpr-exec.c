/* SPDX-License-Identifier: MIT */
/*
 * cpr-exec: QEMU's own mode (QEMU >= 10.2). The old VMM writes the device
 * state to a file in the VM's VMM directory and execs the new binary in
 * its own process, which keeps its pid, namespaces, cgroup and scope, and
 * every fd cprd gave it; the new image starts paused and loads the file.
 * The engine runs the rest in place (update.c): the commit, and, when the
 * new image fails, a fresh VMM of the old binary loading the same file.
 *
 *   prepare  the old VMM: cpr-exec mode and the new command line
 *   migrate  migrate to the file; the exec; the new image loads it
 *   (commit, and the restore on rollback: the engine's)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/file.h"
#include "common/macro.h"
#include "daemon/devices/device.h"
#include "daemon/strategies/strategy.h"
#include "daemon/core/vm.h"
#include "daemon/core/vmm.h"
#include "kvm/qemu.h"

#define STATE_FILE "cpr-exec.state"

struct cpr_exec {
	char *path, *uri; /* the state file, and "file:" it */
	unsigned pending;
};

static struct cpr_exec *X(struct update *u)
{
	return u->priv;
}

static void prepared(qmp *q, json_object *ret, const char *cls, const char *desc, void *ud)
{
	struct update *u = ud;
	json_object *args;

	if (u->phase != PHASE_PREPARE)
		return;
	if (!ret) {
		update_rollback(u, "the old VMM refused cpr-exec: %s", desc);
		return;
	}
	if (--X(u)->pending > 0)
		return;
	args = json_object_new_object();
	json_object_object_add(args, "uri", json_object_new_string(X(u)->uri));
	update_migrate(u, args);
}

static json_object *parameters(struct update *u, char **argv)
{
	json_object *o = json_object_new_object(), *cmd = json_object_new_array();

	for (size_t i = 0; argv[i]; i++)
		json_object_array_add(cmd, json_object_new_string(argv[i]));
	json_object_object_add(o, "mode", json_object_new_string("cpr-exec"));
	json_object_object_add(o, "cpr-exec-command", cmd);
	return o;
}

/* The new image's command line is the old one's with the new binary, the
 * fds where the old image holds them, and -S -incoming file:STATE. */
static void start(struct update *u)
{
	struct vm *vm = u->vm;
	struct cpr_exec *x = calloc(1, sizeof(*x));
	char **argv = NULL;
	int r;

	if (!x) {
		update_rollback(u, "out of memory");
		return;
	}
	u->priv = x;
	if (asprintf(&x->path, "%s/" STATE_FILE, update_vm_dir(u)) < 0 ||
	    asprintf(&x->uri, "file:%s", x->path) < 0) {
		x->path = x->uri = NULL;
		update_rollback(u, "out of memory");
		return;
	}
	(void)unlink(x->path);
	r = vmm_exec_argv(vm->vmm, &vm->cfg, u->new_binary, x->uri, &argv);
	if (r < 0) {
		update_rollback(u, "cannot build the new VMM's command line: %s", strerror(-r));
		return;
	}
	x->pending = 2;
	r = vmm_command(
	    vm->vmm, "migrate-set-capabilities",
	    json_tokener_parse("{\"capabilities\": ["
			       "{\"capability\": \"x-ignore-shared\", \"state\": false},"
			       "{\"capability\": \"events\", \"state\": true}]}"),
	    -EBADF, prepared, u);
	if (r >= 0)
		r = vmm_command(vm->vmm, "migrate-set-parameters", parameters(u, argv), -EBADF,
				prepared, u);
	strv_free(argv);
	if (r < 0)
		update_rollback(u, "lost the old VMM's monitor");
}

static const char *restore_uri(struct update *u)
{
	struct cpr_exec *x = X(u);

	return x && x->path && access(x->path, F_OK) == 0 ? x->uri : NULL;
}

/* A VMM that is already QEMU's successor after a rollback puts nothing
 * back that the old image had: its migration parameters are its own. */
static void rollback(struct update *u, struct vmm *old)
{
	(void)vmm_command(old, "migrate-set-parameters",
			  json_tokener_parse("{\"mode\": \"normal\", \"cpr-exec-command\": []}"),
			  -EBADF, NULL, NULL);
}

static void remove_state(const char *dir)
{
	char path[4096];

	snprintf(path, sizeof(path), "%s/" STATE_FILE, dir);
	(void)unlink(path);
}

static void done(struct update *u)
{
	struct cpr_exec *x = X(u);

	if (!x)
		return;
	remove_state(update_vm_dir(u));
	free(x->path);
	free(x->uri);
	free(x);
	u->priv = NULL;
}

/* "10.2.2" is 10.2: cpr-exec came with QEMU 10.2. */
static bool version_has_cpr_exec(const char *version)
{
	unsigned major = 0, minor = 0;

	return sscanf(version, "%u.%u", &major, &minor) == 2 &&
	       (major > 10 || (major == 10 && minor >= 2));
}

/* The exec happens inside the VMM's root, which (confined) holds /usr and
 * the tree of the binary it was started from, nothing else: the new
 * binary must be that very file there. */
static bool visible_to(pid_t pid, const char *binary)
{
	char in_root[4200];

	snprintf(in_root, sizeof(in_root), "/proc/%d/root%s", (int)pid, binary);
	return file_same(binary, in_root);
}

static bool possible(const struct vm *vm, const char *binary, char *why, size_t size)
{
	const struct vmm *v = vm->vmm;
	bool confined = vm->d->confine && vm->cfg.uid > 0;

	if (!v || !v->version[0]) {
		snprintf(why, size, "VM '%s': its VMM has not said its version yet", vm->cfg.name);
		return false;
	}
	if (!version_has_cpr_exec(v->version)) {
		snprintf(why, size,
			 "VM '%s' runs QEMU %s, which cannot cpr-exec (QEMU 10.2 and later can): "
			 "update it with handover or cpr-transfer",
			 vm->cfg.name, v->version);
		return false;
	}
	if (confined && !vm->cfg.cpr_exec) {
		snprintf(why, size,
			 "VM '%s' was created without cpr_exec: its VMM's sandbox forbids the exec "
			 "that cpr-exec is (create VMs with --cpr-exec for it); handover and "
			 "cpr-transfer work for this VM",
			 vm->cfg.name);
		return false;
	}
	if (confined && !visible_to(v->pid, binary)) {
		snprintf(why, size,
			 "'%s' is not inside the root of VM '%s''s VMM, which holds /usr and the "
			 "tree of the binary it was started from: cpr-exec runs the new binary "
			 "there; use handover or cpr-transfer for it",
			 binary, vm->cfg.name);
		return false;
	}
	return true;
}

const struct strategy strategy_cpr_exec = {
	.name = "cpr-exec",
	.carry = DEVICE_BY_CPR_EXEC,
	.first = PHASE_PREPARE,
	.in_place = true,
	/* From the migrate command on, the VM's process may become the new
	 * image without cprd: a cprd restarted later must know the migration
	 * began (no new VMM's start recorded it). */
	.durable = PHASE_BIT(PHASE_MIGRATE),
	.next = {
		[PHASE_PREPARE] = PHASE_BIT(PHASE_MIGRATE) | PHASE_BIT(PHASE_ROLLBACK),
		[PHASE_MIGRATE] = PHASE_BIT(PHASE_COMMIT) | PHASE_BIT(PHASE_ROLLBACK),
		[PHASE_COMMIT] = PHASE_BIT(PHASE_END_OLD) | PHASE_BIT(PHASE_ROLLBACK),
	},
	.start = start,
	.rollback = rollback,
	.restore_uri = restore_uri,
	.possible = possible,
	.done = done,
	.settle = remove_state,
	.needs_caps = (const char *const[]){ "events", NULL },
	.needs_mode = "cpr-exec",
};
