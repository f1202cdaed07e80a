/* SPDX-License-Identifier: MIT */
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <systemd/sd-journal.h>
#include <time.h>

#include "common/clock.h"
#include "common/escape.h"
#include "daemon/core/limits.h"
#include "daemon/observe/log.h"

#define LOG_LINE_MAX 2048
#define LOG_FIELDS_MAX 16

static bool to_journal;
static int max_prio = LOG_INFO;

/* systemd connected stderr to the journal: JOURNAL_STREAM names the
 * device and inode of that stream, and only while stderr is still it
 * (not redirected by a wrapper) are lines sent to the journal directly. */
static bool stderr_is_journal(void)
{
	const char *e = getenv("JOURNAL_STREAM");
	unsigned long long dev, ino;
	struct stat st;

	if (!e || sscanf(e, "%llu:%llu", &dev, &ino) != 2)
		return false;
	if (fstat(STDERR_FILENO, &st) < 0)
		return false;
	return (unsigned long long)st.st_dev == dev && (unsigned long long)st.st_ino == ino;
}

void log_setup(void)
{
	const char *lvl = getenv("CPRD_LOG_LEVEL");

	to_journal = stderr_is_journal();
	if (lvl && lvl[0] == 'd')
		max_prio = LOG_DEBUG;
}

/* "VM NAME: ..." is how every line about one VM begins ("update vm=NAME
 * ..." for an update's result). */
static bool vm_of(const char *msg, char *vm, size_t size)
{
	const char *end;

	if (strncmp(msg, "VM ", 3) == 0) {
		msg += 3;
		end = strchr(msg, ':');
	} else if (strncmp(msg, "update vm=", 10) == 0) {
		msg += 10;
		end = strchr(msg, ' ');
	} else {
		return false;
	}
	if (!end || end == msg || (size_t)(end - msg) >= size || memchr(msg, ' ', end - msg))
		return false;
	memcpy(vm, msg, end - msg);
	vm[end - msg] = '\0';
	return true;
}

static int field(struct iovec *iov, size_t *n, char *buf, size_t size, const char *fmt, ...)
{
	va_list ap;
	int len;

	va_start(ap, fmt);
	len = vsnprintf(buf, size, fmt, ap);
	va_end(ap);
	if (len < 0 || *n >= LOG_FIELDS_MAX)
		return -EINVAL;
	iov[(*n)++] = (struct iovec){ .iov_base = buf,
				      .iov_len = (size_t)len < size ? (size_t)len : size - 1 };
	return 0;
}

/* One journal entry: MESSAGE, PRIORITY, CPRD_VM= for a line about a VM,
 * MESSAGE_ID and the caller's fields when given. */
static void send_journal(int prio, const char *message_id, const char *const *fields,
			 const char *msg)
{
	char m[LOG_LINE_MAX + 8], p[16], id[48], vm[160], vmf[168],
	    esc[LOG_FIELDS_MAX][LOG_LINE_MAX];
	struct iovec iov[LOG_FIELDS_MAX];
	size_t n = 0;
	bool have_vm = false;

	(void)field(iov, &n, m, sizeof(m), "MESSAGE=%s", msg);
	(void)field(iov, &n, p, sizeof(p), "PRIORITY=%d", prio);
	if (message_id)
		(void)field(iov, &n, id, sizeof(id), "MESSAGE_ID=%s", message_id);
	for (size_t i = 0; fields && fields[i] && n < LOG_FIELDS_MAX; i++) {
		have_vm |= strncmp(fields[i], "CPRD_VM=", 8) == 0;
		(void)field(iov, &n, esc[i], sizeof(esc[i]), "%s", fields[i]);
		if (str_needs_escape(fields[i], strlen(fields[i])))
			iov[n - 1].iov_len =
			    str_escape(fields[i], strlen(fields[i]), esc[i], sizeof(esc[i]));
	}
	if (!have_vm && vm_of(msg, vm, sizeof(vm)))
		(void)field(iov, &n, vmf, sizeof(vmf), "CPRD_VM=%s", vm);
	if (sd_journal_sendv(iov, (int)n) < 0) {
		/* The journal refused it: stderr, which goes there too. */
		dprintf(STDERR_FILENO, "<%d>%s\n", prio, msg);
	}
}

static void vlog(int prio, const char *message_id, const char *const *fields, const char *fmt,
		 va_list ap)
{
	static const char *const names[] = { "emerg",   "alert",  "crit", "error",
					     "warning", "notice", "info", "debug" };
	char line[LOG_LINE_MAX], msg[LOG_LINE_MAX], esc[LOG_LINE_MAX], ts[32];
	const char *text = msg;
	struct timespec now;
	struct tm tm;
	int saved = errno, n = 0, len;

	if (prio > max_prio)
		return;
	len = vsnprintf(msg, sizeof(msg), fmt, ap);
	len = len < 0 ? 0 : MIN(len, (int)sizeof(msg) - 1);
	/* One line, whatever a message quotes: what a VMM or a peer wrote
	 * cannot end it and forge the next one, nor drive a terminal. */
	if (str_needs_escape(msg, (size_t)len)) {
		str_escape(msg, (size_t)len, esc, sizeof(esc));
		text = esc;
	}
	if (to_journal) {
		send_journal(prio, message_id, fields, text);
		errno = saved;
		return;
	}
	clock_gettime(CLOCK_REALTIME, &now);
	localtime_r(&now.tv_sec, &tm);
	strftime(ts, sizeof(ts), "%Y-%m-%dT%H:%M:%S", &tm);
	n = snprintf(line, sizeof(line), "%s.%03ld cprd[%d] %s: %s", ts, now.tv_nsec / 1000000,
		     (int)getpid(), names[prio & 7], text);
	if (n > (int)sizeof(line) - 2)
		n = (int)sizeof(line) - 2;
	line[n++] = '\n';
	/* One write() per line, so that lines from concurrent writers never mix. */
	(void)!write(STDERR_FILENO, line, (size_t)n);
	errno = saved;
}

void log_msg(int prio, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vlog(prio, NULL, NULL, fmt, ap);
	va_end(ap);
}

void log_struct(int prio, const char *message_id, const char *const *fields, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vlog(prio, message_id, fields, fmt, ap);
	va_end(ap);
}

void log_ratelimited(struct ratelimit *rl, int prio, const char *fmt, ...)
{
	char line[LOG_LINE_MAX];
	unsigned held = 0;
	va_list ap;

	if (!ratelimit_pass(rl, now_usec(CLOCK_MONOTONIC), &held))
		return;
	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	if (held > 0)
		log_msg(prio, "%s (%u more like it since the last one were not logged)", line,
			held);
	else
		log_msg(prio, "%s", line);
}
