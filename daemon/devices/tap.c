/* SPDX-License-Identifier: MIT */
/*
 * A tap interface for the guest's network (vm.create's "tap": its name).
 * cprd attaches to it (TUNSETIFF, creating it if need be) and holds the
 * fd: a VMM, confined to a network namespace of its own, reaches the
 * network only through it (a tap fd works wherever it is used).
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "common/macro.h"
#include "common/valid.h"
#include "daemon/devices/devices.h"
#include "kvm/qemu.h"

/* EINVAL/EBUSY: the name is taken by another kind of interface or a tap
 * already attached elsewhere. */
static int tap_open(const struct vm *vm, json_object *arg, int *fds, size_t n)
{
	const char *ifname = json_object_get_string(arg);
	_cleanup_close_ int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
	struct ifreq ifr = { .ifr_flags = IFF_TAP | IFF_NO_PI };

	if (fd < 0)
		return -errno;
	snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "%s", ifname);
	if (ioctl(fd, TUNSETIFF, &ifr) < 0)
		return -errno;
	fds[0] = TAKE_FD(fd);
	return 0;
}

static int tap_check(json_object *arg, char *why, size_t size)
{
	const char *ifname = json_object_get_string(arg);
	const char *invalid = ifname_invalid(ifname);

	if (!invalid)
		return 0;
	snprintf(why, size, "tap interface name '%.64s' %s", ifname, invalid);
	return -EINVAL;
}

static int tap_qemu_args(json_object *arg, const int *child, size_t n, struct qemu_config *qc)
{
	struct qemu_args *a = &qc->devices[QEMU_PLACE_DEVICE];

	qemu_args_add(a, "-netdev");
	qemu_args_addf(a, "tap,id=net0,fd=%d", child[0]);
	qemu_args_add(a, "-device");
	qemu_args_add(a, "virtio-net-pci,netdev=net0,romfile=");
	return a->error;
}

const struct device_type device_tap = {
	.kind = "tap",
	.id = "net0",
	.what = "its tap device",
	.custody = MEMSTORE_KIND_TAP,
	.param = "tap",
	.check = tap_check,
	.open = tap_open,
	.reopen = tap_open,
	.qemu_args = tap_qemu_args,
	.carry = DEVICE_BY_ALL,
};
