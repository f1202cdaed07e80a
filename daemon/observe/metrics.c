/* SPDX-License-Identifier: MIT */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "common/file.h"
#include "common/json.h"
#include "daemon/observe/log.h"
#include "daemon/observe/metrics.h"
#include "daemon/core/server.h"
#include "daemon/strategies/strategy.h"
#include "daemon/core/vm.h"
#include "proto/jsonrpc.h"

#define METRICS_STATE_VERSION 1
#define METRICS_STATE_MAX (64 << 10)
#define MAX_STRATEGIES 8

static const char *const results[] = { "ok", "rolled-back", "failed", "interrupted" };
#define N_RESULTS ELEMENTSOF(results)

/* Upper bounds in seconds, as Prometheus counts time: a blackout takes
 * milliseconds, and one of seconds is an update gone wrong. */
static const double blackout_le[] = { 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 5 };
#define N_BUCKETS (ELEMENTSOF(blackout_le) + 1) /* the last one: +Inf */

static const char *const destroy_reasons[] = { "destroyed", "start-failed" };
#define N_REASONS ELEMENTSOF(destroy_reasons)

struct strategy_counts {
	char name[32];
	uint64_t results[N_RESULTS];
	uint64_t buckets[N_BUCKETS]; /* each bucket alone, not cumulative */
	double blackout_sum;         /* seconds */
};

struct metrics {
	struct strategy_counts s[MAX_STRATEGIES];
	size_t n;
	uint64_t created, destroyed[N_REASONS], crashed, subscribers_dropped;
	uint64_t since_usec; /* CLOCK_REALTIME: the counters began */

	char *state_path, *state_tmp; /* the counters, in the state directory */
	bool state_dirty;
	int state_error;

	char *file, *file_tmp; /* --metrics-file, or NULL */
	double interval;
	ev_timer timer;      /* wakes the loop when the interval has passed */
	uint64_t last_write; /* CLOCK_MONOTONIC, 0: never */
	bool file_dirty;
	int file_error;
};

/* Whether the VM's running VMM binary, or a library it maps, was
 * replaced or deleted on disk since it started (vm_outdated()). */
static bool vm_vmm_outdated(struct vm *vm)
{
	char files[8];

	return vm_outdated(vm, files, sizeof(files)) > 0;
}

static int index_of(const char *const *names, size_t n, const char *name)
{
	for (size_t i = 0; name && i < n; i++)
		if (streq(names[i], name))
			return (int)i;
	return -1;
}

static struct strategy_counts *strategy_counts(struct metrics *m, const char *name)
{
	struct strategy_counts *s;

	if (!name || strlen(name) >= sizeof(m->s[0].name))
		return NULL;
	for (size_t i = 0; i < m->n; i++)
		if (streq(m->s[i].name, name))
			return &m->s[i];
	if (m->n == MAX_STRATEGIES)
		return NULL;
	s = &m->s[m->n++];
	*s = (struct strategy_counts){};
	snprintf(s->name, sizeof(s->name), "%s", name);
	return s;
}

/* ---- counting ---- */

static void count_update(struct metrics *m, json_object *ev)
{
	struct strategy_counts *s =
	    strategy_counts(m, json_object_get_string(json_object_object_get(ev, "strategy")));
	int r = index_of(results, N_RESULTS,
			 json_object_get_string(json_object_object_get(ev, "result")));
	json_object *bo = json_object_object_get(ev, "blackout_ms");
	double sec;
	size_t b;

	if (!s || r < 0)
		return;
	s->results[r]++;
	/* Only a blackout that was measured: null is "unknown", not 0. */
	if (!json_object_is_type(bo, json_type_double) && !json_object_is_type(bo, json_type_int))
		return;
	sec = json_object_get_double(bo) / 1000.0;
	for (b = 0; b < ELEMENTSOF(blackout_le) && sec > blackout_le[b]; b++)
		;
	s->buckets[b]++;
	s->blackout_sum += sec;
}

void metrics_observe(struct daemon *d, json_object *ev)
{
	struct metrics *m = d->metrics;
	const char *kind = json_object_get_string(json_object_object_get(ev, "kind"));
	int i;

	if (!m || !kind)
		return;
	m->file_dirty = true;
	if (streq(kind, "created"))
		m->created++;
	else if (streq(kind, "crashed"))
		m->crashed++;
	else if (streq(kind, "dropped"))
		m->subscribers_dropped++;
	else if (streq(kind, "update-finished"))
		count_update(m, ev);
	else if (streq(kind, "destroyed") &&
		 (i = index_of(destroy_reasons, N_REASONS,
			       json_object_get_string(json_object_object_get(ev, "reason")))) >= 0)
		m->destroyed[i]++;
	else
		return; /* a gauge's change only */
	m->state_dirty = true;
}

