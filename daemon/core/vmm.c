/* SPDX-License-Identifier: MIT */
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/pidfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>

#include "common/access.h"
#include "common/macro.h"
#include "common/proc.h"
#include "daemon/devices/devices.h"
#include "daemon/observe/log.h"
#include "daemon/host/scope.h"
#include "daemon/core/vm.h"
#include "daemon/core/vmm.h"
#include "kvm/qemu.h"

#define VMM_KILL_WAIT 2.0 /* seconds */
#define MONITOR_GRACE 0.5 /* seconds; see monitor_gone() */
#define MONITOR_RECONNECT_EVERY 1.0
#define MONITOR_RECONNECTS 30

/* As subreaper cprd inherits whatever a VMM leaves behind (a wrapper's
 * stray child, a helper QEMU forked): reap those. A VMM it watches is left
 * to its pidfd, which reports how it ended; what waits behind it is reaped
 * once that is done. */
void vmm_reap_orphans(struct daemon *d)
{
	siginfo_t ls = {};

	if (d->launcher.pid > 0 &&
	    waitid(P_PID, (id_t)d->launcher.pid, &ls, WEXITED | WNOHANG) == 0 && ls.si_pid > 0) {
		log_debug("reaped the VMM launcher, pid %d (%s %d)", (int)ls.si_pid,
			  ls.si_code == CLD_EXITED ? "status" : "signal", ls.si_status);
		d->launcher.pid = 0;
		launcher_lost(&d->launcher);
	}
	/* A VMM whose start is still in flight is a child whose pid cprd does
	 * not know yet: reaped here, its exit status would be lost and its pid
	 * freed while the launcher's answer may still name it. The launcher
	 * calls back here once everything in flight is answered. */
	if (launcher_in_flight(&d->launcher) > 0)
		return;
	for (;;) {
		siginfo_t si = {};

		if (waitid(P_ALL, 0, &si, WEXITED | WNOHANG | WNOWAIT) < 0 || si.si_pid <= 0)
			return;
		if (vmm_pid_watched(d, si.si_pid))
			return;
		if (waitid(P_PID, (id_t)si.si_pid, &si, WEXITED | WNOHANG) < 0)
			return;
		log_debug("reaped pid %d, left behind by a VMM", (int)si.si_pid);
	}
}

static struct vmm *vmm_new(struct daemon *d, const char *binary, const char *qmp_path,
			   const struct vmm_ops *ops, void *ud);

/* A VMM's own callbacks may end it (a reply that triggers a rollback, an
 * exit that ends an update). While one runs, the VMM is held: freeing it
 * only marks it doomed, and the last release destroys it. */
static void hold(struct vmm *v)
{
	v->busy++;
}

static void vmm_destroy(struct vmm *v);

static void drop_qmp(struct vmm *v, bool notify);

/* false when v is gone */
static bool release(struct vmm *v)
{
	if (--v->busy > 0)
		return true;
	if (v->doomed) {
		vmm_destroy(v);
		return false;
	}
	if (v->muted)
		drop_qmp(v, false); /* let go of from inside its dispatch */
	return true;
}

/* Let go of the monitor without a callback. Inside the VMM's own dispatch
 * the client is on the stack: it is muted now and freed on release. */
static void forget_qmp(struct vmm *v)
{
	if (!v->qmp)
		return;
	if (v->busy > 0) {
		ev_io_stop(v->d->loop, &v->qmp_watcher);
		qmp_mute(v->qmp);
		v->muted = true;
		return;
	}
	drop_qmp(v, false);
}

/* Stop talking to the VMM. With notify, commands still waiting are answered
 * "Disconnected" (their callers may end v meanwhile: hold it first);
 * without, they are dropped unseen. */
static void drop_qmp(struct vmm *v, bool notify)
{
	qmp *q = TAKE_PTR(v->qmp);

	if (!q)
		return;
	v->muted = false;
	ev_io_stop(v->d->loop, &v->qmp_watcher);
	if (notify)
		qmp_fail_pending(q, "the VMM's monitor connection closed");
	qmp_free(q);
}

/* A VMM closes its monitor as it exits, a moment before its pidfd says
 * so: its owner hears of a lost monitor only if the process outlives it
 * by MONITOR_GRACE, and otherwise of the exit, which says more. */
static void monitor_gone(struct vmm *v)
{
	if (v->doomed || v->pidfd < 0 || !v->ops || !v->ops->monitor_lost)
		return;
	/* A VMM replacing its own image closes its monitor on purpose, and
	 * its successor's greeting is what the update waits for: at once. */
	ev_timer_set(&v->monitor_timer, v->exec_expected ? 0. : MONITOR_GRACE, 0.);
	v->exec_expected = false;
	ev_timer_start(v->d->loop, &v->monitor_timer);
}

