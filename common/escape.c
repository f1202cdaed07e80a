/* SPDX-License-Identifier: MIT */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/escape.h"

/* The length of the valid UTF-8 sequence at s (at most n bytes), 0 when
 * there is none (RFC 3629: no overlong forms, no surrogates, nothing past
 * U+10FFFF). */
static size_t utf8_len(const unsigned char *s, size_t n)
{
	size_t k;
	uint32_t c;

	if (s[0] < 0x80)
		return 1;
	if (s[0] >= 0xc2 && s[0] <= 0xdf)
		k = 2, c = s[0] & 0x1f;
	else if (s[0] >= 0xe0 && s[0] <= 0xef)
		k = 3, c = s[0] & 0x0f;
	else if (s[0] >= 0xf0 && s[0] <= 0xf4)
		k = 4, c = s[0] & 0x07;
	else
		return 0;
	if (n < k)
		return 0;
	for (size_t i = 1; i < k; i++) {
		if ((s[i] & 0xc0) != 0x80)
			return 0;
		c = c << 6 | (s[i] & 0x3f);
	}
	if ((k == 3 && c < 0x800) || (k == 4 && (c < 0x10000 || c > 0x10ffff)) ||
	    (c >= 0xd800 && c <= 0xdfff))
		return 0;
	return k;
}

/* How many bytes at s stay as they are: 0 when the first must be escaped. */
static size_t plain_len(const unsigned char *s, size_t n)
{
	size_t k = utf8_len(s, n);

	if (k == 1 && (s[0] < 0x20 || s[0] == 0x7f))
		return 0;
	if (k == 2 && s[0] == 0xc2 && s[1] < 0xa0)
		return 0; /* C1: some terminals act on them as on ESC [ */
	return k;
}

bool str_needs_escape(const char *s, size_t len)
{
	const unsigned char *p = (const unsigned char *)s;

	for (size_t i = 0, k; i < len; i += k)
		if ((k = plain_len(p + i, len - i)) == 0)
			return true;
	return false;
}

size_t str_escape(const char *s, size_t len, char *out, size_t size)
{
	static const char hex[] = "0123456789abcdef";
	const unsigned char *p = (const unsigned char *)s;
	size_t o = 0;

	for (size_t i = 0; i < len;) {
		size_t k = plain_len(p + i, len - i);

		if (k > 0) {
			if (o + k >= size)
				break;
			memcpy(out + o, p + i, k);
			o += k;
			i += k;
			continue;
		}
		/* A C1 control is two bytes, each escaped. */
		k = p[i] == 0xc2 && utf8_len(p + i, len - i) == 2 ? 2 : 1;
		if (o + 4 * k >= size)
			break;
		for (size_t j = 0; j < k; j++, i++) {
			out[o++] = '\\';
			out[o++] = 'x';
			out[o++] = hex[p[i] >> 4];
			out[o++] = hex[p[i] & 15];
		}
	}
	out[o] = '\0';
	return o;
}
