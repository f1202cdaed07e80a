/* SPDX-License-Identifier: MIT */
/* The decision a restarted cprd makes about an update it did not see end. */
#include <check.h>

#include "daemon/ops/settle.h"

static enum settle_action decide(bool committed, bool new_alive, const char *new_status,
				 bool new_completed, bool old_alive, const char *old_status)
{
	struct settle_facts f = {
		.committed = committed,
		.new_alive = new_alive,
		.new_status = new_status,
		.new_completed = new_completed,
		.old_alive = old_alive,
		.old_status = old_status,
	};

	return settle_decide(&f);
}

START_TEST(a_new_vmm_that_runs_keeps_the_guest)
{
	ck_assert_int_eq(decide(false, true, "running", false, true, "postmigrate"),
			 SETTLE_KEEP_NEW);
	ck_assert_int_eq(decide(false, true, "running", false, false, NULL), SETTLE_KEEP_NEW);
}
END_TEST

START_TEST(a_new_vmm_that_holds_the_whole_state_keeps_the_guest)
{
	/* Loaded and paused (-S), cprd died before telling it to run. */
	ck_assert_int_eq(decide(false, true, "paused", true, true, "postmigrate"), SETTLE_KEEP_NEW);
	/* The old VMM died after sending everything. */
	ck_assert_int_eq(decide(false, true, "paused", true, false, NULL), SETTLE_KEEP_NEW);
}
END_TEST

START_TEST(a_committed_new_vmm_keeps_the_guest_even_if_mute)
{
	ck_assert_int_eq(decide(true, true, NULL, false, true, "postmigrate"), SETTLE_KEEP_NEW);
	ck_assert_int_eq(decide(true, true, "paused", true, true, "postmigrate"), SETTLE_KEEP_NEW);
}
END_TEST

START_TEST(a_new_vmm_that_answers_it_never_ran_gives_the_guest_back)
{
	/* Still loading: even a completed old VMM may resume, since the new
	 * VMM runs only when told to, and it was not. */
	ck_assert_int_eq(decide(false, true, "inmigrate", false, true, "postmigrate"),
			 SETTLE_RESUME_OLD);
	ck_assert_int_eq(decide(false, true, "inmigrate", false, true, "running"),
			 SETTLE_RESUME_OLD);
	/* Paused without the whole state is no reason to keep it. */
	ck_assert_int_eq(decide(false, true, "paused", false, true, "paused"), SETTLE_RESUME_OLD);
}
END_TEST

START_TEST(a_gone_new_vmm_before_the_old_completed_gives_the_guest_back)
{
	ck_assert_int_eq(decide(false, false, NULL, false, true, "running"), SETTLE_RESUME_OLD);
	ck_assert_int_eq(decide(false, false, NULL, false, true, "paused"), SETTLE_RESUME_OLD);
	ck_assert_int_eq(decide(false, false, NULL, false, true, "finish-migrate"),
			 SETTLE_RESUME_OLD);
	/* A mute old VMM is still the only one that can have the guest. */
	ck_assert_int_eq(decide(false, false, NULL, false, true, NULL), SETTLE_RESUME_OLD);
}
END_TEST

START_TEST(a_gone_new_vmm_that_may_have_run_the_guest_resumes_nobody)
{
	/* The old VMM completed: the new one may have been told to run. */
	ck_assert_int_eq(decide(false, false, NULL, false, true, "postmigrate"), SETTLE_LOST);
	/* The commit was recorded. */
	ck_assert_int_eq(decide(true, false, NULL, false, true, "running"), SETTLE_LOST);
	ck_assert_int_eq(decide(true, false, NULL, false, true, NULL), SETTLE_LOST);
}
END_TEST

START_TEST(no_vmm_left_is_lost)
{
	ck_assert_int_eq(decide(false, false, NULL, false, false, NULL), SETTLE_LOST);
	ck_assert_int_eq(decide(false, true, "inmigrate", false, false, NULL), SETTLE_LOST);
	ck_assert_str_eq(settle_action_to_string(SETTLE_LOST), "lost");
	ck_assert_str_eq(settle_action_to_string(SETTLE_KEEP_NEW), "keep-new");
	ck_assert_str_eq(settle_action_to_string(SETTLE_RESUME_OLD), "resume-old");
}
END_TEST

int main(void)
{
	Suite *s = suite_create("settle");
	TCase *t = tcase_create("decide");
	SRunner *sr;
	int failed;

	tcase_add_test(t, a_new_vmm_that_runs_keeps_the_guest);
	tcase_add_test(t, a_new_vmm_that_holds_the_whole_state_keeps_the_guest);
	tcase_add_test(t, a_committed_new_vmm_keeps_the_guest_even_if_mute);
	tcase_add_test(t, a_new_vmm_that_answers_it_never_ran_gives_the_guest_back);
	tcase_add_test(t, a_gone_new_vmm_before_the_old_completed_gives_the_guest_back);
	tcase_add_test(t, a_gone_new_vmm_that_may_have_run_the_guest_resumes_nobody);
	tcase_add_test(t, no_vmm_left_is_lost);
	suite_add_tcase(s, t);
	sr = srunner_create(s);
	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? 1 : 0;
}
