/* SPDX-License-Identifier: MIT */
/*
 * A VM's update history: one JSON object a line in VM_DIR/history.jsonl,
 * appended when an update ends (or when a restarted cprd settles one it did
 * not see end), read back newest first.
 */
#pragma once

#include <json-c/json.h>

/* Append rec as one line, in one write (a line is never torn), to the file
 * name in the directory dirfd, never through a symlink. */
int history_append(int dirfd, const char *name, json_object *rec);
/* The newest entries (at most the file's last 4 MiB), newest first. */
json_object *history_read(int dirfd, const char *name);
