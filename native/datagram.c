/* The Datagram type: the native half of a datagram transport (UDP over IPv4 and
 * IPv6, connected or not, and Unix datagram sockets).
 *
 * Some facts about datagrams on io_uring
 * --------------------------------------
 * - A multishot RECVMSG (6.0) with a provided buffer ring posts one CQE per
 *   datagram. Each buffer then holds a struct io_uring_recvmsg_out, the source
 *   address (msg_namelen of the request's msghdr fixes its room) and the payload;
 *   a payload longer than its room is cut and MSG_TRUNC set in the header. It ends
 *   (no IORING_CQE_F_MORE) on an error (an ICMP error queued on the socket comes
 *   out as -ECONNREFUSED and friends), a cancel or an empty buffer ring (-ENOBUFS):
 *   the datagrams after it wait in the socket for the re-armed request.
 * - Every UDP payload fits 64 KiB (65,507 bytes over IPv4, 65,527 over IPv6), so
 *   the ring's buffers are that large and nothing is ever cut. Unix datagrams may
 *   be longer; asyncio receives up to 256 KiB (max_size), so Unix sockets (and
 *   kernels without multishot receives) use a single-shot RECVMSG into 256 KiB of
 *   the transport's own, re-armed after each datagram.
 * - A SENDMSG with MSG_DONTWAIT that finds the send buffer full completes with
 *   -EAGAIN instead of waiting in the kernel's poll (REQ_F_NOWAIT). Without it,
 *   several sends parked on one socket are woken newest first (the wait queue is
 *   LIFO) and datagrams would leave out of order. Linking the batch (IOSQE_IO_LINK)
 *   would keep the order but issues one link per io_uring_enter under DEFER_TASKRUN
 *   (measured: 4,951 enters for 5,000 datagrams), so it is not used.
 * - A UDP send fails with EAGAIN only when the socket's allocated send memory has
 *   reached SO_SNDBUF. A batch that meets a full buffer midway may let a datagram
 *   behind the refused one go first, so after a refusal the transport is
 *   "congested": its batches are sized to the room SIOCOUTQ leaves in SO_SNDBUF (at
 *   least the head), the refused datagrams go again in their place after a POLLOUT,
 *   until the queue has drained. Unix datagram sockets refuse once the peer's queue
 *   is full, which its reader empties concurrently: they are sent with plain
 *   sendmsg() calls in order (dgram_send_direct), as asyncio does, and wait for
 *   POLLOUT on the ring.
 * - A zero-copy datagram is a SEND_ZC with its destination in the SQE (addr2, 6.0),
 *   from the registered arena as a fixed buffer when it is a ZeroCopyBuffer there.
 *   It completes twice: the payload stays referenced by its record until the
 *   notification (IORING_CQE_F_NOTIF); the queue moves on after the first CQE.
 * - A datagram is sent whole or not at all: there are no short sends.
 *
 * The invariants of this unit
 * ---------------------------
 * - Order: sendto() appends a record (payload, address) to `queue`, in call order;
 *   the iteration's flush submits the records not yet in the kernel, as one batch,
 *   only when the previous batch is over (nsending == 0). Records that come back
 *   with -EAGAIN/-ENOBUFS go back to the front of the queue in their order; the only
 *   way a datagram overtakes another is the first refusal's batch on a UDP socket
 *   (see above).
 * - A payload the kernel reads is immutable for as long as it does: a bytes object
 *   (or a lent ZeroCopyBuffer) referenced by its record; anything else is copied
 *   into bytes by sendto(), as asyncio copies what it buffers.
 * - queued counts the bytes of every record from sendto() until its first CQE;
 *   pinned the bytes SENDMSG_ZC lent the kernel until their notification. Flow
 *   control (pause_writing/resume_writing) is decided on queued + pinned.
 * - Every datagram a completion brings reaches datagram_received() exactly once,
 *   or is held while the protocol paused reading, or is dropped because the
 *   transport closed (as the socket's close drops what it still holds).
 * - While the loop core defers deliveries (ring->rx_defer), a completion's datagram
 *   and a receive's end (error_received, re-arm) wait in `pend`, in CQE order, with
 *   the transport on the ring's dg_ready list, for ring_deliver_deferred().
 * - Rule 1 of dataplane.h: every call into Python (datagram_received,
 *   error_received, flow control, the transport's methods) may close, abort or
 *   re-bind the transport or close the loop; the state is re-checked after it
 *   (dgram_live) before the ring is touched again for this transport.
 * - Contexts: the read-side callbacks run in read_ctx, a copy of the context
 *   current when reading started or resumed (asyncio's add_reader()); the send-side
 *   ones in write_ctx, a copy of the context of the sendto() that found the
 *   transport idle (asyncio's add_writer()).
 */
#include "dataplane.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <string.h>
#include <linux/sockios.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/un.h>
#include <unistd.h>

#define DG_BGID 2
#define DG_NBUFS 128
#define DG_PAYLOAD_ROOM (64 * 1024)
#define DG_NAME_ROOM ((socklen_t)sizeof(struct sockaddr_storage))
#define DG_BUFSIZE (sizeof(struct io_uring_recvmsg_out) + DG_NAME_ROOM + DG_PAYLOAD_ROOM)
/* the largest UDP payloads (IPv4: 65535 - 20 - 8; IPv6 without jumbograms: 65535 - 8) */
#define DG_UDP4_MAX 65507
#define DG_UDP6_MAX 65527
/* single-shot receives: asyncio's max_size */
#define DG_RECV_MAX (256 * 1024)

/* op->done of a send record */
#define DG_IN_QUEUE 0 /* waiting in the queue, or in the kernel */
#define DG_FINISHED 1 /* sent, or failed and reported: leaves the queue */
#define DG_AGAIN 2    /* came back -EAGAIN/-ENOBUFS: goes again, in its place */

#define ZC_COPIED_STREAK_LIMIT 4
/* A send that fails with ENOBUFS (a full qdisc, reported with IP_RECVERR) goes again
   after a POLLOUT this many times; then it is reported to error_received() and
   dropped, as asyncio does at once: a qdisc that keeps dropping must not become a
   retry loop that never says so. */
#define DG_ENOBUFS_RETRIES 8
/* what one datagram's skb costs the send buffer beyond its payload, at most (truesize) */
#define DG_SKB_OVERHEAD 1024

typedef struct Datagram {
    PyObject_HEAD
    Ring *ring;
    int fd;
    int family;
    PyObject *owner;       /* the Python transport (dropped by close_now) */
    PyObject *on_datagram; /* protocol.datagram_received */
    PyObject *on_error;    /* protocol.error_received */
    PyObject *protocol;    /* looked up at call time for a method it lacked when bound */
    PyObject *address;     /* the address given at creation (sendto compares), or NULL */
    PyObject *read_ctx;
    PyObject *write_ctx;
    PyObject *held;        /* list of (data, addr) received while reading was paused */
    int ctx_depth;
    uint64_t recv_key;
    uint64_t poll_key;
    uint8_t connected;   /* the socket has a peer: sends carry no address */
    uint8_t reading, recv_armed, read_closed, closing, closed, dirty, write_paused, write_waiting;
    uint8_t zc, zc_forced, copied_streak, notify_drained, empty_sends, recv_after_eagain;
    /* the send queue: keys of records in sendto() order; [0, nbatch) are the batch
       in the kernel (or back from it), the rest wait for the next flush */
    uint64_t *queue;
    uint32_t qhead, qlen, qcap, nbatch;
    uint32_t nsending; /* records of the batch whose first CQE is not in yet */
    uint8_t batch_eagain;
    uint8_t congested; /* a send met a full send buffer: batches sized to the room left */
    Py_ssize_t queued, pinned, high, low, zc_threshold;
    Py_ssize_t conn_lost; /* asyncio's _conn_lost: counts sendto() calls after the end */
    PyObject *rx_buf; /* single-shot receives: 256 KiB bytes to receive into */
    PyObject *last_source; /* the last datagram's address tuple (dgram_note_source) */
    struct sockaddr_storage last_source_raw;
    socklen_t last_source_len;
    /* receive completions of a wait the loop core defers (ring->rx_defer), in CQE
       order, for dgram_deliver_ready(): a datagram (data, addr), or a receive's end
       (data NULL, res its final result) */
    struct dg_pending {
        PyObject *data, *addr;
        int res;
    } *pend;
    uint32_t npend, cappend;
    uint8_t on_dg_ready; /* on the ring's dg_ready list */
} Datagram;

/* logs asyncio's "socket.send() raised exception." (set by uringloop._datagram) */
static PyObject *dgram_warn_cb;
#define LOG_THRESHOLD_FOR_CONNLOST_WRITES 5

static PyObject *str_datagram_drained, *str_fatal_error, *str_resolve,
    *str_protocol_raised, *str_fatal_write_message, *str_fatal_read_message;

static inline int dgram_live(const Datagram *d)
{
    return !d->closed && !d->ring->closing && !d->ring->closed && !ring_forked(d->ring);
}

static int dgram_check_fork(Datagram *d)
{
    if (!d->ring) {
        PyErr_SetString(PyExc_RuntimeError, "Datagram.__init__() was not called");
        return -1;
    }
    if (!ring_forked(d->ring))
        return 0;
    PyErr_SetString(PyExc_RuntimeError,
                    "this transport belongs to an event loop of the parent process; a forked "
                    "child cannot use it (it may only close it)");
    return -1;
}

static PyObject *dgram_callback(Datagram *d, PyObject *bound, const char *name);
static void dgram_addr_cache_clear(Ring *r);

static int dgram_initialised(Datagram *d)
{
    if (d->ring)
        return 1;
    PyErr_SetString(PyExc_RuntimeError, "Datagram.__init__() was not called");
    return 0;
}

/* ------------------------------------------------------------ calls into Python */

/* Call callable(*args) in ctx (entered unless one of this transport's callbacks
   already runs in it), through a strong reference. */
