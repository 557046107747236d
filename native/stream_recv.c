/* The stream receive path: from receive completions to data_received() /
 * buffer_updated(), with data held while the protocol paused reading.
 *
 * Some facts about receiving with io_uring
 * ----------------------------------------
 * - Multishot recv (6.0) with IORING_RECVSEND... buffer selection takes one buffer
 *   of a provided buffer ring per CQE (the buffer id is in cqe->flags) and goes on
 *   (IORING_CQE_F_MORE) until an error, EOF, a cancel, a CQ overflow or an empty
 *   ring (-ENOBUFS) ends it. The buffers are ours again only once we give them back
 *   to the ring; the data they hold must be copied out first.
 * - A single-shot recv writes into the memory named in its SQE, which may be a
 *   BufferedProtocol's own buffer (what get_buffer() returned when it was armed):
 *   the bytes then belong to the protocol whose buffer it was, whatever the
 *   transport's protocol is by the time the CQE arrives.
 * - A cancel (pause_reading, close) races the request: a multishot recv may still
 *   deliver several buffers before its final -ECANCELED, a single-shot one may
 *   complete with data. Those bytes left the socket: they are delivered, or held.
 *
 * The invariants of this unit
 * ---------------------------
 * - At most one receive per stream is in the kernel (recv_armed, recv_key).
 * - eof_received() comes at most once: the read side's end (EOF or error) is final
 *   (read_ended), whatever pause_reading()/resume_reading() follow. (asyncio's
 *   selector loop reads the EOF again after a pause and resume, and says it twice.)
 * - Every byte received reaches the protocol exactly once and in order, or the
 *   transport is failed. Bytes arriving while the protocol paused reading, or
 *   behind bytes already held, are appended to `held`; an EOF or error that ends
 *   the stream meanwhile waits in held_end and is reported after them. held data
 *   goes out from start_reading(), which the transport calls from the loop after
 *   resume_reading() (StreamReader arms its waiter only after resuming).
 * - The multishot CQEs of one batch are only noted per stream (buffer id, length);
 *   after the batch rx_deliver_ready() copies them into one bytes object, gives the
 *   buffers straight back, and makes one delivery. The receive's end (EOF, error,
 *   ENOBUFS, cancel) is handled after the data it followed.
 * - While the loop core defers deliveries (ring->rx_defer, around its wait), the
 *   segments wait on rx_ready for ring_deliver_deferred(), and so does a completed
 *   single-shot receive: its record (rx_single_op) with the buffer or the protocol's
 *   view. No receive is armed while it waits; the ring's close frees it.
 * - Delivery (stream_deliver) re-checks the stream after every call into the
 *   protocol (rule 1): closed -> the rest is dropped; paused -> the rest is held;
 *   protocol swapped by get_buffer() -> the rest goes to the new protocol.
 */
#include "dataplane.h"

#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define UL_RX_BGID 1
#define UL_RX_NBUFS 512
#define UL_RX_BUFSIZE (16 * 1024)
#define STREAM_RECV_SIZE (256 * 1024)

/* At most this much per data_received() call from one batch. */
#define RX_MERGE_MAX (256 * 1024)
/* Bulk streams: a batch that brought this much switches the stream to single-shot
   recv straight into a bytes object (no copy out of the ring, one CQE per read);
   RX_SMALL_STREAK single-shot reads in a row smaller than RX_SMALL switch it back to
   multishot (one small read is often just the tail of a large message: switching on
   it cost a cancel and a re-arm per message of a 256 KiB echo). */
#define RX_BULK (64 * 1024)
#define RX_SMALL (16 * 1024)
#define RX_SMALL_STREAK 4
/* A BufferedProtocol whose get_buffer() returns less than this is not received into
   directly: one receive (and one loop iteration) per few bytes would crawl. The
   stream then receives into its own memory and hands the bytes over through as many
   get_buffer()/buffer_updated() calls as they need, until the protocol offers a
   buffer of this size again (uvloop always copies this way). */
#define RX_DIRECT_MIN 4096
/* get_buffer() that keeps swapping the protocol: give up after this many */
#define SWAP_LIMIT 8

/* ------------------------------------------------------------ the buffer ring */

