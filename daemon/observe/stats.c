/* SPDX-License-Identifier: MIT */
#include <stdio.h>
#include <string.h>

#include "daemon/core/server.h"
#include "daemon/observe/stats.h"

/* Log-linear buckets: exact below 16 us, then SUB per power of two. */
#define SUB 8
#define NBUCKETS (2 * SUB + (64 - 4) * SUB)
#define MAX_METHODS 32

struct histogram {
	uint64_t count, max, sum;
	uint32_t buckets[NBUCKETS];
};

/* Wall-clock time, and the CPU time cprd's thread got meanwhile: on a
 * loaded host the first also counts the time cprd waited for a CPU. */
struct timing {
	struct histogram wall, cpu;
};

struct stats {
	ev_check check;     /* the poll returned: the loop is busy from here */
	ev_prepare prepare; /* about to poll: the loop was busy until here */
	uint64_t woke_usec; /* 0 until the first poll returns */
	uint64_t woke_cpu_usec;
	uint64_t since_usec;
	struct timing busy, requests;
	struct {
		const struct method *m;
		struct timing t;
	} methods[MAX_METHODS];
};

static unsigned bucket_of(uint64_t v)
{
	unsigned e;

	if (v < 2 * SUB)
		return (unsigned)v;
	e = 63u - (unsigned)__builtin_clzll(v); /* >= 4 */
	return 2 * SUB + (e - 4) * SUB + (unsigned)((v >> (e - 3)) & (SUB - 1));
}

/* The largest value that falls into bucket i. */
static uint64_t bucket_top(unsigned i)
{
	unsigned e, m;

	if (i < 2 * SUB)
		return i;
	e = 4 + (i - 2 * SUB) / SUB;
	m = (i - 2 * SUB) % SUB;
	return ((uint64_t)(SUB + m + 1) << (e - 3)) - 1;
}

static void record(struct histogram *h, uint64_t v)
{
	h->count++;
	h->sum += v;
	if (v > h->max)
		h->max = v;
	h->buckets[bucket_of(v)]++;
}

static uint64_t percentile(const struct histogram *h, double p)
{
	uint64_t want = (uint64_t)((double)h->count * p + 0.999999), seen = 0;

	if (h->count == 0)
		return 0;
	for (unsigned i = 0; i < NBUCKETS; i++) {
		seen += h->buckets[i];
		if (seen >= want)
			return MIN(bucket_top(i), h->max);
	}
	return h->max;
}

static void check_cb(struct ev_loop *loop, ev_check *w, int revents)
{
	struct stats *s = w->data;

	s->woke_usec = now_usec(CLOCK_MONOTONIC);
	s->woke_cpu_usec = now_usec(CLOCK_THREAD_CPUTIME_ID);
}

static void prepare_cb(struct ev_loop *loop, ev_prepare *w, int revents)
{
	struct stats *s = w->data;

	if (!s->woke_usec)
		return;
	record(&s->busy.wall, now_usec(CLOCK_MONOTONIC) - s->woke_usec);
	record(&s->busy.cpu, now_usec(CLOCK_THREAD_CPUTIME_ID) - s->woke_cpu_usec);
}

int stats_start(struct daemon *d)
{
	struct stats *s = calloc(1, sizeof(*s));

	if (!s)
		return -ENOMEM;
	s->since_usec = now_usec(CLOCK_MONOTONIC);
	/* Pending callbacks of one priority run newest first, and check
	 * watchers are queued after everything the poll found: the highest
	 * priority makes this one run first after the poll, the lowest makes
	 * the prepare watcher run after anything still pending before it. */
	ev_check_init(&s->check, check_cb);
	ev_set_priority(&s->check, EV_MAXPRI);
	ev_prepare_init(&s->prepare, prepare_cb);
	ev_set_priority(&s->prepare, EV_MINPRI);
	s->check.data = s->prepare.data = s;
	ev_check_start(d->loop, &s->check);
	ev_prepare_start(d->loop, &s->prepare);
	/* Neither keeps the loop running on its own. */
	ev_unref(d->loop);
	ev_unref(d->loop);
	d->stats = s;
	return 0;
}

