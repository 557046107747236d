/* The pump of loop.forward(): bytes from one socket to another through a pipe with
 * splice(2), or through a buffer of ours with recv()/send() where splice is refused.
 * uringloop/_forward.py holds the facts about splicing sockets and the semantics;
 * this unit is the per-event part, so that no Python runs per chunk.
 *
 * How it runs
 * -----------
 * pump() moves what it can without blocking: a fill (source -> pipe, at most the
 * pipe's free room) then a drain (pipe -> destination, what the pipe holds), again
 * while either moved something, up to FW_BUDGET bytes per run. A side that would
 * block gets a one-shot POLL on the ring (UL_FORWARD_POLL); its completion runs the
 * pump again. The Python side learns of the end only: `settled` (an asyncio future)
 * gets its result once no POLL is in flight and the pump will not run again.
 *
 * The invariants of this unit
 * ---------------------------
 * - At most one POLL per side is in the kernel (armed[side], key[side]); its record
 *   holds a reference to the Forward, so a Forward outlives its requests.
 * - in_pipe counts the bytes taken from the source and not yet given to the
 *   destination: the pipe's content, or buf[head, head + in_pipe) in copy mode.
 * - The source is polled only while the pipe is empty: EAGAIN from a fill while the
 *   pipe holds bytes may mean a pipe full of small fragments, and a readable source
 *   would make the POLL fire at once, for ever. Those bytes' drain either went (and
 *   the pump runs on) or polls the destination, whose completion runs the fill again.
 * - The pump calls no Python except `settled.set_result`, which only schedules the
 *   future's callbacks; so nothing here can be re-entered or freed under it.
 * - The fds and the pipe belong to the Python side, which keeps them open until
 *   `settled` (the transports defer their socket's close; the pipe is closed after).
 */
#include "dataplane.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <string.h>
#include <structmember.h>
#include <sys/socket.h>
#include <unistd.h>

#define FW_SRC 0
#define FW_DST 1
/* bytes per pump run before it yields to the rest of the loop through a POLL */
#define FW_BUDGET (1 << 20)
/* drains that moved nothing though the destination polled writable, before giving up */
#define FW_ZERO_MOVES_LIMIT 64

typedef struct Forward {
    PyObject_HEAD
    Ring *ring;
    PyObject *settled; /* asyncio future: result None at the end */
    int src_fd, dst_fd, pipe_r, pipe_w; /* pipe_r < 0: copy mode */
    Py_ssize_t capacity, in_pipe, moved, spliced, copied;
    char *buf; /* copy mode: capacity bytes */
    Py_ssize_t head;
    uint64_t key[2];
    uint8_t armed[2];
    uint8_t started, src_ended, stopping, done, switched;
    int zero_moves;
    int src_errno, dst_errno;
    PyObject *error; /* an exception of ours (no SQE for a POLL): raised by the caller */
} Forward;

static int fw_refused(int err)
{
    return err == EINVAL || err == EOPNOTSUPP || err == ENOSYS || err == ESPIPE;
}

static void fw_check_settled(Forward *f)
{
    if (f->done || f->armed[FW_SRC] || f->armed[FW_DST] || !f->started)
        return;
    int source_done = f->src_ended || f->src_errno;
    if (!f->stopping && !f->dst_errno && !(source_done && f->in_pipe == 0))
        return;
    f->done = 1;
    /* (a closing loop runs no callback of its futures any more: nothing to tell) */
    if (f->settled && !f->ring->closing && !f->ring->closed && !fut_is_done(f->settled))
        fut_resolve(f->settled, Py_None, 0);
}

static void fw_fail(Forward *f)
{
    /* the pending exception (no SQE, a forked child): the forward stops with it */
    PyObject *exc = ul_fetch_exception();
    if (!f->error)
        f->error = exc;
    else
        Py_XDECREF(exc);
    f->stopping = 1;
}

static void fw_poll(Forward *f, int side, unsigned mask)
{
    if (f->armed[side])
        return;
    Ring *r = f->ring;
    if (!ring_live(r)) {
        fw_fail(f);
        return;
    }
    ul_op *op = op_alloc(r, UL_FORWARD_POLL);
    if (!op) {
        fw_fail(f);
        return;
    }
    struct io_uring_sqe *sqe = ring_sqe(r);
    if (!sqe) {
        op_free(r, op);
        fw_fail(f);
        return;
    }
    op->fd = side == FW_SRC ? f->src_fd : f->dst_fd;
    op->fut = Py_NewRef((PyObject *)f);
    io_uring_prep_poll_add(sqe, op->fd, mask);
    op_armed(r, op, sqe);
    f->key[side] = op_key(op);
    f->armed[side] = 1;
}