static int rx_setup(Ring *r)
{
    if (r->rx_state)
        return r->rx_state > 0;
    if (!r->rx_allowed || r->closing || r->closed || ring_forked(r))
        return 0; /* (not remembered: a closed ring never gets one) */
    r->rx_state = -1;
    if (buf_ring_map(r, UL_RX_NBUFS, UL_RX_BUFSIZE, UL_RX_BGID, &r->rx_ring, &r->rx_arena,
                     &r->rx_map_len) < 0)
        return 0;
    r->rx_nbufs = UL_RX_NBUFS;
    r->rx_bufsize = UL_RX_BUFSIZE;
    r->rx_state = 1;
    return 1;
}

void rx_teardown(Ring *r, int unregister)
{
    if (!r->rx_ring)
        return;
    if (unregister && !ring_forked(r))
        io_uring_unregister_buf_ring(r->ring, UL_RX_BGID);
    munmap(r->rx_ring, r->rx_map_len);
    r->rx_ring = NULL;
    r->rx_arena = NULL;
}

static void rx_recycle(Ring *r, uint32_t bid, int *count)
{
    r->rx_bufs_out--;
    io_uring_buf_ring_add(r->rx_ring, r->rx_arena + (size_t)bid * r->rx_bufsize, r->rx_bufsize,
                          bid, io_uring_buf_ring_mask(r->rx_nbufs), (*count)++);
}

/* Bulk receives read into fresh 256 KiB bytes objects, and an echo-like protocol
 * sends each one back and drops it. Freed, such a block goes back to malloc, which
 * trims the heap and faults fresh pages in for the next one (a measured ~15% of a
 * 256 KiB echo's CPU), and the kernel's copy then lands in cold memory. So a large
 * exact bytes object that a finished request held as the last reference is kept
 * here and received into again: with no other reference nobody can observe it, and
 * its cached hash is reset before reuse. */
#define RX_SPARE_MIN (64 * 1024)

int rx_spare_keep(Ring *r, PyObject *obj)
{
    if (!PyBytes_CheckExact(obj) || Py_REFCNT(obj) != 1 || PyBytes_GET_SIZE(obj) < RX_SPARE_MIN ||
        r->nrx_spare == sizeof(r->rx_spare) / sizeof(PyObject *))
        return 0;
    r->rx_spare[r->nrx_spare++] = obj; /* takes the record's reference */
    return 1;
}

/* A spare bytes object to receive into (a new reference), or NULL. */
static PyObject *rx_spare_take(Ring *r)
{
    if (!r->nrx_spare)
        return NULL;
    PyObject *obj = r->rx_spare[--r->nrx_spare];
    r->rx_spare_reuses++;
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
    ((PyBytesObject *)obj)->ob_shash = -1; /* its content is about to change */
#pragma GCC diagnostic pop
    return obj;
}

/* ------------------------------------------------------------ delivery */

/* The read side cannot go on (exception set): a protocol failure is the protocol's,
   anything else (no SQE, no memory) the socket's, as asyncio words them. */
static void stream_read_failed(Stream *s)
{
    if (PyErr_ExceptionMatches(PyExc_OSError) || PyErr_ExceptionMatches(PyExc_MemoryError)) {
        PyObject *exc = ul_fetch_exception();
        if (exc)
            stream_owner_call(s, str_stream_error, exc, s->read_ctx);
        Py_XDECREF(exc);
    } else {
        stream_protocol_raised(s, s->read_ctx);
    }
}

/* Keep data[off:] for resume_reading(), after what is already held. */
static int stream_hold(Stream *s, PyObject *data, Py_ssize_t off)
{
    Py_ssize_t n = PyBytes_GET_SIZE(data) - off;
    if (n <= 0)
        return 0;
    if (!s->held) {
        s->held = off ? PyBytes_FromStringAndSize(PyBytes_AS_STRING(data) + off, n)
                      : Py_NewRef(data);
        return s->held ? 0 : -1;
    }
    Py_ssize_t old = PyBytes_GET_SIZE(s->held);
    PyObject *held = PyBytes_FromStringAndSize(NULL, old + n);
    if (!held)
        return -1;
    memcpy(PyBytes_AS_STRING(held), PyBytes_AS_STRING(s->held), old);
    memcpy(PyBytes_AS_STRING(held) + old, PyBytes_AS_STRING(data) + off, n);
    Py_SETREF(s->held, held);
    return 0;
}

