/* SPDX-License-Identifier: MIT */
/*
 * Disks: vm.create's "disks", a list of images, each a virtio-blk device
 * of the guest. An image is a raw file or a qcow2 file, and a qcow2 image
 * may stand on a chain of backing images (a per-VM overlay on a shared,
 * read-only base).
 *
 * cprd opens every file of every chain itself, and a VMM is only ever
 * given fds: QEMU reads them as fd sets (-add-fd, /dev/fdset/N), so a
 * confined VMM needs no path to any image. At vm.create each file is
 * judged as the peer could open it (prepare()): the top image for reading
 * and writing (reading only, with readonly), every backing image for
 * reading; its canonical path and identity (device, inode) are recorded
 * in the VM's argument ("layers") and every later open must find that
 * very file again. A backing file is followed only as its qcow2 header
 * names it with its format: cprd never guesses a format (a raw image the
 * guest wrote a qcow2 header into must not lead anywhere).
 *
 * Each VMM gets a file description of its own, opened anew from the one
 * cprd holds (fresh_per_vmm): QEMU's image locks (OFD locks) then belong
 * to the VMM that takes them and go with it, and are never shared with
 * cprd's or another VMM's. An update hands the guest over the way QEMU
 * migrates between two processes on shared storage: the new VMM opens
 * the images inactive, the old one lets go of them as the migration
 * completes, the new one takes them when it runs the guest.
 */
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/access.h"
#include "common/macro.h"
#include "daemon/devices/devices.h"
#include "kvm/qemu.h"

#define DISKS_MAX 4    /* disks of one VM */
#define LAYERS_MAX 4   /* files of one disk's chain */
#define DISK_FDS_MAX 8 /* files of all of a VM's disks together */
#define SERIAL_MAX 20  /* virtio-blk's serial is 20 bytes */
#define FDSET_BASE 100 /* a disk file's fd set: FDSET_BASE + its child fd */
#define QCOW2_MAGIC 0x514649fbu
#define QCOW2_EXT_BACKING_FORMAT 0xe2792acau
#define QCOW2_EXT_DATA_FILE 0x44415441u
#define QCOW2_INCOMPAT_DATA_FILE (1ull << 2)
#define QCOW2_HEADER_READ 65536 /* the header and its extensions are in here */

static const char *const disk_keys[] = {
	"path", "format", "readonly", "cache", "serial", "layers"
};
static const char *const layer_keys[] = { "path", "format", "dev", "ino", "saved" };

static bool key_known(const char *k, const char *const *keys, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (streq(k, keys[i]))
			return true;
	return false;
}

static const char *str_of(json_object *o, const char *key)
{
	json_object *v;

	return json_object_object_get_ex(o, key, &v) && json_object_is_type(v, json_type_string)
		   ? json_object_get_string(v)
		   : NULL;
}

static bool bool_of(json_object *o, const char *key)
{
	json_object *v;

	return json_object_object_get_ex(o, key, &v) && json_object_get_boolean(v);
}

static const char *format_of(json_object *disk)
{
	return str_of(disk, "format") ? str_of(disk, "format") : "raw";
}

static bool format_known(const char *f)
{
	return streq(f, "raw") || streq(f, "qcow2");
}

static json_object *layers_of(json_object *disk)
{
	json_object *v;

	return json_object_object_get_ex(disk, "layers", &v) &&
		       json_object_is_type(v, json_type_array)
		   ? v
		   : NULL;
}

/* A layer as prepare() records it. */
static int check_layer(json_object *l, size_t i, size_t j, char *why, size_t size)
{
	const char *p = str_of(l, "path"), *f = str_of(l, "format");
	json_object *dev, *ino;

	if (!json_object_is_type(l, json_type_object) || !p || p[0] != '/' || !f ||
	    !format_known(f) || !json_object_object_get_ex(l, "dev", &dev) ||
	    !json_object_is_type(dev, json_type_int) ||
	    !json_object_object_get_ex(l, "ino", &ino) ||
	    !json_object_is_type(ino, json_type_int)) {
		snprintf(why, size, "disk %zu: file %zu of its chain is not a valid record", i, j);
		return -EINVAL;
	}
	json_object_object_foreach(l, k, v)
	{
		(void)v;
		if (!key_known(k, layer_keys, ELEMENTSOF(layer_keys))) {
			snprintf(why, size,
				 "disk %zu: unknown key '%.32s' in file %zu of its chain", i, k, j);
			return -EINVAL;
		}
	}
	return 0;
}

