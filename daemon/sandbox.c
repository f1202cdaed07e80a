/* SPDX-License-Identifier: MIT */
#include <seccomp.h>

#include "common/macro.h"
#include "daemon/sandbox.h"

/* What the event loop, json-c, libsystemd and our own code need. fork,
 * execve of anything but ourselves (re-exec) and ptrace are absent: VMMs are
 * started by the launcher, which was forked before this filter. */
static const char *const allowed[] = {
	"accept4",
	"arch_prctl",
	"bind",
	"set_tid_address",
	"brk",
	"chmod",
	"chown",
	"clock_getres",
	"clock_gettime",
	"clock_nanosleep",
	"close",
	"close_range",
	"connect",
	"dup",
	"dup2",
	"dup3",
	"epoll_create1",
	"epoll_ctl",
	"epoll_pwait",
	"epoll_wait",
	"eventfd2",
	"execve",
	"exit",
	"exit_group",
	"faccessat",
	"faccessat2",
	"fchmod",
	"fchown",
	"fcntl",
	"fdatasync",
	"flock",
	"fstat",
	"fstatfs",
	"fsync",
	"ftruncate",
	"futex",
	"getcwd",
	"getdents64",
	"getegid",
	"geteuid",
	"getgid",
	"getgroups",
	"getpeername",
	"getpid",
	"getppid",
	"getrandom",
	"getsockname",
	"getsockopt",
	"gettid",
	"gettimeofday",
	"getuid",
	"ioctl",
	"kill",
	"listen",
	"lseek",
	"fchmodat",
	"fchownat",
	"madvise",
	"memfd_create",
	"mkdir",
	"mkdirat",
	"mmap",
	"mprotect",
	"mremap",
	"munmap",
	"nanosleep",
	"newfstatat",
	"open",
	"openat",
	"pidfd_getfd",
	"pidfd_open",
	"pidfd_send_signal",
	"pipe2",
	"poll",
	"ppoll",
	"prctl",
	"pread64",
	"prlimit64",
	"pwrite64",
	"read",
	"readlink",
	"readlinkat",
	"readv",
	"recvfrom",
	"recvmmsg",
	"recvmsg",
	"rename",
	"renameat",
	"renameat2",
	"restart_syscall",
	"rmdir",
	"rseq",
	"rt_sigaction",
	"rt_sigprocmask",
	"rt_sigreturn",
	"sched_getaffinity",
	"sched_yield",
	"select",
	"pselect6",
	"sendmmsg",
	"sendmsg",
	"sendto",
	"set_robust_list",
	"setsockopt",
	"shutdown",
	"signalfd4",
	"socket",
	"socketpair",
	"stat",
	"statfs",
	"statx",
	"sysinfo",
	"tgkill",
	"timerfd_create",
	"timerfd_gettime",
	"timerfd_settime",
	"umask",
	"uname",
	"unlink",
	"unlinkat",
	"wait4",
	"waitid",
	"write",
	"writev",
	"lstat",
	"access",
	"fadvise64",
	"getresuid",
	"getresgid",
	"getrlimit",
	"mincore",
	"membarrier",
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

int sandbox_apply(void)
{
	scmp_filter_ctx ctx;
	int r = 0;

	ctx = seccomp_init(SCMP_ACT_ERRNO(EPERM));
	if (!ctx)
		return -ENOMEM;
	for (size_t i = 0; i < ELEMENTSOF(allowed) && r == 0; i++) {
		int nr = seccomp_syscall_resolve_name(allowed[i]);

		if (nr == __NR_SCMP_ERROR)
			continue; /* not on this architecture */
		r = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, nr, 0);
	}
#ifdef CPRD_SANITIZE
	for (size_t i = 0; i < ELEMENTSOF(allowed_sanitizer) && r == 0; i++) {
		int nr = seccomp_syscall_resolve_name(allowed_sanitizer[i]);

		if (nr != __NR_SCMP_ERROR)
			r = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, nr, 0);
	}
#endif
	if (r == 0)
		r = seccomp_load(ctx);
	seccomp_release(ctx);
	return r;
}
