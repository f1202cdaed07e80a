/* SPDX-License-Identifier: MIT */
/* The device types (daemon/devices/): each one's QEMU arguments for a given
 * fd number, where a VMM finds their fds, how they record themselves and
 * read an older record back, and how they open what they hold, on real
 * kernel objects but without a process. */
#include <check.h>
#include <endian.h>
#include <errno.h>
#include <stdio.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/access.h"
#include "common/macro.h"
#include "daemon/devices/devices.h"
#include "daemon/core/vm.h"
#include "kvm/qemu.h"

#define device_ram (*device_type_find("ram0"))
#define device_console (*device_type_find("console"))
#define device_tap (*device_type_find("net0"))
#define device_disk (*device_type_find("disk"))

/* The index in the table of the type of id. */
static size_t index_of(const char *id)
{
	const struct device_type *t;

	for (size_t i = 0; (t = device_type_nth(i)); i++)
		if (streq(t->id, id))
			return i;
	ck_abort_msg("no device type %s", id);
	return 0;
}

static struct qemu_config machine(void)
{
	return (struct qemu_config){ .memory_bytes = 256ULL << 20 };
}

/* qc's arguments at place p, one a line. */
static char *args_at(const struct qemu_config *qc, enum qemu_place p)
{
	char *text = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&text, &len);

	ck_assert_ptr_nonnull(f);
	for (size_t i = 0; i < qc->devices[p].n; i++)
		fprintf(f, "%s\n", qc->devices[p].v[i]);
	ck_assert_int_eq(fclose(f), 0);
	return text;
}

/* Only place p has arguments, and they are want. */
static void assert_args(const struct qemu_config *qc, enum qemu_place p, const char *want)
{
	for (size_t i = 0; i < _QEMU_PLACE_MAX; i++) {
		_cleanup_free_ char *got = args_at(qc, (enum qemu_place)i);

		ck_assert_str_eq(got, i == p ? want : "");
	}
}

/* n disks as prepare() records them, the first on a chain of `first`
 * files (qcow2 on qcow2 ... on raw), the others raw files alone. */
static json_object *disk_arg(size_t n, size_t first)
{
	json_object *a = json_object_new_array();

	for (size_t i = 0; i < n; i++) {
		json_object *d = json_object_new_object(), *ls = json_object_new_array();
		size_t m = i == 0 ? first : 1;
		char p[64];

		snprintf(p, sizeof(p), "/images/d%zu.img", i);
		json_object_object_add(d, "path", json_object_new_string(p));
		json_object_object_add(d, "format",
				       json_object_new_string(m > 1 ? "qcow2" : "raw"));
		for (size_t j = 0; j < m; j++) {
			json_object *l = json_object_new_object();

			snprintf(p, sizeof(p), "/images/d%zu-%zu.img", i, j);
			json_object_object_add(l, "path", json_object_new_string(p));
			json_object_object_add(l, "format",
					       json_object_new_string(j + 1 < m ? "qcow2" : "raw"));
			json_object_object_add(l, "dev", json_object_new_int64(2049));
			json_object_object_add(l, "ino", json_object_new_int64((int64_t)(100 + j)));
			json_object_array_add(ls, l);
		}
		json_object_object_add(d, "layers", ls);
		json_object_array_add(a, d);
	}
	return a;
}

START_TEST(the_table_holds_ram_console_tap_and_disk_in_that_order)
{
	const struct device_type *t;
	size_t n = 0;

	ck_assert_str_eq(device_type_nth(0)->id, "ram0");
	ck_assert_str_eq(device_type_nth(1)->id, "console");
	ck_assert_str_eq(device_type_nth(2)->id, "net0");
	ck_assert_str_eq(device_type_nth(3)->id, "disk");
	for (; (t = device_type_nth(n)); n++) {
		ck_assert_ptr_eq(device_type_find(t->id), t);
		ck_assert(device_id_reserved(t->id));
		ck_assert_ptr_nonnull(t->open);
		ck_assert_ptr_nonnull(t->qemu_args);
		ck_assert_ptr_nonnull(t->what);
		ck_assert(memstore_name_is_valid(t->id));
		for (size_t k = 0; k < n; k++) {
			ck_assert_str_ne(device_type_nth(k)->id, t->id);
			ck_assert(!t->param || !device_type_nth(k)->param ||
				  !streq(device_type_nth(k)->param, t->param));
		}
	}
	ck_assert_uint_eq(n, device_types_count());
	ck_assert_uint_le(n, DEVICE_TYPES_MAX);
	ck_assert_ptr_null(device_type_find("disk9"));
	ck_assert(!device_id_reserved("mine"));
	/* A disk's fds: disk<N>, and disk<N>.<M> for a file of its chain. */
	ck_assert_ptr_eq(device_type_of_fd("disk9"), &device_disk);
	ck_assert_ptr_eq(device_type_of_fd("disk0.1"), &device_disk);
	ck_assert_ptr_eq(device_type_of_fd("net0"), &device_tap);
	ck_assert_ptr_null(device_type_of_fd("disk"));
	ck_assert_ptr_null(device_type_of_fd("disk0."));
	ck_assert_ptr_null(device_type_of_fd("disk0.x"));
	ck_assert_ptr_null(device_type_of_fd("net01"));
	ck_assert(device_id_reserved("disk3.2"));
	ck_assert(!device_id_reserved("diskette"));
	ck_assert_str_eq(device_type_nth(index_of("net0"))->param, "tap");
	ck_assert_ptr_null(device_type_nth(index_of("ram0"))->param);
	ck_assert_ptr_null(device_type_nth(index_of("console"))->param);
}
END_TEST