void metrics_changed(struct daemon *d)
{
	if (d->metrics)
		d->metrics->file_dirty = true;
}

/* ---- the exposition ---- */

static void head(FILE *f, const char *name, const char *type, const char *help)
{
	fprintf(f, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* A label value as the format wants it: \, " and newline escaped. */
static void label(FILE *f, const char *key, const char *value)
{
	fprintf(f, "%s=\"", key);
	for (const char *p = value ? value : ""; *p; p++) {
		if (*p == '\\' || *p == '"')
			fputc('\\', f);
		if (*p == '\n')
			fputs("\\n", f);
		else
			fputc(*p, f);
	}
	fputc('"', f);
}

static void info(FILE *f, const char *name, const char *key, const char *value)
{
	fprintf(f, "%s{", name);
	label(f, key, value);
	fputs("} 1\n", f);
}

static void gauges(struct daemon *d, FILE *f)
{
	size_t states[_VM_STATE_MAX] = {}, updating = 0, outdated = 0;

	for (struct vm *vm = d->vms; vm; vm = vm->next) {
		if (vm->state >= 0 && vm->state < _VM_STATE_MAX)
			states[vm->state]++;
		updating += vm_op_is(vm, "update");
		outdated += vmm_alive(vm->vmm) && vm_vmm_outdated(vm);
	}
	head(f, "cprd_build_info", "gauge", "cprd's version; always 1.");
	info(f, "cprd_build_info", "version", CPRD_VERSION);
	head(f, "cprd_start_info", "gauge",
	     "How this cprd last started: fresh, fd-store, re-exec or recovered; always 1.");
	info(f, "cprd_start_info", "start_mode", d->start_mode);
	head(f, "cprd_start_time_seconds", "gauge",
	     "When this cprd last started (or re-executed), in seconds since the epoch.");
	fprintf(f, "cprd_start_time_seconds %.3f\n", (double)d->started_usec / 1e6);
	head(f, "cprd_vms", "gauge", "VMs cprd holds, by state.");
	for (int s = 0; s < _VM_STATE_MAX; s++) {
		fputs("cprd_vms{", f);
		label(f, "state", vm_state_to_string(s));
		fprintf(f, "} %zu\n", states[s]);
	}
	head(f, "cprd_vms_updating", "gauge", "VMs with an update in flight.");
	fprintf(f, "cprd_vms_updating %zu\n", updating);
	head(f, "cprd_vmms_outdated", "gauge",
	     "Running VMMs whose binary or a mapped library was replaced on disk since they "
	     "started.");
	fprintf(f, "cprd_vmms_outdated %zu\n", outdated);
	head(f, "cprd_fds_held", "gauge", "File descriptors in cprd's custody, all VMs.");
	fprintf(f, "cprd_fds_held %zu\n", memstore_count(d->store, NULL));
	head(f, "cprd_event_subscribers", "gauge", "Connections subscribed to events.");
	fprintf(f, "cprd_event_subscribers %zu\n", server_subscribers(d));
	head(f, "cprd_registry_healthy", "gauge",
	     "1 when the registry was last written, 0 while it cannot be.");
	fprintf(f, "cprd_registry_healthy %d\n", registry_ok(&d->registry) ? 1 : 0);
}

static void counters(struct metrics *m, FILE *f)
{
	head(f, "cprd_counters_since_seconds", "gauge",
	     "When the counters below began, in seconds since the epoch (they survive cprd's "
	     "restarts on the same state directory).");
	fprintf(f, "cprd_counters_since_seconds %.3f\n", (double)m->since_usec / 1e6);
	head(f, "cprd_vms_created_total", "counter", "VMs created (starts attempted).");
	fprintf(f, "cprd_vms_created_total %" PRIu64 "\n", m->created);
	head(f, "cprd_vms_destroyed_total", "counter",
	     "VMs gone from cprd: destroyed, or their start failed.");
	for (size_t i = 0; i < N_REASONS; i++) {
		fputs("cprd_vms_destroyed_total{", f);
		label(f, "reason", destroy_reasons[i]);
		fprintf(f, "} %" PRIu64 "\n", m->destroyed[i]);
	}
	head(f, "cprd_vm_crashes_total", "counter",
	     "VMMs that exited on their own, leaving their VM crashed.");
	fprintf(f, "cprd_vm_crashes_total %" PRIu64 "\n", m->crashed);
	head(f, "cprd_updates_total", "counter", "Finished updates, by strategy and result.");
	for (size_t i = 0; i < m->n; i++)
		for (size_t r = 0; r < N_RESULTS; r++) {
			fputs("cprd_updates_total{", f);
			label(f, "strategy", m->s[i].name);
			fputc(',', f);
			label(f, "result", results[r]);
			fprintf(f, "} %" PRIu64 "\n", m->s[i].results[r]);
		}
	head(f, "cprd_update_blackout_seconds", "histogram",
	     "How long updates kept the guest paused, by strategy (measured ones only).");
	for (size_t i = 0; i < m->n; i++) {
		uint64_t cum = 0;

		for (size_t b = 0; b < N_BUCKETS; b++) {
			char le[32];

			cum += m->s[i].buckets[b];
			if (b < ELEMENTSOF(blackout_le))
				snprintf(le, sizeof(le), "%g", blackout_le[b]);
			else
				snprintf(le, sizeof(le), "+Inf");
			fputs("cprd_update_blackout_seconds_bucket{", f);
			label(f, "strategy", m->s[i].name);
			fputc(',', f);
			label(f, "le", le);
			fprintf(f, "} %" PRIu64 "\n", cum);
		}
		fputs("cprd_update_blackout_seconds_sum{", f);
		label(f, "strategy", m->s[i].name);
		fprintf(f, "} %.12g\n", m->s[i].blackout_sum);
		fputs("cprd_update_blackout_seconds_count{", f);
		label(f, "strategy", m->s[i].name);
		fprintf(f, "} %" PRIu64 "\n", cum);
	}
	head(f, "cprd_event_subscribers_dropped_total", "counter",
	     "Event subscribers dropped because they did not read.");
	fprintf(f, "cprd_event_subscribers_dropped_total %" PRIu64 "\n", m->subscribers_dropped);
}

int metrics_text(struct daemon *d, char **ret, size_t *ret_len)
{
	char *buf = NULL;
	size_t len = 0;
	FILE *f;

	if (!d->metrics)
		return -ENODATA;
	f = open_memstream(&buf, &len);
	if (!f)
		return -ENOMEM;
	gauges(d, f);
	counters(d->metrics, f);
	if (fclose(f) != 0) {
		free(buf);
		return -ENOMEM;
	}
	*ret = buf;
	*ret_len = len;
	return 0;
}

void metrics_method(struct daemon *d, struct call *c, json_object *params)
{
	_cleanup_free_ char *text = NULL;
	json_object *o;
	size_t len;
	int r;

	if (params && json_object_object_length(params) > 0) {
		call_fail(c, JSONRPC_INVALID_PARAMS, "daemon.metrics takes no parameters");
		return;
	}
	r = metrics_text(d, &text, &len);
	if (r < 0) {
		call_fail(c, JSONRPC_ERR_RESOURCE, "cannot produce the metrics: %s", strerror(-r));
		return;
	}
	o = json_object_new_object();
	json_object_object_add(o, "content_type",
			       json_object_new_string("text/plain; version=0.0.4"));
	json_object_object_add(o, "text", json_object_new_string_len(text, (int)len));
	call_reply(c, o);
}

/* ---- files ---- */

/* Replace path by data through tmp, a fresh file in the same directory:
 * a reader sees the old file or the new one, never a part. Whatever sits
 * at tmp (a leftover, or a symlink planted there) is removed first, and
 * O_EXCL|O_NOFOLLOW refuse one planted again in between. */
static int replace_file(const char *path, const char *tmp, const char *data, size_t len,
			mode_t mode)
{
	_cleanup_close_ int fd = -EBADF;
	size_t done = 0;

	if (unlink(tmp) < 0 && errno != ENOENT)
		return -errno;
	fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode);
	if (fd < 0)
		return -errno;
	if (fchmod(fd, mode) < 0) /* whatever the umask: node_exporter reads it */
		goto fail;
	while (done < len) {
		ssize_t n = write(fd, data + done, len - done);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			if (n == 0)
				errno = EIO;
			goto fail;
		}
		done += (size_t)n;
	}
	if (close(TAKE_FD(fd)) < 0 || rename(tmp, path) < 0)
		goto fail;
	return 0;
fail : {
	int e = -errno;

	unlink(tmp);
	return e;
}
}

