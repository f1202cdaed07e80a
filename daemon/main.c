/* SPDX-License-Identifier: MIT */
/* cprd: holds VM memory and device fds, and the VMMs that use them. */
#include <fcntl.h>
#include <getopt.h>
#include <grp.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <systemd/sd-bus.h>
#include <systemd/sd-daemon.h>
#include <time.h>

#include "daemon/observe/archive.h"
#include "daemon/ops/checkpoint.h"
#include "daemon/core/daemon.h"
#include "daemon/observe/events.h"
#include "daemon/core/fdstore.h"
#include "daemon/core/inherit.h"
#include "daemon/observe/log.h"
#include "daemon/observe/metrics.h"
#include "daemon/rpc/methods.h"
#include "daemon/ops/recover.h"
#include "daemon/core/registry.h"
#include "daemon/host/sandbox.h"
#include "daemon/host/scope.h"
#include "daemon/core/server.h"
#include "daemon/observe/stats.h"
#include "daemon/core/vm.h"
#include "daemon/core/vmm.h"
#include "kvm/qemu.h"

#define DEFAULT_STATE_DIR "/run/cprd"
/* Between systemd's container range (524288-1879048191) and its foreign
 * range (from 2147352576): no user database, nspawn or sysusers hands these
 * out (docs/ARCHITECTURE.md, "Confined VMMs"). */
#define DEFAULT_VMM_ID_BASE 0x70000000U
#define DEFAULT_VMM_ID_COUNT 65536U
#define REGISTRY_RETRY_SEC 1.0
#define DEFAULT_LOG_MAX (4 << 20)
#define LOG_MIN 4096
#define LOG_CHECK_SEC 2.0

struct options {
	const char *socket_path;
	const char *state_dir;
	bool foreground;
	bool sandbox;
	const char *accel;     /* "auto", "kvm" or "tcg" */
	const char *vmm_allow; /* the allow-list of VMM binaries */
	uint64_t log_max;      /* --log-max-size, 0: never rotate */
	struct peer_limits limits;
	bool confine;
	uint32_t vmm_id_base, vmm_id_count;
	const char *metrics_file;
	const char *log_dir; /* --log-dir: what destroyed VMs leave */
	const char *checkpoint_dir;
	bool restore_on_start;
	double metrics_interval;
	size_t events_max_queued;
};

static void notify_status(struct daemon *d)
{
	size_t running = 0, crashed = 0;

	d->status_stale = false;
	for (struct vm *vm = d->vms; vm; vm = vm->next) {
		running += vm->state == VM_RUNNING || vm->state == VM_PAUSED;
		crashed += vm->state == VM_CRASHED;
	}
	sd_notifyf(0,
		   "STATUS=%sHolding %zu VM(s): %zu running, %zu crashed; %zu fds in custody%s%s",
		   registry_ok(&d->registry) ? "" : "Degraded: ", vm_count(d), running, crashed,
		   memstore_count(d->store, NULL),
		   registry_ok(&d->registry) ? "" : "; registry not written: ",
		   registry_ok(&d->registry) ? "" : d->registry.why);
}

/* What changed during this turn of the loop is written once, before the
 * loop waits again (what must be written before a client hears of it is
 * written at once, by vm_registry_commit()). While the registry cannot be
 * written, a timer retries it rather than every turn. */
static void flush(struct daemon *d)
{
	if (d->registry.dirty && registry_ok(&d->registry))
		(void)vm_registry_commit(d); /* logs what failed */
	if (d->registry.dirty && !registry_ok(&d->registry)) {
		if (!ev_is_active(&d->registry_retry))
			ev_timer_again(d->loop, &d->registry_retry);
	} else {
		ev_timer_stop(d->loop, &d->registry_retry);
	}
	metrics_flush(d); /* before status_stale is cleared: it reads it */
	if (d->status_stale)
		notify_status(d);
}

static void flush_cb(struct ev_loop *loop, ev_prepare *w, int revents)
{
	flush(w->data);
}

static void registry_retry_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	struct daemon *d = w->data;

	(void)vm_registry_commit(d);
	/* flush_cb runs before the loop waits again and stops this timer once
	 * the write went through. */
}

static void log_timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	vm_rotate_logs(w->data);
}

static void watchdog_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	sd_notify(0, "WATCHDOG=1");
}

/* With WatchdogSec= in the unit, the loop tells systemd it still turns, at
 * half the interval; a loop that is stuck is killed and restarted. */
static void watchdog_start(struct daemon *d)
{
	uint64_t usec = 0;

	if (sd_watchdog_enabled(0, &usec) <= 0 || usec == 0)
		return;
	ev_timer_init(&d->watchdog, watchdog_cb, 0., (double)usec / 2e6);
	ev_timer_again(d->loop, &d->watchdog);
	ev_unref(d->loop); /* the watchdog alone keeps nothing running */
	sd_notify(0, "WATCHDOG=1");
}

