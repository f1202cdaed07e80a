/* SPDX-License-Identifier: MIT */
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/xattr.h>
#include <unistd.h>

#include "common/access.h"
#include "common/macro.h"

static bool creds_in_group(const struct creds *c, gid_t g)
{
	if (c->gid == g)
		return true;
	for (size_t i = 0; i < c->ngroups && i < CREDS_GROUPS_MAX; i++)
		if (c->groups[i] == g)
			return true;
	return false;
}

bool creds_may(const struct creds *c, const struct stat *st, int want)
{
	unsigned bits = 0, granted;

	if (want & R_OK)
		bits |= 4;
	if (want & W_OK)
		bits |= 2;
	if (want & X_OK)
		bits |= 1;
	if (st->st_uid == c->uid)
		granted = (st->st_mode >> 6) & 7;
	else if (creds_in_group(c, st->st_gid))
		granted = (st->st_mode >> 3) & 7;
	else
		granted = st->st_mode & 7;
	return (granted & bits) == bits;
}

/* A POSIX ACL on the inode behind fd (opened O_PATH): asked through
 * /proc, since the *xattr calls refuse O_PATH fds. */
static bool has_acl(int fd)
{
	char p[64];

	snprintf(p, sizeof(p), "/proc/self/fd/%d", fd);
	return getxattr(p, "system.posix_acl_access", NULL, 0) > 0;
}

static int check_step(int fd, const struct creds *c, int want, unsigned opts, struct stat *st)
{
	if (fstat(fd, st) < 0)
		return -errno;
	if (!c)
		return 0;
	if (has_acl(fd))
		return -EPERM;
	if (!creds_may(c, st, want))
		return -EACCES;
	if (opts & OPEN_AS_MAY_CHANGE)
		return 0;
	/* What c can change could be swapped for something else later. */
	return creds_may(c, st, W_OK) || st->st_uid == c->uid ? -ETXTBSY : 0;
}

int open_as(const char *path, const struct creds *c, int *ret_fd, char **ret_canon)
{
	return open_as_flags(path, c, O_RDONLY, 0, ret_fd, ret_canon);
}

int open_as_flags(const char *path, const struct creds *c, int flags, unsigned opts, int *ret_fd,
		  char **ret_canon)
{
	_cleanup_free_ char *canon = NULL, *whole = NULL;
	_cleanup_close_ int dir = -EBADF;
	char *name, *next;
	struct stat st, before;
	int fd, r;

	if (!path || path[0] != '/')
		return -EINVAL;
	canon = realpath(path, NULL);
	if (!canon)
		return -errno;
	/* The walk below cuts canon into its components. */
	if (ret_canon && !(whole = strdup(canon)))
		return -ENOMEM;
	dir = open("/", O_PATH | O_DIRECTORY | O_CLOEXEC);
	if (dir < 0)
		return -errno;
	for (name = canon + 1;; name = next) {
		next = strchr(name, '/');
		r = check_step(dir, c, X_OK, opts, &st);
		if (r < 0)
			return r;
		if (!next)
			break;
		*next++ = '\0';
		fd = openat(dir, name, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
		if (fd < 0)
			return -errno;
		safe_close(dir);
		dir = fd;
	}
	/* Look before opening: opening a device, even to refuse it, can act
	 * on it (a tape rewinds). */
	if (fstatat(dir, name, &before, AT_SYMLINK_NOFOLLOW) < 0)
		return -errno;
	if (!S_ISREG(before.st_mode))
		return S_ISLNK(before.st_mode) ? -ELOOP : -EBADFD;
	fd = openat(dir, name,
		    (flags & (O_ACCMODE | O_DIRECT)) | O_NONBLOCK | O_NOFOLLOW | O_NOCTTY |
			O_CLOEXEC);
	if (fd < 0)
		return -errno;
	r = check_step(fd, c, (flags & O_ACCMODE) == O_RDONLY ? R_OK : R_OK | W_OK, opts, &st);
	if (r == 0 &&
	    (!S_ISREG(st.st_mode) || st.st_ino != before.st_ino || st.st_dev != before.st_dev))
		r = -EBADFD; /* swapped between the look and the open */
	if (r == 0 && fcntl(fd, F_SETFL, flags & O_DIRECT) < 0)
		r = -errno;
	if (r < 0) {
		safe_close(fd);
		return r;
	}
	*ret_fd = fd;
	if (ret_canon)
		*ret_canon = TAKE_PTR(whole);
	return 0;
}

bool fd_is_root_only(int fd)
{
	struct stat st;

	return fstat(fd, &st) == 0 && st.st_uid == 0 && !(st.st_mode & (S_IWGRP | S_IWOTH));
}
