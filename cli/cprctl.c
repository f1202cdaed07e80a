/* SPDX-License-Identifier: MIT */
/*
 * cprctl: the command line for cprd. Thin on purpose: each verb builds the
 * params of one JSON-RPC call, makes it through proto/'s client and prints
 * the result as a table (or as JSON with --json).
 */
#include <getopt.h>
#include <pthread.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "common/json.h"
#include "proto/client.h"
#include "proto/jsonrpc.h"

#define DEFAULT_SOCKET "/run/cprd/cprd.sock"

enum { EXIT_OK = 0, EXIT_FAILED = 1, EXIT_USAGE = 2, EXIT_NOCONN = 3 };

static const char *arg_socket;
static bool arg_json;
static int arg_timeout_ms = -1;

static const struct option common_opts[] = {
	{ "json", no_argument, NULL, 'j' },
	{ "socket", required_argument, NULL, 'S' },
	{ "help", no_argument, NULL, 'h' },
};

static void usage(FILE *f)
{
	fprintf(
	    f,
	    "Usage: cprctl [--socket PATH] [--json] VERB [ARGS...]\n\n"
	    "Verbs:\n"
	    "  create NAME --memory SIZE --kernel PATH [--initrd PATH] [--append STR]\n"
	    "         [--vcpus N] [--vmm PATH] [--tap IFNAME] [--machine TYPE]\n"
	    "                      define and start a VM; returns when the guest runs\n"
	    "  list                all VMs\n"
	    "  status [NAME]       one VM; without NAME, cprd itself\n"
	    "  fds NAME            the fds cprd holds for a VM\n"
	    "  destroy NAME        stop the VM's VMM and release everything held for it\n"
	    "  update NAME [--vmm PATH] [--strategy NAME] [--timeout SECONDS]\n"
	    "                      replace the VM's VMM under the running guest (strategies:\n"
	    "                      handover, the default; `cprctl status` lists cprd's)\n"
	    "  update --all [--parallel N] [--vmm PATH] ...\n"
	    "                      update every running VM, N at a time\n"
	    "  history NAME        the VM's updates, newest first\n"
	    "  daemon status       cprd's version, uptime, how it started, custody\n"
	    "  daemon stats [--reset]\n"
	    "                      cprd's own time: event-loop turns and requests handled\n"
	    "  daemon reexec [--binary PATH]\n"
	    "                      cprd re-executes itself (or a new binary), keeping every VM\n"
	    "  metrics             cprd's metrics, in Prometheus' text format\n"
	    "  events              follow cprd's events, one line each (--json: NDJSON)\n\n"
	    "The socket is --socket, else $CPRD_SOCKET, else %s.\n"
	    "Exit status: 0 success, 1 the operation failed, 2 usage error, 3 cprd unreachable.\n",
	    DEFAULT_SOCKET);
}

/* Parse options; the common ones (--json, --socket) are allowed anywhere.
 * extra/nextra describe a verb's own and handle() takes them. For a verb,
 * getopt permutes so that "status NAME --json" works; for the command line
 * before the verb it stops at the verb. Returns the index of the first
 * operand. */
static int parse_opts(int argc, char **argv, bool verb, const struct option *extra, size_t nextra,
		      int (*handle)(int opt, const char *arg, void *ud), void *ud)
{
	struct option opts[32];
	size_t n = 0;
	int c;

	for (size_t i = 0; i < nextra && n < ELEMENTSOF(opts) - 4; i++)
		opts[n++] = extra[i];
	for (size_t i = 0; i < ELEMENTSOF(common_opts); i++)
		opts[n++] = common_opts[i];
	opts[n] = (struct option){};
	optind = 0; /* full re-initialisation: each verb parses its own argv */
	while ((c = getopt_long(argc, argv, verb ? "" : "+", opts, NULL)) >= 0) {
		switch (c) {
		case 'j':
			arg_json = true;
			break;
		case 'S':
			arg_socket = optarg;
			break;
		case 'h':
			usage(stdout);
			exit(EXIT_OK);
		case '?':
			return -EINVAL;
		default:
			if (!handle || handle(c, optarg, ud) < 0)
				return -EINVAL;
		}
	}
	return optind;
}

/* ---- calling cprd ---- */

static void print_json(json_object *o)
{
	puts(json_object_to_json_string_ext(o, JSON_C_TO_STRING_PRETTY | JSON_C_TO_STRING_SPACED |
						   JSON_C_TO_STRING_NOSLASHESCAPE));
}

static const char *socket_path(void)
{
	const char *path = arg_socket ? arg_socket : getenv("CPRD_SOCKET");

	return path && *path ? path : DEFAULT_SOCKET;
}

static int connect_or_say(proto_client **ret)
{
	int r = proto_client_connect(socket_path(), ret);

	if (r < 0)
		fprintf(stderr, "cprctl: cannot reach cprd at %s: %s%s\n", socket_path(),
			strerror(-r),
			r == -ENOENT || r == -ECONNREFUSED ? " (is cprd running?)" : "");
	return r;
}

/* Make one call. On failure prints the reason and returns the exit status
 * to use; on success returns 0 with *ret_result. */
