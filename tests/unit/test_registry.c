/* SPDX-License-Identifier: MIT */
/* The registry file (daemon/core/registry.c) on a real file system: round trip,
 * rejection of damaged files, planted symlinks, and writes that fail. */
#include <check.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>

#include "common/file.h"
#include "common/json.h"
#include "common/macro.h"
#include "daemon/core/registry.h"

static char dir[64];

static void make_dir(void)
{
	snprintf(dir, sizeof(dir), "/tmp/cprd-registry-XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(dir));
}

static void remove_dir(void)
{
	char cmd[128];

	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
	(void)!system(cmd);
}

/* A registry as the daemon writes it: one VM in the middle of an update. */
static json_object *sample(const char *name)
{
	const char *text =
	    "{\"version\":1,\"vms\":[{\"name\":\"%s\",\"vmm\":\"/usr/bin/qemu-system-x86_64\","
	    "\"kernel\":\"/boot/vmlinuz\",\"initrd\":\"/boot/"
	    "initrd.img\",\"append\":\"console=ttyS0 "
	    "quiet\",\"machine\":\"q35\",\"memory_bytes\":268435456,\"vcpus\":2,"
	    "\"created_usec\":1700000000000000,\"updates\":3,\"state\":\"running\",\"pid\":4242,"
	    "\"pid_start\":987654,\"vmm_fds\":{\"ram0\":3,\"console\":4},\"qmp\":\"/run/cprd/vms/"
	    "%s/"
	    "qmp.sock\",\"update\":{\"strategy\":\"handover\",\"time_usec\":1700000000500000,"
	    "\"old_pid\":4242,\"old_vmm\":\"/usr/bin/"
	    "qemu-system-x86_64\",\"old_version\":\"10.0.2\","
	    "\"new_vmm\":\"/opt/qemu/bin/qemu-system-x86_64\",\"new_pid\":4300,\"new_pid_start\":"
	    "987700,\"new_qmp\":\"/run/cprd/vms/%s/qmp-next.sock\",\"new_vmm_fds\":{\"ram0\":3,"
	    "\"console\":4}}}]}";
	char buf[2048];

	snprintf(buf, sizeof(buf), text, name, name, name);
	return json_tokener_parse(buf);
}

static char *slurp(const char *path)
{
	_cleanup_close_ int fd = open(path, O_RDONLY | O_CLOEXEC);
	char *buf = NULL;

	if (fd < 0 || read_at_most(fd, 0, 1 << 20, &buf) < 0)
		return NULL;
	return buf;
}

static void spit(const char *path, const char *text)
{
	_cleanup_close_ int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);

	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(write(fd, text, strlen(text)), (ssize_t)strlen(text));
}

START_TEST(round_trip_keeps_every_member)
{
	struct registry r;
	_cleanup_json_ json_object *root = sample("web1"), *back = NULL;
	char why[256];
	struct stat st;

	make_dir();
	ck_assert_int_eq(registry_init(&r, dir), 0);
	ck_assert_int_eq(registry_read(&r, &back, why, sizeof(why)), -ENOENT);
	registry_mark_dirty(&r);
	ck_assert_int_eq(registry_write(&r, root), 0);
	ck_assert(registry_ok(&r));
	ck_assert(!r.dirty);
	ck_assert_int_eq(registry_read(&r, &back, why, sizeof(why)), 0);
	ck_assert_msg(json_object_equal(root, back), "read back: %s",
		      json_object_to_json_string(back));
	/* Only root reads it; no temp file is left behind. */
	ck_assert_int_eq(stat(r.path, &st), 0);
	ck_assert_int_eq(st.st_mode & 07777, 0600);
	ck_assert_int_eq(access(r.tmp, F_OK), -1);
	ck_assert_int_eq(errno, ENOENT);
	/* A second write replaces the first. */
	json_object_put(TAKE_PTR(back));
	json_object_put(TAKE_PTR(root));
	root = sample("web2");
	ck_assert_int_eq(registry_write(&r, root), 0);
	ck_assert_int_eq(registry_read(&r, &back, why, sizeof(why)), 0);
	ck_assert(json_object_equal(root, back));
	registry_done(&r);
	remove_dir();
}
END_TEST