/* Every event goes to the metrics' counters; NULL: only a gauge changed. */
static void observe_event(struct daemon *d, json_object *event)
{
	if (event)
		metrics_observe(d, event);
	else
		metrics_changed(d);
}

static void help(void)
{
	printf(
	    "Usage: cprd [--socket PATH] [--state-dir DIR] [--accel auto|kvm|tcg] [--foreground]\n"
	    "            [--vmm-allow FILE] [--log-max-size SIZE] [--vmm-ids BASE:COUNT]\n"
	    "            [--no-confine] [--no-sandbox] [--max-clients-per-uid N]\n"
	    "            [--idle-timeout SEC] [--metrics-file PATH [--metrics-interval SEC]]\n"
	    "            [--events-max-queued BYTES] [--log-dir DIR]\n"
	    "            [--checkpoint-dir DIR] [--restore-on-start]\n\n"
	    "Holds guest memory and device fds for VMMs and updates VMMs under running guests.\n\n"
	    "  --socket PATH     JSON-RPC socket (default STATE_DIR/cprd.sock)\n"
	    "  --state-dir DIR   runtime state: VM logs, monitor sockets (default %s)\n"
	    "  --accel A         how VMMs run guests: kvm, tcg, or auto (kvm when /dev/kvm\n"
	    "                    is usable; the default)\n"
	    "  --vmm-allow FILE  VMM binaries that peers other than root may run, one path or\n"
	    "                    pattern per line (default %s; without it:\n"
	    "                    %s)\n"
	    "  --metrics-file PATH  keep the Prometheus metrics in PATH (absolute), replaced\n"
	    "                    atomically, e.g. for node_exporter's textfile collector\n"
	    "  --metrics-interval SEC  write that file at most every SEC seconds (default 5)\n"
	    "  --events-max-queued BYTES  unread bytes an event subscriber may have queued\n"
	    "                    before it is dropped (default 1 MiB)\n"
	    "  --log-dir DIR     keep destroyed VMs' console and VMM logs and history in\n"
	    "                    DIR/NAME (default %s; \"\": keep nothing)\n"
	    "  --checkpoint-dir DIR  where checkpoints go and are found after a reboot\n"
	    "                    (default " CHECKPOINT_DEFAULT_DIR ")\n"
	    "  --restore-on-start  restore every checkpointed VM once cprd is up\n"
	    "  --foreground      do not detach; log to stderr\n"
	    "  --log-max-size S  rotate a console, VMM or cprd log in the state directory\n"
	    "                    once it passes S bytes (\"4M\", the default; 0: never)\n"
	    "  --vmm-ids B:C     uids/gids for VMMs, one per VM (default %u:%u)\n"
	    "  --no-confine      run VMMs as root in the host's namespaces (unsafe)\n"
	    "  --no-sandbox      do not apply the seccomp filter (debugging)\n"
	    "  --max-clients-per-uid N\n"
	    "                    connections one uid other than root may hold (default %d;\n"
	    "                    0: no per-uid limit)\n"
	    "  --idle-timeout SEC\n"
	    "                    close a connection with no call in flight after SEC\n"
	    "                    seconds without traffic (default %d; 0: never)\n"
	    "  --version         print the version\n",
	    DEFAULT_STATE_DIR, POLICY_DEFAULT_FILE, POLICY_DEFAULT_VMM, ARCHIVE_DEFAULT_DIR,
	    DEFAULT_VMM_ID_BASE, DEFAULT_VMM_ID_COUNT, LIMITS_MAX_CLIENTS_PER_UID,
	    LIMITS_IDLE_TIMEOUT_SEC);
}

static int parse_unsigned(const char *opt, const char *s, unsigned max, unsigned *ret)
{
	char *end;
	unsigned long v;

	errno = 0;
	v = strtoul(s, &end, 10);
	if (errno != 0 || end == s || *end != '\0' || s[0] == '-' || v > max) {
		fprintf(stderr, "cprd: %s takes a whole number from 0 to %u, not '%s'\n", opt, max,
			s);
		return -EINVAL;
	}
	*ret = (unsigned)v;
	return 0;
}

static int parse_ids(const char *s, uint32_t *ret_base, uint32_t *ret_count)
{
	unsigned long long base, count;
	char *end;

	errno = 0;
	base = strtoull(s, &end, 0);
	if (errno || end == s || *end != ':')
		return -EINVAL;
	s = end + 1;
	count = strtoull(s, &end, 0);
	if (errno || end == s || *end)
		return -EINVAL;
	/* Not root's, nor the 16-bit (uid_t)-1 or nobody below, nor reaching
	 * (uid_t)-1 above. */
	if (base < 65536 || count == 0 || base + count > UINT32_MAX)
		return -ERANGE;
	*ret_base = (uint32_t)base;
	*ret_count = (uint32_t)count;
	return 0;
}

