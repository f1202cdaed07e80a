/* SPDX-License-Identifier: MIT */
/*
 * JSON-RPC 2.0 message helpers (https://www.jsonrpc.org/specification).
 * Parsing is bounded: a nesting depth limit and the caller's size limit.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <json-c/json.h>

#define JSONRPC_MAX_DEPTH 32

enum {
	JSONRPC_PARSE_ERROR = -32700,
	JSONRPC_INVALID_REQUEST = -32600,
	JSONRPC_METHOD_NOT_FOUND = -32601,
	JSONRPC_INVALID_PARAMS = -32602,
	JSONRPC_INTERNAL_ERROR = -32603,
	/* Application errors (server-defined range -32000..-32099). */
	JSONRPC_ERR_NOT_FOUND = -32000,  /* no such VM / fd */
	JSONRPC_ERR_EXISTS = -32001,     /* name already used */
	JSONRPC_ERR_PERMISSION = -32002, /* peer may not call this method */
	JSONRPC_ERR_BUSY = -32003,       /* operation already in flight */
	JSONRPC_ERR_BAD_STATE = -32004,  /* VM is not in a state that allows this */
	JSONRPC_ERR_VMM = -32005,        /* the VMM failed (start, QMP, migration) */
	JSONRPC_ERR_BAD_FDS = -32006,   /* fds missing, unexpected, too many or of the wrong kind */
	JSONRPC_ERR_TOO_LARGE = -32007, /* message over the size limit */
	JSONRPC_ERR_RESOURCE = -32008,  /* host resource failure (memory, files) */
	JSONRPC_ERR_UNSUPPORTED = -32009, /* not available on this host / VMM */
	JSONRPC_ERR_TIMEOUT = -32010,
};

/* The version of cprd's API over JSON-RPC, as rpc.describe reports it:
 * raised when a method, parameter or result changes incompatibly. */
#define CPRD_PROTOCOL_VERSION 1

/* Every error code cprd can answer, with the symbolic kind that its
 * error's data carries ({"kind": ...}) and one line saying what it means. */
typedef struct jsonrpc_error_info {
	int code;
	const char *kind;
	const char *summary;
} jsonrpc_error_info;

/* The i-th known error, NULL past the last. */
const jsonrpc_error_info *jsonrpc_error_nth(size_t i);
/* The kind for code ("error" for a code not in the table). */
const char *jsonrpc_error_kind(int code);
/* {"kind": KIND} plus {"param": param} when param is not NULL. NULL when
 * out of memory. */
json_object *jsonrpc_error_data_new(int code, const char *param);

/*
 * Parse one message with json-c, depth limited to JSONRPC_MAX_DEPTH.
 * Returns 0 and *ret (owned); -EBADMSG when it is not JSON (or not UTF-8),
 * has trailing garbage or is too deep; -ERANGE when an integer in it is
 * outside -2^63..2^64-1 (json-c would clamp it, and an "id" would come
 * back altered); -ENOTUNIQ when an object names a member twice (json-c
 * would keep the last: a second "method" would run instead of the first).
 * On error *ret_why (static string) says what.
 */
int jsonrpc_parse(const char *msg, size_t len, json_object **ret, const char **ret_why);

/* Whether s[0..n) is strict UTF-8 (RFC 3629: no overlong forms, no
 * surrogates, nothing past U+10FFFF): what a reply may carry. */
bool jsonrpc_utf8_valid(const char *s, size_t n);

typedef struct jsonrpc_request {
	const char *method;   /* borrowed from the object */
	json_object *params;  /* borrowed; NULL when absent */
	json_object *id;      /* borrowed; NULL for a notification */
	bool is_notification; /* no "id" member at all */
} jsonrpc_request;

/*
 * Validate one request object: "jsonrpc" exactly "2.0", "method" a string,
 * "params" absent, object or array, "id" absent, string, number or null,
 * no other members. Returns 0 or -EINVAL with *ret_why (static string).
 * When the object had a usable "id", ret->id is set even on failure so the
 * error can name it.
 */
int jsonrpc_request_parse(json_object *o, jsonrpc_request *ret, const char **ret_why);

/* Response builders. id is borrowed (a reference is taken; NULL => null).
 * result is taken. data may be NULL and is taken. */
json_object *jsonrpc_result_new(json_object *id, json_object *result);
json_object *jsonrpc_error_new(json_object *id, int code, const char *message, json_object *data);

/* Request / notification builders (params taken, may be NULL). */
json_object *jsonrpc_call_new(const char *method, json_object *params, int64_t id);
json_object *jsonrpc_notification_new(const char *method, json_object *params);

/* Serialize compactly (no newlines inside). Returned string is owned by o. */
const char *jsonrpc_to_string(json_object *o, size_t *ret_len);
