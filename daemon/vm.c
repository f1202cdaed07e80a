/* SPDX-License-Identifier: MIT */
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/pidfd.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>

#include "common/json.h"
#include "daemon/log.h"
#include "daemon/server.h"
#include "daemon/vm.h"
#include "kvm/qemu.h"
#include "proto/jsonrpc.h"

#define VM_START_TIMEOUT 60.0 /* TCG boots slowly on a loaded host */
#define VM_STOP_TIMEOUT 10.0

static const char *const state_names[_VM_STATE_MAX] = {
	[VM_STARTING] = "starting", [VM_RUNNING] = "running", [VM_PAUSED] = "paused",
	[VM_STOPPING] = "stopping", [VM_CRASHED] = "crashed",
};

const char *vm_state_to_string(enum vm_state s)
{
	return s >= 0 && s < _VM_STATE_MAX ? state_names[s] : "unknown";
}

struct vm *vm_find(struct daemon *d, const char *name)
{
	for (struct vm *vm = d->vms; vm; vm = vm->next)
		if (streq(vm->cfg.name, name))
			return vm;
	return NULL;
}

size_t vm_count(struct daemon *d)
{
	size_t n = 0;

	for (struct vm *vm = d->vms; vm; vm = vm->next)
		n++;
	return n;
}

void vm_config_done(struct vm_config *cfg)
{
	free(cfg->name);
	free(cfg->vmm);
	free(cfg->kernel);
	free(cfg->initrd);
	free(cfg->append);
	free(cfg->tap);
	free(cfg->machine);
	*cfg = (struct vm_config){};
}

/* ---- teardown ---- */

static void vm_stop_watchers(struct vm *vm)
{
	struct ev_loop *loop = vm->d->loop;

	ev_timer_stop(loop, &vm->timer);
	ev_io_stop(loop, &vm->qmp_watcher);
	ev_io_stop(loop, &vm->pid_watcher);
}

static void vm_drop_qmp(struct vm *vm)
{
	if (!vm->qmp)
		return;
	ev_io_stop(vm->d->loop, &vm->qmp_watcher);
	qmp_fail_pending(vm->qmp, "the VMM's monitor connection closed");
	vm->qmp = qmp_free(vm->qmp);
}

static void remove_files(struct vm *vm)
{
	const char *files[] = {vm->console_path, vm->vmm_log_path, vm->qmp_path};

	for (size_t i = 0; i < ELEMENTSOF(files); i++)
		if (files[i])
			unlink(files[i]);
	if (vm->dir)
		rmdir(vm->dir);
}

/* Forget the VM entirely: custody released, files removed. */
static void vm_free(struct vm *vm)
{
	struct daemon *d = vm->d;

	for (struct vm **pp = &d->vms; *pp; pp = &(*pp)->next)
		if (*pp == vm) {
			*pp = vm->next;
			break;
		}
	vm_stop_watchers(vm);
	vm_drop_qmp(vm);
	vm->pidfd = safe_close(vm->pidfd);
	memstore_release_vm(d->store, vm->cfg.name);
	remove_files(vm);
	free(vm->dir);
	free(vm->console_path);
	free(vm->vmm_log_path);
	free(vm->qmp_path);
	vm_config_done(&vm->cfg);
	free(vm);
	daemon_update_status(d);
}

void vm_detach_all(struct daemon *d)
{
	for (struct vm *vm = d->vms; vm; vm = vm->next) {
		vm_stop_watchers(vm);
		if (vm->waiting)
			call_fail(TAKE_PTR(vm->waiting), JSONRPC_INTERNAL_ERROR, "cprd is shutting down");
	}
}

/* Last bytes of the VMM's own log: the reason it would not start. */
static void log_tail(const char *path, char *buf, size_t size)
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

static void fail_start(struct vm *vm, int code, const char *why)
{
	char tail[400];

	log_tail(vm->vmm_log_path, tail, sizeof(tail));
	log_error("VM %s: start failed: %s%s%s", vm->cfg.name, why, tail[0] ? ": " : "", tail);
	if (vm->waiting)
		call_fail(TAKE_PTR(vm->waiting), code, "VM '%s' failed to start: %s%s%s",
			  vm->cfg.name, why, tail[0] ? "; VMM said: " : "", tail);
	if (vm->pidfd >= 0) {
		/* Never leave a half-started VMM behind; its exit is reaped
		 * synchronously since it was just killed. */
		pidfd_send_signal(vm->pidfd, SIGKILL, NULL, 0);
		waitid(P_PIDFD, vm->pidfd, &(siginfo_t){}, WEXITED);
	}
	vm_free(vm);
}