static json_object *state_to_json(const struct metrics *m)
{
	json_object *o = json_object_new_object(), *strategies = json_object_new_object();

	json_object_object_add(o, "version", json_object_new_int(METRICS_STATE_VERSION));
	json_object_object_add(o, "since_usec", json_object_new_int64((int64_t)m->since_usec));
	json_object_object_add(o, "created", json_object_new_int64((int64_t)m->created));
	for (size_t i = 0; i < N_REASONS; i++)
		json_object_object_add(o, destroy_reasons[i],
				       json_object_new_int64((int64_t)m->destroyed[i]));
	json_object_object_add(o, "crashed", json_object_new_int64((int64_t)m->crashed));
	json_object_object_add(o, "subscribers_dropped",
			       json_object_new_int64((int64_t)m->subscribers_dropped));
	for (size_t i = 0; i < m->n; i++) {
		json_object *s = json_object_new_object(), *b = json_object_new_array();

		for (size_t r = 0; r < N_RESULTS; r++)
			json_object_object_add(s, results[r],
					       json_object_new_int64((int64_t)m->s[i].results[r]));
		for (size_t k = 0; k < N_BUCKETS; k++)
			json_object_array_add(b,
					      json_object_new_int64((int64_t)m->s[i].buckets[k]));
		json_object_object_add(s, "blackout_buckets", b);
		json_object_object_add(s, "blackout_sum",
				       json_object_new_double(m->s[i].blackout_sum));
		json_object_object_add(strategies, m->s[i].name, s);
	}
	json_object_object_add(o, "strategies", strategies);
	return o;
}

