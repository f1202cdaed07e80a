/* SPDX-License-Identifier: MIT */
/*
 * proto/ on real kernel objects: UNIX socketpairs, memfds and pipes. An fd's
 * identity is checked through the content of the memfd it refers to, and
 * "closed" through fcntl() and the count of /proc/self/fd.
 */
#include <check.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "common/json.h"
#include "common/macro.h"
#include "proto/client.h"
#include "proto/frame.h"
#include "proto/jsonrpc.h"

/* ---- helpers ----------------------------------------------------------- */

static int count_fds(void)
{
	DIR *d = opendir("/proc/self/fd");
	struct dirent *de;
	int n = 0;

	ck_assert_ptr_nonnull(d);
	while ((de = readdir(d)))
		if (de->d_name[0] != '.')
			n++;
	closedir(d);
	return n - 1; /* the directory's own fd */
}

/* The numbers the kernel will hand out next (lowest free first), so a test
 * can check afterwards that whatever landed there was closed again. */
static void next_free_fds(int *ret, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		ret[i] = open("/dev/null", O_RDONLY | O_CLOEXEC);
		ck_assert_int_ge(ret[i], 0);
	}
	for (size_t i = 0; i < n; i++)
		close(ret[i]);
}

static void assert_fd_closed(int fd)
{
	errno = 0;
	ck_assert_int_eq(fcntl(fd, F_GETFD), -1);
	ck_assert_int_eq(errno, EBADF);
}

static void assert_cloexec(int fd)
{
	int flags = fcntl(fd, F_GETFD);

	ck_assert_int_ge(flags, 0);
	ck_assert(flags & FD_CLOEXEC);
}

static int memfd_with(const char *content)
{
	int fd = memfd_create("proto-test", MFD_CLOEXEC);

	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(write(fd, content, strlen(content)), (ssize_t)strlen(content));
	return fd;
}

static void assert_memfd_is(int fd, const char *content)
{
	char buf[256] = {};
	ssize_t n = pread(fd, buf, sizeof(buf) - 1, 0);

	ck_assert_int_ge(n, 0);
	ck_assert_str_eq(buf, content);
}

static void make_pair(int sv[2])
{
	ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
}

static void set_nonblock(int fd)
{
	int fl = fcntl(fd, F_GETFL);

	ck_assert_int_ge(fl, 0);
	ck_assert_int_eq(fcntl(fd, F_SETFL, fl | O_NONBLOCK), 0);
}

static void send_all(int fd, const char *s, const int *fds, size_t nfds)
{
	ck_assert_int_eq(proto_send_fds(fd, s, strlen(s), fds, nfds), (ssize_t)strlen(s));
}

/* Fills until a message (or an error) comes out of the reader. */
static int next_blocking(proto_reader *r, int fd, char **msg, int **fds, size_t *nfds)
{
	for (;;) {
		int k = proto_reader_next(r, msg, NULL, fds, nfds);
		if (k != 0)
			return k;
		ssize_t n = proto_reader_fill(r, fd);
		if (n <= 0)
			return (int)n;
	}
}

/* ---- proto_recv_fds / proto_send_fds ------------------------------------ */

START_TEST(test_send_recv_fds_basic)
{
	int sv[2], fds[2], got[4];
	char buf[16];
	size_t n = 99;
	struct stat a, b;

	make_pair(sv);
	fds[0] = memfd_with("zero");
	fds[1] = memfd_with("one");
	send_all(sv[0], "hi", fds, 2);

	ck_assert_int_eq(proto_recv_fds(sv[1], buf, sizeof(buf), got, 4, &n), 2);
	ck_assert_uint_eq(n, 2);
	ck_assert_int_eq(memcmp(buf, "hi", 2), 0);
	assert_cloexec(got[0]);
	assert_cloexec(got[1]);
	ck_assert_int_eq(fstat(fds[0], &a), 0);
	ck_assert_int_eq(fstat(got[0], &b), 0);
	ck_assert_uint_eq(a.st_ino, b.st_ino);
	assert_memfd_is(got[1], "one");

	close_many(got, 2);
	close_many(fds, 2);
	close_many(sv, 2);
}
END_TEST

START_TEST(test_send_fds_needs_a_byte)
{
	int sv[2];

	make_pair(sv);
	ck_assert_int_eq(proto_send_fds(sv[0], "", 0, &sv[0], 1), -EINVAL);
	close_many(sv, 2);
}
END_TEST

START_TEST(test_recv_ctrunc_closes_installed_fds)
{
	int sv[2], fds[4], got[2] = { -1, -1 }, slots[2];
	char buf[16];
	size_t n = 99;
	int before;

	make_pair(sv);
	for (int i = 0; i < 4; i++)
		fds[i] = memfd_with("x");
	send_all(sv[0], "x", fds, 4);

	next_free_fds(slots, 2);
	before = count_fds();
	ck_assert_int_eq(proto_recv_fds(sv[1], buf, sizeof(buf), got, 2, &n), -EBADMSG);
	ck_assert_int_eq(count_fds(), before);
	/* The kernel installed two before truncating: both must be gone. */
	assert_fd_closed(slots[0]);
	assert_fd_closed(slots[1]);
	ck_assert_uint_eq(n, 99);
	ck_assert_int_eq(got[0], -1);

	close_many(fds, 4);
	close_many(sv, 2);
}
END_TEST

START_TEST(test_recv_fds_when_none_allowed)
{
	int sv[2], fd, before;
	char buf[16];

	make_pair(sv);
	fd = memfd_with("x");
	send_all(sv[0], "x", &fd, 1);
	before = count_fds();
	ck_assert_int_eq(proto_recv_fds(sv[1], buf, sizeof(buf), NULL, 0, NULL), -EBADMSG);
	ck_assert_int_eq(count_fds(), before);

	safe_close(fd);
	close_many(sv, 2);
}
END_TEST

START_TEST(test_reader_more_than_max_fds_in_one_send)
{
	int sv[2], fds[PROTO_MAX_FDS + 1], slots[PROTO_MAX_FDS], before;
	proto_reader *r = NULL;

	make_pair(sv);
	fds[0] = memfd_with("x");
	for (size_t i = 1; i < ELEMENTSOF(fds); i++)
		fds[i] = fds[0];
	send_all(sv[0], "x\n", fds, ELEMENTSOF(fds));

	ck_assert_int_eq(proto_reader_new(PROTO_MAX_MSG_DEFAULT, &r), 0);
	next_free_fds(slots, PROTO_MAX_FDS);
	before = count_fds();
	ck_assert_int_eq(proto_reader_fill(r, sv[1]), -EBADMSG);
	ck_assert_int_eq(count_fds(), before);
	for (int i = 0; i < PROTO_MAX_FDS; i++)
		assert_fd_closed(slots[i]);

	proto_reader_free(r);
	safe_close(fds[0]);
	close_many(sv, 2);
}
END_TEST

/* SO_PASSCRED on the receiver makes the kernel deliver SCM_CREDENTIALS next
 * to the SCM_RIGHTS the sender also put in. */
