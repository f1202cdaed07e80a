/* SPDX-License-Identifier: MIT */
/* The JSON-RPC methods: parameter checking here, the work in vm.c. */
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "common/json.h"
#include "common/valid.h"
#include "daemon/observe/archive.h"
#include "daemon/ops/check.h"
#include "daemon/ops/checkpoint.h"
#include "daemon/devices/devices.h"
#include "daemon/observe/events.h"
#include "daemon/core/fdstore.h"
#include "daemon/observe/log.h"
#include "daemon/observe/metrics.h"
#include "daemon/rpc/methods.h"
#include "daemon/host/policy.h"
#include "daemon/core/registry.h"
#include "daemon/core/server.h"
#include "daemon/observe/stats.h"
#include "daemon/strategies/strategy.h"
#include "daemon/ops/update.h"
#include "daemon/core/vm.h"
#include "kvm/qemu.h"
#include "proto/jsonrpc.h"

/*
 * Each method's params are declared once, in a struct param[] next to its
 * handler, and named in rpc_methods[] below: the server describes them
 * from there (rpc.describe) and the handler binds them with params_bind(),
 * which takes the spec from the method being called. out[i] receives
 * params[i]: const char * for strings, uint64_t for uint and size, bool,
 * json_object * (borrowed) for string arrays.
 */

static const char *param_type_text(enum param_type t)
{
	switch (t) {
	case PARAM_STRING:
		return "a string";
	case PARAM_UINT:
		return "a non-negative integer";
	case PARAM_SIZE:
		return "a size in bytes or a string like \"256M\"";
	case PARAM_BOOL:
		return "a boolean";
	case PARAM_OBJECTS:
		return "an array of objects";
	default:
		return "an array of strings";
	}
}

/* Whether v is an array whose every element is of type t. */
static bool array_of(json_object *v, json_type t)
{
	if (!json_object_is_type(v, json_type_array))
		return false;
	for (size_t i = 0; i < json_object_array_length(v); i++)
		if (!json_object_is_type(json_object_array_get_idx(v, i), t))
			return false;
	return true;
}

static bool parse_one(json_object *v, enum param_type type, void *out)
{
	switch (type) {
	case PARAM_STRING:
		if (!json_object_is_type(v, json_type_string))
			return false;
		*(const char **)out = json_object_get_string(v);
		return true;
	case PARAM_UINT:
		if (!json_object_is_type(v, json_type_int) || json_object_get_int64(v) < 0)
			return false;
		*(uint64_t *)out = (uint64_t)json_object_get_int64(v);
		return true;
	case PARAM_SIZE:
		if (json_object_is_type(v, json_type_int) && json_object_get_int64(v) >= 0) {
			*(uint64_t *)out = json_object_get_uint64(v);
			return true;
		}
		return json_object_is_type(v, json_type_string) &&
		       qemu_parse_size(json_object_get_string(v), out) == 0;
	case PARAM_BOOL:
		if (!json_object_is_type(v, json_type_boolean))
			return false;
		*(bool *)out = json_object_get_boolean(v);
		return true;
	case PARAM_STRINGS:
	case PARAM_OBJECTS:
		if (!array_of(v, type == PARAM_STRINGS ? json_type_string : json_type_object))
			return false;
		*(json_object **)out = v;
		return true;
	}
	return false;
}

/* json-c strings may hold a NUL: everything after it would be lost in C
 * ("x\u0000y" would name a VM "x"). */
static bool has_nul(json_object *v)
{
	if (json_object_is_type(v, json_type_string))
		return (size_t)json_object_get_string_len(v) != strlen(json_object_get_string(v));
	if (json_object_is_type(v, json_type_array))
		for (size_t i = 0; i < json_object_array_length(v); i++)
			if (has_nul(json_object_array_get_idx(v, i)))
				return true;
	if (json_object_is_type(v, json_type_object)) {
		json_object_object_foreach(v, k, x)
		{
			(void)k;
			if (has_nul(x))
				return true;
		}
	}
	return false;
}

/* Check params against the called method's spec and fill out[] (n of them,
 * one per declared param); on any problem answer c and return false. */
/* The i-th device parameter of a method with METHOD_DEVICE_PARAMS, in
 * *ret; false past the last. */
static bool device_param(const struct method *m, size_t i, struct param *ret)
{
	const struct device_type *t;

	if (!(m->flags & METHOD_DEVICE_PARAMS))
		return false;
	for (size_t k = 0; (t = device_type_nth(k)); k++)
		if (t->param && i-- == 0) {
			*ret = (struct param){ t->param,
					       t->param_type == json_type_array ? PARAM_OBJECTS
										: PARAM_STRING,
					       false };
			return true;
		}
	return false;
}

static bool param_bind(struct call *c, json_object *params, const struct param *spec, void *out)
{
	json_object *v = NULL;

	if (!params || !json_object_object_get_ex(params, spec->name, &v) || !v) {
		if (spec->required) {
			call_fail_param(c, JSONRPC_INVALID_PARAMS, spec->name,
					"missing parameter '%s'", spec->name);
			return false;
		}
		return true;
	}
	if (spec->type != PARAM_UINT && spec->type != PARAM_SIZE && spec->type != PARAM_BOOL &&
	    has_nul(v)) {
		call_fail_param(c, JSONRPC_INVALID_PARAMS, spec->name,
				"parameter '%s' must not contain a NUL byte", spec->name);
		return false;
	}
	if (!parse_one(v, spec->type, out)) {
		call_fail_param(c, JSONRPC_INVALID_PARAMS, spec->name, "parameter '%s' must be %s",
				spec->name, param_type_text(spec->type));
		return false;
	}
	return true;
}

static bool params_bind(struct call *c, json_object *params, void *const *out, size_t n)
{
	const struct method *m = call_method(c);
	const struct param *spec = m->params;
	struct param dp;

	if (n != m->n_params) { /* a handler out of step with its table */
		call_fail(c, JSONRPC_INTERNAL_ERROR, "method '%s' binds %zu of %zu params", m->name,
			  n, m->n_params);
		return false;
	}
	for (size_t i = 0; i < n; i++)
		if (!param_bind(c, params, &spec[i], out[i]))
			return false;
	/* Read by the handler (devices_from_json()); checked here like its own. */
	for (size_t i = 0; device_param(m, i, &dp); i++)
		if (!param_bind(c, params, &dp, &(const char *){ NULL }))
			return false;
	if (!params)
		return true;
	json_object_object_foreach(params, key, val)
	{
		bool known = false;

		(void)val;
		for (size_t i = 0; i < n && !known; i++)
			known = streq(spec[i].name, key);
		for (size_t i = 0; !known && device_param(m, i, &dp); i++)
			known = streq(dp.name, key);
		if (!known) {
			_cleanup_free_ char *k = strndup(key, 64);

			call_fail_param(c, JSONRPC_INVALID_PARAMS, k ? k : "?",
					"unknown parameter '%.64s'", key);
			return false;
		}
	}
	return true;
}

