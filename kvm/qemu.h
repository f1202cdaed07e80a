/* SPDX-License-Identifier: MIT */
/*
 * QEMU command lines built from a VM's configuration and the fds the daemon
 * holds for it. The fds reach the VMM by inheritance at fixed numbers
 * (QEMU_CHILD_FD_BASE onwards, in the order the caller passes them to the
 * launcher); the command line names those numbers.
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#define QEMU_CHILD_FD_BASE 3
#define QEMU_DEFAULT_BINARY "qemu-system-x86_64"
#define QEMU_MIN_MEMORY (16ULL << 20)

struct qemu_config {
	const char *name;    /* VM name, for -name and process titles */
	const char *binary;  /* path or name searched in PATH */
	const char *machine; /* e.g. "q35"; pin a versioned type for updates */
	uint64_t memory_bytes;
	unsigned vcpus;
	const char *kernel, *initrd, *append; /* initrd/append may be NULL */
	bool kvm;                             /* -accel kvm, else tcg */
	bool sandbox;                         /* QEMU's own seccomp filter, every group of it on */
	bool allow_exec; /* ...but for spawn: the VMM may exec its successor (cpr-exec) */
	/* fd numbers as the VMM sees them; -1 when absent */
	int ram_fd;     /* sealed memfd holding guest RAM */
	int console_fd; /* serial console log, opened O_APPEND by the daemon */
	int qmp_fd;     /* listening UNIX socket for the QMP monitor */
	int tap_fd;     /* tap device, optional */
	bool incoming;  /* -incoming defer: wait for migrate-incoming */
	/* -incoming this URI instead of defer (a cpr-exec successor loads its
	 * state file as it starts); implies incoming */
	const char *incoming_uri;
	bool check; /* a pre-flight or probe: named cprd-check (-name process=) */
	/* cpr-transfer destination: both channels are UNIX socket paths (QEMU
	 * 10.0 takes the cpr channel only as a path, and an fd main channel
	 * crashes the source in this mode). The destination reads the cpr
	 * channel before its monitor exists, so it needs nothing else. */
	const char *cpr_main_path, *cpr_state_path;
};

/* Build a NULL-terminated argv (malloc'd strings). -EINVAL when a required
 * field is missing or out of range. */
int qemu_build_argv(const struct qemu_config *c, char ***ret_argv);
char **strv_free(char **v);

/* Parse "268435456", "256M", "1G", "512KiB"... into bytes. -EINVAL for
 * anything else, -ERANGE on overflow. */
int qemu_parse_size(const char *s, uint64_t *ret);
