/* SPDX-License-Identifier: MIT */
/*
 * cprctl: the command line for cprd. Thin on purpose: each verb builds the
 * params of one JSON-RPC call, makes it through proto/'s client and prints
 * the result as a table (or as JSON with --json).
 */
#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "common/json.h"
#include "common/version.h"
#include "proto/client.h"
#include "proto/jsonrpc.h"

#define DEFAULT_SOCKET "/run/cprd/cprd.sock"

/* How long a call waits for cprd's answer unless --timeout says otherwise:
 * never forever, so that a stopped cprd cannot hang a script. create waits
 * for the guest to start (cprd gives a VMM 60 s), an update for its own
 * --timeout plus this margin (cprd then still rolls back and answers). */
#define CALL_TIMEOUT_MS (30 * 1000)
#define CREATE_TIMEOUT_MS (120 * 1000)
#define UPDATE_MARGIN_MS (30 * 1000)

/* As systemctl: 3 means "not running" for status, so cprd's absence is 4. */
enum { EXIT_OK = 0, EXIT_FAILED = 1, EXIT_USAGE = 2, EXIT_NOT_RUNNING = 3, EXIT_NOCONN = 4 };

struct verb {
	const char *name;
	int (*fn)(int argc, char **argv);
	const char *synopsis; /* after "cprctl " */
	const char *summary;
	const char *options; /* the verb's own, one per line, or NULL */
};

static const char *arg_socket;
static bool arg_json;
static int arg_timeout_ms = -1; /* -1: each call's default */
static const struct verb *arg_verb;

static const struct verb *verb_find(const char *name);
static void usage(FILE *f);
static void verb_usage(FILE *f, const struct verb *v);

enum { OPT_VERSION = 0x100, OPT_TIMEOUT };

static const struct option common_opts[] = {
	{ "json", no_argument, NULL, 'j' },
	{ "socket", required_argument, NULL, 'S' },
	{ "timeout", required_argument, NULL, OPT_TIMEOUT },
	{ "help", no_argument, NULL, 'h' },
	{ "version", no_argument, NULL, OPT_VERSION },
};

static void print_json(json_object *o)
{
	puts(json_object_to_json_string_ext(o, JSON_C_TO_STRING_PRETTY | JSON_C_TO_STRING_SPACED |
						   JSON_C_TO_STRING_NOSLASHESCAPE));
}

/* A failure of cprctl's own (cprd never answered, or the command line is
 * wrong): the message on stderr and, with --json, the same shape as one of
 * cprd's errors on stdout, {"code": null, "message", "data": {"kind"}}. */
_printf_(3, 4) static int fail(int status, const char *kind, const char *fmt, ...)
{
	_cleanup_free_ char *msg = NULL;
	va_list ap;

	va_start(ap, fmt);
	if (vasprintf(&msg, fmt, ap) < 0)
		msg = NULL;
	va_end(ap);
	fprintf(stderr, "cprctl: %s\n", msg ? msg : fmt);
	if (arg_json) {
		_cleanup_json_ json_object *o = json_object_new_object(), *data = NULL;

		data = json_object_new_object();
		json_object_object_add(data, "kind", json_object_new_string(kind));
		json_object_object_add(o, "code", NULL);
		json_object_object_add(o, "message", json_object_new_string(msg ? msg : fmt));
		json_object_object_add(o, "data", TAKE_PTR(data));
		print_json(o);
	}
	return status;
}

/* A wrong command line: what is wrong, the verb's synopsis, exit 2. */
_printf_(1, 2) static int usage_error(const char *fmt, ...)
{
	_cleanup_free_ char *msg = NULL;
	va_list ap;
	int r;

	va_start(ap, fmt);
	if (vasprintf(&msg, fmt, ap) < 0)
		msg = NULL;
	va_end(ap);
	r = fail(EXIT_USAGE, "usage", "%s", msg ? msg : fmt);
	if (arg_verb)
		fprintf(stderr, "Usage: cprctl %s\nTry 'cprctl help %s'.\n", arg_verb->synopsis,
			arg_verb->name);
	else
		fprintf(stderr, "Try 'cprctl --help'.\n");
	return r;
}

static int parse_seconds(const char *arg, double max, int *ret_ms)
{
	char *end;
	double v;

	errno = 0;
	v = strtod(arg, &end);
	if (errno || end == arg || *end || !(v > 0) || v > max)
		return -EINVAL;
	*ret_ms = (int)(v * 1000 + 0.999); /* up to the next ms, never 0 */
	return 0;
}

static int print_version(void);

/* Parse options; the common ones (--json, --socket, --timeout, --help) are
 * allowed anywhere. extra/nextra describe a verb's own and handle() takes
 * them. For a verb, getopt permutes so that "status NAME --json" works;
 * for the command line before the verb it stops at the verb. Returns the
 * index of the first operand, or -EINVAL after saying what is wrong. */
static int parse_opts(int argc, char **argv, bool verb, const struct option *extra, size_t nextra,
		      int (*handle)(int opt, const char *arg, void *ud), void *ud)
{
	struct option opts[32];
	bool version = false;
	size_t n = 0;
	int c;

	for (size_t i = 0; i < nextra && n < ELEMENTSOF(opts) - ELEMENTSOF(common_opts) - 1; i++)
		opts[n++] = extra[i];
	for (size_t i = 0; i < ELEMENTSOF(common_opts); i++)
		opts[n++] = common_opts[i];
	opts[n] = (struct option){};
	optind = 0; /* full re-initialisation: each verb parses its own argv */
	while ((c = getopt_long(argc, argv, verb ? "hj" : "+hj", opts, NULL)) >= 0) {
		switch (c) {
		case 'j':
			arg_json = true;
			break;
		case 'S':
			arg_socket = optarg;
			break;
		case OPT_TIMEOUT:
			if (parse_seconds(optarg, 86400, &arg_timeout_ms) < 0) {
				usage_error("--timeout needs a number of seconds (0 < S <= 86400), "
					    "not '%s'",
					    optarg);
				return -EINVAL;
			}
			break;
		case 'h':
			if (verb && arg_verb)
				verb_usage(stdout, arg_verb);
			else
				usage(stdout);
			exit(EXIT_OK);
		case OPT_VERSION: /* after the rest: --json may follow */
			version = true;
			break;
		case '?':
			usage_error("invalid option (getopt said why above)");
			return -EINVAL;
		default:
			if (!handle || handle(c, optarg, ud) < 0)
				return -EINVAL;
		}
	}
	if (version)
		exit(print_version());
	return optind;
}

/* ---- calling cprd ---- */

static const char *socket_path(void)
{
	const char *path = arg_socket ? arg_socket : getenv("CPRD_SOCKET");

	return path && *path ? path : DEFAULT_SOCKET;
}

static int timeout_ms(int default_ms)
{
	return arg_timeout_ms >= 0 ? arg_timeout_ms : default_ms;
}

static int connect_or_say(int timeout, proto_client **ret)
{
	int r = proto_client_connect_timeout(socket_path(), timeout, ret);

	if (r == -ETIMEDOUT)
		return fail(EXIT_NOCONN, "timeout",
			    "cprd at %s did not accept the connection within %.1f s (is it stopped "
			    "or overloaded? --timeout sets the limit)",
			    socket_path(), timeout / 1000.0);
	if (r < 0)
		return fail(EXIT_NOCONN, "unreachable", "cannot reach cprd at %s: %s%s",
			    socket_path(), strerror(-r),
			    r == -ENOENT || r == -ECONNREFUSED ? " (is cprd running?)" : "");
	return EXIT_OK;
}

/* cprd's error: its message on stderr, with --json the error object as it
 * came (code, message, data with kind) on stdout. */
static int remote_error(json_object *error)
{
	json_object *m = json_object_object_get(error, "message");

	if (arg_json)
		print_json(error);
	fprintf(stderr, "cprctl: %s\n", m ? json_object_get_string(m) : "unknown error");
	return EXIT_FAILED;
}

/* Make one call, waiting at most the --timeout or default_ms. On failure
 * says why and returns the exit status to use; on success returns 0 with
 * *ret_result. params is taken. */
static int call_within(const char *method, json_object *params, int default_ms,
		       json_object **ret_result)
{
	_cleanup_json_ json_object *error = NULL;
	proto_client *c = NULL;
	int t = timeout_ms(default_ms), r;

	r = connect_or_say(t, &c);
	if (r != EXIT_OK) {
		json_object_put(params);
		return r;
	}
	r = proto_client_call(c, method, params, NULL, 0, t, ret_result, &error, NULL, NULL);
	proto_client_free(c);
	if (r == -EREMOTEIO)
		return remote_error(error);
	if (r == -ETIMEDOUT)
		return fail(EXIT_NOCONN, "timeout",
			    "cprd at %s did not answer %s within %.1f s (is it stopped or "
			    "overloaded? --timeout sets the limit)",
			    socket_path(), method, t / 1000.0);
	if (r < 0)
		return fail(EXIT_FAILED, "client", "%s failed: %s", method, strerror(-r));
	return EXIT_OK;
}

