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
 *
 * The exchange never blocks the daemon: each request carries an id, and
 * the answer is read from a watcher on the event loop and handed to the
 * request's callback. Several requests may be in flight; the launcher
 * serves them one after the other.
 */
#pragma once

#include <ev.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define LAUNCHER_MAX_FDS 16
#define LAUNCHER_MAX_REQUEST 65536

/* The launcher process is gone: nothing can be started any more (a new one
 * cannot be forked under the seccomp filter). launcher_strerror() says so. */
#define LAUNCHER_GONE ESHUTDOWN

/*
 * The answer to one request. error is 0, or a negative errno: the exec's
 * own (then pidfd, if not -EBADF, is the failed child's, which exits at
 * once with status 127 and is the callee's to reap), or LAUNCHER_GONE. The
 * pidfd is the callee's either way.
 */
typedef void (*launcher_spawn_fn)(int error, pid_t pid, int pidfd, void *ud);

struct launcher_request;

/* What the launcher tells its user, who decides what to say about it (the
 * launcher itself logs nothing). */
enum launcher_event {
	LAUNCHER_SETTLED,    /* the last request in flight has been answered */
	LAUNCHER_ABANDONED,  /* a cancelled start's VMM, pid, was SIGKILLed */
	LAUNCHER_BAD_ANSWER, /* an answer that could not be used; its start failed */
	LAUNCHER_LOST,       /* the launcher exited; n starts in flight failed */
};
typedef void (*launcher_event_fn)(enum launcher_event ev, pid_t pid, size_t n, void *ud);

typedef struct launcher {
	int sock;  /* SOCK_SEQPACKET to the launcher process */
	pid_t pid; /* the launcher process; 0 once reaped */
	struct ev_loop *loop;
	ev_io watcher;
	uint64_t next_id;
	struct launcher_request *requests; /* in flight, oldest first */
	size_t in_flight;
	bool gone;
	launcher_event_fn event;
	void *event_ud;
} launcher;

/* Fork the launcher. Call before the sandbox and before opening anything
 * the launcher must not hold. */
int launcher_start(launcher *l);
/* Read answers on loop from now on (sock may have come over a re-exec). */
int launcher_watch(launcher *l, struct ev_loop *loop, launcher_event_fn event, void *ud);
/* Close the socket and end the launcher process; blocks (daemon exit). */
void launcher_stop(launcher *l);

/*
 * Ask for argv[0] (an absolute path) to be started with log_fd as stdout
 * and stderr, /dev/null as stdin, and fds[i] at fd number 3 + i; no other
 * fd survives the exec. Returns at once, with the request's id: cb gets
 * the answer later from the event loop, never from in here. The fds are
 * copied into the request; the caller keeps its own.
 */
int launcher_spawn(launcher *l, char *const *argv, int log_fd, const int *fds, size_t nfds,
		   launcher_spawn_fn cb, void *ud, uint64_t *ret_id);

/* How a VMM is confined (daemon/host/confine.h does it in the VMM's process):
 * its own pid, mount, ipc and uts namespaces, a minimal read-only root with
 * rw_dir the one writable host directory (at its own path), uid and gid
 * (both non-zero), no supplementary group but /dev/kvm's when kvm, no
 * capabilities, no_new_privs. A start that cannot be confined fails; it
 * never runs with less. */
struct launcher_confine {
	uid_t uid;
	gid_t gid;
	bool kvm;
	const char *rw_dir;
};
/* launcher_spawn(), confined as conf says (NULL: not at all). */
int launcher_spawn_confined(launcher *l, char *const *argv, int log_fd, const int *fds, size_t nfds,
			    const struct launcher_confine *conf, launcher_spawn_fn cb, void *ud,
			    uint64_t *ret_id);
/* The requester lets go: its callback is never called, and the process,
 * when the answer names one, is SIGKILLed (and left to the daemon's orphan
 * reaper). No-op for an id not in flight. */
void launcher_cancel(launcher *l, uint64_t id);
/* Requests sent and not yet answered, cancelled ones included. While there
 * are any, a child of the daemon may be a VMM whose pid is not known yet. */
size_t launcher_in_flight(const launcher *l);
/* The launcher process exited (its socket closed, or it was reaped): read
 * what it answered before it went, then fail every request still in flight
 * with LAUNCHER_GONE. Idempotent. */
void launcher_lost(launcher *l);
/* Wait (blocking, at most timeout_ms) for the answers in flight, handling
 * them as the loop would: for exit and re-exec only. Returns how many are
 * still in flight. */
size_t launcher_drain(launcher *l, int timeout_ms);

/* strerror() that also names LAUNCHER_GONE for what it is. */
const char *launcher_strerror(int r);