static void monitor_timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct vmm *v = w->data;

	hold(v);
	if (v->ops && v->ops->monitor_lost)
		v->ops->monitor_lost(v, v->ud);
	release(v);
}

/* Read what the VMM already said. false when the monitor is gone. */
static bool read_monitor(struct vmm *v)
{
	int r = qmp_dispatch(v->qmp);

	if (r >= 0 || v->doomed)
		return r >= 0;
	/* The VMM closed its monitor: it is exiting, or it will go on without
	 * one. The pidfd says which. */
	log_debug("VMM pid %d: monitor connection lost: %s", (int)v->pid, strerror(-r));
	drop_qmp(v, true);
	monitor_gone(v);
	return false;
}

static void reap(struct vmm *v)
{
	siginfo_t si = {};

	if (waitid(P_PIDFD, v->pidfd, &si, WEXITED | WNOHANG) < 0 || si.si_pid == 0) {
		v->exit_code = -1;
		snprintf(v->exit_desc, sizeof(v->exit_desc), "exited (status unknown)");
	} else if (si.si_code == CLD_EXITED) {
		v->exit_code = si.si_status;
		snprintf(v->exit_desc, sizeof(v->exit_desc), "exited with status %d", si.si_status);
	} else {
		v->exit_code = 128 + si.si_status;
		snprintf(v->exit_desc, sizeof(v->exit_desc), "killed by signal %s",
			 sigabbrev_np(si.si_status) ? sigabbrev_np(si.si_status) : "?");
	}
	if (v->spawn_error)
		snprintf(v->exit_desc, sizeof(v->exit_desc), "could not be executed: %s",
			 launcher_strerror(v->spawn_error));
	ev_io_stop(v->d->loop, &v->pid_watcher);
	ev_timer_stop(v->d->loop, &v->kill_timer);
	ev_timer_stop(v->d->loop, &v->monitor_timer);
	v->pidfd = safe_close(v->pidfd);
}

static void pid_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	struct vmm *v = w->data;

	hold(v);
	/* What it wrote before it died is still in the socket: an event there
	 * (RESUME, MIGRATION) may decide what its exit means. */
	if (v->qmp && !v->ending)
		read_monitor(v);
	reap(v);
	vmm_reap_orphans(v->d); /* any waiting behind this one */
	if (v->ending) {
		v->doomed = true;
	} else {
		drop_qmp(v, true);
		if (!v->doomed && v->ops && v->ops->exited)
			v->ops->exited(v, v->ud); /* may end v */
	}
	release(v);
}

static void qmp_sync_watcher(struct vmm *v)
{
	int events;

	/* Nothing to hear before the VMM exists; commands wait queued. */
	if (!v->qmp || v->spawning)
		return;
	events = EV_READ | (qmp_wants_write(v->qmp) ? EV_WRITE : 0);
	if (ev_is_active(&v->qmp_watcher) && v->qmp_watcher.events == events)
		return;
	ev_io_stop(v->d->loop, &v->qmp_watcher);
	ev_io_set(&v->qmp_watcher, qmp_fd(v->qmp), events);
	ev_io_start(v->d->loop, &v->qmp_watcher);
}

static void qmp_io_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	struct vmm *v = w->data;
	bool ok = true;

	hold(v);
	if ((revents & EV_WRITE) && qmp_flush(v->qmp) < 0) {
		drop_qmp(v, true);
		monitor_gone(v);
		ok = false;
	}
	if (ok && (revents & EV_READ))
		ok = read_monitor(v);
	if (release(v) && ok && !v->doomed)
		qmp_sync_watcher(v);
}

bool vmm_drain(struct vmm *v)
{
	bool ok;

	/* Not from inside its own dispatch: that one reads on by itself. */
	if (!v || !v->qmp || v->doomed || v->muted || v->busy > 0)
		return false;
	hold(v);
	ok = read_monitor(v);
	if (release(v) && ok && !v->doomed)
		qmp_sync_watcher(v);
	return ok;
}

size_t vmm_cancel(struct vmm *v, void *ud)
{
	return v && v->qmp ? qmp_cancel(v->qmp, ud) : 0;
}

static void on_qmp_event(qmp *q, const char *event, json_object *data, int64_t ts_us, void *ud)
{
	struct vmm *v = ud;

	if (!v->doomed && v->ops && v->ops->event)
		v->ops->event(v, event, data, ts_us, v->ud);
}

