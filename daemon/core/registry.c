/* SPDX-License-Identifier: MIT */
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>

#include "common/clock.h"
#include "common/file.h"
#include "common/macro.h"
#include "daemon/core/registry.h"

DEFINE_TRIVIAL_CLEANUP_FUNC(json_tokener *, json_tokener_free)

int registry_init(struct registry *r, const char *state_dir)
{
	*r = (struct registry){ .since_usec = now_usec(CLOCK_REALTIME) };
	if (asprintf(&r->path, "%s/" REGISTRY_FILE, state_dir) < 0) {
		r->path = NULL;
		return -ENOMEM;
	}
	if (asprintf(&r->tmp, "%s/" REGISTRY_TMP, state_dir) < 0) {
		r->tmp = NULL;
		r->path = (free(r->path), NULL);
		return -ENOMEM;
	}
	r->dirfd = open(state_dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (r->dirfd < 0)
		r->dirfd = -errno;
	return 0;
}

void registry_done(struct registry *r)
{
	safe_close(r->dirfd);
	free(r->path);
	free(r->tmp);
	*r = (struct registry){ .dirfd = -EBADF };
}

static void set_health(struct registry *r, int error, const char *fmt, ...) _printf_(3, 4);

static void set_health(struct registry *r, int error, const char *fmt, ...)
{
	va_list ap;

	if (error != r->error)
		r->since_usec = now_usec(CLOCK_REALTIME);
	r->error = error;
	r->why[0] = '\0';
	if (!fmt)
		return;
	va_start(ap, fmt);
	vsnprintf(r->why, sizeof(r->why), fmt, ap);
	va_end(ap);
}

/* Everything, or a negative errno: a full file system may take part of a
 * write and refuse the rest. */
static int write_all(int fd, const char *s, size_t len)
{
	struct iovec iov[2] = { { (void *)s, len }, { (void *)"\n", 1 } };
	int i = 0;

	while (i < 2) {
		ssize_t n = writev(fd, iov + i, 2 - i);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		if (n == 0)
			return -EIO;
		for (; i < 2 && (size_t)n >= iov[i].iov_len; i++)
			n -= (ssize_t)iov[i].iov_len;
		if (i < 2) {
			iov[i].iov_base = (char *)iov[i].iov_base + n;
			iov[i].iov_len -= (size_t)n;
		}
	}
	return 0;
}

int registry_write(struct registry *r, json_object *root)
{
	_cleanup_close_ int fd = -EBADF;
	const char *s, *op;
	size_t len = 0;
	int e;

	s = json_object_to_json_string_length(
	    root, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE, &len);
	if (!s) {
		e = -ENOMEM;
		op = "cannot serialize it";
		goto fail;
	}
	/* A fresh file, never one that is there: whatever sits at the temp
	 * path (a leftover, or a symlink planted to make root write through
	 * it) is removed, and O_EXCL|O_NOFOLLOW refuse one planted again in
	 * between rather than follow it. */
	if (r->dirfd < 0) {
		e = r->dirfd;
		op = "cannot open its directory";
		goto fail;
	}
	if (unlinkat(r->dirfd, REGISTRY_TMP, 0) < 0 && errno != ENOENT) {
		e = -errno;
		op = "cannot remove the old temp file";
		goto fail;
	}
	fd = openat(r->dirfd, REGISTRY_TMP, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
		    0600);
	if (fd < 0) {
		e = -errno;
		op = "cannot create the temp file";
		goto fail;
	}
	e = write_all(fd, s, len);
	if (e < 0) {
		op = "cannot write the temp file";
		goto unlink;
	}
	/* No fsync: the state directory lives on tmpfs, the registry has to
	 * survive cprd, not the machine (docs/ARCHITECTURE.md). close() still
	 * reports a late write error on file systems that defer them. */
	if (close(TAKE_FD(fd)) < 0) {
		e = -errno;
		op = "cannot write the temp file";
		goto unlink;
	}
	if (renameat(r->dirfd, REGISTRY_TMP, r->dirfd, REGISTRY_FILE) < 0) {
		e = -errno;
		op = "cannot rename the temp file over it";
		goto unlink;
	}
	set_health(r, 0, NULL);
	r->dirty = false;
	return 0;

unlink:
	unlinkat(r->dirfd, REGISTRY_TMP, 0);
fail:
	set_health(r, e, "%s: %s: %s", r->path, op, strerror(-e));
	r->dirty = true; /* the file does not hold what was meant to be there */
	return e;
}

static int bad(char *why, size_t size, const char *fmt, ...) _printf_(3, 4);

static int bad(char *why, size_t size, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(why, size, fmt, ap);
	va_end(ap);
	return -EBADMSG;
}

int registry_read(const struct registry *r, json_object **ret, char *why, size_t why_size)
{
	_cleanup_(json_tokener_freep) json_tokener *tok = NULL;
	_cleanup_free_ char *buf = NULL;
	_cleanup_close_ int fd = -EBADF;
	json_object *root, *v;
	struct stat st;
	ssize_t n;
	size_t end;

	snprintf(why, why_size, "%s", "");
	fd = r->dirfd < 0 ? r->dirfd
			  : openat(r->dirfd, REGISTRY_FILE,
				   O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY);
	if (r->dirfd < 0)
		errno = -r->dirfd;
	if (fd < 0 || fstat(fd, &st) < 0) {
		int e = errno;

		snprintf(why, why_size, "%s", strerror(e));
		return -e;
	}
	if (!S_ISREG(st.st_mode))
		return bad(why, why_size, "not a regular file");
	n = read_at_most(fd, 0, REGISTRY_MAX_BYTES + 1, &buf);
	if (n < 0) {
		snprintf(why, why_size, "%s", strerror((int)-n));
		return (int)n;
	}
	if (n > REGISTRY_MAX_BYTES)
		return bad(why, why_size, "larger than %d bytes", REGISTRY_MAX_BYTES);
	if (n == 0)
		return bad(why, why_size, "empty");
	tok = json_tokener_new();
	if (!tok)
		return -ENOMEM;
	root = json_tokener_parse_ex(tok, buf, (int)n);
	if (!root) {
		enum json_tokener_error err = json_tokener_get_error(tok);

		return bad(why, why_size, "%s at byte %zu",
			   err == json_tokener_continue ? "truncated: the JSON text ends early"
							: json_tokener_error_desc(err),
			   json_tokener_get_parse_end(tok));
	}
	end = json_tokener_get_parse_end(tok);
	while (end < (size_t)n && strchr(" \t\r\n", buf[end]))
		end++;
	if (end < (size_t)n) {
		json_object_put(root);
		return bad(why, why_size, "unexpected data after the JSON text at byte %zu", end);
	}
	if (!json_object_is_type(root, json_type_object) ||
	    !json_object_object_get_ex(root, "version", &v) ||
	    !json_object_is_type(v, json_type_int)) {
		json_object_put(root);
		return bad(why, why_size, "no \"version\" member");
	}
	if (json_object_get_int(v) != REGISTRY_VERSION) {
		int version = json_object_get_int(v);

		json_object_put(root);
		return bad(why, why_size, "version %d; this cprd reads version %d", version,
			   REGISTRY_VERSION);
	}
	if (!json_object_object_get_ex(root, "vms", &v) ||
	    !json_object_is_type(v, json_type_array)) {
		json_object_put(root);
		return bad(why, why_size, "no \"vms\" array");
	}
	for (size_t i = 0; i < json_object_array_length(v); i++)
		if (!json_object_is_type(json_object_array_get_idx(v, i), json_type_object)) {
			json_object_put(root);
			return bad(why, why_size, "entry %zu of \"vms\" is not an object", i);
		}
	*ret = root;
	return 0;
}

json_object *registry_health_to_json(const struct registry *r)
{
	json_object *o = json_object_new_object();

	json_object_object_add(o, "ok", json_object_new_boolean(registry_ok(r)));
	json_object_object_add(o, "path", r->path ? json_object_new_string(r->path) : NULL);
	json_object_object_add(o, "error", registry_ok(r) ? NULL : json_object_new_string(r->why));
	json_object_object_add(o, "since_usec", json_object_new_int64((int64_t)r->since_usec));
	return o;
}