void stats_free(struct daemon *d)
{
	struct stats *s = d->stats;

	if (!s)
		return;
	ev_ref(d->loop);
	ev_ref(d->loop);
	ev_check_stop(d->loop, &s->check);
	ev_prepare_stop(d->loop, &s->prepare);
	free(s);
	d->stats = NULL;
}

void stats_mark(struct stats_mark *t)
{
	t->wall = now_usec(CLOCK_MONOTONIC);
	t->cpu = now_usec(CLOCK_THREAD_CPUTIME_ID);
}

void stats_request(struct daemon *d, const struct method *m, const struct stats_mark *t0)
{
	struct stats *s = d->stats;
	uint64_t wall, cpu;

	if (!s)
		return;
	wall = now_usec(CLOCK_MONOTONIC) - t0->wall;
	cpu = now_usec(CLOCK_THREAD_CPUTIME_ID) - t0->cpu;
	record(&s->requests.wall, wall);
	record(&s->requests.cpu, cpu);
	for (size_t i = 0; i < MAX_METHODS; i++) {
		if (!s->methods[i].m)
			s->methods[i].m = m;
		if (s->methods[i].m == m) {
			record(&s->methods[i].t.wall, wall);
			record(&s->methods[i].t.cpu, cpu);
			return;
		}
	}
}

static void add_int(json_object *o, const char *k, uint64_t v)
{
	json_object_object_add(o, k, json_object_new_int64((int64_t)v));
}

/* name_max_us, name_p50_us, name_p99_us, then the same for CPU time
 * (name_cpu_...); count and sum under their own names when asked. */
static void add_timing(json_object *o, const char *name, const struct timing *t)
{
	const struct histogram *hs[2] = { &t->wall, &t->cpu };
	char k[64];

	for (size_t i = 0; i < 2; i++) {
		const char *sfx = i ? "_cpu" : "";

		snprintf(k, sizeof(k), "%s%s_max_us", name, sfx);
		add_int(o, k, hs[i]->max);
		snprintf(k, sizeof(k), "%s%s_p50_us", name, sfx);
		add_int(o, k, percentile(hs[i], 0.50));
		snprintf(k, sizeof(k), "%s%s_p99_us", name, sfx);
		add_int(o, k, percentile(hs[i], 0.99));
		snprintf(k, sizeof(k), "%s%s_total_us", name, sfx);
		add_int(o, k, hs[i]->sum);
	}
}

json_object *stats_to_json(struct daemon *d)
{
	struct stats *s = d->stats;
	json_object *o = json_object_new_object(), *per;

	if (!s)
		return o;
	add_int(o, "window_us", now_usec(CLOCK_MONOTONIC) - s->since_usec);
	add_int(o, "iterations", s->busy.wall.count);
	add_timing(o, "busy", &s->busy);
	add_int(o, "requests", s->requests.wall.count);
	add_timing(o, "request", &s->requests);
	per = json_object_new_object();
	for (size_t i = 0; i < MAX_METHODS && s->methods[i].m; i++) {
		json_object *m = json_object_new_object();

		add_int(m, "count", s->methods[i].t.wall.count);
		add_timing(m, "request", &s->methods[i].t);
		json_object_object_add(per, s->methods[i].m->name, m);
	}
	json_object_object_add(o, "methods", per);
	return o;
}

void stats_reset(struct daemon *d)
{
	struct stats *s = d->stats;

	if (!s)
		return;
	memset(&s->busy, 0, sizeof(s->busy));
	memset(&s->requests, 0, sizeof(s->requests));
	memset(s->methods, 0, sizeof(s->methods));
	s->since_usec = now_usec(CLOCK_MONOTONIC);
}