static PyObject *dgram_call(Datagram *d, PyObject *callable, PyObject *const *args, size_t nargs,
                            PyObject *ctx)
{
    int entered = 0;
    Py_INCREF(callable);
    if (ctx && d->ctx_depth == 0) {
        Py_INCREF(ctx);
        if (PyContext_Enter(ctx) == 0) {
            entered = 1;
        } else {
            Py_DECREF(ctx);
            Py_DECREF(callable);
            return NULL;
        }
    }
    d->ctx_depth++;
    PyObject *res = PyObject_Vectorcall(callable, args, nargs, NULL);
    d->ctx_depth--;
    if (entered) {
        PyObject *exc = res ? NULL : ul_fetch_exception();
        if (PyContext_Exit(ctx) < 0)
            PyErr_WriteUnraisable(ctx);
        if (exc) {
            PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
            Py_DECREF(exc);
        }
        Py_DECREF(ctx);
    }
    Py_DECREF(callable);
    return res;
}

/* The transport's method name(*args) in ctx; a failure goes to callback_failed. */
static void dgram_owner_call(Datagram *d, PyObject *name, PyObject *const *args, size_t nargs,
                             PyObject *ctx)
{
    if (!d->owner)
        return;
    PyObject *owner = Py_NewRef(d->owner);
    PyObject *method = PyObject_GetAttr(owner, name);
    PyObject *res = method ? dgram_call(d, method, args, nargs, ctx) : NULL;
    Py_XDECREF(method);
    if (!res)
        callback_failed(d->ring, owner);
    Py_XDECREF(res);
    Py_DECREF(owner);
}

/* A protocol callback raised (exception set): KeyboardInterrupt and SystemExit leave
   the loop; anything else goes to the loop's exception handler, as an exception in a
   callback does on asyncio's loop (the transport stays open). */
static void dgram_protocol_raised(Datagram *d, PyObject *callback, PyObject *ctx)
{
    if (!PyErr_ExceptionMatches(PyExc_Exception) || !d->owner) {
        callback_failed(d->ring, callback);
        return;
    }
    PyObject *exc = ul_fetch_exception();
    PyObject *args[2] = {exc, callback};
    dgram_owner_call(d, str_protocol_raised, args, 2, ctx);
    Py_XDECREF(exc);
}

/* error_received(OSError(err)) in ctx. */
static void dgram_error_received(Datagram *d, int err, PyObject *ctx)
{
    if (d->closed)
        return;
    PyObject *exc = oserror_from(err);
    if (!exc) {
        PyErr_WriteUnraisable(d->owner ? d->owner : (PyObject *)d);
        return;
    }
    PyObject *cb = dgram_callback(d, d->on_error, "error_received");
    PyObject *res = cb ? dgram_call(d, cb, &exc, 1, ctx) : NULL;
    if (!res)
        dgram_protocol_raised(d, cb ? cb : Py_None, ctx);
    Py_XDECREF(res);
    Py_XDECREF(cb);
    Py_DECREF(exc);
}

/* ------------------------------------------------------------ flow control */

static void dgram_maybe_pause(Datagram *d)
{
    if (!d->write_paused && d->queued + d->pinned > d->high) {
        d->write_paused = 1;
        dgram_owner_call(d, str_pause_protocol, NULL, 0, NULL); /* in sendto(): the caller's */
    }
}

static void dgram_maybe_resume(Datagram *d)
{
    if (d->write_paused && d->queued + d->pinned <= d->low) {
        d->write_paused = 0;
        dgram_owner_call(d, str_resume_protocol, NULL, 0, d->write_ctx);
    }
}

/* ------------------------------------------------------------ the buffer ring */

static int dg_setup(Ring *r)
{
    if (r->dg_state)
        return r->dg_state > 0;
    if (!r->rx_allowed || r->closing || r->closed || ring_forked(r))
        return 0;
    r->dg_state = -1;
    if (buf_ring_map(r, DG_NBUFS, DG_BUFSIZE, DG_BGID, &r->dg_ring, &r->dg_arena,
                     &r->dg_map_len) < 0)
        return 0;
    r->dg_state = 1;
    return 1;
}

void dgram_teardown(Ring *r, int unregister)
{
    dgram_addr_cache_clear(r);
    if (!r->dg_ring)
        return;
    if (unregister && !ring_forked(r))
        io_uring_unregister_buf_ring(r->ring, DG_BGID);
    munmap(r->dg_ring, r->dg_map_len);
    r->dg_ring = NULL;
    r->dg_arena = NULL;
}

static void dg_recycle(Ring *r, uint32_t bid)
{
    r->dg_bufs_out--;
    io_uring_buf_ring_add(r->dg_ring, r->dg_arena + (size_t)bid * DG_BUFSIZE, DG_BUFSIZE, bid,
                          io_uring_buf_ring_mask(DG_NBUFS), 0);
    io_uring_buf_ring_advance(r->dg_ring, 1);
}

/* ------------------------------------------------------------ receiving */

/* The source address as asyncio's recvfrom() gives it: None when there is none. */
static PyObject *dgram_address(const void *name, socklen_t len)
{
    if (len == 0 || len > sizeof(struct sockaddr_storage))
        Py_RETURN_NONE;
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof(ss));
    memcpy(&ss, name, len);
    return sockaddr_to_py(&ss, len);
}

/* A server hears from the same few peers again and again: the tuple of each IPv4 or
   IPv6 source address is kept (a direct-mapped table per ring) and handed out again,
   instead of a new str, int and tuple per datagram. Tuples are immutable, so sharing
   one between datagram_received() calls is invisible but for `is`. */
#define DG_ADDR_SLOTS 256
#define DG_ADDR_RAW ((socklen_t)sizeof(struct sockaddr_in6))
struct dg_addr_entry {
    socklen_t len;
    unsigned char raw[sizeof(struct sockaddr_in6)];
    PyObject *tuple;
};

static uint32_t dg_addr_hash(const unsigned char *raw, socklen_t len)
{
    uint32_t h = 2166136261u; /* FNV-1a over the port and address bytes */
    for (socklen_t i = 2; i < len; i++)
        h = (h ^ raw[i]) * 16777619u;
    return h ^ (h >> 16);
}

static PyObject *dgram_address_cached(Ring *r, const void *name, socklen_t len)
{
    sa_family_t family = len >= sizeof(sa_family_t) ? ((const struct sockaddr *)name)->sa_family
                                                    : AF_UNSPEC;
    if ((family != AF_INET && family != AF_INET6) || len > DG_ADDR_RAW)
        return dgram_address(name, len);
    if (!r->dg_addrs && !(r->dg_addrs = PyMem_Calloc(DG_ADDR_SLOTS, sizeof(*r->dg_addrs))))
        return dgram_address(name, len);
    struct dg_addr_entry *e = &r->dg_addrs[dg_addr_hash(name, len) % DG_ADDR_SLOTS];
    if (e->tuple && e->len == len && memcmp(e->raw, name, len) == 0)
        return Py_NewRef(e->tuple);
    PyObject *tuple = dgram_address(name, len);
    if (tuple && PyTuple_Check(tuple)) {
        PyObject *old = e->tuple;
        e->tuple = Py_NewRef(tuple);
        e->len = len;
        memcpy(e->raw, name, len);
        Py_XDECREF(old); /* (a tuple of str and int: no finalizer runs) */
    }
    return tuple;
}

static void dgram_addr_cache_clear(Ring *r)
{
    if (!r->dg_addrs)
        return;
    for (int i = 0; i < DG_ADDR_SLOTS; i++)
        Py_XDECREF(r->dg_addrs[i].tuple);
    PyMem_Free(r->dg_addrs);
    r->dg_addrs = NULL;
}

/* The last datagram's source: a reply to it (sendto(data, addr) with that very
   tuple, what an echo or request-response protocol does) skips parsing the address. */
static void dgram_note_source(Datagram *d, PyObject *addr, const void *name, socklen_t len)
{
    if (!addr || !PyTuple_Check(addr) || len > DG_ADDR_RAW || d->closed)
        return;
    if (d->last_source != addr) {
        PyObject *old = d->last_source;
        d->last_source = Py_NewRef(addr);
        Py_XDECREF(old); /* (a tuple of str and int) */
    }
    memcpy(&d->last_source_raw, name, len);
    d->last_source_len = len;
}

static int dgram_arm_recv(Datagram *d)
{
    Ring *r = d->ring;
    if (!d->reading || d->recv_armed || d->read_closed || !dgram_live(d))
        return 0;
    int multi = d->family != AF_UNIX && dg_setup(r);
    ul_op *op = op_alloc(r, UL_DGRAM_RECV);
    if (!op)
        return -1;
    memset(&op->msg, 0, sizeof(op->msg));
    if (multi) {
        op->multi = 1;
        op->msg.msg_namelen = DG_NAME_ROOM;
    } else {
        if (!d->rx_buf && !(d->rx_buf = PyBytes_FromStringAndSize(NULL, DG_RECV_MAX))) {
            op_free(r, op);
            return -1;
        }
        op->obj = d->rx_buf; /* the record holds the memory the kernel writes */
        d->rx_buf = NULL;
        op->iov1.iov_base = PyBytes_AS_STRING(op->obj);
        op->iov1.iov_len = DG_RECV_MAX;
        op->msg.msg_iov = &op->iov1;
        op->msg.msg_iovlen = 1;
        op->msg.msg_name = &op->addr;
        op->msg.msg_namelen = sizeof(op->addr);
    }
    struct io_uring_sqe *sqe = ring_sqe(r);
    if (!sqe) {
        op_free(r, op);
        return -1;
    }
    op->sock = Py_NewRef((PyObject *)d);
    op->fd = d->fd;
    if (multi) {
        io_uring_prep_recvmsg_multishot(sqe, d->fd, &op->msg, 0);
        sqe->flags |= IOSQE_BUFFER_SELECT;
        sqe->buf_group = DG_BGID;
    } else {
        io_uring_prep_recvmsg(sqe, d->fd, &op->msg, 0);
    }
    if (d->recv_after_eagain) {
        sqe_retry_after_poll(sqe);
        d->recv_after_eagain = 0;
    }
    op_armed(r, op, sqe);
    d->recv_armed = 1;
    d->recv_key = op_key(op);
    return 0;
}