START_TEST(test_recv_stray_cmsg_rejected)
{
	union {
		struct cmsghdr align;
		char buf[CMSG_SPACE(sizeof(struct ucred)) + CMSG_SPACE(2 * sizeof(int))];
	} control = {};
	struct ucred cred = { .pid = getpid(), .uid = getuid(), .gid = getgid() };
	struct iovec iov = { .iov_base = "cred\n", .iov_len = 5 };
	struct msghdr mh = {
		.msg_iov = &iov,
		.msg_iovlen = 1,
		.msg_control = control.buf,
		.msg_controllen = sizeof(control.buf),
	};
	struct cmsghdr *c;
	int sv[2], fds[2], slots[2], one = 1, before;
	proto_reader *r = NULL;
	char *msg = NULL;

	make_pair(sv);
	ck_assert_int_eq(setsockopt(sv[1], SOL_SOCKET, SO_PASSCRED, &one, sizeof(one)), 0);
	fds[0] = memfd_with("a");
	fds[1] = memfd_with("b");

	c = CMSG_FIRSTHDR(&mh);
	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_CREDENTIALS;
	c->cmsg_len = CMSG_LEN(sizeof(cred));
	memcpy(CMSG_DATA(c), &cred, sizeof(cred));
	c = CMSG_NXTHDR(&mh, c);
	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(sizeof(fds));
	memcpy(CMSG_DATA(c), fds, sizeof(fds));
	ck_assert_int_eq(sendmsg(sv[0], &mh, MSG_NOSIGNAL), 5);
	send_all(sv[0], "next\n", NULL, 0);

	ck_assert_int_eq(proto_reader_new(PROTO_MAX_MSG_DEFAULT, &r), 0);
	next_free_fds(slots, 2);
	before = count_fds();
	ck_assert_int_eq(proto_reader_fill(r, sv[1]), -EBADMSG);
	ck_assert_int_eq(count_fds(), before);
	assert_fd_closed(slots[0]);
	assert_fd_closed(slots[1]);
	ck_assert_int_eq(proto_reader_next(r, &msg, NULL, NULL, NULL), 0);

	proto_reader_free(r);
	close_many(fds, 2);
	close_many(sv, 2);
}
END_TEST

/* ---- reader --------------------------------------------------------------- */

#define N_MSGS 12

typedef struct expected_msg {
	char line[96];
	size_t nfds;
} expected_msg;

/*
 * Messages with and without fds go out back to back in random pieces (a
 * message's fds with the piece holding its first byte, as the writer does),
 * and the reader reads them in chunks bounded by a per-iteration max_msg,
 * interleaved at random with the sends.
 */
START_TEST(test_fds_travel_with_their_message)
{
	static const size_t max_msgs[] = { 80, 81, 97, 160, 4096 };
	unsigned seed = 1000 + (unsigned)_i;
	expected_msg exp[N_MSGS];
	proto_reader *r = NULL;
	int sv[2], base = count_fds();
	size_t got = 0;

	srand(seed);
	make_pair(sv);
	set_nonblock(sv[1]);
	ck_assert_int_eq(proto_reader_new(max_msgs[_i % ELEMENTSOF(max_msgs)], &r), 0);

	for (size_t i = 0; i < N_MSGS; i++) {
		int len = snprintf(exp[i].line, sizeof(exp[i].line), "msg-%zu-", i);
		int pad = rand() % 60;
		memset(exp[i].line + len, 'a' + (int)i, (size_t)pad);
		exp[i].line[len + pad] = '\0';
		exp[i].nfds = (size_t)(rand() % 4);
	}

	for (size_t i = 0; i < N_MSGS || got < N_MSGS;) {
		if (i < N_MSGS) {
			char wire[100];
			int fds[3];
			size_t len = (size_t)snprintf(wire, sizeof(wire), "%s\n", exp[i].line),
			       off = 0;

			for (size_t k = 0; k < exp[i].nfds; k++) {
				char name[32];
				snprintf(name, sizeof(name), "m%zu-f%zu", i, k);
				fds[k] = memfd_with(name);
			}
			while (off < len) {
				size_t piece = 1 + (size_t)rand() % (len - off);
				size_t nf = off == 0 ? exp[i].nfds : 0;
				ck_assert_int_eq(proto_send_fds(sv[0], wire + off, piece, fds, nf),
						 (ssize_t)piece);
				off += piece;
			}
			close_many(fds, exp[i].nfds);
			i++;
			if (i < N_MSGS && rand() % 3 != 0)
				continue;
		}

		for (;;) {
			char *msg = NULL;
			int *fds = NULL;
			size_t len = 0, nfds = 0;
			int k = proto_reader_next(r, &msg, &len, &fds, &nfds);

			ck_assert_int_ge(k, 0);
			if (k == 0) {
				ssize_t n = proto_reader_fill(r, sv[1]);
				if (n == -EAGAIN)
					break;
				ck_assert_int_gt(n, 0);
				continue;
			}
			ck_assert_uint_lt(got, N_MSGS);
			ck_assert_str_eq(msg, exp[got].line);
			ck_assert_uint_eq(len, strlen(exp[got].line));
			ck_assert_uint_eq(nfds, exp[got].nfds);
			ck_assert(nfds > 0 || fds == NULL);
			for (size_t f = 0; f < nfds; f++) {
				char name[32];
				snprintf(name, sizeof(name), "m%zu-f%zu", got, f);
				assert_memfd_is(fds[f], name);
				assert_cloexec(fds[f]);
			}
			close_many(fds, nfds);
			free(fds);
			free(msg);
			got++;
		}
		/* Everything is sent: an empty socket means a message was lost. */
		if (i == N_MSGS)
			ck_assert_uint_eq(got, N_MSGS);
	}

	ck_assert(!proto_reader_has_partial(r));
	proto_reader_free(r);
	close_many(sv, 2);
	ck_assert_int_eq(count_fds(), base);
}
END_TEST

START_TEST(test_message_split_across_many_reads)
{
	char line[200];
	int sv[2], fds[2];
	proto_reader *r = NULL;
	char *msg = NULL;
	int *got = NULL;
	size_t len = 0, n = 0;

	memset(line, 'z', sizeof(line));
	memcpy(line, "start", 5);
	line[sizeof(line) - 1] = '\n';
	make_pair(sv);
	fds[0] = memfd_with("first");
	fds[1] = memfd_with("second");
	ck_assert_int_eq(proto_reader_new(PROTO_MAX_MSG_DEFAULT, &r), 0);

	for (size_t i = 0; i < sizeof(line); i++) {
		ck_assert_int_eq(proto_send_fds(sv[0], line + i, 1, fds, i == 0 ? 2 : 0), 1);
		ck_assert_int_eq(proto_reader_fill(r, sv[1]), 1);
		if (i + 1 < sizeof(line)) {
			ck_assert_int_eq(proto_reader_next(r, &msg, &len, &got, &n), 0);
			ck_assert(proto_reader_has_partial(r));
		}
	}
	ck_assert_int_eq(proto_reader_next(r, &msg, &len, &got, &n), 1);
	ck_assert_uint_eq(len, sizeof(line) - 1);
	ck_assert_int_eq(memcmp(msg, line, len), 0);
	ck_assert_uint_eq(n, 2);
	assert_memfd_is(got[0], "first");
	assert_memfd_is(got[1], "second");
	ck_assert(!proto_reader_has_partial(r));

	close_many(got, n);
	free(got);
	free(msg);
	proto_reader_free(r);
	close_many(fds, 2);
	close_many(sv, 2);
}
END_TEST

START_TEST(test_reader_unterminated_oversized_message)
{
	char big[100];
	int sv[2];
	proto_reader *r = NULL;
	ssize_t n;

	memset(big, 'a', sizeof(big));
	make_pair(sv);
	ck_assert_int_eq(proto_send_fds(sv[0], big, sizeof(big), NULL, 0), (ssize_t)sizeof(big));
	ck_assert_int_eq(proto_reader_new(64, &r), 0);

	do
		n = proto_reader_fill(r, sv[1]);
	while (n > 0);
	ck_assert_int_eq(n, -EMSGSIZE);
	ck_assert(proto_reader_has_partial(r));
	/* It stays failed: the stream cannot be resynchronised. */
	ck_assert_int_eq(proto_reader_fill(r, sv[1]), -EMSGSIZE);

	proto_reader_free(r);
	close_many(sv, 2);
}
END_TEST