static int call(const char *method, json_object *params, json_object **ret_result)
{
	_cleanup_json_ json_object *error = NULL;
	proto_client *c = NULL;
	int r;

	if (connect_or_say(&c) < 0) {
		json_object_put(params);
		return EXIT_NOCONN;
	}
	r = proto_client_call(c, method, params, NULL, 0, arg_timeout_ms, ret_result, &error, NULL,
			      NULL);
	proto_client_free(c);
	if (r == -EREMOTEIO) {
		json_object *m = json_object_object_get(error, "message");

		if (arg_json)
			print_json(error);
		fprintf(stderr, "cprctl: %s\n", m ? json_object_get_string(m) : "unknown error");
		return EXIT_FAILED;
	}
	if (r < 0) {
		fprintf(stderr, "cprctl: %s failed: %s\n", method, strerror(-r));
		return EXIT_FAILED;
	}
	return EXIT_OK;
}

/* ---- output helpers ---- */

static const char *str(json_object *o, const char *key)
{
	json_object *v = json_object_object_get(o, key);

	return v ? json_object_get_string(v) : "-";
}

static void human_size(uint64_t b, char *buf, size_t n)
{
	if (b >= (1ULL << 30) && b % (1ULL << 30) == 0)
		snprintf(buf, n, "%" PRIu64 "G", b >> 30);
	else if (b >= (1ULL << 20))
		snprintf(buf, n, "%" PRIu64 "M", b >> 20);
	else if (b >= 1024)
		snprintf(buf, n, "%" PRIu64 "K", b >> 10);
	else
		snprintf(buf, n, "%" PRIu64, b);
}

static void human_uptime(int64_t since_usec, char *buf, size_t n)
{
	struct timespec now;
	int64_t s;

	clock_gettime(CLOCK_REALTIME, &now);
	s = now.tv_sec - since_usec / 1000000;
	if (s < 0)
		s = 0;
	if (s >= 86400)
		snprintf(buf, n, "%" PRId64 "d%" PRId64 "h", s / 86400, s % 86400 / 3600);
	else if (s >= 3600)
		snprintf(buf, n, "%" PRId64 "h%02" PRId64 "m", s / 3600, s % 3600 / 60);
	else
		snprintf(buf, n, "%" PRId64 "m%02" PRId64 "s", s / 60, s % 60);
}

/* ---- verbs ---- */

struct create_args {
	json_object *p;
};

static int add_path(json_object *p, const char *key, const char *path)
{
	char buf[PATH_MAX];

	/* The daemon resolves nothing relative to our cwd: send absolute paths,
	 * and let it report a missing file in its own words. */
	if (!realpath(path, buf)) {
		if (path[0] == '/' || !getcwd(buf, sizeof(buf)) ||
		    strlen(buf) + strlen(path) + 2 > sizeof(buf))
			snprintf(buf, sizeof(buf), "%s", path);
		else
			strcat(strcat(buf, "/"), path);
	}
	json_object_object_add(p, key, json_object_new_string(buf));
	return 0;
}

static int create_opt(int opt, const char *arg, void *ud)
{
	json_object *p = ((struct create_args *)ud)->p;
	char *end;
	long v;

	switch (opt) {
	case 'm':
		json_object_object_add(p, "memory", json_object_new_string(arg));
		return 0;
	case 'c':
		v = strtol(arg, &end, 10);
		if (*end || v < 1 || v > INT_MAX) {
			fprintf(stderr, "cprctl: --vcpus needs a positive number\n");
			return -EINVAL;
		}
		json_object_object_add(p, "vcpus", json_object_new_int((int)v));
		return 0;
	case 'k':
		return add_path(p, "kernel", arg);
	case 'i':
		return add_path(p, "initrd", arg);
	case 'a':
		json_object_object_add(p, "append", json_object_new_string(arg));
		return 0;
	case 'v':
		if (strchr(arg, '/'))
			return add_path(p, "vmm", arg);
		json_object_object_add(p, "vmm", json_object_new_string(arg));
		return 0;
	case 't':
		json_object_object_add(p, "tap", json_object_new_string(arg));
		return 0;
	case 'M':
		json_object_object_add(p, "machine", json_object_new_string(arg));
		return 0;
	}
	return -EINVAL;
}

static void print_status(json_object *vm)
{
	static const char *const keys[] = { "name",        "state",   "pid",      "vmm",
					    "vmm_version", "machine", "accel",    "vcpus",
					    "kernel",      "initrd",  "append",   "tap",
					    "console_log", "vmm_log", "fds_held", "exit" };
	char mem[32];

	for (size_t i = 0; i < ELEMENTSOF(keys); i++) {
		json_object *v = json_object_object_get(vm, keys[i]);

		if (!v)
			continue;
		printf("%-12s %s\n", keys[i], json_object_get_string(v));
		if (streq(keys[i], "pid")) {
			human_size((uint64_t)json_object_get_int64(
				       json_object_object_get(vm, "memory_bytes")),
				   mem, sizeof(mem));
			printf("%-12s %s\n", "memory", mem);
		}
	}
}

