/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/macro.h"
#include "daemon/devices/devices.h"
#include "kvm/qemu.h"

/* The device types. Their order is the order of a VMM's fds and of its
 * command line within each place (devices_layout()): a new type goes at
 * the end, so that no VM's existing fd numbers or PCI slots move. */
extern const struct device_type device_ram, device_console, device_tap, device_disk;

static const struct device_type *const types[] = {
	&device_ram,
	&device_console,
	&device_tap,
	&device_disk,
};

_Static_assert(ELEMENTSOF(types) <= DEVICE_TYPES_MAX, "raise DEVICE_TYPES_MAX");

const struct device_type *device_type_nth(size_t i)
{
	return i < ELEMENTSOF(types) ? types[i] : NULL;
}

size_t device_types_count(void)
{
	return ELEMENTSOF(types);
}

const struct device_type *device_type_find(const char *id)
{
	for (size_t i = 0; id && i < ELEMENTSOF(types); i++)
		if (streq(types[i]->id, id))
			return types[i];
	return NULL;
}

/* Digits, at least one. */
static bool all_digits(const char *s, size_t n)
{
	return n > 0 && strspn(s, "0123456789") == n;
}

const struct device_type *device_type_of_fd(const char *id)
{
	for (size_t i = 0; id && i < ELEMENTSOF(types); i++) {
		const struct device_type *t = types[i];
		size_t n = strlen(t->id);
		const char *rest = id + n, *dot;

		if (strncmp(id, t->id, n) != 0)
			continue;
		if (!t->nfds) {
			if (!*rest)
				return t;
			continue;
		}
		/* ID<digits> or ID<digits>.<digits> */
		dot = strchr(rest, '.');
		if (dot ? all_digits(rest, (size_t)(dot - rest)) &&
			      all_digits(dot + 1, strlen(dot + 1))
			: all_digits(rest, strlen(rest)))
			return t;
	}
	return NULL;
}

bool device_id_reserved(const char *name)
{
	return device_type_find(name) || device_type_of_fd(name);
}

bool device_present(const struct device_args *args, size_t i)
{
	return i < ELEMENTSOF(types) && (!types[i]->param || args->arg[i]);
}

void device_args_done(struct device_args *args)
{
	for (size_t i = 0; i < DEVICE_TYPES_MAX; i++)
		json_object_put(args->arg[i]);
	*args = (struct device_args){};
}

const char *devices_refused(const struct device_args *args, const char **ret_param, char *why,
			    size_t size)
{
	for (size_t i = 0; i < ELEMENTSOF(types); i++)
		if (args->arg[i] && types[i]->check &&
		    types[i]->check(args->arg[i], why, size) < 0) {
			*ret_param = types[i]->param;
			return why;
		}
	return NULL;
}

int devices_prepare(struct device_args *args, const struct creds *peer, const char **ret_param,
		    char *why, size_t size)
{
	for (size_t i = 0; i < ELEMENTSOF(types); i++) {
		int r;

		if (!args->arg[i] || !types[i]->prepare)
			continue;
		r = types[i]->prepare(args->arg[i], peer, why, size);
		if (r < 0) {
			*ret_param = types[i]->param;
			return r;
		}
	}
	return 0;
}

void devices_to_json(const struct device_args *args, bool nulls, json_object *o)
{
	for (size_t i = 0; i < ELEMENTSOF(types); i++) {
		if (!types[i]->param || (!args->arg[i] && !nulls))
			continue;
		json_object_object_add(o, types[i]->param, json_object_get(args->arg[i]));
	}
}

static json_type param_type(const struct device_type *t)
{
	return t->param_type ? t->param_type : json_type_string;
}

const char *device_type_param_text(const char *param)
{
	for (size_t i = 0; param && i < ELEMENTSOF(types); i++)
		if (types[i]->param && streq(types[i]->param, param))
			return param_type(types[i]) == json_type_array ? "a list" : "a string";
	return "?";
}