/* A receive could not be armed (exception set): the transport fails. */
static void dgram_read_failed(Datagram *d)
{
    PyObject *exc = ul_fetch_exception();
    if (exc && d->owner && !d->closed) {
        PyObject *args[2] = {exc, str_fatal_read_message};
        dgram_owner_call(d, str_fatal_error, args, 2, d->read_ctx);
    }
    Py_XDECREF(exc);
}

/* Hand one datagram to the protocol (steals data and addr), or hold it while paused. */
static void dgram_deliver(Datagram *d, PyObject *data, PyObject *addr)
{
    Ring *r = d->ring;
    if (d->closed || d->read_closed) {
        Py_DECREF(data);
        Py_DECREF(addr);
        return;
    }
    if (!d->reading || d->held) {
        /* paused, or behind datagrams already held: in order, for resume_reading() */
        PyObject *pair = PyTuple_Pack(2, data, addr);
        Py_DECREF(data);
        Py_DECREF(addr);
        if (!pair || (!d->held && !(d->held = PyList_New(0))) || PyList_Append(d->held, pair) < 0)
            PyErr_WriteUnraisable(d->owner ? d->owner : (PyObject *)d);
        Py_XDECREF(pair);
        return;
    }
    r->dg_received++;
    PyObject *cb = dgram_callback(d, d->on_datagram, "datagram_received");
    PyObject *args[2] = {data, addr};
    PyObject *res = cb ? dgram_call(d, cb, args, 2, d->read_ctx) : NULL;
    if (!res)
        dgram_protocol_raised(d, cb ? cb : Py_None, d->read_ctx);
    Py_XDECREF(res);
    Py_XDECREF(cb);
    Py_DECREF(data);
    Py_DECREF(addr);
}

/* After a receive's final CQE: arm the next one if still reading. */
static void dgram_rearm(Datagram *d)
{
    if (d->reading && !d->read_closed && dgram_live(d) && dgram_arm_recv(d) < 0)
        dgram_read_failed(d);
}

/* An ICMP error a receive brought while reading is paused (or behind held
   datagrams): held in its place, as (None, errno), for resume_reading(); asyncio's
   recvfrom() raises it once reading resumes. */
static void dgram_hold_error(Datagram *d, int err)
{
    PyObject *code = PyLong_FromLong(err);
    PyObject *pair = code ? PyTuple_Pack(2, Py_None, code) : NULL;
    Py_XDECREF(code);
    if (!pair || (!d->held && !(d->held = PyList_New(0))) || PyList_Append(d->held, pair) < 0)
        PyErr_WriteUnraisable(d->owner ? d->owner : (PyObject *)d);
    Py_XDECREF(pair);
}

/* A receive ended with res (after the datagrams it brought were delivered). */
static void dgram_recv_end(Ring *r, Datagram *d, int res)
{
    if (res < 0 && !d->closed) {
        if (res == -ENOBUFS) {
            /* the buffer ring ran dry: the datagrams wait in the socket */
            r->dg_recv_enobufs++;
        } else if (res == -EAGAIN) {
            r->n_eagain++;
            d->recv_after_eagain = 1; /* rule 6 */
        } else if (res != -ECANCELED && !d->read_closed) {
            /* an ICMP error reported on the socket (asyncio's recvfrom() raises it);
               after close() nothing is read any more, and while paused it waits */
            if (!d->reading || d->held)
                dgram_hold_error(d, -res);
            else
                dgram_error_received(d, -res, d->read_ctx);
        }
    }
    dgram_rearm(d);
}

/* One held entry (both stolen): a datagram, or with data None an error's errno. */
static void dgram_deliver_held(Datagram *d, PyObject *data, PyObject *addr)
{
    if (data != Py_None) {
        dgram_deliver(d, data, addr);
        return;
    }
    long err = PyLong_AsLong(addr);
    Py_DECREF(data);
    Py_DECREF(addr);
    if (!d->closed && !d->read_closed)
        dgram_error_received(d, (int)err, d->read_ctx);
}

/* Room for `need` more deferred outcomes of d's receive, and d on the ring's dg_ready
   list; -1 when there is no memory (then nothing is deferred: delivered now). */
static int dgram_defer_reserve(Ring *r, Datagram *d, uint32_t need)
{
    if (d->npend + need > d->cappend) {
        uint32_t ncap = d->cappend ? d->cappend * 2 : 8;
        struct dg_pending *n = ul_realloc(d->pend, ncap * sizeof(*n));
        if (!n)
            return -1;
        d->pend = n;
        d->cappend = ncap;
    }
    if (!d->on_dg_ready) {
        if (ul_list_push(&r->dg_ready, &r->ndg_ready, &r->capdg_ready, (PyObject *)d) < 0)
            return -1;
        d->on_dg_ready = 1;
    }
    return 0;
}

/* (room reserved) a datagram (data and addr stolen), or with data NULL the end */
static void dgram_defer(Datagram *d, PyObject *data, PyObject *addr, int res)
{
    d->pend[d->npend].data = data;
    d->pend[d->npend].addr = addr;
    d->pend[d->npend].res = res;
    d->npend++;
}

static void dgram_pend_clear(Datagram *d)
{
    for (uint32_t k = 0; k < d->npend; k++) {
        Py_XDECREF(d->pend[k].data);
        Py_XDECREF(d->pend[k].addr);
    }
    d->npend = 0;
}

/* d's deferred outcomes, in order (the list is taken first: what a delivery does may
   not see it half done) */
static void dgram_deliver_pending(Ring *r, Datagram *d)
{
    struct dg_pending *p = d->pend;
    uint32_t np = d->npend, pcap = d->cappend;
    d->pend = NULL;
    d->npend = d->cappend = 0;
    for (uint32_t k = 0; k < np; k++) {
        if (ring_forked(r)) { /* a delivery forked: the child delivers nothing more */
            Py_XDECREF(p[k].data);
            Py_XDECREF(p[k].addr);
        } else if (p[k].data) {
            dgram_deliver(d, p[k].data, p[k].addr); /* may close, pause or re-bind */
        } else {
            dgram_recv_end(r, d, p[k].res);
        }
    }
    if (d->pend == NULL) {
        d->pend = p; /* keep the allocation */
        d->cappend = pcap;
    } else {
        PyMem_Free(p);
    }
}

void dgram_deliver_ready(Ring *r)
{
    /* Take the list: what the deliveries do (a nested wait cannot happen, but a
       close can) must not see it half done. */
    PyObject **list = r->dg_ready;
    uint32_t n = r->ndg_ready, cap = r->capdg_ready;
    r->dg_ready = NULL;
    r->ndg_ready = r->capdg_ready = 0;
    for (uint32_t i = 0; i < n; i++) {
        Datagram *d = (Datagram *)list[i];
        d->on_dg_ready = 0;
        dgram_deliver_pending(r, d);
        Py_DECREF(d);
    }
    ul_list_give_back(&r->dg_ready, &r->capdg_ready, list, cap);
}

void dgram_drop_ready(Ring *r)
{
    for (uint32_t i = 0; i < r->ndg_ready; i++) {
        Datagram *d = (Datagram *)r->dg_ready[i];
        d->on_dg_ready = 0;
        dgram_pend_clear(d); /* (as the socket's close drops what it still holds) */
        Py_DECREF(d);
    }
    r->ndg_ready = 0;
}

static void dgram_recv_complete(Ring *r, Datagram *d, ul_op *op, int res, unsigned flags)
{
    PyObject *data = NULL, *addr = NULL;
    int more = op->multi && (flags & IORING_CQE_F_MORE);
    if (op->multi) {
        r->dg_recv_cqes++;
        if (flags & IORING_CQE_F_BUFFER) {
            uint32_t bid = flags >> IORING_CQE_BUFFER_SHIFT;
            r->dg_bufs_out++;
            if (res > 0 && !d->closed && r->dg_arena) {
                char *buf = r->dg_arena + (size_t)bid * DG_BUFSIZE;
                struct io_uring_recvmsg_out *out = io_uring_recvmsg_validate(buf, res, &op->msg);
                if (out) {
                    void *payload = io_uring_recvmsg_payload(out, &op->msg);
                    unsigned plen = io_uring_recvmsg_payload_length(out, res, &op->msg);
                    data = PyBytes_FromStringAndSize(payload, plen);
                    socklen_t nlen = out->namelen < DG_NAME_ROOM ? out->namelen : DG_NAME_ROOM;
                    addr = dgram_address_cached(r, io_uring_recvmsg_name(out), nlen);
                    dgram_note_source(d, addr, io_uring_recvmsg_name(out), nlen);
                }
            }
            if (r->dg_ring)
                dg_recycle(r, bid); /* the bytes are copied out: the buffer goes back now */
        }
    } else if (res >= 0 && !d->closed) {
        data = PyBytes_FromStringAndSize(PyBytes_AS_STRING(op->obj), res);
        addr = dgram_address_cached(r, &op->addr, op->msg.msg_namelen);
    }
    if (!more) {
        op->armed = 0;
        r->inflight--;
        if (op_key(op) == d->recv_key)
            d->recv_armed = 0;
        if (!op->multi && !d->rx_buf && !d->closed && Py_REFCNT(op->obj) == 1) {
            d->rx_buf = op->obj; /* the next single-shot receive reuses the memory */
            op->obj = NULL;
        }
        op_free(r, op);
        op = NULL;
    }
    if ((data == NULL) != (addr == NULL)) {
        Py_CLEAR(data);
        Py_CLEAR(addr);
        PyErr_WriteUnraisable(d->owner ? d->owner : (PyObject *)d);
    }
    if (r->rx_defer && !d->closed) {
        /* the loop core delivers after the handles that were ready before its wait
           (asyncio's order), as for the streams */
        if (dgram_defer_reserve(r, d, (data != NULL) + !more) == 0) {
            if (data)
                dgram_defer(d, data, addr, 0);
            if (!more)
                dgram_defer(d, NULL, NULL, res);
            return;
        }
        /* no memory for the lists: what waits goes now, then this, in order */
        dgram_deliver_pending(r, d);
        if (ring_forked(r)) { /* a delivery forked: the child delivers nothing more */
            Py_XDECREF(data);
            Py_XDECREF(addr);
            return;
        }
    }
    if (data)
        dgram_deliver(d, data, addr); /* may close, pause or re-bind (rule 1) */
    if (more)
        return;
    dgram_recv_end(r, d, res);
}