static int check_one(json_object *d, size_t i, size_t *layers, char *why, size_t size)
{
	const char *p = str_of(d, "path"), *f = str_of(d, "format"), *c = str_of(d, "cache"),
		   *s = str_of(d, "serial");
	json_object *v, *ls;

	json_object_object_foreach(d, k, x)
	{
		(void)x;
		if (!key_known(k, disk_keys, ELEMENTSOF(disk_keys))) {
			snprintf(why, size,
				 "disk %zu: unknown key '%.32s' (path, format, readonly, cache, "
				 "serial)",
				 i, k);
			return -EINVAL;
		}
	}
	if (!p || p[0] != '/' || strlen(p) >= PATH_MAX) {
		snprintf(why, size, "disk %zu: 'path' must be an absolute path", i);
		return -EINVAL;
	}
	if ((json_object_object_get_ex(d, "format", &v) && !f) || (f && !format_known(f))) {
		snprintf(why, size, "disk %zu: 'format' must be \"raw\" or \"qcow2\"", i);
		return -EINVAL;
	}
	if (json_object_object_get_ex(d, "readonly", &v) &&
	    !json_object_is_type(v, json_type_boolean)) {
		snprintf(why, size, "disk %zu: 'readonly' must be a boolean", i);
		return -EINVAL;
	}
	if ((json_object_object_get_ex(d, "cache", &v) && !c) ||
	    (c && !streq(c, "none") && !streq(c, "writeback"))) {
		snprintf(why, size, "disk %zu: 'cache' must be \"none\" or \"writeback\"", i);
		return -EINVAL;
	}
	if ((json_object_object_get_ex(d, "serial", &v) && !s) ||
	    (s && (!s[0] || strlen(s) > SERIAL_MAX ||
		   strspn(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.") !=
		       strlen(s)))) {
		snprintf(why, size,
			 "disk %zu: 'serial' must be 1-%d letters, digits, '-', '_' or '.'", i,
			 SERIAL_MAX);
		return -EINVAL;
	}
	*layers = 1;
	if ((ls = layers_of(d))) {
		size_t n = json_object_array_length(ls);

		if (n < 1 || n > LAYERS_MAX) {
			snprintf(why, size, "disk %zu: its chain has %zu files (1-%d)", i, n,
				 LAYERS_MAX);
			return -EINVAL;
		}
		for (size_t j = 0; j < n; j++)
			if (check_layer(json_object_array_get_idx(ls, j), i, j, why, size) < 0)
				return -EINVAL;
		*layers = n;
	} else if (json_object_object_get_ex(d, "layers", &v)) {
		snprintf(why, size, "disk %zu: 'layers' is not a list", i);
		return -EINVAL;
	}
	return 0;
}

static int disk_check(json_object *arg, char *why, size_t size)
{
	size_t n = json_object_array_length(arg), fds = 0;

	if (n < 1 || n > DISKS_MAX) {
		snprintf(why, size, "a VM has 1-%d disks, not %zu", DISKS_MAX, n);
		return -EINVAL;
	}
	for (size_t i = 0; i < n; i++) {
		json_object *d = json_object_array_get_idx(arg, i);
		size_t layers;

		if (!json_object_is_type(d, json_type_object)) {
			snprintf(why, size, "disk %zu is not an object", i);
			return -EINVAL;
		}
		if (check_one(d, i, &layers, why, size) < 0)
			return -EINVAL;
		fds += layers;
	}
	if (fds > DISK_FDS_MAX) {
		snprintf(why, size, "the disks' chains have %zu files in all; at most %d", fds,
			 DISK_FDS_MAX);
		return -EINVAL;
	}
	return 0;
}

/* ---- a qcow2 header: what it stands on ---- */

static uint32_t be32_at(const uint8_t *b)
{
	uint32_t v;

	memcpy(&v, b, sizeof(v));
	return be32toh(v);
}

static uint64_t be64_at(const uint8_t *b)
{
	uint64_t v;

	memcpy(&v, b, sizeof(v));
	return be64toh(v);
}

/*
 * The backing file and its format that the qcow2 image at fd names:
 * *ret_backing is NULL when it names none. -EINVAL with why for what cprd
 * does not follow: not a qcow2 image, a backing file named without its
 * format, an external data file, a name that is not a plain path.
 */
static int qcow2_backing(int fd, char **ret_backing, char *fmt, size_t fmt_size, char *why,
			 size_t size)
{
	_cleanup_free_ uint8_t *h = malloc(QCOW2_HEADER_READ);
	uint32_t version, hlen, name_len;
	uint64_t name_off, incompat = 0;
	ssize_t got;
	size_t off;

	*ret_backing = NULL;
	fmt[0] = '\0';
	if (!h)
		return -ENOMEM;
	got = pread(fd, h, QCOW2_HEADER_READ, 0);
	if (got < 0)
		return -errno;
	if (got < 72 || be32_at(h) != QCOW2_MAGIC) {
		snprintf(why, size, "is not a qcow2 image");
		return -EINVAL;
	}
	version = be32_at(h + 4);
	name_off = be64_at(h + 8);
	name_len = be32_at(h + 16);
	hlen = 72;
	if (version >= 3) {
		if (got < 104) {
			snprintf(why, size, "has a truncated qcow2 header");
			return -EINVAL;
		}
		incompat = be64_at(h + 72);
		hlen = be32_at(h + 100);
	} else if (version != 2) {
		snprintf(why, size, "is a qcow2 image of version %u, which cprd does not know",
			 version);
		return -EINVAL;
	}
	if (incompat & QCOW2_INCOMPAT_DATA_FILE) {
		snprintf(why, size,
			 "keeps its data in an external file, which cprd does not follow");
		return -EINVAL;
	}
	/* The extensions: the backing file's format is one of them. */
	for (off = hlen; off + 8 <= (size_t)got;) {
		uint32_t type = be32_at(h + off), len = be32_at(h + off + 4);

		if (type == 0)
			break;
		if (len > (size_t)got - off - 8)
			break;
		if (type == QCOW2_EXT_DATA_FILE) {
			snprintf(why, size,
				 "keeps its data in an external file, which cprd does not follow");
			return -EINVAL;
		}
		if (type == QCOW2_EXT_BACKING_FORMAT) {
			size_t n = len < fmt_size - 1 ? len : fmt_size - 1;

			memcpy(fmt, h + off + 8, n);
			fmt[n] = '\0';
		}
		off += 8 + (((size_t)len + 7) & ~(size_t)7);
	}
	if (name_off == 0 || name_len == 0)
		return 0;
	if (name_len > PATH_MAX - 1 || name_len > (uint64_t)got ||
	    name_off > (uint64_t)got - name_len) {
		snprintf(why, size, "names a backing file cprd cannot read from its header");
		return -EINVAL;
	}
	*ret_backing = strndup((const char *)h + name_off, name_len);
	if (!*ret_backing)
		return -ENOMEM;
	if (strlen(*ret_backing) != name_len || !(*ret_backing)[0] ||
	    strncmp(*ret_backing, "json:", 5) == 0 || strstr(*ret_backing, "://")) {
		snprintf(why, size, "names a backing file that is not a plain path");
		goto refuse;
	}
	if (!fmt[0]) {
		snprintf(
		    why, size,
		    "names its backing file without its format; make it with "
		    "'qemu-img create -b FILE -F FORMAT' or set it with 'qemu-img rebase -u -F'");
		goto refuse;
	}
	if (!format_known(fmt)) {
		snprintf(why, size, "names a backing file of format '%.16s' (raw or qcow2 only)",
			 fmt);
		goto refuse;
	}
	return 0;
refuse:
	free(*ret_backing);
	*ret_backing = NULL;
	return -EINVAL;
}

/* name relative to the directory of base (a canonical path). */
static char *beside(const char *base, const char *name)
{
	const char *slash = strrchr(base, '/');
	char *p;

	if (name[0] == '/')
		return strdup(name);
	if (asprintf(&p, "%.*s/%s", (int)(slash - base), base, name) < 0)
		return NULL;
	return p;
}

static json_object *layer_json(const char *path, const char *format, const struct stat *st)
{
	json_object *l = json_object_new_object();

	json_object_object_add(l, "path", json_object_new_string(path));
	json_object_object_add(l, "format", json_object_new_string(format));
	json_object_object_add(l, "dev", json_object_new_int64((int64_t)st->st_dev));
	json_object_object_add(l, "ino", json_object_new_int64((int64_t)st->st_ino));
	return l;
}

static const char *open_error(int r)
{
	switch (r) {
	case -EACCES:
		return "the caller may not open it so";
	case -EPERM:
		return "a directory on the way or the file carries an ACL, which cprd does not "
		       "judge";
	case -EBADFD:
		return "is not a regular file";
	case -ELOOP:
		return "is a symbolic link";
	default:
		return strerror(-r);
	}
}

/* Judge disk i (its path, then each backing file its chain names) as peer
 * could, and record the chain in its "layers". */
static int prepare_one(json_object *d, size_t i, const struct creds *peer, size_t *fds, char *why,
		       size_t size)
{
	_cleanup_free_ char *path = strdup(str_of(d, "path"));
	char fmt[16];
	json_object *layers = json_object_new_array();
	int r = 0;

	if (!path || !layers) {
		json_object_put(layers);
		return -ENOMEM;
	}
	snprintf(fmt, sizeof(fmt), "%s", format_of(d));
	for (size_t j = 0;; j++) {
		_cleanup_close_ int fd = -EBADF;
		_cleanup_free_ char *canon = NULL, *backing = NULL;
		char bfmt[16], reason[200] = "";
		bool top_rw = j == 0 && !bool_of(d, "readonly");
		struct stat st;

		if (j >= LAYERS_MAX || *fds >= DISK_FDS_MAX) {
			snprintf(why, size,
				 "disk %zu: its chain is longer than cprd takes (%d files, "
				 "%d for all disks)",
				 i, LAYERS_MAX, DISK_FDS_MAX);
			r = -EINVAL;
			break;
		}
		r = open_as_flags(path, peer, top_rw ? O_RDWR : O_RDONLY, OPEN_AS_MAY_CHANGE, &fd,
				  &canon);
		if (r < 0) {
			snprintf(why, size, "disk %zu: %s '%.200s' (%s): %s", i,
				 j ? "backing file" : "image", path,
				 top_rw ? "read-write" : "read-only", open_error(r));
			break;
		}
		if (fstat(fd, &st) < 0) {
			r = -errno;
			snprintf(why, size, "disk %zu: %s", i, strerror(errno));
			break;
		}
		json_object_array_add(layers, layer_json(canon, fmt, &st));
		(*fds)++;
		if (!streq(fmt, "qcow2"))
			break;
		r = qcow2_backing(fd, &backing, bfmt, sizeof(bfmt), reason, sizeof(reason));
		if (r < 0) {
			snprintf(why, size, "disk %zu: '%.200s' %s", i, canon, reason);
			break;
		}
		if (!backing)
			break;
		free(path);
		path = beside(canon, backing);
		if (!path) {
			r = -ENOMEM;
			break;
		}
		snprintf(fmt, sizeof(fmt), "%s", bfmt);
	}
	if (r < 0) {
		json_object_put(layers);
		return r;
	}
	json_object_object_add(d, "layers", layers);
	return 0;
}

static int disk_prepare(json_object *arg, const struct creds *peer, char *why, size_t size)
{
	size_t fds = 0;

	for (size_t i = 0; i < json_object_array_length(arg); i++) {
		int r = prepare_one(json_object_array_get_idx(arg, i), i, peer, &fds, why, size);

		if (r < 0)
			return r;
	}
	return 0;
}

/* ---- what the VM holds ---- */

static size_t layer_count(json_object *d)
{
	json_object *ls = layers_of(d);

	return ls ? json_object_array_length(ls) : 1;
}

static size_t disk_nfds(json_object *arg)
{
	size_t n = 0;

	for (size_t i = 0; i < json_object_array_length(arg); i++)
		n += layer_count(json_object_array_get_idx(arg, i));
	return n;
}

/* The k-th fd of arg is file j of disk i. */
static bool disk_place(json_object *arg, size_t k, size_t *ret_i, size_t *ret_j)
{
	for (size_t i = 0; i < json_object_array_length(arg); i++) {
		size_t m = layer_count(json_object_array_get_idx(arg, i));

		if (k < m) {
			*ret_i = i;
			*ret_j = k;
			return true;
		}
		k -= m;
	}
	return false;
}

static void disk_fd_id(json_object *arg, size_t k, char *buf, size_t size)
{
	size_t i = 0, j = 0;

	(void)disk_place(arg, k, &i, &j);
	if (j == 0)
		snprintf(buf, size, "disk%zu", i);
	else
		snprintf(buf, size, "disk%zu.%zu", i, j);
}

/* Open file j of disk d as prepare() recorded it, with cprd's rights: the
 * very file judged then, or -ESTALE. */
static int open_layer(json_object *d, size_t j, int *ret_fd)
{
	json_object *l = json_object_array_get_idx(layers_of(d), j);
	bool rw = j == 0 && !bool_of(d, "readonly");
	_cleanup_close_ int fd = -EBADF;
	struct stat st;
	int r;

	if (!l)
		return -EINVAL; /* never prepared: a record cprd did not write */
	r = open_as_flags(str_of(l, "path"), NULL, rw ? O_RDWR : O_RDONLY, 0, &fd, NULL);
	if (r < 0)
		return r;
	if (fstat(fd, &st) < 0)
		return -errno;
	if ((int64_t)st.st_dev != json_object_get_int64(json_object_object_get(l, "dev")) ||
	    (int64_t)st.st_ino != json_object_get_int64(json_object_object_get(l, "ino")))
		return -ESTALE;
	*ret_fd = TAKE_FD(fd);
	return 0;
}

static int disk_open(const struct vm *vm, json_object *arg, int *fds, size_t n)
{
	for (size_t k = 0; k < n; k++)
		fds[k] = -EBADF;
	for (size_t k = 0; k < n; k++) {
		size_t i, j;
		int r = disk_place(arg, k, &i, &j)
			    ? open_layer(json_object_array_get_idx(arg, i), j, &fds[k])
			    : -EINVAL;

		if (r < 0) {
			close_many(fds, n);
			return r;
		}
	}
	return 0;
}

/* ---- kept as saved while the VM is checkpointed ---- */

/*
 * QEMU's own image locks (file-posix) are OFD locks on bytes of the file:
 * 100 + n says "I use permission n", 200 + n "I do not let others have
 * permission n"; write is permission 1. A QEMU or qemu-img that wants to
 * write an image first looks for a lock on byte 201 and gives up when it
 * finds one. cprd holds that one byte on its own file description while
 * no VMM runs the guest, so that the images stay as the checkpoint needs
 * them (QEMU's CPR docs: block devices must not change between save and
 * load).
 */
#define QEMU_LOCK_NO_SHARED_WRITE 201

static int lock_byte(int fd, short type)
{
	struct flock fl = { .l_type = type,
			    .l_whence = SEEK_SET,
			    .l_start = QEMU_LOCK_NO_SHARED_WRITE,
			    .l_len = 1 };

	return fcntl(fd, F_OFD_SETLK, &fl) < 0 ? -errno : 0;
}

static json_object *layer_at(json_object *arg, size_t k)
{
	size_t i, j;

	if (!disk_place(arg, k, &i, &j))
		return NULL;
	return json_object_array_get_idx(layers_of(json_object_array_get_idx(arg, i)), j);
}

static int64_t ns_of(const struct timespec *t)
{
	return (int64_t)t->tv_sec * 1000000000 + t->tv_nsec;
}

/* What tells a file written since: its size and its change time (which
 * every write moves, and nobody can set back). */
static int disk_saved(json_object *arg, const int *fds, size_t n, bool stamp)
{
	int r = 0;

	for (size_t k = 0; k < n; k++) {
		json_object *l = layer_at(arg, k), *saved;
		struct stat st;

		if (!stamp) {
			if (lock_byte(fds[k], F_RDLCK) < 0 && r == 0)
				r = -errno;
			continue;
		}
		if (!l || fstat(fds[k], &st) < 0)
			continue;
		saved = json_object_new_object();
		json_object_object_add(saved, "size", json_object_new_int64(st.st_size));
		json_object_object_add(saved, "ctime_ns",
				       json_object_new_int64(ns_of(&st.st_ctim)));
		json_object_object_add(l, "saved", saved);
	}
	return r;
}

static int disk_restoring(json_object *arg, const int *fds, size_t n, char *why, size_t size)
{
	for (size_t k = 0; k < n; k++) {
		json_object *l = layer_at(arg, k), *saved;
		struct stat st;

		if (!l || !json_object_object_get_ex(l, "saved", &saved))
			continue; /* saved by a cprd that did not record it */
		if (fstat(fds[k], &st) < 0)
			return -errno;
		if (st.st_size != json_object_get_int64(json_object_object_get(saved, "size")) ||
		    ns_of(&st.st_ctim) !=
			json_object_get_int64(json_object_object_get(saved, "ctime_ns"))) {
			char id[DEVICE_FD_ID_MAX];

			disk_fd_id(arg, k, id, sizeof(id));
			snprintf(why, size,
				 "%s (%.200s) was changed after the checkpoint was written; the "
				 "guest would not find the disk it left",
				 id, str_of(l, "path"));
			return -ESTALE;
		}
	}
	/* The stamps stay: a restore that fails checks them again. */
	for (size_t k = 0; k < n; k++)
		(void)lock_byte(fds[k], F_UNLCK);
	return 0;
}

/* ---- QEMU ---- */

/*
 * Disk i's files, bottom up, as block nodes on their fd sets: a "file"
 * node per file (diskI-fJ), a format node on it (diskI-J), each qcow2
 * node on the one below it (never its header's name for it: cprd opened
 * that file), and the guest's virtio-blk device on the top node.
 */
static int disk_qemu_args(json_object *arg, const int *child, size_t n, struct qemu_config *qc)
{
	struct qemu_args *a = &qc->devices[QEMU_PLACE_DEVICE];
	size_t k = 0;

	for (size_t i = 0; i < json_object_array_length(arg); i++) {
		json_object *d = json_object_array_get_idx(arg, i);
		size_t m = layer_count(d);
		const char *cache = str_of(d, "cache"), *serial = str_of(d, "serial");
		bool direct = cache && streq(cache, "none");

		if (k + m > n)
			return -EINVAL;
		for (size_t j = m; j-- > 0;) {
			json_object *l = json_object_array_get_idx(layers_of(d), j);
			const char *fmt = l ? str_of(l, "format") : format_of(d);
			bool ro = j > 0 || bool_of(d, "readonly");
			int fd = child[k + j];

			qemu_args_add(a, "-add-fd");
			qemu_args_addf(a, "fd=%d,set=%d,opaque=disk%zu.%zu", fd, FDSET_BASE + fd, i,
				       j);
			qemu_args_add(a, "-blockdev");
			qemu_args_addf(a,
				       "driver=file,node-name=disk%zu-f%zu,filename=/dev/fdset/%d,"
				       "read-only=%s,cache.direct=%s",
				       i, j, FDSET_BASE + fd, ro ? "on" : "off",
				       direct ? "on" : "off");
			qemu_args_add(a, "-blockdev");
			if (streq(fmt, "qcow2") && j + 1 < m)
				qemu_args_addf(
				    a,
				    "driver=qcow2,node-name=disk%zu-%zu,file=disk%zu-f%zu,"
				    "read-only=%s,backing=disk%zu-%zu",
				    i, j, i, j, ro ? "on" : "off", i, j + 1);
			else if (streq(fmt, "qcow2"))
				qemu_args_addf(
				    a,
				    "driver=qcow2,node-name=disk%zu-%zu,file=disk%zu-f%zu,"
				    "read-only=%s,backing=null",
				    i, j, i, j, ro ? "on" : "off");
			else
				qemu_args_addf(a,
					       "driver=raw,node-name=disk%zu-%zu,file=disk%zu-f%zu,"
					       "read-only=%s",
					       i, j, i, j, ro ? "on" : "off");
		}
		qemu_args_add(a, "-device");
		if (serial)
			qemu_args_addf(a, "virtio-blk-pci,drive=disk%zu-0,id=disk%zu,serial=%s", i,
				       i, serial);
		else
			qemu_args_addf(a, "virtio-blk-pci,drive=disk%zu-0,id=disk%zu", i, i);
		k += m;
	}
	return a->error;
}

const struct device_type device_disk = {
	.kind = "disk",
	.id = "disk",
	.what = "its disk images",
	.custody = MEMSTORE_KIND_FILE,
	.param = "disks",
	.param_type = json_type_array,
	.check = disk_check,
	.prepare = disk_prepare,
	.nfds = disk_nfds,
	.fd_id = disk_fd_id,
	.fresh_per_vmm = true,
	.open = disk_open,
	.reopen = disk_open,
	.saved = disk_saved,
	.restoring = disk_restoring,
	.qemu_args = disk_qemu_args,
	/* Not cpr-exec: QEMU closes the fds -add-fd named once it has put
	 * dups of them in its fd sets, and its successor, given the same
	 * command line, finds nothing at those numbers (QEMU 10.2). */
	.carry = DEVICE_BY_ALL & ~DEVICE_BY_CPR_EXEC,
};
