/* SPDX-License-Identifier: MIT */
/*
 * Checkpoint and restore (checkpoint.h). Two methods:
 *
 *  cprd  QEMU saves only its device state (x-ignore-shared leaves out
 *        ram0, the memfd cprd holds) to device.state through an fd; cprd
 *        copies the memfd's data (SEEK_DATA/SEEK_HOLE, sendfile) to
 *        ram0.img and digests it; restore fills a new sealed memfd from
 *        ram0.img, checks the digest, and hands it to a new VMM that
 *        loads only the device state.
 *  qemu  QEMU saves everything, RAM included, with mode=cpr-reboot and
 *        mapped-ram (+ multifd) to memory.img through an fd; restore gives
 *        a new VMM an empty memfd and the file with -incoming defer.
 *
 * Both save through a file cprd opened in the checkpoint's temporary
 * directory and hands over with getfd: a confined VMM writes nothing by
 * path. Copies run in chunks from an idle watcher, so the daemon keeps
 * answering while one runs.
 */
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>
#include <xxhash.h>

#include "common/file.h"
#include "common/json.h"
#include "common/macro.h"
#include "daemon/ops/checkpoint.h"
#include "daemon/devices/devices.h"
#include "daemon/observe/events.h"
#include "daemon/core/fdstore.h"
#include "daemon/observe/history.h"
#include "daemon/observe/log.h"
#include "daemon/core/server.h"
#include "daemon/core/vm.h"
#include "daemon/core/vmm.h"
#include "memstore/memstore.h"
#include "proto/jsonrpc.h"

#define CKPT_VERSION 1
#define CKPT_META "meta.json"
#define CKPT_DEVICE "device.state" /* cprd method: the VMM's device state */
#define CKPT_RAM "ram0.img"        /* cprd method: guest RAM, sparse */
#define CKPT_QEMU "memory.img"     /* qemu method: everything, mapped-ram */
#define CKPT_HISTORY "history.jsonl"
#define CKPT_FDSET CHECKPOINT_FDSET
#define CKPT_FDSET_STR STRINGIFY(CHECKPOINT_FDSET)
#define CKPT_CHUNK (64u << 20) /* bytes copied per turn of the loop */
#define CKPT_PAGE 4096u

/* A checkpoint's phases (checkpoint_op_type), and a restore's. */
enum {
	SAVE_OPEN,     /* finding the directory; nothing written yet */
	SAVE_WRITE,    /* .NAME.tmp exists: the guest is being saved into it */
	SAVE_PLACED,   /* the checkpoint is in place and is the guest */
	SAVE_ROLLBACK, /* the temporary directory went; the guest resumes */
	_SAVE_MAX,
};

enum {
	RESTORE_START, /* checking the checkpoint, starting the new VMM */
	RESTORE_LOAD,  /* the new VMM exists; it loads the checkpoint */
	RESTORE_RUNS,  /* the guest runs in it: the VM's VMM now */
	_RESTORE_MAX,
};

struct ckpt {
	struct op op;
	/* the VM's operation; its phase is one of the above */ /* the VM's operation (op.h) */
	struct vm *vm;
	struct call *call;
	bool restore, qemu, ended;
	bool was_running; /* save: the guest ran when it began */
	unsigned channels;
	double timeout;
	char *root;    /* the checkpoint directory */
	int root_fd;   /* it */
	char tmp[96];  /* save: .NAME.tmp in it */
	int dir_fd;    /* save: the temporary directory; restore: NAME */
	int state_fd;  /* device.state or memory.img */
	int ram_fd;    /* ram0.img */
	int mem_fd;    /* restore: the new memfd (custody holds a dup of it) */
	uint8_t *map;  /* the memfd, read-only, for the digest */
	uint64_t size; /* guest RAM */
	uint64_t pos;  /* copy: next offset to look at */
	XXH3_state_t *xx;
	ev_idle copier;
	ev_timer timer;
	ev_timer retry; /* rollback: asking the VMM to resume again */
	unsigned cont_tries;
	struct vmm *next; /* restore: the new VMM until the VM adopts it */
	bool ram_ready;   /* restore: the new memfd holds the checkpoint's RAM */
	bool vmm_ready;   /* restore: the new VMM's monitor answers */
	uint64_t t0_mono, t0_real;
	int64_t stop_us, resume_us, paused_at_us;
	uint64_t bytes_done, data_bytes, state_bytes, file_bytes, disk_bytes;
	uint64_t digest, expect_digest;
	char *old_vmm, *new_vmm;
	json_object *meta; /* restore: the checkpoint's */
	char error[1024];  /* room for a reason and VM_VMM_SAID_MAX of the VMM's words */
};

static void finish_save(struct ckpt *k);
static void ram_copied(struct ckpt *k);

/* ---- files ---- */

static int open_root(const char *path, bool create)
{
	int fd;

	if (create && mkdir(path, 0700) < 0 && errno != EEXIST)
		return -errno;
	fd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	return fd < 0 ? -errno : fd;
}

/* The files cprd writes in a checkpoint: the only names it ever removes. */
static const char *const ckpt_files[] = { CKPT_META, CKPT_DEVICE, CKPT_RAM, CKPT_QEMU,
					  CKPT_HISTORY };

/* Open a file in a checkpoint directory. Whoever can write in it could
 * have put a FIFO there, whose open() blocks the event loop until a writer
 * comes, or a link leading anywhere: so the open neither follows nor
 * blocks, and only a regular file is used (-EBADFD otherwise). */
static int ckpt_open(int dir_fd, const char *name, int flags, mode_t mode)
{
	_cleanup_close_ int fd =
	    openat(dir_fd, name, flags | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, mode);
	struct stat st;
	int fl;

	if (fd < 0)
		return -errno;
	if (fstat(fd, &st) < 0)
		return -errno;
	if (!S_ISREG(st.st_mode))
		return -EBADFD;
	/* Only the open needed it; the VMM is handed ordinary flags. */
	fl = fcntl(fd, F_GETFL);
	if (fl < 0 || fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) < 0)
		return -errno;
	return TAKE_FD(fd);
}

static const char *ckpt_strerror(int r)
{
	return r == -EBADFD  ? "not a regular file"
	       : r == -ELOOP ? "a symbolic link, which cprd does not follow"
			     : strerror(-r);
}

/* Remove a checkpoint directory below root: the files cprd writes in one,
 * then the directory if that emptied it. Nothing else is ever removed, so
 * a directory that is not cprd's keeps whatever else it holds. */
static int rm_flat(int root_fd, const char *name)
{
	_cleanup_close_ int fd =
	    openat(root_fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);

	if (fd < 0)
		return errno == ENOENT ? 0 : -errno;
	for (size_t i = 0; i < ELEMENTSOF(ckpt_files); i++)
		(void)unlinkat(fd, ckpt_files[i], 0);
	return unlinkat(root_fd, name, AT_REMOVEDIR) < 0 ? -errno : 0;
}

static int write_json_at(int dir_fd, const char *name, json_object *o)
{
	const char *s = json_object_to_json_string_ext(o, JSON_C_TO_STRING_PRETTY);
	_cleanup_close_ int fd = ckpt_open(dir_fd, name, O_WRONLY | O_CREAT | O_EXCL, 0600);
	size_t n = strlen(s), off = 0;

	if (fd < 0)
		return fd;
	while (off < n) {
		ssize_t w = write(fd, s + off, n - off);

		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0)
			return -errno;
		off += (size_t)w;
	}
	return fsync(fd) < 0 ? -errno : 0;
}

static int copy_file_at(int from_dir, const char *from, int to_dir, const char *to)
{
	_cleanup_close_ int in = ckpt_open(from_dir, from, O_RDONLY, 0);
	_cleanup_close_ int out = -EBADF;
	struct stat st;
	off_t off = 0;

	if (in < 0)
		return in == -ENOENT ? 0 : in;
	if (fstat(in, &st) < 0)
		return -errno;
	out = ckpt_open(to_dir, to, O_WRONLY | O_CREAT | O_TRUNC, 0640);
	if (out < 0)
		return out;
	while (off < st.st_size)
		if (sendfile(out, in, &off, (size_t)(st.st_size - off)) <= 0)
			return errno ? -errno : -EIO;
	return fsync(out) < 0 ? -errno : 0;
}

static const char *jstr(json_object *o, const char *k)
{
	json_object *v = json_object_object_get(o, k);

	return v && json_object_is_type(v, json_type_string) ? json_object_get_string(v) : NULL;
}

static int64_t jint(json_object *o, const char *k)
{
	return json_object_get_int64(json_object_object_get(o, k));
}

