/* SPDX-License-Identifier: MIT */
#include <fcntl.h>
#include <linux/close_range.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <sys/pidfd.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#include "common/macro.h"
#include "daemon/host/confine.h"
#include "daemon/core/daemon.h"
#include "daemon/host/launcher.h"
#include "proto/frame.h"

/* A request is this header followed by the argv (argc strings, each
 * NUL-ended) and, for a confined VMM, the directory it may write; the
 * answer echoes the id. Ids increase for the daemon's whole life (they
 * start from its clock, so they go on increasing across a re-exec). */
struct request {
	uint64_t id;
	uint32_t uid, gid; /* 0: not confined */
	uint32_t flags;
	uint32_t argc;
};

#define REQUEST_KVM 1U

struct reply {
	uint64_t id;   /* 0: a request the launcher could not read */
	int32_t error; /* 0 or a positive errno */
	int32_t pid;
};

struct launcher_request {
	uint64_t id;
	launcher_spawn_fn cb; /* NULL once cancelled */
	void *ud;
	struct launcher_request *next;
};

/* In the grandchild: put fds[i] at 3 + i, clear close-on-exec on exactly
 * those, and exec. Only async-signal-safe calls from here on. */
_Noreturn static void exec_child(char *const *argv, int log_fd, int *fds, size_t nfds, int err_fd,
				 const struct confine *conf)
{
	sigset_t all;
	int null_fd, e;

	sigemptyset(&all);
	sigprocmask(SIG_SETMASK, &all, NULL);
	for (int s = 1; s < NSIG; s++)
		signal(s, SIG_DFL);

	/* Move everything above the target range first so that placing fd i
	 * can never overwrite a source that is still to be placed. */
	for (size_t i = 0; i < nfds; i++) {
		fds[i] = fcntl(fds[i], F_DUPFD_CLOEXEC, 3 + (int)nfds + 8);
		if (fds[i] < 0)
			goto fail;
	}
	log_fd = fcntl(log_fd, F_DUPFD_CLOEXEC, 3 + (int)nfds + 8);
	err_fd = fcntl(err_fd, F_DUPFD_CLOEXEC, 3 + (int)nfds + 8);
	null_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
	if (log_fd < 0 || err_fd < 0 || null_fd < 0)
		goto fail;
	if (dup2(null_fd, 0) < 0 || dup2(log_fd, 1) < 0 || dup2(log_fd, 2) < 0)
		goto fail;
	for (size_t i = 0; i < nfds; i++)
		if (dup2(fds[i], 3 + (int)i) < 0)
			goto fail;
	/* Whatever else is open gets close-on-exec, err_fd included. */
	if (syscall(SYS_close_range, 3 + nfds, ~0U, CLOSE_RANGE_CLOEXEC) < 0)
		goto fail;
	if (conf && conf->uid > 0) {
		int r = confine_enter(conf, argv[0]);

		if (r < 0) {
			errno = -r;
			goto fail;
		}
	}
	/* execv, not execvp: the daemon resolved the path already, and execvp
	 * would hand a non-executable file to /bin/sh on ENOEXEC. */
	execv(argv[0], argv);
fail:
	e = errno;
	(void)!write(err_fd, &e, sizeof(e));
	_exit(127);
}

/* argc strings into argv, and the one after them, if any, into *ret_rest. */
static int parse_argv(char *buf, size_t len, uint32_t argc, char **argv, size_t max,
		      char **ret_rest)
{
	size_t n = 0, off = 0;

	*ret_rest = NULL;
	if (len == 0 || buf[len - 1] != '\0' || argc == 0 || argc >= max)
		return -EINVAL;
	for (; off < len && n < argc; off += strlen(buf + off) + 1)
		argv[n++] = buf + off;
	if (n != argc)
		return -EINVAL;
	argv[n] = NULL;
	if (off < len)
		*ret_rest = buf + off;
	return argv[0][0] ? 0 : -EINVAL;
}

/* Fork twice; the grandchild execs, the middle child exits at once so the
 * VMM is re-parented to the daemon (the subreaper). Returns the grandchild's
 * pid and the exec's result (0, or a negative errno). */
