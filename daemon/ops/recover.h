/* SPDX-License-Identifier: MIT */
#pragma once

#include <json-c/json.h>

#include "daemon/core/daemon.h"

/*
 * Find the VMs a previous cprd held, from its registry: check each VMM is the
 * very process that was launched (pid and kernel start time, or a pidfd
 * from the fd store), take custody back (fds already inherited from the fd
 * store, else copied out of the running VMM with pidfd_getfd), reconnect to
 * its monitor, and settle any update the previous cprd did not finish.
 * Runs before the daemon serves anyone; each QMP exchange is bounded.
 * pidfds: {"vm": fd} inherited from the fd store (taken). Returns how many
 * VMs were found.
 */
int recover(struct daemon *d, json_object *pidfds);

/* Let go of what recovery left for the loop to finish (a guest to resume
 * once its VMM answers). At exit. */
void recover_done(struct daemon *d);