static int read_meta(int dir_fd, json_object **ret, char *why, size_t size)
{
	_cleanup_close_ int fd = ckpt_open(dir_fd, CKPT_META, O_RDONLY, 0);
	char buf[65536];
	ssize_t n;
	json_object *o;

	if (fd < 0) {
		snprintf(why, size, "cannot open its %s: %s", CKPT_META, ckpt_strerror(fd));
		return fd;
	}
	n = read(fd, buf, sizeof(buf) - 1);
	if (n < 0 || n == sizeof(buf) - 1) {
		snprintf(why, size, "cannot read its %s: %s", CKPT_META,
			 n < 0 ? strerror(errno) : "too large");
		return -EBADMSG;
	}
	buf[n] = '\0';
	o = json_tokener_parse(buf);
	if (!o || !json_object_is_type(o, json_type_object) || jint(o, "version") != CKPT_VERSION ||
	    !jstr(o, "vm") || !jstr(o, "method") ||
	    !json_object_is_type(json_object_object_get(o, "config"), json_type_object)) {
		json_object_put(o);
		snprintf(why, size, "its %s is not a version %d checkpoint description", CKPT_META,
			 CKPT_VERSION);
		return -EBADMSG;
	}
	*ret = o;
	return 0;
}

/* What is at root_fd/name: 1 a checkpoint of VM name (a directory, not a
 * link, whose meta.json describes that VM), 0 nothing, else a negative
 * errno and why. cprd renames aside or removes only the first kind: a
 * checkpoint directory root named may hold anything else, /etc/passwd or
 * another program's files, under a VM's name. */
static int find_checkpoint(int root_fd, const char *name, char *why, size_t size)
{
	_cleanup_close_ int fd = -EBADF;
	_cleanup_json_ json_object *meta = NULL;
	struct stat st;
	char buf[256];

	if (fstatat(root_fd, name, &st, AT_SYMLINK_NOFOLLOW) < 0) {
		if (errno == ENOENT)
			return 0;
		snprintf(why, size, "%s", strerror(errno));
		return -errno;
	}
	if (!S_ISDIR(st.st_mode)) {
		snprintf(why, size, "it is not a directory");
		return -ENOTDIR;
	}
	fd = openat(root_fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0) {
		snprintf(why, size, "%s", strerror(errno));
		return -errno;
	}
	if (read_meta(fd, &meta, buf, sizeof(buf)) < 0) {
		snprintf(why, size, "%s", buf);
		return -EEXIST;
	}
	if (!streq(jstr(meta, "vm"), name)) {
		snprintf(why, size, "its %s describes VM '%.64s'", CKPT_META, jstr(meta, "vm"));
		return -EEXIST;
	}
	return 1;
}

static json_object *config_json(const struct vm *vm)
{
	json_object *o = json_object_new_object();
	struct vm_record rec = vm_record_of(vm);

	vm_record_to_json(&rec, VM_VIEW_CHECKPOINT, o);
	return o;
}

/* The VM meta describes (read_meta() checked its shape). */
static int record_from_meta(json_object *meta, struct vm_record *ret, char *why, size_t size)
{
	return vm_record_from_json(json_object_object_get(meta, "config"), VM_VIEW_CHECKPOINT,
				   jstr(meta, "vm"), ret, why, size);
}

/* ---- the digest: every page that is not all zeros, with its offset ---- */

static bool page_is_zero(const uint8_t *p)
{
	return p[0] == 0 && memcmp(p, p + 1, CKPT_PAGE - 1) == 0;
}

static uint64_t digest_range(struct ckpt *k, uint64_t off, uint64_t len)
{
	uint64_t data = 0;

	for (uint64_t o = off; o < off + len; o += CKPT_PAGE) {
		const uint8_t *p = k->map + o;

		if (page_is_zero(p))
			continue;
		XXH3_64bits_update(k->xx, &o, sizeof(o));
		XXH3_64bits_update(k->xx, p, CKPT_PAGE);
		data += CKPT_PAGE;
	}
	return data;
}

/* ---- the op's life ---- */

static double ms_since(uint64_t t0)
{
	return (double)(now_usec(CLOCK_MONOTONIC) - t0) / 1000.0;
}

static json_object *ms_json(double ms)
{
	char buf[32];

	snprintf(buf, sizeof(buf), "%.3f", ms);
	return json_object_new_double_s(ms, buf);
}

_printf_(2, 3) static void set_error(struct ckpt *k, const char *fmt, ...)
{
	va_list ap;

	if (k->error[0])
		return; /* the first reason is the one */
	va_start(ap, fmt);
	vsnprintf(k->error, sizeof(k->error), fmt, ap);
	va_end(ap);
}

static void ckpt_free(struct ckpt *k)
{
	struct ev_loop *loop = k->vm->d->loop;

	ev_idle_stop(loop, &k->copier);
	ev_timer_stop(loop, &k->timer);
	ev_timer_stop(loop, &k->retry);
	if (k->map)
		munmap(k->map, k->size);
	if (k->xx)
		XXH3_freeState(k->xx);
	safe_close(k->root_fd);
	safe_close(k->dir_fd);
	safe_close(k->state_fd);
	safe_close(k->ram_fd);
	safe_close(k->mem_fd);
	json_object_put(k->meta);
	free(k->root);
	free(k->old_vmm);
	free(k->new_vmm);
	free(k);
}

static json_object *report(struct ckpt *k, const char *result)
{
	json_object *o = json_object_new_object();
	char path[4096];

	snprintf(path, sizeof(path), "%s/%s", k->root, k->vm->cfg.name);
	json_object_object_add(o, "vm", json_object_new_string(k->vm->cfg.name));
	json_object_object_add(o, "operation",
			       json_object_new_string(k->restore ? "restore" : "checkpoint"));
	json_object_object_add(o, "method", json_object_new_string(k->qemu ? "qemu" : "cprd"));
	json_object_object_add(o, "result", json_object_new_string(result));
	json_object_object_add(o, "time_usec", json_object_new_int64((int64_t)k->t0_real));
	json_object_object_add(o, "path", json_object_new_string(path));
	json_object_object_add(o, "paused_at",
			       k->paused_at_us ? json_object_new_int64(k->paused_at_us) : NULL);
	if (!k->restore) {
		json_object_object_add(o, "save_ms", ms_json(ms_since(k->t0_mono)));
		json_object_object_add(o, "bytes_written",
				       json_object_new_int64((int64_t)k->bytes_done));
		json_object_object_add(o, "file_bytes",
				       json_object_new_int64((int64_t)k->file_bytes));
		json_object_object_add(o, "disk_bytes",
				       json_object_new_int64((int64_t)k->disk_bytes));
	} else {
		json_object_object_add(o, "restore_ms", ms_json(ms_since(k->t0_mono)));
		json_object_object_add(o, "bytes_read",
				       json_object_new_int64((int64_t)k->bytes_done));
		json_object_object_add(
		    o, "blackout_ms",
		    k->resume_us && k->paused_at_us && k->resume_us > k->paused_at_us
			? ms_json((double)(k->resume_us - k->paused_at_us) / 1000.0)
			: NULL);
		json_object_object_add(o, "old_vmm",
				       k->old_vmm ? json_object_new_string(k->old_vmm) : NULL);
		json_object_object_add(o, "new_vmm",
				       k->new_vmm ? json_object_new_string(k->new_vmm) : NULL);
	}
	json_object_object_add(o, "error", k->error[0] ? json_object_new_string(k->error) : NULL);
	return o;
}

/* Every way out, once: history, log, event, answer. */
static void end(struct ckpt *k, const char *result)
{
	struct vm *vm = k->vm;
	json_object *rep;
	struct call *c;
	bool ok = streq(result, "ok");

	if (k->ended)
		return;
	k->ended = true;
	vmm_cancel(vm->vmm, k);
	vmm_cancel(k->next, k);
	k->next = vmm_kill(k->next);
	vm_op_end(vm, &k->op);
	/* A restore that did not take: the checkpoint is the guest again. */
	if (k->restore && !ok && vm->state == VM_CHECKPOINTED)
		devices_saved(vm, false);
	rep = report(k, result);
	if (vm->dir_fd >= 0)
		history_append(vm->dir_fd, VM_HISTORY, rep);
	/* The checkpoint carries the VM's history through the reboot, this
	 * checkpoint's own entry included. */
	if (ok && !k->restore && k->dir_fd >= 0)
		history_append(k->dir_fd, CKPT_HISTORY, rep);
	if (ok)
		log_info("%s vm=%s method=%s result=ok %s", k->restore ? "restore" : "checkpoint",
			 vm->cfg.name, k->qemu ? "qemu" : "cprd",
			 json_object_to_json_string_ext(rep, JSON_C_TO_STRING_PLAIN));
	else
		log_warning("%s vm=%s method=%s result=%s error=%s",
			    k->restore ? "restore" : "checkpoint", vm->cfg.name,
			    k->qemu ? "qemu" : "cprd", result, k->error);
	events_emit(vm->d, k->restore ? "restore-finished" : "checkpoint-finished", vm->cfg.name,
		    json_object_get(rep));
	daemon_changed(vm->d);
	c = TAKE_PTR(k->call);
	if (!c)
		json_object_put(rep);
	else if (ok)
		call_reply(c, rep);
	else
		call_fail_data(c, k->restore ? JSONRPC_ERR_RESOURCE : JSONRPC_ERR_VMM, rep,
			       "%s of VM '%s' %s: %s", k->restore ? "restore" : "checkpoint",
			       vm->cfg.name, result, k->error);
	ckpt_free(k);
}