START_TEST(ram_is_the_machines_memory_backend_at_its_fd)
{
	struct qemu_config qc = machine();

	ck_assert_int_eq(device_ram.qemu_args(NULL, (int[]){ 3 }, 1, &qc), 0);
	assert_args(&qc, QEMU_PLACE_MEMORY,
		    "-object\nmemory-backend-file,id=ram0,size=256M,mem-path=/proc/self/fd/3,"
		    "share=on\n");
	ck_assert_str_eq(qc.memory_backend, "ram0");
	qemu_config_done(&qc);
}
END_TEST

START_TEST(console_is_a_serial_port_appending_to_its_fd)
{
	struct qemu_config qc = machine();

	ck_assert_int_eq(device_console.qemu_args(NULL, (int[]){ 4 }, 1, &qc), 0);
	assert_args(
	    &qc, QEMU_PLACE_SERIAL,
	    "-chardev\nfile,id=con0,path=/proc/self/fd/4,append=on\n-serial\nchardev:con0\n");
	ck_assert_ptr_null(qc.memory_backend);
	qemu_config_done(&qc);
}
END_TEST

START_TEST(tap_is_a_virtio_nic_on_its_fd)
{
	struct qemu_config qc = machine();
	json_object *tap = json_object_new_string("tap0");

	ck_assert_int_eq(device_tap.qemu_args(tap, (int[]){ 6 }, 1, &qc), 0);
	assert_args(&qc, QEMU_PLACE_DEVICE,
		    "-netdev\ntap,id=net0,fd=6\n-device\nvirtio-net-pci,netdev=net0,romfile=\n");
	qemu_config_done(&qc);
	json_object_put(tap);
}
END_TEST

/* An fd number the VMM cannot have been given (0-2 are its stdio). */
START_TEST(no_type_takes_an_fd_below_the_base)
{
	struct device_args args = {};
	struct device_layout l;

	args.arg[index_of("net0")] = json_object_new_string("tap0");
	args.arg[index_of("disk")] = disk_arg(1, 1);
	/* Each device in turn put at the VMM's stderr (2): refused. */
	for (size_t i = 0; i < device_types_count(); i++) {
		struct qemu_config qc = machine();

		devices_layout(&args, &l);
		l.first[i] = QEMU_CHILD_FD_BASE - 1;
		ck_assert_int_eq(devices_qemu_args(&args, &l, &qc), -EINVAL);
		qemu_config_done(&qc);
	}
	device_args_done(&args);
}
END_TEST

/* ram0 at 3, console at 4, the monitor at 5 whatever else the VM has; a
 * tap after them; the boot images from next on. */
START_TEST(layout_puts_every_vms_devices_first)
{
	struct device_args args = {};
	struct device_layout l;
	struct device_fd f[DEVICE_FDS_MAX];

	devices_layout(&args, &l);
	ck_assert_int_eq(l.first[index_of("ram0")], 3);
	ck_assert_int_eq(l.first[index_of("console")], 4);
	ck_assert_int_eq(l.qmp, 5);
	ck_assert_int_eq(l.first[index_of("net0")], -1);
	ck_assert_int_eq(l.first[index_of("disk")], -1);
	ck_assert_int_eq(l.next, 6);

	args.arg[index_of("net0")] = json_object_new_string("tap0");
	devices_layout(&args, &l);
	ck_assert_int_eq(l.first[index_of("ram0")], 3);
	ck_assert_int_eq(l.first[index_of("console")], 4);
	ck_assert_int_eq(l.qmp, 5);
	ck_assert_int_eq(l.first[index_of("net0")], 6);
	ck_assert_int_eq(l.next, 7);

	/* Two disks, the first on a chain of two files: after the tap, in
	 * the disks' order and each chain's own, top first. */
	args.arg[index_of("disk")] = disk_arg(2, 2);
	devices_layout(&args, &l);
	ck_assert_int_eq(l.first[index_of("net0")], 6);
	ck_assert_int_eq(l.first[index_of("disk")], 7);
	ck_assert_uint_eq(l.count[index_of("disk")], 3);
	ck_assert_int_eq(l.next, 10);
	ck_assert_uint_eq(devices_fds(&args, f), 6);
	ck_assert_str_eq(f[3].id, "disk0");
	ck_assert_str_eq(f[4].id, "disk0.1");
	ck_assert_str_eq(f[5].id, "disk1");
	ck_assert_int_eq(device_fd_child(&l, &f[0]), 3);
	ck_assert_int_eq(device_fd_child(&l, &f[2]), 6);
	ck_assert_int_eq(device_fd_child(&l, &f[4]), 8);
	ck_assert_int_eq(device_fd_child(&l, &f[5]), 9);
	for (size_t i = device_types_count(); i < DEVICE_TYPES_MAX; i++)
		ck_assert_int_eq(l.first[i], -1);
	device_args_done(&args);
}
END_TEST

