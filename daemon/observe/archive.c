/* SPDX-License-Identifier: MIT */
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common/file.h"
#include "common/macro.h"
#include "daemon/observe/archive.h"
#include "daemon/core/daemon.h"
#include "daemon/observe/history.h"
#include "daemon/observe/log.h"
#include "daemon/core/vm.h"
#include "memstore/memstore.h"

int archive_open(struct daemon *d, const char *dir)
{
	struct stat st;
	int fd;

	d->archive_fd = -EBADF;
	if (!dir || !*dir)
		return 0; /* --log-dir "": keep nothing */
	if (mkdir(dir, 0750) < 0 && errno != EEXIST)
		return log_error_errno(-errno, "cannot create the log directory %s", dir);
	fd = open(dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0)
		return log_error_errno(-errno, "cannot open the log directory %s", dir);
	if (fstat(fd, &st) < 0 || st.st_uid != geteuid() || (st.st_mode & (S_IWGRP | S_IWOTH))) {
		close(fd);
		log_error("refusing log directory %s: it must be owned by uid %u and writable by "
			  "nobody else; destroyed VMs' logs will not be kept",
			  dir, (unsigned)geteuid());
		return -EPERM;
	}
	d->archive_fd = fd;
	d->archive_dir = dir;
	return 0;
}

/* The kept files of one VM, in a directory of its own, made if need be. */
static int vm_dir(struct daemon *d, const char *name, bool create)
{
	int fd;

	if (d->archive_fd < 0)
		return -ENOENT;
	if (!memstore_name_is_valid(name))
		return -EINVAL;
	if (create && mkdirat(d->archive_fd, name, 0750) < 0 && errno != EEXIST)
		return -errno;
	fd = openat(d->archive_fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	return fd < 0 ? -errno : fd;
}

static int append_file(int from_dir, const char *from, int to, off_t limit)
{
	_cleanup_close_ int in =
	    openat(from_dir, from, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
	struct stat st;

	if (in < 0)
		return errno == ENOENT ? 0 : -errno;
	if (fstat(in, &st) < 0 || !S_ISREG(st.st_mode))
		return -EBADFD;
	return file_copy_tail(in, st.st_size, limit, to);
}

/* name.1 then name (older first) at the end of the kept name, after a line
 * that says where one VM's part starts; then bound it. */
static int keep_log(struct vm *vm, int dir, const char *name, const char *banner)
{
	_cleanup_close_ int out = -EBADF;
	char old[64];
	/* The VMM sized these files: its data alone, at most the bound each. */
	off_t limit = vm->d->log_max > 0 ? vm->d->log_max : INT64_MAX;
	int r;

	out = openat(dir, name, O_WRONLY | O_CREAT | O_APPEND | O_NOFOLLOW | O_CLOEXEC, 0640);
	if (out < 0)
		return -errno;
	if (banner)
		(void)!write(out, banner, strlen(banner));
	snprintf(old, sizeof(old), "%s.1", name);
	r = append_file(vm->dir_fd, old, out, limit);
	if (r >= 0)
		r = append_file(vm->dir_fd, name, out, limit);
	if (r >= 0 && vm->d->log_max > 0)
		r = file_rotate(dir, name, vm->d->log_max);
	return r < 0 ? r : 0;
}

void archive_vm(struct vm *vm)
{
	struct daemon *d = vm->d;
	_cleanup_close_ int dir = -EBADF;
	char banner[160], when[40];
	time_t now = time(NULL);
	struct tm tm;
	int r = 0;

	if (d->archive_fd < 0 || vm->dir_fd < 0)
		return;
	dir = vm_dir(d, vm->cfg.name, true);
	if (dir < 0) {
		log_warning("VM %s: cannot keep its logs in %s/%s: %s", vm->cfg.name,
			    d->archive_dir, vm->cfg.name, strerror(-dir));
		return;
	}
	localtime_r(&now, &tm);
	strftime(when, sizeof(when), "%Y-%m-%d %H:%M:%S %z", &tm);
	snprintf(banner, sizeof(banner), "==== cprd: VM %s %s at %s; what it wrote follows ====\n",
		 vm->cfg.name, vm->state == VM_STARTING ? "failed to start" : "destroyed", when);
	r = keep_log(vm, dir, VM_CONSOLE_LOG, banner);
	if (r >= 0)
		r = keep_log(vm, dir, VM_VMM_LOG, banner);
	if (r >= 0)
		r = keep_log(vm, dir, VM_HISTORY, NULL);
	if (r < 0)
		log_warning("VM %s: its logs were kept in part only (%s/%s): %s", vm->cfg.name,
			    d->archive_dir, vm->cfg.name, strerror(-r));
	else
		log_info("VM %s: console log, VMM log and history kept in %s/%s", vm->cfg.name,
			 d->archive_dir, vm->cfg.name);
}

int archive_history(struct daemon *d, const char *name, json_object **ret)
{
	_cleanup_close_ int dir = vm_dir(d, name, false);

	if (dir < 0)
		return dir == -EINVAL ? -ENOENT : dir;
	*ret = history_read(dir, VM_HISTORY);
	return 0;
}

static void add_all(json_object *into, json_object *from, const char *vm)
{
	for (size_t i = 0; i < json_object_array_length(from); i++) {
		json_object *r = json_object_array_get_idx(from, i);

		if (!json_object_object_get(r, "vm"))
			json_object_object_add(r, "vm", json_object_new_string(vm));
		json_object_array_add(into, json_object_get(r));
	}
}

void archive_histories(struct daemon *d, json_object *into)
{
	DIR *dir = NULL;
	struct dirent *de;
	int fd;

	fd = d->archive_fd >= 0 ? openat(d->archive_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC)
				: -EBADF;
	if (fd >= 0 && !(dir = fdopendir(fd)))
		close(fd);
	while (dir && (de = readdir(dir))) {
		json_object *h = NULL;

		if (de->d_name[0] == '.' || archive_history(d, de->d_name, &h) < 0)
			continue;
		add_all(into, h, de->d_name);
		json_object_put(h);
	}
	if (dir)
		closedir(dir);
}

int archive_purge(struct daemon *d, const char *name)
{
	static const char *const files[] = {
		VM_CONSOLE_LOG,  VM_CONSOLE_LOG ".1", VM_VMM_LOG,
		VM_VMM_LOG ".1", VM_HISTORY,          VM_HISTORY ".1"
	};
	_cleanup_close_ int dir = vm_dir(d, name, false);

	if (dir < 0)
		return dir == -EINVAL ? -ENOENT : dir;
	for (size_t i = 0; i < ELEMENTSOF(files); i++)
		if (unlinkat(dir, files[i], 0) < 0 && errno != ENOENT)
			return -errno;
	return unlinkat(d->archive_fd, name, AT_REMOVEDIR) < 0 ? -errno : 0;
}