static int verb_create(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "memory", required_argument, NULL, 'm' },
		{ "vcpus", required_argument, NULL, 'c' },
		{ "kernel", required_argument, NULL, 'k' },
		{ "initrd", required_argument, NULL, 'i' },
		{ "append", required_argument, NULL, 'a' },
		{ "vmm", required_argument, NULL, 'v' },
		{ "tap", required_argument, NULL, 't' },
		{ "machine", required_argument, NULL, 'M' },
	};
	struct create_args a = { .p = json_object_new_object() };
	_cleanup_json_ json_object *res = NULL;
	int i, r;

	i = parse_opts(argc, argv, true, opts, ELEMENTSOF(opts), create_opt, &a);
	if (i < 0 || i + 1 != argc) {
		json_object_put(a.p);
		fprintf(stderr,
			"Usage: cprctl create NAME --memory SIZE --kernel PATH [options]\n");
		return EXIT_USAGE;
	}
	json_object_object_add(a.p, "name", json_object_new_string(argv[i]));
	r = call("vm.create", a.p, &res);
	if (r != EXIT_OK)
		return r;
	if (arg_json)
		print_json(res);
	else
		printf("VM %s is %s (pid %s); console: %s\n", str(res, "name"), str(res, "state"),
		       str(res, "pid"), str(res, "console_log"));
	return EXIT_OK;
}

static int flag_opt(int opt, const char *arg, void *ud)
{
	*(bool *)ud = true;
	return 0;
}

static int verb_list(int argc, char **argv)
{
	static const struct option opts[] = { { "outdated", no_argument, NULL, 'o' } };
	_cleanup_json_ json_object *res = NULL;
	json_object *vms, *params = NULL;
	bool outdated = false;
	int r;

	if (parse_opts(argc, argv, true, opts, ELEMENTSOF(opts), flag_opt, &outdated) != argc) {
		fprintf(stderr, "Usage: cprctl list [--outdated]\n");
		return EXIT_USAGE;
	}
	if (outdated) {
		params = json_object_new_object();
		json_object_object_add(params, "outdated", json_object_new_boolean(true));
	}
	r = call("vm.list", params, &res);
	if (r != EXIT_OK)
		return r;
	if (arg_json) {
		print_json(res);
		return EXIT_OK;
	}
	vms = json_object_object_get(res, "vms");
	printf("%-20s %-9s %8s %7s %5s %-8s %-9s %s\n", "NAME", "STATE", "PID", "MEMORY", "VCPUS",
	       "UPTIME", "QEMU", "VMM");
	for (size_t i = 0; i < json_object_array_length(vms); i++) {
		json_object *vm = json_object_array_get_idx(vms, i);
		char mem[32], up[32];

		human_size(
		    (uint64_t)json_object_get_int64(json_object_object_get(vm, "memory_bytes")),
		    mem, sizeof(mem));
		human_uptime(json_object_get_int64(json_object_object_get(vm, "created_usec")), up,
			     sizeof(up));
		printf("%-20s %-9s %8s %7s %5s %-8s %-9s %s\n", str(vm, "name"), str(vm, "state"),
		       json_object_object_get(vm, "pid") ? str(vm, "pid") : "-", mem,
		       str(vm, "vcpus"), up,
		       json_object_object_get(vm, "vmm_version") ? str(vm, "vmm_version") : "-",
		       str(vm, "vmm"));
	}
	if (json_object_array_length(vms) == 0)
		printf(outdated ? "(no VM runs an outdated VMM)\n" : "(no VMs)\n");
	return EXIT_OK;
}

/* Verbs of the form "VERB NAME" that print the result one way or another. */
static int name_verb(int argc, char **argv, const char *method, const char *key,
		     void (*print)(json_object *res))
{
	_cleanup_json_ json_object *res = NULL;
	json_object *p;
	int i, r;

	i = parse_opts(argc, argv, true, NULL, 0, NULL, NULL);
	if (i < 0 || i + 1 != argc) {
		fprintf(stderr, "Usage: cprctl %s NAME\n", argv[0]);
		return EXIT_USAGE;
	}
	p = json_object_new_object();
	json_object_object_add(p, key, json_object_new_string(argv[i]));
	r = call(method, p, &res);
	if (r != EXIT_OK)
		return r;
	if (arg_json)
		print_json(res);
	else
		print(res);
	return EXIT_OK;
}

static void print_fds(json_object *res)
{
	json_object *fds = json_object_object_get(res, "fds");

	printf("%-16s %-7s %10s %5s\n", "NAME", "KIND", "SIZE", "FD");
	for (size_t i = 0; i < json_object_array_length(fds); i++) {
		json_object *f = json_object_array_get_idx(fds, i);
		char sz[32];

		human_size((uint64_t)json_object_get_int64(json_object_object_get(f, "size")), sz,
			   sizeof(sz));
		printf("%-16s %-7s %10s %5s\n", str(f, "name"), str(f, "kind"), sz, str(f, "fd"));
	}
}

static void print_destroyed(json_object *res)
{
	printf("VM %s destroyed; everything held for it was released\n", str(res, "name"));
	if (json_object_object_get(res, "registry_error"))
		fprintf(stderr,
			"cprctl: warning: cprd could not record this in its registry (%s); a cprd "
			"restarted before it can may list the VM as crashed\n",
			str(res, "registry_error"));
}