/* The whole command line's device part, as vmm.c builds it. */
START_TEST(qemu_args_walk_the_vms_devices)
{
	struct device_args args = {};
	struct device_layout l;
	struct qemu_config qc = machine();

	args.arg[index_of("net0")] = json_object_new_string("tap0");
	devices_layout(&args, &l);
	ck_assert_int_eq(devices_qemu_args(&args, &l, &qc), 0);
	ck_assert_str_eq(qc.memory_backend, "ram0");
	ck_assert_uint_eq(qc.devices[QEMU_PLACE_MEMORY].n, 2);
	ck_assert_uint_eq(qc.devices[QEMU_PLACE_SERIAL].n, 4);
	ck_assert_str_eq(qc.devices[QEMU_PLACE_DEVICE].v[1], "tap,id=net0,fd=6");
	qemu_config_done(&qc);
	device_args_done(&args);
	ck_assert_ptr_null(args.arg[index_of("net0")]);
}
END_TEST

static char *record_text(const struct device_args *args, bool nulls)
{
	json_object *o = json_object_new_object();
	char *s;

	devices_to_json(args, nulls, o);
	s = strdup(json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN));
	json_object_put(o);
	return s;
}

/* The keys are today's: "tap" (registry, checkpoint meta, vm.status). */
START_TEST(a_record_round_trips)
{
	struct device_args args = {}, back = {};
	const char *param = NULL;
	_cleanup_free_ char *with = NULL, *without = NULL, *status = NULL, *again = NULL;
	json_object *o;

	without = record_text(&args, false);
	ck_assert_str_eq(without, "{}");
	status = record_text(&args, true);
	ck_assert_str_eq(status, "{\"tap\":null,\"disks\":null}");

	args.arg[index_of("net0")] = json_object_new_string("tap0");
	with = record_text(&args, false);
	ck_assert_str_eq(with, "{\"tap\":\"tap0\"}");
	o = json_tokener_parse(with);
	ck_assert_int_eq(devices_from_json(o, &back, &param), 0);
	json_object_put(o);
	ck_assert_str_eq(json_object_get_string(back.arg[index_of("net0")]), "tap0");
	again = record_text(&back, false);
	ck_assert_str_eq(again, with);
	device_args_done(&args);
	device_args_done(&back);
}
END_TEST

/* A record of the previous release (2371a41): the tap among the VM's other
 * keys; a value of another type reads as no tap. */
START_TEST(an_older_record_reads_back)
{
	static const char rec[] =
	    "{ \"name\": \"web1\", \"vmm\": \"/usr/bin/qemu-system-x86_64\", \"kernel\": "
	    "\"/boot/vmlinuz\", \"append\": \"console=ttyS0\", \"tap\": \"cprd-tap1\", "
	    "\"machine\": \"pc-q35-10.0\", \"memory_bytes\": 268435456, \"vcpus\": 1, "
	    "\"vmm_fds\": { \"ram0\": 3, \"console\": 4, \"net0\": 6 } }";
	json_object *o = json_tokener_parse(rec);
	struct device_args args = {};
	const char *param = NULL;

	ck_assert_ptr_nonnull(o);
	ck_assert_int_eq(devices_from_json(o, &args, &param), 0);
	ck_assert_str_eq(json_object_get_string(args.arg[index_of("net0")]), "cprd-tap1");
	for (size_t i = 0; i < device_types_count(); i++)
		ck_assert(device_present(&args, i) == (i != index_of("disk")));
	device_args_done(&args);
	json_object_put(o);

	/* Null is not given (vm.status writes it); anything else but a
	 * string is a damaged record, refused rather than read as no tap. */
	o = json_tokener_parse("{\"tap\": null}");
	ck_assert_int_eq(devices_from_json(o, &args, &param), 0);
	ck_assert(!device_present(&args, index_of("net0")));
	ck_assert(device_present(&args, index_of("ram0")));
	json_object_put(o);
	o = json_tokener_parse("{\"tap\": 7}");
	ck_assert_int_eq(devices_from_json(o, &args, &param), -EINVAL);
	ck_assert_str_eq(param, "tap");
	ck_assert_ptr_null(args.arg[index_of("net0")]);
	json_object_put(o);
}
END_TEST

