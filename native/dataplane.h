/* uringloop data plane: the structs every unit shares, and the rules they live by.
 *
 * The units
 * ---------
 *   ring.c         the ring and its records: keys, the one SQE getter, cancel,
 *                  reaping and dispatch, loop close, the fork guard, Ring's methods
 *   requests.c     one-shot socket requests (recv, send, accept, SEND_ZC, splice)
 *                  and the readiness polls of add_reader/add_writer
 *   stream.c       the Stream type: protocol binding, contexts, callbacks into the
 *                  transport, flow control, close_now, the Python methods
 *   stream_send.c  write(): batching, one send per socket, short sends, SEND_ZC
 *   stream_recv.c  receives: the shared buffer ring, multishot and single-shot,
 *                  delivery to Protocol / BufferedProtocol, data held while paused
 *   zcbuf.c        ZeroCopyBuffer and the registered arena behind it
 *   datagram.c     the Datagram type: UDP and Unix datagram transports (multishot
 *                  RECVMSG from a buffer ring, batched SENDMSG/SENDMSG_ZC)
 *   sched.c        the loop core: ready queue, timer heap, asyncio's Handles made in
 *                  C, one loop iteration (_run_once) around ring_wait()
 *   module.c       the module: types, interned names, the at-fork handler
 *
 * The rules (each enforced in one place, named here)
 * ---------------------------------------------------
 * 1. Any call into Python may re-enter. That is every protocol and transport
 *    callback (stream_call, stream_owner_call), get_buffer(), a future's
 *    set_result() (Future subclasses, call_soon), the orphan callback, taking a
 *    buffer of an arbitrary object (3.12's __buffer__), and dropping the last
 *    reference to an application object (its finalizer). Such a call may close or
 *    abort the transport, swap its protocol, pause or resume reading, stop or close
 *    the loop, fork, or raise. So after it, and before touching the ring again for
 *    that stream, the caller re-checks the stream with stream_live() (not closed,
 *    ring usable) and, where it holds a protocol's buffer or callback, compares
 *    s->proto_gen with the generation it started from. Callables are called
 *    through a strong reference taken before the call (stream_call), never
 *    through the Stream's field, which the call may clear.
 *
 * 2. What "cancelled" means. A record is cancelled when its owner no longer wants
 *    the result: the stream closed, the future was cancelled, the poll was
 *    unregistered. Its memory stays with it until the kernel's final CQE (for
 *    SEND_ZC: the notification). A cancelled request that was prepared but not yet
 *    submitted never reaches the kernel: its SQE is rewritten into a NOP with the
 *    same user_data (op_cancel), which completes it with -ECANCELED like any other.
 *    A cancel that answers -ENOENT while its target is still armed found the request
 *    between two states and is sent again (cancel_answered).
 *    Data a cancelled receive brought in is never dropped while its socket lives:
 *    a stream keeps it for resume_reading(), sock_recv hands it to the next
 *    receive on that socket (the orphan callback).
 *
 * 3. A closing ring submits nothing and calls no Python. Ring.close() sets
 *    r->closing first; from then on ring_sqe() refuses every new request (only the
 *    cancels close itself issues go through), and reap() retires completions with
 *    op_retire(), which only gives memory back: no re-arm, no resubmit, no future,
 *    no protocol, no finalizer (references wait in r->graveyard until the drain is
 *    over).
 *
 * 4. Nothing touches the ring after fork. The SQ, the SQE array and the CQ are
 *    memory shared with the kernel and inherited by a child; one SQE the child
 *    writes lands in the slot the parent fills next. ring_sqe() and ring_live() are
 *    the only ways to the ring, and both refuse in a child (ring_forked()); a
 *    Stream method that would need the ring raises RuntimeError there, close_now()
 *    only drops the child's references. The ring memory itself is also marked
 *    MADV_DONTFORK (io_uring_ring_dontfork), so a path that slipped through would
 *    fault in the child instead of corrupting the parent.
 *
 * 5. Memory handed to the kernel lives until the final CQE. A record holds the
 *    object whose memory the kernel reads or writes as a Py_buffer (so it can be
 *    neither resized nor collected), a SEND_ZC record until its notification,
 *    whatever cancels, aborts or closes happen meanwhile. A record holds only that
 *    memory and its Stream; the Stream drops the transport, the protocol and the
 *    contexts in close_now(), so an in-flight request keeps no application object
 *    alive. user_data keys are (generation << 32 | slot): a stale key never
 *    matches the slot's next occupant.
 *
 * 6. A socket request that completes with -EAGAIN moved nothing and is resubmitted
 *    with IORING_RECVSEND_POLL_FIRST (sqe_retry_after_poll), never reported. Our
 *    sockets are O_NONBLOCK (asyncio's are), and a request the kernel already
 *    retried once after a poll is punted to an io-wq worker, whose attempt on an
 *    O_NONBLOCK socket returns -EAGAIN instead of waiting (seen here on AF_UNIX and
 *    TCP streams under load; seastar#3435, liburing#1601). POLL_FIRST makes the
 *    resubmission wait for readiness in the kernel, so it is no busy loop.
 *
 * 7. Lengths: an SQE's len is 32 bits and the kernel moves at most MAX_RW_COUNT
 *    bytes per read or write, so every request is capped at UL_MAX_RW and the rest
 *    goes in the next request, as the syscalls do.
 */
