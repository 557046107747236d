/* The Stream type: the native half of a stream transport (TCP or Unix socket).
 *
 * A Stream owns the per-event path of one connection: receive completions become
 * protocol calls (stream_recv.c) and write() batches into one send per iteration
 * (stream_send.c), with no Python of ours in between. Everything rare goes back to
 * the Python transport (`owner`): EOF, errors, flow-control crossings, "the queue
 * drained".
 *
 * What this unit guarantees
 * -------------------------
 * - Protocol binding is atomic: set_protocol() looks every method up first and
 *   swaps all of them or none; a protocol whose methods cannot be looked up fails
 *   the connection at its next delivery with that error, as asyncio's loop does.
 *   Every binding bumps proto_gen, so a receive into the old protocol's buffer is
 *   recognised as such when it completes (stream_recv.c).
 * - Contexts (contextvars): the read callbacks run in read_ctx, a copy of the
 *   context current when reading (re)started (creation, resume_reading()), which is
 *   what asyncio's add_reader() captures; the send-side callbacks that completions
 *   trigger (resume_writing, errors, the drained queue that finishes a close) run in
 *   write_ctx, a copy of the context of the write() that found the stream idle,
 *   which is what asyncio's add_writer() captures. Callbacks reached from a Python
 *   call (pause_writing inside write()) run in the caller's context.
 * - close_now() stops all I/O: bytes written and not yet handed to the kernel go
 *   out with one non-blocking sendmsg when no send is in flight (as asyncio's
 *   write() would already have sent them), requests in the kernel are cancelled,
 *   and every reference to the application (transport, protocol, contexts) is
 *   dropped, except the transport while SEND_ZC memory is still lent (it is told
 *   when the last notification arrives, to close the socket).
 * - In a forked child (rule 4) the methods that need the ring raise RuntimeError;
 *   close_now() only drops the child's references.
 */
#include "dataplane.h"

#include <errno.h>
#include <string.h>

/* ------------------------------------------------------------ calls into Python */

int stream_check_fork(Stream *s)
{
    if (!ring_forked(s->ring))
        return 0;
    PyErr_SetString(PyExc_RuntimeError,
                    "this transport belongs to an event loop of the parent process; a forked "
                    "child cannot use it (it may only close it)");
    return -1;
}

PyObject *stream_call(Stream *s, PyObject *callable, PyObject *arg, PyObject *ctx)
{
    int entered = 0;
    Py_INCREF(callable);
    if (ctx && s->ctx_depth == 0) {
        Py_INCREF(ctx);
        if (PyContext_Enter(ctx) == 0) {
            entered = 1;
        } else {
            Py_DECREF(ctx);
            Py_DECREF(callable);
            return NULL;
        }
    }
    s->ctx_depth++;
    PyObject *res = arg ? PyObject_CallOneArg(callable, arg) : PyObject_CallNoArgs(callable);
    s->ctx_depth--;
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

void stream_owner_call(Stream *s, PyObject *name, PyObject *arg, PyObject *ctx)
{
    if (!s->owner)
        return; /* closed: nobody to tell */
    PyObject *method = PyObject_GetAttr(s->owner, name);
    if (!method) {
        callback_failed(s->ring, s->owner);
        return;
    }
    PyObject *res = stream_call(s, method, arg, ctx);
    Py_DECREF(method);
    if (!res)
        callback_failed(s->ring, s->owner ? s->owner : (PyObject *)s);
    Py_XDECREF(res);
}

void stream_owner_error(Stream *s, int err, PyObject *ctx)
{
    PyObject *exc = oserror_from(err);
    if (!exc) {
        PyErr_WriteUnraisable(s->owner);
        return;
    }
    stream_owner_call(s, str_stream_error, exc, ctx);
    Py_DECREF(exc);
}

void stream_protocol_raised(Stream *s, PyObject *ctx)
{
    PyObject *exc = ul_fetch_exception();
    if (s->owner)
        stream_owner_call(s, str_protocol_error, exc, ctx);
    Py_XDECREF(exc);
}

/* ------------------------------------------------------------ flow control */

/* Whether s holds memory lent to the kernel while the loop as a whole is over its bound. */
static int stream_over_loop_pinned(Stream *s)
{
    Ring *r = s->ring;
    return s->pinned > 0 && r->pinned_limit > 0 && r->pinned_bytes > r->pinned_limit;
}

static void stream_resume_writing_in(Stream *s, PyObject *ctx)
{
    if (s->write_paused && s->queued <= s->low && s->pinned <= s->pinned_high &&
        !stream_over_loop_pinned(s)) {
        s->write_paused = 0;
        stream_owner_call(s, str_resume_protocol, NULL, ctx);
    }
}

/* From completions: in the context the send side captured. */
void stream_maybe_resume_writing(Stream *s) { stream_resume_writing_in(s, s->write_ctx); }

void stream_maybe_pause_writing(Stream *s)
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
                PyObject **n = ul_realloc(r->pin_waiters, ncap * sizeof(*n));
                if (!n) {
                    PyErr_NoMemory();
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
        stream_owner_call(s, str_pause_protocol, NULL, NULL); /* inside write(): the caller's */
    }
}

