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
static int hold(struct vm *vm, const struct device_type *t, const char *id, int fd)
{
	int r = own(vm, t, fd);

	if (r >= 0)
		r = memstore_put(vm->d->store, vm->cfg.name, id, t->custody, fd);
	if (r < 0) {
		close(fd);
		return r;
	}
	fdstore_add(vm->d, vm->cfg.name, id, fd);
	return 0;
}

/* Each type's fds of vm are where f lists them: the first at from[i]. */
static void type_starts(const struct device_fd *f, size_t n, size_t from[DEVICE_TYPES_MAX])
{
	for (size_t i = 0; i < DEVICE_TYPES_MAX; i++)
		from[i] = n;
	for (size_t j = n; j-- > 0;)
		from[f[j].type] = j;
}

int devices_acquire(struct vm *vm, const char **ret_what)
{
	struct device_fd f[DEVICE_FDS_MAX];
	int fds[DEVICE_FDS_MAX];
	size_t n = devices_fds(&vm->cfg.devices, f), from[DEVICE_TYPES_MAX], j;
	int r = 0;

	for (j = 0; j < n; j++)
		fds[j] = -EBADF;
	type_starts(f, n, from);
	for (size_t i = 0; i < device_types_count() && r >= 0; i++) {
		const struct device_type *t = device_type_nth(i);
		size_t m = 0;

		for (j = from[i]; j < n && f[j].type == i; j++)
			m++;
		if (!m)
			continue;
		*ret_what = t->what;
		r = t->open(vm, vm->cfg.devices.arg[i], &fds[from[i]], m);
	}
	if (r >= 0)
		*ret_what = "its resources";
	for (j = 0; j < n; j++) {
		if (fds[j] < 0)
			continue;
		if (r < 0)
			close(fds[j]);
		else
			r = hold(vm, device_type_nth(f[j].type), f[j].id, fds[j]);
	}
	return r;
}

int devices_reacquire(struct vm *vm, bool fresh_only, const char **ret_what)
{
	struct device_fd f[DEVICE_FDS_MAX];
	size_t n = devices_fds(&vm->cfg.devices, f), from[DEVICE_TYPES_MAX];

	type_starts(f, n, from);
	for (size_t i = 0; i < device_types_count(); i++) {
		const struct device_type *t = device_type_nth(i);
		const memstore_entry *e;
		int fds[DEVICE_FDS_MAX];
		size_t m = 0, held = 0;
		int r;

		for (size_t j = from[i]; j < n && f[j].type == i; j++, m++)
			if (memstore_get(vm->d->store, vm->cfg.name, f[j].id, &e) >= 0)
				held++;
		/* A type's fds are reopened together, or not at all. */
		if (!t->reopen || !m || held == m || (fresh_only && !t->fresh_per_vmm))
			continue;
		for (size_t j = from[i]; j < from[i] + m; j++) {
			fdstore_remove(vm->d, vm->cfg.name, f[j].id);
			(void)memstore_remove(vm->d->store, vm->cfg.name, f[j].id);
		}
		*ret_what = t->what;
		r = t->reopen(vm, vm->cfg.devices.arg[i], fds, m);
		if (r < 0)
			return r; /* none was opened */
		for (size_t k = 0; k < m; k++) {
			if (r >= 0)
				r = hold(vm, t, f[from[i] + k].id, fds[k]);
			else
				close(fds[k]);
		}
		if (r < 0)
			return r;
	}
	return 0;
}

/* The held fds of type i of vm, in order: their number, or 0 when one is
 * not held. */
static size_t held_of_type(struct vm *vm, size_t i, int *fds)
{
	struct device_fd f[DEVICE_FDS_MAX];
	size_t n = devices_fds(&vm->cfg.devices, f), m = 0;

	for (size_t j = 0; j < n; j++) {
		const memstore_entry *e;

		if (f[j].type != i)
			continue;
		if (memstore_get(vm->d->store, vm->cfg.name, f[j].id, &e) < 0)
			return 0;
		fds[m++] = e->fd;
	}
	return m;
}

void devices_saved(struct vm *vm, bool stamp)
{
	for (size_t i = 0; i < device_types_count(); i++) {
		const struct device_type *t = device_type_nth(i);
		int fds[DEVICE_FDS_MAX];
		size_t m;

		if (!t->saved || !(m = held_of_type(vm, i, fds)))
			continue;
		(void)t->saved(vm->cfg.devices.arg[i], fds, m, stamp);
	}
}

int devices_restoring(struct vm *vm, char *why, size_t size)
{
	for (size_t i = 0; i < device_types_count(); i++) {
		const struct device_type *t = device_type_nth(i);
		int fds[DEVICE_FDS_MAX], r;
		size_t m;

		if (!t->restoring || !(m = held_of_type(vm, i, fds)))
			continue;
		r = t->restoring(vm->cfg.devices.arg[i], fds, m, why, size);
		if (r < 0)
			return r;
	}
	return 0;
}

int devices_own(struct vm *vm)
{
	struct device_fd f[DEVICE_FDS_MAX];
	size_t n = devices_fds(&vm->cfg.devices, f);

	for (size_t j = 0; vm->cfg.uid > 0 && j < n; j++) {
		const struct device_type *t = device_type_nth(f[j].type);
		const memstore_entry *e;
		int r;

		if (memstore_get(vm->d->store, vm->cfg.name, f[j].id, &e) >= 0 &&
		    (r = own(vm, t, e->fd)) < 0)
			return r;
	}
	return 0;
}
