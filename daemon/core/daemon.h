/* SPDX-License-Identifier: MIT */
/* The daemon's shared state: one instance, owned by main(). */
#pragma once

#include <ev.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <time.h>

#include "common/clock.h"
#include "common/version.h"
#include "daemon/host/launcher.h"
#include "daemon/host/policy.h"
#include "daemon/core/limits.h"
#include "daemon/core/registry.h"
#include "memstore/memstore.h"

struct client;
struct method;
struct vm;
struct sd_bus;
struct stats;
struct metrics;
struct scope_bus;

struct daemon {
	struct ev_loop *loop;
	char *state_dir; /* e.g. /run/cprd */
	int state_fd;    /* state_dir, checked to be ours alone (main.c) */
	int vms_fd;      /* state_dir/vms, likewise */
	int archive_fd;  /* --log-dir: what destroyed VMs leave (archive.c); < 0: none */
	const char *archive_dir;
	const char *checkpoint_dir; /* --checkpoint-dir (checkpoint.c) */
	char *socket_path;          /* NULL when the socket came from systemd */
	int listen_fd;
	bool socket_activated;
	ev_io listen_watcher;
	ev_signal sig_term, sig_int, sig_chld;
	struct client *clients;
	unsigned n_clients;
	struct peer_limits limits; /* what one peer may take (limits.h) */
	size_t out_queued;         /* unread replies, all clients together */
	ev_timer accept_pause;     /* accepting stopped while out of fds */
	/* Log lines a peer can cause, one kind each (log_ratelimited()). */
	struct ratelimit rl_refused, rl_nofile, rl_dropped, rl_idle, rl_stream, rl_hangup,
	    rl_events;
	ev_timer trim;        /* give freed peer memory back to the kernel (server.c) */
	size_t trim_released; /* bytes of peer memory freed since the last trim */
	struct vm *vms;
	struct resume_later *resume_later; /* guests recovery resumes once their VMM answers */
	struct vmm *vmms;                  /* every VMM the daemon knows, VM's or update's */
	memstore *store;
	launcher launcher;
	bool kvm;                    /* /dev/kvm usable: -accel kvm */
	bool confine;                /* VMMs run confined (docs/ARCHITECTURE.md) */
	uid_t vmm_id_base;           /* each VM's VMMs get uid = gid = base + i, */
	uint32_t vmm_id_count;       /* 0 <= i < count */
	bool have_group;             /* group "cprd" exists */
	gid_t group;                 /* its gid */
	uint64_t started_usec;       /* CLOCK_REALTIME at start */
	uint64_t started_mono;       /* CLOCK_MONOTONIC at start */
	const char *start_mode;      /* "fresh", "fd-store", "re-exec", "recovered" */
	char *self_path;             /* our binary, for re-exec */
	char **argv;                 /* our command line, for re-exec */
	char *reexec_binary;         /* set by daemon.reexec: exec this once replies are out */
	int reexec_fd;               /* ... opened (O_PATH) and judged then: what is exec'd */
	int exec_slot;               /* the only fd the seccomp filter lets be executed */
	struct sd_bus *bus;          /* to systemd, opened on first use */
	struct scope_bus *scope_bus; /* its watchers on the loop (scope.c) */
	struct stats *stats;         /* cprd's own time on the loop (stats.c) */
	struct policy policy;        /* which VMMs peers but root may run */
	/* Sees every event events.c sends, and NULL when only a gauge changed
	 * (main.c: the metrics). A hook, so that events.c, which vm.c and
	 * update.c call, depends on nothing that reads VMs. */
	void (*observe_event)(struct daemon *d, json_object *event);
	struct metrics *metrics;  /* daemon-wide counters (metrics.c) */
	size_t events_max_queued; /* per event subscriber (events.c) */

	const struct method *methods; /* the JSON-RPC methods, given by main() */
	size_t n_methods;

	struct registry registry; /* STATE_DIR/registry.json and its health */
	bool status_stale;        /* the STATUS= line needs sending again */
	ev_prepare flush;         /* before the loop waits: write what changed */
	ev_timer registry_retry;  /* while the registry cannot be written */
	off_t log_max;            /* --log-max-size: logs rotate past it; 0 never */
	bool own_log;             /* cprd.log in state_dir is cprd's own stderr */
	ev_timer log_timer;       /* checks the logs' sizes */
	ev_timer watchdog;        /* WATCHDOG=1 to systemd while the loop turns */
};

/* Something the registry records changed (a VM came or went, changed
 * state, its VMM or update changed): the registry is written before the
 * loop next waits, coalesced with whatever else changes in the same turn,
 * and the STATUS= line is refreshed. A change a client is told about must
 * be written first: vm_registry_commit(). */
static inline void daemon_changed(struct daemon *d)
{
	registry_mark_dirty(&d->registry);
	d->status_stale = true;
}

/* Only what STATUS= shows changed (fds held), not what the registry records. */
static inline void daemon_status_changed(struct daemon *d)
{
	d->status_stale = true;
}
