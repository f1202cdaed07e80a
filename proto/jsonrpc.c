/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <limits.h>
#include <string.h>

#include "common/json.h"
#include "common/macro.h"
#include "proto/jsonrpc.h"

DEFINE_TRIVIAL_CLEANUP_FUNC(json_tokener *, json_tokener_free);

static const jsonrpc_error_info errors[] = {
	{ JSONRPC_PARSE_ERROR, "parse-error",
	  "not JSON, trailing data, or nesting deeper than 32" },
	{ JSONRPC_INVALID_REQUEST, "invalid-request",
	  "not a JSON-RPC 2.0 request, or an empty batch" },
	{ JSONRPC_METHOD_NOT_FOUND, "unknown-method", "no method of that name" },
	{ JSONRPC_INVALID_PARAMS, "invalid-params",
	  "a parameter is missing, of the wrong type, out of range or unknown" },
	{ JSONRPC_INTERNAL_ERROR, "internal", "cprd could not build the answer (out of memory)" },
	{ JSONRPC_ERR_NOT_FOUND, "not-found", "no such VM, or no such fd held for it" },
	{ JSONRPC_ERR_EXISTS, "exists", "the name is already used" },
	{ JSONRPC_ERR_PERMISSION, "permission", "the peer may not do this" },
	{ JSONRPC_ERR_BUSY, "busy", "the VM or connection is busy with another operation" },
	{ JSONRPC_ERR_BAD_STATE, "bad-state", "the VM is not in a state that allows this" },
	{ JSONRPC_ERR_VMM, "vmm-failed",
	  "the VMM failed (not found, exited at start, update rolled back or failed)" },
	{ JSONRPC_ERR_BAD_FDS, "bad-fds",
	  "fds missing, unexpected, too many or of the wrong kind" },
	{ JSONRPC_ERR_TOO_LARGE, "too-large",
	  "the message exceeds 256 KiB; the connection is closed" },
	{ JSONRPC_ERR_RESOURCE, "resource",
	  "a host resource failed (memory, files, the registry cannot be written)" },
	{ JSONRPC_ERR_UNSUPPORTED, "unsupported", "not available on this host or with this VMM" },
	{ JSONRPC_ERR_TIMEOUT, "timeout", "the operation did not finish in time" },
};

const jsonrpc_error_info *jsonrpc_error_nth(size_t i)
{
	return i < ELEMENTSOF(errors) ? &errors[i] : NULL;
}

const char *jsonrpc_error_kind(int code)
{
	for (size_t i = 0; i < ELEMENTSOF(errors); i++)
		if (errors[i].code == code)
			return errors[i].kind;
	return "error";
}

json_object *jsonrpc_error_data_new(int code, const char *param)
{
	_cleanup_json_ json_object *o = json_object_new_object();

	if (!o ||
	    json_object_object_add(o, "kind", json_object_new_string(jsonrpc_error_kind(code))) < 0)
		return NULL;
	if (param && json_object_object_add(o, "param", json_object_new_string(param)) < 0)
		return NULL;
	return TAKE_PTR(o);
}

static int fail(const char **ret_why, const char *why, int r)
{
	if (ret_why)
		*ret_why = why;
	return r;
}

/* Strict UTF-8 (RFC 3629): no overlong forms, no surrogates, nothing past
 * U+10FFFF. json-c copies string bytes as they come, so what it is given
 * is what a reply would echo: a reply must be valid JSON, hence UTF-8. */
bool jsonrpc_utf8_valid(const char *s, size_t n)
{
	const unsigned char *p = (const unsigned char *)s;
	size_t i = 0;

	while (i < n) {
		unsigned char c = p[i];
		size_t more;
		uint32_t cp, min;

		if (c < 0x80) {
			i++;
			continue;
		}
		if (c >= 0xc2 && c <= 0xdf)
			more = 1, cp = c & 0x1f, min = 0x80;
		else if (c >= 0xe0 && c <= 0xef)
			more = 2, cp = c & 0x0f, min = 0x800;
		else if (c >= 0xf0 && c <= 0xf4)
			more = 3, cp = c & 0x07, min = 0x10000;
		else
			return false;
		if (n - i <= more)
			return false;
		for (size_t k = 1; k <= more; k++) {
			if ((p[i + k] & 0xc0) != 0x80)
				return false;
			cp = (cp << 6) | (p[i + k] & 0x3f);
		}
		if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
			return false;
		i += more + 1;
	}
	return true;
}

/* An integer literal json-c would clamp to INT64_MIN or UINT64_MAX (it
 * does not say so): p[0..n) is '-'? digits, without leading zeros. */
static bool integer_fits(const char *p, size_t n)
{
	static const char max_neg[] = "9223372036854775808", max_pos[] = "18446744073709551615";
	const char *max = max_pos;

	if (n > 0 && p[0] == '-')
		p++, n--, max = max_neg;
	if (n != strlen(max))
		return n < strlen(max);
	return memcmp(p, max, n) <= 0;
}

