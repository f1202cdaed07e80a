/* SPDX-License-Identifier: MIT */
#include <string.h>

#include "common/valid.h"

/* IFNAMSIZ, counting the terminating NUL (linux/if.h clashes with net/if.h) */
#define IFNAME_MAX 16

bool str_has_ctrl(const char *s)
{
	for (; *s; s++)
		if ((unsigned char)*s < 0x20 || (unsigned char)*s == 0x7f)
			return true;
	return false;
}

const char *ifname_invalid(const char *s)
{
	size_t n = strlen(s);

	if (n == 0 || n >= IFNAME_MAX)
		return "must be 1-15 characters";
	if (strchr(s, '%'))
		return "must not contain '%': the kernel would choose the name itself";
	if (strcmp(s, ".") == 0 || strcmp(s, "..") == 0)
		return "must not be '.' or '..'";
	for (const char *p = s; *p; p++) {
		unsigned char c = (unsigned char)*p;

		if (c <= 0x20 || c >= 0x7f)
			return "must be printable ASCII without spaces";
		if (c == '/' || c == ':')
			return "must not contain '/' or ':'";
	}
	return NULL;
}
