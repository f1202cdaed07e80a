/* SPDX-License-Identifier: MIT */
/*
 * The registry, STATE_DIR/registry.json, rewritten atomically on every
 * change: each VM's configuration, its VMM's pid and start time (so a
 * reused pid is never mistaken for it) and any update in flight. What a
 * restarted cprd needs to find its VMs.
 */
#pragma once

#include <json-c/json.h>

#include "daemon/daemon.h"

void registry_save(struct daemon *d);
/* The saved registry, or NULL when there is none. */
json_object *registry_load(struct daemon *d);
