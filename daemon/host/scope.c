/* SPDX-License-Identifier: MIT */
#include <poll.h>
#include <stdio.h>
#include <systemd/sd-bus.h>
#include <systemd/sd-daemon.h>

#include "daemon/observe/log.h"
#include "daemon/host/scope.h"

#define SCOPE_TIMEOUT_USEC (2 * 1000 * 1000)

/* The system bus on cprd's event loop: sd-bus says which events it waits
 * for and until when; the loop tells it when they came. */
struct scope_bus {
	struct daemon *d;
	ev_io io;
	ev_timer timer;
	ev_prepare prepare; /* re-arms io and timer before each poll */
};

struct pending {
	struct daemon *d;
	pid_t pid;
	char vm[64];
	char unit[128];
};

/* Only at exit is what is queued written out: sd_bus_flush() blocks. */
static void bus_drop(struct daemon *d, bool flush)
{
	struct scope_bus *sb = d->scope_bus;

	if (sb) {
		ev_ref(d->loop); /* balances bus_attach() */
		ev_io_stop(d->loop, &sb->io);
		ev_timer_stop(d->loop, &sb->timer);
		ev_prepare_stop(d->loop, &sb->prepare);
		free(sb);
		d->scope_bus = NULL;
	}
	d->bus = flush ? sd_bus_flush_close_unref(d->bus) : sd_bus_close_unref(d->bus);
}

static void bus_process(struct daemon *d)
{
	int r;

	while ((r = sd_bus_process(d->bus, NULL)) > 0)
		;
	if (r < 0) {
		/* Disconnected: what was pending has been told so (each call's
		 * callback ran); the next VMM opens a new connection. */
		log_warning("lost the connection to the system bus: %s", strerror(-r));
		bus_drop(d, false);
	}
}

static void io_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	bus_process(((struct scope_bus *)w->data)->d);
}

static void timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	bus_process(((struct scope_bus *)w->data)->d);
}

static void prepare_cb(struct ev_loop *loop, ev_prepare *w, int revents)
{
	struct scope_bus *sb = w->data;
	struct daemon *d = sb->d;
	int fd = sd_bus_get_fd(d->bus), ev = sd_bus_get_events(d->bus), events = 0;
	uint64_t until = UINT64_MAX;

	if (fd < 0 || ev < 0) {
		bus_drop(d, false);
		return;
	}
	events = (ev & POLLIN ? EV_READ : 0) | (ev & POLLOUT ? EV_WRITE : 0);
	if (!ev_is_active(&sb->io) || sb->io.fd != fd || sb->io.events != events) {
		ev_io_stop(loop, &sb->io);
		ev_io_set(&sb->io, fd, events);
		if (events)
			ev_io_start(loop, &sb->io);
	}
	ev_timer_stop(loop, &sb->timer);
	if (sd_bus_get_timeout(d->bus, &until) >= 0 && until != UINT64_MAX) {
		uint64_t now = now_usec(CLOCK_MONOTONIC);

		ev_timer_set(&sb->timer, until > now ? (double)(until - now) / 1e6 : 0., 0.);
		ev_timer_start(loop, &sb->timer);
	}
}

/* Connecting and authenticating do not block either: sd-bus queues the
 * call and completes the handshake as the loop processes the bus. */
static int bus_attach(struct daemon *d)
{
	struct scope_bus *sb;
	int r;

	if (d->scope_bus)
		return 0;
	r = sd_bus_open_system(&d->bus);
	if (r < 0)
		return r;
	sb = calloc(1, sizeof(*sb));
	if (!sb) {
		d->bus = sd_bus_close_unref(d->bus);
		return -ENOMEM;
	}
	sb->d = d;
	ev_init(&sb->io, io_cb);
	ev_init(&sb->timer, timer_cb);
	ev_prepare_init(&sb->prepare, prepare_cb);
	sb->io.data = sb->timer.data = sb->prepare.data = sb;
	ev_prepare_start(d->loop, &sb->prepare);
	ev_unref(d->loop); /* the prepare watcher alone keeps nothing running */
	d->scope_bus = sb;
	return 0;
}

static int call_async(struct daemon *d, sd_bus_message *m, sd_bus_message_handler_t cb,
		      struct pending *p)
{
	sd_bus_slot *slot = NULL;
	int r;

	r = sd_bus_call_async(d->bus, &slot, m, cb, p, SCOPE_TIMEOUT_USEC);
	if (r < 0)
		return r;
	/* The slot lives until the answer (or the timeout, or the bus going
	 * away) and then frees what the callback needed. */
	sd_bus_slot_set_destroy_callback(slot, free);
	sd_bus_slot_set_floating(slot, 1);
	sd_bus_slot_unref(slot);
	return 0;
}