/* ---- process exit ---- */

static void describe_exit(struct vm *vm)
{
	siginfo_t si = {};

	if (waitid(P_PIDFD, vm->pidfd, &si, WEXITED | WNOHANG) < 0 || si.si_pid == 0) {
		vm->exit_code = -1;
		snprintf(vm->exit_desc, sizeof(vm->exit_desc), "exited (status unknown)");
		return;
	}
	if (si.si_code == CLD_EXITED) {
		vm->exit_code = si.si_status;
		snprintf(vm->exit_desc, sizeof(vm->exit_desc), "exited with status %d", si.si_status);
	} else {
		vm->exit_code = 128 + si.si_status;
		snprintf(vm->exit_desc, sizeof(vm->exit_desc), "killed by signal %s",
			 sigabbrev_np(si.si_status) ? sigabbrev_np(si.si_status) : "?");
	}
}

static void pid_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	struct vm *vm = w->data;
	struct call *c;

	ev_io_stop(loop, w);
	describe_exit(vm);
	vm->pidfd = safe_close(vm->pidfd);
	vm_drop_qmp(vm);

	switch (vm->state) {
	case VM_STARTING:
		fail_start(vm, JSONRPC_ERR_VMM, vm->exit_desc);
		return;
	case VM_STOPPING:
		log_info("VM %s: VMM pid %d %s; custody released", vm->cfg.name, (int)vm->pid,
			 vm->exit_desc);
		c = TAKE_PTR(vm->waiting);
		json_object *res = json_object_new_object();
		json_object_object_add(res, "name", json_object_new_string(vm->cfg.name));
		json_object_object_add(res, "destroyed", json_object_new_boolean(1));
		vm_free(vm);
		if (c)
			call_reply(c, res);
		else
			json_object_put(res);
		return;
	default:
		ev_timer_stop(loop, &vm->timer);
		vm->state = VM_CRASHED;
		log_warning("VM %s: VMM pid %d %s; guest memory stays in custody until destroy",
			    vm->cfg.name, (int)vm->pid, vm->exit_desc);
		daemon_update_status(vm->d);
	}
}

static void timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct vm *vm = w->data;

	if (vm->state == VM_STARTING) {
		fail_start(vm, JSONRPC_ERR_TIMEOUT, "the VMM's monitor did not become ready in time");
	} else if (vm->state == VM_STOPPING && vm->pidfd >= 0) {
		log_warning("VM %s: VMM pid %d ignored SIGTERM; sending SIGKILL", vm->cfg.name,
			    (int)vm->pid);
		pidfd_send_signal(vm->pidfd, SIGKILL, NULL, 0);
	}
}

/* ---- QMP ---- */

static void qmp_sync_watcher(struct vm *vm)
{
	int events = EV_READ | (qmp_wants_write(vm->qmp) ? EV_WRITE : 0);

	if (ev_is_active(&vm->qmp_watcher) && vm->qmp_watcher.events == events)
		return;
	ev_io_stop(vm->d->loop, &vm->qmp_watcher);
	ev_io_set(&vm->qmp_watcher, qmp_fd(vm->qmp), events);
	ev_io_start(vm->d->loop, &vm->qmp_watcher);
}

static void qmp_io_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	struct vm *vm = w->data;
	int r = 0;

	if (revents & EV_WRITE)
		r = qmp_flush(vm->qmp) < 0 ? -EPIPE : 0;
	if (r == 0 && (revents & EV_READ))
		r = qmp_dispatch(vm->qmp);
	if (r < 0) {
		/* The VMM closed its monitor: it is exiting, and the pidfd
		 * will say how. Until then there is nobody to talk to. */
		log_debug("VM %s: monitor connection lost: %s", vm->cfg.name, strerror(-r));
		vm_drop_qmp(vm);
		return;
	}
	qmp_sync_watcher(vm);
}

