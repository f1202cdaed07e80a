/* SPDX-License-Identifier: MIT */
/* cprd's release, shared by cprd and cprctl. */
#pragma once

#define CPRD_VERSION "0.1.0"
