/* SPDX-License-Identifier: MIT */
/*
 * The update engine without QEMU: daemon/ops/update.c, both strategies, vm.c,
 * vmm.c and the real launcher, linked from the daemon's own objects and run
 * on a real libev loop in this process.
 *
 * Every VMM the engine starts is this executable again, in relay mode (the
 * launcher passes RELAY_ENV on): it finds its monitor's listening socket in
 * the QEMU command line it was given, hands that socket and its argv to the
 * test over a unix socket, and waits, a real process with a real pid and
 * pidfd that the test can kill, or tell to exit. The test accepts the
 * monitor connection and plays QEMU's side of QMP line by line (greeting,
 * replies, errors, events with timestamps), so each phase of an update is
 * driven deterministically, and every command the engine sends is checked
 * in order.
 *
 * Each test runs in its own process (Check's fork mode) with its own state
 * directory, launcher and loop. The daemon's log goes to a file there; the
 * logs of the tests that failed are printed after Check's summary
 * (CPRD_TEST_KEEP=1 keeps every test's directory instead).
 */
#include <check.h>
#include <dirent.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/pidfd.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>

#include "common/clock.h"
#include "common/json.h"
#include "common/macro.h"
#include "daemon/core/daemon.h"
#include "daemon/host/launcher.h"
#include "daemon/observe/log.h"
#include "daemon/core/registry.h"
#include "daemon/strategies/strategy.h"
#include "daemon/ops/update.h"
#include "daemon/core/vm.h"
#include "daemon/core/vmm.h"
#include "proto/frame.h"

#define RELAY_ENV "CPRD_TEST_UPDATE_RELAY"
#define VM_NAME "vm0"
#define OLD_VERSION "10.0.2"
#define NEW_VERSION "10.1.0"
#define WAIT_USEC (10 * 1000 * 1000) /* for anything the test waits on */
#define DEADLINE 1.0                 /* the update's timeout, when a test lets it expire */
#define NO_DEADLINE 60.0
/* QEMU's event timestamps: the guest pauses at T_STOP and runs again at
 * T_RESUME (new VMM) or T_OLD_RESUME (old VMM, after a rollback). */
#define T_STOP 1700000000100000LL
#define T_RESUME 1700000000104250LL     /* 4.250 ms later */
#define T_OLD_RESUME 1700000000130500LL /* 30.500 ms later */
#define PLAIN (JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE)

/* ---- relay mode: the "VMM" process --------------------------------------- */

/* Runs instead of the tests when the launcher starts this executable as a
 * VMM. Its stdout and stderr are the VM's vmm.log. */
static int relay_main(int argc, char **argv)
{
	static char buf[LAUNCHER_MAX_REQUEST];
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	const char *path = getenv(RELAY_ENV);
	size_t len = 0;
	int mon = -1, s;
	ssize_t n;
	char c;

	for (int i = 1; i + 1 < argc; i++)
		if (streq(argv[i], "-chardev") &&
		    sscanf(argv[i + 1], "socket,id=qmp,fd=%d,", &mon) == 1)
			break;
	for (int i = 0; i < argc; i++) {
		size_t l = strlen(argv[i]) + 1;

		if (len + l > sizeof(buf))
			return 2;
		memcpy(buf + len, argv[i], l);
		len += l;
	}
	if (mon < 0 || strlen(path) >= sizeof(sa.sun_path)) {
		fprintf(stderr, "relay: no monitor fd on the command line\n");
		return 2;
	}
	strcpy(sa.sun_path, path);
	s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (s < 0 || connect(s, (struct sockaddr *)&sa, sizeof(sa)) < 0 ||
	    proto_send_fds(s, buf, len, &mon, 1) < 0) {
		fprintf(stderr, "relay: cannot reach the test: %m\n");
		return 2;
	}
	close(mon);
	/* Until the test says how to end (a byte: the exit status), or is gone. */
	do
		n = read(s, &c, 1);
	while (n < 0 && errno == EINTR);
	if (n != 1)
		return 0;
	fprintf(stderr, "relay: told to exit with status %d\n", (int)(unsigned char)c);
	return (unsigned char)c;
}

/* ---- the daemon under test, one per test process ------------------------- */

static struct daemon D;
static char base[PATH_MAX - 128]; /* every test's state directory is in here */
static char dir[PATH_MAX - 64];   /* this test's */
static char self[PATH_MAX];       /* this executable: every VMM's binary */
static char log_path[PATH_MAX];
static int relay_listen = -EBADF;
static int fd_baseline;
static ev_timer tick;
static ev_prepare flush;

static int count_fds(void)
{
	DIR *d = opendir("/proc/self/fd");
	int n = 0;

	ck_assert_ptr_nonnull(d);
	while (readdir(d))
		n++;
	closedir(d);
	return n - 3; /* ".", ".." and the directory's own fd */
}

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
	(void)remove(path);
	return 0;
}

