/* The loop core: the ready queue, the timer heap and one iteration of the loop.
 *
 * LoopCore is the first base of UringEventLoop, ahead of asyncio.SelectorEventLoop, so
 * its methods replace BaseEventLoop's per-iteration ones (call_soon, call_later,
 * call_at, call_soon_threadsafe, time, _run_once, _add_callback,
 * _timer_handle_cancelled) while everything else stays asyncio's Python.
 *
 * Invariants
 * ----------
 * 1. The handles are asyncio's own. call_soon() returns an instance of
 *    asyncio.events.Handle and call_at() of asyncio.events.TimerHandle, made in C by
 *    allocating the class and filling its __slots__ at the offsets its member
 *    descriptors give (looked up by name once). cancel(), cancelled(), when(),
 *    get_context(), repr and isinstance checks are asyncio's code on asyncio's objects.
 * 2. Semantics are BaseEventLoop's, step for step: a handle runs in its context with
 *    Context.run's enter/exit; a callback's exception other than SystemExit and
 *    KeyboardInterrupt goes to call_exception_handler with Handle._run's context
 *    dict; those two leave _run_once with the rest of the batch still queued; one
 *    iteration runs exactly the handles that were ready when it began (new ones wait
 *    for the next); timers fire once now + clock_resolution passes their `when`
 *    (never early); ties in the heap break as heapq's do, because the heap is
 *    heapq's algorithm over the same `<` on `when`; cancelled timers are dropped from
 *    the top of the heap, and the whole heap is compacted when more than half of more
 *    than 100 timers are cancelled.
 * 3. Debug mode is asyncio's: with loop.get_debug() true, scheduling goes through
 *    BaseEventLoop's Python methods (thread checks, callback checks, source
 *    tracebacks) and handles run through _run_handle_debug (slow-callback warnings,
 *    _current_handle). Only the queues are ours.
 * 4. Every call into Python may re-enter: schedule, cancel, stop or close the loop,
 *    or (another thread) call_soon_threadsafe. So nothing holds a pointer into the
 *    ready queue or the heap across such a call, and a handle is owned by the
 *    iteration (a strong reference) while it runs.
 * 5. The GIL guards both queues; call_soon_threadsafe() from another thread holds it
 *    while it appends, then wakes the loop through asyncio's self-pipe.
 * 6. A pending timer that only the heap holds is hidden from the GC (see "hidden
 *    timers" below): untracked, with the context call_at copied for it, and traversed
 *    as part of the loop. Every path out of the heap re-tracks it first, so a handle
 *    anybody else can see is an ordinary tracked object.
 */
#include "dataplane.h"

#include <structmember.h>
#include <time.h>

/* asyncio's rule for compacting the heap (base_events._MIN_SCHEDULED_TIMER_HANDLES and
   _MIN_CANCELLED_TIMER_HANDLES_FRACTION) */
#define MIN_SCHEDULED_TIMER_HANDLES 100
#define MIN_CANCELLED_TIMER_HANDLES_FRACTION 0.5
/* base_events.MAXIMUM_SELECT_TIMEOUT */
#define MAXIMUM_SELECT_TIMEOUT (24.0 * 3600.0)

typedef struct {
    double when;
    PyObject *handle; /* a TimerHandle (strong reference) */
    PyObject *ctx;    /* the context hidden with it (strong reference), or NULL */
} ul_timer;

typedef struct LoopCore {
    PyObject_HEAD
    Ring *ring;
    /* the ready queue: a circular buffer of handles, capacity a power of two */
    PyObject **ready;
    Py_ssize_t rhead, rlen, rcap;
    /* the timer heap, ordered by when */
    ul_timer *heap;
    Py_ssize_t nheap, capheap;
    Py_ssize_t timer_cancelled_count;
    double clock_resolution;
    char closed, stopping, debug;
    PyObject *debug_value; /* what _debug was set to, returned as is */
    unsigned int hooks_tag;  /* the type's tp_version_tag when type_hooks was computed */
    unsigned type_hooks;     /* HOOK_* replaced by the loop's class */
    unsigned instance_hooks; /* HOOK_* assigned on the instance */
    PyObject *task_factory;  /* BaseEventLoop._task_factory (None: tasks.Task) */
    unsigned long long n_iterations, n_handles;
    /* timers hidden at call_at whose hiding is not yet confirmed (strong references) */
    PyObject **young;
    Py_ssize_t nyoung, capyoung;
    Py_ssize_t nhidden_ever; /* timers hidden since the last sweep of the heap */
    struct LoopCore *next_loop, **prev_loop; /* in all_loops */
} LoopCore;

/* asyncio.events.Handle / TimerHandle and where their slots live (invariant 1) */
static PyTypeObject *HandleType, *TimerHandleType;
static Py_ssize_t off_callback, off_args, off_cancelled, off_loop, off_source_traceback,
    off_repr, off_context, off_when, off_scheduled;
/* BaseEventLoop's Python methods, for debug mode (invariant 3) */
static PyObject *base_call_soon, *base_call_soon_threadsafe, *base_call_later, *base_create_task;
static PyObject *base_firstiter_hook, *weakset_type;
static PyObject *str_asyncgens, *str_asyncgens_shutdown_called, *str_pending_removals, *str_data,
    *str_remove, *str_add;
/* asyncio.tasks' namespace (create_task uses tasks.Task as it is at the call) and the
   keywords create_task passes it (3.10's Task takes no context) */
#if PY_VERSION_HEX >= 0x030B0000
#define TASK_TAKES_CONTEXT 1
#define TASK_KWNAMES Py_BuildValue("(sss)", "loop", "name", "context")
#else
#define TASK_TAKES_CONTEXT 0
#define TASK_KWNAMES Py_BuildValue("(ss)", "loop", "name")
#endif
static PyObject *tasks_dict, *str_Task, *task_kwnames, *str_name_kw;
/* asyncio.futures' namespace (create_future uses futures.Future as it is at the call) */
static PyObject *futures_dict, *str_Future, *loop_kwnames;
static PyObject *str_call_at_debug, *str_run_handle_debug, *str_handle_raised, *str_ring_events, *str_write_to_self,
    *str_run, *str_cancelled_attr, *str_context_kw;
static PyObject *empty_tuple;
/* per-iteration methods that code may replace (see "hooks" below) */
enum { HOOK_TIME = 1, HOOK_CALL_AT = 2, HOOK_CALL_SOON = 4, HOOK_RUN = 8 };
static PyObject *str_time, *str_call_at, *str_call_soon_private;
static PyObject *core_time, *core_call_at, *core_call_soon_private; /* LoopCore's descriptors */
static PyObject *handle_run_func;                                    /* asyncio's Handle._run */

#define SLOT(o, off) (*(PyObject **)((char *)(o) + (off)))

static void slot_set(PyObject *o, Py_ssize_t off, PyObject *v)
{
    Py_XINCREF(v);
    Py_XSETREF(SLOT(o, off), v);
}

static int slot_offset(PyTypeObject *type, const char *name, Py_ssize_t *off)
{
    PyObject *d = PyDict_GetItemString(type->tp_dict, name);
    if (!d || !Py_IS_TYPE(d, &PyMemberDescr_Type) ||
        ((PyMemberDescrObject *)d)->d_member->type != T_OBJECT_EX) {
        PyErr_Format(PyExc_RuntimeError, "uringloop: %s.%s is not a slot", type->tp_name, name);
        return -1;
    }
    *off = ((PyMemberDescrObject *)d)->d_member->offset;
    return 0;
}

static int intern_name(PyObject **slot, const char *name)
{
    *slot = PyUnicode_InternFromString(name);
    return *slot ? 0 : -1;
}

static int install_settle_hook(void);

