/* SPDX-License-Identifier: MIT */
/*
 * What /proc says about processes and sockets. Library code: no logging,
 * no policy; each answer is read fresh.
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

/* The kernel's start time of a live process (clock ticks since boot,
 * /proc/PID/stat field 22); 0 when it is gone or a zombie. With the pid it
 * names one process for good: a reused pid has another start time. */
unsigned long long proc_start_time(pid_t pid);

/* A fingerprint of the program image a live process runs now: a hash of
 * its auxiliary vector, whose addresses (the entry point, the program
 * headers, the random bytes and file name on its new stack) change with
 * each execve. Two readings that differ mean the process exec'd between
 * them; equal ones, that it did not, or (without address randomisation)
 * that it re-exec'd the same binary. -errno when it cannot be read. */
int proc_image_id(pid_t pid, uint64_t *ret);

/* The pid a pidfd refers to, from its fdinfo; -1 once the process is gone
 * (or the fd is no pidfd). */
pid_t pidfd_pid(int pidfd);

/* Whether a UNIX stream socket is listening on path in the network
 * namespace of process pid, from /proc/PID/net/unix: it answers without
 * connecting, where a probe connection would be taken by the listener as
 * a real client. The table lists the sockets of one network namespace
 * only: a confined VMM's are not in cprd's /proc/net/unix. */
bool unix_listening(pid_t pid, const char *path);

/* Files a running process maps that were deleted or replaced on disk since
 * it mapped them: its executable and libraries after a package upgrade
 * (which renames the new file over the old), as needrestart finds them.
 * Memory that never had a file (memfds, shared memory) does not count.
 * Their names go into buf, ", "-separated, as far as size allows. Returns
 * how many files, or a negative errno (-ENOENT: no such process; -EACCES:
 * not allowed to read its maps). */
int proc_replaced_files(pid_t pid, char *buf, size_t size);