/* Ask cprd to re-execute itself, then wait until the new image answers. */
static int daemon_reexec(json_object *params)
{
	_cleanup_json_ json_object *res = NULL, *st = NULL;
	int64_t before;
	int r;

	r = call("daemon.status", NULL, &st);
	if (r != EXIT_OK) {
		json_object_put(params);
		return r;
	}
	before = json_object_get_int64(json_object_object_get(st, "started_usec"));
	r = call("daemon.reexec", params, &res);
	if (r != EXIT_OK)
		return r;
	for (int i = 0; i < 200; i++) {
		proto_client *c = NULL;
		json_object *now = NULL;

		if (proto_client_connect(socket_path(), &c) == 0 &&
		    proto_client_call(c, "daemon.status", NULL, NULL, 0, 2000, &now, NULL, NULL,
				      NULL) == 0 &&
		    json_object_get_int64(json_object_object_get(now, "started_usec")) != before) {
			proto_client_free(c);
			json_object_put(st);
			st = now;
			if (arg_json)
				print_json(st);
			else
				printf("cprd re-executed (pid %s, %s VM(s), %s fds held)\n",
				       str(st, "pid"), str(st, "vms"), str(st, "fds_held"));
			return EXIT_OK;
		}
		json_object_put(now);
		proto_client_free(c);
		struct timespec ts = { 0, 50 * 1000 * 1000 };
		nanosleep(&ts, NULL);
	}
	fprintf(stderr, "cprctl: cprd did not come back within 10 s of re-executing\n");
	return EXIT_FAILED;
}

static int daemon_opt(int opt, const char *arg, void *ud)
{
	if (opt == 'r')
		return json_object_object_add(ud, "reset", json_object_new_boolean(1));
	return add_path(ud, "binary", arg);
}

/* One line: "busy p50 29 us, p99 93 us, max 120 us (CPU: ...)". */
static void print_timing(const char *label, json_object *o, const char *name)
{
	char k[64];

	printf("%-16s", label);
	for (int cpu = 0; cpu < 2; cpu++) {
		const char *sfx = cpu ? "_cpu" : "";

		printf(cpu ? " (CPU:" : "");
		snprintf(k, sizeof(k), "%s%s_p50_us", name, sfx);
		printf(" p50 %s us,", str(o, k));
		snprintf(k, sizeof(k), "%s%s_p99_us", name, sfx);
		printf(" p99 %s us,", str(o, k));
		snprintf(k, sizeof(k), "%s%s_max_us", name, sfx);
		printf(" max %s us%s", str(o, k), cpu ? ")" : "");
	}
	printf("\n");
}

static void print_loop(json_object *loop)
{
	json_object *per = json_object_object_get(loop, "methods");

	printf("%-16s %s turns, %s requests in %.1f s\n", "loop", str(loop, "iterations"),
	       str(loop, "requests"),
	       (double)json_object_get_int64(json_object_object_get(loop, "window_us")) / 1e6);
	print_timing("  busy", loop, "busy");
	print_timing("  requests", loop, "request");
	json_object_object_foreach(per, name, m)
	{
		char label[64];

		snprintf(label, sizeof(label), "  %s (%s)", name, str(m, "count"));
		print_timing(label, m, "request");
	}
}

static int verb_daemon(int argc, char **argv)
{
	static const struct option opts[] = { { "binary", required_argument, NULL, 'b' },
					      { "reset", no_argument, NULL, 'r' } };
	_cleanup_json_ json_object *res = NULL;
	json_object *params = json_object_new_object();
	const char *what;
	int i, r;

	i = parse_opts(argc, argv, true, opts, ELEMENTSOF(opts), daemon_opt, params);
	what = i >= 0 && i + 1 == argc ? argv[i] : "";
	if (streq(what, "reexec") && !json_object_object_get_ex(params, "reset", NULL))
		return daemon_reexec(params);
	if (streq(what, "stats") && !json_object_object_get_ex(params, "binary", NULL)) {
		r = call("daemon.stats", params, &res);
		if (r == EXIT_OK && arg_json)
			print_json(res);
		else if (r == EXIT_OK)
			print_loop(json_object_object_get(res, "loop"));
		return r;
	}
	json_object_put(params);
	if (!streq(what, "status")) {
		fprintf(stderr,
			"Usage: cprctl daemon status\n       cprctl daemon stats [--reset]\n"
			"       cprctl daemon reexec [--binary PATH]\n");
		return EXIT_USAGE;
	}
	r = call("daemon.status", NULL, &res);
	if (r != EXIT_OK)
		return r;
	if (arg_json) {
		print_json(res);
		return EXIT_OK;
	}
	json_object_object_foreach(res, k, v)
	{
		if (streq(k, "loop"))
			print_loop(v);
		else
			printf("%-16s %s\n", k, json_object_get_string(v));
	}
	return EXIT_OK;
}

static int verb_status(int argc, char **argv)
{
	char *daemon_argv[] = { argv[0], (char *)"status", NULL };
	int i = parse_opts(argc, argv, true, NULL, 0, NULL, NULL);

	/* "cprctl status" alone: the daemon's own status. */
	if (i == argc)
		return verb_daemon(2, daemon_argv);
	return name_verb(argc, argv, "vm.status", "name", print_status);
}

