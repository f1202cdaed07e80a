/* SPDX-License-Identifier: MIT */
/*
 * Live update of a VM's VMM. The new VMM is started beside the old one with
 * the same held fds; device state moves between them while guest RAM stays
 * in the memfd cprd holds; the old VMM is ended only once the new one runs.
 * Any failure before the new VMM runs the guest ends the new VMM and
 * resumes the old one. The engine is update.c; each strategy is one file
 * behind strategy.h.
 */
#pragma once

#include <json-c/json.h>
#include <stdint.h>

struct vm;
struct call;
struct update;
struct strategy;
struct op_type;

/* A phase's name as the registry and reports spell it, and back (-EINVAL). */
const char *update_phase_name(int phase);
int update_phase_from_name(const char *name);
/* The phase an update is in now, by name. */
const char *update_current_phase(const struct update *u);

/* Start an update; answers c (may be NULL) with the report when done.
 * binary is the new VMM (absolute path). */
void update_start(struct vm *vm, const struct strategy *s, const char *binary, double timeout,
		  struct call *c);

/* The operation's type (op.h): vm.c routes the VM's VMM's events, exit,
 * monitor and cprd's shutdown to it. On shutdown an update ends no
 * process: the next cprd settles it from the registry. */
extern const struct op_type update_op_type;
/* The VM's update in flight, or NULL. */
struct update *update_of(const struct vm *vm);

/* What a restarted cprd needs to resolve an update it did not see end. */
json_object *update_to_record(const struct update *u);
/* History line for an update that cprd's restart interrupted. rec is the
 * update record from the registry (borrowed). */
void update_record_interrupted(struct vm *vm, json_object *rec, const char *resolution);

/* The VM's finished updates, newest first, from its history file. */
json_object *update_history(struct vm *vm);
