/* SPDX-License-Identifier: MIT */
/*
 * The VMs cprd holds and each VM's life: starting -> running <-> paused ->
 * stopping -> gone, or crashed when the VMM exits on its own. A crashed VM
 * keeps its memory in custody until it is destroyed. While an update runs,
 * vm->op is the update and the VM keeps its state (the guest runs until the
 * blackout). Every state change goes through vm_set_state().
 *
 * What of them must outlive cprd is written to the registry file
 * (registry.h) by vm_registry_commit(): at once where a client is about to
 * be told of a change, otherwise coalesced at the end of the loop's turn.
 */
#pragma once

#include <ev.h>
#include <json-c/json.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>

#include "daemon/core/daemon.h"
#include "daemon/core/op.h"
#include "daemon/core/vmm.h"
#include "daemon/core/vmrecord.h"

struct call;

enum vm_state {
	VM_STARTING,
	VM_RUNNING,
	VM_PAUSED,
	VM_STOPPING,
	VM_CRASHED,
	VM_CHECKPOINTED, /* no VMM, no RAM: the guest is in its checkpoint */
	_VM_STATE_MAX,
};

struct vm {
	struct daemon *d;
	struct vm_config cfg;
	enum vm_state state;
	char *dir, *console_path, *vmm_log_path, *qmp_path, *history_path;
	int dir_fd;        /* dir: its files are reached through it, never a symlink */
	char *run_dir;     /* dir/vmm: owned by cfg.uid, the one path its VMMs may write */
	struct vmm *vmm;   /* NULL once the VMM is gone */
	ev_timer timer;    /* start-up or stop deadline */
	struct op *op;     /* what runs on it (op.h), or NULL */
	struct op request; /* the op of vm.create, vm.destroy, vm.pause/resume */
	struct {           /* "outdated" as read in one loop turn (vm_outdated()) */
		ev_tstamp at;
		pid_t pid;
		int n;
		char files[256];
	} outdated;
	char *checkpoint_root; /* where its checkpoint is, while it has one */
	pid_t last_pid;
	int exit_code; /* of the last VMM, -1 unknown */
	char exit_desc[64];
	uint64_t created_usec;
	unsigned updates; /* finished updates, any result */
	struct vm *next;
};

/* Make op, of type t, the VM's one operation (it has none: the caller
 * checked vm_busy()), in phase 0; and end it (a no-op unless op is the
 * VM's). Inline: vm.c depends on nothing of op.c, which writes the
 * registry through vm.c. */
static inline void vm_op_begin(struct vm *vm, struct op *op, const struct op_type *t)
{
	op->type = t;
	op->vm = vm;
	op->phase = 0;
	op->durable = t->durable;
	vm->op = op;
}

static inline void vm_op_end(struct vm *vm, struct op *op)
{
	if (vm->op == op)
		vm->op = NULL;
}

/* Whether the VM's operation is of the type named name. */
static inline bool vm_op_is(const struct vm *vm, const char *name)
{
	return vm->op && strcmp(vm->op->type->name, name) == 0;
}

/* The files in a VM's directory, STATE_DIR/vms/NAME. */
#define VM_CONSOLE_LOG "console.log"
#define VM_VMM_LOG "vmm.log"
#define VM_QMP_SOCK "qmp.sock"
#define VM_HISTORY "history.jsonl"
#define VM_RUN_DIR "vmm" /* the VMMs' own: owned by the VM's uid */
/* The longest socket path below the VM's directory (cpr-transfer's). */
#define VM_LONGEST_SOCKET VM_RUN_DIR "/cpr-state.sock"

const char *vm_state_to_string(enum vm_state s);

/* The one way a VM changes state: only along the lifecycle above (an
 * unexpected change is refused, logged, and returns false); marks the
 * registry dirty and the STATUS= line stale. */
bool vm_set_state(struct vm *vm, enum vm_state state);

/* Write the registry now, from every VM's current state. Returns 0 or the
 * negative errno of the write; the failure is logged when the registry's
 * health changes, and d->registry says what failed. Call it before telling
 * a client about a change that a restarted cprd must know (a VM created, an
 * update started), and fail that request when it fails. */