/* ------------------------------------------------------------ sending */

static Py_ssize_t dg_payload_len(PyObject *obj)
{
    return IS_ZCBUF(obj) ? ((ZeroCopyBuffer *)obj)->len : PyBytes_GET_SIZE(obj);
}

static char *dg_payload_base(PyObject *obj)
{
    return IS_ZCBUF(obj) ? ((ZeroCopyBuffer *)obj)->base : PyBytes_AS_STRING(obj);
}

static int dgram_mark_dirty(Datagram *d)
{
    Ring *r = d->ring;
    if (d->dirty)
        return 0;
    if (ul_list_push(&r->dg_dirty, &r->ndg_dirty, &r->capdg_dirty, (PyObject *)d) < 0) {
        PyErr_NoMemory();
        return -1;
    }
    d->dirty = 1;
    return 0;
}

static int queue_push(Datagram *d, uint64_t key)
{
    if (d->qhead + d->qlen == d->qcap) {
        if (d->qhead > 0 && d->qhead >= d->qlen) {
            memmove(d->queue, d->queue + d->qhead, d->qlen * sizeof(uint64_t));
            d->qhead = 0;
        } else {
            uint32_t ncap = d->qcap ? d->qcap * 2 : 16;
            uint64_t *n = ul_realloc(d->queue, (size_t)ncap * sizeof(uint64_t));
            if (!n) {
                PyErr_NoMemory();
                return -1;
            }
            d->queue = n;
            d->qcap = ncap;
        }
    }
    d->queue[d->qhead + d->qlen++] = key;
    return 0;
}

static int dgram_is_zc(Datagram *d, PyObject *payload, Py_ssize_t len)
{
    Ring *r = d->ring;
    if (!d->zc || !r->zc_supported)
        return 0;
    if (IS_ZCBUF(payload)) {
        ZeroCopyBuffer *b = (ZeroCopyBuffer *)payload;
        if (b->in_arena && b->pool->registered && (PyObject *)b->pool == r->pool)
            return 1; /* the registered arena: pinned already */
    } else if (len < d->zc_threshold) {
        return 0;
    }
    /* (a datagram pins whole pages: up to two more than its length) */
    return r->zc_pin_budget < 0 || r->pinned_bytes + len + 8192 <= r->zc_pin_budget;
}

static int dgram_wait_writable(Datagram *d);
static void dgram_maybe_resume(Datagram *d);
static void dgram_check_drained(Datagram *d);

/* Unix datagram sockets: the queue goes out with sendmsg() calls, in order, until the
   peer's queue is full (EAGAIN), then a POLLOUT on the ring says when to go on. A
   batch of MSG_DONTWAIT requests cannot keep their order there: the peer's reader
   frees room between two of them, and a later datagram overtakes one refused. */
static void dgram_send_direct(Datagram *d)
{
    Ring *r = d->ring;
    while (d->qlen && dgram_live(d) && !d->write_waiting) {
        uint64_t key = d->queue[d->qhead];
        ul_op *op = op_lookup(r, key);
        if (!op) {
            d->qhead++, d->qlen--;
            continue;
        }
        Py_ssize_t len = dg_payload_len(op->obj);
        op->iov1.iov_base = dg_payload_base(op->obj);
        op->iov1.iov_len = (size_t)len;
        memset(&op->msg, 0, sizeof(op->msg));
        op->msg.msg_iov = &op->iov1;
        op->msg.msg_iovlen = 1;
        op->msg.msg_name = op->addrlen ? &op->addr : NULL;
        op->msg.msg_namelen = op->addrlen;
        ssize_t n = sendmsg(d->fd, &op->msg, MSG_DONTWAIT | MSG_NOSIGNAL);
        int err = n < 0 ? errno : 0;
        if (err == EINTR)
            continue;
        if (err == EAGAIN || err == ENOBUFS) {
            r->dg_retries++;
            if (dgram_wait_writable(d) < 0)
                PyErr_WriteUnraisable(d->owner ? d->owner : (PyObject *)d);
            dgram_maybe_resume(d); /* (down to the low-water mark already?) */
            return;
        }
        /* sent, or refused for good: it leaves the queue before any Python runs */
        d->qhead++, d->qlen--;
        d->queued -= len;
        r->dg_sends++;
        op_free(r, op);
        if (err)
            dgram_error_received(d, err, d->write_ctx); /* may close (rule 1) */
    }
    if (d->qlen == 0) {
        d->qhead = 0;
        if (!d->closed) {
            dgram_maybe_resume(d);
            if (!d->closed)
                dgram_check_drained(d);
        }
    }
}

/* How many queued datagrams fit the send buffer's room now (at least one). A send
   fails with EAGAIN only when the socket's allocated memory has reached SO_SNDBUF, so
   a batch whose datagrams (with a margin for each skb's overhead) fit in what SIOCOUTQ
   says is free cannot meet a refusal midway and let a later datagram overtake it. */
static uint32_t dgram_room_for(Datagram *d)
{
    int sndbuf = 0, outq = 0;
    socklen_t optlen = sizeof(sndbuf);
    if (getsockopt(d->fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, &optlen) < 0 ||
        ioctl(d->fd, SIOCOUTQ, &outq) < 0)
        return 1;
    Py_ssize_t room = (Py_ssize_t)sndbuf - outq, used = 0;
    uint32_t n = 0;
    while (n < d->qlen) {
        ul_op *op = op_lookup(d->ring, d->queue[d->qhead + n]);
        Py_ssize_t need = (op ? dg_payload_len(op->obj) : 0) + DG_SKB_OVERHEAD;
        if (n > 0 && used + need > room)
            break;
        used += need;
        n++;
    }
    return n;
}

/* Submit the queued records that are not in the kernel yet, as one batch. */
static void dgram_submit(Datagram *d)
{
    Ring *r = d->ring;
    if (d->nsending || d->nbatch || d->write_waiting || !dgram_live(d))
        return;
    if (d->family == AF_UNIX) {
        dgram_send_direct(d);
        return;
    }
    uint32_t count = d->qlen;
    if (d->congested)
        count = dgram_room_for(d);
    for (uint32_t i = 0; i < count; i++) {
        ul_op *op = op_lookup(r, d->queue[d->qhead + i]);
        if (!op)
            continue; /* (freed by the ring's close) */
        struct io_uring_sqe *sqe = ring_sqe(r);
        if (!sqe) {
            /* what could not go waits for the next flush; a ring that refuses for
               good (closing, forked) is the transport's end */
            d->nbatch = i;
            if (!dgram_live(d))
                PyErr_Clear();
            else
                PyErr_WriteUnraisable(d->owner ? d->owner : (PyObject *)d);
            if (dgram_mark_dirty(d) < 0)
                PyErr_Clear();
            return;
        }
        Py_ssize_t len = dg_payload_len(op->obj);
        int zc = dgram_is_zc(d, op->obj, len);
        op->iov1.iov_base = dg_payload_base(op->obj);
        op->iov1.iov_len = (size_t)len;
        op->msg.msg_iov = &op->iov1;
        op->msg.msg_iovlen = 1;
        op->msg.msg_name = op->addrlen ? &op->addr : NULL;
        op->msg.msg_namelen = op->addrlen;
        op->msg.msg_control = NULL;
        op->msg.msg_controllen = 0;
        op->msg.msg_flags = 0;
        op->done = DG_IN_QUEUE;
        if (zc) {
            /* SEND_ZC with the destination in the SQE rather than SENDMSG_ZC: it can
               send a ZeroCopyBuffer of the registered arena as a fixed buffer, whose
               pages the kernel does not have to pin again for every datagram */
            prep_send_zc_payload(r, sqe, d->fd, op->obj, op->iov1.iov_base, (size_t)len);
            sqe->msg_flags |= MSG_DONTWAIT;
            if (op->addrlen)
                io_uring_prep_send_set_addr(sqe, (const struct sockaddr *)&op->addr,
                                            (uint16_t)op->addrlen);
            op->multi = 1; /* (a ZC send: expects a notification) */
            pin(r, op, (size_t)len);
            d->pinned += len;
            r->dg_zc_sends++;
        } else {
            io_uring_prep_sendmsg(sqe, d->fd, &op->msg, MSG_DONTWAIT | MSG_NOSIGNAL);
            op->multi = 0;
            r->dg_sends++;
        }
        op->fd = d->fd;
        op_armed(r, op, sqe);
        d->nsending++;
    }
    d->nbatch = count;
}

/* Arm a one-shot POLLOUT: the batch that found no room goes again once there is. */
static int dgram_wait_writable(Datagram *d)
{
    Ring *r = d->ring;
    ul_op *op = op_alloc(r, UL_DGRAM_POLL);
    if (!op)
        return -1;
    struct io_uring_sqe *sqe = ring_sqe(r);
    if (!sqe) {
        op_free(r, op);
        return -1;
    }
    op->sock = Py_NewRef((PyObject *)d);
    op->fd = d->fd;
    io_uring_prep_poll_add(sqe, d->fd, POLLOUT);
    op_armed(r, op, sqe);
    d->write_waiting = 1;
    d->poll_key = op_key(op);
    return 0;
}

