/* SPDX-License-Identifier: MIT */
/*
 * What a kind of device is to cprd: one `struct device_type` per kind, in
 * a file of its own here (ram.c, console.c, tap.c), listed once in
 * devices.c's table. The rest of
 * cprd walks the table (devices.h) and knows no kind by name: creating a
 * VM, taking its fds into custody, handing them to a VMM at fd numbers and
 * on its command line, taking them back after a restart, recording them.
 *
 * A VM has at most one device of each type, under the type's id (its name
 * in custody, in the fd store and in a VMM's fd map). A type without a
 * parameter is a device every VM has; one with a parameter is a device the
 * VM has when vm.create was given that parameter.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>

#include "memstore/memstore.h"

struct vm;
struct qemu_config;

/* Room for this many types: a VM's device arguments and a VMM's fd map are
 * arrays indexed by the type's place in the table. */
#define DEVICE_TYPES_MAX 8

/* Each type's vm.create argument, by the type's place in the table; NULL
 * when not given (always, for a type without a parameter). */
struct device_args {
	char *arg[DEVICE_TYPES_MAX];
};

/* The ways a device's fd reaches the guest's next VMM. */
enum device_carry {
	DEVICE_BY_HANDOVER = 1 << 0,     /* the new VMM is given the held fd */
	DEVICE_BY_CPR_TRANSFER = 1 << 1, /* likewise */
	DEVICE_BY_CPR_EXEC = 1 << 2,     /* inherited at the same number across exec */
	DEVICE_BY_CHECKPOINT = 1 << 3,   /* kept, or reopened, across a checkpoint */
	DEVICE_BY_ALL = (1 << 4) - 1,
};

struct device_type {
	const char *kind; /* for people: "memory", "serial", "tap" */
	const char *id;   /* "ram0", "console", "net0" */
	const char *what; /* in an error: "its tap device" */
	/* How custody (memstore) checks the fd, on every put. */
	enum memstore_kind custody;
	/* Its vm.create parameter, which is also its key in the registry, a
	 * checkpoint's meta and vm.status (a string); NULL for a device every
	 * VM has. */
	const char *param;
	/* Whether param's value is acceptable: 0, or -EINVAL with why saying
	 * why not (for the peer). Optional. */
	int (*check)(const char *arg, char *why, size_t size);
	/* A VMM opens it anew through /proc/self/fd, which checks the
	 * inode's permissions against the VMM's own uid: it is owned by the
	 * VM's uid (given to it again when a restarted cprd picks one). */
	bool owned_by_vm;
	/* Open (or create) the fd for vm, a new VM, and check it: *ret_fd
	 * (O_CLOEXEC) or a negative errno. Custody is the caller's. */
	int (*open)(const struct vm *vm, const char *arg, int *ret_fd);
	/* Open it again when custody lost it while the VM had no VMM (a
	 * restore from a checkpoint after cprd restarted). NULL: it is not
	 * reopened (guest RAM: the checkpoint brings it back). */
	int (*reopen)(const struct vm *vm, const char *arg, int *ret_fd);
	/* Add its QEMU arguments for the fd the VMM has at child_fd to qc
	 * (qc's machine-wide fields are set; child_fd is at least
	 * QEMU_CHILD_FD_BASE, devices_qemu_args() sees to it). */
	int (*qemu_args)(const char *arg, int child_fd, struct qemu_config *qc);
	/* enum device_carry: how it may reach the next VMM. */
	unsigned carry;
};
