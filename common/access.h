/* SPDX-License-Identifier: MIT */
/*
 * Opening a file with somebody else's rights: a root daemon that opens a
 * path on a peer's behalf must not read what the peer itself could not.
 * Library code: no logging, no policy.
 */
#pragma once

#include <stdbool.h>
#include <sys/stat.h>
#include <sys/types.h>

#define CREDS_GROUPS_MAX 64

struct creds {
	uid_t uid;
	gid_t gid;
	size_t ngroups; /* supplementary groups, at most CREDS_GROUPS_MAX */
	gid_t groups[CREDS_GROUPS_MAX];
};

/* Whether the mode bits of st grant c every access in want (R_OK, W_OK,
 * X_OK, or'ed), as the kernel judges them without capabilities: the owner
 * class if c owns the file, else the group class if any of c's groups owns
 * it, else the others class. uid 0 is not special here. */
bool creds_may(const struct creds *c, const struct stat *st, int want);

/*
 * Open the regular file at the absolute path for reading, as c could: the
 * path is made canonical, every directory on the way must be searchable by
 * c, the file readable by c, none of them c's own or writable by c (the
 * caller reads the path again later, as root), and no step may carry a POSIX ACL (which mode
 * bits do not describe; such a path is refused rather than guessed at).
 * The walk goes from fd to fd with O_NOFOLLOW, so nothing swapped in on the
 * way is followed. The file is opened O_NONBLOCK: a FIFO never blocks, it is
 * refused. With c NULL, the caller's own rights apply (root's: no check of
 * modes or ACLs), and the rest (canonical walk, regular file, never
 * blocking) holds the same. Returns 0 with *ret_fd (O_CLOEXEC, blocking again)
 * and, if ret_canon is not NULL, *ret_canon (the canonical path walked), or:
 *   -EINVAL  the path is not absolute
 *   -EACCES  c may not search a directory or read the file
 *   -EPERM   a step carries an ACL
 *   -ETXTBSY c owns or may write the file or a directory on the way: what
 *            it could swap later is not a safe thing to read again
 *   -EBADFD  the file is not a regular file
 *   -ENOENT, -ELOOP, ... as the walk met them
 */
int open_as(const char *path, const struct creds *c, int *ret_fd, char **ret_canon);

/* open_as() for reading and writing too: flags' access mode (O_RDONLY or
 * O_RDWR, which c must then have: read and write) and O_DIRECT are used.
 * With OPEN_AS_MAY_CHANGE in opts, c may own or write the file and the
 * directories on the way (-ETXTBSY is not returned): for a caller that
 * keeps the fd, or that checks on every later open that the file is the
 * very one opened now (its device and inode). */
#define OPEN_AS_MAY_CHANGE (1u << 0)
int open_as_flags(const char *path, const struct creds *c, int flags, unsigned opts, int *ret_fd,
		  char **ret_canon);

/* Whether the file at fd can only be changed by root: owned by uid 0 and
 * not writable by its group or others. */
bool fd_is_root_only(int fd);