static int verb_fds(int argc, char **argv)
{
	return name_verb(argc, argv, "vm.fds", "name", print_fds);
}

static int verb_destroy(int argc, char **argv)
{
	return name_verb(argc, argv, "vm.destroy", "name", print_destroyed);
}

/* ---- update ---- */

struct update_opts {
	json_object *base; /* vmm, strategy, timeout for every VM */
	bool all;
	bool check;    /* the pre-flight only */
	bool outdated; /* --all: only VMs whose VMM was replaced on disk */
	long parallel;
};

static int update_opt(int opt, const char *arg, void *ud)
{
	struct update_opts *o = ud;
	char *end;
	long v;

	switch (opt) {
	case 'v':
		if (strchr(arg, '/'))
			return add_path(o->base, "vmm", arg);
		json_object_object_add(o->base, "vmm", json_object_new_string(arg));
		return 0;
	case 's':
		json_object_object_add(o->base, "strategy", json_object_new_string(arg));
		return 0;
	case 't':
	case 'p':
		v = strtol(arg, &end, 10);
		if (*end || v < 1 || v > 3600) {
			fprintf(stderr, "cprctl: --%s needs a number from 1 to 3600\n",
				opt == 't' ? "timeout" : "parallel");
			return -EINVAL;
		}
		if (opt == 'p')
			o->parallel = v;
		else
			json_object_object_add(o->base, "timeout", json_object_new_int((int)v));
		return 0;
	case 'a':
		o->all = true;
		return 0;
	case 'c':
		o->check = true;
		return 0;
	case 'o':
		o->outdated = true;
		return 0;
	}
	return -EINVAL;
}

/* One update over its own connection. Returns the report (owned) or NULL
 * with *ret_msg set when there is no report (cprd refused the request). */
static json_object *update_one(const char *name, json_object *base, char *msg, size_t msglen)
{
	_cleanup_json_ json_object *params = json_object_new_object(), *res = NULL, *err = NULL;
	proto_client *c = NULL;
	json_object *data;
	int r;

	json_object_object_foreach(base, k, v)
	    json_object_object_add(params, k, json_object_get(v));
	json_object_object_add(params, "name", json_object_new_string(name));
	r = proto_client_connect(socket_path(), &c);
	if (r < 0) {
		snprintf(msg, msglen, "cannot reach cprd at %s: %s", socket_path(), strerror(-r));
		return NULL;
	}
	r = proto_client_call(c, "vm.update", TAKE_PTR(params), NULL, 0, -1, &res, &err, NULL,
			      NULL);
	proto_client_free(c);
	if (r == 0)
		return TAKE_PTR(res);
	if (r == -EREMOTEIO) {
		/* rolled back or failed: the report rides in the error's data */
		data = json_object_object_get(err, "data");
		if (data && json_object_object_get(data, "result"))
			return json_object_get(data);
		if (data && json_object_object_get(data, "ok")) { /* a pre-flight's facts */
			json_object_object_add(data, "error",
					       json_object_new_string(str(err, "message")));
			return json_object_get(data);
		}
		snprintf(msg, msglen, "%s", str(err, "message"));
		return NULL;
	}
	snprintf(msg, msglen, "vm.update failed: %s", strerror(-r));
	return NULL;
}

static bool report_ok(json_object *rep)
{
	json_object *ok = json_object_object_get(rep, "ok");

	if (ok) /* a pre-flight */
		return json_object_get_boolean(ok);
	return rep && streq(str(rep, "result"), "ok");
}

static void print_check(json_object *rep)
{
	if (report_ok(rep))
		printf("%s: pre-flight of %s for %s passed: QEMU %s (%s), machine %s, %.0f ms\n",
		       str(rep, "vm"), str(rep, "vmm"), str(rep, "strategy"),
		       str(rep, "vmm_version"), str(rep, "vmm_package"), str(rep, "machine"),
		       json_object_get_double(json_object_object_get(rep, "duration_ms")));
	else
		printf("%s: %s\n", str(rep, "vm"), str(rep, "error"));
}

static void print_report(json_object *rep)
{
	json_object *bo = json_object_object_get(rep, "blackout_ms");

	if (json_object_object_get(rep, "ok")) {
		print_check(rep);
		return;
	}
	printf("%s: %s, blackout %s%s, total %.1f ms (pid %s -> %s, QEMU %s -> %s)%s%s\n",
	       str(rep, "vm"), str(rep, "result"), bo ? json_object_get_string(bo) : "unknown",
	       bo ? " ms" : "", json_object_get_double(json_object_object_get(rep, "total_ms")),
	       str(rep, "old_pid"),
	       json_object_object_get(rep, "new_pid") ? str(rep, "new_pid") : "-",
	       str(rep, "old_version"),
	       json_object_object_get(rep, "new_version") ? str(rep, "new_version") : "-",
	       json_object_object_get(rep, "error") ? "; " : "",
	       json_object_object_get(rep, "error") ? str(rep, "error") : "");
}

struct fleet {
	pthread_mutex_t lock;
	json_object *base;
	const char **names;
	json_object **reports;
	size_t n, next, done;
};