/* Hand data (bytes) to whatever the protocol is now, re-checking after every call
   into it. Returns 0, or -1 with an exception set (the protocol raised, or memory). */
static int stream_deliver(Stream *s, PyObject *data)
{
    Py_ssize_t off = 0, n = PyBytes_GET_SIZE(data);
    int swaps = 0;
    while (off < n) {
        if (s->closed) {
            s->dropped += n - off; /* aborted meanwhile: nobody reads the rest */
            return 0;
        }
        if (!s->reading || s->held)
            return stream_hold(s, data, off);
        if (s->proto_error) {
            PyErr_SetObject((PyObject *)Py_TYPE(s->proto_error), s->proto_error);
            goto undelivered;
        }
        if (s->on_data) {
            PyObject *piece = off ? PyBytes_FromStringAndSize(PyBytes_AS_STRING(data) + off, n - off)
                                  : Py_NewRef(data);
            if (!piece)
                goto undelivered;
            PyObject *res = stream_call(s, s->on_data, piece, s->read_ctx);
            Py_DECREF(piece);
            Py_XDECREF(res);
            return res ? 0 : -1;
        }
        /* a BufferedProtocol: through its own buffers */
        uint64_t gen = s->proto_gen;
        PyObject *size = PyLong_FromSsize_t(n - off);
        if (!size)
            goto undelivered;
        PyObject *target = stream_call(s, s->get_buffer, size, s->read_ctx);
        Py_DECREF(size);
        if (!target)
            goto undelivered;
        Py_buffer view;
        int got = PyObject_GetBuffer(target, &view, PyBUF_WRITABLE);
        Py_DECREF(target);
        if (got < 0)
            goto undelivered;
        if (s->closed || gen != s->proto_gen) {
            /* get_buffer() closed the transport, or handed it to another protocol:
               that buffer is not where these bytes go */
            PyBuffer_Release(&view);
            if (!s->closed && ++swaps > SWAP_LIMIT) {
                PyErr_SetString(PyExc_RuntimeError,
                                "get_buffer() keeps replacing the transport's protocol");
                goto undelivered;
            }
            continue;
        }
        if (view.len >= RX_DIRECT_MIN)
            s->rx_small_buffer = 0; /* the next receive can go straight into it again */
        Py_ssize_t m = view.len < n - off ? view.len : n - off;
        if (m <= 0) {
            PyBuffer_Release(&view);
            PyErr_SetString(PyExc_RuntimeError, "get_buffer() returned an empty buffer");
            goto undelivered;
        }
        memcpy(view.buf, PyBytes_AS_STRING(data) + off, m);
        PyBuffer_Release(&view);
        PyObject *count = PyLong_FromSsize_t(m);
        if (!count)
            goto undelivered;
        PyObject *res = stream_call(s, s->buffer_updated, count, s->read_ctx);
        Py_DECREF(count);
        off += m; /* (announced, even when buffer_updated() raised) */
        if (!res)
            goto undelivered;
        Py_DECREF(res);
    }
    return 0;
undelivered:
    /* the transport fails with the exception: the rest never reaches the protocol */
    s->dropped += n - off;
    return -1;
}

/* The reading side ended with res (0 EOF, -errno): tell the transport, or keep it
   for resume_reading() when the protocol paused (it must see held data first). */
static void stream_read_end(Stream *s, int res)
{
    if (s->closed)
        return;
    /* the socket said its last word: no receive is armed again, so a pause and resume
       after EOF does not read (and report) the EOF a second time */
    s->read_ended = 1;
    if (!s->reading || s->held) {
        s->held_end = res == 0 ? 1 : res;
        return;
    }
    s->reading = 0;
    if (res == 0)
        stream_owner_call(s, str_stream_eof, NULL, s->read_ctx);
    else
        stream_owner_error(s, -res, s->read_ctx);
}