static void on_qmp_ready(qmp *q, void *ud)
{
	struct vmm *v = ud;

	if (v->doomed)
		return;
	snprintf(v->version, sizeof(v->version), "%s", qmp_vmm_version(q));
	snprintf(v->package, sizeof(v->package), "%s", qmp_vmm_package(q));
	if (v->spawned_usec)
		log_debug("VMM pid %d: monitor ready %.1f ms after spawn", (int)v->pid,
			  (double)(now_usec(CLOCK_MONOTONIC) - v->spawned_usec) / 1000.0);
	if (v->ops && v->ops->ready)
		v->ops->ready(v, v->ud);
	if (!v->doomed)
		qmp_sync_watcher(v);
}

int vmm_command(struct vmm *v, const char *cmd, json_object *args, int fd, qmp_reply_fn cb,
		void *ud)
{
	int r;

	if (!v || !v->qmp || v->doomed || v->muted) {
		json_object_put(args);
		return -ENOTCONN;
	}
	r = qmp_command(v->qmp, cmd, args, fd, cb, ud);
	if (r >= 0)
		qmp_sync_watcher(v);
	return r;
}

void vmm_set_ops(struct vmm *v, const struct vmm_ops *ops, void *ud)
{
	v->ops = ops;
	v->ud = ud;
}

bool vmm_alive(const struct vmm *v)
{
	return v && v->pidfd >= 0 && !v->ending && !v->doomed;
}

int vmm_signal(struct vmm *v, int sig)
{
	if (v->pidfd < 0)
		return -ESRCH;
	return pidfd_send_signal(v->pidfd, sig, NULL, 0) < 0 ? -errno : 0;
}

bool vmm_pid_watched(const struct daemon *d, pid_t pid)
{
	for (const struct vmm *v = d->vmms; v; v = v->daemon_next)
		if (v->pid == pid && v->pidfd >= 0)
			return true;
	return false;
}

static void vmm_destroy(struct vmm *v)
{
	for (struct vmm **p = &v->d->vmms; *p; p = &(*p)->daemon_next)
		if (*p == v) {
			*p = v->daemon_next;
			break;
		}
	if (v->spawning)
		launcher_cancel(&v->d->launcher, v->spawn_id);
	ev_io_stop(v->d->loop, &v->pid_watcher);
	ev_timer_stop(v->d->loop, &v->kill_timer);
	ev_timer_stop(v->d->loop, &v->monitor_timer);
	safe_close(v->pidfd);
	drop_qmp(v, false);
	free(v->qmp_path);
	free(v->binary);
	free(v->vm_name);
	free(v);
}

/* Let go: no callback of v's runs again; the process is left alone. */
struct vmm *vmm_free(struct vmm *v)
{
	if (!v || v->doomed)
		return NULL;
	v->ops = NULL;
	ev_timer_stop(v->d->loop, &v->monitor_timer);
	forget_qmp(v);
	if (v->busy > 0) {
		v->doomed = true; /* destroyed when its own callback returns */
		return NULL;
	}
	vmm_destroy(v);
	return NULL;
}

/* A killed VMM that has not exited this long after SIGKILL (frozen, or in
 * uninterruptible sleep) is let go of; the orphan reaper collects it
 * whenever it does exit. */
static void kill_timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct vmm *v = w->data;

	log_warning("VMM pid %d did not exit within %.0f s of SIGKILL; it is reaped whenever it "
		    "does",
		    (int)v->pid, VMM_KILL_WAIT);
	ev_io_stop(loop, &v->pid_watcher);
	v->pidfd = safe_close(v->pidfd);
	if (v->busy > 0)
		v->doomed = true;
	else
		vmm_destroy(v);
}

struct vmm *vmm_kill(struct vmm *v)
{
	if (!v || v->doomed || v->ending)
		return NULL;
	v->ops = NULL;
	ev_timer_stop(v->d->loop, &v->monitor_timer);
	forget_qmp(v);
	/* Its monitor socket dies with it. (vmm_free leaves the path alone:
	 * a VMM merely let go of may still be listening there.) */
	if (v->qmp_path)
		unlink(v->qmp_path);
	if (v->pidfd < 0)
		return vmm_free(v);
	/* Fails only for a process already gone; its pidfd still fires. */
	(void)pidfd_send_signal(v->pidfd, SIGKILL, NULL, 0);
	/* Reaped from the loop when its pidfd fires: never a wait here. */
	v->ending = true;
	if (!ev_is_active(&v->pid_watcher)) {
		ev_io_set(&v->pid_watcher, v->pidfd, EV_READ);
		ev_io_start(v->d->loop, &v->pid_watcher);
	}
	ev_timer_set(&v->kill_timer, VMM_KILL_WAIT, 0.);
	ev_timer_start(v->d->loop, &v->kill_timer);
	return NULL;
}

