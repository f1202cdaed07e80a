/* SPDX-License-Identifier: MIT */
#include <ctype.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "common/macro.h"
#include "kvm/qemu.h"

char **strv_free(char **v)
{
	if (!v)
		return NULL;
	for (char **p = v; *p; p++)
		free(*p);
	free(v);
	return NULL;
}

struct argv {
	char **v;
	size_t n, cap;
	int error;
};

static void add(struct argv *a, const char *s)
{
	char *d;

	if (a->error)
		return;
	if (a->n + 2 > a->cap) {
		size_t cap = a->cap ? a->cap * 2 : 32;
		char **nv = reallocarray(a->v, cap, sizeof(char *));
		if (!nv) {
			a->error = -ENOMEM;
			return;
		}
		a->v = nv;
		a->cap = cap;
	}
	d = strdup(s);
	if (!d) {
		a->error = -ENOMEM;
		return;
	}
	a->v[a->n++] = d;
	a->v[a->n] = NULL;
}

_printf_(2, 3) static void addf(struct argv *a, const char *fmt, ...)
{
	_cleanup_free_ char *s = NULL;
	va_list ap;
	int r;

	va_start(ap, fmt);
	r = vasprintf(&s, fmt, ap);
	va_end(ap);
	if (r < 0) {
		a->error = -ENOMEM;
		return;
	}
	add(a, s);
}

static bool config_is_valid(const struct qemu_config *c)
{
	return c->name && c->binary && c->machine && c->kernel &&
	       c->memory_bytes >= QEMU_MIN_MEMORY && c->memory_bytes % (1 << 20) == 0 &&
	       c->vcpus >= 1 && c->vcpus <= 512 && c->ram_fd >= QEMU_CHILD_FD_BASE &&
	       c->console_fd >= QEMU_CHILD_FD_BASE && c->qmp_fd >= QEMU_CHILD_FD_BASE &&
	       (c->tap_fd < 0 || c->tap_fd >= QEMU_CHILD_FD_BASE) &&
	       /* both are pasted into option strings */
	       !strchr(c->name, ',') && !strchr(c->machine, ',') &&
	       /* pasted into a JSON string */
	       (!c->cpr_state_path || !strpbrk(c->cpr_state_path, "\"\\")) &&
	       (!c->incoming_uri || c->incoming_uri[0]);
}