#ifndef URINGLOOP_DATAPLANE_H
#define URINGLOOP_DATAPLANE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "bufpool.h"
#include "compat.h"

/* The kernel's cap on one read or write (MAX_RW_COUNT: INT_MAX rounded down to a page). */
#define UL_MAX_RW 0x7ffff000u

/* Rule 6: resubmit a socket request that completed with a spurious -EAGAIN so that
   the kernel waits for readiness before it tries again. */
static inline void sqe_retry_after_poll(struct io_uring_sqe *sqe)
{
    sqe->ioprio |= IORING_RECVSEND_POLL_FIRST;
}

enum ul_kind {
    UL_FREE = 0,
    UL_POLL,         /* one-shot POLL_ADD, re-armed each iteration: level-triggered like epoll */
    UL_RECV,         /* sock_recv: result is a new bytes object */
    UL_RECV_INTO,    /* sock_recv_into: result is a byte count */
    UL_SENDALL,      /* sock_sendall: resubmits the rest after short sends */
    UL_ACCEPT,       /* sock_accept: result is (fd, address) */
    UL_SENDZC,       /* sock_sendzc: resolves with the byte count at the notification CQE */
    UL_ACCEPT_MULTI, /* a server's multishot accept: each CQE calls fut(fd_or_-errno) */
    UL_RESULT,       /* splice, one-shot poll: the future gets the CQE's result (may be linked) */
    UL_RECVFROM,      /* sock_recvfrom: a RECVMSG, result (bytes, address) */
    UL_RECVFROM_INTO, /* sock_recvfrom_into: a RECVMSG into the caller's buffer, (n, address) */
    UL_FORWARD_POLL,  /* loop.forward()'s one-shot POLL: fut is the Forward, pumped at its CQE */
    /* stream kinds: dispatch sends UL_STREAM_RECV..UL_STREAM_ZC to the stream */
    UL_STREAM_RECV, /* a stream transport's read: data goes to the protocol */
    UL_STREAM_SEND, /* a stream transport's copied send */
    UL_STREAM_ZC,   /* a stream transport's SEND_ZC: done only at its notification CQE */
    /* datagram kinds last: dispatch sends every kind from UL_DGRAM_RECV on to datagram.c */
    UL_DGRAM_RECV, /* a datagram transport's RECVMSG (multishot or single-shot) */
    UL_DGRAM_SEND, /* one datagram: SENDMSG, or SENDMSG_ZC (done at its notification) */
    UL_DGRAM_POLL, /* a datagram transport waiting for room after EAGAIN */
};

