/* SPDX-License-Identifier: MIT */
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include "common/macro.h"
#include "memstore/memstore.h"

/* What a region must carry: nobody may resize it under a running guest, and
 * F_SEAL_SEAL stops a holder from adding F_SEAL_WRITE, which would freeze
 * the guest's memory. */
#define REGION_SEALS (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)

static const char *const kind_names[_MEMSTORE_KIND_MAX] = {
	[MEMSTORE_KIND_MEMFD] = "memfd",   [MEMSTORE_KIND_TAP] = "tap",
	[MEMSTORE_KIND_CHAR] = "char",     [MEMSTORE_KIND_FILE] = "file",
	[MEMSTORE_KIND_SOCKET] = "socket", [MEMSTORE_KIND_PIPE] = "pipe",
};

const char *memstore_kind_to_string(enum memstore_kind k)
{
	if (k < 0 || k >= _MEMSTORE_KIND_MAX)
		return NULL;
	return kind_names[k];
}

enum memstore_kind memstore_kind_from_string(const char *s)
{
	for (int k = 0; s && k < _MEMSTORE_KIND_MAX; k++)
		if (streq(kind_names[k], s))
			return k;
	return MEMSTORE_KIND_INVALID;
}

bool memstore_name_is_valid(const char *name)
{
	size_t n;

	if (!name || name[0] == '\0' || name[0] == '.')
		return false;
	n = strlen(name);
	if (n >= MEMSTORE_NAME_MAX)
		return false;
	return strspn(name, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-") ==
	       n;
}

static bool fd_is_tap(int fd)
{
	struct ifreq ifr = {};

	/* TUNGETIFF answers only on a tun/tap fd that is attached to an
	 * interface, which is exactly what a VMM can use. */
	if (ioctl(fd, TUNGETIFF, &ifr) < 0)
		return false;
	return (ifr.ifr_flags & IFF_TAP) != 0;
}

/* A memfd answers F_GET_SEALS, but so does every file on a tmpfs (such as
 * a console log under /run): what only a memfd has is the name the kernel
 * gives it, "/memfd:NAME (deleted)". */
static bool fd_is_memfd(int fd)
{
	char path[64], target[16];
	ssize_t n;

	if (fcntl(fd, F_GET_SEALS) < 0)
		return false;
	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	n = readlink(path, target, sizeof(target));
	return n >= 7 && memcmp(target, "/memfd:", 7) == 0;
}

int memstore_fd_kind(int fd, enum memstore_kind *ret)
{
	struct stat st;

	if (fstat(fd, &st) < 0)
		return -errno;

	if (S_ISREG(st.st_mode)) {
		*ret = fd_is_memfd(fd) ? MEMSTORE_KIND_MEMFD : MEMSTORE_KIND_FILE;
		return 0;
	}
	if (S_ISCHR(st.st_mode)) {
		*ret = fd_is_tap(fd) ? MEMSTORE_KIND_TAP : MEMSTORE_KIND_CHAR;
		return 0;
	}
	if (S_ISSOCK(st.st_mode)) {
		*ret = MEMSTORE_KIND_SOCKET;
		return 0;
	}
	if (S_ISFIFO(st.st_mode)) {
		*ret = MEMSTORE_KIND_PIPE;
		return 0;
	}
	return -EBADFD;
}

int memstore_region_create(const char *name, uint64_t size, unsigned flags, int *ret_fd)
{
	_cleanup_close_ int fd = -EBADF;
	unsigned mfd_flags = MFD_CLOEXEC | MFD_ALLOW_SEALING;
	long page = sysconf(_SC_PAGESIZE);

	if (!memstore_name_is_valid(name) || size == 0 || size > (uint64_t)INT64_MAX)
		return -EINVAL;
	if (flags & ~MEMSTORE_REGION_HUGETLB)
		return -EINVAL;
	if (flags & MEMSTORE_REGION_HUGETLB)
		mfd_flags |= MFD_HUGETLB;

	size = (size + page - 1) / page * page;
	fd = memfd_create(name, mfd_flags);
	if (fd < 0)
		return -errno;
	if (ftruncate(fd, (off_t)size) < 0)
		return -errno;
	if (fcntl(fd, F_ADD_SEALS, REGION_SEALS) < 0)
		return -errno;

	*ret_fd = TAKE_FD(fd);
	return 0;
}

int memstore_region_check(int fd, uint64_t *ret_size)
{
	struct stat st;
	int seals;

	if (fstat(fd, &st) < 0)
		return -errno;
	if (!S_ISREG(st.st_mode))
		return -EBADFD;
	seals = fcntl(fd, F_GET_SEALS);
	if (seals < 0)
		return errno == EINVAL ? -EBADFD : -errno;
	if ((seals & (F_SEAL_SHRINK | F_SEAL_GROW)) != (F_SEAL_SHRINK | F_SEAL_GROW))
		return -EBADFD;
	if (seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE))
		return -EBADFD;
	if (st.st_size <= 0)
		return -EBADFD;
	if (ret_size)
		*ret_size = (uint64_t)st.st_size;
	return 0;
}

static inline uint64_t rotl64(uint64_t x, int r)
{
	return (x << r) | (x >> (64 - r));
}

/* Four independent multiply-rotate lanes over 8-byte words: fast enough to
 * digest gigabytes, and any changed word changes the result. Not a
 * cryptographic hash; it proves that nothing was lost, not that nothing was
 * forged. */
