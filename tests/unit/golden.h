/* SPDX-License-Identifier: MIT */
/*
 * Golden files for the unit suites, in tests/unit/golden/ (the Makefile
 * passes its path as GOLDEN_DIR, so a suite finds it whatever directory it
 * runs from). A suite compares what it produces with the file; with
 * CPRD_REGEN_GOLDEN=1 in the environment it writes the file instead
 * (`CPRD_REGEN_GOLDEN=1 make unit`), and the diff is reviewed as code.
 */
#pragma once

#include <check.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/file.h"
#include "common/macro.h"

#ifndef GOLDEN_DIR
#error "GOLDEN_DIR: the Makefile gives a suite that uses golden files its path"
#endif

static inline bool golden_regen(void)
{
	const char *e = getenv("CPRD_REGEN_GOLDEN");

	return e && streq(e, "1");
}

/* GOLDEN_DIR/name's text, or NULL when there is none. */
static inline char *golden_read(const char *name)
{
	_cleanup_free_ char *path = NULL;
	_cleanup_close_ int fd = -EBADF;
	char *text = NULL;

	ck_assert_int_ge(asprintf(&path, "%s/%s", GOLDEN_DIR, name), 0);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0 || read_at_most(fd, 0, 1 << 20, &text) < 0)
		return NULL;
	return text;
}

/* text is GOLDEN_DIR/name's, or (regenerating) becomes it. */
static inline void golden_check(const char *name, const char *text)
{
	_cleanup_free_ char *path = NULL, *want = NULL;

	ck_assert_int_ge(asprintf(&path, "%s/%s", GOLDEN_DIR, name), 0);
	if (golden_regen()) {
		_cleanup_close_ int fd = -EBADF;

		*strrchr(path, '/') = '\0';
		(void)mkdir(path, 0755);
		path[strlen(path)] = '/';
		fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644);
		ck_assert_msg(fd >= 0, "cannot write %s", path);
		ck_assert_int_eq(write(fd, text, strlen(text)), (ssize_t)strlen(text));
		return;
	}
	want = golden_read(name);
	ck_assert_msg(want, "%s is missing: CPRD_REGEN_GOLDEN=1 make unit writes it", path);
	ck_assert_msg(streq(want, text),
		      "%s differs (CPRD_REGEN_GOLDEN=1 make unit rewrites it, then review the "
		      "diff):\n--- want\n%s--- got\n%s",
		      path, want, text);
}
