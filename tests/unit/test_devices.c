/* SPDX-License-Identifier: MIT */
/* The device types (daemon/devices/): each one's QEMU arguments for a given
 * fd number, where a VMM finds their fds, how they record themselves and
 * read an older record back, and how they open what they hold, on real
 * kernel objects but without a process. */
#include <check.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/macro.h"
#include "daemon/devices/devices.h"
#include "daemon/core/vm.h"
#include "kvm/qemu.h"

#define device_ram (*device_type_find("ram0"))
#define device_console (*device_type_find("console"))
#define device_tap (*device_type_find("net0"))

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

START_TEST(the_table_holds_ram_console_and_tap_in_that_order)
{
	const struct device_type *t;
	size_t n = 0;

	ck_assert_str_eq(device_type_nth(0)->id, "ram0");
	ck_assert_str_eq(device_type_nth(1)->id, "console");
	ck_assert_str_eq(device_type_nth(2)->id, "net0");
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
	ck_assert_str_eq(device_type_nth(index_of("net0"))->param, "tap");
	ck_assert_ptr_null(device_type_nth(index_of("ram0"))->param);
	ck_assert_ptr_null(device_type_nth(index_of("console"))->param);
}
END_TEST

START_TEST(ram_is_the_machines_memory_backend_at_its_fd)
{
	struct qemu_config qc = machine();

	ck_assert_int_eq(device_ram.qemu_args(NULL, 3, &qc), 0);
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

	ck_assert_int_eq(device_console.qemu_args(NULL, 4, &qc), 0);
	assert_args(&qc, QEMU_PLACE_SERIAL,
		    "-chardev\nfile,id=con0,path=/proc/self/fd/4,append=on\n-serial\nchardev:con0\n");
	ck_assert_ptr_null(qc.memory_backend);
	qemu_config_done(&qc);
}
END_TEST

START_TEST(tap_is_a_virtio_nic_on_its_fd)
{
	struct qemu_config qc = machine();

	ck_assert_int_eq(device_tap.qemu_args("tap0", 6, &qc), 0);
	assert_args(&qc, QEMU_PLACE_DEVICE,
		    "-netdev\ntap,id=net0,fd=6\n-device\nvirtio-net-pci,netdev=net0,romfile=\n");
	qemu_config_done(&qc);
}
END_TEST

