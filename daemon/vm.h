/* SPDX-License-Identifier: MIT */
/*
 * The VMs cprd holds and each VM's life: starting -> running <-> paused ->
 * stopping -> gone, or crashed when the VMM exits on its own. A crashed VM
 * keeps its memory in custody until it is destroyed. While an update runs,
 * vm->update is set and the VM keeps its state (the guest runs until the
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
#include <sys/types.h>

#include "daemon/daemon.h"
#include "daemon/devices/device.h"
#include "daemon/vmm.h"

struct call;
struct update;
struct ckpt;

enum vm_state {
	VM_STARTING,
	VM_RUNNING,
	VM_PAUSED,
	VM_STOPPING,
	VM_CRASHED,
	VM_CHECKPOINTED, /* no VMM, no RAM: the guest is in its checkpoint */
	_VM_STATE_MAX,
};

/* Which file a path named when a peer that is not root was judged to
 * read it: a later open must find the very same file there. */
struct file_id {
	dev_t dev;
	ino_t ino;
	bool set; /* false: named by root (or recorded before identities were) */
};

struct vm_config {
	char *name;
	char *vmm; /* absolute path of the VMM binary (canonical unless root named it) */
	char *kernel, *initrd, *append; /* kernel, initrd: likewise */
	struct file_id kernel_id, initrd_id;
	char *machine;       /* versioned once the first VMM named it (pc-q35-10.0) */
	char *machine_alias; /* what create asked for (q35), or NULL */
	uint64_t memory_bytes;
	unsigned vcpus;
	uid_t uid;     /* the VM's own uid (and gid) for its VMMs; 0 before one is chosen */
	bool cpr_exec; /* its VMMs may exec a successor (QEMU's sandbox spawn=allow) */
	struct device_args devices; /* each device type's vm.create argument */
};

struct vm {
	struct daemon *d;
	struct vm_config cfg;
	enum vm_state state;
	char *dir, *console_path, *vmm_log_path, *qmp_path, *history_path;
	int dir_fd;            /* dir: its files are reached through it, never a symlink */
	char *run_dir;         /* dir/vmm: owned by cfg.uid, the one path its VMMs may write */
	struct vmm *vmm;       /* NULL once the VMM is gone */
	ev_timer timer;        /* start-up or stop deadline */
	struct call *waiting;  /* vm.create, vm.destroy or vm.pause/resume to answer */
	struct update *update; /* in flight, or NULL */
	struct check *check;   /* a pre-flight in flight, or NULL */
	struct ckpt *ckpt;     /* a checkpoint or restore in flight, or NULL */
	struct {               /* "outdated" as read in one loop turn (vm_to_json()) */
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
 * vm_restore_vmm says otherwise). cfg is taken. */
struct vm *vm_restore(struct daemon *d, struct vm_config *cfg, uint64_t created_usec,
		      unsigned updates);
void vm_restore_vmm(struct vm *vm, struct vmm *v, bool running);

/* The versioned name of machine type (or alias) type in a VMM's answer to
 * query-machines, or NULL when it has no such type. */
const char *vm_machine_resolve(json_object *machines, const char *type);

json_object *vm_to_json(struct vm *vm);
/* How many files the running VMM maps that were replaced on disk since
 * (see proc_replaced_files()), their names in buf; -ESRCH when no VMM runs. */
int vm_outdated(struct vm *vm, char *buf, size_t size);
/* What v, one of the VM's VMMs, wrote to the VM's VMM log since it started
 * (the log is shared by its VMMs), on one line; with v NULL, the log's
 * tail. */
/* What keeps the VM busy ("being updated", "starting", ...), or NULL when
 * nothing runs on it that another operation would have to wait for. */
const char *vm_busy(const struct vm *vm);
void vm_vmm_said(const struct vm *vm, const struct vmm *v, char *buf, size_t size);
json_object *vm_fds_to_json(struct vm *vm);

void vm_config_done(struct vm_config *cfg);
/* The kernel's and initrd's file_id in a record (registry, checkpoint
 * meta), and back; a record without them reads as root-given. */
void vm_config_ids_to_json(const struct vm_config *cfg, json_object *o);
void vm_config_ids_from_json(json_object *o, struct vm_config *cfg);
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