/* A number in [min, max], nothing after it. */
static int parse_number(const char *s, double min, double max, double *ret)
{
	char *end;
	double v;

	errno = 0;
	v = strtod(s, &end);
	if (errno || end == s || *end || !(v >= min && v <= max))
		return -EINVAL;
	*ret = v;
	return 0;
}

static int parse_options(int argc, char **argv, struct options *o)
{
	static const struct option opts[] = {
		{ "socket", required_argument, NULL, 's' },
		{ "state-dir", required_argument, NULL, 'd' },
		{ "foreground", no_argument, NULL, 'f' },
		{ "no-sandbox", no_argument, NULL, 'S' },
		{ "accel", required_argument, NULL, 'a' },
		{ "vmm-allow", required_argument, NULL, 'A' },
		{ "log-max-size", required_argument, NULL, 'L' },
		{ "max-clients-per-uid", required_argument, NULL, 'U' },
		{ "idle-timeout", required_argument, NULL, 'I' },
		{ "vmm-ids", required_argument, NULL, 'i' },
		{ "no-confine", no_argument, NULL, 'C' },
		{ "metrics-file", required_argument, NULL, 'M' },
		{ "log-dir", required_argument, NULL, 'G' },
		{ "metrics-interval", required_argument, NULL, 'T' },
		{ "events-max-queued", required_argument, NULL, 'E' },
		{ "checkpoint-dir", required_argument, NULL, 'K' },
		{ "restore-on-start", no_argument, NULL, 'R' },
		{ "help", no_argument, NULL, 'h' },
		{ "version", no_argument, NULL, 'V' },
		{},
	};
	double num;
	int c;

	*o = (struct options){ .state_dir = DEFAULT_STATE_DIR,
			       .sandbox = true,
			       .accel = "auto",
			       .vmm_allow = POLICY_DEFAULT_FILE,
			       .log_max = DEFAULT_LOG_MAX,
			       .limits = PEER_LIMITS_DEFAULT,
			       .confine = true,
			       .vmm_id_base = DEFAULT_VMM_ID_BASE,
			       .vmm_id_count = DEFAULT_VMM_ID_COUNT,
			       .metrics_interval = 5,
			       .log_dir = ARCHIVE_DEFAULT_DIR,
			       .checkpoint_dir = CHECKPOINT_DEFAULT_DIR,
			       .events_max_queued = EVENTS_MAX_QUEUED };
	while ((c = getopt_long(argc, argv, "s:d:fh", opts, NULL)) >= 0) {
		switch (c) {
		case 's':
			o->socket_path = optarg;
			break;
		case 'd':
			o->state_dir = optarg;
			break;
		case 'f':
			o->foreground = true;
			break;
		case 'S':
			o->sandbox = false;
			break;
		case 'a':
			if (!streq(optarg, "auto") && !streq(optarg, "kvm") &&
			    !streq(optarg, "tcg")) {
				fprintf(stderr, "cprd: --accel takes auto, kvm or tcg, not '%s'\n",
					optarg);
				return -EINVAL;
			}
			o->accel = optarg;
			break;
		case 'A':
			o->vmm_allow = optarg;
			break;
		case 'L':
			if (qemu_parse_size(optarg, &o->log_max) < 0 ||
			    o->log_max > (uint64_t)INT64_MAX ||
			    (o->log_max > 0 && o->log_max < LOG_MIN)) {
				fprintf(stderr,
					"cprd: --log-max-size takes a size of at least %d bytes, "
					"such as 4M, or 0 for no limit, not '%s'\n",
					LOG_MIN, optarg);
				return -EINVAL;
			}
			break;
		case 'U':
			if (parse_unsigned("--max-clients-per-uid", optarg, LIMITS_MAX_CLIENTS,
					   &o->limits.max_per_uid) < 0)
				return -EINVAL;
			break;
		case 'I':
			if (parse_unsigned("--idle-timeout", optarg, 86400,
					   &o->limits.idle_timeout_sec) < 0)
				return -EINVAL;
			break;
		case 'i':
			if (parse_ids(optarg, &o->vmm_id_base, &o->vmm_id_count) < 0) {
				fprintf(stderr,
					"cprd: --vmm-ids takes BASE:COUNT, BASE >= 65536 and the "
					"range below 4294967295, not '%s'\n",
					optarg);
				return -EINVAL;
			}
			break;
		case 'C':
			o->confine = false;
			break;
		case 'K':
			if (optarg[0] != '/') {
				fprintf(stderr,
					"cprd: --checkpoint-dir takes an absolute path, not '%s'\n",
					optarg);
				return -EINVAL;
			}
			o->checkpoint_dir = optarg;
			break;
		case 'R':
			o->restore_on_start = true;
			break;
		case 'G':
			if (optarg[0] && optarg[0] != '/') {
				fprintf(stderr,
					"cprd: --log-dir takes an absolute path (or \"\" to keep "
					"nothing), not '%s'\n",
					optarg);
				return -EINVAL;
			}
			o->log_dir = optarg;
			break;
		case 'M':
			if (optarg[0] != '/' || optarg[strlen(optarg) - 1] == '/') {
				fprintf(stderr,
					"cprd: --metrics-file takes an absolute file path, "
					"not '%s'\n",
					optarg);
				return -EINVAL;
			}
			o->metrics_file = optarg;
			break;
		case 'T':
			if (parse_number(optarg, 0, 3600, &num) < 0) {
				fprintf(stderr,
					"cprd: --metrics-interval takes seconds from 0 to "
					"3600, not '%s'\n",
					optarg);
				return -EINVAL;
			}
			o->metrics_interval = num;
			break;
		case 'E':
			if (parse_number(optarg, 4096, 1 << 30, &num) < 0) {
				fprintf(stderr,
					"cprd: --events-max-queued takes bytes from 4096 to "
					"1073741824, not '%s'\n",
					optarg);
				return -EINVAL;
			}
			o->events_max_queued = (size_t)num;
			break;
		case 'h':
			help();
			exit(0);
		case 'V':
			printf("cprd %s\n", CPRD_VERSION);
			exit(0);
		default:
			return -EINVAL;
		}
	}
	if (optind < argc) {
		fprintf(stderr, "cprd: unexpected argument '%s'\n", argv[optind]);
		return -EINVAL;
	}
	return 0;
}

