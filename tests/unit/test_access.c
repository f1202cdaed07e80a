/* SPDX-License-Identifier: MIT */
/* Opening a file with a peer's rights (common/access.c), on real files. */
#include <check.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/access.h"
#include "common/macro.h"

static const struct creds nobody = { .uid = 65534, .gid = 65534 };
static const struct creds in_group = { .uid = 65534, .gid = 65534, .ngroups = 1, .groups = { 42 } };
static char base[64];

static struct stat mode(uid_t uid, gid_t gid, mode_t m)
{
	return (struct stat){ .st_uid = uid, .st_gid = gid, .st_mode = S_IFREG | m };
}

START_TEST(mode_bits_are_judged_by_class)
{
	struct stat st = mode(0, 42, 0640);

	ck_assert(!creds_may(&nobody, &st, R_OK));
	ck_assert(creds_may(&in_group, &st, R_OK));
	ck_assert(!creds_may(&in_group, &st, R_OK | W_OK));
	/* The owner class decides for the owner even when others get more. */
	st = mode(65534, 0, 0044);
	ck_assert(!creds_may(&nobody, &st, R_OK));
	st = mode(0, 0, 0755);
	ck_assert(creds_may(&nobody, &st, R_OK | X_OK));
	ck_assert(!creds_may(&nobody, &st, W_OK));
}
END_TEST

static void put(const char *rel, mode_t m, uid_t uid)
{
	char p[128];
	int fd;

	snprintf(p, sizeof(p), "%s/%s", base, rel);
	fd = open(p, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, m);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(write(fd, "k", 1), 1);
	ck_assert_int_eq(fchmod(fd, m), 0);
	ck_assert_int_eq(fchown(fd, uid, 0), 0);
	close(fd);
}

static int try_open(const char *rel, const struct creds *c)
{
	char p[128];
	int fd = -1, r;

	snprintf(p, sizeof(p), "%s/%s", base, rel);
	r = open_as(p, c, &fd, NULL);
	if (r == 0) {
		ck_assert_int_ge(fd, 0);
		ck_assert(fcntl(fd, F_GETFD) & FD_CLOEXEC);
		ck_assert(!(fcntl(fd, F_GETFL) & O_NONBLOCK));
		close(fd);
	}
	return r;
}

static void setup(void)
{
	char p[128];

	if (geteuid() != 0)
		return;
	/* Under /run, not /tmp: every directory on the way must be root's. */
	snprintf(base, sizeof(base), "/run/cprd-test-access-XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(base));
	ck_assert_int_eq(chmod(base, 0755), 0);
	put("pub", 0644, 0);
	put("secret", 0600, 0);
	put("owned", 0644, 65534);
	snprintf(p, sizeof(p), "%s/closed", base);
	ck_assert_int_eq(mkdir(p, 0700), 0);
	put("closed/pub", 0644, 0);
	snprintf(p, sizeof(p), "%s/fifo", base);
	ck_assert_int_eq(mkfifo(p, 0644), 0);
	snprintf(p, sizeof(p), "%s/link", base);
	ck_assert_int_eq(symlink("secret", p), 0);
}

static void teardown(void)
{
	char cmd[128];

	if (geteuid() != 0)
		return;
	snprintf(cmd, sizeof(cmd), "rm -rf %s", base);
	ck_assert_int_eq(system(cmd), 0);
}

START_TEST(open_as_follows_the_peers_rights)
{
	if (geteuid() != 0) {
		fprintf(stderr, "open_as: skipped: needs root to make files of others\n");
		return;
	}
	ck_assert_int_eq(try_open("pub", &nobody), 0);
	ck_assert_int_eq(try_open("secret", &nobody), -EACCES);
	ck_assert_int_eq(try_open("closed/pub", &nobody), -EACCES);
	/* A link is resolved first, then judged where it leads. */
	ck_assert_int_eq(try_open("link", &nobody), -EACCES);
	/* What the peer could change is not read again later. */
	ck_assert_int_eq(try_open("owned", &nobody), -ETXTBSY);
	ck_assert_int_eq(try_open("missing", &nobody), -ENOENT);
	/* With the caller's own rights (root): no mode check, same rest. */
	ck_assert_int_eq(try_open("secret", NULL), 0);
	ck_assert_int_eq(try_open("closed/pub", NULL), 0);
	ck_assert_int_eq(open_as("relative", NULL, &(int){ 0 }, NULL), -EINVAL);
}
END_TEST

START_TEST(a_fifo_is_refused_without_blocking)
{
	if (geteuid() != 0) {
		fprintf(stderr, "fifo: skipped: needs root to make files of others\n");
		return;
	}
	/* No writer: a blocking open would never return. */
	ck_assert_int_eq(try_open("fifo", NULL), -EBADFD);
	ck_assert_int_eq(try_open("fifo", &nobody), -EBADFD);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("access");
	TCase *m = tcase_create("modes"), *o = tcase_create("open_as");
	SRunner *sr;
	int failed;

	tcase_add_test(m, mode_bits_are_judged_by_class);
	tcase_add_checked_fixture(o, setup, teardown);
	tcase_add_test(o, open_as_follows_the_peers_rights);
	tcase_add_test(o, a_fifo_is_refused_without_blocking);
	suite_add_tcase(s, m);
	suite_add_tcase(s, o);
	sr = srunner_create(s);
	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? 1 : 0;
}