static void write_state(struct metrics *m)
{
	_cleanup_json_ json_object *o = state_to_json(m);
	size_t len = 0;
	const char *s = json_object_to_json_string_length(o, JSON_C_TO_STRING_PLAIN, &len);
	int r = s ? replace_file(m->state_path, m->state_tmp, s, len, 0600) : -ENOMEM;

	if (r < 0 && r != m->state_error)
		log_warning("cannot keep the metrics' counters in %s: %s; a restarted cprd "
			    "would count from what was kept before",
			    m->state_path, strerror(-r));
	m->state_error = r;
	m->state_dirty = false; /* on failure too: the next count tries again */
}

/* A counter in the kept state: absent is 0, anything but a non-negative
 * integer makes the whole file unusable. */
static bool get_count(json_object *o, const char *key, uint64_t *ret)
{
	json_object *v;

	if (!json_object_object_get_ex(o, key, &v)) {
		*ret = 0;
		return true;
	}
	if (!json_object_is_type(v, json_type_int) || json_object_get_int64(v) < 0)
		return false;
	*ret = (uint64_t)json_object_get_int64(v);
	return true;
}

static bool strategy_from_json(struct metrics *m, const char *name, json_object *o)
{
	struct strategy_counts *s = strategy_counts(m, name);
	json_object *b, *sum;

	if (!s || !json_object_is_type(o, json_type_object))
		return false;
	for (size_t r = 0; r < N_RESULTS; r++)
		if (!get_count(o, results[r], &s->results[r]))
			return false;
	if (!json_object_object_get_ex(o, "blackout_buckets", &b) ||
	    !json_object_is_type(b, json_type_array) || json_object_array_length(b) != N_BUCKETS)
		return false;
	for (size_t k = 0; k < N_BUCKETS; k++) {
		json_object *v = json_object_array_get_idx(b, k);

		if (!json_object_is_type(v, json_type_int) || json_object_get_int64(v) < 0)
			return false;
		s->buckets[k] = (uint64_t)json_object_get_int64(v);
	}
	if (!json_object_object_get_ex(o, "blackout_sum", &sum) ||
	    !(json_object_is_type(sum, json_type_double) ||
	      json_object_is_type(sum, json_type_int)))
		return false;
	s->blackout_sum = json_object_get_double(sum);
	return true;
}

static int state_from_json(struct metrics *m, json_object *o)
{
	json_object *v, *strategies;
	uint64_t since;

	if (!json_object_is_type(o, json_type_object) ||
	    !json_object_object_get_ex(o, "version", &v) ||
	    json_object_get_int(v) != METRICS_STATE_VERSION ||
	    !get_count(o, "since_usec", &since) || !get_count(o, "created", &m->created) ||
	    !get_count(o, "crashed", &m->crashed) ||
	    !get_count(o, "subscribers_dropped", &m->subscribers_dropped) ||
	    !json_object_object_get_ex(o, "strategies", &strategies) ||
	    !json_object_is_type(strategies, json_type_object))
		return -EBADMSG;
	for (size_t i = 0; i < N_REASONS; i++)
		if (!get_count(o, destroy_reasons[i], &m->destroyed[i]))
			return -EBADMSG;
	json_object_object_foreach(strategies, name, s)
	{
		if (!strategy_from_json(m, name, s))
			return -EBADMSG;
	}
	if (since > 0)
		m->since_usec = since;
	return 0;
}

