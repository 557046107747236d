/* The stream send path: write(), batching, one send per socket, short sends, SEND_ZC.
 *
 * Some facts about sending on a stream socket with io_uring
 * ---------------------------------------------------------
 * - Two sends in flight on one socket can be reordered when the first has to wait
 *   for room (documented in kernel commit ac5f71a3d9d7). So a stream has at most
 *   one send in the kernel; the next goes when the previous one's first CQE is in.
 * - A send may complete short (no MSG_WAITALL) and io_uring does not retry it: the
 *   record resubmits what it still owes, from the same memory.
 * - SEND_ZC completes twice: the first CQE (IORING_CQE_F_MORE) carries the byte
 *   count, the notification (IORING_CQE_F_NOTIF) says the kernel let go of the
 *   memory. Errors after preparation still carry F_MORE and a notification; an
 *   error at preparation carries no F_MORE and nothing follows. The stream moves on
 *   after the first CQE; the payload stays referenced by its record until the
 *   notification. IORING_NOTIF_USAGE_ZC_COPIED in the notification means the kernel
 *   copied after all (loopback, veth): a socket that keeps seeing it switches to
 *   plain sends. AF_UNIX refuses SEND_ZC (EOPNOTSUPP); RLIMIT_MEMLOCK caps what it
 *   may pin (ENOMEM): both fall back to a plain send of the same bytes.
 * - One send moves at most MAX_RW_COUNT bytes and an SQE's len is 32 bits: a send
 *   of more is capped and the rest follows as after a short send.
 *
 * The invariants of this unit
 * ---------------------------
 * - Order: the bytes of write() calls reach the kernel in call order, each exactly
 *   once. `queue` holds payloads not yet handed to a send, wbuf the small writes of
 *   this iteration (copied: asyncio lets the caller reuse a mutable buffer once
 *   write() returns), head_sent how much of queue[0] a direct sendmsg already took.
 * - queued counts every byte accepted by write() and not yet accepted by the kernel;
 *   flow control (pause_writing/resume_writing) is decided on it and on the memory
 *   lent to the kernel (pinned).
 * - Failure: when a send cannot be submitted (no SQE, no memory), the transport
 *   gets a fatal error and connection_lost(exc): bytes are never silently dropped,
 *   resent or reordered.
 * - write() either queues all of data or raises and queues nothing.
 */
#include "dataplane.h"

#include <errno.h>
#include <string.h>

#define STREAM_DIRECT_MIN (16 * 1024)
#define STREAM_MAX_IOV 64
#define ZC_COPIED_STREAK_LIMIT 4

static size_t cap_len(size_t n) { return n > UL_MAX_RW ? UL_MAX_RW : n; }

/* The send side cannot go on intact (exception set): the transport fails, as
   asyncio's does on a send error. Nothing more is sent, not even by close_now()'s
   write-through: what follows may lie behind bytes that never went (a hole). */
static void stream_send_failed(Stream *s)
{
    s->send_broken = 1;
    PyObject *exc = ul_fetch_exception();
    if (exc && s->owner && !s->closed)
        stream_owner_call(s, str_stream_error, exc, s->write_ctx);
    Py_XDECREF(exc);
}

/* Whether len bytes of payload go out with SEND_ZC: only immutable bytes (the kernel
   reads the object's own memory), only when large enough to pay for the notification. */
static int stream_is_zc_payload(Stream *s, PyObject *payload, Py_ssize_t len)
{
    if (!s->zc || !s->ring->zc_supported)
        return 0;
    /* a ZeroCopyBuffer was made for SEND_ZC: whatever its size */
    return IS_ZCBUF(payload) || (PyBytes_CheckExact(payload) && len >= s->zc_threshold);
}

static Py_ssize_t payload_size(PyObject *payload)
{
    if (PyBytes_CheckExact(payload))
        return PyBytes_GET_SIZE(payload);
    if (IS_ZCBUF(payload))
        return ((ZeroCopyBuffer *)payload)->len;
    return PyByteArray_GET_SIZE(payload);
}

static char *payload_data(PyObject *payload)
{
    if (PyBytes_CheckExact(payload))
        return PyBytes_AS_STRING(payload);
    if (IS_ZCBUF(payload))
        return ((ZeroCopyBuffer *)payload)->base;
    return PyByteArray_AS_STRING(payload);
}

