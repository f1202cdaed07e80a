/* SPDX-License-Identifier: MIT */
/*
 * Fds handed to cprd at start: by the service manager from its fd store
 * (LISTEN_FDS, LISTEN_FDNAMES, fds from 3 on), or by cprd's own re-exec
 * (CPRD_INHERIT="FD:NAME,...", the fds left where they were). One reader
 * for both, so there is one way back in.
 */
#pragma once

#include <json-c/json.h>

#include "daemon/core/daemon.h"

/* Take the inherited fds: custody fds go into d->store (pidfds into
 * *ret_pidfds as a name->fd object), the listening socket into
 * *ret_listen, the launcher's socket into *ret_launcher; any other fd is
 * closed. Returns how many custody fds were taken. */
int inherited_fds_take(struct daemon *d, int *ret_listen, int *ret_launcher,
		       json_object **ret_pidfds);