START_TEST(test_reader_max_msg_boundary)
{
	char line[66];
	int sv[2];
	proto_reader *r = NULL;
	char *msg = NULL;
	size_t len = 0;

	make_pair(sv);
	ck_assert_int_eq(proto_reader_new(64, &r), 0);

	memset(line, 'b', 64);
	line[64] = '\n';
	ck_assert_int_eq(proto_send_fds(sv[0], line, 65, NULL, 0), 65);
	ck_assert_int_eq(next_blocking(r, sv[1], &msg, NULL, NULL), 1);
	ck_assert_uint_eq(strlen(msg), 64);
	free(msg);

	memset(line, 'c', 65);
	line[65] = '\n';
	ck_assert_int_eq(proto_send_fds(sv[0], line, 66, NULL, 0), 66);
	ck_assert_int_eq(next_blocking(r, sv[1], &msg, NULL, NULL), -EMSGSIZE);
	(void)len;

	proto_reader_free(r);
	close_many(sv, 2);
}
END_TEST

START_TEST(test_reader_crlf_stripped)
{
	int sv[2];
	proto_reader *r = NULL;
	char *msg = NULL;
	size_t len = 0;

	make_pair(sv);
	send_all(sv[0], "{\"a\":1}\r\na\rb\n", NULL, 0);
	ck_assert_int_eq(proto_reader_new(PROTO_MAX_MSG_DEFAULT, &r), 0);
	ck_assert_int_gt(proto_reader_fill(r, sv[1]), 0);

	ck_assert_int_eq(proto_reader_next(r, &msg, &len, NULL, NULL), 1);
	ck_assert_str_eq(msg, "{\"a\":1}");
	ck_assert_uint_eq(len, 7);
	free(msg);
	/* Only a '\r' right before the '\n' is framing. */
	ck_assert_int_eq(proto_reader_next(r, &msg, &len, NULL, NULL), 1);
	ck_assert_str_eq(msg, "a\rb");
	ck_assert_uint_eq(len, 3);
	free(msg);
	ck_assert_int_eq(proto_reader_next(r, &msg, &len, NULL, NULL), 0);

	proto_reader_free(r);
	close_many(sv, 2);
}
END_TEST

START_TEST(test_reader_blank_lines_skipped)
{
	int sv[2];
	proto_reader *r = NULL;
	char *msg = NULL;

	make_pair(sv);
	send_all(sv[0], "\n\r\n\nabc\n\n\ndef\n\r\n", NULL, 0);
	ck_assert_int_eq(proto_reader_new(PROTO_MAX_MSG_DEFAULT, &r), 0);
	ck_assert_int_gt(proto_reader_fill(r, sv[1]), 0);

	ck_assert_int_eq(proto_reader_next(r, &msg, NULL, NULL, NULL), 1);
	ck_assert_str_eq(msg, "abc");
	free(msg);
	ck_assert_int_eq(proto_reader_next(r, &msg, NULL, NULL, NULL), 1);
	ck_assert_str_eq(msg, "def");
	free(msg);
	ck_assert_int_eq(proto_reader_next(r, &msg, NULL, NULL, NULL), 0);
	ck_assert(!proto_reader_has_partial(r));

	proto_reader_free(r);
	close_many(sv, 2);
}
END_TEST

START_TEST(test_reader_fds_on_blank_line_closed)
{
	int sv[2], p[2], *fds = NULL;
	proto_reader *r = NULL;
	char *msg = NULL, c;
	size_t nfds = 99;

	make_pair(sv);
	ck_assert_int_eq(pipe2(p, O_CLOEXEC | O_NONBLOCK), 0);
	send_all(sv[0], "\r\n", &p[1], 1);
	send_all(sv[0], "after\n", NULL, 0);
	p[1] = safe_close(p[1]);
	ck_assert_int_eq(proto_reader_new(PROTO_MAX_MSG_DEFAULT, &r), 0);

	ck_assert_int_eq(next_blocking(r, sv[1], &msg, &fds, &nfds), -EBADMSG);
	/* The reader held the last write end: closing it means EOF. */
	ck_assert_int_eq(read(p[0], &c, 1), 0);

	ck_assert_int_eq(next_blocking(r, sv[1], &msg, &fds, &nfds), 1);
	ck_assert_str_eq(msg, "after");
	ck_assert_uint_eq(nfds, 0);
	ck_assert_ptr_null(fds);
	free(msg);

	proto_reader_free(r);
	safe_close(p[0]);
	close_many(sv, 2);
}
END_TEST

START_TEST(test_reader_free_closes_queued_fds)
{
	int sv[2], p[2];
	proto_reader *r = NULL;
	char c;

	make_pair(sv);
	ck_assert_int_eq(pipe2(p, O_CLOEXEC | O_NONBLOCK), 0);
	send_all(sv[0], "incomplete", &p[1], 1);
	p[1] = safe_close(p[1]);
	ck_assert_int_eq(proto_reader_new(PROTO_MAX_MSG_DEFAULT, &r), 0);
	ck_assert_int_eq(proto_reader_fill(r, sv[1]), 10);
	ck_assert(proto_reader_has_partial(r));

	errno = 0;
	ck_assert_int_eq(read(p[0], &c, 1), -1);
	ck_assert_int_eq(errno, EAGAIN);
	proto_reader_free(r);
	ck_assert_int_eq(read(p[0], &c, 1), 0);

	safe_close(p[0]);
	close_many(sv, 2);
}
END_TEST

START_TEST(test_reader_too_many_fds_for_one_message)
{
	int sv[2], fds[PROTO_MAX_FDS], fd, before;
	proto_reader *r = NULL;

	make_pair(sv);
	fd = memfd_with("x");
	for (size_t i = 0; i < ELEMENTSOF(fds); i++)
		fds[i] = fd;
	before = count_fds();
	/* Each send is within the limit, the message as a whole is not. */
	send_all(sv[0], "ab", fds, PROTO_MAX_FDS);
	send_all(sv[0], "cd", fds, PROTO_MAX_FDS);
	send_all(sv[0], "\n", NULL, 0);

	ck_assert_int_eq(proto_reader_new(PROTO_MAX_MSG_DEFAULT, &r), 0);
	ck_assert_int_eq(proto_reader_fill(r, sv[1]), 2);
	ck_assert_int_eq(proto_reader_fill(r, sv[1]), -ETOOMANYREFS);
	proto_reader_free(r);
	ck_assert_int_eq(count_fds(), before);

	safe_close(fd);
	close_many(sv, 2);
}
END_TEST

START_TEST(test_reader_eof_mid_message)
{
	int sv[2];
	proto_reader *r = NULL;
	char *msg = NULL;

	make_pair(sv);
	send_all(sv[0], "ok\nhalf", NULL, 0);
	sv[0] = safe_close(sv[0]);
	ck_assert_int_eq(proto_reader_new(PROTO_MAX_MSG_DEFAULT, &r), 0);
	ck_assert_int_eq(proto_reader_fill(r, sv[1]), 7);
	ck_assert_int_eq(proto_reader_next(r, &msg, NULL, NULL, NULL), 1);
	ck_assert_str_eq(msg, "ok");
	free(msg);
	ck_assert_int_eq(proto_reader_next(r, &msg, NULL, NULL, NULL), 0);
	ck_assert_int_eq(proto_reader_fill(r, sv[1]), 0);
	ck_assert(proto_reader_has_partial(r));

	proto_reader_free(r);
	safe_close(sv[1]);
}
END_TEST

/* ---- writer --------------------------------------------------------------- */