/* What json-c's tree cannot tell: how many members the text had (each
 * is one ':' outside strings), and whether every integer was kept
 * exactly. The text is valid JSON already. */
static int scan_text(const char *p, size_t n, size_t *ret_members)
{
	size_t members = 0;

	for (size_t i = 0; i < n; i++) {
		if (p[i] == '"') {
			for (i++; i < n && p[i] != '"'; i++)
				if (p[i] == '\\')
					i++;
		} else if (p[i] == ':') {
			members++;
		} else if (p[i] == '-' || (p[i] >= '0' && p[i] <= '9')) {
			size_t start = i;
			bool integer = true;

			for (; i + 1 < n && p[i + 1] && strchr("-+.eE0123456789", p[i + 1]); i++)
				integer &= p[i + 1] != '.' && p[i + 1] != 'e' && p[i + 1] != 'E';
			if (integer && !integer_fits(p + start, i + 1 - start))
				return -ERANGE;
		}
	}
	*ret_members = members;
	return 0;
}

/* Members in o and everything below it: fewer than the text had means a
 * name came twice in one object, and json-c kept only the last. */
static size_t tree_members(json_object *o)
{
	size_t n = 0;

	if (json_object_is_type(o, json_type_object)) {
		json_object_object_foreach(o, key, val)
		{
			(void)key;
			n += 1 + tree_members(val);
		}
	} else if (json_object_is_type(o, json_type_array)) {
		for (size_t i = 0; i < json_object_array_length(o); i++)
			n += tree_members(json_object_array_get_idx(o, i));
	}
	return n;
}

static bool all_space(const char *p, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (p[i] != ' ' && p[i] != '\t' && p[i] != '\r' && p[i] != '\n')
			return false;
	return true;
}

int jsonrpc_parse(const char *msg, size_t len, json_object **ret, const char **ret_why)
{
	_cleanup_(json_tokener_freep) json_tokener *tok = NULL;
	json_object *o;
	enum json_tokener_error e;
	size_t end, members = 0;

	if (!msg || !ret)
		return -EINVAL;
	if (len > INT_MAX)
		return fail(ret_why, "message too large", -EBADMSG);
	/* json-c would stop at a NUL and ignore what follows. */
	if (memchr(msg, '\0', len))
		return fail(ret_why, "NUL byte in message", -EBADMSG);
	if (!jsonrpc_utf8_valid(msg, len))
		return fail(ret_why, "not valid UTF-8", -EBADMSG);

	tok = json_tokener_new_ex(JSONRPC_MAX_DEPTH);
	if (!tok)
		return -ENOMEM;
	json_tokener_set_flags(tok, JSON_TOKENER_STRICT);

	o = json_tokener_parse_ex(tok, msg, (int)len);
	e = json_tokener_get_error(tok);
	end = json_tokener_get_parse_end(tok);
	if (!o && e == json_tokener_continue) {
		/* A bare number or literal at the very end is only complete
		 * once json-c sees the terminating NUL. */
		o = json_tokener_parse_ex(tok, "", 1);
		e = json_tokener_get_error(tok);
		end = len;
	}

	if (e != json_tokener_success) {
		json_object_put(o);
		switch (e) {
		case json_tokener_error_depth:
			return fail(ret_why, "nesting too deep", -EBADMSG);
		case json_tokener_continue:
		case json_tokener_error_parse_eof:
			return fail(ret_why, "incomplete JSON", -EBADMSG);
		default:
			return fail(ret_why, "not valid JSON", -EBADMSG);
		}
	}
	if (end > len || !all_space(msg + end, len - end)) {
		json_object_put(o);
		return fail(ret_why, "trailing data after JSON value", -EBADMSG);
	}
	if (scan_text(msg, end, &members) < 0) {
		json_object_put(o);
		return fail(ret_why,
			    "an integer is out of range (-2^63 to 2^64-1) and would not be kept "
			    "exactly",
			    -ERANGE);
	}
	if (members != tree_members(o)) {
		json_object_put(o);
		return fail(ret_why, "a member name appears twice in one object", -ENOTUNIQ);
	}

	*ret = o;
	return 0;
}

static bool id_usable(json_object *id)
{
	/* json-c represents a JSON null as a NULL pointer. */
	switch (json_object_get_type(id)) {
	case json_type_null:
	case json_type_string:
	case json_type_int:
	case json_type_double:
		return true;
	default:
		return false;
	}
}

