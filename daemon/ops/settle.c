/* SPDX-License-Identifier: MIT */
#include <string.h>

#include "common/macro.h"
#include "daemon/ops/settle.h"

static bool is(const char *status, const char *what)
{
	return status && streq(status, what);
}

/*
 * The new VMM starts paused (-S) and runs the guest only once it has the
 * whole state and cprd has told it to, which cprd does only after the old
 * VMM completed its side (postmigrate). So:
 *  - a new VMM that runs, or holds the whole state, or was told to run
 *    (the commit is recorded) keeps the guest;
 *  - a new VMM that answered that it does not run never ran it: the old
 *    VMM resumes;
 *  - a new VMM that is gone or mute may have run it once the commit was
 *    recorded or the old VMM had completed: the old VMM must not resume
 *    from the state the guest left;
 *  - otherwise the guest never left the old VMM.
 */
enum settle_action settle_decide(const struct settle_facts *f)
{
	if (f->new_alive && (f->committed || is(f->new_status, "running") ||
			     ((is(f->new_status, "paused") || is(f->new_status, "postmigrate")) &&
			      f->new_completed)))
		return SETTLE_KEEP_NEW;
	if (f->new_alive && f->new_status)
		return f->old_alive ? SETTLE_RESUME_OLD : SETTLE_LOST;
	if (f->committed || (f->old_alive && is(f->old_status, "postmigrate")))
		return SETTLE_LOST;
	return f->old_alive ? SETTLE_RESUME_OLD : SETTLE_LOST;
}

const char *settle_action_to_string(enum settle_action a)
{
	switch (a) {
	case SETTLE_KEEP_NEW:
		return "keep-new";
	case SETTLE_RESUME_OLD:
		return "resume-old";
	case SETTLE_LOST:
		return "lost";
	}
	return "unknown";
}
