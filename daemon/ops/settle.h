/* SPDX-License-Identifier: MIT */
/*
 * What a restarted cprd does with an update it did not see end: a pure
 * decision over what it can still find out, so that it is tested on its
 * own (tests/unit/test_settle.c). recover.c gathers the facts and acts.
 */
#pragma once

#include <stdbool.h>

struct settle_facts {
	bool committed;         /* the registry recorded the commit phase */
	bool new_alive;         /* the new VMM is the process recorded */
	const char *new_status; /* its query-status, NULL when it did not answer */
	bool new_completed;     /* its incoming migration completed */
	bool old_alive;
	const char *old_status; /* NULL when it did not answer */
};

enum settle_action {
	SETTLE_KEEP_NEW,   /* the guest is (or goes on) in the new VMM; end the old */
	SETTLE_RESUME_OLD, /* the guest never left the old VMM; end the new */
	SETTLE_LOST,       /* it may have run in a new VMM that is gone: resume nobody */
};

enum settle_action settle_decide(const struct settle_facts *f);
const char *settle_action_to_string(enum settle_action a);
