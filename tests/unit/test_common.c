/* SPDX-License-Identifier: MIT */
/* common/: the checks of peer-given names, and log rotation on a real
 * directory with a real O_APPEND writer. */
#include <check.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/escape.h"
#include "common/file.h"
#include "common/macro.h"
#include "common/proc.h"
#include "common/valid.h"

START_TEST(ifnames_the_kernel_keeps_as_given_pass)
{
	const char *ok[] = { "tap0", "tap-web1", "t", "vm_1.net", "abcdefghijklmno" };

	for (size_t i = 0; i < ELEMENTSOF(ok); i++)
		ck_assert_msg(ifname_invalid(ok[i]) == NULL, "%s: %s", ok[i],
			      ifname_invalid(ok[i]));
}
END_TEST

START_TEST(ifnames_the_kernel_would_rewrite_or_refuse_fail)
{
	const struct {
		const char *name, *why;
	} bad[] = {
		{ "", "1-15" },
		{ "abcdefghijklmnop", "1-15" }, /* IFNAMSIZ is 16 with the NUL */
		{ "tap%d", "'%'" },
		{ "%", "'%'" },
		{ ".", "'.'" },
		{ "..", "'.'" },
		{ "a/b", "'/'" },
		{ "a:b", "':'" },
		{ "a b", "printable" },
		{ "a\tb", "printable" },
		{ "a\x7f", "printable" },
		{ "t\xc3\xa4p", "printable" },
	};

	for (size_t i = 0; i < ELEMENTSOF(bad); i++) {
		const char *why = ifname_invalid(bad[i].name);

		ck_assert_msg(why, "'%s' was accepted", bad[i].name);
		ck_assert_msg(strstr(why, bad[i].why), "'%s': %s", bad[i].name, why);
	}
}
END_TEST

START_TEST(control_bytes_are_found)
{
	ck_assert(!str_has_ctrl(""));
	ck_assert(!str_has_ctrl("console=ttyS0 quiet cprd.hb_ms=50"));
	ck_assert(!str_has_ctrl("caf\xc3\xa9")); /* UTF-8 is not control */
	ck_assert(str_has_ctrl("a\nb"));
	ck_assert(str_has_ctrl("a\rb"));
	ck_assert(str_has_ctrl("\x1b[2J"));
	ck_assert(str_has_ctrl("x\x7f"));
}
END_TEST

/* ---- str_escape: what a VMM wrote, on one line ---- */

static const char *esc(const char *s, size_t size)
{
	static char out[256];

	str_escape(s, strlen(s), out, size);
	return out;
}

START_TEST(vmm_text_is_escaped_onto_one_line)
{
	ck_assert(!str_needs_escape("guest-shutdown caf\xc3\xa9 \\x41", 23));
	ck_assert_str_eq(esc("host-signal", 64), "host-signal");
	ck_assert_str_eq(esc("caf\xc3\xa9", 64), "caf\xc3\xa9"); /* UTF-8 stays */
	/* A forged log line and a terminal escape. */
	ck_assert_str_eq(esc("x\nupdate vm=web1 result=ok\x1b[2J", 64),
			 "x\\x0aupdate vm=web1 result=ok\\x1b[2J");
	ck_assert_str_eq(esc("a\rb\x7f", 64), "a\\x0db\\x7f");
	/* C1 CSI (U+009B), invalid, overlong and surrogate UTF-8, a cut one. */
	ck_assert_str_eq(esc("\xc2\x9b"
			     "2J",
			     64),
			 "\\xc2\\x9b2J");
	ck_assert_str_eq(esc("\xff\xc0\xaf\xed\xa0\x80", 64), "\\xff\\xc0\\xaf\\xed\\xa0\\x80");
	ck_assert_str_eq(esc("ok\xc3", 64), "ok\\xc3");
	ck_assert(str_needs_escape("\xc2\x85", 2));
	/* Cut to size at a whole character or escape, never inside one. */
	ck_assert_str_eq(esc("ab\n", 6), "ab");
	ck_assert_str_eq(esc("a\xc3\xa9", 3), "a");
	/* Escaping again changes nothing. */
	ck_assert_str_eq(esc("x\\x0a\\x1b", 64), "x\\x0a\\x1b");
}
END_TEST

/* ---- file_rotate ---- */

static char dir[PATH_MAX];
static int dfd = -EBADF;

static void setup(void)
{
	snprintf(dir, sizeof(dir), "/tmp/cprd-common-XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(dir));
	dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	ck_assert_int_ge(dfd, 0);
}

static void teardown(void)
{
	const char *names[] = { "log", "log.1", ".log.1.tmp", "victim", "fifo" };

	for (size_t i = 0; i < ELEMENTSOF(names); i++)
		unlinkat(dfd, names[i], 0);
	dfd = safe_close(dfd);
	rmdir(dir);
}

static off_t size_of(const char *name)
{
	struct stat st;

	return fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) < 0 ? -1 : st.st_size;
}