/* An fd number the VMM cannot have been given (0-2 are its stdio). */
START_TEST(no_type_takes_an_fd_below_the_base)
{
	struct device_args args = {};
	bool present[DEVICE_TYPES_MAX] = {};
	struct device_layout l;

	args.arg[index_of("net0")] = strdup("tap0");
	for (size_t i = 0; i < device_types_count(); i++)
		present[i] = device_present(&args, i);
	/* Each device in turn put at the VMM's stderr (2): refused. */
	for (size_t i = 0; i < device_types_count(); i++) {
		struct qemu_config qc = machine();

		devices_layout(present, &l);
		l.child[i] = QEMU_CHILD_FD_BASE - 1;
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
	bool present[DEVICE_TYPES_MAX] = {};
	struct device_layout l;

	devices_layout(present, &l);
	ck_assert_int_eq(l.child[index_of("ram0")], 3);
	ck_assert_int_eq(l.child[index_of("console")], 4);
	ck_assert_int_eq(l.qmp, 5);
	ck_assert_int_eq(l.child[index_of("net0")], -1);
	ck_assert_int_eq(l.next, 6);

	present[index_of("net0")] = true;
	devices_layout(present, &l);
	ck_assert_int_eq(l.child[index_of("ram0")], 3);
	ck_assert_int_eq(l.child[index_of("console")], 4);
	ck_assert_int_eq(l.qmp, 5);
	ck_assert_int_eq(l.child[index_of("net0")], 6);
	ck_assert_int_eq(l.next, 7);
	for (size_t i = device_types_count(); i < DEVICE_TYPES_MAX; i++)
		ck_assert_int_eq(l.child[i], -1);
}
END_TEST

/* The whole command line's device part, as vmm.c builds it. */
START_TEST(qemu_args_walk_the_vms_devices)
{
	struct device_args args = {};
	bool present[DEVICE_TYPES_MAX] = {};
	struct device_layout l;
	struct qemu_config qc = machine();

	args.arg[index_of("net0")] = strdup("tap0");
	for (size_t i = 0; i < device_types_count(); i++)
		present[i] = device_present(&args, i);
	devices_layout(present, &l);
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
	ck_assert_str_eq(status, "{\"tap\":null}");

	args.arg[index_of("net0")] = strdup("tap0");
	with = record_text(&args, false);
	ck_assert_str_eq(with, "{\"tap\":\"tap0\"}");
	o = json_tokener_parse(with);
	ck_assert_int_eq(devices_from_json(o, &back, &param), 0);
	json_object_put(o);
	ck_assert_str_eq(back.arg[index_of("net0")], "tap0");
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
	ck_assert_str_eq(args.arg[index_of("net0")], "cprd-tap1");
	for (size_t i = 0; i < device_types_count(); i++)
		ck_assert(device_present(&args, i));
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

	ck_assert_int_eq(device_tap.check("tap0", why, sizeof(why)), 0);
	ck_assert_int_eq(device_tap.check("tap%d", why, sizeof(why)), -EINVAL);
	ck_assert_msg(strstr(why, "tap interface name 'tap%d'") == why, "%s", why);
	ck_assert_int_eq(device_tap.check("a/b", why, sizeof(why)), -EINVAL);
}
END_TEST

START_TEST(carried_by_every_way_today)
{
	struct device_args args = {};
	char why[128];

	args.arg[index_of("net0")] = strdup("tap0");
	ck_assert(devices_carried(&args, DEVICE_BY_HANDOVER, why, sizeof(why)));
	ck_assert(devices_carried(&args, DEVICE_BY_CPR_TRANSFER, why, sizeof(why)));
	ck_assert(devices_carried(&args, DEVICE_BY_CPR_EXEC, why, sizeof(why)));
	ck_assert(devices_carried(&args, DEVICE_BY_CHECKPOINT, why, sizeof(why)));
	/* A way nobody declared carries nothing. */
	ck_assert(!devices_carried(&args, 0, why, sizeof(why)));
	ck_assert_str_eq(why, "its memory device ram0 cannot be carried that way");
	device_args_done(&args);
}
END_TEST

/* RAM: a sealed memfd of the VM's size. */
START_TEST(ram_opens_a_sealed_memfd)
{
	struct vm vm = { .cfg.memory_bytes = 16ULL << 20, .dir_fd = -EBADF };
	struct stat st;
	int fd = -EBADF;

	ck_assert_int_eq(device_ram.open(&vm, NULL, &fd), 0);
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

	ck_assert_int_eq(device_console.open(&vm, NULL, &fd), 0);
	ck_assert(fcntl(fd, F_GETFL) & O_APPEND);
	ck_assert(fcntl(fd, F_GETFD) & FD_CLOEXEC);
	ck_assert_int_eq(write(fd, "boot\n", 5), 5);
	close(fd);
	ck_assert_int_eq(device_console.reopen(&vm, NULL, &fd), 0);
	ck_assert_int_eq(write(fd, "more\n", 5), 5);
	ck_assert_int_eq(fstat(fd, &st), 0);
	ck_assert_int_eq(st.st_size, 10);
	close(fd);
	ck_assert_int_eq(device_console.open(&vm, NULL, &fd), 0);
	ck_assert_int_eq(fstat(fd, &st), 0);
	ck_assert_int_eq(st.st_size, 0);
	close(fd);

	ck_assert_int_eq(unlinkat(vm.dir_fd, VM_CONSOLE_LOG, 0), 0);
	close(vm.dir_fd);
	ck_assert_int_eq(rmdir(dir), 0);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("devices");
	TCase *t = tcase_create("types");
	SRunner *sr;
	int failed;

	tcase_add_test(t, the_table_holds_ram_console_and_tap_in_that_order);
	tcase_add_test(t, ram_is_the_machines_memory_backend_at_its_fd);
	tcase_add_test(t, console_is_a_serial_port_appending_to_its_fd);
	tcase_add_test(t, tap_is_a_virtio_nic_on_its_fd);
	tcase_add_test(t, no_type_takes_an_fd_below_the_base);
	tcase_add_test(t, layout_puts_every_vms_devices_first);
	tcase_add_test(t, qemu_args_walk_the_vms_devices);
	tcase_add_test(t, a_record_round_trips);
	tcase_add_test(t, an_older_record_reads_back);
	tcase_add_test(t, tap_checks_its_interface_name);
	tcase_add_test(t, carried_by_every_way_today);
	tcase_add_test(t, ram_opens_a_sealed_memfd);
	tcase_add_test(t, console_truncates_when_new_and_appends_when_reopened);
	suite_add_tcase(s, t);
	sr = srunner_create(s);
	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? 1 : 0;
}