static void qmp_event(qmp *q, const char *event, json_object *data, int64_t ts_us, void *userdata)
{
	struct vm *vm = userdata;

	if (streq(event, "STOP") && vm->state == VM_RUNNING)
		vm->state = VM_PAUSED;
	else if (streq(event, "RESUME") && vm->state == VM_PAUSED)
		vm->state = VM_RUNNING;
	else if (streq(event, "SHUTDOWN"))
		log_info("VM %s: guest shut down (%s)", vm->cfg.name,
			 json_object_get_string(json_object_object_get(data, "reason")));
}

static void started(qmp *q, json_object *ret, const char *cls, const char *desc, void *userdata)
{
	struct vm *vm = userdata;
	json_object *st;

	if (vm->state != VM_STARTING)
		return;
	if (!ret) {
		fail_start(vm, JSONRPC_ERR_VMM, desc);
		return;
	}
	st = json_object_object_get(ret, "status");
	vm->state = st && streq(json_object_get_string(st), "running") ? VM_RUNNING : VM_PAUSED;
	ev_timer_stop(vm->d->loop, &vm->timer);
	log_info("VM %s: running, VMM pid %d (QEMU %s), %" PRIu64 " MiB", vm->cfg.name,
		 (int)vm->pid, vm->vmm_version, vm->cfg.memory_bytes >> 20);
	daemon_update_status(vm->d);
	if (vm->waiting)
		call_reply(TAKE_PTR(vm->waiting), vm_to_json(vm));
}

static void qmp_ready(qmp *q, void *userdata)
{
	struct vm *vm = userdata;

	snprintf(vm->vmm_version, sizeof(vm->vmm_version), "%s", qmp_vmm_version(q));
	if (qmp_command(q, "query-status", NULL, -EBADF, started, vm) < 0)
		fail_start(vm, JSONRPC_ERR_RESOURCE, "out of memory");
	else
		qmp_sync_watcher(vm);
}

/* ---- start ---- */

static int open_tap(const char *ifname, int *ret_fd)
{
	_cleanup_close_ int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
	struct ifreq ifr = {.ifr_flags = IFF_TAP | IFF_NO_PI};

	if (fd < 0)
		return -errno;
	snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "%s", ifname);
	if (ioctl(fd, TUNSETIFF, &ifr) < 0)
		return -errno;
	*ret_fd = TAKE_FD(fd);
	return 0;
}

/* The monitor socket: bound and listening here, then connected to at once,
 * so the connection waits in the backlog until QEMU accepts it. */
static int open_qmp(const char *path, int *ret_listen, int *ret_conn)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
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

static int vm_paths(struct vm *vm)
{
	if (asprintf(&vm->dir, "%s/vms/%s", vm->d->state_dir, vm->cfg.name) < 0 ||
	    asprintf(&vm->console_path, "%s/console.log", vm->dir) < 0 ||
	    asprintf(&vm->vmm_log_path, "%s/vmm.log", vm->dir) < 0 ||
	    asprintf(&vm->qmp_path, "%s/qmp.sock", vm->dir) < 0)
		return -ENOMEM;
	if (mkdir(vm->dir, 0750) < 0 && errno != EEXIST)
		return -errno;
	return 0;
}

/* Take the VM's resources into custody: memory, console log, tap. */
static int vm_acquire(struct vm *vm)
{
	_cleanup_close_ int ram = -EBADF, con = -EBADF, tap = -EBADF;
	memstore *m = vm->d->store;
	int r;

	r = memstore_region_create("ram0", vm->cfg.memory_bytes, 0, &ram);
	if (r < 0)
		return r;
	con = open(vm->console_path, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC | O_NOFOLLOW,
		   0640);
	if (con < 0)
		return -errno;
	if (vm->cfg.tap) {
		r = open_tap(vm->cfg.tap, &tap);
		if (r < 0)
			return r;
	}
	r = memstore_put(m, vm->cfg.name, "ram0", MEMSTORE_KIND_MEMFD, ram);
	if (r < 0)
		return r;
	TAKE_FD(ram);
	r = memstore_put(m, vm->cfg.name, "console", MEMSTORE_KIND_FILE, con);
	if (r < 0)
		return r;
	TAKE_FD(con);
	if (tap >= 0) {
		r = memstore_put(m, vm->cfg.name, "net0", MEMSTORE_KIND_TAP, tap);
		if (r < 0)
			return r;
		TAKE_FD(tap);
	}
	return 0;
}

static int held_fd(struct vm *vm, const char *name)
{
	const memstore_entry *e;

	return memstore_get(vm->d->store, vm->cfg.name, name, &e) < 0 ? -EBADF : e->fd;
}

