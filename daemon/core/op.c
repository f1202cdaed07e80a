/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "daemon/observe/log.h"
#include "daemon/core/op.h"
#include "daemon/core/server.h"
#include "daemon/core/vm.h"
#include "proto/jsonrpc.h"

const char *op_phase_name(const struct op_type *t, int p)
{
	return p >= 0 && (unsigned)p < t->n_phases ? t->phases[p] : "unknown";
}

int op_phase_from_name(const struct op_type *t, const char *name)
{
	for (unsigned p = 0; name && p < t->n_phases; p++)
		if (streq(t->phases[p], name))
			return (int)p;
	return -EINVAL;
}

bool op_may_move(const struct op_type *t, int from, int to)
{
	return from >= 0 && (unsigned)from < t->n_phases && to >= 0 && (unsigned)to < t->n_phases &&
	       (t->next[from] & OP_PHASE(to));
}

int op_enter(struct op *op, int p)
{
	op->phase = p;
	/* Before anything of the phase happens: a restarted cprd must find
	 * the operation where it is now. */
	return op->durable & OP_PHASE(p) ? vm_registry_commit(op->vm->d) : 0;
}

bool op_set_phase(struct op *op, int p, int *r)
{
	const struct op_type *t = op->type;
	int w;

	if (!op_may_move(t, op->phase, p)) {
		log_error("BUG: VM %s: %s cannot go from phase %s to %s; refused", op->vm->cfg.name,
			  t->name, op_phase_name(t, op->phase), op_phase_name(t, p));
		return false;
	}
	w = op_enter(op, p);
	if (r)
		*r = w;
	return true;
}

void op_fail_state(struct call *c, const struct vm *vm, const struct op_type *t)
{
	char states[128] = "";
	size_t n = 0;

	for (int s = 0; s < _VM_STATE_MAX; s++)
		if (t->from & OP_FROM(s))
			n += (size_t)snprintf(states + n, sizeof(states) - n, "%s%s",
					      n ? " or " : "", vm_state_to_string(s));
	call_fail(c, JSONRPC_ERR_BAD_STATE, "VM '%s' is %s; only a %s VM can be %s", vm->cfg.name,
		  vm_state_to_string(vm->state), states, t->verb);
}