static void timer_cb(struct ev_loop *loop, ev_timer *w, int revents);
static void retry_cb(struct ev_loop *loop, ev_timer *w, int revents);
static void copy_cb(struct ev_loop *loop, ev_idle *w, int revents);

static struct ckpt *ckpt_new(struct vm *vm, const char *dir, bool qemu, double timeout,
			     struct call *c)
{
	struct ckpt *k = calloc(1, sizeof(*k));

	if (!k)
		return NULL;
	k->vm = vm;
	k->call = c;
	k->qemu = qemu;
	k->timeout = timeout;
	k->root_fd = k->dir_fd = k->state_fd = k->ram_fd = k->mem_fd = -EBADF;
	k->t0_mono = now_usec(CLOCK_MONOTONIC);
	k->t0_real = now_usec(CLOCK_REALTIME);
	k->root = strdup(dir);
	ev_idle_init(&k->copier, copy_cb);
	ev_init(&k->timer, timer_cb);
	ev_init(&k->retry, retry_cb);
	k->copier.data = k->timer.data = k->retry.data = k;
	if (!k->root) {
		free(k);
		return NULL;
	}
	ev_timer_set(&k->timer, timeout, 0.);
	ev_timer_start(vm->d->loop, &k->timer);
	return k;
}

/* ---- copying RAM, a chunk per turn of the loop ---- */

static int copy_range(int out, int in, uint64_t off, uint64_t len)
{
	off_t in_off = (off_t)off;

	if (lseek(out, (off_t)off, SEEK_SET) < 0)
		return -errno;
	while (len > 0) {
		ssize_t n = sendfile(out, in, &in_off, (size_t)MIN(len, (uint64_t)1 << 30));

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		if (n == 0)
			return -EIO; /* the source ended early */
		len -= (uint64_t)n;
	}
	return 0;
}

/* One step: the next data segment of the source (the memfd when saving,
 * ram0.img when restoring), at most CKPT_CHUNK of it. 1 when done. */
static int copy_step(struct ckpt *k)
{
	int src = k->restore ? k->ram_fd : k->mem_fd;
	int dst = k->restore ? k->mem_fd : k->ram_fd;
	off_t data, hole;
	uint64_t len;
	int r;

	if (k->pos >= k->size)
		return 1;
	data = lseek(src, (off_t)k->pos, SEEK_DATA);
	if (data < 0 && errno == ENXIO)
		return 1;
	if (data < 0)
		return -errno;
	hole = lseek(src, data, SEEK_HOLE);
	if (hole < 0)
		return -errno;
	if ((uint64_t)hole > k->size)
		hole = (off_t)k->size;
	/* Whole pages: a data segment of a file system with larger blocks
	 * still starts and ends on page boundaries. */
	data &= ~(off_t)(CKPT_PAGE - 1);
	len = MIN((uint64_t)(hole - data), (uint64_t)CKPT_CHUNK);
	len = (len + CKPT_PAGE - 1) & ~(uint64_t)(CKPT_PAGE - 1);
	if ((uint64_t)data + len > k->size)
		len = k->size - (uint64_t)data;
	r = copy_range(dst, src, (uint64_t)data, len);
	if (r < 0)
		return r;
	/* The digest reads the segment through k->map: one call maps its
	 * pages, where a fault per page took longer than the hashing. */
	(void)madvise(k->map + data, len, MADV_POPULATE_READ);
	k->data_bytes += digest_range(k, (uint64_t)data, len);
	k->bytes_done += len;
	k->pos = (uint64_t)data + len;
	return 0;
}

static void copy_cb(struct ev_loop *loop, ev_idle *w, int revents)
{
	struct ckpt *k = w->data;
	int r = copy_step(k);

	if (r == 0)
		return;
	ev_idle_stop(loop, w);
	if (r < 0) {
		set_error(k, "cannot copy guest RAM %s %s: %s", k->restore ? "from" : "to",
			  CKPT_RAM, strerror(-r));
		if (k->restore)
			ram_copied(k); /* sees the error */
		else
			finish_save(k);
		return;
	}
	k->digest = XXH3_64bits_digest(k->xx);
	if (k->restore)
		ram_copied(k);
	else
		finish_save(k);
}

static int start_copy(struct ckpt *k)
{
	void *map = mmap(NULL, k->size, PROT_READ, MAP_SHARED, k->mem_fd, 0);

	if (map == MAP_FAILED)
		return -errno;
	k->map = map;
	/* Restore: ram0.img is read once, front to back; a larger readahead
	 * keeps the disk busy while a chunk is digested. */
	if (k->restore)
		(void)posix_fadvise(k->ram_fd, 0, 0, POSIX_FADV_SEQUENTIAL);
	k->xx = XXH3_createState();
	if (!k->xx || XXH3_64bits_reset(k->xx) != XXH_OK)
		return -ENOMEM;
	ev_idle_start(k->vm->d->loop, &k->copier);
	return 0;
}

/* ======== checkpoint ======== */

/* Answered only once the guest runs again: a client told "rolled-back"
 * finds it running. "finish-migrate" refuses cont for a moment. */
static void try_cont(struct ckpt *k);

static void cont_old_done(qmp *q, json_object *ret, const char *cls, const char *desc, void *ud)
{
	struct ckpt *k = ud;

	if (ret) {
		end(k, "rolled-back");
		return;
	}
	if (++k->cont_tries < OP_CONT_RETRIES && vmm_alive(k->vm->vmm)) {
		ev_timer_set(&k->retry, OP_CONT_RETRY, 0.);
		ev_timer_start(k->vm->d->loop, &k->retry);
		return;
	}
	set_error(k, "and resuming the guest failed: %s", desc ? desc : "?");
	end(k, "failed");
}

static void try_cont(struct ckpt *k)
{
	if (vmm_command(k->vm->vmm, "cont", NULL, -EBADF, cont_old_done, k) < 0)
		end(k, "failed");
}

static void retry_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	try_cont(w->data);
}

/* Before the checkpoint is in place: the temporary directory goes, and the
 * guest runs on in its VMM. */
static void save_rollback(struct ckpt *k)
{
	struct vm *vm = k->vm;

	if (k->op.phase == SAVE_ROLLBACK || !op_set_phase(&k->op, SAVE_ROLLBACK, NULL))
		return;
	ev_idle_stop(vm->d->loop, &k->copier);
	if (k->tmp[0])
		(void)rm_flat(k->root_fd, k->tmp);
	k->tmp[0] = '\0';
	if (!vmm_alive(vm->vmm)) {
		end(k, "failed");
		return;
	}
	vmm_cancel(vm->vmm, k);
	(void)vmm_command(vm->vmm, "migrate_cancel", NULL, -EBADF, NULL, NULL);
	(void)vmm_command(vm->vmm, "remove-fd",
			  json_tokener_parse("{\"fdset-id\": " CKPT_FDSET_STR "}"), -EBADF, NULL,
			  NULL);
	try_cont(k);
}

_printf_(2, 3) static void save_fail(struct ckpt *k, const char *fmt, ...)
{
	va_list ap;
	char buf[sizeof(k->error)];

	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	set_error(k, "%s", buf);
	save_rollback(k);
}

static json_object *save_meta(struct ckpt *k)
{
	json_object *o = json_object_new_object();
	char digest[40];

	snprintf(digest, sizeof(digest), "xxh3-64:%016llx", (unsigned long long)k->digest);
	json_object_object_add(o, "version", json_object_new_int(CKPT_VERSION));
	json_object_object_add(o, "vm", json_object_new_string(k->vm->cfg.name));
	json_object_object_add(o, "method", json_object_new_string(k->qemu ? "qemu" : "cprd"));
	json_object_object_add(o, "config", config_json(k->vm));
	json_object_object_add(o, "vmm_version", json_object_new_string(k->vm->vmm->version));
	json_object_object_add(o, "paused_at_usec", json_object_new_int64(k->paused_at_us));
	json_object_object_add(o, "saved_usec",
			       json_object_new_int64((int64_t)now_usec(CLOCK_REALTIME)));
	json_object_object_add(o, "state_file",
			       json_object_new_string(k->qemu ? CKPT_QEMU : CKPT_DEVICE));
	json_object_object_add(o, "state_bytes", json_object_new_int64((int64_t)k->state_bytes));
	json_object_object_add(o, "channels", json_object_new_int((int)k->channels));
	if (!k->qemu) {
		json_object_object_add(o, "ram_file", json_object_new_string(CKPT_RAM));
		json_object_object_add(o, "ram_bytes", json_object_new_int64((int64_t)k->size));
		json_object_object_add(o, "data_bytes",
				       json_object_new_int64((int64_t)k->data_bytes));
		json_object_object_add(o, "digest", json_object_new_string(digest));
	}
	return o;
}

