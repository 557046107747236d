/* uringloop data plane: shared definitions.
 *
 * An operation record (`ul_op`) holds exactly what must outlive submission:
 * the file descriptor, the Python object whose memory the kernel reads or
 * writes (kept as a held Py_buffer so it cannot be resized or collected), and
 * the future to resolve. Records live in a slab; the user_data of every SQE is
 * (generation << 32 | slot), so a stale key (a CQE or a cancel for a record
 * that has since been reused) never matches the new occupant.
 */
#ifndef URINGLOOP_DATAPLANE_H
#define URINGLOOP_DATAPLANE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "compat.h"

enum ul_kind {
    UL_FREE = 0,
    UL_POLL,      /* one-shot POLL_ADD, re-armed each iteration: level-triggered like epoll */
    UL_RECV,      /* sock_recv: result is a new bytes object */
    UL_RECV_INTO, /* sock_recv_into: result is a byte count */
    UL_SENDALL,   /* sock_sendall: resubmits the rest after short sends */
    UL_ACCEPT,    /* sock_accept: result is (fd, address) */
    UL_SENDZC,    /* sock_sendzc: resolves with the byte count at the notification CQE */
    UL_ACCEPT_MULTI, /* a server's multishot accept: each CQE calls fut(fd_or_-errno) */
    UL_RESULT,      /* splice, one-shot poll: the future gets the CQE's result as an int */
    /* stream kinds last: complete_op sends every kind from UL_STREAM_RECV on to the stream */
    UL_STREAM_RECV, /* a stream transport's read: data goes to the protocol */
    UL_STREAM_SEND, /* a stream transport's copied send */
    UL_STREAM_ZC,   /* a stream transport's SEND_ZC: done only at its notification CQE */
};

typedef struct ul_op {
    uint32_t gen;
    uint32_t slot;
    uint8_t kind;
    uint8_t armed;     /* the kernel owns the request: wait for its final CQE */
    uint8_t cancelled; /* the caller gave up: drop results, keep memory until the final CQE */
    uint8_t has_view;
    uint8_t queued;    /* a fired poll waiting in the re-arm list */
    uint8_t notif;     /* SEND_ZC: the first CQE is in, the notification is awaited */
    int fd;
    unsigned arg; /* poll mask, recv length, or MSG_* flags */
    PyObject *fut;
    PyObject *obj;
    PyObject *sock; /* the socket object a recv reads for (handed to orphan_cb) */
    Py_buffer view;
    /* a vectored stream send: one held view per payload in obj (a list) */
    Py_buffer *views;
    struct iovec *iov;
    struct msghdr msg;
    int niov, iov_first;
    size_t done;
    size_t pinned; /* SEND_ZC: bytes lent to the kernel until the notification */
    socklen_t addrlen;
    struct sockaddr_storage addr;
    uint32_t next_free;
} ul_op;

#define UL_NO_SLOT UINT32_MAX
/* user_data 0 marks requests whose completion nobody waits for (cancels). */
#define UL_IGNORE 0ULL

#endif
