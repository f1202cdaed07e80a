/* SPDX-License-Identifier: MIT */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "common/file.h"
#include "common/json.h"
#include "daemon/log.h"
#include "daemon/registry.h"
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
