/* SPDX-License-Identifier: MIT */
/*
 * systemd's fd store, fed as fds are acquired (FDSTORE=1, FDNAME=
 * "cprd/vm/NAME/FD", FDPOLL=0) and pruned as they are released
 * (FDSTOREREMOVE=1), so that a restart or a crash loses nothing. Outside a
 * service manager every call is a no-op. The fds come back at the next
 * start as LISTEN_FDS, read by inherit.c.
 */
#pragma once

#include "daemon/core/daemon.h"

#define FDSTORE_PREFIX "cprd/vm/"

/* Copy an fd into the service manager's fd store. */
void fdstore_add(struct daemon *d, const char *vm, const char *name, int fd);
void fdstore_remove(struct daemon *d, const char *vm, const char *name);
/* Every fd held for vm, and its VMM's pidfd. */
void fdstore_remove_vm(struct daemon *d, const char *vm);
