/* SPDX-License-Identifier: MIT */
/*
 * What lets the VMs outlive cprd:
 *  - the registry, STATE_DIR/registry.json, rewritten atomically on every
 *    change: each VM's configuration, its VMM's pid and start time (so a
 *    reused pid is never mistaken for it) and any update in flight;
 *  - systemd's fd store, fed as fds are acquired (FDSTORE=1, FDNAME=
 *    "cprd/vm/NAME/FD", FDPOLL=0) and pruned as they are released
 *    (FDSTOREREMOVE=1). A re-exec hands the same fds over in the same
 *    LISTEN_FDS form, so there is one way back in.
 */
#pragma once

#include <json-c/json.h>
#include <stdbool.h>
#include <sys/types.h>

#include "daemon/daemon.h"

struct vm;

#define FDSTORE_PREFIX "cprd/vm/"

void registry_save(struct daemon *d);
/* The saved registry, or NULL when there is none. */
json_object *registry_load(struct daemon *d);

/* proc_start_time(), for vmm.c. */
#include "common/proc.h"

/* Copy an fd into the service manager's fd store; no-op outside systemd. */
void fdstore_add(struct daemon *d, const char *vm, const char *name, int fd);
void fdstore_remove(struct daemon *d, const char *vm, const char *name);
void fdstore_remove_vm(struct daemon *d, const char *vm);

/* Take inherited fds (LISTEN_FDS / LISTEN_FDNAMES): custody fds go into
 * d->store (pidfds into *ret_pidfds as a name->fd object), the listening
 * socket into *ret_listen, the launcher's socket into *ret_launcher.
 * Returns how many custody fds were taken. */
int inherited_fds_take(struct daemon *d, int *ret_listen, int *ret_launcher,
		       json_object **ret_pidfds);