int devices_from_json(json_object *o, struct device_args *ret, const char **ret_param)
{
	struct device_args args = {};

	for (size_t i = 0; i < ELEMENTSOF(types); i++) {
		json_object *v;

		/* Absent or null (vm.status writes null): not given. */
		if (!types[i]->param || !json_object_object_get_ex(o, types[i]->param, &v) || !v)
			continue;
		if (!json_object_is_type(v, param_type(types[i]))) {
			device_args_done(&args);
			*ret_param = types[i]->param;
			return -EINVAL;
		}
		/* A copy: the type may complete it (prepare()), and o is not ours. */
		if (json_object_deep_copy(v, &args.arg[i], NULL) < 0) {
			device_args_done(&args);
			return -ENOMEM;
		}
	}
	*ret = args;
	return 0;
}

static size_t type_nfds(size_t i, const struct device_args *args)
{
	if (!device_present(args, i))
		return 0;
	return types[i]->nfds ? types[i]->nfds(args->arg[i]) : 1;
}

size_t devices_fds(const struct device_args *args, struct device_fd out[DEVICE_FDS_MAX])
{
	size_t n = 0;

	for (size_t i = 0; i < ELEMENTSOF(types); i++) {
		size_t m = type_nfds(i, args);

		for (size_t k = 0; k < m && n < DEVICE_FDS_MAX; k++, n++) {
			out[n] = (struct device_fd){ .type = i, .k = k };
			if (types[i]->fd_id)
				types[i]->fd_id(args->arg[i], k, out[n].id, sizeof(out[n].id));
			else
				snprintf(out[n].id, sizeof(out[n].id), "%s", types[i]->id);
		}
	}
	return n;
}

void devices_layout(const struct device_args *args, struct device_layout *ret)
{
	struct device_layout l = { .next = QEMU_CHILD_FD_BASE };
	size_t total = 0;

	for (size_t i = 0; i < DEVICE_TYPES_MAX; i++)
		l.first[i] = -1;
	for (size_t i = 0; i < ELEMENTSOF(types); i++)
		if (!types[i]->param) {
			l.first[i] = l.next;
			l.count[i] = 1;
			l.next++;
			total++;
		}
	l.qmp = l.next++;
	for (size_t i = 0; i < ELEMENTSOF(types); i++) {
		size_t m = types[i]->param ? type_nfds(i, args) : 0;

		if (m > DEVICE_FDS_MAX - total)
			m = DEVICE_FDS_MAX - total; /* vm.create refused more */
		if (!m)
			continue;
		l.first[i] = l.next;
		l.count[i] = m;
		l.next += (int)m;
		total += m;
	}
	*ret = l;
}

int device_fd_child(const struct device_layout *l, const struct device_fd *f)
{
	if (f->type >= DEVICE_TYPES_MAX || l->first[f->type] < 0 || f->k >= l->count[f->type])
		return -1;
	return l->first[f->type] + (int)f->k;
}

int devices_qemu_args(const struct device_args *args, const struct device_layout *layout,
		      struct qemu_config *qc)
{
	for (size_t i = 0; i < ELEMENTSOF(types); i++) {
		int child[DEVICE_FDS_MAX];
		size_t n = layout->count[i];
		int r;

		if (layout->first[i] < 0 || n == 0)
			continue;
		if (layout->first[i] < QEMU_CHILD_FD_BASE || n > DEVICE_FDS_MAX)
			return -EINVAL; /* the VMM's stdio, or its log */
		for (size_t k = 0; k < n; k++)
			child[k] = layout->first[i] + (int)k;
		r = types[i]->qemu_args(args->arg[i], child, n, qc);
		if (r < 0)
			return r;
	}
	return 0;
}

bool devices_carried(const struct device_args *args, unsigned how, char *why, size_t size)
{
	for (size_t i = 0; i < ELEMENTSOF(types); i++)
		if (device_present(args, i) && !(types[i]->carry & how)) {
			snprintf(why, size, "%s cannot be carried that way", types[i]->what);
			return false;
		}
	return true;
}
