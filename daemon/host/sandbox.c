/* SPDX-License-Identifier: MIT */
#include <fcntl.h>
#include <linux/capability.h>
#include <linux/if_tun.h>
#include <seccomp.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "common/macro.h"
#include "daemon/host/sandbox.h"

/* What the event loop, json-c, libsystemd and cprd's own code need, by
 * purpose. fork, clone, ptrace, execve, mount and every call that changes
 * credentials are absent: VMMs are started by the launcher, forked before
 * this filter, and a re-exec goes through execveat on one fd (below). */
static const char *const allowed[] = {
	/* the event loop (libev) and timers */
	"epoll_create1",
	"epoll_ctl",
	"epoll_pwait",
	"epoll_wait",
	"eventfd2",
	"signalfd4",
	"timerfd_create",
	"timerfd_gettime",
	"timerfd_settime",
	"poll",
	"ppoll",
	"select",
	"pselect6",
	"clock_getres",
	"clock_gettime",
	"clock_nanosleep",
	"gettimeofday",
	"nanosleep",
	"rt_sigaction",
	"rt_sigprocmask",
	"rt_sigreturn",
	"restart_syscall",
	/* memory (glibc malloc, json-c, mapping guest memory to size it) */
	"brk",
	"mmap",
	"mprotect",
	"mremap",
	"munmap",
	"madvise",
	"mincore",
	"membarrier",
	"memfd_create",
	/* threads and process basics glibc itself calls */
	"arch_prctl",
	"set_tid_address",
	"set_robust_list",
	"rseq",
	"futex",
	"exit",
	"exit_group",
	"getpid",
	"getppid",
	"gettid",
	"getuid",
	"geteuid",
	"getgid",
	"getegid",
	"getgroups",
	"getresuid",
	"getresgid",
	"getrandom",
	"uname",
	"sysinfo",
	"sched_getaffinity",
	"sched_yield",
	"getrlimit",
	"capget",
	"capset", /* can only lower: a re-exec drops again */
	"prlimit64",
	"prctl",
	"umask",
	"getcwd",
	/* fds: custody moves fds around, duplicates and closes them */
	"close",
	"close_range",
	"dup",
	"dup2",
	"dup3",
	"fcntl",
	"pipe2",
	"read",
	"readv",
	"write",
	"writev",
	"pread64",
	"pwrite64",
	"lseek",
	"fstat",
	"fstatfs",
	"statfs",
	"newfstatat",
	"stat",
	"lstat",
	"statx",
	"fadvise64",
	/* checkpoints: guest RAM to and from its file, in the kernel */
	"sendfile",
	"copy_file_range",
	/* the state directory (registry, logs, monitor sockets, history) */
	"open",
	"openat",
	"mkdir",
	"mkdirat",
	"rmdir",
	"unlink",
	"unlinkat",
	"rename",
	"renameat",
	"renameat2",
	"readlink",
	"readlinkat",
	"getdents64",
	"access",
	"faccessat",
	"faccessat2",
	"chmod",
	"fchmod",
	"fchmodat",
	"chown",
	"fchown",
	"fchownat",
	"ftruncate",
	"fsync",
	"fdatasync",
	"flock",
	/* UNIX sockets (clients, QMP, launcher, journal, D-Bus, fd store); socket and socketpair
	   are limited to AF_UNIX below */
	"accept4",
	"bind",
	"connect",
	"listen",
	"getpeername",
	"getsockname",
	"getsockopt",
	"setsockopt",
	"shutdown",
	"recvfrom",
	"recvmsg",
	"recvmmsg",
	"sendto",
	"sendmsg",
	"sendmmsg",
	/* VMM lifetime: pidfds to watch, signal, reap and, after a restart, take fds back from a
	   running VMM */
	"pidfd_open",
	"pidfd_getfd",
	"waitid",
	"wait4",
};

#ifdef CPRD_SANITIZE
/* The ASan build only (`make asan` defines CPRD_SANITIZE): what the
 * sanitizer runtime needs on top. That build exists for the tests; the list
 * above is the one that ships.
 * - sigaltstack: ASan looks at the signal stack before every call that does
 *   not return (exit, abort; with gcc also UBSan's reporting handlers) and
 *   dies on a failed internal check when it cannot.
 * - clone, ptrace, getdents: LeakSanitizer's check at exit runs a tracer
 *   task (clone) that lists cprd's threads in /proc/self/task (getdents, not
 *   getdents64, on x86-64) and stops them with ptrace. Without these the
 *   check fails ("LeakSanitizer has encountered a fatal error") and cprd
 *   exits non-zero however clean it was.
 * fork stays out, so the runtime cannot start llvm-symbolizer: reports name
 * module+offset, and the tests symbolize them afterwards. */
static const char *const allowed_sanitizer[] = {
	"sigaltstack",
	"clone",
	"ptrace",
	"getdents",
};
#endif

/* The ioctl requests cprd makes: creating and identifying taps; isatty()
 * from stdio; FIONREAD and friends that libraries ask of sockets. */
static const unsigned long allowed_ioctl[] = {
	TUNSETIFF, TUNGETIFF, TCGETS, TIOCGWINSZ, FIONREAD, FIONBIO, FIOCLEX, FIONCLEX,
};

/* Signals cprd sends: 0 to ask whether a VMM lives, SIGTERM to end a VMM
 * or the launcher, SIGKILL to end a VMM that must go. */
static const int allowed_signal[] = { 0, SIGTERM, SIGKILL };

