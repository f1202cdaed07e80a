/* SPDX-License-Identifier: MIT */
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "daemon/log.h"

static bool use_journal_prefix;
static int max_prio = LOG_INFO;

void log_setup(void)
{
	const char *lvl = getenv("CPRD_LOG_LEVEL");

	use_journal_prefix = getenv("JOURNAL_STREAM") != NULL;
	if (lvl && lvl[0] == 'd')
		max_prio = LOG_DEBUG;
}

/* One write() per line, so that lines from concurrent writers never mix. */
void log_msg(int prio, const char *fmt, ...)
{
	static const char *const names[] = { "emerg",   "alert",  "crit", "error",
					     "warning", "notice", "info", "debug" };
	char line[2048], ts[32];
	struct timespec now;
	struct tm tm;
	va_list ap;
	int saved = errno, n;

	if (prio > max_prio)
		return;
	if (use_journal_prefix) {
		n = snprintf(line, sizeof(line), "<%d>", prio);
	} else {
		clock_gettime(CLOCK_REALTIME, &now);
		localtime_r(&now.tv_sec, &tm);
		strftime(ts, sizeof(ts), "%Y-%m-%dT%H:%M:%S", &tm);
		n = snprintf(line, sizeof(line), "%s.%03ld cprd[%d] %s: ", ts,
			     now.tv_nsec / 1000000, (int)getpid(), names[prio & 7]);
	}
	va_start(ap, fmt);
	n += vsnprintf(line + n, sizeof(line) - (size_t)n - 1, fmt, ap);
	va_end(ap);
	if (n > (int)sizeof(line) - 2)
		n = (int)sizeof(line) - 2;
	line[n++] = '\n';
	(void)!write(STDERR_FILENO, line, (size_t)n);
	errno = saved;
}
