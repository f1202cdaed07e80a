/* SPDX-License-Identifier: MIT */
#pragma once

#include <syslog.h>

#include "common/macro.h"

/* Logging belongs to the daemon alone. Under systemd (JOURNAL_STREAM set)
 * lines carry a <N> priority prefix for the journal; elsewhere a timestamp. */
void log_setup(void);
_printf_(2, 3) void log_msg(int prio, const char *fmt, ...);

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