static inline int ul_is_stream_kind(int kind) { return kind >= UL_STREAM_RECV && kind <= UL_STREAM_ZC; }
static inline int ul_is_dgram_kind(int kind) { return kind >= UL_DGRAM_RECV; }

typedef struct ul_op {
    uint32_t gen;
    uint32_t slot;
    uint8_t kind;
    uint8_t armed;     /* the kernel owns the request (or will): wait for its final CQE */
    uint8_t cancelled; /* the owner gave up: drop results, keep memory until the final CQE */
    uint8_t nopped;    /* cancelled before submission: its SQE became a NOP */
    uint8_t cancel_sent; /* the kernel will be told (a NOP, or an ASYNC_CANCEL prepared) */
    uint8_t cancel_tries; /* ASYNC_CANCELs sent (a miss is retried, a few times) */
    uint8_t has_view;
    uint8_t queued; /* a fired poll waiting in the re-arm list */
    uint8_t notif;  /* SEND_ZC: the first CQE is in, the notification is awaited */
    uint8_t multi;  /* a stream's multishot receive (buffers from the ring) */
    uint8_t pin_held; /* counted in the ring's pinned totals (SEND_ZC) */
    int fd;
    unsigned arg; /* poll mask, or MSG_* flags */
    uint64_t proto_gen; /* stream receive into a BufferedProtocol's buffer: whose buffer */
    PyObject *fut;
    PyObject *obj;
    PyObject *sock; /* the socket a recv reads for (orphan callback), or the Stream */
    Py_buffer view;
    /* a vectored stream send: one held view per payload in obj (a list) */
    Py_buffer *views;
    struct iovec *iov;
    struct iovec iov1; /* a datagram's one iovec */
    struct msghdr msg;
    int niov, iov_first;
    size_t done;
    size_t pinned; /* SEND_ZC: bytes lent to the kernel until the notification */
    socklen_t addrlen;
    struct sockaddr_storage addr;
    /* where the SQE was prepared, valid while sq_epoch == ring's (not submitted yet) */
    struct io_uring_sqe *sqe;
    uint64_t sq_epoch;
    uint32_t next_free;
} ul_op;

#define UL_NO_SLOT UINT32_MAX
/* user_data 0 marks requests whose completion nobody waits for (cancels). */
#define UL_IGNORE 0ULL
/* The user_data of a cancel: its target's key with this bit set (generations stay
   below 2^31), so that its answer can be read (see cancel_answered). */
#define UL_CANCEL_BIT (1ULL << 63)