int jsonrpc_request_parse(json_object *o, jsonrpc_request *ret, const char **ret_why)
{
	jsonrpc_request req = { .is_notification = true };
	json_object *version, *method, *params = NULL, *id = NULL;

	if (!ret)
		return -EINVAL;
	/* On failure is_notification stays false: the spec answers an invalid
	 * request with an error even when it had no "id" (id null). */
	*ret = (jsonrpc_request){};

	if (!json_object_is_type(o, json_type_object))
		return fail(ret_why, "request is not an object", -EINVAL);

	if (json_object_object_get_ex(o, "id", &id)) {
		if (!id_usable(id))
			return fail(ret_why, "\"id\" must be a string, number or null", -EINVAL);
		req.id = ret->id = id;
		req.is_notification = false;
	}

	if (!json_object_object_get_ex(o, "jsonrpc", &version))
		return fail(ret_why, "missing \"jsonrpc\"", -EINVAL);
	if (!json_object_is_type(version, json_type_string) ||
	    !streq(json_object_get_string(version), "2.0"))
		return fail(ret_why, "\"jsonrpc\" must be \"2.0\"", -EINVAL);

	if (!json_object_object_get_ex(o, "method", &method))
		return fail(ret_why, "missing \"method\"", -EINVAL);
	if (!json_object_is_type(method, json_type_string))
		return fail(ret_why, "\"method\" must be a string", -EINVAL);

	if (json_object_object_get_ex(o, "params", &params) &&
	    !json_object_is_type(params, json_type_object) &&
	    !json_object_is_type(params, json_type_array))
		return fail(ret_why, "\"params\" must be an object or an array", -EINVAL);

	json_object_object_foreach(o, key, val)
	{
		(void)val;
		if (!streq(key, "jsonrpc") && !streq(key, "method") && !streq(key, "params") &&
		    !streq(key, "id"))
			return fail(ret_why, "unexpected member in request", -EINVAL);
	}

	req.method = json_object_get_string(method);
	req.params = params;
	*ret = req;
	return 0;
}

/* json_object_object_add() leaves val with the caller when it fails. */
static int add(json_object *o, const char *key, json_object *val)
{
	if (json_object_object_add(o, key, val) < 0) {
		json_object_put(val);
		return -ENOMEM;
	}
	return 0;
}

/* Adds a new string member; a NULL from the constructor means out of memory. */
static int add_new(json_object *o, const char *key, json_object *val)
{
	if (!val)
		return -ENOMEM;
	return add(o, key, val);
}

static json_object *envelope_new(void)
{
	_cleanup_json_ json_object *o = json_object_new_object();

	if (!o || add_new(o, "jsonrpc", json_object_new_string("2.0")) < 0)
		return NULL;
	return TAKE_PTR(o);
}

json_object *jsonrpc_result_new(json_object *id, json_object *result)
{
	_cleanup_json_ json_object *r = result;
	_cleanup_json_ json_object *o = envelope_new();

	/* "result" is required even when it is null. */
	if (!o || add(o, "result", TAKE_PTR(r)) < 0 || add(o, "id", json_object_get(id)) < 0)
		return NULL;
	return TAKE_PTR(o);
}

json_object *jsonrpc_error_new(json_object *id, int code, const char *message, json_object *data)
{
	_cleanup_json_ json_object *d = data;
	_cleanup_json_ json_object *err = json_object_new_object();
	_cleanup_json_ json_object *o = envelope_new();

	if (!o || !err)
		return NULL;
	if (add_new(err, "code", json_object_new_int(code)) < 0 ||
	    add_new(err, "message", json_object_new_string(message ? message : "")) < 0)
		return NULL;
	if (d && add(err, "data", TAKE_PTR(d)) < 0)
		return NULL;
	if (add(o, "error", TAKE_PTR(err)) < 0 || add(o, "id", json_object_get(id)) < 0)
		return NULL;
	return TAKE_PTR(o);
}

static json_object *request_new(const char *method, json_object *params)
{
	_cleanup_json_ json_object *p = params;
	_cleanup_json_ json_object *o = envelope_new();

	if (!o || !method)
		return NULL;
	if (add_new(o, "method", json_object_new_string(method)) < 0)
		return NULL;
	if (p && add(o, "params", TAKE_PTR(p)) < 0)
		return NULL;
	return TAKE_PTR(o);
}

json_object *jsonrpc_call_new(const char *method, json_object *params, int64_t id)
{
	_cleanup_json_ json_object *o = request_new(method, params);

	if (!o || add_new(o, "id", json_object_new_int64(id)) < 0)
		return NULL;
	return TAKE_PTR(o);
}

json_object *jsonrpc_notification_new(const char *method, json_object *params)
{
	return request_new(method, params);
}

const char *jsonrpc_to_string(json_object *o, size_t *ret_len)
{
	const char *s;
	size_t len = 0;

	/* PLAIN puts no whitespace between tokens and json-c escapes control
	 * characters inside strings, so the text is one line. */
	s = json_object_to_json_string_length(
	    o, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE, &len);
	if (!s)
		return NULL;
	/* The framing relies on it; refuse rather than split a message. */
	if (memchr(s, '\n', len))
		return NULL;
	if (ret_len)
		*ret_len = len;
	return s;
}