static void add_sizes(struct ckpt *k, int fd)
{
	struct stat st;

	if (fd >= 0 && fstat(fd, &st) == 0) {
		k->file_bytes += (uint64_t)st.st_size;
		k->disk_bytes += (uint64_t)st.st_blocks * 512;
	}
}

/* Everything is written: make it durable, put it in place, end the VMM,
 * release the RAM. From the rename on the checkpoint is the guest. */
static void finish_save(struct ckpt *k)
{
	struct vm *vm = k->vm;
	_cleanup_json_ json_object *meta = NULL;
	char old[128], why[256];
	int r;

	if (k->error[0]) {
		save_rollback(k);
		return;
	}
	if (fsync(k->state_fd) < 0 || (k->ram_fd >= 0 && fsync(k->ram_fd) < 0)) {
		save_fail(k, "cannot write the checkpoint to disk: %s", strerror(errno));
		return;
	}
	add_sizes(k, k->state_fd);
	add_sizes(k, k->ram_fd);
	/* The VMM let go of the disks when its migration completed: what
	 * they are now is what the checkpoint needs (in its meta). */
	devices_saved(vm, true);
	meta = save_meta(k);
	r = write_json_at(k->dir_fd, CKPT_META, meta);
	if (r >= 0 && vm->dir_fd >= 0)
		r = copy_file_at(vm->dir_fd, VM_HISTORY, k->dir_fd, CKPT_HISTORY);
	if (r >= 0 && fsync(k->dir_fd) < 0)
		r = -errno;
	if (r < 0) {
		save_fail(k, "cannot write the checkpoint's %s: %s", CKPT_META, strerror(-r));
		return;
	}
	/* An older checkpoint of this VM (one never restored) makes way;
	 * anything else that appeared under its name during the save stays. */
	r = find_checkpoint(k->root_fd, vm->cfg.name, why, sizeof(why));
	if (r < 0) {
		save_fail(k, "%s/%s is there and is not a checkpoint of this VM (%s)", k->root,
			  vm->cfg.name, why);
		return;
	}
	snprintf(old, sizeof(old), ".%s.old", vm->cfg.name);
	(void)rm_flat(k->root_fd, old);
	if (r > 0 && renameat(k->root_fd, vm->cfg.name, k->root_fd, old) < 0) {
		save_fail(k, "cannot move the older checkpoint aside: %s", strerror(errno));
		return;
	}
	/* NOREPLACE: whatever came under the name since it was looked at stays. */
	if (renameat2(k->root_fd, k->tmp, k->root_fd, vm->cfg.name, RENAME_NOREPLACE) < 0 ||
	    fsync(k->root_fd) < 0) {
		int e = errno;

		if (r > 0) /* the older one is still the guest's last checkpoint */
			(void)renameat2(k->root_fd, old, k->root_fd, vm->cfg.name,
					RENAME_NOREPLACE);
		save_fail(k, "cannot put the checkpoint in place: %s", strerror(e));
		return;
	}
	k->tmp[0] = '\0';
	(void)rm_flat(k->root_fd, old);

	/* The guest is on disk now: its VMM and RAM go, its disks stay as
	 * they are. */
	vmm_cancel(vm->vmm, k);
	vm->vmm = vmm_kill(vm->vmm);
	devices_saved(vm, false);
	fdstore_remove(vm->d, vm->cfg.name, "pidfd");
	fdstore_remove(vm->d, vm->cfg.name, DEVICE_RAM_ID);
	(void)memstore_remove(vm->d->store, vm->cfg.name, DEVICE_RAM_ID);
	free(vm->checkpoint_root);
	vm->checkpoint_root = strdup(k->root);
	vm_set_state(vm, VM_CHECKPOINTED);
	(void)op_set_phase(&k->op, SAVE_PLACED, NULL); /* durable */
	end(k, "ok");
}

static void migrate_stats(qmp *q, json_object *ret, const char *cls, const char *desc, void *ud)
{
	struct ckpt *k = ud;
	const memstore_entry *e;
	int r;

	if (ret) {
		json_object *ram = json_object_object_get(ret, "ram");

		k->bytes_done = (uint64_t)jint(ram, "transferred");
	}
	if (k->qemu) {
		struct stat st;

		k->state_bytes = fstat(k->state_fd, &st) == 0 ? (uint64_t)st.st_size : 0;
		finish_save(k);
		return;
	}
	{
		struct stat st;

		k->state_bytes = fstat(k->state_fd, &st) == 0 ? (uint64_t)st.st_size : 0;
		k->bytes_done = k->state_bytes;
	}
	/* The device state is out; the guest's RAM is cprd's to copy. */
	r = memstore_get(k->vm->d->store, k->vm->cfg.name, DEVICE_RAM_ID, &e);
	if (r < 0) {
		save_fail(k, "the VM's RAM is not in custody");
		return;
	}
	k->size = e->size;
	k->mem_fd = fcntl(e->fd, F_DUPFD_CLOEXEC, 3);
	if (k->mem_fd < 0) {
		save_fail(k, "cannot hold the VM's RAM: %s", strerror(errno));
		return;
	}
	k->ram_fd = ckpt_open(k->dir_fd, CKPT_RAM, O_RDWR | O_CREAT | O_EXCL, 0600);
	if (k->ram_fd < 0 || ftruncate(k->ram_fd, (off_t)k->size) < 0) {
		save_fail(k, "cannot create %s: %s", CKPT_RAM,
			  k->ram_fd < 0 ? ckpt_strerror(k->ram_fd) : strerror(errno));
		return;
	}
	r = start_copy(k);
	if (r < 0)
		save_fail(k, "cannot map the VM's RAM: %s", strerror(-r));
}

/* QEMU says why a migration failed only when asked. */
static void failed_why(qmp *q, json_object *ret, const char *cls, const char *desc, void *ud)
{
	struct ckpt *k = ud;
	const char *why = ret ? jstr(ret, "error-desc") : NULL;
	char tail[VM_VMM_SAID_MAX] = "";

	struct statvfs sv;

	if (!why)
		vm_vmm_said(k->vm, k->vm->vmm, tail, sizeof(tail));
	/* QEMU reports a full disk as an I/O error: say how full it is. */
	if (fstatvfs(k->root_fd, &sv) == 0 && (uint64_t)sv.f_bavail * sv.f_frsize < k->size)
		save_fail(k, "the VMM's save failed: %s; No space left: %s has %llu bytes free",
			  why ? why : tail, k->root, (unsigned long long)sv.f_bavail * sv.f_frsize);
	else
		save_fail(k, "the VMM's save failed: %s",
			  why       ? why
			  : tail[0] ? tail
				    : "no reason given");
}

static void save_migration_event(struct ckpt *k, json_object *data)
{
	const char *st = jstr(data, "status");

	if (!st)
		return;
	if (streq(st, "completed")) {
		if (vmm_command(k->vm->vmm, "query-migrate", NULL, -EBADF, migrate_stats, k) < 0)
			save_fail(k, "lost the VMM's monitor");
	} else if (streq(st, "failed") || streq(st, "cancelled")) {
		if (vmm_command(k->vm->vmm, "query-migrate", NULL, -EBADF, failed_why, k) < 0)
			save_fail(k, "the VMM's save %s", st);
	}
}

static void save_step_done(qmp *q, json_object *ret, const char *cls, const char *desc, void *ud)
{
	struct ckpt *k = ud;

	if (!ret)
		save_fail(k, "the VMM refused to save: %s", desc ? desc : "?");
}

static json_object *caps_json(bool qemu)
{
	json_object *args = json_object_new_object();
	json_object *caps = json_object_new_array();
	const char *names[] = { "x-ignore-shared", "mapped-ram", "multifd", "events" };
	const bool on[] = { !qemu, qemu, qemu, true };

	for (size_t i = 0; i < ELEMENTSOF(names); i++) {
		json_object *c = json_object_new_object();

		json_object_object_add(c, "capability", json_object_new_string(names[i]));
		json_object_object_add(c, "state", json_object_new_boolean(on[i]));
		json_object_array_add(caps, c);
	}
	json_object_object_add(args, "capabilities", caps);
	return args;
}

