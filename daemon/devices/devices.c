/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/macro.h"
#include "daemon/devices/devices.h"
#include "kvm/qemu.h"

/* The device types. Their order is the order of a VMM's fds and of its
 * command line within each place (devices_layout()): a new type goes at
 * the end, so that no VM's existing fd numbers or PCI slots move. */
extern const struct device_type device_ram, device_console, device_tap;

static const struct device_type *const types[] = {
	&device_ram,
	&device_console,
	&device_tap,
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

bool device_id_reserved(const char *name)
{
	return device_type_find(name) != NULL;
}

bool device_present(const struct device_args *args, size_t i)
{
	return i < ELEMENTSOF(types) && (!types[i]->param || args->arg[i]);
}

void device_args_done(struct device_args *args)
{
	for (size_t i = 0; i < DEVICE_TYPES_MAX; i++)
		free(args->arg[i]);
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

void devices_to_json(const struct device_args *args, bool nulls, json_object *o)
{
	for (size_t i = 0; i < ELEMENTSOF(types); i++) {
		if (!types[i]->param || (!args->arg[i] && !nulls))
			continue;
		json_object_object_add(o, types[i]->param,
				       args->arg[i] ? json_object_new_string(args->arg[i]) : NULL);
	}
}

int devices_from_json(json_object *o, struct device_args *ret, const char **ret_param)
{
	struct device_args args = {};

	for (size_t i = 0; i < ELEMENTSOF(types); i++) {
		json_object *v;

		/* Absent or null (vm.status writes null): not given. */
		if (!types[i]->param || !json_object_object_get_ex(o, types[i]->param, &v) || !v)
			continue;
		if (!json_object_is_type(v, json_type_string)) {
			device_args_done(&args);
			*ret_param = types[i]->param;
			return -EINVAL;
		}
		args.arg[i] = strdup(json_object_get_string(v));
		if (!args.arg[i]) {
			device_args_done(&args);
			return -ENOMEM;
		}
	}
	*ret = args;
	return 0;
}

void devices_layout(const bool present[DEVICE_TYPES_MAX], struct device_layout *ret)
{
	struct device_layout l = { .next = QEMU_CHILD_FD_BASE };

	for (size_t i = 0; i < DEVICE_TYPES_MAX; i++)
		l.child[i] = -1;
	for (size_t i = 0; i < ELEMENTSOF(types); i++)
		if (!types[i]->param)
			l.child[i] = l.next++;
	l.qmp = l.next++;
	for (size_t i = 0; i < ELEMENTSOF(types); i++)
		if (types[i]->param && present[i])
			l.child[i] = l.next++;
	*ret = l;
}

int devices_qemu_args(const struct device_args *args, const struct device_layout *layout,
		      struct qemu_config *qc)
{
	for (size_t i = 0; i < ELEMENTSOF(types); i++) {
		int r;

		if (layout->child[i] < 0)
			continue;
		if (layout->child[i] < QEMU_CHILD_FD_BASE)
			return -EINVAL; /* the VMM's stdio, or its log */
		r = types[i]->qemu_args(args->arg[i], layout->child[i], qc);
		if (r < 0)
			return r;
	}
	return 0;
}

bool devices_carried(const struct device_args *args, unsigned how, char *why, size_t size)
{
	for (size_t i = 0; i < ELEMENTSOF(types); i++)
		if (device_present(args, i) && !(types[i]->carry & how)) {
			snprintf(why, size, "its %s device %s cannot be carried that way",
				 types[i]->kind, types[i]->id);
			return false;
		}
	return true;
}