static int spawn(char **argv, int log_fd, int *fds, size_t nfds, const struct confine *conf,
		 pid_t *ret_pid)
{
	int errp[2], pidp[2], e = 0;
	pid_t mid, pid = -1;
	ssize_t n;

	if (pipe2(errp, O_CLOEXEC) < 0)
		return -errno;
	if (pipe2(pidp, O_CLOEXEC) < 0) {
		close_many(errp, 2);
		return -errno;
	}
	mid = fork();
	if (mid < 0) {
		e = -errno;
		close_many(errp, 2);
		close_many(pidp, 2);
		return e;
	}
	if (mid == 0) {
		pid_t g;

		setsid();
		/* The namespaces here, so that the VMM is pid 1 of its own pid
		 * namespace while g, the pid reported, is its pid as the
		 * launcher and cprd see it. */
		if (conf && conf->uid > 0 && unshare(CONFINE_NAMESPACES) < 0) {
			e = errno;
			dprintf(log_fd, "cprd launcher: cannot confine the VMM: unshare: %s\n",
				strerror(e));
			(void)!write(errp[1], &e, sizeof(e));
			_exit(1);
		}
		g = fork();
		if (g == 0)
			exec_child(argv, log_fd, fds, nfds, errp[1], conf);
		(void)!write(pidp[1], &g, sizeof(g));
		_exit(g < 0 ? 1 : 0);
	}
	close(errp[1]);
	close(pidp[1]);
	n = read(pidp[0], &pid, sizeof(pid));
	close(pidp[0]);
	while (waitpid(mid, NULL, 0) < 0 && errno == EINTR)
		;
	if (n != sizeof(pid) || pid <= 0) {
		/* The middle child's own failure, when it says which. */
		n = read(errp[0], &e, sizeof(e));
		close(errp[0]);
		return n == sizeof(e) && e > 0 ? -e : -ECHILD;
	}
	/* EOF means the exec happened (the pipe was close-on-exec). */
	do
		n = read(errp[0], &e, sizeof(e));
	while (n < 0 && errno == EINTR);
	close(errp[0]);
	*ret_pid = pid;
	return n == sizeof(e) ? -e : 0;
}

static void send_reply(int sock, uint64_t id, int error, pid_t pid)
{
	struct reply rep = { .id = id, .error = error, .pid = pid };
	_cleanup_close_ int pidfd = -EBADF;

	if (pid > 0)
		pidfd = pidfd_open(pid, 0);
	(void)proto_send_fds(sock, &rep, sizeof(rep), pidfd >= 0 ? &pidfd : NULL, pidfd >= 0);
}

/* What tells cprd about its service manager, and what cprd passes to its
 * own re-exec, is cprd's alone: a VMM holding NOTIFY_SOCKET or LISTEN_FDS
 * could speak for the service, or misread fds as its own. The rest of the
 * environment (PATH, locale, whatever a VMM wrapper relies on) is kept. */
static void drop_daemon_environment(void)
{
	static const char *const names[] = {
		"NOTIFY_SOCKET",     "LISTEN_PID",        "LISTEN_FDS",   "LISTEN_FDNAMES",
		"WATCHDOG_PID",      "WATCHDOG_USEC",     "CPRD_INHERIT", "CPRD_REEXEC",
		"CPRD_LAUNCHER_PID", "CPRD_SOCKET_OWNED",
	};

	for (size_t i = 0; i < ELEMENTSOF(names); i++)
		unsetenv(names[i]);
}

