/* SPDX-License-Identifier: MIT */
/*
 * Transitional: persist.c was split into registry.c, fdstore.c and
 * inherit.c, and proc_start_time() moved to common/proc.h. vmm.c still
 * includes this header for proc_start_time(); once it includes
 * common/proc.h instead, this file goes.
 */
#pragma once

#include "common/proc.h"
