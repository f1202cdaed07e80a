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
#include "daemon/launcher.h"
#include "proto/frame.h"

#define LAUNCHER_TIMEOUT_MS 10000

struct reply {
	int32_t error; /* 0 or a positive errno */
	int32_t pid;
};

/* In the grandchild: put fds[i] at 3 + i, clear close-on-exec on exactly
 * those, and exec. Only async-signal-safe calls from here on. */
_Noreturn static void exec_child(char *const *argv, int log_fd, int *fds, size_t nfds, int err_fd)
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
	/* execv, not execvp: the daemon resolved the path already, and execvp
	 * would hand a non-executable file to /bin/sh on ENOEXEC. */
	execv(argv[0], argv);
fail:
	e = errno;
	(void)!write(err_fd, &e, sizeof(e));
	_exit(127);
}

static int parse_argv(char *buf, size_t len, char **argv, size_t max)
{
	size_t n = 0;

	if (len == 0 || buf[len - 1] != '\0')
		return -EINVAL;
	for (size_t off = 0; off < len; off += strlen(buf + off) + 1) {
		if (n + 1 >= max)
			return -E2BIG;
		argv[n++] = buf + off;
	}
	argv[n] = NULL;
	return argv[0][0] ? 0 : -EINVAL;
}

/* Fork twice; the grandchild execs, the middle child exits at once so the
 * VMM is re-parented to the daemon (the subreaper). Returns the grandchild's
 * pid and the exec's result (0, or a negative errno). */
static int spawn(char **argv, int log_fd, int *fds, size_t nfds, pid_t *ret_pid)
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
		g = fork();
		if (g == 0)
			exec_child(argv, log_fd, fds, nfds, errp[1]);
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
		close(errp[0]);
		return -ECHILD;
	}
	/* EOF means the exec happened (the pipe was close-on-exec). */
	do
		n = read(errp[0], &e, sizeof(e));
	while (n < 0 && errno == EINTR);
	close(errp[0]);
	*ret_pid = pid;
	return n == sizeof(e) ? -e : 0;
}

static void send_reply(int sock, int error, pid_t pid)
{
	struct reply rep = { .error = error, .pid = pid };
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
	static char buf[LAUNCHER_MAX_REQUEST];

	prctl(PR_SET_PDEATHSIG, SIGKILL);
	prctl(PR_SET_NAME, "cprd-launcher");
	signal(SIGCHLD, SIG_DFL);
	signal(SIGTERM, SIG_DFL);
	drop_daemon_environment();
	for (;;) {
		int fds[LAUNCHER_MAX_FDS + 1];
		char *argv[256];
		size_t nfds = 0;
		pid_t pid = -1;
		ssize_t n;
		int r;

		n = proto_recv_fds(sock, buf, sizeof(buf), fds, ELEMENTSOF(fds), &nfds);
		if (n == 0)
			_exit(0);
		if (n < 0) {
			if (n == -EINTR)
				continue;
			send_reply(sock, (int)-n, -1);
			continue;
		}
		/* fds[0] is the log, the rest go to 3, 4, ... */
		r = nfds < 1 ? -EBADF : parse_argv(buf, (size_t)n, argv, ELEMENTSOF(argv));
		if (r == 0)
			r = spawn(argv, fds[0], fds + 1, nfds - 1, &pid);
		close_many(fds, nfds);
		send_reply(sock, -r, pid);
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
	l->sock = safe_close(l->sock);
	if (l->pid > 0) {
		kill(l->pid, SIGTERM);
		while (waitpid(l->pid, NULL, 0) < 0 && errno == EINTR)
			;
		l->pid = 0;
	}
}

int launcher_spawn(launcher *l, char *const *argv, int log_fd, const int *fds, size_t nfds,
		   pid_t *ret_pid, int *ret_pidfd)
{
	_cleanup_free_ char *buf = NULL;
	int all[LAUNCHER_MAX_FDS + 1], got = -EBADF;
	struct reply rep;
	size_t len = 0, ngot = 0;
	struct pollfd pfd = { .fd = l->sock, .events = POLLIN };
	ssize_t n;
	int r;

	if (nfds > LAUNCHER_MAX_FDS)
		return -E2BIG;
	for (char *const *a = argv; *a; a++)
		len += strlen(*a) + 1;
	if (len == 0 || len > LAUNCHER_MAX_REQUEST)
		return -E2BIG;
	buf = malloc(len);
	if (!buf)
		return -ENOMEM;
	len = 0;
	for (char *const *a = argv; *a; a++)
		len += (size_t)(stpcpy(buf + len, *a) - (buf + len)) + 1;
	all[0] = log_fd;
	memcpy(all + 1, fds, nfds * sizeof(int));

	n = proto_send_fds(l->sock, buf, len, all, nfds + 1);
	if (n < 0)
		return (int)n;
	/* The launcher answers once the exec happened or failed: a bounded
	 * wait on a local process, never on the VMM itself. */
	do
		r = poll(&pfd, 1, LAUNCHER_TIMEOUT_MS);
	while (r < 0 && errno == EINTR);
	if (r <= 0)
		return r < 0 ? -errno : -ETIMEDOUT;
	n = proto_recv_fds(l->sock, &rep, sizeof(rep), &got, 1, &ngot);
	if (n < 0)
		return (int)n;
	if (n != sizeof(rep))
		return -EPROTO;
	*ret_pidfd = ngot ? got : -EBADF;
	*ret_pid = rep.pid;
	return -rep.error;
}