_Noreturn static void launcher_main(int sock)
{
	static char buf[sizeof(struct request) + LAUNCHER_MAX_REQUEST];

	prctl(PR_SET_PDEATHSIG, SIGKILL);
	prctl(PR_SET_NAME, "cprd-launcher");
	signal(SIGCHLD, SIG_DFL);
	signal(SIGTERM, SIG_DFL);
	drop_daemon_environment();
	for (;;) {
		int fds[LAUNCHER_MAX_FDS + 1];
		char *argv[256], *rw_dir = NULL;
		size_t nfds = 0;
		struct request req;
		struct confine conf = {};
		pid_t pid = -1;
		ssize_t n;
		int r;

		n = proto_recv_fds(sock, buf, sizeof(buf), fds, ELEMENTSOF(fds), &nfds);
		if (n == 0)
			_exit(0);
		if (n < 0) {
			if (n == -EINTR)
				continue;
			send_reply(sock, 0, (int)-n, -1);
			continue;
		}
		if ((size_t)n < sizeof(req)) {
			close_many(fds, nfds);
			send_reply(sock, 0, EINVAL, -1);
			continue;
		}
		memcpy(&req, buf, sizeof(req));
		/* fds[0] is the log, the rest go to 3, 4, ... */
		r = nfds < 1 ? -EBADF
			     : parse_argv(buf + sizeof(req), (size_t)n - sizeof(req), req.argc,
					  argv, ELEMENTSOF(argv), &rw_dir);
		conf = (struct confine){ .uid = req.uid,
					 .gid = req.gid,
					 .kvm = req.flags & REQUEST_KVM,
					 .rw_dir = rw_dir };
		/* Confined without a directory, or with root's gid: refused,
		 * never run with less confinement than asked for. */
		if (r == 0 && req.uid > 0 && (!rw_dir || req.gid == 0))
			r = -EINVAL;
		if (r == 0)
			r = spawn(argv, fds[0], fds + 1, nfds - 1, &conf, &pid);
		close_many(fds, nfds);
		send_reply(sock, req.id, -r, pid);
	}
}

int launcher_start(launcher *l)
{
	int sv[2];
	pid_t pid;

	if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0)
		return -errno;
	pid = fork();
	if (pid < 0) {
		close_many(sv, 2);
		return -errno;
	}
	if (pid == 0) {
		close(sv[0]);
		/* Drop anything inherited (socket activation fds, fd store) so
		 * that VMMs can never hold the daemon's own endpoints. */
		if (sv[1] != 3) {
			if (dup2(sv[1], 3) < 0)
				_exit(1);
			sv[1] = 3;
		}
		syscall(SYS_close_range, 4, ~0U, 0);
		launcher_main(sv[1]);
	}
	close(sv[1]);
	l->sock = sv[0];
	l->pid = pid;
	return 0;
}

void launcher_stop(launcher *l)
{
	if (l->loop)
		ev_io_stop(l->loop, &l->watcher);
	l->sock = safe_close(l->sock);
	if (l->pid > 0) {
		kill(l->pid, SIGTERM);
		while (waitpid(l->pid, NULL, 0) < 0 && errno == EINTR)
			;
		l->pid = 0;
	}
	while (l->requests) {
		struct launcher_request *q = l->requests;

		l->requests = q->next;
		free(q);
	}
	l->in_flight = 0;
}

const char *launcher_strerror(int r)
{
	if (r == -LAUNCHER_GONE)
		return "cprd's VMM launcher has exited; VMMs can be started again once cprd is "
		       "restarted";
	return strerror(-r);
}

size_t launcher_in_flight(const launcher *l)
{
	return l->in_flight;
}

/* The pidfd came from our own launcher, but it is checked like any fd that
 * enters the daemon: it must be a pidfd, and of the pid that came with it. */
static bool pidfd_names(int pidfd, pid_t pid)
{
	char path[64], buf[512], *p;
	_cleanup_close_ int fd = -EBADF;
	ssize_t n;

	snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", pidfd);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return false;
	n = read(fd, buf, sizeof(buf) - 1);
	if (n <= 0)
		return false;
	buf[n] = '\0';
	p = strstr(buf, "\nPid:");
	return p && atoi(p + 5) == (int)pid;
}

static void notify(launcher *l, enum launcher_event ev, pid_t pid, size_t n)
{
	if (l->event)
		l->event(ev, pid, n, l->event_ud);
}

static struct launcher_request *take_request(launcher *l, uint64_t id)
{
	for (struct launcher_request **pp = &l->requests; *pp; pp = &(*pp)->next) {
		struct launcher_request *q = *pp;

		/* Id 0 answers a request the launcher could not read: it
		 * serves them in order, so that is the oldest one. */
		if (id == 0 || q->id == id) {
			*pp = q->next;
			l->in_flight--;
			return q;
		}
	}
	return NULL;
}

