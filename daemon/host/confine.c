/* SPDX-License-Identifier: MIT */
#include <fcntl.h>
#include <grp.h>
#include <libgen.h>
#include <limits.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "common/macro.h"
#include "daemon/host/confine.h"

/* Where the new root is assembled before pivot_root. Mounting over the
 * host's /tmp is harmless here (the mount namespace is the VMM's alone);
 * what is bound into it from under /tmp is opened (O_PATH) first, and
 * bound from /proc/self/fd, so the tmpfs does not hide it. */
#define ROOT "/tmp"

/* What QEMU's dynamic loader and its wrappers (#!/bin/sh) need besides
 * /usr: the merged-/usr symlinks, or the directories on a system without. */
static const char *const top_dirs[] = { "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32" };
static const char *const dev_nodes[] = { "/dev/null", "/dev/zero", "/dev/full", "/dev/random",
					 "/dev/urandom" };

_printf_(2, 3) static int fail(int e, const char *fmt, ...)
{
	char buf[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	dprintf(2, "cprd launcher: cannot confine the VMM: %s: %s\n", buf, strerror(e));
	return -e;
}

static bool path_under(const char *path, const char *dir)
{
	size_t n = strlen(dir);

	return strncmp(path, dir, n) == 0 && (path[n] == '/' || path[n] == '\0');
}

/* mkdir -p of ROOT + path (path absolute). */
static int mkdirs(const char *path)
{
	char p[PATH_MAX];

	if (snprintf(p, sizeof(p), ROOT "%s", path) >= (int)sizeof(p))
		return -ENAMETOOLONG;
	for (char *s = p + strlen(ROOT) + 1; *s; s++) {
		if (*s != '/')
			continue;
		*s = '\0';
		if (mkdir(p, 0755) < 0 && errno != EEXIST)
			return -errno;
		*s = '/';
	}
	if (mkdir(p, 0755) < 0 && errno != EEXIST)
		return -errno;
	return 0;
}

/* An empty file at ROOT + path, to bind a file or device node over. */
static int make_file(const char *path)
{
	char p[PATH_MAX], parent[PATH_MAX];
	int fd, r;

	snprintf(parent, sizeof(parent), "%s", path);
	r = mkdirs(dirname(parent));
	if (r < 0)
		return r;
	if (snprintf(p, sizeof(p), ROOT "%s", path) >= (int)sizeof(p))
		return -ENAMETOOLONG;
	fd = open(p, O_WRONLY | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);
	if (fd < 0)
		return -errno;
	close(fd);
	return 0;
}

/* Bind what src (an O_PATH fd) names at ROOT + path; flags for the bind's
 * own remount (MS_RDONLY, MS_NOSUID...), 0 to keep the source's. */
static int bind_fd(int src, const char *path, unsigned long flags)
{
	char from[64], to[PATH_MAX];
	struct stat st;
	int r;

	if (fstat(src, &st) < 0)
		return fail(errno, "stat %s", path);
	r = S_ISDIR(st.st_mode) ? mkdirs(path) : make_file(path);
	if (r < 0)
		return fail(-r, "create the mount point for %s", path);
	snprintf(from, sizeof(from), "/proc/self/fd/%d", src);
	snprintf(to, sizeof(to), ROOT "%s", path);
	if (mount(from, to, NULL, MS_BIND, NULL) < 0)
		return fail(errno, "bind %s", path);
	if (flags && mount(NULL, to, NULL, MS_REMOUNT | MS_BIND | flags, NULL) < 0)
		return fail(errno, "remount %s", path);
	return 0;
}

static int bind_path(const char *path, unsigned long flags, bool optional)
{
	_cleanup_close_ int fd = open(path, O_PATH | O_CLOEXEC);

	if (fd < 0)
		return optional && errno == ENOENT ? 0 : fail(errno, "open %s", path);
	return bind_fd(fd, path, flags);
}

/* The install prefix of a VMM outside /usr (PREFIX/bin/qemu: QEMU finds its
 * firmware in PREFIX/share), else the binary alone. */
static void binary_tree(const char *binary, char *buf, size_t size)
{
	char dir[PATH_MAX];
	size_t n;

	snprintf(dir, sizeof(dir), "%s", binary);
	snprintf(buf, size, "%s", dirname(dir));
	n = strlen(buf);
	if (n > 4 && streq(buf + n - 4, "/bin"))
		buf[n - 4] = '\0';
	else
		snprintf(buf, size, "%s", binary);
}

static int build_root(const struct confine *c, const char *binary)
{
	const unsigned long ro = MS_RDONLY | MS_NOSUID | MS_NODEV;
	_cleanup_close_ int bin_fd = -EBADF, dir_fd = -EBADF;
	char tree[PATH_MAX], p[PATH_MAX], real[PATH_MAX];
	int r;

	/* Opened before ROOT hides them: both may live under /tmp. A binary
	 * that is in /usr once links are resolved (/bin/qemu on a merged-/usr
	 * system) is there already. */
	if (!realpath(binary, real))
		return fail(errno, "resolve %s", binary);
	if (!path_under(real, "/usr")) {
		binary_tree(binary, tree, sizeof(tree));
		bin_fd = open(tree, O_PATH | O_CLOEXEC);
		if (bin_fd < 0)
			return fail(errno, "open %s", tree);
	}
	dir_fd = open(c->rw_dir, O_PATH | O_DIRECTORY | O_CLOEXEC);
	if (dir_fd < 0)
		return fail(errno, "open %s", c->rw_dir);

	if (mount("tmpfs", ROOT, "tmpfs", MS_NOSUID | MS_NODEV,
		  "mode=0755,size=1m,nr_inodes=4096") < 0)
		return fail(errno, "mount a tmpfs for the root");
	r = bind_path("/usr", ro, false);
	if (r < 0)
		return r;
	for (size_t i = 0; i < ELEMENTSOF(top_dirs); i++) {
		char target[PATH_MAX];
		struct stat st;
		ssize_t n;

		if (lstat(top_dirs[i], &st) < 0)
			continue;
		if (!S_ISLNK(st.st_mode)) {
			r = bind_path(top_dirs[i], ro, false);
			if (r < 0)
				return r;
			continue;
		}
		n = readlink(top_dirs[i], target, sizeof(target) - 1);
		if (n < 0)
			return fail(errno, "readlink %s", top_dirs[i]);
		target[n] = '\0';
		snprintf(p, sizeof(p), ROOT "%s", top_dirs[i]);
		if (symlink(target, p) < 0)
			return fail(errno, "symlink %s", top_dirs[i]);
	}
	r = bind_path("/etc/ld.so.cache", ro, true);
	if (r < 0)
		return r;
	/* Device nodes keep their mounts' flags: nodev would make them
	 * useless, and a read-only mount does not stop writes to a device. */
	for (size_t i = 0; i < ELEMENTSOF(dev_nodes); i++) {
		r = bind_path(dev_nodes[i], 0, false);
		if (r < 0)
			return r;
	}
	if (c->kvm) {
		r = bind_path("/dev/kvm", 0, false);
		if (r < 0)
			return r;
	}
	if (bin_fd >= 0) {
		r = bind_fd(bin_fd, tree, ro);
		if (r < 0)
			return r;
	}
	r = bind_fd(dir_fd, c->rw_dir, MS_NOSUID | MS_NODEV | MS_NOEXEC);
	if (r < 0)
		return r;
	/* The pid namespace's own /proc: QEMU opens its fds through
	 * /proc/self/fd, and sees no process but its own. */
	r = mkdirs("/proc");
	if (r < 0)
		return fail(-r, "create /proc");
	if (mount("proc", ROOT "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
		return fail(errno, "mount /proc");
	if (mount(NULL, ROOT, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL) <
	    0)
		return fail(errno, "make the root read-only");
	return 0;
}

static int enter_root(void)
{
	if (chdir(ROOT) < 0)
		return fail(errno, "chdir to the new root");
	/* pivot_root(".", "."): the old root ends up on top of the new one,
	 * and is detached at once; nothing of the host's tree stays. */
	if (syscall(SYS_pivot_root, ".", ".") < 0)
		return fail(errno, "pivot_root");
	if (umount2(".", MNT_DETACH) < 0)
		return fail(errno, "detach the host's root");
	if (chdir("/") < 0)
		return fail(errno, "chdir /");
	return 0;
}

/* /dev/kvm is commonly 0660 root:kvm: then its group is the VMM's one
 * supplementary group, the only one it gets. */
static int kvm_group(gid_t *ret)
{
	struct stat st;

	*ret = 0;
	if (stat("/dev/kvm", &st) < 0)
		return -errno;
	if ((st.st_mode & 0006) != 0006 && st.st_gid != 0)
		*ret = st.st_gid;
	return 0;
}

static int drop_privileges(const struct confine *c)
{
	gid_t kvm_gid = 0;

	if (c->kvm && kvm_group(&kvm_gid) < 0)
		return fail(errno, "stat /dev/kvm");
	if (setgroups(kvm_gid ? 1 : 0, &kvm_gid) < 0)
		return fail(errno, "setgroups");
	if (setresgid(c->gid, c->gid, c->gid) < 0)
		return fail(errno, "setresgid %u", (unsigned)c->gid);
	/* The bounding set while CAP_SETPCAP is still ours; the ambient set
	 * too, though nothing raised it. */
	for (int cap = 0; prctl(PR_CAPBSET_READ, cap, 0, 0, 0) >= 0; cap++)
		if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0)
			return fail(errno, "drop capability %d from the bounding set", cap);
	if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0 && errno != EINVAL)
		return fail(errno, "clear the ambient capabilities");
	/* From uid 0 to a non-zero uid everywhere: the kernel clears the
	 * permitted and effective sets (no SECBIT_KEEP_CAPS). */
	if (setresuid(c->uid, c->uid, c->uid) < 0)
		return fail(errno, "setresuid %u", (unsigned)c->uid);
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
		return fail(errno, "set no_new_privs");
	return 0;
}

int confine_enter(const struct confine *c, const char *binary)
{
	int r;

	if (binary[0] != '/')
		return fail(EINVAL, "%s is not an absolute path", binary);
	if (c->rw_dir[0] != '/')
		return fail(EINVAL, "%s is not an absolute path", c->rw_dir);
	/* Nothing mounted from here on may leak back into the host's tree. */
	if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
		return fail(errno, "make the mounts private");
	r = build_root(c, binary);
	if (r >= 0)
		r = enter_root();
	if (r >= 0)
		r = drop_privileges(c);
	return r;
}
