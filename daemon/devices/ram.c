/* SPDX-License-Identifier: MIT */
/*
 * Guest RAM: a sealed memfd cprd creates and holds, which every VMM of the
 * VM maps. It is what an update keeps in place; a checkpoint writes it to
 * its image and a restore fills a new one (checkpoint.c), so it is never
 * reopened.
 */
#include <errno.h>
#include <inttypes.h>

#include "daemon/devices/devices.h"
#include "daemon/core/vm.h"
#include "kvm/qemu.h"

static int ram_open(const struct vm *vm, json_object *arg, int *fds, size_t n)
{
	return memstore_region_create(DEVICE_RAM_ID, vm->cfg.memory_bytes, 0, &fds[0]);
}

/* Reopened through /proc so that QEMU maps the very same pages; share=on
 * lets a successor map them too and lets migration skip them
 * (x-ignore-shared). The machine names it as its memory backend. */
static int ram_qemu_args(json_object *arg, const int *child, size_t n, struct qemu_config *qc)
{
	struct qemu_args *a = &qc->devices[QEMU_PLACE_MEMORY];

	qemu_args_add(a, "-object");
	qemu_args_addf(a,
		       "memory-backend-file,id=" DEVICE_RAM_ID ",size=%" PRIu64
		       "M,mem-path=/proc/self/fd/%d,share=on",
		       qc->memory_bytes >> 20, child[0]);
	qc->memory_backend = DEVICE_RAM_ID;
	return a->error;
}

const struct device_type device_ram = {
	.kind = "memory",
	.id = DEVICE_RAM_ID,
	.what = "its memory",
	.custody = MEMSTORE_KIND_MEMFD,
	.open = ram_open,
	.qemu_args = ram_qemu_args,
	.carry = DEVICE_BY_ALL,
};