static struct vm *find_vm_or_fail(struct daemon *d, struct call *c, const char *key,
				  const char *name)
{
	struct vm *vm = vm_find(d, name);

	if (!vm)
		call_fail_param(c, JSONRPC_ERR_NOT_FOUND, key, "no VM named '%.64s'", name);
	return vm;
}

/* Methods about one VM take exactly {name: NAME} (fd.*: {vm: NAME}), as
 * their one declared param says. Answers c and returns NULL when the params
 * are wrong or there is no such VM. */
static struct vm *vm_param(struct daemon *d, struct call *c, json_object *params)
{
	const char *name = NULL;
	void *const out[] = { &name };

	if (!params_bind(c, params, out, ELEMENTSOF(out)))
		return NULL;
	return find_vm_or_fail(d, c, call_method(c)->params[0].name, name);
}

static const struct param name_params[] = { { "name", PARAM_STRING, true } };
static const struct param vm_params[] = { { "vm", PARAM_STRING, true } };

/* ---- vm.* ---- */

/* A regular file, named by an absolute path, that the peer itself may
 * read: cprd reads it as root and hands it to a VMM, so a peer that is
 * not root must not name what it could not read. What is stored for a
 * later VMM (*ret_path) is, for such a peer, the canonical path that was
 * judged and the identity of the file found there (*ret_id), which every
 * later open must find again (vmm_open_image()); root's path is kept as
 * given, without an identity. */
static int check_file(struct call *c, const char *path, char **ret_path, struct file_id *ret_id)
{
	_cleanup_close_ int fd = -EBADF;
	struct creds cr;
	struct stat st;
	int r;

	*ret_id = (struct file_id){};
	if (call_peer(c)->uid == 0) {
		r = open_as(path, NULL, &fd, NULL);
		if (r < 0)
			return r;
		*ret_path = strdup(path);
		return *ret_path ? 0 : -ENOMEM;
	}
	r = call_peer_creds(c, &cr);
	if (r < 0)
		return r;
	r = open_as(path, &cr, &fd, ret_path);
	if (r < 0)
		return r;
	if (fstat(fd, &st) < 0) {
		r = -errno;
		free(*ret_path);
		*ret_path = NULL;
		return r;
	}
	*ret_id = (struct file_id){ .dev = st.st_dev, .ino = st.st_ino, .set = true };
	return 0;
}

/* What the devices name (disk images) judged as the peer could. */
static int prepare_devices(struct call *c, struct device_args *args, const char **ret_param,
			   char *why, size_t size)
{
	struct creds cr;
	int r;

	if (call_peer(c)->uid == 0)
		return devices_prepare(args, NULL, ret_param, why, size);
	r = call_peer_creds(c, &cr);
	if (r < 0) {
		snprintf(why, size, "cannot tell the caller's groups: %s", strerror(-r));
		return r;
	}
	return devices_prepare(args, &cr, ret_param, why, size);
}

static const char *check_file_error(int r)
{
	switch (r) {
	case -EINVAL:
		return "must be an absolute path";
	case -EACCES:
		return "not readable by you (cprd opens it with the rights of the peer "
		       "that asks)";
	case -EPERM:
		return "it or a directory above it has a POSIX ACL, which cprd does not judge; "
		       "use a path without ACLs";
	case -EBADFD:
		return "not a regular file";
	case -ELOOP:
		return "a symlink loop, or changed while it was looked up";
	case -ETXTBSY:
		return "it or a directory above it is yours or writable by you: cprd opens it "
		       "again for every new VMM, so it must be a file you cannot change (put it "
		       "in a directory of root's)";
	default:
		return strerror(-r);
	}
}

/* Resolve the VMM binary as execvp would, to an absolute path. */
static int find_vmm(const char *name, char **ret)
{
	const char *path = getenv("PATH");
	_cleanup_free_ char *dirs = NULL;
	char *dir, *save = NULL, buf[PATH_MAX];

	if (strchr(name, '/')) {
		if (name[0] != '/')
			return -EINVAL;
		if (access(name, X_OK) < 0)
			return -errno;
		*ret = strdup(name);
		return *ret ? 0 : -ENOMEM;
	}
	dirs = strdup(path ? path : "/usr/local/bin:/usr/bin:/bin");
	if (!dirs)
		return -ENOMEM;
	for (dir = strtok_r(dirs, ":", &save); dir; dir = strtok_r(NULL, ":", &save)) {
		snprintf(buf, sizeof(buf), "%s/%s", dir, name);
		if (access(buf, X_OK) == 0) {
			*ret = strdup(buf);
			return *ret ? 0 : -ENOMEM;
		}
	}
	return -ENOENT;
}

/* A peer that is not root runs, as root, only what root allowed
 * (policy.h), and what runs is the canonical path that was judged, never
 * the path as named: a symlink of the peer's could point elsewhere by the
 * time the VMM starts (now, or at a later update or restore, which judge
 * the stored path again). Root keeps its path as given (root could run
 * anything, and may mean a link it owns that follows new versions).
 * Returns what to store and run; NULL: c is answered. */
static char *vmm_allowed_or_fail(struct daemon *d, struct call *c, const char *binary)
{
	char *canon = NULL;
	int r;

	if (call_peer(c)->uid == 0)
		r = (canon = strdup(binary)) ? 0 : -ENOMEM;
	else
		r = policy_may_run(&d->policy, binary, &canon);
	if (r == 0)
		return canon;
	if (r == -ENOMEM)
		call_fail(c, JSONRPC_ERR_RESOURCE, "out of memory");
	else
		call_fail_param(
		    c, JSONRPC_ERR_PERMISSION, "vmm", "VMM binary '%.200s' %s", binary,
		    r == -EACCES
			? "is not in the allow-list of VMM binaries (see cprd(8), --vmm-allow)"
		    : r == -EPERM ? "or a directory above it can be changed by others than root"
				  : strerror(-r));
	return NULL;
}

/* The binary a later VMM of a VM runs: resolved as execvp would, else
 * kept as named (a missing or unusable one is not refused here: the start
 * fails and the operation says so, as it rolls back), and allowed for this
 * peer. NULL: c is answered. */
static char *new_vmm_or_fail(struct daemon *d, struct call *c, const char *name)
{
	_cleanup_free_ char *binary = NULL;

	if (find_vmm(name, &binary) < 0)
		binary = strdup(name);
	if (!binary) {
		call_fail(c, JSONRPC_ERR_RESOURCE, "out of memory");
		return NULL;
	}
	return vmm_allowed_or_fail(d, c, binary);
}

/* Every socket a VMM of the VM listens on lies below STATE_DIR/vms/NAME
 * (the longest: VM_LONGEST_SOCKET) and must fit a sockaddr_un: said at
 * create, rather than by the VMM failing to bind with "File name too long"
 * at its start or, worse, at a later update. */
