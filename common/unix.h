/* SPDX-License-Identifier: MIT */
/* UNIX socket helpers: header-only, no logging, no global state. */
#pragma once

#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "common/macro.h"

/* Is a UNIX socket listening on path? /proc/net/unix tells without
 * connecting: a probe connection could be taken as a real one. */
static inline bool unix_listening(const char *path)
{
	_cleanup_(fclosep) FILE *f = fopen("/proc/net/unix", "re");
	char line[512];
	size_t plen = strlen(path);

	while (f && fgets(line, sizeof(line), f)) {
		unsigned long flags;
		size_t n = strcspn(line, "\n");

		line[n] = '\0';
		if (n <= plen || !streq(line + n - plen, path) || line[n - plen - 1] != ' ')
			continue;
		/* Num RefCount Protocol Flags ...: __SO_ACCEPTCON is 0x10000 */
		if (sscanf(line, "%*s %*s %*s %lx", &flags) == 1 && (flags & 0x10000))
			return true;
	}
	return false;
}