static int call(const char *method, json_object *params, json_object **ret_result)
{
	return call_within(method, params, CALL_TIMEOUT_MS, ret_result);
}

/* cprctl's version, and cprd's when it answers. */
static int print_version(void)
{
	_cleanup_json_ json_object *st = NULL, *err = NULL, *out = NULL;
	proto_client *c = NULL;
	int t = timeout_ms(5000), r;

	r = proto_client_connect_timeout(socket_path(), t, &c);
	if (r == 0)
		r = proto_client_call(c, "rpc.describe", NULL, NULL, 0, t, &st, &err, NULL, NULL);
	if (r == -EREMOTEIO) /* a cprd from before rpc.describe */
		r = proto_client_call(c, "daemon.status", NULL, NULL, 0, t, &st, NULL, NULL, NULL);
	proto_client_free(c);
	if (arg_json) {
		json_object *srv = NULL;

		out = json_object_new_object();
		json_object_object_add(out, "version", json_object_new_string(CPRD_VERSION));
		json_object_object_add(out, "protocol_version",
				       json_object_new_int(CPRD_PROTOCOL_VERSION));
		if (r == 0) {
			srv = json_object_new_object();
			json_object_object_add(
			    srv, "version", json_object_get(json_object_object_get(st, "version")));
			json_object_object_add(
			    srv, "protocol_version",
			    json_object_get(json_object_object_get(st, "protocol_version")));
		}
		json_object_object_add(out, "server", srv);
		print_json(out);
		return EXIT_OK;
	}
	printf("cprctl %s (protocol %d)\n", CPRD_VERSION, CPRD_PROTOCOL_VERSION);
	if (r == 0 && json_object_object_get(st, "protocol_version"))
		printf("cprd %s (protocol %s) at %s\n",
		       json_object_get_string(json_object_object_get(st, "version")),
		       json_object_get_string(json_object_object_get(st, "protocol_version")),
		       socket_path());
	else if (r == 0)
		printf("cprd %s at %s\n",
		       json_object_get_string(json_object_object_get(st, "version")),
		       socket_path());
	else
		printf("cprd not reachable at %s: %s\n", socket_path(), strerror(-r));
	return EXIT_OK;
}

/* ---- output helpers ---- */

static const char *str(json_object *o, const char *key)
{
	json_object *v = json_object_object_get(o, key);

	return v ? json_object_get_string(v) : "-";
}

/* Sizes in one style everywhere, IEC: "512 B", "4 KiB", "256 MiB", "1.5 GiB". */
static void human_size(uint64_t b, char *buf, size_t n)
{
	static const char *const units[] = { "B", "KiB", "MiB", "GiB", "TiB" };
	size_t u = 0;
	uint64_t scale = 1;

	while (u + 1 < ELEMENTSOF(units) && b >= scale * 1024) {
		scale *= 1024;
		u++;
	}
	if (b % scale == 0)
		snprintf(buf, n, "%" PRIu64 " %s", b / scale, units[u]);
	else
		snprintf(buf, n, "%.1f %s", (double)b / (double)scale, units[u]);
}

/* How long ago since_usec (CLOCK_REALTIME) was: "42s", "5m 03s", "3h 05m", "2d 4h". */
static void human_age(int64_t since_usec, char *buf, size_t n)
{
	struct timespec now;
	int64_t s;

	clock_gettime(CLOCK_REALTIME, &now);
	s = now.tv_sec - since_usec / 1000000;
	if (s < 0)
		s = 0;
	if (s >= 86400)
		snprintf(buf, n, "%" PRId64 "d %" PRId64 "h", s / 86400, s % 86400 / 3600);
	else if (s >= 3600)
		snprintf(buf, n, "%" PRId64 "h %02" PRId64 "m", s / 3600, s % 3600 / 60);
	else if (s >= 60)
		snprintf(buf, n, "%" PRId64 "m %02" PRId64 "s", s / 60, s % 60);
	else
		snprintf(buf, n, "%" PRId64 "s", s);
}

/* Local time with its zone: "2025-06-01 14:03:07 CEST". */
static void human_time(int64_t usec, char *buf, size_t n)
{
	time_t t = (time_t)(usec / 1000000);
	struct tm tm;

	if (!localtime_r(&t, &tm) || !strftime(buf, n, "%Y-%m-%d %H:%M:%S %Z", &tm))
		snprintf(buf, n, "-");
}

static int64_t int_of(json_object *o, const char *key)
{
	return json_object_get_int64(json_object_object_get(o, key));
}

/* A table whose columns are as wide as their widest cell, so that long VM
 * names do not push the others out of line. Cells are copied. */
struct table {
	size_t ncols, nrows;
	unsigned right; /* bit i: column i is right-aligned */
	char **cells;   /* nrows * ncols; row 0 is the header */
};

static void table_row(struct table *t, const char *const *cells)
{
	char **more = realloc(t->cells, (t->nrows + 1) * t->ncols * sizeof(char *));

	if (!more) {
		fprintf(stderr, "cprctl: out of memory\n");
		exit(EXIT_FAILED);
	}
	t->cells = more;
	for (size_t i = 0; i < t->ncols; i++)
		t->cells[t->nrows * t->ncols + i] = strdup(cells[i] ? cells[i] : "-");
	t->nrows++;
}

static void table_free(struct table *t)
{
	for (size_t k = 0; k < t->nrows * t->ncols; k++)
		free(t->cells[k]);
	free(t->cells);
	t->cells = NULL;
	t->nrows = 0;
}

/* Prints the table, then frees its cells. */
static void table_print(struct table *t)
{
	size_t w[16] = {};

	for (size_t r = 0; r < t->nrows; r++)
		for (size_t i = 0; i < t->ncols && i < ELEMENTSOF(w); i++) {
			const char *c = t->cells[r * t->ncols + i];

			w[i] = MAX(w[i], c ? strlen(c) : 0);
		}
	for (size_t r = 0; r < t->nrows; r++) {
		for (size_t i = 0; i < t->ncols; i++) {
			const char *c = t->cells[r * t->ncols + i];
			bool last = i + 1 == t->ncols;

			c = c ? c : "";
			if (t->right & (1u << i))
				printf("%*s", (int)w[i], c);
			else
				printf("%-*s", last ? 0 : (int)w[i], c);
			printf(last ? "\n" : "  ");
		}
	}
	table_free(t);
}

/* ---- verbs ---- */

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

/* --disk PATH[,format=raw|qcow2][,readonly=on|off][,cache=none|writeback]
 * [,serial=S]: one more object in "disks". What each value may be is
 * cprd's to say; only the shape is checked here. */
static int add_disk(json_object *p, const char *spec)
{
	_cleanup_free_ char *copy = strdup(spec);
	_cleanup_json_ json_object *d = json_object_new_object();
	json_object *disks;
	char *save = NULL, *tok;
	int r;

	if (!copy || !d)
		return -ENOMEM;
	tok = strtok_r(copy, ",", &save);
	if (!tok || strchr(tok, '=')) {
		usage_error("--disk needs the image's PATH first, not '%s'", spec);
		return -EINVAL;
	}
	r = add_path(d, "path", tok);
	if (r < 0)
		return r;
	while ((tok = strtok_r(NULL, ",", &save))) {
		char *eq = strchr(tok, '=');

		if (!eq || eq == tok || !eq[1]) {
			usage_error("--disk: '%s' is not KEY=VALUE", tok);
			return -EINVAL;
		}
		*eq = '\0';
		if (streq(tok, "readonly")) {
			if (!streq(eq + 1, "on") && !streq(eq + 1, "off")) {
				usage_error("--disk: readonly is on or off, not '%s'", eq + 1);
				return -EINVAL;
			}
			json_object_object_add(d, tok,
					       json_object_new_boolean(streq(eq + 1, "on")));
		} else if (streq(tok, "format") || streq(tok, "cache") || streq(tok, "serial")) {
			json_object_object_add(d, tok, json_object_new_string(eq + 1));
		} else {
			usage_error("--disk: unknown key '%s' (format, readonly, cache, serial)",
				    tok);
			return -EINVAL;
		}
	}
	if (!json_object_object_get_ex(p, "disks", &disks)) {
		disks = json_object_new_array();
		json_object_object_add(p, "disks", disks);
	}
	json_object_array_add(disks, TAKE_PTR(d));
	return 0;
}

/* The keys of vm.create a spec file may hold: those dumpspec writes. */
static const char *const spec_keys[] = {
	"name", "memory",  "vcpus", "kernel",   "initrd", "append",
	"vmm",  "machine", "cpu",   "cpr_exec", "tap",    "disks"
};

static const char *spec_path; /* create --spec */

/* --spec FILE: vm.create's params from a JSON object (FILE "-": stdin);
 * what the command line says as well wins over it (its --disk options
 * replace the file's disks). */