static bool vm_name_fits_or_fail(struct daemon *d, struct call *c, const char *name)
{
	size_t fixed = strlen(d->state_dir) + strlen("/vms//" VM_LONGEST_SOCKET),
	       max = sizeof(((struct sockaddr_un *)NULL)->sun_path) - 1;

	if (fixed + strlen(name) <= max)
		return true;
	if (fixed >= max)
		call_fail_param(c, JSONRPC_INVALID_PARAMS, "name",
				"the state directory %.200s is too long for any VM's sockets "
				"(at most %zu bytes with %s)",
				d->state_dir, max, "/vms/NAME/" VM_LONGEST_SOCKET);
	else
		call_fail_param(
		    c, JSONRPC_INVALID_PARAMS, "name",
		    "VM name '%.64s' is too long for the state directory %.200s: its "
		    "sockets (%.200s/vms/NAME/" VM_LONGEST_SOCKET
		    ") may have at most %zu bytes; use a name of at most %zu characters",
		    name, d->state_dir, d->state_dir, max, max - fixed);
	return false;
}

static void format_size(uint64_t b, char *buf, size_t n)
{
	if (b >= (1ULL << 30))
		snprintf(buf, n, "%.1f GiB", (double)b / (1ULL << 30));
	else
		snprintf(buf, n, "%" PRIu64 " MiB", b >> 20);
}

/* Checked as given, before it is rounded up to whole MiB: rounding first
 * would wrap 2^64-1 to 0 and report "16" (bytes) as 1048576. A bare number
 * is bytes, as README says. */
static bool memory_ok(struct call *c, uint64_t bytes)
{
	uint64_t phys = (uint64_t)sysconf(_SC_PHYS_PAGES) * (uint64_t)sysconf(_SC_PAGESIZE);
	char a[32], b[32];

	if (bytes < QEMU_MIN_MEMORY) {
		call_fail_param(c, JSONRPC_INVALID_PARAMS, "memory",
				"memory must be at least 16 MiB (got %" PRIu64
				" bytes; a number without a unit is bytes: say \"%" PRIu64
				"M\" for MiB)",
				bytes, bytes);
		return false;
	}
	if (bytes > phys) {
		format_size(bytes, a, sizeof(a));
		format_size(phys, b, sizeof(b));
		call_fail_param(c, JSONRPC_INVALID_PARAMS, "memory",
				"memory %s exceeds this host's physical memory (%s)", a, b);
		return false;
	}
	return true;
}

static const struct param vm_create_params[] = {
	{ "name", PARAM_STRING, true },    { "memory", PARAM_SIZE, true },
	{ "vcpus", PARAM_UINT, false },    { "kernel", PARAM_STRING, true },
	{ "initrd", PARAM_STRING, false }, { "append", PARAM_STRING, false },
	{ "vmm", PARAM_STRING, false },    { "machine", PARAM_STRING, false },
	{ "cpr_exec", PARAM_BOOL, false }, { "cpu", PARAM_STRING, false },
};

static void m_vm_create(struct daemon *d, struct call *c, json_object *params)
{
	const char *name = NULL, *kernel = NULL, *initrd = NULL, *append = NULL, *vmm = NULL,
		   *machine = NULL, *cpu = NULL;
	uint64_t memory = 0, vcpus = 1;
	bool cpr_exec = false;
	void *const out[] = { &name,   &memory, &vcpus,   &kernel,   &initrd,
			      &append, &vmm,    &machine, &cpr_exec, &cpu };
	_cleanup_free_ char *found = NULL;
	struct vm_config cfg = {};
	const char *dev_param;
	char why[256];
	int r;

	if (!params_bind(c, params, out, ELEMENTSOF(out)))
		return;
	if (!memstore_name_is_valid(name)) {
		call_fail_param(
		    c, JSONRPC_INVALID_PARAMS, "name",
		    "invalid VM name '%.64s': use 1-63 letters, digits, '-', '_' or '.', not "
		    "starting with '.'",
		    name);
		return;
	}
	if (vm_find(d, name)) {
		call_fail_param(c, JSONRPC_ERR_EXISTS, "name", "a VM named '%s' already exists",
				name);
		return;
	}
	if (!memory_ok(c, memory))
		return;
	/* cannot wrap: memory is at most the host's RAM here */
	memory = (memory + (1 << 20) - 1) & ~((uint64_t)(1 << 20) - 1);
	if (vcpus < 1 || vcpus > VM_MAX_VCPUS) {
		call_fail_param(c, JSONRPC_INVALID_PARAMS, "vcpus",
				"vcpus must be between 1 and 256");
		return;
	}
	if (!vm_name_fits_or_fail(d, c, name))
		return;
	const char *files[][2] = { { "kernel", kernel }, { "initrd", initrd } };
	char **stored[] = { &cfg.kernel, &cfg.initrd };
	struct file_id *ids[] = { &cfg.kernel_id, &cfg.initrd_id };
	for (size_t i = 0; i < ELEMENTSOF(files); i++) {
		if (!files[i][1])
			continue;
		r = check_file(c, files[i][1], stored[i], ids[i]);
		if (r < 0) {
			call_fail_param(c,
					r == -EACCES || r == -EPERM || r == -ETXTBSY
					    ? JSONRPC_ERR_PERMISSION
					    : JSONRPC_INVALID_PARAMS,
					files[i][0], "%s '%.200s': %s", files[i][0], files[i][1],
					check_file_error(r));
			vm_config_done(&cfg);
			return;
		}
	}
	/* params_bind() checked their types. */
	if (devices_from_json(params, &cfg.devices, &dev_param) < 0) {
		call_fail(c, JSONRPC_ERR_RESOURCE, "out of memory");
		vm_config_done(&cfg);
		return;
	}
	if (devices_refused(&cfg.devices, &dev_param, why, sizeof(why))) {
		call_fail_param(c, JSONRPC_INVALID_PARAMS, dev_param, "%s", why);
		vm_config_done(&cfg);
		return;
	}
	if ((r = prepare_devices(c, &cfg.devices, &dev_param, why, sizeof(why))) < 0) {
		call_fail_param(c,
				r == -EACCES || r == -EPERM ? JSONRPC_ERR_PERMISSION
							    : JSONRPC_INVALID_PARAMS,
				dev_param, "%s", why);
		vm_config_done(&cfg);
		return;
	}
	if (append && str_has_ctrl(append)) {
		call_fail_param(c, JSONRPC_INVALID_PARAMS, "append",
				"append must be a single line without control characters");
		vm_config_done(&cfg);
		return;
	}
	if (machine && (!machine[0] || strlen(machine) > 64 ||
			strspn(machine, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
					"0123456789-_.") != strlen(machine))) {
		call_fail_param(
		    c, JSONRPC_INVALID_PARAMS, "machine",
		    "machine type '%.64s' must be 1-64 letters, digits, '-', '_' or '.'", machine);
		vm_config_done(&cfg);
		return;
	}
	/* A model name only: no feature list (",+avx"), which QEMU would
	 * read as more options. */
	if (cpu && (!cpu[0] || strlen(cpu) > 64 ||
		    strspn(cpu, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
				"0123456789-_.") != strlen(cpu))) {
		call_fail_param(c, JSONRPC_INVALID_PARAMS, "cpu",
				"CPU model '%.64s' must be 1-64 letters, digits, '-', '_' or '.'",
				cpu);
		vm_config_done(&cfg);
		return;
	}
	vmm = vmm ? vmm : QEMU_DEFAULT_BINARY;
	r = find_vmm(vmm, &found);
	if (r < 0) {
		call_fail_param(c, JSONRPC_ERR_VMM, "vmm", "VMM binary '%.200s' %s", vmm,
				r == -ENOENT   ? "not found"
				: r == -EINVAL ? "must be an absolute path or a name in PATH"
					       : strerror(-r));
		vm_config_done(&cfg);
		return;
	}
	if (!(cfg.vmm = vmm_allowed_or_fail(d, c, found))) {
		vm_config_done(&cfg);
		return;
	}
	cfg.name = strdup(name);
	cfg.append = append ? strdup(append) : NULL;
	cfg.machine = strdup(machine ? machine : "q35");
	cfg.cpu = cpu ? strdup(cpu) : NULL;
	cfg.memory_bytes = memory;
	cfg.vcpus = (unsigned)vcpus;
	cfg.cpr_exec = cpr_exec;
	if (!cfg.name || !cfg.machine || (append && !cfg.append) || (cpu && !cfg.cpu)) {
		vm_config_done(&cfg);
		call_fail(c, JSONRPC_ERR_RESOURCE, "out of memory");
		return;
	}
	vm_create(d, &cfg, c);
}

