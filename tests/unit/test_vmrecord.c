/* SPDX-License-Identifier: MIT */
/* The VM record's codec (daemon/core/vmrecord.c): records of the registry and of
 * a checkpoint's meta.json, as this release and the previous one (2371a41)
 * wrote them, read and written back against golden files; damaged records
 * refused with a reason. */
#include <check.h>
#include <errno.h>

#include "common/json.h"
#include "daemon/devices/devices.h"
#include "daemon/core/vmrecord.h"
#include "tests/unit/golden.h"

#define PRINT (JSON_C_TO_STRING_PRETTY | JSON_C_TO_STRING_NOSLASHESCAPE)

struct golden_case {
	const char *input;    /* in golden/records/ */
	enum vm_view read_as; /* a checkpoint: its meta.json, the config in it */
	enum vm_view write_as;
	const char *output; /* in golden/records/ */
};

static const struct golden_case cases[] = {
	{ "registry-2371a41-full.json", VM_VIEW_REGISTRY, VM_VIEW_REGISTRY,
	  "registry-2371a41-full.registry.out" },
	{ "registry-2371a41-minimal.json", VM_VIEW_REGISTRY, VM_VIEW_REGISTRY,
	  "registry-2371a41-minimal.registry.out" },
	{ "registry-current-full.json", VM_VIEW_REGISTRY, VM_VIEW_REGISTRY,
	  "registry-current-full.registry.out" },
	{ "registry-current-full.json", VM_VIEW_REGISTRY, VM_VIEW_STATUS,
	  "registry-current-full.status.out" },
	{ "registry-2371a41-minimal.json", VM_VIEW_REGISTRY, VM_VIEW_STATUS,
	  "registry-2371a41-minimal.status.out" },
	{ "checkpoint-2371a41.json", VM_VIEW_CHECKPOINT, VM_VIEW_CHECKPOINT,
	  "checkpoint-2371a41.checkpoint.out" },
	{ "checkpoint-current.json", VM_VIEW_CHECKPOINT, VM_VIEW_CHECKPOINT,
	  "checkpoint-current.checkpoint.out" },
	{ "registry-current-disks.json", VM_VIEW_REGISTRY, VM_VIEW_REGISTRY,
	  "registry-current-disks.registry.out" },
	{ "registry-current-disks.json", VM_VIEW_REGISTRY, VM_VIEW_STATUS,
	  "registry-current-disks.status.out" },
};

static json_object *parse_golden(const char *name)
{
	_cleanup_free_ char *path = NULL, *text = NULL;
	json_object *o;

	ck_assert_int_ge(asprintf(&path, "records/%s", name), 0);
	text = golden_read(path);
	ck_assert_msg(text, "%s/%s is missing", GOLDEN_DIR, path);
	o = json_tokener_parse(text);
	ck_assert_msg(o, "%s/%s is not JSON", GOLDEN_DIR, path);
	return o;
}

/* What a view's reader is given: a checkpoint's config, named beside it. */
static int read_record(json_object *in, enum vm_view view, struct vm_record *rec, char *why,
		       size_t size)
{
	if (view == VM_VIEW_CHECKPOINT)
		return vm_record_from_json(json_object_object_get(in, "config"), view,
					   json_object_get_string(json_object_object_get(in, "vm")),
					   rec, why, size);
	return vm_record_from_json(in, view, NULL, rec, why, size);
}

/* Every key out has, in has too, with the same value, in the same order:
 * the writer keeps the keys and shapes that the release before wrote. */
static void assert_kept(json_object *in, json_object *out)
{
	_cleanup_json_ json_object *kept = json_object_new_object();

	json_object_object_foreach(in, k, v)
	{
		if (json_object_object_get_ex(out, k, NULL))
			json_object_object_add(kept, k, json_object_get(v));
	}
	ck_assert_str_eq(json_object_to_json_string_ext(kept, PRINT),
			 json_object_to_json_string_ext(out, PRINT));
}

/* The argument a record gave the device of type id, or NULL. */
static const char *device_arg(const struct device_args *a, const char *id)
{
	for (size_t i = 0; i < device_types_count(); i++)
		if (strcmp(device_type_nth(i)->id, id) == 0)
			return a->arg[i] ? json_object_get_string(a->arg[i]) : NULL;
	return NULL;
}