static int add_spec(json_object *p, const char *path)
{
	_cleanup_json_ json_object *spec = NULL;

	spec = streq(path, "-") ? json_object_from_fd(STDIN_FILENO) : json_object_from_file(path);
	if (!spec || !json_object_is_type(spec, json_type_object)) {
		usage_error("--spec %s: not a JSON object (%s)", path,
			    json_util_get_last_err() ? json_util_get_last_err() : "not an object");
		return -EINVAL;
	}
	json_object_object_foreach(spec, k, v)
	{
		bool known = false;

		for (size_t i = 0; i < ELEMENTSOF(spec_keys) && !known; i++)
			known = streq(k, spec_keys[i]);
		if (!known) {
			usage_error("--spec %s: unknown key '%s'", path, k);
			return -EINVAL;
		}
		if (!json_object_object_get_ex(p, k, NULL))
			json_object_object_add(p, k, json_object_get(v));
	}
	return 0;
}

static int create_opt(int opt, const char *arg, void *ud)
{
	json_object *p = ud;
	char *end;
	long v;

	switch (opt) {
	case 'm':
		json_object_object_add(p, "memory", json_object_new_string(arg));
		return 0;
	case 'c':
		v = strtol(arg, &end, 10);
		if (*end || v < 1 || v > INT_MAX) {
			usage_error("--vcpus needs a positive number, not '%s'", arg);
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
	case 'D':
		return add_disk(p, arg);
	case 'F':
		spec_path = arg; /* read after the other options (verb_create) */
		return 0;
	case 'M':
		json_object_object_add(p, "machine", json_object_new_string(arg));
		return 0;
	case 'P':
		json_object_object_add(p, "cpu", json_object_new_string(arg));
		return 0;
	case 'X':
		json_object_object_add(p, "cpr_exec", json_object_new_boolean(true));
		return 0;
	}
	return -EINVAL;
}

/* One line a disk: "disk0  /var/lib/vms/web1.qcow2 (qcow2, on base.raw)". */
static void print_disks(json_object *disks)
{
	for (size_t i = 0; i < json_object_array_length(disks); i++) {
		json_object *d = json_object_array_get_idx(disks, i), *layers;
		json_object *fmt = json_object_object_get(d, "format");
		char label[32];

		snprintf(label, sizeof(label), "disk%zu", i);
		printf("%-12s %s (%s", label, str(d, "path"),
		       fmt ? json_object_get_string(fmt) : "raw");
		if (json_object_get_boolean(json_object_object_get(d, "readonly")))
			printf(", read-only");
		if (json_object_object_get(d, "serial"))
			printf(", serial %s", str(d, "serial"));
		if (json_object_object_get_ex(d, "layers", &layers))
			for (size_t j = 1; j < json_object_array_length(layers); j++)
				printf(", on %s",
				       str(json_object_array_get_idx(layers, j), "path"));
		printf(")\n");
	}
}

static void print_status(json_object *vm)
{
	static const char *const keys[] = { "name",        "state",    "pid",    "vmm",
					    "vmm_version", "machine",  "cpu",    "accel",
					    "cpr_exec",    "vcpus",    "kernel", "initrd",
					    "append",      "tap",      "disks",  "console_log",
					    "vmm_log",     "fds_held", "exit" };
	char buf[64], age[32];

	for (size_t i = 0; i < ELEMENTSOF(keys); i++) {
		json_object *v = json_object_object_get(vm, keys[i]);

		/* A crashed VM has no VMM, but its memory is still held. */
		if (streq(keys[i], "vcpus")) {
			human_size((uint64_t)int_of(vm, "memory_bytes"), buf, sizeof(buf));
			printf("%-12s %s\n", "memory", buf);
		}
		if (streq(keys[i], "console_log") && json_object_object_get(vm, "created_usec")) {
			human_time(int_of(vm, "created_usec"), buf, sizeof(buf));
			human_age(int_of(vm, "created_usec"), age, sizeof(age));
			printf("%-12s %s (%s ago)\n", "created", buf, age);
		}
		if (v && streq(keys[i], "disks"))
			print_disks(v);
		else if (v)
			printf("%-12s %s\n", keys[i], json_object_get_string(v));
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
		{ "disk", required_argument, NULL, 'D' },
		{ "machine", required_argument, NULL, 'M' },
		{ "cpu", required_argument, NULL, 'P' },
		{ "cpr-exec", no_argument, NULL, 'X' },
		{ "spec", required_argument, NULL, 'F' },
	};
	_cleanup_json_ json_object *p = json_object_new_object(), *res = NULL;
	int i, r;

	i = parse_opts(argc, argv, true, opts, ELEMENTSOF(opts), create_opt, p);
	if (i < 0 || (spec_path && add_spec(p, spec_path) < 0))
		return EXIT_USAGE;
	if (i + 1 != argc)
		return usage_error(i == argc ? "create needs the VM's NAME"
					     : "create takes one NAME, not '%s'",
				   argv[MIN(i + 1, argc - 1)]);
	/* What cprd would refuse anyway is the command line's fault: say so. */
	if (!json_object_object_get_ex(p, "memory", NULL))
		return usage_error("create needs --memory SIZE");
	if (!json_object_object_get_ex(p, "kernel", NULL))
		return usage_error("create needs --kernel PATH");
	json_object_object_add(p, "name", json_object_new_string(argv[i]));
	r = call_within("vm.create", TAKE_PTR(p), CREATE_TIMEOUT_MS, &res);
	if (r != EXIT_OK)
		return r;
	if (arg_json)
		print_json(res);
	else
		printf("VM %s is %s (pid %s); console: %s\n", str(res, "name"), str(res, "state"),
		       str(res, "pid"), str(res, "console_log"));
	return EXIT_OK;
}

static const char *const vm_states[] = { "starting", "running", "paused",
					 "stopping", "crashed", "checkpointed" };

struct list_opts {
	const char *state;
	bool names;
	bool outdated;
};

static int list_opt(int opt, const char *arg, void *ud)
{
	struct list_opts *o = ud;

	if (opt == 'n' || opt == 'o') {
		*(opt == 'n' ? &o->names : &o->outdated) = true;
		return 0;
	}
	for (size_t i = 0; i < ELEMENTSOF(vm_states); i++)
		if (streq(arg, vm_states[i])) {
			o->state = vm_states[i];
			return 0;
		}
	usage_error("--state must be one of starting, running, paused, stopping, crashed; not "
		    "'%s'",
		    arg);
	return -EINVAL;
}

static int verb_list(int argc, char **argv)
{
	static const struct option opts[] = { { "state", required_argument, NULL, 's' },
					      { "name", no_argument, NULL, 'n' },
					      { "outdated", no_argument, NULL, 'o' } };
	_cleanup_json_ json_object *res = NULL, *shown = json_object_new_array();
	json_object *params = NULL;
	struct table t = { .ncols = 8, .right = 1u << 2 | 1u << 3 | 1u << 4 };
	struct list_opts o = {};
	json_object *vms;
	int i, r;

	i = parse_opts(argc, argv, true, opts, ELEMENTSOF(opts), list_opt, &o);
	if (i < 0)
		return EXIT_USAGE;
	if (i != argc)
		return usage_error("list takes no operand, not '%s'", argv[i]);
	if (o.outdated) {
		params = json_object_new_object();
		json_object_object_add(params, "outdated", json_object_new_boolean(true));
	}
	r = call("vm.list", params, &res);
	if (r != EXIT_OK)
		return r;
	vms = json_object_object_get(res, "vms");
	for (size_t k = 0; k < json_object_array_length(vms); k++) {
		json_object *vm = json_object_array_get_idx(vms, k);

		if (!o.state || streq(str(vm, "state"), o.state))
			json_object_array_add(shown, json_object_get(vm));
	}
	if (arg_json) {
		json_object_object_add(res, "vms", TAKE_PTR(shown));
		print_json(res);
		return EXIT_OK;
	}
	if (o.names) {
		for (size_t k = 0; k < json_object_array_length(shown); k++)
			puts(str(json_object_array_get_idx(shown, k), "name"));
		return EXIT_OK;
	}
	table_row(&t, (const char *const[]){ "NAME", "STATE", "PID", "MEMORY", "VCPUS", "UPTIME",
					     "QEMU", "VMM" });
	for (size_t k = 0; k < json_object_array_length(shown); k++) {
		json_object *vm = json_object_array_get_idx(shown, k);
		char mem[32], up[32];

		human_size((uint64_t)int_of(vm, "memory_bytes"), mem, sizeof(mem));
		human_age(int_of(vm, "created_usec"), up, sizeof(up));
		table_row(&t, (const char *const[]){ str(vm, "name"), str(vm, "state"),
						     str(vm, "pid"), mem, str(vm, "vcpus"), up,
						     str(vm, "vmm_version"), str(vm, "vmm") });
	}
	if (json_object_array_length(shown) == 0) {
		table_free(&t); /* just the note, no bare header */
		if (o.outdated)
			printf("(no %sVM runs an outdated VMM)\n", o.state ? "such " : "");
		else
			printf(o.state ? "(no %s VMs)\n" : "(no VMs)\n", o.state);
		return EXIT_OK;
	}
	table_print(&t);
	return EXIT_OK;
}

/* "VERB NAME": method called with {key: NAME}; its result in *ret_res. */
static int name_call(int argc, char **argv, const char *method, const char *key,
		     json_object **ret_res)
{
	json_object *p;
	int i;

	i = parse_opts(argc, argv, true, NULL, 0, NULL, NULL);
	if (i < 0)
		return EXIT_USAGE;
	if (i + 1 != argc)
		return usage_error(i == argc ? "%s needs a VM's NAME" : "%s takes one NAME",
				   argv[0]);
	p = json_object_new_object();
	json_object_object_add(p, key, json_object_new_string(argv[i]));
	return call(method, p, ret_res);
}

/* Verbs of the form "VERB NAME" that print the result one way or another. */
static int name_verb(int argc, char **argv, const char *method, const char *key,
		     void (*print)(json_object *res), json_object **ret_res)
{
	_cleanup_json_ json_object *res = NULL;
	int r = name_call(argc, argv, method, key, &res);

	if (r != EXIT_OK)
		return r;
	if (arg_json)
		print_json(res);
	else
		print(res);
	if (ret_res)
		*ret_res = TAKE_PTR(res);
	return EXIT_OK;
}

static void print_fds(json_object *res)
{
	json_object *fds = json_object_object_get(res, "fds");
	struct table t = { .ncols = 4, .right = 1u << 2 | 1u << 3 };

	table_row(&t, (const char *const[]){ "NAME", "KIND", "SIZE", "FD" });
	for (size_t i = 0; i < json_object_array_length(fds); i++) {
		json_object *f = json_object_array_get_idx(fds, i);
		char sz[32];

		human_size((uint64_t)int_of(f, "size"), sz, sizeof(sz));
		table_row(
		    &t, (const char *const[]){ str(f, "name"), str(f, "kind"), sz, str(f, "fd") });
	}
	table_print(&t);
}

static void print_destroyed(json_object *res)
{
	printf("VM %s destroyed; everything held for it was released (its logs and history are "
	       "kept: cprctl history %s, cprctl purge %s)\n",
	       str(res, "name"), str(res, "name"), str(res, "name"));
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
	before = int_of(st, "started_usec");
	r = call("daemon.reexec", params, &res);
	if (r != EXIT_OK)
		return r;
	for (int i = 0; i < 200; i++) {
		proto_client *c = NULL;
		json_object *now = NULL;

		if (proto_client_connect_timeout(socket_path(), 2000, &c) == 0 &&
		    proto_client_call(c, "daemon.status", NULL, NULL, 0, 2000, &now, NULL, NULL,
				      NULL) == 0 &&
		    int_of(now, "started_usec") != before) {
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
	return fail(EXIT_FAILED, "timeout", "cprd did not come back within 10 s of re-executing");
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
	       str(loop, "requests"), (double)int_of(loop, "window_us") / 1e6);
	print_timing("  busy", loop, "busy");
	print_timing("  requests", loop, "request");
	json_object_object_foreach(per, name, m)
	{
		char label[64];

		snprintf(label, sizeof(label), "  %s (%s)", name, str(m, "count"));
		print_timing(label, m, "request");
	}
}

static void print_daemon_status(json_object *res)
{
	char buf[64], age[32];

	json_object_object_foreach(res, k, v)
	{
		if (streq(k, "loop")) {
			print_loop(v);
		} else if (streq(k, "started_usec")) {
			human_time(json_object_get_int64(v), buf, sizeof(buf));
			human_age(json_object_get_int64(v), age, sizeof(age));
			printf("%-16s %s (%s ago)\n", "started", buf, age);
		} else {
			printf("%-16s %s\n", k, json_object_get_string(v));
		}
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
	if (i < 0) {
		json_object_put(params);
		return EXIT_USAGE;
	}
	what = i + 1 == argc ? argv[i] : "";
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
	if (!streq(what, "status") || json_object_object_length(params) > 0) {
		json_object_put(params);
		return usage_error("daemon needs one of status, stats [--reset], reexec [--binary "
				   "PATH]");
	}
	json_object_put(params);
	r = call("daemon.status", NULL, &res);
	if (r != EXIT_OK)
		return r;
	if (arg_json)
		print_json(res);
	else
		print_daemon_status(res);
	return EXIT_OK;
}

static int verb_status(int argc, char **argv)
{
	_cleanup_json_ json_object *res = NULL;
	char *daemon_argv[] = { argv[0], (char *)"status", NULL };
	int i = parse_opts(argc, argv, true, NULL, 0, NULL, NULL), r;

	if (i < 0)
		return EXIT_USAGE;
	/* "cprctl status" alone: the daemon's own status. */
	if (i == argc)
		return verb_daemon(2, daemon_argv);
	r = name_verb(argc, argv, "vm.status", "name", print_status, &res);
	if (r != EXIT_OK)
		return r;
	/* As systemctl status: 3 for a VM that is there but not running. */
	return streq(str(res, "state"), "running") ? EXIT_OK : EXIT_NOT_RUNNING;
}

/* The VM's definition as vm.create takes it (create --spec), from its
 * status: what was asked, not what cprd added (a disk's judged chain). */
static void print_spec(json_object *vm)
{
	_cleanup_json_ json_object *spec = json_object_new_object();
	json_object *v, *disks;

	for (size_t i = 0; i < ELEMENTSOF(spec_keys); i++) {
		const char *k = spec_keys[i];

		if (streq(k, "memory"))
			v = json_object_object_get(vm, "memory_bytes");
		else if (streq(k, "machine") && json_object_object_get(vm, "machine_alias"))
			v = json_object_object_get(vm, "machine_alias"); /* as asked: q35 */
		else
			v = json_object_object_get(vm, k);
		if (!v || (streq(k, "cpr_exec") && !json_object_get_boolean(v)))
			continue;
		if (streq(k, "disks")) {
			disks = json_object_new_array();
			for (size_t j = 0; j < json_object_array_length(v); j++) {
				json_object *d = NULL;

				if (json_object_deep_copy(json_object_array_get_idx(v, j), &d,
							  NULL) < 0)
					continue;
				json_object_object_del(d, "layers");
				json_object_array_add(disks, d);
			}
			json_object_object_add(spec, k, disks);
			continue;
		}
		json_object_object_add(spec, k, json_object_get(v));
	}
	printf("%s\n", json_object_to_json_string_ext(spec, JSON_C_TO_STRING_PRETTY |
								JSON_C_TO_STRING_SPACED |
								JSON_C_TO_STRING_NOSLASHESCAPE));
}

/* The spec is JSON already: printed so with or without --json. */
static int verb_dumpspec(int argc, char **argv)
{
	_cleanup_json_ json_object *res = NULL;
	int r = name_call(argc, argv, "vm.status", "name", &res);

	if (r == EXIT_OK)
		print_spec(res);
	return r;
}

static int verb_fds(int argc, char **argv)
{
	return name_verb(argc, argv, "vm.fds", "name", print_fds, NULL);
}

static int verb_destroy(int argc, char **argv)
{
	return name_verb(argc, argv, "vm.destroy", "name", print_destroyed, NULL);
}

static void print_paused_or_resumed(json_object *res)
{
	bool paused = streq(str(res, "state"), "paused");

	if (json_object_get_boolean(json_object_object_get(res, "changed")))
		printf("VM %s %s\n", str(res, "name"), paused ? "paused" : "runs again");
	else
		printf("VM %s was already %s\n", str(res, "name"), paused ? "paused" : "running");
}

static int verb_pause(int argc, char **argv)
{
	return name_verb(argc, argv, "vm.pause", "name", print_paused_or_resumed, NULL);
}

static int verb_resume(int argc, char **argv)
{
	return name_verb(argc, argv, "vm.resume", "name", print_paused_or_resumed, NULL);
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
			usage_error("--%s needs a number from 1 to 3600, not '%s'",
				    opt == 't' ? "timeout" : "parallel", arg);
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

/* How long a client waits for an update: its own bound plus time for cprd
 * to roll back and answer. */
static int update_wait_ms(json_object *base)
{
	json_object *t = json_object_object_get(base, "timeout");

	return (t ? json_object_get_int(t) : 60) * 1000 + UPDATE_MARGIN_MS;
}

/* One update over its own connection. Returns the report (owned) or NULL
 * with msg set when there is no report (cprd refused the request: then
 * *ret_err is its error, when ret_err is not NULL); *ret_status is the exit
 * status that goes with it. */
static json_object *update_one(const char *name, json_object *base, char *msg, size_t msglen,
			       int *ret_status, json_object **ret_err)
{
	_cleanup_json_ json_object *params = json_object_new_object(), *res = NULL, *err = NULL;
	proto_client *c = NULL;
	json_object *data;
	int wait = update_wait_ms(base), r;

	json_object_object_foreach(base, k, v)
	    json_object_object_add(params, k, json_object_get(v));
	json_object_object_add(params, "name", json_object_new_string(name));
	*ret_status = EXIT_NOCONN;
	r = proto_client_connect_timeout(socket_path(), wait, &c);
	if (r < 0) {
		snprintf(msg, msglen, "cannot reach cprd at %s: %s", socket_path(), strerror(-r));
		return NULL;
	}
	r = proto_client_call(c, "vm.update", TAKE_PTR(params), NULL, 0, wait, &res, &err, NULL,
			      NULL);
	proto_client_free(c);
	if (r == 0)
		return TAKE_PTR(res);
	*ret_status = EXIT_FAILED;
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
		if (ret_err)
			*ret_err = TAKE_PTR(err);
		return NULL;
	}
	if (r == -ETIMEDOUT) {
		*ret_status = EXIT_NOCONN;
		snprintf(msg, msglen,
			 "cprd at %s did not answer vm.update within %.0f s (its result will be in "
			 "`cprctl history %s`)",
			 socket_path(), wait / 1000.0, name);
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
	       str(rep, "old_pid"), str(rep, "new_pid"), str(rep, "old_version"),
	       str(rep, "new_version"), json_object_object_get(rep, "error") ? "; " : "",
	       json_object_object_get(rep, "error") ? str(rep, "error") : "");
}

/* One operation over many VMs, N at a time: each thread takes the next VM
 * under the lock, runs one() on it over a connection of its own, and prints
 * the report as it comes. */
struct fleet {
	pthread_mutex_t lock;
	const char *method; /* for one() */
	json_object *base;  /* the params every VM gets */
	const char **names;
	json_object **reports;
	size_t n, next, done;
	json_object *(*one)(const struct fleet *f, const char *name, char *msg, size_t msglen);
	void (*print)(json_object *rep);
	bool numbered; /* "[i/n] " before each line */
};

static void *fleet_worker(void *p)
{
	struct fleet *f = p;
	char msg[512];

	for (;;) {
		json_object *rep;
		bool failed;
		size_t i;

		pthread_mutex_lock(&f->lock);
		i = f->next < f->n ? f->next++ : f->n;
		pthread_mutex_unlock(&f->lock);
		if (i >= f->n)
			return NULL;
		msg[0] = '\0';
		rep = f->one(f, f->names[i], msg, sizeof(msg));
		failed = !rep; /* no report: cprd refused, or could not be reached */
		if (failed) {
			rep = json_object_new_object();
			json_object_object_add(rep, "vm", json_object_new_string(f->names[i]));
			json_object_object_add(rep, "result", json_object_new_string("failed"));
			json_object_object_add(rep, "error", json_object_new_string(msg));
		}
		pthread_mutex_lock(&f->lock);
		f->reports[i] = rep;
		f->done++;
		if (!arg_json) {
			if (f->numbered)
				printf("[%zu/%zu] ", f->done, f->n);
			if (failed)
				printf("%s: failed: %s\n", f->names[i], str(rep, "error"));
			else
				f->print(rep);
			fflush(stdout);
		}
		pthread_mutex_unlock(&f->lock);
	}
}

/* f->n workers at most, parallel at a time (and no more than 64 threads);
 * in this thread when none can be started. */
static size_t fleet_run(struct fleet *f, long parallel)
{
	pthread_t th[64];
	size_t n = MIN((size_t)parallel, MIN(f->n, ELEMENTSOF(th)));

	for (size_t t = 0; t < n; t++)
		if (pthread_create(&th[t], NULL, fleet_worker, f) != 0)
			n = t;
	if (n == 0 && f->n > 0)
		fleet_worker(f);
	for (size_t t = 0; t < n; t++)
		pthread_join(th[t], NULL);
	return n;
}

static json_object *fleet_update_one(const struct fleet *f, const char *name, char *msg,
				     size_t msglen)
{
	int status;

	return update_one(name, f->base, msg, msglen, &status, NULL);
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

/* Why update --all leaves a VM alone: cprd updates only a running VM. */
static json_object *skipped_entry(json_object *vm)
{
	json_object *o = json_object_new_object();
	const char *state = str(vm, "state");
	char why[160];

	if (json_object_get_boolean(json_object_object_get(vm, "updating")))
		snprintf(why, sizeof(why), "already being updated");
	else if (streq(state, "crashed"))
		snprintf(why, sizeof(why), "crashed (%s); destroy it and create it again",
			 str(vm, "exit"));
	else
		snprintf(why, sizeof(why), "%s; only a running VM can be updated", state);
	json_object_object_add(o, "vm", json_object_new_string(str(vm, "name")));
	json_object_object_add(o, "state", json_object_new_string(state));
	json_object_object_add(o, "reason", json_object_new_string(why));
	return o;
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
		int status;

		for (size_t j = 0; j < n && !listed; j++)
			listed = streq(names[j], str(vm, "name"));
		if (!listed || asprintf(&key, "%s\n%s", bin, str(vm, "machine")) < 0 ||
		    json_object_object_get_ex(seen, key, NULL))
			continue;
		json_object_object_add(seen, key, NULL);
		rep = update_one(str(vm, "name"), params, msg, sizeof(msg), &status, NULL);
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
	_cleanup_json_ json_object *list = NULL, *out = NULL, *skipped = json_object_new_array(),
				   *checks = json_object_new_array(), *params = NULL;
	json_object *base = o->base;
	long parallel = o->parallel;
	struct fleet f = { .lock = PTHREAD_MUTEX_INITIALIZER,
			   .base = base,
			   .one = fleet_update_one,
			   .print = print_report,
			   .numbered = true };
	json_object *vms, *summary;
	double *bo;
	size_t nbo = 0, nok = 0, nthreads, nskip;
	int r;

	if (o->outdated) {
		params = json_object_new_object();
		json_object_object_add(params, "outdated", json_object_new_boolean(true));
	}
	r = call("vm.list", TAKE_PTR(params), &list);
	if (r != EXIT_OK)
		return r;
	vms = json_object_object_get(list, "vms");
	f.names = calloc(json_object_array_length(vms) + 1, sizeof(char *));
	f.reports = calloc(json_object_array_length(vms) + 1, sizeof(json_object *));
	bo = calloc(json_object_array_length(vms) + 1, sizeof(double));
	if (!f.names || !f.reports || !bo)
		return fail(EXIT_FAILED, "client", "out of memory");
	for (size_t i = 0; i < json_object_array_length(vms); i++) {
		json_object *vm = json_object_array_get_idx(vms, i);

		if (streq(str(vm, "state"), "running") &&
		    !json_object_get_boolean(json_object_object_get(vm, "updating")))
			f.names[f.n++] = str(vm, "name");
		else
			json_object_array_add(skipped, skipped_entry(vm));
	}
	nskip = json_object_array_length(skipped);
	if (!preflight_fleet(base, vms, f.names, f.n, checks) || o->check) {
		bool passed = true;

		for (size_t i = 0; i < json_object_array_length(checks); i++)
			passed = passed && report_ok(json_object_array_get_idx(checks, i));
		if (arg_json) {
			out = json_object_new_object();
			json_object_object_add(out, "checks", json_object_get(checks));
			json_object_object_add(out, "updates", json_object_new_array());
			json_object_object_add(out, "skipped", json_object_get(skipped));
			print_json(out);
		} else if (!passed) {
			printf("a pre-flight failed: no VM was updated\n");
		} else if (f.n == 0) {
			printf("no running VM to check\n");
		}
		free(f.names);
		free(f.reports);
		free(bo);
		return passed ? EXIT_OK : EXIT_FAILED;
	}
	nthreads = MIN((size_t)parallel, MIN(f.n, 64)); /* what fleet_run() starts */
	if (!arg_json) {
		printf("updating %zu running VM(s), %zu at a time", f.n, nthreads);
		printf(nskip ? "; skipping %zu:\n" : "\n", nskip);
		for (size_t i = 0; i < nskip; i++) {
			json_object *s = json_object_array_get_idx(skipped, i);

			printf("  skipped %s: %s\n", str(s, "vm"), str(s, "reason"));
		}
		fflush(stdout);
	}
	fleet_run(&f, parallel);

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
	json_object_object_add(summary, "skipped", json_object_new_int((int)nskip));
	json_object_object_add(summary, "blackout_p50_ms",
			       nbo ? json_object_new_double(bo[nbo / 2]) : NULL);
	json_object_object_add(summary, "blackout_max_ms",
			       nbo ? json_object_new_double(bo[nbo - 1]) : NULL);
	json_object_object_add(out, "checks", json_object_get(checks));
	json_object_object_add(out, "updates", arr);
	json_object_object_add(out, "skipped", json_object_get(skipped));
	json_object_object_add(out, "summary", summary);
	if (arg_json)
		print_json(out);
	else if (nbo)
		printf("%zu updated, %zu failed, %zu skipped; blackout p50 %.3f ms, max %.3f ms\n",
		       nok, f.n - nok, nskip, bo[nbo / 2], bo[nbo - 1]);
	else
		printf("%zu updated, %zu failed, %zu skipped\n", nok, f.n - nok, nskip);
	free(f.names);
	free(f.reports);
	free(bo);
	if (!arg_json && (nok != f.n || nskip))
		fprintf(stderr, "cprctl: update --all: %zu of %zu VM(s) not updated\n",
			f.n - nok + nskip, f.n + nskip);
	return nok == f.n && nskip == 0 ? EXIT_OK : EXIT_FAILED;
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
	_cleanup_json_ json_object *base = o.base, *rep = NULL, *err = NULL;
	char msg[256] = "";
	int i, status;

	i = parse_opts(argc, argv, true, opts, ELEMENTSOF(opts), update_opt, &o);
	if (i < 0)
		return EXIT_USAGE;
	if (o.all ? i != argc : i + 1 != argc)
		return usage_error(o.all       ? "update --all takes no NAME"
				   : i == argc ? "update needs a VM's NAME, or --all"
					       : "update takes one NAME");
	if (o.outdated && !o.all)
		return usage_error("--outdated goes with --all");
	/* --timeout before the verb is the update's bound too. */
	if (arg_timeout_ms >= 0 && !json_object_object_get_ex(base, "timeout", NULL))
		json_object_object_add(
		    base, "timeout",
		    json_object_new_int(MIN(3600, MAX(1, (arg_timeout_ms + 999) / 1000))));
	if (o.all)
		return update_fleet(&o);
	if (o.check)
		json_object_object_add(base, "check", json_object_new_boolean(true));
	rep = update_one(argv[i], base, msg, sizeof(msg), &status, &err);
	if (!rep && err)
		return remote_error(err);
	if (!rep)
		return fail(status,
			    strstr(msg, "did not answer") ? "timeout"
			    : status == EXIT_NOCONN       ? "unreachable"
							  : "client",
			    "%s", msg);
	if (arg_json)
		print_json(rep);
	else
		print_report(rep);
	if (!report_ok(rep) && !arg_json && !o.check)
		fprintf(stderr, "cprctl: update of %s %s: %s\n", argv[i], str(rep, "result"),
			str(rep, "error"));
	return report_ok(rep) ? EXIT_OK : EXIT_FAILED;
}

/* ---- checkpoint and restore ---- */

struct ckpt_opts {
	json_object *base;
	long parallel;
	bool all;
};

static int ckpt_opt(int opt, const char *arg, void *ud)
{
	struct ckpt_opts *o = ud;
	char *end;
	long v;

	switch (opt) {
	case 'v':
		if (strchr(arg, '/'))
			return add_path(o->base, "vmm", arg);
		json_object_object_add(o->base, "vmm", json_object_new_string(arg));
		return 0;
	case 'd':
		return add_path(o->base, "dir", arg);
	case 'm':
		json_object_object_add(o->base, "method", json_object_new_string(arg));
		return 0;
	case 'M':
		json_object_object_add(o->base, "memory", json_object_new_string(arg));
		return 0;
	case 'c':
	case 't':
	case 'p':
		v = strtol(arg, &end, 10);
		if (*end || v < 1 || v > 86400) {
			usage_error("--%s needs a number from 1 to 86400, not '%s'",
				    opt == 'c'   ? "channels"
				    : opt == 't' ? "timeout"
						 : "parallel",
				    arg);
			return -EINVAL;
		}
		if (opt == 'p')
			o->parallel = v;
		else
			json_object_object_add(o->base, opt == 'c' ? "channels" : "timeout",
					       json_object_new_int((int)v));
		return 0;
	case 'a':
		o->all = true;
		return 0;
	}
	return -EINVAL;
}

/* One vm.checkpoint or vm.restore over its own connection: the report
 * (owned; a failure's comes in the error's data), or NULL with msg set. */
static json_object *ckpt_one(const char *method, const char *name, json_object *base, char *msg,
			     size_t msglen)
{
	_cleanup_json_ json_object *params = json_object_new_object(), *res = NULL, *err = NULL;
	json_object *t = json_object_object_get(base, "timeout"), *data;
	int wait = (t ? json_object_get_int(t) : 600) * 1000 + UPDATE_MARGIN_MS, r;
	proto_client *c = NULL;

	json_object_object_foreach(base, k, v)
	    json_object_object_add(params, k, json_object_get(v));
	json_object_object_add(params, "name", json_object_new_string(name));
	r = proto_client_connect_timeout(socket_path(), wait, &c);
	if (r < 0) {
		snprintf(msg, msglen, "cannot reach cprd at %s: %s", socket_path(), strerror(-r));
		return NULL;
	}
	r = proto_client_call(c, method, TAKE_PTR(params), NULL, 0, wait, &res, &err, NULL, NULL);
	proto_client_free(c);
	if (r == 0)
		return TAKE_PTR(res);
	data = json_object_object_get(err, "data");
	if (r == -EREMOTEIO && data && json_object_object_get(data, "result"))
		return json_object_get(data);
	snprintf(msg, msglen, "%s", r == -EREMOTEIO ? str(err, "message") : strerror(-r));
	return NULL;
}

static void print_ckpt(json_object *rep)
{
	bool restore = streq(str(rep, "operation"), "restore");
	json_object *e = json_object_object_get(rep, "error");

	if (restore)
		printf("%s: restore %s (%s method) in %s ms, %s bytes read, blackout %s ms, VMM "
		       "%s%s%s\n",
		       str(rep, "vm"), str(rep, "result"), str(rep, "method"),
		       str(rep, "restore_ms"), str(rep, "bytes_read"), str(rep, "blackout_ms"),
		       str(rep, "new_vmm"), e ? "; " : "", e ? str(rep, "error") : "");
	else
		printf("%s: checkpoint %s (%s method) in %s ms to %s, %s bytes written, file %s "
		       "bytes, %s on disk%s%s\n",
		       str(rep, "vm"), str(rep, "result"), str(rep, "method"), str(rep, "save_ms"),
		       str(rep, "path"), str(rep, "bytes_written"), str(rep, "file_bytes"),
		       str(rep, "disk_bytes"), e ? "; " : "", e ? str(rep, "error") : "");
}

static json_object *fleet_ckpt_one(const struct fleet *f, const char *name, char *msg,
				   size_t msglen)
{
	return ckpt_one(f->method, name, f->base, msg, msglen);
}

/* --all: every running or paused VM (checkpoint), every checkpointed one
 * (restore), N at a time. */
static int ckpt_fleet(const char *method, struct ckpt_opts *o)
{
	_cleanup_json_ json_object *list = NULL;
	struct fleet f = { .lock = PTHREAD_MUTEX_INITIALIZER,
			   .method = method,
			   .base = o->base,
			   .one = fleet_ckpt_one,
			   .print = print_ckpt };
	bool restore = streq(method, "vm.restore");
	json_object *vms, *reports;
	size_t nok = 0;
	int r;

	r = call("vm.list", NULL, &list);
	if (r != EXIT_OK)
		return r;
	vms = json_object_object_get(list, "vms");
	f.names = calloc(json_object_array_length(vms) + 1, sizeof(char *));
	f.reports = calloc(json_object_array_length(vms) + 1, sizeof(json_object *));
	if (!f.names || !f.reports)
		return fail(EXIT_FAILED, "client", "out of memory");
	for (size_t i = 0; i < json_object_array_length(vms); i++) {
		const char *st = str(json_object_array_get_idx(vms, i), "state");

		if (restore ? streq(st, "checkpointed")
			    : streq(st, "running") || streq(st, "paused"))
			f.names[f.n++] = str(json_object_array_get_idx(vms, i), "name");
	}
	fleet_run(&f, o->parallel);
	reports = json_object_new_array();
	for (size_t i = 0; i < f.n; i++) {
		nok += report_ok(f.reports[i]);
		json_object_array_add(reports, f.reports[i]);
	}
	if (arg_json) {
		json_object *out = json_object_new_object();

		json_object_object_add(out, restore ? "restores" : "checkpoints", reports);
		print_json(out);
		json_object_put(out);
	} else {
		printf("%zu of %zu VM(s) %s\n", nok, f.n, restore ? "restored" : "checkpointed");
		json_object_put(reports);
	}
	free(f.names);
	free(f.reports);
	return nok == f.n ? EXIT_OK : EXIT_FAILED;
}

static int ckpt_verb(const char *method, int argc, char **argv, const struct option *opts,
		     size_t nopts)
{
	struct ckpt_opts o = { .base = json_object_new_object(), .parallel = 1 };
	_cleanup_json_ json_object *base = o.base, *rep = NULL;
	const char *verb = streq(method, "vm.restore") ? "restore" : "checkpoint";
	char msg[512] = "";
	int i;

	i = parse_opts(argc, argv, true, opts, nopts, ckpt_opt, &o);
	if (i < 0)
		return EXIT_USAGE;
	if (o.all ? i != argc : i + 1 != argc)
		return usage_error(
		    o.all ? "%s --all takes no NAME" : "%s needs one VM's NAME, or --all", verb);
	if (o.all)
		return ckpt_fleet(method, &o);
	rep = ckpt_one(method, argv[i], base, msg, sizeof(msg));
	if (!rep)
		return fail(EXIT_FAILED, "remote", "%s", msg);
	if (arg_json)
		print_json(rep);
	else
		print_ckpt(rep);
	if (!report_ok(rep) && !arg_json)
		fprintf(stderr, "cprctl: %s of %s %s: %s\n", verb, argv[i], str(rep, "result"),
			str(rep, "error"));
	return report_ok(rep) ? EXIT_OK : EXIT_FAILED;
}

static int verb_checkpoint(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "dir", required_argument, NULL, 'd' },
		{ "method", required_argument, NULL, 'm' },
		{ "channels", required_argument, NULL, 'c' },
		{ "timeout", required_argument, NULL, 't' },
		{ "all", no_argument, NULL, 'a' },
		{ "parallel", required_argument, NULL, 'p' },
	};

	return ckpt_verb("vm.checkpoint", argc, argv, opts, ELEMENTSOF(opts));
}

static int verb_restore(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "vmm", required_argument, NULL, 'v' },
		{ "dir", required_argument, NULL, 'd' },
		{ "memory", required_argument, NULL, 'M' },
		{ "timeout", required_argument, NULL, 't' },
		{ "all", no_argument, NULL, 'a' },
		{ "parallel", required_argument, NULL, 'p' },
	};

	return ckpt_verb("vm.restore", argc, argv, opts, ELEMENTSOF(opts));
}

