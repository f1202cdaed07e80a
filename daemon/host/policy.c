/* SPDX-License-Identifier: MIT */
#include <fcntl.h>
#include <fnmatch.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common/access.h"
#include "common/macro.h"
#include "daemon/host/policy.h"

static int add_pattern(struct policy *p, const char *s)
{
	char **v = reallocarray(p->vmm, p->n_vmm + 1, sizeof(char *));

	if (!v)
		return -ENOMEM;
	p->vmm = v;
	v[p->n_vmm] = strdup(s);
	if (!v[p->n_vmm])
		return -ENOMEM;
	p->n_vmm++;
	return 0;
}

static char *strip(char *s)
{
	char *e;

	s += strspn(s, " \t");
	e = s + strlen(s);
	while (e > s && strchr(" \t\r\n", e[-1]))
		*--e = '\0';
	return s;
}

static int read_list(struct policy *p, FILE *f, unsigned *ret_line)
{
	char line[PATH_MAX + 2];
	unsigned n = 0;
	int r;

	while (fgets(line, sizeof(line), f)) {
		char *s;

		n++;
		if (!strchr(line, '\n') && !feof(f)) {
			*ret_line = n; /* longer than any path */
			return -ENAMETOOLONG;
		}
		s = strip(line);
		if (!*s || *s == '#')
			continue;
		if (*s != '/') {
			*ret_line = n;
			return -EINVAL;
		}
		r = add_pattern(p, s);
		if (r < 0)
			return r;
	}
	return ferror(f) ? -EIO : 0;
}

int policy_load(struct policy *p, const char *path, unsigned *ret_line)
{
	_cleanup_(fclosep) FILE *f = NULL;
	int fd, r;

	*p = (struct policy){};
	*ret_line = 0;
	fd = open(path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
	if (fd < 0 && errno == ENOENT && streq(path, POLICY_DEFAULT_FILE))
		return add_pattern(p, POLICY_DEFAULT_VMM);
	if (fd < 0)
		return -errno;
	f = fdopen(fd, "re");
	if (!f) {
		safe_close(fd);
		return -ENOMEM;
	}
	if (!fd_is_root_only(fd))
		return -EPERM;
	p->source = strdup(path);
	if (!p->source)
		return -ENOMEM;
	r = read_list(p, f, ret_line);
	if (r < 0)
		policy_done(p);
	return r;
}

void policy_done(struct policy *p)
{
	for (size_t i = 0; i < p->n_vmm; i++)
		free(p->vmm[i]);
	free(p->vmm);
	free(p->source);
	*p = (struct policy){};
}

/* The file at the canonical path, and every directory above it, can be
 * changed by root alone. */
static int root_only_path(const char *canon)
{
	_cleanup_free_ char *copy = strdup(canon);
	char *slash;

	if (!copy)
		return -ENOMEM;
	for (;;) {
		_cleanup_close_ int fd = open(*copy ? copy : "/", O_PATH | O_CLOEXEC);

		if (fd < 0)
			return -errno;
		if (!fd_is_root_only(fd))
			return -EPERM;
		if (!*copy)
			return 0;
		slash = strrchr(copy, '/');
		*slash = '\0';
	}
}

int policy_may_run(const struct policy *p, const char *path, char **ret_canon)
{
	_cleanup_free_ char *canon = realpath(path, NULL);
	bool listed = false;
	int r;

	if (!canon)
		return -errno;
	for (size_t i = 0; i < p->n_vmm && !listed; i++)
		listed = fnmatch(p->vmm[i], canon, FNM_PATHNAME) == 0;
	if (!listed)
		return -EACCES;
	r = root_only_path(canon);
	if (r < 0)
		return r;
	if (ret_canon)
		*ret_canon = TAKE_PTR(canon);
	return 0;
}

int policy_may_reexec(const char *self, int fd)
{
	struct stat st, own;

	if (!self)
		return -EACCES;
	if (fstat(fd, &st) < 0 || stat(self, &own) < 0)
		return -errno;
	if (!S_ISREG(st.st_mode) || st.st_dev != own.st_dev || st.st_ino != own.st_ino)
		return -EACCES;
	/* The file at fd is the one at self: judging self's path, the file
	 * and every directory above it, judges it. */
	return root_only_path(self);
}