typedef struct Ring {
    PyObject_HEAD
    struct io_uring *ring;
    PyObject *owner;     /* the cffi object owning the struct io_uring memory */
    PyObject *orphan_cb; /* orphan_cb(sock, bytes): what a cancelled recv brought in */
    ul_op **ops;
    uint32_t nops, cap, free_head;
    uint32_t inflight;
    uint32_t *rearm;
    uint32_t nrearm, caprearm;
    PyObject *events; /* list of (fd, revents) gathered by the current wait() */
    unsigned long fork_generation;
    uint64_t sq_epoch; /* bumped whenever prepared SQEs are handed to the kernel */
    int enabled;
    unsigned long issuer_thread; /* the thread that enabled the ring (SINGLE_ISSUER's task) */
    int closing; /* Ring.close() has begun: nothing new is submitted (rule 3) */
    int closed;
    int drained;
    int batch_depth;     /* > 0 while reap() dispatches a batch */
    PyObject *graveyard; /* references dropped while closing, released after the drain */
    /* stream transports with queued writes, flushed by the next wait() */
    PyObject **dirty;
    uint32_t ndirty, capdirty;
    int zc_supported; /* SEND_ZC with usage reports (set by the loop after probing) */
    /* multishot stream receives from one provided buffer ring (see rx_setup) */
    int rx_allowed; /* the kernel has multishot recv + buffer rings (set by the loop) */
    int rx_state;   /* 0 not set up yet, 1 ready, -1 unavailable: single-shot recv */
    struct io_uring_buf_ring *rx_ring;
    char *rx_arena;
    size_t rx_map_len;
    unsigned rx_nbufs, rx_bufsize;
    PyObject **rx_ready; /* streams with received data or an ended recv in this batch */
    uint32_t nrx_ready, caprx_ready;
    /* set by the loop core around its wait: the batches' stream deliveries wait for
       ring_deliver_deferred(), after the handles that were ready before the wait */
    int rx_defer;
    Py_ssize_t pinned_bytes;
    unsigned long long pinned_buffers;
    /* counters, exposed by stats() */
    unsigned long long n_enter, n_enter_skipped, n_cqe, n_sqe, n_stray, n_nopped, n_eagain, n_cancel_retries;
    unsigned long long zc_sends, zc_bytes, zc_notifications, zc_copied, copy_fallback;
    unsigned long long copy_sends, copy_bytes;
    unsigned long long rx_cqes, rx_deliveries, rx_enobufs;
    /* buffers of the stream / datagram buffer rings that completions handed us and
       that are not back in their ring yet (a leak detector: 0 between batches) */
    long long rx_bufs_out, dg_bufs_out;
    /* KeyboardInterrupt/SystemExit raised by a callback: raised once the batch is
       done (or at once, by the method that ran the callback outside a batch) */
    PyObject *escaping;
    /* loop.alloc_zerocopy_buffer(): the registered arena, made at the first call */
    PyObject *pool;       /* BufferPool, or NULL */
    Py_ssize_t pool_size; /* bytes to try to register (set by the loop) */
    unsigned long long fixed_sends;
    /* the loop-wide bound on memory lent to the kernel by SEND_ZC; streams paused
       because of it wait here for notifications to bring the total back down */
    Py_ssize_t pinned_limit;
    Py_ssize_t stream_pinned_limit; /* the same bound per stream transport */
    /* bytes SEND_ZC of the application's own memory may pin before RLIMIT_MEMLOCK
       would refuse it (-1: no limit applies); set by the loop, lowered by the arena's
       registration. A datagram above it is copied: a refused SEND_ZC (ENOMEM) goes
       again after the datagrams of its batch that went, out of order. */
    Py_ssize_t zc_pin_budget;
    PyObject **pin_waiters;
    uint32_t npin_waiters, cappin_waiters;
    /* large bytes objects nobody else references any more, for the next single-shot
       stream recv (see rx_spare_take) */
    PyObject *rx_spare[16];
    uint32_t nrx_spare;
    unsigned long long rx_spare_reuses;
    /* datagram transports (datagram.c): those with datagrams to submit this iteration,
       and the buffer ring their multishot receives take from */
    PyObject **dg_dirty;
    uint32_t ndg_dirty, capdg_dirty;
    /* datagram transports whose receive completions of a deferring wait (rx_defer)
       wait for ring_deliver_deferred(), as the streams' on rx_ready */
    PyObject **dg_ready;
    uint32_t ndg_ready, capdg_ready;
    int dg_state; /* 0 not set up yet, 1 ready, -1 unavailable: single-shot RECVMSG */
    struct io_uring_buf_ring *dg_ring;
    char *dg_arena;
    size_t dg_map_len;
    struct dg_addr_entry *dg_addrs; /* source addresses seen lately, as their tuples */
    unsigned long long dg_recv_cqes, dg_recv_enobufs, dg_received, dg_sends, dg_zc_sends, dg_retries;
} Ring;

