/* SPDX-License-Identifier: MIT */
/* Clocks in microseconds. Header-only and free of global state. */
#pragma once

#include <stdint.h>
#include <time.h>

/* CLOCK_REALTIME for timestamps people read, CLOCK_MONOTONIC for durations. */
static inline uint64_t now_usec(clockid_t clock)
{
	struct timespec ts;

	clock_gettime(clock, &ts);
	return (uint64_t)ts.tv_sec * 1000000 + (uint64_t)ts.tv_nsec / 1000;
}