START_TEST(golden_records_read_and_write_back)
{
	const struct golden_case *c = &cases[_i];
	_cleanup_json_ json_object *in = parse_golden(c->input), *out = json_object_new_object();
	_cleanup_(vm_record_done) struct vm_record rec = {};
	_cleanup_free_ char *text = NULL, *path = NULL;
	char why[256] = "";

	ck_assert_msg(read_record(in, c->read_as, &rec, why, sizeof(why)) == 0, "%s: %s", c->input,
		      why);
	vm_record_to_json(&rec, c->write_as, out);
	ck_assert_int_ge(asprintf(&text, "%s\n", json_object_to_json_string_ext(out, PRINT)), 0);
	ck_assert_int_ge(asprintf(&path, "records/%s", c->output), 0);
	golden_check(path, text);
	if (c->write_as == VM_VIEW_CHECKPOINT)
		assert_kept(json_object_object_get(in, "config"), out);
	else if (c->write_as == VM_VIEW_REGISTRY)
		assert_kept(in, out);
}
END_TEST

START_TEST(a_record_read_back_is_the_same_record)
{
	_cleanup_json_ json_object *in = parse_golden("registry-current-full.json"),
				   *out = json_object_new_object();
	_cleanup_(vm_record_done) struct vm_record a = {}, b = {};
	char why[256];

	ck_assert_int_eq(vm_record_from_json(in, VM_VIEW_REGISTRY, NULL, &a, why, sizeof(why)), 0);
	vm_record_to_json(&a, VM_VIEW_REGISTRY, out);
	ck_assert_int_eq(vm_record_from_json(out, VM_VIEW_REGISTRY, NULL, &b, why, sizeof(why)), 0);
	ck_assert_str_eq(b.cfg.name, "web1");
	ck_assert_str_eq(device_arg(&b.cfg.devices, "net0"), "tap-web1");
	ck_assert_str_eq(b.cfg.machine_alias, "q35");
	ck_assert_uint_eq(b.cfg.memory_bytes, 256 << 20);
	ck_assert_uint_eq(b.cfg.vcpus, 2);
	ck_assert_uint_eq(b.cfg.uid, 61001);
	ck_assert(b.cfg.cpr_exec);
	ck_assert(b.cfg.kernel_id.set && b.cfg.kernel_id.dev == 2049 &&
		  b.cfg.kernel_id.ino == 131074);
	ck_assert(b.cfg.initrd_id.set && b.cfg.initrd_id.ino == (ino_t)UINT64_MAX);
	ck_assert_uint_eq(b.created_usec, 1700000000000000ULL);
	ck_assert_uint_eq(b.updates, 3);
}
END_TEST

START_TEST(an_old_record_reads_as_root_given_files_and_no_uid)
{
	_cleanup_json_ json_object *in = parse_golden("registry-2371a41-minimal.json");
	_cleanup_(vm_record_done) struct vm_record rec = {};
	char why[256];

	ck_assert_int_eq(vm_record_from_json(in, VM_VIEW_REGISTRY, NULL, &rec, why, sizeof(why)),
			 0);
	ck_assert(!rec.cfg.kernel_id.set && !rec.cfg.initrd_id.set);
	ck_assert_uint_eq(rec.cfg.uid, 0);
	ck_assert_ptr_null(rec.cfg.initrd);
	ck_assert(!rec.cfg.cpr_exec);
}
END_TEST

/* One field of a good registry record replaced (value NULL: removed), and
 * what the refusal must say. */
