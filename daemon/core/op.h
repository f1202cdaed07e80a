/* SPDX-License-Identifier: MIT */
/*
 * What runs on a VM: at most one operation at a time (vm->op), of a type
 * from a table (libvirt's domain job, systemd's unit job). A type names
 * itself, says what the VM is while it runs ("being updated"), from which
 * VM states it may start, its phases and which moves between them it
 * allows, and which of them are durable (entering one writes the registry
 * before anything else happens). vm.c routes what the VM's own VMM does
 * (its events, its exit, its monitor coming and going) and cprd's shutdown
 * to the type's hooks and knows nothing of any operation itself.
 *
 * An operation's own state embeds a struct op (container_of()).
 */
#pragma once

#include <json-c/json.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct vm;
struct call;
struct op;

#define OP_FROM(state) (1u << (state))
#define OP_PHASE(p) (1u << (p))
#define OP_PHASES_MAX 16

/* Resuming the guest in a VMM that may still be finishing a migration
 * ("finish-migrate" refuses cont for a moment): every operation retries
 * so often, so many times. */
#define OP_CONT_RETRY 0.05
#define OP_CONT_RETRIES 40

struct op_type {
	const char *name; /* as the registry spells it: "update", "checkpoint"... */
	const char *busy; /* what the VM is meanwhile: "being updated" */
	const char *verb; /* "only a running VM can be <verb>" */
	unsigned from;    /* OP_FROM(VM_...): the states it may start from */
	/* A request that holds the VM only until it is answered (create,
	 * destroy, pause): an update asked meanwhile is refused for the VM's
	 * state, not as a second operation. */
	bool request;

	/* Phases, by number: their names, next[p] the phases p may move to
	 * (OP_PHASE bits), and the durable ones (OP_PHASE bits). n_phases 0:
	 * the type has none. */
	const char *const *phases;
	unsigned n_phases;
	const unsigned *next;
	unsigned durable;

	/* Routed here by vm.c while the operation is the VM's; any may be
	 * NULL. The VM's own VMM said something: */
	void (*vmm_event)(struct op *op, const char *event, json_object *data, int64_t ts_us);
	/* It exited: true when the operation decided what the VM is now,
	 * false when the VM is to be crashed as usual. */
	bool (*vmm_exited)(struct op *op);
	/* Its monitor answers again (after cprd reconnected): true when the
	 * operation took it over. */
	bool (*vmm_ready)(struct op *op);
	/* Its monitor closed while the process lives on; vm.c reconnects. */
	void (*monitor_lost)(struct op *op);
	/* cprd stops: answer the caller, end what must not outlive cprd,
	 * free the operation; the VM's op is NULL afterwards. */
	void (*detach)(struct op *op);
	/* Its part of the VM's registry record, added to rec. */
	void (*record)(const struct op *op, json_object *rec);
	/* Its part of vm.status, added to o. */
	void (*status)(const struct op *op, json_object *o);
};

struct op {
	const struct op_type *type;
	struct vm *vm;
	int phase;
	unsigned durable;  /* the type's durable phases, and those this one adds */
	struct call *call; /* a request's (create, destroy, pause): to answer */
};

#define container_of(ptr, type, member) ((type *)((char *)(ptr)-offsetof(type, member)))

/* Beginning and ending an operation (the VM's one slot) are vm.h's
 * vm_op_begin() and vm_op_end(). */

/* Move op to phase p: only along its type's table (a move it does not
 * allow is refused, logged as a bug, and returns false). Entering a
 * durable phase writes the registry before this returns: r, when not
 * NULL, gets that write's result (0 or negative errno), 0 otherwise. */
bool op_set_phase(struct op *op, int p, int *r);
/* Whether t's table allows from -> to. */
bool op_may_move(const struct op_type *t, int from, int to);
/* op_set_phase() without the check, for a caller that checked a stricter
 * table of its own (an update's strategy): returns the write's result. */
int op_enter(struct op *op, int p);
/* A phase's name ("unknown" out of range), and back (-EINVAL). */
const char *op_phase_name(const struct op_type *t, int p);
int op_phase_from_name(const struct op_type *t, const char *name);

/* Whether a type may start on a VM in state. */
static inline bool op_may_start_in(const struct op_type *t, int state)
{
	return state >= 0 && state < 32 && (t->from & OP_FROM(state));
}
/* Fail c: the VM is in a state t may not start from ("VM 'x' is paused;
 * only a running VM can be updated"). */
void op_fail_state(struct call *c, const struct vm *vm, const struct op_type *t);
