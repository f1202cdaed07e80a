/* SPDX-License-Identifier: MIT */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <systemd/sd-daemon.h>

#include "daemon/core/fdstore.h"
#include "daemon/core/inherit.h"
#include "daemon/observe/log.h"

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