static int sched_init_globals(void)
{
    if (HandleType)
        return 0;
    PyObject *events = PyImport_ImportModule("asyncio.events");
    PyObject *base = events ? PyImport_ImportModule("asyncio.base_events") : NULL;
    PyObject *h = events ? PyObject_GetAttrString(events, "Handle") : NULL;
    PyObject *th = h ? PyObject_GetAttrString(events, "TimerHandle") : NULL;
    PyObject *bel = th && base ? PyObject_GetAttrString(base, "BaseEventLoop") : NULL;
    Py_XDECREF(events);
    Py_XDECREF(base);
    if (!bel)
        goto fail;
    if (!PyType_Check(h) || !PyType_Check(th) ||
        !PyType_IsSubtype((PyTypeObject *)th, (PyTypeObject *)h)) {
        PyErr_SetString(PyExc_RuntimeError, "uringloop: asyncio's Handle classes are not types");
        goto fail;
    }
    PyTypeObject *ht = (PyTypeObject *)h, *tht = (PyTypeObject *)th;
    if (slot_offset(ht, "_callback", &off_callback) || slot_offset(ht, "_args", &off_args) ||
        slot_offset(ht, "_cancelled", &off_cancelled) || slot_offset(ht, "_loop", &off_loop) ||
        slot_offset(ht, "_source_traceback", &off_source_traceback) ||
        slot_offset(ht, "_repr", &off_repr) || slot_offset(ht, "_context", &off_context) ||
        slot_offset(tht, "_when", &off_when) || slot_offset(tht, "_scheduled", &off_scheduled))
        goto fail;
    if (!(base_call_soon = PyObject_GetAttrString(bel, "call_soon")) ||
        !(base_call_soon_threadsafe = PyObject_GetAttrString(bel, "call_soon_threadsafe")) ||
        !(base_call_later = PyObject_GetAttrString(bel, "call_later")) ||
        !(base_create_task = PyObject_GetAttrString(bel, "create_task")) ||
        !(base_firstiter_hook = PyObject_GetAttrString(bel, "_asyncgen_firstiter_hook")))
        goto fail;
    PyObject *weakref_mod = PyImport_ImportModule("weakref");
    weakset_type = weakref_mod ? PyObject_GetAttrString(weakref_mod, "WeakSet") : NULL;
    Py_XDECREF(weakref_mod);
    if (!weakset_type || intern_name(&str_asyncgens, "_asyncgens") ||
        intern_name(&str_asyncgens_shutdown_called, "_asyncgens_shutdown_called") ||
        intern_name(&str_pending_removals, "_pending_removals") || intern_name(&str_data, "data") ||
        intern_name(&str_remove, "_remove") || intern_name(&str_add, "add"))
        goto fail;
    if (intern_name(&str_call_at_debug, "_call_at_debug") ||
        intern_name(&str_run_handle_debug, "_run_handle_debug") ||
        intern_name(&str_handle_raised, "_handle_raised") ||
        intern_name(&str_ring_events, "_ring_events") ||
        intern_name(&str_write_to_self, "_write_to_self") || intern_name(&str_run, "_run") ||
        intern_name(&str_cancelled_attr, "_cancelled") || intern_name(&str_context_kw, "context"))
        goto fail;
    if (!(empty_tuple = PyTuple_New(0)))
        goto fail;
    PyObject *tasks_mod = PyImport_ImportModule("asyncio.tasks");
    if (!tasks_mod)
        goto fail;
    tasks_dict = Py_NewRef(PyModule_GetDict(tasks_mod));
    Py_DECREF(tasks_mod);
    PyObject *futures_mod = PyImport_ImportModule("asyncio.futures");
    if (!futures_mod)
        goto fail;
    futures_dict = Py_NewRef(PyModule_GetDict(futures_mod));
    Py_DECREF(futures_mod);
    if (intern_name(&str_Future, "Future") || !(loop_kwnames = Py_BuildValue("(s)", "loop")))
        goto fail;
    if (intern_name(&str_Task, "Task") || intern_name(&str_name_kw, "name") ||
        !(task_kwnames = TASK_KWNAMES))
        goto fail;
    if (intern_name(&str_time, "time") || intern_name(&str_call_at, "call_at") ||
        intern_name(&str_call_soon_private, "_call_soon"))
        goto fail;
    core_time = PyDict_GetItemWithError(LoopCoreType.tp_dict, str_time);
    core_call_at = PyDict_GetItemWithError(LoopCoreType.tp_dict, str_call_at);
    core_call_soon_private = PyDict_GetItemWithError(LoopCoreType.tp_dict, str_call_soon_private);
    handle_run_func = PyDict_GetItemWithError(ht->tp_dict, str_run);
    if (!core_time || !core_call_at || !core_call_soon_private || !handle_run_func) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_RuntimeError, "uringloop: a scheduler method is missing");
        goto fail;
    }
    Py_INCREF(core_time);
    Py_INCREF(core_call_at);
    Py_INCREF(core_call_soon_private);
    Py_INCREF(handle_run_func);
    if (install_settle_hook() < 0)
        goto fail;
    Py_DECREF(bel);
    HandleType = ht;
    TimerHandleType = tht;
    return 0;
fail:
    Py_XDECREF(h);
    Py_XDECREF(th);
    Py_XDECREF(bel);
    return -1;
}

static double monotonic_now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* ------------------------------------------------------------ handles */

/* Whether the handle runs through our fast path: exactly asyncio's classes. */
static inline int handle_is_plain(PyObject *h)
{
    return Py_IS_TYPE(h, HandleType) || Py_IS_TYPE(h, TimerHandleType);
}

/* handle._cancelled, for any Handle instance; -1 with an exception for other objects
   that fail to say */
static int handle_cancelled(PyObject *h)
{
    if (PyObject_TypeCheck(h, HandleType))
        return SLOT(h, off_cancelled) == Py_True;
    PyObject *v = PyObject_GetAttr(h, str_cancelled_attr);
    if (!v)
        return -1;
    int t = PyObject_IsTrue(v);
    Py_DECREF(v);
    return t;
}

/* Handles that ran and that nobody else references (not even weakly) are kept for
   the next call_soon/call_at instead of being freed, as CPython keeps floats and
   frames: a handle is the one allocation every callback costs. A kept handle is
   untracked by the GC and all its slots are empty. */
#define HANDLE_FREELIST 256
static PyObject *free_handles[2][HANDLE_FREELIST];
static int nfree_handles[2];

static const Py_ssize_t *handle_slots(int timer, int *n)
{
    static Py_ssize_t offs[9];
    offs[0] = off_callback, offs[1] = off_args, offs[2] = off_cancelled, offs[3] = off_loop;
    offs[4] = off_source_traceback, offs[5] = off_repr, offs[6] = off_context;
    offs[7] = off_when, offs[8] = off_scheduled;
    *n = timer ? 9 : 7;
    return offs;
}

/* Drop the iteration's reference to a handle that ran (or was skipped). */
static void handle_release(PyObject *h)
{
    int timer = Py_IS_TYPE(h, TimerHandleType);
    if (Py_REFCNT(h) != 1 || !(timer || Py_IS_TYPE(h, HandleType)) ||
        nfree_handles[timer] == HANDLE_FREELIST ||
        (Py_TYPE(h)->tp_weaklistoffset &&
         *(PyObject **)((char *)h + Py_TYPE(h)->tp_weaklistoffset))) {
        Py_DECREF(h);
        return;
    }
    PyObject_GC_UnTrack(h);
    int n;
    const Py_ssize_t *offs = handle_slots(timer, &n);
    for (int i = 0; i < n; i++) /* may run finalizers: h is still ours alone */
        Py_CLEAR(SLOT(h, offs[i]));
    if (Py_REFCNT(h) != 1 || nfree_handles[timer] == HANDLE_FREELIST) {
        PyObject_GC_Track(h); /* a finalizer resurrected it, or filled the list */
        Py_DECREF(h);
        return;
    }
    free_handles[timer][nfree_handles[timer]++] = h;
}

/* A new Handle (or TimerHandle when `when` is given) with asyncio's fields, without
   running its __init__ (invariant 1). Steals nothing. */
static PyObject *handle_new(LoopCore *self, PyTypeObject *type, PyObject *callback,
                            PyObject *args, PyObject *context, PyObject *when)
{
    PyObject *ctx = context && context != Py_None ? Py_NewRef(context) : PyContext_CopyCurrent();
    if (!ctx)
        return NULL;
    int timer = type == TimerHandleType;
    PyObject *h;
    if (nfree_handles[timer]) {
        h = free_handles[timer][--nfree_handles[timer]];
        PyObject_GC_Track(h);
    } else if (!(h = type->tp_alloc(type, 0))) {
        Py_DECREF(ctx);
        return NULL;
    }
    SLOT(h, off_context) = ctx;
    SLOT(h, off_loop) = Py_NewRef((PyObject *)self);
    SLOT(h, off_callback) = Py_NewRef(callback);
    SLOT(h, off_args) = Py_NewRef(args);
    SLOT(h, off_cancelled) = Py_NewRef(Py_False);
    SLOT(h, off_repr) = Py_NewRef(Py_None);
    SLOT(h, off_source_traceback) = Py_NewRef(Py_None);
    if (when) {
        SLOT(h, off_when) = Py_NewRef(when);
        SLOT(h, off_scheduled) = Py_NewRef(Py_False);
    }
    return h;
}

/* ------------------------------------------------------------ the ready queue */

static int ready_push(LoopCore *self, PyObject *h) /* steals h */
{
    if (self->rlen == self->rcap) {
        Py_ssize_t cap = self->rcap ? self->rcap * 2 : 256;
        PyObject **q = PyMem_Malloc(cap * sizeof(PyObject *));
        if (!q) {
            Py_DECREF(h);
            PyErr_NoMemory();
            return -1;
        }
        for (Py_ssize_t i = 0; i < self->rlen; i++)
            q[i] = self->ready[(self->rhead + i) & (self->rcap - 1)];
        PyMem_Free(self->ready);
        self->ready = q;
        self->rhead = 0;
        self->rcap = cap;
    }
    self->ready[(self->rhead + self->rlen) & (self->rcap - 1)] = h;
    self->rlen++;
    return 0;
}

static PyObject *ready_pop(LoopCore *self) /* new reference; rlen > 0 */
{
    PyObject *h = self->ready[self->rhead];
    self->rhead = (self->rhead + 1) & (self->rcap - 1);
    self->rlen--;
    return h;
}

static void ready_clear(LoopCore *self)
{
    /* take them out first: dropping a handle may run a finalizer that schedules */
    while (self->rlen) {
        PyObject *h = ready_pop(self);
        Py_DECREF(h);
    }
}

/* ------------------------------------------------------------ the timer heap */
/* heapq's algorithm exactly (_siftdown / _siftup of Lib/heapq.py), so that timers with
   equal `when` fire in the order they would on asyncio's loop (invariant 2). */

