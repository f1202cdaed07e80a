/* SPDX-License-Identifier: MIT */
/*
 * Text a VMM wrote (QMP error descriptions, event data, its log), made
 * safe to put on one line of a log, a journal field or a terminal. Pure:
 * no I/O, no logging.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>

/* Whether s (len bytes) holds a control byte (C0, DEL or C1), or bytes
 * that are not UTF-8. */
bool str_needs_escape(const char *s, size_t len);

/* s (len bytes) into out (size > 0 bytes, always NUL-terminated), each
 * control byte and each byte that is not part of valid UTF-8 written as
 * \xNN (C1 controls, U+0080-U+009F, as their two bytes). Valid UTF-8
 * stays as it is, and so does a backslash: the result is for people, not
 * to be decoded, and escaping it again changes nothing. A result longer
 * than size - 1 is cut at a character boundary. Returns the length written. */
size_t str_escape(const char *s, size_t len, char *out, size_t size);