void stream_unpinned(Stream *s)
{
    if (s->pinned != 0)
        return;
    /* the socket may close now; then nothing of the application is needed any more */
    PyObject *owner = s->owner;
    if (!owner)
        return;
    Py_INCREF(owner);
    stream_owner_call(s, str_stream_unpinned, NULL, NULL);
    if (s->closed && !s->recv_armed)
        Py_CLEAR(s->owner);
    Py_DECREF(owner);
}

/* A closed stream's receive has ended (its final CQE is in, the bytes it brought are
   counted in dropped): the transport may now close the socket, reset if anything was
   dropped. Then nothing of the application is needed any more, unless memory is still
   lent (stream_unpinned lets go of the owner then). */
void stream_recv_over(Stream *s)
{
    if (!s->closed || s->recv_armed || !s->owner)
        return;
    PyObject *owner = Py_NewRef(s->owner);
    if (s->recv_over_wanted) {
        s->recv_over_wanted = 0;
        stream_owner_call(s, str_stream_recv_over, NULL, NULL);
    }
    if (s->pinned == 0)
        Py_CLEAR(s->owner);
    Py_DECREF(owner);
}

/* ------------------------------------------------------------ completion dispatch */

void stream_complete(Ring *r, ul_op *op, int res, unsigned flags)
{
    Stream *s = (Stream *)op->sock;
    Py_INCREF(s); /* the record's reference goes with op_free */
    if (op->kind == UL_STREAM_RECV)
        stream_recv_complete(r, s, op, res, flags);
    else
        stream_send_complete(r, s, op, res, flags);
    Py_DECREF(s);
}

void stream_retire(Ring *r, ul_op *op, int res, unsigned flags)
{
    Stream *s = (Stream *)op->sock;
    if (op->kind == UL_STREAM_RECV)
        stream_recv_retire(r, s, op, res, flags);
    else
        stream_send_retire(r, s, op, res, flags);
}

/* ------------------------------------------------------------ the type */

static int Stream_set_protocol_impl(Stream *s, PyObject *protocol, int buffered)
{
    PyObject *on_data = NULL, *get_buffer = NULL, *buffer_updated = NULL;
    if (buffered) {
        get_buffer = PyObject_GetAttr(protocol, str_get_buffer);
        buffer_updated = get_buffer ? PyObject_GetAttr(protocol, str_buffer_updated) : NULL;
    } else {
        on_data = PyObject_GetAttr(protocol, str_data_received);
    }
    PyObject *error = NULL;
    if (!on_data && !buffer_updated) {
        Py_CLEAR(get_buffer); /* all of a protocol's callbacks, or none */
        /* as on asyncio's loop: the transport takes the protocol, and the first
           delivery fails the connection with this error */
        if (!PyErr_ExceptionMatches(PyExc_Exception))
            return -1;
        error = ul_fetch_exception();
    }
    /* Bind the new protocol whole before the old one's references go: dropping them
       may run a finalizer (rule 1) that sets yet another protocol. */
    PyObject *old_on_data = s->on_data, *old_get_buffer = s->get_buffer;
    PyObject *old_buffer_updated = s->buffer_updated, *old_error = s->proto_error;
    s->on_data = on_data;
    s->get_buffer = get_buffer;
    s->buffer_updated = buffer_updated;
    s->proto_error = error;
    s->proto_gen++;
    s->rx_small_buffer = 0;
    /* pause_writing() went to the old protocol: the new one starts unpaused, and gets
       its own pause should the queue still be above the mark at its next write */
    s->write_paused = 0;
    Py_XDECREF(old_on_data);
    Py_XDECREF(old_get_buffer);
    Py_XDECREF(old_buffer_updated);
    Py_XDECREF(old_error);
    return 0;
}

