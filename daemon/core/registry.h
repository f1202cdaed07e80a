/* SPDX-License-Identifier: MIT */
/*
 * The registry file, STATE_DIR/registry.json: what a restarted cprd needs to
 * find its VMs. {"version": 1, "vms": [record, ...]}; the records are the
 * VM code's business (vm.c writes them, recover.c reads them).
 *
 * A write goes to a fresh temp file that is renamed over the registry, so
 * a reader sees the old file or the new one, never a mix, whenever cprd
 * dies. No fsync: docs/ARCHITECTURE.md says why.
 *
 * This file knows nothing of the daemon: it does not log and never exits.
 * It returns negative errno and keeps the health of the last write, which
 * the daemon reports (daemon.status, STATUS=) and logs.
 */
#pragma once

#include <json-c/json.h>
#include <stdbool.h>
#include <stdint.h>

#define REGISTRY_VERSION 1
#define REGISTRY_MAX_BYTES (4 << 20)

#define REGISTRY_FILE "registry.json"
#define REGISTRY_TMP ".registry.json.tmp"

struct registry {
	char *path;          /* STATE_DIR/registry.json: for people */
	char *tmp;           /* STATE_DIR/.registry.json.tmp: likewise */
	int dirfd;           /* STATE_DIR, or the negative errno of opening it */
	bool dirty;          /* changed since the last successful write */
	int error;           /* 0, or the negative errno of the last write */
	char why[512];       /* what failed, with the path: for people */
	uint64_t since_usec; /* CLOCK_REALTIME: the current health began */
};

/* Files are reached through a descriptor of state_dir, opened here (a
 * directory that cannot be opened makes every read and write fail with
 * that error), and never through a symlink. */
int registry_init(struct registry *r, const char *state_dir);
void registry_done(struct registry *r);

/* Something the registry records changed: it is written soon, coalesced. */
static inline void registry_mark_dirty(struct registry *r)
{
	r->dirty = true;
}

static inline bool registry_ok(const struct registry *r)
{
	return r->error == 0;
}

/* Replace the registry file with root (borrowed). On success it is clean
 * and healthy; on failure the previous file is left as it was, no temp file
 * stays behind, and the health says what failed. Returns 0 or negative
 * errno. */
int registry_write(struct registry *r, json_object *root);

/* The registry as last written. -ENOENT when there is none; -EBADMSG when
 * it is not a registry this cprd understands (truncated, corrupt, another
 * version, too large), with the reason in why. Other negative errnos when
 * it cannot be read. */
int registry_read(const struct registry *r, json_object **ret, char *why, size_t why_size);

/* {"ok", "path", "error" (null when ok), "since_usec"} for daemon.status. */
json_object *registry_health_to_json(const struct registry *r);
