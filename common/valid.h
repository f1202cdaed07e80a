/* SPDX-License-Identifier: MIT */
/*
 * Checks of names and strings a peer hands cprd, before any of them reaches
 * the kernel, a file name or QEMU's command line. Pure: no I/O, no logging.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>

/* Whether s holds a control byte (below 0x20, or DEL). */
bool str_has_ctrl(const char *s);

/* NULL when s can name a network interface exactly as given, else why not,
 * for a person. The kernel refuses '/', ':' and white space and treats a
 * '%' as a pattern it fills in itself (tap%d becomes tap0), so a name with
 * one would not be the name cprd reports. */
const char *ifname_invalid(const char *s);
