/* SPDX-License-Identifier: MIT */
/* What one peer may take of cprd: the rules in daemon/core/limits.c. */
#include <check.h>

#include "daemon/core/limits.h"

static enum admit_verdict admit(bool privileged, uid_t uid, unsigned total, unsigned unpriv,
				unsigned same_uid)
{
	struct peer_limits l = PEER_LIMITS_DEFAULT;
	struct peer_counts n = { .total = total, .unprivileged = unpriv, .same_uid = same_uid };

	return limits_admit(&l, privileged, uid, &n);
}

START_TEST(a_uid_gets_its_share_and_no_more)
{
	ck_assert_int_eq(admit(false, 65534, 63, 63, 63), ADMIT_OK);
	ck_assert_int_eq(admit(false, 65534, 64, 64, 64), ADMIT_UID);
	/* Another unprivileged uid is not held back by the first. */
	ck_assert_int_eq(admit(false, 1000, 64, 64, 0), ADMIT_OK);
	ck_assert_str_eq(admit_verdict_to_string(ADMIT_UID), "too many connections from this uid");
}
END_TEST

START_TEST(root_gets_in_when_unprivileged_peers_took_their_slots)
{
	unsigned open = LIMITS_MAX_CLIENTS - LIMITS_RESERVED_PRIVILEGED;

	/* Many uids together filled every slot open to them. */
	ck_assert_int_eq(admit(false, 1000, open, open, 0), ADMIT_UNPRIVILEGED);
	ck_assert_int_eq(admit(true, 0, open, open, 0), ADMIT_OK);
	/* Group cprd uses the reserved slots too, within its per-uid share. */
	ck_assert_int_eq(admit(true, 999, open, open, 0), ADMIT_OK);
	ck_assert_int_eq(admit(true, 999, open + 10, open, 64), ADMIT_UID);
	/* Root is limited by the total only. */
	ck_assert_int_eq(admit(true, 0, LIMITS_MAX_CLIENTS - 1, open, 500), ADMIT_OK);
	ck_assert_int_eq(admit(true, 0, LIMITS_MAX_CLIENTS, open, 500), ADMIT_FULL);
}
END_TEST

START_TEST(no_per_uid_limit_when_set_to_zero)
{
	struct peer_limits l = PEER_LIMITS_DEFAULT;
	struct peer_counts n = { .total = 500, .unprivileged = 500, .same_uid = 500 };

	l.max_per_uid = 0;
	ck_assert_int_eq(limits_admit(&l, false, 1000, &n), ADMIT_OK);
	n.total = n.unprivileged = n.same_uid = LIMITS_MAX_CLIENTS - LIMITS_RESERVED_PRIVILEGED;
	ck_assert_int_eq(limits_admit(&l, false, 1000, &n), ADMIT_UNPRIVILEGED);
}
END_TEST

START_TEST(the_output_share_splits_the_budget_but_keeps_a_floor)
{
	struct peer_limits l = PEER_LIMITS_DEFAULT;

	ck_assert_uint_eq(limits_out_share(&l, 0), LIMITS_OUT_BUDGET);
	ck_assert_uint_eq(limits_out_share(&l, 1), LIMITS_OUT_BUDGET);
	ck_assert_uint_eq(limits_out_share(&l, 32), LIMITS_OUT_BUDGET / 32);
	ck_assert_uint_eq(limits_out_share(&l, 1024), LIMITS_OUT_MIN_SHARE);
}
END_TEST

START_TEST(over_its_share_a_client_is_throttled_then_dropped_once_the_budget_is_spent)
{
	struct peer_limits l = PEER_LIMITS_DEFAULT;
	size_t share = limits_out_share(&l, 40);

	ck_assert_int_eq(limits_out_check(&l, 40, share, share), OUT_OK);
	ck_assert_int_eq(limits_out_check(&l, 40, share + 1, share + 1), OUT_THROTTLE);
	ck_assert_int_eq(limits_out_check(&l, 40, share + 1, LIMITS_OUT_BUDGET), OUT_THROTTLE);
	ck_assert_int_eq(limits_out_check(&l, 40, share + 1, LIMITS_OUT_BUDGET + 1), OUT_DROP);
	/* Within its share a client is never the one dropped. */
	ck_assert_int_eq(limits_out_check(&l, 40, share, 2 * LIMITS_OUT_BUDGET), OUT_OK);
}
END_TEST

START_TEST(the_log_says_it_once_per_interval_and_counts_the_rest)
{
	struct ratelimit rl = { .interval_usec = 10 * 1000000ULL };
	unsigned n = 99;

	ck_assert(ratelimit_pass(&rl, 1000, &n));
	ck_assert_uint_eq(n, 0);
	ck_assert(!ratelimit_pass(&rl, 2000, &n));
	ck_assert(!ratelimit_pass(&rl, 1000 + 9999999, NULL));
	ck_assert(ratelimit_pass(&rl, 1000 + 10000000, &n));
	ck_assert_uint_eq(n, 2);
	ck_assert(!ratelimit_pass(&rl, 1000 + 10000001, NULL));
	ck_assert(ratelimit_pass(&rl, 1000 + 30000000, &n));
	ck_assert_uint_eq(n, 1);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("limits");
	TCase *t = tcase_create("limits");
	SRunner *sr;
	int failed;

	tcase_add_test(t, a_uid_gets_its_share_and_no_more);
	tcase_add_test(t, root_gets_in_when_unprivileged_peers_took_their_slots);
	tcase_add_test(t, no_per_uid_limit_when_set_to_zero);
	tcase_add_test(t, the_output_share_splits_the_budget_but_keeps_a_floor);
	tcase_add_test(t,
		       over_its_share_a_client_is_throttled_then_dropped_once_the_budget_is_spent);
	tcase_add_test(t, the_log_says_it_once_per_interval_and_counts_the_rest);
	suite_add_tcase(s, t);
	sr = srunner_create(s);
	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? 1 : 0;
}
