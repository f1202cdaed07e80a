/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/macro.h"
#include "daemon/devices/devices.h"
#include "daemon/core/vmrecord.h"
#include "memstore/memstore.h"

enum field_type {
	FIELD_STRING,  /* char *, NULL when empty */
	FIELD_U64,     /* uint64_t */
	FIELD_UINT,    /* unsigned (and uid_t) */
	FIELD_BOOL,    /* bool, false when empty */
	FIELD_FILE_ID, /* struct file_id, "DEV:INO" */
	FIELD_DEVICES, /* struct device_args: each device type's own key */
};

/* A number below min is empty: an optional one is then not recorded. */
struct field {
	const char *key;
	enum field_type type;
	size_t offset; /* in struct vm_record */
	unsigned views;
	bool required;
	uint64_t min, max;
};

#define REG VM_VIEW_REGISTRY
#define CKPT VM_VIEW_CHECKPOINT
#define STATUS VM_VIEW_STATUS
#define ALL (REG | CKPT | STATUS)
#define REC(member) offsetof(struct vm_record, member)
#define CFG(member) REC(cfg.member)

/* The order is the order in which the views write them. */
static const struct field fields[] = {
	/* A checkpoint's meta.json keeps the name beside its config. */
	{ "name", FIELD_STRING, CFG(name), REG | STATUS, true, 0, 0 },
	{ "vmm", FIELD_STRING, CFG(vmm), ALL, true, 0, 0 },
	{ "kernel", FIELD_STRING, CFG(kernel), ALL, true, 0, 0 },
	{ "initrd", FIELD_STRING, CFG(initrd), ALL, false, 0, 0 },
	{ "kernel_id", FIELD_FILE_ID, CFG(kernel_id), REG | CKPT, false, 0, 0 },
	{ "initrd_id", FIELD_FILE_ID, CFG(initrd_id), REG | CKPT, false, 0, 0 },
	{ "append", FIELD_STRING, CFG(append), ALL, false, 0, 0 },
	/* The device types' parameters (devices.c), "tap" today. */
	{ "(devices)", FIELD_DEVICES, CFG(devices), ALL, false, 0, 0 },
	{ "machine", FIELD_STRING, CFG(machine), ALL, true, 0, 0 },
	{ "machine_alias", FIELD_STRING, CFG(machine_alias), REG | STATUS, false, 0, 0 },
	{ "cpu", FIELD_STRING, CFG(cpu), ALL, false, 0, 0 },
	{ "memory_bytes", FIELD_U64, CFG(memory_bytes), ALL, true, 1, INT64_MAX },
	{ "vcpus", FIELD_UINT, CFG(vcpus), ALL, true, 1, VM_MAX_VCPUS },
	/* Kept as recorded even when --vmm-ids changed since: the VMM that
	 * runs now, and its successor, are that uid. 0, not recorded: none
	 * chosen yet (a VM of a cprd from before confinement). */
	{ "uid", FIELD_UINT, CFG(uid), REG | STATUS, false, 1, UINT32_MAX - 1 },
	{ "cpr_exec", FIELD_BOOL, CFG(cpr_exec), ALL, false, 0, 0 },
	{ "created_usec", FIELD_U64, REC(created_usec), ALL, false, 0, INT64_MAX },
	{ "updates", FIELD_UINT, REC(updates), ALL, false, 0, INT32_MAX },
};

_Static_assert(sizeof(uid_t) == sizeof(unsigned), "uid_t is read as an unsigned");

void vm_config_done(struct vm_config *cfg)
{
	free(cfg->name);
	free(cfg->vmm);
	free(cfg->kernel);
	free(cfg->initrd);
	free(cfg->append);
	device_args_done(&cfg->devices);
	free(cfg->machine);
	free(cfg->machine_alias);
	free(cfg->cpu);
	*cfg = (struct vm_config){};
}

/* ---- writing ---- */

static uint64_t number_of(const struct field *f, const void *p)
{
	return f->type == FIELD_U64 ? *(const uint64_t *)p : *(const unsigned *)p;
}

static bool is_empty(const struct field *f, const void *p)
{
	switch (f->type) {
	case FIELD_STRING:
		return !*(char *const *)p;
	case FIELD_U64:
	case FIELD_UINT:
		return number_of(f, p) < f->min;
	case FIELD_BOOL:
		return !*(const bool *)p;
	case FIELD_FILE_ID:
		return !((const struct file_id *)p)->set;
	case FIELD_DEVICES:
		break;
	}
	return true;
}

static json_object *value_of(const struct field *f, const void *p)
{
	const struct file_id *id = p;
	char buf[48];

	switch (f->type) {
	case FIELD_STRING:
		return json_object_new_string(*(char *const *)p);
	case FIELD_U64:
	case FIELD_UINT:
		return json_object_new_int64((int64_t)number_of(f, p));
	case FIELD_BOOL:
		return json_object_new_boolean(*(const bool *)p);
	case FIELD_FILE_ID:
		/* As text: dev_t and ino_t are 64-bit unsigned, beyond what a
		 * JSON number keeps exactly everywhere. */
		snprintf(buf, sizeof(buf), "%ju:%ju", (uintmax_t)id->dev, (uintmax_t)id->ino);
		return json_object_new_string(buf);
	case FIELD_DEVICES:
		break;
	}
	return NULL;
}