/* The batch is over: drop what finished, keep what goes again in front. */
static void dgram_batch_done(Datagram *d)
{
    Ring *r = d->ring;
    uint32_t keep = 0;
    for (uint32_t i = 0; i < d->nbatch; i++) {
        uint64_t key = d->queue[d->qhead + i];
        ul_op *op = op_lookup(r, key);
        if (op && op->done == DG_AGAIN && !op->armed) {
            op->done = DG_IN_QUEUE;
            d->queue[d->qhead + keep++] = key;
        }
    }
    /* the records after the batch move up behind those kept */
    uint32_t after = d->qlen - d->nbatch;
    if (keep < d->nbatch && after)
        memmove(d->queue + d->qhead + keep, d->queue + d->qhead + d->nbatch,
                (size_t)after * sizeof(uint64_t));
    d->qlen = keep + after;
    d->nbatch = 0;
    if (d->qlen == 0)
        d->qhead = 0;
}

/* Everything sendto() queued is out (or failed): tell a closing transport. */
static void dgram_check_drained(Datagram *d)
{
    if (d->qlen == 0 && d->nsending == 0 && d->notify_drained && d->owner) {
        d->notify_drained = 0;
        dgram_owner_call(d, str_datagram_drained, NULL, 0, d->write_ctx);
    }
}

static void dgram_send_complete(Ring *r, Datagram *d, ul_op *op, int res, unsigned flags)
{
    if (op->multi && (flags & IORING_CQE_F_NOTIF)) {
        /* the kernel let go of the payload: only now may it go */
        r->zc_notifications++;
        if ((unsigned)res & IORING_NOTIF_USAGE_ZC_COPIED) {
            r->zc_copied++;
            if (++d->copied_streak >= ZC_COPIED_STREAK_LIMIT && d->zc && !d->zc_forced) {
                d->zc = 0; /* this route copies anyway: stop paying for notifications */
                r->copy_fallback++;
            }
        } else {
            d->copied_streak = 0;
        }
        d->pinned -= op->pinned;
        unpin(r, op);
        op->armed = 0;
        r->inflight--;
        op_free(r, op);
        if (!d->closed)
            dgram_maybe_resume(d);
        pins_released(r);
        return;
    }
    /* the first (or only) CQE */
    int err = 0;
    /* close_now() forgot the queue's bytes already */
    Py_ssize_t len = d->closed ? 0 : dg_payload_len(op->obj);
    if (op->multi && (flags & IORING_CQE_F_MORE)) {
        op->notif = 1; /* the memory waits for the notification */
    } else {
        if (op->multi) {
            d->pinned -= op->pinned;
            unpin(r, op);
        }
        op->armed = 0;
        r->inflight--;
    }
    if (d->nsending)
        d->nsending--;
    if (res >= 0 || d->closed) {
        op->done = DG_FINISHED;
        d->queued -= len;
        if (res >= 0 && op->multi)
            r->zc_bytes += res;
    } else if (res == -EAGAIN || res == -ECANCELED ||
               (res == -ENOBUFS && ++op->arg <= DG_ENOBUFS_RETRIES) ||
               (op->multi && (res == -EOPNOTSUPP || res == -ENOMEM))) {
        /* nothing went: the same datagram again, in its place */
        r->dg_retries++;
        if (op->multi && (res == -EOPNOTSUPP || res == -ENOMEM)) {
            d->zc = 0; /* refused zero-copy (RLIMIT_MEMLOCK, the socket): copy from now on */
            r->copy_fallback++;
        } else if (res != -ECANCELED) {
            d->batch_eagain = 1;
        }
        if (op->notif) {
            /* this record waits for its notification: a new one goes in its place */
            ul_op *again = op_alloc(r, UL_DGRAM_SEND);
            if (!again) {
                PyErr_Clear();
                op->done = DG_FINISHED;
                d->queued -= len;
                err = ENOMEM;
            } else {
                again->obj = Py_NewRef(op->obj);
                zcbuf_lend(again->obj);
                again->sock = Py_NewRef((PyObject *)d);
                again->addr = op->addr;
                again->addrlen = op->addrlen;
                again->arg = op->arg; /* (the ENOBUFS retries so far) */
                again->done = DG_AGAIN;
                op->done = DG_FINISHED;
                /* its key takes the old one's place in the batch */
                for (uint32_t i = 0; i < d->nbatch; i++)
                    if (d->queue[d->qhead + i] == op_key(op)) {
                        d->queue[d->qhead + i] = op_key(again);
                        break;
                    }
            }
        } else {
            op->done = DG_AGAIN;
        }
    } else {
        /* an error for this datagram: reported, and the datagram dropped (asyncio) */
        op->done = DG_FINISHED;
        d->queued -= len;
        err = -res;
    }
    if (!op->armed && op->done == DG_FINISHED)
        op_free(r, op);
    op = NULL;
    if (d->closed) {
        if (d->nsending == 0)
            dgram_batch_done(d);
        return;
    }
    if (err)
        dgram_error_received(d, err, d->write_ctx); /* may close or abort (rule 1) */
    if (d->nsending || d->closed)
        return;
    /* the batch is over */
    dgram_batch_done(d);
    int eagain = d->batch_eagain;
    d->batch_eagain = 0;
    /* after a refusal, batches are sized to the buffer's room (in order, and only the
       head goes again after each POLLOUT) until the queue has drained */
    if (eagain)
        d->congested = 1;
    else if (d->qlen == 0)
        d->congested = 0;
    if (d->qlen && dgram_live(d)) {
        if (eagain && !d->write_waiting) {
            if (dgram_wait_writable(d) < 0)
                PyErr_WriteUnraisable(d->owner ? d->owner : (PyObject *)d);
        } else if (!eagain && dgram_mark_dirty(d) < 0) {
            PyErr_WriteUnraisable(d->owner ? d->owner : (PyObject *)d);
        }
    }
    dgram_maybe_resume(d);
    if (!d->closed)
        dgram_check_drained(d);
}

static void dgram_poll_complete(Ring *r, Datagram *d, ul_op *op, int res)
{
    op->armed = 0;
    r->inflight--;
    if (op_key(op) == d->poll_key)
        d->write_waiting = 0;
    op_free(r, op);
    if (d->qlen && dgram_live(d) && dgram_mark_dirty(d) < 0)
        PyErr_WriteUnraisable(d->owner ? d->owner : (PyObject *)d);
}

void dgram_complete(Ring *r, ul_op *op, int res, unsigned flags)
{
    Datagram *d = (Datagram *)Py_NewRef(op->sock); /* the record's reference goes with op_free */
    if (op->nopped)
        flags = 0;
    if (op->kind == UL_DGRAM_RECV)
        dgram_recv_complete(r, d, op, res, flags);
    else if (op->kind == UL_DGRAM_SEND)
        dgram_send_complete(r, d, op, res, flags);
    else
        dgram_poll_complete(r, d, op, res);
    Py_DECREF(d);
}

/* While the ring closes (rule 3): memory back, nothing resubmitted, nobody called. */
void dgram_retire(Ring *r, ul_op *op, int res, unsigned flags)
{
    Datagram *d = (Datagram *)op->sock;
    if (op->kind == UL_DGRAM_RECV) {
        if (op->multi && (flags & IORING_CQE_F_BUFFER) && r->dg_ring) {
            r->dg_bufs_out++;
            dg_recycle(r, flags >> IORING_CQE_BUFFER_SHIFT);
        }
        if (op->multi && (flags & IORING_CQE_F_MORE) && !op->nopped)
            return;
        if (op_key(op) == d->recv_key)
            d->recv_armed = 0;
    } else if (op->kind == UL_DGRAM_SEND) {
        if (op->multi && !op->nopped && !(flags & IORING_CQE_F_NOTIF) &&
            (flags & IORING_CQE_F_MORE)) {
            op->notif = 1;
            if (d->nsending)
                d->nsending--;
            return;
        }
        if (op->multi) {
            d->pinned -= op->pinned;
            unpin(r, op);
        }
        if (!op->notif && d->nsending)
            d->nsending--;
    } else if (op_key(op) == d->poll_key) {
        d->write_waiting = 0;
    }
    op->armed = 0;
    r->inflight--;
    op_free(r, op);
}

/* ------------------------------------------------------------ the iteration's batch */

void dgram_flush_dirty(Ring *r)
{
    PyObject **list = r->dg_dirty;
    uint32_t n = r->ndg_dirty, cap = r->capdg_dirty;
    r->dg_dirty = NULL;
    r->ndg_dirty = r->capdg_dirty = 0;
    for (uint32_t i = 0; i < n; i++) {
        Datagram *d = (Datagram *)list[i];
        d->dirty = 0;
        dgram_submit(d);
        Py_DECREF(d);
    }
    ul_list_give_back(&r->dg_dirty, &r->capdg_dirty, list, cap);
}

void dgram_drop_dirty(Ring *r)
{
    for (uint32_t i = 0; i < r->ndg_dirty; i++) {
        ((Datagram *)r->dg_dirty[i])->dirty = 0;
        Py_DECREF(r->dg_dirty[i]);
    }
    r->ndg_dirty = 0;
}

/* ------------------------------------------------------------ addresses */

/* Fill ss from a numeric address tuple of the socket's family. Returns 1 when done, 0
   when the host is not numeric (the transport resolves it), -1 with an exception. */
