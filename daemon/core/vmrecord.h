/* SPDX-License-Identifier: MIT */
/*
 * A VM's configuration, and what is recorded with it, to and from JSON. One
 * table (vmrecord.c) gives each field its key, its type, whether a record
 * must have it, its range, and the views it appears in: a record of the
 * registry (registry.h), the "config" of a checkpoint's meta.json, and
 * vm.status. A new field is one line there and one member here.
 *
 * Like registry.c, this neither logs nor needs the event loop: the caller
 * says what a refused record means (tests/unit/test_vmrecord.c tests it
 * alone, on golden records of this release and the previous one).
 */
#pragma once

#include <json-c/json.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "daemon/devices/device.h"

#define VM_MAX_VCPUS 256

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
	char *cpu;           /* QEMU's -cpu model, or NULL: QEMU's default */
	uint64_t memory_bytes;
	unsigned vcpus;
	uid_t uid;     /* the VM's own uid (and gid) for its VMMs; 0 before one is chosen */
	bool cpr_exec; /* its VMMs may exec a successor (QEMU's sandbox spawn=allow) */
	struct device_args devices; /* each device type's vm.create argument */
};

/* What every view records of a VM: its configuration and two counters. */
struct vm_record {
	struct vm_config cfg;
	uint64_t created_usec;
	unsigned updates; /* finished updates, any result */
};

enum vm_view {
	/* A record of registry.json: an optional field is left out when empty. */
	VM_VIEW_REGISTRY = 1 << 0,
	/* The "config" of a checkpoint's meta.json, which keeps the name beside
	 * it ("vm"): likewise. */
	VM_VIEW_CHECKPOINT = 1 << 1,
	/* vm.status and vm.list: every field, null when empty (false for a flag). */
	VM_VIEW_STATUS = 1 << 2,
};

void vm_config_done(struct vm_config *cfg);
static inline void vm_record_done(struct vm_record *rec)
{
	vm_config_done(&rec->cfg);
}

/* Add rec's fields of view to o, in the table's order. */
void vm_record_to_json(const struct vm_record *rec, enum vm_view view, json_object *o);

/* Read a record of view from o into *ret: every field of the view that o has
 * must have the table's type and range, a required one must be there, and
 * the name must be a valid VM name. A view that does not carry the name
 * takes name (else name is ignored). Returns 0, or -EINVAL with why saying
 * which field and what is wrong with it (and *ret untouched), or -ENOMEM. */
int vm_record_from_json(json_object *o, enum vm_view view, const char *name, struct vm_record *ret,
			char *why, size_t size);