static void print_history(json_object *res)
{
	json_object *ups = json_object_object_get(res, "updates");
	/* One VM's: no VM column; --all: the VM after the age. */
	bool all = !json_object_object_get(res, "vm");
	struct table t = { .ncols = all ? 9 : 8,
			   .right = all ? 1u << 5 | 1u << 6 : 1u << 4 | 1u << 5 };

	if (json_object_get_boolean(json_object_object_get(res, "destroyed")))
		printf("VM %s was destroyed; its history as kept (cprctl purge %s removes it):\n",
		       str(res, "vm"), str(res, "vm"));
	if (all)
		table_row(&t, (const char *const[]){ "TIME", "AGE", "VM", "STRATEGY", "RESULT",
						     "BLACKOUT", "TOTAL", "QEMU", "ERROR" });
	else
		table_row(&t, (const char *const[]){ "TIME", "AGE", "STRATEGY", "RESULT",
						     "BLACKOUT", "TOTAL", "QEMU", "ERROR" });
	for (size_t i = 0; i < json_object_array_length(ups); i++) {
		json_object *u = json_object_array_get_idx(ups, i);
		json_object *bo = json_object_object_get(u, "blackout_ms");
		const char *err = json_object_object_get(u, "error") ? str(u, "error") : "";
		char when[64], age[32], ver[80], bos[32], total[32];

		human_time(int_of(u, "time_usec"), when, sizeof(when));
		human_age(int_of(u, "time_usec"), age, sizeof(age));
		strcat(age, " ago");
		snprintf(ver, sizeof(ver), "%s->%s", str(u, "old_version"), str(u, "new_version"));
		snprintf(bos, sizeof(bos), "%s ms", bo ? json_object_get_string(bo) : "?");
		snprintf(total, sizeof(total), "%.1f ms",
			 json_object_get_double(json_object_object_get(u, "total_ms")));
		if (all)
			table_row(&t, (const char *const[]){ when, age, str(u, "vm"),
							     str(u, "strategy"), str(u, "result"),
							     bos, total, ver, err });
		else
			table_row(&t,
				  (const char *const[]){ when, age, str(u, "strategy"),
							 str(u, "result"), bos, total, ver, err });
	}
	if (json_object_array_length(ups) == 0) {
		table_free(&t);
		printf("(no updates)\n");
		return;
	}
	table_print(&t);
}

