/* SPDX-License-Identifier: MIT */
/*
 * The pre-flight of an update (vm.update with "check": true): start the
 * new binary with the VM's own configuration, paused and waiting for an
 * incoming migration, beside the running guest; confirm that it starts,
 * answers its monitor and offers what the strategy needs; report its
 * version and build, and that it has the VM's machine type (and, for
 * cpr-transfer, is no older than the running QEMU); end it. The guest is
 * never paused and nothing goes into the VM's history.
 */
#pragma once

struct vm;
struct call;
struct strategy;

/* Answers c when done. The VM must be running and neither updated nor
 * checked already (the caller checks). */
void check_start(struct vm *vm, const struct strategy *s, const char *binary, double timeout,
		 struct call *c);

/* The first step of an update to a binary other than the running one: start
 * it beside the guest (with the VM's machine alias) and ask its machine
 * types and version. An update it cannot be given (the VM's pinned machine
 * type missing; cpr-transfer to an older QEMU) is refused with the reason
 * before anything changed; otherwise, or when the probe learns nothing (the
 * binary does not start), update_start() follows and reports. */
void check_then_update(struct vm *vm, const struct strategy *s, const char *binary, double timeout,
		       struct call *c);