static const struct param vm_list_params[] = { { "outdated", PARAM_BOOL, false } };

static void m_vm_list(struct daemon *d, struct call *c, json_object *params)
{
	bool outdated = false;
	void *const out[] = { &outdated };
	json_object *arr, *res;

	if (!params_bind(c, params, out, ELEMENTSOF(out)))
		return;
	arr = json_object_new_array();
	for (struct vm *vm = d->vms; vm; vm = vm->next) {
		/* The status reads the VMM's maps once; the filter uses that. */
		json_object *st = vm_to_json(vm);

		if (!outdated || json_object_get_boolean(json_object_object_get(st, "outdated")))
			json_object_array_add(arr, st);
		else
			json_object_put(st);
	}
	res = json_object_new_object();
	json_object_object_add(res, "vms", arr);
	call_reply(c, res);
}

static void m_vm_status(struct daemon *d, struct call *c, json_object *params)
{
	struct vm *vm = vm_param(d, c, params);

	if (vm)
		call_reply(c, vm_to_json(vm));
}

static void m_vm_destroy(struct daemon *d, struct call *c, json_object *params)
{
	struct vm *vm = vm_param(d, c, params);

	if (!vm)
		return;
	/* The guest is in its checkpoint: that goes with the VM. */
	if (!vm_busy(vm) && vm->state == VM_CHECKPOINTED)
		checkpoint_discard(vm);
	vm_destroy(vm, c);
}

static void m_vm_pause(struct daemon *d, struct call *c, json_object *params)
{
	struct vm *vm = vm_param(d, c, params);

	if (vm)
		vm_pause(vm, true, c);
}

static void m_vm_resume(struct daemon *d, struct call *c, json_object *params)
{
	struct vm *vm = vm_param(d, c, params);

	if (vm)
		vm_pause(vm, false, c);
}

static const struct param vm_update_params[] = {
	{ "name", PARAM_STRING, true },      { "vmm", PARAM_STRING, false },
	{ "strategy", PARAM_STRING, false }, { "timeout", PARAM_UINT, false },
	{ "check", PARAM_BOOL, false },
};

static void m_vm_update(struct daemon *d, struct call *c, json_object *params)
{
	const char *name = NULL, *vmm = NULL, *strategy = "handover";
	uint64_t timeout = 60;
	bool check = false;
	void *const out[] = { &name, &vmm, &strategy, &timeout, &check };
	_cleanup_free_ char *binary = NULL;
	const struct strategy *s;
	char replaced[256], why[512];
	struct vm *vm;

	if (!params_bind(c, params, out, ELEMENTSOF(out)))
		return;
	if (!(vm = find_vm_or_fail(d, c, "name", name)))
		return;
	s = strategy_find(strategy);
	if (!s) {
		call_fail_param(c, JSONRPC_INVALID_PARAMS, "strategy",
				"unknown strategy '%.32s' (%s)", strategy, strategy_names());
		return;
	}
	if (timeout < 1 || timeout > 3600) {
		call_fail_param(c, JSONRPC_INVALID_PARAMS, "timeout",
				"timeout must be between 1 and 3600 seconds");
		return;
	}
	if (vm->op && !vm->op->type->request) {
		call_fail(c, JSONRPC_ERR_BUSY, "VM '%s' is already %s", vm->cfg.name,
			  vm->op->type->busy);
		return;
	}
	if (vm->op && vm->state == VM_RUNNING) { /* a pause or resume not yet answered */
		call_fail(c, JSONRPC_ERR_BUSY, "VM '%s' is %s; try again when that has finished",
			  vm->cfg.name, vm_busy(vm));
		return;
	}
	/* A VM that waits on a request (started, stopped, paused) is refused
	 * for its state. */
	if (!op_may_start_in(&update_op_type, vm->state) || vm->op) {
		op_fail_state(c, vm, &update_op_type);
		return;
	}
	if (!(binary = new_vmm_or_fail(d, c, vmm ? vmm : vm->cfg.vmm)))
		return;
	if (!devices_carried(&vm->cfg.devices, s->carry, why, sizeof(why)) ||
	    (s->possible && !s->possible(vm, binary, why, sizeof(why)))) {
		log_warning("VM %s: %s update to %s refused: %s", vm->cfg.name, s->name, binary,
			    why);
		call_fail(c, JSONRPC_ERR_VMM,
			  "VM '%s': %s update to '%s' refused before the guest was paused: %s; "
			  "nothing was changed",
			  vm->cfg.name, s->name, binary, why);
		return;
	}
	if (check)
		check_start(vm, s, binary, (double)timeout, c);
	else if (streq(binary, vm->cfg.vmm) && vm_outdated(vm, replaced, sizeof(replaced)) == 0)
		update_start(vm, s, binary, (double)timeout, c);
	else /* another binary, or this one replaced on disk */
		check_then_update(vm, s, binary, (double)timeout, c);
}

static const struct param vm_checkpoint_params[] = {
	{ "name", PARAM_STRING, true },   { "method", PARAM_STRING, false },
	{ "dir", PARAM_STRING, false },   { "channels", PARAM_UINT, false },
	{ "timeout", PARAM_UINT, false },
};

/* A VM being checkpointed, restored, updated or started is busy. */
static bool vm_idle_or_fail(struct call *c, struct vm *vm)
{
	if (!vm_busy(vm))
		return true;
	call_fail(c, JSONRPC_ERR_BUSY, "VM '%s' is %s; try again when that has finished",
		  vm->cfg.name, vm_busy(vm));
	return false;
}

/* cprd creates the checkpoint directory, renames aside and removes what
 * is in it, as root: a peer other than root names none but cprd's own
 * (--checkpoint-dir), as it is given there. */
