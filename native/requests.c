/* One-shot socket requests (the loop's sock_* methods, splice, one-shot polls) and
 * the readiness polls behind add_reader/add_writer.
 *
 * Some facts about these requests
 * -------------------------------
 * - RECV/SEND take a 32-bit length and the kernel moves at most MAX_RW_COUNT bytes
 *   per call: longer requests are capped at UL_MAX_RW and continued (sendall
 *   resubmits the rest from the same record; a capped recv returns what it got,
 *   as recv(2) would).
 * - A stream socket may take only part of a send; io_uring does not retry it.
 * - A cancel races the request. A RECV whose cancel lost still completes with the
 *   bytes it took out of the socket: they go to the loop's orphan callback, which
 *   hands them to the next receive on that socket. Every cancelled receive that was
 *   in flight reports there exactly once (b'' when it brought nothing), so the loop
 *   knows when no cancelled receive can bring more data ahead of a new one.
 * - An ACCEPT that completes after its future gave up has made a connection
 *   nobody will take: it is closed.
 * - POLL_ADD is one-shot: a fired poll is re-armed at the start of the next
 *   wait(), which gives epoll's level-triggered behaviour (a multishot poll would
 *   be edge-triggered).
 * - SEND_ZC: two CQEs, see stream_send.c; sock_sendzc's future resolves at the
 *   notification, when the memory is the caller's again.
 */
#include "dataplane.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stddef.h>
#include <string.h>
#include <sys/un.h>
#include <unistd.h>

PyObject *sockaddr_to_py(const struct sockaddr_storage *ss, socklen_t len)
{
    char host[INET6_ADDRSTRLEN];
    switch (ss->ss_family) {
    case AF_INET: {
        const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
        inet_ntop(AF_INET, &a->sin_addr, host, sizeof(host));
        return Py_BuildValue("(si)", host, ntohs(a->sin_port));
    }
    case AF_INET6: {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
        inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof(host));
        return Py_BuildValue("(siII)", host, ntohs(a->sin6_port), ntohl(a->sin6_flowinfo),
                             a->sin6_scope_id);
    }
    case AF_UNIX: {
        const struct sockaddr_un *a = (const struct sockaddr_un *)ss;
        Py_ssize_t n = (Py_ssize_t)len - (Py_ssize_t)offsetof(struct sockaddr_un, sun_path);
        if (n <= 0)
            return PyUnicode_FromString("");
        if (a->sun_path[0] == '\0') /* abstract namespace: bytes, like socket.accept() */
            return PyBytes_FromStringAndSize(a->sun_path, n);
        return PyUnicode_DecodeFSDefaultAndSize(a->sun_path, strnlen(a->sun_path, n));
    }
    default:
        return PyTuple_Pack(0);
    }
}

static size_t cap_len(size_t n) { return n > UL_MAX_RW ? UL_MAX_RW : n; }

/* ------------------------------------------------------------ polls */

static int rearm_list_add(Ring *r, ul_op *op)
{
    if (r->nrearm == r->caprearm) {
        uint32_t ncap = r->caprearm ? r->caprearm * 2 : 64;
        uint32_t *n = ul_realloc(r->rearm, ncap * sizeof(*n));
        if (!n) {
            PyErr_NoMemory();
            return -1;
        }
        r->rearm = n;
        r->caprearm = ncap;
    }
    r->rearm[r->nrearm++] = op->slot;
    op->queued = 1;
    return 0;
}

static void poll_complete(Ring *r, ul_op *op, int res)
{
    op->armed = 0;
    r->inflight--;
    if (op->cancelled) {
        op_free(r, op);
        return;
    }
    if (res < 0) {
        /* -EBADF and friends: the fd is gone. Like epoll, stop reporting it;
           the owner frees the record when it unregisters. */
        return;
    }
    PyObject *ev = Py_BuildValue("(iI)", op->fd, (unsigned)res);
    if (!ev || PyList_Append(r->events, ev) < 0)
        PyErr_WriteUnraisable((PyObject *)r);
    Py_XDECREF(ev);
    if (rearm_list_add(r, op) < 0)
        PyErr_WriteUnraisable((PyObject *)r); /* the registration goes quiet, as a dead fd */
}