typedef struct Stream {
    PyObject_HEAD
    Ring *ring;
    int fd;
    PyObject *owner;          /* the Python transport (dropped by close_now, rule 5) */
    PyObject *on_data;        /* protocol.data_received, or NULL for a BufferedProtocol */
    PyObject *get_buffer;     /* BufferedProtocol.get_buffer */
    PyObject *buffer_updated; /* BufferedProtocol.buffer_updated */
    PyObject *proto_error;    /* the protocol's methods could not be looked up: fail with it */
    uint64_t proto_gen;       /* bumped by every set_protocol() and by close_now() */
    PyObject *read_ctx;       /* contextvars.Context the read callbacks run in */
    PyObject *write_ctx;      /* ... and the send-side callbacks */
    int ctx_depth;            /* > 0 while one of this stream's callbacks runs */
    PyObject *held;           /* bytes received while paused, for resume */
    PyObject *wbuf;           /* bytearray: this iteration's small writes */
    PyObject *queue;          /* list of payloads waiting for their send, in order */
    Py_ssize_t queued;        /* bytes written and not yet accepted by the kernel */
    Py_ssize_t head_sent;     /* bytes of queue[0] a direct send already took */
    Py_ssize_t pinned;        /* bytes the kernel may still read (SEND_ZC before notification) */
    Py_ssize_t high, low, pinned_high;
    Py_ssize_t zc_threshold;
    uint64_t recv_key;
    uint64_t send_key; /* the one send in flight (valid while send_armed) */
    uint8_t reading, recv_armed, send_armed, dirty, closed, eof, write_paused;
    uint8_t zc, zc_forced, copied_streak, notify_flushed;
    /* multishot receive: this batch's ring buffers, delivered together after the batch */
    uint8_t rx_multi, rx_ready, rx_ended, rx_bulk, rx_small_reads;
    uint8_t rx_after_eagain; /* the last receive moved nothing (rule 6): poll first */
    uint8_t read_ended;      /* EOF or an error ended the read side: never armed again */
    uint8_t rx_small_buffer; /* the BufferedProtocol's buffers are small: receive into ours */
    uint8_t send_broken;     /* a send failed: nothing more goes (stream_send_failed) */
    uint8_t pin_waiting;     /* on the ring's pin_waiters list */
    uint8_t sendfile_active; /* 1 loop.sendfile(), 2 loop.forward() owns the send side */
    int rx_res;              /* the ended recv's final result (0 EOF, -errno) */
    int held_end;            /* while paused: 1 EOF, -errno an error, after the held data */
    /* bytes received that the protocol never got because the transport closed first
       (held while paused, or brought by a receive that ended after close_now): on
       asyncio's loop they would be unread in the socket, and close() resets it */
    Py_ssize_t dropped;
    uint8_t recv_over_wanted; /* closed: owner._stream_recv_over() once the recv ends */
    struct rx_seg {
        uint32_t bid, len;
    } *segs;
    uint32_t nsegs, capsegs;
    /* a single-shot receive's completion reaped while the ring defers deliveries
       (rx_defer): its record (buffer, or the BufferedProtocol's view) and result wait
       on the ring's rx_ready list like segments do. The kernel is done with the
       memory; the ring frees the record if it closes first (Ring_dealloc frees every
       record itself, so the stream never frees it). */
    struct ul_op *rx_single_op;
    int rx_single_res;
} Stream;

