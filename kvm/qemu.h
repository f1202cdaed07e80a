/* SPDX-License-Identifier: MIT */
/*
 * QEMU command lines built from a VM's configuration and the fds the daemon
 * holds for it. The fds reach the VMM by inheritance at fixed numbers
 * (QEMU_CHILD_FD_BASE onwards, in the order the caller passes them to the
 * launcher); the command line names those numbers.
 *
 * This builds what is the machine's own (name, machine, accelerator,
 * sandbox, CPUs, memory size, monitor, boot images, incoming mode); the
 * arguments of each device (guest RAM's backend, the serial console, a
 * network card...) are handed to it as strings, built by the caller's device types
 * (daemon/devices/), and placed where their kind belongs.
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#define QEMU_CHILD_FD_BASE 3
#define QEMU_DEFAULT_BINARY "qemu-system-x86_64"
#define QEMU_MIN_MEMORY (16ULL << 20)

/* Where a device's arguments go. QEMU numbers serial ports in the order of
 * -serial and gives PCI devices their slots in the order of -device, so
 * each kind keeps its group and a new device never renumbers another. */
enum qemu_place {
	QEMU_PLACE_MEMORY, /* memory backends, before the monitor */
	QEMU_PLACE_SERIAL, /* chardevs and serial ports, after the monitor */
	QEMU_PLACE_DEVICE, /* netdevs and devices, after the boot images */
	_QEMU_PLACE_MAX,
};

/* A growing NULL-terminated list of malloc'd arguments. The first failure
 * sticks in error; later additions do nothing. */
struct qemu_args {
	char **v;
	size_t n, cap;
	int error;
};

void qemu_args_add(struct qemu_args *a, const char *s);
__attribute__((format(printf, 2, 3))) void qemu_args_addf(struct qemu_args *a, const char *fmt,
							  ...);
void qemu_args_done(struct qemu_args *a);

struct qemu_config {
	const char *name;    /* VM name, for -name and process titles */
	const char *binary;  /* path or name searched in PATH */
	const char *machine; /* e.g. "q35"; pin a versioned type for updates */
	const char *cpu;     /* -cpu model, or NULL: QEMU's default */
	uint64_t memory_bytes;
	unsigned vcpus;
	const char *kernel, *initrd, *append; /* initrd/append may be NULL */
	bool kvm;                             /* -accel kvm, else tcg */
	bool sandbox;                         /* QEMU's own seccomp filter, every group of it on */
	bool allow_exec; /* ...but for spawn: the VMM may exec its successor (cpr-exec) */
	int qmp_fd;      /* listening UNIX socket for the QMP monitor, as the VMM sees it */
	/* The devices' arguments, by place, and the id of the memory backend
	 * that holds guest RAM (-machine memory-backend=), which one of them
	 * defines. qemu_config_done() frees them. */
	struct qemu_args devices[_QEMU_PLACE_MAX];
	const char *memory_backend;
	bool incoming; /* -incoming defer: wait for migrate-incoming */
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
 * field is missing or out of range, a device's error when building its
 * arguments failed. */
int qemu_build_argv(const struct qemu_config *c, char ***ret_argv);
/* Free the devices' arguments. */
void qemu_config_done(struct qemu_config *c);
char **strv_free(char **v);

/* Parse "268435456", "256M", "1G", "512KiB"... into bytes. -EINVAL for
 * anything else, -ERANGE on overflow. */
int qemu_parse_size(const char *s, uint64_t *ret);