static void deliver(launcher *l, const struct reply *rep, int pidfd)
{
	struct launcher_request *q = take_request(l, rep->id);
	launcher_spawn_fn cb = q ? q->cb : NULL;
	void *ud = q ? q->ud : NULL;
	int error = -rep->error;

	free(q);
	if (pidfd >= 0 && !pidfd_names(pidfd, rep->pid)) {
		pidfd = safe_close(pidfd);
		if (error == 0)
			error = -EPROTO;
		notify(l, LAUNCHER_BAD_ANSWER, rep->pid, 1);
	}
	if (!cb) {
		/* Cancelled (or from before a re-exec): nobody wants this
		 * VMM. It never had a monitor client or a registry entry, so
		 * it goes; the orphan reaper collects it. */
		if (pidfd >= 0) {
			(void)pidfd_send_signal(pidfd, SIGKILL, NULL, 0);
			safe_close(pidfd);
			if (error == 0)
				notify(l, LAUNCHER_ABANDONED, rep->pid, 1);
		}
		return;
	}
	cb(error, rep->pid, pidfd, ud);
}

/* Read every answer waiting. false when the launcher has closed its end. */
static bool read_answers(launcher *l)
{
	for (;;) {
		struct reply rep;
		int pidfd = -EBADF;
		size_t n_fds = 0;
		ssize_t n;

		if (l->sock < 0)
			return false;
		n = proto_recv_fds(l->sock, &rep, sizeof(rep), &pidfd, 1, &n_fds);
		if (n == -EAGAIN)
			return true;
		if (n == 0 || n == -ECONNRESET)
			return false;
		if (n < 0 && n != -EBADMSG)
			return true; /* nothing was taken from the socket */
		if (n != sizeof(rep)) {
			if (n_fds) { /* whatever it names, nobody will own it */
				(void)pidfd_send_signal(pidfd, SIGKILL, NULL, 0);
				safe_close(pidfd);
			}
			notify(l, LAUNCHER_BAD_ANSWER, 0, 1);
			/* It answers in order: this was the oldest request's. */
			rep = (struct reply){ .id = 0, .error = EPROTO };
			pidfd = -EBADF;
			n_fds = 0;
		}
		deliver(l, &rep, n_fds ? pidfd : -EBADF);
	}
}

static void launcher_io_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	launcher *l = w->data;

	if (!read_answers(l))
		launcher_lost(l);
	if (l->in_flight == 0)
		notify(l, LAUNCHER_SETTLED, 0, 0);
}

void launcher_lost(launcher *l)
{
	size_t failed = 0;

	if (l->gone)
		return;
	/* What it answered before it went is still in the socket. */
	(void)read_answers(l);
	l->gone = true;
	if (l->loop)
		ev_io_stop(l->loop, &l->watcher);
	l->sock = safe_close(l->sock);
	while (l->requests) {
		struct launcher_request *q = l->requests;

		l->requests = q->next;
		l->in_flight--;
		if (q->cb) {
			failed++;
			q->cb(-LAUNCHER_GONE, 0, -EBADF, q->ud);
		}
		free(q);
	}
	notify(l, LAUNCHER_LOST, l->pid, failed);
}

int launcher_watch(launcher *l, struct ev_loop *loop, launcher_event_fn event, void *ud)
{
	int fl;

	l->loop = loop;
	l->event = event;
	l->event_ud = ud;
	/* Increasing across re-execs of the daemon, so an answer meant for
	 * the previous image is never taken for one of ours. */
	l->next_id = now_usec(CLOCK_MONOTONIC);
	ev_io_init(&l->watcher, launcher_io_cb, l->sock, EV_READ);
	l->watcher.data = l;
	if (l->sock < 0) {
		l->gone = true;
		return 0;
	}
	/* Non-blocking on our end only: the launcher's end is a socket of
	 * its own, and it blocks there waiting for work. */
	fl = fcntl(l->sock, F_GETFL);
	if (fl < 0 || fcntl(l->sock, F_SETFL, fl | O_NONBLOCK) < 0)
		return -errno;
	ev_io_start(loop, &l->watcher);
	return 0;
}