START_TEST(test_writer_partial_flush)
{
	const size_t big = 1024 * 1024;
	int sv[2], b[2], c, one = 1, base = count_fds(), flushed = 0;
	proto_writer *w = NULL;
	proto_reader *r = NULL;
	char *payload = malloc(big);
	size_t got = 0, total;

	ck_assert_ptr_nonnull(payload);
	memset(payload, 'B', big);
	make_pair(sv);
	ck_assert_int_eq(setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &one, sizeof(one)), 0);
	set_nonblock(sv[0]);
	set_nonblock(sv[1]);

	b[0] = memfd_with("B0");
	b[1] = memfd_with("B1");
	c = memfd_with("C0");
	ck_assert_int_eq(proto_writer_new(&w), 0);
	ck_assert_int_eq(proto_writer_queue(w, "small-a", 7, NULL, 0), 0);
	ck_assert_int_eq(proto_writer_queue(w, payload, big, b, 2), 0);
	ck_assert_int_eq(proto_writer_queue(w, "small-c", 7, &c, 1), 0);
	ck_assert_int_eq(proto_writer_queue(w, "d", 1, NULL, 0), 0);
	total = 8 + big + 1 + 8 + 2;
	ck_assert_uint_eq(proto_writer_queued_bytes(w), total);
	/* The writer holds dups: the caller's copies can go. */
	close_many(b, 2);
	safe_close(c);

	ck_assert_int_eq(proto_writer_flush(w, sv[0]), 0);
	ck_assert(!proto_writer_is_empty(w));
	ck_assert_uint_gt(proto_writer_queued_bytes(w), 0);
	ck_assert_uint_lt(proto_writer_queued_bytes(w), total);

	ck_assert_int_eq(proto_reader_new(2 * big, &r), 0);
	while (got < 4) {
		char *msg = NULL;
		int *fds = NULL;
		size_t len = 0, nfds = 0;
		int k;

		if (!flushed) {
			k = proto_writer_flush(w, sv[0]);
			ck_assert_int_ge(k, 0);
			flushed = k;
		}
		k = proto_reader_next(r, &msg, &len, &fds, &nfds);
		ck_assert_int_ge(k, 0);
		if (k == 0) {
			ssize_t n = proto_reader_fill(r, sv[1]);
			ck_assert(n > 0 || n == -EAGAIN);
			continue;
		}
		switch (got++) {
		case 0:
			ck_assert_str_eq(msg, "small-a");
			ck_assert_uint_eq(nfds, 0);
			break;
		case 1:
			ck_assert_uint_eq(len, big);
			ck_assert_int_eq(memcmp(msg, payload, big), 0);
			ck_assert_uint_eq(nfds, 2);
			assert_memfd_is(fds[0], "B0");
			assert_memfd_is(fds[1], "B1");
			break;
		case 2:
			ck_assert_str_eq(msg, "small-c");
			ck_assert_uint_eq(nfds, 1);
			assert_memfd_is(fds[0], "C0");
			break;
		case 3:
			ck_assert_str_eq(msg, "d");
			ck_assert_uint_eq(nfds, 0);
			break;
		}
		close_many(fds, nfds);
		free(fds);
		free(msg);
	}
	ck_assert_int_eq(flushed, 1);
	ck_assert(proto_writer_is_empty(w));
	ck_assert_uint_eq(proto_writer_queued_bytes(w), 0);
	/* Nothing more arrives: every fd came exactly once. */
	ck_assert_int_eq(proto_reader_fill(r, sv[1]), -EAGAIN);

	proto_reader_free(r);
	proto_writer_free(w);
	close_many(sv, 2);
	free(payload);
	ck_assert_int_eq(count_fds(), base);
}
END_TEST

START_TEST(test_writer_free_closes_queued_fds)
{
	int p[2];
	proto_writer *w = NULL;
	char c;

	ck_assert_int_eq(pipe2(p, O_CLOEXEC | O_NONBLOCK), 0);
	ck_assert_int_eq(proto_writer_new(&w), 0);
	ck_assert_int_eq(proto_writer_queue(w, "m", 1, &p[1], 1), 0);
	p[1] = safe_close(p[1]);

	errno = 0;
	ck_assert_int_eq(read(p[0], &c, 1), -1);
	ck_assert_int_eq(errno, EAGAIN);
	proto_writer_free(w);
	ck_assert_int_eq(read(p[0], &c, 1), 0);

	safe_close(p[0]);
}
END_TEST

START_TEST(test_writer_queue_rejects)
{
	int fds[PROTO_MAX_FDS + 1], fd, before;
	proto_writer *w = NULL;

	fd = memfd_with("x");
	for (size_t i = 0; i < ELEMENTSOF(fds); i++)
		fds[i] = fd;
	ck_assert_int_eq(proto_writer_new(&w), 0);
	before = count_fds();

	ck_assert_int_eq(proto_writer_queue(w, "m", 1, fds, PROTO_MAX_FDS + 1), -E2BIG);
	ck_assert_int_eq(proto_writer_queue(w, "a\nb", 3, NULL, 0), -EINVAL);
	ck_assert_int_eq(proto_writer_queue(w, "", 0, &fd, 1), -EINVAL);
	fds[1] = 999;
	ck_assert_int_eq(proto_writer_queue(w, "m", 1, fds, 2), -EBADF);
	ck_assert_int_eq(count_fds(), before);
	ck_assert(proto_writer_is_empty(w));

	proto_writer_free(w);
	safe_close(fd);
}
END_TEST

START_TEST(test_writer_peer_gone)
{
	int sv[2];
	proto_writer *w = NULL;

	make_pair(sv);
	sv[1] = safe_close(sv[1]);
	ck_assert_int_eq(proto_writer_new(&w), 0);
	ck_assert_int_eq(proto_writer_queue(w, "m", 1, NULL, 0), 0);
	ck_assert_int_eq(proto_writer_flush(w, sv[0]), -EPIPE);
	proto_writer_free(w);
	safe_close(sv[0]);
}
END_TEST

/* ---- JSON-RPC ------------------------------------------------------------ */

static json_object *parse_ok(const char *s)
{
	json_object *o = NULL;
	const char *why = NULL;

	ck_assert_msg(jsonrpc_parse(s, strlen(s), &o, &why) == 0, "%s: %s", s, why);
	return o;
}

static void assert_json_eq(json_object *o, const char *expected)
{
	_cleanup_json_ json_object *e = parse_ok(expected);

	ck_assert_msg(json_object_equal(o, e), "got %s, want %s",
		      json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN), expected);
}

START_TEST(test_jsonrpc_parse_valid)
{
	_cleanup_json_ json_object *o = parse_ok(" {\"a\":[1,2,{\"b\":null}]} \r\n");
	_cleanup_json_ json_object *n = parse_ok("5");

	assert_json_eq(o, "{\"a\":[1,2,{\"b\":null}]}");
	ck_assert_int_eq(json_object_get_int(n), 5);
}
END_TEST

static const char *const bad_json[] = {
	"{", "{\"a\":}", "{} x", "{}{}", "nul", "", "   ", "[1,]", "{\"a\":1", "\"unterminated",
};

START_TEST(test_jsonrpc_parse_errors)
{
	const char *s = bad_json[_i];
	json_object *o = NULL;
	const char *why = NULL;

	ck_assert_int_eq(jsonrpc_parse(s, strlen(s), &o, &why), -EBADMSG);
	ck_assert_ptr_nonnull(why);
	ck_assert_ptr_null(o);
}
END_TEST

START_TEST(test_jsonrpc_parse_nul_byte)
{
	json_object *o = NULL;
	const char *why = NULL;

	ck_assert_int_eq(jsonrpc_parse("{}\0{}", 5, &o, &why), -EBADMSG);
	ck_assert_ptr_nonnull(why);
}
END_TEST

START_TEST(test_jsonrpc_parse_depth_limit)
{
	char s[2 * (JSONRPC_MAX_DEPTH + 1) + 1];
	json_object *o = NULL;
	const char *why = NULL;
	size_t d;

	/* Exactly the limit parses. */
	d = JSONRPC_MAX_DEPTH;
	memset(s, '[', d);
	memset(s + d, ']', d);
	s[2 * d] = '\0';
	ck_assert_int_eq(jsonrpc_parse(s, 2 * d, &o, &why), 0);
	json_object_put(o);
	o = NULL;

	d = JSONRPC_MAX_DEPTH + 1;
	memset(s, '[', d);
	memset(s + d, ']', d);
	s[2 * d] = '\0';
	ck_assert_int_eq(jsonrpc_parse(s, 2 * d, &o, &why), -EBADMSG);
	ck_assert_str_eq(why, "nesting too deep");
}
END_TEST

/* A reply echoes what json-c kept of a request: what is not valid UTF-8
 * would make the reply invalid JSON. */