static void remove_tree(const char *path)
{
	nftw(path, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

static void print_file(const char *path)
{
	char buf[4096];
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	ssize_t n;

	if (fd < 0)
		return;
	printf("---- %s\n", path);
	fflush(stdout);
	while ((n = read(fd, buf, sizeof(buf))) > 0)
		(void)!write(STDOUT_FILENO, buf, (size_t)n);
	close(fd);
}

/* A test that passed removed its state directory: what is left is of
 * those that failed, in the order they ran. */
static void print_failed_logs(void)
{
	struct dirent **ents;
	char path[PATH_MAX + 512];
	int n = scandir(base, &ents, NULL, versionsort);

	for (int i = 0; i < n; i++) {
		if (ents[i]->d_name[0] != '.') {
			snprintf(path, sizeof(path), "%s/%s/cprd.log", base, ents[i]->d_name);
			print_file(path);
			snprintf(path, sizeof(path), "%s/%s/vms/" VM_NAME "/vmm.log", base,
				 ents[i]->d_name);
			print_file(path);
		}
		free(ents[i]);
	}
	free(n >= 0 ? ents : NULL);
}

static void tick_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
}

/* main.c's flush: what changed in a turn is written before the loop waits. */
static void flush_cb(struct ev_loop *loop, ev_prepare *w, int revents)
{
	if (D.registry.dirty)
		(void)vm_registry_commit(&D);
}

/* main.c's: the orphan reaper waits while starts are in flight. */
static void launcher_event(enum launcher_event ev, pid_t pid, size_t n, void *ud)
{
	if (ev == LAUNCHER_SETTLED)
		vmm_reap_orphans(&D);
}

static void setup(void)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	char path[PATH_MAX];
	int fd;

	snprintf(dir, sizeof(dir), "%s/%d", base, (int)getpid());
	ck_assert_int_eq(mkdir(dir, 0700), 0);
	snprintf(log_path, sizeof(log_path), "%s/cprd.log", dir);
	fd = open(log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_ge(dup2(fd, STDERR_FILENO), 0);
	close(fd);
	log_setup();
	signal(SIGPIPE, SIG_IGN);
	/* Not Check's handlers, inherited from its runner: a launcher stopped
	 * before it has reset its signals would run the SIGTERM one, which
	 * signals this whole process group, the test included. */
	signal(SIGTERM, SIG_DFL);
	signal(SIGINT, SIG_DFL);
	/* The VMMs are double-forked: as subreaper this process inherits them,
	 * and the engine reaps them through their pidfds, as cprd does. */
	ck_assert_int_eq(prctl(PR_SET_CHILD_SUBREAPER, 1), 0);

	D = (struct daemon){ .listen_fd = -EBADF, .launcher = { .sock = -EBADF } };
	D.state_dir = strdup(dir);
	snprintf(path, sizeof(path), "%s/vms", dir);
	ck_assert_int_eq(mkdir(path, 0750), 0);
	D.state_fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	D.vms_fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	D.archive_fd = -EBADF; /* destroyed VMs leave nothing behind here */
	ck_assert_int_ge(D.state_fd, 0);
	ck_assert_int_ge(D.vms_fd, 0);
	ck_assert_int_eq(registry_init(&D.registry, dir), 0);
	ck_assert_int_eq(memstore_new(&D.store), 0);

	ck_assert_uint_lt(strlen(dir) + sizeof("/relay.sock"), sizeof(sa.sun_path));
	strcpy(stpcpy(sa.sun_path, dir), "/relay.sock");
	relay_listen = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	ck_assert_int_ge(relay_listen, 0);
	ck_assert_int_eq(bind(relay_listen, (struct sockaddr *)&sa, sizeof(sa)), 0);
	ck_assert_int_eq(listen(relay_listen, 8), 0);
	ck_assert_int_eq(setenv(RELAY_ENV, sa.sun_path, 1), 0);
	ck_assert_int_eq(launcher_start(&D.launcher), 0); /* inherits RELAY_ENV */

	D.loop = ev_loop_new(EVFLAG_AUTO);
	ck_assert_ptr_nonnull(D.loop);
	ev_init(&tick, tick_cb);
	ev_prepare_init(&flush, flush_cb);
	ev_prepare_start(D.loop, &flush);
	ck_assert_int_eq(launcher_watch(&D.launcher, D.loop, launcher_event, NULL), 0);
	ev_run(D.loop, EVRUN_NOWAIT);
	fd_baseline = count_fds();
}

static void teardown(void)
{
	ev_prepare_stop(D.loop, &flush);
	launcher_stop(&D.launcher);
	D.store = memstore_free(D.store);
	ev_loop_destroy(D.loop);
	registry_done(&D.registry);
	D.vms_fd = safe_close(D.vms_fd);
	D.state_fd = safe_close(D.state_fd);
	free(D.state_dir);
	relay_listen = safe_close(relay_listen);
	if (!getenv("CPRD_TEST_KEEP"))
		remove_tree(dir); /* Check runs this only after a test that passed */
}

/* One turn of the loop, waiting at most 5 ms for something to happen. */
static void turn(void)
{
	ev_timer_set(&tick, 0.005, 0.);
	ev_timer_start(D.loop, &tick);
	ev_run(D.loop, EVRUN_ONCE);
	ev_timer_stop(D.loop, &tick);
}

static void turns(int n)
{
	while (n-- > 0)
		turn();
}

#define RUN_UNTIL(cond) RUN_UNTIL_WITHIN(cond, WAIT_USEC)
#define RUN_UNTIL_WITHIN(cond, usec)                                                          \
	do {                                                                                  \
		uint64_t end_ = now_usec(CLOCK_MONOTONIC) + (usec);                           \
		while (!(cond)) {                                                             \
			ck_assert_msg(now_usec(CLOCK_MONOTONIC) < end_, "timed out: " #cond); \
			turn();                                                               \
		}                                                                             \
	} while (0)

/* ---- one VMM as the test plays it ---------------------------------------- */

struct fake {
	const char *role; /* "old" or "new", for messages */
	pid_t pid;
	int pidfd; /* the test's own */
	int ctl;   /* the relay's connection: a byte makes it exit */
	int mon;   /* QEMU's end of the monitor connection */
	char **argv;
	char buf[65536];
	size_t len;
	int fds[8]; /* fds that came with commands (getfd) */
	size_t nfds;
	char seen[1024]; /* every command the engine sent, in order */
};

#define FAKE(r)                                                            \
	{                                                                  \
		.role = (r), .pidfd = -EBADF, .ctl = -EBADF, .mon = -EBADF \
	}

/* Take the relay's report, running the loop until it comes: its pid, its
 * argv and its monitor's listening socket, on which the engine's
 * connection already waits. */
static void fake_attach(struct fake *f)
{
	static char buf[LAUNCHER_MAX_REQUEST];
	struct pollfd p = { .fd = relay_listen, .events = POLLIN };
	struct ucred cr;
	socklen_t crl = sizeof(cr);
	size_t nfds = 0, n = 0;
	uint64_t end = now_usec(CLOCK_MONOTONIC) + WAIT_USEC;
	int lfd = -EBADF;
	ssize_t len;

	while (poll(&p, 1, 0) == 0) {
		ck_assert_msg(now_usec(CLOCK_MONOTONIC) < end, "the %s VMM never reported in",
			      f->role);
		turn();
	}
	f->ctl = accept4(relay_listen, NULL, NULL, SOCK_CLOEXEC);
	ck_assert_int_ge(f->ctl, 0);
	ck_assert_int_eq(getsockopt(f->ctl, SOL_SOCKET, SO_PEERCRED, &cr, &crl), 0);
	f->pid = cr.pid;
	f->pidfd = pidfd_open(f->pid, 0);
	ck_assert_int_ge(f->pidfd, 0);
	len = proto_recv_fds(f->ctl, buf, sizeof(buf), &lfd, 1, &nfds);
	ck_assert_int_gt(len, 0);
	ck_assert_uint_eq(nfds, 1);
	ck_assert_int_eq(buf[len - 1], '\0');
	for (ssize_t i = 0; i < len; i += (ssize_t)strlen(buf + i) + 1)
		n++;
	f->argv = calloc(n + 1, sizeof(char *));
	n = 0;
	for (ssize_t i = 0; i < len; i += (ssize_t)strlen(buf + i) + 1)
		f->argv[n++] = strdup(buf + i);
	f->mon = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
	ck_assert_int_ge(f->mon, 0);
	close(lfd);
}

/* argv has a, followed by b unless b is NULL. */
static bool has_arg(const struct fake *f, const char *a, const char *b)
{
	for (char **p = f->argv; *p; p++)
		if (streq(*p, a) && (!b || (p[1] && streq(p[1], b))))
			return true;
	return false;
}

static size_t count_arg(const struct fake *f, const char *a)
{
	size_t n = 0;

	for (char **p = f->argv; *p; p++)
		n += streq(*p, a);
	return n;
}

/* Read what the engine sent, without waiting. 0 on EOF, -EAGAIN. */
static ssize_t fake_recv(struct fake *f)
{
	union {
		char buf[CMSG_SPACE(8 * sizeof(int))];
		struct cmsghdr align;
	} ctl;
	struct iovec iov = { .iov_base = f->buf + f->len, .iov_len = sizeof(f->buf) - f->len };
	struct msghdr mh = { .msg_iov = &iov,
			     .msg_iovlen = 1,
			     .msg_control = ctl.buf,
			     .msg_controllen = sizeof(ctl.buf) };
	ssize_t n;

	if (f->mon < 0)
		return 0;
	n = recvmsg(f->mon, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
	if (n < 0)
		return errno == EAGAIN ? -EAGAIN : 0; /* ECONNRESET: closed too */
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c))
		for (size_t i = 0; i < (c->cmsg_len - CMSG_LEN(0)) / sizeof(int); i++) {
			ck_assert_uint_lt(f->nfds, ELEMENTSOF(f->fds));
			memcpy(&f->fds[f->nfds++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
		}
	f->len += (size_t)n;
	return n;
}

/* A complete line from the buffer, parsed, and noted in f->seen. */
static json_object *fake_take_line(struct fake *f)
{
	char *nl = memchr(f->buf, '\n', f->len);
	json_object *o;
	const char *cmd;
	size_t l;

	if (!nl)
		return NULL;
	l = (size_t)(nl - f->buf);
	*nl = '\0';
	o = json_tokener_parse(f->buf);
	ck_assert_msg(o && json_object_is_type(o, json_type_object), "%s VMM: not JSON: %s",
		      f->role, f->buf);
	memmove(f->buf, nl + 1, f->len - l - 1);
	f->len -= l + 1;
	cmd = json_object_get_string(json_object_object_get(o, "execute"));
	snprintf(f->seen + strlen(f->seen), sizeof(f->seen) - strlen(f->seen), "%s%s",
		 f->seen[0] ? "," : "", cmd ? cmd : "?");
	return o;
}

/* The next command on f's monitor, running the loop until it comes. */
static json_object *fake_next(struct fake *f)
{
	uint64_t end = now_usec(CLOCK_MONOTONIC) + WAIT_USEC;
	json_object *o;
	ssize_t n;

	while (!(o = fake_take_line(f))) {
		n = fake_recv(f);
		ck_assert_msg(n != 0, "cprd closed the %s VMM's monitor; it had sent: %s", f->role,
			      f->seen);
		if (n > 0)
			continue;
		ck_assert_msg(now_usec(CLOCK_MONOTONIC) < end,
			      "nothing from cprd on the %s VMM's monitor; it had sent: %s", f->role,
			      f->seen);
		turn();
	}
	return o;
}

/* Expect cmd next; its "id", and its "arguments" as plain JSON if args. */
static int64_t fake_expect_args(struct fake *f, const char *cmd, char *args, size_t size)
{
	_cleanup_json_ json_object *o = fake_next(f);
	const char *got = json_object_get_string(json_object_object_get(o, "execute"));
	json_object *a = json_object_object_get(o, "arguments");

	ck_assert_msg(got && streq(got, cmd), "%s VMM: expected %s, got %s", f->role, cmd,
		      json_object_to_json_string_ext(o, PLAIN));
	if (args)
		snprintf(args, size, "%s", a ? json_object_to_json_string_ext(a, PLAIN) : "");
	return json_object_get_int64(json_object_object_get(o, "id"));
}

static int64_t fake_expect(struct fake *f, const char *cmd)
{
	return fake_expect_args(f, cmd, NULL, 0);
}

/* The oldest fd that came with a command. */
static int fake_take_fd(struct fake *f)
{
	int fd;

	ck_assert_msg(f->nfds > 0, "%s VMM: a command came without its fd", f->role);
	fd = f->fds[0];
	memmove(f->fds, f->fds + 1, --f->nfds * sizeof(int));
	return fd;
}

/* The engine says nothing more on f's monitor over a few turns. */
static void fake_quiet(struct fake *f)
{
	for (int i = 0; i < 10; i++) {
		turn();
		while (fake_recv(f) > 0)
			;
		ck_assert_msg(!memchr(f->buf, '\n', f->len),
			      "%s VMM: unexpected command after %s: %.*s", f->role, f->seen,
			      (int)f->len, f->buf);
	}
}

_printf_(2, 3) static void fake_send(struct fake *f, const char *fmt, ...)
{
	_cleanup_free_ char *s = NULL;
	va_list ap;
	int len;

	va_start(ap, fmt);
	len = vasprintf(&s, fmt, ap);
	va_end(ap);
	ck_assert_int_ge(len, 0);
	ck_assert_int_eq(send(f->mon, s, (size_t)len, MSG_NOSIGNAL), len);
}

static void fake_return(struct fake *f, int64_t id, const char *ret)
{
	fake_send(f, "{\"return\": %s, \"id\": %" PRId64 "}\r\n", ret, id);
}

static void fake_error(struct fake *f, int64_t id, const char *desc)
{
	fake_send(f,
		  "{\"id\": %" PRId64
		  ", \"error\": {\"class\": \"GenericError\", \"desc\": \"%s\"}}\r\n",
		  id, desc);
}

static void fake_event(struct fake *f, const char *event, const char *data, int64_t ts)
{
	fake_send(
	    f,
	    "{\"timestamp\": {\"seconds\": %lld, \"microseconds\": %lld}, \"event\": \"%s\"%s%s}"
	    "\r\n",
	    (long long)(ts / 1000000), (long long)(ts % 1000000), event, data ? ", \"data\": " : "",
	    data ? data : "");
}

static void fake_migration(struct fake *f, const char *status)
{
	char data[64];

	snprintf(data, sizeof(data), "{\"status\": \"%s\"}", status);
	fake_event(f, "MIGRATION", data, T_STOP - 1000);
}

static void fake_greet(struct fake *f, const char *version)
{
	int maj, min, mic;
	int64_t id;

	ck_assert_int_eq(sscanf(version, "%d.%d.%d", &maj, &min, &mic), 3);
	fake_send(
	    f,
	    "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": %d, \"minor\": %d, \"major\": %d}, "
	    "\"package\": \"\"}, \"capabilities\": [\"oob\"]}}\r\n",
	    mic, min, maj);
	id = fake_expect(f, "qmp_capabilities");
	fake_return(f, id, "{}");
}

static bool fake_alive(const struct fake *f)
{
	struct pollfd p = { .fd = f->pidfd, .events = POLLIN };

	return poll(&p, 1, 0) == 0;
}

/* Gone, and reaped by the engine: its parent (this process) can no longer
 * wait for it. */
static bool fake_reaped(const struct fake *f)
{
	siginfo_t si = {};

	return waitid(P_PIDFD, (id_t)f->pidfd, &si, WEXITED | WNOHANG | WNOWAIT) < 0 &&
	       errno == ECHILD;
}

static void fake_wait_dead(struct fake *f)
{
	struct pollfd p = { .fd = f->pidfd, .events = POLLIN };

	ck_assert_msg(poll(&p, 1, WAIT_USEC / 1000) == 1, "the %s VMM did not end", f->role);
}

/* As QEMU dies: its monitor connection goes with it. The engine hears of
 * both on its next turn. */
static void fake_kill(struct fake *f)
{
	f->mon = safe_close(f->mon);
	ck_assert_int_eq(pidfd_send_signal(f->pidfd, SIGKILL, NULL, 0), 0);
	fake_wait_dead(f);
}

static void fake_exit(struct fake *f, int status)
{
	char c = (char)status;

	f->mon = safe_close(f->mon);
	ck_assert_int_eq(write(f->ctl, &c, 1), 1);
	fake_wait_dead(f);
}

/* Replies to every id the update could have used, and an event no update
 * is waiting for: nothing of a finished update may react. */
static void fake_stray(struct fake *f)
{
	char s[128];
	int len;

	for (int id = 1; id < 40 && f->mon >= 0; id++) {
		len = snprintf(s, sizeof(s),
			       "{\"return\": {\"status\": \"completed\"}, \"id\": %d}\r\n", id);
		(void)!send(f->mon, s, (size_t)len, MSG_NOSIGNAL);
	}
	if (f->mon >= 0) {
		len = snprintf(s, sizeof(s),
			       "{\"event\": \"MIGRATION\", \"data\": {\"status\": "
			       "\"completed\"}}\r\n");
		(void)!send(f->mon, s, (size_t)len, MSG_NOSIGNAL);
	}
}

static void fake_done(struct fake *f)
{
	f->mon = safe_close(f->mon);
	f->ctl = safe_close(f->ctl);
	f->pidfd = safe_close(f->pidfd);
	close_many(f->fds, f->nfds);
	f->nfds = 0;
	for (char **p = f->argv; p && *p; p++)
		free(*p);
	f->argv = (free(f->argv), NULL);
}

/* ---- the VM and its update ----------------------------------------------- */

/* A VM whose VMM is the relay `old`, running. */
static struct vm *vm_up(struct fake *old)
{
	struct vm_config cfg = {
		.name = strdup(VM_NAME),
		.vmm = strdup(self),
		.kernel = strdup(self), /* opened by cprd: any regular file */
		.machine = strdup("q35"),
		.memory_bytes = 16 << 20,
		.vcpus = 1,
	};
	struct vm *vm;
	int64_t id;

	vm_create(&D, &cfg, NULL);
	vm = vm_find(&D, VM_NAME);
	ck_assert_ptr_nonnull(vm);
	ck_assert_int_eq(vm->state, VM_STARTING);
	fake_attach(old);
	RUN_UNTIL(vm->vmm->pid > 0); /* the launcher's answer */
	ck_assert_int_eq(old->pid, vm->vmm->pid);
	ck_assert(!has_arg(old, "-S", NULL) && !has_arg(old, "-incoming", NULL));
	fake_greet(old, OLD_VERSION);
	/* The alias is pinned to the versioned type of this first VMM. */
	id = fake_expect(old, "query-machines");
	fake_return(old, id,
		    "[{\"name\": \"pc-i440fx-9.2\", \"alias\": \"pc\"},"
		    " {\"name\": \"pc-q35-9.1\"},"
		    " {\"name\": \"pc-q35-9.2\", \"alias\": \"q35\"}]");
	id = fake_expect(old, "query-status");
	fake_return(old, id, "{\"status\": \"running\", \"running\": true}");
	RUN_UNTIL(vm->state == VM_RUNNING);
	ck_assert_str_eq(vm->cfg.machine, "pc-q35-9.2");
	ck_assert_str_eq(vm->cfg.machine_alias, "q35");
	ck_assert_uint_eq(memstore_count(D.store, VM_NAME), 2); /* ram0, console */
	return vm;
}

static void start(struct vm *vm, const char *strategy, double timeout)
{
	update_start(vm, strategy_find(strategy), self, timeout, NULL);
	ck_assert_ptr_nonnull(update_of(vm));
}

static enum phase phase(struct vm *vm)
{
	ck_assert_ptr_nonnull(update_of(vm));
	return update_of(vm)->phase;
}

/* Sleep past the update's deadline without running the loop: whatever a
 * VMM writes meanwhile stays unread until the timer has fired. */
static void sleep_past_deadline(struct vm *vm)
{
	double left = ev_timer_remaining(D.loop, &update_of(vm)->timer);

	ck_assert(ev_is_active(&update_of(vm)->timer));
	usleep((useconds_t)((left + 0.1) * 1e6));
}

/* The update's report, as history has it: there is exactly one. */
static json_object *the_report(struct vm *vm)
{
	_cleanup_json_ json_object *h = update_history(vm);

	ck_assert_int_eq(json_object_array_length(h), 1);
	ck_assert_uint_eq(vm->updates, 1);
	return json_object_get(json_object_array_get_idx(h, 0));
}

static const char *rstr(json_object *r, const char *key)
{
	json_object *x = json_object_object_get(r, key);

	return x ? json_object_get_string(x) : "(null)";
}

static void check_report(json_object *r, const char *strategy, const char *result, const char *ph)
{
	ck_assert_str_eq(rstr(r, "vm"), VM_NAME);
	ck_assert_str_eq(rstr(r, "strategy"), strategy);
	ck_assert_msg(streq(rstr(r, "result"), result), "result %s, not %s: %s", rstr(r, "result"),
		      result, json_object_to_json_string_ext(r, PLAIN));
	ck_assert_msg(streq(rstr(r, "phase"), ph), "phase %s, not %s: %s", rstr(r, "phase"), ph,
		      json_object_to_json_string_ext(r, PLAIN));
	ck_assert_str_eq(rstr(r, "old_version"), OLD_VERSION);
	ck_assert_str_eq(rstr(r, "old_vmm"), self);
	ck_assert_str_eq(rstr(r, "new_vmm"), self);
	ck_assert_int_gt(json_object_get_double(json_object_object_get(r, "total_ms")), 0);
}

static void check_blackout(json_object *r, const char *expected)
{
	json_object *b = json_object_object_get(r, "blackout_ms");

	if (!expected) {
		ck_assert_msg(!b, "blackout_ms should be unknown: %s",
			      json_object_to_json_string_ext(r, PLAIN));
		return;
	}
	ck_assert_ptr_nonnull(b);
	ck_assert_str_eq(json_object_get_string(b), expected);
}

static void check_error(json_object *r, const char *part)
{
	ck_assert_msg(strstr(rstr(r, "error"), part), "error '%s' does not say '%s'",
		      rstr(r, "error"), part);
}

/* The update is over and what it held is let go of: its memory goes on the
 * loop's next turn. */
static void run_to_end(struct vm *vm)
{
	RUN_UNTIL(!update_of(vm));
	turns(2);
}

/* The VM is crashed with its memory still held. */
static void check_crashed_memory_held(struct vm *vm)
{
	const memstore_entry *e;

	ck_assert_int_eq(vm->state, VM_CRASHED);
	ck_assert_ptr_null(vm->vmm);
	ck_assert_uint_eq(memstore_count(D.store, VM_NAME), 2);
	ck_assert_int_eq(memstore_get(D.store, VM_NAME, "ram0", &e), 0);
	ck_assert_int_ge(fcntl(e->fd, F_GETFD), 0);
}

static const char *dir_entries(const char *path)
{
	static char names[1024];
	struct dirent *e;
	DIR *d = opendir(path);

	names[0] = '\0';
	while (d && (e = readdir(d)))
		if (e->d_name[0] != '.')
			snprintf(names + strlen(names), sizeof(names) - strlen(names), "%s ",
				 e->d_name);
	if (d)
		closedir(d);
	return names;
}

/* Destroy the VM, and check that nothing is left: no VMM object, every
 * relay the engine started reaped by it, custody released, no file in the
 * VM's directory, and exactly the fds this process had before the test. */
static void finish(struct vm *vm, struct fake *const *fakes, size_t n)
{
	char path[PATH_MAX + 16];

	if (vm) {
		struct fake *cur = NULL;

		for (size_t i = 0; i < n; i++)
			if (vmm_alive(vm->vmm) && fakes[i]->pid == vm->vmm->pid)
				cur = fakes[i];
		vm_destroy(vm, NULL);
		if (cur) {
			fake_wait_dead(cur); /* SIGTERM */
			cur->mon = safe_close(cur->mon);
		}
		RUN_UNTIL(!vm_find(&D, VM_NAME));
	}
	RUN_UNTIL(!D.vmms);
	for (size_t i = 0; i < n; i++) {
		if (fakes[i]->pidfd >= 0)
			ck_assert_msg(fake_reaped(fakes[i]), "the %s VMM (pid %d) was not reaped",
				      fakes[i]->role, (int)fakes[i]->pid);
		fake_done(fakes[i]);
	}
	ck_assert_uint_eq(memstore_count(D.store, NULL), 0);
	snprintf(path, sizeof(path), "%s/vms/" VM_NAME, dir);
	ck_assert_msg(access(path, F_OK) < 0, "the VM's directory is left, with: %s",
		      dir_entries(path));
	turns(2);
	ck_assert_int_eq(count_fds(), fd_baseline);
}

#define FINISH(vm, ...)                                     \
	do {                                                \
		struct fake *const fk_[] = { __VA_ARGS__ }; \
		finish((vm), fk_, ELEMENTSOF(fk_));         \
	} while (0)

/* ---- handover, step by step ---------------------------------------------- */

/* What the old VMM is asked while the new one starts. */
struct old_prep {
	int64_t caps, params, getfd, set;
	int fd; /* its end of the migration channel, as it received it */
};

/* Read the old VMM's preparation and answer its capabilities (return-path
 * was left on by someone: it must be turned off). Answers the rest if
 * answer_all. */
static void handover_prepare_old(struct fake *old, struct old_prep *p, bool answer_all)
{
	char a[512];

	p->caps = fake_expect(old, "query-migrate-capabilities");
	p->params = fake_expect_args(old, "migrate-set-parameters", a, sizeof(a));
	ck_assert_str_eq(a, "{\"mode\":\"normal\"}");
	p->getfd = fake_expect_args(old, "getfd", a, sizeof(a));
	ck_assert_str_eq(a, "{\"fdname\":\"cprd-mig\"}");
	p->fd = fake_take_fd(old);
	fake_return(old, p->caps,
		    "[{\"capability\": \"xbzrle\", \"state\": false}, "
		    "{\"capability\": \"return-path\", \"state\": true}, "
		    "{\"capability\": \"events\", \"state\": false}]");
	p->set = fake_expect_args(old, "migrate-set-capabilities", a, sizeof(a));
	ck_assert_str_eq(a,
			 "{\"capabilities\":[{\"capability\":\"x-ignore-shared\",\"state\":true},"
			 "{\"capability\":\"events\",\"state\":true},"
			 "{\"capability\":\"return-path\",\"state\":false}]}");
	if (!answer_all)
		return;
	fake_return(old, p->params, "{}");
	fake_return(old, p->getfd, "{}");
	fake_return(old, p->set, "{}");
}

struct new_prep {
	int64_t caps, getfd, warm;
	int fd;
};

/* The new VMM reports in: started paused, for an incoming migration. */
static void handover_attach_new(struct vm *vm, struct fake *nw)
{
	fake_attach(nw);
	ck_assert_int_eq(phase(vm), PHASE_LAUNCH);
	RUN_UNTIL(update_of(vm)->next->pid > 0);
	ck_assert_int_eq(nw->pid, update_of(vm)->next->pid);
	ck_assert(has_arg(nw, "-S", NULL));
	ck_assert(has_arg(nw, "-global", "migration.x-events=on"));
	ck_assert(has_arg(nw, "-incoming", "defer"));
}

/* Its monitor answers; read its preparation, answered if answer_all. */
static void handover_prepare_new(struct vm *vm, struct fake *nw, struct new_prep *p,
				 bool answer_all)
{
	char a[256];

	fake_greet(nw, NEW_VERSION);
	p->caps = fake_expect_args(nw, "migrate-set-capabilities", a, sizeof(a));
	ck_assert_str_eq(
	    a, "{\"capabilities\":[{\"capability\":\"x-ignore-shared\",\"state\":true}]}");
	ck_assert_int_eq(phase(vm), PHASE_PREPARE);
	p->getfd = fake_expect_args(nw, "getfd", a, sizeof(a));
	ck_assert_str_eq(a, "{\"fdname\":\"cprd-mig\"}");
	p->fd = fake_take_fd(nw);
	p->warm = fake_expect(nw, "qom-list-types");
	if (!answer_all)
		return;
	fake_return(nw, p->caps, "{}");
	fake_return(nw, p->getfd, "{}");
	fake_return(nw, p->warm, "[{\"name\": \"pc-q35-9.2-machine\"}]");
}

/* The two channel ends are one socketpair: what the old VMM writes, the
 * new one reads. */
static void check_channel(int old_fd, int new_fd)
{
	char c = 0;

	ck_assert_int_eq(write(old_fd, "x", 1), 1);
	ck_assert_int_eq(read(new_fd, &c, 1), 1);
	ck_assert_int_eq(c, 'x');
}

/* Both prepared: migrate-incoming on the new VMM, then migrate on the old. */
static void handover_migrate(struct vm *vm, struct fake *old, struct fake *nw)
{
	char a[128];
	int64_t id;

	id = fake_expect_args(nw, "migrate-incoming", a, sizeof(a));
	ck_assert_str_eq(a, "{\"uri\":\"fd:cprd-mig\"}");
	fake_return(nw, id, "{}");
	id = fake_expect_args(old, "migrate", a, sizeof(a));
	ck_assert_str_eq(a, "{\"uri\":\"fd:cprd-mig\"}");
	ck_assert_int_eq(phase(vm), PHASE_MIGRATE);
	fake_return(old, id, "{}");
}

/* From the start to both VMMs migrating; the guest still runs. */
static void handover_to_migrate(struct vm *vm, struct fake *old, struct fake *nw, double timeout)
{
	struct old_prep op;
	struct new_prep np;

	start(vm, "handover", timeout);
	handover_attach_new(vm, nw);
	handover_prepare_old(old, &op, true);
	handover_prepare_new(vm, nw, &np, true);
	check_channel(op.fd, np.fd);
	close(op.fd);
	close(np.fd);
	handover_migrate(vm, old, nw);
}

/* The old VMM pauses the guest and sends its last pass. */
static void old_pauses(struct vm *vm, struct fake *old)
{
	fake_migration(old, "active");
	fake_event(old, "STOP", NULL, T_STOP);
	fake_migration(old, "device");
	RUN_UNTIL(vm->state == VM_PAUSED);
}

/* The rollback on the old VMM, once the new one is gone: migrate_cancel,
 * the channel's fd closed (handover), its state asked, and `cont` if the
 * guest is paused ("finish-migrate" refuses the first one). */
static void old_rolls_back(struct vm *vm, struct fake *old, bool handover, bool paused)
{
	int64_t id;

	id = fake_expect(old, "migrate_cancel");
	fake_return(old, id, "{}");
	if (handover) {
		id = fake_expect(old, "closefd");
		fake_return(old, id, "{}");
	}
	id = fake_expect(old, "query-status");
	ck_assert_int_eq(phase(vm), PHASE_ROLLBACK);
	if (!paused) {
		fake_return(old, id, "{\"status\": \"running\", \"running\": true}");
		run_to_end(vm);
		return;
	}
	fake_return(old, id, "{\"status\": \"finish-migrate\", \"running\": false}");
	id = fake_expect(old, "cont");
	fake_error(old, id, "Migration is not finalized yet");
	id = fake_expect(old, "cont");
	/* QEMU announces RESUME before it answers cont. */
	fake_event(old, "RESUME", NULL, T_OLD_RESUME);
	fake_return(old, id, "{}");
	run_to_end(vm);
	ck_assert_int_eq(vm->state, VM_RUNNING);
}

/* ---- 1. the whole update ------------------------------------------------- */

START_TEST(handover_ok_commands_in_order_cont_after_completed_then_old_stats_and_sigkill)
{
	struct fake old = FAKE("old"), nw = FAKE("new");
	struct vm *vm = vm_up(&old);
	_cleanup_json_ json_object *r = NULL, *reg = NULL;
	char why[256], next_sock[PATH_MAX + 32];
	json_object *rec;
	int64_t id, stats;

	handover_to_migrate(vm, &old, &nw, NO_DEADLINE);
	old_pauses(vm, &old);
	fake_migration(&old, "completed");
	stats = fake_expect(&old, "query-migrate"); /* the byte count, asked early */
	fake_migration(&nw, "active");
	/* The state is not all there yet: the new VMM must not run. */
	fake_quiet(&nw);
	ck_assert_int_eq(phase(vm), PHASE_MIGRATE);
	fake_migration(&nw, "completed");
	id = fake_expect(&nw, "cont");
	ck_assert_int_eq(phase(vm), PHASE_COMMIT);
	fake_event(&nw, "RESUME", NULL, T_RESUME);
	fake_return(&nw, id, "{}");
	RUN_UNTIL(phase(vm) == PHASE_END_OLD);
	ck_assert_int_eq(vm->vmm->pid, nw.pid);
	ck_assert_int_eq(vm->state, VM_RUNNING);
	/* SIGKILL waits for the byte count. */
	turns(5);
	ck_assert(fake_alive(&old));
	fake_return(
	    &old, stats,
	    "{\"status\": \"completed\", \"ram\": {\"transferred\": 123456, \"total\": 1}}");
	RUN_UNTIL(!fake_alive(&old));
	old.mon = safe_close(old.mon);
	run_to_end(vm);

	ck_assert_str_eq(old.seen,
			 "qmp_capabilities,query-machines,query-status,query-migrate-capabilities,"
			 "migrate-set-parameters,getfd,migrate-set-capabilities,migrate,"
			 "query-migrate");
	ck_assert_str_eq(nw.seen, "qmp_capabilities,migrate-set-capabilities,getfd,qom-list-types,"
				  "migrate-incoming,cont");
	r = the_report(vm);
	check_report(r, "handover", "ok", "end-old");
	check_blackout(r, "4.250");
	ck_assert_int_eq(json_object_get_int(json_object_object_get(r, "old_pid")), old.pid);
	ck_assert_int_eq(json_object_get_int(json_object_object_get(r, "new_pid")), nw.pid);
	ck_assert_str_eq(rstr(r, "new_version"), NEW_VERSION);
	ck_assert_int_eq(json_object_get_int64(json_object_object_get(r, "bytes_transferred")),
			 123456);
	ck_assert(!json_object_object_get(r, "error"));
	ck_assert(fake_reaped(&old));
	ck_assert(fake_alive(&nw));

	/* The guest runs in the new VMM, which the VM now owns, on the VM's
	 * well-known monitor path; the registry names it. */
	ck_assert_int_eq(vm->state, VM_RUNNING);
	ck_assert_int_eq(vm->vmm->pid, nw.pid);
	ck_assert_str_eq(vm->vmm->qmp_path, vm->qmp_path);
	ck_assert_str_eq(vm->vmm->version, NEW_VERSION);
	snprintf(next_sock, sizeof(next_sock), "%s/qmp-next.sock", vm->dir);
	ck_assert_int_eq(access(next_sock, F_OK), -1);
	ck_assert_int_eq(access(vm->qmp_path, F_OK), 0);
	ck_assert_int_eq(registry_read(&D.registry, &reg, why, sizeof(why)), 0);
	rec = json_object_array_get_idx(json_object_object_get(reg, "vms"), 0);
	ck_assert_int_eq(json_object_get_int(json_object_object_get(rec, "pid")), nw.pid);
	ck_assert(!json_object_object_get(rec, "update"));
	ck_assert_str_eq(rstr(rec, "state"), "running");

	fake_quiet(&nw);
	FINISH(vm, &old, &nw);
}
END_TEST

/* ---- 2. the old VMM exits while the new one is prepared ------------------ */

/* Nothing of a finished update reacts to what either VMM still says. */
static void check_ended_for_good(struct vm *vm, struct fake *old, struct fake *nw,
				 enum vm_state state)
{
	fake_stray(old);
	fake_stray(nw);
	turns(5);
	ck_assert_ptr_null(update_of(vm));
	ck_assert_int_eq(vm->state, state);
	ck_assert_uint_eq(vm->updates, 1);
	json_object_put(the_report(vm));
}

START_TEST(handover_old_exit_while_new_vmm_starts_fails_vm_crashed_memory_held_new_killed)
{
	struct fake old = FAKE("old"), nw = FAKE("new");
	struct vm *vm = vm_up(&old);
	_cleanup_json_ json_object *r = NULL;

	start(vm, "handover", NO_DEADLINE);
	handover_attach_new(vm, &nw);
	/* The old VMM's preparation is on its monitor, unanswered, and the
	 * new VMM's monitor has not answered yet. */
	fake_expect(&old, "query-migrate-capabilities");
	fake_expect(&old, "migrate-set-parameters");
	fake_expect(&old, "getfd");
	close(fake_take_fd(&old));
	fake_kill(&old);
	run_to_end(vm);

	r = the_report(vm);
	check_report(r, "handover", "failed", "launch");
	check_blackout(r, NULL);
	check_crashed_memory_held(vm);
	RUN_UNTIL(fake_reaped(&nw));
	ck_assert_str_eq(nw.seen, "");
	check_ended_for_good(vm, &old, &nw, VM_CRASHED);
	FINISH(vm, &old, &nw);
}
END_TEST

START_TEST(handover_old_exit_while_new_vmm_prepares_fails_vm_crashed_memory_held_new_killed)
{
	struct fake old = FAKE("old"), nw = FAKE("new");
	struct vm *vm = vm_up(&old);
	_cleanup_json_ json_object *r = NULL;
	struct old_prep op;
	struct new_prep np;

	start(vm, "handover", NO_DEADLINE);
	handover_attach_new(vm, &nw);
	handover_prepare_old(&old, &op, true);
	/* The new VMM's preparation is waiting for its answers. */
	handover_prepare_new(vm, &nw, &np, false);
	close(op.fd);
	close(np.fd);
	turns(3);
	fake_kill(&old);
	run_to_end(vm);

	r = the_report(vm);
	check_report(r, "handover", "failed", "prepare");
	check_error(r, "the old VMM killed by signal KILL while preparing both VMMs");
	check_blackout(r, NULL);
	check_crashed_memory_held(vm);
	RUN_UNTIL(fake_reaped(&nw));
	ck_assert_str_eq(nw.seen, "qmp_capabilities,migrate-set-capabilities,getfd,qom-list-types");
	check_ended_for_good(vm, &old, &nw, VM_CRASHED);
	FINISH(vm, &old, &nw);
}
END_TEST

/* ---- 3. the new VMM exits before the commit: rollback -------------------- */

START_TEST(handover_new_exit_while_starting_rolls_back_naming_phase_and_its_log)
{
	struct fake old = FAKE("old"), nw = FAKE("new");
	struct vm *vm = vm_up(&old);
	_cleanup_json_ json_object *r = NULL;
	struct old_prep op;

	start(vm, "handover", NO_DEADLINE);
	handover_attach_new(vm, &nw);
	handover_prepare_old(&old, &op, true);
	close(op.fd);
	turns(3);
	fake_exit(&nw, 1);
	old_rolls_back(vm, &old, true, false);

	r = the_report(vm);
	check_report(r, "handover", "rolled-back", "launch");
	check_error(r, "the new VMM exited with status 1 while starting the new VMM; VMM log: "
		       "relay: told to exit with status 1");
	check_blackout(r, "0.000"); /* the guest never paused */
	ck_assert(fake_reaped(&nw));
	ck_assert_int_eq(vm->state, VM_RUNNING);
	ck_assert_int_eq(vm->vmm->pid, old.pid);
	ck_assert_str_eq(old.seen,
			 "qmp_capabilities,query-machines,query-status,query-migrate-capabilities,"
			 "migrate-set-parameters,getfd,migrate-set-capabilities,"
			 "migrate_cancel,closefd,query-status");
	check_ended_for_good(vm, &old, &nw, VM_RUNNING);
	fake_quiet(&old);
	FINISH(vm, &old, &nw);
}
END_TEST

START_TEST(handover_new_exit_while_preparing_rolls_back_naming_phase)
{
	struct fake old = FAKE("old"), nw = FAKE("new");
	struct vm *vm = vm_up(&old);
	_cleanup_json_ json_object *r = NULL;
	struct old_prep op;
	struct new_prep np;

	start(vm, "handover", NO_DEADLINE);
	handover_attach_new(vm, &nw);
	/* The old VMM has not answered getfd: the new one, all answered, waits. */
	handover_prepare_old(&old, &op, false);
	fake_return(&old, op.params, "{}");
	fake_return(&old, op.set, "{}");
	handover_prepare_new(vm, &nw, &np, true);
	fake_quiet(&nw);
	ck_assert_int_eq(phase(vm), PHASE_PREPARE);
	fake_kill(&nw);
	old_rolls_back(vm, &old, true, false);
	fake_return(&old, op.getfd, "{}"); /* too late: nobody listens */

	r = the_report(vm);
	check_report(r, "handover", "rolled-back", "prepare");
	check_error(r, "the new VMM killed by signal KILL while preparing both VMMs");
	check_blackout(r, "0.000");
	ck_assert(fake_reaped(&nw));
	ck_assert_int_eq(vm->vmm->pid, old.pid);
	close(op.fd);
	close(np.fd);
	check_ended_for_good(vm, &old, &nw, VM_RUNNING);
	FINISH(vm, &old, &nw);
}
END_TEST

/* Rolling back, the old VMM dies before it said its state: the guest went
 * with it. */
START_TEST(handover_old_exit_during_rollback_fails_vm_crashed_memory_held)
{
	struct fake old = FAKE("old"), nw = FAKE("new");
	struct vm *vm = vm_up(&old);
	_cleanup_json_ json_object *r = NULL;
	struct old_prep op;

	start(vm, "handover", NO_DEADLINE);
	handover_attach_new(vm, &nw);
	handover_prepare_old(&old, &op, true);
	close(op.fd);
	turns(3);
	fake_kill(&nw);
	fake_expect(&old, "migrate_cancel");
	fake_expect(&old, "closefd");
	fake_expect(&old, "query-status");
	ck_assert_int_eq(phase(vm), PHASE_ROLLBACK);
	fake_kill(&old);
	run_to_end(vm);

	r = the_report(vm);
	check_report(r, "handover", "failed", "launch");
	check_error(r, "the new VMM killed by signal KILL while starting the new VMM");
	check_blackout(r, NULL);
	check_crashed_memory_held(vm);
	ck_assert(fake_reaped(&old) && fake_reaped(&nw));
	check_ended_for_good(vm, &old, &nw, VM_CRASHED);
	FINISH(vm, &old, &nw);
}
END_TEST

START_TEST(handover_new_exit_while_migrating_rolls_back_and_conts_paused_old)
{
	struct fake old = FAKE("old"), nw = FAKE("new");
	struct vm *vm = vm_up(&old);
	_cleanup_json_ json_object *r = NULL;

	handover_to_migrate(vm, &old, &nw, NO_DEADLINE);
	old_pauses(vm, &old);
	fake_migration(&nw, "active");
	turns(3);
	fake_kill(&nw);
	old_rolls_back(vm, &old, true, true);

	r = the_report(vm);
	check_report(r, "handover", "rolled-back", "migrate");
	check_error(r, "the new VMM killed by signal KILL while moving device state");
	check_blackout(r, "30.500"); /* STOP to the old VMM's RESUME */
	ck_assert(fake_reaped(&nw));
	ck_assert_int_eq(vm->vmm->pid, old.pid);
	ck_assert_str_eq(old.seen,
			 "qmp_capabilities,query-machines,query-status,query-migrate-capabilities,"
			 "migrate-set-parameters,getfd,migrate-set-capabilities,migrate,"
			 "migrate_cancel,closefd,query-status,cont,cont");
	ck_assert_str_eq(nw.seen, "qmp_capabilities,migrate-set-capabilities,getfd,qom-list-types,"
				  "migrate-incoming");
	FINISH(vm, &old, &nw);
}
END_TEST

/* No new VMM ever runs: the old one, told to prepare, is only rolled back.
 * Its preparation is read, unanswered. */
static void old_prepared_then_rolled_back(struct vm *vm, struct fake *old)
{
	fake_expect(old, "query-migrate-capabilities");
	fake_expect(old, "migrate-set-parameters");
	fake_expect(old, "getfd");
	close(fake_take_fd(old));
	RUN_UNTIL(phase(vm) == PHASE_ROLLBACK);
	old_rolls_back(vm, old, true, false);
}

static void check_never_started(json_object *r, const char *error)
{
	ck_assert_str_eq(rstr(r, "result"), "rolled-back");
	ck_assert_str_eq(rstr(r, "phase"), "launch");
	check_error(r, error);
	check_blackout(r, "0.000");
	ck_assert(!json_object_object_get(r, "new_pid"));
	ck_assert(!json_object_object_get(r, "new_version"));
	ck_assert_int_eq(poll(&(struct pollfd){ .fd = relay_listen, .events = POLLIN }, 1, 0), 0);
}

/* The launcher answers that the exec failed: the failed child is reaped,
 * and the update rolls back saying why. */
START_TEST(handover_new_vmm_that_cannot_be_executed_rolls_back)
{
	struct fake old = FAKE("old");
	struct vm *vm = vm_up(&old);
	_cleanup_json_ json_object *r = NULL;
	char bad[PATH_MAX + 16];
	int fd;

	snprintf(bad, sizeof(bad), "%s/not-a-vmm", dir);
	fd = open(bad, O_WRONLY | O_CREAT | O_CLOEXEC, 0755);
	ck_assert_int_eq(write(fd, "not a program\n", 14), 14);
	close(fd);
	update_start(vm, strategy_find("handover"), bad, NO_DEADLINE, NULL);
	old_prepared_then_rolled_back(vm, &old);

	r = the_report(vm);
	check_never_started(r, "cannot start the new VMM");
	check_error(r, strerror(ENOEXEC));
	ck_assert_str_eq(rstr(r, "new_vmm"), bad);
	ck_assert_int_eq(vm->vmm->pid, old.pid);
	FINISH(vm, &old);
}
END_TEST

/* The launcher dies with the new VMM's start in flight (stopped, then
 * killed, so that it never answers): the start fails from the loop. */
START_TEST(handover_launcher_gone_with_the_new_vmm_start_in_flight_rolls_back)
{
	struct fake old = FAKE("old");
	struct vm *vm = vm_up(&old);
	_cleanup_json_ json_object *r = NULL;

	ck_assert_int_eq(kill(D.launcher.pid, SIGSTOP), 0);
	start(vm, "handover", NO_DEADLINE);
	ck_assert_uint_eq(launcher_in_flight(&D.launcher), 1);
	ck_assert_int_eq(phase(vm), PHASE_LAUNCH);
	ck_assert_int_eq(kill(D.launcher.pid, SIGKILL), 0);
	old_prepared_then_rolled_back(vm, &old);

	r = the_report(vm);
	check_never_started(r, "cprd's VMM launcher has exited");
	ck_assert(D.launcher.gone && D.launcher.sock < 0);
	ck_assert_int_eq(vm->vmm->pid, old.pid);
	fd_baseline--; /* the launcher's socket, closed once it was lost */
	FINISH(vm, &old);
}
END_TEST

/* Known gone already: the start fails at once, inside update_start(). */
START_TEST(handover_launcher_gone_before_the_update_rolls_back_at_once)
{
	struct fake old = FAKE("old");
	struct vm *vm = vm_up(&old);
	_cleanup_json_ json_object *r = NULL;

	ck_assert_int_eq(kill(D.launcher.pid, SIGKILL), 0);
	RUN_UNTIL(D.launcher.gone);
	start(vm, "handover", NO_DEADLINE);
	ck_assert_int_eq(phase(vm), PHASE_ROLLBACK);
	old_rolls_back(vm, &old, true, false);

	r = the_report(vm);
	check_never_started(r, "cprd's VMM launcher has exited");
	ck_assert_str_eq(
	    old.seen,
	    "qmp_capabilities,query-machines,query-status,migrate_cancel,closefd,query-status");
	fd_baseline--; /* the launcher's socket, closed once it was lost */
	FINISH(vm, &old);
}
END_TEST

/* ---- 4, 5. the deadline -------------------------------------------------- */

/* cprd stopped past the deadline while the new VMM completed: the event
 * waits unread when the timer fires, and must be read first. */
START_TEST(handover_deadline_with_completed_event_unread_commits_never_rolls_back)
{
	struct fake old = FAKE("old"), nw = FAKE("new");
	struct vm *vm = vm_up(&old);
	_cleanup_json_ json_object *r = NULL;
	int64_t id;

	handover_to_migrate(vm, &old, &nw, DEADLINE);
	old_pauses(vm, &old);
	fake_migration(&nw, "active");
	fake_quiet(&nw);
	fake_migration(&nw, "completed");
	sleep_past_deadline(vm);
	turn(); /* the deadline and the event, in one turn */
	ck_assert_int_eq(phase(vm), PHASE_COMMIT);
	id = fake_expect(&nw, "cont");
	fake_event(&nw, "RESUME", NULL, T_RESUME);
	fake_return(&nw, id, "{}");
	/* The old VMM never said it completed: its byte count is asked now. */
	id = fake_expect(&old, "query-migrate");
	ck_assert_int_eq(phase(vm), PHASE_END_OLD);
	fake_return(&old, id, "{\"status\": \"completed\", \"ram\": {\"transferred\": 42}}");
	RUN_UNTIL(!fake_alive(&old));
	old.mon = safe_close(old.mon);
	run_to_end(vm);

	r = the_report(vm);
	check_report(r, "handover", "ok", "end-old");
	check_blackout(r, "4.250");
	ck_assert_int_eq(json_object_get_int64(json_object_object_get(r, "bytes_transferred")), 42);
	ck_assert_str_eq(old.seen,
			 "qmp_capabilities,query-machines,query-status,query-migrate-capabilities,"
			 "migrate-set-parameters,getfd,migrate-set-capabilities,migrate,"
			 "query-migrate");
	ck_assert(fake_reaped(&old));
	ck_assert_int_eq(vm->vmm->pid, nw.pid);
	ck_assert_int_eq(vm->state, VM_RUNNING);
	FINISH(vm, &old, &nw);
}
END_TEST

START_TEST(handover_deadline_with_nothing_unread_rolls_back_and_kills_new)
{
	struct fake old = FAKE("old"), nw = FAKE("new");
	struct vm *vm = vm_up(&old);
	_cleanup_json_ json_object *r = NULL;

	handover_to_migrate(vm, &old, &nw, DEADLINE);
	old_pauses(vm, &old);
	fake_migration(&nw, "active");
	fake_quiet(&nw);
	sleep_past_deadline(vm);
	turn();
	ck_assert_int_eq(phase(vm), PHASE_ROLLBACK);
	RUN_UNTIL(fake_reaped(&nw));
	old_rolls_back(vm, &old, true, true);

	r = the_report(vm);
	check_report(r, "handover", "rolled-back", "migrate");
	check_error(r, "timed out while moving device state");
	check_blackout(r, "30.500");
	ck_assert_str_eq(nw.seen, "qmp_capabilities,migrate-set-capabilities,getfd,qom-list-types,"
				  "migrate-incoming");
	ck_assert_int_eq(vm->vmm->pid, old.pid);
	FINISH(vm, &old, &nw);
}
END_TEST

/* ---- 6. a reply on the new VMM's own monitor ends it --------------------- */

/* The refusal comes with more behind it in the same read: the new VMM is
 * let go of from inside its own dispatch, which must read on safely and
 * pass nothing more to anyone (not even a RESUME). */
START_TEST(handover_refused_migrate_incoming_rolls_back_from_inside_new_vmm_dispatch)
{
	struct fake old = FAKE("old"), nw = FAKE("new");
	struct vm *vm = vm_up(&old);
	_cleanup_json_ json_object *r = NULL;
	struct old_prep op;
	struct new_prep np;
	int64_t id;

	start(vm, "handover", NO_DEADLINE);
	handover_attach_new(vm, &nw);
	handover_prepare_old(&old, &op, true);
	handover_prepare_new(vm, &nw, &np, true);
	id = fake_expect(&nw, "migrate-incoming");
	fake_send(
	    &nw,
	    "{\"id\": %" PRId64 ", \"error\": {\"class\": \"GenericError\", \"desc\": "
	    "\"Invalid URI\"}}\r\n"
	    "{\"event\": \"MIGRATION\", \"data\": {\"status\": \"failed\"}, \"timestamp\": "
	    "{\"seconds\": 1, \"microseconds\": 0}}\r\n"
	    "{\"return\": {}, \"id\": %" PRId64 "}\r\n"
	    "{\"event\": \"RESUME\", \"timestamp\": {\"seconds\": 2, \"microseconds\": 0}}\r\n",
	    id, id + 1);
	old_rolls_back(vm, &old, true, false);

	r = the_report(vm);
	check_report(r, "handover", "rolled-back", "prepare");
	check_error(r, "the new VMM refused the incoming migration: Invalid URI");
	check_blackout(r, "0.000");
	RUN_UNTIL(fake_reaped(&nw));
	ck_assert_int_eq(vm->vmm->pid, old.pid);
	ck_assert_str_eq(old.seen,
			 "qmp_capabilities,query-machines,query-status,query-migrate-capabilities,"
			 "migrate-set-parameters,getfd,migrate-set-capabilities,"
			 "migrate_cancel,closefd,query-status");
	close(op.fd);
	close(np.fd);
	check_ended_for_good(vm, &old, &nw, VM_RUNNING);
	FINISH(vm, &old, &nw);
}
END_TEST

START_TEST(handover_refused_prepare_on_new_vmm_rolls_back_from_inside_its_dispatch)
{
	struct fake old = FAKE("old"), nw = FAKE("new");
	struct vm *vm = vm_up(&old);
	_cleanup_json_ json_object *r = NULL;
	struct old_prep op;
	struct new_prep np;

	start(vm, "handover", NO_DEADLINE);
	handover_attach_new(vm, &nw);
	handover_prepare_old(&old, &op, true);
	handover_prepare_new(vm, &nw, &np, false);
	fake_send(&nw,
		  "{\"id\": %" PRId64 ", \"error\": {\"class\": \"GenericError\", \"desc\": "
		  "\"Capability 'x-ignore-shared' is unknown\"}}\r\n"
		  "{\"return\": {}, \"id\": %" PRId64 "}\r\n{\"return\": [], \"id\": %" PRId64
		  "}\r\n",
		  np.caps, np.getfd, np.warm);
	old_rolls_back(vm, &old, true, false);

	r = the_report(vm);
	check_report(r, "handover", "rolled-back", "prepare");
	check_error(r, "preparing the new VMM failed: Capability 'x-ignore-shared' is unknown");
	RUN_UNTIL(fake_reaped(&nw));
	close(op.fd);
	close(np.fd);
	check_ended_for_good(vm, &old, &nw, VM_RUNNING);
	FINISH(vm, &old, &nw);
}
END_TEST

/* ---- 7. after the commit ------------------------------------------------- */

/* To the commit: the old VMM paused and completed (its byte count asked,
 * unanswered), the new VMM completed and was told `cont`, unanswered. */
static int64_t handover_to_commit(struct vm *vm, struct fake *old, struct fake *nw,
				  int64_t *ret_stats)
{
	handover_to_migrate(vm, old, nw, NO_DEADLINE);
	old_pauses(vm, old);
	fake_migration(old, "completed");
	*ret_stats = fake_expect(old, "query-migrate");
	fake_migration(nw, "completed");
	return fake_expect(nw, "cont");
}

START_TEST(handover_committed_new_exit_without_resume_rolls_back)
{
	struct fake old = FAKE("old"), nw = FAKE("new");
	struct vm *vm = vm_up(&old);
	_cleanup_json_ json_object *r = NULL;
	int64_t stats;

	handover_to_commit(vm, &old, &nw, &stats);
	ck_assert_int_eq(phase(vm), PHASE_COMMIT);
	fake_kill(&nw);
	old_rolls_back(vm, &old, true, true);
	fake_return(&old, stats, "{\"status\": \"completed\"}"); /* nobody listens */

	r = the_report(vm);
	check_report(r, "handover", "rolled-back", "commit");
	/* Its exit, not the cont its closed monitor left unanswered, says why. */
	check_error(r, "the new VMM killed by signal KILL while waiting for the new VMM to run the "
		       "guest");
	check_blackout(r, "30.500");
	ck_assert(fake_reaped(&nw));
	ck_assert_int_eq(vm->vmm->pid, old.pid);
	ck_assert_int_eq(vm->state, VM_RUNNING);
	check_ended_for_good(vm, &old, &nw, VM_RUNNING);
	FINISH(vm, &old, &nw);
}
END_TEST

/* Its RESUME was written before it died: the guest ran there, so the old
 * VMM must never run it again. The update is over (the guest moved; the
 * old VMM is ended as usual), and the VM crashed after it. */
START_TEST(handover_committed_new_exit_right_after_resume_keeps_switch_never_conts_old)
{
	struct fake old = FAKE("old"), nw = FAKE("new");
	struct vm *vm = vm_up(&old);
	_cleanup_json_ json_object *r = NULL;
	char next_sock[PATH_MAX + 32];
	int64_t stats;

	handover_to_commit(vm, &old, &nw, &stats);
	fake_event(&nw, "RESUME", NULL, T_RESUME);
	fake_kill(&nw);
	RUN_UNTIL(vm->state == VM_CRASHED);
	ck_assert_int_eq(phase(vm), PHASE_END_OLD);
	check_crashed_memory_held(vm);
	fake_return(&old, stats, "{\"status\": \"completed\", \"ram\": {\"transferred\": 7}}");
	RUN_UNTIL(!fake_alive(&old));
	old.mon = safe_close(old.mon);
	run_to_end(vm);

	r = the_report(vm);
	check_report(r, "handover", "ok", "end-old");
	ck_assert(!strstr(rstr(r, "error"), "old VMM"));
	check_blackout(r, "4.250");
	check_crashed_memory_held(vm);
	ck_assert(fake_reaped(&old));
	ck_assert_str_eq(old.seen,
			 "qmp_capabilities,query-machines,query-status,query-migrate-capabilities,"
			 "migrate-set-parameters,getfd,migrate-set-capabilities,migrate,"
			 "query-migrate");
	check_ended_for_good(vm, &old, &nw, VM_CRASHED);
	/* Known leftover: the dead new VMM's monitor socket, never moved to
	 * the VM's path, is not removed with the VM. */
	snprintf(next_sock, sizeof(next_sock), "%s/qmp-next.sock", vm->dir);
	ck_assert_int_eq(unlink(next_sock), 0);
	FINISH(vm, &old, &nw);
}
END_TEST

/* Told to run, it neither confirms nor dies: after 5 s it is SIGKILLed and
 * judged by what it said before it died (nothing): rolled back. */
START_TEST(handover_committed_new_vmm_silent_is_killed_after_5s_and_rolled_back)
{
	struct fake old = FAKE("old"), nw = FAKE("new");
	struct vm *vm = vm_up(&old);
	_cleanup_json_ json_object *r = NULL;
	int64_t stats;

	handover_to_commit(vm, &old, &nw, &stats);
	RUN_UNTIL_WITHIN(!fake_alive(&nw), 5500000 + WAIT_USEC); /* SIGKILLed by the engine */
	ck_assert(update_of(vm) && update_of(vm)->killing_new);
	old_rolls_back(vm, &old, true, true);

	r = the_report(vm);
	check_report(r, "handover", "rolled-back", "commit");
	check_error(r, "the new VMM did not confirm within 5 s that it runs the guest, and was "
		       "ended before it did");
	check_blackout(r, "30.500");
	ck_assert(fake_reaped(&nw));
	ck_assert_int_eq(vm->vmm->pid, old.pid);
	FINISH(vm, &old, &nw);
}
END_TEST

/* Its monitor closes but the process lives on: not yet an exit. For 0.5 s
 * nothing happens; then it is SIGKILLed and judged by what it had said
 * (nothing): only once it is gone is the old VMM resumed. */
START_TEST(handover_committed_new_monitor_closed_alive_is_killed_before_old_resumes)
{
	struct fake old = FAKE("old"), nw = FAKE("new");
	struct vm *vm = vm_up(&old);
	_cleanup_json_ json_object *r = NULL;
	uint64_t t0;
	int64_t stats;

	handover_to_commit(vm, &old, &nw, &stats);
	nw.mon = safe_close(nw.mon);
	t0 = now_usec(CLOCK_MONOTONIC);
	while (now_usec(CLOCK_MONOTONIC) - t0 < 200000)
		turn();
	ck_assert(fake_alive(&nw));
	fake_quiet(&old);
	ck_assert_int_eq(phase(vm), PHASE_COMMIT);
	RUN_UNTIL(!fake_alive(&nw)); /* SIGKILLed by the engine */
	old_rolls_back(vm, &old, true, true);

	r = the_report(vm);
	check_report(r, "handover", "rolled-back", "commit");
	check_error(r, "the new VMM did not confirm");
	check_blackout(r, "30.500");
	ck_assert(fake_reaped(&nw));
	ck_assert_int_eq(vm->vmm->pid, old.pid);
	FINISH(vm, &old, &nw);
}
END_TEST

/* ---- 8. one end, whatever arrives together ------------------------------- */

START_TEST(handover_old_exit_and_new_monitor_eof_in_one_turn_end_the_update_once)
{
	struct fake old = FAKE("old"), nw = FAKE("new");
	struct vm *vm = vm_up(&old);
	_cleanup_json_ json_object *r = NULL;
	struct old_prep op;
	struct new_prep np;

	start(vm, "handover", NO_DEADLINE);
	handover_attach_new(vm, &nw);
	handover_prepare_old(&old, &op, true);
	handover_prepare_new(vm, &nw, &np, false);
	turns(3);
	nw.mon = safe_close(nw.mon); /* the process lives on */
	fake_kill(&old);
	run_to_end(vm);

	r = the_report(vm);
	ck_assert_str_eq(rstr(r, "result"), "failed");
	check_crashed_memory_held(vm);
	RUN_UNTIL(fake_reaped(&nw));
	close(op.fd);
	close(np.fd);
	check_ended_for_good(vm, &old, &nw, VM_CRASHED);
	FINISH(vm, &old, &nw);
}
END_TEST

START_TEST(handover_both_vmms_exit_in_one_turn_while_migrating_end_the_update_once)
{
	struct fake old = FAKE("old"), nw = FAKE("new");
	struct vm *vm = vm_up(&old);
	_cleanup_json_ json_object *r = NULL;

	handover_to_migrate(vm, &old, &nw, NO_DEADLINE);
	old_pauses(vm, &old);
	fake_kill(&nw);
	fake_kill(&old);
	run_to_end(vm);

	r = the_report(vm);
	check_report(r, "handover", "failed", "migrate");
	check_blackout(r, NULL);
	check_crashed_memory_held(vm);
	check_ended_for_good(vm, &old, &nw, VM_CRASHED);
	FINISH(vm, &old, &nw);
}
END_TEST

/* ---- 9. the phase tables ------------------------------------------------- */

static bool bug_logged(const char *line)
{
	char buf[65536];
	int fd = open(log_path, O_RDONLY | O_CLOEXEC);
	ssize_t n = fd >= 0 ? read(fd, buf, sizeof(buf) - 1) : -1;

	safe_close(fd);
	buf[n > 0 ? n : 0] = '\0';
	return strstr(buf, line) != NULL;
}

/* Every move of every strategy is allowed exactly when its table has it
 * (or it is to done); a refused move changes nothing and is logged. */
START_TEST(phase_tables_refuse_every_move_not_in_them)
{
	struct vm vm = { .cfg.name = (char *)VM_NAME };
	const struct strategy *s;

	for (size_t i = 0; (s = strategy_nth(i)); i++)
		for (int from = 0; from < _PHASE_MAX; from++)
			for (int to = 0; to < _PHASE_MAX; to++) {
				struct update u = { .vm = &vm, .s = s, .phase = from };
				bool ok = to == PHASE_DONE || (s->next[from] & PHASE_BIT(to));

				ck_assert_int_eq(update_set_phase(&u, to), ok);
				ck_assert_int_eq(u.phase, ok ? to : from);
			}
	ck_assert(bug_logged("BUG: VM vm0: handover update cannot go from phase launch to commit; "
			     "refused"));
}
END_TEST

/* What the documentation promises of the tables: the order of each
 * strategy's phases, a rollback only before the switch, nothing from a
 * rollback but the end. */
START_TEST(phase_tables_are_the_documented_ones)
{
	static const struct {
		const char *strategy;
		enum phase order[5];
	} want[] = {
		{ "handover",
		  { PHASE_LAUNCH, PHASE_PREPARE, PHASE_MIGRATE, PHASE_COMMIT, PHASE_END_OLD } },
		{ "cpr-transfer",
		  { PHASE_PREPARE, PHASE_LAUNCH, PHASE_MIGRATE, PHASE_COMMIT, PHASE_END_OLD } },
	};

	for (size_t i = 0; i < ELEMENTSOF(want); i++) {
		const struct strategy *s = strategy_find(want[i].strategy);

		ck_assert_ptr_nonnull(s);
		ck_assert_int_eq(s->first, want[i].order[0]);
		for (size_t k = 0; k < 4; k++)
			ck_assert_uint_eq(s->next[want[i].order[k]],
					  PHASE_BIT(want[i].order[k + 1]) |
					      PHASE_BIT(PHASE_ROLLBACK));
		ck_assert_uint_eq(s->next[PHASE_END_OLD], 0);
		ck_assert_uint_eq(s->next[PHASE_ROLLBACK], 0);
		ck_assert_uint_eq(s->next[PHASE_DONE], 0);
	}
}
END_TEST

/* A strategy that asks for a rollback after the switch is refused by the
 * table: the update fails, and the old VMM is never told to run. */
START_TEST(handover_rollback_asked_after_switch_is_refused_and_never_resumes_old)
{
	struct fake old = FAKE("old"), nw = FAKE("new");
	struct vm *vm = vm_up(&old);
	_cleanup_json_ json_object *r = NULL;
	int64_t stats, id;

	id = handover_to_commit(vm, &old, &nw, &stats);
	fake_event(&nw, "RESUME", NULL, T_RESUME);
	fake_return(&nw, id, "{}");
	RUN_UNTIL(phase(vm) == PHASE_END_OLD);
	update_rollback(update_of(vm), "asked for in the wrong phase");
	ck_assert_ptr_null(update_of(vm));
	RUN_UNTIL(fake_reaped(&old));
	run_to_end(vm);

	r = the_report(vm);
	ck_assert_str_eq(rstr(r, "result"), "failed");
	ck_assert(bug_logged("cannot go from phase end-old to rollback; refused"));
	ck_assert_str_eq(old.seen,
			 "qmp_capabilities,query-machines,query-status,query-migrate-capabilities,"
			 "migrate-set-parameters,getfd,migrate-set-capabilities,migrate,"
			 "query-migrate");
	ck_assert_int_eq(vm->vmm->pid, nw.pid);
	ck_assert_int_eq(vm->state, VM_RUNNING);
	/* Failed after the switch, the new VMM keeps the monitor path it was
	 * started on (only a success moves it to the VM's), which the VM's
	 * teardown does not know of. */
	ck_assert_str_ne(vm->vmm->qmp_path, vm->qmp_path);
	unlink(vm->vmm->qmp_path);
	FINISH(vm, &old, &nw);
}
END_TEST

/* ---- cpr-transfer -------------------------------------------------------- */

static void cpr_prepare_old(struct vm *vm, struct fake *old)
{
	char a[256];
	int64_t caps, params;

	ck_assert_int_eq(phase(vm), PHASE_PREPARE);
	caps = fake_expect_args(old, "migrate-set-capabilities", a, sizeof(a));
	ck_assert_str_eq(a,
			 "{\"capabilities\":[{\"capability\":\"x-ignore-shared\",\"state\":false},"
			 "{\"capability\":\"events\",\"state\":true}]}");
	params = fake_expect_args(old, "migrate-set-parameters", a, sizeof(a));
	ck_assert_str_eq(a, "{\"mode\":\"cpr-transfer\"}");
	fake_return(old, caps, "{}");
	fake_return(old, params, "{}");
}

/* The new VMM reports in: paused, with both incoming channels. */
static void cpr_attach_new(struct vm *vm, struct fake *nw)
{
	char want[PATH_MAX + 128];

	fake_attach(nw);
	ck_assert_int_eq(phase(vm), PHASE_LAUNCH);
	RUN_UNTIL(update_of(vm)->next->pid > 0);
	ck_assert_int_eq(nw->pid, update_of(vm)->next->pid);
	ck_assert(has_arg(nw, "-S", NULL));
	ck_assert(has_arg(nw, "-global", "migration.x-events=on"));
	ck_assert_uint_eq(count_arg(nw, "-incoming"), 2);
	snprintf(want, sizeof(want), "unix:%s/cpr-main.sock", vm->run_dir);
	ck_assert(has_arg(nw, "-incoming", want));
	snprintf(want, sizeof(want),
		 "{\"channel-type\": \"cpr\", \"addr\": {\"transport\": \"socket\", \"type\": "
		 "\"unix\", \"path\": \"%s/cpr-state.sock\"}}",
		 vm->run_dir);
	ck_assert(has_arg(nw, "-incoming", want));
}

/* As QEMU does before it reads the cpr channel. */
static int cpr_listen(struct vm *vm)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

	ck_assert_int_ge(fd, 0);
	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s/cpr-state.sock", vm->run_dir);
	ck_assert_int_eq(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
	ck_assert_int_eq(listen(fd, 1), 0);
	return fd;
}

/* From the start to the old VMM migrating; returns the cpr socket. */
static int cpr_to_migrate(struct vm *vm, struct fake *old, struct fake *nw, double timeout)
{
	char a[1024], want[1024];
	int64_t id;
	int fd;

	start(vm, "cpr-transfer", timeout);
	cpr_prepare_old(vm, old);
	cpr_attach_new(vm, nw);
	fake_quiet(old); /* it waits for the cpr socket */
	ck_assert_int_eq(phase(vm), PHASE_LAUNCH);
	fd = cpr_listen(vm);
	id = fake_expect_args(old, "migrate", a, sizeof(a));
	snprintf(want, sizeof(want),
		 "{\"channels\":[{\"channel-type\":\"main\",\"addr\":{\"transport\":\"socket\","
		 "\"type\":\"unix\",\"path\":\"%s/cpr-main.sock\"}},{\"channel-type\":\"cpr\","
		 "\"addr\":{\"transport\":\"socket\",\"type\":\"unix\",\"path\":\"%s/"
		 "cpr-state.sock\"}}]}",
		 vm->run_dir, vm->run_dir);
	ck_assert_str_eq(a, want);
	ck_assert_int_eq(phase(vm), PHASE_MIGRATE);
	fake_return(old, id, "{}");
	return fd;
}

/* Its monitor appears only once the state has arrived: the engine asks. */
START_TEST(cpr_transfer_ok_late_monitor_asked_cont_after_completed_then_old_stats_and_sigkill)
{
	struct fake old = FAKE("old"), nw = FAKE("new");
	struct vm *vm = vm_up(&old);
	_cleanup_json_ json_object *r = NULL;
	char path[PATH_MAX + 32];
	int64_t id;
	int fd;

	fd = cpr_to_migrate(vm, &old, &nw, NO_DEADLINE);
	old_pauses(vm, &old);
	fake_greet(&nw, NEW_VERSION);
	id = fake_expect(&nw, "query-migrate");
	fake_return(&nw, id, "{\"status\": \"active\"}");
	fake_quiet(&nw);
	ck_assert_int_eq(phase(vm), PHASE_MIGRATE);
	fake_migration(&nw, "completed");
	id = fake_expect(&nw, "cont");
	ck_assert_int_eq(phase(vm), PHASE_COMMIT);
	fake_event(&nw, "RESUME", NULL, T_RESUME);
	fake_return(&nw, id, "{}");
	/* RESUME: the old VMM is asked its byte count, then SIGKILLed. */
	id = fake_expect(&old, "query-migrate");
	ck_assert_int_eq(phase(vm), PHASE_END_OLD);
	turns(3);
	ck_assert(fake_alive(&old));
	fake_return(&old, id, "{\"status\": \"completed\", \"ram\": {\"transferred\": 9000}}");
	RUN_UNTIL(!fake_alive(&old));
	old.mon = safe_close(old.mon);
	run_to_end(vm);

	r = the_report(vm);
	check_report(r, "cpr-transfer", "ok", "end-old");
	check_blackout(r, "4.250");
	ck_assert_str_eq(rstr(r, "new_version"), NEW_VERSION);
	ck_assert_int_eq(json_object_get_int64(json_object_object_get(r, "bytes_transferred")),
			 9000);
	ck_assert_str_eq(old.seen,
			 "qmp_capabilities,query-machines,query-status,migrate-set-capabilities,"
			 "migrate-set-parameters,migrate,query-migrate");
	ck_assert_str_eq(nw.seen, "qmp_capabilities,query-migrate,cont");
	ck_assert(fake_reaped(&old));
	ck_assert_int_eq(vm->vmm->pid, nw.pid);
	ck_assert_int_eq(vm->state, VM_RUNNING);
	/* What the strategy made in the VM's directory is gone. */
	snprintf(path, sizeof(path), "%s/cpr-state.sock", vm->run_dir);
	ck_assert_int_eq(access(path, F_OK), -1);
	close(fd);
	FINISH(vm, &old, &nw);
}
END_TEST

START_TEST(cpr_transfer_old_exit_while_new_vmm_starts_fails_vm_crashed_memory_held_new_killed)
{
	struct fake old = FAKE("old"), nw = FAKE("new");
	struct vm *vm = vm_up(&old);
	_cleanup_json_ json_object *r = NULL;

	start(vm, "cpr-transfer", NO_DEADLINE);
	cpr_prepare_old(vm, &old);
	cpr_attach_new(vm, &nw);
	turns(3);
	fake_kill(&old);
	run_to_end(vm);

	r = the_report(vm);
	check_report(r, "cpr-transfer", "failed", "launch");
	check_error(r, "the old VMM killed by signal KILL while starting the new VMM");
	check_blackout(r, NULL);
	check_crashed_memory_held(vm);
	RUN_UNTIL(fake_reaped(&nw));
	check_ended_for_good(vm, &old, &nw, VM_CRASHED);
	FINISH(vm, &old, &nw);
}
END_TEST

START_TEST(cpr_transfer_new_exit_while_starting_rolls_back_naming_phase)
{
	struct fake old = FAKE("old"), nw = FAKE("new");
	struct vm *vm = vm_up(&old);
	_cleanup_json_ json_object *r = NULL;

	start(vm, "cpr-transfer", NO_DEADLINE);
	cpr_prepare_old(vm, &old);
	cpr_attach_new(vm, &nw);
	turns(3);
	fake_kill(&nw);
	old_rolls_back(vm, &old, false, false);

	r = the_report(vm);
	check_report(r, "cpr-transfer", "rolled-back", "launch");
	check_error(r, "the new VMM killed by signal KILL while starting the new VMM");
	check_blackout(r, "0.000");
	ck_assert(fake_reaped(&nw));
	ck_assert_int_eq(vm->vmm->pid, old.pid);
	ck_assert_str_eq(old.seen,
			 "qmp_capabilities,query-machines,query-status,migrate-set-capabilities,"
			 "migrate-set-parameters,migrate_cancel,query-status");
	check_ended_for_good(vm, &old, &nw, VM_RUNNING);
	FINISH(vm, &old, &nw);
}
END_TEST

START_TEST(cpr_transfer_new_exit_while_migrating_rolls_back_and_conts_paused_old)
{
	struct fake old = FAKE("old"), nw = FAKE("new");
	struct vm *vm = vm_up(&old);
	_cleanup_json_ json_object *r = NULL;
	int fd;

	fd = cpr_to_migrate(vm, &old, &nw, NO_DEADLINE);
	old_pauses(vm, &old);
	fake_kill(&nw);
	old_rolls_back(vm, &old, false, true);

	r = the_report(vm);
	check_report(r, "cpr-transfer", "rolled-back", "migrate");
	check_error(r, "the new VMM killed by signal KILL while moving device state");
	check_blackout(r, "30.500");
	ck_assert(fake_reaped(&nw));
	ck_assert_int_eq(vm->vmm->pid, old.pid);
	close(fd);
	FINISH(vm, &old, &nw);
}
END_TEST

START_TEST(cpr_transfer_deadline_with_completed_event_unread_commits_never_rolls_back)
{
	struct fake old = FAKE("old"), nw = FAKE("new");
	struct vm *vm = vm_up(&old);
	_cleanup_json_ json_object *r = NULL;
	int64_t id;
	int fd;

	fd = cpr_to_migrate(vm, &old, &nw, DEADLINE);
	old_pauses(vm, &old);
	fake_greet(&nw, NEW_VERSION);
	id = fake_expect(&nw, "query-migrate");
	fake_return(&nw, id, "{\"status\": \"active\"}");
	fake_quiet(&nw);
	fake_migration(&nw, "completed");
	sleep_past_deadline(vm);
	turn();
	ck_assert_int_eq(phase(vm), PHASE_COMMIT);
	id = fake_expect(&nw, "cont");
	fake_event(&nw, "RESUME", NULL, T_RESUME);
	fake_return(&nw, id, "{}");
	id = fake_expect(&old, "query-migrate");
	fake_return(&old, id, "{\"status\": \"completed\"}");
	RUN_UNTIL(!fake_alive(&old));
	old.mon = safe_close(old.mon);
	run_to_end(vm);

	r = the_report(vm);
	check_report(r, "cpr-transfer", "ok", "end-old");
	check_blackout(r, "4.250");
	ck_assert_str_eq(old.seen,
			 "qmp_capabilities,query-machines,query-status,migrate-set-capabilities,"
			 "migrate-set-parameters,migrate,query-migrate");
	ck_assert_int_eq(vm->vmm->pid, nw.pid);
	close(fd);
	FINISH(vm, &old, &nw);
}
END_TEST

START_TEST(cpr_transfer_deadline_while_starting_rolls_back_and_kills_new)
{
	struct fake old = FAKE("old"), nw = FAKE("new");
	struct vm *vm = vm_up(&old);
	_cleanup_json_ json_object *r = NULL;

	start(vm, "cpr-transfer", DEADLINE);
	cpr_prepare_old(vm, &old);
	cpr_attach_new(vm, &nw);
	turns(3);
	sleep_past_deadline(vm);
	turn();
	ck_assert_int_eq(phase(vm), PHASE_ROLLBACK);
	RUN_UNTIL(fake_reaped(&nw));
	old_rolls_back(vm, &old, false, false);

	r = the_report(vm);
	check_report(r, "cpr-transfer", "rolled-back", "launch");
	check_error(r, "timed out while starting the new VMM");
	check_blackout(r, "0.000");
	ck_assert_int_eq(vm->vmm->pid, old.pid);
	FINISH(vm, &old, &nw);
}
END_TEST

/* Every test; `test_update WORD...` runs those whose name has a WORD. */
static const struct {
	const char *name;
	const TTest *const *test;
} tests[] = {
	{ "handover_ok_commands_in_order_cont_after_completed_then_old_stats_and_sigkill",
	  &handover_ok_commands_in_order_cont_after_completed_then_old_stats_and_sigkill },
	{ "handover_old_exit_while_new_vmm_starts_fails_vm_crashed_memory_held_new_killed",
	  &handover_old_exit_while_new_vmm_starts_fails_vm_crashed_memory_held_new_killed },
	{ "handover_old_exit_while_new_vmm_prepares_fails_vm_crashed_memory_held_new_killed",
	  &handover_old_exit_while_new_vmm_prepares_fails_vm_crashed_memory_held_new_killed },
	{ "handover_new_exit_while_starting_rolls_back_naming_phase_and_its_log",
	  &handover_new_exit_while_starting_rolls_back_naming_phase_and_its_log },
	{ "handover_new_exit_while_preparing_rolls_back_naming_phase",
	  &handover_new_exit_while_preparing_rolls_back_naming_phase },
	{ "handover_old_exit_during_rollback_fails_vm_crashed_memory_held",
	  &handover_old_exit_during_rollback_fails_vm_crashed_memory_held },
	{ "handover_new_vmm_that_cannot_be_executed_rolls_back",
	  &handover_new_vmm_that_cannot_be_executed_rolls_back },
	{ "handover_launcher_gone_with_the_new_vmm_start_in_flight_rolls_back",
	  &handover_launcher_gone_with_the_new_vmm_start_in_flight_rolls_back },
	{ "handover_launcher_gone_before_the_update_rolls_back_at_once",
	  &handover_launcher_gone_before_the_update_rolls_back_at_once },
	{ "handover_new_exit_while_migrating_rolls_back_and_conts_paused_old",
	  &handover_new_exit_while_migrating_rolls_back_and_conts_paused_old },
	{ "handover_deadline_with_completed_event_unread_commits_never_rolls_back",
	  &handover_deadline_with_completed_event_unread_commits_never_rolls_back },
	{ "handover_deadline_with_nothing_unread_rolls_back_and_kills_new",
	  &handover_deadline_with_nothing_unread_rolls_back_and_kills_new },
	{ "handover_refused_migrate_incoming_rolls_back_from_inside_new_vmm_dispatch",
	  &handover_refused_migrate_incoming_rolls_back_from_inside_new_vmm_dispatch },
	{ "handover_refused_prepare_on_new_vmm_rolls_back_from_inside_its_dispatch",
	  &handover_refused_prepare_on_new_vmm_rolls_back_from_inside_its_dispatch },
	{ "handover_committed_new_exit_without_resume_rolls_back",
	  &handover_committed_new_exit_without_resume_rolls_back },
	{ "handover_committed_new_exit_right_after_resume_keeps_switch_never_conts_old",
	  &handover_committed_new_exit_right_after_resume_keeps_switch_never_conts_old },
	{ "handover_committed_new_vmm_silent_is_killed_after_5s_and_rolled_back",
	  &handover_committed_new_vmm_silent_is_killed_after_5s_and_rolled_back },
	{ "handover_committed_new_monitor_closed_alive_is_killed_before_old_resumes",
	  &handover_committed_new_monitor_closed_alive_is_killed_before_old_resumes },
	{ "handover_old_exit_and_new_monitor_eof_in_one_turn_end_the_update_once",
	  &handover_old_exit_and_new_monitor_eof_in_one_turn_end_the_update_once },
	{ "handover_both_vmms_exit_in_one_turn_while_migrating_end_the_update_once",
	  &handover_both_vmms_exit_in_one_turn_while_migrating_end_the_update_once },
	{ "handover_rollback_asked_after_switch_is_refused_and_never_resumes_old",
	  &handover_rollback_asked_after_switch_is_refused_and_never_resumes_old },
	{ "phase_tables_refuse_every_move_not_in_them",
	  &phase_tables_refuse_every_move_not_in_them },
	{ "phase_tables_are_the_documented_ones", &phase_tables_are_the_documented_ones },
	{ "cpr_transfer_ok_late_monitor_asked_cont_after_completed_then_old_stats_and_sigkill",
	  &cpr_transfer_ok_late_monitor_asked_cont_after_completed_then_old_stats_and_sigkill },
	{ "cpr_transfer_old_exit_while_new_vmm_starts_fails_vm_crashed_memory_held_new_killed",
	  &cpr_transfer_old_exit_while_new_vmm_starts_fails_vm_crashed_memory_held_new_killed },
	{ "cpr_transfer_new_exit_while_starting_rolls_back_naming_phase",
	  &cpr_transfer_new_exit_while_starting_rolls_back_naming_phase },
	{ "cpr_transfer_new_exit_while_migrating_rolls_back_and_conts_paused_old",
	  &cpr_transfer_new_exit_while_migrating_rolls_back_and_conts_paused_old },
	{ "cpr_transfer_deadline_with_completed_event_unread_commits_never_rolls_back",
	  &cpr_transfer_deadline_with_completed_event_unread_commits_never_rolls_back },
	{ "cpr_transfer_deadline_while_starting_rolls_back_and_kills_new",
	  &cpr_transfer_deadline_while_starting_rolls_back_and_kills_new },
};

int main(int argc, char **argv)
{
	const char *tmp;
	int failed;
	SRunner *sr;
	Suite *s;
	TCase *t;

	if (getenv(RELAY_ENV))
		return relay_main(argc, argv);
	/* The daemon's own environment is not the test's. */
	unsetenv("NOTIFY_SOCKET");
	unsetenv("JOURNAL_STREAM");
	unsetenv("LISTEN_FDS");
	if (!realpath("/proc/self/exe", self)) {
		perror("realpath /proc/self/exe");
		return 1;
	}
	/* The VMs' monitor and cpr sockets are bound in there: a unix socket
	 * path has at most 107 bytes. */
	tmp = getenv("TMPDIR");
	if (!tmp || !tmp[0] || strlen(tmp) > 40)
		tmp = "/tmp";
	snprintf(base, sizeof(base), "%s/cprd-test-update-XXXXXX", tmp);
	if (!mkdtemp(base)) {
		perror("mkdtemp");
		return 1;
	}

	s = suite_create("update");
	t = tcase_create("engine");
	tcase_set_timeout(t, 60);
	tcase_add_checked_fixture(t, setup, teardown);
	for (size_t i = 0; i < ELEMENTSOF(tests); i++) {
		bool run = argc < 2;

		for (int a = 1; a < argc; a++)
			run = run || strstr(tests[i].name, argv[a]);
		if (run)
			tcase_add_test(t, *tests[i].test);
	}
	suite_add_tcase(s, t);
	sr = srunner_create(s);
	printf("Running suite(s): update\n");
	fflush(stdout);
	srunner_run_all(sr, CK_SILENT);
	failed = srunner_ntests_failed(sr);
	if (getenv("CPRD_TEST_KEEP"))
		printf("state directories kept in %s\n", base);
	else if (failed)
		print_failed_logs();
	/* Check's summary comes last, after the logs. */
	fflush(stdout);
	srunner_print(sr, CK_NORMAL);
	srunner_free(sr);
	if (!getenv("CPRD_TEST_KEEP"))
		remove_tree(base);
	return failed ? 1 : 0;
}
