/* SPDX-License-Identifier: MIT */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <systemd/sd-daemon.h>

#include "common/file.h"
#include "common/json.h"
#include "common/proc.h"
#include "daemon/log.h"
#include "daemon/persist.h"
#include "daemon/update.h"
#include "daemon/vm.h"
#include "proto/jsonrpc.h"

#define REGISTRY_VERSION 1
#define REGISTRY_MAX (4 << 20)

static void add_str(json_object *o, const char *k, const char *v)
{
	if (v)
		json_object_object_add(o, k, json_object_new_string(v));
}

static json_object *vm_record(struct vm *vm)
{
	json_object *o = json_object_new_object();

	add_str(o, "name", vm->cfg.name);
	add_str(o, "vmm", vm->cfg.vmm);
	add_str(o, "kernel", vm->cfg.kernel);
	add_str(o, "initrd", vm->cfg.initrd);
	add_str(o, "append", vm->cfg.append);
	add_str(o, "tap", vm->cfg.tap);
	add_str(o, "machine", vm->cfg.machine);
	json_object_object_add(o, "memory_bytes",
			       json_object_new_int64((int64_t)vm->cfg.memory_bytes));
	json_object_object_add(o, "vcpus", json_object_new_int((int)vm->cfg.vcpus));
	json_object_object_add(o, "created_usec", json_object_new_int64((int64_t)vm->created_usec));
	json_object_object_add(o, "updates", json_object_new_int((int)vm->updates));
	add_str(o, "state", vm_state_to_string(vm->state));
	if (vmm_alive(vm->vmm)) {
		json_object_object_add(o, "pid", json_object_new_int(vm->vmm->pid));
		json_object_object_add(o, "pid_start",
				       json_object_new_int64((int64_t)vm->vmm->start_time));
		json_object_object_add(o, "vmm_fds", vmm_fd_map(vm->vmm));
		add_str(o, "qmp", vm->vmm->qmp_path);
	}
	if (vm->update)
		json_object_object_add(o, "update", update_to_record(vm->update));
	return o;
}

void registry_save(struct daemon *d)
{
	_cleanup_json_ json_object *root = json_object_new_object();
	_cleanup_free_ char *path = NULL, *tmp = NULL;
	_cleanup_close_ int fd = -EBADF;
	json_object *arr = json_object_new_array();
	const char *s;
	size_t len;

	json_object_object_add(root, "version", json_object_new_int(REGISTRY_VERSION));
	for (struct vm *vm = d->vms; vm; vm = vm->next)
		if (vm->state != VM_STARTING) /* a VM that never ran has nothing to recover */
			json_object_array_add(arr, vm_record(vm));
	json_object_object_add(root, "vms", arr);
	if (asprintf(&path, "%s/registry.json", d->state_dir) < 0 ||
	    asprintf(&tmp, "%s/.registry.json.tmp", d->state_dir) < 0)
		return;
	s = jsonrpc_to_string(root, &len);
	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0 || write(fd, s, len) != (ssize_t)len || fsync(fd) < 0 || rename(tmp, path) < 0)
		log_error("cannot write %s: %m; a restart could not find the VMs", path);
}

json_object *registry_load(struct daemon *d)
{
	_cleanup_free_ char *path = NULL, *buf = NULL;
	_cleanup_close_ int fd = -EBADF;
	json_object *root;
	ssize_t n;

	if (asprintf(&path, "%s/registry.json", d->state_dir) < 0)
		return NULL;
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return NULL;
	n = read_at_most(fd, 0, REGISTRY_MAX, &buf);
	if (n <= 0)
		return NULL;
	root = json_tokener_parse(buf);
	if (!root ||
	    json_object_get_int(json_object_object_get(root, "version")) != REGISTRY_VERSION ||
	    !json_object_is_type(json_object_object_get(root, "vms"), json_type_array)) {
		log_error("%s is not a registry this cprd understands; ignoring it", path);
		json_object_put(root);
		return NULL;
	}
	return root;
}

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