static const char *const bad_utf8[] = {
	"{\"jsonrpc\":\"2.0\",\"method\":\"vm.\xff\",\"id\":1}",          /* never in UTF-8 */
	"{\"jsonrpc\":\"2.0\",\"method\":\"\xc3\",\"id\":1}",             /* cut short */
	"{\"jsonrpc\":\"2.0\",\"method\":\"\xc0\xaf\",\"id\":1}",         /* overlong '/' */
	"{\"jsonrpc\":\"2.0\",\"method\":\"\xed\xa0\x80\",\"id\":1}",     /* a surrogate */
	"{\"jsonrpc\":\"2.0\",\"method\":\"\xf4\x90\x80\x80\",\"id\":1}", /* past U+10FFFF */
	"{\"jsonrpc\":\"2.0\",\"method\":\"a\x80\",\"id\":1}",            /* a lone continuation */
};

START_TEST(test_jsonrpc_parse_rejects_bad_utf8)
{
	const char *s = bad_utf8[_i];
	json_object *o = NULL;
	const char *why = NULL;

	ck_assert_int_eq(jsonrpc_parse(s, strlen(s), &o, &why), -EBADMSG);
	ck_assert_str_eq(why, "not valid UTF-8");
	ck_assert_ptr_null(o);
}
END_TEST

START_TEST(test_jsonrpc_parse_takes_utf8)
{
	_cleanup_json_ json_object *o =
	    parse_ok("{\"a\":\"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80 \xf4\x8f\xbf\xbf\"}");

	ck_assert_str_eq(json_object_get_string(json_object_object_get(o, "a")),
			 "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80 \xf4\x8f\xbf\xbf");
}
END_TEST

/* json-c keeps the last of two members of one name: a request with two
 * "method"s would run the second, whatever a filter in front read. */
static const char *const duplicate_names[] = {
	"{\"jsonrpc\":\"2.0\",\"method\":\"vm.list\",\"method\":\"vm.destroy\",\"id\":1}",
	"{\"jsonrpc\":\"2.0\",\"method\":\"vm.list\",\"id\":1,\"id\":2}",
	"{\"jsonrpc\":\"2.0\",\"method\":\"vm.list\",\"m\\u0065thod\":\"x\",\"id\":1}",
	"[{\"jsonrpc\":\"2.0\",\"method\":\"a\",\"id\":1},"
	"{\"jsonrpc\":\"2.0\",\"method\":\"a\",\"params\":{},\"params\":{\"x\":{\"y\":1}}}]",
	"{\"jsonrpc\":\"2.0\",\"method\":\"a\",\"params\":{\"name\":\"x\",\"name\":\"y\"}}",
};

START_TEST(test_jsonrpc_parse_rejects_duplicate_names)
{
	const char *s = duplicate_names[_i];
	json_object *o = NULL;
	const char *why = NULL;

	ck_assert_int_eq(jsonrpc_parse(s, strlen(s), &o, &why), -ENOTUNIQ);
	ck_assert_str_eq(why, "a member name appears twice in one object");
	ck_assert_ptr_null(o);
}
END_TEST

START_TEST(test_jsonrpc_parse_same_name_in_other_objects)
{
	/* A colon inside a string is no member; the same name in two objects
	 * is no duplicate. */
	_cleanup_json_ json_object *o =
	    parse_ok("[{\"a\":\"x:y\",\"b\":{\"a\":1}},{\"a\":\"\\\":\"}]");

	ck_assert_int_eq(json_object_array_length(o), 2);
}
END_TEST

/* json-c clamps an integer it cannot hold to INT64_MIN or UINT64_MAX
 * without a word: an "id" of 5000 digits came back as 2^64-1. */
START_TEST(test_jsonrpc_parse_rejects_integers_it_cannot_keep)
{
	const char *const bad[] = {
		"{\"id\":18446744073709551616}",
		"{\"id\":-9223372036854775809}",
		"{\"id\":99999999999999999999999}",
		"[1,{\"a\":[100000000000000000000]}]",
	};
	char big[5100];
	json_object *o = NULL;
	const char *why = NULL;
	size_t n;

	for (size_t i = 0; i < ELEMENTSOF(bad); i++) {
		ck_assert_msg(jsonrpc_parse(bad[i], strlen(bad[i]), &o, &why) == -ERANGE, "%s",
			      bad[i]);
		ck_assert_ptr_null(o);
	}
	ck_assert_ptr_nonnull(strstr(why, "out of range"));
	strcpy(big, "{\"jsonrpc\":\"2.0\",\"method\":\"vm.list\",\"id\":");
	n = strlen(big);
	memset(big + n, '7', 5000);
	strcpy(big + n + 5000, "}");
	ck_assert_int_eq(jsonrpc_parse(big, strlen(big), &o, &why), -ERANGE);
}
END_TEST

START_TEST(test_jsonrpc_parse_keeps_integers_at_the_edges)
{
	_cleanup_json_ json_object *o = parse_ok(
	    "[18446744073709551615,-9223372036854775808,0,-0,1e400,123456789012345678901.5]");
	_cleanup_json_ json_object *r = jsonrpc_result_new(json_object_array_get_idx(o, 0), NULL);
	const char *s = jsonrpc_to_string(r, NULL);

	/* What is kept is echoed as sent. */
	ck_assert_ptr_nonnull(strstr(s, "\"id\":18446744073709551615"));
	ck_assert_int_eq(json_object_get_int64(json_object_array_get_idx(o, 1)), INT64_MIN);
}
END_TEST

START_TEST(test_jsonrpc_request_valid)
{
	_cleanup_json_ json_object *o = parse_ok(
	    "{\"jsonrpc\":\"2.0\",\"method\":\"vm.start\",\"params\":{\"name\":\"a\"},\"id\":1}");
	_cleanup_json_ json_object *a =
	    parse_ok("{\"jsonrpc\":\"2.0\",\"method\":\"m\",\"params\":[1,2],\"id\":\"x-1\"}");
	_cleanup_json_ json_object *d =
	    parse_ok("{\"jsonrpc\":\"2.0\",\"method\":\"m\",\"id\":2.5}");
	jsonrpc_request req;
	const char *why = NULL;

	ck_assert_int_eq(jsonrpc_request_parse(o, &req, &why), 0);
	ck_assert_str_eq(req.method, "vm.start");
	ck_assert(json_object_is_type(req.params, json_type_object));
	ck_assert(json_object_is_type(req.id, json_type_int));
	ck_assert_int_eq(json_object_get_int(req.id), 1);
	ck_assert(!req.is_notification);

	ck_assert_int_eq(jsonrpc_request_parse(a, &req, &why), 0);
	ck_assert(json_object_is_type(req.params, json_type_array));
	ck_assert_str_eq(json_object_get_string(req.id), "x-1");

	ck_assert_int_eq(jsonrpc_request_parse(d, &req, &why), 0);
	ck_assert_ptr_null(req.params);
	ck_assert(json_object_is_type(req.id, json_type_double));
}
END_TEST

START_TEST(test_jsonrpc_request_notification)
{
	_cleanup_json_ json_object *o = parse_ok("{\"jsonrpc\":\"2.0\",\"method\":\"ping\"}");
	jsonrpc_request req;

	ck_assert_int_eq(jsonrpc_request_parse(o, &req, NULL), 0);
	ck_assert(req.is_notification);
	ck_assert_ptr_null(req.id);
	ck_assert_ptr_null(req.params);
	ck_assert_str_eq(req.method, "ping");
}
END_TEST

START_TEST(test_jsonrpc_request_id_null)
{
	_cleanup_json_ json_object *o =
	    parse_ok("{\"jsonrpc\":\"2.0\",\"method\":\"ping\",\"id\":null}");
	jsonrpc_request req;

	ck_assert_int_eq(jsonrpc_request_parse(o, &req, NULL), 0);
	ck_assert(!req.is_notification);
	ck_assert_ptr_null(req.id);
}
END_TEST