START_TEST(tap_checks_its_interface_name)
{
	char why[256];
	json_object *good = json_object_new_string("tap0"), *pct = json_object_new_string("tap%d"),
		    *slash = json_object_new_string("a/b");

	ck_assert_int_eq(device_tap.check(good, why, sizeof(why)), 0);
	ck_assert_int_eq(device_tap.check(pct, why, sizeof(why)), -EINVAL);
	ck_assert_msg(strstr(why, "tap interface name 'tap%d'") == why, "%s", why);
	ck_assert_int_eq(device_tap.check(slash, why, sizeof(why)), -EINVAL);
	json_object_put(good);
	json_object_put(pct);
	json_object_put(slash);
}
END_TEST

START_TEST(carried_by_every_way_but_disks_by_cpr_exec)
{
	struct device_args args = {};
	char why[128];

	args.arg[index_of("net0")] = json_object_new_string("tap0");
	args.arg[index_of("disk")] = disk_arg(1, 2);
	ck_assert(devices_carried(&args, DEVICE_BY_HANDOVER, why, sizeof(why)));
	ck_assert(devices_carried(&args, DEVICE_BY_CPR_TRANSFER, why, sizeof(why)));
	/* Disks are not carried by cpr-exec (disk.c says why). */
	ck_assert(!devices_carried(&args, DEVICE_BY_CPR_EXEC, why, sizeof(why)));
	ck_assert_str_eq(why, "its disk images cannot be carried that way");
	json_object_put(args.arg[index_of("disk")]);
	args.arg[index_of("disk")] = NULL;
	ck_assert(devices_carried(&args, DEVICE_BY_CPR_EXEC, why, sizeof(why)));
	ck_assert(devices_carried(&args, DEVICE_BY_CHECKPOINT, why, sizeof(why)));
	/* A way nobody declared carries nothing. */
	ck_assert(!devices_carried(&args, 0, why, sizeof(why)));
	ck_assert_str_eq(why, "its memory cannot be carried that way");
	device_args_done(&args);
}
END_TEST

/* RAM: a sealed memfd of the VM's size. */
START_TEST(ram_opens_a_sealed_memfd)
{
	struct vm vm = { .cfg.memory_bytes = 16ULL << 20, .dir_fd = -EBADF };
	struct stat st;
	int fd = -EBADF;

	ck_assert_int_eq(device_ram.open(&vm, NULL, &fd, 1), 0);
	ck_assert_int_ge(fd, 0);
	ck_assert(fcntl(fd, F_GETFD) & FD_CLOEXEC);
	ck_assert_int_eq(fstat(fd, &st), 0);
	ck_assert_int_eq(st.st_size, 16 << 20);
	ck_assert(fcntl(fd, F_GET_SEALS) & F_SEAL_GROW);
	ck_assert_ptr_null(device_ram.reopen);
	close(fd);
}
END_TEST

/* The console log: a new VM's starts empty, a reopened one goes on. */
START_TEST(console_truncates_when_new_and_appends_when_reopened)
{
	char dir[] = "/tmp/cprd-test-devices-XXXXXX";
	struct vm vm = { .dir_fd = -EBADF };
	int fd = -EBADF;
	struct stat st;

	ck_assert_ptr_nonnull(mkdtemp(dir));
	vm.dir_fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	ck_assert_int_ge(vm.dir_fd, 0);

	ck_assert_int_eq(device_console.open(&vm, NULL, &fd, 1), 0);
	ck_assert(fcntl(fd, F_GETFL) & O_APPEND);
	ck_assert(fcntl(fd, F_GETFD) & FD_CLOEXEC);
	ck_assert_int_eq(write(fd, "boot\n", 5), 5);
	close(fd);
	ck_assert_int_eq(device_console.reopen(&vm, NULL, &fd, 1), 0);
	ck_assert_int_eq(write(fd, "more\n", 5), 5);
	ck_assert_int_eq(fstat(fd, &st), 0);
	ck_assert_int_eq(st.st_size, 10);
	close(fd);
	ck_assert_int_eq(device_console.open(&vm, NULL, &fd, 1), 0);
	ck_assert_int_eq(fstat(fd, &st), 0);
	ck_assert_int_eq(st.st_size, 0);
	close(fd);

	ck_assert_int_eq(unlinkat(vm.dir_fd, VM_CONSOLE_LOG, 0), 0);
	close(vm.dir_fd);
	ck_assert_int_eq(rmdir(dir), 0);
}
END_TEST