/* The monitor socket: bound and listening here, then connected to at once,
 * so the connection waits in the backlog until QEMU accepts it. */
static int open_qmp(const char *path, int *ret_listen, int *ret_conn)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	_cleanup_close_ int l = -EBADF, c = -EBADF;

	if (strlen(path) >= sizeof(sa.sun_path))
		return -ENAMETOOLONG;
	strcpy(sa.sun_path, path);
	unlink(path);
	l = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (l < 0 || bind(l, (struct sockaddr *)&sa, sizeof(sa)) < 0 || chmod(path, 0600) < 0 ||
	    listen(l, 4) < 0)
		return -errno;
	c = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (c < 0 || connect(c, (struct sockaddr *)&sa, sizeof(sa)) < 0)
		return -errno;
	*ret_listen = TAKE_FD(l);
	*ret_conn = TAKE_FD(c);
	return 0;
}

static int held_fd(struct daemon *d, const char *vm, const char *name)
{
	const memstore_entry *e;

	return memstore_get(d->store, vm, name, &e) < 0 ? -EBADF : e->fd;
}

static void watch_pidfd(struct vmm *v)
{
	ev_io_set(&v->pid_watcher, v->pidfd, EV_READ);
	ev_io_start(v->d->loop, &v->pid_watcher);
}

/* The launcher's answer, from the loop. v is still ours: letting go of a
 * spawning VMM cancels its request, and then this is never called. */
static void spawn_done(int error, pid_t pid, int pidfd, void *ud)
{
	struct vmm *v = ud;

	v->spawning = false;
	v->spawn_id = 0;
	log_debug("VMM pid %d: launched in %.1f ms%s%s", (int)pid,
		  (double)(now_usec(CLOCK_MONOTONIC) - v->spawned_usec) / 1000.0, error ? ": " : "",
		  error ? launcher_strerror(error) : "");
	if (pidfd >= 0) {
		v->pid = pid;
		v->pidfd = pidfd;
	}
	hold(v);
	if (error < 0) {
		v->spawn_error = error;
		if (v->pidfd >= 0) {
			/* The child that failed to exec exits at once (127):
			 * its owner hears of it once it is reaped. */
			watch_pidfd(v);
		} else {
			v->exit_code = -1;
			snprintf(v->exit_desc, sizeof(v->exit_desc), "could not be started");
			drop_qmp(v, true);
			if (v->ops && v->ops->exited)
				v->ops->exited(v, v->ud); /* may end v */
		}
		release(v);
		return;
	}
	v->start_time = proc_start_time(pid);
	scope_adopt(v->d, pid, v->vm_name);
	watch_pidfd(v);
	qmp_sync_watcher(v);
	if (v->ops && v->ops->spawned)
		v->ops->spawned(v, v->ud); /* may end v */
	release(v);
}

/* The kernel and initrd reach the VMM as fds, opened here with cprd's
 * rights, so that a confined VMM's root needs no host path for them and
 * the VMM cannot be pointed at anything but a regular file (open_as()
 * looks before it opens: a FIFO or a device planted at the path is
 * refused unopened). QEMU reads them through /proc/self/fd. */
int vmm_open_image(const char *path, const struct file_id *id, int *ret_fd)
{
	_cleanup_close_ int fd = -EBADF;
	struct stat st;
	int r;

	/* With cprd's rights: whoever named it was judged at create. What
	 * was judged for a peer that is not root was the file then at this
	 * canonical path; another file there now (the peer could not
	 * change that file, but someone may have renamed another over it,
	 * or a directory on the way) was judged by nobody. */
	r = open_as(path, NULL, &fd, NULL);
	if (r < 0)
		return r == -EBADFD ? -EINVAL : r;
	if (id && id->set) {
		if (fstat(fd, &st) < 0)
			return -errno;
		if (st.st_dev != id->dev || st.st_ino != id->ino)
			return -ESTALE;
	}
	*ret_fd = TAKE_FD(fd);
	return 0;
}

const char *vmm_image_strerror(int r)
{
	switch (r) {
	case -EINVAL:
		return "not a regular file";
	case -ESTALE:
		return "not the file that was judged when the VM was created (another file "
		       "is at that path now); cprd will not hand it to a VMM";
	default:
		return strerror(-r);
	}
}