static int load_policy(struct policy *p, const char *path)
{
	unsigned line;
	int r = policy_load(p, path, &line);

	if (r == -EPERM)
		return log_error_errno(r,
				       "%s can be changed by others than root: refusing to use "
				       "it as the allow-list of VMM binaries",
				       path);
	if (r < 0 && line > 0)
		return log_error_errno(r,
				       "%s:%u: an absolute path or pattern of VMM binaries "
				       "expected",
				       path, line);
	if (r < 0)
		return log_error_errno(r, "cannot read the allow-list of VMM binaries %s", path);
	return 0;
}

/* dir (fd) is cprd's alone: a directory owned by the user cprd runs as
 * (root) that nobody else can write to. Anyone who could would plant a
 * symlink where cprd is about to write, or swap a VM's directory. */
static int check_private_dir(int fd, const char *path)
{
	struct stat st;

	if (fstat(fd, &st) < 0)
		return log_error_errno(-errno, "cannot stat %s", path);
	if (!S_ISDIR(st.st_mode)) {
		log_error("%s is not a directory", path);
		return -ENOTDIR;
	}
	if (st.st_uid != geteuid()) {
		log_error("refusing state directory %s: it is owned by uid %u, not by uid %u, "
			  "which cprd runs as; chown it or choose another --state-dir",
			  path, (unsigned)st.st_uid, (unsigned)geteuid());
		return -EPERM;
	}
	if (st.st_mode & (S_IWGRP | S_IWOTH)) {
		log_error("refusing state directory %s: mode %04o lets %s write to it; "
			  "chmod go-w it or choose another --state-dir",
			  path, (unsigned)(st.st_mode & 07777),
			  st.st_mode & S_IWOTH ? "everyone" : "its group");
		return -EPERM;
	}
	return 0;
}

/* Absolute state dir, created 0755, plus vms/ 0750 and a lock so that two
 * daemons never share one. Both directories are checked to be cprd's
 * alone and kept open: every file in them is reached through these
 * descriptors, never through a symlink. The lock fd stays open for the
 * daemon's life. */