/* Stream(ring, fd, owner, protocol, zc_threshold, buffered[, forced]) */
static int Stream_init(Stream *s, PyObject *args, PyObject *kwds)
{
    PyObject *ring, *owner, *protocol;
    int fd;
    Py_ssize_t threshold;
    int buffered, forced = 0;
    if (!PyArg_ParseTuple(args, "O!iOOnp|p:Stream", &RingType, &ring, &fd, &owner, &protocol,
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

static PyObject *Stream_start_reading(Stream *s, PyObject *unused)
{
    if (stream_check_fork(s) < 0)
        return NULL;
    if (s->closed)
        Py_RETURN_NONE;
    /* asyncio's add_reader() captures the context current now */
    PyObject *ctx = PyContext_CopyCurrent();
    if (!ctx)
        return NULL;
    Py_XSETREF(s->read_ctx, ctx);
    s->reading = 1;
    if (stream_resume_delivery(s) < 0)
        return ring_return(s->ring, NULL);
    return ring_return(s->ring, Py_NewRef(Py_None));
}

static PyObject *Stream_pause_reading(Stream *s, PyObject *unused)
{
    if (stream_check_fork(s) < 0)
        return NULL;
    s->reading = 0;
    if (s->recv_armed && stream_live(s) && stream_cancel_key(s, s->recv_key) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Stream_ensure_usable(Stream *s, PyObject *unused)
{
    if (stream_check_fork(s) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* notify_when_flushed(): owner._stream_flushed() runs once every queued byte is sent. */
static PyObject *Stream_notify_when_flushed(Stream *s, PyObject *unused)
{
    if (stream_check_fork(s) < 0)
        return NULL;
    if (s->queued == 0 && !s->send_armed) {
        stream_owner_call(s, str_stream_flushed, NULL, NULL);
        return ring_return(s->ring, Py_NewRef(Py_None));
    }
    s->notify_flushed = 1;
    Py_RETURN_NONE;
}

static PyObject *Stream_set_eof(Stream *s, PyObject *unused)
{
    if (stream_check_fork(s) < 0)
        return NULL;
    s->eof = 1;
    Py_RETURN_NONE;
}

static PyObject *Stream_set_sendfile_active(Stream *s, PyObject *flag)
{
    long on = PyLong_AsLong(flag);
    if (on == -1 && PyErr_Occurred())
        return NULL;
    s->sendfile_active = (uint8_t)(on == 1 || on == 2 ? on : on != 0);
    Py_RETURN_NONE;
}

/* Drop every reference to the application (rule 5). */
static void stream_release_app(Stream *s)
{
    Py_CLEAR(s->wbuf);
    if (s->held)
        s->dropped += PyBytes_GET_SIZE(s->held);
    Py_CLEAR(s->held);
    s->held_end = 0;
    Py_CLEAR(s->on_data);
    Py_CLEAR(s->get_buffer);
    Py_CLEAR(s->buffer_updated);
    Py_CLEAR(s->proto_error);
    Py_CLEAR(s->read_ctx);
    Py_CLEAR(s->write_ctx);
    /* else stream_unpinned() or stream_recv_over() still tell it, then drop it (a
       forked child's requests are the parent's: it never hears of them) */
    if ((s->pinned == 0 && !s->recv_armed) || ring_forked(s->ring))
        Py_CLEAR(s->owner);
}

static PyObject *Stream_close_now(Stream *s, PyObject *unused)
{
    if (s->closed)
        Py_RETURN_NONE;
    Ring *r = s->ring;
    int live = stream_live(s);
    if (live && !s->send_armed && !s->sendfile_active)
        stream_write_through(s, 1); /* what write() accepted goes as far as the kernel takes */
    s->closed = 1;
    s->reading = 0;
    s->proto_gen++;
    /* A stream has at most one recv and one send in the kernel; a SEND_ZC whose
       first CQE is in has nothing left to cancel and keeps its memory until the
       notification. */
    if (live) {
        if ((s->recv_armed && stream_cancel_key(s, s->recv_key) < 0) ||
            (s->send_armed && stream_cancel_key(s, s->send_key) < 0))
            PyErr_WriteUnraisable((PyObject *)s); /* no SQE: the kernel ends them with the fd */
    }
    stream_drop_queue(s);
    s->notify_flushed = 0;
    stream_release_app(s);
    (void)r;
    Py_RETURN_NONE;
}

static PyObject *Stream_set_write_buffer_limits(Stream *s, PyObject *args)
{
    Py_ssize_t high, low;
    if (!PyArg_ParseTuple(args, "nn:set_write_buffer_limits", &high, &low))
        return NULL;
    if (stream_check_fork(s) < 0)
        return NULL;
    s->high = high;
    s->low = low;
    stream_maybe_pause_writing(s);
    stream_resume_writing_in(s, NULL);
    return ring_return(s->ring, Py_NewRef(Py_None));
}

static PyObject *Stream_get_write_buffer_size(Stream *s, PyObject *unused)
{
    return PyLong_FromSsize_t(s->queued);
}

static PyObject *Stream_get_pinned(Stream *s, void *c) { return PyLong_FromSsize_t(s->pinned); }

static PyObject *Stream_get_zerocopy(Stream *s, void *c)
{
    return PyBool_FromLong(s->zc && s->ring->zc_supported);
}

static PyObject *Stream_get_reading(Stream *s, void *c) { return PyBool_FromLong(s->reading); }

static PyObject *Stream_get_forked(Stream *s, void *c) { return PyBool_FromLong(ring_forked(s->ring)); }

/* take_held() on a paused stream, for loop.forward(): (bytes or None, end). The
   data a receive brought in while paused is the caller's now; end (0 none, 1 EOF,
   -errno an error) stays held, for the protocol once reading resumes. */
static PyObject *Stream_take_held(Stream *s, PyObject *unused)
{
    if (stream_check_fork(s) < 0)
        return NULL;
    if (s->reading) {
        PyErr_SetString(PyExc_RuntimeError, "take_held() needs a paused stream");
        return NULL;
    }
    PyObject *held = s->held ? s->held : Py_NewRef(Py_None);
    s->held = NULL;
    return Py_BuildValue("(Ni)", held, s->held_end);
}

static PyObject *Stream_get_recv_in_kernel(Stream *s, void *c)
{
    /* (a completion the loop core defers counts: its bytes are not delivered yet) */
    return PyBool_FromLong(s->recv_armed || s->rx_ready);
}

static PyObject *Stream_get_holding(Stream *s, void *c)
{
    return PyBool_FromLong(s->held != NULL || s->held_end != 0);
}

static PyObject *Stream_get_dropped_bytes(Stream *s, void *c)
{
    Py_ssize_t dropped = s->dropped;
    if (s->closed) {
        /* a deferred delivery's segments (ring_deliver_deferred) will be dropped too:
           the socket's close must already count them as unread */
        for (uint32_t k = 0; k < s->nsegs; k++)
            dropped += s->segs[k].len;
        if (s->rx_single_op && s->rx_single_res > 0)
            dropped += s->rx_single_res;
    }
    return PyLong_FromSsize_t(dropped);
}

/* notify_when_recv_over() on a closed stream: True when a receive is still in the
   kernel (it may yet bring bytes; owner._stream_recv_over() follows when it ends),
   False when the socket may close now. */
static PyObject *Stream_notify_when_recv_over(Stream *s, PyObject *unused)
{
    if (!s->closed || !s->recv_armed || !s->owner || ring_forked(s->ring) || s->ring->closed)
        Py_RETURN_FALSE;
    s->recv_over_wanted = 1;
    Py_RETURN_TRUE;
}

static int Stream_traverse(Stream *s, visitproc visit, void *arg)
{
    Py_VISIT(s->ring);
    Py_VISIT(s->owner);
    Py_VISIT(s->on_data);
    Py_VISIT(s->get_buffer);
    Py_VISIT(s->buffer_updated);
    Py_VISIT(s->proto_error);
    Py_VISIT(s->read_ctx);
    Py_VISIT(s->write_ctx);
    Py_VISIT(s->held);
    Py_VISIT(s->wbuf);
    Py_VISIT(s->queue);
    return 0;
}

static int Stream_clear(Stream *s)
{
    if (s->queue)
        stream_drop_queue(s); /* queued ZeroCopyBuffers are lent: give them back */
    Py_CLEAR(s->owner);
    Py_CLEAR(s->on_data);
    Py_CLEAR(s->get_buffer);
    Py_CLEAR(s->buffer_updated);
    Py_CLEAR(s->proto_error);
    Py_CLEAR(s->read_ctx);
    Py_CLEAR(s->write_ctx);
    Py_CLEAR(s->held);
    Py_CLEAR(s->wbuf);
    Py_CLEAR(s->queue);
    return 0;
}

static void Stream_dealloc(Stream *s)
{
    /* Records in the kernel hold a reference to their stream, so a stream is only
       freed once none of its requests is outstanding. Payloads still queued were
       never handed to the kernel: give their lends back. */
    PyObject_GC_UnTrack(s);
    if (s->queue)
        stream_drop_queue(s);
    Stream_clear(s);
    PyMem_Free(s->segs); /* a stream with segments is on the ready list, so none are left */
    Py_CLEAR(s->ring);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static PyMethodDef Stream_methods[] = {
    {"write", (PyCFunction)Stream_write, METH_O, "write(data): queue data for this iteration's send"},
    {"start_reading", (PyCFunction)Stream_start_reading, METH_NOARGS,
     "(re)start reading in a copy of the current context; data held while paused goes first"},
    {"pause_reading", (PyCFunction)Stream_pause_reading, METH_NOARGS, NULL},
    {"ensure_usable", (PyCFunction)Stream_ensure_usable, METH_NOARGS,
     "raise RuntimeError in a forked child"},
    {"notify_when_flushed", (PyCFunction)Stream_notify_when_flushed, METH_NOARGS, NULL},
    {"set_eof", (PyCFunction)Stream_set_eof, METH_NOARGS, "refuse further writes"},
    {"set_sendfile_active", (PyCFunction)Stream_set_sendfile_active, METH_O,
     "while 1 (sendfile) or 2 (forward), write() raises RuntimeError: they own the send side"},
    {"take_held", (PyCFunction)Stream_take_held, METH_NOARGS,
     "paused: (data held or None, end) - the data becomes the caller's, the end stays"},
    {"notify_when_recv_over", (PyCFunction)Stream_notify_when_recv_over, METH_NOARGS,
     "closed: whether a receive is still in the kernel (owner._stream_recv_over() follows)"},
    {"close_now", (PyCFunction)Stream_close_now, METH_NOARGS,
     "stop all I/O: write out what the kernel takes at once, cancel, drop the application"},
    {"set_protocol", (PyCFunction)Stream_set_protocol, METH_VARARGS, NULL},
    {"set_write_buffer_limits", (PyCFunction)Stream_set_write_buffer_limits, METH_VARARGS, NULL},
    {"get_write_buffer_size", (PyCFunction)Stream_get_write_buffer_size, METH_NOARGS, NULL},
    {NULL},
};

static PyObject *Stream_get_send_in_kernel(Stream *s, void *c)
{
    return PyBool_FromLong(s->send_armed);
}

static PyGetSetDef Stream_getset[] = {
    {"send_in_kernel", (getter)Stream_get_send_in_kernel, NULL,
     "whether a send of this stream is still the kernel's (even after a cancel)"},
    {"pinned", (getter)Stream_get_pinned, NULL, "bytes the kernel may still read (SEND_ZC)"},
    {"zerocopy", (getter)Stream_get_zerocopy, NULL, "whether large writes go out with SEND_ZC"},
    {"reading", (getter)Stream_get_reading, NULL, NULL},
    {"forked", (getter)Stream_get_forked, NULL, "True in a child forked after the loop was made"},
    {"recv_in_kernel", (getter)Stream_get_recv_in_kernel, NULL,
     "whether a receive of this stream is still the kernel's (even after a cancel), or its\n"
     "completion waits for the loop core's delivery"},
    {"holding", (getter)Stream_get_holding, NULL,
     "whether data or an EOF read while paused waits for start_reading()"},
    {"dropped_bytes", (getter)Stream_get_dropped_bytes, NULL,
     "bytes received that the protocol never got because the transport closed first"},
    {NULL},
};

PyTypeObject StreamType = {
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