int stream_resume_delivery(Stream *s)
{
    if (s->held) {
        /* data a recv brought in while paused goes first */
        PyObject *held = s->held;
        s->held = NULL;
        int rc = stream_deliver(s, held);
        Py_DECREF(held);
        if (rc < 0) {
            stream_read_failed(s);
            return 0;
        }
        if (!s->reading || s->closed || s->held)
            return 0; /* paused again (the rest is held again) or closed */
    }
    if (s->held_end) {
        int end = s->held_end;
        s->held_end = 0;
        stream_read_end(s, end == 1 ? 0 : end);
        return 0;
    }
    if (stream_arm_recv(s) < 0)
        stream_read_failed(s);
    return 0;
}

/* ------------------------------------------------------------ arming */

int stream_arm_recv(Stream *s)
{
    Ring *r = s->ring;
    for (int swaps = 0;; swaps++) {
        /* (a deferred single-shot completion re-arms once delivered: a receive armed
           before would call get_buffer() while the protocol still owes us its bytes) */
        if (!s->reading || s->recv_armed || s->rx_single_op || s->read_ended || !stream_live(s))
            return 0;
        int own_memory = !s->get_buffer || s->rx_small_buffer;
        int multi = !s->rx_bulk && own_memory && rx_setup(r);
        ul_op *op = op_alloc(r, UL_STREAM_RECV);
        if (!op)
            return -1;
        void *buf = NULL;
        size_t len = 0;
        if (multi) {
            op->multi = 1;
        } else if (own_memory) {
            op->obj = rx_spare_take(r);
            if (!op->obj && !(op->obj = PyBytes_FromStringAndSize(NULL, STREAM_RECV_SIZE))) {
                op_free(r, op);
                return -1;
            }
            buf = PyBytes_AS_STRING(op->obj);
            len = (size_t)PyBytes_GET_SIZE(op->obj);
        } else {
            /* straight into the protocol's buffer */
            uint64_t gen = s->proto_gen;
            PyObject *target = stream_call(s, s->get_buffer, ul_minus_one, s->read_ctx);
            if (!target) {
                op_free(r, op);
                return -1;
            }
            op->obj = target;
            if (PyObject_GetBuffer(target, &op->view, PyBUF_WRITABLE) < 0) {
                op_free(r, op);
                return -1;
            }
            op->has_view = 1;
            if (op->view.len == 0) {
                op_free(r, op);
                PyErr_SetString(PyExc_RuntimeError, "get_buffer() returned an empty buffer");
                return -1;
            }
            /* rule 1: get_buffer() may have closed, paused or re-bound the stream, and
               an SQE naming the fd must not be prepared for a stream that is gone */
            if (gen != s->proto_gen || !s->reading || s->recv_armed || !stream_live(s)) {
                op_free(r, op);
                if (swaps >= SWAP_LIMIT) {
                    PyErr_SetString(PyExc_RuntimeError,
                                    "get_buffer() keeps replacing the transport's protocol");
                    return -1;
                }
                continue; /* for the new protocol, if still reading */
            }
            if (op->view.len < RX_DIRECT_MIN) {
                s->rx_small_buffer = 1; /* into our memory; this buffer stays unused */
                op_free(r, op);
                continue;
            }
            op->proto_gen = gen;
            buf = op->view.buf;
            len = op->view.len > UL_MAX_RW ? UL_MAX_RW : (size_t)op->view.len;
        }
        struct io_uring_sqe *sqe = ring_sqe(r);
        if (!sqe) {
            op_free(r, op);
            return -1;
        }
        Py_INCREF(s);
        op->sock = (PyObject *)s;
        op->fd = s->fd;
        if (multi) {
            io_uring_prep_recv_multishot(sqe, s->fd, NULL, 0, 0);
            sqe->flags |= IOSQE_BUFFER_SELECT;
            sqe->buf_group = UL_RX_BGID;
        } else {
            io_uring_prep_recv(sqe, s->fd, buf, len, 0);
        }
        if (s->rx_after_eagain) {
            sqe_retry_after_poll(sqe);
            s->rx_after_eagain = 0;
        }
        op_armed(r, op, sqe);
        s->recv_armed = 1;
        s->rx_multi = (uint8_t)multi;
        s->recv_key = op_key(op);
        return 0;
    }
}