static json_object *params_json(const struct ckpt *k)
{
	json_object *p = json_object_new_object();

	json_object_object_add(p, "mode",
			       json_object_new_string(k->qemu ? "cpr-reboot" : "normal"));
	if (k->qemu)
		json_object_object_add(p, "multifd-channels",
				       json_object_new_int((int)k->channels));
	return p;
}

/* Queue the migration on v: capabilities, parameters, the file as an fd,
 * then migrate (save) or migrate-incoming (restore). The file reaches QEMU
 * as an fd set (add-fd) that file:/dev/fdset/N opens, the access mode
 * telling which of its fds; mapped-ram opens it once per channel. A
 * confined VMM writes nothing by path. */
static int queue_migration(struct ckpt *k, struct vmm *v, qmp_reply_fn cb)
{
	json_object *uri = json_object_new_object(), *add = json_object_new_object();
	int r = 0;

	json_object_object_add(uri, "uri",
			       json_object_new_string("file:/dev/fdset/" CKPT_FDSET_STR));
	json_object_object_add(add, "fdset-id", json_object_new_int(CKPT_FDSET));
	r |= vmm_command(v, "migrate-set-capabilities", caps_json(k->qemu), -EBADF, cb, k);
	r |= vmm_command(v, "migrate-set-parameters", params_json(k), -EBADF, cb, k);
	r |= vmm_command(v, "add-fd", add, k->state_fd, cb, k);
	r |= vmm_command(v, k->restore ? "migrate-incoming" : "migrate", uri, -EBADF, cb, k);
	return r < 0 ? -ENOTCONN : 0;
}

static void stopped(qmp *q, json_object *ret, const char *cls, const char *desc, void *ud)
{
	struct ckpt *k = ud;

	if (!ret) {
		save_fail(k, "the VMM refused to pause the guest: %s", desc ? desc : "?");
		return;
	}
	if (!k->paused_at_us)
		k->paused_at_us = (int64_t)now_usec(CLOCK_REALTIME);
	if (queue_migration(k, k->vm->vmm, save_step_done) < 0)
		save_fail(k, "lost the VMM's monitor");
}

static unsigned host_cores(void)
{
	long n = sysconf(_SC_NPROCESSORS_ONLN);

	return n < 1 ? 1 : n > 16 ? 16 : (unsigned)n;
}

