/* SPDX-License-Identifier: MIT */
/*
 * What a kind of device is to cprd: one `struct device_type` per kind, in
 * a file of its own here (ram.c, console.c, tap.c, disk.c), listed once in
 * devices.c's table. The rest of cprd walks the table (devices.h) and
 * knows no kind by name: creating a VM, taking its fds into custody,
 * handing them to a VMM at fd numbers and on its command line, taking them
 * back after a restart, recording them.
 *
 * A VM has one argument per type (vm.create's parameter of the type) and
 * the type says how many fds that argument holds: one (ram0, console,
 * net0), or several (disks, each a chain of image files). Each fd has an
 * id, its name in custody, in the fd store and in a VMM's fd map. A type
 * without a parameter is a device every VM has; one with a parameter is a
 * device the VM has when vm.create was given that parameter.
 */
#pragma once

#include <json-c/json.h>
#include <stdbool.h>
#include <stddef.h>

#include "memstore/memstore.h"

struct vm;
struct qemu_config;

/* Room for this many types: a VM's device arguments and a VMM's fd map are
 * arrays indexed by the type's place in the table. */
#define DEVICE_TYPES_MAX 8
/* The fds one VM's devices hold, all types together: a VMM is given them
 * with its monitor, kernel and initrd in one message (LAUNCHER_MAX_FDS). */
#define DEVICE_FDS_MAX 12
/* An fd's id: a type's id, or for a type of several fds its id and the
 * fd's place ("disk1", "disk1.2"). */
#define DEVICE_FD_ID_MAX 24

/* Each type's vm.create argument, by the type's place in the table (a
 * JSON value the type checks; a reference of its own); NULL when not
 * given (always, for a type without a parameter). */
struct device_args {
	json_object *arg[DEVICE_TYPES_MAX];
};

/* The ways a device's fd reaches the guest's next VMM. */
enum device_carry {
	DEVICE_BY_HANDOVER = 1 << 0,     /* the new VMM is given the held fd */
	DEVICE_BY_CPR_TRANSFER = 1 << 1, /* likewise */
	DEVICE_BY_CPR_EXEC = 1 << 2,     /* inherited at the same number across exec */
	DEVICE_BY_CHECKPOINT = 1 << 3,   /* kept, or reopened, across a checkpoint */
	DEVICE_BY_ALL = (1 << 4) - 1,
};

/* Whom a vm.create is for: what a type's prepare() may open a file as. */
struct creds;

struct device_type {
	const char *kind; /* for people: "memory", "serial", "tap", "disk" */
	const char *id;   /* "ram0", "console", "net0", "disk" */
	const char *what; /* in an error: "its tap device" */
	/* How custody (memstore) checks the fd, on every put. */
	enum memstore_kind custody;
	/* Its vm.create parameter, which is also its key in the registry, a
	 * checkpoint's meta and vm.status; NULL for a device every VM has. */
	const char *param;
	/* The JSON type of param's value (json_type_string when 0). */
	json_type param_type;
	/* Whether param's value is acceptable: 0, or -EINVAL with why saying
	 * why not (for the peer). Optional. Also run on every record read
	 * back, which may hold what prepare() added. */
	int (*check)(json_object *arg, char *why, size_t size);
	/* At vm.create, after check(): judge what arg names as peer could
	 * (NULL: root) and complete arg with what was judged (canonical
	 * paths, file identities), which every later open must find again.
	 * 0, or a negative errno with why. Optional. */
	int (*prepare)(json_object *arg, const struct creds *peer, char *why, size_t size);
	/* How many fds a device of arg holds (NULL: one), and the id of the
	 * k-th (NULL: the type's id). */
	size_t (*nfds)(json_object *arg);
	void (*fd_id)(json_object *arg, size_t k, char *buf, size_t size);
	/* A VMM opens it anew through /proc/self/fd, which checks the
	 * inode's permissions against the VMM's own uid: it is owned by the
	 * VM's uid (given to it again when a restarted cprd picks one). */
	bool owned_by_vm;
	/* Each VMM is given a file description of its own, opened anew from
	 * the held one (the VMMs' locks on it are then theirs alone, not
	 * shared with cprd's or each other's); the held one is cprd's. */
	bool fresh_per_vmm;
	/* Open (or create) the n fds for vm, a new VM, and check them:
	 * fds[0..n) (O_CLOEXEC) or a negative errno (then none is open).
	 * Custody is the caller's. */
	int (*open)(const struct vm *vm, json_object *arg, int *fds, size_t n);
	/* Open them again when custody lost them while the VM had no VMM (a
	 * restore from a checkpoint after cprd restarted). NULL: they are not
	 * reopened (guest RAM: the checkpoint brings it back). */
	int (*reopen)(const struct vm *vm, json_object *arg, int *fds, size_t n);
	/* The guest is saved in a checkpoint. With stamp, record in arg what
	 * restoring() compares (as the checkpoint is written, before its
	 * meta; the VMM has let go of the files by then); without, keep the
	 * files as they are until a restore (once no VMM has the guest: the
	 * checkpoint in place, a restore failed, a restarted cprd). fds:
	 * cprd's. Optional. */
	int (*saved)(json_object *arg, const int *fds, size_t n, bool stamp);
	/* A VMM is about to take the guest back from its checkpoint: 0 when
	 * the files are as saved() stamped them (cprd's hold on them is then
	 * let go), or -ESTALE with why. Optional. */
	int (*restoring)(json_object *arg, const int *fds, size_t n, char *why, size_t size);
	/* Add its QEMU arguments for its n fds, which the VMM has at
	 * child[0..n), to qc (qc's machine-wide fields are set; every child
	 * fd is at least QEMU_CHILD_FD_BASE, devices_qemu_args() sees to it). */
	int (*qemu_args)(json_object *arg, const int *child, size_t n, struct qemu_config *qc);
	/* enum device_carry: how it may reach the next VMM. */
	unsigned carry;
};
