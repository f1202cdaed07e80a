/* SPDX-License-Identifier: MIT */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/macro.h"
#include "common/proc.h"

unsigned long long proc_start_time(pid_t pid)
{
	char path[64], buf[1024], *p;
	unsigned long long start = 0;
	_cleanup_close_ int fd = -EBADF;
	ssize_t n;

	snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0;
	n = read(fd, buf, sizeof(buf) - 1);
	if (n <= 0)
		return 0;
	buf[n] = '\0';
	/* The command name may hold spaces and ')': fields count from the last ')'. */
	p = strrchr(buf, ')');
	if (!p)
		return 0;
	/* field 3 (state) follows: a zombie is no VMM, whoever reaps it */
	if (p[1] != ' ' || p[2] == 'Z' || p[2] == 'X')
		return 0;
	/* starttime is field 22 */
	if (sscanf(
		p + 2,
		"%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %*u %*u %*d %*d %*d %*d %*d %*d %llu",
		&start) != 1)
		return 0;
	return start;
}

pid_t pidfd_pid(int pidfd)
{
	char path[64], buf[512], *p;
	_cleanup_close_ int fd = -EBADF;
	ssize_t n;

	snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", pidfd);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0 || (n = read(fd, buf, sizeof(buf) - 1)) <= 0)
		return -1;
	buf[n] = '\0';
	p = strstr(buf, "\nPid:");
	return p ? (pid_t)strtol(p + 5, NULL, 10) : -1;
}

bool unix_listening(const char *path)
{
	_cleanup_(fclosep) FILE *f = fopen("/proc/net/unix", "re");
	char line[512];
	size_t plen = strlen(path);

	while (f && fgets(line, sizeof(line), f)) {
		unsigned long flags;
		size_t n = strcspn(line, "\n");

		line[n] = '\0';
		if (n <= plen || !streq(line + n - plen, path) || line[n - plen - 1] != ' ')
			continue;
		/* Num RefCount Protocol Flags ...: __SO_ACCEPTCON is 0x10000 */
		if (sscanf(line, "%*s %*s %*s %lx", &flags) == 1 && (flags & 0x10000))
			return true;
	}
	return false;
}