static bool dir_param_ok(struct daemon *d, struct call *c, const char *dir)
{
	if (dir && (dir[0] != '/' || strlen(dir) >= PATH_MAX - 2 * MEMSTORE_NAME_MAX)) {
		call_fail_param(c, JSONRPC_INVALID_PARAMS, "dir", "dir must be an absolute path");
		return false;
	}
	if (!dir || call_peer(c)->uid == 0 || streq(dir, d->checkpoint_dir))
		return true;
	call_fail_param(c, JSONRPC_ERR_PERMISSION, "dir",
			"'%.200s' is not cprd's checkpoint directory (%s): only root may name "
			"another",
			dir, d->checkpoint_dir);
	return false;
}

static void m_vm_checkpoint(struct daemon *d, struct call *c, json_object *params)
{
	const char *name = NULL, *method = "cprd", *dir = NULL;
	uint64_t channels = 0, timeout = 600;
	void *const out[] = { &name, &method, &dir, &channels, &timeout };
	struct vm *vm;
	char why[256];

	if (!params_bind(c, params, out, ELEMENTSOF(out)))
		return;
	if (!(vm = find_vm_or_fail(d, c, "name", name)))
		return;
	if (!streq(method, "cprd") && !streq(method, "qemu")) {
		call_fail_param(c, JSONRPC_INVALID_PARAMS, "method",
				"unknown method '%.32s' (cprd, qemu)", method);
		return;
	}
	if (channels > 64 || timeout < 1 || timeout > 86400) {
		call_fail_param(c, JSONRPC_INVALID_PARAMS, channels > 64 ? "channels" : "timeout",
				"channels must be at most 64, timeout 1 to 86400 seconds");
		return;
	}
	if (!dir_param_ok(d, c, dir) || !vm_idle_or_fail(c, vm))
		return;
	if (!op_may_start_in(&checkpoint_op_type, vm->state)) {
		op_fail_state(c, vm, &checkpoint_op_type);
		return;
	}
	if (!devices_carried(&vm->cfg.devices, DEVICE_BY_CHECKPOINT, why, sizeof(why))) {
		call_fail(c, JSONRPC_ERR_BAD_STATE, "VM '%s' cannot be checkpointed: %s",
			  vm->cfg.name, why);
		return;
	}
	checkpoint_start(vm,
			 &(struct checkpoint_args){ .method = method,
						    .dir = dir,
						    .channels = (unsigned)channels,
						    .timeout = (double)timeout },
			 c);
}

static const struct param vm_restore_params[] = {
	{ "name", PARAM_STRING, true },   { "vmm", PARAM_STRING, false },
	{ "dir", PARAM_STRING, false },   { "memory", PARAM_SIZE, false },
	{ "timeout", PARAM_UINT, false },
};

static void m_vm_restore(struct daemon *d, struct call *c, json_object *params)
{
	const char *name = NULL, *vmm = NULL, *dir = NULL;
	uint64_t memory = 0, timeout = 600;
	void *const out[] = { &name, &vmm, &dir, &memory, &timeout };
	_cleanup_free_ char *binary = NULL;
	struct vm *vm;

	if (!params_bind(c, params, out, ELEMENTSOF(out)))
		return;
	if (!(vm = find_vm_or_fail(d, c, "name", name)))
		return;
	if (timeout < 1 || timeout > 86400) {
		call_fail_param(c, JSONRPC_INVALID_PARAMS, "timeout",
				"timeout must be between 1 and 86400 seconds");
		return;
	}
	if (!dir_param_ok(d, c, dir) || !vm_idle_or_fail(c, vm))
		return;
	if (!op_may_start_in(&restore_op_type, vm->state)) {
		op_fail_state(c, vm, &restore_op_type);
		return;
	}
	/* The stored binary too: a restore starts a VMM on this peer's behalf. */
	if (!(binary = new_vmm_or_fail(d, c, vmm ? vmm : vm->cfg.vmm)))
		return;
	restore_start(
	    vm,
	    &(struct restore_args){
		.binary = binary, .dir = dir, .memory_bytes = memory, .timeout = (double)timeout },
	    c);
}

static const struct param vm_history_params[] = {
	{ "name", PARAM_STRING, false },
	{ "all", PARAM_BOOL, false },
};

#define HISTORY_ALL_MAX 200

static int64_t time_of(json_object *rec)
{
	return json_object_get_int64(json_object_object_get(rec, "time_usec"));
}

static int newest_first(const void *a, const void *b)
{
	int64_t x = time_of(*(json_object *const *)a), y = time_of(*(json_object *const *)b);

	return (x < y) - (x > y);
}

/* The newest updates of every VM, live or kept (archive.c), newest first,
 * at most max; each names its VM. */
static json_object *history_all(struct daemon *d, size_t max)
{
	json_object *all = json_object_new_array();

	for (struct vm *vm = d->vms; vm; vm = vm->next) {
		json_object *h = update_history(vm);

		for (size_t i = 0; i < json_object_array_length(h); i++) {
			json_object *r = json_object_array_get_idx(h, i);

			json_object_object_add(r, "vm", json_object_new_string(vm->cfg.name));
			json_object_array_add(all, json_object_get(r));
		}
		json_object_put(h);
	}
	archive_histories(d, all);
	json_object_array_sort(all, newest_first);
	if (json_object_array_length(all) > max)
		json_object_array_del_idx(all, max, json_object_array_length(all) - max);
	return all;
}

/* One VM's updates, that VM's kept ones once it is destroyed, or with
 * "all" the newest of every VM, live or destroyed. */
static void m_vm_history(struct daemon *d, struct call *c, json_object *params)
{
	const char *name = NULL;
	bool all = false;
	void *const out[] = { &name, &all };
	json_object *res, *kept = NULL;
	struct vm *vm;

	if (!params_bind(c, params, out, ELEMENTSOF(out)))
		return;
	if (!name == !all) {
		call_fail_param(c, JSONRPC_INVALID_PARAMS, name ? "all" : "name",
				"give either a VM's name or all");
		return;
	}
	res = json_object_new_object();
	if (all) {
		json_object_object_add(res, "updates", history_all(d, HISTORY_ALL_MAX));
		call_reply(c, res);
		return;
	}
	vm = vm_find(d, name);
	if (!vm && archive_history(d, name, &kept) < 0) {
		json_object_put(res);
		call_fail_param(c, JSONRPC_ERR_NOT_FOUND, "name",
				"no VM named '%.64s', and nothing kept of one", name);
		return;
	}
	json_object_object_add(res, "vm", json_object_new_string(name));
	json_object_object_add(res, "updates", vm ? update_history(vm) : kept);
	if (!vm)
		json_object_object_add(res, "destroyed", json_object_new_boolean(true));
	call_reply(c, res);
}