/* ---- disks ---- */

static json_object *parse(const char *text)
{
	json_object *o = json_tokener_parse(text);

	ck_assert_msg(o, "bad JSON in the test: %s", text);
	return o;
}

/* Refused with a reason that starts with want. */
static void assert_disks_refused(const char *text, const char *want)
{
	json_object *a = parse(text);
	char why[256] = "";

	ck_assert_int_eq(device_disk.check(a, why, sizeof(why)), -EINVAL);
	ck_assert_msg(strstr(why, want), "'%s' refused for '%s', not '%s'", text, why, want);
	json_object_put(a);
}

START_TEST(disk_checks_each_disk)
{
	json_object *a = parse("[{\"path\": \"/i/a.img\"}, {\"path\": \"/i/b.qcow2\", \"format\": "
			       "\"qcow2\", \"readonly\": true, \"cache\": \"none\", \"serial\": "
			       "\"web-1_data.2\"}]");
	char why[256];

	ck_assert_int_eq(device_disk.check(a, why, sizeof(why)), 0);
	json_object_put(a);
	assert_disks_refused("[]", "a VM has 1-4 disks, not 0");
	assert_disks_refused("[{\"path\": \"/a\"}, {\"path\": \"/a\"}, {\"path\": \"/a\"}, "
			     "{\"path\": \"/a\"}, {\"path\": \"/a\"}]",
			     "not 5");
	assert_disks_refused("[7]", "disk 0 is not an object");
	assert_disks_refused("[{\"path\": \"a.img\"}]", "'path' must be an absolute path");
	assert_disks_refused("[{}]", "'path' must be an absolute path");
	assert_disks_refused("[{\"path\": \"/a\", \"format\": \"vmdk\"}]", "'format' must be");
	assert_disks_refused("[{\"path\": \"/a\", \"readonly\": \"yes\"}]", "'readonly' must be");
	assert_disks_refused("[{\"path\": \"/a\", \"cache\": \"unsafe\"}]", "'cache' must be");
	assert_disks_refused("[{\"path\": \"/a\", \"serial\": \"has space\"}]", "'serial' must");
	assert_disks_refused("[{\"path\": \"/a\", \"serial\": \"123456789012345678901\"}]",
			     "'serial' must");
	assert_disks_refused("[{\"path\": \"/a\", \"bus\": \"scsi\"}]", "unknown key 'bus'");
	assert_disks_refused("[{\"path\": \"/a\", \"layers\": {}}]", "'layers' is not a list");
	assert_disks_refused("[{\"path\": \"/a\", \"layers\": [{\"path\": \"/a\"}]}]",
			     "file 0 of its chain is not a valid record");
}
END_TEST

/* A qcow2 header of version 3 naming backing (NULL: none), its format in
 * an extension (NULL: left out), and an external data file if asked. */
static void write_qcow2(const char *path, const char *backing, const char *fmt, bool data_file)
{
	uint8_t h[4096] = {};
	size_t off = 104;
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	uint32_t u32;
	uint64_t u64;

	ck_assert_int_ge(fd, 0);
	u32 = htobe32(0x514649fb), memcpy(h, &u32, 4);
	u32 = htobe32(3), memcpy(h + 4, &u32, 4);
	u32 = htobe32(104), memcpy(h + 100, &u32, 4);
	if (data_file)
		u64 = htobe64(1ull << 2), memcpy(h + 72, &u64, 8);
	if (fmt) {
		u32 = htobe32(0xe2792aca), memcpy(h + off, &u32, 4);
		u32 = htobe32((uint32_t)strlen(fmt)), memcpy(h + off + 4, &u32, 4);
		memcpy(h + off + 8, fmt, strlen(fmt));
		off += 8 + ((strlen(fmt) + 7) & ~(size_t)7);
	}
	if (backing) {
		u64 = htobe64(1024), memcpy(h + 8, &u64, 8);
		u32 = htobe32((uint32_t)strlen(backing)), memcpy(h + 16, &u32, 4);
		memcpy(h + 1024, backing, strlen(backing));
	}
	ck_assert_int_eq(write(fd, h, sizeof(h)), (ssize_t)sizeof(h));
	close(fd);
}

static char disk_dir[] = "/tmp/cprd-test-disks-XXXXXX";

static char *in_dir(const char *name)
{
	char *p;

	ck_assert_int_ge(asprintf(&p, "%s/%s", disk_dir, name), 0);
	return p;
}