static void heap_siftdown(ul_timer *heap, Py_ssize_t start, Py_ssize_t pos)
{
    ul_timer item = heap[pos];
    while (pos > start) {
        Py_ssize_t parentpos = (pos - 1) >> 1;
        if (item.when < heap[parentpos].when) {
            heap[pos] = heap[parentpos];
            pos = parentpos;
            continue;
        }
        break;
    }
    heap[pos] = item;
}

static void heap_siftup(ul_timer *heap, Py_ssize_t n, Py_ssize_t pos)
{
    Py_ssize_t startpos = pos;
    ul_timer item = heap[pos];
    Py_ssize_t childpos = 2 * pos + 1;
    while (childpos < n) {
        Py_ssize_t rightpos = childpos + 1;
        if (rightpos < n && !(heap[childpos].when < heap[rightpos].when))
            childpos = rightpos;
        heap[pos] = heap[childpos];
        pos = childpos;
        childpos = 2 * pos + 1;
    }
    heap[pos] = item;
    heap_siftdown(heap, startpos, pos);
}

/* h at when; ctx is the context hidden with it or NULL (new references to both) */
static int heap_push(LoopCore *self, PyObject *h, double when, PyObject *ctx)
{
    if (self->nheap == self->capheap) {
        Py_ssize_t cap = self->capheap ? self->capheap * 2 : 64;
        ul_timer *heap = PyMem_Realloc(self->heap, cap * sizeof(ul_timer));
        if (!heap) {
            PyErr_NoMemory();
            return -1;
        }
        self->heap = heap;
        self->capheap = cap;
    }
    self->heap[self->nheap].when = when;
    self->heap[self->nheap].handle = Py_NewRef(h);
    self->heap[self->nheap].ctx = Py_XNewRef(ctx);
    heap_siftdown(self->heap, 0, self->nheap);
    self->nheap++;
    return 0;
}

static void timer_expose(PyObject *h, PyObject *ctx);

/* The earliest timer, a new reference: out of the heap, so tracked again. */
static PyObject *heap_pop(LoopCore *self)
{
    ul_timer top = self->heap[--self->nheap];
    if (self->nheap) {
        ul_timer last = top;
        top = self->heap[0];
        self->heap[0] = last;
        heap_siftup(self->heap, self->nheap, 0);
    }
    timer_expose(top.handle, top.ctx);
    Py_XDECREF(top.ctx); /* (tracked now; with the heap whole, it may go) */
    return top.handle;
}

/* ------------------------------------------------------------ hidden timers
 *
 * Why: a program with many pending timers (the bench's 100,000 call_later, a server
 * with a timeout per connection) pays for them in every GC pass. Each pending timer
 * is a TimerHandle and a copied Context, both GC-tracked, and the full collections
 * that a growing heap triggers walk them all again and again (a third of the time of
 * the timer benchmark). A timer that only the heap holds can be in no cycle the loop
 * does not see, so it is taken off the GC's lists and the loop's traverse visits what
 * it refers to instead, as if the loop held those references itself.
 *
 * Facts of CPython this relies on: the GC's visit functions ignore untracked objects;
 * nothing runs between the passes that compute reachability, so reference counts
 * read in tp_traverse agree across them; a Context must be tracked when it is freed
 * (context_tp_dealloc untracks without checking).
 *
 * The rules, each kept at one place:
 * - schedule_at hides the handle it makes, and the context it copied for it, at once
 *   (timer_hide), and records the handle in `young`: the caller holds it for now, and
 *   usually drops it. The heap entry keeps its own reference to the hidden context
 *   (ul_timer.ctx), so that the context cannot be freed hidden, even when somebody
 *   rebinds the handle's _context.
 * - Settling (timers_settle: at the end of every iteration, and at the start of every
 *   GC pass from a gc.callbacks hook) undoes the hiding of a young handle somebody
 *   else still holds (references beyond the heap's and young's), and of its context
 *   when held beyond the handle and the entry (_context, get_context()).
 * - A settled hidden handle is reachable only through this file or a weak reference.
 *   Every way out of the heap (pop, compaction, clear) and the _scheduled view track
 *   it and its context again first (timer_expose); a hidden context is released only
 *   after that. Handles a weak reference handed out are found by the sweep that starts
 *   each full (generation 2) collection (timers_sweep).
 * - Soundness does not rest on settling: the traverse looks through a hidden handle
 *   only while the heap's is its one reference, and through a hidden context only
 *   while the entry and a looked-through handle account for every reference to it;
 *   otherwise it visits nothing and the contents count as held from outside. A
 *   missed settle (gc.callbacks emptied, the collection at interpreter exit) can
 *   keep garbage alive; it cannot free a live object.
 * - Debug mode hides nothing, nor does a free-threaded build (a reference count says
 *   less there).
 */
#ifdef Py_GIL_DISABLED
static const int timers_hideable = 0;
#else
static int timers_hideable; /* set once the gc.callbacks hook is in place */
#endif
static LoopCore *all_loops; /* every LoopCore alive, for the GC hook */

static inline int hidden_context(PyObject *ctx)
{
    return ctx && PyContext_CheckExact(ctx) && !PyObject_GC_IsTracked(ctx);
}

/* A timer that leaves the heap or is handed out: tracked again, with the context in
   its _context and the one its entry hid (ctx, may be NULL). */
static void timer_expose(PyObject *h, PyObject *ctx)
{
    if (!PyObject_GC_IsTracked(h))
        PyObject_GC_Track(h);
    PyObject *slot_ctx = SLOT(h, off_context);
    if (hidden_context(slot_ctx))
        PyObject_GC_Track(slot_ctx);
    if (hidden_context(ctx))
        PyObject_GC_Track(ctx);
}

/* Room for one more young timer: 0 when there is no memory (nothing is hidden then). */
static int young_reserve(LoopCore *self)
{
    if (self->nyoung < self->capyoung)
        return 1;
    Py_ssize_t cap = self->capyoung ? self->capyoung * 2 : 64;
    PyObject **young = PyMem_Realloc(self->young, cap * sizeof(PyObject *));
    if (!young)
        return 0;
    self->young = young;
    self->capyoung = cap;
    return 1;
}

/* h, just pushed by schedule_at with room reserved in young, leaves the GC's lists;
   so does ctx, the context schedule_at copied for it and gave its entry (or NULL). */
static void timer_hide(LoopCore *self, PyObject *h, PyObject *ctx)
{
    self->young[self->nyoung++] = Py_NewRef(h);
    self->nhidden_ever++;
    if (PyObject_GC_IsTracked(h))
        PyObject_GC_UnTrack(h);
    if (ctx && PyObject_GC_IsTracked(ctx))
        PyObject_GC_UnTrack(ctx);
}

/* Confirm or undo the hiding of the young timers (see the rules above). */
static void timers_settle(LoopCore *self)
{
    Py_ssize_t n = self->nyoung, cap = self->capyoung;
    if (!n)
        return;
    PyObject **young = self->young;
    self->young = NULL;
    self->nyoung = self->capyoung = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *h = young[i];
        if (PyObject_GC_IsTracked(h))
            continue; /* exposed already */
        PyObject *ctx = SLOT(h, off_context);
        if (Py_REFCNT(h) > 2) /* the heap's, young's, and somebody's */
            timer_expose(h, NULL);
        else if (hidden_context(ctx) && Py_REFCNT(ctx) > 2) /* the entry's, _context, ... */
            PyObject_GC_Track(ctx);
    }
    /* only after every check: a handle that left the heap may go now and run a
       finalizer, which may schedule (into a fresh young list) */
    for (Py_ssize_t i = 0; i < n; i++)
        Py_DECREF(young[i]);
    if (!self->young) { /* keep the memory for the next iteration */
        self->young = young;
        self->capyoung = cap;
    } else {
        PyMem_Free(young);
    }
}

/* Before a full collection: expose the hidden timers somebody reached through a weak
   reference since they were settled (nothing young is left: settled just before). */
static void timers_sweep(LoopCore *self)
{
    if (!self->nhidden_ever)
        return;
    Py_ssize_t hidden = 0;
    for (Py_ssize_t i = 0; i < self->nheap; i++) {
        ul_timer *e = &self->heap[i];
        int h_hidden = !PyObject_GC_IsTracked(e->handle);
        if (h_hidden && Py_REFCNT(e->handle) > 1) {
            timer_expose(e->handle, e->ctx);
            continue;
        }
        if (hidden_context(e->ctx)) {
            Py_ssize_t mine = 1 + (h_hidden && SLOT(e->handle, off_context) == e->ctx);
            if (Py_REFCNT(e->ctx) > mine)
                PyObject_GC_Track(e->ctx);
        }
        hidden += h_hidden || hidden_context(e->ctx);
    }
    self->nhidden_ever = hidden; /* 0: the next sweeps skip this loop */
}

/* gc.callbacks hook: every pass begins with the young timers of every loop settled,
   and a full one with the heaps swept. */