/* Remove what is kept of a destroyed VM. */
static void m_vm_purge(struct daemon *d, struct call *c, json_object *params)
{
	const char *name = NULL;
	void *const out[] = { &name };
	json_object *res;
	int r;

	if (!params_bind(c, params, out, ELEMENTSOF(out)))
		return;
	if (vm_find(d, name)) {
		call_fail_param(c, JSONRPC_ERR_BAD_STATE, "name",
				"VM '%.64s' exists: destroy it first (its logs are then kept, "
				"and can be purged)",
				name);
		return;
	}
	r = archive_purge(d, name);
	if (r < 0) {
		if (r == -ENOENT)
			call_fail_param(c, JSONRPC_ERR_NOT_FOUND, "name",
					"nothing is kept of a VM named '%.64s'", name);
		else
			call_fail_param(c, JSONRPC_ERR_RESOURCE, "name",
					"cannot remove what is kept of VM '%.64s': %s", name,
					strerror(-r));
		return;
	}
	log_info("VM %s: what was kept of it is removed", name);
	res = json_object_new_object();
	json_object_object_add(res, "name", json_object_new_string(name));
	json_object_object_add(res, "purged", json_object_new_boolean(true));
	call_reply(c, res);
}

/* ---- fd.* ---- */

static json_object *fds_result(struct vm *vm)
{
	json_object *res = json_object_new_object();

	json_object_object_add(res, "vm", json_object_new_string(vm->cfg.name));
	json_object_object_add(res, "fds", vm_fds_to_json(vm));
	return res;
}

static void m_fd_list(struct daemon *d, struct call *c, json_object *params)
{
	struct vm *vm = vm_param(d, c, params);

	if (vm)
		call_reply(c, fds_result(vm));
}

/* vm.fds is the verb's name for the same view, keyed like the other vm.*. */
static void m_vm_fds(struct daemon *d, struct call *c, json_object *params)
{
	struct vm *vm = vm_param(d, c, params);

	if (vm)
		call_reply(c, fds_result(vm));
}

static const struct param fd_store_params[] = {
	{ "vm", PARAM_STRING, true },
	{ "names", PARAM_STRINGS, true },
	{ "kinds", PARAM_STRINGS, false },
};

static void m_fd_store(struct daemon *d, struct call *c, json_object *params)
{
	const char *vmname = NULL;
	json_object *names = NULL, *kinds = NULL;
	void *const out[] = { &vmname, &names, &kinds };
	size_t n;
	struct vm *vm;

	if (!params_bind(c, params, out, ELEMENTSOF(out)))
		return;
	if (!(vm = find_vm_or_fail(d, c, "vm", vmname)))
		return;
	n = json_object_array_length(names);
	if (n == 0 || n != call_nfds(c) || (kinds && json_object_array_length(kinds) != n)) {
		call_fail(c, JSONRPC_ERR_BAD_FDS,
			  "fd.store needs exactly one fd per name: %zu names, %zu fds attached%s",
			  n, call_nfds(c), kinds ? ", and one kind per name" : "");
		return;
	}
	/* Check all first so that a bad entry stores nothing. */
	for (size_t i = 0; i < n; i++) {
		const char *nm = json_object_get_string(json_object_array_get_idx(names, i));
		const memstore_entry *e;

		if (!memstore_name_is_valid(nm) || device_id_reserved(nm)) {
			call_fail_param(c, JSONRPC_INVALID_PARAMS, "names",
					"fd name '%.64s' is invalid or reserved", nm);
			return;
		}
		if (memstore_get(d->store, vm->cfg.name, nm, &e) == 0) {
			call_fail_param(c, JSONRPC_ERR_EXISTS, "names",
					"VM '%s' already holds an fd named '%s'", vm->cfg.name, nm);
			return;
		}
		for (size_t j = 0; j < i; j++)
			if (streq(nm,
				  json_object_get_string(json_object_array_get_idx(names, j)))) {
				call_fail_param(c, JSONRPC_INVALID_PARAMS, "names",
						"fd name '%s' given twice", nm);
				return;
			}
		if (kinds && memstore_kind_from_string(
				 json_object_get_string(json_object_array_get_idx(kinds, i))) < 0) {
			call_fail_param(
			    c, JSONRPC_INVALID_PARAMS, "kinds",
			    "unknown fd kind '%.32s' (memfd, tap, char, file, socket, pipe)",
			    json_object_get_string(json_object_array_get_idx(kinds, i)));
			return;
		}
	}
	for (size_t i = 0; i < n; i++) {
		const char *nm = json_object_get_string(json_object_array_get_idx(names, i));
		enum memstore_kind k = MEMSTORE_KIND_INVALID;
		int fd = call_take_fd(c, i), r = 0;

		if (kinds)
			k = memstore_kind_from_string(
			    json_object_get_string(json_object_array_get_idx(kinds, i)));
		else
			r = memstore_fd_kind(fd, &k);
		if (r == 0)
			r = memstore_put(d->store, vm->cfg.name, nm, k, fd);
		if (r == 0)
			fdstore_add(d, vm->cfg.name, nm, fd);
		if (r < 0) {
			safe_close(fd);
			/* Undo what this call stored: all or nothing. */
			for (size_t j = 0; j < i; j++) {
				const char *undo =
				    json_object_get_string(json_object_array_get_idx(names, j));

				fdstore_remove(d, vm->cfg.name, undo);
				memstore_remove(d->store, vm->cfg.name, undo);
			}
			call_fail(c, JSONRPC_ERR_BAD_FDS, "fd '%s' %s", nm,
				  r == -EBADFD ? "is not of the kind claimed" : strerror(-r));
			return;
		}
	}
	/* Stored fds are not in the registry (a restart finds them in the fd
	 * store, or not at all), so there is nothing to write before answering. */
	daemon_status_changed(d);
	log_info("VM %s: %zu fd(s) stored by pid %d", vm->cfg.name, n, (int)call_peer(c)->pid);
	call_reply(c, fds_result(vm));
}

static const struct param fd_claim_params[] = {
	{ "vm", PARAM_STRING, true },
	{ "names", PARAM_STRINGS, true },
};

static void m_fd_claim(struct daemon *d, struct call *c, json_object *params)
{
	const char *vmname = NULL;
	json_object *names = NULL;
	void *const out[] = { &vmname, &names };
	int fds[16];
	size_t n;
	struct vm *vm;
	json_object *res;

	if (!params_bind(c, params, out, ELEMENTSOF(out)))
		return;
	if (!(vm = find_vm_or_fail(d, c, "vm", vmname)))
		return;
	/* A VMM may claim its own VM's fds and nobody else's: its pid, and
	 * for a confined one its uid too, which no other VM's VMM has. */
	if (!call_peer_privileged(c) &&
	    !(vmm_alive(vm->vmm) && call_peer(c)->pid == vm->vmm->pid &&
	      (!d->confine || vm->cfg.uid == 0 || call_peer(c)->uid == vm->cfg.uid))) {
		call_fail(c, JSONRPC_ERR_PERMISSION,
			  "permission denied: only root, group 'cprd' or VM '%s''s own VMM may "
			  "claim its fds",
			  vm->cfg.name);
		return;
	}
	n = json_object_array_length(names);
	if (n == 0 || n > ELEMENTSOF(fds)) {
		call_fail_param(c, JSONRPC_INVALID_PARAMS, "names",
				"claim between 1 and 16 fds at once");
		return;
	}
	for (size_t i = 0; i < n; i++) {
		const char *nm = json_object_get_string(json_object_array_get_idx(names, i));
		const memstore_entry *e;

		if (memstore_get(d->store, vm->cfg.name, nm, &e) < 0) {
			call_fail_param(c, JSONRPC_ERR_NOT_FOUND, "names",
					"VM '%s' holds no fd named '%.64s'", vm->cfg.name, nm);
			return;
		}
		fds[i] = e->fd;
	}
	res = json_object_new_object();
	json_object_object_add(res, "vm", json_object_new_string(vm->cfg.name));
	json_object_object_add(res, "names", json_object_get(names));
	/* The reply carries duplicates; custody keeps the originals. */
	call_reply_fds(c, res, fds, n);
}

