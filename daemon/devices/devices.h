/* SPDX-License-Identifier: MIT */
/*
 * The device types (devices.c's table) and what the rest of cprd does with
 * a VM's devices through them. devices.c itself neither logs nor needs the
 * event loop (tests/unit/test_devices.c tests it alone); custody.c puts the
 * fds in custody and the fd store.
 */
#pragma once

#include <json-c/json.h>
#include <stdbool.h>
#include <stddef.h>

#include "daemon/devices/device.h"

struct creds;
struct daemon;
struct vm;
struct vm_config;

/* Guest RAM's id: the checkpoint copies it and recovery identifies a VMM
 * by it, beside what every device has. */
#define DEVICE_RAM_ID "ram0"

/* The i-th type of the table, or NULL past its end. */
const struct device_type *device_type_nth(size_t i);
size_t device_types_count(void);
/* The type of id (a type's id, not an fd's), or NULL. */
const struct device_type *device_type_find(const char *id);
/* The type that an fd of this id would belong to, or NULL: "net0", or
 * "disk0", "disk3.1" for a type of several fds. */
const struct device_type *device_type_of_fd(const char *id);
/* Whether name is, or could be, a device fd's id, which fd.store may not
 * take. */
bool device_id_reserved(const char *name);

/* What the value of the device parameter param must be, for people: "a
 * string", "a list". */
const char *device_type_param_text(const char *param);

/* Whether a VM of args has the i-th type's device. */
bool device_present(const struct device_args *args, size_t i);

void device_args_done(struct device_args *args);
/* Why a type refuses its argument in args (why, with the parameter in
 * *ret_param), or NULL when every type accepts its own. */
const char *devices_refused(const struct device_args *args, const char **ret_param, char *why,
			    size_t size);
/* Judge, as peer could (NULL: root), what each type's argument names, and
 * complete the arguments with what was judged (type->prepare). 0, or a
 * negative errno with why and the parameter in *ret_param. */
int devices_prepare(struct device_args *args, const struct creds *peer, const char **ret_param,
		    char *why, size_t size);
/* The devices' keys added to o, in the table's order: only those given, or
 * (with nulls) every one, null when not given (vm.status). */
void devices_to_json(const struct device_args *args, bool nulls, json_object *o);
/* Read the devices' keys from o (a record, or vm.create's params); absent
 * or null is not given. -EINVAL for a value of another JSON type than its
 * type takes (its key in *ret_param), -ENOMEM. */
int devices_from_json(json_object *o, struct device_args *ret, const char **ret_param);

/* One fd that a VM's devices hold: its type (place in the table), its
 * place among its type's fds, and its id. */
struct device_fd {
	size_t type;
	size_t k;
	char id[DEVICE_FD_ID_MAX];
};
/* The fds a VM of args holds, in the table's order and each type's own:
 * their number (at most DEVICE_FDS_MAX, which vm.create sees to). */
size_t devices_fds(const struct device_args *args, struct device_fd out[DEVICE_FDS_MAX]);

/* Where a VMM finds its fds (QEMU_CHILD_FD_BASE on): the devices every VM
 * has, in the table's order (ram0 at 3, console at 4), its monitor, then
 * the fds of the devices it may have that it has, in the table's order
 * and each type's own; the boot images follow from next on. The order of
 * the first ones never depends on a VM's devices, and a cpr-exec
 * successor inherits the same numbers. */
struct device_layout {
	int first[DEVICE_TYPES_MAX]; /* the child fd of the type's first fd; -1: none */
	size_t count[DEVICE_TYPES_MAX];
	int qmp;
	int next;
};
void devices_layout(const struct device_args *args, struct device_layout *ret);
/* The child fd at which l puts f. */
int device_fd_child(const struct device_layout *l, const struct device_fd *f);
/* Each device's QEMU arguments, at its place of layout, added to qc. */
int devices_qemu_args(const struct device_args *args, const struct device_layout *layout,
		      struct qemu_config *qc);

/* Whether every device of args can reach a next VMM by how (one of enum
 * device_carry); when not, why names it. */
bool devices_carried(const struct device_args *args, unsigned how, char *why, size_t size);

/* custody.c */

/* Take a new VM's devices into custody and the fd store: all are opened
 * first, so a failure leaves none held; *ret_what names the one that
 * failed. */
int devices_acquire(struct vm *vm, const char **ret_what);
/* Hold again those that custody lost and that can be reopened; with
 * fresh_only, only those of which each VMM has a file description of its
 * own (their VMM's fds cannot be copied back: QEMU keeps them elsewhere). */
int devices_reacquire(struct vm *vm, bool fresh_only, const char **ret_what);
/* The VM's guest is saved in a checkpoint, its files kept as saved until
 * a restore (type->saved; stamp: record what restoring checks). */
void devices_saved(struct vm *vm, bool stamp);
/* The VM is being restored: 0 when its files are as saved, else a
 * negative errno, with why naming what changed. */
int devices_restoring(struct vm *vm, char *why, size_t size);
/* Give the held fds that the VM's VMMs open anew to its uid. */
int devices_own(struct vm *vm);