int rearm_polls(Ring *r)
{
    uint32_t i;
    for (i = 0; i < r->nrearm; i++) {
        ul_op *op = r->ops[r->rearm[i]];
        if (op->kind != UL_POLL || !op->queued)
            continue; /* unregistered since it fired */
        struct io_uring_sqe *sqe = ring_sqe(r);
        if (!sqe) {
            /* keep the rest for the next call */
            memmove(r->rearm, r->rearm + i, (r->nrearm - i) * sizeof(*r->rearm));
            r->nrearm -= i;
            return -1;
        }
        io_uring_prep_poll_add(sqe, op->fd, op->arg);
        op->queued = 0;
        op_armed(r, op, sqe);
    }
    r->nrearm = 0;
    return 0;
}

PyObject *Ring_poll_add(Ring *r, PyObject *args)
{
    int fd;
    unsigned mask;
    if (!PyArg_ParseTuple(args, "iI:poll_add", &fd, &mask))
        return NULL;
    if (!ring_live(r))
        return NULL;
    ul_op *op = op_alloc(r, UL_POLL);
    if (!op)
        return NULL;
    op->fd = fd;
    op->arg = mask;
    /* armed at the start of the next wait(), together with re-arms */
    if (rearm_list_add(r, op) < 0) {
        op_free(r, op);
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(op_key(op));
}

PyObject *Ring_poll_modify(Ring *r, PyObject *args)
{
    unsigned long long key;
    unsigned mask;
    if (!PyArg_ParseTuple(args, "KI:poll_modify", &key, &mask))
        return NULL;
    if (!ring_live(r))
        return NULL;
    ul_op *op = op_lookup(r, key);
    if (!op || op->kind != UL_POLL || op->cancelled) {
        PyErr_SetString(PyExc_KeyError, "no such poll registration");
        return NULL;
    }
    if (!op->armed) {
        op->arg = mask; /* applies when it is re-armed */
        return PyLong_FromUnsignedLongLong(key);
    }
    /* Armed with the old mask: retire it and register anew. */
    int fd = op->fd;
    if (op_cancel(r, op) < 0)
        return NULL;
    PyObject *a = Py_BuildValue("(iI)", fd, mask);
    if (!a)
        return NULL;
    PyObject *res = Ring_poll_add(r, a);
    Py_DECREF(a);
    return res;
}

PyObject *Ring_cancel(Ring *r, PyObject *arg)
{
    unsigned long long key = PyLong_AsUnsignedLongLong(arg);
    if (key == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    ul_op *op = op_lookup(r, key);
    if (!op || op->cancel_sent)
        Py_RETURN_FALSE;
    if (!op->armed) {
        /* Only a fired poll waiting to be re-armed is unarmed and ours to free. Any
           other unarmed record is being completed right now (this cancel comes from
           its future's callbacks, rule 1): its completion frees it. */
        if (op->kind == UL_POLL) {
            op->cancelled = 1;
            op->queued = 0;
            op_free(r, op);
        }
        Py_RETURN_FALSE; /* nothing will complete */
    }
    if (op_cancel(r, op) < 0)
        return NULL;
    if (ring_forked(r) || r->closed)
        Py_RETURN_FALSE;
    Py_RETURN_TRUE;
}

/* ------------------------------------------------------------ starting requests */

/* The common start of a request that holds a future (or callback): a record and an
   SQE for fd, taken in that order so that a failure leaves no SQE behind. Returns
   NULL with an exception set. */
static ul_op *op_start(Ring *r, enum ul_kind kind, int fd, PyObject *fut,
                       struct io_uring_sqe **sqe_out)
{
    if (!ring_live(r))
        return NULL;
    ul_op *op = op_alloc(r, kind);
    if (!op)
        return NULL;
    struct io_uring_sqe *sqe = ring_sqe(r);
    if (!sqe) {
        op_free(r, op);
        return NULL;
    }
    op->fd = fd;
    Py_INCREF(fut);
    op->fut = fut;
    *sqe_out = sqe;
    return op;
}

/* Common body of operations that hold a buffer of obj for their lifetime. The buffer
   is taken before the SQE: taking it may run Python (3.12's __buffer__), and nothing
   may run between getting an SQE and filling it. */
static ul_op *buffer_op(Ring *r, enum ul_kind kind, int fd, PyObject *obj, PyObject *fut,
                        int writable, struct io_uring_sqe **sqe_out)
{
    if (!ring_live(r))
        return NULL;
    ul_op *op = op_alloc(r, kind);
    if (!op)
        return NULL;
    if (PyObject_GetBuffer(obj, &op->view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) {
        op_free(r, op);
        if (writable && PyErr_ExceptionMatches(PyExc_BufferError)) {
            /* what socket.recv_into() raises for a read-only buffer */
            PyErr_Format(PyExc_TypeError,
                         "recv_into() argument 1 must be read-write bytes-like object, not %.100s",
                         Py_TYPE(obj)->tp_name);
        }
        return NULL;
    }
    op->has_view = 1;
    struct io_uring_sqe *sqe = ring_sqe(r);
    if (!sqe) {
        op_free(r, op);
        return NULL;
    }
    op->fd = fd;
    Py_INCREF(obj);
    op->obj = obj;
    zcbuf_lend(obj);
    Py_INCREF(fut);
    op->fut = fut;
    *sqe_out = sqe;
    return op;
}

PyObject *Ring_recv(Ring *r, PyObject *args)
{
    int fd;
    Py_ssize_t n;
    PyObject *fut, *sock = NULL;
    if (!PyArg_ParseTuple(args, "inO|O:recv", &fd, &n, &fut, &sock))
        return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "negative buffersize in recv");
        return NULL;
    }
    /* one recv moves at most UL_MAX_RW bytes: a larger buffer would only be shrunk */
    PyObject *buf = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)cap_len((size_t)n));
    if (!buf)
        return NULL;
    struct io_uring_sqe *sqe;
    ul_op *op = op_start(r, UL_RECV, fd, fut, &sqe);
    if (!op) {
        Py_DECREF(buf);
        return NULL;
    }
    op->obj = buf;
    Py_XINCREF(sock);
    op->sock = sock;
    io_uring_prep_recv(sqe, fd, PyBytes_AS_STRING(buf), (size_t)PyBytes_GET_SIZE(buf), 0);
    op_armed(r, op, sqe);
    return PyLong_FromUnsignedLongLong(op_key(op));
}