static const struct param fd_release_params[] = {
	{ "vm", PARAM_STRING, true },
	{ "name", PARAM_STRING, true },
};

static void m_fd_release(struct daemon *d, struct call *c, json_object *params)
{
	const char *vmname = NULL, *name = NULL;
	void *const out[] = { &vmname, &name };
	struct vm *vm;

	if (!params_bind(c, params, out, ELEMENTSOF(out)))
		return;
	if (!(vm = find_vm_or_fail(d, c, "vm", vmname)))
		return;
	if (device_id_reserved(name)) {
		call_fail(c, JSONRPC_ERR_BAD_STATE,
			  "'%s' is held for the VM itself; it is released by vm.destroy", name);
		return;
	}
	fdstore_remove(d, vm->cfg.name, name);
	if (memstore_remove(d->store, vm->cfg.name, name) < 0) {
		call_fail_param(c, JSONRPC_ERR_NOT_FOUND, "name",
				"VM '%s' holds no fd named '%.64s'", vm->cfg.name, name);
		return;
	}
	daemon_status_changed(d);
	call_reply(c, fds_result(vm));
}

/* ---- daemon.* ---- */

/* The update strategies this cprd has, from the strategies' own table. */
static json_object *strategies_json(void)
{
	json_object *arr = json_object_new_array();
	const struct strategy *s;

	for (size_t i = 0; (s = strategy_nth(i)); i++)
		json_object_array_add(arr, json_object_new_string(s->name));
	return arr;
}

static void m_daemon_status(struct daemon *d, struct call *c, json_object *params)
{
	json_object *o;

	if (!params_bind(c, params, NULL, 0))
		return;
	o = json_object_new_object();
	json_object_object_add(o, "version", json_object_new_string(CPRD_VERSION));
	json_object_object_add(o, "pid", json_object_new_int(getpid()));
	json_object_object_add(
	    o, "uptime_sec",
	    json_object_new_int64((int64_t)(now_usec(CLOCK_MONOTONIC) - d->started_mono) /
				  1000000));
	json_object_object_add(o, "started_usec", json_object_new_int64((int64_t)d->started_usec));
	json_object_object_add(o, "start_mode", json_object_new_string(d->start_mode));
	json_object_object_add(o, "state_dir", json_object_new_string(d->state_dir));
	json_object_object_add(o, "accel", json_object_new_string(d->kvm ? "kvm" : "tcg"));
	json_object_object_add(o, "vms", json_object_new_int((int)vm_count(d)));
	json_object_object_add(o, "fds_held",
			       json_object_new_int((int)memstore_count(d->store, NULL)));
	/* A start abandoned by a failed update is killed when the launcher
	 * answers for it: until then it is counted here. */
	json_object_object_add(o, "vmm_starts_in_flight",
			       json_object_new_int((int)launcher_in_flight(&d->launcher)));
	json_object_object_add(o, "socket_activated", json_object_new_boolean(d->socket_activated));
	json_object_object_add(o, "registry", registry_health_to_json(&d->registry));
	json_object_object_add(o, "strategies", strategies_json());
	json_object_object_add(o, "loop", stats_to_json(d));
	call_reply(c, o);
}

/* The loop's counters; with reset, read and start a new window in one go,
 * so that nothing falls between the two. */
static const struct param daemon_stats_params[] = { { "reset", PARAM_BOOL, false } };

static void m_daemon_stats(struct daemon *d, struct call *c, json_object *params)
{
	bool reset = false;
	void *const out[] = { &reset };
	json_object *o;

	if (!params_bind(c, params, out, ELEMENTSOF(out)))
		return;
	if (reset && !call_peer_privileged(c)) {
		call_fail_param(
		    c, JSONRPC_ERR_PERMISSION, "reset",
		    "permission denied: resetting the counters needs root or group 'cprd' "
		    "(peer uid %u)",
		    (unsigned)call_peer(c)->uid);
		return;
	}
	o = json_object_new_object();
	json_object_object_add(o, "loop", stats_to_json(d));
	if (reset)
		stats_reset(d);
	call_reply(c, o);
}

static const struct param daemon_reexec_params[] = { { "binary", PARAM_STRING, false } };

static void m_daemon_reexec(struct daemon *d, struct call *c, json_object *params)
{
	const char *binary = NULL;
	void *const out[] = { &binary };
	_cleanup_close_ int fd = -EBADF;
	json_object *o;

	if (!params_bind(c, params, out, ELEMENTSOF(out)))
		return;
	binary = binary ? binary : d->self_path;
	/* Opened once, here: the file judged below is the one exec'd. */
	if (!binary || binary[0] != '/' || access(binary, X_OK) < 0 ||
	    (fd = open(binary, O_PATH | O_CLOEXEC)) < 0) {
		call_fail_param(c, JSONRPC_INVALID_PARAMS, "binary", "binary '%.200s' %s",
				binary ? binary : "?",
				binary && binary[0] == '/' ? strerror(errno)
							   : "must be an absolute path");
		return;
	}
	if (call_peer(c)->uid != 0) {
		int r = policy_may_reexec(d->self_path, fd);

		if (r < 0) {
			call_fail_param(
			    c, JSONRPC_ERR_PERMISSION, "binary", "binary '%.200s' %s", binary,
			    r == -EACCES  ? "is not cprd's own: only root may re-execute "
					    "into another binary"
			    : r == -EPERM ? "or a directory above it can be changed by "
					    "others than root"
					  : strerror(-r));
			return;
		}
	}
	for (struct vm *vm = d->vms; vm; vm = vm->next)
		if (vm_busy(vm)) {
			call_fail(c, JSONRPC_ERR_BUSY,
				  "VM '%s' is %s; re-execute when it has finished", vm->cfg.name,
				  vm_busy(vm));
			return;
		}
	/* The new image finds the VMs through the registry: a stale one would
	 * make it release the custody of every VM it does not name. */
	if (vm_registry_commit(d) < 0) {
		call_fail(c, JSONRPC_ERR_RESOURCE,
			  "cannot re-execute: the registry cannot be written (%s), and the new "
			  "image would not know every VM",
			  d->registry.why);
		return;
	}
	free(d->reexec_binary);
	d->reexec_binary = strdup(binary);
	if (!d->reexec_binary) {
		call_fail(c, JSONRPC_ERR_RESOURCE, "out of memory");
		return;
	}
	safe_close(d->reexec_fd);
	d->reexec_fd = TAKE_FD(fd);
	o = json_object_new_object();
	json_object_object_add(o, "reexec", json_object_new_string(binary));
	json_object_object_add(o, "pid", json_object_new_int(getpid()));
	call_reply(c, o);
	/* The loop ends after this round; main() writes out the replies and
	 * execs. Connections do not survive it; custody and VMs do. */
	ev_break(d->loop, EVBREAK_ALL);
}

