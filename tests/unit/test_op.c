/* SPDX-License-Identifier: MIT */
/*
 * The operations' tables (daemon/core/op.h) without a process: each type's
 * phases, the moves it allows, the phases it writes the registry on
 * entering, and the VM states it starts from.
 */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/macro.h"
#include "daemon/ops/checkpoint.h"
#include "daemon/core/daemon.h"
#include "daemon/core/op.h"
#include "daemon/core/registry.h"
#include "daemon/strategies/strategy.h"
#include "daemon/ops/update.h"
#include "daemon/core/vm.h"

static const struct op_type *const phased[] = { &update_op_type, &checkpoint_op_type,
						&restore_op_type };

static struct daemon D;
static char dir[PATH_MAX];

static void setup(void)
{
	int fd = open("/dev/null", O_WRONLY | O_CLOEXEC);

	/* The refused moves are logged as bugs, by design: not here. */
	ck_assert_int_ge(fd, 0);
	ck_assert_int_ge(dup2(fd, STDERR_FILENO), 0);
	close(fd);
	snprintf(dir, sizeof(dir), "%s/test_op.XXXXXX", getenv("TMPDIR") ?: "/tmp");
	ck_assert_ptr_nonnull(mkdtemp(dir));
	D = (struct daemon){ .listen_fd = -EBADF };
	ck_assert_int_eq(registry_init(&D.registry, dir), 0);
}

static void teardown(void)
{
	(void)unlink(D.registry.path);
	registry_done(&D.registry);
	ck_assert_int_eq(rmdir(dir), 0);
}

static bool registry_written(void)
{
	return access(D.registry.path, F_OK) == 0;
}

static unsigned all_phases(const struct op_type *t)
{
	return t->n_phases >= 32 ? ~0u : (1u << t->n_phases) - 1;
}

/* Names unique and read back, moves and durable phases only among the
 * type's own phases, texts for refusals present. */
START_TEST(tables_are_well_formed)
{
	for (size_t i = 0; i < ELEMENTSOF(phased); i++) {
		const struct op_type *t = phased[i];

		ck_assert_ptr_nonnull(t->name);
		ck_assert_ptr_nonnull(t->busy);
		ck_assert_ptr_nonnull(t->verb);
		ck_assert_uint_ne(t->from, 0);
		ck_assert_uint_gt(t->n_phases, 1);
		ck_assert_uint_le(t->n_phases, OP_PHASES_MAX);
		ck_assert_uint_eq(t->durable & ~all_phases(t), 0);
		for (unsigned p = 0; p < t->n_phases; p++) {
			ck_assert_ptr_nonnull(t->phases[p]);
			ck_assert_int_eq(op_phase_from_name(t, t->phases[p]), (int)p);
			ck_assert_uint_eq(t->next[p] & ~all_phases(t), 0);
		}
		ck_assert_int_eq(op_phase_from_name(t, "no-such-phase"), -EINVAL);
		ck_assert_str_eq(op_phase_name(t, (int)t->n_phases), "unknown");
	}
}
END_TEST

/* Each strategy's table is a part of the engine's. */
START_TEST(strategies_move_only_as_the_engine_allows)
{
	const struct strategy *s;

	for (size_t i = 0; (s = strategy_nth(i)); i++) {
		for (int p = 0; p < _PHASE_MAX; p++)
			ck_assert_uint_eq(s->next[p] & ~update_op_type.next[p], 0);
		ck_assert_uint_eq(s->durable & ~all_phases(&update_op_type), 0);
	}
}
END_TEST

