/* SPDX-License-Identifier: MIT */
#pragma once

/* Confine the daemon with a seccomp allow-list. Denied calls fail with
 * EPERM rather than killing the process: the daemon holds other processes'
 * memory and must degrade, not die, if a library grows a new syscall. */
int sandbox_apply(void);
