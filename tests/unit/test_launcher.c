/* SPDX-License-Identifier: MIT */
/*
 * The launcher on a real event loop: answers arrive as callbacks and never
 * from inside launcher_spawn(); several requests in flight each get their
 * own answer; a cancelled start's child is killed; a launcher that dies
 * fails what is in flight. This process is the children's subreaper, as
 * cprd is.
 */
#include <check.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "common/macro.h"
#include "daemon/host/launcher.h"

#define MAX_ANSWERS 8

struct answer {
	bool seen;
	int error;
	pid_t pid;
	int pidfd;
};

static struct ev_loop *loop;
static launcher l;
static struct answer answers[MAX_ANSWERS];
static unsigned settled;
static int log_fd = -EBADF;

static void on_answer(int error, pid_t pid, int pidfd, void *ud)
{
	struct answer *a = ud;

	ck_assert(!a->seen);
	*a = (struct answer){ .seen = true, .error = error, .pid = pid, .pidfd = pidfd };
}

static unsigned abandoned, lost;

static void on_event(enum launcher_event ev, pid_t pid, size_t n, void *ud)
{
	settled += ev == LAUNCHER_SETTLED;
	abandoned += ev == LAUNCHER_ABANDONED;
	lost += ev == LAUNCHER_LOST ? (unsigned)n : 0;
}

static void setup(void)
{
	prctl(PR_SET_CHILD_SUBREAPER, 1);
	memset(answers, 0, sizeof(answers));
	settled = abandoned = lost = 0;
	ck_assert_int_eq(launcher_start(&l), 0);
	loop = ev_loop_new(EVFLAG_AUTO);
	ck_assert_ptr_nonnull(loop);
	ck_assert_int_eq(launcher_watch(&l, loop, on_event, NULL), 0);
	log_fd = open("/dev/null", O_WRONLY | O_CLOEXEC);
	ck_assert_int_ge(log_fd, 0);
}

static void teardown(void)
{
	launcher_stop(&l);
	ev_loop_destroy(loop);
	log_fd = safe_close(log_fd);
	for (size_t i = 0; i < MAX_ANSWERS; i++)
		safe_close(answers[i].pidfd > 0 ? answers[i].pidfd : -EBADF);
	/* Whatever is left of the children. */
	while (waitpid(-1, NULL, WNOHANG) > 0)
		;
}

static uint64_t spawn(const char *const *argv, size_t i)
{
	uint64_t id = 0;

	ck_assert_int_eq(
	    launcher_spawn(&l, (char *const *)argv, log_fd, NULL, 0, on_answer, &answers[i], &id),
	    0);
	return id;
}

/* Run the loop until the launcher has nothing in flight. */
static void run_until_settled(void)
{
	for (int i = 0; i < 1000 && launcher_in_flight(&l) > 0; i++)
		ev_run(loop, EVRUN_ONCE);
	ck_assert_uint_eq(launcher_in_flight(&l), 0);
}

static siginfo_t wait_pidfd(int pidfd)
{
	siginfo_t si = {};

	ck_assert_int_eq(waitid(P_PIDFD, (id_t)pidfd, &si, WEXITED), 0);
	return si;
}

START_TEST(the_answer_comes_from_the_loop_not_from_the_request)
{
	const char *argv[] = { "/bin/sh", "-c", "exit 3", NULL };
	siginfo_t si;

	spawn(argv, 0);
	ck_assert(!answers[0].seen);
	ck_assert_uint_eq(launcher_in_flight(&l), 1);
	run_until_settled();
	ck_assert(answers[0].seen);
	ck_assert_int_eq(answers[0].error, 0);
	ck_assert_int_gt(answers[0].pid, 0);
	ck_assert_int_ge(answers[0].pidfd, 0);
	ck_assert_uint_ge(settled, 1);
	si = wait_pidfd(answers[0].pidfd);
	ck_assert_int_eq(si.si_pid, answers[0].pid);
	ck_assert_int_eq(si.si_status, 3);
}
END_TEST