/* ---- rpc.* ---- */

static json_object *param_to_json(const struct param *p)
{
	json_object *o = json_object_new_object();

	json_object_object_add(o, "name", json_object_new_string(p->name));
	json_object_object_add(o, "type", json_object_new_string(param_type_to_string(p->type)));
	json_object_object_add(o, "required", json_object_new_boolean(p->required));
	return o;
}

static json_object *method_to_json(const struct method *m)
{
	json_object *o = json_object_new_object(), *ps = json_object_new_array();
	struct param dp;

	json_object_object_add(o, "name", json_object_new_string(m->name));
	json_object_object_add(o, "summary", json_object_new_string(m->summary));
	json_object_object_add(o, "permission", json_object_new_string(method_permission(m)));
	json_object_object_add(o, "takes_fds",
			       json_object_new_boolean(!!(m->flags & METHOD_TAKES_FDS)));
	for (size_t i = 0; i < m->n_params; i++)
		json_object_array_add(ps, param_to_json(&m->params[i]));
	for (size_t i = 0; device_param(m, i, &dp); i++)
		json_object_array_add(ps, param_to_json(&dp));
	json_object_object_add(o, "params", ps);
	return o;
}

/* The API as this cprd serves it: built from the very table it dispatches
 * from, so it cannot disagree with what the server checks. */
static void m_rpc_describe(struct daemon *d, struct call *c, json_object *params)
{
	json_object *o, *ms, *errs;
	const jsonrpc_error_info *e;

	if (!params_bind(c, params, NULL, 0))
		return;
	o = json_object_new_object();
	json_object_object_add(o, "jsonrpc", json_object_new_string("2.0"));
	json_object_object_add(o, "protocol_version", json_object_new_int(CPRD_PROTOCOL_VERSION));
	json_object_object_add(o, "version", json_object_new_string(CPRD_VERSION));
	ms = json_object_new_array();
	for (size_t i = 0; i < d->n_methods; i++)
		json_object_array_add(ms, method_to_json(&d->methods[i]));
	json_object_object_add(o, "methods", ms);
	errs = json_object_new_array();
	for (size_t i = 0; (e = jsonrpc_error_nth(i)); i++) {
		json_object *x = json_object_new_object();

		json_object_object_add(x, "code", json_object_new_int(e->code));
		json_object_object_add(x, "kind", json_object_new_string(e->kind));
		json_object_object_add(x, "summary", json_object_new_string(e->summary));
		json_object_array_add(errs, x);
	}
	json_object_object_add(o, "errors", errs);
	call_reply(c, o);
}

/* Their params are checked here, as every method's are (params_bind()). */
static void m_daemon_metrics(struct daemon *d, struct call *c, json_object *params)
{
	if (params_bind(c, params, NULL, 0))
		metrics_method(d, c, NULL);
}

static void m_events_subscribe(struct daemon *d, struct call *c, json_object *params)
{
	if (params_bind(c, params, NULL, 0))
		events_subscribe(d, c, NULL);
}

const struct method rpc_methods[] = {
	{ "vm.create", m_vm_create, METHOD_MUTATING | METHOD_DEVICE_PARAMS,
	  METHOD_PARAMS(vm_create_params), "define and start a VM; answers once the guest runs" },
	{ "vm.list", m_vm_list, 0, METHOD_PARAMS(vm_list_params),
	  "every VM's status; with outdated, only VMs whose VMM was replaced on disk" },
	{ "vm.status", m_vm_status, 0, METHOD_PARAMS(name_params), "one VM's status" },
	{ "vm.fds", m_vm_fds, 0, METHOD_PARAMS(name_params), "the fds cprd holds for a VM" },
	{ "vm.destroy", m_vm_destroy, METHOD_MUTATING, METHOD_PARAMS(name_params),
	  "end the VM's VMM and release everything held for it" },
	{ "vm.pause", m_vm_pause, METHOD_MUTATING, METHOD_PARAMS(name_params),
	  "pause the guest's vCPUs (its VMM and everything held stay)" },
	{ "vm.resume", m_vm_resume, METHOD_MUTATING, METHOD_PARAMS(name_params),
	  "let a paused guest run again" },
	{ "vm.update", m_vm_update, METHOD_MUTATING, METHOD_PARAMS(vm_update_params),
	  "replace the VM's VMM under the running guest; with check, only its pre-flight" },
	{ "vm.checkpoint", m_vm_checkpoint, METHOD_MUTATING, METHOD_PARAMS(vm_checkpoint_params),
	  "save the guest to a persistent checkpoint, end its VMM and release its RAM" },
	{ "vm.restore", m_vm_restore, METHOD_MUTATING, METHOD_PARAMS(vm_restore_params),
	  "start a VMM on the VM's checkpoint and resume the guest" },
	{ "vm.history", m_vm_history, 0, METHOD_PARAMS(vm_history_params),
	  "the VM's updates, newest first (kept ones too once it is destroyed); all: every VM's" },
	{ "vm.purge", m_vm_purge, METHOD_MUTATING, METHOD_PARAMS(name_params),
	  "remove the logs and history kept of a destroyed VM" },
	{ "fd.store", m_fd_store, METHOD_MUTATING | METHOD_TAKES_FDS,
	  METHOD_PARAMS(fd_store_params), "put the attached fds into the VM's custody" },
	{ "fd.claim", m_fd_claim, METHOD_MUTATING | METHOD_OWN_VMM, METHOD_PARAMS(fd_claim_params),
	  "get duplicates of fds held for the VM" },
	{ "fd.list", m_fd_list, 0, METHOD_PARAMS(vm_params), "the fds cprd holds for a VM" },
	{ "fd.release", m_fd_release, METHOD_MUTATING, METHOD_PARAMS(fd_release_params),
	  "close one fd stored for the VM" },
	{ "daemon.status", m_daemon_status, 0, NULL, 0, "cprd's version, uptime and custody" },
	{ "daemon.stats", m_daemon_stats, 0, METHOD_PARAMS(daemon_stats_params),
	  "cprd's own time on its event loop; reset needs root or group cprd" },
	{ "daemon.reexec", m_daemon_reexec, METHOD_MUTATING, METHOD_PARAMS(daemon_reexec_params),
	  "cprd re-executes itself, keeping every VM" },
	{ "rpc.describe", m_rpc_describe, 0, NULL, 0,
	  "every method with its params and permission, the errors, the protocol version" },
	{ "daemon.metrics", m_daemon_metrics, 0, NULL, 0,
	  "daemon-wide metrics in Prometheus' text format" },
	{ "events.subscribe", m_events_subscribe, 0, NULL, 0,
	  "turn this connection into a stream of event notifications" },
};

const size_t rpc_methods_count = ELEMENTSOF(rpc_methods);