static int attached(sd_bus_message *reply, void *ud, sd_bus_error *ret_error)
{
	const struct pending *p = ud;
	const sd_bus_error *e = sd_bus_message_get_error(reply);

	if (e)
		log_warning("VM %s: cannot move VMM pid %d into %s: %s", p->vm, (int)p->pid,
			    p->unit, e->message ? e->message : e->name);
	else
		log_debug("VM %s: VMM pid %d joined %s", p->vm, (int)p->pid, p->unit);
	return 0;
}

/* The VM's scope is there already, holding the VMM that an update is
 * replacing: the new VMM joins it, and the scope outlives the old one. */
static int attach(struct pending *p)
{
	_cleanup_free_ struct pending *q = NULL;
	sd_bus_message *m = NULL;
	int r;

	q = malloc(sizeof(*q));
	if (!q)
		return -ENOMEM;
	*q = *p;
	if (!p->d->bus)
		return -ENOTCONN;
	r = sd_bus_message_new_method_call(
	    p->d->bus, &m, "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
	    "org.freedesktop.systemd1.Manager", "AttachProcessesToUnit");
	if (r >= 0)
		r = sd_bus_message_append(m, "ssau", p->unit, "", 1, (uint32_t)p->pid);
	if (r >= 0)
		r = call_async(p->d, m, attached, q);
	sd_bus_message_unref(m);
	if (r >= 0)
		TAKE_PTR(q);
	return r;
}

static int adopted(sd_bus_message *reply, void *ud, sd_bus_error *ret_error)
{
	struct pending *p = ud;
	const sd_bus_error *e = sd_bus_message_get_error(reply);
	int r;

	if (e && sd_bus_error_has_name(e, "org.freedesktop.systemd1.UnitExists")) {
		r = attach(p);
		if (r < 0)
			log_warning("VM %s: cannot move VMM pid %d into %s: %s", p->vm, (int)p->pid,
				    p->unit, strerror(-r));
	} else if (e) {
		log_warning("VM %s: cannot move VMM pid %d into %s: %s", p->vm, (int)p->pid,
			    p->unit, e->message ? e->message : e->name);
	} else {
		log_debug("VM %s: VMM pid %d moved into %s", p->vm, (int)p->pid, p->unit);
	}
	return 0;
}

/* Each VM has one scope, cprd-vm-NAME.scope in machine.slice, for its whole
 * life: its first VMM starts it, an update's new VMM joins it, and it ends
 * with the VM's last VMM. Joining a scope (AttachProcessesToUnit) needs it
 * delegated, as machined's scopes for VMs and containers are. */
int scope_adopt(struct daemon *d, pid_t pid, const char *vm)
{
	_cleanup_free_ struct pending *p = NULL;
	sd_bus_message *m = NULL;
	char desc[160];
	int r;

	if (sd_booted() <= 0 || !getenv("NOTIFY_SOCKET"))
		return 0;
	p = calloc(1, sizeof(*p));
	if (!p)
		return -ENOMEM;
	p->d = d;
	p->pid = pid;
	snprintf(p->vm, sizeof(p->vm), "%s", vm);
	snprintf(p->unit, sizeof(p->unit), "cprd-vm-%s.scope", vm);
	snprintf(desc, sizeof(desc), "VMM of VM %s (held by cprd)", vm);
	r = bus_attach(d);
	if (r >= 0)
		r = sd_bus_message_new_method_call(
		    d->bus, &m, "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
		    "org.freedesktop.systemd1.Manager", "StartTransientUnit");
	if (r >= 0)
		r = sd_bus_message_append(m, "ss", p->unit, "fail");
	if (r >= 0)
		r = sd_bus_message_append(m, "a(sv)", 5, "PIDs", "au", 1, (uint32_t)pid, "Slice",
					  "s", "machine.slice", "Description", "s", desc,
					  "CollectMode", "s", "inactive-or-failed", "Delegate", "b",
					  1);
	if (r >= 0)
		r = sd_bus_message_append(m, "a(sa(sv))", 0);
	if (r >= 0)
		r = call_async(d, m, adopted, p);
	sd_bus_message_unref(m);
	if (r < 0) {
		log_warning("VM %s: cannot move VMM pid %d into %s: %s", vm, (int)pid, p->unit,
			    strerror(-r));
		return r;
	}
	TAKE_PTR(p);
	return 0;
}

void scope_close(struct daemon *d)
{
	bus_drop(d, true);
}
