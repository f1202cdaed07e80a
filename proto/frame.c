/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "common/macro.h"
#include "proto/frame.h"

/* The kernel refuses more than this many fds in one SCM_RIGHTS message
 * (SCM_MAX_FD, not exported to userspace); it also bounds our stack buffers. */
#define KERNEL_MAX_FDS 253

/* Upper bound on one recvmsg(), so a fast peer cannot make one fill huge. */
#define READ_CHUNK (64 * 1024)

/* How many queued messages one sendmsg() may gather. */
#define WRITE_IOV_MAX 16

/* ---- the one receive and send path ------------------------------------- */

static void close_cmsg_fds(struct msghdr *mh)
{
	for (struct cmsghdr *c = CMSG_FIRSTHDR(mh); c; c = CMSG_NXTHDR(mh, c)) {
		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS ||
		    c->cmsg_len < CMSG_LEN(0))
			continue;

		size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		for (size_t i = 0; i < n; i++) {
			int fd;
			/* CMSG_DATA is not guaranteed to be int-aligned. */
			memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
			safe_close(fd);
		}
	}
}

/* Counts the fds in mh; false when anything about the control data is off. */
static bool cmsg_fds_valid(struct msghdr *mh, size_t max_fds, size_t *ret_n)
{
	size_t total = 0;

	if (mh->msg_flags & MSG_CTRUNC)
		return false;

	for (struct cmsghdr *c = CMSG_FIRSTHDR(mh); c; c = CMSG_NXTHDR(mh, c)) {
		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
			return false;
		if (c->cmsg_len < CMSG_LEN(0) || (c->cmsg_len - CMSG_LEN(0)) % sizeof(int) != 0)
			return false;
		total += (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
	}
	if (total > max_fds)
		return false;

	*ret_n = total;
	return true;
}

static void cmsg_copy_fds(struct msghdr *mh, int *fds)
{
	size_t k = 0;

	for (struct cmsghdr *c = CMSG_FIRSTHDR(mh); c; c = CMSG_NXTHDR(mh, c)) {
		size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		memcpy(fds + k, CMSG_DATA(c), n * sizeof(int));
		k += n;
	}
}

ssize_t proto_recv_fds(int sockfd, void *buf, size_t len, int *fds, size_t max_fds,
		       size_t *ret_nfds)
{
	union {
		struct cmsghdr align;
		char buf[CMSG_SPACE(sizeof(int) * KERNEL_MAX_FDS)];
	} control;
	struct iovec iov = { .iov_base = buf, .iov_len = len };
	struct msghdr mh = {
		.msg_iov = &iov,
		.msg_iovlen = 1,
	};
	size_t nfds = 0;
	ssize_t n;

	if (max_fds > 0 && !fds)
		return -EINVAL;

	/* Room for exactly max_fds: anything more makes the kernel set
	 * MSG_CTRUNC. With no room at all the kernel drops fds itself. */
	max_fds = MIN(max_fds, (size_t)KERNEL_MAX_FDS);
	if (max_fds > 0) {
		mh.msg_control = control.buf;
		mh.msg_controllen = CMSG_SPACE(sizeof(int) * max_fds);
	}

	do
		n = recvmsg(sockfd, &mh, MSG_CMSG_CLOEXEC);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return -errno;

	/* fds always ride on at least one byte, so fds with EOF are bogus too. */
	if (!cmsg_fds_valid(&mh, max_fds, &nfds) || (n == 0 && nfds > 0)) {
		close_cmsg_fds(&mh);
		return -EBADMSG;
	}

	if (nfds > 0)
		cmsg_copy_fds(&mh, fds);
	if (ret_nfds)
		*ret_nfds = nfds;
	return n;
}

static ssize_t send_fds_flags(int sockfd, const struct iovec *iov, size_t iovcnt, const int *fds,
			      size_t nfds, int flags)
{
	union {
		struct cmsghdr align;
		char buf[CMSG_SPACE(sizeof(int) * KERNEL_MAX_FDS)];
	} control;
	struct msghdr mh = {
		.msg_iov = (struct iovec *)iov,
		.msg_iovlen = iovcnt,
	};
	ssize_t n;

	if (nfds > KERNEL_MAX_FDS)
		return -E2BIG;
	if (nfds > 0) {
		memset(&control, 0, sizeof(control));
		mh.msg_control = control.buf;
		mh.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);

		struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
		memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
	}

	do
		n = sendmsg(sockfd, &mh, flags | MSG_NOSIGNAL);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return -errno;
	return n;
}