static PyObject *settle_timers_hook(PyObject *unused, PyObject *args)
{
    PyObject *phase, *info;
    if (!PyArg_UnpackTuple(args, "_settle_timers", 2, 2, &phase, &info))
        return NULL;
    if (!PyUnicode_Check(phase) || PyUnicode_CompareWithASCIIString(phase, "start") != 0)
        Py_RETURN_NONE;
    int full = 0;
    PyObject *gen = PyDict_Check(info) ? PyDict_GetItemString(info, "generation") : NULL;
    if (gen && PyLong_Check(gen))
        full = PyLong_AsLong(gen) == 2;
    /* Settling may run finalizers (which may schedule, or free a loop): the loops to
       visit are taken first, each held. A loop being freed (no references left) is
       skipped: its dealloc is under way. */
    Py_ssize_t n = 0;
    for (LoopCore *l = all_loops; l; l = l->next_loop)
        n += Py_REFCNT(l) > 0 && (l->nyoung || (full && l->nhidden_ever));
    if (!n)
        Py_RETURN_NONE;
    LoopCore **loops = PyMem_Malloc(n * sizeof(LoopCore *));
    if (!loops)
        Py_RETURN_NONE; /* (only garbage may stay for a pass longer) */
    Py_ssize_t k = 0;
    for (LoopCore *l = all_loops; l && k < n; l = l->next_loop)
        if (Py_REFCNT(l) > 0 && (l->nyoung || (full && l->nhidden_ever)))
            loops[k++] = (LoopCore *)Py_NewRef((PyObject *)l);
    for (Py_ssize_t i = 0; i < k; i++) {
        timers_settle(loops[i]);
        if (full)
            timers_sweep(loops[i]);
    }
    for (Py_ssize_t i = 0; i < k; i++)
        Py_DECREF(loops[i]);
    PyMem_Free(loops);
    if (PyErr_Occurred()) /* (a finalizer's error has been reported already) */
        PyErr_Clear();
    Py_RETURN_NONE;
}

static PyMethodDef settle_timers_def = {
    "_settle_timers", settle_timers_hook, METH_VARARGS,
    "uringloop: re-tracks the pending timers that another object holds"};

static int install_settle_hook(void)
{
#ifndef Py_GIL_DISABLED
    PyObject *gc = PyImport_ImportModule("gc");
    PyObject *callbacks = gc ? PyObject_GetAttrString(gc, "callbacks") : NULL;
    PyObject *hook = callbacks ? PyCFunction_New(&settle_timers_def, NULL) : NULL;
    int ok = hook && PyList_Check(callbacks) && PyList_Append(callbacks, hook) == 0;
    Py_XDECREF(hook);
    Py_XDECREF(callbacks);
    Py_XDECREF(gc);
    if (!ok && PyErr_Occurred())
        return -1;
    timers_hideable = ok;
#endif
    return 0;
}

static void loop_link(LoopCore *self)
{
    self->next_loop = all_loops;
    if (all_loops)
        all_loops->prev_loop = &self->next_loop;
    all_loops = self;
    self->prev_loop = &all_loops;
}

static void loop_unlink(LoopCore *self)
{
    if (!self->prev_loop)
        return;
    *self->prev_loop = self->next_loop;
    if (self->next_loop)
        self->next_loop->prev_loop = self->prev_loop;
    self->next_loop = NULL;
    self->prev_loop = NULL;
}

typedef struct {
    visitproc visit;
    void *arg;
} visit_pass;

/* The visit of a looked-through handle's slots: hidden contexts are left to the
   entry that hid them (visiting an untracked object does nothing anyway). */
static int visit_hidden_slot(PyObject *o, void *p)
{
    visit_pass *vp = p;
    return hidden_context(o) ? 0 : vp->visit(o, vp->arg);
}

static int heap_traverse(LoopCore *self, visitproc visit, void *arg)
{
    visit_pass pass = {visit, arg};
    for (Py_ssize_t i = 0; i < self->nheap; i++) {
        PyObject *h = self->heap[i].handle, *ctx = self->heap[i].ctx;
        int through = 0;
        if (PyObject_GC_IsTracked(h)) {
            Py_VISIT(h);
        } else if (Py_REFCNT(h) == 1) {
            through = 1;
            int r = Py_TYPE(h)->tp_traverse(h, visit_hidden_slot, &pass);
            if (r)
                return r;
        }
        if (!ctx)
            continue;
        if (PyObject_GC_IsTracked(ctx)) {
            Py_VISIT(ctx);
        } else if (Py_REFCNT(ctx) == 1 + (through && SLOT(h, off_context) == ctx)) {
            int r = Py_TYPE(ctx)->tp_traverse(ctx, visit, arg);
            if (r)
                return r;
        }
    }
    for (Py_ssize_t i = 0; i < self->nyoung; i++) /* (hidden ones are not handed out) */
        if (PyObject_GC_IsTracked(self->young[i]))
            Py_VISIT(self->young[i]);
    return 0;
}

static void heap_clear(LoopCore *self)
{
    while (self->nheap) {
        ul_timer e = self->heap[--self->nheap];
        timer_expose(e.handle, e.ctx);
        Py_XDECREF(e.ctx);
        Py_DECREF(e.handle);
    }
}

static void young_clear(LoopCore *self)
{
    while (self->nyoung) {
        PyObject *h = self->young[--self->nyoung];
        Py_DECREF(h);
    }
}

/* Timer handles only get here through call_at (or the _scheduled setter), which
   checked the type. */
static inline int timer_cancelled(PyObject *h) { return SLOT(h, off_cancelled) == Py_True; }

/* asyncio's clean-up at the top of _run_once (invariant 2). */
static void heap_drop_cancelled(LoopCore *self)
{
    Py_ssize_t n = self->nheap;
    if (n > MIN_SCHEDULED_TIMER_HANDLES &&
        (double)self->timer_cancelled_count / (double)n > MIN_CANCELLED_TIMER_HANDLES_FRACTION) {
        /* compact: keep the live ones, then heapify; drop references only afterwards
           (a finalizer may schedule) */
        ul_timer *dropped = PyMem_Malloc(n * sizeof(ul_timer));
        if (!dropped) /* no memory for the list: pop from the top instead */
            goto from_top;
        Py_ssize_t kept = 0, ndropped = 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            if (timer_cancelled(self->heap[i].handle))
                dropped[ndropped++] = self->heap[i];
            else
                self->heap[kept++] = self->heap[i];
        }
        self->nheap = kept;
        for (Py_ssize_t i = kept / 2 - 1; i >= 0; i--)
            heap_siftup(self->heap, kept, i);
        self->timer_cancelled_count = 0;
        /* only now, with the heap whole again: these may run finalizers */
        for (Py_ssize_t i = 0; i < ndropped; i++)
            timer_expose(dropped[i].handle, dropped[i].ctx);
        for (Py_ssize_t i = 0; i < ndropped; i++) {
            slot_set(dropped[i].handle, off_scheduled, Py_False);
            Py_XDECREF(dropped[i].ctx);
            Py_DECREF(dropped[i].handle);
        }
        PyMem_Free(dropped);
        return;
    }
from_top:
    while (self->nheap && timer_cancelled(self->heap[0].handle)) {
        self->timer_cancelled_count--;
        PyObject *h = heap_pop(self);
        slot_set(h, off_scheduled, Py_False);
        Py_DECREF(h);
    }
}

/* ------------------------------------------------------------ scheduling */

static int check_open(LoopCore *self)
{
    if (self->closed) {
        PyErr_SetString(PyExc_RuntimeError, "Event loop is closed");
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------ hooks */
/* Code that replaces a per-iteration method (a subclass, a test's virtual clock that
   patches loop.time, a profiler that patches Handle._run) gets what asyncio would do
   with it: the C paths check, per call, whether any of these is replaced and then go
   through asyncio's Python, which calls the replacement. Checking is cheap because a
   type's tp_version_tag changes whenever the type (or a base) is modified; assigning
   one of the names on the loop instance is seen by LoopCore_setattro. */
static unsigned int handle_run_tag;
static int handle_run_patched;

static int hook_replaced(PyTypeObject *type, PyObject *name, PyObject *ours)
{
    PyObject *found = PyObject_GetAttr((PyObject *)type, name);
    if (!found) {
        PyErr_Clear();
        return 1;
    }
    int replaced = found != ours;
    Py_DECREF(found);
    return replaced;
}

static unsigned loop_hooks(LoopCore *self)
{
    PyTypeObject *type = Py_TYPE(self);
    if (!type->tp_version_tag || type->tp_version_tag != self->hooks_tag) {
        unsigned hooks = 0;
        if (hook_replaced(type, str_time, core_time))
            hooks |= HOOK_TIME;
        if (hook_replaced(type, str_call_at, core_call_at))
            hooks |= HOOK_CALL_AT;
        if (hook_replaced(type, str_call_soon_private, core_call_soon_private))
            hooks |= HOOK_CALL_SOON;
        self->type_hooks = hooks;
        self->hooks_tag = type->tp_version_tag; /* (assigned by the lookups above) */
    }
    if (!HandleType->tp_version_tag || HandleType->tp_version_tag != handle_run_tag) {
        handle_run_patched = hook_replaced(HandleType, str_run, handle_run_func);
        handle_run_tag = HandleType->tp_version_tag;
    }
    return self->type_hooks | self->instance_hooks | (handle_run_patched ? HOOK_RUN : 0);
}

static int LoopCore_setattro(LoopCore *self, PyObject *name, PyObject *value)
{
    if (name == str_time)
        self->instance_hooks |= HOOK_TIME;
    else if (name == str_call_at)
        self->instance_hooks |= HOOK_CALL_AT;
    else if (name == str_call_soon_private)
        self->instance_hooks |= HOOK_CALL_SOON;
    return PyObject_GenericSetAttr((PyObject *)self, name, value);
}

/* The loop's clock: time.monotonic(), or the time() that replaced ours. */
static int loop_now(LoopCore *self, unsigned hooks, double *now)
{
    if (!(hooks & HOOK_TIME)) {
        *now = monotonic_now();
        return 0;
    }
    PyObject *t = PyObject_CallMethodNoArgs((PyObject *)self, str_time);
    if (!t)
        return -1;
    *now = PyFloat_AsDouble(t);
    Py_DECREF(t);
    return *now == -1.0 && PyErr_Occurred() ? -1 : 0;
}

/* ------------------------------------------------------------ argument binding */

/* Binds (name_0, ..., name_{n-1}, *args, context=None), as the Python signatures of
   call_soon/call_later/call_at do: the named parameters positionally or by keyword,
   the rest positionally into *cb_args (a new tuple). */
static int bind_callback_args(const char *fname, const char *const *names, int nnames,
                              PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                              PyObject **bound, PyObject **cb_args, PyObject **context)
{
    *context = NULL;
    for (int i = 0; i < nnames; i++)
        bound[i] = i < nargs ? args[i] : NULL;
    if (kwnames) {
        Py_ssize_t nkw = PyTuple_GET_SIZE(kwnames);
        for (Py_ssize_t k = 0; k < nkw; k++) {
            PyObject *name = PyTuple_GET_ITEM(kwnames, k), *value = args[nargs + k];
            if (name == str_context_kw ||
                (PyUnicode_Check(name) && PyUnicode_Compare(name, str_context_kw) == 0)) {
                *context = value;
                continue;
            }
            int i = 0;
            while (i < nnames && !(PyUnicode_Check(name) &&
                                   PyUnicode_CompareWithASCIIString(name, names[i]) == 0))
                i++;
            if (i == nnames) {
                PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%S'",
                             fname, name);
                return -1;
            }
            if (bound[i]) {
                PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'",
                             fname, names[i]);
                return -1;
            }
            bound[i] = value;
        }
    }
    for (int i = 0; i < nnames; i++) {
        if (!bound[i]) {
            PyErr_Format(PyExc_TypeError, "%s() missing required positional argument: '%s'",
                         fname, names[i]);
            return -1;
        }
    }
    Py_ssize_t n = nargs > nnames ? nargs - nnames : 0;
    if (n == 0) {
        *cb_args = Py_NewRef(empty_tuple);
    } else {
        PyObject *t = PyTuple_New(n);
        if (!t)
            return -1;
        for (Py_ssize_t i = 0; i < n; i++)
            PyTuple_SET_ITEM(t, i, Py_NewRef(args[nnames + i]));
        *cb_args = t;
    }
    return 0;
}