/* ------------------------------------------------------------ multishot */

static int rx_mark_ready(Ring *r, Stream *s)
{
    if (s->rx_ready)
        return 0;
    if (ul_list_push(&r->rx_ready, &r->nrx_ready, &r->caprx_ready, (PyObject *)s) < 0)
        return -1;
    s->rx_ready = 1;
    return 0;
}

static int stream_add_segment(Ring *r, Stream *s, uint32_t bid, int len)
{
    if (s->nsegs == s->capsegs) {
        uint32_t ncap = s->capsegs ? s->capsegs * 2 : 8;
        struct rx_seg *n = ul_realloc(s->segs, ncap * sizeof(*n));
        if (!n)
            return -1;
        s->segs = n;
        s->capsegs = ncap;
    }
    if (rx_mark_ready(r, s) < 0)
        return -1;
    s->segs[s->nsegs].bid = bid;
    s->segs[s->nsegs].len = (uint32_t)len;
    s->nsegs++;
    return 0;
}

/* One CQE of a stream's multishot recv: note the buffer, deliver after the batch. */
static void stream_recv_multishot(Ring *r, Stream *s, ul_op *op, int res, unsigned flags)
{
    r->rx_cqes++;
    if (flags & IORING_CQE_F_BUFFER) {
        uint32_t bid = flags >> IORING_CQE_BUFFER_SHIFT;
        r->rx_bufs_out++;
        if (res <= 0 || s->closed || stream_add_segment(r, s, bid, res) < 0) {
            int c = 0;
            rx_recycle(r, bid, &c);
            io_uring_buf_ring_advance(r->rx_ring, c);
            if (res > 0 && !s->closed) /* data we cannot keep: the stream cannot go on intact */
                stream_owner_error(s, ENOMEM, s->read_ctx);
            else if (res > 0)
                s->dropped += res;
        }
    }
    if (flags & IORING_CQE_F_MORE)
        return;
    op->armed = 0;
    r->inflight--;
    if (op_key(op) == s->recv_key)
        s->recv_armed = 0;
    if (res == -ENOBUFS)
        r->rx_enobufs++;
    if (res == -EAGAIN) {
        r->n_eagain++; /* rule 6: re-armed below, reading only once there is data */
        s->rx_after_eagain = 1;
    }
    if (!s->closed) {
        if (rx_mark_ready(r, s) == 0) {
            s->rx_ended = 1;
            s->rx_res = res > 0 ? -EAGAIN : res; /* ended after data (CQ overflow): read on */
        } else {
            stream_owner_error(s, ENOMEM, s->read_ctx);
        }
    }
    op_free(r, op);
    if (s->closed && !s->nsegs)
        stream_recv_over(s); /* (with segments of this batch: after rx_deliver_one drops them) */
}

static void stream_recv_single_done(Ring *r, Stream *s, ul_op *op, int res);

/* Copy this batch's segments into bytes objects of at most RX_MERGE_MAX bytes
   (one unless a lot arrived), give every buffer back, then deliver them in order. */
