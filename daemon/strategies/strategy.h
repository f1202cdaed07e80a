/* SPDX-License-Identifier: MIT */
/*
 * What an update strategy is, as the engine (update.c) sees it. The engine
 * owns everything strategies share: the phases and their deadline, the
 * new VMM's launch and its events, the commit, the switch to the new VMM,
 * rollback, the report, history and the registry record. A strategy owns
 * only how device state gets from the old VMM to the new one: one file,
 * one `struct strategy`, one entry in update.c's table.
 *
 * The engine's guarantees (docs/ARCHITECTURE.md, "The update engine"):
 *  - the new VMM starts paused (-S) and runs the guest only when the engine
 *    says `cont`, once the new VMM reports the whole state loaded: before
 *    that commit a rollback is always safe, since the guest never ran there;
 *  - the new VMM runs the guest once its RESUME has been seen (QEMU sends
 *    it before it starts the vCPUs); from then on the old VMM is never
 *    resumed;
 *  - an update ends exactly once; ending it cancels every callback it still
 *    has on either monitor and its timers; its memory goes only after the
 *    dispatch that ended it has returned.
 */
#pragma once

#include <ev.h>
#include <json-c/json.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "common/macro.h"
#include "daemon/core/op.h"

struct vm;
struct vmm;
struct call;
struct vmm_incoming;
struct update;

enum phase {
	PHASE_LAUNCH,   /* the new VMM starting, until its monitor answers */
	PHASE_PREPARE,  /* capabilities, channels, parameters on the VMMs */
	PHASE_MIGRATE,  /* device state moving; the guest pauses in here */
	PHASE_COMMIT,   /* the new VMM holds the state and was told to run */
	PHASE_END_OLD,  /* the guest runs in the new VMM; the old one goes */
	PHASE_ROLLBACK, /* the new VMM ended; the guest resumes in the old */
	PHASE_DONE,     /* ended: reported, nothing pending */
	_PHASE_MAX,
};

#define PHASE_BIT(p) (1u << (p))

struct strategy {
	const char *name; /* as the RPC and cprctl take it */
	enum phase first;
	/* Phases that are durable for this strategy besides the engine's
	 * (op.h): entering one writes the registry. */
	unsigned durable;
	/* enum device_carry: the way this strategy hands devices on. */
	unsigned carry;
	/* The VMM process becomes the new VMM itself (cpr-exec): there is no
	 * second process, u->next stays NULL until a rollback needs one, and
	 * the engine tells the two images apart (see update.c, "in place"). */
	bool in_place;
	/* next[p]: the phases p may move to. PHASE_DONE is always allowed. */
	unsigned next[_PHASE_MAX];
	/* Begin: prepare the VMMs, launch the new one (update_launch). Any
	 * failure is reported with update_rollback(). */
	void (*start)(struct update *u);
	/* The new VMM's monitor answers. */
	void (*new_ready)(struct update *u);
	/* An event of the old VMM, after the engine has seen it. Optional. */
	void (*old_event)(struct update *u, const char *event, json_object *data);
	/* Rolling back: drop what the strategy holds for the migration and
	 * queue what the old VMM needs before it resumes. Optional. */
	void (*rollback)(struct update *u, struct vmm *old);
	/* In place, once the old image is gone: the URI of the state it left,
	 * which a fresh VMM of the old binary can load (the rollback QEMU
	 * itself lacks), or NULL. Optional. */
	const char *(*restore_uri)(struct update *u);
	/* Whether vm can be updated this way to binary at all: false, with
	 * the reason in why, refuses the update before anything is asked of
	 * a VMM. Optional. */
	bool (*possible)(const struct vm *vm, const char *binary, char *why, size_t size);
	/* The update is over: release the strategy's own state. */
	void (*done)(struct update *u);
	/* After a cprd restart, remove what an interrupted update of this
	 * strategy left in the VM's directory. Optional. */
	void (*settle)(const char *vm_dir);
	/* The pre-flight (check.c): the migration capabilities a new VMM must
	 * offer (NULL-ended), and the migration mode it must accept (NULL:
	 * the default one). */
	const char *const *needs_caps;
	const char *needs_mode;
};

extern const struct strategy strategy_handover;
extern const struct strategy strategy_cpr_transfer;
extern const struct strategy strategy_cpr_exec;

/* The table of strategies (strategies.c): NULL when there is none of that
 * name; "handover, cpr-transfer" for messages and help. */
const struct strategy *strategy_find(const char *name);
const struct strategy *strategy_nth(size_t i); /* NULL past the last */
const char *strategy_names(void);

struct update {
	struct op op; /* the VM's operation (op.h) */
	struct vm *vm;
	const struct strategy *s;
	void *priv; /* the strategy's own */
	struct call *call;
	enum phase phase;
	enum phase failed_in; /* the phase a rollback started from */
	struct vmm *next;     /* the new VMM until the VM adopts it */
	struct vmm *old;      /* the old VMM once the guest has left it */
	ev_timer timer;       /* deadline of the current phase */
	ev_timer retry;       /* rollback: asking the old VMM to resume again */
	ev_timer reap;        /* frees the update once its end has unwound */
	double timeout;
	bool ended;
	bool old_gone;             /* the old VMM exited before the switch */
	bool killing_new;          /* committed, unconfirmed: waiting for its exit */
	bool awaiting_old_monitor; /* rolling back: its monitor is to come back */
	bool exec_seen;            /* in place: the old image closed its monitor to exec */
	bool state_saved;          /* in place: the old image completed; it execs next */
	bool restoring;            /* in place: a fresh old VMM is to load the state */
	bool stats_asked, stats_pending;
	unsigned cont_tries;
	uint64_t t0_mono, t0_real;
	int64_t stop_us, resume_us, old_resume_us; /* QEMU event timestamps */
	int64_t bytes;
	pid_t old_pid, new_pid, restored_pid;
	uint64_t old_image; /* in place: the old image's proc_image_id(), 0 unknown */
	char *old_binary, *new_binary;
	char old_version[32], new_version[32];
	char error[1024]; /* room for a reason and VM_VMM_SAID_MAX of the VMM's words */
};

/* ---- what the engine offers strategies ---- */

/* Move to p; a move the strategy's table does not allow is refused and
 * logged as a bug (returns false). */
bool update_set_phase(struct update *u, enum phase p);
/* Give up before the commit: end the new VMM, resume the guest in the old
 * one. No-op once the update has ended or is rolling back already. */
_printf_(2, 3) void update_rollback(struct update *u, const char *fmt, ...);
/* Start the new VMM and record it in the registry. Its monitor, events and
 * exit are the engine's; s->new_ready runs when it answers. false when it
 * could not be started or recorded: the update is then rolling back. */
bool update_launch(struct update *u, const struct vmm_incoming *in);
/* PHASE_MIGRATE, and `migrate` on the old VMM with args (taken). */
void update_migrate(struct update *u, json_object *args);
/* The VM's VMM directory (owned by its uid, inside a confined VMM's
 * root at the same path), for what the strategy's VMMs open by path. */
const char *update_vm_dir(const struct update *u);