PyObject *Ring_recv_into(Ring *r, PyObject *args)
{
    int fd;
    Py_ssize_t n;
    PyObject *obj, *fut, *sock = NULL;
    struct io_uring_sqe *sqe;
    if (!PyArg_ParseTuple(args, "iOnO|O:recv_into", &fd, &obj, &n, &fut, &sock))
        return NULL;
    ul_op *op = buffer_op(r, UL_RECV_INTO, fd, obj, fut, 1, &sqe);
    if (!op)
        return NULL;
    Py_XINCREF(sock);
    op->sock = sock;
    if (n <= 0 || n > op->view.len)
        n = op->view.len;
    op->done = cap_len((size_t)n); /* the length asked for, should it be asked again */
    io_uring_prep_recv(sqe, fd, op->view.buf, op->done, 0);
    op_armed(r, op, sqe);
    return PyLong_FromUnsignedLongLong(op_key(op));
}

/* A RECVMSG of one datagram into base[0:len], the source address into the record. */
static void prep_recvfrom(struct io_uring_sqe *sqe, ul_op *op, void *base, size_t len)
{
    memset(&op->msg, 0, sizeof(op->msg));
    op->iov1.iov_base = base;
    op->iov1.iov_len = len;
    op->msg.msg_iov = &op->iov1;
    op->msg.msg_iovlen = 1;
    op->msg.msg_name = &op->addr;
    op->msg.msg_namelen = sizeof(op->addr);
    io_uring_prep_recvmsg(sqe, op->fd, &op->msg, 0);
}

