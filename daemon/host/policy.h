/* SPDX-License-Identifier: MIT */
/*
 * Which binaries a peer that is not root may have cprd run as root: the
 * VMMs named in a root-owned allow-list, and for a re-exec cprd's own
 * binary. Root peers are not limited (they could run anything anyway).
 */
#pragma once

#include <stddef.h>

#define POLICY_DEFAULT_FILE "/etc/cprd/vmm.allow"
#define POLICY_DEFAULT_VMM "/usr/bin/qemu-system-*"

struct policy {
	char **vmm; /* fnmatch(3) patterns of canonical absolute paths */
	size_t n_vmm;
	char *source; /* the file they came from; NULL: the built-in default */
};

/*
 * Read the allow-list at path: one absolute path or pattern per line,
 * blank lines and '#' comments ignored. The file must be root's alone
 * (owned by root, writable by nobody else). When path is the default and
 * there is no such file, the built-in default applies. On error *ret_line
 * names the offending line (0: the file as a whole).
 */
int policy_load(struct policy *p, const char *path, unsigned *ret_line);
void policy_done(struct policy *p);

/*
 * Whether a peer that is not root may have cprd run the binary at path:
 *   0        yes, and *ret_canon (if not NULL) is its canonical path: the
 *            one to store and execute, since the file there and every
 *            directory above it are root's alone, while path itself (a
 *            symlink of the peer's, say) may name another file tomorrow
 *   -EACCES  its canonical path matches no pattern
 *   -EPERM   it, or a directory above it, could be changed by someone but
 *            root (owner not root, or writable by group or others)
 *   -ENOENT, ... it cannot be resolved
 */
int policy_may_run(const struct policy *p, const char *path, char **ret_canon);

/* The same ownership rule for the re-exec binary already opened at fd
 * (O_PATH will do), which must also be cprd's own: the very file now at
 * self (canonical). The caller executes that fd, never the path again:
 * what was judged is what runs. 0, -EACCES (another file), -EPERM. */
int policy_may_reexec(const char *self, int fd);