static const struct {
	const char *json;
	const char *why_has;
} bad_requests[] = {
	{ "{\"jsonrpc\":\"1.0\",\"method\":\"m\",\"id\":1}", "jsonrpc" },
	{ "{\"jsonrpc\":2.0,\"method\":\"m\",\"id\":1}", "jsonrpc" },
	{ "{\"method\":\"m\",\"id\":1}", "jsonrpc" },
	{ "{\"jsonrpc\":\"2.0\",\"id\":1}", "method" },
	{ "{\"jsonrpc\":\"2.0\",\"method\":5,\"id\":1}", "method" },
	{ "{\"jsonrpc\":\"2.0\",\"method\":null,\"id\":1}", "method" },
	{ "{\"jsonrpc\":\"2.0\",\"method\":\"m\",\"params\":\"x\",\"id\":1}", "params" },
	{ "{\"jsonrpc\":\"2.0\",\"method\":\"m\",\"params\":null,\"id\":1}", "params" },
	{ "{\"jsonrpc\":\"2.0\",\"method\":\"m\",\"params\":3}", "params" },
	{ "{\"jsonrpc\":\"2.0\",\"method\":\"m\",\"id\":1,\"extra\":0}", "member" },
	{ "{\"jsonrpc\":\"2.0\",\"method\":\"m\",\"id\":true}", "id" },
	{ "{\"jsonrpc\":\"2.0\",\"method\":\"m\",\"id\":{}}", "id" },
	{ "{\"jsonrpc\":\"2.0\",\"method\":\"m\",\"id\":[1]}", "id" },
	{ "[{\"jsonrpc\":\"2.0\",\"method\":\"m\"}]", "object" },
	{ "\"jsonrpc\"", "object" },
};

START_TEST(test_jsonrpc_request_invalid)
{
	_cleanup_json_ json_object *o = parse_ok(bad_requests[_i].json);
	jsonrpc_request req;
	const char *why = NULL;

	ck_assert_int_eq(jsonrpc_request_parse(o, &req, &why), -EINVAL);
	ck_assert_ptr_nonnull(why);
	ck_assert_msg(strstr(why, bad_requests[_i].why_has), "%s: reason \"%s\"",
		      bad_requests[_i].json, why);
}
END_TEST

START_TEST(test_jsonrpc_request_invalid_keeps_id)
{
	_cleanup_json_ json_object *o = parse_ok("{\"jsonrpc\":\"2.0\",\"method\":7,\"id\":7}");
	_cleanup_json_ json_object *b =
	    parse_ok("{\"jsonrpc\":\"2.0\",\"method\":\"m\",\"id\":false}");
	jsonrpc_request req;

	ck_assert_int_eq(jsonrpc_request_parse(o, &req, NULL), -EINVAL);
	ck_assert_int_eq(json_object_get_int(req.id), 7);
	ck_assert_int_eq(jsonrpc_request_parse(b, &req, NULL), -EINVAL);
	ck_assert_ptr_null(req.id);
}
END_TEST

START_TEST(test_jsonrpc_builders)
{
	_cleanup_json_ json_object *id = json_object_new_int(5);
	_cleanup_json_ json_object *sid = json_object_new_string("abc");
	_cleanup_json_ json_object *o = NULL;

	o = jsonrpc_result_new(id, parse_ok("{\"ok\":true}"));
	assert_json_eq(o, "{\"jsonrpc\":\"2.0\",\"result\":{\"ok\":true},\"id\":5}");
	json_object_put(o);

	o = jsonrpc_result_new(NULL, NULL);
	assert_json_eq(o, "{\"jsonrpc\":\"2.0\",\"result\":null,\"id\":null}");
	json_object_put(o);

	o = jsonrpc_error_new(sid, JSONRPC_METHOD_NOT_FOUND, "Method not found", NULL);
	assert_json_eq(o,
		       "{\"jsonrpc\":\"2.0\",\"error\":{\"code\":-32601,\"message\":\"Method not "
		       "found\"},\"id\":\"abc\"}");
	json_object_put(o);

	o = jsonrpc_error_new(NULL, JSONRPC_ERR_BUSY, "busy", parse_ok("{\"op\":\"x\"}"));
	assert_json_eq(o, "{\"jsonrpc\":\"2.0\",\"error\":{\"code\":-32003,\"message\":\"busy\","
			  "\"data\":{\"op\":\"x\"}},\"id\":null}");
	json_object_put(o);

	o = jsonrpc_call_new("vm.list", parse_ok("[1]"), 42);
	assert_json_eq(o, "{\"jsonrpc\":\"2.0\",\"method\":\"vm.list\",\"params\":[1],\"id\":42}");
	json_object_put(o);

	o = jsonrpc_call_new("vm.list", NULL, 1);
	assert_json_eq(o, "{\"jsonrpc\":\"2.0\",\"method\":\"vm.list\",\"id\":1}");
	json_object_put(o);

	o = jsonrpc_notification_new("progress", parse_ok("{\"pct\":1}"));
	assert_json_eq(o, "{\"jsonrpc\":\"2.0\",\"method\":\"progress\",\"params\":{\"pct\":1}}");

	/* The ids were borrowed, not taken. */
	ck_assert_int_eq(json_object_get_int(id), 5);
	ck_assert_str_eq(json_object_get_string(sid), "abc");
}
END_TEST

START_TEST(test_jsonrpc_to_string_one_line)
{
	_cleanup_json_ json_object *o =
	    jsonrpc_call_new("m", parse_ok("{\"s\":\"line1\\nline2/x\\r\\u0001\"}"), 3);
	_cleanup_json_ json_object *back = NULL;
	jsonrpc_request req;
	const char *s;
	size_t len = 0;

	s = jsonrpc_to_string(o, &len);
	ck_assert_ptr_nonnull(s);
	ck_assert_uint_eq(len, strlen(s));
	ck_assert_ptr_null(memchr(s, '\n', len));
	ck_assert_ptr_null(memchr(s, '\r', len));
	ck_assert_ptr_nonnull(strstr(s, "line1\\nline2/x"));
	ck_assert_ptr_null(strchr(s, ' '));

	ck_assert_int_eq(jsonrpc_parse(s, len, &back, NULL), 0);
	ck_assert_int_eq(jsonrpc_request_parse(back, &req, NULL), 0);
	ck_assert_int_eq(json_object_get_int(req.id), 3);
}
END_TEST

/* ---- client against an in-test server thread ------------------------------ */

typedef struct server {
	char dir[64];
	char path[128];
	int lfd;
	pthread_t thread;
	int problems; /* checked by the test after join; no ck_assert off the main thread */
	char client_fd_content[64];
} server;

static int server_send(int fd, proto_writer *w, json_object *o, const int *fds, size_t nfds)
{
	size_t len;
	const char *s = jsonrpc_to_string(o, &len);
	int r;

	if (!s)
		return -ENOMEM;
	r = proto_writer_queue(w, s, len, fds, nfds);
	while (r >= 0) {
		struct pollfd p = { .fd = fd, .events = POLLOUT };
		r = proto_writer_flush(w, fd);
		if (r != 0)
			break;
		poll(&p, 1, -1);
	}
	json_object_put(o);
	return r < 0 ? r : 0;
}