static int dgram_parse_inet(Datagram *d, PyObject *addr, struct sockaddr_storage *ss,
                            socklen_t *len)
{
    const char *fam = d->family == AF_INET ? "AF_INET" : "AF_INET6";
    if (!PyTuple_Check(addr)) {
        PyErr_Format(PyExc_TypeError, "sendto(): %s address must be tuple, not %.500s", fam,
                     Py_TYPE(addr)->tp_name);
        return -1;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(addr);
    if (d->family == AF_INET ? n != 2 : (n < 2 || n > 4)) {
        PyErr_Format(PyExc_TypeError, "sendto(): %s address must be a tuple of %s items", fam,
                     d->family == AF_INET ? "2" : "2 to 4");
        return -1;
    }
    PyObject *host = PyTuple_GET_ITEM(addr, 0);
    const char *h;
    if (PyUnicode_Check(host)) {
        if (!(h = PyUnicode_AsUTF8(host)))
            return -1;
    } else if (PyBytes_Check(host)) {
        h = PyBytes_AS_STRING(host);
    } else {
        return 0; /* bytearray and friends: socket.sendto() knows what to do */
    }
    long port = PyLong_AsLong(PyTuple_GET_ITEM(addr, 1));
    if (port == -1 && PyErr_Occurred())
        return -1;
    if (port < 0 || port > 65535) {
        PyErr_SetString(PyExc_OverflowError, "sendto(): port must be 0-65535.");
        return -1;
    }
    memset(ss, 0, sizeof(*ss));
    if (d->family == AF_INET) {
        struct sockaddr_in *a = (struct sockaddr_in *)ss;
        a->sin_family = AF_INET;
        a->sin_port = htons((uint16_t)port);
        if (h[0] == '\0')
            a->sin_addr.s_addr = htonl(INADDR_ANY);
        else if (strcmp(h, "<broadcast>") == 0)
            a->sin_addr.s_addr = htonl(INADDR_BROADCAST);
        else if (inet_pton(AF_INET, h, &a->sin_addr) != 1)
            return 0;
        *len = sizeof(*a);
        return 1;
    }
    struct sockaddr_in6 *a = (struct sockaddr_in6 *)ss;
    a->sin6_family = AF_INET6;
    a->sin6_port = htons((uint16_t)port);
    if (n > 2) {
        unsigned long flowinfo = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(addr, 2));
        if (flowinfo == (unsigned long)-1 && PyErr_Occurred())
            return -1;
        if (flowinfo > 0xfffff) {
            PyErr_SetString(PyExc_OverflowError, "sendto(): flowinfo must be 0-1048575.");
            return -1;
        }
        a->sin6_flowinfo = htonl((uint32_t)flowinfo);
    }
    if (n > 3) {
        unsigned long scope = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(addr, 3));
        if (scope == (unsigned long)-1 && PyErr_Occurred())
            return -1;
        a->sin6_scope_id = (uint32_t)scope;
    }
    if (h[0] == '\0')
        a->sin6_addr = in6addr_any;
    else if (strchr(h, '%') || inet_pton(AF_INET6, h, &a->sin6_addr) != 1)
        return 0; /* a scope name, or a host name */
    *len = sizeof(*a);
    return 1;
}

static int dgram_parse_unix(PyObject *addr, struct sockaddr_storage *ss, socklen_t *len)
{
    PyObject *path;
    if (PyUnicode_Check(addr)) {
        if (!PyUnicode_FSConverter(addr, &path))
            return -1;
    } else if (PyBytes_Check(addr)) {
        path = Py_NewRef(addr);
    } else {
        return 0; /* (bytearray, buffers): socket.sendto() converts them */
    }
    struct sockaddr_un *a = (struct sockaddr_un *)ss;
    Py_ssize_t n = PyBytes_GET_SIZE(path);
    if ((size_t)n > sizeof(a->sun_path)) {
        Py_DECREF(path);
        PyErr_SetString(PyExc_OSError, "AF_UNIX path too long");
        return -1;
    }
    memset(ss, 0, sizeof(*ss));
    a->sun_family = AF_UNIX;
    memcpy(a->sun_path, PyBytes_AS_STRING(path), n);
    *len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n);
    /* a path (not the abstract namespace) carries its terminating NUL */
    if (n > 0 && a->sun_path[0] != '\0' && (size_t)n < sizeof(a->sun_path))
        (*len)++;
    Py_DECREF(path);
    return 1;
}

/* addr -> sockaddr; hosts that are not numeric are resolved by the transport
   (socket.getaddrinfo, as socket.sendto() does). -1 with an exception. */
static int dgram_sockaddr(Datagram *d, PyObject *addr, struct sockaddr_storage *ss, socklen_t *len)
{
    int rc;
    if (d->family == AF_UNIX)
        rc = dgram_parse_unix(addr, ss, len);
    else if (d->family == AF_INET || d->family == AF_INET6)
        rc = dgram_parse_inet(d, addr, ss, len);
    else
        rc = 0;
    if (rc != 0)
        return rc;
    if (!d->owner) {
        PyErr_SetString(PyExc_RuntimeError, "the transport is closed");
        return -1;
    }
    /* the transport turns it into bytes of a struct sockaddr (see _sockaddr) */
    PyObject *raw = PyObject_CallMethodOneArg(d->owner, str_resolve, addr);
    if (!raw)
        return -1;
    if (!PyBytes_Check(raw) || PyBytes_GET_SIZE(raw) > (Py_ssize_t)sizeof(*ss) ||
        PyBytes_GET_SIZE(raw) < 2) {
        Py_DECREF(raw);
        PyErr_SetString(PyExc_RuntimeError, "bad address from _resolve");
        return -1;
    }
    memset(ss, 0, sizeof(*ss));
    memcpy(ss, PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw));
    *len = (socklen_t)PyBytes_GET_SIZE(raw);
    Py_DECREF(raw);
    return 1;
}

/* ------------------------------------------------------------ sendto */

/* One datagram into the queue. Returns 0 queued, 1 dropped or reported (no error),
   -1 with an exception for the caller. */
static int dgram_queue_one(Datagram *d, PyObject *data, PyObject *addr)
{
    Ring *r = d->ring;
    if (!(PyBytes_Check(data) || PyByteArray_Check(data) || PyMemoryView_Check(data) ||
          IS_ZCBUF(data))) {
        PyErr_Format(PyExc_TypeError, "data argument must be a bytes-like object, not '%.200s'",
                     Py_TYPE(data)->tp_name);
        return -1;
    }
    Py_ssize_t len;
    if (PyBytes_Check(data) || IS_ZCBUF(data)) {
        len = dg_payload_len(data);
    } else {
        Py_buffer view;
        if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
            return -1;
        len = view.len;
        PyBuffer_Release(&view);
    }
    if (len == 0 && !d->empty_sends)
        return 1; /* Python before 3.13 sends nothing for b'' */
    if (d->address && addr != Py_None) {
        int eq = PyObject_RichCompareBool(addr, d->address, Py_EQ);
        if (eq <= 0) {
            if (eq == 0)
                PyErr_Format(PyExc_ValueError, "Invalid address: must be None or %S", d->address);
            return -1;
        }
    }
    /* Everything that may run Python comes before the record exists, and the state is
       looked at after it (rule 1): a port's __index__, the transport's resolution of a
       host name, a buffer's __buffer__ may close the transport or the loop. */
    struct sockaddr_storage ss;
    socklen_t sslen = 0;
    int closing = d->closing || !d->owner;
    if (!closing && !d->connected && addr == d->last_source && d->last_source_len) {
        ss = d->last_source_raw; /* a reply to the last datagram's sender */
        sslen = d->last_source_len;
    } else if (!closing && !d->connected && dgram_sockaddr(d, addr, &ss, &sslen) < 0) {
        /* asyncio: an OSError goes to error_received(), anything else is fatal */
        PyObject *exc = ul_fetch_exception();
        if (!exc)
            return -1;
        if (PyErr_GivenExceptionMatches(exc, PyExc_OSError)) {
            PyObject *cb = dgram_callback(d, d->on_error, "error_received");
            PyObject *res = cb ? dgram_call(d, cb, &exc, 1, NULL) : NULL;
            Py_XDECREF(cb);
            Py_DECREF(exc);
            if (!res)
                return -1; /* raised out of sendto(), as asyncio's does */
            Py_DECREF(res);
            return 1;
        }
        if (!PyErr_GivenExceptionMatches(exc, PyExc_Exception)) {
            PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
            Py_DECREF(exc);
            return -1;
        }
        PyObject *args[2] = {exc, str_fatal_write_message};
        dgram_owner_call(d, str_fatal_error, args, 2, NULL);
        Py_DECREF(exc);
        return PyErr_Occurred() ? -1 : 1;
    }
    if ((d->family == AF_INET && len > DG_UDP4_MAX) || (d->family == AF_INET6 && len > DG_UDP6_MAX)) {
        if (closing || d->closing || !d->owner)
            goto dropped;
        /* what the kernel would refuse for sure is refused inside sendto(), as the
           send asyncio tries at once would be: error_received() before it returns */
        PyObject *exc = oserror_from(EMSGSIZE);
        if (!exc)
            return -1;
        PyObject *cb = dgram_callback(d, d->on_error, "error_received");
        PyObject *res = cb ? dgram_call(d, cb, &exc, 1, NULL) : NULL;
        Py_XDECREF(cb);
        Py_DECREF(exc);
        if (!res)
            return -1; /* raised out of sendto(), as asyncio's does */
        Py_DECREF(res);
        return 1;
    }
    PyObject *payload;
    if (PyBytes_CheckExact(data) || IS_ZCBUF(data)) {
        payload = Py_NewRef(data);
    } else {
        /* asyncio copies what it buffers: the caller may reuse its buffer now */
        Py_buffer view;
        if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
            return -1;
        payload = PyBytes_FromStringAndSize(view.buf, view.len < len ? view.len : len);
        PyBuffer_Release(&view);
        if (!payload)
            return -1;
        len = PyBytes_GET_SIZE(payload);
    }
    if (closing || d->closing || !d->owner) {
        Py_DECREF(payload);
        goto dropped;
    }
    if (!ring_live(r) || r->closing) {
        Py_DECREF(payload);
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_RuntimeError, "the event loop is closing");
        return -1;
    }
    /* from here on no Python runs until the record is queued */
    ul_op *op = op_alloc(r, UL_DGRAM_SEND);
    if (!op) {
        Py_DECREF(payload);
        return -1;
    }
    op->obj = payload;
    zcbuf_lend(payload); /* lent until the record is freed (op_free gives it back) */
    if (sslen) {
        op->addr = ss;
        op->addrlen = sslen;
    }
    if (dgram_mark_dirty(d) < 0 || queue_push(d, op_key(op)) < 0) {
        op_free(r, op);
        return -1;
    }
    op->sock = Py_NewRef((PyObject *)d);
    PyObject *old_ctx = NULL;
    if (d->queued == 0 && d->nsending == 0) {
        /* the transport was idle: its send-side callbacks run in a copy of this
           context, as asyncio's add_writer() at the sendto() that had to wait */
        PyObject *ctx = PyContext_CopyCurrent();
        if (ctx) {
            old_ctx = d->write_ctx;
            d->write_ctx = ctx;
        } else {
            PyErr_Clear();
        }
    }
    d->queued += len;
    Py_XDECREF(old_ctx); /* last: its finalizers may run Python */
    return 0;