void vm_record_to_json(const struct vm_record *rec, enum vm_view view, json_object *o)
{
	for (size_t i = 0; i < ELEMENTSOF(fields); i++) {
		const struct field *f = &fields[i];
		const void *p = (const char *)rec + f->offset;
		bool empty = is_empty(f, p);

		if (!(f->views & view))
			continue;
		if (f->type == FIELD_DEVICES) {
			devices_to_json(p, view == VM_VIEW_STATUS, o);
			continue;
		}
		if (empty && !f->required && view != VM_VIEW_STATUS)
			continue;
		/* Empty in vm.status, or required but missing: null. */
		json_object_object_add(o, f->key,
				       empty && f->type != FIELD_BOOL ? NULL : value_of(f, p));
	}
}

/* ---- reading ---- */

static int parse_file_id(const char *s, struct file_id *ret)
{
	uintmax_t dev, ino;
	char *end;

	if (*s < '0' || *s > '9')
		return -EINVAL;
	errno = 0;
	dev = strtoumax(s, &end, 10);
	if (errno || *end != ':' || end[1] < '0' || end[1] > '9')
		return -EINVAL;
	ino = strtoumax(end + 1, &end, 10);
	if (errno || *end || dev != (dev_t)dev || ino != (ino_t)ino)
		return -EINVAL;
	*ret = (struct file_id){ .dev = (dev_t)dev, .ino = (ino_t)ino, .set = true };
	return 0;
}

static const char *type_name(enum field_type t)
{
	switch (t) {
	case FIELD_STRING:
		return "a string";
	case FIELD_U64:
	case FIELD_UINT:
		return "an integer";
	case FIELD_BOOL:
		return "true or false";
	case FIELD_FILE_ID:
		return "a string DEV:INO";
	case FIELD_DEVICES:
		break;
	}
	return "?";
}

static int read_field(const struct field *f, json_object *v, void *p, char *why, size_t size)
{
	int64_t n;

	switch (f->type) {
	case FIELD_STRING:
		if (!json_object_is_type(v, json_type_string))
			break;
		*(char **)p = strdup(json_object_get_string(v));
		return *(char **)p ? 0 : -ENOMEM;
	case FIELD_U64:
	case FIELD_UINT:
		if (!json_object_is_type(v, json_type_int))
			break;
		n = json_object_get_int64(v);
		if (n < 0 || (uint64_t)n < f->min || (uint64_t)n > f->max) {
			snprintf(why, size,
				 "%s %" PRId64 " is out of range (%" PRIu64 "-%" PRIu64 ")", f->key,
				 n, f->min, f->max);
			return -EINVAL;
		}
		if (f->type == FIELD_U64)
			*(uint64_t *)p = (uint64_t)n;
		else
			*(unsigned *)p = (unsigned)n;
		return 0;
	case FIELD_BOOL:
		if (!json_object_is_type(v, json_type_boolean))
			break;
		*(bool *)p = json_object_get_boolean(v);
		return 0;
	case FIELD_FILE_ID:
		if (!json_object_is_type(v, json_type_string) ||
		    parse_file_id(json_object_get_string(v), p) < 0)
			break;
		return 0;
	case FIELD_DEVICES:
		return 0; /* read_fields() reads them */
	}
	snprintf(why, size, "%s must be %s", f->key, type_name(f->type));
	return -EINVAL;
}

static int read_fields(json_object *o, enum vm_view view, struct vm_record *rec, char *why,
		       size_t size)
{
	int r;

	if (!json_object_is_type(o, json_type_object)) {
		snprintf(why, size, "not a JSON object");
		return -EINVAL;
	}
	for (size_t i = 0; i < ELEMENTSOF(fields); i++) {
		const struct field *f = &fields[i];
		json_object *v = json_object_object_get(o, f->key);

		if (!(f->views & view))
			continue;
		if (f->type == FIELD_DEVICES) {
			const char *param = NULL;

			struct device_args *args = (struct device_args *)((char *)rec + f->offset);
			char bad[200];

			r = devices_from_json(o, args, &param);
			if (r == -EINVAL)
				snprintf(why, size, "%s must be %s", param,
					 device_type_param_text(param));
			if (r < 0)
				return r;
			/* What vm.create would refuse is a damaged record. */
			if (devices_refused(args, &param, bad, sizeof(bad))) {
				snprintf(why, size, "%s: %s", param, bad);
				return -EINVAL;
			}
			continue;
		}
		/* Absent or null (what vm.status writes for an empty field). */
		if (!v) {
			if (f->required) {
				snprintf(why, size, "%s is missing", f->key);
				return -EINVAL;
			}
			continue;
		}
		r = read_field(f, v, (char *)rec + f->offset, why, size);
		if (r < 0)
			return r;
	}
	return 0;
}

int vm_record_from_json(json_object *o, enum vm_view view, const char *name, struct vm_record *ret,
			char *why, size_t size)
{
	struct vm_record rec = {};
	int r;

	r = read_fields(o, view, &rec, why, size);
	if (r >= 0 && !rec.cfg.name) {
		if (!name) {
			snprintf(why, size, "name is missing");
			r = -EINVAL;
		} else if (!(rec.cfg.name = strdup(name)))
			r = -ENOMEM;
	}
	if (r >= 0 && !memstore_name_is_valid(rec.cfg.name)) {
		snprintf(why, size, "invalid VM name '%.64s'", rec.cfg.name);
		r = -EINVAL;
	}
	if (r == -ENOMEM)
		snprintf(why, size, "out of memory");
	if (r < 0) {
		vm_config_done(&rec.cfg);
		return r;
	}
	*ret = rec;
	return 0;
}