/* The counters a previous cprd kept in this state directory, if any. A
 * file that cannot be used is set aside with a warning: counting from zero
 * is what Prometheus expects of a restart anyway. */
static void load_state(struct metrics *m)
{
	_cleanup_close_ int fd = open(m->state_path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
	_cleanup_free_ char *buf = NULL;
	_cleanup_json_ json_object *o = NULL;
	struct metrics fresh = *m;
	ssize_t n;

	if (fd < 0) {
		if (errno != ENOENT)
			log_warning("cannot read the kept metrics counters %s: %m; counting from 0",
				    m->state_path);
		return;
	}
	n = read_at_most(fd, 0, METRICS_STATE_MAX, &buf);
	if (n >= 0)
		o = json_tokener_parse(buf);
	if (n < 0 || n == METRICS_STATE_MAX || !o || state_from_json(m, o) < 0) {
		log_warning("the kept metrics counters %s cannot be used; counting from 0",
			    m->state_path);
		*m = fresh;
		m->state_dirty = true;
	}
}

static bool in_blackout(struct daemon *d)
{
	for (struct vm *vm = d->vms; vm; vm = vm->next)
		if (vm_op_is(vm, "update") && vm->state == VM_PAUSED)
			return true;
	return false;
}

static void write_file(struct daemon *d)
{
	struct metrics *m = d->metrics;
	_cleanup_free_ char *text = NULL;
	size_t len;
	int r = metrics_text(d, &text, &len);

	if (r >= 0)
		r = replace_file(m->file, m->file_tmp, text, len, 0644);
	m->last_write = now_usec(CLOCK_MONOTONIC);
	m->file_dirty = false; /* on failure too: the next change tries again */
	if (r < 0 && r != m->file_error)
		log_warning("cannot write the metrics file %s: %s", m->file, strerror(-r));
	else if (r == 0 && m->file_error)
		log_notice("metrics file %s written again", m->file);
	m->file_error = r;
}

static void timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
	/* Only wakes the loop: metrics_flush() writes before it waits again. */
}

void metrics_flush(struct daemon *d)
{
	struct metrics *m = d->metrics;
	uint64_t now, due;

	if (!m)
		return;
	if (d->status_stale) /* fds held, VMs come or gone */
		m->file_dirty = true;
	if (m->state_dirty)
		write_state(m);
	/* Not inside an update's blackout: its end (RESUME) is a change too. */
	if (!m->file || !m->file_dirty || ev_is_active(&m->timer) || in_blackout(d))
		return;
	now = now_usec(CLOCK_MONOTONIC);
	due = m->last_write + (uint64_t)(m->interval * 1e6);
	if (m->last_write && now < due) {
		ev_timer_set(&m->timer, (double)(due - now) / 1e6, 0.);
		ev_timer_start(d->loop, &m->timer);
		return;
	}
	write_file(d);
}

static int file_paths(struct metrics *m, const char *file)
{
	const char *slash = strrchr(file, '/');

	if (file[0] != '/' || !slash[1])
		return -EINVAL;
	m->file = strdup(file);
	if (!m->file ||
	    asprintf(&m->file_tmp, "%.*s.%s.tmp", (int)(slash - file + 1), file, slash + 1) < 0) {
		m->file_tmp = NULL;
		return -ENOMEM;
	}
	return 0;
}

int metrics_start(struct daemon *d, const char *file, double interval)
{
	struct metrics *m = calloc(1, sizeof(*m));
	const struct strategy *s;
	int r;

	if (!m)
		return -ENOMEM;
	d->metrics = m;
	m->since_usec = now_usec(CLOCK_REALTIME);
	m->interval = interval;
	m->file_dirty = true;
	ev_init(&m->timer, timer_cb);
	/* Every strategy from the start: a series that appears only on its
	 * first update hides that first increase from rate(). */
	for (size_t i = 0; (s = strategy_nth(i)); i++)
		strategy_counts(m, s->name);
	if (asprintf(&m->state_path, "%s/metrics.json", d->state_dir) < 0 ||
	    asprintf(&m->state_tmp, "%s/.metrics.json.tmp", d->state_dir) < 0) {
		m->state_path = m->state_tmp = NULL;
		return -ENOMEM;
	}
	if (file && (r = file_paths(m, file)) < 0)
		return r;
	load_state(m);
	return 0;
}

void metrics_free(struct daemon *d)
{
	struct metrics *m = d->metrics;

	if (!m)
		return;
	ev_timer_stop(d->loop, &m->timer);
	free(m->state_path);
	free(m->state_tmp);
	free(m->file);
	free(m->file_tmp);
	free(m);
	d->metrics = NULL;
}