ssize_t proto_send_fds(int sockfd, const void *buf, size_t len, const int *fds, size_t nfds)
{
	struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };

	if (nfds > 0 && (len == 0 || !fds))
		return -EINVAL;
	return send_fds_flags(sockfd, &iov, 1, fds, nfds, 0);
}

/* ---- reader ------------------------------------------------------------ */

typedef struct queued_fd {
	int fd;
	uint64_t mark; /* stream offset of the last byte of the chunk it came with */
} queued_fd;

struct proto_reader {
	char *buf;
	size_t size;
	size_t start;   /* first byte not yet handed out */
	size_t partial; /* first byte after the last '\n' buffered (>= start) */
	size_t len;     /* end of buffered data */
	uint64_t base;  /* stream offset of buf[0] */
	size_t max_msg;

	queued_fd *fds; /* in stream order */
	size_t nfds;
	size_t fds_size;
};

int proto_reader_new(size_t max_msg, proto_reader **ret)
{
	proto_reader *r;

	/* max_msg + 1 must not overflow, and buffer math stays in ssize_t. */
	if (max_msg == 0 || max_msg > SSIZE_MAX / 2 || !ret)
		return -EINVAL;

	r = calloc(1, sizeof(*r));
	if (!r)
		return -ENOMEM;
	r->max_msg = max_msg;
	*ret = r;
	return 0;
}

proto_reader *proto_reader_free(proto_reader *r)
{
	if (!r)
		return NULL;
	for (size_t i = 0; i < r->nfds; i++)
		safe_close(r->fds[i].fd);
	free(r->fds);
	free(r->buf);
	free(r);
	return NULL;
}

bool proto_reader_has_partial(const proto_reader *r)
{
	return r && r->len > r->partial;
}

/* Make room for want more bytes; the incomplete message plus whatever
 * complete ones the caller has not taken yet stay buffered. */
static int reader_reserve(proto_reader *r, size_t want)
{
	size_t keep = r->len - r->start, need, size;
	char *p;

	if (r->size - r->len >= want)
		return 0;

	if (r->start > 0) {
		memmove(r->buf, r->buf + r->start, keep);
		r->base += r->start;
		r->partial -= r->start;
		r->len = keep;
		r->start = 0;
		if (r->size - r->len >= want)
			return 0;
	}

	need = keep + want;
	size = MAX(need, MIN(r->size * 2, (r->partial - r->start) + r->max_msg + 1));
	p = realloc(r->buf, size);
	if (!p)
		return -ENOMEM;
	r->buf = p;
	r->size = size;
	return 0;
}

static int reader_queue_fds(proto_reader *r, const int *fds, size_t n, uint64_t mark)
{
	if (r->nfds + n > r->fds_size) {
		size_t size = MAX(r->nfds + n, r->fds_size * 2);
		queued_fd *p = reallocarray(r->fds, size, sizeof(*p));
		if (!p)
			return -ENOMEM;
		r->fds = p;
		r->fds_size = size;
	}
	for (size_t i = 0; i < n; i++)
		r->fds[r->nfds++] = (queued_fd){ .fd = fds[i], .mark = mark };
	return 0;
}

/* How many queued fds arrived with a chunk ending at or after stream offset
 * from; marks ascend, so count from the tail. */
static size_t reader_fds_since(const proto_reader *r, uint64_t from)
{
	size_t n = 0;

	while (n < r->nfds && r->fds[r->nfds - 1 - n].mark >= from)
		n++;
	return n;
}