/* Drop the first n payloads from the queue; each gives back the lend write() took,
   once it is out of the queue (a lend given back twice would free a ZeroCopyBuffer
   the kernel still reads). */
static int queue_drop(Stream *s, Py_ssize_t n)
{
    Py_ssize_t lent = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        lent += IS_ZCBUF(PyList_GET_ITEM(s->queue, i));
    if (!lent) /* the usual case: nothing to give back, no copy of the slice */
        return PyList_SetSlice(s->queue, 0, n, NULL);
    PyObject *dropped = PyList_GetSlice(s->queue, 0, n);
    if (!dropped)
        return -1;
    if (PyList_SetSlice(s->queue, 0, n, NULL) < 0) {
        Py_DECREF(dropped);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        zcbuf_unlend(PyList_GET_ITEM(dropped, i));
    Py_DECREF(dropped);
    return 0;
}

void stream_drop_queue(Stream *s)
{
    if (queue_drop(s, PyList_GET_SIZE(s->queue)) < 0)
        PyErr_WriteUnraisable((PyObject *)s);
    s->head_sent = 0;
    s->queued = 0;
}

int stream_cancel_key(Stream *s, uint64_t key)
{
    ul_op *op = op_lookup(s->ring, key);
    if (!op || op->cancel_sent || !op->armed || op->notif)
        return 0;
    return op_cancel(s->ring, op);
}

/* ------------------------------------------------------------ short sends */

static void prep_sendmsg_rest(ul_op *op, struct io_uring_sqe *sqe)
{
    memset(&op->msg, 0, sizeof(op->msg));
    op->msg.msg_iov = op->iov + op->iov_first;
    op->msg.msg_iovlen = op->niov - op->iov_first;
    io_uring_prep_sendmsg(sqe, op->fd, &op->msg, MSG_NOSIGNAL);
}

/* Account for res bytes sent; returns 1 while some are still owed. */
static int send_advance(ul_op *op, size_t res)
{
    if (!op->views) {
        op->done += res;
        return op->done < (size_t)op->view.len;
    }
    while (op->iov_first < op->niov && res >= op->iov[op->iov_first].iov_len) {
        res -= op->iov[op->iov_first].iov_len;
        op->iov_first++;
    }
    if (op->iov_first == op->niov)
        return 0;
    op->iov[op->iov_first].iov_base = (char *)op->iov[op->iov_first].iov_base + res;
    op->iov[op->iov_first].iov_len -= res;
    return 1;
}

/* Submit what op still owes, keeping the record (and the memory it holds); after a
   spurious -EAGAIN (rule 6) the kernel waits for room first. */
static int send_rest(Ring *r, ul_op *op, int after_eagain)
{
    struct io_uring_sqe *sqe = ring_sqe(r);
    if (!sqe)
        return -1;
    if (op->views)
        prep_sendmsg_rest(op, sqe);
    else
        io_uring_prep_send(sqe, op->fd, (char *)op->view.buf + op->done,
                           cap_len(op->view.len - op->done), MSG_NOSIGNAL);
    if (after_eagain)
        sqe_retry_after_poll(sqe);
    op_armed(r, op, sqe);
    return 0;
}

/* ------------------------------------------------------------ submitting */

/* Put payload[offset:] into the kernel as one send (the payload stays queued: the
   caller drops it once this succeeded); after_eagain: see rule 6. */
static int stream_submit(Stream *s, PyObject *payload, Py_ssize_t offset, int after_eagain)
{
    Ring *r = s->ring;
    Py_ssize_t total = payload_size(payload);
    int zc = stream_is_zc_payload(s, payload, total - offset);
    ul_op *op = op_alloc(r, zc ? UL_STREAM_ZC : UL_STREAM_SEND);
    if (!op)
        return -1;
    if (PyObject_GetBuffer(payload, &op->view, PyBUF_SIMPLE) < 0) {
        op_free(r, op);
        return -1;
    }
    op->has_view = 1;
    struct io_uring_sqe *sqe = ring_sqe(r);
    if (!sqe) {
        op_free(r, op);
        return -1;
    }
    Py_INCREF(payload);
    op->obj = payload;
    zcbuf_lend(payload);
    Py_INCREF(s);
    op->sock = (PyObject *)s;
    op->fd = s->fd;
    op->done = (size_t)offset;
    char *base = (char *)op->view.buf + offset;
    size_t len = cap_len((size_t)(total - offset));
    if (zc) {
        prep_send_zc_payload(r, sqe, s->fd, payload, base, len);
        pin(r, op, len);
        s->pinned += len;
        r->zc_sends++;
    } else {
        io_uring_prep_send(sqe, s->fd, base, len, MSG_NOSIGNAL);
        r->copy_sends++;
    }
    if (after_eagain)
        sqe_retry_after_poll(sqe);
    op_armed(r, op, sqe);
    s->send_armed = 1;
    s->send_key = op_key(op);
    return 0;
}

/* Send the first n queued payloads (all plain) as one vectored send. */
static int stream_submit_vectored(Stream *s, Py_ssize_t n)
{
    Ring *r = s->ring;
    ul_op *op = op_alloc(r, UL_STREAM_SEND);
    if (!op)
        return -1;
    op->obj = PyList_GetSlice(s->queue, 0, n);
    op->views = PyMem_Calloc(n, sizeof(Py_buffer));
    op->iov = PyMem_Calloc(n, sizeof(struct iovec));
    if (!op->obj || !op->views || !op->iov) {
        op_free(r, op);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (PyObject_GetBuffer(PyList_GET_ITEM(op->obj, i), &op->views[i], PyBUF_SIMPLE) < 0) {
            op_free(r, op);
            return -1;
        }
        op->niov = (int)i + 1;
        op->iov[i].iov_base = op->views[i].buf;
        op->iov[i].iov_len = op->views[i].len;
    }
    op->iov[0].iov_base = (char *)op->iov[0].iov_base + s->head_sent;
    op->iov[0].iov_len -= s->head_sent;
    struct io_uring_sqe *sqe = ring_sqe(r);
    if (!sqe) {
        op_free(r, op);
        return -1;
    }
    Py_INCREF(s);
    op->sock = (PyObject *)s;
    op->fd = s->fd;
    op->iov_first = 0;
    prep_sendmsg_rest(op, sqe);
    op_armed(r, op, sqe);
    r->copy_sends++;
    s->send_armed = 1;
    s->send_key = op_key(op);
    s->head_sent = 0;
    /* the record holds the payloads now; the lends went with them (op->obj is a list,
       so op_free gives none back) */
    for (Py_ssize_t i = 0; i < n; i++)
        zcbuf_unlend(PyList_GET_ITEM(s->queue, i));
    if (PyList_SetSlice(s->queue, 0, n, NULL) < 0)
        return -2; /* submitted, but the queue could not be trimmed */
    return 0;
}

/* Send the next queued payload, or report that the queue drained. */
static void stream_send_next(Stream *s)
{
    if (s->send_armed || s->send_broken || !stream_live(s))
        return;
    if (PyList_GET_SIZE(s->queue) == 0) {
        if (s->notify_flushed && !s->dirty && (!s->wbuf || PyByteArray_GET_SIZE(s->wbuf) == 0)) {
            s->notify_flushed = 0;
            stream_owner_call(s, str_stream_flushed, NULL, s->write_ctx);
        }
        return;
    }
    /* consecutive plain payloads go out together: one request, one CQE */
    Py_ssize_t nplain = 0, qlen = PyList_GET_SIZE(s->queue);
    while (nplain < qlen && nplain < STREAM_MAX_IOV) {
        PyObject *p = PyList_GET_ITEM(s->queue, nplain);
        if (IS_ZCBUF(p) || stream_is_zc_payload(s, p, payload_size(p)))
            break; /* one request each: they are lent, and released, one by one */
        nplain++;
    }
    int rc;
    if (nplain > 1) {
        rc = stream_submit_vectored(s, nplain);
    } else {
        /* submit before dropping it from the queue: a ZeroCopyBuffer stays lent throughout */
        rc = stream_submit(s, PyList_GET_ITEM(s->queue, 0), s->head_sent, 0);
        if (rc == 0) {
            s->head_sent = 0;
            rc = queue_drop(s, 1) < 0 ? -2 : 0;
        }
    }
    if (rc < 0)
        stream_send_failed(s); /* -1: nothing went; -2: sent, but the queue is off */
}

/* ------------------------------------------------------------ completion */

void stream_send_complete(Ring *r, Stream *s, ul_op *op, int res, unsigned flags)
{
    if (op->kind == UL_STREAM_SEND) {
        op->armed = 0;
        r->inflight--;
        s->send_armed = 0;
        if (s->closed) {
            op_free(r, op);
            return;
        }
        if (res < 0 && res != -EAGAIN) {
            op_free(r, op);
            s->send_broken = 1;
            stream_owner_error(s, -res, s->write_ctx);
            return;
        }
        if (res == -EAGAIN) {
            r->n_eagain++;
            res = 0; /* nothing went (rule 6): the same bytes again, once there is room */
        } else {
            r->copy_bytes += res;
            s->queued -= res;
        }
        if (res == 0 || send_advance(op, (size_t)res)) {
            /* short send: the rest goes next, from the same record */
            if (send_rest(r, op, res == 0) == 0) {
                s->send_armed = 1;
                s->send_key = op_key(op);
                return;
            }
            op_free(r, op);
            stream_send_failed(s);
            return;
        }
        op_free(r, op);
        stream_maybe_resume_writing(s);
        stream_send_next(s);
        return;
    }
    /* UL_STREAM_ZC */
    if (flags & IORING_CQE_F_NOTIF) {
        /* the kernel let go of the memory: only now may the payload go */
        r->zc_notifications++;
        if ((unsigned)res & IORING_NOTIF_USAGE_ZC_COPIED) {
            r->zc_copied++;
            if (++s->copied_streak >= ZC_COPIED_STREAK_LIMIT && s->zc && !s->zc_forced) {
                s->zc = 0; /* this route copies anyway: stop paying for notifications */
                r->copy_fallback++;
            }
        } else {
            s->copied_streak = 0;
        }
        s->pinned -= op->pinned;
        unpin(r, op);
        op->armed = 0;
        r->inflight--;
        op_free(r, op);
        if (!s->closed)
            stream_maybe_resume_writing(s);
        else
            stream_unpinned(s); /* the socket may close now */
        pins_released(r);
        return;
    }
    /* the first CQE: the stream may move on; the memory waits for the notification */
    if (op_key(op) == s->send_key)
        s->send_armed = 0;
    if (!(flags & IORING_CQE_F_MORE)) {
        /* no notification will come (an error at prep, or cancelled unsubmitted) */
        s->pinned -= op->pinned;
        unpin(r, op);
        op->armed = 0;
        r->inflight--;
        op->notif = 0;
    } else {
        op->notif = 1;
    }
    if (!s->closed) {
        if (res < 0) {
            if (res == -EAGAIN) {
                /* nothing went (rule 6): the same bytes again, once there is room */
                r->n_eagain++;
                if (stream_submit(s, op->obj, op->done, 1) < 0)
                    stream_send_failed(s);
            } else if (res == -EOPNOTSUPP || res == -ENOMEM) {
                /* AF_UNIX and friends refuse zero-copy (EOPNOTSUPP); RLIMIT_MEMLOCK
                   caps memory pinned for it (ENOMEM). Nothing of this request went
                   out: send it, and later ones, plainly. */
                s->zc = 0;
                r->copy_fallback++;
                if (stream_submit(s, op->obj, op->done, 0) < 0)
                    stream_send_failed(s);
            } else {
                s->send_broken = 1;
                stream_owner_error(s, -res, s->write_ctx);
            }
        } else {
            r->zc_bytes += res;
            s->queued -= res;
            if ((Py_ssize_t)(op->done + res) < op->view.len) {
                if (stream_submit(s, op->obj, op->done + res, 0) < 0)
                    stream_send_failed(s);
            } else {
                stream_maybe_resume_writing(s);
                stream_send_next(s);
            }
        }
    }
    if (!op->notif) {
        op_free(r, op);
        if (s->closed)
            stream_unpinned(s);
        pins_released(r);
    }
}

/* While the ring closes (rule 3): memory back, nothing resubmitted, nobody called. */
void stream_send_retire(Ring *r, Stream *s, ul_op *op, int res, unsigned flags)
{
    if (op->kind == UL_STREAM_ZC && !(flags & IORING_CQE_F_NOTIF) &&
        (flags & IORING_CQE_F_MORE)) {
        op->notif = 1;
        if (op_key(op) == s->send_key)
            s->send_armed = 0;
        return;
    }
    if (op->kind == UL_STREAM_ZC) {
        s->pinned -= op->pinned;
        unpin(r, op);
    }
    if (!op->notif && op_key(op) == s->send_key)
        s->send_armed = 0;
    op->armed = 0;
    r->inflight--;
    op_free(r, op);
}

/* ------------------------------------------------------------ the iteration's batch */

void flush_dirty(Ring *r)
{
    /* Take the list: a callback run from here (a flush notification) may write and
       mark streams dirty again, growing a new list for the next iteration. */
    PyObject **list = r->dirty;
    uint32_t n = r->ndirty, cap = r->capdirty;
    r->dirty = NULL;
    r->ndirty = r->capdirty = 0;
    for (uint32_t i = 0; i < n; i++) {
        Stream *s = (Stream *)list[i];
        s->dirty = 0;
        if (stream_live(s)) {
            if (s->wbuf && PyByteArray_GET_SIZE(s->wbuf) > 0) {
                if (PyList_Append(s->queue, s->wbuf) < 0)
                    stream_send_failed(s);
                else
                    Py_CLEAR(s->wbuf); /* the queued bytearray is now the kernel's to read */
            }
            stream_send_next(s);
        }
        Py_DECREF(s);
    }
    ul_list_give_back(&r->dirty, &r->capdirty, list, cap);
}

void drop_dirty(Ring *r)
{
    for (uint32_t i = 0; i < r->ndirty; i++) {
        ((Stream *)r->dirty[i])->dirty = 0;
        Py_DECREF(r->dirty[i]);
    }
    r->ndirty = 0;
}

static int stream_mark_dirty(Stream *s)
{
    Ring *r = s->ring;
    if (s->dirty)
        return 0;
    if (ul_list_push(&r->dirty, &r->ndirty, &r->capdirty, (PyObject *)s) < 0) {
        PyErr_NoMemory();
        return -1;
    }
    s->dirty = 1;
    return 0;
}

/* write() took the queue past the high-water mark while no send is in the kernel: do
 * what asyncio's (and uvloop's) write() does and offer the data to the socket now, with
 * one non-blocking sendmsg, so that pause_writing() comes only when the kernel really
 * does not take it. Waiting for the iteration's batched send instead would pause (and
 * make drain() wait) on every large write, which libraries written against asyncio do
 * not expect (websockets' legacy protocol asserts there is one drain at a time).
 * Payloads meant for SEND_ZC are left to the ring unless `all` (close_now: the
 * connection ends, the kernel may as well copy them); with nothing in flight, order
 * is kept. */
Py_ssize_t stream_write_through(Stream *s, int all)
{
    struct iovec iov[STREAM_MAX_IOV + 1];
    int n = 0;
    if (s->closed || s->send_armed || s->send_broken || !stream_live(s))
        return 0;
    Py_ssize_t qlen = PyList_GET_SIZE(s->queue), i;
    for (i = 0; i < qlen && n < STREAM_MAX_IOV; i++) {
        PyObject *p = PyList_GET_ITEM(s->queue, i);
        if (!all && (IS_ZCBUF(p) || stream_is_zc_payload(s, p, payload_size(p))))
            break;
        iov[n].iov_base = payload_data(p);
        iov[n].iov_len = (size_t)payload_size(p);
        n++;
    }
    if (n == 0 && qlen > 0)
        return 0;
    if (n > 0) {
        iov[0].iov_base = (char *)iov[0].iov_base + s->head_sent;
        iov[0].iov_len -= (size_t)s->head_sent;
    }
    int with_wbuf = i == qlen && s->wbuf && PyByteArray_GET_SIZE(s->wbuf) > 0;
    if (with_wbuf) {
        iov[n].iov_base = PyByteArray_AS_STRING(s->wbuf);
        iov[n].iov_len = (size_t)PyByteArray_GET_SIZE(s->wbuf);
        n++;
    }
    if (n == 0)
        return 0;
    struct msghdr msg;
    memset(&msg, 0, sizeof(msg));
    msg.msg_iov = iov;
    msg.msg_iovlen = (size_t)n;
    ssize_t sent = sendmsg(s->fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (sent <= 0)
        return 0; /* EAGAIN: the ring's send waits for room; an error surfaces there too */
    s->ring->copy_sends++;
    s->ring->copy_bytes += (unsigned long long)sent;
    s->queued -= sent;
    /* consume what went: whole queue entries, then the head's part, then the wbuf */
    Py_ssize_t left = sent, whole = 0;
    while (whole < i) {
        Py_ssize_t rest = payload_size(PyList_GET_ITEM(s->queue, whole)) - s->head_sent;
        if (left < rest)
            break;
        left -= rest;
        s->head_sent = 0;
        whole++;
    }
    if (whole && queue_drop(s, whole) < 0) {
        /* the bytes went, the entries stay: the stream cannot go on intact */
        stream_send_failed(s);
        return sent;
    }
    if (whole < i) {
        s->head_sent += left;
    } else if (left > 0 && PySequence_DelSlice(s->wbuf, 0, left) < 0) {
        stream_send_failed(s);
    }
    return sent;
}

PyObject *Stream_write(Stream *s, PyObject *data)
{
    if (!PyBytes_Check(data) && !PyByteArray_Check(data) && !PyMemoryView_Check(data) &&
        !IS_ZCBUF(data)) {
        PyErr_Format(PyExc_TypeError, "data argument must be a bytes-like object, not '%.100s'",
                     Py_TYPE(data)->tp_name);
        return NULL;
    }
    if (s->eof) {
        PyErr_SetString(PyExc_RuntimeError, "Cannot call write() after write_eof()");
        return NULL;
    }
    if (s->sendfile_active) {
        PyErr_SetString(PyExc_RuntimeError, s->sendfile_active == 2
                                                ? "unable to write; forward() is in progress"
                                                : "unable to write; sendfile is in progress");
        return NULL;
    }
    if (stream_check_fork(s) < 0)
        return NULL;
    if (s->closed)
        Py_RETURN_NONE; /* the connection is gone; asyncio drops such writes too */
    Py_ssize_t len;
    int direct = 0;
    Py_buffer view = {0};
    if (PyBytes_CheckExact(data) || IS_ZCBUF(data)) {
        len = payload_size(data);
        direct = IS_ZCBUF(data) || len >= STREAM_DIRECT_MIN || (s->zc && len >= s->zc_threshold);
    }
    if (!direct) {
        if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
            return NULL;
        len = view.len;
    }
    if (len == 0) {
        if (view.obj)
            PyBuffer_Release(&view);
        Py_RETURN_NONE;
    }
    /* the only step that can fail once data is queued comes first */
    if (stream_mark_dirty(s) < 0) {
        if (view.obj)
            PyBuffer_Release(&view);
        return NULL;
    }
    PyObject *old_ctx = NULL;
    if (s->queued == 0 && !s->send_armed) {
        /* the stream was idle: its send-side callbacks run in a copy of this context,
           as asyncio's add_writer() at the write() that could not send at once */
        PyObject *ctx = PyContext_CopyCurrent();
        if (ctx) {
            /* the old one goes at the end: its finalizers must not run mid-write */
            old_ctx = s->write_ctx;
            s->write_ctx = ctx;
        } else {
            PyErr_Clear();
        }
    }
    if (direct) {
        /* immutable and large: sent from its own memory, after what is already batched */
        if (s->wbuf && PyByteArray_GET_SIZE(s->wbuf) > 0) {
            if (PyList_Append(s->queue, s->wbuf) < 0)
                goto failed;
            Py_CLEAR(s->wbuf);
        }
        if (PyList_Append(s->queue, data) < 0)
            goto failed;
        zcbuf_lend(data); /* lent from now until the kernel lets go of it */
    } else {
        if (!s->wbuf && !(s->wbuf = PyByteArray_FromStringAndSize(NULL, 0))) {
            PyBuffer_Release(&view);
            goto failed;
        }
        Py_ssize_t old = PyByteArray_GET_SIZE(s->wbuf);
        if (PyByteArray_Resize(s->wbuf, old + len) < 0) {
            PyBuffer_Release(&view);
            goto failed;
        }
        memcpy(PyByteArray_AS_STRING(s->wbuf) + old, view.buf, len);
        PyBuffer_Release(&view);
    }
    s->queued += len;
    if (s->queued > s->high && !s->send_armed)
        stream_write_through(s, 0);
    stream_maybe_pause_writing(s);
    Py_XDECREF(old_ctx);
    return ring_return(s->ring, Py_NewRef(Py_None));
failed:
    Py_XDECREF(old_ctx);
    return NULL;
}