/* What a restarted cprd relies on finding in the registry. */
START_TEST(durable_phases_are_the_documented_ones)
{
	const struct op_type *t;

	ck_assert_uint_eq(update_op_type.durable, OP_PHASE(PHASE_END_OLD));
	ck_assert_uint_eq(strategy_find("cpr-exec")->durable, OP_PHASE(PHASE_MIGRATE));
	ck_assert_uint_eq(strategy_find("handover")->durable, 0);
	ck_assert_uint_eq(strategy_find("cpr-transfer")->durable, 0);
	/* The commit is never written: it is inside the guest's blackout. */
	ck_assert_uint_eq(update_op_type.durable & OP_PHASE(PHASE_COMMIT), 0);

	t = &checkpoint_op_type;
	ck_assert_uint_eq(t->durable, OP_PHASE(op_phase_from_name(t, "write")) |
					  OP_PHASE(op_phase_from_name(t, "placed")));
	t = &restore_op_type;
	ck_assert_uint_eq(t->durable, OP_PHASE(op_phase_from_name(t, "load")) |
					  OP_PHASE(op_phase_from_name(t, "runs")));
}
END_TEST

/* The moves each operation relies on, and those it must never make, said
 * here rather than read from the table under test. */
static bool moves(const struct op_type *t, const char *from, const char *to)
{
	return op_may_move(t, op_phase_from_name(t, from), op_phase_from_name(t, to));
}

START_TEST(the_documented_moves_and_no_others)
{
	const struct op_type *k = &checkpoint_op_type, *r = &restore_op_type;

	ck_assert(moves(k, "open", "write") && moves(k, "write", "placed"));
	ck_assert(moves(k, "open", "rollback") && moves(k, "write", "rollback"));
	/* Placed is the end; rolling back never leads anywhere. */
	ck_assert(!moves(k, "open", "placed") && !moves(k, "placed", "rollback"));
	ck_assert(!moves(k, "rollback", "write") && !moves(k, "placed", "write"));
	ck_assert(moves(r, "start", "load") && moves(r, "load", "runs"));
	ck_assert(!moves(r, "start", "runs") && !moves(r, "runs", "load"));
	ck_assert(!moves(r, "load", "start"));
}
END_TEST

/* Every move of every type is made exactly when its table has it, and
 * writes the registry exactly when it enters a durable phase; a refused
 * move changes nothing and writes nothing. */
START_TEST(moves_follow_the_table_and_durable_phases_write)
{
	struct vm vm = { .d = &D, .cfg.name = (char *)"vm0" };

	for (size_t i = 0; i < ELEMENTSOF(phased); i++) {
		const struct op_type *t = phased[i];

		for (int from = 0; from < (int)t->n_phases; from++)
			for (int to = 0; to < (int)t->n_phases; to++) {
				struct op op = {
					.type = t, .vm = &vm, .phase = from, .durable = t->durable
				};
				bool ok = t->next[from] & OP_PHASE(to);
				int r = 1;

				(void)unlink(D.registry.path);
				ck_assert_int_eq(op_set_phase(&op, to, &r), ok);
				ck_assert_int_eq(op.phase, ok ? to : from);
				ck_assert_int_eq(registry_written(),
						 ok && (t->durable & OP_PHASE(to)));
				if (ok)
					ck_assert_int_eq(r, 0);
			}
	}
}
END_TEST

/* The states each operation starts from, as the methods refuse others. */
START_TEST(operations_start_from_their_states)
{
	for (int s = 0; s < _VM_STATE_MAX; s++) {
		ck_assert_int_eq(op_may_start_in(&update_op_type, s), s == VM_RUNNING);
		ck_assert_int_eq(op_may_start_in(&checkpoint_op_type, s),
				 s == VM_RUNNING || s == VM_PAUSED);
		ck_assert_int_eq(op_may_start_in(&restore_op_type, s), s == VM_CHECKPOINTED);
	}
	ck_assert(!op_may_start_in(&update_op_type, -1));
	ck_assert(!op_may_start_in(&update_op_type, 40));
}
END_TEST

static Suite *op_suite(void)
{
	Suite *s = suite_create("op");
	TCase *tc = tcase_create("tables");

	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_add_test(tc, tables_are_well_formed);
	tcase_add_test(tc, strategies_move_only_as_the_engine_allows);
	tcase_add_test(tc, durable_phases_are_the_documented_ones);
	tcase_add_test(tc, the_documented_moves_and_no_others);
	tcase_add_test(tc, moves_follow_the_table_and_durable_phases_write);
	tcase_add_test(tc, operations_start_from_their_states);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	SRunner *sr = srunner_create(op_suite());
	int failed;

	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
