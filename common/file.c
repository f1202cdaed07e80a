/* SPDX-License-Identifier: MIT */
#include <dirent.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>

#include "common/file.h"
#include "common/macro.h"

void file_tail(const char *path, char *buf, size_t size)
{
	_cleanup_close_ int fd = open(path, O_RDONLY | O_CLOEXEC);
	struct stat st;
	ssize_t n;
	off_t off;

	buf[0] = '\0';
	if (fd < 0 || fstat(fd, &st) < 0)
		return;
	off = st.st_size > (off_t)size - 1 ? st.st_size - (off_t)size + 1 : 0;
	n = pread(fd, buf, size - 1, off);
	if (n <= 0)
		return;
	buf[n] = '\0';
	while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == ' '))
		buf[--n] = '\0';
	for (char *p = buf; *p; p++)
		if (*p == '\n')
			*p = ' ';
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
