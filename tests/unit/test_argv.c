/* SPDX-License-Identifier: MIT */
/* QEMU command lines (kvm/qemu.c's qemu_build_argv) against golden files,
 * tests/unit/golden/argv/MODE-DEVICES[-VARIANT].txt, one argument a line:
 * every combination of devices under every way a VMM is started, as cprd
 * starts them (vmm.c: the held fds from 3 on, then the kernel and initrd
 * through /proc/self/fd), and the accelerator and sandbox variants.
 * A change of a command line is a change of these files, reviewed as code;
 * CPRD_REGEN_GOLDEN=1 make unit rewrites them. */
#include <check.h>
#include <dirent.h>

#include "daemon/devices/devices.h"
#include "kvm/qemu.h"
#include "tests/unit/golden.h"

/* How a VMM is started (vmm_start()'s struct vmm_incoming, or
 * vmm_exec_argv() for a cpr-exec successor). */
enum mode { START, DEFER, CPR_EXEC, CPR_TRANSFER, CHECK, _MODE_MAX };

static const char *const mode_names[_MODE_MAX] = {
	[START] = "start",       [DEFER] = "defer",
	[CPR_EXEC] = "cpr-exec", [CPR_TRANSFER] = "cpr-transfer",
	[CHECK] = "check",
};

enum device {
	DEV_TAP = 1 << 0,
	DEV_INITRD = 1 << 1,
	DEV_APPEND = 1 << 2,
	DEV_DISKS = 1 << 3, /* a qcow2 overlay on a raw base, and a raw disk */
	_DEV_ALL = (1 << 4) - 1,
};

/* cprd's usual VMM: KVM, confined (QEMU's sandbox on), no exec; a variant
 * changes one of them on the VM with every device. */
enum variant { PLAIN, TCG, NO_SANDBOX, ALLOW_EXEC, CPU, _VARIANT_MAX };

static const char *const variant_names[_VARIANT_MAX] = {
	[PLAIN] = "",
	[TCG] = "-tcg",
	[NO_SANDBOX] = "-nosandbox",
	[ALLOW_EXEC] = "-allow-exec",
	[CPU] = "-cpu",
};

struct argv_case {
	enum mode mode;
	unsigned devices;
	enum variant variant;
};

#define N_CASES (_MODE_MAX * (_DEV_ALL + 1 + _VARIANT_MAX - 1))

/* Case i: each mode with each set of devices, then each mode's variants. */
static bool case_of(size_t i, struct argv_case *ret)
{
	size_t per_mode = _DEV_ALL + 1 + _VARIANT_MAX - 1, k = i % per_mode;

	if (i >= N_CASES)
		return false;
	*ret = (struct argv_case){ .mode = (enum mode)(i / per_mode) };
	if (k <= _DEV_ALL)
		ret->devices = (unsigned)k;
	else {
		ret->devices = _DEV_ALL;
		ret->variant = (enum variant)(k - _DEV_ALL);
	}
	/* A cpr-exec successor is a VM created for it: exec is allowed. */
	return !(ret->mode == CPR_EXEC && ret->variant == ALLOW_EXEC);
}

static void case_name(const struct argv_case *c, char *buf, size_t size)
{
	static const char *const devs[] = { "tap", "initrd", "append", "disks" };
	char set[64] = "";

	for (size_t i = 0; i < ELEMENTSOF(devs); i++)
		if (c->devices & (1u << i))
			snprintf(set + strlen(set), sizeof(set) - strlen(set), "%s%s",
				 set[0] ? "-" : "", devs[i]);
	snprintf(buf, size, "argv/%s-%s%s.txt", mode_names[c->mode], set[0] ? set : "bare",
		 variant_names[c->variant]);
}

/* Two disks as vm.create records them: a qcow2 overlay on a raw base
 * (cache=none), and a raw data disk with a serial. */
static json_object *disks(void)
{
	json_object *a = json_tokener_parse(
	    "[{\"path\": \"/var/lib/cprd/web1.qcow2\", \"format\": \"qcow2\", \"cache\": "
	    "\"none\", \"layers\": [{\"path\": \"/var/lib/cprd/web1.qcow2\", \"format\": "
	    "\"qcow2\", \"dev\": 2049, \"ino\": 11}, {\"path\": \"/var/lib/cprd/base.raw\", "
	    "\"format\": \"raw\", \"dev\": 2049, \"ino\": 12}]}, {\"path\": "
	    "\"/srv/web1-data.raw\", \"serial\": \"data1\", \"layers\": [{\"path\": "
	    "\"/srv/web1-data.raw\", \"format\": \"raw\", \"dev\": 2050, \"ino\": 7}]}]");

	ck_assert_ptr_nonnull(a);
	return a;
}