static uint64_t digest_words(const uint64_t *w, size_t n)
{
	const uint64_t p1 = 0x9E3779B185EBCA87ULL, p2 = 0xC2B2AE3D27D4EB4FULL;
	uint64_t lane[4] = { p1, p2, p1 ^ p2, p2 - p1 };
	size_t i = 0;
	uint64_t h;

	for (; i + 4 <= n; i += 4)
		for (int l = 0; l < 4; l++)
			lane[l] = rotl64(lane[l] + w[i + l] * p2, 31) * p1;
	for (; i < n; i++)
		lane[i & 3] = rotl64(lane[i & 3] + w[i] * p2, 31) * p1;

	h = rotl64(lane[0], 1) + rotl64(lane[1], 7) + rotl64(lane[2], 12) + rotl64(lane[3], 18);
	h ^= (uint64_t)n;
	h ^= h >> 33;
	h *= p2;
	h ^= h >> 29;
	return h;
}

int memstore_region_digest(int fd, uint64_t *ret_digest)
{
	uint64_t size;
	void *p;
	int r;

	r = memstore_region_check(fd, &size);
	if (r < 0)
		return r;
	p = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED)
		return -errno;
	*ret_digest = digest_words(p, size / sizeof(uint64_t));
	munmap(p, size);
	return 0;
}

struct memstore {
	memstore_entry *entries;
	size_t n, cap;
};

int memstore_new(memstore **ret)
{
	memstore *m = calloc(1, sizeof(*m));

	if (!m)
		return -ENOMEM;
	*ret = m;
	return 0;
}

memstore *memstore_free(memstore *m)
{
	if (!m)
		return NULL;
	for (size_t i = 0; i < m->n; i++)
		safe_close(m->entries[i].fd);
	free(m->entries);
	free(m);
	return NULL;
}

static ssize_t find(const memstore *m, const char *vm, const char *name)
{
	for (size_t i = 0; i < m->n; i++)
		if (streq(m->entries[i].vm, vm) && streq(m->entries[i].name, name))
			return (ssize_t)i;
	return -ENOENT;
}

static int check_kind(int fd, enum memstore_kind kind, uint64_t *ret_size)
{
	enum memstore_kind actual;
	struct stat st;
	int r;

	*ret_size = 0;
	if (kind == MEMSTORE_KIND_MEMFD)
		return memstore_region_check(fd, ret_size);
	r = memstore_fd_kind(fd, &actual);
	if (r < 0)
		return r;
	/* A console may legitimately be a tap-less char device or a pty. */
	if (actual != kind)
		return -EBADFD;
	if (kind == MEMSTORE_KIND_FILE && fstat(fd, &st) == 0)
		*ret_size = (uint64_t)st.st_size;
	return 0;
}

int memstore_put(memstore *m, const char *vm, const char *name, enum memstore_kind kind, int fd)
{
	memstore_entry *e;
	uint64_t size;
	int r;

	if (!memstore_name_is_valid(vm) || !memstore_name_is_valid(name))
		return -EINVAL;
	if (kind < 0 || kind >= _MEMSTORE_KIND_MAX || fd < 0)
		return -EINVAL;
	if (find(m, vm, name) >= 0)
		return -EEXIST;
	r = check_kind(fd, kind, &size);
	if (r < 0)
		return r;

	if (m->n == m->cap) {
		size_t cap = m->cap ? m->cap * 2 : 16;
		memstore_entry *n = reallocarray(m->entries, cap, sizeof(*n));

		if (!n)
			return -ENOMEM;
		m->entries = n;
		m->cap = cap;
	}
	e = &m->entries[m->n++];
	*e = (memstore_entry){ .kind = kind, .fd = fd, .size = size };
	strcpy(e->vm, vm);
	strcpy(e->name, name);
	return 0;
}

int memstore_get(memstore *m, const char *vm, const char *name, const memstore_entry **ret)
{
	ssize_t i = find(m, vm, name);

	if (i < 0)
		return (int)i;
	*ret = &m->entries[i];
	return 0;
}

static void remove_at(memstore *m, size_t i)
{
	safe_close(m->entries[i].fd);
	memmove(&m->entries[i], &m->entries[i + 1], (m->n - i - 1) * sizeof(m->entries[0]));
	m->n--;
}

int memstore_remove(memstore *m, const char *vm, const char *name)
{
	ssize_t i = find(m, vm, name);

	if (i < 0)
		return (int)i;
	remove_at(m, (size_t)i);
	return 0;
}

int memstore_release_vm(memstore *m, const char *vm)
{
	int closed = 0;

	for (size_t i = m->n; i > 0; i--)
		if (streq(m->entries[i - 1].vm, vm)) {
			remove_at(m, i - 1);
			closed++;
		}
	return closed;
}

size_t memstore_count(const memstore *m, const char *vm)
{
	size_t c = 0;

	for (size_t i = 0; i < m->n; i++)
		if (!vm || streq(m->entries[i].vm, vm))
			c++;
	return c;
}

const memstore_entry *memstore_nth(const memstore *m, const char *vm, size_t i)
{
	for (size_t j = 0; j < m->n; j++)
		if (!vm || streq(m->entries[j].vm, vm)) {
			if (i == 0)
				return &m->entries[j];
			i--;
		}
	return NULL;
}