static void put(int fd, char c, size_t n)
{
	char buf[1024];

	memset(buf, c, sizeof(buf));
	while (n > 0) {
		size_t k = MIN(n, sizeof(buf));

		ck_assert_int_eq(write(fd, buf, k), (ssize_t)k);
		n -= k;
	}
}

START_TEST(a_log_within_its_bound_is_left_alone)
{
	_cleanup_close_ int w = openat(dfd, "log", O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);

	ck_assert_int_eq(file_rotate(dfd, "absent", 4096), 0);
	put(w, 'a', 4096);
	ck_assert_int_eq(file_rotate(dfd, "log", 4096), 0);
	ck_assert_int_eq(size_of("log"), 4096);
	ck_assert_int_eq(size_of("log.1"), -1);
}
END_TEST

START_TEST(a_log_past_its_bound_is_copied_and_the_writer_goes_on_at_the_start)
{
	_cleanup_close_ int w = openat(dfd, "log", O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);
	_cleanup_close_ int r = -EBADF;
	char buf[8];

	put(w, 'a', 904);
	put(w, 'A', 4096);
	ck_assert_int_eq(file_rotate(dfd, "log", 4096), 1);
	ck_assert_int_eq(size_of("log"), 0);
	/* The newest 4096 bytes: never more than the bound. */
	ck_assert_int_eq(size_of("log.1"), 4096);
	r = openat(dfd, "log.1", O_RDONLY | O_CLOEXEC);
	ck_assert_int_eq(pread(r, buf, 1, 0), 1);
	ck_assert_int_eq(buf[0], 'A');
	r = safe_close(r);
	ck_assert_int_eq(size_of(".log.1.tmp"), -1);
	/* The writer's own fd, as QEMU's: its next line is the file's first. */
	put(w, 'b', 3);
	ck_assert_int_eq(size_of("log"), 3);
	r = openat(dfd, "log", O_RDONLY | O_CLOEXEC);
	ck_assert_int_eq(read(r, buf, sizeof(buf)), 3);
	ck_assert_int_eq(memcmp(buf, "bbb", 3), 0);
	/* A second rotation replaces the kept copy: one is kept. */
	put(w, 'c', 4200);
	ck_assert_int_eq(file_rotate(dfd, "log", 4096), 1);
	ck_assert_int_eq(size_of("log.1"), 4096);
}
END_TEST

/* What a VMM can do with the log fd it holds: ftruncate() it to 1 GiB,
 * which costs it nothing, and write on after the hole. */
START_TEST(a_log_inflated_by_ftruncate_costs_the_rotation_its_data_alone)
{
	_cleanup_close_ int w = openat(dfd, "log", O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);
	_cleanup_close_ int r = -EBADF;
	struct stat st;
	char buf[16];

	put(w, 'a', 100);
	ck_assert_int_eq(ftruncate(w, (off_t)1 << 30), 0);
	put(w, 'z', 10);
	ck_assert_int_eq(file_rotate(dfd, "log", 4096), 1);
	ck_assert_int_eq(size_of("log"), 0);
	/* The last 4096 bytes hold a hole of 4086 and the 10 bytes written
	 * after it: those alone are copied. */
	ck_assert_int_eq(size_of("log.1"), 10);
	r = openat(dfd, "log.1", O_RDONLY | O_CLOEXEC);
	ck_assert_int_eq(read(r, buf, sizeof(buf)), 10);
	ck_assert_int_eq(memcmp(buf, "zzzzzzzzzz", 10), 0);
	ck_assert_int_eq(fstat(r, &st), 0);
	ck_assert_int_le(st.st_blocks * 512, 8192);
}
END_TEST