dropped:
    /* as asyncio's connected transports after the end: dropped, counted, and logged
       from the fifth on */
    if (d->conn_lost >= LOG_THRESHOLD_FOR_CONNLOST_WRITES && dgram_warn_cb) {
        PyObject *res = PyObject_CallNoArgs(dgram_warn_cb);
        if (!res)
            return -1;
        Py_DECREF(res);
    }
    d->conn_lost++;
    return 1;
}

static PyObject *Datagram_sendto(Datagram *d, PyObject *const *args, Py_ssize_t nargs,
                                 PyObject *kwnames)
{
    /* sendto(data, addr=None), addr also by keyword, as asyncio's */
    PyObject *data = NULL, *addr = Py_None;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs + nkw < 1 || nargs + nkw > 2 || nargs > 2) {
        PyErr_Format(PyExc_TypeError, "sendto() takes 1 or 2 arguments (%zd given)", nargs + nkw);
        return NULL;
    }
    if (nargs >= 1)
        data = args[0];
    if (nargs == 2)
        addr = args[1];
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, i);
        PyObject *value = args[nargs + i];
        if (PyUnicode_CompareWithASCIIString(name, "data") == 0 && !data) {
            data = value;
        } else if (PyUnicode_CompareWithASCIIString(name, "addr") == 0 && nargs < 2) {
            addr = value;
        } else {
            PyErr_Format(PyExc_TypeError, "sendto() got an unexpected keyword argument '%U'",
                         name);
            return NULL;
        }
    }
    if (!data) {
        PyErr_SetString(PyExc_TypeError, "sendto() missing required argument 'data'");
        return NULL;
    }
    if (!dgram_initialised(d) || dgram_check_fork(d) < 0)
        return NULL;
    int rc = dgram_queue_one(d, data, addr);
    if (rc < 0)
        return NULL;
    if (rc == 0)
        dgram_maybe_pause(d);
    return ring_return(d->ring, Py_NewRef(Py_None));
}

static PyObject *Datagram_sendto_many(Datagram *d, PyObject *datagrams)
{
    if (!dgram_initialised(d) || dgram_check_fork(d) < 0)
        return NULL;
    PyObject *it = PyObject_GetIter(datagrams);
    if (!it)
        return NULL;
    PyObject *item;
    int queued = 0;
    while ((item = PyIter_Next(it))) {
        PyObject *data, *addr;
        if (PyTuple_Check(item) && PyTuple_GET_SIZE(item) == 2) {
            data = PyTuple_GET_ITEM(item, 0);
            addr = PyTuple_GET_ITEM(item, 1);
        } else {
            PyErr_Format(PyExc_TypeError,
                         "sendto_many() takes (data, addr) pairs, not %.200s",
                         Py_TYPE(item)->tp_name);
            Py_DECREF(item);
            break;
        }
        int rc = dgram_queue_one(d, data, addr);
        Py_DECREF(item);
        if (rc < 0)
            break;
        queued |= rc == 0;
    }
    Py_DECREF(it);
    if (queued) {
        /* flow control for what was queued, with the error (if any) set aside */
        PyObject *exc = PyErr_Occurred() ? ul_fetch_exception() : NULL;
        dgram_maybe_pause(d);
        if (exc) {
            PyErr_Clear();
            PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
            Py_DECREF(exc);
        }
    }
    if (PyErr_Occurred())
        return NULL;
    return ring_return(d->ring, Py_NewRef(Py_None));
}

/* ------------------------------------------------------------ the Python methods */

/* The protocol's callbacks, bound now. One it lacks (a duck-typed protocol) stays
   NULL and is looked up again at each call, whose AttributeError goes where asyncio's
   does (the loop's exception handler). */
static int dgram_bind_protocol(Datagram *d, PyObject *protocol)
{
    PyObject *on_datagram = PyObject_GetAttrString(protocol, "datagram_received");
    if (!on_datagram)
        PyErr_Clear();
    PyObject *on_error = PyObject_GetAttrString(protocol, "error_received");
    if (!on_error)
        PyErr_Clear();
    Py_XSETREF(d->on_datagram, on_datagram);
    Py_XSETREF(d->on_error, on_error);
    Py_XSETREF(d->protocol, Py_NewRef(protocol));
    return 0;
}

/* A strong reference to the protocol's callback (bound, or looked up now), or NULL
   with the lookup's error set. */
static PyObject *dgram_callback(Datagram *d, PyObject *bound, const char *name)
{
    if (bound)
        return Py_NewRef(bound);
    if (!d->protocol) {
        PyErr_SetString(PyExc_RuntimeError, "the transport has no protocol");
        return NULL;
    }
    return PyObject_GetAttrString(d->protocol, name);
}

static int Datagram_init(Datagram *d, PyObject *args, PyObject *kwds)
{
    Ring *ring;
    int fd, family, connected, zc_forced, empty_sends;
    PyObject *owner, *protocol, *address;
    Py_ssize_t zc_threshold;
    if (!PyArg_ParseTuple(args, "O!iiOOOpnpp:Datagram", &RingType, &ring, &fd, &family, &owner,
                          &protocol, &address, &connected, &zc_threshold, &zc_forced,
                          &empty_sends))
        return -1;
    if (d->ring) {
        PyErr_SetString(PyExc_RuntimeError, "Datagram is already initialised");
        return -1;
    }
    d->ring = (Ring *)Py_NewRef((PyObject *)ring);
    d->fd = fd;
    d->family = family;
    d->owner = Py_NewRef(owner);
    d->address = address == Py_None ? NULL : Py_NewRef(address);
    d->connected = (uint8_t)connected;
    d->zc_threshold = zc_threshold;
    d->zc = zc_threshold >= 0 && family != AF_UNIX;
    d->zc_forced = (uint8_t)zc_forced;
    d->empty_sends = (uint8_t)empty_sends;
    d->high = 64 * 1024;
    d->low = 16 * 1024;
    return dgram_bind_protocol(d, protocol);
}

static PyObject *Datagram_start_reading(Datagram *d, PyObject *unused)
{
    if (!dgram_initialised(d))
        return NULL;
    if (dgram_check_fork(d) < 0)
        return NULL;
    if (d->closed || d->read_closed)
        Py_RETURN_NONE;
    PyObject *ctx = PyContext_CopyCurrent(); /* what asyncio's add_reader() captures */
    if (!ctx)
        return NULL;
    Py_XSETREF(d->read_ctx, ctx);
    d->reading = 1;
    /* what came in while paused first, in order; each call may pause or close again */
    while (d->held && d->reading && !d->closed && !d->read_closed) {
        if (PyList_GET_SIZE(d->held) == 0) {
            Py_CLEAR(d->held);
            break;
        }
        PyObject *pair = Py_NewRef(PyList_GET_ITEM(d->held, 0));
        if (PyList_SetSlice(d->held, 0, 1, NULL) < 0) {
            Py_DECREF(pair);
            return NULL;
        }
        if (PyList_GET_SIZE(d->held) == 0)
            Py_CLEAR(d->held);
        PyObject *data = Py_NewRef(PyTuple_GET_ITEM(pair, 0));
        PyObject *addr = Py_NewRef(PyTuple_GET_ITEM(pair, 1));
        Py_DECREF(pair);
        if (d->held) {
            /* (dgram_deliver holds anything behind held datagrams) */
            PyObject *rest = d->held;
            d->held = NULL;
            dgram_deliver_held(d, data, addr);
            if (d->held) { /* paused again: the new ones go behind the rest */
                if (PyList_SetSlice(rest, PyList_GET_SIZE(rest), PyList_GET_SIZE(rest), d->held) < 0)
                    PyErr_WriteUnraisable((PyObject *)d);
                Py_SETREF(d->held, rest);
            } else {
                d->held = rest;
            }
        } else {
            dgram_deliver_held(d, data, addr);
        }
    }
    if (d->reading && !d->held && dgram_arm_recv(d) < 0)
        return ring_return(d->ring, NULL);
    return ring_return(d->ring, Py_NewRef(Py_None));
}

static void dgram_cancel_key(Datagram *d, uint64_t key)
{
    ul_op *op = op_lookup(d->ring, key);
    if (op && op->armed && op_cancel(d->ring, op) < 0)
        PyErr_WriteUnraisable((PyObject *)d);
}

static PyObject *Datagram_pause_reading(Datagram *d, PyObject *unused)
{
    if (dgram_check_fork(d) < 0)
        return NULL;
    d->reading = 0;
    if (d->recv_armed && !d->closed)
        dgram_cancel_key(d, d->recv_key); /* what it still brings is held */
    Py_RETURN_NONE;
}

/* close(): no more reading, for good; the queue still goes out (notify_when_drained). */
static PyObject *Datagram_stop_reading(Datagram *d, PyObject *unused)
{
    if (!d->ring)
        Py_RETURN_NONE;
    d->read_closed = 1;
    d->reading = 0;
    Py_CLEAR(d->held);
    if (d->recv_armed && !d->closed && !ring_forked(d->ring))
        dgram_cancel_key(d, d->recv_key);
    Py_RETURN_NONE;
}

/* asyncio's _conn_lost: from now on sendto() only counts (the transport's
   _sendto_closed()). */