/* Answers according to the method name; returns false to hang up. */
static bool server_handle(server *s, int fd, proto_writer *w, const char *msg, int *fds,
			  size_t nfds)
{
	_cleanup_json_ json_object *o = NULL;
	jsonrpc_request req;
	json_object *id;

	if (jsonrpc_parse(msg, strlen(msg), &o, NULL) < 0 ||
	    jsonrpc_request_parse(o, &req, NULL) < 0 || req.is_notification ||
	    !json_object_is_type(req.id, json_type_int)) {
		s->problems++;
		return false;
	}
	id = req.id;

	if (streq(req.method, "echo"))
		return server_send(fd, w, jsonrpc_result_new(id, json_object_get(req.params)), NULL,
				   0) == 0;
	if (streq(req.method, "fail"))
		return server_send(fd, w,
				   jsonrpc_error_new(id, JSONRPC_ERR_NOT_FOUND, "no such vm",
						     json_object_new_string("vm0")),
				   NULL, 0) == 0;
	if (streq(req.method, "fds")) {
		int mine = memfd_create("server", MFD_CLOEXEC);
		bool ok;

		if (nfds == 1) {
			ssize_t n = pread(fds[0], s->client_fd_content,
					  sizeof(s->client_fd_content) - 1, 0);
			if (n < 0)
				s->problems++;
		} else
			s->problems++;
		if (mine < 0 || write(mine, "from-server", 11) != 11)
			s->problems++;
		ok = server_send(fd, w, jsonrpc_result_new(id, json_object_new_boolean(1)), &mine,
				 1) == 0;
		safe_close(mine);
		return ok;
	}
	if (streq(req.method, "notify")) {
		json_object *p = json_object_new_object();
		json_object_object_add(p, "pct", json_object_new_int(50));
		if (server_send(fd, w, jsonrpc_notification_new("progress", p), NULL, 0) < 0)
			return false;
		return server_send(fd, w, jsonrpc_result_new(id, json_object_new_string("done")),
				   NULL, 0) == 0;
	}
	if (streq(req.method, "wrongid")) {
		json_object *other = json_object_new_int(999);
		int r = server_send(
		    fd, w, jsonrpc_result_new(other, json_object_new_string("wrong")), NULL, 0);
		json_object_put(other);
		if (r < 0)
			return false;
		return server_send(fd, w, jsonrpc_result_new(id, json_object_new_string("right")),
				   NULL, 0) == 0;
	}
	if (streq(req.method, "badshape")) {
		json_object *r = jsonrpc_result_new(id, json_object_new_int(1));
		json_object *e = json_object_new_object();
		json_object_object_add(e, "code", json_object_new_int(1));
		json_object_object_add(e, "message", json_object_new_string("x"));
		json_object_object_add(r, "error", e);
		return server_send(fd, w, r, NULL, 0) == 0;
	}
	if (streq(req.method, "silent"))
		return true;
	/* "hangup" and anything unknown */
	return false;
}

static void *server_main(void *userdata)
{
	server *s = userdata;
	proto_reader *r = NULL;
	proto_writer *w = NULL;
	bool go = true;
	int fd;

	fd = accept4(s->lfd, NULL, NULL, SOCK_CLOEXEC);
	if (fd < 0 || proto_reader_new(PROTO_MAX_MSG_DEFAULT, &r) < 0 || proto_writer_new(&w) < 0) {
		s->problems++;
		go = false;
	}

	while (go) {
		char *msg = NULL;
		int *fds = NULL;
		size_t nfds = 0;
		int k = next_blocking(r, fd, &msg, &fds, &nfds);

		if (k <= 0) {
			if (k < 0)
				s->problems++;
			break;
		}
		go = server_handle(s, fd, w, msg, fds, nfds);
		close_many(fds, nfds);
		free(fds);
		free(msg);
	}

	proto_writer_free(w);
	proto_reader_free(r);
	safe_close(fd);
	return NULL;
}

static void server_start(server *s)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };

	*s = (server){ .lfd = -1 };
	strcpy(s->dir, "/tmp/proto-test-XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(s->dir));
	snprintf(s->path, sizeof(s->path), "%s/sock", s->dir);
	ck_assert_uint_lt(strlen(s->path), sizeof(sa.sun_path));
	strcpy(sa.sun_path, s->path);

	s->lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	ck_assert_int_ge(s->lfd, 0);
	ck_assert_int_eq(bind(s->lfd, (struct sockaddr *)&sa, sizeof(sa)), 0);
	ck_assert_int_eq(listen(s->lfd, 1), 0);
	ck_assert_int_eq(pthread_create(&s->thread, NULL, server_main, s), 0);
}

static void server_stop(server *s)
{
	ck_assert_int_eq(pthread_join(s->thread, NULL), 0);
	safe_close(s->lfd);
	unlink(s->path);
	rmdir(s->dir);
	ck_assert_int_eq(s->problems, 0);
}

START_TEST(test_client_result)
{
	server s;
	proto_client *c = NULL;
	json_object *result = NULL, *error = NULL;

	server_start(&s);
	ck_assert_int_eq(proto_client_connect(s.path, &c), 0);
	ck_assert_int_eq(proto_client_call(c, "echo", parse_ok("{\"name\":\"vm0\"}"), NULL, 0, 5000,
					   &result, &error, NULL, NULL),
			 0);
	assert_json_eq(result, "{\"name\":\"vm0\"}");
	ck_assert_ptr_null(error);
	json_object_put(result);

	/* A second call gets its own id and its own answer. */
	ck_assert_int_eq(
	    proto_client_call(c, "echo", parse_ok("[2]"), NULL, 0, 5000, &result, NULL, NULL, NULL),
	    0);
	assert_json_eq(result, "[2]");
	json_object_put(result);

	proto_client_free(c);
	server_stop(&s);
}
END_TEST

START_TEST(test_client_error)
{
	server s;
	proto_client *c = NULL;
	json_object *result = NULL, *error = NULL, *v;

	server_start(&s);
	ck_assert_int_eq(proto_client_connect(s.path, &c), 0);
	ck_assert_int_eq(
	    proto_client_call(c, "fail", NULL, NULL, 0, 5000, &result, &error, NULL, NULL),
	    -EREMOTEIO);
	ck_assert_ptr_null(result);
	ck_assert(json_object_object_get_ex(error, "code", &v));
	ck_assert_int_eq(json_object_get_int(v), JSONRPC_ERR_NOT_FOUND);
	ck_assert(json_object_object_get_ex(error, "message", &v));
	ck_assert_str_eq(json_object_get_string(v), "no such vm");
	ck_assert(json_object_object_get_ex(error, "data", &v));
	ck_assert_str_eq(json_object_get_string(v), "vm0");
	json_object_put(error);

	proto_client_free(c);
	server_stop(&s);
}
END_TEST

START_TEST(test_client_fds_both_ways)
{
	server s;
	proto_client *c = NULL;
	json_object *result = NULL;
	int mine, *fds = NULL;
	size_t nfds = 0;

	server_start(&s);
	mine = memfd_with("from-client");
	ck_assert_int_eq(proto_client_connect(s.path, &c), 0);
	ck_assert_int_eq(
	    proto_client_call(c, "fds", NULL, &mine, 1, 5000, &result, NULL, &fds, &nfds), 0);
	ck_assert(json_object_get_boolean(result));
	ck_assert_uint_eq(nfds, 1);
	assert_memfd_is(fds[0], "from-server");
	assert_cloexec(fds[0]);
	/* The caller's fd stayed the caller's. */
	assert_memfd_is(mine, "from-client");

	close_many(fds, nfds);
	free(fds);
	json_object_put(result);
	proto_client_free(c);
	server_stop(&s);
	ck_assert_str_eq(s.client_fd_content, "from-client");
	safe_close(mine);
}
END_TEST

START_TEST(test_client_response_fds_closed_when_unwanted)
{
	server s;
	proto_client *c = NULL;
	int mine, before = count_fds();

	/* The server thread shares the fd table, so count once it is gone. */
	server_start(&s);
	mine = memfd_with("x");
	ck_assert_int_eq(proto_client_connect(s.path, &c), 0);
	ck_assert_int_eq(proto_client_call(c, "fds", NULL, &mine, 1, 5000, NULL, NULL, NULL, NULL),
			 0);
	proto_client_free(c);
	server_stop(&s);
	safe_close(mine);
	ck_assert_int_eq(count_fds(), before);
}
END_TEST

typedef struct notified {
	int calls;
	char method[32];
	int pct;
} notified;

static void on_notify(const char *method, json_object *params, void *userdata)
{
	notified *n = userdata;
	json_object *v;

	n->calls++;
	snprintf(n->method, sizeof(n->method), "%s", method);
	if (json_object_object_get_ex(params, "pct", &v))
		n->pct = json_object_get_int(v);
}

