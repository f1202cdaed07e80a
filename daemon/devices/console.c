/* SPDX-License-Identifier: MIT */
/*
 * The serial console: the VM's console log (VM_CONSOLE_LOG in its
 * directory), which cprd opens O_APPEND and holds, and which each VMM
 * opens anew through /proc/self/fd with append=on, so that a successor
 * never truncates what its predecessor wrote.
 */
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

#include "common/macro.h"
#include "daemon/devices/devices.h"
#include "daemon/core/vm.h"
#include "kvm/qemu.h"

static int console_open_flags(const struct vm *vm, int flags, int *ret_fd)
{
	_cleanup_close_ int fd = openat(
	    vm->dir_fd, VM_CONSOLE_LOG,
	    O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK | flags, 0640);

	if (fd < 0)
		return -errno;
	*ret_fd = TAKE_FD(fd);
	return 0;
}

/* A new VM starts a new log. */
static int console_open(const struct vm *vm, json_object *arg, int *fds, size_t n)
{
	return console_open_flags(vm, O_TRUNC, &fds[0]);
}

/* The guest goes on: so does its log. */
static int console_reopen(const struct vm *vm, json_object *arg, int *fds, size_t n)
{
	return console_open_flags(vm, 0, &fds[0]);
}

static int console_qemu_args(json_object *arg, const int *child, size_t n, struct qemu_config *qc)
{
	struct qemu_args *a = &qc->devices[QEMU_PLACE_SERIAL];

	qemu_args_add(a, "-chardev");
	qemu_args_addf(a, "file,id=con0,path=/proc/self/fd/%d,append=on", child[0]);
	qemu_args_add(a, "-serial");
	qemu_args_add(a, "chardev:con0");
	return a->error;
}

const struct device_type device_console = {
	.kind = "serial",
	.id = "console",
	.what = "its console log",
	.custody = MEMSTORE_KIND_FILE,
	.owned_by_vm = true,
	.open = console_open,
	.reopen = console_reopen,
	.qemu_args = console_qemu_args,
	.carry = DEVICE_BY_ALL,
};