static int add_rules(scmp_filter_ctx ctx, int exec_fd)
{
	int r = 0;

	for (size_t i = 0; i < ELEMENTSOF(allowed) && r == 0; i++) {
		int nr = seccomp_syscall_resolve_name(allowed[i]);

		if (nr == __NR_SCMP_ERROR)
			continue; /* not on this architecture */
		r = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, nr, 0);
	}
	/* Every socket cprd opens is a UNIX socket. */
	if (r == 0)
		r = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SCMP_SYS(socket), 1,
				     SCMP_A0(SCMP_CMP_EQ, AF_UNIX, 0));
	if (r == 0)
		r = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SCMP_SYS(socketpair), 1,
				     SCMP_A0(SCMP_CMP_EQ, AF_UNIX, 0));
	/* The kernel takes the request as 32 bits: compare those only. */
	for (size_t i = 0; i < ELEMENTSOF(allowed_ioctl) && r == 0; i++)
		r = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SCMP_SYS(ioctl), 1,
				     SCMP_A1(SCMP_CMP_MASKED_EQ, 0xffffffffUL, allowed_ioctl[i]));
	for (size_t i = 0; i < ELEMENTSOF(allowed_signal) && r == 0; i++) {
		r = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SCMP_SYS(kill), 1,
				     SCMP_A1(SCMP_CMP_EQ, (scmp_datum_t)allowed_signal[i], 0));
		if (r == 0)
			r = seccomp_rule_add(
			    ctx, SCMP_ACT_ALLOW, SCMP_SYS(pidfd_send_signal), 1,
			    SCMP_A1(SCMP_CMP_EQ, (scmp_datum_t)allowed_signal[i], 0));
	}
	/* abort() and raise() signal cprd's own threads, nobody else's. */
	if (r == 0)
		r = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SCMP_SYS(tgkill), 1,
				     SCMP_A0(SCMP_CMP_EQ, (scmp_datum_t)getpid(), 0));
	/* The re-exec: the one binary daemon.reexec chose, put at exec_fd. */
	if (r == 0 && exec_fd >= 0)
		r = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SCMP_SYS(execveat), 2,
				     SCMP_A0(SCMP_CMP_EQ, (scmp_datum_t)exec_fd, 0),
				     SCMP_A4(SCMP_CMP_EQ, AT_EMPTY_PATH, 0));
#ifdef CPRD_SANITIZE
	for (size_t i = 0; i < ELEMENTSOF(allowed_sanitizer) && r == 0; i++) {
		int nr = seccomp_syscall_resolve_name(allowed_sanitizer[i]);

		if (nr != __NR_SCMP_ERROR)
			r = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, nr, 0);
	}
#endif
	return r;
}

int sandbox_apply(int exec_fd)
{
	scmp_filter_ctx ctx;
	int r;

	ctx = seccomp_init(SCMP_ACT_ERRNO(EPERM));
	if (!ctx)
		return -ENOMEM;
	r = add_rules(ctx, exec_fd);
	if (r == 0)
		r = seccomp_load(ctx);
	seccomp_release(ctx);
	return r;
}

int sandbox_exec_slot(void)
{
	const char *e = getenv(SANDBOX_EXEC_SLOT_ENV);
	int fd, want = e ? atoi(e) : -1;

	fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
	if (fd < 0 || want < 0 || fd == want)
		return fd < 0 ? -errno : fd;
	if (fcntl(want, F_GETFD) >= 0) { /* something of ours is there: keep it */
		close(fd);
		return -EBUSY;
	}
	if (dup3(fd, want, O_CLOEXEC) < 0) {
		int r = -errno;

		close(fd);
		return r;
	}
	close(fd);
	return want;
}

/* What the main process uses once it serves (the launcher, forked before,
 * keeps its own set):
 * - NET_ADMIN: create a VM's tap (TUNSETIFF);
 * - KILL: signal VMMs that run under their own uid;
 * - SYS_PTRACE: take fds back from a running VMM (pidfd_getfd) and read
 *   its /proc entries after a restart;
 * - DAC_OVERRIDE, DAC_READ_SEARCH, CHOWN, FOWNER: files in the state
 *   directory that belong to a VM's uid, kernels that only root may read,
 *   and the socket's group;
 * - SYS_RESOURCE: fds in flight over the fd store and re-exec beyond
 *   RLIMIT_NOFILE. */
static const int kept_caps[] = {
	CAP_NET_ADMIN,       CAP_KILL,  CAP_SYS_PTRACE, CAP_DAC_OVERRIDE,
	CAP_DAC_READ_SEARCH, CAP_CHOWN, CAP_FOWNER,     CAP_SYS_RESOURCE,
};

static bool cap_kept(int cap)
{
	for (size_t i = 0; i < ELEMENTSOF(kept_caps); i++)
		if (kept_caps[i] == cap)
			return true;
	return false;
}

int sandbox_drop_caps(void)
{
	struct __user_cap_header_struct h = { .version = _LINUX_CAPABILITY_VERSION_3 };
	struct __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3] = {};

	/* From the bounding set first (that needs SETPCAP, dropped below), so
	 * that no exec, a re-exec included, gets the rest back. */
	for (int cap = 0; prctl(PR_CAPBSET_READ, cap, 0, 0, 0) >= 0; cap++)
		if (!cap_kept(cap) && prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 && errno != EPERM)
			return -errno;
	if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0 && errno != EINVAL)
		return -errno;
	if (syscall(SYS_capget, &h, data) < 0)
		return -errno;
	for (size_t i = 0; i < ELEMENTSOF(data); i++) {
		uint32_t keep = 0;

		for (size_t k = 0; k < ELEMENTSOF(kept_caps); k++)
			if ((size_t)kept_caps[k] / 32 == i)
				keep |= 1U << (kept_caps[k] % 32);
		data[i].effective &= keep;
		data[i].permitted &= keep;
		data[i].inheritable = 0;
	}
	return syscall(SYS_capset, &h, data) < 0 ? -errno : 0;
}
