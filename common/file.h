/* SPDX-License-Identifier: MIT */
/*
 * Reading small files: whole, or the tail. Library code: no logging, no
 * global state.
 */
#pragma once

#include <stdbool.h>

#include <errno.h>
#include <stdlib.h>
#include <sys/types.h>
#include <unistd.h>

/* Read at most max bytes of fd from offset on, looping over short reads,
 * into a NUL-terminated buffer the caller frees. Returns the length read
 * (0 at EOF) or a negative errno. */
static inline ssize_t read_at_most(int fd, off_t offset, size_t max, char **ret)
{
	char *buf = malloc(max + 1);
	size_t len = 0;

	if (!buf)
		return -ENOMEM;
	while (len < max) {
		ssize_t n = pread(fd, buf + len, max - len, offset + (off_t)len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			int e = errno;

			free(buf);
			return -e;
		}
		if (n == 0)
			break;
		len += (size_t)n;
	}
	buf[len] = '\0';
	*ret = buf;
	return (ssize_t)len;
}

/* The data of in's last limit bytes before offset end (the whole file when
 * it is shorter), holes skipped, appended to out at out's own offset: at
 * most limit bytes are written, whatever size a writer gave the file.
 * Stops early where in was truncated under it. 0 or a negative errno. */
int file_copy_tail(int in, off_t end, off_t limit, int out);

/* The last size - 1 bytes of the file name in the directory dirfd (never
 * through a symlink), trailing newlines and blanks dropped and the others
 * folded into spaces, NUL-terminated: what a process wrote to its log
 * before it died, on one line. Empty when the file cannot be read. */
void file_tail(int dirfd, const char *name, char *buf, size_t size);
/* The same, of what was written at or after offset from only (a file
 * shorter than from was truncated since: all of it). */
void file_tail_from(int dirfd, const char *name, off_t from, char *buf, size_t size);

/* Copy-truncate rotation of a log that another process appends to through
 * its own O_APPEND fd (which cprd cannot replace): once the regular file
 * name in dirfd is larger than max bytes, the data of its last max bytes
 * (holes skipped: file_copy_tail()) is copied to name.1 (replacing the
 * previous one) and the file truncated to 0 in place, so the writer's next
 * write lands at the start and `tail -f` follows on. name.1 never holds
 * more than max bytes, so a writer that inflates the file (ftruncate() to
 * 1 GiB costs it nothing) cannot make the copy cost more: what it wrote
 * before the last max bytes is dropped, and so is what it adds between
 * the end of the copy and the truncation. A copy that fails still
 * truncates: the size bound comes first. Never follows a symlink at either
 * name. Returns 1 when it rotated, 0 when the file is within max or
 * absent, else a negative errno (-ELOOP: a symlink stands there, left
 * alone). */
int file_rotate(int dirfd, const char *name, off_t max);

/* Unlink every entry of the directory at path that is not a directory
 * itself (it does not recurse). 0, or the first negative errno. */
int rm_dir_entries(const char *path);

/* Whether both paths name the very same file (device and inode, links
 * followed); false when either cannot be looked at. */
bool file_same(const char *a, const char *b);