/* Where a VMM finds what it is given: the held fds from 3 on as
 * devices_layout() places them (the monitor among them), the kernel and
 * initrd after them, named through /proc/self/fd. spawn() passes them so; a
 * cpr-exec successor inherits them at the same numbers. */
struct fd_layout {
	struct device_layout dev;
	struct device_fd fds[DEVICE_FDS_MAX];
	int held[DEVICE_FDS_MAX]; /* cprd's fd of each in custody, or -EBADF */
	size_t n_fds;
	int kernel, initrd; /* -1: none */
	size_t n;
	char kernel_path[32], initrd_path[32];
};

static void fd_layout(struct daemon *d, const struct vm_config *cfg, bool initrd,
		      struct fd_layout *l)
{
	*l = (struct fd_layout){ .initrd = -1 };
	l->n_fds = devices_fds(&cfg->devices, l->fds);
	for (size_t j = 0; j < l->n_fds; j++)
		l->held[j] = held_fd(d, cfg->name, l->fds[j].id);
	devices_layout(&cfg->devices, &l->dev);
	l->kernel = l->dev.next++;
	snprintf(l->kernel_path, sizeof(l->kernel_path), "/proc/self/fd/%d", l->kernel);
	if (initrd) {
		l->initrd = l->dev.next++;
		snprintf(l->initrd_path, sizeof(l->initrd_path), "/proc/self/fd/%d", l->initrd);
	}
	l->n = (size_t)(l->dev.next - QEMU_CHILD_FD_BASE);
}

/* The fd for the VMM of what l holds at j: the held one, or for a type
 * that gives each VMM a file description of its own, that reopened
 * (*ret_opened is then the caller's to close once it was handed over). */