static const char *const soon_names[] = {"callback"};
static const char *const later_names[] = {"delay", "callback"};
static const char *const at_names[] = {"when", "callback"};

/* BaseEventLoop's own method (debug mode, replaced hooks: invariant 3). */
static PyObject *call_base(PyObject *func, LoopCore *self, PyObject *const *args, size_t nargsf,
                           PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    PyObject *small[8], **stack = small;
    if (nargs + nkw + 1 > 8 && !(stack = PyMem_Malloc((nargs + nkw + 1) * sizeof(PyObject *))))
        return PyErr_NoMemory();
    stack[0] = (PyObject *)self;
    for (Py_ssize_t i = 0; i < nargs + nkw; i++)
        stack[i + 1] = args[i];
    PyObject *res = PyObject_Vectorcall(func, stack, nargs + 1, kwnames);
    if (stack != small)
        PyMem_Free(stack);
    return res;
}

static PyObject *schedule_soon(LoopCore *self, const char *fname, PyObject *const *args,
                               Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *callback, *cb_args, *context;
    if (check_open(self) < 0)
        return NULL;
    if (bind_callback_args(fname, soon_names, 1, args, nargs, kwnames, &callback, &cb_args,
                           &context) < 0)
        return NULL;
    PyObject *h = handle_new(self, HandleType, callback, cb_args, context, NULL);
    Py_DECREF(cb_args);
    if (!h || ready_push(self, Py_NewRef(h)) < 0) {
        Py_XDECREF(h);
        return NULL;
    }
    return h;
}

static PyObject *LoopCore_call_soon(LoopCore *self, PyObject *const *args, size_t nargsf,
                                    PyObject *kwnames)
{
    if (self->debug || (loop_hooks(self) & HOOK_CALL_SOON))
        return call_base(base_call_soon, self, args, nargsf, kwnames);
    return schedule_soon(self, "call_soon", args, PyVectorcall_NARGS(nargsf), kwnames);
}

static PyObject *LoopCore_call_soon_threadsafe(LoopCore *self, PyObject *const *args,
                                               size_t nargsf, PyObject *kwnames)
{
    if (self->debug || (loop_hooks(self) & HOOK_CALL_SOON))
        return call_base(base_call_soon_threadsafe, self, args, nargsf, kwnames);
    PyObject *h =
        schedule_soon(self, "call_soon_threadsafe", args, PyVectorcall_NARGS(nargsf), kwnames);
    if (!h)
        return NULL;
    PyObject *r = PyObject_CallMethodNoArgs((PyObject *)self, str_write_to_self);
    if (!r) {
        Py_DECREF(h);
        return NULL;
    }
    Py_DECREF(r);
    return h;
}

/* _call_soon(callback, args, context): what BaseEventLoop's Python methods call in
   debug mode; asyncio's Handle.__init__ then records the source traceback. */
static PyObject *LoopCore__call_soon(LoopCore *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "_call_soon(callback, args, context)");
        return NULL;
    }
    PyObject *h;
    if (self->debug) {
        PyObject *a[4] = {args[0], args[1], (PyObject *)self, args[2]};
        h = PyObject_Vectorcall((PyObject *)HandleType, a, 4, NULL);
    } else {
        h = handle_new(self, HandleType, args[0], args[1], args[2], NULL);
    }
    if (!h || ready_push(self, Py_NewRef(h)) < 0) {
        Py_XDECREF(h);
        return NULL;
    }
    return h;
}

/* A timer at when_obj; the caller bound callback, cb_args and context. */
static PyObject *schedule_at(LoopCore *self, PyObject *when_obj, PyObject *callback,
                             PyObject *cb_args, PyObject *context)
{
    double when = PyFloat_AsDouble(when_obj);
    if (when == -1.0 && PyErr_Occurred())
        return NULL;
    if (check_open(self) < 0)
        return NULL;
    PyObject *h = handle_new(self, TimerHandleType, callback, cb_args, context, when_obj);
    if (!h)
        return NULL;
    /* hidden from the GC (a context the caller gave stays as it is) */
    int hide = timers_hideable && !self->debug && young_reserve(self);
    PyObject *own_ctx = hide && !(context && context != Py_None) ? SLOT(h, off_context) : NULL;
    if (heap_push(self, h, when, own_ctx) < 0) {
        Py_DECREF(h);
        return NULL;
    }
    slot_set(h, off_scheduled, Py_True);
    if (hide)
        timer_hide(self, h, own_ctx);
    return h;
}

static PyObject *LoopCore_call_at(LoopCore *self, PyObject *const *args, size_t nargsf,
                                  PyObject *kwnames)
{
    if (self->debug) { /* BaseEventLoop.call_at pushes with heapq: the loop's Python twin */
        PyObject *meth = PyObject_GetAttr((PyObject *)self, str_call_at_debug);
        PyObject *res = meth ? PyObject_Vectorcall(meth, args, nargsf, kwnames) : NULL;
        Py_XDECREF(meth);
        return res;
    }
    PyObject *bound[2], *cb_args, *context;
    if (bind_callback_args("call_at", at_names, 2, args, PyVectorcall_NARGS(nargsf), kwnames,
                           bound, &cb_args, &context) < 0)
        return NULL;
    PyObject *h = NULL;
    if (bound[0] == Py_None)
        PyErr_SetString(PyExc_TypeError, "when cannot be None");
    else
        h = schedule_at(self, bound[0], bound[1], cb_args, context);
    Py_DECREF(cb_args);
    return h;
}

static PyObject *LoopCore_call_later(LoopCore *self, PyObject *const *args, size_t nargsf,
                                     PyObject *kwnames)
{
    if (self->debug || (loop_hooks(self) & (HOOK_TIME | HOOK_CALL_AT)))
        return call_base(base_call_later, self, args, nargsf, kwnames);
    PyObject *bound[2], *cb_args, *context;
    if (bind_callback_args("call_later", later_names, 2, args, PyVectorcall_NARGS(nargsf),
                           kwnames, bound, &cb_args, &context) < 0)
        return NULL;
    PyObject *delay = bound[0], *when = NULL, *h = NULL;
    if (delay == Py_None) {
        PyErr_SetString(PyExc_TypeError, "delay must not be None");
    } else if (PyFloat_CheckExact(delay)) {
        when = PyFloat_FromDouble(monotonic_now() + PyFloat_AS_DOUBLE(delay));
    } else {
        /* asyncio's `self.time() + delay`, with whatever that means for the type */
        PyObject *now = PyFloat_FromDouble(monotonic_now());
        when = now ? PyNumber_Add(now, delay) : NULL;
        Py_XDECREF(now);
    }
    if (when)
        h = schedule_at(self, when, bound[1], cb_args, context);
    Py_XDECREF(when);
    Py_DECREF(cb_args);
    return h;
}