START_TEST(starts_in_flight_at_once_each_get_their_own_answer)
{
	char bad[] = "/tmp/cprd-test-launcher-XXXXXX";
	const char *exit4[] = { "/bin/sh", "-c", "exit 4", NULL };
	const char *missing[] = { "/nonexistent/vmm", NULL };
	const char *noexec[] = { bad, NULL };
	const char *exit5[] = { "/bin/sh", "-c", "exit 5", NULL };
	int fd = mkstemp(bad);

	ck_assert_int_ge(fd, 0);
	ck_assert_int_gt(write(fd, "not a program\n", 14), 0);
	fchmod(fd, 0755);
	close(fd);
	/* Held still, so that all four are in flight together. */
	kill(l.pid, SIGSTOP);
	spawn(exit4, 0);
	spawn(missing, 1);
	spawn(noexec, 2);
	spawn(exit5, 3);
	ck_assert_uint_eq(launcher_in_flight(&l), 4);
	kill(l.pid, SIGCONT);
	run_until_settled();
	unlink(bad);

	ck_assert_int_eq(answers[0].error, 0);
	ck_assert_int_eq(wait_pidfd(answers[0].pidfd).si_status, 4);
	ck_assert_int_eq(answers[1].error, -ENOENT);
	ck_assert_int_eq(answers[2].error, -ENOEXEC);
	/* A failed exec still hands back its child, which exits with 127. */
	ck_assert_int_ge(answers[2].pidfd, 0);
	ck_assert_int_eq(wait_pidfd(answers[2].pidfd).si_status, 127);
	ck_assert_int_eq(answers[3].error, 0);
	ck_assert_int_eq(wait_pidfd(answers[3].pidfd).si_status, 5);
}
END_TEST

START_TEST(a_cancelled_start_is_killed_when_its_answer_comes)
{
	const char *argv[] = { "/bin/sleep", "100", NULL };
	siginfo_t si = {};
	uint64_t id;

	kill(l.pid, SIGSTOP);
	id = spawn(argv, 0);
	launcher_cancel(&l, id);
	kill(l.pid, SIGCONT);
	run_until_settled();
	ck_assert(!answers[0].seen);
	ck_assert_uint_eq(abandoned, 1);
	/* The only child besides the launcher: SIGKILLed, not left running. */
	ck_assert_int_eq(waitid(P_ALL, 0, &si, WEXITED), 0);
	ck_assert_int_ne(si.si_pid, l.pid);
	ck_assert_int_eq(si.si_code, CLD_KILLED);
	ck_assert_int_eq(si.si_status, SIGKILL);
}
END_TEST

START_TEST(a_launcher_that_dies_fails_what_is_in_flight)
{
	const char *argv[] = { "/bin/true", NULL };
	uint64_t id;

	kill(l.pid, SIGSTOP);
	spawn(argv, 0);
	spawn(argv, 1);
	kill(l.pid, SIGKILL);
	ck_assert_int_eq(waitpid(l.pid, NULL, 0), l.pid);
	l.pid = 0;
	run_until_settled();
	for (size_t i = 0; i < 2; i++) {
		ck_assert(answers[i].seen);
		ck_assert_int_eq(answers[i].error, -LAUNCHER_GONE);
		ck_assert_int_lt(answers[i].pidfd, 0);
	}
	ck_assert(l.gone);
	ck_assert_uint_eq(lost, 2);
	ck_assert_int_eq(
	    launcher_spawn(&l, (char *const *)argv, log_fd, NULL, 0, on_answer, &answers[2], &id),
	    -LAUNCHER_GONE);
	ck_assert_ptr_nonnull(strstr(launcher_strerror(-LAUNCHER_GONE), "launcher has exited"));
}
END_TEST

START_TEST(the_fds_given_are_the_only_ones_the_child_has)
{
	const char *argv[] = { "/bin/sh", "-c",
			       "test -e /proc/self/fd/3 && test -e /proc/self/fd/4 && "
			       "test ! -e /proc/self/fd/5",
			       NULL };
	int p[2], fds[2];
	uint64_t id;

	ck_assert_int_eq(pipe2(p, O_CLOEXEC), 0);
	fds[0] = p[0];
	fds[1] = p[1];
	ck_assert_int_eq(
	    launcher_spawn(&l, (char *const *)argv, log_fd, fds, 2, on_answer, &answers[0], &id),
	    0);
	close_many(p, 2);
	run_until_settled();
	ck_assert_int_eq(answers[0].error, 0);
	ck_assert_int_eq(wait_pidfd(answers[0].pidfd).si_status, 0);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("launcher");
	TCase *tc = tcase_create("launcher");
	SRunner *sr;
	int failed;

	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 30);
	tcase_add_test(tc, the_answer_comes_from_the_loop_not_from_the_request);
	tcase_add_test(tc, starts_in_flight_at_once_each_get_their_own_answer);
	tcase_add_test(tc, a_cancelled_start_is_killed_when_its_answer_comes);
	tcase_add_test(tc, a_launcher_that_dies_fails_what_is_in_flight);
	tcase_add_test(tc, the_fds_given_are_the_only_ones_the_child_has);
	suite_add_tcase(s, tc);
	sr = srunner_create(s);
	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? 1 : 0;
}