int qemu_build_argv(const struct qemu_config *c, char ***ret_argv)
{
	struct argv a = {};
	uint64_t mib = c->memory_bytes >> 20;

	if (!config_is_valid(c))
		return -EINVAL;

	add(&a, c->binary);
	add(&a, "-name");
	addf(&a, c->check ? "guest=%s,process=cprd-check" : "guest=%s", c->name);
	add(&a, "-nodefaults");
	add(&a, "-no-user-config");
	add(&a, "-display");
	add(&a, "none");
	add(&a, "-msg");
	add(&a, "timestamp=on");
	/* aux-ram-share=on: ROMs and other small RAM blocks in shared memory
	 * too, without which QEMU refuses cpr-transfer. It must be set from the
	 * VM's very first VMM on. */
	add(&a, "-machine");
	addf(&a, "%s,memory-backend=ram0,aux-ram-share=on", c->machine);
	add(&a, "-accel");
	add(&a, c->kvm ? "kvm" : "tcg");
	/* QEMU's own filter, installed before it touches guest input: no
	 * obsolete calls, no set*id, no fork or exec, no scheduler or
	 * memory-policy changes. Nothing cprd asks of a VMM (handover,
	 * cpr-transfer) needs any of them; cpr-exec needs exec, and a VM
	 * created for it is given spawn=allow. */
	if (c->sandbox) {
		add(&a, "-sandbox");
		addf(&a, "on,obsolete=deny,elevateprivileges=deny,spawn=%s,resourcecontrol=deny",
		     c->allow_exec ? "allow" : "deny");
	}
	add(&a, "-smp");
	addf(&a, "%u", c->vcpus);
	add(&a, "-m");
	addf(&a, "%" PRIu64 "M", mib);
	/* Guest RAM is the daemon's memfd, reopened through /proc so that QEMU
	 * maps the very same pages; share=on lets a successor map them too and
	 * lets migration skip them (x-ignore-shared). */
	add(&a, "-object");
	addf(&a, "memory-backend-file,id=ram0,size=%" PRIu64 "M,mem-path=/proc/self/fd/%d,share=on",
	     mib, c->ram_fd);
	/* The monitor listens on a socket the daemon bound and already
	 * connected to, so the daemon never waits for a path to appear. */
	add(&a, "-chardev");
	addf(&a, "socket,id=qmp,fd=%d,server=on,wait=off", c->qmp_fd);
	add(&a, "-mon");
	add(&a, "chardev=qmp,mode=control");
	/* append=on: a successor VMM must not truncate its predecessor's log. */
	add(&a, "-chardev");
	addf(&a, "file,id=con0,path=/proc/self/fd/%d,append=on", c->console_fd);
	add(&a, "-serial");
	add(&a, "chardev:con0");
	add(&a, "-kernel");
	add(&a, c->kernel);
	if (c->initrd) {
		add(&a, "-initrd");
		add(&a, c->initrd);
	}
	if (c->append) {
		add(&a, "-append");
		add(&a, c->append);
	}
	if (c->tap_fd >= 0) {
		add(&a, "-netdev");
		addf(&a, "tap,id=net0,fd=%d", c->tap_fd);
		add(&a, "-device");
		add(&a, "virtio-net-pci,netdev=net0,romfile=");
	}
	/* A VMM that receives a guest starts paused (-S) and reports its
	 * migration's end (x-events): it runs the guest only when told to,
	 * so until then the guest can always go back to the old VMM. */
	if (c->incoming || c->incoming_uri || (c->cpr_main_path && c->cpr_state_path)) {
		add(&a, "-S");
		add(&a, "-global");
		add(&a, "migration.x-events=on");
	}
	if (c->incoming_uri) {
		add(&a, "-incoming");
		add(&a, c->incoming_uri);
	} else if (c->incoming) {
		add(&a, "-incoming");
		add(&a, "defer");
	} else if (c->cpr_main_path && c->cpr_state_path) {
		add(&a, "-incoming");
		addf(&a, "unix:%s", c->cpr_main_path);
		add(&a, "-incoming");
		addf(&a,
		     "{\"channel-type\": \"cpr\", \"addr\": {\"transport\": \"socket\", "
		     "\"type\": \"unix\", \"path\": \"%s\"}}",
		     c->cpr_state_path);
	}
	if (a.error) {
		strv_free(a.v);
		return a.error;
	}
	*ret_argv = a.v;
	return 0;
}

int qemu_parse_size(const char *s, uint64_t *ret)
{
	static const struct {
		const char *suffix;
		unsigned shift;
	} units[] = {
		{ "", 0 },    { "B", 0 },    { "K", 10 }, { "KB", 10 }, { "KiB", 10 }, { "M", 20 },
		{ "MB", 20 }, { "MiB", 20 }, { "G", 30 }, { "GB", 30 }, { "GiB", 30 }, { "T", 40 },
		{ "TB", 40 }, { "TiB", 40 }, { "P", 50 }, { "PB", 50 }, { "PiB", 50 },
	};
	unsigned long long v;
	char *end;

	if (!s || !isdigit((unsigned char)s[0]))
		return -EINVAL;
	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno == ERANGE)
		return -ERANGE;
	for (size_t i = 0; i < ELEMENTSOF(units); i++) {
		if (strcasecmp(end, units[i].suffix) != 0)
			continue;
		if (units[i].shift && v > (UINT64_MAX >> units[i].shift))
			return -ERANGE;
		*ret = (uint64_t)v << units[i].shift;
		return 0;
	}
	return -EINVAL;
}