static void rx_deliver_one(Ring *r, Stream *s)
{
    PyObject *chunks[UL_RX_NBUFS];
    uint32_t nchunks = 0, i = 0, k;
    int failed = 0;
    Py_ssize_t batch = 0;
    s->rx_ready = 0;
    if (s->rx_single_op) {
        /* a deferred single-shot completion (a stream has one receive at a time:
           no segments wait with it) */
        ul_op *op = s->rx_single_op;
        s->rx_single_op = NULL;
        stream_recv_single_done(r, s, op, s->rx_single_res);
        if (!s->nsegs && !s->rx_ended)
            return;
    }
    for (k = 0; k < s->nsegs; k++)
        batch += s->segs[k].len;
    if (batch >= RX_BULK && !s->rx_bulk && !s->closed) {
        /* streaming: read the rest with single-shot recv (the multishot ends with
           -ECANCELED and is re-armed as single-shot below) */
        s->rx_bulk = 1;
        s->rx_small_reads = 0;
        if (s->recv_armed && s->rx_multi && stream_live(s) && stream_cancel_key(s, s->recv_key) < 0)
            PyErr_WriteUnraisable((PyObject *)s); /* it then just goes on as multishot */
    }
    while (i < s->nsegs) {
        Py_ssize_t total = 0;
        uint32_t j = i;
        do {
            total += s->segs[j++].len;
        } while (j < s->nsegs && total + s->segs[j].len <= RX_MERGE_MAX);
        PyObject *data = NULL;
        if (s->closed)
            s->dropped += total;
        else if (!failed && !(data = PyBytes_FromStringAndSize(NULL, total)))
            failed = 1;
        char *p = data ? PyBytes_AS_STRING(data) : NULL;
        int c = 0;
        for (; i < j; i++) {
            if (p) {
                memcpy(p, r->rx_arena + (size_t)s->segs[i].bid * r->rx_bufsize, s->segs[i].len);
                p += s->segs[i].len;
            }
            rx_recycle(r, s->segs[i].bid, &c);
        }
        io_uring_buf_ring_advance(r->rx_ring, c);
        if (data)
            chunks[nchunks++] = data;
    }
    s->nsegs = 0;
    if (nchunks)
        r->rx_deliveries++;
    for (k = 0; k < nchunks; k++) {
        /* (a delivery that forked: the child delivers nothing more, rule 4) */
        if (!failed && !ring_forked(r) && stream_deliver(s, chunks[k]) < 0)
            failed = 1;
        else if (failed)
            s->dropped += PyBytes_GET_SIZE(chunks[k]); /* behind the failed delivery */
        Py_DECREF(chunks[k]);
    }
    int ended = s->rx_ended;
    s->rx_ended = 0;
    if (failed) {
        if (!s->closed)
            stream_read_failed(s); /* the protocol raised, or no memory: cannot go on intact */
        else
            stream_recv_over(s);
        return;
    }
    if (s->closed) {
        stream_recv_over(s); /* (nothing when the receive is still in the kernel) */
        return;
    }
    if (!ended)
        return;
    int res = s->rx_res;
    if (res == 0 || (res != -ENOBUFS && res != -ECANCELED && res != -EAGAIN))
        stream_read_end(s, res);
    else if (stream_arm_recv(s) < 0)
        stream_read_failed(s);
}

void rx_deliver_ready(Ring *r)
{
    /* Take the list: a protocol callback may arm receives that complete in a later
       batch onto a new list. */
    PyObject **list = r->rx_ready;
    uint32_t n = r->nrx_ready, cap = r->caprx_ready;
    r->rx_ready = NULL;
    r->nrx_ready = r->caprx_ready = 0;
    for (uint32_t i = 0; i < n; i++) {
        Stream *s = (Stream *)list[i];
        if (!ring_forked(r)) /* a delivery forked: the child delivers nothing more */
            rx_deliver_one(r, s);
        Py_DECREF(s);
    }
    ul_list_give_back(&r->rx_ready, &r->caprx_ready, list, cap);
}

/* ------------------------------------------------------------ single-shot */

/* n bytes landed in op's buffer: a bytes object, or a BufferedProtocol's own buffer. */
static int stream_deliver_single(Stream *s, ul_op *op, int n)
{
    if (!op->has_view) {
        if (n == PyBytes_GET_SIZE(op->obj))
            return stream_deliver(s, op->obj); /* filled: the object itself, no copy */
        /* Partly filled: copy the bytes out and keep the large buffer for the next
           receive (op_free gives it to the spares). Shrinking it in place instead
           (_PyBytes_Resize) costs more than the copy: a block this size is mmap()ed,
           so the shrink is an mremap() that unmaps pages, the spare is smaller each
           time, and the fresh 256 KiB blocks that follow fault every page in again
           (measured on a one-connection 256 KiB echo: 27 page faults and 141 us of
           kernel time per message). The copy is from memory the kernel just wrote. */
        PyObject *data = PyBytes_FromStringAndSize(PyBytes_AS_STRING(op->obj), n);
        if (!data)
            return -1;
        int rc = stream_deliver(s, data);
        Py_DECREF(data);
        return rc;
    }
    if (op->proto_gen == s->proto_gen && s->reading && !s->held && !s->proto_error) {
        /* the buffer is the current protocol's: it is the protocol's again once
           buffer_updated runs */
        PyBuffer_Release(&op->view);
        op->has_view = 0;
        PyObject *count = PyLong_FromLong(n);
        if (!count)
            return -1;
        PyObject *res = stream_call(s, s->buffer_updated, count, s->read_ctx);
        Py_DECREF(count);
        Py_XDECREF(res);
        return res ? 0 : -1;
    }
    /* another protocol's buffer (switched meanwhile), or the protocol paused: the
       bytes are copied out and go to whoever reads now, or wait for resume */
    PyObject *data = PyBytes_FromStringAndSize(op->view.buf, n);
    PyBuffer_Release(&op->view);
    op->has_view = 0;
    if (!data)
        return -1;
    int rc = stream_deliver(s, data);
    Py_DECREF(data);
    return rc;
}