ssize_t proto_reader_fill(proto_reader *r, int sockfd)
{
	int fds[PROTO_MAX_FDS];
	size_t nfds = 0, old_len, want;
	uint64_t msg_start;
	const char *nl;
	ssize_t n;
	int k;

	if (!r)
		return -EINVAL;
	if (r->len - r->partial > r->max_msg)
		return -EMSGSIZE;

	/* Never read past what could still complete the current message: an
	 * overlong line is then noticed exactly when it exceeds max_msg. */
	want = MIN((size_t)READ_CHUNK, r->max_msg + 1 - (r->len - r->partial));
	k = reader_reserve(r, want);
	if (k < 0)
		return k;

	n = proto_recv_fds(sockfd, r->buf + r->len, want, fds, PROTO_MAX_FDS, &nfds);
	if (n <= 0)
		return n;

	old_len = r->len;
	r->len += (size_t)n;

	/* The message the fds belong to starts after the last '\n' before the
	 * chunk's last byte; a message gets at most PROTO_MAX_FDS in total. */
	msg_start = r->base + r->partial;
	nl = memrchr(r->buf + old_len, '\n', (size_t)n - 1);
	if (nl)
		msg_start = r->base + (size_t)(nl - r->buf) + 1;

	nl = memrchr(r->buf + old_len, '\n', (size_t)n);
	if (nl)
		r->partial = (size_t)(nl - r->buf) + 1;

	if (nfds > 0) {
		uint64_t mark = r->base + r->len - 1;

		k = reader_queue_fds(r, fds, nfds, mark);
		if (k < 0) {
			close_many(fds, nfds);
			return k;
		}
		if (reader_fds_since(r, msg_start) > PROTO_MAX_FDS)
			return -ETOOMANYREFS;
	}

	if (r->len - r->partial > r->max_msg)
		return -EMSGSIZE;
	return n;
}

/* Removes the first n queued fds; they now belong to the caller. */
static void reader_pop_fds(proto_reader *r, size_t n)
{
	if (n == 0)
		return; /* r->fds may still be NULL: no memmove(NULL, ...) */
	memmove(r->fds, r->fds + n, (r->nfds - n) * sizeof(*r->fds));
	r->nfds -= n;
}

static void reader_drop_fds(proto_reader *r, size_t n)
{
	for (size_t i = 0; i < n; i++)
		safe_close(r->fds[i].fd);
	reader_pop_fds(r, n);
}

int proto_reader_next(proto_reader *r, char **ret_msg, size_t *ret_len, int **ret_fds,
		      size_t *ret_nfds)
{
	if (!r || !ret_msg)
		return -EINVAL;

	for (;;) {
		_cleanup_free_ char *msg = NULL;
		_cleanup_free_ int *fds = NULL;
		size_t line, raw, nfds = 0;
		uint64_t end;
		const char *nl;

		if (r->start == r->partial)
			return 0;

		nl = memchr(r->buf + r->start, '\n', r->partial - r->start);
		/* partial only ever moves past a '\n', so there is one. */
		if (!nl)
			return -EIO;

		raw = line = (size_t)(nl - (r->buf + r->start));
		end = r->base + (size_t)(nl - r->buf);
		while (nfds < r->nfds && r->fds[nfds].mark <= end)
			nfds++;

		if (line > 0 && r->buf[r->start + line - 1] == '\r')
			line--;

		if (raw > r->max_msg || (line == 0 && nfds > 0) || nfds > PROTO_MAX_FDS) {
			r->start += raw + 1;
			reader_drop_fds(r, nfds);
			return raw > r->max_msg ? -EMSGSIZE : -EBADMSG;
		}
		if (line == 0) {
			r->start += raw + 1;
			continue;
		}

		msg = malloc(line + 1);
		if (!msg)
			return -ENOMEM;
		memcpy(msg, r->buf + r->start, line);
		msg[line] = '\0';

		if (nfds > 0) {
			fds = malloc(nfds * sizeof(int));
			if (!fds)
				return -ENOMEM;
			for (size_t i = 0; i < nfds; i++)
				fds[i] = r->fds[i].fd;
		}

		/* Nothing can fail any more: hand the message and fds over. */
		r->start += raw + 1;
		reader_pop_fds(r, nfds);

		if (ret_fds)
			*ret_fds = TAKE_PTR(fds);
		else
			close_many(fds, nfds);
		if (ret_nfds)
			*ret_nfds = ret_fds ? nfds : 0;
		if (ret_len)
			*ret_len = line;
		*ret_msg = TAKE_PTR(msg);
		return 1;
	}
}

/* ---- writer ------------------------------------------------------------ */

typedef struct wmsg {
	struct wmsg *next;
	char *data; /* message plus "\n" */
	size_t len;
	size_t off; /* bytes already sent */
	int fds[PROTO_MAX_FDS];
	size_t nfds; /* 0 once the fds went out */
} wmsg;

struct proto_writer {
	wmsg *head;
	wmsg **tail;
	size_t queued;
	size_t count; /* messages in the queue */
};

