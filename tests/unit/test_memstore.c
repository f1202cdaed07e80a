/* SPDX-License-Identifier: MIT */
/* memstore on real memfds, pipes, sockets and files. */
#include <check.h>
#include <fcntl.h>
#include <linux/magic.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/vfs.h>

#include "common/macro.h"
#include "memstore/memstore.h"

static bool fd_is_closed(int fd)
{
	return fcntl(fd, F_GETFD) == -1 && errno == EBADF;
}

START_TEST(region_is_sealed_and_cloexec)
{
	int fd = -1, seals;
	uint64_t size = 0;

	ck_assert_int_eq(memstore_region_create("ram0", 1 << 20, 0, &fd), 0);
	ck_assert_int_eq(fcntl(fd, F_GETFD) & FD_CLOEXEC, FD_CLOEXEC);
	seals = fcntl(fd, F_GET_SEALS);
	ck_assert_int_eq(seals & (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL),
			 F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL);
	ck_assert_int_eq(memstore_region_check(fd, &size), 0);
	ck_assert_uint_eq(size, 1 << 20);
	/* Nobody can resize it, nor freeze it with a write seal. */
	ck_assert_int_eq(ftruncate(fd, 4096), -1);
	ck_assert_int_eq(errno, EPERM);
	ck_assert_int_eq(ftruncate(fd, 2 << 20), -1);
	ck_assert_int_eq(fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE), -1);
	close(fd);
}
END_TEST

START_TEST(region_rejects_bad_arguments)
{
	int fd = -1;

	ck_assert_int_eq(memstore_region_create("ram0", 0, 0, &fd), -EINVAL);
	ck_assert_int_eq(memstore_region_create("../x", 4096, 0, &fd), -EINVAL);
	ck_assert_int_eq(memstore_region_create("ram0", 4096, 0x80, &fd), -EINVAL);
	ck_assert_int_eq(fd, -1);
}
END_TEST

START_TEST(region_check_rejects_unsealed_memfd_and_file)
{
	_cleanup_close_ int m = memfd_create("x", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	_cleanup_close_ int f = open("/proc/self/exe", O_RDONLY | O_CLOEXEC);

	ck_assert_int_ge(m, 0);
	ck_assert_int_eq(ftruncate(m, 4096), 0);
	ck_assert_int_eq(memstore_region_check(m, NULL), -EBADFD);
	ck_assert_int_eq(memstore_region_check(f, NULL), -EBADFD);
}
END_TEST

START_TEST(digest_sees_every_change)
{
	int fd = -1;
	uint64_t d0, d1, d2;
	unsigned char *p;

	ck_assert_int_eq(memstore_region_create("ram0", 1 << 20, 0, &fd), 0);
	ck_assert_int_eq(memstore_region_digest(fd, &d0), 0);
	p = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	ck_assert_ptr_ne(p, MAP_FAILED);
	p[(1 << 20) - 1] = 1;
	ck_assert_int_eq(memstore_region_digest(fd, &d1), 0);
	ck_assert_uint_ne(d0, d1);
	p[(1 << 20) - 1] = 0;
	ck_assert_int_eq(memstore_region_digest(fd, &d2), 0);
	ck_assert_uint_eq(d0, d2);
	munmap(p, 1 << 20);
	close(fd);
}
END_TEST

START_TEST(fd_kinds_are_recognised)
{
	int p[2], s[2], m = -1;
	enum memstore_kind k;
	_cleanup_close_ int f = open("/proc/self/exe", O_RDONLY | O_CLOEXEC);
	_cleanup_close_ int c = open("/dev/null", O_RDWR | O_CLOEXEC);

	ck_assert_int_eq(pipe2(p, O_CLOEXEC), 0);
	ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, s), 0);
	ck_assert_int_eq(memstore_region_create("ram0", 4096, 0, &m), 0);

	ck_assert_int_eq(memstore_fd_kind(p[0], &k), 0);
	ck_assert_int_eq(k, MEMSTORE_KIND_PIPE);
	ck_assert_int_eq(memstore_fd_kind(s[0], &k), 0);
	ck_assert_int_eq(k, MEMSTORE_KIND_SOCKET);
	ck_assert_int_eq(memstore_fd_kind(m, &k), 0);
	ck_assert_int_eq(k, MEMSTORE_KIND_MEMFD);
	ck_assert_int_eq(memstore_fd_kind(f, &k), 0);
	ck_assert_int_eq(k, MEMSTORE_KIND_FILE);
	ck_assert_int_eq(memstore_fd_kind(c, &k), 0);
	ck_assert_int_eq(k, MEMSTORE_KIND_CHAR);
	ck_assert_int_eq(memstore_fd_kind(9999, &k), -EBADF);
	close_many(p, 2);
	close_many(s, 2);
	close(m);
}
END_TEST

/* Under /run the console log is a file on tmpfs, which answers F_GET_SEALS
 * like a memfd: it is still a file. */
START_TEST(a_file_on_tmpfs_is_a_file)
{
	char path[] = "/dev/shm/cprd-memstore-XXXXXX";
	_cleanup_close_ int f = mkostemp(path, O_CLOEXEC);
	enum memstore_kind k;
	struct statfs sfs;
	memstore *m = NULL;

	ck_assert_int_ge(f, 0);
	unlink(path);
	if (fstatfs(f, &sfs) < 0 || sfs.f_type != TMPFS_MAGIC) {
		printf("SKIP a_file_on_tmpfs_is_a_file: /dev/shm is not a tmpfs here\n");
		return;
	}
	ck_assert_int_ge(fcntl(f, F_GET_SEALS), 0);
	ck_assert_int_eq(memstore_fd_kind(f, &k), 0);
	ck_assert_int_eq(k, MEMSTORE_KIND_FILE);
	ck_assert_int_eq(memstore_new(&m), 0);
	ck_assert_int_eq(memstore_put(m, "vm1", "console", MEMSTORE_KIND_FILE, f), 0);
	TAKE_FD(f);
	memstore_free(m);
}
END_TEST