/* The configuration vmm.c gives QEMU for case c: its devices' layout and
 * arguments through the device table. */
static struct qemu_config config_of(const struct argv_case *c, char *kernel, char *initrd,
				    size_t size)
{
	struct device_args args = {};
	struct device_layout l;
	struct qemu_config q = {
		.name = "web1",
		.binary = "/usr/bin/qemu-system-x86_64",
		.machine = "pc-q35-10.0",
		.memory_bytes = 256ULL << 20,
		.vcpus = 2,
		.kvm = c->variant != TCG,
		.sandbox = c->variant != NO_SANDBOX,
		.allow_exec = c->variant == ALLOW_EXEC || c->mode == CPR_EXEC,
		.cpu = c->variant == CPU ? "Skylake-Server-v4" : NULL,
	};
	int next;

	if (c->devices & DEV_TAP)
		args.arg[2] = json_object_new_string("tap0");
	if (c->devices & DEV_DISKS)
		args.arg[3] = disks();
	devices_layout(&args, &l);
	ck_assert_int_eq(devices_qemu_args(&args, &l, &q), 0);
	device_args_done(&args);
	q.qmp_fd = l.qmp;
	next = l.next;
	snprintf(kernel, size, "/proc/self/fd/%d", next++);
	q.kernel = kernel;
	if (c->devices & DEV_INITRD) {
		snprintf(initrd, size, "/proc/self/fd/%d", next++);
		q.initrd = initrd;
	}
	if (c->devices & DEV_APPEND)
		q.append = "console=ttyS0 quiet root=/dev/vda rw";
	switch (c->mode) {
	case START:
	case _MODE_MAX:
		break;
	case DEFER:
		q.incoming = true;
		break;
	case CPR_EXEC:
		q.incoming_uri = "file:/run/cprd/vms/web1/vmm/cpr-exec.state";
		break;
	case CPR_TRANSFER:
		q.cpr_main_path = "/run/cprd/vms/web1/vmm/cpr-main.sock";
		q.cpr_state_path = "/run/cprd/vms/web1/vmm/cpr-state.sock";
		break;
	case CHECK:
		q.incoming = true;
		q.check = true;
		break;
	}
	return q;
}

START_TEST(command_line_is_the_golden_one)
{
	struct argv_case c;
	struct qemu_config q;
	char name[64], kernel[32], initrd[32];
	_cleanup_free_ char *text = NULL;
	char **argv = NULL;
	size_t len = 0;
	FILE *f;

	if (!case_of((size_t)_i, &c))
		return;
	case_name(&c, name, sizeof(name));
	q = config_of(&c, kernel, initrd, sizeof(kernel));
	ck_assert_int_eq(qemu_build_argv(&q, &argv), 0);
	f = open_memstream(&text, &len);
	ck_assert_ptr_nonnull(f);
	for (char **a = argv; *a; a++)
		fprintf(f, "%s\n", *a);
	ck_assert_int_eq(fclose(f), 0);
	strv_free(argv);
	qemu_config_done(&q);
	golden_check(name, text);
}
END_TEST

/* A golden file no case writes is a case that was dropped: remove it. */
START_TEST(every_golden_file_has_its_case)
{
	_cleanup_free_ char *dir_path = NULL;
	DIR *dir;
	struct dirent *e;

	ck_assert_int_ge(asprintf(&dir_path, "%s/argv", GOLDEN_DIR), 0);
	dir = opendir(dir_path);
	ck_assert_msg(dir, "%s is missing", dir_path);
	while ((e = readdir(dir))) {
		bool known = e->d_name[0] == '.';
		struct argv_case c;
		char name[64];

		for (size_t i = 0; i < N_CASES && !known; i++) {
			if (!case_of(i, &c))
				continue;
			case_name(&c, name, sizeof(name));
			known = streq(name + strlen("argv/"), e->d_name);
		}
		ck_assert_msg(known, "%s/%s: no case writes it; remove it", dir_path, e->d_name);
	}
	closedir(dir);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("argv");
	TCase *t = tcase_create("golden");
	SRunner *sr;
	int failed;

	tcase_add_loop_test(t, command_line_is_the_golden_one, 0, N_CASES);
	tcase_add_test(t, every_golden_file_has_its_case);
	suite_add_tcase(s, t);
	sr = srunner_create(s);
	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed ? 1 : 0;
}