static int fd_for_vmm(const struct fd_layout *l, size_t j, int *ret_opened)
{
	const struct device_type *t = device_type_nth(l->fds[j].type);
	char path[32];
	int fl, fd;

	if (l->held[j] < 0 || !t->fresh_per_vmm)
		return l->held[j];
	fl = fcntl(l->held[j], F_GETFL);
	if (fl < 0)
		return -errno;
	snprintf(path, sizeof(path), "/proc/self/fd/%d", l->held[j]);
	/* Through the magic link of cprd's own fd: the very inode, opened anew. */
	fd = open(path, (fl & (O_ACCMODE | O_DIRECT)) | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	*ret_opened = fd;
	return fd;
}

/* The fds to hand the launcher, in the order of their numbers in l: n
 * of them, or a negative errno naming nothing held for a device. What
 * was opened for the VMM alone is in opened[] (-EBADF elsewhere). */
static int fd_list(const struct fd_layout *l, int qmp_listen, int kernel, int initrd, int *fds,
		   int *opened, size_t max)
{
	size_t n = 0;

	for (int child = QEMU_CHILD_FD_BASE; child < l->dev.next; child++, n++) {
		int fd = child == l->dev.qmp ? qmp_listen : child == l->kernel ? kernel : initrd;

		if (n >= max)
			return -E2BIG;
		opened[n] = -EBADF;
		for (size_t j = 0; j < l->n_fds; j++)
			if (device_fd_child(&l->dev, &l->fds[j]) == child) {
				fd = fd_for_vmm(l, j, &opened[n]);
				if (fd < 0)
					return fd == -EBADF ? -ENODEV : fd;
			}
		fds[n] = fd;
	}
	return (int)n;
}

/* The VMM's fd map, as spawn() placed them. */
static void set_dev_fds(struct vmm *v, const struct fd_layout *l)
{
	v->n_dev_fds = 0;
	for (size_t j = 0; j < l->n_fds; j++) {
		struct vmm_dev_fd *x = &v->dev_fd[v->n_dev_fds];

		x->child = device_fd_child(&l->dev, &l->fds[j]);
		if (x->child < 0)
			continue;
		snprintf(x->id, sizeof(x->id), "%s", l->fds[j].id);
		v->n_dev_fds++;
	}
}

static int qemu_config_for(const struct daemon *d, const struct vm_config *cfg, const char *binary,
			   const struct fd_layout *l, struct qemu_config *ret)
{
	*ret = (struct qemu_config){
		.name = cfg->name,
		.binary = binary,
		.machine = cfg->machine,
		.cpu = cfg->cpu,
		.memory_bytes = cfg->memory_bytes,
		.vcpus = cfg->vcpus,
		.kernel = l->kernel_path,
		.initrd = l->initrd >= 0 ? l->initrd_path : NULL,
		.append = cfg->append,
		.kvm = d->kvm,
		.sandbox = d->confine && cfg->uid > 0,
		.allow_exec = cfg->cpr_exec,
		.qmp_fd = l->dev.qmp,
	};
	return devices_qemu_args(&cfg->devices, &l->dev, ret);
}

int vmm_exec_argv(const struct vmm *v, const struct vm_config *cfg, const char *binary,
		  const char *incoming_uri, char ***ret_argv)
{
	struct fd_layout l;
	struct qemu_config qc;
	int r;

	fd_layout(v->d, cfg, cfg->initrd != NULL, &l);
	r = qemu_config_for(v->d, cfg, binary, &l, &qc);
	qc.incoming_uri = incoming_uri;
	if (r >= 0)
		r = qemu_build_argv(&qc, ret_argv);
	qemu_config_done(&qc);
	return r;
}

static int spawn_with(struct vmm *v, const struct vm_config *cfg, const struct fd_layout *lp,
		      int qmp_listen, int log_dirfd, const struct vmm_incoming *in, const int *fds,
		      size_t n);

static int spawn(struct vmm *v, const struct vm_config *cfg, int qmp_listen, int log_dirfd,
		 const struct vmm_incoming *in)
{
	int fds[DEVICE_FDS_MAX + 3], opened[DEVICE_FDS_MAX + 3];
	_cleanup_close_ int kernel = -EBADF, initrd = -EBADF;
	struct fd_layout l;
	size_t n = 0;
	int r;

	r = vmm_open_image(cfg->kernel, &cfg->kernel_id, &kernel);
	if (r < 0) {
		log_error("VM %s: cannot open kernel %s: %s", cfg->name, cfg->kernel,
			  vmm_image_strerror(r));
		return r;
	}
	if (cfg->initrd) {
		r = vmm_open_image(cfg->initrd, &cfg->initrd_id, &initrd);
		if (r < 0) {
			log_error("VM %s: cannot open initrd %s: %s", cfg->name, cfg->initrd,
				  vmm_image_strerror(r));
			return r;
		}
	}

	fd_layout(v->d, cfg, initrd >= 0, &l);
	for (size_t i = 0; i < ELEMENTSOF(opened); i++)
		opened[i] = -EBADF;
	r = fd_list(&l, qmp_listen, kernel, initrd, fds, opened, ELEMENTSOF(fds));
	if (r < 0) {
		log_error("VM %s: cannot hand its devices to a VMM: %s", cfg->name,
			  r == -ENODEV ? "a device's fd is not in custody" : strerror(-r));
		close_many(opened, ELEMENTSOF(opened));
		return r;
	}
	n = (size_t)r;
	set_dev_fds(v, &l);
	r = spawn_with(v, cfg, &l, qmp_listen, log_dirfd, in, fds, n);
	/* The launcher has its copies (or the spawn failed): what was opened
	 * for this VMM alone goes. */
	close_many(opened, ELEMENTSOF(opened));
	return r;
}

static int spawn_with(struct vmm *v, const struct vm_config *cfg, const struct fd_layout *lp,
		      int qmp_listen, int log_dirfd, const struct vmm_incoming *in, const int *fds,
		      size_t n)
{
	_cleanup_close_ int log = -EBADF;
	_cleanup_free_ char *run_dir = NULL;
	struct launcher_confine conf;
	struct qemu_config qc;
	struct stat st;
	char **argv = NULL;
	int r;

	r = qemu_config_for(v->d, cfg, v->binary, lp, &qc);
	qc.incoming = in && in->defer;
	qc.check = in && in->check;
	qc.cpr_main_path = in ? in->cpr_main_path : NULL;
	qc.cpr_state_path = in ? in->cpr_state_path : NULL;
	if (r >= 0)
		r = qemu_build_argv(&qc, &argv);
	qemu_config_done(&qc);
	if (r < 0)
		return r;
	log = openat(log_dirfd, VM_VMM_LOG,
		     O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK, 0640);
	if (log < 0) {
		strv_free(argv);
		return -errno;
	}
	/* The VM's VMMs share the log: this one's own lines (what QEMU said
	 * when it failed) are those from here on. */
	if (fstat(log, &st) == 0)
		v->log_start = st.st_size;
	/* vm.c made STATE_DIR/vms/NAME/vmm that uid's (vm_prepare_run_dir). */
	if (v->d->confine && cfg->uid > 0 &&
	    asprintf(&run_dir, "%s/vms/%s/vmm", v->d->state_dir, cfg->name) < 0) {
		strv_free(argv);
		return -ENOMEM;
	}
	conf = (struct launcher_confine){
		.uid = cfg->uid, .gid = (gid_t)cfg->uid, .kvm = v->d->kvm, .rw_dir = run_dir
	};
	r = launcher_spawn_confined(&v->d->launcher, argv, log, fds, n, run_dir ? &conf : NULL,
				    spawn_done, v, &v->spawn_id);
	strv_free(argv);
	return r;
}

int vmm_start(struct daemon *d, const struct vm_config *cfg, const char *binary,
	      const char *qmp_path, int log_dirfd, const struct vmm_incoming *in,
	      const struct vmm_ops *ops, void *ud, struct vmm **ret)
{
	_cleanup_close_ int qmp_listen = -EBADF, qmp_conn = -EBADF;
	struct vmm *v;
	int r;

	v = vmm_new(d, binary, qmp_path, ops, ud);
	if (!v)
		return -ENOMEM;
	r = open_qmp(qmp_path, &qmp_listen, &qmp_conn);
	if (r >= 0)
		r = qmp_new(qmp_conn, &v->qmp);
	if (r < 0) {
		vmm_free(v);
		return r;
	}
	TAKE_FD(qmp_conn);
	qmp_set_handlers(v->qmp, on_qmp_ready, on_qmp_event, v);

	v->vm_name = strdup(cfg->name);
	if (!v->vm_name) {
		vmm_free(v);
		return -ENOMEM;
	}
	v->spawned_usec = now_usec(CLOCK_MONOTONIC);
	r = spawn(v, cfg, qmp_listen, log_dirfd, in);
	if (r < 0) {
		/* Nothing was asked of the launcher, and nothing will ever listen
		 * where the monitor was bound. */
		unlink(qmp_path);
		vmm_free(v);
		return r;
	}
	v->spawning = true; /* spawn_done() takes it from here */
	*ret = v;
	return 0;
}

static struct vmm *vmm_new(struct daemon *d, const char *binary, const char *qmp_path,
			   const struct vmm_ops *ops, void *ud)
{
	struct vmm *v = calloc(1, sizeof(*v));

	if (!v)
		return NULL;
	v->d = d;
	v->daemon_next = d->vmms;
	d->vmms = v;
	v->pidfd = -EBADF;
	v->exit_code = -1;
	v->ops = ops;
	v->ud = ud;
	ev_init(&v->pid_watcher, pid_cb);
	ev_init(&v->qmp_watcher, qmp_io_cb);
	ev_init(&v->kill_timer, kill_timer_cb);
	ev_init(&v->monitor_timer, monitor_timer_cb);
	v->pid_watcher.data = v->qmp_watcher.data = v->kill_timer.data = v->monitor_timer.data = v;
	v->qmp_path = strdup(qmp_path);
	v->binary = strdup(binary);
	if (!v->qmp_path || !v->binary)
		return vmm_free(v);
	return v;
}

/* A new client of the monitor a running VMM listens on at v->qmp_path. */
static int connect_monitor(struct vmm *v)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	_cleanup_close_ int c = -EBADF;
	int r;

	if (!v->qmp_path || strlen(v->qmp_path) >= sizeof(sa.sun_path))
		return -ENAMETOOLONG;
	strcpy(sa.sun_path, v->qmp_path);
	c = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (c < 0 || connect(c, (struct sockaddr *)&sa, sizeof(sa)) < 0)
		return -errno;
	r = qmp_new(c, &v->qmp);
	if (r < 0)
		return r;
	TAKE_FD(c);
	qmp_set_handlers(v->qmp, on_qmp_ready, on_qmp_event, v);
	return 0;
}