static int flag_opt(int opt, const char *arg, void *ud)
{
	*(bool *)ud = true;
	return 0;
}

static int verb_history(int argc, char **argv)
{
	static const struct option opts[] = { { "all", no_argument, NULL, 'a' } };
	_cleanup_json_ json_object *res = NULL;
	json_object *p;
	bool all = false;
	int i, r;

	i = parse_opts(argc, argv, true, opts, ELEMENTSOF(opts), flag_opt, &all);
	if (i < 0)
		return EXIT_USAGE;
	if (all ? i != argc : i + 1 != argc)
		return usage_error(all         ? "history --all takes no NAME"
				   : i == argc ? "history needs a VM's NAME, or --all"
					       : "history takes one NAME");
	p = json_object_new_object();
	if (all)
		json_object_object_add(p, "all", json_object_new_boolean(true));
	else
		json_object_object_add(p, "name", json_object_new_string(argv[i]));
	r = call("vm.history", p, &res);
	if (r != EXIT_OK)
		return r;
	if (arg_json)
		print_json(res);
	else
		print_history(res);
	return EXIT_OK;
}

static void print_purged(json_object *res)
{
	printf("what was kept of VM %s (console log, VMM log, history) is removed\n",
	       str(res, "name"));
}

static int verb_purge(int argc, char **argv)
{
	return name_verb(argc, argv, "vm.purge", "name", print_purged, NULL);
}

