/* The ring and its records: keys, the one SQE getter, cancel, reap and dispatch,
 * loop close, the fork guard, and Ring's Python methods.
 *
 * Some facts about io_uring this unit relies on
 * ---------------------------------------------
 * - The SQ ring, the SQE array and the CQ ring are memory shared with the kernel
 *   (mmap of the ring fd, MAP_SHARED). The kernel reads SQEs only inside
 *   io_uring_enter (we never use SQPOLL), so an SQE prepared and not yet submitted
 *   is ours to rewrite: that is how a cancel before submission becomes a NOP.
 * - Every SQE carries 64 bits of user_data, echoed in its CQEs. Ours are
 *   (generation << 32 | slot) of a record, so a CQE for a record that has since
 *   been freed and reused never matches the new occupant.
 * - A request completes with one CQE, except multishot requests (recv, accept:
 *   IORING_CQE_F_MORE on every CQE but the last) and SEND_ZC (a first CQE with
 *   F_MORE, then a notification with IORING_CQE_F_NOTIF). A record is done only at
 *   the CQE without F_MORE.
 * - A cancel (ASYNC_CANCEL by user_data) races the request: the request may still
 *   complete with its data, or with -ECANCELED; the cancel's own CQE says which
 *   (0, -ENOENT, -EALREADY) and is ignored. A pending request holds a reference
 *   to its file: closing the fd neither cancels it nor frees the socket.
 * - Under DEFER_TASKRUN completions are posted only when the task enters the kernel
 *   to wait, which wait() does once per loop iteration. With FEAT_NODROP the kernel
 *   keeps CQEs that do not fit the CQ and says so with IORING_SQ_CQ_OVERFLOW; they
 *   are flushed in by io_uring_get_events().
 * - After fork the child shares the SQ/CQ memory with the parent (rule 4 of
 *   dataplane.h): the child must neither prepare nor reap.
 */
#include "dataplane.h"

#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------ fault injection */

#ifdef UL_FAULT_INJECTION
/* URINGLOOP_FAULTS="sqe=N,submit=M,alloc=K": the Nth SQE request, Mth submission and
   Kth growth of a table fail (every Nth, M-th, K-th time). Read once per process. */
static unsigned long fault_every[UL_NFAULTS], fault_count[UL_NFAULTS];
static int fault_parsed, faults_off;

static void fault_parse(void)
{
    static const char *names[UL_NFAULTS] = {"sqe", "submit", "alloc"};
    const char *spec = getenv("URINGLOOP_FAULTS");
    fault_parsed = 1;
    if (!spec)
        return;
    for (int i = 0; i < UL_NFAULTS; i++) {
        const char *p = strstr(spec, names[i]);
        if (p && p[strlen(names[i])] == '=')
            fault_every[i] = strtoul(p + strlen(names[i]) + 1, NULL, 10);
    }
}

int ul_fault(enum ul_fault which)
{
    if (!fault_parsed)
        fault_parse();
    return !faults_off && fault_every[which] && ++fault_count[which] % fault_every[which] == 0;
}

void ul_faults_on(int on, unsigned long phase)
{
    faults_off = !on;
    for (int i = 0; i < UL_NFAULTS; i++)
        fault_count[i] = phase;
}
#else
void ul_faults_on(int on, unsigned long phase)
{
    (void)on;
    (void)phase;
}
#endif

void *ul_realloc(void *p, size_t n)
{
    if (ul_fault(UL_FAULT_ALLOC))
        return NULL;
    return PyMem_Realloc(p, n);
}

/* ------------------------------------------------------------ records */