static void *fleet_worker(void *p)
{
	struct fleet *f = p;
	char msg[256];

	for (;;) {
		size_t i;
		json_object *rep;

		pthread_mutex_lock(&f->lock);
		i = f->next < f->n ? f->next++ : f->n;
		pthread_mutex_unlock(&f->lock);
		if (i >= f->n)
			return NULL;
		msg[0] = '\0';
		rep = update_one(f->names[i], f->base, msg, sizeof(msg));
		if (!rep) {
			rep = json_object_new_object();
			json_object_object_add(rep, "vm", json_object_new_string(f->names[i]));
			json_object_object_add(rep, "result", json_object_new_string("failed"));
			json_object_object_add(rep, "error", json_object_new_string(msg));
		}
		pthread_mutex_lock(&f->lock);
		f->reports[i] = rep;
		f->done++;
		if (!arg_json) {
			printf("[%zu/%zu] ", f->done, f->n);
			if (json_object_object_get(rep, "total_ms"))
				print_report(rep);
			else
				printf("%s: failed: %s\n", f->names[i], str(rep, "error"));
			fflush(stdout);
		}
		pthread_mutex_unlock(&f->lock);
	}
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

/* Before any VM is touched: one pre-flight per distinct binary and machine
 * type among the VMs to update (on the first VM that has them). Returns
 * whether all passed; their facts go into checks. */
static bool preflight_fleet(json_object *base, json_object *vms, const char **names, size_t n,
			    json_object *checks)
{
	_cleanup_json_ json_object *params = json_object_new_object(),
				   *seen = json_object_new_object();
	bool ok = true;

	json_object_object_foreach(base, k, v)
	    json_object_object_add(params, k, json_object_get(v));
	json_object_object_add(params, "check", json_object_new_boolean(true));
	for (size_t i = 0; i < json_object_array_length(vms); i++) {
		json_object *vm = json_object_array_get_idx(vms, i), *rep;
		const char *bin =
		    json_object_object_get(base, "vmm") ? str(base, "vmm") : str(vm, "vmm");
		_cleanup_free_ char *key = NULL;
		char msg[256] = "";
		bool listed = false;

		for (size_t j = 0; j < n && !listed; j++)
			listed = streq(names[j], str(vm, "name"));
		if (!listed || asprintf(&key, "%s\n%s", bin, str(vm, "machine")) < 0 ||
		    json_object_object_get_ex(seen, key, NULL))
			continue;
		json_object_object_add(seen, key, NULL);
		rep = update_one(str(vm, "name"), params, msg, sizeof(msg));
		if (!rep) {
			rep = json_object_new_object();
			json_object_object_add(rep, "vm", json_object_new_string(str(vm, "name")));
			json_object_object_add(rep, "vmm", json_object_new_string(bin));
			json_object_object_add(rep, "ok", json_object_new_boolean(false));
			json_object_object_add(rep, "error", json_object_new_string(msg));
		}
		if (!arg_json)
			print_check(rep);
		ok = ok && report_ok(rep);
		json_object_array_add(checks, rep);
	}
	return ok;
}

static int update_fleet(const struct update_opts *o)
{
	json_object *base = o->base;
	long parallel = o->parallel;
	_cleanup_json_ json_object *list = NULL, *out = NULL;
	struct fleet f = { .lock = PTHREAD_MUTEX_INITIALIZER, .base = base };
	json_object *vms, *summary, *checks;
	pthread_t th[64];
	double *bo;
	size_t nbo = 0, nok = 0, nthreads;
	int r;

	if (o->outdated) {
		json_object *p = json_object_new_object();

		json_object_object_add(p, "outdated", json_object_new_boolean(true));
		r = call("vm.list", p, &list);
	} else {
		r = call("vm.list", NULL, &list);
	}
	if (r != EXIT_OK)
		return r;
	vms = json_object_object_get(list, "vms");
	f.names = calloc(json_object_array_length(vms) + 1, sizeof(char *));
	f.reports = calloc(json_object_array_length(vms) + 1, sizeof(json_object *));
	bo = calloc(json_object_array_length(vms) + 1, sizeof(double));
	if (!f.names || !f.reports || !bo) {
		fprintf(stderr, "cprctl: out of memory\n");
		return EXIT_FAILED;
	}
	for (size_t i = 0; i < json_object_array_length(vms); i++) {
		json_object *vm = json_object_array_get_idx(vms, i);

		if (streq(str(vm, "state"), "running"))
			f.names[f.n++] = str(vm, "name");
	}
	checks = json_object_new_array();
	if (!preflight_fleet(base, vms, f.names, f.n, checks) || o->check) {
		bool passed = o->check && json_object_array_length(checks) > 0;

		for (size_t i = 0; i < json_object_array_length(checks) && passed; i++)
			passed = report_ok(json_object_array_get_idx(checks, i));
		if (arg_json) {
			out = json_object_new_object();
			json_object_object_add(out, "checks", checks);
			json_object_object_add(out, "updates", json_object_new_array());
			print_json(out);
		} else {
			json_object_put(checks);
			if (!o->check)
				printf("a pre-flight failed: no VM was updated\n");
			else if (f.n == 0)
				printf("no running VM to check\n");
		}
		free(f.names);
		free(f.reports);
		free(bo);
		return passed || (o->check && f.n == 0) ? EXIT_OK : EXIT_FAILED;
	}
	nthreads = MIN((size_t)parallel, MIN(f.n, ELEMENTSOF(th)));
	if (!arg_json)
		printf("updating %zu running VM(s), %zu at a time\n", f.n, nthreads);
	for (size_t t = 0; t < nthreads; t++)
		if (pthread_create(&th[t], NULL, fleet_worker, &f) != 0)
			nthreads = t;
	if (nthreads == 0 && f.n > 0)
		fleet_worker(&f);
	for (size_t t = 0; t < nthreads; t++)
		pthread_join(th[t], NULL);

	out = json_object_new_object();
	json_object *arr = json_object_new_array();
	for (size_t i = 0; i < f.n; i++) {
		json_object *b = json_object_object_get(f.reports[i], "blackout_ms");

		if (report_ok(f.reports[i])) {
			nok++;
			if (b)
				bo[nbo++] = json_object_get_double(b);
		}
		json_object_array_add(arr, f.reports[i]);
	}
	qsort(bo, nbo, sizeof(double), cmp_double);
	summary = json_object_new_object();
	json_object_object_add(summary, "count", json_object_new_int((int)f.n));
	json_object_object_add(summary, "ok", json_object_new_int((int)nok));
	json_object_object_add(summary, "failures", json_object_new_int((int)(f.n - nok)));
	json_object_object_add(summary, "blackout_p50_ms",
			       nbo ? json_object_new_double(bo[nbo / 2]) : NULL);
	json_object_object_add(summary, "blackout_max_ms",
			       nbo ? json_object_new_double(bo[nbo - 1]) : NULL);
	json_object_object_add(out, "checks", checks);
	json_object_object_add(out, "updates", arr);
	json_object_object_add(out, "summary", summary);
	if (arg_json)
		print_json(out);
	else if (nbo)
		printf("%zu updated, %zu failed; blackout p50 %.3f ms, max %.3f ms\n", nok,
		       f.n - nok, bo[nbo / 2], bo[nbo - 1]);
	else
		printf("%zu updated, %zu failed\n", nok, f.n - nok);
	free(f.names);
	free(f.reports);
	free(bo);
	return nok == f.n ? EXIT_OK : EXIT_FAILED;
}

static int verb_update(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "vmm", required_argument, NULL, 'v' },
		{ "strategy", required_argument, NULL, 's' },
		{ "timeout", required_argument, NULL, 't' },
		{ "all", no_argument, NULL, 'a' },
		{ "parallel", required_argument, NULL, 'p' },
		{ "check", no_argument, NULL, 'c' },
		{ "outdated", no_argument, NULL, 'o' },
	};
	struct update_opts o = { .base = json_object_new_object(), .parallel = 1 };
	_cleanup_json_ json_object *base = o.base, *rep = NULL;
	char msg[256] = "";
	int i;

	i = parse_opts(argc, argv, true, opts, ELEMENTSOF(opts), update_opt, &o);
	if (i < 0 || (o.all ? i != argc : i + 1 != argc) || (o.outdated && !o.all)) {
		fprintf(stderr,
			"Usage: cprctl update NAME [--check] [--vmm PATH] [--strategy NAME] "
			"[--timeout SECONDS]\n"
			"       cprctl update --all [--outdated] [--check] [--parallel N] "
			"[--vmm PATH] [--strategy S] [--timeout SECONDS]\n");
		return EXIT_USAGE;
	}
	if (o.all)
		return update_fleet(&o);
	if (o.check)
		json_object_object_add(base, "check", json_object_new_boolean(true));
	rep = update_one(argv[i], base, msg, sizeof(msg));
	if (!rep) {
		fprintf(stderr, "cprctl: %s\n", msg);
		return msg[0] && strstr(msg, "cannot reach") ? EXIT_NOCONN : EXIT_FAILED;
	}
	if (arg_json)
		print_json(rep);
	else
		print_report(rep);
	if (!report_ok(rep) && !arg_json && !o.check)
		fprintf(stderr, "cprctl: update of %s %s: %s\n", argv[i], str(rep, "result"),
			str(rep, "error"));
	return report_ok(rep) ? EXIT_OK : EXIT_FAILED;
}

