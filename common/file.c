/* SPDX-License-Identifier: MIT */
#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common/escape.h"
#include "common/file.h"
#include "common/macro.h"

void file_tail(int dirfd, const char *name, char *buf, size_t size)
{
	file_tail_from(dirfd, name, 0, buf, size);
}

void file_tail_from(int dirfd, const char *name, off_t from, char *buf, size_t size)
{
	_cleanup_close_ int fd =
	    openat(dirfd, name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY);
	_cleanup_free_ char *raw = NULL;
	struct stat st;
	ssize_t n;
	off_t off;

	buf[0] = '\0';
	if (fd < 0 || fstat(fd, &st) < 0 || !S_ISREG(st.st_mode))
		return;
	/* Shorter than from: truncated (rotated) since, so all of it is
	 * newer than from. */
	if (from > st.st_size)
		from = 0;
	off = st.st_size > (off_t)size - 1 ? st.st_size - (off_t)size + 1 : 0;
	if (off < from)
		off = from;
	raw = malloc(size);
	if (!raw)
		return;
	n = pread(fd, raw, size - 1, off);
	if (n <= 0)
		return;
	while (n > 0 && (raw[n - 1] == '\n' || raw[n - 1] == ' ' || raw[n - 1] == '\0'))
		n--;
	for (ssize_t i = 0; i < n; i++)
		if (raw[i] == '\n')
			raw[i] = ' ';
	/* The writer is a VMM: what it wrote is quoted in cprd's log and
	 * replies, escaped, and cut to size keeping the start of the tail. */
	str_escape(raw, (size_t)n, buf, size);
}

/* [off, end) of in appended to out, looping over short reads and writes. */
static int copy_range(int in, off_t off, off_t end, int out)
{
	char buf[65536];

	while (off < end) {
		size_t want = (size_t)MIN((off_t)sizeof(buf), end - off);
		ssize_t n = pread(in, buf, want, off), w = 0;

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		if (n == 0)
			return 0; /* truncated under us */
		while (w < n) {
			ssize_t k = write(out, buf + w, (size_t)(n - w));

			if (k < 0 && errno == EINTR)
				continue;
			if (k <= 0)
				return k < 0 ? -errno : -EIO;
			w += k;
		}
		off += n;
	}
	return 0;
}

int file_copy_tail(int in, off_t end, off_t limit, int out)
{
	off_t off = end > limit ? end - limit : 0;

	/* A hole is what a writer gets for free (ftruncate() far past its
	 * data): it is skipped, never read back as zeros and written out. */
	while (off < end) {
		off_t data = lseek(in, off, SEEK_DATA), hole;
		int r;

		if (data < 0)
			return errno == ENXIO ? 0 : -errno; /* no data after off */
		if (data >= end)
			return 0;
		hole = lseek(in, data, SEEK_HOLE);
		if (hole < 0)
			return -errno;
		r = copy_range(in, data, MIN(hole, end), out);
		if (r < 0)
			return r;
		off = hole;
	}
	return 0;
}

int file_rotate(int dirfd, const char *name, off_t max)
{
	_cleanup_close_ int fd = -EBADF, out = -EBADF;
	char old[NAME_MAX + 1], tmp[NAME_MAX + 1];
	struct stat st;
	int r;

	/* The common case, every few seconds per log: one stat, no open. */
	if (fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW) < 0)
		return errno == ENOENT ? 0 : -errno;
	if (S_ISLNK(st.st_mode))
		return -ELOOP;
	if (!S_ISREG(st.st_mode))
		return -EBADFD;
	if (st.st_size <= max)
		return 0;
	if ((size_t)snprintf(old, sizeof(old), "%s.1", name) >= sizeof(old) ||
	    (size_t)snprintf(tmp, sizeof(tmp), ".%s.1.tmp", name) >= sizeof(tmp))
		return -ENAMETOOLONG;
	fd = openat(dirfd, name, O_RDWR | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY);
	if (fd < 0)
		return -errno;
	if (fstat(fd, &st) < 0)
		return -errno;
	if (!S_ISREG(st.st_mode))
		return -EBADFD;
	/* A fresh temp file renamed over name.1: a symlink planted at either
	 * is replaced, never written through. */
	if (unlinkat(dirfd, tmp, 0) < 0 && errno != ENOENT)
		r = -errno;
	else if ((out = openat(dirfd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
			       0640)) < 0)
		r = -errno;
	else
		r = file_copy_tail(fd, st.st_size, max, out);
	if (r >= 0 && close(TAKE_FD(out)) < 0)
		r = -errno;
	if (r >= 0 && renameat(dirfd, tmp, dirfd, old) < 0)
		r = -errno;
	if (r < 0)
		(void)unlinkat(dirfd, tmp, 0);
	if (ftruncate(fd, 0) < 0)
		return -errno;
	return r < 0 ? r : 1;
}

int rm_dir_entries(const char *path)
{
	_cleanup_close_ int fd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	DIR *dir;
	struct dirent *de;
	int r = 0;

	if (fd < 0)
		return -errno;
	dir = fdopendir(fd);
	if (!dir)
		return -errno;
	TAKE_FD(fd);
	while ((de = readdir(dir)))
		if (!streq(de->d_name, ".") && !streq(de->d_name, "..") &&
		    unlinkat(dirfd(dir), de->d_name, 0) < 0 && r == 0)
			r = -errno;
	closedir(dir);
	return r;
}

bool file_same(const char *a, const char *b)
{
	struct stat sa, sb;

	return a && b && stat(a, &sa) == 0 && stat(b, &sb) == 0 && sa.st_dev == sb.st_dev &&
	       sa.st_ino == sb.st_ino;
}