PyObject *Ring_recvfrom(Ring *r, PyObject *args)
{
    int fd;
    Py_ssize_t n;
    PyObject *fut, *sock = NULL;
    if (!PyArg_ParseTuple(args, "inO|O:recvfrom", &fd, &n, &fut, &sock))
        return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "negative buffersize in recvfrom");
        return NULL;
    }
    PyObject *buf = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)cap_len((size_t)n));
    if (!buf)
        return NULL;
    struct io_uring_sqe *sqe;
    ul_op *op = op_start(r, UL_RECVFROM, fd, fut, &sqe);
    if (!op) {
        Py_DECREF(buf);
        return NULL;
    }
    op->obj = buf;
    Py_XINCREF(sock);
    op->sock = sock;
    prep_recvfrom(sqe, op, PyBytes_AS_STRING(buf), (size_t)PyBytes_GET_SIZE(buf));
    op_armed(r, op, sqe);
    return PyLong_FromUnsignedLongLong(op_key(op));
}

PyObject *Ring_recvfrom_into(Ring *r, PyObject *args)
{
    int fd;
    Py_ssize_t n;
    PyObject *obj, *fut, *sock = NULL;
    struct io_uring_sqe *sqe;
    if (!PyArg_ParseTuple(args, "iOnO|O:recvfrom_into", &fd, &obj, &n, &fut, &sock))
        return NULL;
    ul_op *op = buffer_op(r, UL_RECVFROM_INTO, fd, obj, fut, 1, &sqe);
    if (!op)
        return NULL;
    Py_XINCREF(sock);
    op->sock = sock;
    if (n <= 0 || n > op->view.len)
        n = op->view.len;
    op->done = cap_len((size_t)n);
    prep_recvfrom(sqe, op, op->view.buf, op->done);
    op_armed(r, op, sqe);
    return PyLong_FromUnsignedLongLong(op_key(op));
}

/* Whether op->fd still names the socket the request was made for. The application may
   have closed that socket meanwhile (the kernel's request kept it alive), and the
   number may name another file by now: a resubmission must not read, send or accept on
   it. Records without a socket object (Ring's private callers) are taken as they are. */
static int request_fd_still_ours(ul_op *op)
{
    if (!op->sock)
        return 1;
    PyObject *fd = PyObject_CallMethodNoArgs(op->sock, str_fileno);
    long n = fd ? PyLong_AsLong(fd) : -1;
    Py_XDECREF(fd);
    if (PyErr_Occurred())
        PyErr_Clear();
    return n == op->fd;
}

/* The socket object a request is for (None or NULL: none), to tell before a
   resubmission whether op->fd still names it (request_fd_still_ours). */
static void op_keep_sock(ul_op *op, PyObject *sock)
{
    if (sock && sock != Py_None)
        op->sock = Py_NewRef(sock);
}

/* Submit a receive, sendall or accept record again: what a sendall still owes after a
   short send, or the whole request after a spurious -EAGAIN (rule 6), when the kernel
   first waits for readiness. Returns 0, or -1 with an exception set (EBADF once the
   socket was closed). */