static void print_history(json_object *res)
{
	json_object *ups = json_object_object_get(res, "updates");

	printf("%-19s %-12s %-11s %11s %10s %-17s %s\n", "TIME", "STRATEGY", "RESULT", "BLACKOUT",
	       "TOTAL", "QEMU", "ERROR");
	for (size_t i = 0; i < json_object_array_length(ups); i++) {
		json_object *u = json_object_array_get_idx(ups, i);
		json_object *bo = json_object_object_get(u, "blackout_ms");
		time_t t = (time_t)(json_object_get_int64(json_object_object_get(u, "time_usec")) /
				    1000000);
		char when[32], ver[40], bos[24];
		struct tm tm;

		localtime_r(&t, &tm);
		strftime(when, sizeof(when), "%Y-%m-%d %H:%M:%S", &tm);
		snprintf(ver, sizeof(ver), "%s->%s", str(u, "old_version"),
			 json_object_object_get(u, "new_version") ? str(u, "new_version") : "-");
		snprintf(bos, sizeof(bos), "%s ms", bo ? json_object_get_string(bo) : "?");
		printf("%-19s %-12s %-11s %11s %7.1f ms %-17s %s\n", when, str(u, "strategy"),
		       str(u, "result"), bos,
		       json_object_get_double(json_object_object_get(u, "total_ms")), ver,
		       json_object_object_get(u, "error") ? str(u, "error") : "");
	}
	if (json_object_array_length(ups) == 0)
		printf("(no updates)\n");
}

