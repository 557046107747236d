/* uringloop data plane: the per-event path of the loop, in C.
 *
 * How the loop uses the ring
 * --------------------------
 * The Python side (the control plane, through cffi) sets up a `struct
 * io_uring` with the best flags the kernel accepts and hands its address to
 * `Ring`. From then on everything per event happens here:
 *
 * - Requests are prepared into the SQ as the program asks for them, but never
 *   submitted on their own: `Ring.wait(timeout)` submits everything prepared
 *   and waits for completions in a single io_uring_enter, with the timeout of
 *   the next timer (EXT_ARG, no timeout SQE). With DEFER_TASKRUN the kernel
 *   only runs completion work when we enter it to wait, which is exactly once
 *   per loop iteration.
 * - Completions are reaped in one batch, matched to their operation record by
 *   user_data, and turned into future results (or poll events for the
 *   readiness API) without running Python bytecode.
 * - A record, and the Python objects whose memory the kernel uses, stay alive
 *   until the request's final CQE (the one without IORING_CQE_F_MORE), even if
 *   the caller cancelled long ago. Cancelling only marks the record and asks
 *   the kernel to finish early.
 * - CQ overflow: rings are created with a CQ several times the SQ, and the
 *   kernel (FEAT_NODROP) keeps overflowed CQEs; when it flags an overflow we
 *   flush and reap again before returning.
 * - SINGLE_ISSUER/DEFER_TASKRUN bind the ring to one thread. The ring is
 *   created disabled (R_DISABLED) and enabled by the first wait(), so it is
 *   bound to the thread that runs the loop, not the one that built it.
 * - fork(): the child inherits the ring's memory and fd but must not submit
 *   (the parent's requests point into the parent's memory). An at-fork handler
 *   bumps a generation; every entry point refuses in the child.
 */
#include "dataplane.h"
#include <structmember.h>
#include "bufpool.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static unsigned long ul_fork_generation = 0;

static void ul_after_fork_child(void) { ul_fork_generation++; }

static PyObject *str_set_result, *str_set_exception, *str_done;

typedef struct {
    PyObject_HEAD
    struct io_uring *ring;
    PyObject *owner;     /* the cffi object owning the struct io_uring memory */
    PyObject *orphan_cb; /* called as orphan_cb(sock, bytes) for data a cancelled recv consumed */
    ul_op **ops;
    uint32_t nops, cap, free_head;
    uint32_t inflight;
    uint32_t *rearm;
    uint32_t nrearm, caprearm;
    PyObject *events; /* list of (fd, revents) gathered by the current wait() */
    unsigned long fork_generation;
    int enabled;
    int closed;
    int drained;
    /* stream transports with queued writes, flushed by the next wait() */
    PyObject **dirty;
    uint32_t ndirty, capdirty;
    int zc_supported;    /* SEND_ZC with usage reports (set by the loop after probing) */
    /* multishot stream receives from one provided buffer ring (see rx_setup) */
    int rx_allowed;      /* the kernel has multishot recv + buffer rings (set by the loop) */
    int rx_state;        /* 0 not set up yet, 1 ready, -1 unavailable: single-shot recv */
    struct io_uring_buf_ring *rx_ring;
    char *rx_arena;
    size_t rx_map_len;
    unsigned rx_nbufs, rx_bufsize;
    PyObject **rx_ready; /* streams with received data or an ended recv in this batch */
    uint32_t nrx_ready, caprx_ready;
    Py_ssize_t pinned_bytes;
    unsigned long long pinned_buffers;
    /* counters, exposed by stats() */
    unsigned long long n_enter, n_cqe, n_sqe, n_stray;
    unsigned long long zc_sends, zc_bytes, zc_notifications, zc_copied, copy_fallback;
    unsigned long long copy_sends, copy_bytes;
    unsigned long long rx_cqes, rx_deliveries, rx_enobufs;
    /* KeyboardInterrupt/SystemExit raised by a callback run from the batch: wait()
       raises it once the batch is done, so it escapes the loop as in asyncio */
    PyObject *escaping;
    /* loop.alloc_zerocopy_buffer(): the registered arena, made at the first call */
    PyObject *pool;          /* BufferPool, or NULL */
    Py_ssize_t pool_size;    /* bytes to try to register (set by the loop) */
    unsigned long long fixed_sends;
    /* the loop-wide bound on memory lent to the kernel by SEND_ZC; streams paused
       because of it wait here for notifications to bring the total back down */
    Py_ssize_t pinned_limit;
    Py_ssize_t stream_pinned_limit; /* the same bound per stream transport */
    PyObject **pin_waiters;
    uint32_t npin_waiters, cappin_waiters;
    /* large bytes objects nobody else references any more, for the next single-shot
       stream recv (see rx_spare_take) */
    PyObject *rx_spare[16];
    uint32_t nrx_spare;
    unsigned long long rx_spare_reuses;
} Ring;

/* The registered arena behind ZeroCopyBuffer objects (see "zero-copy buffers"). */
typedef struct {
    PyObject_HEAD
    struct bufpool arena; /* empty (base NULL) when nothing could be registered */
    int registered;       /* the arena is the ring's fixed buffer 0 */
    PyObject *loop;       /* makes the `released` futures */
    Py_ssize_t own_mappings; /* bytes of buffers that did not fit the arena */
} BufferPool;

typedef struct {
    PyObject_HEAD
    BufferPool *pool;
    char *base;
    Py_ssize_t len;
    uint8_t in_arena;
    Py_ssize_t lends;   /* requests (and queued writes) the memory is lent to */
    PyObject *released; /* future for the end of the current lend, made on demand */
} ZeroCopyBuffer;

static void rx_deliver_ready(Ring *r);
static void callback_failed(Ring *r, PyObject *where);

static void stream_complete(Ring *r, ul_op *op, int res, unsigned flags);
static void flush_dirty(Ring *r);

static PyTypeObject ZeroCopyBufferType;
static void zcbuf_lend(PyObject *obj);
static void zcbuf_unlend(PyObject *obj);
#define IS_ZCBUF(o) (Py_IS_TYPE((o), &ZeroCopyBufferType))
static void pins_released(Ring *r);

/* ---------------------------------------------------------------- records */

static inline uint64_t op_key(const ul_op *op) { return ((uint64_t)op->gen << 32) | op->slot; }

static ul_op *op_lookup(Ring *r, uint64_t key)
{
    uint32_t slot = (uint32_t)key;
    uint32_t gen = (uint32_t)(key >> 32);
    if (slot == 0 || slot >= r->nops)
        return NULL;
    ul_op *op = r->ops[slot];
    if (op->kind == UL_FREE || op->gen != gen)
        return NULL;
    return op;
}

/* Returns a zeroed record in state kind, or NULL with MemoryError set. */
static ul_op *op_alloc(Ring *r, enum ul_kind kind)
{
    ul_op *op;
    if (r->free_head != UL_NO_SLOT) {
        op = r->ops[r->free_head];
        r->free_head = op->next_free;
    } else {
        if (r->nops == r->cap) {
            uint32_t ncap = r->cap ? r->cap * 2 : 64;
            if (ncap > (1u << 30)) {
                PyErr_NoMemory();
                return NULL;
            }
            ul_op **n = PyMem_Realloc(r->ops, ncap * sizeof(*n));
            if (!n) {
                PyErr_NoMemory();
                return NULL;
            }
            r->ops = n;
            r->cap = ncap;
            if (r->nops == 0) {
                /* slot 0 is never handed out: user_data 0 means "ignore" */
                r->ops[0] = NULL;
                r->nops = 1;
            }
        }
        op = PyMem_Calloc(1, sizeof(*op));
        if (!op) {
            PyErr_NoMemory();
            return NULL;
        }
        op->slot = r->nops;
        op->gen = 1;
        r->ops[r->nops++] = op;
    }
    op->kind = kind;
    op->armed = op->cancelled = op->has_view = op->queued = 0;
    op->fd = -1;
    op->arg = 0;
    op->fut = op->obj = op->sock = NULL;
    op->views = NULL;
    op->iov = NULL;
    op->niov = op->iov_first = 0;
    op->notif = 0;
    op->done = 0;
    op->pinned = 0;
    op->addrlen = 0;
    op->next_free = UL_NO_SLOT;
    return op;
}

/* Bulk receives read into fresh 256 KiB bytes objects, and an echo-like protocol
 * sends each one back and drops it. Freed, such a block goes back to malloc, which
 * trims the heap and faults fresh pages in for the next one (a measured ~15% of a
 * 256 KiB echo's CPU), and the kernel's copy then lands in cold memory. So a large
 * exact bytes object that a finished request held as the last reference is kept
 * here and received into again: with no other reference nobody can observe it, and
 * its cached hash is reset before reuse. */
#define RX_SPARE_MIN (64 * 1024)