START_TEST(a_symlink_planted_as_the_log_or_its_copy_is_never_followed)
{
	_cleanup_close_ int v = openat(dfd, "victim", O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
	_cleanup_close_ int w = -EBADF;
	char target[PATH_MAX + 16];

	put(v, 'v', 10000);
	snprintf(target, sizeof(target), "%s/victim", dir);
	ck_assert_int_eq(symlinkat(target, dfd, "log"), 0);
	ck_assert_int_eq(file_rotate(dfd, "log", 4096), -ELOOP);
	ck_assert_int_eq(size_of("victim"), 10000);
	ck_assert_int_eq(unlinkat(dfd, "log", 0), 0);

	/* log.1 a symlink to the victim: replaced, the victim untouched. */
	ck_assert_int_eq(symlinkat(target, dfd, "log.1"), 0);
	w = openat(dfd, "log", O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);
	put(w, 'a', 5000);
	ck_assert_int_eq(file_rotate(dfd, "log", 4096), 1);
	ck_assert_int_eq(size_of("victim"), 10000);
	ck_assert_int_eq(size_of("log.1"), 4096);
}
END_TEST

START_TEST(a_fifo_as_the_log_is_refused_without_blocking)
{
	ck_assert_int_eq(mkfifoat(dfd, "fifo", 0600), 0);
	ck_assert_int_eq(file_rotate(dfd, "fifo", 4096), -EBADFD);
}
END_TEST

START_TEST(file_tail_reads_the_end_and_not_through_a_symlink)
{
	_cleanup_close_ int w = openat(dfd, "log", O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);
	_cleanup_close_ int v = openat(dfd, "victim", O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
	char tail[16], target[PATH_MAX + 16];

	ck_assert_int_eq(write(w, "first\nlast line\n", 16), 16);
	file_tail(dfd, "log", tail, sizeof(tail));
	ck_assert_str_eq(tail, "irst last line");
	ck_assert_int_eq(write(v, "secret", 6), 6);
	snprintf(target, sizeof(target), "%s/victim", dir);
	ck_assert_int_eq(unlinkat(dfd, "log", 0), 0);
	ck_assert_int_eq(symlinkat(target, dfd, "log"), 0);
	file_tail(dfd, "log", tail, sizeof(tail));
	ck_assert_str_eq(tail, "");
}
END_TEST

static int write_file(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	ssize_t n;

	if (fd < 0)
		return -errno;
	n = write(fd, text, strlen(text));
	close(fd);
	return n == (ssize_t)strlen(text) ? 0 : -EIO;
}

/* A child that waits for a byte, then execs sleep: its image id before
 * and after the exec (the same pid throughout) must differ, and reading it
 * twice without an exec must not. */
START_TEST(the_image_id_changes_with_an_exec_and_only_then)
{
	int go[2], ready[2];
	uint64_t before, again, after;
	pid_t pid;
	char c;

	ck_assert_int_eq(pipe2(go, O_CLOEXEC), 0);
	ck_assert_int_eq(pipe2(ready, O_CLOEXEC), 0);
	pid = fork();
	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		if (read(go[0], &c, 1) == 1)
			execl("/bin/sleep", "sleep", "30", (char *)NULL);
		_exit(127);
	}
	ck_assert_int_eq(proc_image_id(pid, &before), 0);
	ck_assert_int_eq(proc_image_id(pid, &again), 0);
	ck_assert_uint_eq(before, again);
	ck_assert_int_eq(write(go[1], "x", 1), 1);
	/* ready[1] is close-on-exec in the child: EOF once it exec'd. */
	close(ready[1]);
	ck_assert_int_eq(read(ready[0], &c, 1), 0);
	ck_assert_int_eq(proc_image_id(pid, &after), 0);
	ck_assert_uint_ne(before, after);
	kill(pid, SIGKILL);
	waitpid(pid, NULL, 0);
	ck_assert_int_eq(proc_image_id(pid, &after), -ENOENT);
	close(go[0]);
	close(go[1]);
	close(ready[0]);
}
END_TEST

START_TEST(file_same_is_one_inode_not_equal_contents)
{
	char a[PATH_MAX + 8], link[PATH_MAX + 8], copy[PATH_MAX + 8];

	snprintf(a, sizeof(a), "%s/a", dir);
	snprintf(link, sizeof(link), "%s/l", dir);
	snprintf(copy, sizeof(copy), "%s/c", dir);
	ck_assert_int_eq(write_file(a, "same"), 0);
	ck_assert_int_eq(write_file(copy, "same"), 0);
	ck_assert_int_eq(symlink(a, link), 0);
	ck_assert(file_same(a, link));
	ck_assert(!file_same(a, copy));
	ck_assert(!file_same(a, "/nonexistent/x"));
	ck_assert(!file_same(a, NULL));
}
END_TEST

int main(void)
{
	Suite *s = suite_create("common");
	TCase *t = tcase_create("valid"), *f = tcase_create("file");
	SRunner *sr;
	int failed;

	tcase_add_test(t, ifnames_the_kernel_keeps_as_given_pass);
	tcase_add_test(t, ifnames_the_kernel_would_rewrite_or_refuse_fail);
	tcase_add_test(t, control_bytes_are_found);
	tcase_add_test(t, vmm_text_is_escaped_onto_one_line);
	tcase_add_test(t, the_image_id_changes_with_an_exec_and_only_then);
	suite_add_tcase(s, t);
	tcase_add_checked_fixture(f, setup, teardown);
	tcase_add_test(f, a_log_within_its_bound_is_left_alone);
	tcase_add_test(f, a_log_past_its_bound_is_copied_and_the_writer_goes_on_at_the_start);
	tcase_add_test(f, a_log_inflated_by_ftruncate_costs_the_rotation_its_data_alone);
	tcase_add_test(f, a_symlink_planted_as_the_log_or_its_copy_is_never_followed);
	tcase_add_test(f, a_fifo_as_the_log_is_refused_without_blocking);
	tcase_add_test(f, file_tail_reads_the_end_and_not_through_a_symlink);
	tcase_add_test(f, file_same_is_one_inode_not_equal_contents);
	suite_add_tcase(s, f);
	sr = srunner_create(s);
	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? 1 : 0;
}