START_TEST(custody_put_get_remove)
{
	memstore *m = NULL;
	const memstore_entry *e;
	int ram = -1, p[2];

	ck_assert_int_eq(memstore_new(&m), 0);
	ck_assert_int_eq(memstore_region_create("ram0", 8192, 0, &ram), 0);
	ck_assert_int_eq(pipe2(p, O_CLOEXEC), 0);

	ck_assert_int_eq(memstore_put(m, "vm1", "ram0", MEMSTORE_KIND_MEMFD, ram), 0);
	ck_assert_int_eq(memstore_get(m, "vm1", "ram0", &e), 0);
	ck_assert_int_eq(e->fd, ram);
	ck_assert_uint_eq(e->size, 8192);
	ck_assert_int_eq(memstore_get(m, "vm2", "ram0", &e), -ENOENT);

	/* Wrong kind and duplicates are refused and the fd stays the caller's. */
	ck_assert_int_eq(memstore_put(m, "vm1", "net0", MEMSTORE_KIND_TAP, p[0]), -EBADFD);
	ck_assert_int_eq(memstore_put(m, "vm1", "ram0", MEMSTORE_KIND_PIPE, p[0]), -EEXIST);
	ck_assert_int_eq(memstore_put(m, "vm1", "bad/name", MEMSTORE_KIND_PIPE, p[0]), -EINVAL);
	ck_assert(!fd_is_closed(p[0]));

	ck_assert_int_eq(memstore_put(m, "vm1", "pipe", MEMSTORE_KIND_PIPE, p[0]), 0);
	ck_assert_uint_eq(memstore_count(m, "vm1"), 2);
	ck_assert_uint_eq(memstore_count(m, NULL), 2);
	ck_assert_str_eq(memstore_nth(m, "vm1", 1)->name, "pipe");
	ck_assert_ptr_null(memstore_nth(m, "vm1", 2));

	ck_assert_int_eq(memstore_remove(m, "vm1", "pipe"), 0);
	ck_assert(fd_is_closed(p[0]));
	ck_assert_int_eq(memstore_remove(m, "vm1", "pipe"), -ENOENT);
	close(p[1]);
	memstore_free(m);
	ck_assert(fd_is_closed(ram));
}
END_TEST

START_TEST(custody_release_vm_closes_only_that_vm)
{
	memstore *m = NULL;
	int a = -1, b = -1, c = -1;

	ck_assert_int_eq(memstore_new(&m), 0);
	ck_assert_int_eq(memstore_region_create("a", 4096, 0, &a), 0);
	ck_assert_int_eq(memstore_region_create("b", 4096, 0, &b), 0);
	ck_assert_int_eq(memstore_region_create("c", 4096, 0, &c), 0);
	ck_assert_int_eq(memstore_put(m, "vm1", "ram0", MEMSTORE_KIND_MEMFD, a), 0);
	ck_assert_int_eq(memstore_put(m, "vm1", "ram1", MEMSTORE_KIND_MEMFD, b), 0);
	ck_assert_int_eq(memstore_put(m, "vm2", "ram0", MEMSTORE_KIND_MEMFD, c), 0);

	ck_assert_int_eq(memstore_release_vm(m, "vm1"), 2);
	ck_assert(fd_is_closed(a) && fd_is_closed(b));
	ck_assert(!fd_is_closed(c));
	ck_assert_uint_eq(memstore_count(m, NULL), 1);
	memstore_free(m);
	ck_assert(fd_is_closed(c));
}
END_TEST

START_TEST(names_and_kinds_round_trip)
{
	ck_assert(memstore_name_is_valid("ram0"));
	ck_assert(memstore_name_is_valid("vm-1.test_2"));
	ck_assert(!memstore_name_is_valid(""));
	ck_assert(!memstore_name_is_valid(".hidden"));
	ck_assert(!memstore_name_is_valid("a b"));
	ck_assert(!memstore_name_is_valid(
	    "0123456789012345678901234567890123456789012345678901234567890123"));
	for (int k = 0; k < _MEMSTORE_KIND_MAX; k++)
		ck_assert_int_eq(memstore_kind_from_string(memstore_kind_to_string(k)), k);
	ck_assert_int_eq(memstore_kind_from_string("floppy"), MEMSTORE_KIND_INVALID);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("memstore");
	TCase *t = tcase_create("core");
	SRunner *sr;
	int failed;

	tcase_add_test(t, region_is_sealed_and_cloexec);
	tcase_add_test(t, region_rejects_bad_arguments);
	tcase_add_test(t, region_check_rejects_unsealed_memfd_and_file);
	tcase_add_test(t, digest_sees_every_change);
	tcase_add_test(t, fd_kinds_are_recognised);
	tcase_add_test(t, a_file_on_tmpfs_is_a_file);
	tcase_add_test(t, custody_put_get_remove);
	tcase_add_test(t, custody_release_vm_closes_only_that_vm);
	tcase_add_test(t, names_and_kinds_round_trip);
	suite_add_tcase(s, t);
	sr = srunner_create(s);
	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? 1 : 0;
}