static PyObject *Datagram_set_conn_lost(Datagram *d, PyObject *unused)
{
    if (!d->closing)
        d->conn_lost++;
    d->closing = 1;
    Py_RETURN_NONE;
}

static PyObject *Datagram_set_warn_callback(PyObject *unused, PyObject *cb)
{
    Py_XSETREF(dgram_warn_cb, Py_NewRef(cb));
    Py_RETURN_NONE;
}

static PyObject *Datagram_notify_when_drained(Datagram *d, PyObject *unused)
{
    if (d->qlen == 0 && d->nsending == 0)
        Py_RETURN_FALSE;
    d->notify_drained = 1;
    Py_RETURN_TRUE;
}

/* abort()/the end: every request is cancelled, the queue dropped, the application's
   objects let go of. Records keep only their memory until their final CQEs. */
static PyObject *Datagram_close_now(Datagram *d, PyObject *unused)
{
    if (d->closed || !d->ring)
        Py_RETURN_NONE;
    d->closed = 1;
    if (!d->closing)
        d->conn_lost++;
    d->closing = 1;
    d->read_closed = 1;
    d->reading = 0;
    Ring *r = d->ring;
    int usable = !ring_forked(r) && !r->closed;
    if (usable) {
        if (d->recv_armed)
            dgram_cancel_key(d, d->recv_key);
        if (d->write_waiting)
            dgram_cancel_key(d, d->poll_key);
    }
    for (uint32_t i = 0; i < d->qlen; i++) {
        ul_op *op = op_lookup(r, d->queue[d->qhead + i]);
        if (!op)
            continue;
        if (op->armed) {
            if (usable && !op->notif && op_cancel(r, op) < 0)
                PyErr_WriteUnraisable((PyObject *)d);
        } else if (i >= d->nbatch || op->done == DG_AGAIN) {
            op_free(r, op); /* never reached the kernel (or came back): dropped */
        }
    }
    /* the batch's records stay the kernel's until their CQEs; forget the rest */
    d->qlen = d->nbatch;
    d->queued = 0;
    d->notify_drained = 0;
    /* (address stays: sendto() after the end still compares with it, as asyncio's) */
    PyObject *owner = d->owner, *a = d->on_datagram, *b = d->on_error, *c = d->read_ctx,
             *w = d->write_ctx, *h = d->held;
    d->owner = d->on_datagram = d->on_error = d->read_ctx = d->write_ctx = d->held = NULL;
    Py_CLEAR(d->protocol);
    Py_CLEAR(d->last_source);
    d->last_source_len = 0;
    Py_XDECREF(owner);
    Py_XDECREF(a);
    Py_XDECREF(b);
    Py_XDECREF(c);
    Py_XDECREF(w);
    Py_XDECREF(h);
    Py_RETURN_NONE;
}

static PyObject *Datagram_set_protocol(Datagram *d, PyObject *protocol)
{
    if (d->closed)
        Py_RETURN_NONE;
    if (dgram_bind_protocol(d, protocol) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Datagram_set_write_buffer_limits(Datagram *d, PyObject *args)
{
    Py_ssize_t high, low;
    if (!PyArg_ParseTuple(args, "nn:set_write_buffer_limits", &high, &low))
        return NULL;
    d->high = high;
    d->low = low;
    if (!d->closed && !d->closing) {
        dgram_maybe_pause(d);
        if (PyErr_Occurred())
            return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *Datagram_get_write_buffer_size(Datagram *d, PyObject *unused)
{
    return PyLong_FromSsize_t(d->queued + d->pinned);
}

static PyObject *Datagram_get_holding(Datagram *d, void *closure)
{
    return PyBool_FromLong(d->held != NULL && PyList_GET_SIZE(d->held) > 0);
}

static PyObject *Datagram_get_queue_empty(Datagram *d, void *closure)
{
    return PyBool_FromLong(d->qlen == 0 && d->nsending == 0);
}

static PyObject *Datagram_get_reading(Datagram *d, void *closure)
{
    return PyBool_FromLong(d->recv_armed);
}

static PyObject *Datagram_get_pinned(Datagram *d, void *closure)
{
    return PyLong_FromSsize_t(d->pinned);
}

static PyObject *Datagram_get_multishot(Datagram *d, void *closure)
{
    ul_op *op = d->recv_armed ? op_lookup(d->ring, d->recv_key) : NULL;
    return PyBool_FromLong(op && op->multi);
}

PyObject *Ring_datagram_stats(Ring *r, PyObject *unused)
{
    return Py_BuildValue("{sKsKsKsKsKsKsOsL}", "recv_enobufs", r->dg_recv_enobufs,
                         "recv_multishot_cqes", r->dg_recv_cqes, "received",
                         r->dg_received, "sends", r->dg_sends, "zc_sends", r->dg_zc_sends,
                         "send_retries", r->dg_retries, "buffer_ring",
                         r->dg_state > 0 ? Py_True : Py_False, "buffers_out", r->dg_bufs_out);
}

/* ------------------------------------------------------------ the type */

static int Datagram_traverse(Datagram *d, visitproc visit, void *arg)
{
    Py_VISIT(d->ring);
    Py_VISIT(d->owner);
    Py_VISIT(d->on_datagram);
    Py_VISIT(d->on_error);
    Py_VISIT(d->protocol);
    Py_VISIT(d->address);
    Py_VISIT(d->read_ctx);
    Py_VISIT(d->write_ctx);
    Py_VISIT(d->held);
    for (uint32_t k = 0; k < d->npend; k++) {
        Py_VISIT(d->pend[k].data);
        Py_VISIT(d->pend[k].addr);
    }
    return 0;
}

static int Datagram_clear(Datagram *d)
{
    Py_CLEAR(d->owner);
    Py_CLEAR(d->on_datagram);
    Py_CLEAR(d->on_error);
    Py_CLEAR(d->protocol);
    Py_CLEAR(d->last_source);
    Py_CLEAR(d->address);
    Py_CLEAR(d->read_ctx);
    Py_CLEAR(d->write_ctx);
    Py_CLEAR(d->held);
    dgram_pend_clear(d);
    return 0;
}

static void Datagram_dealloc(Datagram *d)
{
    PyObject_GC_UnTrack(d);
    /* no record is left (each holds the Datagram): what the queue names is gone */
    Datagram_clear(d);
    Py_CLEAR(d->rx_buf);
    PyMem_Free(d->queue);
    PyMem_Free(d->pend);
    Py_CLEAR(d->ring);
    Py_TYPE(d)->tp_free((PyObject *)d);
}

static PyMethodDef Datagram_methods[] = {
    {"sendto", (PyCFunction)(void (*)(void))Datagram_sendto, METH_FASTCALL | METH_KEYWORDS,
     "sendto(data, addr=None): queue one datagram for the end of this loop iteration"},
    {"sendto_many", (PyCFunction)Datagram_sendto_many, METH_O,
     "sendto_many(datagrams): queue (data, addr) pairs, in order, in one call"},
    {"start_reading", (PyCFunction)Datagram_start_reading, METH_NOARGS, NULL},
    {"pause_reading", (PyCFunction)Datagram_pause_reading, METH_NOARGS, NULL},
    {"stop_reading", (PyCFunction)Datagram_stop_reading, METH_NOARGS, NULL},
    {"set_conn_lost", (PyCFunction)Datagram_set_conn_lost, METH_NOARGS, NULL},
    {"notify_when_drained", (PyCFunction)Datagram_notify_when_drained, METH_NOARGS,
     "-> bool: True when the queue is not empty yet; the transport's _datagram_drained() "
     "follows once it is"},
    {"close_now", (PyCFunction)Datagram_close_now, METH_NOARGS, NULL},
    {"set_warn_callback", (PyCFunction)Datagram_set_warn_callback, METH_O | METH_STATIC,
     "the callable that logs a sendto() after the transport's end (asyncio's warning)"},
    {"set_protocol", (PyCFunction)Datagram_set_protocol, METH_O, NULL},
    {"set_write_buffer_limits", (PyCFunction)Datagram_set_write_buffer_limits, METH_VARARGS,
     NULL},
    {"get_write_buffer_size", (PyCFunction)Datagram_get_write_buffer_size, METH_NOARGS, NULL},
    {NULL},
};

static PyGetSetDef Datagram_getset[] = {
    {"holding", (getter)Datagram_get_holding, NULL, "datagrams received while paused"},
    {"queue_empty", (getter)Datagram_get_queue_empty, NULL, NULL},
    {"receiving", (getter)Datagram_get_reading, NULL, "a receive is in the kernel"},
    {"multishot", (getter)Datagram_get_multishot, NULL, "the receive in the kernel is multishot"},
    {"pinned", (getter)Datagram_get_pinned, NULL, "bytes SENDMSG_ZC still lends the kernel"},
    {NULL},
};

PyTypeObject DatagramType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "uringloop._dataplane.Datagram",
    .tp_basicsize = sizeof(Datagram),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Datagram(ring, fd, family, transport, protocol, address, connected, "
              "zc_threshold, zc_forced, empty_sends): the native half of a datagram transport",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Datagram_init,
    .tp_dealloc = (destructor)Datagram_dealloc,
    .tp_traverse = (traverseproc)Datagram_traverse,
    .tp_clear = (inquiry)Datagram_clear,
    .tp_methods = Datagram_methods,
    .tp_getset = Datagram_getset,
};

int dgram_ready_type(void)
{
#define INTERN(var, s)                                                                            \
    if (!(var = PyUnicode_InternFromString(s)))                                                   \
    return -1
    INTERN(str_datagram_drained, "_datagram_drained");
    INTERN(str_fatal_error, "_fatal_error");
    INTERN(str_resolve, "_sockaddr");
    INTERN(str_protocol_raised, "_protocol_raised");
    INTERN(str_fatal_write_message, "Fatal write error on datagram transport");
    INTERN(str_fatal_read_message, "Fatal read error on datagram transport");
#undef INTERN
    return PyType_Ready(&DatagramType);
}
