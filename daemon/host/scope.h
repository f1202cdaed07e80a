/* SPDX-License-Identifier: MIT */
#pragma once

#include <sys/types.h>

#include "daemon/core/daemon.h"

/*
 * Under systemd, move a freshly started VMM into a transient scope of its
 * own, cprd-vm-NAME-PID.scope in machine.slice, so that stopping or
 * restarting cprd.service never takes the guests with it (KillMode=process
 * alone would still leave them in cprd's cgroup). No-op without systemd.
 *
 * Asynchronous: the D-Bus call is sent at once and its answer is read on
 * the event loop (the bus's fd is watched there, see scope_watch_bus); a
 * failure is logged and leaves the VMM where it was. Returns 0 (also when
 * skipped) or a negative errno when the call could not even be sent.
 */
int scope_adopt(struct daemon *d, pid_t pid, const char *vm);
/* Daemon exit: write out what is queued, close the bus, stop watching. */
void scope_close(struct daemon *d);
