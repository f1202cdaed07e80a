/* SPDX-License-Identifier: MIT */
#include <stdio.h>
#include <string.h>
#include <systemd/sd-daemon.h>

#include "daemon/core/fdstore.h"
#include "daemon/observe/log.h"

static bool under_service_manager(void)
{
	return getenv("NOTIFY_SOCKET") != NULL;
}

void fdstore_add(struct daemon *d, const char *vm, const char *name, int fd)
{
	char msg[256];
	int r;

	if (!under_service_manager() || fd < 0)
		return;
	/* FDPOLL=0: a pidfd turns readable when its process exits and a
	 * socket may hang up; neither may make the manager drop the fd. */
	snprintf(msg, sizeof(msg), "FDSTORE=1\nFDNAME=" FDSTORE_PREFIX "%s/%s\nFDPOLL=0", vm, name);
	r = sd_pid_notify_with_fds(0, 0, msg, &fd, 1);
	if (r <= 0)
		log_warning("cannot put %s/%s into the fd store: %s", vm, name,
			    r < 0 ? strerror(-r) : "no service manager");
}

void fdstore_remove(struct daemon *d, const char *vm, const char *name)
{
	if (under_service_manager())
		sd_notifyf(0, "FDSTOREREMOVE=1\nFDNAME=" FDSTORE_PREFIX "%s/%s", vm, name);
}

void fdstore_remove_vm(struct daemon *d, const char *vm)
{
	const memstore_entry *e;

	for (size_t i = 0; (e = memstore_nth(d->store, vm, i)); i++)
		fdstore_remove(d, vm, e->name);
	fdstore_remove(d, vm, "pidfd");
}