static int request_resubmit(Ring *r, ul_op *op, int after_eagain)
{
    if (!request_fd_still_ours(op)) {
        errno = EBADF;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    struct io_uring_sqe *sqe = ring_sqe(r);
    if (!sqe)
        return -1;
    switch (op->kind) {
    case UL_RECV:
        io_uring_prep_recv(sqe, op->fd, PyBytes_AS_STRING(op->obj),
                           (size_t)PyBytes_GET_SIZE(op->obj), 0);
        break;
    case UL_RECV_INTO:
        io_uring_prep_recv(sqe, op->fd, op->view.buf, op->done, 0);
        break;
    case UL_RECVFROM:
        prep_recvfrom(sqe, op, PyBytes_AS_STRING(op->obj), (size_t)PyBytes_GET_SIZE(op->obj));
        break;
    case UL_RECVFROM_INTO:
        prep_recvfrom(sqe, op, op->view.buf, op->done);
        break;
    case UL_SENDALL:
        io_uring_prep_send(sqe, op->fd, (char *)op->view.buf + op->done,
                           cap_len((size_t)op->view.len - op->done), MSG_NOSIGNAL);
        break;
    default: /* UL_ACCEPT */
        op->addrlen = sizeof(op->addr);
        io_uring_prep_accept(sqe, op->fd, (struct sockaddr *)&op->addr, &op->addrlen,
                             SOCK_CLOEXEC);
        after_eagain = 0; /* (POLL_FIRST is a send/recv flag; accept polls on EAGAIN) */
        break;
    }
    if (after_eagain)
        sqe_retry_after_poll(sqe);
    op_armed(r, op, sqe);
    return 0;
}

PyObject *Ring_sendall(Ring *r, PyObject *args)
{
    int fd;
    PyObject *obj, *fut;
    Py_ssize_t offset = 0;
    struct io_uring_sqe *sqe;
    PyObject *sock = NULL;
    if (!PyArg_ParseTuple(args, "iOO|nO:sendall", &fd, &obj, &fut, &offset, &sock))
        return NULL;
    ul_op *op = buffer_op(r, UL_SENDALL, fd, obj, fut, 0, &sqe);
    if (!op)
        return NULL;
    if (offset < 0 || offset > op->view.len) {
        io_uring_prep_nop(sqe);
        io_uring_sqe_set_data64(sqe, UL_IGNORE);
        op_free(r, op);
        PyErr_SetString(PyExc_ValueError, "offset out of range");
        return NULL;
    }
    op->done = (size_t)offset;
    op_keep_sock(op, sock);
    io_uring_prep_send(sqe, fd, (char *)op->view.buf + offset,
                       cap_len((size_t)(op->view.len - offset)), MSG_NOSIGNAL);
    op_armed(r, op, sqe);
    return PyLong_FromUnsignedLongLong(op_key(op));
}

PyObject *Ring_accept_multishot(Ring *r, PyObject *args)
{
    int fd;
    PyObject *cb;
    if (!PyArg_ParseTuple(args, "iO:accept_multishot", &fd, &cb))
        return NULL;
    struct io_uring_sqe *sqe;
    ul_op *op = op_start(r, UL_ACCEPT_MULTI, fd, cb, &sqe);
    if (!op)
        return NULL;
    io_uring_prep_multishot_accept(sqe, fd, NULL, NULL, SOCK_CLOEXEC);
    op_armed(r, op, sqe);
    return PyLong_FromUnsignedLongLong(op_key(op));
}

PyObject *Ring_send_zc(Ring *r, PyObject *args)
{
    int fd;
    PyObject *obj, *fut;
    Py_ssize_t offset = 0;
    struct io_uring_sqe *sqe;
    if (!PyArg_ParseTuple(args, "iOO|n:send_zc", &fd, &obj, &fut, &offset))
        return NULL;
    ul_op *op = buffer_op(r, UL_SENDZC, fd, obj, fut, 0, &sqe);
    if (!op)
        return NULL;
    if (offset < 0 || offset > op->view.len) {
        io_uring_prep_nop(sqe);
        io_uring_sqe_set_data64(sqe, UL_IGNORE);
        op_free(r, op);
        PyErr_SetString(PyExc_ValueError, "offset out of range");
        return NULL;
    }
    size_t len = cap_len((size_t)(op->view.len - offset));
    prep_send_zc_payload(r, sqe, fd, obj, (char *)op->view.buf + offset, len);
    pin(r, op, len);
    r->zc_sends++;
    op_armed(r, op, sqe);
    return PyLong_FromUnsignedLongLong(op_key(op));
}

PyObject *Ring_accept(Ring *r, PyObject *args)
{
    int fd;
    PyObject *fut;
    PyObject *sock = NULL;
    if (!PyArg_ParseTuple(args, "iO|O:accept", &fd, &fut, &sock))
        return NULL;
    struct io_uring_sqe *sqe;
    ul_op *op = op_start(r, UL_ACCEPT, fd, fut, &sqe);
    if (!op)
        return NULL;
    op->addrlen = sizeof(op->addr);
    op_keep_sock(op, sock);
    io_uring_prep_accept(sqe, fd, (struct sockaddr *)&op->addr, &op->addrlen, SOCK_CLOEXEC);
    op_armed(r, op, sqe);
    return PyLong_FromUnsignedLongLong(op_key(op));
}

/* The end of a UL_RESULT request: linked to the next one prepared if asked; its key. */
static PyObject *result_op_armed(Ring *r, ul_op *op, struct io_uring_sqe *sqe, int link)
{
    if (link)
        sqe->flags |= IOSQE_IO_LINK;
    op_armed(r, op, sqe);
    return PyLong_FromUnsignedLongLong(op_key(op));
}

PyObject *Ring_splice(Ring *r, PyObject *args)
{
    int fd_in, fd_out, link = 0;
    long long off_in, off_out;
    Py_ssize_t nbytes;
    unsigned int flags;
    PyObject *fut;
    if (!PyArg_ParseTuple(args, "iLiLnIO|p:splice", &fd_in, &off_in, &fd_out, &off_out, &nbytes,
                          &flags, &fut, &link))
        return NULL;
    if (nbytes < 0) {
        PyErr_SetString(PyExc_ValueError, "negative splice length");
        return NULL;
    }
    struct io_uring_sqe *sqe;
    ul_op *op = op_start(r, UL_RESULT, fd_out, fut, &sqe);
    if (!op)
        return NULL;
    io_uring_prep_splice(sqe, fd_in, (int64_t)off_in, fd_out, (int64_t)off_out,
                         (unsigned)cap_len((size_t)nbytes), flags);
    return result_op_armed(r, op, sqe, link);
}

PyObject *Ring_poll_once(Ring *r, PyObject *args)
{
    int fd, link = 0;
    unsigned int mask;
    PyObject *fut;
    if (!PyArg_ParseTuple(args, "iIO|p:poll_once", &fd, &mask, &fut, &link))
        return NULL;
    struct io_uring_sqe *sqe;
    ul_op *op = op_start(r, UL_RESULT, fd, fut, &sqe);
    if (!op)
        return NULL;
    io_uring_prep_poll_add(sqe, fd, mask);
    return result_op_armed(r, op, sqe, link);
}

/* ------------------------------------------------------------ completion */

/* A cancelled receive that was in flight is over: hand its bytes (maybe none) to the
   loop for the next receive on the same socket. */
static void orphan_data(Ring *r, ul_op *op, const char *data, Py_ssize_t n)
{
    if (!r->orphan_cb || !op->sock)
        return;
    PyObject *res = PyObject_CallFunction(r->orphan_cb, "Oy#K", op->sock, data,
                                          (Py_ssize_t)(n > 0 ? n : 0),
                                          (unsigned long long)op_key(op));
    if (!res)
        callback_failed(r, r->orphan_cb);
    Py_XDECREF(res);
}

static void accept_multi_complete(Ring *r, ul_op *op, int res, unsigned flags)
{
    int more = (flags & IORING_CQE_F_MORE) != 0;
    if (op->cancelled) {
        if (res >= 0)
            close(res);
    } else if (res >= 0 || !more) {
        PyObject *cb = op->fut;
        Py_INCREF(cb); /* the callback may cancel this very request */
        PyObject *out = PyObject_CallFunction(cb, "i", res);
        if (!out)
            callback_failed(r, cb);
        Py_XDECREF(out);
        Py_DECREF(cb);
    }
    if (more)
        return;
    op->armed = 0;
    r->inflight--;
    if (!op->cancelled && res >= 0) {
        /* the kernel ended the multishot (CQ overflow, ...): keep accepting */
        struct io_uring_sqe *sqe = ring_sqe(r);
        if (sqe) {
            io_uring_prep_multishot_accept(sqe, op->fd, NULL, NULL, SOCK_CLOEXEC);
            op_armed(r, op, sqe);
            return;
        }
        PyErr_WriteUnraisable(op->fut);
    }
    /* an error ended it: the callback got -errno and re-arms when it wants to */
    op_free(r, op);
}

void request_complete(Ring *r, ul_op *op, int res, unsigned flags)
{
    if (op->kind == UL_POLL) {
        poll_complete(r, op, res);
        return;
    }
    if (op->kind == UL_ACCEPT_MULTI) {
        accept_multi_complete(r, op, res, flags);
        return;
    }
    if (op->kind == UL_SENDZC) {
        if (!(flags & IORING_CQE_F_NOTIF)) {
            /* first CQE: the result; the memory is the kernel's until the notification */
            op->done = res < 0 ? 0 : (size_t)res;
            op->arg = res < 0 ? (unsigned)-res : 0;
            if (res > 0)
                r->zc_bytes += res;
            if (flags & IORING_CQE_F_MORE) {
                op->notif = 1;
                return;
            }
        } else {
            r->zc_notifications++;
            if ((unsigned)res & IORING_NOTIF_USAGE_ZC_COPIED)
                r->zc_copied++;
        }
        unpin(r, op);
        pins_released(r);
    }
    op->armed = 0;
    r->inflight--;
    if (op->kind == UL_FORWARD_POLL) {
        PyObject *forward = Py_NewRef(op->fut);
        uint64_t key = op_key(op);
        op_free(r, op);
        forward_polled(r, forward, key, res);
        Py_DECREF(forward);
        return;
    }
    /* A future cancelled before its cancel reached the kernel counts as gone too:
       its data must not vanish into a done future. */
    int gone = op->cancelled || (op->fut && fut_is_done(op->fut));
    if (res == -EAGAIN && !gone &&
        (op->kind == UL_RECV || op->kind == UL_RECV_INTO || op->kind == UL_SENDALL ||
         op->kind == UL_ACCEPT || op->kind == UL_RECVFROM || op->kind == UL_RECVFROM_INTO)) {
        /* nothing moved (rule 6): the same request again, not an error */
        r->n_eagain++;
        if (request_resubmit(r, op, 1) == 0)
            return;
        PyObject *exc = ul_fetch_exception();
        if (exc) {
            fut_resolve(op->fut, exc, 1);
            Py_DECREF(exc);
        }
        op_free(r, op);
        return;
    }
    switch (op->kind) {
    case UL_RECV:
        if (gone) {
            orphan_data(r, op, res > 0 ? PyBytes_AS_STRING(op->obj) : "", res);
        } else if (res < 0) {
            fut_fail(op->fut, -res);
        } else if (_PyBytes_Resize(&op->obj, res) < 0) {
            PyErr_WriteUnraisable(op->fut);
        } else {
            fut_resolve(op->fut, op->obj, 0);
        }
        break;
    case UL_RECV_INTO:
        if (gone)
            orphan_data(r, op, res > 0 ? op->view.buf : "", res);
        else
            fut_resolve_count(op->fut, res);
        break;
    case UL_RECVFROM:
    case UL_RECVFROM_INTO: {
        if (res < 0) {
            if (gone)
                orphan_data(r, op, "", res); /* brought nothing */
            else
                fut_fail(op->fut, -res);
            break;
        }
        const char *base = op->kind == UL_RECVFROM ? PyBytes_AS_STRING(op->obj) : op->view.buf;
        PyObject *addr = sockaddr_to_py(&op->addr, op->msg.msg_namelen);
        if (op->msg.msg_namelen == 0 && addr) /* as socket.recvfrom(): no address */
            Py_SETREF(addr, Py_NewRef(Py_None));
        PyObject *value = NULL;
        if (addr) {
            if (gone)
                value = Py_BuildValue("(y#O)", base, (Py_ssize_t)res, addr);
            else if (op->kind == UL_RECVFROM_INTO)
                value = Py_BuildValue("(iO)", res, addr);
            else if (_PyBytes_Resize(&op->obj, res) == 0)
                value = PyTuple_Pack(2, op->obj, addr);
            Py_DECREF(addr);
        }
        if (!value) {
            PyErr_WriteUnraisable(op->fut);
        } else if (gone) {
            /* a datagram a cancelled receive took: the next receive on the socket gets it */
            if (r->orphan_cb && op->sock) {
                PyObject *out = PyObject_CallFunction(r->orphan_cb, "OOK", op->sock, value,
                                                      (unsigned long long)op_key(op));
                if (!out)
                    callback_failed(r, r->orphan_cb);
                Py_XDECREF(out);
            }
        } else {
            fut_resolve(op->fut, value, 0);
        }
        Py_XDECREF(value);
        break;
    }
    case UL_SENDALL:
        if (gone)
            break;
        if (res < 0) {
            fut_fail(op->fut, -res);
            break;
        }
        op->done += (size_t)res;
        if (op->done < (size_t)op->view.len) {
            /* short send: the rest from the same record */
            if (request_resubmit(r, op, 0) == 0)
                return;
            PyObject *exc = ul_fetch_exception();
            if (exc) {
                fut_resolve(op->fut, exc, 1);
                Py_DECREF(exc);
            }
            break;
        }
        fut_resolve(op->fut, Py_None, 0);
        break;
    case UL_ACCEPT:
        if (res >= 0 && gone) {
            close(res);
        } else if (!gone) {
            if (res < 0) {
                fut_fail(op->fut, -res);
            } else {
                PyObject *addr = sockaddr_to_py(&op->addr, op->addrlen);
                PyObject *pair = addr ? Py_BuildValue("(iN)", res, addr) : NULL;
                if (pair) {
                    fut_resolve(op->fut, pair, 0);
                    Py_DECREF(pair);
                } else {
                    close(res);
                    PyErr_WriteUnraisable(op->fut);
                }
            }
        }
        break;
    case UL_SENDZC:
        if (!gone) {
            if (op->arg) {
                fut_fail(op->fut, (int)op->arg);
            } else {
                PyObject *n = PyLong_FromSize_t(op->done);
                if (n)
                    fut_resolve(op->fut, n, 0);
                else
                    PyErr_WriteUnraisable(op->fut);
                Py_XDECREF(n);
            }
        }
        break;
    case UL_RESULT:
        if (!gone)
            fut_resolve_count(op->fut, res);
        break;
    default:
        break;
    }
    op_free(r, op);
}

/* While the ring closes (rule 3): only give memory and fds back, run nothing. */
void request_retire(Ring *r, ul_op *op, int res, unsigned flags)
{
    int more = (flags & IORING_CQE_F_MORE) != 0;
    if ((op->kind == UL_ACCEPT || op->kind == UL_ACCEPT_MULTI) && res >= 0)
        close(res); /* a connection accepted as the loop closes: nobody will take it */
    if (op->kind == UL_FORWARD_POLL)
        forward_retired(op->fut, op_key(op)); /* (the pump does not run again) */
    if (op->kind == UL_SENDZC) {
        if (!(flags & IORING_CQE_F_NOTIF) && more) {
            op->notif = 1;
            return; /* the memory is the kernel's until the notification */
        }
        unpin(r, op);
    } else if (more) {
        return; /* a multishot request goes on until its last CQE */
    }
    op->armed = 0;
    r->inflight--;
    op_free(r, op);
}
