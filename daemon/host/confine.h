/* SPDX-License-Identifier: MIT */
/*
 * A confined VMM: what the launcher does in the VMM's own process between
 * fork and exec (docs/ARCHITECTURE.md, "Confined VMMs"). The launcher's
 * middle child has already put it in new pid, mount, ipc, uts and
 * network namespaces; confine_enter() builds a minimal read-only root, pivots into
 * it and becomes the VM's uid and gid with no capabilities and
 * no_new_privs. The launcher is single-threaded, so this runs after fork
 * without the async-signal-safety worries of a threaded parent.
 *
 * It does not log (it runs in the child): on failure it writes one line
 * naming the step to the VMM's log (fd 2) and returns a negative errno.
 */
#pragma once

#include <sched.h>
#include <stdbool.h>
#include <sys/types.h>

/* A network namespace of its own holds nothing but a loopback that is
 * down: no host abstract socket, nothing on the host's 127.0.0.1. The VMM
 * reaches the network through the tap fds it is handed (a tap fd works
 * whatever namespace its holder is in), cprd and the other VMM through
 * sockets bound in the file system, which ignore network namespaces. */
#define CONFINE_NAMESPACES (CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWNET)

struct confine {
	uid_t uid; /* and gid: one id per VM; 0 means not confined */
	gid_t gid;
	bool kvm;           /* /dev/kvm inside, and its group when it needs one */
	const char *rw_dir; /* the VM's own directory, at the same path inside */
};

/* binary: the absolute path about to be exec'd. */
int confine_enter(const struct confine *c, const char *binary);
