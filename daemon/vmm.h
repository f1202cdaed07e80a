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
#include <sys/types.h>

#include "daemon/daemon.h"
#include "kvm/qmp.h"

struct vm_config;
struct vmm;

struct vmm_ops {
	void (*ready)(struct vmm *v, void *ud);  /* QMP negotiated */
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
	int exit_code; /* -1 unknown */
	char exit_desc[64];
	const struct vmm_ops *ops;
	void *ud;
};

/* Start a VMM for cfg using the fds held for the VM, with its monitor on
 * qmp_path and its output appended to log_path. incoming: wait for an
 * incoming migration (-incoming defer). */
int vmm_start(struct daemon *d, const struct vm_config *cfg, const char *binary,
	      const char *qmp_path, const char *log_path, bool incoming, const struct vmm_ops *ops,
	      void *ud, struct vmm **ret);

/* Stop watching and free; the process, if any, is left alone. */
struct vmm *vmm_free(struct vmm *v);
/* SIGKILL and reap at once (a killed process exits promptly), then free. */
struct vmm *vmm_kill(struct vmm *v);
int vmm_signal(struct vmm *v, int sig);
bool vmm_alive(const struct vmm *v);

/* Queue a QMP command; -ENOTCONN when the monitor is gone. */
int vmm_command(struct vmm *v, const char *cmd, json_object *args, int fd, qmp_reply_fn cb,
		void *ud);
void vmm_set_ops(struct vmm *v, const struct vmm_ops *ops, void *ud);

/* Last bytes of a log file, newlines folded: what a VMM said before dying. */
void log_tail(const char *path, char *buf, size_t size);
