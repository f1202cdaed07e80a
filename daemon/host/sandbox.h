/* SPDX-License-Identifier: MIT */
#pragma once

/* Confine the daemon with a seccomp allow-list. Denied calls fail with
 * EPERM rather than killing the process: the daemon holds other processes'
 * memory and must degrade, not die, if a library grows a new syscall. */
int sandbox_apply(int exec_fd);

/* Only this fd may be executed afterwards (execveat with AT_EMPTY_PATH):
 * the re-exec puts the binary it runs there. The filter outlives the exec,
 * so the new image keeps the same number for it (sandbox_exec_slot()). */
#define SANDBOX_EXEC_SLOT_ENV "CPRD_EXEC_SLOT"

/* Reserve the slot: the number a filter inherited over a re-exec names, or
 * a fresh one. Call first thing, before anything else opens an fd.
 * Returns the fd (a /dev/null placeholder, close-on-exec). */
int sandbox_exec_slot(void);

/* Keep only the capabilities the main process uses (listed in sandbox.c)
 * in its effective, permitted and bounding sets; clear the inheritable and
 * ambient ones. Without root this is a no-op that succeeds. */
int sandbox_drop_caps(void);
