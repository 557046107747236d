/* ZeroCopyBuffer: application memory the kernel sends in place, and the registered
 * arena it comes from.
 *
 * Some facts about registered buffers and SEND_ZC
 * -----------------------------------------------
 * - io_uring_register_buffers() pins an arena once and charges it to
 *   RLIMIT_MEMLOCK (ENOMEM when it does not fit); a fixed SEND_ZC may then point
 *   anywhere inside it, with no page pinning per request.
 * - A SEND_ZC reads the memory until its notification CQE, long after the first
 *   CQE reported the byte count; unregistering does not end that.
 *
 * The invariants of this unit
 * ---------------------------
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
 * Once the ring closes (pool->closed), a lend that ends resolves no future: the
 * loop cannot run its callbacks, and no Python may run inside the drain (rule 3).
 */
#include "dataplane.h"

#include <string.h>
#include <sys/mman.h>
#include <unistd.h>



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
    p->closed = 0;
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
            if (r->zc_pin_budget >= 0) /* the arena is charged to the same limit */
                r->zc_pin_budget = r->zc_pin_budget > (Py_ssize_t)size
                                       ? r->zc_pin_budget - (Py_ssize_t)size
                                       : 0;
            break;
        }
        bufpool_destroy(&p->arena);
        if (ret != -ENOMEM)
            break; /* not a size problem: every buffer gets its own mapping */
    }
    r->pool = (PyObject *)p;
    return p;
}

void zcbuf_lend(PyObject *obj)
{
    if (IS_ZCBUF(obj))
        ((ZeroCopyBuffer *)obj)->lends++;
}

void zcbuf_unlend(PyObject *obj)
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
    if (!b->pool->loop || b->pool->closed) {
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
void prep_send_zc_payload(Ring *r, struct io_uring_sqe *sqe, int fd, PyObject *payload,
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

PyTypeObject BufferPoolType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "uringloop._dataplane.BufferPool",
    .tp_basicsize = sizeof(BufferPool),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "the registered arena behind a loop's ZeroCopyBuffer objects",
    .tp_dealloc = (destructor)BufferPool_dealloc,
    .tp_traverse = (traverseproc)BufferPool_traverse,
    .tp_clear = (inquiry)BufferPool_clear,
};

/* Ring.alloc_zerocopy_buffer(size, loop) -> ZeroCopyBuffer */
PyObject *Ring_alloc_zerocopy_buffer(Ring *r, PyObject *args)
{
    Py_ssize_t size;
    PyObject *loop;
    if (!PyArg_ParseTuple(args, "nO:alloc_zerocopy_buffer", &size, &loop))
        return NULL;
    if (size <= 0) {
        PyErr_SetString(PyExc_ValueError, "size must be a positive number of bytes");
        return NULL;
    }
    if (!ring_live(r))
        return NULL;
    if (r->closing) {
        PyErr_SetString(PyExc_RuntimeError, "the event loop is closing");
        return NULL;
    }
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

PyTypeObject ZeroCopyBufferType = {
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