static const struct {
	const char *key, *value, *why;
} bad[] = {
	{ "name", NULL, "name is missing" },
	{ "name", "\"../etc\"", "invalid VM name '../etc'" },
	{ "name", "\".hidden\"", "invalid VM name '.hidden'" },
	{ "name", "42", "name must be a string" },
	{ "tap", "7", "tap must be a string" },
	{ "tap", "\"a/b\"", "tap: tap interface name 'a/b'" },
	{ "disks", "7", "disks must be a list" },
	{ "disks", "[{\"path\": \"rel.img\"}]", "disks: disk 0: 'path' must be an absolute path" },
	{ "disks", "[{\"path\": \"/a\", \"layers\": [{\"path\": \"/a\"}]}]",
	  "disks: disk 0: file 0 of its chain is not a valid record" },
	{ "vmm", NULL, "vmm is missing" },
	{ "kernel", NULL, "kernel is missing" },
	{ "kernel", "[]", "kernel must be a string" },
	{ "machine", "null", "machine is missing" },
	{ "memory_bytes", "0", "memory_bytes 0 is out of range" },
	{ "memory_bytes", "-4096", "memory_bytes -4096 is out of range" },
	{ "memory_bytes", "\"256M\"", "memory_bytes must be an integer" },
	{ "memory_bytes", "2.5e8", "memory_bytes must be an integer" },
	{ "vcpus", NULL, "vcpus is missing" },
	{ "vcpus", "0", "vcpus 0 is out of range" },
	{ "vcpus", "257", "vcpus 257 is out of range" },
	{ "uid", "0", "uid 0 is out of range" },
	{ "uid", "4294967296", "uid 4294967296 is out of range" },
	{ "cpr_exec", "1", "cpr_exec must be true or false" },
	{ "initrd", "{}", "initrd must be a string" },
	{ "kernel_id", "\"2049\"", "kernel_id must be a string DEV:INO" },
	{ "kernel_id", "\"-1:5\"", "kernel_id must be a string DEV:INO" },
	{ "kernel_id", "\"1:2:3\"", "kernel_id must be a string DEV:INO" },
	{ "initrd_id", "12", "initrd_id must be a string DEV:INO" },
	{ "updates", "-1", "updates -1 is out of range" },
	{ "created_usec", "\"yesterday\"", "created_usec must be an integer" },
};

START_TEST(a_damaged_record_is_refused_with_a_reason)
{
	_cleanup_json_ json_object *in = parse_golden("registry-current-full.json");
	_cleanup_(vm_record_done) struct vm_record rec = { .updates = 77 };
	char why[256] = "";

	if (bad[_i].value)
		json_object_object_add(in, bad[_i].key, json_tokener_parse(bad[_i].value));
	else
		json_object_object_del(in, bad[_i].key);
	ck_assert_int_eq(vm_record_from_json(in, VM_VIEW_REGISTRY, NULL, &rec, why, sizeof(why)),
			 -EINVAL);
	ck_assert_msg(strstr(why, bad[_i].why), "%s=%s: '%s', want '%s'", bad[_i].key,
		      bad[_i].value ? bad[_i].value : "(removed)", why, bad[_i].why);
	ck_assert_uint_eq(rec.updates, 77); /* untouched */
	ck_assert_ptr_null(rec.cfg.name);
}
END_TEST

START_TEST(a_checkpoint_takes_its_name_from_beside_the_config)
{
	_cleanup_json_ json_object *in = parse_golden("checkpoint-2371a41.json");
	json_object *c = json_object_object_get(in, "config");
	_cleanup_(vm_record_done) struct vm_record rec = {};
	char why[256] = "";

	ck_assert_int_eq(vm_record_from_json(c, VM_VIEW_CHECKPOINT, NULL, &rec, why, sizeof(why)),
			 -EINVAL);
	ck_assert_str_eq(why, "name is missing");
	ck_assert_int_eq(vm_record_from_json(c, VM_VIEW_CHECKPOINT, "a/b", &rec, why, sizeof(why)),
			 -EINVAL);
	ck_assert_str_eq(why, "invalid VM name 'a/b'");
	/* A name in the config is not the checkpoint's view: ignored. */
	json_object_object_add(c, "name", json_object_new_string("other"));
	ck_assert_int_eq(vm_record_from_json(c, VM_VIEW_CHECKPOINT, "web1", &rec, why, sizeof(why)),
			 0);
	ck_assert_str_eq(rec.cfg.name, "web1");
	ck_assert_ptr_null(rec.cfg.machine_alias);
	ck_assert_int_eq(vm_record_from_json(json_object_object_get(in, "vm"), VM_VIEW_CHECKPOINT,
					     "web1", &(struct vm_record){}, why, sizeof(why)),
			 -EINVAL);
	ck_assert_str_eq(why, "not a JSON object");
}
END_TEST

int main(void)
{
	Suite *s = suite_create("vmrecord");
	TCase *t = tcase_create("codec");
	SRunner *sr;
	int failed;

	tcase_add_loop_test(t, golden_records_read_and_write_back, 0, ELEMENTSOF(cases));
	tcase_add_test(t, a_record_read_back_is_the_same_record);
	tcase_add_test(t, an_old_record_reads_as_root_given_files_and_no_uid);
	tcase_add_loop_test(t, a_damaged_record_is_refused_with_a_reason, 0, ELEMENTSOF(bad));
	tcase_add_test(t, a_checkpoint_takes_its_name_from_beside_the_config);
	suite_add_tcase(s, t);
	sr = srunner_create(s);
	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? 1 : 0;
}
