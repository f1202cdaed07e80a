/* SPDX-License-Identifier: MIT */
#pragma once

#include <syslog.h>

#include "common/macro.h"

/* Logging belongs to the daemon alone. Under systemd (stderr is the stream
 * JOURNAL_STREAM names) each line is one journal entry, and a line about a
 * VM ("VM NAME: ...") carries CPRD_VM=NAME; elsewhere a timestamped line on
 * stderr. */
void log_setup(void);
_printf_(2, 3) void log_msg(int prio, const char *fmt, ...);

/* Journal message ids, documented in units/cprd.catalog. */
#define CPRD_MESSAGE_UPDATE "ae081965fb0a44d390d312bbf3d2f862"
#define CPRD_MESSAGE_STARTED "e4972ca2f7b34959a65fdf99da5ec2b9"

/* A line with a MESSAGE_ID and more journal fields ("KEY=value", the list
 * ends with NULL); on stderr the line alone. */
_printf_(4, 5) void log_struct(int prio, const char *message_id, const char *const *fields,
			       const char *fmt, ...);

struct ratelimit;

/* A line a peer can cause, as often as it likes: at most one per rl's
 * interval (limits.h); the next one that is logged says how many were
 * held back meanwhile. */
_printf_(3, 4) void log_ratelimited(struct ratelimit *rl, int prio, const char *fmt, ...);

#define log_debug(...) log_msg(LOG_DEBUG, __VA_ARGS__)
#define log_info(...) log_msg(LOG_INFO, __VA_ARGS__)
#define log_notice(...) log_msg(LOG_NOTICE, __VA_ARGS__)
#define log_warning(...) log_msg(LOG_WARNING, __VA_ARGS__)
#define log_error(...) log_msg(LOG_ERR, __VA_ARGS__)

/* Log and return r (a negative errno), for "return log_error_errno(r, ...)". */
#define log_error_errno(r, fmt, ...)                                         \
	({                                                                   \
		int _r_ = (r);                                               \
		log_msg(LOG_ERR, fmt ": %s", ##__VA_ARGS__, strerror(-_r_)); \
		_r_;                                                         \
	})