int vmm_attach(struct daemon *d, pid_t pid, int pidfd, const char *binary, const char *qmp_path,
	       const struct vmm_ops *ops, void *ud, struct vmm **ret)
{
	struct vmm *v;
	int r;

	if (strlen(qmp_path) >= sizeof(((struct sockaddr_un *)NULL)->sun_path))
		return -ENAMETOOLONG;
	v = vmm_new(d, binary, qmp_path, ops, ud);
	if (!v)
		return -ENOMEM;
	v->pid = pid;
	v->pidfd = pidfd;
	v->start_time = proc_start_time(pid);
	/* Without a monitor the VMM is still watched (its pidfd) and kept: a
	 * guest is never ended just because cprd cannot talk to its VMM. */
	r = connect_monitor(v);
	*ret = v;
	return r < 0 ? -ENOTCONN : 0;
}

bool vmm_connected(const struct vmm *v)
{
	return v && v->qmp && !v->muted && !v->doomed;
}

int vmm_reconnect(struct vmm *v)
{
	int r;

	if (vmm_connected(v))
		return 0;
	if (!vmm_alive(v) || !v->qmp_path)
		return -ESRCH;
	r = connect_monitor(v);
	if (r >= 0) {
		v->reconnects = 0;
		qmp_sync_watcher(v);
		return 0;
	}
	/* Asked again from the same timer, boundedly. */
	if (++v->reconnects < MONITOR_RECONNECTS) {
		ev_timer_set(&v->monitor_timer, MONITOR_RECONNECT_EVERY, 0.);
		ev_timer_start(v->d->loop, &v->monitor_timer);
	}
	return r;
}

