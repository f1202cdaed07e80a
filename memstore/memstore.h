/* SPDX-License-Identifier: MIT */
/*
 * Guest memory regions and the custody table of held fds.
 *
 * A region is a memfd, close-on-exec, sized once and sealed so that no
 * holder (QEMU included) can shrink it under a running guest, grow it, or add
 * a write seal. The custody table maps (vm, name) to an fd whose kind was
 * verified with fstat and friends when it entered custody.
 *
 * Library: no logging, no exit(); errors are negative errno.
 */
#pragma once

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define MEMSTORE_NAME_MAX 64

enum memstore_kind {
	MEMSTORE_KIND_MEMFD,  /* sealed guest memory */
	MEMSTORE_KIND_TAP,    /* /dev/net/tun fd attached to an interface */
	MEMSTORE_KIND_CHAR,   /* other character device (console, ...) */
	MEMSTORE_KIND_FILE,   /* regular file (logs, disks) */
	MEMSTORE_KIND_SOCKET, /* any socket (migration channels, consoles) */
	MEMSTORE_KIND_PIPE,
	_MEMSTORE_KIND_MAX,
	MEMSTORE_KIND_INVALID = -EINVAL,
};

const char *memstore_kind_to_string(enum memstore_kind k);
enum memstore_kind memstore_kind_from_string(const char *s);

/* Classify an open fd. */
int memstore_fd_kind(int fd, enum memstore_kind *ret);

/* Names: 1..MEMSTORE_NAME_MAX-1 of [A-Za-z0-9_.-], not starting with '.' */
bool memstore_name_is_valid(const char *name);

enum {
	MEMSTORE_REGION_HUGETLB = 1 << 0,
};

/* Create a sealed memfd region of size bytes (> 0, page aligned up). */
int memstore_region_create(const char *name, uint64_t size, unsigned flags, int *ret_fd);

/* Check that fd is a region as created above: a memfd that cannot shrink or
 * grow. Returns its size. -EBADFD when it is not such a region. */
int memstore_region_check(int fd, uint64_t *ret_size);

/* Fast 64-bit digest of a region's whole contents (read-only mapping). */
int memstore_region_digest(int fd, uint64_t *ret_digest);

typedef struct memstore memstore;

typedef struct memstore_entry {
	char vm[MEMSTORE_NAME_MAX];
	char name[MEMSTORE_NAME_MAX];
	enum memstore_kind kind;
	int fd;
	uint64_t size; /* for regions and files, else 0 */
} memstore_entry;

int memstore_new(memstore **ret);
/* Closes every held fd. Accepts NULL. */
memstore *memstore_free(memstore *m);

/*
 * Take fd into custody as (vm, name). The fd must be of the given kind
 * (-EBADFD otherwise; for MEMSTORE_KIND_MEMFD it must pass
 * memstore_region_check). -EEXIST when (vm, name) is held already, -EINVAL
 * for a bad name. Ownership of fd passes only on success.
 */
int memstore_put(memstore *m, const char *vm, const char *name, enum memstore_kind kind, int fd);

/* Look up; the entry stays owned by the store. -ENOENT when absent. */
int memstore_get(memstore *m, const char *vm, const char *name, const memstore_entry **ret);

/* Remove and close. -ENOENT when absent. */
int memstore_remove(memstore *m, const char *vm, const char *name);

/* Close and forget everything held for vm. Returns how many fds were closed. */
int memstore_release_vm(memstore *m, const char *vm);

/* Number of entries for vm (NULL: for all VMs). */
size_t memstore_count(const memstore *m, const char *vm);

/* Iterate: i-th entry of vm (NULL: of all), or NULL past the end. */
const memstore_entry *memstore_nth(const memstore *m, const char *vm, size_t i);