static int rx_spare_keep(Ring *r, PyObject *obj)
{
    if (!PyBytes_CheckExact(obj) || Py_REFCNT(obj) != 1 ||
        PyBytes_GET_SIZE(obj) < RX_SPARE_MIN || r->nrx_spare == sizeof(r->rx_spare) / sizeof(PyObject *))
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

/* Must only be called once the kernel no longer references the record (no final CQE pending). */
static void op_free(Ring *r, ul_op *op)
{
    if (op->has_view) {
        PyBuffer_Release(&op->view);
        op->has_view = 0;
    }
    if (op->views) {
        for (int i = 0; i < op->niov; i++)
            PyBuffer_Release(&op->views[i]);
        PyMem_Free(op->views);
        PyMem_Free(op->iov);
        op->views = NULL;
        op->iov = NULL;
        op->niov = 0;
    }
    if (op->obj && IS_ZCBUF(op->obj))
        zcbuf_unlend(op->obj); /* the request that borrowed it is over */
    else if (op->obj && rx_spare_keep(r, op->obj))
        op->obj = NULL;
    Py_CLEAR(op->fut);
    Py_CLEAR(op->obj);
    Py_CLEAR(op->sock);
    op->kind = UL_FREE;
    op->gen++;
    if (op->gen == 0)
        op->gen = 1;
    op->next_free = r->free_head;
    r->free_head = op->slot;
}

/* ------------------------------------------------------------ submission */

static int ring_usable(Ring *r)
{
    if (r->fork_generation != ul_fork_generation) {
        PyErr_SetString(PyExc_RuntimeError,
                        "this uringloop event loop was created in the parent process; a forked "
                        "child must create its own loop (asyncio.new_event_loop())");
        return 0;
    }
    if (r->closed) {
        PyErr_SetString(PyExc_RuntimeError, "the io_uring ring is closed");
        return 0;
    }
    return 1;
}

static int ring_enable(Ring *r)
{
    if (r->enabled)
        return 0;
    if (r->ring->flags & IORING_SETUP_R_DISABLED) {
        /* Debian's liburing 2.3 declares io_uring_enable_rings() but does not
           export it; the raw register call is in every 2.3 build. */
        int ret = io_uring_register(r->ring->ring_fd, IORING_REGISTER_ENABLE_RINGS, NULL, 0);
        if (ret < 0 && ret != -EBADFD) {
            errno = -ret;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
    }
    r->enabled = 1;
    return 0;
}

/* Returns an SQE to fill, flushing the SQ to the kernel when it is full. */
static struct io_uring_sqe *get_sqe(Ring *r)
{
    if (r->closed) {
        /* io_uring_queue_exit() unmapped the SQ: a late pause_reading() or cancel
           from a transport that outlived its loop must not touch it */
        PyErr_SetString(PyExc_RuntimeError, "the io_uring ring is closed");
        return NULL;
    }
    struct io_uring_sqe *sqe = io_uring_get_sqe(r->ring);
    if (sqe) {
        r->n_sqe++;
        return sqe;
    }
    /* More requests than SQ entries in one iteration: pass these on now. */
    if (ring_enable(r) < 0)
        return NULL;
    int ret = io_uring_submit(r->ring);
    r->n_enter++;
    if (ret < 0) {
        errno = -ret;
        PyErr_SetFromErrno(PyExc_OSError);
        return NULL;
    }
    sqe = io_uring_get_sqe(r->ring);
    if (!sqe) {
        errno = EBUSY;
        PyErr_SetFromErrno(PyExc_OSError);
        return NULL;
    }
    r->n_sqe++;
    return sqe;
}

static void op_armed(Ring *r, ul_op *op, struct io_uring_sqe *sqe)
{
    io_uring_sqe_set_data64(sqe, op_key(op));
    op->armed = 1;
    r->inflight++;
}

static int submit_cancel(Ring *r, ul_op *op)
{
    struct io_uring_sqe *sqe = get_sqe(r);
    if (!sqe)
        return -1;
    io_uring_prep_cancel64(sqe, op_key(op), 0);
    io_uring_sqe_set_data64(sqe, UL_IGNORE);
    return 0;
}

/* ------------------------------------------------------------ completion */

static PyObject *oserror_from(int err)
{
    return PyObject_CallFunction(PyExc_OSError, "is", err, strerror(err));
}

static int fut_is_done(PyObject *fut)
{
    PyObject *done = PyObject_CallMethodNoArgs(fut, str_done);
    if (!done) {
        PyErr_WriteUnraisable(fut);
        return 1;
    }
    int is_done = PyObject_IsTrue(done);
    Py_DECREF(done);
    return is_done;
}

/* Resolve fut with value (steals nothing). A done future (cancelled) is left alone. */
static void fut_resolve(PyObject *fut, PyObject *value, int is_exc)
{
    PyObject *res = PyObject_CallMethodOneArg(fut, is_exc ? str_set_exception : str_set_result, value);
    if (!res)
        PyErr_WriteUnraisable(fut);
    Py_XDECREF(res);
}

static void fut_fail(PyObject *fut, int err)
{
    PyObject *exc = oserror_from(err);
    if (!exc) {
        PyErr_WriteUnraisable(fut);
        return;
    }
    fut_resolve(fut, exc, 1);
    Py_DECREF(exc);
}

/* A request whose result is a byte count or other int: res < 0 fails fut with -res. */
static void fut_resolve_count(PyObject *fut, int res)
{
    if (res < 0) {
        fut_fail(fut, -res);
        return;
    }
    PyObject *n = PyLong_FromLong(res);
    if (n)
        fut_resolve(fut, n, 0);
    else
        PyErr_WriteUnraisable(fut);
    Py_XDECREF(n);
}

static PyObject *sockaddr_to_py(const struct sockaddr_storage *ss, socklen_t len)
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

static void complete_poll(Ring *r, ul_op *op, int res)
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
    if (r->nrearm == r->caprearm) {
        uint32_t ncap = r->caprearm ? r->caprearm * 2 : 64;
        uint32_t *n = PyMem_Realloc(r->rearm, ncap * sizeof(*n));
        if (!n) {
            PyErr_WriteUnraisable((PyObject *)r);
            return;
        }
        r->rearm = n;
        r->caprearm = ncap;
    }
    r->rearm[r->nrearm++] = op->slot;
    op->queued = 1;
}

static void orphan_data(Ring *r, ul_op *op, const char *data, Py_ssize_t n)
{
    /* A cancelled recv that raced with arriving data: the bytes left the
       socket, so hand them back to the loop for the next reader. */
    if (!r->orphan_cb || !op->sock)
        return;
    PyObject *res = PyObject_CallFunction(r->orphan_cb, "Oy#", op->sock, data, n);
    if (!res)
        PyErr_WriteUnraisable(r->orphan_cb);
    Py_XDECREF(res);
}

/* ------------------------------------------------------------ short sends
 *
 * A stream socket may take only part of a send. Every send record knows what it
 * still owes: a single buffer (view, with `done` bytes already out) or an iovec
 * array (views, from `iov_first`). The rest goes out from the same record.
 */

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

/* Submit what op still owes, keeping the record (and the memory it holds). */
static int send_rest(Ring *r, ul_op *op)
{
    struct io_uring_sqe *sqe = get_sqe(r);
    if (!sqe)
        return -1;
    if (op->views)
        prep_sendmsg_rest(op, sqe);
    else
        io_uring_prep_send(sqe, op->fd, (char *)op->view.buf + op->done,
                           op->view.len - op->done, MSG_NOSIGNAL);
    op_armed(r, op, sqe);
    return 0;
}

static void pin(Ring *r, ul_op *op, size_t len)
{
    op->pinned = len;
    r->pinned_bytes += len;
    r->pinned_buffers++;
}

static void unpin(Ring *r, ul_op *op)
{
    r->pinned_bytes -= op->pinned;
    r->pinned_buffers--;
    op->pinned = 0;
}

static void complete_op(Ring *r, ul_op *op, int res, unsigned flags)
{
    if (op->kind == UL_POLL) {
        complete_poll(r, op, res);
        return;
    }
    if (op->kind >= UL_STREAM_RECV) {
        stream_complete(r, op, res, flags);
        return;
    }
    if (op->kind == UL_ACCEPT_MULTI) {
        int more = (flags & IORING_CQE_F_MORE) != 0;
        if (op->cancelled) {
            if (res >= 0)
                close(res);
        } else if (res >= 0 || !more) {
            PyObject *out = PyObject_CallFunction(op->fut, "i", res);
            if (!out)
                callback_failed(r, op->fut);
            Py_XDECREF(out);
        }
        if (more)
            return;
        op->armed = 0;
        r->inflight--;
        if (!op->cancelled && res >= 0) {
            /* the kernel ended the multishot (CQ overflow, ...): keep accepting */
            struct io_uring_sqe *sqe = get_sqe(r);
            if (sqe) {
                io_uring_prep_multishot_accept(sqe, op->fd, NULL, NULL, SOCK_CLOEXEC);
                op_armed(r, op, sqe);
                return;
            }
            PyErr_WriteUnraisable(op->fut);
        }
        /* an error ended it: the callback got -errno and re-arms when it wants to */
        op_free(r, op);
        return;
    }
    if (op->kind == UL_SENDZC && !(flags & IORING_CQE_F_NOTIF)) {
        /* first CQE: remember the result; the memory is the kernel's until the notification */
        op->done = res < 0 ? 0 : (size_t)res;
        op->arg = res < 0 ? (unsigned)-res : 0;
        if (res > 0)
            r->zc_bytes += res;
        if (flags & IORING_CQE_F_MORE) {
            op->notif = 1;
            return;
        }
        unpin(r, op); /* no notification will follow */
        pins_released(r);
    } else if (op->kind == UL_SENDZC) {
        r->zc_notifications++;
        if ((unsigned)res & IORING_NOTIF_USAGE_ZC_COPIED)
            r->zc_copied++;
        unpin(r, op);
        pins_released(r);
    }
    op->armed = 0;
    r->inflight--;
    /* A future cancelled before its cancel reached the kernel counts as gone too:
       its data must not vanish into a done future. */
    int gone = op->cancelled || (op->fut && fut_is_done(op->fut));
    switch (op->kind) {
    case UL_RECV:
        if (res > 0 && gone) {
            orphan_data(r, op, PyBytes_AS_STRING(op->obj), res);
        } else if (!gone) {
            if (res < 0) {
                fut_fail(op->fut, -res);
            } else if (_PyBytes_Resize(&op->obj, res) < 0) {
                PyErr_WriteUnraisable(op->fut);
            } else {
                fut_resolve(op->fut, op->obj, 0);
            }
        }
        break;
    case UL_RECV_INTO:
        if (res > 0 && gone)
            orphan_data(r, op, op->view.buf, res);
        else if (!gone)
            fut_resolve_count(op->fut, res);
        break;
    case UL_SENDALL:
        if (gone)
            break;
        if (res < 0) {
            fut_fail(op->fut, -res);
            break;
        }
        if (send_advance(op, (size_t)res)) {
            if (send_rest(r, op) == 0)
                return;
            PyErr_WriteUnraisable(op->fut);
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
    (void)flags;
    op_free(r, op);
}

/* Reap every CQE available now; returns how many. */
static unsigned reap(Ring *r)
{
    unsigned total = 0;
    for (;;) {
        struct io_uring_cqe *cqe;
        unsigned head, n = 0;
        io_uring_for_each_cqe(r->ring, head, cqe)
        {
            n++;
            uint64_t key = cqe->user_data;
            if (key == UL_IGNORE || key == LIBURING_UDATA_TIMEOUT)
                continue;
            ul_op *op = op_lookup(r, key);
            if (!op) {
                r->n_stray++;
                continue;
            }
            /* Copy out before advancing: completing may submit and reap nothing
               else, but the CQE slot is only ours until cq_advance. */
            complete_op(r, op, cqe->res, cqe->flags);
        }
        io_uring_cq_advance(r->ring, n);
        total += n;
        if (r->nrx_ready)
            rx_deliver_ready(r); /* merged per stream, buffers back to the kernel */
        if (IO_URING_READ_ONCE(*r->ring->sq.kflags) & IORING_SQ_CQ_OVERFLOW) {
            /* the kernel holds more completions than fit the CQ: flush them in */
            io_uring_get_events(r->ring);
            r->n_enter++;
            continue;
        }
        if (n == 0)
            break;
    }
    r->n_cqe += total;
    return total;
}

static int rearm_polls(Ring *r)
{
    uint32_t i;
    for (i = 0; i < r->nrearm; i++) {
        ul_op *op = r->ops[r->rearm[i]];
        if (op->kind != UL_POLL || !op->queued)
            continue; /* unregistered since it fired */
        struct io_uring_sqe *sqe = get_sqe(r);
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

/* ------------------------------------------------------------ streams
 *
 * A Stream is the native half of a stream transport (TCP or Unix socket). It
 * owns the per-event path: receive completions become one bytes object and one
 * data_received() call (or buffer_updated() for a BufferedProtocol) with no
 * Python in between; write() appends to this iteration's batch, and the next
 * wait() flushes each stream's batch as one send. Only one send per socket is
 * in the kernel at a time, so bytes can never be reordered (two sends waiting
 * for socket space may complete out of order).
 *
 * Payloads: small writes are copied into a bytearray (asyncio promises that a
 * mutable buffer may be reused once write() returns, and the copy coalesces the
 * iteration's writes). An immutable bytes object at or above the zero-copy
 * threshold is queued as is and goes out with SEND_ZC: the kernel reads the
 * object's own memory, so the object stays referenced by its record until the
 * notification CQE (IORING_CQE_F_NOTIF). The stream itself moves on after the
 * first CQE; only the memory waits. A socket whose notifications keep saying
 * the kernel copied anyway (loopback, veth, AF_UNIX) switches to plain sends.
 *
 * Everything that is rare goes back to the Python transport (`owner`): EOF,
 * errors, flow-control crossings, and "the queue drained" when it asked.
 */


static PyObject *minus_one;

/* The exception being raised, normalized, with the error indicator cleared. */
static PyObject *PyErr_GetRaisedException_compat(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (value && tb)
        PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
#endif
}

static PyObject *_PyLong_GetMinusOne_compat(void) { return minus_one; }

static PyTypeObject RingType;
#define RingType_fwd RingType
#define STREAM_DIRECT_MIN (16 * 1024)
static int Stream_set_protocol_impl(void *s, PyObject *protocol, int buffered);

#define STREAM_RECV_SIZE (256 * 1024)
#define ZC_COPIED_STREAK_LIMIT 4

typedef struct {
    PyObject_HEAD
    Ring *ring;
    int fd;
    PyObject *owner;          /* the Python transport */
    PyObject *on_data;        /* protocol.data_received, or NULL for a BufferedProtocol */
    PyObject *get_buffer;     /* BufferedProtocol.get_buffer */
    PyObject *buffer_updated; /* BufferedProtocol.buffer_updated */
    PyObject *held;           /* bytes a recv brought in after pause_reading(), for resume */
    PyObject *wbuf;           /* bytearray: this iteration's small writes */
    PyObject *queue;          /* list of payloads waiting for their send, in order */
    Py_ssize_t queued;        /* bytes written and not yet accepted by the kernel */
    Py_ssize_t head_sent;     /* bytes of queue[0] a direct send already took (write_through) */
    Py_ssize_t pinned;        /* bytes the kernel may still read (SEND_ZC before notification) */
    Py_ssize_t high, low, pinned_high;
    Py_ssize_t zc_threshold;
    uint64_t recv_key;
    uint64_t send_key; /* the one send in flight (valid while send_armed) */
    uint8_t reading, recv_armed, send_armed, dirty, closed, eof, write_paused;
    uint8_t zc, zc_forced, copied_streak, notify_flushed;
    /* multishot receive: this batch's ring buffers, delivered together by rx_deliver_ready */
    uint8_t rx_multi, rx_ready, rx_ended, rx_bulk, rx_small_reads;
    uint8_t pin_waiting; /* on the ring's pin_waiters list */
    uint8_t sendfile_active; /* loop.sendfile() owns the socket's send side */
    int rx_res;   /* the ended recv's final result (0 EOF, -errno) */
    int held_end; /* while paused: 1 EOF, -errno an error, to report after the held data */
    struct rx_seg {
        uint32_t bid, len;
    } *segs;
    uint32_t nsegs, capsegs;
} Stream;

static PyObject *str_data_received, *str_get_buffer, *str_buffer_updated;
static PyObject *str_stream_eof, *str_stream_error, *str_stream_flushed, *str_protocol_error;
static PyObject *str_pause_protocol, *str_resume_protocol, *str_stream_unpinned;

/* A callback run from a batch raised: an Exception is reported; anything else
   (KeyboardInterrupt, SystemExit) must leave the loop, after the batch. */
static void callback_failed(Ring *r, PyObject *where)
{
    if (PyErr_ExceptionMatches(PyExc_Exception)) {
        PyErr_WriteUnraisable(where);
        return;
    }
    PyObject *exc = PyErr_GetRaisedException_compat();
    if (!r->escaping)
        r->escaping = exc;
    else
        Py_XDECREF(exc);
}

static void owner_call(Stream *s, PyObject *name, PyObject *arg)
{
    PyObject *res = arg ? PyObject_CallMethodOneArg(s->owner, name, arg)
                        : PyObject_CallMethodNoArgs(s->owner, name);
    if (!res)
        callback_failed(s->ring, s->owner);
    Py_XDECREF(res);
}

static void owner_error(Stream *s, int err)
{
    PyObject *exc = oserror_from(err);
    if (!exc) {
        PyErr_WriteUnraisable(s->owner);
        return;
    }
    owner_call(s, str_stream_error, exc);
    Py_DECREF(exc);
}

/* The protocol raised: hand the exception to the transport (it closes, like asyncio). */
static void protocol_raised(Stream *s)
{
    PyObject *exc = PyErr_GetRaisedException_compat();
    owner_call(s, str_protocol_error, exc);
    Py_XDECREF(exc);
}

/* ------------------------------------------------------------ receive
 *
 * A Protocol's stream reads with one multishot recv that picks buffers from a
 * ring shared by the whole loop (where the kernel has both; single-shot recv
 * into a fresh bytes object otherwise). A batch's CQEs for one connection are
 * only noted (buffer id, length); after the batch, rx_deliver_ready() copies
 * them into one bytes object, gives the buffers straight back to the kernel
 * and calls data_received() once. The ended recv's final result (EOF, error,
 * ENOBUFS when the ring ran dry, a cancel) is handled after the data it
 * followed, so nothing is lost or reordered. A BufferedProtocol reads with
 * single-shot recv straight into the buffer its get_buffer() returns.
 */

#define UL_RX_BGID 1
#define UL_RX_NBUFS 512
#define UL_RX_BUFSIZE (16 * 1024)

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

static int stream_cancel_key(Stream *s, uint64_t key);

static int rx_setup(Ring *r)
{
    if (r->rx_state)
        return r->rx_state > 0;
    r->rx_state = -1;
    if (!r->rx_allowed)
        return 0;
    long page = sysconf(_SC_PAGESIZE);
    size_t ring_len = UL_RX_NBUFS * sizeof(struct io_uring_buf);
    ring_len = (ring_len + page - 1) / page * page;
    size_t len = ring_len + (size_t)UL_RX_NBUFS * UL_RX_BUFSIZE;
    void *mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED)
        return 0;
    struct io_uring_buf_reg reg;
    memset(&reg, 0, sizeof(reg));
    reg.ring_addr = (uintptr_t)mem;
    reg.ring_entries = UL_RX_NBUFS;
    reg.bgid = UL_RX_BGID;
    if (io_uring_register_buf_ring(r->ring, &reg, 0) < 0) {
        munmap(mem, len);
        return 0;
    }
    r->rx_ring = mem;
    r->rx_arena = (char *)mem + ring_len;
    r->rx_map_len = len;
    r->rx_nbufs = UL_RX_NBUFS;
    r->rx_bufsize = UL_RX_BUFSIZE;
    io_uring_buf_ring_init(r->rx_ring);
    int mask = io_uring_buf_ring_mask(r->rx_nbufs);
    for (unsigned i = 0; i < r->rx_nbufs; i++)
        io_uring_buf_ring_add(r->rx_ring, r->rx_arena + (size_t)i * r->rx_bufsize, r->rx_bufsize,
                              i, mask, i);
    io_uring_buf_ring_advance(r->rx_ring, r->rx_nbufs);
    r->rx_state = 1;
    return 1;
}

/* Give the buffer ring back (only once no recv can pick from it any more). */
static void rx_teardown(Ring *r, int unregister)
{
    if (!r->rx_ring)
        return;
    if (unregister)
        io_uring_unregister_buf_ring(r->ring, UL_RX_BGID);
    munmap(r->rx_ring, r->rx_map_len);
    r->rx_ring = NULL;
    r->rx_arena = NULL;
}

static int stream_arm_recv(Stream *s)
{
    Ring *r = s->ring;
    if (!s->reading || s->recv_armed || s->closed)
        return 0;
    ul_op *op = op_alloc(r, UL_STREAM_RECV);
    if (!op)
        return -1;
    void *buf = NULL;
    size_t len = 0;
    int multi = !s->rx_bulk && s->on_data && rx_setup(r);
    if (multi) {
        op->arg = 1;
    } else if (s->on_data) {
        op->obj = rx_spare_take(r);
        if (!op->obj && !(op->obj = PyBytes_FromStringAndSize(NULL, STREAM_RECV_SIZE))) {
            op_free(r, op);
            return -1;
        }
        buf = PyBytes_AS_STRING(op->obj);
        len = (size_t)PyBytes_GET_SIZE(op->obj);
    } else {
        PyObject *target = PyObject_CallOneArg(s->get_buffer, _PyLong_GetMinusOne_compat());
        if (!target || PyObject_GetBuffer(target, &op->view, PyBUF_WRITABLE) < 0) {
            Py_XDECREF(target);
            op_free(r, op);
            return -1;
        }
        op->has_view = 1;
        op->obj = target;
        if (op->view.len == 0) {
            op_free(r, op);
            PyErr_SetString(PyExc_RuntimeError, "get_buffer() returned an empty buffer");
            return -1;
        }
        buf = op->view.buf;
        len = op->view.len;
    }
    struct io_uring_sqe *sqe = get_sqe(r);
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
    op_armed(r, op, sqe);
    s->recv_armed = 1;
    s->rx_multi = (uint8_t)multi;
    s->recv_key = op_key(op);
    return 0;
}

/* Hand data to a BufferedProtocol through its own buffers (data that was read
   before the protocol became a buffered one). */
static int feed_buffered(Stream *s, const char *p, Py_ssize_t n)
{
    while (n > 0 && s->get_buffer) {
        PyObject *size = PyLong_FromSsize_t(n);
        PyObject *target = size ? PyObject_CallOneArg(s->get_buffer, size) : NULL;
        Py_XDECREF(size);
        Py_buffer view;
        if (!target || PyObject_GetBuffer(target, &view, PyBUF_WRITABLE) < 0) {
            Py_XDECREF(target);
            return -1;
        }
        Py_DECREF(target);
        Py_ssize_t m = view.len < n ? view.len : n;
        if (m <= 0) {
            PyBuffer_Release(&view);
            PyErr_SetString(PyExc_RuntimeError, "get_buffer() returned an empty buffer");
            return -1;
        }
        memcpy(view.buf, p, m);
        PyBuffer_Release(&view);
        PyObject *count = PyLong_FromSsize_t(m);
        PyObject *res = count ? PyObject_CallOneArg(s->buffer_updated, count) : NULL;
        Py_XDECREF(count);
        if (!res)
            return -1;
        Py_DECREF(res);
        p += m;
        n -= m;
    }
    return 0;
}

/* Give data (a bytes object) to the protocol; on error the exception is set. */
static int stream_feed(Stream *s, PyObject *data)
{
    if (s->on_data) {
        PyObject *res = PyObject_CallOneArg(s->on_data, data);
        Py_XDECREF(res);
        return res ? 0 : -1;
    }
    return feed_buffered(s, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data));
}

/* Keep data read while paused for resume_reading(), after what is already held. */
static int stream_hold(Stream *s, PyObject *data)
{
    if (!s->held) {
        Py_INCREF(data);
        s->held = data;
        return 0;
    }
    PyObject *held = s->held;
    PyBytes_Concat(&held, data);
    s->held = held;
    return held ? 0 : -1;
}

/* The reading side ended with res (0 EOF, -errno): tell the transport, or keep
   it for resume_reading() when the protocol paused (it must see held data first). */
static void stream_read_end(Stream *s, int res)
{
    if (s->closed)
        return;
    if (!s->reading || s->held) {
        s->held_end = res == 0 ? 1 : res;
        return;
    }
    s->reading = 0;
    if (res == 0)
        owner_call(s, str_stream_eof, NULL);
    else
        owner_error(s, -res);
}

/* Deliver n bytes that landed in op's buffer (single-shot recv). */
static void stream_deliver(Stream *s, ul_op *op, int n)
{
    PyObject *res;
    if (!op->has_view) {
        if (_PyBytes_Resize(&op->obj, n) < 0) {
            protocol_raised(s);
            return;
        }
        if (!s->reading) {
            if (stream_hold(s, op->obj) < 0)
                protocol_raised(s);
            return;
        }
        if (stream_feed(s, op->obj) < 0)
            protocol_raised(s);
        return;
    }
    /* a BufferedProtocol's own buffer: it is the protocol's again once buffer_updated runs */
    PyBuffer_Release(&op->view);
    op->has_view = 0;
    if (!s->buffer_updated)
        return; /* the protocol changed to a plain one meanwhile; it reads from now on */
    PyObject *count = PyLong_FromLong(n);
    if (!count) {
        protocol_raised(s);
        return;
    }
    res = PyObject_CallOneArg(s->buffer_updated, count);
    Py_DECREF(count);
    if (!res)
        protocol_raised(s);
    Py_XDECREF(res);
}

static int rx_mark_ready(Ring *r, Stream *s)
{
    if (s->rx_ready)
        return 0;
    if (r->nrx_ready == r->caprx_ready) {
        uint32_t ncap = r->caprx_ready ? r->caprx_ready * 2 : 64;
        PyObject **n = PyMem_Realloc(r->rx_ready, ncap * sizeof(*n));
        if (!n)
            return -1;
        r->rx_ready = n;
        r->caprx_ready = ncap;
    }
    Py_INCREF(s);
    r->rx_ready[r->nrx_ready++] = (PyObject *)s;
    s->rx_ready = 1;
    return 0;
}

static void rx_recycle(Ring *r, uint32_t bid, int *count)
{
    io_uring_buf_ring_add(r->rx_ring, r->rx_arena + (size_t)bid * r->rx_bufsize, r->rx_bufsize,
                          bid, io_uring_buf_ring_mask(r->rx_nbufs), (*count)++);
}

static int stream_add_segment(Ring *r, Stream *s, uint32_t bid, int len)
{
    if (rx_mark_ready(r, s) < 0)
        return -1;
    if (s->nsegs == s->capsegs) {
        uint32_t ncap = s->capsegs ? s->capsegs * 2 : 8;
        struct rx_seg *n = PyMem_Realloc(s->segs, ncap * sizeof(*n));
        if (!n)
            return -1;
        s->segs = n;
        s->capsegs = ncap;
    }
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
        if (res <= 0 || s->closed || stream_add_segment(r, s, bid, res) < 0) {
            int c = 0;
            rx_recycle(r, bid, &c);
            io_uring_buf_ring_advance(r->rx_ring, c);
            if (res > 0 && !s->closed)
                owner_error(s, ENOMEM); /* data we cannot keep: the stream cannot go on intact */
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
    if (!s->closed) {
        if (rx_mark_ready(r, s) == 0) {
            s->rx_ended = 1;
            s->rx_res = res > 0 ? -EAGAIN : res; /* ended after data (CQ overflow): read on */
        } else {
            owner_error(s, ENOMEM);
        }
    }
    op_free(r, op);
}

/* Copy this batch's segments into bytes objects of at most rx_merge_max bytes
   (one unless a lot arrived), give every buffer back, then feed them in order. */
static void rx_deliver_one(Ring *r, Stream *s)
{
    PyObject *chunks[UL_RX_NBUFS];
    uint32_t nchunks = 0, i = 0, k;
    int failed = 0;
    Py_ssize_t batch = 0;
    s->rx_ready = 0;
    for (k = 0; k < s->nsegs; k++)
        batch += s->segs[k].len;
    if (batch >= RX_BULK && !s->rx_bulk && !s->closed) {
        /* streaming: read the rest with single-shot recv (the multishot ends with
           -ECANCELED and is re-armed as single-shot below) */
        s->rx_bulk = 1;
        s->rx_small_reads = 0;
        if (s->recv_armed && s->rx_multi && stream_cancel_key(s, s->recv_key) < 0)
            PyErr_WriteUnraisable(s->owner);
    }
    while (i < s->nsegs) {
        Py_ssize_t total = 0;
        uint32_t j = i;
        do {
            total += s->segs[j++].len;
        } while (j < s->nsegs && total + s->segs[j].len <= RX_MERGE_MAX);
        PyObject *data = NULL;
        if (!s->closed && !failed && !(data = PyBytes_FromStringAndSize(NULL, total)))
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
        int rc = 0;
        if (!s->closed && !failed)
            rc = s->reading && !s->held ? stream_feed(s, chunks[k]) : stream_hold(s, chunks[k]);
        Py_DECREF(chunks[k]);
        if (rc < 0)
            failed = 1;
    }
    if (failed && !s->closed) {
        protocol_raised(s); /* the protocol raised, or MemoryError: cannot go on intact */
        s->rx_ended = 0;
        return;
    }
    if (!s->rx_ended || s->closed) {
        s->rx_ended = 0;
        return;
    }
    s->rx_ended = 0;
    int res = s->rx_res;
    if (res == 0 || (res != -ENOBUFS && res != -ECANCELED && res != -EAGAIN)) {
        stream_read_end(s, res);
    } else if (stream_arm_recv(s) < 0) {
        protocol_raised(s);
    }
}

static void rx_deliver_ready(Ring *r)
{
    /* Take the list: a protocol callback may receive on other streams' behalf
       (nothing is reaped meanwhile, but arming may grow a new list). */
    PyObject **list = r->rx_ready;
    uint32_t n = r->nrx_ready, cap = r->caprx_ready;
    r->rx_ready = NULL;
    r->nrx_ready = r->caprx_ready = 0;
    for (uint32_t i = 0; i < n; i++) {
        Stream *s = (Stream *)list[i];
        rx_deliver_one(r, s);
        Py_DECREF(s);
    }
    if (r->rx_ready == NULL) {
        r->rx_ready = list;
        r->caprx_ready = cap;
    } else {
        PyMem_Free(list);
    }
}

/* Whether s holds memory lent to the kernel while the loop as a whole is over its bound. */
static int stream_over_loop_pinned(Stream *s)
{
    Ring *r = s->ring;
    return s->pinned > 0 && r->pinned_limit > 0 && r->pinned_bytes > r->pinned_limit;
}

static void stream_maybe_resume_writing(Stream *s)
{
    if (s->write_paused && s->queued <= s->low && s->pinned <= s->pinned_high &&
        !stream_over_loop_pinned(s)) {
        s->write_paused = 0;
        owner_call(s, str_resume_protocol, NULL);
    }
}

static void stream_maybe_pause_writing(Stream *s)
{
    if (s->write_paused)
        return;
    int loop_bound = stream_over_loop_pinned(s);
    if (s->queued > s->high || s->pinned > s->pinned_high || loop_bound) {
        if (loop_bound && !s->pin_waiting) {
            /* its own notifications may all be in before the loop's total drops */
            Ring *r = s->ring;
            if (r->npin_waiters == r->cappin_waiters) {
                uint32_t ncap = r->cappin_waiters ? r->cappin_waiters * 2 : 16;
                PyObject **n = PyMem_Realloc(r->pin_waiters, ncap * sizeof(*n));
                if (!n) {
                    PyErr_WriteUnraisable(s->owner);
                    return;
                }
                r->pin_waiters = n;
                r->cappin_waiters = ncap;
            }
            Py_INCREF(s);
            r->pin_waiters[r->npin_waiters++] = (PyObject *)s;
            s->pin_waiting = 1;
        }
        s->write_paused = 1;
        owner_call(s, str_pause_protocol, NULL);
    }
}

/* Memory came back from the kernel: streams paused on the loop-wide bound may go on. */
static void pins_released(Ring *r)
{
    if (!r->npin_waiters || (r->pinned_limit > 0 && r->pinned_bytes > r->pinned_limit))
        return;
    PyObject **list = r->pin_waiters;
    uint32_t n = r->npin_waiters;
    r->pin_waiters = NULL; /* resuming may pause and wait again: on a new list */
    r->npin_waiters = r->cappin_waiters = 0;
    for (uint32_t i = 0; i < n; i++) {
        Stream *s = (Stream *)list[i];
        s->pin_waiting = 0;
        if (!s->closed)
            stream_maybe_resume_writing(s);
        Py_DECREF(s);
    }
    PyMem_Free(list);
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

/* Drop the first n payloads from the queue; each gives back the lend write() took. */
static int queue_drop(Stream *s, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        zcbuf_unlend(PyList_GET_ITEM(s->queue, i));
    return PyList_SetSlice(s->queue, 0, n, NULL);
}

static void prep_send_zc_payload(Ring *r, struct io_uring_sqe *sqe, int fd, PyObject *payload,
                                 char *base, size_t len);

/* Put payload[offset:] into the kernel as one send. */
static int stream_submit(Stream *s, PyObject *payload, Py_ssize_t offset)
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
    struct io_uring_sqe *sqe = get_sqe(r);
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
    if (zc) {
        prep_send_zc_payload(r, sqe, s->fd, payload, base, total - offset);
        pin(r, op, total - offset);
        s->pinned += total - offset;
        r->zc_sends++;
    } else {
        io_uring_prep_send(sqe, s->fd, base, total - offset, MSG_NOSIGNAL);
        r->copy_sends++;
    }
    op_armed(r, op, sqe);
    s->send_armed = 1;
    s->send_key = op_key(op);
    return 0;
}

#define STREAM_MAX_IOV 64


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
    struct io_uring_sqe *sqe = get_sqe(r);
    if (!sqe) {
        op_free(r, op);
        return -1;
    }
    if (queue_drop(s, n) < 0) {
        io_uring_prep_nop(sqe);
        io_uring_sqe_set_data64(sqe, UL_IGNORE);
        op_free(r, op);
        return -1;
    }
    s->head_sent = 0;
    Py_INCREF(s);
    op->sock = (PyObject *)s;
    op->fd = s->fd;
    op->iov_first = 0;
    prep_sendmsg_rest(op, sqe);
    r->copy_sends++;
    op_armed(r, op, sqe);
    s->send_armed = 1;
    s->send_key = op_key(op);
    return 0;
}

/* Send the next queued payload, or report that the queue drained. */
static void stream_send_next(Stream *s)
{
    if (s->send_armed || s->closed)
        return;
    if (PyList_GET_SIZE(s->queue) == 0) {
        if (s->notify_flushed && !s->dirty && (!s->wbuf || PyByteArray_GET_SIZE(s->wbuf) == 0)) {
            s->notify_flushed = 0;
            owner_call(s, str_stream_flushed, NULL);
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
    if (nplain > 1) {
        if (stream_submit_vectored(s, nplain) < 0)
            PyErr_WriteUnraisable(s->owner);
        return;
    }
    /* submit before dropping it from the queue: a ZeroCopyBuffer stays lent throughout */
    if (stream_submit(s, PyList_GET_ITEM(s->queue, 0), s->head_sent) < 0 || queue_drop(s, 1) < 0)
        PyErr_WriteUnraisable(s->owner);
    s->head_sent = 0;
}

static void stream_complete(Ring *r, ul_op *op, int res, unsigned flags)
{
    Stream *s = (Stream *)op->sock;
    Py_INCREF(s); /* the record's reference goes with op_free */
    switch (op->kind) {
    case UL_STREAM_RECV:
        if (op->arg) {
            stream_recv_multishot(r, s, op, res, flags);
            Py_DECREF(s);
            return;
        }
        op->armed = 0;
        r->inflight--;
        if (op_key(op) == s->recv_key)
            s->recv_armed = 0;
        if (s->closed)
            break;
        if (res > 0) {
            if (res >= RX_SMALL)
                s->rx_small_reads = 0;
            else if (++s->rx_small_reads >= RX_SMALL_STREAK)
                s->rx_bulk = 0; /* not streaming (any more): back to multishot */
            /* data also comes with a cancel that lost the race to pause_reading():
               stream_deliver() keeps it for resume_reading() */
            stream_deliver(s, op, res);
        } else if (res != -ECANCELED) {
            stream_read_end(s, res);
            break;
        }
        op_free(r, op);
        /* reading, or resumed before the cancel completed: read on */
        if (s->reading && !s->closed && stream_arm_recv(s) < 0)
            protocol_raised(s);
        Py_DECREF(s);
        return;
    case UL_STREAM_SEND:
        op->armed = 0;
        r->inflight--;
        s->send_armed = 0;
        if (s->closed)
            break;
        if (res < 0) {
            owner_error(s, -res);
            break;
        }
        r->copy_bytes += res;
        s->queued -= res;
        if (send_advance(op, (size_t)res)) {
            /* short send: the rest goes next, from the same record */
            if (send_rest(r, op) < 0) {
                PyErr_WriteUnraisable(s->owner);
                break;
            }
            s->send_armed = 1;
            Py_DECREF(s);
            return;
        }
        op_free(r, op);
        stream_maybe_resume_writing(s);
        stream_send_next(s);
        Py_DECREF(s);
        return;
    case UL_STREAM_ZC:
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
            else if (s->pinned == 0 && s->owner)
                owner_call(s, str_stream_unpinned, NULL); /* the socket may close now */
            pins_released(r);
            Py_DECREF(s);
            return;
        }
        /* the first CQE: the stream may move on; the memory waits for the notification */
        s->send_armed = 0;
        if (!(flags & IORING_CQE_F_MORE)) {
            /* no notification will come (an error at prep): release now */
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
                if (res == -EOPNOTSUPP || res == -ENOMEM) {
                    /* AF_UNIX and friends refuse zero-copy (EOPNOTSUPP); RLIMIT_MEMLOCK
                       caps memory pinned for it (ENOMEM). Nothing of this request went
                       out: send it, and later ones, plainly. */
                    s->zc = 0;
                    r->copy_fallback++;
                    if (stream_submit(s, op->obj, op->done) < 0)
                        PyErr_WriteUnraisable(s->owner);
                } else {
                    owner_error(s, -res);
                }
            } else {
                r->zc_bytes += res;
                s->queued -= res;
                if ((Py_ssize_t)(op->done + res) < op->view.len) {
                    if (stream_submit(s, op->obj, op->done + res) < 0)
                        PyErr_WriteUnraisable(s->owner);
                } else {
                    stream_maybe_resume_writing(s);
                    stream_send_next(s);
                }
            }
        }
        if (!op->notif) {
            op_free(r, op);
            pins_released(r);
        }
        Py_DECREF(s);
        return;
    default:
        break;
    }
    op_free(r, op);
    Py_DECREF(s);
}

static void flush_dirty(Ring *r)
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
        if (!s->closed) {
            if (s->wbuf && PyByteArray_GET_SIZE(s->wbuf) > 0) {
                if (PyList_Append(s->queue, s->wbuf) < 0) {
                    PyErr_WriteUnraisable(s->owner);
                } else {
                    Py_CLEAR(s->wbuf); /* the queued bytearray is now the kernel's to read */
                }
            }
            stream_send_next(s);
        }
        Py_DECREF(s);
    }
    if (r->dirty == NULL) {
        r->dirty = list; /* keep the allocation */
        r->capdirty = cap;
    } else {
        PyMem_Free(list);
    }
}

static int stream_mark_dirty(Stream *s)
{
    Ring *r = s->ring;
    if (s->dirty)
        return 0;
    if (r->ndirty == r->capdirty) {
        uint32_t ncap = r->capdirty ? r->capdirty * 2 : 64;
        PyObject **n = PyMem_Realloc(r->dirty, ncap * sizeof(*n));
        if (!n) {
            PyErr_NoMemory();
            return -1;
        }
        r->dirty = n;
        r->capdirty = ncap;
    }
    Py_INCREF(s);
    r->dirty[r->ndirty++] = (PyObject *)s;
    s->dirty = 1;
    return 0;
}

/* Stream(ring, fd, owner, protocol, zc_threshold) */
static int Stream_init(Stream *s, PyObject *args, PyObject *kwds)
{
    PyObject *ring, *owner, *protocol;
    int fd;
    Py_ssize_t threshold;
    int buffered, forced = 0;
    if (!PyArg_ParseTuple(args, "O!iOOnp|p:Stream", &RingType_fwd, &ring, &fd, &owner, &protocol,
                          &threshold, &buffered, &forced))
        return -1;
    Py_INCREF(ring);
    Py_XSETREF(s->ring, (Ring *)ring);
    s->fd = fd;
    Py_INCREF(owner);
    Py_XSETREF(s->owner, owner);
    if (!s->queue && !(s->queue = PyList_New(0)))
        return -1;
    s->high = 64 * 1024;
    s->low = 16 * 1024;
    s->pinned_high = ((Ring *)ring)->stream_pinned_limit;
    s->zc_threshold = threshold;
    s->zc = threshold >= 0;
    s->zc_forced = forced; /* "always": keep SEND_ZC even where the kernel reports copies */
    return Stream_set_protocol_impl(s, protocol, buffered);
}

static int Stream_set_protocol_impl(void *self, PyObject *protocol, int buffered)
{
    Stream *s = self;
    Py_CLEAR(s->on_data);
    Py_CLEAR(s->get_buffer);
    Py_CLEAR(s->buffer_updated);
    if (buffered) {
        s->get_buffer = PyObject_GetAttr(protocol, str_get_buffer);
        s->buffer_updated = s->get_buffer ? PyObject_GetAttr(protocol, str_buffer_updated) : NULL;
        return s->buffer_updated ? 0 : -1;
    }
    s->on_data = PyObject_GetAttr(protocol, str_data_received);
    return s->on_data ? 0 : -1;
}

static PyObject *Stream_set_protocol(Stream *s, PyObject *args)
{
    PyObject *protocol;
    int buffered;
    if (!PyArg_ParseTuple(args, "Op:set_protocol", &protocol, &buffered))
        return NULL;
    if (Stream_set_protocol_impl(s, protocol, buffered) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* write() took the queue past the high-water mark while no send is in the kernel: do
 * what asyncio's (and uvloop's) write() does and offer the data to the socket now, with
 * one non-blocking sendmsg, so that pause_writing() comes only when the kernel really
 * does not take it. Waiting for the iteration's batched send instead would pause (and
 * make drain() wait) on every large write, which libraries written against asyncio do
 * not expect (websockets' legacy protocol asserts there is one drain at a time).
 * Small writes never get here: they stay batched on the ring. Payloads meant for
 * SEND_ZC are left to the ring; with nothing in flight, order is kept. */
static void stream_write_through(Stream *s)
{
    struct iovec iov[STREAM_MAX_IOV + 1];
    int n = 0;
    Py_ssize_t qlen = PyList_GET_SIZE(s->queue), i;
    if (s->closed || s->ring->closed)
        return;
    for (i = 0; i < qlen && n < STREAM_MAX_IOV; i++) {
        PyObject *p = PyList_GET_ITEM(s->queue, i);
        if (IS_ZCBUF(p) || stream_is_zc_payload(s, p, payload_size(p)))
            break;
        iov[n].iov_base = PyBytes_CheckExact(p) ? PyBytes_AS_STRING(p) : PyByteArray_AS_STRING(p);
        iov[n].iov_len = (size_t)payload_size(p);
        n++;
    }
    if (n == 0 && qlen > 0)
        return;
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
        return;
    struct msghdr msg;
    memset(&msg, 0, sizeof(msg));
    msg.msg_iov = iov;
    msg.msg_iovlen = (size_t)n;
    ssize_t sent = sendmsg(s->fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (sent <= 0)
        return; /* EAGAIN: the ring's send waits for room; an error surfaces there too */
    s->ring->copy_sends++;
    s->ring->copy_bytes += (unsigned long long)sent;
    s->queued -= sent;
    /* consume what went: whole queue entries, then the head's part, then the wbuf */
    Py_ssize_t left = sent, whole = 0;
    while (whole < PyList_GET_SIZE(s->queue) && whole < i) {
        Py_ssize_t rest = payload_size(PyList_GET_ITEM(s->queue, whole)) - s->head_sent;
        if (left < rest)
            break;
        left -= rest;
        s->head_sent = 0;
        whole++;
    }
    if (whole && queue_drop(s, whole) < 0) {
        PyErr_WriteUnraisable(s->owner);
        return;
    }
    if (whole < i) {
        s->head_sent += left;
    } else if (left > 0 && PySequence_DelSlice(s->wbuf, 0, left) < 0) {
        PyErr_WriteUnraisable(s->owner);
    }
}

static PyObject *Stream_write(Stream *s, PyObject *data)
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
        PyErr_SetString(PyExc_RuntimeError, "unable to write; sendfile is in progress");
        return NULL;
    }
    if (s->closed)
        Py_RETURN_NONE; /* the connection is gone; asyncio drops such writes too */
    Py_ssize_t len;
    if (PyBytes_CheckExact(data) || IS_ZCBUF(data)) {
        len = payload_size(data);
        if (len == 0)
            Py_RETURN_NONE;
        if (IS_ZCBUF(data) || len >= STREAM_DIRECT_MIN || (s->zc && len >= s->zc_threshold)) {
            /* immutable and large: sent from its own memory, after what is already batched */
            if (s->wbuf && PyByteArray_GET_SIZE(s->wbuf) > 0) {
                if (PyList_Append(s->queue, s->wbuf) < 0)
                    return NULL;
                Py_CLEAR(s->wbuf);
            }
            if (PyList_Append(s->queue, data) < 0)
                return NULL;
            zcbuf_lend(data); /* lent from now until the kernel lets go of it */
            goto queued;
        }
    }
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    len = view.len;
    if (len == 0) {
        PyBuffer_Release(&view);
        Py_RETURN_NONE;
    }
    if (!s->wbuf && !(s->wbuf = PyByteArray_FromStringAndSize(NULL, 0))) {
        PyBuffer_Release(&view);
        return NULL;
    }
    Py_ssize_t old = PyByteArray_GET_SIZE(s->wbuf);
    if (PyByteArray_Resize(s->wbuf, old + len) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    memcpy(PyByteArray_AS_STRING(s->wbuf) + old, view.buf, len);
    PyBuffer_Release(&view);
queued:
    s->queued += len;
    if (stream_mark_dirty(s) < 0)
        return NULL;
    if (s->queued > s->high && !s->send_armed)
        stream_write_through(s);
    stream_maybe_pause_writing(s);
    Py_RETURN_NONE;
}

static PyObject *Stream_start_reading(Stream *s, PyObject *unused)
{
    if (s->closed)
        Py_RETURN_NONE;
    s->reading = 1;
    if (s->held) {
        /* data a recv brought in while paused goes first */
        PyObject *held = s->held;
        s->held = NULL;
        int rc = stream_feed(s, held);
        Py_DECREF(held);
        if (rc < 0)
            return NULL;
        if (!s->reading || s->closed)
            Py_RETURN_NONE;
    }
    if (s->held_end) {
        int end = s->held_end;
        s->held_end = 0;
        stream_read_end(s, end == 1 ? 0 : end);
        Py_RETURN_NONE;
    }
    if (stream_arm_recv(s) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static int stream_cancel_key(Stream *s, uint64_t key)
{
    ul_op *op = op_lookup(s->ring, key);
    if (!op || op->cancelled || !op->armed || op->notif)
        return 0;
    op->cancelled = 1;
    return submit_cancel(s->ring, op);
}

static PyObject *Stream_pause_reading(Stream *s, PyObject *unused)
{
    s->reading = 0;
    if (s->recv_armed && !s->closed && stream_cancel_key(s, s->recv_key) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* notify_when_flushed(): owner._stream_flushed() runs once every queued byte is sent. */
static PyObject *Stream_notify_when_flushed(Stream *s, PyObject *unused)
{
    if (s->queued == 0 && !s->send_armed) {
        owner_call(s, str_stream_flushed, NULL);
        Py_RETURN_NONE;
    }
    s->notify_flushed = 1;
    Py_RETURN_NONE;
}

static PyObject *Stream_set_eof(Stream *s, PyObject *unused)
{
    s->eof = 1;
    Py_RETURN_NONE;
}

static PyObject *Stream_set_sendfile_active(Stream *s, PyObject *flag)
{
    int on = PyObject_IsTrue(flag);
    if (on < 0)
        return NULL;
    s->sendfile_active = (uint8_t)on;
    Py_RETURN_NONE;
}

/* close_now(): stop all I/O at once (abort, fatal error, after a graceful close).
   Requests in the kernel are cancelled; their records keep the memory they use
   until their final CQE (a SEND_ZC until its notification). */
static PyObject *Stream_close_now(Stream *s, PyObject *unused)
{
    if (s->closed)
        Py_RETURN_NONE;
    s->closed = 1;
    s->reading = 0;
    /* A stream has at most one recv and one send in the kernel; a SEND_ZC whose
       first CQE is in has nothing left to cancel and keeps its memory until the
       notification. */
    Ring *r = s->ring;
    if (!r->closed && r->fork_generation == ul_fork_generation) {
        if ((s->recv_armed && stream_cancel_key(s, s->recv_key) < 0) ||
            (s->send_armed && stream_cancel_key(s, s->send_key) < 0))
            return NULL;
    }
    Py_CLEAR(s->wbuf);
    Py_CLEAR(s->held);
    s->held_end = 0;
    if (queue_drop(s, PyList_GET_SIZE(s->queue)) < 0)
        return NULL;
    s->head_sent = 0;
    s->queued = 0;
    s->notify_flushed = 0;
    /* break the transport <-> protocol <-> stream cycle */
    Py_CLEAR(s->on_data);
    Py_CLEAR(s->get_buffer);
    Py_CLEAR(s->buffer_updated);
    Py_RETURN_NONE;
}

static PyObject *Stream_set_write_buffer_limits(Stream *s, PyObject *args)
{
    Py_ssize_t high, low;
    if (!PyArg_ParseTuple(args, "nn:set_write_buffer_limits", &high, &low))
        return NULL;
    s->high = high;
    s->low = low;
    stream_maybe_pause_writing(s);
    stream_maybe_resume_writing(s);
    Py_RETURN_NONE;
}

static PyObject *Stream_get_write_buffer_size(Stream *s, PyObject *unused)
{
    return PyLong_FromSsize_t(s->queued);
}

static PyObject *Stream_get_pinned(Stream *s, void *c) { return PyLong_FromSsize_t(s->pinned); }

static PyObject *Stream_get_zerocopy(Stream *s, void *c) { return PyBool_FromLong(s->zc && s->ring->zc_supported); }

static PyObject *Stream_get_reading(Stream *s, void *c) { return PyBool_FromLong(s->reading); }

static PyObject *Stream_get_holding(Stream *s, void *c)
{
    return PyBool_FromLong(s->held != NULL || s->held_end != 0);
}

static int Stream_traverse(Stream *s, visitproc visit, void *arg)
{
    Py_VISIT(s->ring);
    Py_VISIT(s->owner);
    Py_VISIT(s->on_data);
    Py_VISIT(s->get_buffer);
    Py_VISIT(s->buffer_updated);
    Py_VISIT(s->held);
    Py_VISIT(s->wbuf);
    Py_VISIT(s->queue);
    return 0;
}

static int Stream_clear(Stream *s)
{
    Py_CLEAR(s->owner);
    Py_CLEAR(s->on_data);
    Py_CLEAR(s->get_buffer);
    Py_CLEAR(s->buffer_updated);
    Py_CLEAR(s->held);
    Py_CLEAR(s->wbuf);
    Py_CLEAR(s->queue);
    return 0;
}

static void Stream_dealloc(Stream *s)
{
    /* Records in the kernel hold a reference to their stream, so a stream is only
       freed once none of its requests is outstanding. */
    PyObject_GC_UnTrack(s);
    Stream_clear(s);
    PyMem_Free(s->segs); /* a stream with segments is on the ready list, so none are left */
    Py_CLEAR(s->ring);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static PyMethodDef Stream_methods[] = {
    {"write", (PyCFunction)Stream_write, METH_O, "write(data): queue data for this iteration's send"},
    {"start_reading", (PyCFunction)Stream_start_reading, METH_NOARGS, NULL},
    {"pause_reading", (PyCFunction)Stream_pause_reading, METH_NOARGS, NULL},
    {"notify_when_flushed", (PyCFunction)Stream_notify_when_flushed, METH_NOARGS, NULL},
    {"set_eof", (PyCFunction)Stream_set_eof, METH_NOARGS, "refuse further writes"},
    {"set_sendfile_active", (PyCFunction)Stream_set_sendfile_active, METH_O,
     "while true, write() raises RuntimeError: loop.sendfile() owns the send side"},
    {"close_now", (PyCFunction)Stream_close_now, METH_NOARGS, NULL},
    {"set_protocol", (PyCFunction)Stream_set_protocol, METH_VARARGS, NULL},
    {"set_write_buffer_limits", (PyCFunction)Stream_set_write_buffer_limits, METH_VARARGS, NULL},
    {"get_write_buffer_size", (PyCFunction)Stream_get_write_buffer_size, METH_NOARGS, NULL},
    {NULL},
};

static PyGetSetDef Stream_getset[] = {
    {"pinned", (getter)Stream_get_pinned, NULL, "bytes the kernel may still read (SEND_ZC)"},
    {"zerocopy", (getter)Stream_get_zerocopy, NULL, "whether large writes go out with SEND_ZC"},
    {"reading", (getter)Stream_get_reading, NULL, NULL},
    {"holding", (getter)Stream_get_holding, NULL,
     "whether data or an EOF read while paused waits for start_reading()"},
    {NULL},
};

static PyTypeObject StreamType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "uringloop._dataplane.Stream",
    .tp_basicsize = sizeof(Stream),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Stream(ring, fd, owner, protocol, zc_threshold, buffered): native half of a "
              "stream transport (zc_threshold < 0 disables zero-copy)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Stream_init,
    .tp_dealloc = (destructor)Stream_dealloc,
    .tp_traverse = (traverseproc)Stream_traverse,
    .tp_clear = (inquiry)Stream_clear,
    .tp_methods = Stream_methods,
    .tp_getset = Stream_getset,
};

/* ------------------------------------------------------------ zero-copy buffers
 *
 * loop.alloc_zerocopy_buffer(size) hands out a ZeroCopyBuffer: writable memory
 * the application fills in place, carved from one arena registered with the
 * ring (io_uring_register_buffers, fixed buffer 0). Written to a transport, or
 * given to sock_sendzc(), it goes out with SEND_ZC on the fixed buffer: no copy,
 * and no per-request page pinning or memlock charge.
 *
 * From write() until the kernel's last completion for it, a buffer is *lent*:
 * new exports of it are read-only, and its `released` future resolves when the
 * last lend ends (the notification CQE of a SEND_ZC; the final CQE of a plain
 * send where the route copies anyway). Every request holding one takes a lend
 * when it takes the object and gives it back in op_free(), so a lend cannot
 * end before the kernel is done, whatever cancels or closes happen meanwhile.
 *
 * Every buffer references its BufferPool, and records in the kernel reference
 * their buffers: the arena is unmapped only once the ring is drained and the
 * last buffer (and memoryview of it) is gone. A buffer that does not fit the
 * arena, or any buffer when registration was refused (RLIMIT_MEMLOCK, EEXIST
 * from a foreign thread), gets its own mapping and a plain SEND_ZC.
 */

static PyTypeObject BufferPoolType;

#define ZC_POOL_MIN (64 * 1024)

static size_t page_round(size_t n)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    return (n + page - 1) / page * page;
}

/* The ring's pool, made (and registered) at the first call. */
static BufferPool *ring_pool(Ring *r, PyObject *loop)
{
    if (r->pool)
        return (BufferPool *)r->pool;
    BufferPool *p = PyObject_GC_New(BufferPool, &BufferPoolType);
    if (!p)
        return NULL;
    memset(&p->arena, 0, sizeof(p->arena));
    p->registered = 0;
    p->own_mappings = 0;
    Py_INCREF(loop);
    p->loop = loop;
    PyObject_GC_Track(p);
    /* Registration pins the arena and charges RLIMIT_MEMLOCK: halve on ENOMEM. */
    for (size_t size = (size_t)r->pool_size; size >= ZC_POOL_MIN; size /= 2) {
        if (bufpool_init(&p->arena, size) < 0)
            continue;
        struct iovec iov = {p->arena.base, p->arena.size};
        int ret = io_uring_register_buffers(r->ring, &iov, 1);
        if (ret == 0) {
            p->registered = 1;
            break;
        }
        bufpool_destroy(&p->arena);
        if (ret != -ENOMEM)
            break; /* not a size problem: every buffer gets its own mapping */
    }
    r->pool = (PyObject *)p;
    return p;
}

static void zcbuf_lend(PyObject *obj)
{
    if (IS_ZCBUF(obj))
        ((ZeroCopyBuffer *)obj)->lends++;
}

static void zcbuf_unlend(PyObject *obj)
{
    if (!IS_ZCBUF(obj))
        return;
    ZeroCopyBuffer *b = (ZeroCopyBuffer *)obj;
    if (--b->lends > 0 || !b->released)
        return;
    PyObject *fut = b->released;
    b->released = NULL;
    /* A closed loop (loop.close() drains the ring) cannot run the waiter anyway, and
       scheduling its callbacks would raise; a pool the garbage collector cleared has
       no loop left at all (this can run from a record freed during that collection). */
    if (!b->pool->loop) {
        Py_DECREF(fut);
        return;
    }
    PyObject *closed = PyObject_CallMethod(b->pool->loop, "is_closed", NULL);
    if (!closed) {
        PyErr_WriteUnraisable(obj);
    } else {
        if (closed == Py_False && !fut_is_done(fut))
            fut_resolve(fut, Py_None, 0);
        Py_DECREF(closed);
    }
    Py_DECREF(fut);
}

/* SEND_ZC of payload's memory at base: from the fixed buffer when it lies in this
   ring's registered arena. */
static void prep_send_zc_payload(Ring *r, struct io_uring_sqe *sqe, int fd, PyObject *payload,
                                 char *base, size_t len)
{
    if (IS_ZCBUF(payload)) {
        ZeroCopyBuffer *b = (ZeroCopyBuffer *)payload;
        /* the pool object, alive as long as its buffers, identifies the ring (an
           address of a freed ring could come back for another) */
        if (b->in_arena && b->pool->registered && (PyObject *)b->pool == r->pool &&
            bufpool_contains(&b->pool->arena, base, len)) {
            io_uring_prep_send_zc_fixed(sqe, fd, base, len, MSG_NOSIGNAL,
                                        IORING_SEND_ZC_REPORT_USAGE, 0);
            r->fixed_sends++;
            return;
        }
    }
    io_uring_prep_send_zc(sqe, fd, base, len, MSG_NOSIGNAL, IORING_SEND_ZC_REPORT_USAGE);
}

static int BufferPool_traverse(BufferPool *p, visitproc visit, void *arg)
{
    Py_VISIT(p->loop);
    return 0;
}

static int BufferPool_clear(BufferPool *p)
{
    Py_CLEAR(p->loop);
    return 0;
}

static void BufferPool_dealloc(BufferPool *p)
{
    /* No buffer is left (each holds the pool), so no request uses the arena. */
    PyObject_GC_UnTrack(p);
    Py_CLEAR(p->loop);
    bufpool_destroy(&p->arena);
    PyObject_GC_Del(p);
}

static PyTypeObject BufferPoolType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "uringloop._dataplane.BufferPool",
    .tp_basicsize = sizeof(BufferPool),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "the registered arena behind a loop's ZeroCopyBuffer objects",
    .tp_dealloc = (destructor)BufferPool_dealloc,
    .tp_traverse = (traverseproc)BufferPool_traverse,
    .tp_clear = (inquiry)BufferPool_clear,
};

/* Ring.alloc_zerocopy_buffer(size, loop) -> ZeroCopyBuffer */
static PyObject *Ring_alloc_zerocopy_buffer(Ring *r, PyObject *args)
{
    Py_ssize_t size;
    PyObject *loop;
    if (!PyArg_ParseTuple(args, "nO:alloc_zerocopy_buffer", &size, &loop))
        return NULL;
    if (size <= 0) {
        PyErr_SetString(PyExc_ValueError, "size must be a positive number of bytes");
        return NULL;
    }
    if (!ring_usable(r))
        return NULL;
    BufferPool *pool = ring_pool(r, loop);
    if (!pool)
        return NULL;
    ZeroCopyBuffer *b = PyObject_GC_New(ZeroCopyBuffer, &ZeroCopyBufferType);
    if (!b)
        return NULL;
    b->base = pool->arena.base ? bufpool_alloc(&pool->arena, (size_t)size) : NULL;
    b->in_arena = b->base != NULL;
    if (!b->base) {
        void *mem = mmap(NULL, page_round((size_t)size), PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (mem == MAP_FAILED) {
            PyObject_GC_Del(b);
            return PyErr_NoMemory();
        }
        b->base = mem;
        pool->own_mappings += (Py_ssize_t)page_round((size_t)size);
    }
    Py_INCREF(pool);
    b->pool = pool;
    b->len = size;
    b->lends = 0;
    b->released = NULL;
    PyObject_GC_Track(b);
    return (PyObject *)b;
}

static int ZeroCopyBuffer_getbuffer(ZeroCopyBuffer *b, Py_buffer *view, int flags)
{
    if (b->lends > 0 && (flags & PyBUF_WRITABLE)) {
        PyErr_SetString(PyExc_BufferError,
                        "this ZeroCopyBuffer is lent to the kernel for a send; await its "
                        "`released` future before writing to it");
        view->obj = NULL;
        return -1;
    }
    /* while lent, exports are read-only, so a memoryview taken now cannot write either */
    return PyBuffer_FillInfo(view, (PyObject *)b, b->base, b->len, b->lends > 0, flags);
}

static PyBufferProcs ZeroCopyBuffer_as_buffer = {
    .bf_getbuffer = (getbufferproc)ZeroCopyBuffer_getbuffer,
};

static Py_ssize_t ZeroCopyBuffer_length(ZeroCopyBuffer *b) { return b->len; }

static PySequenceMethods ZeroCopyBuffer_as_sequence = {
    .sq_length = (lenfunc)ZeroCopyBuffer_length,
};

static PyObject *ZeroCopyBuffer_get_released(ZeroCopyBuffer *b, void *c)
{
    if (b->lends > 0 && b->released) {
        Py_INCREF(b->released);
        return b->released;
    }
    if (!b->pool->loop) {
        PyErr_SetString(PyExc_RuntimeError, "the loop of this ZeroCopyBuffer is gone");
        return NULL;
    }
    PyObject *fut = PyObject_CallMethod(b->pool->loop, "create_future", NULL);
    if (!fut)
        return NULL;
    if (b->lends > 0) {
        Py_INCREF(fut);
        b->released = fut;
        return fut;
    }
    PyObject *res = PyObject_CallMethodOneArg(fut, str_set_result, Py_None);
    if (!res) {
        Py_DECREF(fut);
        return NULL;
    }
    Py_DECREF(res);
    return fut;
}

static PyObject *ZeroCopyBuffer_get_lent(ZeroCopyBuffer *b, void *c)
{
    return PyBool_FromLong(b->lends > 0);
}

static PyObject *ZeroCopyBuffer_get_registered(ZeroCopyBuffer *b, void *c)
{
    return PyBool_FromLong(b->in_arena && b->pool->registered);
}

static PyObject *ZeroCopyBuffer_repr(ZeroCopyBuffer *b)
{
    return PyUnicode_FromFormat("<ZeroCopyBuffer %zd bytes%s%s>", b->len,
                                b->in_arena && b->pool->registered ? " registered" : "",
                                b->lends > 0 ? " lent" : "");
}

static int ZeroCopyBuffer_traverse(ZeroCopyBuffer *b, visitproc visit, void *arg)
{
    Py_VISIT(b->released);
    Py_VISIT(b->pool);
    return 0;
}

static int ZeroCopyBuffer_clear(ZeroCopyBuffer *b)
{
    Py_CLEAR(b->released);
    return 0; /* the pool stays: dealloc gives the memory back to it */
}

static void ZeroCopyBuffer_dealloc(ZeroCopyBuffer *b)
{
    /* Requests hold a reference while lent, so nothing in the kernel uses the memory,
       and memoryviews hold one too, so nothing in Python does. */
    PyObject_GC_UnTrack(b);
    Py_CLEAR(b->released);
    BufferPool *pool = b->pool;
    if (b->in_arena) {
        bufpool_release(&pool->arena, b->base, (size_t)b->len);
    } else {
        munmap(b->base, page_round((size_t)b->len));
        pool->own_mappings -= (Py_ssize_t)page_round((size_t)b->len);
    }
    Py_DECREF(pool);
    PyObject_GC_Del(b);
}

static PyGetSetDef ZeroCopyBuffer_getset[] = {
    {"released", (getter)ZeroCopyBuffer_get_released, NULL,
     "a future that resolves once the kernel no longer reads this buffer (done at once when "
     "it is not lent)"},
    {"lent", (getter)ZeroCopyBuffer_get_lent, NULL,
     "True from write()/sock_sendzc() until the kernel's last completion for it"},
    {"registered", (getter)ZeroCopyBuffer_get_registered, NULL,
     "True when it lies in the ring's registered arena (sent with fixed-buffer SEND_ZC)"},
    {NULL},
};

static PyTypeObject ZeroCopyBufferType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "uringloop.ZeroCopyBuffer",
    .tp_basicsize = sizeof(ZeroCopyBuffer),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Writable memory for zero-copy sends, from loop.alloc_zerocopy_buffer(size).\n\n"
              "Fill it in place (memoryview(buf)[...] = ...), then transport.write(buf) or\n"
              "loop.sock_sendzc(sock, buf). It is lent to the kernel until `released` resolves;\n"
              "meanwhile new views of it are read-only. Its contents are undefined until\n"
              "written; its memory returns to the loop's pool when the object is collected.",
    .tp_repr = (reprfunc)ZeroCopyBuffer_repr,
    .tp_as_sequence = &ZeroCopyBuffer_as_sequence,
    .tp_as_buffer = &ZeroCopyBuffer_as_buffer,
    .tp_dealloc = (destructor)ZeroCopyBuffer_dealloc,
    .tp_traverse = (traverseproc)ZeroCopyBuffer_traverse,
    .tp_clear = (inquiry)ZeroCopyBuffer_clear,
    .tp_getset = ZeroCopyBuffer_getset,
};

/* ------------------------------------------------------------ Python API */

static int Ring_init(Ring *r, PyObject *args, PyObject *kwds)
{
    unsigned long long addr;
    PyObject *owner;
    if (!PyArg_ParseTuple(args, "KO:Ring", &addr, &owner))
        return -1;
    if (!addr) {
        PyErr_SetString(PyExc_ValueError, "null ring address");
        return -1;
    }
    r->ring = (struct io_uring *)(uintptr_t)addr;
    Py_INCREF(owner);
    Py_XSETREF(r->owner, owner);
    r->free_head = UL_NO_SLOT;
    r->fork_generation = ul_fork_generation;
    r->pool_size = 16 * 1024 * 1024;
    r->pinned_limit = 64 * 1024 * 1024;
    r->stream_pinned_limit = 4 * 1024 * 1024;
    if (!r->events && !(r->events = PyList_New(0)))
        return -1;
    return 0;
}

static int Ring_traverse(Ring *r, visitproc visit, void *arg)
{
    Py_VISIT(r->owner);
    Py_VISIT(r->orphan_cb);
    Py_VISIT(r->events);
    Py_VISIT(r->escaping);
    Py_VISIT(r->pool);
    for (uint32_t i = 0; i < r->npin_waiters; i++)
        Py_VISIT(r->pin_waiters[i]);
    for (uint32_t i = 1; i < r->nops; i++) {
        ul_op *op = r->ops[i];
        Py_VISIT(op->fut);
        Py_VISIT(op->obj);
        Py_VISIT(op->sock);
    }
    return 0;
}

static int Ring_clear_refs(Ring *r)
{
    /* Only the references the kernel cannot be using: the buffers of armed
       operations stay held until their final CQE (see Ring.close). */
    Py_CLEAR(r->orphan_cb);
    Py_CLEAR(r->events);
    Py_CLEAR(r->escaping);
    return 0;
}

static void Ring_dealloc(Ring *r)
{
    PyObject_GC_UnTrack(r);
    uint32_t i;
    if (r->inflight == 0 || r->drained || r->fork_generation != ul_fork_generation) {
        for (i = 1; i < r->nops; i++) {
            if (r->ops[i]->kind != UL_FREE)
                op_free(r, r->ops[i]);
            PyMem_Free(r->ops[i]);
        }
        PyMem_Free(r->ops);
        PyMem_Free(r->rearm);
        for (i = 0; i < r->ndirty; i++)
            Py_DECREF(r->dirty[i]);
        PyMem_Free(r->dirty);
        for (i = 0; i < r->nrx_ready; i++)
            Py_DECREF(r->rx_ready[i]);
        PyMem_Free(r->rx_ready);
        rx_teardown(r, 0);
        for (i = 0; i < r->npin_waiters; i++)
            Py_DECREF(r->pin_waiters[i]);
        PyMem_Free(r->pin_waiters);
        Py_CLEAR(r->pool); /* buffers still alive keep the arena */
        Py_CLEAR(r->owner);
    }
    /* else: the kernel may still write into buffers the records hold; leak
       them (and the ring memory in owner) rather than free memory in use. */
    while (r->nrx_spare)
        Py_DECREF(r->rx_spare[--r->nrx_spare]); /* no request holds a spare */
    Ring_clear_refs(r);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static PyObject *Ring_wait(Ring *r, PyObject *arg)
{
    struct __kernel_timespec ts, *tsp = NULL;
    struct io_uring_cqe *cqe;
    double timeout = -1.0;
    int ret;

    if (!ring_usable(r))
        return NULL;
    if (arg != Py_None) {
        timeout = PyFloat_AsDouble(arg);
        if (timeout == -1.0 && PyErr_Occurred())
            return NULL;
        if (timeout < 0)
            timeout = 0;
        ts.tv_sec = (long long)timeout;
        ts.tv_nsec = (long long)((timeout - (double)ts.tv_sec) * 1e9);
        tsp = &ts;
    }
    if (ring_enable(r) < 0)
        return NULL;
    if (rearm_polls(r) < 0)
        return NULL;
    flush_dirty(r);

    if (timeout == 0) {
        ret = io_uring_submit_and_get_events(r->ring);
    } else {
        Py_BEGIN_ALLOW_THREADS
        ret = io_uring_submit_and_wait_timeout(r->ring, &cqe, 1, tsp, NULL);
        Py_END_ALLOW_THREADS
    }
    r->n_enter++;
    if (ret < 0) {
        switch (-ret) {
        case ETIME:
        case EAGAIN:
        case EINTR:
        case EBUSY: /* CQ overflow pending: reaping below flushes it */
            break;
        case EEXIST:
            PyErr_SetString(PyExc_RuntimeError,
                            "this uringloop ring belongs to the thread that first ran the loop "
                            "(IORING_SETUP_SINGLE_ISSUER); run the loop in one thread, or set "
                            "URINGLOOP_SINGLE_ISSUER=0");
            return NULL;
        case EBADR:
            PyErr_WarnEx(PyExc_RuntimeWarning,
                         "io_uring dropped completions (EBADR): the CQ overflowed while the kernel "
                         "could not buffer them",
                         1);
            break;
        default:
            errno = -ret;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
    }
    reap(r);
    if (r->escaping) {
        PyObject *exc = r->escaping;
        r->escaping = NULL;
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
        return NULL;
    }
    if (ret == -EINTR && PyErr_CheckSignals() < 0)
        return NULL;
    if (PyList_GET_SIZE(r->events) == 0)
        Py_RETURN_NONE;
    PyObject *events = r->events;
    r->events = PyList_New(0);
    if (!r->events) {
        r->events = events;
        return NULL;
    }
    return events;
}

static PyObject *Ring_poll_add(Ring *r, PyObject *args)
{
    int fd;
    unsigned mask;
    if (!PyArg_ParseTuple(args, "iI:poll_add", &fd, &mask))
        return NULL;
    if (!ring_usable(r))
        return NULL;
    ul_op *op = op_alloc(r, UL_POLL);
    if (!op)
        return NULL;
    op->fd = fd;
    op->arg = mask;
    /* armed at the start of the next wait(), together with re-arms */
    if (r->nrearm == r->caprearm) {
        uint32_t ncap = r->caprearm ? r->caprearm * 2 : 64;
        uint32_t *n = PyMem_Realloc(r->rearm, ncap * sizeof(*n));
        if (!n) {
            op_free(r, op);
            return PyErr_NoMemory();
        }
        r->rearm = n;
        r->caprearm = ncap;
    }
    r->rearm[r->nrearm++] = op->slot;
    op->queued = 1;
    return PyLong_FromUnsignedLongLong(op_key(op));
}

static PyObject *Ring_poll_modify(Ring *r, PyObject *args)
{
    unsigned long long key;
    unsigned mask;
    if (!PyArg_ParseTuple(args, "KI:poll_modify", &key, &mask))
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
    op->cancelled = 1;
    if (submit_cancel(r, op) < 0)
        return NULL;
    PyObject *a = Py_BuildValue("(iI)", fd, mask);
    if (!a)
        return NULL;
    PyObject *res = Ring_poll_add(r, a);
    Py_DECREF(a);
    return res;
}

static PyObject *Ring_cancel(Ring *r, PyObject *arg)
{
    unsigned long long key = PyLong_AsUnsignedLongLong(arg);
    if (key == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    ul_op *op = op_lookup(r, key);
    if (!op || op->cancelled)
        Py_RETURN_FALSE;
    op->cancelled = 1;
    if (!op->armed) {
        op->queued = 0;
        op_free(r, op);
        Py_RETURN_TRUE;
    }
    if (r->fork_generation != ul_fork_generation || r->closed)
        Py_RETURN_TRUE;
    if (submit_cancel(r, op) < 0)
        return NULL;
    Py_RETURN_TRUE;
}

/* The common start of a request that holds a future (or callback): an SQE and a
   record for fd. Returns NULL with an exception set; the SQE then becomes a NOP. */
static ul_op *op_start(Ring *r, enum ul_kind kind, int fd, PyObject *fut,
                       struct io_uring_sqe **sqe_out)
{
    if (!ring_usable(r))
        return NULL;
    struct io_uring_sqe *sqe = get_sqe(r);
    if (!sqe)
        return NULL;
    ul_op *op = op_alloc(r, kind);
    if (!op) {
        io_uring_prep_nop(sqe);
        io_uring_sqe_set_data64(sqe, UL_IGNORE);
        return NULL;
    }
    op->fd = fd;
    Py_INCREF(fut);
    op->fut = fut;
    *sqe_out = sqe;
    return op;
}

static PyObject *Ring_recv(Ring *r, PyObject *args)
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
    PyObject *buf = PyBytes_FromStringAndSize(NULL, n);
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
    io_uring_prep_recv(sqe, fd, PyBytes_AS_STRING(buf), (size_t)n, 0);
    op_armed(r, op, sqe);
    return PyLong_FromUnsignedLongLong(op_key(op));
}

/* Common body of operations that hold a buffer of obj for their lifetime. */
static ul_op *buffer_op(Ring *r, enum ul_kind kind, int fd, PyObject *obj, PyObject *fut,
                        int writable, struct io_uring_sqe **sqe_out)
{
    if (!ring_usable(r))
        return NULL;
    ul_op *op = op_alloc(r, kind);
    if (!op)
        return NULL;
    if (PyObject_GetBuffer(obj, &op->view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) {
        op_free(r, op);
        if (writable && PyErr_ExceptionMatches(PyExc_BufferError)) {
            /* what socket.recv_into() raises for a read-only buffer */
            PyErr_Format(PyExc_TypeError, "recv_into() argument 1 must be read-write bytes-like object, not %.100s",
                         Py_TYPE(obj)->tp_name);
        }
        return NULL;
    }
    op->has_view = 1;
    struct io_uring_sqe *sqe = get_sqe(r);
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

static PyObject *Ring_recv_into(Ring *r, PyObject *args)
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
    io_uring_prep_recv(sqe, fd, op->view.buf, (size_t)n, 0);
    op_armed(r, op, sqe);
    return PyLong_FromUnsignedLongLong(op_key(op));
}

static PyObject *Ring_sendall(Ring *r, PyObject *args)
{
    int fd;
    PyObject *obj, *fut;
    struct io_uring_sqe *sqe;
    if (!PyArg_ParseTuple(args, "iOO:sendall", &fd, &obj, &fut))
        return NULL;
    ul_op *op = buffer_op(r, UL_SENDALL, fd, obj, fut, 0, &sqe);
    if (!op)
        return NULL;
    io_uring_prep_send(sqe, fd, op->view.buf, op->view.len, MSG_NOSIGNAL);
    op_armed(r, op, sqe);
    return PyLong_FromUnsignedLongLong(op_key(op));
}

/* accept_multishot(fd, callback) -> key: callback(fd) per connection, callback(-errno)
   when an error ends the request. Cancel with cancel(key). */
static PyObject *Ring_accept_multishot(Ring *r, PyObject *args)
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

/* send_zc(fd, data, fut[, offset]) -> key: one SEND_ZC of data[offset:]; fut gets the
   byte count at the notification. A ZeroCopyBuffer of this ring goes from the fixed buffer. */
static PyObject *Ring_send_zc(Ring *r, PyObject *args)
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
    size_t len = (size_t)(op->view.len - offset);
    prep_send_zc_payload(r, sqe, fd, obj, (char *)op->view.buf + offset, len);
    pin(r, op, len);
    r->zc_sends++;
    op_armed(r, op, sqe);
    return PyLong_FromUnsignedLongLong(op_key(op));
}

static PyObject *Ring_accept(Ring *r, PyObject *args)
{
    int fd;
    PyObject *fut;
    if (!PyArg_ParseTuple(args, "iO:accept", &fd, &fut))
        return NULL;
    struct io_uring_sqe *sqe;
    ul_op *op = op_start(r, UL_ACCEPT, fd, fut, &sqe);
    if (!op)
        return NULL;
    op->addrlen = sizeof(op->addr);
    io_uring_prep_accept(sqe, fd, (struct sockaddr *)&op->addr, &op->addrlen, SOCK_CLOEXEC);
    op_armed(r, op, sqe);
    return PyLong_FromUnsignedLongLong(op_key(op));
}

/* connect(fd, sockaddr_bytes, fut): the caller packs the address (the socket
   module already knows every family's layout; see _loop.py). */
/* The end of a UL_RESULT request: linked to the next one prepared if asked; its key. */
static PyObject *result_op_armed(Ring *r, ul_op *op, struct io_uring_sqe *sqe, int link)
{
    if (link)
        sqe->flags |= IOSQE_IO_LINK;
    op_armed(r, op, sqe);
    return PyLong_FromUnsignedLongLong(op_key(op));
}

/* splice(fd_in, off_in, fd_out, off_out, nbytes, flags, fut[, link]) -> key: one
   IORING_OP_SPLICE (offsets of -1 for pipes); fut gets the byte count. With link, the
   next request prepared starts only after this one moved all nbytes. */
static PyObject *Ring_splice(Ring *r, PyObject *args)
{
    int fd_in, fd_out, link = 0;
    long long off_in, off_out;
    unsigned int nbytes, flags;
    PyObject *fut;
    if (!PyArg_ParseTuple(args, "iLiLIIO|p:splice", &fd_in, &off_in, &fd_out, &off_out, &nbytes,
                          &flags, &fut, &link))
        return NULL;
    struct io_uring_sqe *sqe;
    ul_op *op = op_start(r, UL_RESULT, fd_out, fut, &sqe);
    if (!op)
        return NULL;
    io_uring_prep_splice(sqe, fd_in, (int64_t)off_in, fd_out, (int64_t)off_out, nbytes, flags);
    return result_op_armed(r, op, sqe, link);
}

/* poll_once(fd, mask, fut[, link]) -> key: one one-shot POLL_ADD; fut gets the
   revents. Unlike poll_add (the selector's), it is not re-armed. */
static PyObject *Ring_poll_once(Ring *r, PyObject *args)
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

static double now_monotonic(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* Requests the kernel still holds that point into memory we own (polls hold only an fd). */
static uint32_t memory_backed_inflight(Ring *r)
{
    uint32_t n = 0;
    for (uint32_t i = 1; i < r->nops; i++) {
        ul_op *op = r->ops[i];
        n += op->kind != UL_FREE && op->kind != UL_POLL && op->armed;
    }
    return n;
}

/* close(timeout) -> int: cancel everything, reap until the kernel returned it all
   or timeout seconds passed, and return how many memory-backed requests are still
   outstanding. 0 means the ring may be torn down and every record freed; otherwise
   the caller must keep this object (and so those buffers) alive for good. */
static PyObject *Ring_close(Ring *r, PyObject *arg)
{
    double limit = PyFloat_AsDouble(arg);
    if (limit == -1.0 && PyErr_Occurred())
        return NULL;
    if (r->closed)
        return PyLong_FromUnsignedLong(memory_backed_inflight(r));
    if (r->fork_generation != ul_fork_generation) {
        /* The child's copy of the records points at the child's copy of
           memory the kernel never sees: nothing to wait for. */
        r->closed = 1;
        r->drained = 1;
        return PyLong_FromLong(0);
    }
    uint32_t i;
    for (i = 1; i < r->nops; i++) {
        ul_op *op = r->ops[i];
        if (op->kind == UL_FREE)
            continue;
        if (!op->armed) {
            op->cancelled = 1;
            op->queued = 0;
            op_free(r, op);
        } else if (!op->cancelled) {
            op->cancelled = 1;
            if (submit_cancel(r, op) < 0)
                return NULL;
        }
    }
    r->nrearm = 0;
    if (ring_enable(r) < 0)
        return NULL;
    double deadline = now_monotonic() + limit;
    while (r->inflight) {
        struct __kernel_timespec ts = {0, 50 * 1000 * 1000};
        struct io_uring_cqe *cqe;
        int ret;
        Py_BEGIN_ALLOW_THREADS
        ret = io_uring_submit_and_wait_timeout(r->ring, &cqe, 1, &ts, NULL);
        Py_END_ALLOW_THREADS
        r->n_enter++;
        /* EEXIST: another thread owns this SINGLE_ISSUER ring; only it could reap. */
        if (ret < 0 && ret != -ETIME && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY)
            break;
        reap(r);
        if (now_monotonic() > deadline)
            break;
    }
    r->closed = 1;
    for (i = 0; i < r->ndirty; i++) {
        ((Stream *)r->dirty[i])->dirty = 0;
        Py_DECREF(r->dirty[i]);
    }
    r->ndirty = 0;
    uint32_t pinned = memory_backed_inflight(r);
    r->drained = pinned == 0;
    if (r->drained)
        rx_teardown(r, 1); /* no recv can pick from the buffer ring any more */
    return PyLong_FromUnsignedLong(pinned);
}

static PyObject *Ring_stats(Ring *r, PyObject *unused)
{
    uint32_t live = 0;
    for (uint32_t i = 1; i < r->nops; i++)
        live += r->ops[i]->kind != UL_FREE;
    return Py_BuildValue("{sKsKsKsKsIsIsKsKsKsOsK}", "enters", r->n_enter, "cqes", r->n_cqe,
                         "sqes", r->n_sqe, "stray_cqes", r->n_stray, "inflight", r->inflight,
                         "records", live, "recv_multishot_cqes", r->rx_cqes, "recv_deliveries",
                         r->rx_deliveries, "recv_enobufs", r->rx_enobufs, "recv_buffer_ring",
                         r->rx_state > 0 ? Py_True : Py_False, "recv_spare_reuses",
                         r->rx_spare_reuses);
}

static PyObject *Ring_zerocopy_stats(Ring *r, PyObject *unused)
{
    BufferPool *pool = (BufferPool *)r->pool;
    Py_ssize_t registered = pool && pool->registered ? (Py_ssize_t)pool->arena.size : 0;
    Py_ssize_t in_use = pool ? (Py_ssize_t)pool->arena.used + pool->own_mappings : 0;
    return Py_BuildValue("{sKsKsKsKsKsKsKsKsnsKsnsn}", "zc_sends", r->zc_sends, "zc_bytes",
                         r->zc_bytes, "zc_notifications", r->zc_notifications,
                         "zc_copied_notifications", r->zc_copied, "copy_fallback_sockets",
                         r->copy_fallback, "copy_sends", r->copy_sends, "copy_bytes", r->copy_bytes,
                         "pinned_buffers", r->pinned_buffers, "pinned_bytes", r->pinned_bytes,
                         "fixed_buffer_sends", r->fixed_sends, "registered_pool_bytes", registered,
                         "zerocopy_buffer_bytes", in_use);
}

static PyObject *Ring_get_rx_allowed(Ring *r, void *closure) { return PyBool_FromLong(r->rx_allowed); }

static int Ring_set_rx_allowed(Ring *r, PyObject *v, void *closure)
{
    int t = v ? PyObject_IsTrue(v) : -1;
    if (t < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "cannot delete recv_multishot");
        return -1;
    }
    r->rx_allowed = t;
    return 0;
}

static PyObject *Ring_get_zc_supported(Ring *r, void *closure) { return PyBool_FromLong(r->zc_supported); }

static int Ring_set_zc_supported(Ring *r, PyObject *v, void *closure)
{
    int t = PyObject_IsTrue(v);
    if (t < 0)
        return -1;
    r->zc_supported = t;
    return 0;
}

static PyObject *Ring_get_forked(Ring *r, void *closure)
{
    return PyBool_FromLong(r->fork_generation != ul_fork_generation);
}

static PyObject *Ring_get_closed(Ring *r, void *closure) { return PyBool_FromLong(r->closed); }

static PyObject *Ring_get_inflight(Ring *r, void *closure) { return PyLong_FromUnsignedLong(r->inflight); }

static PyObject *Ring_get_orphan_cb(Ring *r, void *closure)
{
    if (!r->orphan_cb)
        Py_RETURN_NONE;
    Py_INCREF(r->orphan_cb);
    return r->orphan_cb;
}

static int Ring_set_orphan_cb(Ring *r, PyObject *v, void *closure)
{
    if (v == Py_None)
        v = NULL;
    Py_XINCREF(v);
    Py_XSETREF(r->orphan_cb, v);
    return 0;
}

static PyMethodDef Ring_methods[] = {
    {"wait", (PyCFunction)Ring_wait, METH_O,
     "wait(timeout) -> list of (fd, revents) or None\n\nSubmit everything prepared, wait up to "
     "timeout seconds (None: until a completion) in one io_uring_enter, and dispatch the batch."},
    {"poll_add", (PyCFunction)Ring_poll_add, METH_VARARGS,
     "poll_add(fd, mask) -> key; level-triggered readiness reported by wait()"},
    {"poll_modify", (PyCFunction)Ring_poll_modify, METH_VARARGS,
     "poll_modify(key, mask) -> key (possibly a new one)"},
    {"cancel", (PyCFunction)Ring_cancel, METH_O,
     "cancel(key) -> bool; the record is kept until the kernel's final CQE"},
    {"recv", (PyCFunction)Ring_recv, METH_VARARGS, "recv(fd, n, fut[, sock]) -> key"},
    {"recv_into", (PyCFunction)Ring_recv_into, METH_VARARGS,
     "recv_into(fd, buf, n, fut[, sock]) -> key"},
    {"sendall", (PyCFunction)Ring_sendall, METH_VARARGS, "sendall(fd, data, fut) -> key"},
    {"accept", (PyCFunction)Ring_accept, METH_VARARGS, "accept(fd, fut) -> key"},
    {"accept_multishot", (PyCFunction)Ring_accept_multishot, METH_VARARGS,
     "accept_multishot(fd, callback) -> key; callback(fd) per connection, (-errno) on error"},
    {"send_zc", (PyCFunction)Ring_send_zc, METH_VARARGS,
     "send_zc(fd, data, fut[, offset]) -> key; fut gets the byte count once the kernel released "
     "data"},
    {"alloc_zerocopy_buffer", (PyCFunction)Ring_alloc_zerocopy_buffer, METH_VARARGS,
     "alloc_zerocopy_buffer(size, loop) -> ZeroCopyBuffer from the registered pool"},
    {"splice", (PyCFunction)Ring_splice, METH_VARARGS,
     "splice(fd_in, off_in, fd_out, off_out, nbytes, flags, fut[, link]) -> key"},
    {"poll_once", (PyCFunction)Ring_poll_once, METH_VARARGS,
     "poll_once(fd, mask, fut[, link]) -> key: fut gets the revents"},
    {"close", (PyCFunction)Ring_close, METH_O,
     "close(timeout) -> int: cancel everything, reap, and return how many memory-backed\n"
     "requests the kernel still holds (0: safe to tear down)"},
    {"stats", (PyCFunction)Ring_stats, METH_NOARGS, "counters of the data plane"},
    {"zerocopy_stats", (PyCFunction)Ring_zerocopy_stats, METH_NOARGS,
     "counters of the stream write path (zero-copy and copied sends, pinned memory)"},
    {NULL},
};

static PyGetSetDef Ring_getset[] = {
    {"forked", (getter)Ring_get_forked, NULL, "True in a child forked after the ring was made"},
    {"closed", (getter)Ring_get_closed, NULL, NULL},
    {"zc_supported", (getter)Ring_get_zc_supported, (setter)Ring_set_zc_supported,
     "whether stream transports may use SEND_ZC (set after probing)"},
    {"recv_multishot", (getter)Ring_get_rx_allowed, (setter)Ring_set_rx_allowed,
     "whether stream transports may read with multishot recv from a buffer ring (set after "
     "probing)"},
    {"inflight", (getter)Ring_get_inflight, NULL, "requests the kernel still owns"},
    {"orphan_callback", (getter)Ring_get_orphan_cb, (setter)Ring_set_orphan_cb,
     "orphan_callback(sock, data) receives data read by a recv that was cancelled meanwhile"},
    {NULL},
};

static PyMemberDef Ring_members[] = {
    {"pool_size", T_PYSSIZET, offsetof(Ring, pool_size), 0,
     "bytes of the registered arena for ZeroCopyBuffer objects (tried at the first allocation, "
     "halved while RLIMIT_MEMLOCK refuses it; 0: none)"},
    {"pinned_limit", T_PYSSIZET, offsetof(Ring, pinned_limit), 0,
     "bytes lent to the kernel by SEND_ZC in the whole loop above which transports holding "
     "some pause writing (0: no bound)"},
    {"stream_pinned_limit", T_PYSSIZET, offsetof(Ring, stream_pinned_limit), 0,
     "the same bound per stream transport, for transports made from now on"},
    {NULL},
};

static PyTypeObject RingType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "uringloop._dataplane.Ring",
    .tp_basicsize = sizeof(Ring),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Ring(address, owner): the data plane over a set-up struct io_uring",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Ring_init,
    .tp_dealloc = (destructor)Ring_dealloc,
    .tp_traverse = (traverseproc)Ring_traverse,
    .tp_clear = (inquiry)Ring_clear_refs,
    .tp_methods = Ring_methods,
    .tp_members = Ring_members,
    .tp_getset = Ring_getset,
};

static struct PyModuleDef dataplane_module = {
    PyModuleDef_HEAD_INIT, "uringloop._dataplane", "uringloop's per-event path over io_uring", -1,
};

PyMODINIT_FUNC PyInit__dataplane(void)
{
    if (PyType_Ready(&RingType) < 0)
        return NULL;
    str_set_result = PyUnicode_InternFromString("set_result");
    str_set_exception = PyUnicode_InternFromString("set_exception");
    str_done = PyUnicode_InternFromString("done");
    str_data_received = PyUnicode_InternFromString("data_received");
    str_get_buffer = PyUnicode_InternFromString("get_buffer");
    str_buffer_updated = PyUnicode_InternFromString("buffer_updated");
    str_stream_eof = PyUnicode_InternFromString("_stream_eof");
    str_stream_error = PyUnicode_InternFromString("_stream_error");
    str_stream_flushed = PyUnicode_InternFromString("_stream_flushed");
    str_protocol_error = PyUnicode_InternFromString("_protocol_error");
    str_pause_protocol = PyUnicode_InternFromString("_pause_protocol");
    str_resume_protocol = PyUnicode_InternFromString("_resume_protocol");
    str_stream_unpinned = PyUnicode_InternFromString("_stream_unpinned");
    minus_one = PyLong_FromLong(-1);
    if (!str_set_result || !str_set_exception || !str_done || !str_data_received ||
        !str_get_buffer || !str_buffer_updated || !str_stream_eof || !str_stream_error ||
        !str_stream_flushed || !str_protocol_error || !str_pause_protocol ||
        !str_resume_protocol || !str_stream_unpinned || !minus_one)
        return NULL;
    if (PyType_Ready(&StreamType) < 0 || PyType_Ready(&BufferPoolType) < 0 ||
        PyType_Ready(&ZeroCopyBufferType) < 0)
        return NULL;
    static int atfork_done = 0;
    if (!atfork_done) {
        pthread_atfork(NULL, NULL, ul_after_fork_child);
        atfork_done = 1;
    }
    PyObject *m = PyModule_Create(&dataplane_module);
    if (!m)
        return NULL;
    Py_INCREF(&RingType);
    if (PyModule_AddObject(m, "Ring", (PyObject *)&RingType) < 0) {
        Py_DECREF(&RingType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&StreamType);
    if (PyModule_AddObject(m, "Stream", (PyObject *)&StreamType) < 0) {
        Py_DECREF(&StreamType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&ZeroCopyBufferType);
    if (PyModule_AddObject(m, "ZeroCopyBuffer", (PyObject *)&ZeroCopyBufferType) < 0) {
        Py_DECREF(&ZeroCopyBufferType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
