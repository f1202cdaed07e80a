/* SPDX-License-Identifier: MIT */
/* A VM's devices into custody (memstore) and systemd's fd store. */
#include <errno.h>
#include <unistd.h>

#include "common/macro.h"
#include "daemon/devices/devices.h"
#include "daemon/core/fdstore.h"
#include "daemon/core/vm.h"

/* A device its VMM opens anew (owned_by_vm) belongs to the VM's uid. */
static int own(const struct vm *vm, const struct device_type *t, int fd)
{
	if (t->owned_by_vm && vm->cfg.uid > 0 && fchown(fd, vm->cfg.uid, vm->cfg.uid) < 0)
		return -errno;
	return 0;
}

/* Into the fd store as soon as it is held, not at shutdown: a crash must
 * not lose it. Takes fd, also on failure. */
static int hold(struct vm *vm, const struct device_type *t, int fd)
{
	int r = own(vm, t, fd);

	if (r >= 0)
		r = memstore_put(vm->d->store, vm->cfg.name, t->id, t->custody, fd);
	if (r < 0) {
		close(fd);
		return r;
	}
	fdstore_add(vm->d, vm->cfg.name, t->id, fd);
	return 0;
}

int devices_acquire(struct vm *vm, const char **ret_what)
{
	int fds[DEVICE_TYPES_MAX];
	size_t n = device_types_count(), i;
	int r = 0;

	for (i = 0; i < n; i++)
		fds[i] = -EBADF;
	for (i = 0; i < n && r >= 0; i++) {
		const struct device_type *t = device_type_nth(i);

		if (!device_present(&vm->cfg.devices, i))
			continue;
		*ret_what = t->what;
		r = t->open(vm, vm->cfg.devices.arg[i], &fds[i]);
	}
	if (r >= 0)
		*ret_what = "its resources";
	for (i = 0; i < n; i++) {
		if (fds[i] < 0)
			continue;
		if (r < 0)
			close(fds[i]);
		else
			r = hold(vm, device_type_nth(i), fds[i]);
	}
	return r;
}

int devices_reacquire(struct vm *vm, const char **ret_what)
{
	for (size_t i = 0; i < device_types_count(); i++) {
		const struct device_type *t = device_type_nth(i);
		const memstore_entry *e;
		int fd = -EBADF, r;

		if (!t->reopen || !device_present(&vm->cfg.devices, i) ||
		    memstore_get(vm->d->store, vm->cfg.name, t->id, &e) >= 0)
			continue;
		*ret_what = t->what;
		r = t->reopen(vm, vm->cfg.devices.arg[i], &fd);
		if (r >= 0)
			r = hold(vm, t, fd);
		if (r < 0)
			return r;
	}
	return 0;
}

int devices_own(struct vm *vm)
{
	for (size_t i = 0; vm->cfg.uid > 0 && i < device_types_count(); i++) {
		const struct device_type *t = device_type_nth(i);
		const memstore_entry *e;

		int r;

		if (memstore_get(vm->d->store, vm->cfg.name, t->id, &e) >= 0 &&
		    (r = own(vm, t, e->fd)) < 0)
			return r;
	}
	return 0;
}