/* "cprd/vm/NAME/FD" -> vm and fd names; false for anything else. */
static bool split_name(const char *full, char *vm, char *fd)
{
	const char *p = full + strlen(FDSTORE_PREFIX), *slash;

	if (strncmp(full, FDSTORE_PREFIX, strlen(FDSTORE_PREFIX)) != 0)
		return false;
	slash = strchr(p, '/');
	if (!slash || (size_t)(slash - p) >= MEMSTORE_NAME_MAX ||
	    strlen(slash + 1) >= MEMSTORE_NAME_MAX)
		return false;
	memcpy(vm, p, (size_t)(slash - p));
	vm[slash - p] = '\0';
	strcpy(fd, slash + 1);
	return memstore_name_is_valid(vm) && memstore_name_is_valid(fd);
}

/* Inherited fds and their names: from a re-exec of ourselves
 * (CPRD_INHERIT="FD:NAME,...", the fds left where they were) or from the
 * service manager (LISTEN_FDS, LISTEN_FDNAMES; fds from 3 on). */
static int inherited_list(int **ret_fds, char ***ret_names)
{
	const char *env = getenv("CPRD_INHERIT");
	_cleanup_free_ char *copy = NULL;
	char *tok, *save = NULL;
	int n = 0, max;

	if (!env) {
		n = sd_listen_fds_with_names(1, ret_names);
		if (n <= 0)
			return 0;
		*ret_fds = calloc((size_t)n, sizeof(int));
		for (int i = 0; *ret_fds && i < n; i++)
			(*ret_fds)[i] = SD_LISTEN_FDS_START + i;
		return *ret_fds ? n : 0;
	}
	copy = strdup(env);
	max = 1;
	for (const char *p = env; *p; p++)
		max += *p == ',';
	*ret_fds = calloc((size_t)max, sizeof(int));
	*ret_names = calloc((size_t)max + 1, sizeof(char *));
	if (!copy || !*ret_fds || !*ret_names)
		return 0;
	for (tok = strtok_r(copy, ",", &save); tok && n < max; tok = strtok_r(NULL, ",", &save)) {
		char *colon = strchr(tok, ':');
		long fd = strtol(tok, NULL, 10);

		if (!colon || fd < 3 || fcntl((int)fd, F_GETFD) < 0)
			continue;
		(*ret_fds)[n] = (int)fd;
		(*ret_names)[n++] = strdup(colon + 1);
	}
	unsetenv("CPRD_INHERIT");
	return n;
}

int inherited_fds_take(struct daemon *d, int *ret_listen, int *ret_launcher,
		       json_object **ret_pidfds)
{
	_cleanup_free_ int *fdv = NULL;
	char **names = NULL;
	json_object *pidfds = json_object_new_object();
	int n, taken = 0;

	*ret_listen = *ret_launcher = -EBADF;
	n = inherited_list(&fdv, &names);
	for (int i = 0; i < n; i++) {
		int fd = fdv[i];
		const char *name = names && names[i] ? names[i] : "";
		char vm[MEMSTORE_NAME_MAX], fdname[MEMSTORE_NAME_MAX];
		enum memstore_kind kind;

		fcntl(fd, F_SETFD, FD_CLOEXEC);
		if (streq(name, "cprd-launcher")) {
			*ret_launcher = fd;
		} else if (split_name(name, vm, fdname)) {
			if (streq(fdname, "pidfd")) {
				json_object_object_add(pidfds, vm, json_object_new_int(fd));
				continue;
			}
			if (memstore_fd_kind(fd, &kind) < 0 ||
			    memstore_put(d->store, vm, fdname, kind, fd) < 0) {
				log_warning("dropping inherited fd %s: not usable", name);
				close(fd);
				continue;
			}
			taken++;
		} else if (*ret_listen < 0 && sd_is_socket_unix(fd, SOCK_STREAM, 1, NULL, 0) > 0) {
			*ret_listen = fd; /* the socket unit's, whatever it is named */
		} else {
			log_warning("closing an inherited fd nobody claims (%s)",
				    name[0] ? name : "unnamed");
			close(fd);
		}
	}
	for (int i = 0; names && i < n; i++)
		free(names[i]);
	free(names);
	*ret_pidfds = pidfds;
	return taken;
}
