/* SPDX-License-Identifier: MIT */
#include <stdio.h>
#include <systemd/sd-bus.h>
#include <systemd/sd-daemon.h>

#include "daemon/log.h"
#include "daemon/scope.h"

#define SCOPE_TIMEOUT_USEC (2 * 1000 * 1000)

int scope_adopt(struct daemon *d, pid_t pid, const char *vm)
{
	sd_bus_error error = SD_BUS_ERROR_NULL;
	sd_bus_message *m = NULL, *reply = NULL;
	char unit[128], desc[160];
	int r;

	if (sd_booted() <= 0 || !getenv("NOTIFY_SOCKET"))
		return 0;
	if (!d->bus) {
		r = sd_bus_open_system(&d->bus);
		if (r < 0)
			return r;
	}
	snprintf(unit, sizeof(unit), "cprd-vm-%s-%d.scope", vm, (int)pid);
	snprintf(desc, sizeof(desc), "VMM of VM %s (held by cprd)", vm);
	r = sd_bus_message_new_method_call(
	    d->bus, &m, "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
	    "org.freedesktop.systemd1.Manager", "StartTransientUnit");
	if (r >= 0)
		r = sd_bus_message_append(m, "ss", unit, "fail");
	if (r >= 0)
		r = sd_bus_message_append(m, "a(sv)", 4, "PIDs", "au", 1, (uint32_t)pid, "Slice",
					  "s", "machine.slice", "Description", "s", desc,
					  "CollectMode", "s", "inactive-or-failed");
	if (r >= 0)
		r = sd_bus_message_append(m, "a(sa(sv))", 0);
	if (r >= 0)
		r = sd_bus_call(d->bus, m, SCOPE_TIMEOUT_USEC, &error, &reply);
	if (r < 0)
		log_warning("VM %s: cannot move VMM pid %d into %s: %s", vm, (int)pid, unit,
			    error.message ? error.message : strerror(-r));
	sd_bus_error_free(&error);
	sd_bus_message_unref(m);
	sd_bus_message_unref(reply);
	return r < 0 ? r : 0;
}