/* Build the command line for the held fds and have the launcher start it. */
static int vm_spawn(struct vm *vm, int qmp_listen)
{
	struct qemu_config qc = {
		.name = vm->cfg.name, .binary = vm->cfg.vmm, .machine = vm->cfg.machine,
		.memory_bytes = vm->cfg.memory_bytes, .vcpus = vm->cfg.vcpus,
		.kernel = vm->cfg.kernel, .initrd = vm->cfg.initrd, .append = vm->cfg.append,
		.kvm = vm->d->kvm, .tap_fd = -1,
	};
	int fds[4], tap = held_fd(vm, "net0");
	_cleanup_close_ int log = -EBADF;
	char **argv = NULL;
	size_t n = 0;
	int r;

	fds[n] = held_fd(vm, "ram0");
	qc.ram_fd = QEMU_CHILD_FD_BASE + (int)n++;
	fds[n] = held_fd(vm, "console");
	qc.console_fd = QEMU_CHILD_FD_BASE + (int)n++;
	fds[n] = qmp_listen;
	qc.qmp_fd = QEMU_CHILD_FD_BASE + (int)n++;
	if (tap >= 0) {
		fds[n] = tap;
		qc.tap_fd = QEMU_CHILD_FD_BASE + (int)n++;
	}
	r = qemu_build_argv(&qc, &argv);
	if (r < 0)
		return r;
	log = open(vm->vmm_log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW, 0640);
	if (log < 0) {
		strv_free(argv);
		return -errno;
	}
	r = launcher_spawn(&vm->d->launcher, argv, log, fds, n, &vm->pid, &vm->pidfd);
	strv_free(argv);
	return r;
}

void vm_create(struct daemon *d, struct vm_config *cfg, struct call *c)
{
	_cleanup_close_ int qmp_listen = -EBADF, qmp_conn = -EBADF;
	struct vm *vm;
	char why[256];
	int r;

	vm = calloc(1, sizeof(*vm));
	if (!vm) {
		vm_config_done(cfg);
		call_fail(c, JSONRPC_ERR_RESOURCE, "out of memory");
		return;
	}
	vm->d = d;
	vm->cfg = *cfg;
	*cfg = (struct vm_config){};
	vm->state = VM_STARTING;
	vm->pidfd = -EBADF;
	vm->exit_code = -1;
	vm->waiting = c;
	vm->created_usec = now_usec(CLOCK_REALTIME);
	ev_init(&vm->pid_watcher, pid_cb);
	ev_init(&vm->qmp_watcher, qmp_io_cb);
	ev_init(&vm->timer, timer_cb);
	vm->pid_watcher.data = vm->qmp_watcher.data = vm->timer.data = vm;
	vm->next = d->vms;
	d->vms = vm;

	r = vm_paths(vm);
	if (r < 0) {
		snprintf(why, sizeof(why), "cannot create %s: %s", vm->dir ? vm->dir : "its directory",
			 strerror(-r));
		fail_start(vm, JSONRPC_ERR_RESOURCE, why);
		return;
	}
	r = vm_acquire(vm);
	if (r < 0) {
		snprintf(why, sizeof(why), "cannot acquire %s: %s",
			 r == -ENOENT || r == -EPERM || r == -EBUSY ? "its tap device" : "its resources",
			 strerror(-r));
		fail_start(vm, JSONRPC_ERR_RESOURCE, why);
		return;
	}
	r = open_qmp(vm->qmp_path, &qmp_listen, &qmp_conn);
	if (r >= 0)
		r = qmp_new(qmp_conn, &vm->qmp);
	if (r < 0) {
		snprintf(why, sizeof(why), "cannot set up the monitor socket: %s", strerror(-r));
		fail_start(vm, JSONRPC_ERR_RESOURCE, why);
		return;
	}
	TAKE_FD(qmp_conn);
	qmp_set_handlers(vm->qmp, qmp_ready, qmp_event, vm);

	r = vm_spawn(vm, qmp_listen);
	if (r < 0) {
		snprintf(why, sizeof(why), "cannot execute VMM '%s': %s", vm->cfg.vmm, strerror(-r));
		fail_start(vm, JSONRPC_ERR_VMM, why);
		return;
	}
	ev_io_set(&vm->pid_watcher, vm->pidfd, EV_READ);
	ev_io_start(d->loop, &vm->pid_watcher);
	qmp_sync_watcher(vm);
	ev_timer_set(&vm->timer, VM_START_TIMEOUT, 0.);
	ev_timer_start(d->loop, &vm->timer);
	log_info("VM %s: VMM %s started, pid %d", vm->cfg.name, vm->cfg.vmm, (int)vm->pid);
}

