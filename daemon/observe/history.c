/* SPDX-License-Identifier: MIT */
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/file.h"
#include "common/macro.h"
#include "daemon/observe/history.h"
#include "proto/jsonrpc.h"

#define HISTORY_MAX_BYTES (4 << 20)
#define HISTORY_LINE_MAX 4096

int history_append(int dirfd, const char *name, json_object *rec)
{
	_cleanup_close_ int fd = openat(
	    dirfd, name, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK, 0640);
	size_t len;
	const char *s = jsonrpc_to_string(rec, &len);
	char line[HISTORY_LINE_MAX];
	ssize_t n;

	if (fd < 0)
		return -errno;
	if (!s || len + 1 > sizeof(line))
		return -E2BIG;
	memcpy(line, s, len);
	line[len] = '\n';
	n = write(fd, line, len + 1);
	if (n < 0)
		return -errno;
	return n == (ssize_t)(len + 1) ? 0 : -EIO;
}

/* The newest HISTORY_MAX_BYTES of the file: a long-lived VM's history can
 * outgrow that, and it is the recent updates that matter. */
json_object *history_read(int dirfd, const char *name)
{
	_cleanup_close_ int fd =
	    openat(dirfd, name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY);
	_cleanup_free_ char *buf = NULL;
	json_object *arr = json_object_new_array();
	struct stat st;
	off_t from;
	char *line, *save = NULL, *start;

	if (fd < 0 || fstat(fd, &st) < 0 || !S_ISREG(st.st_mode))
		return arr;
	from = st.st_size > HISTORY_MAX_BYTES ? st.st_size - HISTORY_MAX_BYTES : 0;
	if (read_at_most(fd, from, HISTORY_MAX_BYTES, &buf) <= 0)
		return arr;
	/* Starting mid-file, the first line is a fragment. */
	start = from > 0 ? strchrnul(buf, '\n') : buf;
	for (line = strtok_r(start, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
		json_object *o = json_tokener_parse(line);

		if (o)
			json_object_array_put_idx(arr, json_object_array_length(arr), o);
	}
	/* newest first */
	for (size_t i = 0, j = json_object_array_length(arr); j > 0 && i < --j; i++) {
		json_object *a = json_object_get(json_object_array_get_idx(arr, i));
		json_object *b = json_object_get(json_object_array_get_idx(arr, j));

		json_object_array_put_idx(arr, i, b);
		json_object_array_put_idx(arr, j, a);
	}
	return arr;
}