ul_op *op_lookup(Ring *r, uint64_t key)
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
ul_op *op_alloc(Ring *r, enum ul_kind kind)
{
    ul_op *op;
    if (r->free_head != UL_NO_SLOT) {
        op = r->ops[r->free_head];
        r->free_head = op->next_free;
    } else {
        if (r->nops == r->cap) {
            uint32_t ncap = r->cap ? r->cap * 2 : 64;
            ul_op **n = ncap <= (1u << 30) ? ul_realloc(r->ops, ncap * sizeof(*n)) : NULL;
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
    op->armed = op->cancelled = op->nopped = op->cancel_sent = op->has_view = op->queued = 0;
    op->notif = op->multi = op->pin_held = op->cancel_tries = 0;
    op->fd = -1;
    op->arg = 0;
    op->proto_gen = 0;
    op->fut = op->obj = op->sock = NULL;
    op->views = NULL;
    op->iov = NULL;
    op->niov = op->iov_first = 0;
    op->done = 0;
    op->pinned = 0;
    op->addrlen = 0;
    op->sqe = NULL;
    op->sq_epoch = 0;
    op->next_free = UL_NO_SLOT;
    return op;
}

/* Drop a reference the record held: while closing into the graveyard (no finalizer
   may run inside the drain, rule 3), otherwise now. */
static void op_drop(Ring *r, PyObject **slot)
{
    PyObject *obj = *slot;
    if (!obj)
        return;
    *slot = NULL;
    if (r->closing && r->graveyard && PyList_Append(r->graveyard, obj) == 0) {
        Py_DECREF(obj); /* the graveyard holds it now */
        return;
    }
    Py_DECREF(obj);
}

void ring_bury(Ring *r, PyObject **slot)
{
    op_drop(r, slot);
}

void op_free(Ring *r, ul_op *op)
{
    if (op->has_view) {
        PyBuffer_Release(&op->view);
        op->has_view = 0;
    }
    if (op->views) {
        for (int i = 0; i < op->niov; i++)
            PyBuffer_Release(&op->views[i]);
        PyMem_Free(op->views);
        op->views = NULL;
        op->niov = 0;
    }
    PyMem_Free(op->iov); /* (also when the views could not be allocated) */
    op->iov = NULL;
    if (op->obj && IS_ZCBUF(op->obj))
        zcbuf_unlend(op->obj); /* the request that borrowed it is over */
    else if (op->obj && !r->closing && rx_spare_keep(r, op->obj))
        op->obj = NULL;
    op_drop(r, &op->fut);
    op_drop(r, &op->obj);
    op_drop(r, &op->sock);
    op->kind = UL_FREE;
    op->gen = (op->gen + 1) & 0x7fffffffu; /* below 2^31: see UL_CANCEL_BIT */
    if (op->gen == 0)
        op->gen = 1;
    op->next_free = r->free_head;
    r->free_head = op->slot;
}

/* ------------------------------------------------------------ provided buffer rings */

int buf_ring_map(Ring *r, unsigned nbufs, size_t bufsize, int bgid,
                 struct io_uring_buf_ring **ring_out, char **arena_out, size_t *len_out)
{
    long page = sysconf(_SC_PAGESIZE);
    size_t ring_len = nbufs * sizeof(struct io_uring_buf);
    ring_len = (ring_len + page - 1) / page * page;
    size_t len = ring_len + (size_t)nbufs * bufsize;
    void *mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED)
        return -1;
    struct io_uring_buf_reg reg;
    memset(&reg, 0, sizeof(reg));
    reg.ring_addr = (uintptr_t)mem;
    reg.ring_entries = nbufs;
    reg.bgid = (uint16_t)bgid;
    if (io_uring_register_buf_ring(r->ring, &reg, 0) < 0) {
        munmap(mem, len);
        return -1;
    }
    struct io_uring_buf_ring *br = mem;
    char *arena = (char *)mem + ring_len;
    io_uring_buf_ring_init(br);
    int mask = io_uring_buf_ring_mask(nbufs);
    for (unsigned i = 0; i < nbufs; i++)
        io_uring_buf_ring_add(br, arena + (size_t)i * bufsize, bufsize, i, mask, i);
    io_uring_buf_ring_advance(br, nbufs);
    *ring_out = br;
    *arena_out = arena;
    *len_out = len;
    return 0;
}

/* ------------------------------------------------------------ submission */

int ring_live(Ring *r)
{
    if (ring_forked(r)) {
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

int ring_enable(Ring *r)
{
    if (r->enabled)
        return 0;
    if (!ring_live(r))
        return -1;
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
    r->issuer_thread = PyThread_get_thread_ident();
    return 0;
}

/* Hand the prepared SQEs to the kernel without waiting. */
static int ring_submit(Ring *r, int may_fault)
{
    if (may_fault && ul_fault(UL_FAULT_SUBMIT))
        return -EAGAIN; /* as the kernel says when it cannot take requests now */
    r->sq_epoch++;
    r->n_enter++;
    return io_uring_submit(r->ring);
}

static struct io_uring_sqe *ring_sqe_any(Ring *r, int may_fault)
{
    if (!ring_live(r))
        return NULL;
    if (may_fault && ul_fault(UL_FAULT_SQE)) {
        errno = EBUSY;
        PyErr_SetFromErrno(PyExc_OSError);
        return NULL;
    }
    struct io_uring_sqe *sqe = io_uring_get_sqe(r->ring);
    if (!sqe) {
        /* More requests than SQ entries in one iteration: pass these on now. */
        int ret = ring_enable(r) < 0 ? -1 : ring_submit(r, may_fault);
        if (ret == -1 && PyErr_Occurred())
            return NULL;
        if (ret < 0) {
            errno = -ret;
            PyErr_SetFromErrno(PyExc_OSError);
            return NULL;
        }
        if (!(sqe = io_uring_get_sqe(r->ring))) {
            errno = EBUSY;
            PyErr_SetFromErrno(PyExc_OSError);
            return NULL;
        }
    }
    r->n_sqe++;
    return sqe;
}

struct io_uring_sqe *ring_sqe(Ring *r)
{
    if (r->closing && !r->closed && !ring_forked(r)) {
        PyErr_SetString(PyExc_RuntimeError, "the event loop is closing");
        return NULL;
    }
    return ring_sqe_any(r, 1);
}

void op_armed(Ring *r, ul_op *op, struct io_uring_sqe *sqe)
{
    io_uring_sqe_set_data64(sqe, op_key(op));
    op->armed = 1;
    op->sqe = sqe;
    op->sq_epoch = r->sq_epoch;
    r->inflight++;
}

int op_cancel(Ring *r, ul_op *op)
{
    op->cancelled = 1; /* the owner gave up, whether or not the kernel hears of it yet */
    if (!op->armed || op->cancel_sent || ring_forked(r) || r->closed)
        return 0;
    if (op->sq_epoch == r->sq_epoch && op->kind != UL_RESULT) {
        /* Still in the SQ: it never reaches the kernel. (UL_RESULT requests may be
           linked; a NOP would let the rest of the chain run.) */
        io_uring_prep_nop(op->sqe);
        io_uring_sqe_set_data64(op->sqe, op_key(op));
        op->nopped = op->cancel_sent = 1;
        r->n_nopped++;
        return 0;
    }
    /* cancels go through while closing, and are not failed by fault injection: they
       are what every recovery relies on */
    struct io_uring_sqe *sqe = ring_sqe_any(r, 0);
    if (!sqe)
        return -1; /* not sent: a later op_cancel (or Ring.close) tries again */
    io_uring_prep_cancel64(sqe, op_key(op), 0);
    io_uring_sqe_set_data64(sqe, op_key(op) | UL_CANCEL_BIT);
    op->cancel_sent = 1;
    op->cancel_tries++;
    return 0;
}

/* ------------------------------------------------------------ callbacks */

void callback_failed(Ring *r, PyObject *where)
{
    if (PyErr_ExceptionMatches(PyExc_Exception)) {
        PyErr_WriteUnraisable(where);
        return;
    }
    PyObject *exc = ul_fetch_exception();
    if (!r->escaping)
        r->escaping = exc;
    else
        Py_XDECREF(exc);
}

static PyObject *ring_take_escaping(Ring *r)
{
    PyObject *exc = r->escaping;
    r->escaping = NULL;
    PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
    Py_DECREF(exc);
    return NULL;
}

PyObject *ring_return(Ring *r, PyObject *result)
{
    if (r->escaping && r->batch_depth == 0) {
        Py_XDECREF(result);
        if (PyErr_Occurred())
            PyErr_Clear(); /* the interrupt wins */
        return ring_take_escaping(r);
    }
    return result;
}

PyObject *oserror_from(int err) { return PyObject_CallFunction(PyExc_OSError, "is", err, strerror(err)); }

int fut_is_done(PyObject *fut)
{
    PyObject *done = PyObject_CallMethodNoArgs(fut, str_done);
    if (!done) {
        PyErr_WriteUnraisable(fut);
        return 1;
    }
    int is_done = PyObject_IsTrue(done);
    Py_DECREF(done);
    if (is_done < 0) {
        PyErr_WriteUnraisable(fut);
        return 1; /* a future that cannot say: treated as gone */
    }
    return is_done;
}

/* Resolve fut with value (steals nothing). */
void fut_resolve(PyObject *fut, PyObject *value, int is_exc)
{
    PyObject *res =
        PyObject_CallMethodOneArg(fut, is_exc ? str_set_exception : str_set_result, value);
    if (!res)
        PyErr_WriteUnraisable(fut);
    Py_XDECREF(res);
}

void fut_fail(PyObject *fut, int err)
{
    PyObject *exc = oserror_from(err);
    if (!exc) {
        PyErr_WriteUnraisable(fut);
        return;
    }
    fut_resolve(fut, exc, 1);
    Py_DECREF(exc);
}

void fut_resolve_count(PyObject *fut, int res)
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

/* ------------------------------------------------------------ pinned memory */

void pin(Ring *r, ul_op *op, size_t len)
{
    op->pin_held = 1;
    op->pinned = len;
    r->pinned_bytes += len;
    r->pinned_buffers++;
}

void unpin(Ring *r, ul_op *op)
{
    if (!op->pin_held)
        return;
    r->pinned_bytes -= op->pinned;
    r->pinned_buffers--;
    op->pinned = 0;
    op->pin_held = 0;
}

void pins_released(Ring *r)
{
    if (!r->npin_waiters || r->closing ||
        (r->pinned_limit > 0 && r->pinned_bytes > r->pinned_limit))
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

/* ------------------------------------------------------------ reaping */

static void dispatch(Ring *r, ul_op *op, int res, unsigned flags)
{
    if (op->nopped) {
        /* a NOP stands in for a request cancelled before submission */
        res = -ECANCELED;
        flags = 0;
    }
    if (r->closing) {
        if (ul_is_dgram_kind(op->kind))
            dgram_retire(r, op, res, flags);
        else if (ul_is_stream_kind(op->kind))
            stream_retire(r, op, res, flags);
        else
            request_retire(r, op, res, flags);
    } else if (ul_is_dgram_kind(op->kind)) {
        dgram_complete(r, op, res, flags);
    } else if (ul_is_stream_kind(op->kind)) {
        stream_complete(r, op, res, flags);
    } else {
        request_complete(r, op, res, flags);
    }
}

/* The answer to a cancel. -ENOENT while the target is still armed: the cancel came
   while the request was between two states (a poll that fired, the retry it queued
   not yet run), and the request goes on; seen here as a send then blocked for good
   in an io-wq worker. Ask again: by the next submission it is somewhere a cancel
   finds it. (-EALREADY: an io-wq worker runs it and was interrupted: it ends.) */
#define UL_CANCEL_TRIES 16
static void cancel_answered(Ring *r, uint64_t target, int res)
{
    ul_op *op = op_lookup(r, target);
    if (res != -ENOENT || !op || !op->armed || op->notif || !op->cancel_sent ||
        op->cancel_tries >= UL_CANCEL_TRIES)
        return;
    op->cancel_sent = 0;
    r->n_cancel_retries++;
    if (op_cancel(r, op) < 0) {
        if (r->closing)
            PyErr_Clear(); /* (rule 3) Ring.close()'s next round sends it */
        else
            PyErr_WriteUnraisable((PyObject *)r);
    }
}

/* Reap every CQE available now; returns how many. A callback that forks leaves the
   child inside this loop: the child stops at once (rule 4), without reading or
   advancing the CQ, which is the parent's (and not even mapped in the child). */
static unsigned reap(Ring *r)
{
    unsigned total = 0;
    r->batch_depth++;
    for (;;) {
        struct io_uring_cqe *cqe;
        unsigned head, n = 0;
        io_uring_for_each_cqe(r->ring, head, cqe)
        {
            n++;
            uint64_t key = cqe->user_data;
            if (key == UL_IGNORE || key == LIBURING_UDATA_TIMEOUT)
                continue;
            if (key & UL_CANCEL_BIT) {
                cancel_answered(r, key & ~UL_CANCEL_BIT, cqe->res);
                continue;
            }
            ul_op *op = op_lookup(r, key);
            if (!op) {
                r->n_stray++;
                continue;
            }
            dispatch(r, op, cqe->res, cqe->flags);
            if (ring_forked(r))
                goto forked;
        }
        io_uring_cq_advance(r->ring, n);
        total += n;
        if (r->nrx_ready && !r->closing && !r->rx_defer)
            rx_deliver_ready(r); /* merged per stream, buffers back to the kernel */
        if (ring_forked(r))
            goto forked;
        if (IO_URING_READ_ONCE(*r->ring->sq.kflags) & IORING_SQ_CQ_OVERFLOW) {
            /* the kernel holds more completions than fit the CQ: flush them in */
            io_uring_get_events(r->ring);
            r->n_enter++;
            continue;
        }
        if (n == 0)
            break;
    }
forked:
    r->batch_depth--;
    r->n_cqe += total;
    return total;
}

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
    r->zc_pin_budget = -1;
    if (!r->events && !(r->events = PyList_New(0)))
        return -1;
    /* a child touching the ring faults instead of writing into the parent's SQ */
    io_uring_ring_dontfork(r->ring);
    return 0;
}

static int Ring_traverse(Ring *r, visitproc visit, void *arg)
{
    Py_VISIT(r->owner);
    Py_VISIT(r->orphan_cb);
    Py_VISIT(r->events);
    Py_VISIT(r->escaping);
    Py_VISIT(r->pool);
    Py_VISIT(r->graveyard);
    for (uint32_t i = 0; i < r->npin_waiters; i++)
        Py_VISIT(r->pin_waiters[i]);
    for (uint32_t i = 0; i < r->ndirty; i++)
        Py_VISIT(r->dirty[i]);
    for (uint32_t i = 0; i < r->ndg_dirty; i++)
        Py_VISIT(r->dg_dirty[i]);
    for (uint32_t i = 0; i < r->ndg_ready; i++)
        Py_VISIT(r->dg_ready[i]);
    for (uint32_t i = 0; i < r->nrx_ready; i++)
        Py_VISIT(r->rx_ready[i]);
    for (uint32_t i = 0; i < r->nrx_spare; i++)
        Py_VISIT(r->rx_spare[i]);
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
    Py_CLEAR(r->graveyard);
    return 0;
}

static void Ring_dealloc(Ring *r)
{
    PyObject_GC_UnTrack(r);
    uint32_t i;
    if (r->inflight == 0 || r->drained || ring_forked(r)) {
        r->closing = 0; /* nothing of this runs inside a drain */
        for (i = 1; i < r->nops; i++) {
            if (r->ops[i]->kind != UL_FREE)
                op_free(r, r->ops[i]);
            PyMem_Free(r->ops[i]);
        }
        PyMem_Free(r->ops);
        PyMem_Free(r->rearm);
        drop_dirty(r);
        PyMem_Free(r->dirty);
        dgram_drop_dirty(r);
        PyMem_Free(r->dg_dirty);
        dgram_drop_ready(r);
        PyMem_Free(r->dg_ready);
        dgram_teardown(r, 0);
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

/* An iteration that may not sleep can skip io_uring_enter when it would bring nothing:
   no SQE prepared, and the kernel flags no pending completion work (IORING_SQ_TASKRUN,
   which it sets only for rings made with TASKRUN_FLAG) and no overflowed CQEs. */
static int ring_nothing_to_enter_for(Ring *r)
{
    struct io_uring *ring = r->ring;
    if (!(ring->flags & IORING_SETUP_TASKRUN_FLAG) || io_uring_sq_ready(ring))
        return 0;
    /* a SINGLE_ISSUER ring run from another thread: let the kernel say so (EEXIST) */
    if ((ring->flags & IORING_SETUP_SINGLE_ISSUER) &&
        r->issuer_thread != PyThread_get_thread_ident())
        return 0;
    unsigned sq_flags = __atomic_load_n(ring->sq.kflags, __ATOMIC_ACQUIRE);
    return !(sq_flags & (IORING_SQ_TASKRUN | IORING_SQ_CQ_OVERFLOW));
}

PyObject *ring_wait(Ring *r, double timeout, const Py_ssize_t *ready)
{
    struct __kernel_timespec ts, *tsp = NULL;
    struct io_uring_cqe *cqe;
    int ret = 0;

    if (!ring_live(r))
        return NULL;
    if (r->escaping) /* a callback outside the last batch was interrupted: no waiting */
        return ring_take_escaping(r);
    if (timeout >= 0) {
        ts.tv_sec = (long long)timeout;
        ts.tv_nsec = (long long)((timeout - (double)ts.tv_sec) * 1e9);
        tsp = &ts;
    }
    if (ring_enable(r) < 0)
        return NULL;
    if (rearm_polls(r) < 0)
        return NULL;
    flush_dirty(r);
    if (r->ndg_dirty && ring_live(r))
        dgram_flush_dirty(r);
    if (r->escaping) /* flush callbacks (a drained queue) were interrupted */
        return ring_take_escaping(r);
    if (!ring_live(r)) /* a flush callback forked: the child stops here (rule 4) */
        return NULL;
    if (ready && *ready) /* flush callbacks scheduled work: do not sleep on it */
        timeout = 0, tsp = NULL;

    if (ul_fault(UL_FAULT_SUBMIT)) {
        ret = -EAGAIN; /* nothing submitted: everything prepared goes next time */
    } else if (timeout == 0 && ring_nothing_to_enter_for(r)) {
        r->n_enter_skipped++;
        goto reap_only;
    } else if (timeout == 0) {
        r->sq_epoch++;
        ret = io_uring_submit_and_get_events(r->ring);
    } else {
        r->sq_epoch++;
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
            if (PyErr_WarnEx(PyExc_RuntimeWarning,
                             "io_uring dropped completions (EBADR): the CQ overflowed while the "
                             "kernel could not buffer them",
                             1) < 0)
                return NULL; /* (warnings as errors) */
            break;
        default:
            errno = -ret;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
    }
reap_only:
    reap(r);
    if (r->escaping)
        return ring_take_escaping(r);
    if (!ring_live(r)) /* a callback forked: the child stops here (rule 4) */
        return NULL;
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

int ring_deliver_deferred(Ring *r)
{
    if ((!r->nrx_ready && !r->ndg_ready) || r->closing || ring_forked(r))
        return 0;
    r->batch_depth++;
    if (r->nrx_ready)
        rx_deliver_ready(r);
    if (r->ndg_ready && !ring_forked(r) && !r->closing)
        dgram_deliver_ready(r);
    r->batch_depth--;
    if (r->escaping) {
        ring_take_escaping(r);
        return -1;
    }
    if (!ring_live(r)) /* a delivery forked: the child stops here (rule 4) */
        return -1;
    return 0;
}

int ring_flush_out(Ring *r)
{
    if (ring_forked(r) || r->closing || r->closed)
        return 0;
    if (ring_enable(r) < 0)
        return -1;
    flush_dirty(r);
    if (r->ndg_dirty && ring_live(r))
        dgram_flush_dirty(r);
    if (r->escaping) {
        ring_take_escaping(r);
        return -1;
    }
    if (!ring_live(r) || r->closing) /* (a flush callback forked or closed the loop) */
        return PyErr_Occurred() ? -1 : 0;
    if (io_uring_sq_ready(r->ring)) {
        int ret = ring_submit(r, 1);
        if (ret < 0 && ret != -EAGAIN && ret != -EBUSY && ret != -EINTR) {
            errno = -ret;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
    }
    return 0;
}

static PyObject *Ring_wait(Ring *r, PyObject *arg)
{
    double timeout = -1.0;
    if (arg != Py_None) {
        timeout = PyFloat_AsDouble(arg);
        if (timeout == -1.0 && PyErr_Occurred())
            return NULL;
        if (!(timeout >= 0)) /* negative, or NaN */
            timeout = 0;
    }
    return ring_wait(r, timeout, NULL);
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
        /* (a POLL holds no memory: the loop's or a forward's) */
        n += op->kind != UL_FREE && op->kind != UL_POLL && op->kind != UL_FORWARD_POLL && op->armed;
    }
    return n;
}

/* Requests no ASYNC_CANCEL reaches: a stream send (or receive) blocked in an io-wq
   worker. Seen on 6.18: a send retried after a poll that then found no room again
   goes to a worker that blocks in the socket, and every cancel answers -ENOENT. Only
   the socket can let go of it: shutting its direction down wakes the worker (EPIPE,
   or EOF). Done only for streams still open, whose fd is still theirs (a closed
   stream's fd number may already name another socket: the transport shuts such a
   socket down itself before closing it, see _call_connection_lost). */
static void shutdown_stuck_streams(Ring *r)
{
    for (uint32_t i = 1; i < r->nops; i++) {
        ul_op *op = r->ops[i];
        if (!ul_is_stream_kind(op->kind) || !op->armed || op->notif || !op->sock)
            continue;
        Stream *s = (Stream *)op->sock;
        if (s->closed || s->fd != op->fd)
            continue;
        (void)shutdown(op->fd, op->kind == UL_STREAM_RECV ? SHUT_RD : SHUT_WR);
    }
}

/* Cancel every request the kernel holds that was not told yet (those that find no
   SQE, even after flushing the SQ, are told next time). */
static void cancel_armed(Ring *r)
{
    for (uint32_t i = 1; i < r->nops; i++) {
        ul_op *op = r->ops[i];
        if (op->kind != UL_FREE && op->armed && !op->cancel_sent && op_cancel(r, op) < 0)
            PyErr_Clear();
    }
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
    if (ring_forked(r)) {
        /* The child's copy of the records points at the child's copy of
           memory the kernel never sees: nothing to wait for. */
        r->closed = r->closing = 1;
        r->drained = 1;
        return PyLong_FromLong(0);
    }
    /* Rule 3: from here on nothing new is submitted and no Python runs. */
    r->closing = 1;
    if (r->pool)
        ((BufferPool *)r->pool)->closed = 1;
    if (!r->graveyard && !(r->graveyard = PyList_New(0)))
        PyErr_Clear(); /* references are then dropped at once */
    drop_dirty(r); /* batched writes of this iteration never go out */
    dgram_drop_dirty(r);
    dgram_drop_ready(r); /* datagrams received and not delivered: dropped, as by a close */
    r->nrearm = 0;
    uint32_t i;
    for (i = 0; i < r->nrx_ready; i++) {
        Stream *s = (Stream *)r->rx_ready[i];
        if (s->rx_single_op) { /* a deferred single-shot completion, never delivered */
            if (s->rx_single_res > 0)
                s->dropped += s->rx_single_res;
            s->rx_single_op = NULL; /* (its unarmed record is freed just below) */
        }
    }
    for (i = 1; i < r->nops; i++) {
        ul_op *op = r->ops[i];
        if (op->kind != UL_FREE && !op->armed) {
            op->cancelled = 1;
            op->queued = 0;
            op_free(r, op);
        }
    }
    if (ring_enable(r) < 0)
        PyErr_Clear();
    double started = now_monotonic(), deadline = started + limit;
    int shut = 0;
    while (r->inflight) {
        /* every round: cancels that found no SQE, or whose retry (cancel_answered)
           found none, go now that reaping made room */
        cancel_armed(r);
        if (!shut && now_monotonic() > started + 0.02) {
            shutdown_stuck_streams(r); /* cancels answer at once; these did not */
            shut = 1;
        }
        struct __kernel_timespec ts = {0, 50 * 1000 * 1000};
        struct io_uring_cqe *cqe;
        int ret;
        r->sq_epoch++;
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
    for (i = 0; i < r->nrx_ready; i++) {
        Stream *s = (Stream *)r->rx_ready[i];
        s->rx_ready = 0;
        r->rx_bufs_out -= s->nsegs;
        s->nsegs = 0; /* their buffers go with the buffer ring */
        if (!r->graveyard || PyList_Append(r->graveyard, (PyObject *)s) < 0)
            PyErr_Clear();
        Py_DECREF(s);
    }
    r->nrx_ready = 0;
    uint32_t pinned = memory_backed_inflight(r);
    r->drained = pinned == 0;
    if (r->drained) {
        rx_teardown(r, 1); /* no recv can pick from the buffer ring any more */
        dgram_teardown(r, 1);
    }
    /* the drain is over: finalizers of what the records held may run now */
    Py_CLEAR(r->graveyard);
    if (PyErr_Occurred())
        PyErr_WriteUnraisable((PyObject *)r);
    return PyLong_FromUnsignedLong(pinned);
}

static PyObject *Ring_stats(Ring *r, PyObject *unused)
{
    uint32_t live = 0;
    for (uint32_t i = 1; i < r->nops; i++)
        live += r->ops[i]->kind != UL_FREE;
    return Py_BuildValue("{sKsKsKsKsKsKsKsKsIsIsKsKsKsOsKsL}", "enters", r->n_enter,
                         "enters_skipped", r->n_enter_skipped, "cqes", r->n_cqe,
                         "sqes", r->n_sqe, "stray_cqes", r->n_stray, "cancelled_before_submit",
                         r->n_nopped, "eagain_resubmits", r->n_eagain, "cancel_retries",
                         r->n_cancel_retries, "inflight", r->inflight, "records", live,
                         "recv_multishot_cqes", r->rx_cqes, "recv_deliveries", r->rx_deliveries,
                         "recv_enobufs", r->rx_enobufs, "recv_buffer_ring",
                         r->rx_state > 0 ? Py_True : Py_False, "recv_spare_reuses",
                         r->rx_spare_reuses, "recv_buffers_out", r->rx_bufs_out);
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
    int t = v ? PyObject_IsTrue(v) : -1;
    if (t < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "cannot delete zc_supported");
        return -1;
    }
    r->zc_supported = t;
    return 0;
}

static PyObject *Ring_get_forked(Ring *r, void *closure) { return PyBool_FromLong(ring_forked(r)); }

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

static PyObject *Ring_fault_injection(PyObject *unused, PyObject *noargs)
{
#ifdef UL_FAULT_INJECTION
    Py_RETURN_TRUE;
#else
    Py_RETURN_FALSE;
#endif
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
     "cancel(key) -> bool: True when the request was still the kernel's, so that its final\n"
     "CQE will follow (a cancelled recv then reports to the orphan callback)"},
    {"recv", (PyCFunction)Ring_recv, METH_VARARGS, "recv(fd, n, fut[, sock]) -> key"},
    {"recv_into", (PyCFunction)Ring_recv_into, METH_VARARGS,
     "recv_into(fd, buf, n, fut[, sock]) -> key"},
    {"recvfrom", (PyCFunction)Ring_recvfrom, METH_VARARGS,
     "recvfrom(fd, n, fut[, sock]) -> key; fut gets (bytes, address)"},
    {"recvfrom_into", (PyCFunction)Ring_recvfrom_into, METH_VARARGS,
     "recvfrom_into(fd, buf, n, fut[, sock]) -> key; fut gets (nbytes, address)"},
    {"sendall", (PyCFunction)Ring_sendall, METH_VARARGS,
     "sendall(fd, data, fut[, offset]) -> key: data[offset:]"},
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
    {"datagram_stats", (PyCFunction)Ring_datagram_stats, METH_NOARGS,
     "counters of the datagram transports"},
    {"zerocopy_stats", (PyCFunction)Ring_zerocopy_stats, METH_NOARGS,
     "counters of the stream write path (zero-copy and copied sends, pinned memory)"},
    {"fault_injection", (PyCFunction)Ring_fault_injection, METH_NOARGS | METH_STATIC,
     "whether this build reads URINGLOOP_FAULTS (sqe=N,submit=M,alloc=K)"},
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
     "orphan_callback(sock, data, key): what the cancelled receive `key` brought in (b'' when\n"
     "it brought nothing), once for every sock_recv/sock_recv_into given up while in flight"},
    {NULL},
};

#include <structmember.h>

static PyMemberDef Ring_members[] = {
    {"pool_size", T_PYSSIZET, offsetof(Ring, pool_size), 0,
     "bytes of the registered arena for ZeroCopyBuffer objects (tried at the first allocation, "
     "halved while RLIMIT_MEMLOCK refuses it; 0: none)"},
    {"pinned_limit", T_PYSSIZET, offsetof(Ring, pinned_limit), 0,
     "bytes lent to the kernel by SEND_ZC in the whole loop above which transports holding "
     "some pause writing (0: no bound)"},
    {"stream_pinned_limit", T_PYSSIZET, offsetof(Ring, stream_pinned_limit), 0,
     "the same bound per stream transport, for transports made from now on"},
    {"zc_pin_budget", T_PYSSIZET, offsetof(Ring, zc_pin_budget), 0,
     "bytes zero-copy datagrams may pin before RLIMIT_MEMLOCK would refuse them; a datagram "
     "that would go above is copied (-1: no limit applies)"},
    {NULL},
};

PyTypeObject RingType = {
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