/* What a single-shot receive's result means for the stream: delivery, the end of the
   read side, or a re-arm. Runs as the CQE is reaped, or later from rx_deliver_one()
   when the ring deferred it. */
static void stream_recv_single_done(Ring *r, Stream *s, ul_op *op, int res)
{
    if (s->closed) {
        if (res > 0)
            s->dropped += res;
        op_free(r, op);
        stream_recv_over(s);
        return;
    }
    if (res > 0) {
        if (res >= RX_SMALL)
            s->rx_small_reads = 0;
        else if (++s->rx_small_reads >= RX_SMALL_STREAK)
            s->rx_bulk = 0; /* not streaming (any more): back to multishot */
        /* data also comes with a cancel that lost the race to pause_reading():
           delivery holds it for resume_reading() */
        int rc = stream_deliver_single(s, op, res);
        op_free(r, op);
        if (rc < 0) {
            stream_read_failed(s);
            return;
        }
    } else if (res == -EAGAIN) {
        /* nothing was read (rule 6): read again once there is data */
        op_free(r, op);
        r->n_eagain++;
        s->rx_after_eagain = 1;
    } else if (res != -ECANCELED) {
        op_free(r, op);
        stream_read_end(s, res);
        return;
    } else {
        op_free(r, op);
    }
    /* reading, or resumed before the cancel completed: read on (rule 1: the
       delivery may have closed, paused or re-bound the stream) */
    if (s->reading && stream_live(s) && stream_arm_recv(s) < 0)
        stream_read_failed(s);
}

void stream_recv_complete(Ring *r, Stream *s, ul_op *op, int res, unsigned flags)
{
    if (op->multi) {
        stream_recv_multishot(r, s, op, res, flags);
        return;
    }
    op->armed = 0;
    r->inflight--;
    if (op_key(op) == s->recv_key)
        s->recv_armed = 0;
    if (r->rx_defer && !s->closed && !s->rx_single_op) {
        /* the loop core delivers after the handles that were ready before its wait
           (asyncio's order), as for multishot segments */
        if (rx_mark_ready(r, s) == 0) {
            s->rx_single_op = op;
            s->rx_single_res = res;
            return;
        }
        /* (no room on the list: delivered now instead) */
    }
    stream_recv_single_done(r, s, op, res);
}

/* While the ring closes (rule 3): buffers back to the ring, records freed. */
void stream_recv_retire(Ring *r, Stream *s, ul_op *op, int res, unsigned flags)
{
    if (op->multi && (flags & IORING_CQE_F_BUFFER) && r->rx_ring) {
        int c = 0;
        r->rx_bufs_out++;
        rx_recycle(r, flags >> IORING_CQE_BUFFER_SHIFT, &c);
        io_uring_buf_ring_advance(r->rx_ring, c);
    }
    if (op->multi && (flags & IORING_CQE_F_MORE))
        return;
    op->armed = 0;
    r->inflight--;
    if (op_key(op) == s->recv_key)
        s->recv_armed = 0;
    op_free(r, op);
    if (s->closed && !s->recv_armed && s->pinned == 0) {
        /* the owner waited for this receive; the ring's close ends it (the transport
           closes its socket itself, _reset_for_loop_close) */
        s->recv_over_wanted = 0;
        ring_bury(r, &s->owner);
    }
}