static void make_disk_dir(void)
{
	_cleanup_free_ char *base = NULL;
	int fd;

	strcpy(disk_dir, "/tmp/cprd-test-disks-XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(disk_dir));
	ck_assert_int_eq(chmod(disk_dir, 0755), 0);
	base = in_dir("base.raw");
	fd = open(base, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(ftruncate(fd, 1 << 20), 0);
	close(fd);
}

static void remove_disk_dir(void)
{
	_cleanup_free_ char *cmd = NULL;

	ck_assert_int_ge(asprintf(&cmd, "rm -rf '%s'", disk_dir), 0);
	ck_assert_int_eq(system(cmd), 0);
}

/* prepare() on text (one "%s" for the directory), as creds (NULL root). */
static int prepare_text(const char *fmt, const struct creds *c, json_object **ret, char *why,
			size_t size)
{
	_cleanup_free_ char *text = NULL;
	int r;

	ck_assert_int_ge(asprintf(&text, fmt, disk_dir, disk_dir), 0);
	*ret = parse(text);
	ck_assert_int_eq(device_disk.check(*ret, why, size), 0);
	r = device_disk.prepare(*ret, c, why, size);
	if (r == 0)
		ck_assert_int_eq(device_disk.check(*ret, why, size), 0);
	return r;
}

static const char *layer_field(json_object *a, size_t i, size_t j, const char *key)
{
	json_object *d = json_object_array_get_idx(a, i);
	json_object *l = json_object_array_get_idx(json_object_object_get(d, "layers"), j);

	return json_object_get_string(json_object_object_get(l, key));
}

/* A per-VM overlay on a shared base: the chain is followed as each header
 * names it, relative to the file that names it, through a link to its
 * canonical path. */
START_TEST(disk_prepare_follows_a_qcow2_chain_to_its_end)
{
	_cleanup_free_ char *top = NULL, *mid = NULL, *link = NULL, *base = NULL;
	json_object *a;
	char why[256] = "";
	struct stat st;

	make_disk_dir();
	top = in_dir("vm1.qcow2");
	mid = in_dir("mid.qcow2");
	link = in_dir("link.qcow2");
	base = in_dir("base.raw");
	write_qcow2(top, "link.qcow2", "qcow2", false);
	write_qcow2(mid, "base.raw", "raw", false);
	ck_assert_int_eq(symlink("mid.qcow2", link), 0);
	ck_assert_int_eq(prepare_text("[{\"path\": \"%s/vm1.qcow2\", \"format\": \"qcow2\"}]", NULL,
				      &a, why, sizeof(why)),
			 0);
	ck_assert_uint_eq(device_disk.nfds(a), 3);
	ck_assert_str_eq(layer_field(a, 0, 0, "path"), top);
	ck_assert_str_eq(layer_field(a, 0, 0, "format"), "qcow2");
	ck_assert_str_eq(layer_field(a, 0, 1, "path"), mid);
	ck_assert_str_eq(layer_field(a, 0, 1, "format"), "qcow2");
	ck_assert_str_eq(layer_field(a, 0, 2, "path"), base);
	ck_assert_str_eq(layer_field(a, 0, 2, "format"), "raw");
	ck_assert_int_eq(stat(base, &st), 0);
	ck_assert_str_eq(layer_field(a, 0, 2, "ino"), ({
				 static char b[32];
				 snprintf(b, sizeof(b), "%llu", (unsigned long long)st.st_ino);
				 b;
			 }));
	json_object_put(a);
	remove_disk_dir();
}
END_TEST

START_TEST(disk_prepare_refuses_what_it_does_not_follow)
{
	_cleanup_free_ char *p = NULL;
	json_object *a;
	char why[256] = "";

	make_disk_dir();
	p = in_dir("x.qcow2");
	/* A backing file without its format: never guessed. */
	write_qcow2(p, "base.raw", NULL, false);
	ck_assert_int_eq(prepare_text("[{\"path\": \"%s/x.qcow2\", \"format\": \"qcow2\"}]", NULL,
				      &a, why, sizeof(why)),
			 -EINVAL);
	ck_assert_msg(strstr(why, "without its format"), "%s", why);
	json_object_put(a);
	write_qcow2(p, "json:{\"driver\":\"file\"}", "raw", false);
	ck_assert_int_eq(prepare_text("[{\"path\": \"%s/x.qcow2\", \"format\": \"qcow2\"}]", NULL,
				      &a, why, sizeof(why)),
			 -EINVAL);
	ck_assert_msg(strstr(why, "not a plain path"), "%s", why);
	json_object_put(a);
	write_qcow2(p, NULL, NULL, true);
	ck_assert_int_eq(prepare_text("[{\"path\": \"%s/x.qcow2\", \"format\": \"qcow2\"}]", NULL,
				      &a, why, sizeof(why)),
			 -EINVAL);
	ck_assert_msg(strstr(why, "external file"), "%s", why);
	json_object_put(a);
	/* A name longer than what the file holds: never read past it. */
	char long_name[2001];
	memset(long_name, 'a', sizeof(long_name) - 1);
	long_name[sizeof(long_name) - 1] = '\0';
	write_qcow2(p, long_name, "raw", false);
	ck_assert_int_eq(truncate(p, 1030), 0);
	ck_assert_int_eq(prepare_text("[{\"path\": \"%s/x.qcow2\", \"format\": \"qcow2\"}]", NULL,
				      &a, why, sizeof(why)),
			 -EINVAL);
	ck_assert_msg(strstr(why, "cannot read from its header"), "%s", why);
	json_object_put(a);
	/* Said to be qcow2, but raw. */
	ck_assert_int_eq(prepare_text("[{\"path\": \"%s/base.raw\", \"format\": \"qcow2\"}]", NULL,
				      &a, why, sizeof(why)),
			 -EINVAL);
	ck_assert_msg(strstr(why, "is not a qcow2 image"), "%s", why);
	json_object_put(a);
	/* A raw image is never looked into: a qcow2 header in it is data. */
	write_qcow2(p, "/etc/shadow", "raw", false);
	ck_assert_int_eq(prepare_text("[{\"path\": \"%s/x.qcow2\"}]", NULL, &a, why, sizeof(why)),
			 0);
	ck_assert_uint_eq(device_disk.nfds(a), 1);
	json_object_put(a);
	/* Not a regular file. */
	ck_assert_int_eq(prepare_text("[{\"path\": \"%s\"}]", NULL, &a, why, sizeof(why)), -EBADFD);
	ck_assert_msg(strstr(why, "is not a regular file"), "%s", why);
	json_object_put(a);
	remove_disk_dir();
}
END_TEST

/* As a peer that is not root: its own image read-write, a base it may
 * only read as a backing file; nothing it may not open so. */
START_TEST(disk_prepare_judges_as_the_peer)
{
	_cleanup_free_ char *top = NULL, *base = NULL, *secret = NULL;
	struct creds nobody = { .uid = 65534, .gid = 65534 };
	json_object *a;
	char why[256] = "";
	int fd;

	make_disk_dir();
	top = in_dir("mine.qcow2");
	base = in_dir("base.raw");
	secret = in_dir("secret.raw");
	write_qcow2(top, "base.raw", "raw", false);
	ck_assert_int_eq(chown(top, 65534, 65534), 0);
	fd = open(secret, O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
	ck_assert_int_ge(fd, 0);
	close(fd);
	ck_assert_int_eq(prepare_text("[{\"path\": \"%s/mine.qcow2\", \"format\": \"qcow2\"}]",
				      &nobody, &a, why, sizeof(why)),
			 0);
	ck_assert_uint_eq(device_disk.nfds(a), 2);
	json_object_put(a);
	/* The base is root's and 0644: readable, not writable. */
	ck_assert_int_eq(
	    prepare_text("[{\"path\": \"%s/base.raw\"}]", &nobody, &a, why, sizeof(why)), -EACCES);
	ck_assert_msg(strstr(why, "(read-write): the caller may not open it so"), "%s", why);
	json_object_put(a);
	ck_assert_int_eq(prepare_text("[{\"path\": \"%s/base.raw\", \"readonly\": true}]", &nobody,
				      &a, why, sizeof(why)),
			 0);
	json_object_put(a);
	ck_assert_int_eq(prepare_text("[{\"path\": \"%s/secret.raw\", \"readonly\": true}]",
				      &nobody, &a, why, sizeof(why)),
			 -EACCES);
	json_object_put(a);
	/* A backing file it may not read. */
	write_qcow2(top, "secret.raw", "raw", false);
	ck_assert_int_eq(prepare_text("[{\"path\": \"%s/mine.qcow2\", \"format\": \"qcow2\"}]",
				      &nobody, &a, why, sizeof(why)),
			 -EACCES);
	ck_assert_msg(strstr(why, "backing file"), "%s", why);
	json_object_put(a);
	remove_disk_dir();
}
END_TEST

/* open() finds the very files prepare() judged, or refuses. */
START_TEST(disk_open_finds_the_files_judged)
{
	_cleanup_free_ char *top = NULL, *other = NULL;
	struct vm vm = { .dir_fd = -EBADF };
	json_object *a;
	char why[256] = "";
	int fds[2] = { -EBADF, -EBADF };

	make_disk_dir();
	top = in_dir("vm1.qcow2");
	other = in_dir("other.qcow2");
	write_qcow2(top, "base.raw", "raw", false);
	ck_assert_int_eq(prepare_text("[{\"path\": \"%s/vm1.qcow2\", \"format\": \"qcow2\"}]", NULL,
				      &a, why, sizeof(why)),
			 0);
	ck_assert_int_eq(device_disk.open(&vm, a, fds, 2), 0);
	ck_assert_int_eq(fcntl(fds[0], F_GETFL) & O_ACCMODE, O_RDWR);
	ck_assert_int_eq(fcntl(fds[1], F_GETFL) & O_ACCMODE, O_RDONLY);
	ck_assert(fcntl(fds[0], F_GETFD) & FD_CLOEXEC);
	close_many(fds, 2);
	/* Another file renamed over the image: refused, nothing left open. */
	write_qcow2(other, "base.raw", "raw", false);
	ck_assert_int_eq(rename(other, top), 0);
	fds[0] = fds[1] = -EBADF;
	ck_assert_int_eq(device_disk.open(&vm, a, fds, 2), -ESTALE);
	ck_assert_int_eq(fds[0], -EBADF);
	ck_assert_int_eq(fds[1], -EBADF);
	json_object_put(a);
	remove_disk_dir();
}
END_TEST

/* Each file on an fd set of its own, the chain bottom up, the guest's
 * device on its top. */
START_TEST(disk_is_a_virtio_blk_on_fd_sets)
{
	struct qemu_config qc = machine();
	json_object *a = disk_arg(2, 2);

	json_object_object_add(json_object_array_get_idx(a, 0), "cache",
			       json_object_new_string("none"));
	json_object_object_add(json_object_array_get_idx(a, 1), "readonly",
			       json_object_new_boolean(true));
	json_object_object_add(json_object_array_get_idx(a, 1), "serial",
			       json_object_new_string("data-1"));
	ck_assert_int_eq(device_disk.qemu_args(a, (int[]){ 7, 8, 9 }, 3, &qc), 0);
	assert_args(&qc, QEMU_PLACE_DEVICE,
		    "-add-fd\nfd=8,set=108,opaque=disk0.1\n"
		    "-blockdev\ndriver=file,node-name=disk0-f1,filename=/dev/fdset/108,"
		    "read-only=on,cache.direct=on\n"
		    "-blockdev\ndriver=raw,node-name=disk0-1,file=disk0-f1,read-only=on\n"
		    "-add-fd\nfd=7,set=107,opaque=disk0.0\n"
		    "-blockdev\ndriver=file,node-name=disk0-f0,filename=/dev/fdset/107,"
		    "read-only=off,cache.direct=on\n"
		    "-blockdev\ndriver=qcow2,node-name=disk0-0,file=disk0-f0,read-only=off,"
		    "backing=disk0-1\n"
		    "-device\nvirtio-blk-pci,drive=disk0-0,id=disk0\n"
		    "-add-fd\nfd=9,set=109,opaque=disk1.0\n"
		    "-blockdev\ndriver=file,node-name=disk1-f0,filename=/dev/fdset/109,"
		    "read-only=on,cache.direct=off\n"
		    "-blockdev\ndriver=raw,node-name=disk1-0,file=disk1-f0,read-only=on\n"
		    "-device\nvirtio-blk-pci,drive=disk1-0,id=disk1,serial=data-1\n");
	qemu_config_done(&qc);
	json_object_put(a);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("devices");
	TCase *t = tcase_create("types");
	SRunner *sr;
	int failed;

	tcase_add_test(t, the_table_holds_ram_console_tap_and_disk_in_that_order);
	tcase_add_test(t, ram_is_the_machines_memory_backend_at_its_fd);
	tcase_add_test(t, console_is_a_serial_port_appending_to_its_fd);
	tcase_add_test(t, tap_is_a_virtio_nic_on_its_fd);
	tcase_add_test(t, no_type_takes_an_fd_below_the_base);
	tcase_add_test(t, layout_puts_every_vms_devices_first);
	tcase_add_test(t, qemu_args_walk_the_vms_devices);
	tcase_add_test(t, a_record_round_trips);
	tcase_add_test(t, an_older_record_reads_back);
	tcase_add_test(t, tap_checks_its_interface_name);
	tcase_add_test(t, carried_by_every_way_but_disks_by_cpr_exec);
	tcase_add_test(t, ram_opens_a_sealed_memfd);
	tcase_add_test(t, console_truncates_when_new_and_appends_when_reopened);
	tcase_add_test(t, disk_checks_each_disk);
	tcase_add_test(t, disk_prepare_follows_a_qcow2_chain_to_its_end);
	tcase_add_test(t, disk_prepare_refuses_what_it_does_not_follow);
	tcase_add_test(t, disk_prepare_judges_as_the_peer);
	tcase_add_test(t, disk_open_finds_the_files_judged);
	tcase_add_test(t, disk_is_a_virtio_blk_on_fd_sets);
	suite_add_tcase(s, t);
	sr = srunner_create(s);
	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? 1 : 0;
}