static wmsg *wmsg_free(wmsg *m)
{
	if (!m)
		return NULL;
	close_many(m->fds, m->nfds);
	free(m->data);
	free(m);
	return NULL;
}

int proto_writer_new(proto_writer **ret)
{
	proto_writer *w;

	if (!ret)
		return -EINVAL;
	w = calloc(1, sizeof(*w));
	if (!w)
		return -ENOMEM;
	w->tail = &w->head;
	*ret = w;
	return 0;
}

proto_writer *proto_writer_free(proto_writer *w)
{
	if (!w)
		return NULL;
	while (w->head) {
		wmsg *m = w->head;
		w->head = m->next;
		wmsg_free(m);
	}
	free(w);
	return NULL;
}

int proto_writer_queue(proto_writer *w, const char *msg, size_t len, const int *fds, size_t nfds)
{
	wmsg *m;

	if (!w || (!msg && len > 0) || (nfds > 0 && !fds))
		return -EINVAL;
	if (nfds > PROTO_MAX_FDS)
		return -E2BIG;
	/* An embedded newline would split the message and misassign its fds;
	 * fds need a non-blank line to travel with. */
	if (len > 0 && memchr(msg, '\n', len))
		return -EINVAL;
	if (len == 0 && nfds > 0)
		return -EINVAL;
	if (len >= SIZE_MAX - w->queued)
		return -ENOMEM;

	m = calloc(1, sizeof(*m));
	if (!m)
		return -ENOMEM;
	m->data = malloc(len + 1);
	if (!m->data) {
		free(m);
		return -ENOMEM;
	}
	if (len > 0)
		memcpy(m->data, msg, len);
	m->data[len] = '\n';
	m->len = len + 1;

	for (; m->nfds < nfds; m->nfds++) {
		/* Never below 3: a caller that closed stdio must not get a
		 * socket's payload fd where stray prints would land. */
		int fd = fcntl(fds[m->nfds], F_DUPFD_CLOEXEC, 3);
		if (fd < 0) {
			int r = -errno;
			wmsg_free(m);
			return r;
		}
		m->fds[m->nfds] = fd;
	}

	*w->tail = m;
	w->tail = &m->next;
	w->queued += m->len;
	w->count++;
	return 0;
}

/* Drops messages that are completely sent, n bytes in all. */
static void writer_advance(proto_writer *w, size_t n)
{
	w->queued -= n;
	while (n > 0) {
		wmsg *m = w->head;
		size_t k = MIN(n, m->len - m->off);

		m->off += k;
		n -= k;
		if (m->off < m->len)
			break;
		w->head = m->next;
		if (!w->head)
			w->tail = &w->head;
		w->count--;
		wmsg_free(m);
	}
}

int proto_writer_flush(proto_writer *w, int sockfd)
{
	if (!w)
		return -EINVAL;

	while (w->head) {
		struct iovec iov[WRITE_IOV_MAX];
		wmsg *m = w->head;
		size_t n = 0;
		ssize_t k;

		/* A message's fds go with a send that starts at its first byte
		 * and carries no other message, so on the receiving side the
		 * chunk they arrive with ends inside that message. Messages
		 * without pending fds may share a send. */
		iov[n++] =
		    (struct iovec){ .iov_base = m->data + m->off, .iov_len = m->len - m->off };
		if (m->nfds == 0)
			for (wmsg *p = m->next; p && p->nfds == 0 && n < WRITE_IOV_MAX; p = p->next)
				iov[n++] = (struct iovec){ .iov_base = p->data, .iov_len = p->len };

		k = send_fds_flags(sockfd, iov, n, m->fds, m->nfds, MSG_DONTWAIT);
		if (k == -EAGAIN)
			return 0;
		if (k < 0)
			return (int)k;

		/* The kernel took the fds along with the first byte. */
		close_many(m->fds, m->nfds);
		m->nfds = 0;
		writer_advance(w, (size_t)k);
	}
	return 1;
}

bool proto_writer_is_empty(const proto_writer *w)
{
	return !w || !w->head;
}

size_t proto_writer_queued_bytes(const proto_writer *w)
{
	return w ? w->queued : 0;
}

/* Two allocations per message, each with malloc's own header (16 bytes
 * on 64-bit glibc, rounded up to 16). */
#define WMSG_COST (sizeof(wmsg) + 2 * 32)

size_t proto_writer_footprint(const proto_writer *w)
{
	return w ? w->queued + w->count * WMSG_COST : 0;
}
