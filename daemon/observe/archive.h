/* SPDX-License-Identifier: MIT */
/*
 * What a VM leaves behind when it is forgotten (destroyed, or its start
 * failed): its console log, VMM log and update history are kept under the
 * log directory (default /var/log/cprd/NAME/), on disk, so that after a
 * crash and a destroy the evidence is still there and `history NAME` still
 * answers. Each kept log is bounded like the live ones (--log-max-size,
 * one rotated copy). Removed only by vm.purge.
 */
#pragma once

#include <json-c/json.h>

struct daemon;
struct vm;

#define ARCHIVE_DEFAULT_DIR "/var/log/cprd"

/* Open (creating it) the log directory: root's alone, as the state
 * directory must be. Logs and returns < 0 when it cannot be used; cprd
 * then keeps nothing and says so at every destroy. */
int archive_open(struct daemon *d, const char *dir);

/* Append the VM's logs and history to its kept ones. Called before its
 * files in the state directory go. */
void archive_vm(struct vm *vm);

/* The kept history of a VM that is gone, newest first; NULL with -ENOENT
 * when nothing is kept under that name. */
int archive_history(struct daemon *d, const char *name, json_object **ret);

/* Every kept update record of every VM name, each with its "vm", added to
 * the array into (in no particular order). */
void archive_histories(struct daemon *d, json_object *into);

/* Remove what is kept for name. -ENOENT when nothing is. */
int archive_purge(struct daemon *d, const char *name);