START_TEST(damaged_files_are_rejected_with_a_reason)
{
	static const struct {
		const char *text, *reason;
	} cases[] = {
		{ "", "empty" },
		{ "{\"version\":1,\"vms\":[{\"name\":\"web1\",\"vm", "truncated" },
		{ "{\"version\":1,\"vms\":[]} {\"version\":1}", "after the JSON text" },
		{ "registry", "at byte" },
		{ "[1,2]", "\"version\"" },
		{ "{\"vms\":[]}", "\"version\"" },
		{ "{\"version\":2,\"vms\":[]}", "version 2" },
		{ "{\"version\":1}", "\"vms\"" },
		{ "{\"version\":1,\"vms\":{}}", "\"vms\"" },
		{ "{\"version\":1,\"vms\":[7]}", "entry 0" },
	};
	_cleanup_json_ json_object *root = sample("web1");
	json_object *back = NULL;
	struct registry r;
	char why[256], *full;
	size_t len;

	make_dir();
	ck_assert_int_eq(registry_init(&r, dir), 0);
	for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
		spit(r.path, cases[i].text);
		ck_assert_int_eq(registry_read(&r, &back, why, sizeof(why)), -EBADMSG);
		ck_assert_ptr_null(back);
		ck_assert_msg(strstr(why, cases[i].reason), "case %zu: reason '%s'", i, why);
	}
	/* A real registry cut short anywhere is refused, never half-read. */
	ck_assert_int_eq(registry_write(&r, root), 0);
	full = slurp(r.path);
	ck_assert_ptr_nonnull(full);
	len = strlen(full);
	for (size_t cut = 0; cut + 1 < len; cut += 7) {
		full[cut] = '\0';
		spit(r.path, full);
		ck_assert_int_eq(registry_read(&r, &back, why, sizeof(why)), -EBADMSG);
		ck_assert_ptr_null(back);
		free(full);
		ck_assert_int_eq(registry_write(&r, root), 0);
		full = slurp(r.path);
	}
	free(full);
	/* Nor is it read through a symlink. */
	ck_assert_int_eq(unlink(r.path), 0);
	ck_assert_int_eq(symlink("/etc/hostname", r.path), 0);
	ck_assert_int_eq(registry_read(&r, &back, why, sizeof(why)), -ELOOP);
	registry_done(&r);
	remove_dir();
}
END_TEST

/* Whoever could plant a symlink where the temp file goes must not get root
 * to write through it. */
START_TEST(planted_symlinks_are_not_followed)
{
	_cleanup_json_ json_object *root = sample("web1"), *back = NULL;
	_cleanup_free_ char *victim = NULL, *other = NULL, *text = NULL;
	struct registry r;
	char why[256];
	struct stat st;

	make_dir();
	ck_assert_int_eq(registry_init(&r, dir), 0);
	ck_assert_int_ge(asprintf(&victim, "%s/victim", dir), 0);
	ck_assert_int_ge(asprintf(&other, "%s/other", dir), 0);
	spit(victim, "precious\n");
	spit(other, "also precious\n");
	ck_assert_int_eq(symlink(victim, r.tmp), 0);
	ck_assert_int_eq(registry_write(&r, root), 0);
	text = slurp(victim);
	ck_assert_str_eq(text, "precious\n");
	ck_assert_int_eq(lstat(r.path, &st), 0);
	ck_assert(S_ISREG(st.st_mode));
	ck_assert_int_eq(registry_read(&r, &back, why, sizeof(why)), 0);
	ck_assert(json_object_equal(root, back));
	/* The registry itself as a symlink is replaced, not written through. */
	ck_assert_int_eq(unlink(r.path), 0);
	ck_assert_int_eq(symlink(other, r.path), 0);
	ck_assert_int_eq(registry_write(&r, root), 0);
	free(text);
	text = slurp(other);
	ck_assert_str_eq(text, "also precious\n");
	ck_assert_int_eq(lstat(r.path, &st), 0);
	ck_assert(S_ISREG(st.st_mode));
	registry_done(&r);
	remove_dir();
}
END_TEST

/* How writes into dir are made to fail: as root, dir becomes a tiny tmpfs
 * (in a mount namespace of this test's own, so it vanishes with it) that is
 * later filled to the last page; otherwise dir is later made read-only
 * (root would not notice). NULL when neither is possible. */
static const char *prepare_failure(void)
{
	if (geteuid() != 0)
		return "read-only";
	if (unshare(CLONE_NEWNS) < 0 || mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0 ||
	    mount("tmpfs", dir, "tmpfs", 0, "size=64k,mode=0700") < 0)
		return NULL;
	return "tmpfs";
}