void vmm_watch(struct vmm *v)
{
	if (v->pidfd >= 0 && !ev_is_active(&v->pid_watcher)) {
		ev_io_set(&v->pid_watcher, v->pidfd, EV_READ);
		ev_io_start(v->d->loop, &v->pid_watcher);
	}
	qmp_sync_watcher(v);
}

struct sync_reply {
	bool done;
	json_object *ret;
	char desc[128];
};

static void sync_cb(qmp *q, json_object *ret, const char *cls, const char *desc, void *ud)
{
	struct sync_reply *s = ud;

	s->done = true;
	s->ret = ret ? json_object_get(ret) : NULL;
	if (!ret)
		snprintf(s->desc, sizeof(s->desc), "%s", desc ? desc : "error");
}

int vmm_command_sync(struct vmm *v, const char *cmd, json_object *args, int timeout_ms,
		     json_object **ret)
{
	struct sync_reply s = {};
	uint64_t deadline = now_usec(CLOCK_MONOTONIC) + (uint64_t)timeout_ms * 1000;
	int r;

	if (!v->qmp) {
		json_object_put(args);
		return -ENOTCONN;
	}
	r = qmp_command(v->qmp, cmd, args, -EBADF, sync_cb, &s);
	if (r < 0)
		return r;
	while (!s.done) {
		struct pollfd p = { .fd = qmp_fd(v->qmp),
				    .events = POLLIN | (qmp_wants_write(v->qmp) ? POLLOUT : 0) };
		int64_t left = (int64_t)(deadline - now_usec(CLOCK_MONOTONIC)) / 1000;

		if (left <= 0 || poll(&p, 1, (int)left) == 0) {
			qmp_fail_pending(v->qmp, "timed out"); /* s leaves scope */
			return -ETIMEDOUT;
		}
		if ((p.revents & POLLOUT) && qmp_flush(v->qmp) < 0)
			return -EPIPE;
		if ((p.revents & (POLLIN | POLLHUP)) && qmp_dispatch(v->qmp) < 0) {
			qmp_fail_pending(v->qmp, "monitor closed");
			return -ECONNRESET;
		}
	}
	if (!s.ret)
		return -EIO;
	*ret = s.ret;
	return 0;
}

void vmm_add_record(const struct vmm *v, json_object *o)
{
	json_object_object_add(o, "pid", json_object_new_int(v->pid));
	json_object_object_add(o, "pid_start", json_object_new_int64((int64_t)v->start_time));
	json_object_object_add(o, "vmm_fds", vmm_fd_map(v));
	json_object_object_add(o, "qmp", v->qmp_path ? json_object_new_string(v->qmp_path) : NULL);
}

const char *vmm_start_strerror(int r)
{
	if (r == -ENODEV)
		return "a device's fds are not in cprd's custody (its log says which, and why)";
	return launcher_strerror(r);
}

json_object *vmm_fd_map(const struct vmm *v)
{
	json_object *o = json_object_new_object();

	for (size_t j = 0; j < v->n_dev_fds; j++)
		json_object_object_add(o, v->dev_fd[j].id, json_object_new_int(v->dev_fd[j].child));
	return o;
}

void vmm_set_fd_map(struct vmm *v, json_object *map)
{
	v->n_dev_fds = 0;
	if (!json_object_is_type(map, json_type_object))
		return;
	json_object_object_foreach(map, id, x)
	{
		struct vmm_dev_fd *f = &v->dev_fd[v->n_dev_fds];

		if (v->n_dev_fds >= DEVICE_FDS_MAX || !device_type_of_fd(id) ||
		    strlen(id) >= sizeof(f->id) || !json_object_is_type(x, json_type_int))
			continue;
		snprintf(f->id, sizeof(f->id), "%s", id);
		f->child = json_object_get_int(x);
		v->n_dev_fds++;
	}
}
