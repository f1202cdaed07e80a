/* SPDX-License-Identifier: MIT */
/*
 * Newline-delimited messages over a SOCK_STREAM UNIX socket, with file
 * descriptors carried as SCM_RIGHTS.
 *
 * Rule for which message an fd belongs to: a sender attaches a message's fds
 * to the sendmsg() that carries the first byte of that message. On a UNIX
 * stream socket the kernel ends a recvmsg() right after the segment that
 * carried fds, so every fd that arrives belongs to the message containing
 * the last byte of the chunk it arrived with. The reader marks each received
 * fd with that stream offset and hands it out with that message only.
 *
 * Nothing here logs or exits; errors are negative errno.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#define PROTO_MAX_MSG_DEFAULT (1024 * 1024) /* bytes in one message */
#define PROTO_MAX_FDS 16                    /* fds in one message */

/*
 * The one receive helper. Reads up to len bytes and at most max_fds fds
 * (MSG_CMSG_CLOEXEC). On MSG_CTRUNC, more than max_fds fds, or any control
 * message that is not exactly SCM_RIGHTS at SOL_SOCKET, closes every fd that
 * arrived and returns -EBADMSG (the bytes are consumed and lost).
 * Returns bytes read (0 on EOF), or negative errno (-EAGAIN when a
 * non-blocking socket has nothing).
 */
ssize_t proto_recv_fds(int sockfd, void *buf, size_t len, int *fds, size_t max_fds,
		       size_t *ret_nfds);

/*
 * Send bytes with nfds fds attached (nfds may be 0). MSG_NOSIGNAL. Returns
 * bytes sent (the fds went with them if > 0) or negative errno. nfds > 0
 * with len == 0 is -EINVAL: SCM_RIGHTS needs at least one ordinary byte.
 */
ssize_t proto_send_fds(int sockfd, const void *buf, size_t len, const int *fds, size_t nfds);

typedef struct proto_reader proto_reader;

int proto_reader_new(size_t max_msg, proto_reader **ret);
/* Frees the buffer and closes every fd still queued. Accepts NULL. */
proto_reader *proto_reader_free(proto_reader *r);

/*
 * Read what the socket has now into the buffer (one recvmsg). Returns
 * bytes read (> 0), 0 on EOF, -EAGAIN, -EBADMSG (see proto_recv_fds),
 * -EMSGSIZE when the buffered incomplete message already exceeds max_msg
 * (the connection cannot be resynchronised and should be closed), or
 * -ETOOMANYREFS when more than PROTO_MAX_FDS fds have arrived for one
 * message.
 */
ssize_t proto_reader_fill(proto_reader *r, int sockfd);

/*
 * Take the next complete message. A trailing "\r" before "\n" is dropped
 * (QMP sends CRLF). Blank lines are skipped; fds attached to a blank line
 * are closed and -EBADMSG returned. On success returns 1 and gives the
 * caller a malloc'd NUL-terminated copy (ret_msg, ret_len) and a malloc'd
 * array of the fds attached to this message (ret_fds, ret_nfds; NULL/0 when
 * none); the caller owns both. Returns 0 when no complete message is
 * buffered yet.
 */
int proto_reader_next(proto_reader *r, char **ret_msg, size_t *ret_len, int **ret_fds,
		      size_t *ret_nfds);

/* True when bytes of an incomplete message are buffered (EOF there means a
 * peer dropped the connection in the middle of a message). */
bool proto_reader_has_partial(const proto_reader *r);

typedef struct proto_writer proto_writer;

int proto_writer_new(proto_writer **ret);
/* Frees queued data and closes queued fds. Accepts NULL. */
proto_writer *proto_writer_free(proto_writer *w);

/*
 * Queue msg followed by "\n". Dups the nfds fds (F_DUPFD_CLOEXEC) so the
 * caller keeps its own; they are closed once sent or when the writer is
 * freed. Returns 0 or negative errno (-ENOMEM, -E2BIG for nfds > PROTO_MAX_FDS).
 */
int proto_writer_queue(proto_writer *w, const char *msg, size_t len, const int *fds, size_t nfds);

/*
 * Write as much as the socket takes. Returns 1 when everything is flushed,
 * 0 when data remains (the socket would block), negative errno on error
 * (-EPIPE when the peer is gone).
 */
int proto_writer_flush(proto_writer *w, int sockfd);

bool proto_writer_is_empty(const proto_writer *w);
size_t proto_writer_queued_bytes(const proto_writer *w);
/* What the queue holds in memory: its bytes plus what each message costs
 * besides (many small messages cost more than their text). */
size_t proto_writer_footprint(const proto_writer *w);