static int fw_to_copy(Forward *f)
{
    /* splice refused by these sockets before any byte moved: go on by copying */
    char *buf = PyMem_Malloc((size_t)f->capacity);
    if (!buf)
        return -1;
    f->buf = buf;
    f->head = 0;
    f->pipe_r = f->pipe_w = -1;
    f->switched = 1;
    return 0;
}

/* One move from the source: bytes taken; *blocked when it would block. */
static Py_ssize_t fw_fill(Forward *f, int *blocked)
{
    size_t want = (size_t)(f->capacity - f->in_pipe);
    ssize_t n;
    for (;;) {
        if (f->pipe_r >= 0) {
            n = splice(f->src_fd, NULL, f->pipe_w, NULL, want, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        } else {
            if (f->head && f->in_pipe)
                memmove(f->buf, f->buf + f->head, (size_t)f->in_pipe);
            f->head = 0;
            n = recv(f->src_fd, f->buf + f->in_pipe, want, MSG_DONTWAIT);
        }
        if (n >= 0 || errno != EINTR)
            break;
    }
    if (n < 0) {
        int err = errno;
        if (err == EAGAIN || err == EWOULDBLOCK) {
            *blocked = 1;
            return 0;
        }
        if (f->pipe_r >= 0 && fw_refused(err) && f->moved == 0 && f->in_pipe == 0) {
            if (fw_to_copy(f) == 0)
                return fw_fill(f, blocked);
            err = ENOMEM;
        }
        f->src_errno = err;
        return 0;
    }
    if (n == 0)
        f->src_ended = 1;
    f->in_pipe += n;
    return n;
}

/* One move to the destination: bytes given (0: it would block, and its POLL is armed,
   or it failed and the forward stops). */
static Py_ssize_t fw_drain(Forward *f)
{
    ssize_t n;
    do {
        if (f->pipe_r >= 0)
            n = splice(f->pipe_r, NULL, f->dst_fd, NULL, (size_t)f->in_pipe,
                       SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        else
            n = send(f->dst_fd, f->buf + f->head, (size_t)f->in_pipe, MSG_DONTWAIT | MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
        f->dst_errno = errno;
        f->stopping = 1; /* what the source still sends has nowhere to go */
        return 0;
    }
    if (n <= 0) {
        if (n == 0 && ++f->zero_moves > FW_ZERO_MOVES_LIMIT) {
            f->dst_errno = EPIPE; /* writable by POLL, yet it takes nothing */
            f->stopping = 1;
            return 0;
        }
        fw_poll(f, FW_DST, POLLOUT);
        return 0;
    }
    f->zero_moves = 0;
    f->in_pipe -= n;
    f->moved += n;
    if (f->pipe_r >= 0) {
        f->spliced += n;
    } else {
        f->copied += n;
        f->head = f->in_pipe ? f->head + n : 0;
    }
    return n;
}

static void fw_pump(Forward *f)
{
    Py_ssize_t budget = FW_BUDGET;
    while (!f->stopping) {
        Py_ssize_t took = 0, gave = 0;
        int fill_blocked = 0;
        int source_done = f->src_ended || f->src_errno;
        if (!source_done && !f->armed[FW_SRC] && f->in_pipe < f->capacity)
            took = fw_fill(f, &fill_blocked);
        if (f->in_pipe > 0 && !f->armed[FW_DST] && !f->stopping)
            gave = fw_drain(f);
        if (fill_blocked && f->in_pipe == 0 && !f->stopping)
            fw_poll(f, FW_SRC, POLLIN); /* the pipe is empty: the source had nothing */
        if (!took && !gave)
            break;
        budget -= took + gave;
        if (budget <= 0) {
            /* yield: the next run comes through the ring, after the other ready work */
            if (f->in_pipe > 0)
                fw_poll(f, FW_DST, POLLOUT);
            else if (!(f->src_ended || f->src_errno))
                fw_poll(f, FW_SRC, POLLIN);
            break;
        }
    }
    fw_check_settled(f);
}

/* A POLL of this forward completed (its record is freed: nothing of it is used). */
void forward_polled(Ring *r, PyObject *obj, uint64_t key, int res)
{
    Forward *f = (Forward *)obj;
    for (int side = 0; side < 2; side++) {
        if (f->armed[side] && f->key[side] == key)
            f->armed[side] = 0;
    }
    /* (revents, or an error: the next move says what the socket's state is) */
    (void)res;
    if (f->stopping || f->done)
        fw_check_settled(f);
    else
        fw_pump(f);
}

void forward_retired(PyObject *obj, uint64_t key)
{
    Forward *f = (Forward *)obj;
    for (int side = 0; side < 2; side++) {
        if (f->armed[side] && f->key[side] == key)
            f->armed[side] = 0;
    }
    f->stopping = 1; /* (no settle: the loop is closing, its futures too) */
}

/* ------------------------------------------------------------ the Python type */

static int Forward_init(Forward *f, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"ring", "src_fd", "dst_fd", "pipe_r", "pipe_w", "capacity",
                             "settled", NULL};
    Ring *ring;
    PyObject *settled;
    int src_fd, dst_fd, pipe_r, pipe_w;
    Py_ssize_t capacity;
    if (f->ring) {
        PyErr_SetString(PyExc_RuntimeError, "Forward() is initialized once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!iiiinO:Forward", kwlist, &RingType, &ring,
                                     &src_fd, &dst_fd, &pipe_r, &pipe_w, &capacity, &settled))
        return -1;
    if (capacity <= 0 || capacity > (Py_ssize_t)UL_MAX_RW) {
        PyErr_SetString(PyExc_ValueError, "capacity out of range");
        return -1;
    }
    if (src_fd < 0 || dst_fd < 0 || (pipe_r < 0) != (pipe_w < 0)) {
        PyErr_SetString(PyExc_ValueError, "bad file descriptor");
        return -1;
    }
    if (pipe_r < 0 && !(f->buf = PyMem_Malloc((size_t)capacity))) {
        PyErr_NoMemory();
        return -1;
    }
    f->ring = (Ring *)Py_NewRef(ring);
    f->settled = Py_NewRef(settled);
    f->src_fd = src_fd;
    f->dst_fd = dst_fd;
    f->pipe_r = pipe_r;
    f->pipe_w = pipe_w;
    f->capacity = capacity;
    return 0;
}

static PyObject *Forward_start(Forward *f, PyObject *unused)
{
    if (!f->ring || f->started) {
        PyErr_SetString(PyExc_RuntimeError, "start() once, after __init__");
        return NULL;
    }
    f->started = 1;
    fw_pump(f);
    return ring_return(f->ring, Py_NewRef(Py_None));
}

/* stop(): cancel the POLLs in flight; `settled` follows once their CQEs are in. */
static PyObject *Forward_stop(Forward *f, PyObject *unused)
{
    if (!f->ring)
        Py_RETURN_NONE;
    f->stopping = 1;
    for (int side = 0; side < 2; side++) {
        if (!f->armed[side])
            continue;
        ul_op *op = op_lookup(f->ring, f->key[side]);
        if (op && op->armed && !op->cancel_sent && op_cancel(f->ring, op) < 0)
            fw_fail(f); /* (no SQE for the cancel: the POLL ends with its socket's close) */
    }
    f->started = 1; /* (a stop before start settles at once) */
    fw_check_settled(f);
    return ring_return(f->ring, Py_NewRef(Py_None));
}

/* take_leftover(): settled; the bytes still in the pipe or the buffer, read out. */
static PyObject *Forward_take_leftover(Forward *f, PyObject *unused)
{
    if (f->armed[FW_SRC] || f->armed[FW_DST]) {
        PyErr_SetString(PyExc_RuntimeError, "take_leftover() while a POLL is in flight");
        return NULL;
    }
    Py_ssize_t n = f->in_pipe;
    if (f->pipe_r >= 0 && (f->ring->closed || f->ring->closing || ring_forked(f->ring)))
        n = 0; /* the loop closed its pipes (or a forked child's are the parent's) */
    PyObject *data = PyBytes_FromStringAndSize(NULL, n);
    if (!data)
        return NULL;
    Py_ssize_t got = 0;
    if (f->pipe_r >= 0) {
        while (got < n) {
            ssize_t m = read(f->pipe_r, PyBytes_AS_STRING(data) + got, (size_t)(n - got));
            if (m < 0 && errno == EINTR)
                continue;
            if (m <= 0)
                break;
            got += m;
        }
    } else if (n) {
        memcpy(PyBytes_AS_STRING(data), f->buf + f->head, (size_t)n);
        got = n;
    }
    f->in_pipe = 0;
    f->head = 0;
    if (got < n && _PyBytes_Resize(&data, got) < 0)
        return NULL;
    return data;
}

static PyObject *Forward_get_error(Forward *f, void *c)
{
    if (f->error)
        return Py_NewRef(f->error);
    if (f->dst_errno)
        return oserror_from(f->dst_errno);
    if (f->src_errno)
        return oserror_from(f->src_errno);
    Py_RETURN_NONE;
}

static PyObject *Forward_get_splicing(Forward *f, void *c) { return PyBool_FromLong(f->pipe_r >= 0); }
static PyObject *Forward_get_src_ended(Forward *f, void *c) { return PyBool_FromLong(f->src_ended); }
static PyObject *Forward_get_polls(Forward *f, void *c)
{
    return PyLong_FromLong(f->armed[FW_SRC] + f->armed[FW_DST]);
}

static int Forward_traverse(Forward *f, visitproc visit, void *arg)
{
    Py_VISIT(f->ring);
    Py_VISIT(f->settled);
    Py_VISIT(f->error);
    return 0;
}

static int Forward_clear(Forward *f)
{
    Py_CLEAR(f->settled);
    Py_CLEAR(f->error);
    return 0;
}

static void Forward_dealloc(Forward *f)
{
    /* a POLL's record holds a reference: none is in flight once this runs */
    PyObject_GC_UnTrack(f);
    Forward_clear(f);
    PyMem_Free(f->buf);
    Py_CLEAR(f->ring);
    Py_TYPE(f)->tp_free((PyObject *)f);
}

static PyMethodDef Forward_methods[] = {
    {"start", (PyCFunction)Forward_start, METH_NOARGS, "pump until EOF, an error or stop()"},
    {"stop", (PyCFunction)Forward_stop, METH_NOARGS,
     "cancel the POLLs in flight; settled follows once they are over"},
    {"take_leftover", (PyCFunction)Forward_take_leftover, METH_NOARGS,
     "settled: the bytes still in the pipe (or buffer), read out"},
    {NULL},
};

static PyMemberDef Forward_members[] = {
    {"in_pipe", T_PYSSIZET, offsetof(Forward, in_pipe), READONLY,
     "bytes taken from the source, not yet given to the destination"},
    {"moved", T_PYSSIZET, offsetof(Forward, moved), READONLY, "bytes given to the destination"},
    {"spliced", T_PYSSIZET, offsetof(Forward, spliced), READONLY, "of them, spliced"},
    {"copied", T_PYSSIZET, offsetof(Forward, copied), READONLY, "of them, copied"},
    {"capacity", T_PYSSIZET, offsetof(Forward, capacity), READONLY, NULL},
    {"src_errno", T_INT, offsetof(Forward, src_errno), READONLY, "the source's error, or 0"},
    {"dst_errno", T_INT, offsetof(Forward, dst_errno), READONLY, "the destination's error, or 0"},
    {NULL},
};

static PyGetSetDef Forward_getset[] = {
    {"error", (getter)Forward_get_error, NULL,
     "what ended it: the destination's error, else the source's, else None"},
    {"splicing", (getter)Forward_get_splicing, NULL, "False in copy mode"},
    {"src_ended", (getter)Forward_get_src_ended, NULL, "the source's EOF was read"},
    {"polls", (getter)Forward_get_polls, NULL, "POLLs in the kernel (0, 1 or 2)"},
    {NULL},
};

PyTypeObject ForwardType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "uringloop._dataplane.Forward",
    .tp_basicsize = sizeof(Forward),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Forward(ring, src_fd, dst_fd, pipe_r, pipe_w, capacity, settled): the pump "
              "of loop.forward() (pipe_r = pipe_w = -1: copy mode)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Forward_init,
    .tp_dealloc = (destructor)Forward_dealloc,
    .tp_traverse = (traverseproc)Forward_traverse,
    .tp_clear = (inquiry)Forward_clear,
    .tp_methods = Forward_methods,
    .tp_members = Forward_members,
    .tp_getset = Forward_getset,
};
