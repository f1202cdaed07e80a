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

void qemu_args_add(struct qemu_args *a, const char *s)
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

void qemu_args_addf(struct qemu_args *a, const char *fmt, ...)
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
	qemu_args_add(a, s);
}

void qemu_args_done(struct qemu_args *a)
{
	strv_free(a->v);
	*a = (struct qemu_args){};
}

void qemu_config_done(struct qemu_config *c)
{
	for (size_t i = 0; i < _QEMU_PLACE_MAX; i++)
		qemu_args_done(&c->devices[i]);
}

static void add_device_args(struct qemu_args *a, const struct qemu_config *c, enum qemu_place p)
{
	for (size_t i = 0; i < c->devices[p].n; i++)
		qemu_args_add(a, c->devices[p].v[i]);
}

static bool config_is_valid(const struct qemu_config *c)
{
	return c->name && c->binary && c->machine && c->kernel &&
	       c->memory_bytes >= QEMU_MIN_MEMORY && c->memory_bytes % (1 << 20) == 0 &&
	       c->vcpus >= 1 && c->vcpus <= 512 && c->qmp_fd >= QEMU_CHILD_FD_BASE &&
	       c->memory_backend &&
	       /* all three are pasted into option strings */
	       !strchr(c->name, ',') && !strchr(c->machine, ',') &&
	       !strchr(c->memory_backend, ',') &&
	       /* pasted into a JSON string */
	       (!c->cpr_state_path || !strpbrk(c->cpr_state_path, "\"\\")) &&
	       (!c->incoming_uri || c->incoming_uri[0]);
}

int qemu_build_argv(const struct qemu_config *c, char ***ret_argv)
{
	struct qemu_args a = {};
	uint64_t mib = c->memory_bytes >> 20;

	if (!config_is_valid(c))
		return -EINVAL;
	for (size_t i = 0; i < _QEMU_PLACE_MAX; i++)
		if (c->devices[i].error)
			return c->devices[i].error;

	qemu_args_add(&a, c->binary);
	qemu_args_add(&a, "-name");
	qemu_args_addf(&a, c->check ? "guest=%s,process=cprd-check" : "guest=%s", c->name);
	qemu_args_add(&a, "-nodefaults");
	qemu_args_add(&a, "-no-user-config");
	qemu_args_add(&a, "-display");
	qemu_args_add(&a, "none");
	qemu_args_add(&a, "-msg");
	qemu_args_add(&a, "timestamp=on");
	/* aux-ram-share=on: ROMs and other small RAM blocks in shared memory
	 * too, without which QEMU refuses cpr-transfer. It must be set from the
	 * VM's very first VMM on. */
	qemu_args_add(&a, "-machine");
	qemu_args_addf(&a, "%s,memory-backend=%s,aux-ram-share=on", c->machine, c->memory_backend);
	qemu_args_add(&a, "-accel");
	qemu_args_add(&a, c->kvm ? "kvm" : "tcg");
	if (c->cpu) {
		qemu_args_add(&a, "-cpu");
		qemu_args_add(&a, c->cpu);
	}
	/* QEMU's own filter, installed before it touches guest input: no
	 * obsolete calls, no set*id, no fork or exec, no scheduler or
	 * memory-policy changes. Nothing cprd asks of a VMM (handover,
	 * cpr-transfer) needs any of them; cpr-exec needs exec, and a VM
	 * created for it is given spawn=allow. */
	if (c->sandbox) {
		qemu_args_add(&a, "-sandbox");
		qemu_args_addf(
		    &a, "on,obsolete=deny,elevateprivileges=deny,spawn=%s,resourcecontrol=deny",
		    c->allow_exec ? "allow" : "deny");
	}
	qemu_args_add(&a, "-smp");
	qemu_args_addf(&a, "%u", c->vcpus);
	qemu_args_add(&a, "-m");
	qemu_args_addf(&a, "%" PRIu64 "M", mib);
	add_device_args(&a, c, QEMU_PLACE_MEMORY);
	/* The monitor listens on a socket the daemon bound and already
	 * connected to, so the daemon never waits for a path to appear. */
	qemu_args_add(&a, "-chardev");
	qemu_args_addf(&a, "socket,id=qmp,fd=%d,server=on,wait=off", c->qmp_fd);
	qemu_args_add(&a, "-mon");
	qemu_args_add(&a, "chardev=qmp,mode=control");
	add_device_args(&a, c, QEMU_PLACE_SERIAL);
	qemu_args_add(&a, "-kernel");
	qemu_args_add(&a, c->kernel);
	if (c->initrd) {
		qemu_args_add(&a, "-initrd");
		qemu_args_add(&a, c->initrd);
	}
	if (c->append) {
		qemu_args_add(&a, "-append");
		qemu_args_add(&a, c->append);
	}
	add_device_args(&a, c, QEMU_PLACE_DEVICE);
	/* A VMM that receives a guest starts paused (-S) and reports its
	 * migration's end (x-events): it runs the guest only when told to,
	 * so until then the guest can always go back to the old VMM. */
	if (c->incoming || c->incoming_uri || (c->cpr_main_path && c->cpr_state_path)) {
		qemu_args_add(&a, "-S");
		qemu_args_add(&a, "-global");
		qemu_args_add(&a, "migration.x-events=on");
	}
	if (c->incoming_uri) {
		qemu_args_add(&a, "-incoming");
		qemu_args_add(&a, c->incoming_uri);
	} else if (c->incoming) {
		qemu_args_add(&a, "-incoming");
		qemu_args_add(&a, "defer");
	} else if (c->cpr_main_path && c->cpr_state_path) {
		qemu_args_add(&a, "-incoming");
		qemu_args_addf(&a, "unix:%s", c->cpr_main_path);
		qemu_args_add(&a, "-incoming");
		qemu_args_addf(&a,
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