/* The registered arena behind ZeroCopyBuffer objects (zcbuf.c). */
typedef struct {
    PyObject_HEAD
    struct bufpool arena; /* empty (base NULL) when nothing could be registered */
    int registered;       /* the arena is the ring's fixed buffer 0 */
    int closed;           /* the ring closed: lends end without resolving futures */
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

/* ------------------------------------------------------------ module.c */

extern PyTypeObject RingType, StreamType, BufferPoolType, ZeroCopyBufferType;
extern unsigned long ul_fork_generation;
extern PyObject *str_set_result, *str_set_exception, *str_done;
extern PyObject *str_data_received, *str_get_buffer, *str_buffer_updated;
extern PyObject *str_stream_eof, *str_stream_error, *str_stream_flushed, *str_protocol_error;
extern PyObject *str_pause_protocol, *str_resume_protocol, *str_stream_unpinned, *str_is_closed;
extern PyObject *str_stream_recv_over;
extern PyObject *str_fileno;
extern PyObject *ul_minus_one;

#define IS_ZCBUF(o) (Py_IS_TYPE((o), &ZeroCopyBufferType))

/* The exception being raised, normalized, with the error indicator cleared. */
PyObject *ul_fetch_exception(void);

/* ------------------------------------------------------------ ring.c */

static inline int ring_forked(const Ring *r) { return r->fork_generation != ul_fork_generation; }
static inline uint64_t op_key(const ul_op *op) { return ((uint64_t)op->gen << 32) | op->slot; }

/* Whether this process may use the ring for anything (rule 4); sets RuntimeError if not.
   New requests additionally need !r->closing (ring_sqe checks). */
int ring_live(Ring *r);
/* The only way to an SQE (rules 3, 4): NULL with an exception set when the ring is
   closing, closed or inherited, or the SQ is full and cannot be flushed. */
struct io_uring_sqe *ring_sqe(Ring *r);
int ring_enable(Ring *r);
/* One loop iteration's I/O: flush queued writes, submit everything prepared, wait up
   to timeout seconds (< 0: until something completes) in one io_uring_enter, reap and
   dispatch the completions. When *ready (the loop's ready-queue length, or NULL) is
   non-zero after the write flush, whose callbacks may schedule, it does not sleep.
   Returns the fired polls as a list of (fd, revents), or None when there are none;
   NULL with an exception (a callback's KeyboardInterrupt or SystemExit, a forked
   child, a ring error). */
PyObject *ring_wait(Ring *r, double timeout, const Py_ssize_t *ready);
/* The loop stops: what this last iteration's callbacks wrote or sent goes to the
   kernel now (flushed and submitted, not waited for), as asyncio's write() and
   sendto() would have sent it inside the call. Its completions are reaped by the
   next run or by close(). -1 with an exception. */
int ring_flush_out(Ring *r);
/* The stream deliveries a wait with rx_defer set left (data_received, buffer_updated,
   eof_received of multishot receives): made now, as asyncio's loop runs the callbacks of
   the fds its select() found ready after the handles ready before it. 0, or -1 with an
   exception (a callback's KeyboardInterrupt or SystemExit, a fork). */
int ring_deliver_deferred(Ring *r);

/* mmap, register (group bgid) and fill a provided buffer ring of nbufs buffers of
   bufsize bytes; 0, or -1 (nothing kept, no exception) */
int buf_ring_map(Ring *r, unsigned nbufs, size_t bufsize, int bgid,
                 struct io_uring_buf_ring **ring_out, char **arena_out, size_t *len_out);
ul_op *op_lookup(Ring *r, uint64_t key);
ul_op *op_alloc(Ring *r, enum ul_kind kind);
/* Must only be called once the kernel no longer references the record. */
void op_free(Ring *r, ul_op *op);
/* The SQE now belongs to op (its key, armed, in flight). */
void op_armed(Ring *r, ul_op *op, struct io_uring_sqe *sqe);
/* Ask the kernel to finish op early (rule 2); the record stays until its final CQE.
   Returns 0, or -1 with an exception when no SQE could be had. */
int op_cancel(Ring *r, ul_op *op);

/* A callback run on the ring's behalf raised: Exception subclasses are reported;
   KeyboardInterrupt and SystemExit are kept in r->escaping to leave the loop. */
void callback_failed(Ring *r, PyObject *where);
/* For methods called from Python: raise what a callback kept in r->escaping, if the
   method did not run inside a batch; returns result or NULL. */
PyObject *ring_return(Ring *r, PyObject *result);

PyObject *oserror_from(int err);
void fut_resolve(PyObject *fut, PyObject *value, int is_exc);
void fut_fail(PyObject *fut, int err);
void fut_resolve_count(PyObject *fut, int res);
int fut_is_done(PyObject *fut);

/* ------------------------------------------------------------ forward.c */

extern PyTypeObject ForwardType;
/* A UL_FORWARD_POLL completed (its record already freed): the Forward pumps on. */
void forward_polled(Ring *r, PyObject *forward, uint64_t key, int res);
/* The ring closes: a POLL of the Forward is over without running its pump. */
void forward_retired(PyObject *forward, uint64_t key);

void pin(Ring *r, ul_op *op, size_t len);
void unpin(Ring *r, ul_op *op);
/* Memory came back from the kernel: streams paused on the loop-wide bound may go on. */
void pins_released(Ring *r);

/* fault injection (URINGLOOP_FAULTS in builds with -DUL_FAULT_INJECTION): whether the
   next operation of this kind fails; always 0 in normal builds */
enum ul_fault { UL_FAULT_SQE, UL_FAULT_SUBMIT, UL_FAULT_ALLOC, UL_NFAULTS };
#ifdef UL_FAULT_INJECTION
int ul_fault(enum ul_fault which);
#else
#define ul_fault(which) 0
#endif
/* Injected faults off (on is the default under URINGLOOP_FAULTS), or on again and
   counting to the next ones from phase, so that a replayed scenario meets the faults
   it met in a longer run. No-ops in normal builds. */
void ul_faults_on(int on, unsigned long phase);
/* PyMem_Realloc, failing on demand under fault injection. */
void *ul_realloc(void *p, size_t n);

/* The ring's lists of objects to visit after a batch or at the flush (dirty,
   rx_ready, dg_dirty, dg_ready): a reference owned per entry; a walk takes the list
   (items NULL, so what the walk marks starts a new one) and gives it back after. */
static inline int ul_list_push(PyObject ***items, uint32_t *n, uint32_t *cap, PyObject *o)
{
    if (*n == *cap) {
        uint32_t ncap = *cap ? *cap * 2 : 64;
        PyObject **grown = ul_realloc(*items, ncap * sizeof(*grown));
        if (!grown)
            return -1; /* (no exception set) */
        *items = grown;
        *cap = ncap;
    }
    (*items)[(*n)++] = Py_NewRef(o);
    return 0;
}

/* After a walk of a taken list: its allocation is kept, unless the walk began a new one. */
static inline void ul_list_give_back(PyObject ***items, uint32_t *cap, PyObject **taken,
                                     uint32_t taken_cap)
{
    if (*items == NULL) {
        *items = taken;
        *cap = taken_cap;
    } else {
        PyMem_Free(taken);
    }
}

/* ------------------------------------------------------------ requests.c */

void request_complete(Ring *r, ul_op *op, int res, unsigned flags);
void request_retire(Ring *r, ul_op *op, int res, unsigned flags);
int rearm_polls(Ring *r);
PyObject *sockaddr_to_py(const struct sockaddr_storage *ss, socklen_t len);
PyObject *Ring_poll_add(Ring *r, PyObject *args);
PyObject *Ring_poll_modify(Ring *r, PyObject *args);
PyObject *Ring_cancel(Ring *r, PyObject *arg);
PyObject *Ring_recv(Ring *r, PyObject *args);
PyObject *Ring_recv_into(Ring *r, PyObject *args);
PyObject *Ring_recvfrom(Ring *r, PyObject *args);
PyObject *Ring_recvfrom_into(Ring *r, PyObject *args);
PyObject *Ring_sendall(Ring *r, PyObject *args);
PyObject *Ring_accept(Ring *r, PyObject *args);
PyObject *Ring_accept_multishot(Ring *r, PyObject *args);
PyObject *Ring_send_zc(Ring *r, PyObject *args);
PyObject *Ring_splice(Ring *r, PyObject *args);
PyObject *Ring_poll_once(Ring *r, PyObject *args);

/* ------------------------------------------------------------ stream.c */

/* Whether the stream may still use the ring (rule 1's re-check): open, ring live,
   not closing. Sets no exception. */
static inline int stream_live(const Stream *s)
{
    return !s->closed && !s->ring->closing && !s->ring->closed && !ring_forked(s->ring);
}
/* For Python-facing methods: RuntimeError in a forked child. */
int stream_check_fork(Stream *s);
/* Call a protocol callable (a strong reference is held across the call) in ctx. */
PyObject *stream_call(Stream *s, PyObject *callable, PyObject *arg, PyObject *ctx);
/* Call the transport's method name(arg) in ctx (NULL: the current one); a failure
   goes to callback_failed. */
void stream_owner_call(Stream *s, PyObject *name, PyObject *arg, PyObject *ctx);
void stream_owner_error(Stream *s, int err, PyObject *ctx);
/* The protocol raised (exception set): hand it to the transport, which closes. */
void stream_protocol_raised(Stream *s, PyObject *ctx);
void stream_maybe_pause_writing(Stream *s);
void stream_maybe_resume_writing(Stream *s);
/* A SEND_ZC notification brought the stream's lent memory to zero after close. */
void stream_unpinned(Stream *s);
void stream_recv_over(Stream *s);
/* Drop a reference: into the graveyard while the ring closes (no finalizer may run in
   the drain), now otherwise. */
void ring_bury(Ring *r, PyObject **slot);
/* completion of a stream record, normal and while closing (rule 3) */
void stream_complete(Ring *r, ul_op *op, int res, unsigned flags);
void stream_retire(Ring *r, ul_op *op, int res, unsigned flags);

/* ------------------------------------------------------------ stream_send.c */

PyObject *Stream_write(Stream *s, PyObject *data);
void stream_send_complete(Ring *r, Stream *s, ul_op *op, int res, unsigned flags);
void stream_send_retire(Ring *r, Stream *s, ul_op *op, int res, unsigned flags);
void flush_dirty(Ring *r);
void drop_dirty(Ring *r);
/* One non-blocking sendmsg of what is queued and not in flight (all payload kinds when
   all is set); returns bytes sent (>= 0). */
Py_ssize_t stream_write_through(Stream *s, int all);
void stream_drop_queue(Stream *s);
int stream_cancel_key(Stream *s, uint64_t key);

/* ------------------------------------------------------------ stream_recv.c */

int stream_arm_recv(Stream *s);
void stream_recv_complete(Ring *r, Stream *s, ul_op *op, int res, unsigned flags);
void stream_recv_retire(Ring *r, Stream *s, ul_op *op, int res, unsigned flags);
void rx_deliver_ready(Ring *r);
void rx_teardown(Ring *r, int unregister);
/* start_reading(): deliver what was held while paused, then read on */
int stream_resume_delivery(Stream *s);
int rx_spare_keep(Ring *r, PyObject *obj);

/* ------------------------------------------------------------ sched.c */

extern PyTypeObject LoopCoreType;
int sched_ready_types(void);

/* ------------------------------------------------------------ datagram.c */

extern PyTypeObject DatagramType;
int dgram_ready_type(void);
PyObject *Ring_datagram_stats(Ring *r, PyObject *unused);
void dgram_complete(Ring *r, ul_op *op, int res, unsigned flags);
void dgram_retire(Ring *r, ul_op *op, int res, unsigned flags);
/* submit the datagrams queued this iteration (from ring_wait, before the enter) */
void dgram_flush_dirty(Ring *r);
void dgram_drop_dirty(Ring *r);
/* the deferred receive completions of the datagram transports on dg_ready: delivered,
   or (the ring closes) dropped */
void dgram_deliver_ready(Ring *r);
void dgram_drop_ready(Ring *r);
void dgram_teardown(Ring *r, int unregister);

/* ------------------------------------------------------------ zcbuf.c */

void zcbuf_lend(PyObject *obj);
void zcbuf_unlend(PyObject *obj);
void prep_send_zc_payload(Ring *r, struct io_uring_sqe *sqe, int fd, PyObject *payload,
                          char *base, size_t len);
PyObject *Ring_alloc_zerocopy_buffer(Ring *r, PyObject *args);

#endif
