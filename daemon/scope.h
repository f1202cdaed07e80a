/* SPDX-License-Identifier: MIT */
#pragma once

#include <sys/types.h>

#include "daemon/daemon.h"

/*
 * Under systemd, move a freshly started VMM into a transient scope of its
 * own, cprd-vm-NAME-PID.scope in machine.slice, so that stopping or
 * restarting cprd.service never takes the guests with it (KillMode=process
 * alone would still leave them in cprd's cgroup). No-op without systemd.
 * One short D-Bus call, bounded by a 2 s timeout. Returns 0 (also when
 * skipped) or a negative errno; a failure leaves the VMM where it was.
 */
int scope_adopt(struct daemon *d, pid_t pid, const char *vm);
