/* SPDX-License-Identifier: MIT */
/* The JSON-RPC methods cprd serves: main() hands this table to the server. */
#pragma once

#include <stddef.h>

#include "daemon/core/server.h"

extern const struct method rpc_methods[];
extern const size_t rpc_methods_count;
