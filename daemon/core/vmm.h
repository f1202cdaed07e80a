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

#include "daemon/core/daemon.h"
#include "daemon/devices/device.h"
#include "kvm/qmp.h"

struct vm_config;
struct vmm;

/* Each may end the VMM (vmm_kill/vmm_free) or its owner; the VMM is held
 * until the callback returns. */
struct vmm_ops {
	/* Started: pid and pidfd are set, the exec happened. Optional. A
	 * start that failed is reported by exited instead, with spawn_error. */
	void (*spawned)(struct vmm *v, void *ud);
	void (*ready)(struct vmm *v, void *ud); /* QMP negotiated */
	void (*event)(struct vmm *v, const char *event, json_object *data, int64_t ts_us, void *ud);
	void (*exited)(struct vmm *v, void *ud);       /* reaped; exit_code/exit_desc set */
	void (*monitor_lost)(struct vmm *v, void *ud); /* monitor closed, process alive */
};

struct vmm {
	struct daemon *d;
	pid_t pid;         /* 0 while spawning */
	int pidfd;         /* -EBADF while spawning */
	bool spawning;     /* asked of the launcher, not answered yet */
	uint64_t spawn_id; /* the launcher request, while spawning */
	int spawn_error;   /* the start failed: the exec's negative errno */
	char *vm_name;     /* for the VMM's scope */
	ev_io pid_watcher;
	qmp *qmp;
	ev_io qmp_watcher;
	char *qmp_path;
	char *binary;
	char version[32];
	char package[96];              /* the build's package string */
	unsigned long long start_time; /* /proc/PID/stat starttime: identity */
	uint64_t spawned_usec;         /* CLOCK_MONOTONIC at spawn, 0 if attached */
	/* Where each device fd sits in the VMM: {fd id: child fd} (its
	 * registry record's vmm_fds), n_dev_fds of them. */
	struct vmm_dev_fd {
		char id[DEVICE_FD_ID_MAX];
		int child;
	} dev_fd[DEVICE_FDS_MAX];
	size_t n_dev_fds;
	int exit_code; /* -1 unknown */
	char exit_desc[64];
	/* VM_VMM_LOG's size when it was started: its own lines follow. */
	off_t log_start;
	const struct vmm_ops *ops;
	void *ud;
	struct vmm *daemon_next; /* in d->vmms */
	/* A callback run from this VMM's own dispatch may end it (a reply
	 * that triggers a rollback, say). While busy, vmm_free() only marks
	 * it doomed and the dispatch destroys it on its way out. */
	unsigned busy;
	bool doomed;
	bool muted;             /* monitor let go of while busy: freed on release */
	bool ending;            /* SIGKILLed: reaped from the loop, then destroyed */
	ev_timer kill_timer;    /* bounds how long an ending VMM is waited for */
	ev_timer monitor_timer; /* monitor closed: does the process outlive it? */
	unsigned reconnects;    /* failed attempts to connect to it again */
	bool exec_expected;     /* its next monitor close is an exec: no grace */
};

/* How a new VMM receives its guest: not at all (a fresh boot), with
 * -incoming defer, or as a cpr-transfer destination on two socket paths. */
struct vmm_incoming {
	bool defer;
	bool check; /* a pre-flight's or probe's VMM, never the guest's */
	const char *cpr_main_path, *cpr_state_path;
};

struct file_id;

/* Open a kernel or initrd for a VMM: a regular file only, else -EINVAL
 * (-EISDIR for a directory); with id set (a peer that is not root named
 * it), the very file that was judged then, else -ESTALE. */
int vmm_open_image(const char *path, const struct file_id *id, int *ret_fd);
/* What a failure of vmm_open_image() means, for a peer. */
const char *vmm_image_strerror(int r);

/* Whether pid is a VMM that cprd watches (and so reaps through its pidfd). */
bool vmm_pid_watched(const struct daemon *d, pid_t pid);

/*
 * Start a VMM for cfg using the fds held for the VM, with its monitor on
 * qmp_path and its output appended to VM_VMM_LOG in the directory
 * log_dirfd. in may be NULL. Returns at once with *ret spawning (no pid
 * yet): ops->spawned follows once the launcher has started it, or
 * ops->exited, with spawn_error set, when the exec failed (the failed child
 * already reaped) or the launcher is gone. Failing here means nothing was
 * asked of the launcher.
 */
int vmm_start(struct daemon *d, const struct vm_config *cfg, const char *binary,
	      const char *qmp_path, int log_dirfd, const struct vmm_incoming *in,
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

/* The command line of a successor that v's process execs (cpr-exec): the
 * same fds at the same numbers, binary, and -S -incoming incoming_uri. */
int vmm_exec_argv(const struct vmm *v, const struct vm_config *cfg, const char *binary,
		  const char *incoming_uri, char ***ret_argv);

/* What a negative errno of vmm_start() means, for people. */
const char *vmm_start_strerror(int r);

/* {"ram0": 3, "console": 4, ...}: the held fds as the VMM sees them. */
json_object *vmm_fd_map(const struct vmm *v);
/* Set v's fd map from a record's (vmm_fd_map()); ids of no device type
 * are ignored. */
void vmm_set_fd_map(struct vmm *v, json_object *map);
/* What a restarted cprd needs to take v back, added to o: "pid",
 * "pid_start", "vmm_fds" and "qmp" (recover.c reads them). */
void vmm_add_record(const struct vmm *v, json_object *o);

/* Let go: stop watching and free (later, if v is inside one of its own
 * callbacks). No callback of v's runs again, not even for commands still
 * waiting; the process, if any, and its monitor socket are left alone,
 * except for a VMM still spawning: nobody could ever find that one, so the
 * launcher's answer, when it comes, kills it (see launcher_cancel).
 * Returns NULL, for `v = vmm_free(v)`. */
struct vmm *vmm_free(struct vmm *v);
/* SIGKILL, remove its monitor socket, and let go of it at once as
 * vmm_free() does; the process is reaped from the loop when its pidfd
 * fires (never waited for here), or, past a bound, by the orphan reaper. */
struct vmm *vmm_kill(struct vmm *v);
int vmm_signal(struct vmm *v, int sig);
/* Running, watched, and not being ended. */
bool vmm_alive(const struct vmm *v);
/* Read and dispatch what the VMM already sent, now: events that are
 * waiting in the socket are seen before a decision that depends on them.
 * false when the monitor is gone. */
bool vmm_drain(struct vmm *v);
/* Whether cprd can talk to the VMM now. */
bool vmm_connected(const struct vmm *v);
/* The monitor connection closed while the VMM lives on: connect to its
 * monitor socket again (QEMU listens anew). Retried every second for a
 * while, through ops->monitor_lost, when the connection fails. */
int vmm_reconnect(struct vmm *v);
/* Forget ud's commands still waiting on v's monitor (see qmp_cancel). */
size_t vmm_cancel(struct vmm *v, void *ud);

/* Queue a QMP command; -ENOTCONN when the monitor is gone. */
int vmm_command(struct vmm *v, const char *cmd, json_object *args, int fd, qmp_reply_fn cb,
		void *ud);
void vmm_set_ops(struct vmm *v, const struct vmm_ops *ops, void *ud);

/* Reap the children cprd inherits as subreaper that are not VMMs it
 * watches through a pidfd (those are reaped through it). */
void vmm_reap_orphans(struct daemon *d);
