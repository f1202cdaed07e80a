/* SPDX-License-Identifier: MIT */
/*
 * Checkpoint and restore of a whole VM to a persistent directory, so that
 * its guest survives a host reboot (docs/ARCHITECTURE.md, "Checkpoint and
 * restore"). A checkpoint is CHECKPOINT_DIR/NAME/: meta.json (the VM's
 * definition, sizes, digest), the VMM's state and, for the cprd method,
 * the guest RAM that cprd copied from the memfd it holds. It is written as
 * CHECKPOINT_DIR/.NAME.tmp, fsynced, and renamed into place, so that a
 * checkpoint either is whole or does not exist.
 */
#pragma once

#include <json-c/json.h>
#include <stdbool.h>
#include <stdint.h>

struct daemon;
struct vm;
struct call;
struct op_type;

#define CHECKPOINT_DEFAULT_DIR "/var/lib/cprd/checkpoints"

struct checkpoint_args {
	const char *method; /* "cprd" or "qemu" */
	const char *dir;    /* NULL: the daemon's --checkpoint-dir */
	unsigned channels;  /* qemu method: multifd channels; 0: the host's cores */
	double timeout;
};

struct restore_args {
	const char *binary;    /* the new VMM; NULL: the VM's own */
	const char *dir;       /* NULL: where its checkpoint was written */
	uint64_t memory_bytes; /* 0: any; else what the checkpoint must have */
	double timeout;
};

/* Pause the guest, save it, end its VMM and release its RAM; answers c. */
void checkpoint_start(struct vm *vm, const struct checkpoint_args *a, struct call *c);
/* Start a VMM on the VM's checkpoint and resume the guest; answers c (may
 * be NULL: --restore-on-start). */
void restore_start(struct vm *vm, const struct restore_args *a, struct call *c);

/* The fd set (add-fd) that holds a checkpoint's file in the VMM while it
 * is saved or loaded: file:/dev/fdset/N. */
#define CHECKPOINT_FDSET 7

/* The guest runs outside VM vm's checkpoint in root (a restarted cprd
 * found the restore VMM running it): remove that checkpoint. */
void checkpoint_retire(struct vm *vm, const char *root);
/* After a restart: remove the unfinished checkpoint of VM name in root,
 * which the registry says a checkpoint was being written in. */
void checkpoint_discard_unfinished(const char *root, const char *name);

/* The operations' types (op.h); on cprd's shutdown either fails its
 * caller, ends a restore's VMM and keeps the files. vm.status shows its
 * progress: {"operation", "method", "ram_bytes", "copied_bytes"} (copied:
 * of guest RAM by cprd's method so far). */
extern const struct op_type checkpoint_op_type, restore_op_type;

/* At start: the VMs the registry knew as checkpointed are so again if
 * their checkpoint is whole; every checkpoint in d->checkpoint_dir of a VM
 * the registry does not know (after a reboot) becomes a checkpointed VM;
 * half-written checkpoints are removed. */
void checkpoint_recover(struct daemon *d);
/* --restore-on-start: restore every checkpointed VM once the loop runs. */
void checkpoint_restore_all(struct daemon *d);
/* vm.destroy of a checkpointed VM: its checkpoint goes too. */
void checkpoint_discard(struct vm *vm);
