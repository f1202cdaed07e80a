/* SPDX-License-Identifier: MIT */
/*
 * The privileged launcher: a small process forked before the daemon confines
 * itself with seccomp, so that VMMs neither inherit the filter nor need the
 * daemon to be allowed fork/exec. The daemon sends it an argv and the fds
 * the VMM must inherit; it answers with the VMM's pid and a pidfd.
 *
 * VMMs are double-forked and so re-parented to the daemon, which is a child
 * subreaper: it can collect their exit status through the pidfd, and the
 * pid of an exited VMM stays reserved until the daemon has reaped it.
 */
#pragma once

#include <stddef.h>
#include <sys/types.h>

#define LAUNCHER_MAX_FDS 16
#define LAUNCHER_MAX_REQUEST 65536

typedef struct launcher {
	int sock;  /* SOCK_SEQPACKET to the launcher process */
	pid_t pid; /* the launcher process */
} launcher;

/* Fork the launcher. Call before the sandbox and before opening anything
 * the launcher must not hold. */
int launcher_start(launcher *l);
void launcher_stop(launcher *l);

/*
 * Start argv[0] (an absolute path) with log_fd as stdout and stderr,
 * /dev/null as stdin, and fds[i] at fd number 3 + i; no other fd survives
 * the exec. On success returns 0 with the VMM's pid and a pidfd
 * (close-on-exec). When the exec itself failed, returns the exec's negative
 * errno and still hands back the pidfd of the failed child so the caller can
 * reap it (*ret_pidfd may be -1 if no child was created).
 */
int launcher_spawn(launcher *l, char *const *argv, int log_fd, const int *fds, size_t nfds,
		   pid_t *ret_pid, int *ret_pidfd);