static int verb_history(int argc, char **argv)
{
	return name_verb(argc, argv, "vm.history", "name", print_history);
}

/* ---- metrics and events ---- */

static int verb_metrics(int argc, char **argv)
{
	_cleanup_json_ json_object *res = NULL;
	int i = parse_opts(argc, argv, true, NULL, 0, NULL, NULL), r;

	if (i < 0 || i != argc) {
		fprintf(stderr, "cprctl: metrics takes no arguments\n");
		return EXIT_USAGE;
	}
	r = call("daemon.metrics", NULL, &res);
	if (r != EXIT_OK)
		return r;
	if (arg_json)
		print_json(res);
	else
		fputs(str(res, "text") ? str(res, "text") : "", stdout);
	return EXIT_OK;
}

/* One line per event: local time, kind, VM, then its other plain members
 * as key=value (the full update report only with --json). */
static void print_event(const char *method, json_object *ev, void *ud)
{
	json_object *t = json_object_object_get(ev, "time_usec");
	const char *kind = str(ev, "kind"), *vm = str(ev, "vm");
	time_t secs;
	struct tm tm;
	char when[64], zone[8];

	if (!streq(method, "event") || !json_object_is_type(ev, json_type_object) || !kind)
		return;
	if (streq(kind, "dropped"))
		*(bool *)ud = true;
	if (arg_json) {
		puts(json_object_to_json_string_ext(ev, JSON_C_TO_STRING_PLAIN |
							    JSON_C_TO_STRING_NOSLASHESCAPE));
		fflush(stdout);
		return;
	}
	secs = (time_t)(json_object_get_int64(t) / 1000000);
	localtime_r(&secs, &tm);
	strftime(when, sizeof(when), "%Y-%m-%d %H:%M:%S", &tm);
	strftime(zone, sizeof(zone), "%z", &tm);
	printf("%s.%03d%s %s%s%s", when, (int)(json_object_get_int64(t) / 1000 % 1000), zone, kind,
	       vm ? " " : "", vm ? vm : "");
	json_object_object_foreach(ev, k, v)
	{
		const char *s = json_object_get_string(v);

		if (streq(k, "seq") || streq(k, "time_usec") || streq(k, "kind") ||
		    streq(k, "vm") || !v || json_object_is_type(v, json_type_object) ||
		    json_object_is_type(v, json_type_array))
			continue;
		printf(strchr(s, ' ') ? " %s=\"%s\"" : " %s=%s", k, s);
	}
	putchar('\n');
	fflush(stdout);
}

static int verb_events(int argc, char **argv)
{
	_cleanup_json_ json_object *error = NULL;
	int i = parse_opts(argc, argv, true, NULL, 0, NULL, NULL), r;
	proto_client *c = NULL;
	bool dropped = false;

	if (i < 0 || i != argc) {
		fprintf(stderr, "cprctl: events takes no arguments\n");
		return EXIT_USAGE;
	}
	if (connect_or_say(&c) < 0)
		return EXIT_NOCONN;
	proto_client_set_notify(c, print_event, &dropped);
	r = proto_client_call(c, "events.subscribe", NULL, NULL, 0, arg_timeout_ms, NULL, &error,
			      NULL, NULL);
	if (r == -EREMOTEIO) {
		fprintf(stderr, "cprctl: %s\n",
			str(error, "message") ? str(error, "message") : "?");
		proto_client_free(c);
		return EXIT_FAILED;
	}
	/* Until cprd goes away or drops us: like `virsh event --loop`. */
	while (r == 0)
		r = proto_client_follow(c, -1);
	proto_client_free(c);
	fprintf(stderr, "cprctl: %s\n",
		dropped            ? "cprd dropped the subscription: events were not read fast "
				     "enough"
		: r == -ECONNRESET ? "cprd closed the connection"
				   : strerror(-r));
	return EXIT_FAILED;
}

static const struct {
	const char *name;
	int (*fn)(int argc, char **argv);
} verbs[] = {
	{ "update", verb_update },   { "history", verb_history }, { "create", verb_create },
	{ "list", verb_list },       { "status", verb_status },   { "fds", verb_fds },
	{ "destroy", verb_destroy }, { "daemon", verb_daemon },   { "metrics", verb_metrics },
	{ "events", verb_events },
};

int main(int argc, char **argv)
{
	int i;

	i = parse_opts(argc, argv, false, NULL, 0, NULL, NULL);
	if (i < 0 || i >= argc) {
		usage(stderr);
		return EXIT_USAGE;
	}
	for (size_t v = 0; v < ELEMENTSOF(verbs); v++)
		if (streq(verbs[v].name, argv[i]))
			return verbs[v].fn(argc - i, argv + i);
	fprintf(stderr, "cprctl: unknown verb '%s'; try cprctl --help\n", argv[i]);
	return EXIT_USAGE;
}