static void fill(const char *filler)
{
	_cleanup_close_ int fd = open(filler, O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
	char buf[4096] = { 0 };

	ck_assert_int_ge(fd, 0);
	while (write(fd, buf, sizeof(buf)) > 0)
		;
	ck_assert_int_eq(errno, ENOSPC);
}

START_TEST(a_failed_write_leaves_the_previous_registry)
{
	_cleanup_json_ json_object *first = sample("web1"), *second = sample("web2"), *back = NULL;
	_cleanup_free_ char *before = NULL, *after = NULL;
	char filler[128], why[256];
	struct registry r;
	const char *how;
	uint64_t since;
	int e;

	make_dir();
	how = prepare_failure();
	if (!how) {
		printf("SKIP a_failed_write_leaves_the_previous_registry: as root this needs a "
		       "private mount namespace and a tmpfs (%s)\n",
		       strerror(errno));
		remove_dir();
		return;
	}
	ck_assert_int_eq(registry_init(&r, dir), 0);
	ck_assert_int_eq(registry_write(&r, first), 0);
	before = slurp(r.path);
	since = r.since_usec;
	snprintf(filler, sizeof(filler), "%s/filler", dir);
	if (streq(how, "tmpfs"))
		fill(filler);
	else
		ck_assert_int_eq(chmod(dir, 0500), 0);

	e = registry_write(&r, second);
	ck_assert_int_eq(e, streq(how, "tmpfs") ? -ENOSPC : -EACCES);
	ck_assert(!registry_ok(&r));
	ck_assert(r.dirty);
	ck_assert_int_eq(r.error, e);
	ck_assert_msg(strstr(r.why, r.path) && strstr(r.why, strerror(-e)), "why: %s", r.why);
	ck_assert_uint_ge(r.since_usec, since);
	after = slurp(r.path);
	ck_assert_str_eq(after, before);
	ck_assert_int_eq(access(r.tmp, F_OK), -1);
	ck_assert_int_eq(registry_read(&r, &back, why, sizeof(why)), 0);
	ck_assert(json_object_equal(first, back));

	/* Room again: the next write goes through and the registry is well. */
	if (streq(how, "tmpfs"))
		ck_assert_int_eq(unlink(filler), 0);
	else
		ck_assert_int_eq(chmod(dir, 0700), 0);
	since = r.since_usec;
	ck_assert_int_eq(registry_write(&r, second), 0);
	ck_assert(registry_ok(&r));
	ck_assert_str_eq(r.why, "");
	ck_assert_uint_ge(r.since_usec, since);
	json_object_put(TAKE_PTR(back));
	ck_assert_int_eq(registry_read(&r, &back, why, sizeof(why)), 0);
	ck_assert(json_object_equal(second, back));
	registry_done(&r);
	if (streq(how, "tmpfs"))
		umount(dir);
	remove_dir();
}
END_TEST

START_TEST(health_is_reported_as_json)
{
	_cleanup_json_ json_object *h = NULL;
	struct registry r;

	ck_assert_int_eq(registry_init(&r, "/nonexistent-cprd-dir"), 0);
	h = sample("web1");
	ck_assert_int_eq(registry_write(&r, h), -ENOENT); /* no such directory */
	json_object_put(TAKE_PTR(h));
	h = registry_health_to_json(&r);
	ck_assert(!json_object_get_boolean(json_object_object_get(h, "ok")));
	ck_assert_ptr_nonnull(strstr(json_object_get_string(json_object_object_get(h, "error")),
				     "/nonexistent-cprd-dir/registry.json"));
	ck_assert_str_eq(json_object_get_string(json_object_object_get(h, "path")),
			 "/nonexistent-cprd-dir/registry.json");
	ck_assert_int_gt(json_object_get_int64(json_object_object_get(h, "since_usec")), 0);
	registry_done(&r);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("registry");
	TCase *t = tcase_create("file");
	SRunner *sr;
	int failed;

	tcase_add_test(t, round_trip_keeps_every_member);
	tcase_add_test(t, damaged_files_are_rejected_with_a_reason);
	tcase_add_test(t, planted_symlinks_are_not_followed);
	tcase_add_test(t, a_failed_write_leaves_the_previous_registry);
	tcase_add_test(t, health_is_reported_as_json);
	suite_add_tcase(s, t);
	sr = srunner_create(s);
	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? 1 : 0;
}