int launcher_spawn(launcher *l, char *const *argv, int log_fd, const int *fds, size_t nfds,
		   launcher_spawn_fn cb, void *ud, uint64_t *ret_id)
{
	return launcher_spawn_confined(l, argv, log_fd, fds, nfds, NULL, cb, ud, ret_id);
}

int launcher_spawn_confined(launcher *l, char *const *argv, int log_fd, const int *fds, size_t nfds,
			    const struct launcher_confine *conf, launcher_spawn_fn cb, void *ud,
			    uint64_t *ret_id)
{
	_cleanup_free_ char *buf = NULL;
	_cleanup_free_ struct launcher_request *q = NULL;
	int all[LAUNCHER_MAX_FDS + 1];
	struct request req = {};
	size_t len = 0;
	ssize_t n;

	if (l->gone || l->sock < 0)
		return -LAUNCHER_GONE;
	if (nfds > LAUNCHER_MAX_FDS)
		return -E2BIG;
	if (conf && (conf->uid == 0 || conf->gid == 0 || !conf->rw_dir))
		return -EINVAL;
	for (char *const *a = argv; *a; a++) {
		len += strlen(*a) + 1;
		req.argc++;
	}
	if (conf)
		len += strlen(conf->rw_dir) + 1;
	if (len == 0 || len > LAUNCHER_MAX_REQUEST)
		return -E2BIG;
	buf = malloc(sizeof(req) + len);
	q = calloc(1, sizeof(*q));
	if (!buf || !q)
		return -ENOMEM;
	req.id = ++l->next_id;
	if (conf) {
		req.uid = conf->uid;
		req.gid = conf->gid;
		req.flags = conf->kvm ? REQUEST_KVM : 0;
	}
	memcpy(buf, &req, sizeof(req));
	len = sizeof(req);
	for (char *const *a = argv; *a; a++)
		len += (size_t)(stpcpy(buf + len, *a) - (buf + len)) + 1;
	if (conf)
		len += (size_t)(stpcpy(buf + len, conf->rw_dir) - (buf + len)) + 1;
	all[0] = log_fd;
	memcpy(all + 1, fds, nfds * sizeof(int));

	/* Non-blocking: the socket holds hundreds of requests, and one that
	 * does not fit is refused (EAGAIN) rather than waited for. */
	n = proto_send_fds(l->sock, buf, len, all, nfds + 1);
	/* Its watcher sees the end of the stream and fails what is in flight:
	 * not from in here, under this caller's feet. */
	if (n == -EPIPE || n == -ECONNRESET || n == -ENOTCONN)
		return -LAUNCHER_GONE;
	if (n < 0)
		return (int)n;
	q->id = req.id;
	q->cb = cb;
	q->ud = ud;
	/* Oldest first: the launcher answers in order. */
	{
		struct launcher_request **pp = &l->requests;

		while (*pp)
			pp = &(*pp)->next;
		*pp = TAKE_PTR(q);
	}
	l->in_flight++;
	*ret_id = req.id;
	return 0;
}

void launcher_cancel(launcher *l, uint64_t id)
{
	for (struct launcher_request *q = l->requests; q; q = q->next)
		if (q->id == id) {
			q->cb = NULL;
			q->ud = NULL;
			return;
		}
}

size_t launcher_drain(launcher *l, int timeout_ms)
{
	uint64_t deadline = now_usec(CLOCK_MONOTONIC) + (uint64_t)timeout_ms * 1000;

	while (l->in_flight > 0 && l->sock >= 0) {
		struct pollfd p = { .fd = l->sock, .events = POLLIN };
		int64_t left = (int64_t)(deadline - now_usec(CLOCK_MONOTONIC)) / 1000;

		if (left <= 0 || poll(&p, 1, (int)left) == 0)
			break;
		if (!read_answers(l))
			launcher_lost(l);
	}
	return l->in_flight;
}