/* rpc.describe, for people: each method, who may call it, its params. */
static void print_methods(json_object *res)
{
	json_object *ms = json_object_object_get(res, "methods");
	struct table t = { .ncols = 3 };

	printf("cprd %s, protocol %s (JSON-RPC %s)\n", str(res, "version"),
	       str(res, "protocol_version"), str(res, "jsonrpc"));
	table_row(&t, (const char *const[]){ "METHOD", "PERMISSION", "PARAMS" });
	for (size_t i = 0; i < json_object_array_length(ms); i++) {
		json_object *m = json_object_array_get_idx(ms, i);
		json_object *ps = json_object_object_get(m, "params");
		char params[512] = "";

		for (size_t k = 0; k < json_object_array_length(ps); k++) {
			json_object *p = json_object_array_get_idx(ps, k);
			bool req = json_object_get_boolean(json_object_object_get(p, "required"));
			size_t len = strlen(params);

			snprintf(params + len, sizeof(params) - len, "%s%s%s:%s%s", k ? " " : "",
				 req ? "" : "[", str(p, "name"), str(p, "type"), req ? "" : "]");
		}
		table_row(&t, (const char *const[]){ str(m, "name"), str(m, "permission"),
						     params[0] ? params : "-" });
	}
	table_print(&t);
}