void vm_destroy(struct vm *vm, struct call *c)
{
	json_object *res;

	if (vm->waiting) {
		call_fail(c, JSONRPC_ERR_BUSY, "VM '%s' is %s; try again when that has finished",
			  vm->cfg.name, vm_state_to_string(vm->state));
		return;
	}
	if (vm->pidfd < 0) { /* crashed: nothing runs */
		res = json_object_new_object();
		json_object_object_add(res, "name", json_object_new_string(vm->cfg.name));
		json_object_object_add(res, "destroyed", json_object_new_boolean(1));
		log_info("VM %s: destroyed; custody released", vm->cfg.name);
		vm_free(vm);
		call_reply(c, res);
		return;
	}
	vm->state = VM_STOPPING;
	vm->waiting = c;
	/* QEMU treats SIGTERM as a host-requested shutdown and exits cleanly. */
	pidfd_send_signal(vm->pidfd, SIGTERM, NULL, 0);
	ev_timer_stop(vm->d->loop, &vm->timer);
	ev_timer_set(&vm->timer, VM_STOP_TIMEOUT, 0.);
	ev_timer_start(vm->d->loop, &vm->timer);
}

/* ---- views ---- */

static void add_str(json_object *o, const char *k, const char *v)
{
	json_object_object_add(o, k, v ? json_object_new_string(v) : NULL);
}

json_object *vm_to_json(struct vm *vm)
{
	json_object *o = json_object_new_object();

	add_str(o, "name", vm->cfg.name);
	add_str(o, "state", vm_state_to_string(vm->state));
	json_object_object_add(o, "pid", vm->pidfd >= 0 ? json_object_new_int(vm->pid) : NULL);
	add_str(o, "vmm", vm->cfg.vmm);
	add_str(o, "vmm_version", vm->vmm_version[0] ? vm->vmm_version : NULL);
	json_object_object_add(o, "memory_bytes", json_object_new_int64((int64_t)vm->cfg.memory_bytes));
	json_object_object_add(o, "vcpus", json_object_new_int((int)vm->cfg.vcpus));
	add_str(o, "machine", vm->cfg.machine);
	add_str(o, "accel", vm->d->kvm ? "kvm" : "tcg");
	add_str(o, "kernel", vm->cfg.kernel);
	add_str(o, "initrd", vm->cfg.initrd);
	add_str(o, "append", vm->cfg.append);
	add_str(o, "tap", vm->cfg.tap);
	add_str(o, "console_log", vm->console_path);
	add_str(o, "vmm_log", vm->vmm_log_path);
	add_str(o, "qmp_socket", vm->qmp_path);
	json_object_object_add(o, "created_usec", json_object_new_int64((int64_t)vm->created_usec));
	json_object_object_add(o, "fds_held",
			       json_object_new_int((int)memstore_count(vm->d->store, vm->cfg.name)));
	if (vm->state == VM_CRASHED) {
		json_object_object_add(o, "exit_code", json_object_new_int(vm->exit_code));
		add_str(o, "exit", vm->exit_desc);
	}
	return o;
}

json_object *vm_fds_to_json(struct vm *vm)
{
	json_object *arr = json_object_new_array();
	const memstore_entry *e;

	for (size_t i = 0; (e = memstore_nth(vm->d->store, vm->cfg.name, i)); i++) {
		json_object *o = json_object_new_object();

		add_str(o, "name", e->name);
		add_str(o, "kind", memstore_kind_to_string(e->kind));
		struct stat st;
		/* Files (logs) grow; regions are sealed, so their size is fixed. */
		int64_t size = e->kind == MEMSTORE_KIND_FILE && fstat(e->fd, &st) == 0 ? st.st_size
										      : (int64_t)e->size;

		json_object_object_add(o, "size", json_object_new_int64(size));
		json_object_object_add(o, "fd", json_object_new_int(e->fd));
		json_object_array_add(arr, o);
	}
	return arr;
}