/* BaseEventLoop._asyncgen_firstiter_hook, which sys.set_asyncgen_hooks runs at the first
   step of every async generator: `self._asyncgens.add(agen)`, with WeakSet.add's work
   (a weak reference with the set's _remove callback, into its data) done here while
   _asyncgens is a plain WeakSet with no removals pending. The warning after
   shutdown_asyncgens() and anything unusual are asyncio's Python. */
static PyObject *LoopCore__asyncgen_firstiter_hook(LoopCore *self, PyObject *agen)
{
    PyObject *called = PyObject_GetAttr((PyObject *)self, str_asyncgens_shutdown_called);
    int late = called ? PyObject_IsTrue(called) : -1;
    Py_XDECREF(called);
    if (late < 0)
        return NULL;
    if (late)
        return call_base(base_firstiter_hook, self, &agen, 1, NULL);
    PyObject *gens = PyObject_GetAttr((PyObject *)self, str_asyncgens);
    if (!gens)
        return NULL;
    PyObject *res = NULL;
    if (Py_IS_TYPE(gens, (PyTypeObject *)weakset_type)) {
        PyObject *pending = PyObject_GetAttr(gens, str_pending_removals);
        PyObject *data = pending ? PyObject_GetAttr(gens, str_data) : NULL;
        PyObject *remove = data ? PyObject_GetAttr(gens, str_remove) : NULL;
        if (remove && PyList_CheckExact(pending) && PyList_GET_SIZE(pending) == 0 &&
            PySet_CheckExact(data)) {
            PyObject *ref = PyWeakref_NewRef(agen, remove);
            if (ref && PySet_Add(data, ref) == 0)
                res = Py_NewRef(Py_None);
            Py_XDECREF(ref);
            Py_DECREF(pending);
            Py_DECREF(data);
            Py_DECREF(remove);
            Py_DECREF(gens);
            return res;
        }
        Py_XDECREF(pending);
        Py_XDECREF(data);
        Py_XDECREF(remove);
        if (PyErr_Occurred()) {
            Py_DECREF(gens);
            return NULL;
        }
    }
    res = PyObject_CallMethodOneArg(gens, str_add, agen);
    Py_DECREF(gens);
    return res;
}

static PyObject *LoopCore_time(LoopCore *self, PyObject *unused)
{
    return PyFloat_FromDouble(monotonic_now());
}

/* Call the class a module's namespace holds under name now (asyncio's code looks
   tasks.Task and futures.Future up at each call, so a patched one is used too). */
static PyObject *call_module_class(PyObject *ns, PyObject *name, PyObject *const *args,
                                   Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *cls = PyDict_GetItemWithError(ns, name);
    if (!cls) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_AttributeError, "asyncio has no %U", name);
        return NULL;
    }
    Py_INCREF(cls); /* the call may replace it in the namespace */
    PyObject *obj = PyObject_Vectorcall(cls, args, nargs, kwnames);
    Py_DECREF(cls);
    return obj;
}

/* create_task(coro, *, name=None, context=None) without a task factory: asyncio's
   `tasks.Task(coro, loop=self, name=name, context=context)`; anything else (a factory,
   debug mode, other arguments) is BaseEventLoop.create_task. Python 3.10's create_task
   and Task take no context: there a context= goes to BaseEventLoop.create_task too, which
   raises the TypeError asyncio's loop raises. */
static PyObject *LoopCore_create_task(LoopCore *self, PyObject *const *args, size_t nargsf,
                                      PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *name = Py_None, *context = Py_None;
    int plain = !self->debug && nargs == 1 && self->task_factory == Py_None;
    for (Py_ssize_t k = 0; plain && kwnames && k < PyTuple_GET_SIZE(kwnames); k++) {
        PyObject *kw = PyTuple_GET_ITEM(kwnames, k);
        if (kw == str_name_kw)
            name = args[nargs + k];
        else if (TASK_TAKES_CONTEXT && kw == str_context_kw)
            context = args[nargs + k];
        else
            plain = 0;
    }
    if (!plain)
        return call_base(base_create_task, self, args, nargsf, kwnames);
    if (check_open(self) < 0)
        return NULL;
    PyObject *stack[4] = {args[0], (PyObject *)self, name, context}; /* (3.10: no context) */
    return call_module_class(tasks_dict, str_Task, stack, 1, task_kwnames);
}

static PyObject *get_debug(LoopCore *self, void *c);

/* create_future(): asyncio's `futures.Future(loop=self)`, without a Python frame. */
static PyObject *LoopCore_create_future(LoopCore *self, PyObject *unused)
{
    PyObject *stack[1] = {(PyObject *)self};
    return call_module_class(futures_dict, str_Future, stack, 0, loop_kwnames);
}

/* get_debug(): every Future and Task asks it when made. */
static PyObject *LoopCore_get_debug(LoopCore *self, PyObject *unused)
{
    return get_debug(self, NULL);
}

static PyObject *get_task_factory(LoopCore *self, void *c)
{
    return Py_NewRef(self->task_factory ? self->task_factory : Py_None);
}

static int set_task_factory(LoopCore *self, PyObject *v, void *c)
{
    if (!v) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete the loop's task factory");
        return -1;
    }
    Py_XSETREF(self->task_factory, Py_NewRef(v));
    return 0;
}

