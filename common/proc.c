/* SPDX-License-Identifier: MIT */
#include <fcntl.h>
#include <stdbool.h>
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

int proc_image_id(pid_t pid, uint64_t *ret)
{
	char path[64];
	uint8_t buf[1024];
	uint64_t h = 0xcbf29ce484222325ULL; /* FNV-1a */
	_cleanup_close_ int fd = -EBADF;
	ssize_t n;

	snprintf(path, sizeof(path), "/proc/%d/auxv", (int)pid);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	n = read(fd, buf, sizeof(buf));
	if (n < 0)
		return -errno;
	if (n == 0)
		return -ESRCH; /* a zombie, or a kernel thread */
	for (ssize_t i = 0; i < n; i++)
		h = (h ^ buf[i]) * 0x100000001b3ULL;
	*ret = h;
	return 0;
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

bool unix_listening(pid_t pid, const char *path)
{
	char table[64];
	_cleanup_(fclosep) FILE *f = NULL;
	char line[512];
	size_t plen = strlen(path);

	snprintf(table, sizeof(table), "/proc/%d/net/unix", (int)pid);
	f = fopen(table, "re");

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

/* A mapping's file that is gone from disk, and is no memory that never
 * had a file there (a memfd, System V or POSIX shared memory). */
static bool is_replaced_file(const char *path)
{
	static const char suffix[] = " (deleted)";
	size_t n = strlen(path), k = sizeof(suffix) - 1;

	if (path[0] != '/' || n <= k || !streq(path + n - k, suffix))
		return false;
	return strncmp(path, "/memfd:", 7) != 0 && strncmp(path, "/SYSV", 5) != 0 &&
	       strncmp(path, "/dev/", 5) != 0;
}

/* Append the file's name (not its directory, nor " (deleted)") to buf. */
static void list_add(char *buf, size_t size, const char *path)
{
	size_t len = strlen(buf), n = strlen(path) - strlen(" (deleted)");
	const char *name = memrchr(path, '/', n);

	name = name ? name + 1 : path;
	n -= (size_t)(name - path);
	if (len + n + 3 >= size)
		return;
	if (len) {
		memcpy(buf + len, ", ", 2);
		len += 2;
	}
	memcpy(buf + len, name, n);
	buf[len + n] = '\0';
}

int proc_replaced_files(pid_t pid, char *buf, size_t size)
{
	_cleanup_(fclosep) FILE *f = NULL;
	char path[64], line[4096 + 128], dev[16];
	unsigned long inodes[64];
	size_t seen = 0;
	int count = 0;

	buf[0] = '\0';
	snprintf(path, sizeof(path), "/proc/%d/maps", (int)pid);
	f = fopen(path, "re");
	if (!f)
		return -errno;
	while (fgets(line, sizeof(line), f)) {
		unsigned long inode;
		bool again = false;
		int off = 0;

		line[strcspn(line, "\n")] = '\0';
		/* address perms offset dev inode, then the path after blanks */
		if (sscanf(line, "%*s %*s %*s %15s %lu %n", dev, &inode, &off) < 2 || off <= 0)
			continue;
		if (!is_replaced_file(line + off))
			continue;
		/* A library is mapped several times: count it once. */
		for (size_t i = 0; i < seen && !again; i++)
			again = inodes[i] == inode;
		if (again)
			continue;
		if (seen < ELEMENTSOF(inodes))
			inodes[seen++] = inode;
		count++;
		list_add(buf, size, line + off);
	}
	return count;
}