static int verb_methods(int argc, char **argv)
{
	_cleanup_json_ json_object *res = NULL;
	int i, r;

	i = parse_opts(argc, argv, true, NULL, 0, NULL, NULL);
	if (i < 0)
		return EXIT_USAGE;
	if (i != argc)
		return usage_error("methods takes no operand");
	r = call("rpc.describe", NULL, &res);
	if (r != EXIT_OK)
		return r;
	if (arg_json)
		print_json(res);
	else
		print_methods(res);
	return EXIT_OK;
}

static int verb_help(int argc, char **argv)
{
	const struct verb *v;
	int i;

	i = parse_opts(argc, argv, true, NULL, 0, NULL, NULL);
	if (i < 0)
		return EXIT_USAGE;
	if (i == argc) {
		usage(stdout);
		return EXIT_OK;
	}
	if (i + 1 != argc)
		return usage_error("help takes one VERB");
	v = verb_find(argv[i]);
	if (!v)
		return usage_error("no verb '%s'", argv[i]);
	verb_usage(stdout, v);
	return EXIT_OK;
}

#define COMMON_HELP                                                                         \
	"Options for every verb:\n"                                                         \
	"  --socket PATH      cprd's socket (else $CPRD_SOCKET, else " DEFAULT_SOCKET ")\n" \
	"  --json             output JSON; on failure one error object on stdout\n"         \
	"  --timeout SECONDS  wait at most this long for cprd (default 30; create 120;\n"   \
	"                     update: the update's own --timeout plus 30)\n"                \
	"  -h, --help         this help; --version  cprctl's and cprd's versions\n"

/* ---- metrics and events ---- */