int vm_registry_commit(struct daemon *d);

/* Every log that has grown past d->log_max is rotated (file_rotate()). */
void vm_rotate_logs(struct daemon *d);

struct vm *vm_find(struct daemon *d, const char *name);
size_t vm_count(struct daemon *d);

/* Start a VM; answers c when the guest runs or when starting failed. The
 * config is taken. */
void vm_create(struct daemon *d, struct vm_config *cfg, struct call *c);
/* Stop the VMM (SIGTERM, then SIGKILL) and release all custody; answers c. */
void vm_destroy(struct vm *vm, struct call *c);
/* Pause the guest's vCPUs (QMP stop) or let them run again (cont); answers
 * c with {"name", "state", "changed"} once the VMM did it. */
void vm_pause(struct vm *vm, bool pause, struct call *c);

/* For the update: make v the VM's VMM (the old one must be gone or being
 * ended by the caller), and the VM's handlers its handlers. */
void vm_adopt_vmm(struct vm *vm, struct vmm *v);
/* For an update in place: the VM's VMM process v (its own, or the one a
 * restarted cprd is taking back) now runs binary. */
void vm_vmm_replaced(struct vm *vm, struct vmm *v, const char *binary);
/* Give the current VMM's monitor socket the VM's well-known path. */
void vm_settle_qmp_path(struct vm *vm);
/* The VMM exited on its own: the VM becomes crashed. */
void vm_vmm_lost(struct vm *vm);

/* Recovery: a VM known from the registry, with no VMM yet (crashed until
 * vm_recover_vmm says otherwise). cfg is taken. */
struct vm *vm_recover(struct daemon *d, struct vm_config *cfg, uint64_t created_usec,
		      unsigned updates);
void vm_recover_vmm(struct vm *vm, struct vmm *v, bool running);

/* The versioned name of machine type (or alias) type in a VMM's answer to
 * query-machines, or NULL when it has no such type. */
const char *vm_machine_resolve(json_object *machines, const char *type);

json_object *vm_to_json(struct vm *vm);
/* How many files the running VMM maps that were replaced on disk since
 * (see proc_replaced_files()), their names in buf; -ESRCH when no VMM runs. */
int vm_outdated(struct vm *vm, char *buf, size_t size);
/* What keeps the VM busy ("being updated", "starting", ...), or NULL when
 * nothing runs on it that another operation would have to wait for. */
const char *vm_busy(const struct vm *vm);
/* What v, one of the VM's VMMs, wrote to the VM's VMM log since it started
 * (the log is shared by its VMMs), on one line; with v NULL, the log's
 * tail. Errors quote up to VM_VMM_SAID_MAX bytes of it: a QEMU that fails
 * to load a migration says why, then what followed (a broken pipe, the
 * load failing), and the why must still be in it. */
#define VM_VMM_SAID_MAX 640
void vm_vmm_said(const struct vm *vm, const struct vmm *v, char *buf, size_t size);
/* The same as the end of an error about v: "; VMM log: <what it said>",
 * or "" when it said nothing. size: VM_VMM_SAID_NOTE. */
#define VM_VMM_SAID_NOTE (VM_VMM_SAID_MAX + 16)
void vm_vmm_said_note(const struct vm *vm, const struct vmm *v, char *buf, size_t size);
json_object *vm_fds_to_json(struct vm *vm);

/* What the VM's record says (vmrecord.h), borrowed from vm. */
struct vm_record vm_record_of(const struct vm *vm);
/* Give vm a uid of its own from the daemon's VMM range (lowest free), unless
 * it has one. -EUSERS when every id of the range is taken. */
int vm_pick_uid(struct vm *vm);
/* Whether every VMM started for cfg can be given its kernel and initrd
 * (vmm_open_image); on failure why says which and why. */
int vm_check_images(const struct vm_config *cfg, char *why, size_t size);
/* Create vm->run_dir if need be, owned by the VM's uid, mode 0700. */
int vm_prepare_run_dir(struct vm *vm);
/* On daemon exit: stop watching, leave the VMMs running. */
void vm_detach_all(struct daemon *d);