static int setup_state_dir(struct daemon *d, const char *dir)
{
	_cleanup_free_ char *vms = NULL;
	int fd, r;

	d->state_dir = realpath(dir, NULL);
	if (!d->state_dir) {
		if (mkdir(dir, 0755) < 0 && errno != EEXIST)
			return log_error_errno(-errno, "cannot create state directory %s", dir);
		d->state_dir = realpath(dir, NULL);
		if (!d->state_dir)
			return log_error_errno(-errno, "cannot resolve %s", dir);
	}
	if (asprintf(&vms, "%s/vms", d->state_dir) < 0)
		return -ENOMEM;
	d->state_fd = open(d->state_dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (d->state_fd < 0)
		return log_error_errno(-errno, "cannot open state directory %s", d->state_dir);
	r = check_private_dir(d->state_fd, d->state_dir);
	if (r < 0)
		return r;
	if (mkdirat(d->state_fd, "vms", 0750) < 0 && errno != EEXIST)
		return log_error_errno(-errno, "cannot create %s", vms);
	d->vms_fd = openat(d->state_fd, "vms", O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (d->vms_fd < 0)
		return log_error_errno(-errno, "cannot open %s", vms);
	r = check_private_dir(d->vms_fd, vms);
	if (r < 0)
		return r;
	fd = openat(d->state_fd, "cprd.lock", O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);
	if (fd < 0)
		return log_error_errno(-errno, "cannot open %s/cprd.lock", d->state_dir);
	if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
		close(fd);
		log_error("another cprd already uses state directory %s", d->state_dir);
		return -EBUSY;
	}
	return 0;
}

/* Classic detach, but the parent waits for the daemon to be ready so that
 * "cprd && cprctl list" works; it exits with the daemon's start-up result. */
static int detach(int *ret_ready_fd)
{
	int p[2];
	pid_t pid;
	char c = 1;

	if (pipe2(p, O_CLOEXEC) < 0)
		return -errno;
	pid = fork();
	if (pid < 0)
		return -errno;
	if (pid > 0) {
		close(p[1]);
		exit(read(p[0], &c, 1) == 1 && c == 0 ? 0 : 1);
	}
	close(p[0]);
	setsid();
	if (fork() > 0)
		_exit(0);
	*ret_ready_fd = p[1];
	return 0;
}

static int redirect_log(struct daemon *d)
{
	_cleanup_close_ int fd = -EBADF, null = -EBADF;

	fd = openat(d->state_fd, "cprd.log",
		    O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK, 0640);
	null = open("/dev/null", O_RDWR | O_CLOEXEC);
	if (fd < 0 || null < 0)
		return -errno;
	if (dup2(null, 0) < 0 || dup2(fd, 1) < 0 || dup2(fd, 2) < 0)
		return -errno;
	d->own_log = true;
	return 0;
}

/* Each connection may hold up to PROTO_MAX_FDS fds of a message not yet
 * complete, and custody needs fds of its own: the default soft limit of
 * 1024 runs out long before the connection limits apply. The launcher is
 * forked before this, so VMMs keep the soft limit they had (select()). */
static void raise_fd_limit(void)
{
	struct rlimit rl;

	if (getrlimit(RLIMIT_NOFILE, &rl) < 0)
		return (void)log_warning("cannot read RLIMIT_NOFILE: %m");
	if (rl.rlim_cur >= rl.rlim_max)
		return;
	rl.rlim_cur = rl.rlim_max;
	if (setrlimit(RLIMIT_NOFILE, &rl) < 0)
		log_warning("cannot raise the soft RLIMIT_NOFILE to %llu: %m",
			    (unsigned long long)rl.rlim_max);
}

static void signal_cb(struct ev_loop *loop, ev_signal *w, int revents)
{
	log_info("received %s, shutting down", sigabbrev_np(w->signum));
	ev_break(loop, EVBREAK_ALL);
}

static void sigchld_cb(struct ev_loop *loop, ev_signal *w, int revents)
{
	vmm_reap_orphans(w->data);
}

/* What the launcher reports: said here, and the orphan reaper, which waits
 * while starts are in flight, runs once they are all answered. */
static void launcher_event(enum launcher_event ev, pid_t pid, size_t n, void *ud)
{
	switch (ev) {
	case LAUNCHER_SETTLED:
		vmm_reap_orphans(ud);
		break;
	case LAUNCHER_ABANDONED:
		log_info("VMM pid %d: its start was abandoned; killed it", (int)pid);
		break;
	case LAUNCHER_BAD_ANSWER:
		log_error(
		    "the VMM launcher gave an answer that cannot be used (pid %d); that start "
		    "failed",
		    (int)pid);
		break;
	case LAUNCHER_LOST:
		log_error("the VMM launcher has exited; no VMM can be started until cprd is "
			  "restarted (%zu start(s) in flight failed)",
			  n);
		break;
	}
}

/* At exit and before a re-exec only: blocks, bounded. */
static void drain_launcher(struct daemon *d)
{
	size_t left = launcher_drain(&d->launcher, 2000);

	if (left > 0)
		log_warning("%zu VMM start(s) still unanswered after 2 s; not waiting longer",
			    left);
}

static bool already_confined(void)
{
	FILE *f = fopen("/proc/self/status", "re");
	char line[128];
	bool yes = false;

	while (f && fgets(line, sizeof(line), f))
		if (strncmp(line, "Seccomp:", 8) == 0)
			yes = atoi(line + 8) == 2;
	if (f)
		fclose(f);
	return yes;
}

/* Exec the re-exec binary from the one fd the seccomp filter lets be
 * executed (sandbox.h): the fd daemon.reexec opened and judged, never its
 * path again (a symlink there may name another file by now). On failure
 * the slot holds its placeholder again. */
static int exec_in_slot(struct daemon *d, char **argv)
{
	_cleanup_close_ int bin = -EBADF;
	char buf[16];
	int r;

	if (d->reexec_fd < 0)
		return -EBADF;
	if (d->exec_slot < 0)
		return -EBADF;
	if (dup3(d->reexec_fd, d->exec_slot, O_CLOEXEC) < 0)
		return -errno;
	snprintf(buf, sizeof(buf), "%d", d->exec_slot);
	setenv(SANDBOX_EXEC_SLOT_ENV, buf, 1);
	syscall(SYS_execveat, d->exec_slot, "", argv, environ, AT_EMPTY_PATH);
	r = -errno;
	bin = open("/dev/null", O_RDONLY | O_CLOEXEC);
	if (bin >= 0)
		(void)dup3(bin, d->exec_slot, O_CLOEXEC);
	return r;
}

/* Replace this process image, keeping every held fd open: they are listed
 * in CPRD_INHERIT and read back by the new image exactly like fds from the
 * service manager's store. The launcher survives too (it was forked before
 * the seccomp filter, and a new one forked now would inherit it). Nothing
 * is moved before execv, so a failed exec leaves everything as it was. */
static int reexec(struct daemon *d)
{
	_cleanup_free_ char *list = NULL;
	size_t len = 0, cap = 4096;
	const memstore_entry *e;
	char buf[32];
	int fds[1024], nfds = 0;
	char **argv = NULL;
	int argc = 0, r;

	list = malloc(cap);
	if (!list)
		return -ENOMEM;
	list[0] = '\0';
#define ADD(fd_, fmt, ...)                                                                   \
	do {                                                                                 \
		int n_ = snprintf(list + len, cap - len, "%s%d:" fmt, len ? "," : "", (fd_), \
				  ##__VA_ARGS__);                                            \
		if (n_ < 0 || (size_t)n_ >= cap - len || nfds >= (int)ELEMENTSOF(fds))       \
			return -E2BIG;                                                       \
		len += (size_t)n_;                                                           \
		fds[nfds++] = (fd_);                                                         \
	} while (0)
	ADD(d->listen_fd, "cprd-listen");
	if (d->launcher.sock >= 0)
		ADD(d->launcher.sock, "cprd-launcher");
	for (size_t i = 0; (e = memstore_nth(d->store, NULL, i)); i++)
		ADD(e->fd, FDSTORE_PREFIX "%s/%s", e->vm, e->name);
	for (struct vm *vm = d->vms; vm; vm = vm->next)
		if (vmm_alive(vm->vmm))
			ADD(vm->vmm->pidfd, FDSTORE_PREFIX "%s/pidfd", vm->cfg.name);
#undef ADD
	/* The new image finds the VMs through the registry. */
	r = vm_registry_commit(d);
	if (r < 0)
		return r;
	for (char **a = d->argv; *a; a++)
		argc++;
	argv = calloc((size_t)argc + 2, sizeof(char *));
	if (!argv)
		return -ENOMEM;
	argv[0] = d->reexec_binary;
	for (int i = 1; i < argc; i++)
		argv[i] = d->argv[i];
	argv[argc] = (char *)"--foreground"; /* detached once already */
	snprintf(buf, sizeof(buf), "%d", (int)d->launcher.pid);
	setenv("CPRD_INHERIT", list, 1);
	setenv("CPRD_REEXEC", "1", 1);
	setenv("CPRD_LAUNCHER_PID", buf, 1);
	if (!d->socket_activated)
		setenv("CPRD_SOCKET_OWNED", "1", 1);
	for (int i = 0; i < nfds; i++)
		fcntl(fds[i], F_SETFD, 0);
	log_notice("re-executing %s with %d fds held", d->reexec_binary, nfds);
	r = exec_in_slot(d, argv);
	for (int i = 0; i < nfds; i++)
		fcntl(fds[i], F_SETFD, FD_CLOEXEC);
	unsetenv("CPRD_INHERIT");
	unsetenv("CPRD_REEXEC");
	unsetenv("CPRD_LAUNCHER_PID");
	unsetenv("CPRD_SOCKET_OWNED");
	unsetenv(SANDBOX_EXEC_SLOT_ENV);
	free(argv);
	return r;
}

static int run(struct daemon *d, const struct options *o, int ready_fd, int listen_fd)
{
	char mode[64], vms[32];
	const char *fields[] = { mode, vms, NULL };
	int r;

	if (o->socket_path)
		d->socket_path = strdup(o->socket_path);
	else if (asprintf(&d->socket_path, "%s/cprd.sock", d->state_dir) < 0)
		d->socket_path = NULL;
	if (!d->socket_path)
		return -ENOMEM;
	/* Narrowed before it listens: no peer ever talks to a cprd that
	 * still has more than it needs (a peer's connect() succeeds as soon
	 * as the socket listens). */
	if (o->sandbox) {
		r = sandbox_drop_caps();
		if (r < 0)
			return log_error_errno(r, "cannot drop capabilities");
	}
	if (o->sandbox && !already_confined()) {
		r = sandbox_apply(d->exec_slot);
		if (r < 0)
			return log_error_errno(r, "cannot apply the seccomp filter");
	}
	r = server_listen(d, listen_fd, rpc_methods, rpc_methods_count);
	if (r < 0)
		return log_error_errno(r, "cannot listen on %s", d->socket_path);
	ev_signal_init(&d->sig_term, signal_cb, SIGTERM);
	ev_signal_init(&d->sig_int, signal_cb, SIGINT);
	ev_signal_start(d->loop, &d->sig_term);
	ev_signal_start(d->loop, &d->sig_int);
	ev_signal_init(&d->sig_chld, sigchld_cb, SIGCHLD);
	d->sig_chld.data = d;
	ev_signal_start(d->loop, &d->sig_chld);
	vmm_reap_orphans(d); /* a re-exec may have inherited some */
	ev_prepare_init(&d->flush, flush_cb);
	d->flush.data = d;
	ev_prepare_start(d->loop, &d->flush);
	ev_init(&d->registry_retry, registry_retry_cb);
	d->registry_retry.repeat = REGISTRY_RETRY_SEC;
	d->registry_retry.data = d;
	/* QEMU writes the logs through fds of its own: cprd sees no write,
	 * so it looks at their sizes every few seconds (cheap: a stat each). */
	d->log_max = (off_t)o->log_max;
	ev_timer_init(&d->log_timer, log_timer_cb, LOG_CHECK_SEC, LOG_CHECK_SEC);
	d->log_timer.data = d;
	if (d->log_max > 0)
		ev_timer_start(d->loop, &d->log_timer);

	snprintf(mode, sizeof(mode), "CPRD_START_MODE=%s", d->start_mode);
	snprintf(vms, sizeof(vms), "CPRD_VMS=%zu", vm_count(d));
	log_struct(LOG_INFO, CPRD_MESSAGE_STARTED, fields,
		   "cprd %s ready on %s (state %s, %s, started %s, %zu VM(s)%s)", CPRD_VERSION,
		   d->socket_activated ? "the activated socket" : d->socket_path, d->state_dir,
		   d->kvm ? "kvm" : "tcg", d->start_mode, vm_count(d),
		   o->sandbox ? "" : ", no sandbox");
	watchdog_start(d);
	sd_notify(0, "READY=1");
	notify_status(d);
	if (ready_fd >= 0) {
		char ok = 0;
		(void)!write(ready_fd, &ok, 1);
		close(ready_fd);
	}
	for (;;) {
		ev_run(d->loop, 0);
		/* ev_break() skips the prepare watchers: what the last turn
		 * changed is written here. */
		flush(d);
		if (!d->reexec_binary)
			break;
		server_flush_all(d, 1000);
		/* Only starts that were let go of can be in flight (re-exec is
		 * refused while a VM starts or updates): kill them here, where
		 * their answers are still understood. */
		drain_launcher(d);
		r = reexec(d);
		log_error("re-exec of %s failed: %s; carrying on", d->reexec_binary, strerror(-r));
		d->reexec_binary = (free(d->reexec_binary), NULL);
		d->reexec_fd = safe_close(d->reexec_fd);
	}

	sd_notify(0, "STOPPING=1");
	if (d->vms)
		log_notice("leaving %zu VM(s) running; their VMMs keep the guests alive",
			   vm_count(d));
	/* A VMM still being started is in no registry entry yet. Its owner
	 * takes the answer first, and records it, while the registry still
	 * holds every update in flight. */
	drain_launcher(d);
	/* Nothing is written from here on: letting go of an update in flight
	 * must leave it in the registry for the next cprd to settle. */
	ev_prepare_stop(d->loop, &d->flush);
	ev_timer_stop(d->loop, &d->registry_retry);
	ev_timer_stop(d->loop, &d->log_timer);
	vm_detach_all(d);
	/* Starts let go of just now (an update's new VMM that had no pid yet,
	 * so no registry entry either) are killed when their answers come. */
	drain_launcher(d);
	server_stop(d);
	return 0;
}

int main(int argc, char **argv)
{
	/* static: what cprd still holds when it exits (the records of VMs it
	 * leaves running, by design) stays reachable, so that LeakSanitizer
	 * reports only what was really lost. */
	static struct daemon d = { .listen_fd = -EBADF,
				   .state_fd = -EBADF,
				   .vms_fd = -EBADF,
				   .archive_fd = -EBADF,
				   .reexec_fd = -EBADF,
				   .launcher = { .sock = -EBADF },
				   .start_mode = "fresh" };
	struct options o;
	struct group *g;
	json_object *pidfds = NULL;
	int ready_fd = -EBADF, listen_fd = -EBADF, launcher_fd = -EBADF, n_inherited, n_vms, r;
	bool reexeced;

	/* First: the number an inherited seccomp filter lets be executed. */
	d.exec_slot = sandbox_exec_slot();
	unsetenv(SANDBOX_EXEC_SLOT_ENV);
	if (parse_options(argc, argv, &o) < 0) {
		help();
		return 2;
	}
	log_setup();
	if (d.exec_slot < 0)
		log_warning("no fd for re-exec (%s): daemon.reexec will fail",
			    strerror(-d.exec_slot));
	signal(SIGPIPE, SIG_IGN);
	if (load_policy(&d.policy, o.vmm_allow) < 0)
		return 1;
	if (setup_state_dir(&d, o.state_dir) < 0)
		return 1;
	if (registry_init(&d.registry, d.state_dir) < 0)
		return 1;
	(void)archive_open(&d, o.log_dir); /* says why when it cannot */
	reexeced = getenv("CPRD_REEXEC") != NULL;
	unsetenv("CPRD_REEXEC");
	if (!o.foreground && !reexeced && !getenv("NOTIFY_SOCKET") && !getenv("LISTEN_FDS")) {
		if (detach(&ready_fd) < 0 || redirect_log(&d) < 0) {
			log_error("cannot detach: %m");
			return 1;
		}
	}
	/* VMMs are double-forked by the launcher; as subreaper the daemon
	 * inherits them and can collect their exit status. */
	prctl(PR_SET_CHILD_SUBREAPER, 1);
	d.argv = argv;
	d.self_path = realpath("/proc/self/exe", NULL);
	r = memstore_new(&d.store);
	if (r < 0)
		return 1;
	n_inherited = inherited_fds_take(&d, &listen_fd, &launcher_fd, &pidfds);
	if (getenv("CPRD_LAUNCHER_PID")) {
		/* Carried over a re-exec; without its socket it had died, and
		 * under the inherited seccomp filter no new one can be forked. */
		d.launcher.sock = launcher_fd;
		d.launcher.pid = launcher_fd >= 0 ? (pid_t)atoi(getenv("CPRD_LAUNCHER_PID")) : 0;
		unsetenv("CPRD_LAUNCHER_PID");
	} else {
		safe_close(launcher_fd);
		r = launcher_start(&d.launcher);
		if (r < 0) {
			log_error_errno(r, "cannot start the launcher");
			return 1;
		}
	}
	raise_fd_limit();
	d.limits = o.limits;
	/* Not ev_default_loop(): the default loop reaps every child through
	 * its own SIGCHLD handler (waitpid(-1)), which would steal the VMMs'
	 * exit status from their pidfds and free their pids for reuse. */
	d.loop = ev_loop_new(EVFLAG_AUTO);
	if (!d.loop) {
		log_error("cannot create the event loop");
		return 1;
	}
	d.events_max_queued = o.events_max_queued;
	d.observe_event = observe_event;
	r = stats_start(&d);
	if (r >= 0)
		r = metrics_start(&d, o.metrics_file, o.metrics_interval);
	if (r >= 0)
		r = launcher_watch(&d.launcher, d.loop, launcher_event, &d);
	if (r < 0) {
		log_error_errno(r, "cannot set up the event loop");
		return 1;
	}
	d.kvm = streq(o.accel, "kvm") ||
		(streq(o.accel, "auto") && access("/dev/kvm", R_OK | W_OK) == 0);
	d.confine = o.confine;
	d.vmm_id_base = o.vmm_id_base;
	d.vmm_id_count = o.vmm_id_count;
	if (!d.confine)
		log_warning("--no-confine: VMMs run as root in cprd's namespaces, and a guest that "
			    "takes over its VMM owns the host");
	g = getgrnam("cprd");
	d.have_group = g != NULL;
	d.group = g ? g->gr_gid : 0;
	d.started_usec = now_usec(CLOCK_REALTIME);
	d.started_mono = now_usec(CLOCK_MONOTONIC);
	d.checkpoint_dir = o.checkpoint_dir;
	n_vms = recover(&d, pidfds);
	if (o.restore_on_start)
		checkpoint_restore_all(&d); /* once the loop runs */
	json_object_put(pidfds);            /* its fds were taken or closed by recover() */
	if (reexeced)
		d.start_mode = "re-exec";
	else if (n_inherited > 0)
		d.start_mode = "fd-store";
	else if (n_vms > 0)
		d.start_mode = "recovered";
	r = run(&d, &o, ready_fd, listen_fd);
	recover_done(&d);
	launcher_stop(&d.launcher);
	memstore_free(d.store);
	stats_free(&d);
	metrics_free(&d);
	scope_close(&d);
	ev_loop_destroy(d.loop);
	registry_done(&d.registry);
	safe_close(d.vms_fd);
	safe_close(d.state_fd);
	free(d.socket_path);
	free(d.state_dir);
	free(d.self_path);
	policy_done(&d.policy);
	return r < 0 ? 1 : 0;
}