static int verb_metrics(int argc, char **argv)
{
	_cleanup_json_ json_object *res = NULL;
	int i = parse_opts(argc, argv, true, NULL, 0, NULL, NULL), r;

	if (i < 0)
		return EXIT_USAGE;
	if (i != argc)
		return usage_error("metrics takes no operand, not '%s'", argv[i]);
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

	if (i < 0)
		return EXIT_USAGE;
	if (i != argc)
		return usage_error("events takes no operand, not '%s'", argv[i]);
	r = connect_or_say(timeout_ms(CALL_TIMEOUT_MS), &c);
	if (r != EXIT_OK)
		return r;
	proto_client_set_notify(c, print_event, &dropped);
	/* --timeout bounds the subscription's answer; the events that follow
	 * are waited for as long as cprd is there. */
	r = proto_client_call(c, "events.subscribe", NULL, NULL, 0, timeout_ms(CALL_TIMEOUT_MS),
			      NULL, &error, NULL, NULL);
	if (r == -EREMOTEIO) {
		proto_client_free(c);
		return remote_error(error);
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

static const struct verb verbs[] = {
	{ "create", verb_create, "create NAME --memory SIZE --kernel PATH [OPTIONS]",
	  "define and start a VM; returns once the guest runs",
	  "  --memory SIZE      guest RAM: bytes or 256M, 1G, 2GiB... (required)\n"
	  "  --kernel PATH      the guest kernel (required)\n"
	  "  --initrd PATH      the initial ramdisk\n"
	  "  --append STR       the kernel command line\n"
	  "  --vcpus N          virtual CPUs (default 1)\n"
	  "  --vmm PATH         the QEMU binary (default qemu-system-x86_64 from PATH)\n"
	  "  --tap IFNAME       a tap interface for the guest's network\n"
	  "  --disk PATH[,format=raw|qcow2][,readonly=on][,cache=none|writeback][,serial=S]\n"
	  "                     a virtio disk (repeat for more, at most 4): a raw or qcow2\n"
	  "                     image, which you may open so (a qcow2 image's backing\n"
	  "                     files for reading)\n"
	  "  --machine TYPE     QEMU machine type (default q35)\n"
	  "  --spec FILE        the VM's definition as JSON (vm.create's params, as\n"
	  "                     dumpspec prints them; - reads stdin); options given too\n"
	  "                     win over it\n"
	  "  --cpu MODEL        the guest's CPU model (host under KVM, a named model such as\n"
	  "                     Skylake-Server, or QEMU's default); kept for every VMM\n"
	  "  --cpr-exec         let its VMMs exec a successor, as the cpr-exec update\n"
	  "                     strategy needs (QEMU's sandbox then allows spawning)\n" },
	{ "list", verb_list, "list [--state STATE] [--outdated] [--name]",
	  "all VMs: name, state, pid, memory, vcpus, uptime, QEMU version",
	  "  --state STATE      only VMs in STATE: starting, running, paused, stopping,\n"
	  "                     crashed, checkpointed\n"
	  "  --outdated         only VMs whose VMM binary or a library it maps was\n"
	  "                     replaced on disk since it started (after a package upgrade)\n"
	  "  --name             only the names, one per line\n" },
	{ "status", verb_status, "status [NAME]",
	  "one VM (exit 3 when it is not running); without NAME, cprd itself", NULL },
	{ "fds", verb_fds, "fds NAME", "the fds cprd holds for a VM", NULL },
	{ "dumpspec", verb_dumpspec, "dumpspec NAME",
	  "the VM's definition as JSON, the spec file create takes back", NULL },
	{ "destroy", verb_destroy, "destroy NAME",
	  "stop the VM's VMM and release everything held for it", NULL },
	{ "pause", verb_pause, "pause NAME",
	  "pause the guest's vCPUs; its VMM and everything held for it stay", NULL },
	{ "resume", verb_resume, "resume NAME", "let a paused guest run again", NULL },
	{ "update", verb_update,
	  "update NAME|--all [--outdated] [--check] [--vmm PATH] [--strategy NAME] "
	  "[--timeout SECONDS] [--parallel N]",
	  "replace the VM's VMM under the running guest",
	  "  --vmm PATH         the new QEMU binary (default: the VM's own again)\n"
	  "  --strategy NAME    handover (default), cpr-transfer or cpr-exec\n"
	  "  --timeout SECONDS  bound on the update up to its commit, 1-3600 (default 60)\n"
	  "  --all              every VM; lists the VMs it skips (not running) and why,\n"
	  "                     exits 1 if any was skipped or failed\n"
	  "  --parallel N       with --all: N updates at a time (default 1)\n"
	  "  --check            only the pre-flight: start the new binary beside the guest,\n"
	  "                     check it, end it (with --all: once per binary and machine\n"
	  "                     type; --all always runs these first and stops if one fails)\n"
	  "  --outdated         with --all: only VMs whose VMM was replaced on disk\n" },
	{ "checkpoint", verb_checkpoint,
	  "checkpoint NAME|--all [--dir DIR] [--method cprd|qemu] [--channels N] "
	  "[--timeout SECONDS] [--parallel N]",
	  "save the guest to disk, end its VMM and release its RAM (to survive a host reboot)",
	  "  --dir DIR          the checkpoint directory (default: cprd's own)\n"
	  "  --method M         cprd (default: cprd copies the RAM it holds) or qemu\n"
	  "                     (QEMU's cpr-reboot with mapped-ram and multifd)\n"
	  "  --channels N       qemu method: multifd channels (default: the host's cores)\n"
	  "  --timeout SECONDS  bound on the checkpoint (default 600)\n"
	  "  --all              every running or paused VM\n"
	  "  --parallel N       with --all: N checkpoints at a time (default 1)\n" },
	{ "restore", verb_restore,
	  "restore NAME|--all [--vmm PATH] [--dir DIR] [--memory SIZE] [--timeout SECONDS] "
	  "[--parallel N]",
	  "start a VMM on the VM's checkpoint and resume the guest",
	  "  --vmm PATH         the QEMU binary (default: the VM's own)\n"
	  "  --dir DIR          the checkpoint directory (default: where it was written)\n"
	  "  --memory SIZE      refuse unless the checkpoint holds this much RAM\n"
	  "  --timeout SECONDS  bound on the restore (default 600)\n"
	  "  --all              every checkpointed VM\n"
	  "  --parallel N       with --all: N restores at a time (default 1)\n" },
	{ "history", verb_history, "history NAME|--all",
	  "the VM's updates, newest first: time, age, strategy, result, blackout, total; a "
	  "destroyed VM's as kept",
	  "  --all              the newest updates of every VM, live or destroyed\n" },
	{ "purge", verb_purge, "purge NAME",
	  "remove what is kept of a destroyed VM: its console and VMM logs and history", NULL },
	{ "daemon", verb_daemon, "daemon status | stats [--reset] | reexec [--binary PATH]",
	  "cprd itself: its status; its own time on its event loop; re-execute it",
	  "  --reset            stats: start a new window\n"
	  "  --binary PATH      reexec: into this cprd binary (default: the running one)\n" },
	{ "methods", verb_methods, "methods",
	  "cprd's JSON-RPC methods, their params and who may call them (rpc.describe)", NULL },
	{ "metrics", verb_metrics, "metrics",
	  "cprd's metrics in Prometheus' text format (daemon.metrics)", NULL },
	{ "events", verb_events, "events",
	  "follow cprd's events, one line each, until cprd goes (--json: NDJSON)", NULL },
	{ "help", verb_help, "help [VERB]", "this help, or one verb's", NULL },
};

static const struct verb *verb_find(const char *name)
{
	for (size_t i = 0; i < ELEMENTSOF(verbs); i++)
		if (streq(verbs[i].name, name))
			return &verbs[i];
	return NULL;
}

static void verb_usage(FILE *f, const struct verb *v)
{
	fprintf(f, "Usage: cprctl %s\n\n%s.\n", v->synopsis, v->summary);
	if (v->options)
		fprintf(f, "\nOptions:\n%s", v->options);
	fprintf(f, "\n" COMMON_HELP);
}

static void usage(FILE *f)
{
	fprintf(f, "Usage: cprctl [--socket PATH] [--json] [--timeout SECONDS] VERB [ARGS...]\n"
		   "       cprctl help VERB | VERB --help | --version\n\nVerbs:\n");
	for (size_t i = 0; i < ELEMENTSOF(verbs); i++)
		fprintf(f, "  %-9s %s\n", verbs[i].name, verbs[i].summary);
	fprintf(f, "\n" COMMON_HELP
		   "\nExit status: 0 success, 1 the operation failed, 2 usage error, 3 (status)\n"
		   "the VM is not running, 4 cprd not reachable or no answer in time.\n"
		   "See cprctl(1).\n");
}

int main(int argc, char **argv)
{
	int i;

	i = parse_opts(argc, argv, false, NULL, 0, NULL, NULL);
	if (i < 0)
		return EXIT_USAGE;
	if (i >= argc) {
		usage(stderr);
		return fail(EXIT_USAGE, "usage", "no verb given");
	}
	arg_verb = verb_find(argv[i]);
	if (!arg_verb)
		return fail(EXIT_USAGE, "usage", "unknown verb '%s'; try cprctl --help", argv[i]);
	return arg_verb->fn(argc - i, argv + i);
}