START_TEST(test_client_notification_before_response)
{
	server s;
	proto_client *c = NULL;
	json_object *result = NULL;
	notified n = {};

	server_start(&s);
	ck_assert_int_eq(proto_client_connect(s.path, &c), 0);
	proto_client_set_notify(c, on_notify, &n);
	ck_assert_int_eq(
	    proto_client_call(c, "notify", NULL, NULL, 0, 5000, &result, NULL, NULL, NULL), 0);
	ck_assert_str_eq(json_object_get_string(result), "done");
	ck_assert_int_eq(n.calls, 1);
	ck_assert_str_eq(n.method, "progress");
	ck_assert_int_eq(n.pct, 50);

	json_object_put(result);
	proto_client_free(c);
	server_stop(&s);
}
END_TEST

START_TEST(test_client_skips_other_ids)
{
	server s;
	proto_client *c = NULL;
	json_object *result = NULL;

	server_start(&s);
	ck_assert_int_eq(proto_client_connect(s.path, &c), 0);
	ck_assert_int_eq(
	    proto_client_call(c, "wrongid", NULL, NULL, 0, 5000, &result, NULL, NULL, NULL), 0);
	ck_assert_str_eq(json_object_get_string(result), "right");

	json_object_put(result);
	proto_client_free(c);
	server_stop(&s);
}
END_TEST

START_TEST(test_client_bad_response_shape)
{
	server s;
	proto_client *c = NULL;
	json_object *result = NULL;

	server_start(&s);
	ck_assert_int_eq(proto_client_connect(s.path, &c), 0);
	ck_assert_int_eq(
	    proto_client_call(c, "badshape", NULL, NULL, 0, 5000, &result, NULL, NULL, NULL),
	    -EBADMSG);
	ck_assert_ptr_null(result);

	proto_client_free(c);
	server_stop(&s);
}
END_TEST

static int64_t mono_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

START_TEST(test_client_timeout)
{
	server s;
	proto_client *c = NULL;
	json_object *result = NULL;
	int64_t t0;

	server_start(&s);
	ck_assert_int_eq(proto_client_connect(s.path, &c), 0);
	t0 = mono_ms();
	ck_assert_int_eq(
	    proto_client_call(c, "silent", NULL, NULL, 0, 200, &result, NULL, NULL, NULL),
	    -ETIMEDOUT);
	ck_assert_int_ge(mono_ms() - t0, 200);
	ck_assert_ptr_null(result);

	/* Hanging up lets the server see EOF and finish. */
	proto_client_free(c);
	server_stop(&s);
}
END_TEST

START_TEST(test_client_hangup)
{
	server s;
	proto_client *c = NULL;
	json_object *result = NULL;

	server_start(&s);
	ck_assert_int_eq(proto_client_connect(s.path, &c), 0);
	ck_assert_int_eq(
	    proto_client_call(c, "hangup", NULL, NULL, 0, 5000, &result, NULL, NULL, NULL),
	    -ECONNRESET);
	ck_assert_ptr_null(result);

	proto_client_free(c);
	server_stop(&s);
}
END_TEST

START_TEST(test_client_connect_errors)
{
	char longpath[200];
	proto_client *c = NULL;

	memset(longpath, 'p', sizeof(longpath) - 1);
	longpath[0] = '/';
	longpath[sizeof(longpath) - 1] = '\0';
	ck_assert_int_eq(proto_client_connect(longpath, &c), -ENAMETOOLONG);
	ck_assert_int_eq(proto_client_connect("", &c), -EINVAL);
	ck_assert_int_eq(proto_client_connect("/nonexistent/proto-test.sock", &c), -ENOENT);
	ck_assert_ptr_null(c);
}
END_TEST

/* ---- main ---------------------------------------------------------------- */

static Suite *proto_suite(void)
{
	Suite *s = suite_create("proto");
	TCase *t;

	t = tcase_create("frame");
	tcase_add_test(t, test_send_recv_fds_basic);
	tcase_add_test(t, test_send_fds_needs_a_byte);
	tcase_add_test(t, test_recv_ctrunc_closes_installed_fds);
	tcase_add_test(t, test_recv_fds_when_none_allowed);
	tcase_add_test(t, test_reader_more_than_max_fds_in_one_send);
	tcase_add_test(t, test_recv_stray_cmsg_rejected);
	suite_add_tcase(s, t);

	t = tcase_create("reader");
	tcase_add_loop_test(t, test_fds_travel_with_their_message, 0, 40);
	tcase_add_test(t, test_message_split_across_many_reads);
	tcase_add_test(t, test_reader_unterminated_oversized_message);
	tcase_add_test(t, test_reader_max_msg_boundary);
	tcase_add_test(t, test_reader_crlf_stripped);
	tcase_add_test(t, test_reader_blank_lines_skipped);
	tcase_add_test(t, test_reader_fds_on_blank_line_closed);
	tcase_add_test(t, test_reader_free_closes_queued_fds);
	tcase_add_test(t, test_reader_too_many_fds_for_one_message);
	tcase_add_test(t, test_reader_eof_mid_message);
	suite_add_tcase(s, t);

	t = tcase_create("writer");
	tcase_set_timeout(t, 30);
	tcase_add_test(t, test_writer_partial_flush);
	tcase_add_test(t, test_writer_free_closes_queued_fds);
	tcase_add_test(t, test_writer_queue_rejects);
	tcase_add_test(t, test_writer_peer_gone);
	suite_add_tcase(s, t);

	t = tcase_create("jsonrpc");
	tcase_add_test(t, test_jsonrpc_parse_valid);
	tcase_add_loop_test(t, test_jsonrpc_parse_errors, 0, (int)ELEMENTSOF(bad_json));
	tcase_add_test(t, test_jsonrpc_parse_nul_byte);
	tcase_add_test(t, test_jsonrpc_parse_depth_limit);
	tcase_add_loop_test(t, test_jsonrpc_parse_rejects_bad_utf8, 0, ELEMENTSOF(bad_utf8));
	tcase_add_test(t, test_jsonrpc_parse_takes_utf8);
	tcase_add_loop_test(t, test_jsonrpc_parse_rejects_duplicate_names, 0,
			    ELEMENTSOF(duplicate_names));
	tcase_add_test(t, test_jsonrpc_parse_same_name_in_other_objects);
	tcase_add_test(t, test_jsonrpc_parse_rejects_integers_it_cannot_keep);
	tcase_add_test(t, test_jsonrpc_parse_keeps_integers_at_the_edges);
	tcase_add_test(t, test_jsonrpc_request_valid);
	tcase_add_test(t, test_jsonrpc_request_notification);
	tcase_add_test(t, test_jsonrpc_request_id_null);
	tcase_add_loop_test(t, test_jsonrpc_request_invalid, 0, (int)ELEMENTSOF(bad_requests));
	tcase_add_test(t, test_jsonrpc_request_invalid_keeps_id);
	tcase_add_test(t, test_jsonrpc_builders);
	tcase_add_test(t, test_jsonrpc_to_string_one_line);
	suite_add_tcase(s, t);

	t = tcase_create("client");
	tcase_set_timeout(t, 30);
	tcase_add_test(t, test_client_result);
	tcase_add_test(t, test_client_error);
	tcase_add_test(t, test_client_fds_both_ways);
	tcase_add_test(t, test_client_response_fds_closed_when_unwanted);
	tcase_add_test(t, test_client_notification_before_response);
	tcase_add_test(t, test_client_skips_other_ids);
	tcase_add_test(t, test_client_bad_response_shape);
	tcase_add_test(t, test_client_timeout);
	tcase_add_test(t, test_client_hangup);
	tcase_add_test(t, test_client_connect_errors);
	suite_add_tcase(s, t);

	return s;
}

int main(void)
{
	SRunner *sr = srunner_create(proto_suite());
	int failed;

	/* Fork per test unless CK_FORK=no (valgrind): a crash is one failure. */
	srunner_set_fork_status(sr, CK_FORK_GETENV);
	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
