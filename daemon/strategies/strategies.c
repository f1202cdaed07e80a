/* SPDX-License-Identifier: MIT */
/* Every update strategy cprd has: adding one is a file and a line here. */
#include <stdio.h>
#include <string.h>

#include "common/macro.h"
#include "daemon/strategies/strategy.h"

static const struct strategy *const strategies[] = {
	&strategy_handover,
	&strategy_cpr_transfer,
	&strategy_cpr_exec,
};

const struct strategy *strategy_find(const char *name)
{
	for (size_t i = 0; name && i < ELEMENTSOF(strategies); i++)
		if (streq(strategies[i]->name, name))
			return strategies[i];
	return NULL;
}

const struct strategy *strategy_nth(size_t i)
{
	return i < ELEMENTSOF(strategies) ? strategies[i] : NULL;
}

const char *strategy_names(void)
{
	static char names[128];

	if (!names[0])
		for (size_t i = 0; i < ELEMENTSOF(strategies); i++)
			snprintf(names + strlen(names), sizeof(names) - strlen(names), "%s%s",
				 i ? ", " : "", strategies[i]->name);
	return names;
}