void checkpoint_start(struct vm *vm, const struct checkpoint_args *a, struct call *c)
{
	struct daemon *d = vm->d;
	const char *root = a->dir ? a->dir : d->checkpoint_dir;
	struct ckpt *k;
	char why[256];
	int r;

	if (!vmm_connected(vm->vmm) && (r = vmm_reconnect(vm->vmm)) < 0) {
		call_fail(c, JSONRPC_ERR_VMM,
			  "VM '%s': cannot reach its VMM's monitor (%s); nothing was changed",
			  vm->cfg.name, strerror(-r));
		return;
	}
	k = ckpt_new(vm, root, streq(a->method, "qemu"), a->timeout, c);
	if (!k) {
		call_fail(c, JSONRPC_ERR_RESOURCE, "out of memory");
		return;
	}
	k->channels = a->channels ? a->channels : host_cores();
	k->size = vm->cfg.memory_bytes;
	vm_op_begin(vm, &k->op, &checkpoint_op_type);
	events_emit(d, "checkpoint-started", vm->cfg.name, NULL);
	log_info("VM %s: checkpoint (%s method) to %s/%s", vm->cfg.name, a->method, root,
		 vm->cfg.name);
	k->root_fd = open_root(root, true);
	if (k->root_fd < 0) {
		set_error(k, "cannot open the checkpoint directory %s: %s", root,
			  strerror(-k->root_fd));
		end(k, "rolled-back"); /* nothing happened to the guest */
		return;
	}
	if (find_checkpoint(k->root_fd, vm->cfg.name, why, sizeof(why)) < 0) {
		set_error(k,
			  "%s/%s is there and is not a checkpoint of this VM (%s); cprd replaces "
			  "only its own checkpoints",
			  root, vm->cfg.name, why);
		end(k, "rolled-back");
		return;
	}
	snprintf(k->tmp, sizeof(k->tmp), ".%s.tmp", vm->cfg.name);
	(void)rm_flat(k->root_fd, k->tmp); /* a predecessor's, interrupted */
	k->was_running = vm->state == VM_RUNNING;
	/* Durable: a cprd restarted before this ends removes what is left of
	 * it, in whichever directory it is (recover.c). */
	(void)op_set_phase(&k->op, SAVE_WRITE, NULL);
	if (mkdirat(k->root_fd, k->tmp, 0700) < 0) {
		int e = errno;

		k->tmp[0] = '\0';
		set_error(k, "cannot write in the checkpoint directory %s: %s", root, strerror(e));
		end(k, "rolled-back");
		return;
	}
	k->dir_fd = openat(k->root_fd, k->tmp, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	k->state_fd = k->dir_fd < 0 ? -errno
				    : ckpt_open(k->dir_fd, k->qemu ? CKPT_QEMU : CKPT_DEVICE,
						O_WRONLY | O_CREAT | O_EXCL, 0600);
	if (k->state_fd < 0) {
		save_fail(k, "cannot create the checkpoint in %s: %s", root,
			  ckpt_strerror(k->state_fd));
		return;
	}
	if (vm->state == VM_PAUSED)
		k->paused_at_us = (int64_t)now_usec(CLOCK_REALTIME);
	if (vmm_command(vm->vmm, "stop", NULL, -EBADF, stopped, k) < 0)
		save_fail(k, "lost the VMM's monitor");
}

/* ======== restore ======== */

/* Whatever RAM was made for a restore that did not finish goes: the
 * checkpoint is the guest. */
static void drop_ram(struct vm *vm)
{
	if (memstore_get(vm->d->store, vm->cfg.name, DEVICE_RAM_ID,
			 &(const memstore_entry *){ NULL }) < 0)
		return;
	fdstore_remove(vm->d, vm->cfg.name, DEVICE_RAM_ID);
	(void)memstore_remove(vm->d->store, vm->cfg.name, DEVICE_RAM_ID);
}

_printf_(2, 3) static void restore_fail(struct ckpt *k, const char *fmt, ...)
{
	struct vm *vm = k->vm;
	va_list ap;
	char buf[sizeof(k->error)];

	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	set_error(k, "%s; the checkpoint stays", buf);
	ev_idle_stop(vm->d->loop, &k->copier);
	k->next = vmm_kill(k->next);
	drop_ram(vm);
	end(k, "refused");
}

/* Is root_fd/name still the directory dir_fd? */
static bool same_dir(int root_fd, const char *name, int dir_fd)
{
	struct stat a, b;

	return fstatat(root_fd, name, &a, AT_SYMLINK_NOFOLLOW) == 0 && fstat(dir_fd, &b) == 0 &&
	       a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

/* The guest runs on outside its checkpoint, which is stale from now on:
 * a --restore-on-start must never take it up again. The checkpoint is the
 * directory dir_fd the restore read, or (dir_fd < 0) whatever checkpoint
 * of the VM is there; anything else under its name is left alone. */
static void retire(struct vm *vm, int root_fd, const char *root, int dir_fd)
{
	char done[128], why[256];
	int r = find_checkpoint(root_fd, vm->cfg.name, why, sizeof(why));

	if (r > 0 && dir_fd >= 0 && !same_dir(root_fd, vm->cfg.name, dir_fd)) {
		snprintf(why, sizeof(why), "not the directory the restore read");
		r = -ESTALE;
	}
	if (r < 0)
		log_error("VM %s: %s/%s is left alone: %s; remove any checkpoint of the VM before "
			  "the next reboot",
			  vm->cfg.name, root, vm->cfg.name, why);
	if (r <= 0) {
		vm->checkpoint_root = (free(vm->checkpoint_root), NULL);
		return;
	}
	snprintf(done, sizeof(done), ".%s.done", vm->cfg.name);
	(void)rm_flat(root_fd, done);
	if (renameat(root_fd, vm->cfg.name, root_fd, done) < 0 || fsync(root_fd) < 0)
		log_error("VM %s: cannot retire its checkpoint %s/%s: %m; remove it before the "
			  "next reboot",
			  vm->cfg.name, root, vm->cfg.name);
	(void)rm_flat(root_fd, done);
	vm->checkpoint_root = (free(vm->checkpoint_root), NULL);
}

void checkpoint_retire(struct vm *vm, const char *root)
{
	_cleanup_close_ int fd = open_root(root, false);

	if (fd >= 0)
		retire(vm, fd, root, -EBADF);
	else if (fd != -ENOENT)
		log_error("VM %s: cannot retire its checkpoint in %s: %s; remove it before the "
			  "next reboot",
			  vm->cfg.name, root, strerror(-fd));
}

static void adopt(struct ckpt *k)
{
	struct vm *vm = k->vm;
	const memstore_entry *e;

	vm_adopt_vmm(vm, TAKE_PTR(k->next));
	vm_set_state(vm, VM_RUNNING);
	/* From here the guest is in this memfd, not in the checkpoint. */
	if (memstore_get(vm->d->store, vm->cfg.name, DEVICE_RAM_ID, &e) == 0)
		fdstore_add(vm->d, vm->cfg.name, DEVICE_RAM_ID, e->fd);
	retire(vm, k->root_fd, k->root, k->dir_fd);
	(void)op_set_phase(&k->op, RESTORE_RUNS, NULL); /* durable */
	log_info("VM %s: restored, VMM pid %d (QEMU %s)", vm->cfg.name, (int)vm->vmm->pid,
		 vm->vmm->version);
	end(k, "ok");
}

static void cont_done(qmp *q, json_object *ret, const char *cls, const char *desc, void *ud)
{
	struct ckpt *k = ud;

	if (!ret) {
		restore_fail(k, "the new VMM refused to run the guest: %s", desc ? desc : "?");
		return;
	}
	if (!k->resume_us)
		k->resume_us = (int64_t)now_usec(CLOCK_REALTIME);
	adopt(k);
}

static void restore_step_done(qmp *q, json_object *ret, const char *cls, const char *desc, void *ud)
{
	struct ckpt *k = ud;

	if (!ret)
		restore_fail(k, "the new VMM refused the checkpoint: %s", desc ? desc : "?");
}

/* The device state goes to the new VMM once its monitor answers and its
 * RAM is whole: the two happen side by side (restore_start), and each
 * calls this once, when it is done; the later one sends it. */
static void load(struct ckpt *k)
{
	if (!k->ram_ready || !k->vmm_ready)
		return;
	if (queue_migration(k, k->next, restore_step_done) < 0)
		restore_fail(k, "lost the new VMM's monitor");
}

static void next_ready(struct vmm *v, void *ud)
{
	struct ckpt *k = ud;

	k->vmm_ready = true;
	load(k);
}

static void next_event(struct vmm *v, const char *event, json_object *data, int64_t ts_us, void *ud)
{
	struct ckpt *k = ud;
	const char *st;

	if (streq(event, "RESUME")) {
		k->resume_us = ts_us;
		return;
	}
	if (!streq(event, "MIGRATION"))
		return;
	st = jstr(data, "status");
	if (st && streq(st, "completed")) {
		if (vmm_command(v, "cont", NULL, -EBADF, cont_done, k) < 0)
			restore_fail(k, "lost the new VMM's monitor");
	} else if (st && streq(st, "failed")) {
		char note[VM_VMM_SAID_NOTE];

		vm_vmm_said_note(k->vm, v, note, sizeof(note));
		restore_fail(k, "the new VMM could not load the checkpoint%s", note);
	}
}

static void next_spawned(struct vmm *v, void *ud)
{
	struct ckpt *k = ud;
	int r = 0;

	k->vm->last_pid = v->pid;
	/* Durable: a cprd restarted from here on ends this VMM, or takes the
	 * guest from it if it already runs it (recover.c). */
	if (!op_set_phase(&k->op, RESTORE_LOAD, &r))
		restore_fail(k, "the new VMM started twice");
	else if (r < 0)
		restore_fail(k, "cannot record the new VMM in the registry: %s",
			     k->vm->d->registry.why);
}

static void next_exited(struct vmm *v, void *ud)
{
	struct ckpt *k = ud;
	char note[VM_VMM_SAID_NOTE];

	if (v->spawn_error) {
		restore_fail(k, "cannot start the VMM '%s': %s", k->new_vmm,
			     launcher_strerror(v->spawn_error));
		return;
	}
	vm_vmm_said_note(k->vm, v, note, sizeof(note));
	restore_fail(k, "the new VMM %s while loading the checkpoint%s", v->exit_desc, note);
}

static void next_monitor_lost(struct vmm *v, void *ud)
{
	restore_fail(ud, "the new VMM closed its monitor while loading the checkpoint");
}

static const struct vmm_ops next_ops = {
	.spawned = next_spawned,
	.ready = next_ready,
	.event = next_event,
	.exited = next_exited,
	.monitor_lost = next_monitor_lost,
};

/* cprd's method copied the checkpoint's RAM into the new memfd: if it
 * digests to what the checkpoint says, the VMM may load the device state. */
static void ram_copied(struct ckpt *k)
{
	if (k->error[0]) {
		restore_fail(k, "%s", k->error);
		return;
	}
	if (k->digest != k->expect_digest) {
		restore_fail(k,
			     "the checkpoint is corrupt: its RAM digests to %016llx, its %s says "
			     "%016llx",
			     (unsigned long long)k->digest, CKPT_META,
			     (unsigned long long)k->expect_digest);
		return;
	}
	k->map = (munmap(k->map, k->size), NULL);
	k->ram_ready = true;
	load(k);
}

/* The new memfd goes into custody, where the new VMM is given its fds
 * from, but not yet into the fd store: until the guest runs from it, the
 * checkpoint is the guest (adopt() stores it). */
static int hold_ram(struct ckpt *k)
{
	int fd = fcntl(k->mem_fd, F_DUPFD_CLOEXEC, 3);
	int r;

	if (fd < 0)
		return -errno;
	r = memstore_put(k->vm->d->store, k->vm->cfg.name, DEVICE_RAM_ID, MEMSTORE_KIND_MEMFD, fd);
	if (r < 0)
		close(fd);
	return r;
}

/* Start the new VMM with -incoming defer. For cprd's method it starts
 * while cprd still fills its memfd: waiting for its incoming migration,
 * QEMU maps guest RAM but neither writes it nor runs the guest, and is
 * sent the device state only once the RAM is whole and checked (load()).
 * Starting a QEMU and reading the RAM from disk so overlap. Fails the
 * restore itself. */
static void start_restore_vmm(struct ckpt *k)
{
	struct vm *vm = k->vm;
	const char *what = NULL;
	char why[512];
	int r;

	r = hold_ram(k);
	if (r < 0) {
		restore_fail(k, "cannot hold the new RAM: %s", strerror(-r));
		return;
	}
	r = devices_reacquire(vm, false, &what);
	if (r < 0) {
		restore_fail(k, "cannot acquire %s: %s", what, strerror(-r));
		return;
	}
	r = devices_restoring(vm, why, sizeof(why));
	if (r < 0) {
		restore_fail(k, "%s", why);
		return;
	}
	if (vm_check_images(&vm->cfg, why, sizeof(why)) < 0) {
		restore_fail(k, "cannot start the VMM: %s", why);
		return;
	}
	unlink(vm->qmp_path);
	r = vmm_start(vm->d, &vm->cfg, k->new_vmm, vm->qmp_path, vm->dir_fd,
		      &(struct vmm_incoming){ .defer = true }, &next_ops, k, &k->next);
	if (r < 0)
		restore_fail(k, "cannot start the VMM '%s': %s", k->new_vmm, vmm_start_strerror(r));
}

/* Is this checkpoint this VM's, whole, and of the expected size? */
static int check_checkpoint(struct ckpt *k, const struct restore_args *a)
{
	struct vm *vm = k->vm;
	_cleanup_(vm_record_done) struct vm_record rec = {};
	const char *state_file, *digest;
	struct stat st;
	char why[256];
	uint64_t mem;
	int r;

	r = read_meta(k->dir_fd, &k->meta, why, sizeof(why));
	if (r < 0) {
		set_error(k, "%s", why);
		return r;
	}
	if (!streq(jstr(k->meta, "vm"), vm->cfg.name)) {
		set_error(k, "the checkpoint is of VM '%.64s', not of '%s'", jstr(k->meta, "vm"),
			  vm->cfg.name);
		return -EINVAL;
	}
	r = record_from_meta(k->meta, &rec, why, sizeof(why));
	if (r < 0) {
		set_error(k, "the checkpoint's %s describes no usable VM: %s", CKPT_META, why);
		return r;
	}
	mem = rec.cfg.memory_bytes;
	if (mem != vm->cfg.memory_bytes || (a->memory_bytes && a->memory_bytes != mem)) {
		set_error(
		    k, "the checkpoint holds %llu bytes of RAM, the VM has %llu",
		    (unsigned long long)mem,
		    (unsigned long long)(a->memory_bytes ? a->memory_bytes : vm->cfg.memory_bytes));
		return -EINVAL;
	}
	if (!streq(rec.cfg.machine, vm->cfg.machine)) {
		set_error(k, "the checkpoint is of machine type '%.64s', the VM is '%s'",
			  rec.cfg.machine, vm->cfg.machine);
		return -EINVAL;
	}
	k->qemu = streq(jstr(k->meta, "method"), "qemu");
	k->channels = (unsigned)jint(k->meta, "channels");
	k->paused_at_us = jint(k->meta, "paused_at_usec");
	k->size = mem;
	state_file = k->qemu ? CKPT_QEMU : CKPT_DEVICE;
	k->state_fd = ckpt_open(k->dir_fd, state_file, O_RDONLY, 0);
	if (k->state_fd < 0 || fstat(k->state_fd, &st) < 0) {
		r = k->state_fd < 0 ? k->state_fd : -errno;
		set_error(k, "cannot open the checkpoint's %s: %s", state_file, ckpt_strerror(r));
		return r;
	}
	if ((uint64_t)st.st_size != (uint64_t)jint(k->meta, "state_bytes")) {
		set_error(k, "the checkpoint's %s is %lld bytes, its %s says %lld: truncated?",
			  state_file, (long long)st.st_size, CKPT_META,
			  (long long)jint(k->meta, "state_bytes"));
		return -EBADMSG;
	}
	k->bytes_done = (uint64_t)st.st_size;
	if (k->qemu)
		return 0;
	digest = jstr(k->meta, "digest");
	if (!digest ||
	    sscanf(digest, "xxh3-64:%16llx", (unsigned long long *)&k->expect_digest) != 1) {
		set_error(k, "the checkpoint's %s has no digest of its RAM", CKPT_META);
		return -EBADMSG;
	}
	k->ram_fd = ckpt_open(k->dir_fd, CKPT_RAM, O_RDONLY, 0);
	if (k->ram_fd < 0 || fstat(k->ram_fd, &st) < 0) {
		r = k->ram_fd < 0 ? k->ram_fd : -errno;
		set_error(k, "cannot open the checkpoint's %s: %s", CKPT_RAM, ckpt_strerror(r));
		return r;
	}
	if ((uint64_t)st.st_size != mem) {
		set_error(k, "the checkpoint's %s is %lld bytes, the guest's RAM %llu: truncated?",
			  CKPT_RAM, (long long)st.st_size, (unsigned long long)mem);
		return -EBADMSG;
	}
	return 0;
}

void restore_start(struct vm *vm, const struct restore_args *a, struct call *c)
{
	const char *root = a->dir                ? a->dir
			   : vm->checkpoint_root ? vm->checkpoint_root
						 : vm->d->checkpoint_dir;
	struct ckpt *k = ckpt_new(vm, root, false, a->timeout, c);
	int r;

	if (!k) {
		call_fail(c, JSONRPC_ERR_RESOURCE, "out of memory");
		return;
	}
	k->restore = true;
	k->old_vmm = strdup(vm->cfg.vmm);
	k->new_vmm = strdup(a->binary ? a->binary : vm->cfg.vmm);
	vm_op_begin(vm, &k->op, &restore_op_type);
	events_emit(vm->d, "restore-started", vm->cfg.name, NULL);
	log_info("VM %s: restore from %s/%s with %s", vm->cfg.name, root, vm->cfg.name,
		 k->new_vmm ? k->new_vmm : "?");
	if (!k->old_vmm || !k->new_vmm) {
		restore_fail(k, "out of memory");
		return;
	}
	k->root_fd = open_root(root, false);
	if (k->root_fd >= 0)
		k->dir_fd = openat(k->root_fd, vm->cfg.name,
				   O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (k->root_fd < 0 || k->dir_fd < 0) {
		restore_fail(k, "no checkpoint of VM '%s' in %s: %s", vm->cfg.name, root,
			     strerror(errno));
		return;
	}
	if (check_checkpoint(k, a) < 0) {
		restore_fail(k, "%s", k->error);
		return;
	}
	if (k->new_vmm[0] != '/' || access(k->new_vmm, X_OK) < 0) {
		restore_fail(k, "VMM binary '%s': %s", k->new_vmm, strerror(errno));
		return;
	}
	r = memstore_region_create(DEVICE_RAM_ID, k->size, 0, &k->mem_fd);
	if (r < 0) {
		restore_fail(k, "cannot create the guest's RAM: %s", strerror(-r));
		return;
	}
	k->ram_ready = k->qemu; /* QEMU's method: the VMM loads the RAM itself */
	if (!k->qemu) {
		r = start_copy(k);
		if (r < 0) {
			restore_fail(k, "cannot map the guest's new RAM: %s", strerror(-r));
			return;
		}
	}
	start_restore_vmm(k);
}

/* ======== routed from vm.c, deadlines ======== */

static const char *checkpoint_saving_in(const struct ckpt *k)
{
	return k->restore || !k->tmp[0] ? NULL : k->root;
}

static bool checkpoint_was_running(const struct ckpt *k)
{
	return k->was_running;
}

static json_object *checkpoint_restore_record(const struct ckpt *k)
{
	json_object *o;

	if (!k->restore || !vmm_alive(k->next))
		return NULL;
	o = json_object_new_object();
	vmm_add_record(k->next, o);
	json_object_object_add(o, "vmm", json_object_new_string(k->new_vmm));
	json_object_object_add(o, "checkpoint", json_object_new_string(k->root));
	return o;
}

void checkpoint_discard_unfinished(const char *root, const char *name)
{
	_cleanup_close_ int fd = open_root(root, false);
	char tmp[96];

	if (fd < 0)
		return;
	snprintf(tmp, sizeof(tmp), ".%s.tmp", name);
	if (faccessat(fd, tmp, F_OK, AT_SYMLINK_NOFOLLOW) == 0) {
		log_notice("VM %s: removing the unfinished checkpoint %s/%s", name, root, tmp);
		(void)rm_flat(fd, tmp);
	}
}

static json_object *checkpoint_progress(const struct ckpt *k)
{
	json_object *o = json_object_new_object();

	json_object_object_add(o, "operation",
			       json_object_new_string(k->restore ? "restore" : "checkpoint"));
	json_object_object_add(o, "method", json_object_new_string(k->qemu ? "qemu" : "cprd"));
	json_object_object_add(o, "ram_bytes", json_object_new_int64((int64_t)k->size));
	json_object_object_add(o, "copied_bytes", json_object_new_int64((int64_t)k->bytes_done));
	return o;
}

static void checkpoint_vmm_event(struct ckpt *k, const char *event, json_object *data,
				 int64_t ts_us)
{
	if (k->restore || k->ended)
		return;
	if (streq(event, "STOP") && !k->paused_at_us)
		k->paused_at_us = ts_us;
	else if (streq(event, "MIGRATION"))
		save_migration_event(k, data);
}

static void checkpoint_vmm_exited(struct ckpt *k)
{
	if (k->restore || k->ended)
		return;
	ev_idle_stop(k->vm->d->loop, &k->copier);
	if (k->tmp[0])
		(void)rm_flat(k->root_fd, k->tmp);
	set_error(k, "the VMM %s while saving", k->vm->exit_desc);
	end(k, "failed");
}

static void timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct ckpt *k = w->data;

	if (k->restore)
		restore_fail(k, "timed out after %g s", k->timeout);
	else if (k->op.phase == SAVE_ROLLBACK)
		end(k, "failed");
	else
		save_fail(k, "timed out after %g s", k->timeout);
}

static void checkpoint_abandon(struct ckpt *k)
{
	struct vm *vm = k->vm;

	k->ended = true;
	ev_idle_stop(vm->d->loop, &k->copier);
	ev_timer_stop(vm->d->loop, &k->timer);
	vmm_cancel(vm->vmm, k);
	if (k->tmp[0])
		(void)rm_flat(k->root_fd, k->tmp);
	k->next = vmm_kill(k->next);
	if (k->call)
		call_fail(TAKE_PTR(k->call), JSONRPC_INTERNAL_ERROR,
			  "cprd is shutting down; the checkpoint was not finished");
	vm_op_end(vm, &k->op);
	ckpt_free(k);
}

/* ======== the operations (op.h) ======== */

static struct ckpt *of(const struct op *op)
{
	return container_of(op, struct ckpt, op);
}

static void op_vmm_event(struct op *op, const char *event, json_object *data, int64_t ts_us)
{
	checkpoint_vmm_event(of(op), event, data, ts_us);
}

/* The guest was not saved; the VM crashed all the same. */
static bool op_vmm_exited(struct op *op)
{
	checkpoint_vmm_exited(of(op));
	return false;
}

static void op_detach(struct op *op)
{
	checkpoint_abandon(of(op));
}

/* Where the unfinished checkpoint is (a restarted cprd removes it) and
 * whether the guest ran when it began (it resumes it then). */
static void save_record(const struct op *op, json_object *rec)
{
	const struct ckpt *k = of(op);

	if (!checkpoint_saving_in(k))
		return;
	json_object_object_add(rec, "checkpointing_in",
			       json_object_new_string(checkpoint_saving_in(k)));
	json_object_object_add(rec, "checkpoint_was_running",
			       json_object_new_boolean(checkpoint_was_running(k)));
}

static void restore_record(const struct op *op, json_object *rec)
{
	json_object *x = checkpoint_restore_record(of(op));

	if (x)
		json_object_object_add(rec, "restore", x);
}

static void op_status(const struct op *op, json_object *o)
{
	json_object_object_add(o, "checkpoint_progress", checkpoint_progress(of(op)));
}

static const char *const save_phases[_SAVE_MAX] = {
	[SAVE_OPEN] = "open",
	[SAVE_WRITE] = "write",
	[SAVE_PLACED] = "placed",
	[SAVE_ROLLBACK] = "rollback",
};

/* Ending is no move: any phase may end. */
static const unsigned save_next[_SAVE_MAX] = {
	[SAVE_OPEN] = OP_PHASE(SAVE_WRITE) | OP_PHASE(SAVE_ROLLBACK),
	[SAVE_WRITE] = OP_PHASE(SAVE_PLACED) | OP_PHASE(SAVE_ROLLBACK),
};

static const char *const restore_phases[_RESTORE_MAX] = {
	[RESTORE_START] = "start",
	[RESTORE_LOAD] = "load",
	[RESTORE_RUNS] = "runs",
};

static const unsigned restore_next[_RESTORE_MAX] = {
	[RESTORE_START] = OP_PHASE(RESTORE_LOAD),
	[RESTORE_LOAD] = OP_PHASE(RESTORE_RUNS),
};

const struct op_type checkpoint_op_type = {
	.name = "checkpoint",
	.phases = save_phases,
	.n_phases = _SAVE_MAX,
	.next = save_next,
	.durable = OP_PHASE(SAVE_WRITE) | OP_PHASE(SAVE_PLACED),
	.busy = "being checkpointed or restored",
	.verb = "checkpointed",
	.from = OP_FROM(VM_RUNNING) | OP_FROM(VM_PAUSED),
	.vmm_event = op_vmm_event,
	.vmm_exited = op_vmm_exited,
	.detach = op_detach,
	.record = save_record,
	.status = op_status,
};

/* The VM has no VMM of its own meanwhile: the restore's VMM reports to it. */
const struct op_type restore_op_type = {
	.name = "restore",
	.phases = restore_phases,
	.n_phases = _RESTORE_MAX,
	.next = restore_next,
	.durable = OP_PHASE(RESTORE_LOAD) | OP_PHASE(RESTORE_RUNS),
	.busy = "being checkpointed or restored",
	.verb = "restored",
	.from = OP_FROM(VM_CHECKPOINTED),
	.vmm_event = op_vmm_event,
	.vmm_exited = op_vmm_exited,
	.detach = op_detach,
	.record = restore_record,
	.status = op_status,
};

/* ======== start-up ======== */

static bool checkpoint_whole(const char *root, const char *name)
{
	_cleanup_close_ int fd = open_root(root, false), dir = -EBADF;
	struct stat st;

	if (fd < 0)
		return false;
	dir = openat(fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	return dir >= 0 && fstatat(dir, CKPT_META, &st, AT_SYMLINK_NOFOLLOW) == 0;
}

static void adopt_checkpoint(struct daemon *d, int root_fd, const char *name)
{
	_cleanup_close_ int dir = -EBADF;
	_cleanup_json_ json_object *meta = NULL;
	struct vm_record rec;
	struct vm *vm;
	char why[256];

	dir = openat(root_fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (dir < 0 || read_meta(dir, &meta, why, sizeof(why)) < 0) {
		log_warning("checkpoint %s/%s: not usable (%s); left alone", d->checkpoint_dir,
			    name, dir < 0 ? strerror(errno) : why);
		return;
	}
	if (!streq(jstr(meta, "vm"), name)) {
		log_warning("checkpoint %s/%s: describes another VM; left alone", d->checkpoint_dir,
			    name);
		return;
	}
	if (record_from_meta(meta, &rec, why, sizeof(why)) < 0) {
		log_warning("checkpoint %s/%s: its %s describes no usable VM (%s); left alone",
			    d->checkpoint_dir, name, CKPT_META, why);
		return;
	}
	vm = vm_recover(d, &rec.cfg, rec.created_usec, rec.updates);
	if (!vm)
		return;
	vm->checkpoint_root = strdup(d->checkpoint_dir);
	vm_set_state(vm, VM_CHECKPOINTED);
	/* Held from now on, as the checkpoint needs them; one that cannot be
	 * opened is said by the restore. */
	if (devices_reacquire(vm, true, &(const char *){ NULL }) >= 0)
		devices_saved(vm, false);
	if (vm->dir_fd >= 0)
		(void)copy_file_at(dir, CKPT_HISTORY, vm->dir_fd, VM_HISTORY);
	log_info("VM %s: checkpointed in %s/%s (since %s); restore it with cprctl restore %s", name,
		 d->checkpoint_dir, name, "a reboot", name);
}

void checkpoint_recover(struct daemon *d)
{
	_cleanup_close_ int fd = -EBADF;
	DIR *dir;
	struct dirent *e;

	for (struct vm *vm = d->vms; vm; vm = vm->next) {
		if (!vm->checkpoint_root || vm->vmm)
			continue;
		if (checkpoint_whole(vm->checkpoint_root, vm->cfg.name)) {
			vm_set_state(vm, VM_CHECKPOINTED);
			devices_saved(vm, false);
			/* RAM a previous cprd was filling or had saved: the
			 * checkpoint is the guest, and a restore makes new. */
			drop_ram(vm);
		} else
			log_error("VM %s: its checkpoint %s/%s is gone; the VM is lost",
				  vm->cfg.name, vm->checkpoint_root, vm->cfg.name);
	}
	fd = open_root(d->checkpoint_dir, false);
	if (fd < 0) {
		if (fd != -ENOENT)
			log_warning("cannot open the checkpoint directory %s: %s",
				    d->checkpoint_dir, strerror(-fd));
		return;
	}
	dir = fdopendir(fd);
	if (!dir)
		return;
	fd = -EBADF; /* closedir closes it */
	while ((e = readdir(dir))) {
		size_t n = strlen(e->d_name);

		if (e->d_name[0] == '.') {
			/* Half-written or retired: never a checkpoint. */
			if (n > 5 &&
			    (streq(e->d_name + n - 4, ".tmp") || streq(e->d_name + n - 4, ".old") ||
			     streq(e->d_name + n - 5, ".done"))) {
				log_notice("removing the unfinished checkpoint %s/%s",
					   d->checkpoint_dir, e->d_name);
				(void)rm_flat(dirfd(dir), e->d_name);
			}
			continue;
		}
		if (!memstore_name_is_valid(e->d_name) || vm_find(d, e->d_name))
			continue;
		adopt_checkpoint(d, dirfd(dir), e->d_name);
	}
	closedir(dir);
}

static void restore_all_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct daemon *d = w->data;

	free(w);
	for (struct vm *vm = d->vms; vm; vm = vm->next)
		if (vm->state == VM_CHECKPOINTED && !vm->op)
			restore_start(vm, &(struct restore_args){ .timeout = 600 }, NULL);
}

void checkpoint_restore_all(struct daemon *d)
{
	ev_timer *t = calloc(1, sizeof(*t));

	if (!t)
		return;
	ev_timer_init(t, restore_all_cb, 0., 0.);
	t->data = d;
	ev_timer_start(d->loop, t);
}

void checkpoint_discard(struct vm *vm)
{
	_cleanup_close_ int fd = -EBADF;
	char why[256] = "";
	int r;

	if (!vm->checkpoint_root)
		return;
	fd = open_root(vm->checkpoint_root, false);
	if (fd < 0)
		snprintf(why, sizeof(why), "%s", strerror(-fd));
	else if (find_checkpoint(fd, vm->cfg.name, why, sizeof(why)) > 0 &&
		 (r = rm_flat(fd, vm->cfg.name)) < 0)
		snprintf(why, sizeof(why), "%s", strerror(-r));
	if (why[0])
		log_warning("VM %s: %s/%s is left where it is: %s", vm->cfg.name,
			    vm->checkpoint_root, vm->cfg.name, why);
	vm->checkpoint_root = (free(vm->checkpoint_root), NULL);
}
