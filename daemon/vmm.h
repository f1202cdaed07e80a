/* SPDX-License-Identifier: MIT */
/*
 * One VMM process as the daemon sees it: its pid and pidfd, its QMP
 * connection, and the watchers that drive both on the event loop. A VM has
 * one; an update briefly has a second. Heap-allocated because the libev
 * watchers inside must never move once started.
 */
#pragma once

#include <ev.h>
#include <json-c/json.h>
#include <stdint.h>
#include <sys/types.h>

#include "daemon/daemon.h"
#include "kvm/qmp.h"

struct vm_config;
struct vmm;

struct vmm_ops {
	void (*ready)(struct vmm *v, void *ud); /* QMP negotiated */
	void (*event)(struct vmm *v, const char *event, json_object *data, int64_t ts_us, void *ud);
	void (*exited)(struct vmm *v, void *ud); /* reaped; exit_code/exit_desc set */
};

struct vmm {
	struct daemon *d;
	pid_t pid;
	int pidfd;
	ev_io pid_watcher;
	qmp *qmp;
	ev_io qmp_watcher;
	char *qmp_path;
	char *binary;
	char version[32];
	unsigned long long start_time;  /* /proc/PID/stat starttime: identity */
	uint64_t spawned_usec;          /* CLOCK_MONOTONIC at spawn, 0 if attached */
	int fd_ram, fd_console, fd_tap; /* where the held fds sit in the VMM */
	int exit_code;                  /* -1 unknown */
	char exit_desc[64];
	const struct vmm_ops *ops;
	void *ud;
	struct vmm *daemon_next; /* in d->vmms */
	/* A callback run from this VMM's own QMP dispatch may free it (a
	 * reply that triggers a rollback, say). The client is still on the
	 * stack then, so vmm_free() only marks it and the dispatch finishes
	 * the job on its way out. */
	bool dispatching, doomed;
};

/* How a new VMM receives its guest: not at all (a fresh boot), with
 * -incoming defer, or as a cpr-transfer destination on two socket paths. */
struct vmm_incoming {
	bool defer;
	const char *cpr_main_path, *cpr_state_path;
};

/* Start a VMM for cfg using the fds held for the VM, with its monitor on
 * qmp_path and its output appended to log_path. in may be NULL. */
/* Whether pid is a VMM that cprd watches (and so reaps through its pidfd). */
bool vmm_pid_watched(const struct daemon *d, pid_t pid);

int vmm_start(struct daemon *d, const struct vm_config *cfg, const char *binary,
	      const char *qmp_path, const char *log_path, const struct vmm_incoming *in,
	      const struct vmm_ops *ops, void *ud, struct vmm **ret);

/* Take over a VMM that is already running (after cprd restarted): watch
 * pidfd (taken) and connect to its monitor at qmp_path. -ENOTCONN when the
 * monitor is unreachable: *ret is still set (without a monitor). */
int vmm_attach(struct daemon *d, pid_t pid, int pidfd, const char *binary, const char *qmp_path,
	       const struct vmm_ops *ops, void *ud, struct vmm **ret);

/* Start the pidfd and monitor watchers of an attached VMM. */
void vmm_watch(struct vmm *v);

/* Blocking QMP exchange with a deadline, for start-up recovery before the
 * daemon serves anyone: waits for the monitor, runs cmd, gives its
 * "return" (owned) or a negative errno. */
int vmm_command_sync(struct vmm *v, const char *cmd, json_object *args, int timeout_ms,
		     json_object **ret);

/* {"ram0": 3, "console": 4, ...}: the held fds as the VMM sees them. */
json_object *vmm_fd_map(const struct vmm *v);

/* Stop watching and free; the process, if any, and its monitor socket are
 * left alone. */
struct vmm *vmm_free(struct vmm *v);
/* SIGKILL and reap at once (a killed process exits promptly), remove its
 * monitor socket, then free. */
struct vmm *vmm_kill(struct vmm *v);
int vmm_signal(struct vmm *v, int sig);
bool vmm_alive(const struct vmm *v);

/* Queue a QMP command; -ENOTCONN when the monitor is gone. */
int vmm_command(struct vmm *v, const char *cmd, json_object *args, int fd, qmp_reply_fn cb,
		void *ud);
void vmm_set_ops(struct vmm *v, const struct vmm_ops *ops, void *ud);

/* Last bytes of a log file, newlines folded: what a VMM said before dying. */
void log_tail(const char *path, char *buf, size_t size);