static PyObject *LoopCore__add_callback(LoopCore *self, PyObject *h)
{
    int c = handle_cancelled(h);
    if (c < 0)
        return NULL;
    if (!c && ready_push(self, Py_NewRef(h)) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *LoopCore__timer_handle_cancelled(LoopCore *self, PyObject *h)
{
    if (PyObject_TypeCheck(h, TimerHandleType) && SLOT(h, off_scheduled) == Py_True)
        self->timer_cancelled_count++;
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------ one iteration */

/* Make exc the exception being handled (sys.exception()); returns the previous one. */
static PyObject *handled_exception_swap(PyObject *exc)
{
#if PY_VERSION_HEX >= 0x030B0000
    PyObject *old = PyErr_GetHandledException();
    PyErr_SetHandledException(exc);
    return old;
#else
    PyObject *type, *value, *tb;
    PyErr_GetExcInfo(&type, &value, &tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    if (exc)
        PyErr_SetExcInfo(Py_NewRef((PyObject *)Py_TYPE(exc)), Py_NewRef(exc),
                         PyException_GetTraceback(exc));
    else
        PyErr_SetExcInfo(NULL, NULL, NULL);
    return value;
#endif
}

/* Run one handle as Handle._run does (invariant 2). Returns -1 only for what must
   leave _run_once (SystemExit, KeyboardInterrupt, or a failing exception handler). */
static int handle_run(LoopCore *self, PyObject *h, unsigned hooks)
{
    PyObject *res;
    if (self->debug) {
        res = PyObject_CallMethodOneArg((PyObject *)self, str_run_handle_debug, h);
        goto done;
    }
    PyObject *cb = handle_is_plain(h) && !(hooks & HOOK_RUN) ? SLOT(h, off_callback) : NULL;
    PyObject *cb_args = cb ? SLOT(h, off_args) : NULL;
    PyObject *ctx = cb ? SLOT(h, off_context) : NULL;
    if (!cb || !cb_args || !PyTuple_CheckExact(cb_args) || !ctx || !PyContext_CheckExact(ctx)) {
        /* a Handle subclass, or fields someone changed: asyncio's own _run */
        res = PyObject_CallMethodNoArgs(h, str_run);
        goto done;
    }
    /* the callback may cancel its own handle, which clears these slots */
    Py_INCREF(cb);
    Py_INCREF(cb_args);
    Py_INCREF(ctx);
    if (PyContext_Enter(ctx) < 0) {
        res = NULL;
    } else {
        res = PyObject_Vectorcall(cb, &PyTuple_GET_ITEM(cb_args, 0), PyTuple_GET_SIZE(cb_args),
                                  NULL);
        if (PyContext_Exit(ctx) < 0)
            Py_CLEAR(res);
    }
    Py_DECREF(cb);
    Py_DECREF(cb_args);
    Py_DECREF(ctx);
    if (!res) {
        if (PyErr_ExceptionMatches(PyExc_SystemExit) ||
            PyErr_ExceptionMatches(PyExc_KeyboardInterrupt))
            return -1;
        /* the handler runs as inside asyncio's `except BaseException:` (sys.exc_info(),
           logging.exception() and the __context__ of what it raises see the error) */
        PyObject *exc = ul_fetch_exception();
        PyObject *outer = handled_exception_swap(exc);
        PyObject *a[3] = {(PyObject *)self, h, exc};
        res = PyObject_VectorcallMethod(str_handle_raised, a, 3, NULL);
        Py_XDECREF(handled_exception_swap(outer));
        Py_XDECREF(outer);
        Py_XDECREF(exc);
    }
done:
    if (!res)
        return -1;
    Py_DECREF(res);
    return 0;
}

static PyObject *LoopCore__run_once(LoopCore *self, PyObject *unused)
{
    if (!self->ring) {
        PyErr_SetString(PyExc_RuntimeError, "the loop has no ring");
        return NULL;
    }
    /* An iteration that a handle interrupted (KeyboardInterrupt, SystemExit) left the
       deliveries of its wait undone: they go first, as asyncio's loop runs the I/O
       callbacks it had queued before what was scheduled since. (asyncio would run
       the interrupted iteration's remaining ready handles before them: those are
       not told apart from the ones scheduled since, so they go after.) */
    if (ring_deliver_deferred(self->ring) < 0) /* (nothing to do unless interrupted) */
        return NULL;
    unsigned hooks = loop_hooks(self);
    double now;
    heap_drop_cancelled(self);

    double timeout = -1.0; /* block until something completes */
    if (self->rlen || self->stopping) {
        timeout = 0;
    } else if (self->nheap) {
        if (loop_now(self, hooks, &now) < 0)
            return NULL;
        timeout = self->heap[0].when - now;
        if (timeout > MAXIMUM_SELECT_TIMEOUT)
            timeout = MAXIMUM_SELECT_TIMEOUT;
        else if (!(timeout >= 0)) /* (a NaN deadline too: asyncio's max(0, nan) is 0) */
            timeout = 0;
    }

    /* A callback may re-attach or drop the ring while the wait dispatches: the ring
       waited on is held to the end. The streams' deliveries of this wait are deferred
       until the handles ready before it have run (asyncio's order: those handles, then
       the callbacks of the fds select() found ready, then the timers that came due).
       The rest of the completions (sends, one-shot requests) are reaped in the wait, so
       those handles see every transport's state as of the wait. */
    Py_ssize_t ready_before = self->rlen;
    Ring *ring = (Ring *)Py_NewRef((PyObject *)self->ring);
    ring->rx_defer = 1;
    PyObject *fired = ring_wait(ring, timeout, &self->rlen);
    ring->rx_defer = 0;
    if (!fired) {
        Py_DECREF(ring);
        return NULL;
    }
    if (fired != Py_None) { /* readiness of add_reader/add_writer fds: asyncio's Handles */
        PyObject *r = PyObject_CallMethodOneArg((PyObject *)self, str_ring_events, fired);
        Py_DECREF(fired);
        if (!r) {
            Py_DECREF(ring);
            return NULL;
        }
        Py_DECREF(r);
    } else {
        Py_DECREF(fired);
    }

    /* timers due by now + clock_resolution: never early (asyncio's test is
       `when >= end_time` to stop, so a NaN deadline is due) */
    if (self->nheap) {
        if (loop_now(self, hooks, &now) < 0)
            goto fail;
        double end_time = now + self->clock_resolution;
        while (self->nheap && !(self->heap[0].when >= end_time)) {
            PyObject *h = heap_pop(self);
            slot_set(h, off_scheduled, Py_False);
            if (ready_push(self, h) < 0)
                goto fail;
        }
    }

    /* the handles ready now; those they schedule wait for the next iteration */
    Py_ssize_t ntodo = self->rlen;
    self->n_iterations++;
    for (Py_ssize_t i = 0; i < ntodo && self->rlen; i++) {
        if (i == ready_before && ring_deliver_deferred(ring) < 0)
            goto fail;
        PyObject *h = ready_pop(self);
        int c = PyObject_TypeCheck(h, HandleType) ? SLOT(h, off_cancelled) == Py_True
                                                  : handle_cancelled(h);
        if (c == 0) {
            self->n_handles++;
            c = handle_run(self, h, hooks);
        }
        handle_release(h);
        if (c < 0)
            goto fail;
    }
    if (ring_deliver_deferred(ring) < 0) /* (fewer handles ran than were ready before) */
        goto fail;
    Py_DECREF(ring);
    timers_settle(self);
    Py_RETURN_NONE;
fail:
    Py_DECREF(ring);
    return NULL;
}

/* run_forever's inner loop: _run_once until stop() (asyncio's `while True:
   self._run_once(); if self._stopping: break`). */
static PyObject *LoopCore__run_until_stopped(LoopCore *self, PyObject *unused)
{
    for (;;) {
        PyObject *r = LoopCore__run_once(self, NULL);
        if (!r)
            return NULL;
        Py_DECREF(r);
        if (self->stopping)
            break;
    }
    if (self->ring && ring_flush_out(self->ring) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *LoopCore__attach_ring(LoopCore *self, PyObject *ring)
{
    if (!Py_IS_TYPE(ring, &RingType)) {
        PyErr_SetString(PyExc_TypeError, "_attach_ring() needs a Ring");
        return NULL;
    }
    Py_XSETREF(self->ring, (Ring *)Py_NewRef(ring));
    Py_RETURN_NONE;
}

static PyObject *LoopCore__clear_queues(LoopCore *self, PyObject *unused)
{
    ready_clear(self);
    heap_clear(self);
    young_clear(self);
    self->timer_cancelled_count = 0;
    Py_RETURN_NONE;
}

static PyObject *LoopCore__core_stats(LoopCore *self, PyObject *unused)
{
    return Py_BuildValue("{s:K,s:K,s:n,s:n}", "iterations", self->n_iterations, "handles_run",
                         self->n_handles, "ready", self->rlen, "timers", self->nheap);
}

/* ------------------------------------------------------------ _ready / _scheduled */
/* BaseEventLoop's __init__ and close() assign and clear self._ready (a deque) and
   self._scheduled (a heapq list); code outside asyncio (tests, introspection) reads
   them. Both are views of the native queues with the operations asyncio uses. */

typedef struct {
    PyObject_HEAD
    LoopCore *loop;
    int timers; /* 0: the ready queue, 1: the timer heap */
} QueueView;

static PyTypeObject QueueViewType;

static PyObject *view_item(QueueView *v, Py_ssize_t i)
{
    LoopCore *l = v->loop;
    if (v->timers) {
        timer_expose(l->heap[i].handle, l->heap[i].ctx); /* handed out: ordinary again */
        return Py_NewRef(l->heap[i].handle);
    }
    return Py_NewRef(l->ready[(l->rhead + i) & (l->rcap - 1)]);
}

static Py_ssize_t view_len(QueueView *v) { return v->timers ? v->loop->nheap : v->loop->rlen; }

static PyObject *view_getitem(QueueView *v, Py_ssize_t i)
{
    /* (PySequence_GetItem has already added the length to a negative index) */
    if (i < 0 || i >= view_len(v)) {
        PyErr_SetString(PyExc_IndexError, "index out of range");
        return NULL;
    }
    return view_item(v, i);
}

static PyObject *view_list(QueueView *v)
{
    PyObject *list = PyList_New(0);
    /* re-checked each time: an allocation may run the GC and a finalizer */
    for (Py_ssize_t i = 0; list && i < view_len(v); i++) {
        PyObject *item = view_item(v, i);
        if (PyList_Append(list, item) < 0)
            Py_CLEAR(list);
        Py_DECREF(item);
    }
    return list;
}

static PyObject *view_iter(QueueView *v)
{
    PyObject *list = view_list(v);
    if (!list)
        return NULL;
    PyObject *it = PyObject_GetIter(list);
    Py_DECREF(list);
    return it;
}

static int view_add(QueueView *v, PyObject *h)
{
    if (!v->timers)
        return ready_push(v->loop, Py_NewRef(h));
    /* (a TimerHandle made with __new__ alone has no _when: refused, not dereferenced) */
    if (!PyObject_TypeCheck(h, TimerHandleType) || !SLOT(h, off_when)) {
        PyErr_SetString(PyExc_TypeError, "only asyncio.TimerHandle objects can be scheduled");
        return -1;
    }
    double when = PyFloat_AsDouble(SLOT(h, off_when));
    if (when == -1.0 && PyErr_Occurred())
        return -1;
    timer_expose(h, NULL); /* (held by the caller, and now twice by the heap, maybe) */
    return heap_push(v->loop, h, when, NULL);
}

static PyObject *view_append(QueueView *v, PyObject *h)
{
    return view_add(v, h) < 0 ? NULL : Py_NewRef(Py_None);
}

static PyObject *view_popleft(QueueView *v, PyObject *unused)
{
    if (!view_len(v)) {
        PyErr_SetString(PyExc_IndexError, "pop from an empty queue");
        return NULL;
    }
    return v->timers ? heap_pop(v->loop) : ready_pop(v->loop);
}

static PyObject *view_clear(QueueView *v, PyObject *unused)
{
    if (v->timers) {
        heap_clear(v->loop);
        v->loop->timer_cancelled_count = 0;
    } else {
        ready_clear(v->loop);
    }
    Py_RETURN_NONE;
}

static PyObject *view_repr(QueueView *v)
{
    PyObject *list = view_list(v);
    if (!list)
        return NULL;
    PyObject *r = PyUnicode_FromFormat("<uringloop %s %R>", v->timers ? "timers" : "ready", list);
    Py_DECREF(list);
    return r;
}

static int view_traverse(QueueView *v, visitproc visit, void *arg)
{
    Py_VISIT(v->loop);
    return 0;
}

static void view_dealloc(QueueView *v)
{
    PyObject_GC_UnTrack(v);
    Py_CLEAR(v->loop);
    PyObject_GC_Del(v);
}

static PySequenceMethods view_as_sequence = {
    .sq_length = (lenfunc)view_len,
    .sq_item = (ssizeargfunc)view_getitem,
};

static PyMethodDef view_methods[] = {
    {"append", (PyCFunction)view_append, METH_O, "queue a handle (the heap keeps its order)"},
    {"popleft", (PyCFunction)view_popleft, METH_NOARGS, "take the first (earliest) handle"},
    {"clear", (PyCFunction)view_clear, METH_NOARGS, "drop every handle"},
    {NULL},
};

static PyTypeObject QueueViewType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "uringloop._dataplane.QueueView",
    .tp_basicsize = sizeof(QueueView),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The loop's ready queue or timer heap, as asyncio's code uses them.",
    .tp_dealloc = (destructor)view_dealloc,
    .tp_traverse = (traverseproc)view_traverse,
    .tp_repr = (reprfunc)view_repr,
    .tp_as_sequence = &view_as_sequence,
    .tp_iter = (getiterfunc)view_iter,
    .tp_methods = view_methods,
};

static PyObject *view_new(LoopCore *self, int timers)
{
    QueueView *v = PyObject_GC_New(QueueView, &QueueViewType);
    if (!v)
        return NULL;
    v->loop = (LoopCore *)Py_NewRef((PyObject *)self);
    v->timers = timers;
    PyObject_GC_Track(v);
    return (PyObject *)v;
}

static PyObject *get_ready(LoopCore *self, void *c) { return view_new(self, 0); }
static PyObject *get_scheduled(LoopCore *self, void *c) { return view_new(self, 1); }

/* `self._ready = collections.deque()` and the like: the queue becomes what is given */
static int set_queue(LoopCore *self, PyObject *value, int timers)
{
    if (!value) {
        PyErr_SetString(PyExc_AttributeError, "the loop's queues cannot be deleted");
        return -1;
    }
    PyObject *items = PySequence_List(value); /* before clearing: value may be a view */
    if (!items)
        return -1;
    /* all or nothing: check every item before the queue is touched */
    for (Py_ssize_t i = 0; timers && i < PyList_GET_SIZE(items); i++) {
        PyObject *h = PyList_GET_ITEM(items, i);
        if (!PyObject_TypeCheck(h, TimerHandleType) || !SLOT(h, off_when)) {
            PyErr_SetString(PyExc_TypeError, "only asyncio.TimerHandle objects can be scheduled");
            Py_DECREF(items);
            return -1;
        }
        double when = PyFloat_AsDouble(SLOT(h, off_when));
        if (when == -1.0 && PyErr_Occurred()) {
            Py_DECREF(items);
            return -1;
        }
    }
    QueueView v = {.loop = self, .timers = timers};
    if (timers) {
        heap_clear(self);
        self->timer_cancelled_count = 0;
    } else {
        ready_clear(self);
    }
    int err = 0;
    for (Py_ssize_t i = 0; !err && i < PyList_GET_SIZE(items); i++) {
        PyObject *h = PyList_GET_ITEM(items, i);
        err = view_add(&v, h);
        if (!err && timers && timer_cancelled(h))
            self->timer_cancelled_count++; /* as _timer_handle_cancelled counted it */
    }
    Py_DECREF(items);
    return err;
}

static int set_ready(LoopCore *self, PyObject *value, void *c) { return set_queue(self, value, 0); }
static int set_scheduled(LoopCore *self, PyObject *value, void *c)
{
    return set_queue(self, value, 1);
}

static int set_flag(char *flag, PyObject *value)
{
    if (!value) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete the loop's state");
        return -1;
    }
    int t = PyObject_IsTrue(value);
    if (t < 0)
        return -1;
    *flag = (char)t;
    return 0;
}

static PyObject *get_closed(LoopCore *self, void *c) { return PyBool_FromLong(self->closed); }
static int set_closed(LoopCore *self, PyObject *v, void *c) { return set_flag(&self->closed, v); }
static PyObject *get_stopping(LoopCore *self, void *c) { return PyBool_FromLong(self->stopping); }
static int set_stopping(LoopCore *self, PyObject *v, void *c)
{
    return set_flag(&self->stopping, v);
}
static PyObject *get_debug(LoopCore *self, void *c)
{
    return Py_NewRef(self->debug_value ? self->debug_value : Py_False);
}
static int set_debug(LoopCore *self, PyObject *v, void *c)
{
    if (set_flag(&self->debug, v) < 0)
        return -1;
    Py_XSETREF(self->debug_value, Py_NewRef(v));
    return 0;
}

static PyGetSetDef LoopCore_getset[] = {
    {"_ready", (getter)get_ready, (setter)set_ready, "the ready queue (a view)"},
    {"_scheduled", (getter)get_scheduled, (setter)set_scheduled, "the timer heap (a view)"},
    {"_closed", (getter)get_closed, (setter)set_closed, NULL},
    {"_stopping", (getter)get_stopping, (setter)set_stopping, NULL},
    {"_debug", (getter)get_debug, (setter)set_debug, NULL},
    {"_task_factory", (getter)get_task_factory, (setter)set_task_factory, NULL},
    {NULL},
};

static PyMemberDef LoopCore_members[] = {
    {"_timer_cancelled_count", T_PYSSIZET, offsetof(LoopCore, timer_cancelled_count), 0, NULL},
    {"_clock_resolution", T_DOUBLE, offsetof(LoopCore, clock_resolution), 0, NULL},
    {NULL},
};

#define FASTKW (METH_FASTCALL | METH_KEYWORDS)
static PyMethodDef LoopCore_methods[] = {
    {"call_soon", (PyCFunction)(void (*)(void))LoopCore_call_soon, FASTKW,
     "call_soon(callback, *args, context=None) -> asyncio.Handle"},
    {"call_soon_threadsafe", (PyCFunction)(void (*)(void))LoopCore_call_soon_threadsafe, FASTKW,
     "call_soon_threadsafe(callback, *args, context=None) -> asyncio.Handle"},
    {"call_later", (PyCFunction)(void (*)(void))LoopCore_call_later, FASTKW,
     "call_later(delay, callback, *args, context=None) -> asyncio.TimerHandle"},
    {"call_at", (PyCFunction)(void (*)(void))LoopCore_call_at, FASTKW,
     "call_at(when, callback, *args, context=None) -> asyncio.TimerHandle"},
    {"_call_soon", (PyCFunction)(void (*)(void))LoopCore__call_soon, METH_FASTCALL, NULL},
    {"create_task", (PyCFunction)(void (*)(void))LoopCore_create_task, FASTKW,
     "create_task(coro, *, name=None, context=None) -> asyncio.Task"},
    {"create_future", (PyCFunction)LoopCore_create_future, METH_NOARGS,
     "create_future() -> asyncio.Future"},
    {"get_debug", (PyCFunction)LoopCore_get_debug, METH_NOARGS, "the loop's debug mode"},
    {"time", (PyCFunction)LoopCore_time, METH_NOARGS, "the loop's clock (time.monotonic())"},
    {"_add_callback", (PyCFunction)LoopCore__add_callback, METH_O, NULL},
    {"_asyncgen_firstiter_hook", (PyCFunction)LoopCore__asyncgen_firstiter_hook, METH_O,
     "records an async generator at its first step (sys.set_asyncgen_hooks)"},
    {"_timer_handle_cancelled", (PyCFunction)LoopCore__timer_handle_cancelled, METH_O, NULL},
    {"_run_once", (PyCFunction)LoopCore__run_once, METH_NOARGS,
     "one iteration: wait for I/O or the next timer, run what is ready"},
    {"_run_until_stopped", (PyCFunction)LoopCore__run_until_stopped, METH_NOARGS,
     "_run_once() until stop()"},
    {"_attach_ring", (PyCFunction)LoopCore__attach_ring, METH_O, NULL},
    {"_clear_queues", (PyCFunction)LoopCore__clear_queues, METH_NOARGS, NULL},
    {"_core_stats", (PyCFunction)LoopCore__core_stats, METH_NOARGS,
     "iterations, handles run, and the queues' lengths"},
    {NULL},
};

static PyObject *LoopCore_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (sched_init_globals() < 0)
        return NULL;
    LoopCore *self = (LoopCore *)type->tp_alloc(type, 0);
    if (!self)
        return NULL;
    self->clock_resolution = 1e-9;
    self->task_factory = Py_NewRef(Py_None);
    loop_link(self);
    return (PyObject *)self;
}

static int LoopCore_traverse(LoopCore *self, visitproc visit, void *arg)
{
    Py_VISIT(self->ring); /* (subtype_traverse visits the heap type) */
    Py_VISIT(self->debug_value);
    Py_VISIT(self->task_factory);
    for (Py_ssize_t i = 0; i < self->rlen; i++)
        Py_VISIT(self->ready[(self->rhead + i) & (self->rcap - 1)]);
    return heap_traverse(self, visit, arg);
}

static int LoopCore_clear(LoopCore *self)
{
    ready_clear(self);
    heap_clear(self);
    young_clear(self);
    Py_CLEAR(self->ring);
    Py_CLEAR(self->debug_value);
    Py_CLEAR(self->task_factory);
    return 0;
}

static void LoopCore_dealloc(LoopCore *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    loop_unlink(self);
    LoopCore_clear(self);
    PyMem_Free(self->ready);
    PyMem_Free(self->heap);
    PyMem_Free(self->young);
    tp->tp_free((PyObject *)self); /* (subtype_dealloc drops the heap type's reference) */
}

PyTypeObject LoopCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "uringloop._dataplane.LoopCore",
    .tp_basicsize = sizeof(LoopCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The native core of UringEventLoop: ready queue, timer heap, one iteration.",
    .tp_new = LoopCore_new,
    .tp_dealloc = (destructor)LoopCore_dealloc,
    .tp_traverse = (traverseproc)LoopCore_traverse,
    .tp_clear = (inquiry)LoopCore_clear,
    .tp_methods = LoopCore_methods,
    .tp_members = LoopCore_members,
    .tp_getset = LoopCore_getset,
    .tp_setattro = (setattrofunc)LoopCore_setattro,
};

int sched_ready_types(void) { return PyType_Ready(&QueueViewType); }
