/* nativereload._gate: the in-flight gate in C.
 *
 * Same four types, constructor signatures and semantics as the pure-Python
 * gate in nativereload/gate.py, whose module docstring states the protocol:
 *
 *   ImageGate(functions, on_drained)  per image: enter/exit counters, holds, flags
 *   Slot()                            per module: .current, the gate new calls go to
 *   Func(slot, qualname, symbol, on_missing)
 *                                     a vectorcall (PEP 590) handle on one symbol;
 *                                     .policy: None or a CallPolicy
 *   CallPolicy(handle_args, pointer_result, needs_after, after, table, on_conflict, on_released)
 *
 * A call: read slot.current and take a strong reference; count enter; if the
 * gate's flags are set (retired or paused), count exit, try to drain it, wait
 * while it is paused, and start again; look the function object up (cached
 * per Func); call it; count exit (also when it raised); if a flag is set, try
 * to drain (retired) or tell the pauser it is quiet (paused).  Draining reads
 * exits *first*, then enters; if equal, reads holds; if zero, reads enters
 * again; fires on_drained once if nothing moved.
 *
 * Why it is safe without a lock on the call path: every counter and flag is a
 * C11 atomic accessed with sequentially consistent operations (or, with the
 * GIL, only ever touched while holding it), so all of them fall into one total
 * order.  retire() sets RETIRED before its first drain attempt.  A drain
 * attempt that reads exits == E and then enters == E saw no call inside the
 * image at the moment it read exits (exits never exceeds enters) and no enter
 * between its two reads; any call that counts itself in later also loads the
 * flags later than the store, sees RETIRED, and backs out before touching the
 * image.  Holds (pins, pointer results, bound handles) are taken only by a call
 * or pin counted in at that moment, so a drain that saw neither a call nor a
 * hold cannot miss one being taken; the second read of enters catches a call
 * routed by a handle (which does not back out of a retired image) that counted
 * itself in just before its binding's hold was dropped.  A compare-and-swap on
 * `drained` makes on_drained fire exactly once.
 *
 * Free-threaded CPython (Py_GIL_DISABLED): the counters need nothing more, but
 * the "read a pointer, then take a reference" steps would race with a writer
 * that replaces the pointer and drops the last reference to the old object:
 * Slot.current, ImageGate.functions, Func's lookup cache and Func.policy.  Each
 * of those objects carries a PyMutex held only around the read+incref or the
 * swap (the old value is released after unlocking).  With the GIL the same
 * steps run without releasing it, so the mutex macros compile to nothing.
 *
 * Striped counters (free-threaded builds).  One pair of enter/exit counters
 * per image, written by every call on every thread, is the cache line all
 * cores fight over.  So each gate has NR_STRIPES pairs, each on cache lines
 * of its own, and each thread counts on one stripe, fixed for the thread's
 * life (nr_stripe_index): a call counts its exit on the stripe it counted
 * its enter on, so on every stripe exits never exceed enters.  A drain
 * reads *every* stripe's exits first, then every stripe's enters, and
 * compares the sums.  Why that is enough: let t be any moment between the
 * last exits read and the first enters read.  Each exits_i was read before t
 * and each enters_i after t, and the counters only grow, so
 * sum(exits read) <= sum(exits_i(t)) <= sum(enters_i(t)) <= sum(enters read);
 * if the ends are equal, every stripe had exits_i(t) == enters_i(t): no call
 * was inside the image at t, which is all the single-counter argument above
 * uses (with "when it read exits" replaced by t).  The second read of
 * enters (after holds) compares sums too: the sums are equal only if no
 * stripe moved.  Everything else (flags, holds, the CAS on drained) is
 * unchanged.  With the GIL there is one stripe, the same code as before.
 *
 * Free-threaded scaling, the other half: the per-call lock and reference
 * count of the slot's current gate and of the Func's cached function object
 * are shared writes too.  A plain call (no policy) therefore goes through a
 * per-thread call cache (nr_tcache, below): the thread holds its own strong
 * references to the gate and function object of its last call of each Func,
 * with the gate's serial.  A call that finds the slot still pointing to that
 * gate, at that serial, counts itself in on its stripe and calls, with no
 * lock and no reference taken: the thread's references keep both alive.
 * The protocol steps are the same (read current, count enter, re-check
 * flags, call, count exit, drain if retired); only who holds the reference
 * that keeps the gate's memory valid changes, and that reference is taken
 * before the call reads `current` and released only after it has counted its
 * exit and done its drain attempt.  Cost: each thread keeps up to 64 old gates
 * and function objects alive (never an image: a gate holds its image open
 * only through its counters and holds) until the entry is reused, the thread
 * exits, or _gate.clear_thread_cache().
 *
 * Func caches (serial, function object) of the last gate it called through.
 * Each gate gets a process-unique serial at creation and a new one whenever
 * its `functions` attribute is assigned (the registry may swap in {} after a
 * drain), so a cache hit can never come from a freed gate whose address was
 * reused, nor from a replaced dict.  Only hits are cached.
 *
 * A pointer result is leased: the image stays open while the returned cdata
 * lives.  With the GIL, the gate keeps a strong reference to each result in
 * its lease list, and an entry whose only reference is the list's is dead
 * (Py_REFCNT is exact while the GIL is held); the list is pruned when it has
 * doubled since the last prune, and a drain attempt on a retired gate prunes
 * it and, while live results remain, asks for another attempt later
 * (configure()'s recheck callable).  That costs one list append per call.
 * Free-threaded builds cannot read another thread's reference count reliably:
 * there the gate takes a hold and wraps the result with cffi's gcp (what
 * ffi.gc does), whose destructor drops the hold when the cdata is freed; it
 * runs inside the garbage collector, on any thread, so it never closes the
 * image itself: it hands a retired gate to the deferred-drain callable.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Changing a counter.  Free-threaded: a sequentially consistent atomic
 * read-modify-write.  With the GIL: every access to the counters and flags
 * happens in C code holding the GIL, which is not released between the load
 * and the store, and GIL hand-offs order everything else; so a relaxed load
 * and store (no LOCK-prefixed instruction on x86: ~10 ns less per call)
 * count exactly as well. */
#ifdef Py_GIL_DISABLED
#define NR_ADD(counter, delta) atomic_fetch_add(&(counter), (delta))
#define NR_LOAD_PTR(field) __atomic_load_n(&(field), __ATOMIC_ACQUIRE)
#else
#define NR_ADD(counter, delta) \
    atomic_store_explicit(&(counter), atomic_load_explicit(&(counter), memory_order_relaxed) + (delta), \
                          memory_order_relaxed)
#define NR_LOAD_PTR(field) (field)
#endif
#define NR_COUNT(counter) NR_ADD(counter, 1)

#ifdef Py_GIL_DISABLED
#define NR_MUTEX_FIELD PyMutex mutex;
#define NR_LOCK(obj) PyMutex_Lock(&(obj)->mutex)
#define NR_UNLOCK(obj) PyMutex_Unlock(&(obj)->mutex)
#else
#define NR_MUTEX_FIELD
#define NR_LOCK(obj) ((void)0)
#define NR_UNLOCK(obj) ((void)0)
#endif

#define NR_RETIRED 1
#define NR_PAUSED 2

/* Striped counters: see the comment at the top of this file. */
#ifdef Py_GIL_DISABLED
#define NR_STRIPES 16
#define NR_STRIPE_BYTES 128
static _Atomic(unsigned) nr_next_stripe;
static __thread int nr_thread_stripe = -1;

/* This thread's stripe: fixed for the thread's life, so a call counts its exit where it counted its enter. */
static inline int
nr_stripe_index(void)
{
    int index = nr_thread_stripe;
    if (index < 0)
        index = nr_thread_stripe = (int)(atomic_fetch_add(&nr_next_stripe, 1) % NR_STRIPES);
    return index;
}
#else
#define NR_STRIPES 1
#define nr_stripe_index() 0
#endif
#define NR_MY_STRIPE(gate) (&(gate)->stripes[nr_stripe_index()])

/* Set once by configure() (gate.py does it at import): cffi's cdata base
 * type, cffi's gcp (ffi.gc's implementation), the deferred-drain callable
 * (drain this gate soon, on another thread) and the recheck callable (try to
 * drain this gate again a little later). */
static PyTypeObject *nr_cdata_type;
static PyObject *nr_gcp;
static PyObject *nr_deferred_drain;
static PyObject *nr_recheck_later;

/* The lease list is pruned when it reaches this size (and twice the live entries after a prune). */
#define NR_LEASE_PRUNE_MIN 64

/* Serial 0 means "no cached gate"; real serials start at 1 and never wrap. */
static _Atomic(uint64_t) nr_next_serial = 1;

static uint64_t
nr_serial_new(void)
{
    return atomic_fetch_add(&nr_next_serial, 1);
}

/* ------------------------------------------------------------------------ */
/* ImageGate                                                                */
/* ------------------------------------------------------------------------ */

/* The in-flight counters, striped (see "Striped counters" at the top of this file). */
typedef struct {
    _Atomic(uint64_t) enters;
    _Atomic(uint64_t) exits;
#ifdef Py_GIL_DISABLED
    char pad[NR_STRIPE_BYTES - 2 * sizeof(uint64_t)];   /* one stripe per cache line (and its neighbour) */
#endif
} nr_stripe;

typedef struct {
    PyObject_HEAD
    _Atomic(int64_t) holds;     /* pins + pointer results + bound handles */
    _Atomic(int64_t) pins;      /* for status only */
    _Atomic(int64_t) leases;    /* pointer results, for status only */
    _Atomic(int) flags;         /* NR_RETIRED | NR_PAUSED */
    _Atomic(int) drained;
    _Atomic(uint64_t) serial;   /* changes with every assignment of functions */
    PyObject *functions;        /* guarded by mutex on free-threaded builds */
    PyObject *on_drained;       /* taken (set to NULL) by the thread that fires it */
    PyObject *resume;           /* pause(): calls wait on resume.wait() */
    PyObject *on_quiet;         /* pause(): called when the last call in flight exits */
    PyObject *end_lease;        /* free-threaded: the gcp destructor of this gate's leases */
    PyObject *lease_list;       /* with the GIL: the pointer results, alive while referenced elsewhere */
    Py_ssize_t lease_prune_at;
    NR_MUTEX_FIELD
#ifdef Py_GIL_DISABLED
    char pad[NR_STRIPE_BYTES];  /* keep the fields above, read by every call, off the stripes' lines */
#endif
    nr_stripe stripes[NR_STRIPES];
} ImageGate;

static PyTypeObject ImageGate_Type;

static int
ImageGate_init(ImageGate *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"functions", "on_drained", NULL};
    PyObject *functions, *on_drained;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO:ImageGate", kwlist, &functions, &on_drained))
        return -1;
    if (!PyCallable_Check(on_drained)) {
        PyErr_SetString(PyExc_TypeError, "ImageGate: on_drained must be callable");
        return -1;
    }
    /* Once only: a second __init__ would replace on_drained, which the thread
     * that drains the gate reads and clears without a lock, and reset a gate
     * that may already be retired. */
    if (atomic_load(&self->serial) != 0) {
        PyErr_SetString(PyExc_TypeError, "ImageGate.__init__() may be called only once");
        return -1;
    }
    Py_INCREF(functions);
    Py_INCREF(on_drained);
    NR_LOCK(self);
    self->functions = functions;
    self->on_drained = on_drained;
    atomic_store(&self->serial, nr_serial_new());
    NR_UNLOCK(self);
    return 0;
}

static int
ImageGate_traverse(ImageGate *self, visitproc visit, void *arg)
{
    Py_VISIT(self->functions);
    Py_VISIT(self->on_drained);
    Py_VISIT(self->resume);
    Py_VISIT(self->on_quiet);
    Py_VISIT(self->end_lease);
    Py_VISIT(self->lease_list);
    return 0;
}

static int
ImageGate_clear(ImageGate *self)
{
    Py_CLEAR(self->functions);
    Py_CLEAR(self->on_drained);
    Py_CLEAR(self->resume);
    Py_CLEAR(self->on_quiet);
    Py_CLEAR(self->end_lease);
    Py_CLEAR(self->lease_list);
    return 0;
}

static void
ImageGate_dealloc(ImageGate *self)
{
    PyObject_GC_UnTrack(self);
    ImageGate_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The sums of the stripes' counters.  A drain reads every stripe's exits
 * (nr_gate_exits) before any stripe's enters (nr_gate_enters): see the top of this file. */
static inline uint64_t
nr_gate_exits(ImageGate *self)
{
    uint64_t total = 0;
    for (int i = 0; i < NR_STRIPES; i++)
        total += atomic_load(&self->stripes[i].exits);
    return total;
}

static inline uint64_t
nr_gate_enters(ImageGate *self)
{
    uint64_t total = 0;
    for (int i = 0; i < NR_STRIPES; i++)
        total += atomic_load(&self->stripes[i].enters);
    return total;
}

/* A strong reference to one of the gate's object fields, or NULL (no error). */
static PyObject *
nr_gate_field(ImageGate *self, PyObject **field)
{
    NR_LOCK(self);
    PyObject *value = *field;
    Py_XINCREF(value);
    NR_UNLOCK(self);
    return value;
}

#ifndef Py_GIL_DISABLED
/* Drop the lease list's dead entries (referenced by the list alone); return
 * how many are alive.  The GIL is held: reference counts are exact. */
static Py_ssize_t
nr_gate_prune_leases(ImageGate *self)
{
    PyObject *list = self->lease_list;
    if (list == NULL)
        return 0;
    Py_ssize_t size = PyList_GET_SIZE(list), live = 0;
    for (Py_ssize_t i = 0; i < size; i++) {
        PyObject *item = PyList_GET_ITEM(list, i);
        if (Py_REFCNT(item) > 1)
            PyList_SET_ITEM(list, live++, item);
        else
            Py_DECREF(item);    /* a plain pointer cdata: freeing it runs no code */
    }
    Py_SET_SIZE(list, live);
    return live;
}
#endif

/* Ask for another drain attempt later (live pointer results hold the gate). */
static int
nr_gate_recheck_later(ImageGate *self)
{
    if (nr_recheck_later == NULL)
        return 0;
    PyObject *result = PyObject_CallOneArg(nr_recheck_later, (PyObject *)self);
    if (result == NULL)
        return -1;
    Py_DECREF(result);
    return 0;
}

/* Fire on_drained if the gate is retired and nothing is in flight or held.
 * Returns 0, or -1 with an exception set if on_drained raised. */
static int
nr_gate_try_drain(ImageGate *self)
{
    if (!(atomic_load(&self->flags) & NR_RETIRED) || atomic_load(&self->drained))
        return 0;
    /* exits first, then enters, holds, enters again: see the comment at the top of this file */
    uint64_t exits = nr_gate_exits(self);
    uint64_t enters = nr_gate_enters(self);
    if (exits != enters || atomic_load(&self->holds) != 0 || nr_gate_enters(self) != enters)
        return 0;
#ifndef Py_GIL_DISABLED
    /* No call is in flight and we hold the GIL: no lease can be added meanwhile. */
    if (nr_gate_prune_leases(self) > 0)
        return nr_gate_recheck_later(self);
#endif
    int expected = 0;
    if (!atomic_compare_exchange_strong(&self->drained, &expected, 1))
        return 0;               /* another thread saw it drain first and fires it */
    /* Only the CAS winner gets here, so only it takes the callback; dropping
     * it also breaks the usual cycle gate -> on_drained -> registry -> gate. */
    NR_LOCK(self);
    PyObject *callback = self->on_drained;
    self->on_drained = NULL;
    NR_UNLOCK(self);
    if (callback == NULL)
        return 0;
    PyObject *result = PyObject_CallNoArgs(callback);
    Py_DECREF(callback);
    if (result == NULL)
        return -1;
    Py_DECREF(result);
    return 0;
}

/* After a call (or a backed-out admission) counted its exit and found `flags`
 * set: drain a retired gate, or tell the pauser of a paused gate that no call
 * is left.  Returns 0, or -1 with an exception set. */
static int
nr_gate_after_exit(ImageGate *self, int flags)
{
    if (flags & NR_RETIRED)
        return nr_gate_try_drain(self);
    if (flags & NR_PAUSED) {
        uint64_t exits = nr_gate_exits(self);
        if (nr_gate_enters(self) != exits)
            return 0;
        PyObject *on_quiet = nr_gate_field(self, &self->on_quiet);
        if (on_quiet == NULL)
            return 0;
        PyObject *result = PyObject_CallNoArgs(on_quiet);
        Py_DECREF(on_quiet);
        if (result == NULL)
            return -1;
        Py_DECREF(result);
    }
    return 0;
}

/* Block (the GIL released by Event.wait) until a paused gate is resumed. */
static int
nr_gate_wait_resumed(ImageGate *self)
{
    if (!(atomic_load(&self->flags) & NR_PAUSED))
        return 0;
    PyObject *resume = nr_gate_field(self, &self->resume);
    if (resume == NULL)
        return 0;
    PyObject *result = PyObject_CallMethod(resume, "wait", NULL);
    Py_DECREF(resume);
    if (result == NULL)
        return -1;
    Py_DECREF(result);
    return 0;
}

/* Drop a hold; drain now, or (deferred) hand a retired gate to the drain thread. */
static int
nr_gate_release_hold(ImageGate *self, int deferred)
{
    NR_ADD(self->holds, -1);
    if (!(atomic_load(&self->flags) & NR_RETIRED))
        return 0;
    if (!deferred)
        return nr_gate_try_drain(self);
    if (nr_deferred_drain == NULL)
        return 0;
    PyObject *result = PyObject_CallOneArg(nr_deferred_drain, (PyObject *)self);
    if (result == NULL)
        return -1;
    Py_DECREF(result);
    return 0;
}

static PyObject *
ImageGate_retire(ImageGate *self, PyObject *Py_UNUSED(ignored))
{
    atomic_fetch_or(&self->flags, NR_RETIRED);
    if (nr_gate_try_drain(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
ImageGate_try_drain(ImageGate *self, PyObject *Py_UNUSED(ignored))
{
    if (nr_gate_try_drain(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
ImageGate_hold(ImageGate *self, PyObject *Py_UNUSED(ignored))
{
    NR_ADD(self->holds, 1);
    Py_RETURN_NONE;
}

static PyObject *
ImageGate_release_hold(ImageGate *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"deferred", NULL};
    int deferred = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|p:release_hold", kwlist, &deferred))
        return NULL;
    if (nr_gate_release_hold(self, deferred) < 0)
        return NULL;
    Py_RETURN_NONE;
}

#ifdef Py_GIL_DISABLED
/* The destructor of a lease (gcp calls it with the original cdata when the wrapper dies). */
static PyObject *
nr_gate_end_lease(PyObject *gate, PyObject *Py_UNUSED(cdata))
{
    ImageGate *self = (ImageGate *)gate;
    NR_ADD(self->leases, -1);
    if (nr_gate_release_hold(self, 1) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef nr_end_lease_def = {"end_lease", nr_gate_end_lease, METH_O, NULL};
#endif

/* Lease the pointer result of a call in flight on `self`, so that the image
 * stays open while it lives.  Steals `result`; returns a new reference or NULL. */
static PyObject *
nr_gate_lease(ImageGate *self, PyObject *result)
{
    if (nr_cdata_type == NULL || !PyObject_TypeCheck(result, nr_cdata_type))
        return result;
    int nonzero = PyObject_IsTrue(result);
    if (nonzero <= 0) {
        if (nonzero < 0)
            Py_CLEAR(result);
        return result;          /* NULL holds nothing */
    }
#ifndef Py_GIL_DISABLED
    if (self->lease_list == NULL) {
        self->lease_list = PyList_New(0);
        self->lease_prune_at = NR_LEASE_PRUNE_MIN;
        if (self->lease_list == NULL) {
            Py_DECREF(result);
            return NULL;
        }
    }
    if (PyList_Append(self->lease_list, result) < 0) {
        Py_DECREF(result);
        return NULL;
    }
    if (PyList_GET_SIZE(self->lease_list) >= self->lease_prune_at) {
        Py_ssize_t live = nr_gate_prune_leases(self);
        self->lease_prune_at = live * 2 > NR_LEASE_PRUNE_MIN ? live * 2 : NR_LEASE_PRUNE_MIN;
    }
    return result;
#else
    if (nr_gcp == NULL)
        return result;
    PyObject *end = nr_gate_field(self, &self->end_lease);
    if (end == NULL) {
        end = PyCFunction_New(&nr_end_lease_def, (PyObject *)self);
        if (end == NULL) {
            Py_DECREF(result);
            return NULL;
        }
        NR_LOCK(self);
        if (self->end_lease == NULL) {
            Py_INCREF(end);
            self->end_lease = end;
        }
        NR_UNLOCK(self);
    }
    NR_ADD(self->holds, 1);
    NR_ADD(self->leases, 1);
    PyObject *wrapped = PyObject_CallFunctionObjArgs(nr_gcp, result, end, NULL);
    Py_DECREF(end);
    Py_DECREF(result);
    if (wrapped == NULL) {
        NR_ADD(self->leases, -1);
        NR_ADD(self->holds, -1);     /* still inside the call: no drain can be due */
    }
    return wrapped;
#endif
}

static PyObject *
ImageGate_lease(ImageGate *self, PyObject *result)
{
    Py_INCREF(result);
    return nr_gate_lease(self, result);
}

/* Admit a pin like a call; take a hold if admitted.  1 admitted, 0 not, -1 error. */
static int
nr_gate_try_pin(ImageGate *self)
{
    nr_stripe *stripe = NR_MY_STRIPE(self);
    NR_COUNT(stripe->enters);
    int flags = atomic_load(&self->flags);
    if (!flags) {
        NR_ADD(self->holds, 1);
        NR_ADD(self->pins, 1);
    }
    NR_COUNT(stripe->exits);
    if (flags && nr_gate_after_exit(self, flags) < 0)
        return -1;
    return !flags;
}

static PyObject *
ImageGate_try_pin(ImageGate *self, PyObject *Py_UNUSED(ignored))
{
    int admitted = nr_gate_try_pin(self);
    if (admitted < 0)
        return NULL;
    return PyBool_FromLong(admitted);
}

static PyObject *
ImageGate_unpin(ImageGate *self, PyObject *Py_UNUSED(ignored))
{
    NR_ADD(self->pins, -1);
    if (nr_gate_release_hold(self, 0) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
ImageGate_pause(ImageGate *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"resume", "on_quiet", NULL};
    PyObject *resume, *on_quiet;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO:pause", kwlist, &resume, &on_quiet))
        return NULL;
    if (!PyCallable_Check(on_quiet)) {
        PyErr_SetString(PyExc_TypeError, "ImageGate.pause: on_quiet must be callable");
        return NULL;
    }
    Py_INCREF(resume);
    Py_INCREF(on_quiet);
    NR_LOCK(self);
    PyObject *old_resume = self->resume, *old_quiet = self->on_quiet;
    self->resume = resume;
    self->on_quiet = on_quiet;
    NR_UNLOCK(self);
    Py_XDECREF(old_resume);
    Py_XDECREF(old_quiet);
    atomic_fetch_or(&self->flags, NR_PAUSED);   /* after the fields: a waiter that sees the flag finds them */
    Py_RETURN_NONE;
}

static PyObject *
ImageGate_unpause(ImageGate *self, PyObject *Py_UNUSED(ignored))
{
    atomic_fetch_and(&self->flags, ~NR_PAUSED);
    NR_LOCK(self);
    PyObject *old_quiet = self->on_quiet;
    self->on_quiet = NULL;
    NR_UNLOCK(self);
    Py_XDECREF(old_quiet);
    Py_RETURN_NONE;
}

static PyObject *
ImageGate_wait_resumed(ImageGate *self, PyObject *Py_UNUSED(ignored))
{
    if (nr_gate_wait_resumed(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
ImageGate_get_functions(ImageGate *self, void *Py_UNUSED(closure))
{
    PyObject *functions = nr_gate_field(self, &self->functions);
    if (functions == NULL)
        PyErr_SetString(PyExc_AttributeError, "functions");
    return functions;
}

static int
ImageGate_set_functions(ImageGate *self, PyObject *value, void *Py_UNUSED(closure))
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "ImageGate.functions cannot be deleted");
        return -1;
    }
    Py_INCREF(value);
    NR_LOCK(self);
    PyObject *old = self->functions;
    self->functions = value;
    /* a new serial invalidates every Func's cached lookup into the old dict */
    atomic_store(&self->serial, nr_serial_new());
    NR_UNLOCK(self);
    Py_XDECREF(old);
    return 0;
}

static PyObject *
ImageGate_get_retired(ImageGate *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(atomic_load(&self->flags) & NR_RETIRED);
}

static PyObject *
ImageGate_get_paused(ImageGate *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(atomic_load(&self->flags) & NR_PAUSED);
}

static PyObject *
ImageGate_get_drained(ImageGate *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(atomic_load(&self->drained));
}

static PyObject *
ImageGate_get_in_flight(ImageGate *self, void *Py_UNUSED(closure))
{
    uint64_t exits = nr_gate_exits(self);
    uint64_t enters = nr_gate_enters(self);
    return PyLong_FromUnsignedLongLong(enters > exits ? enters - exits : 0);
}

static PyObject *
nr_nonnegative(int64_t value)
{
    return PyLong_FromLongLong(value > 0 ? value : 0);
}

static PyObject *
ImageGate_get_holds(ImageGate *self, void *Py_UNUSED(closure))
{
    return nr_nonnegative(atomic_load(&self->holds));
}

static PyObject *
ImageGate_get_pins(ImageGate *self, void *Py_UNUSED(closure))
{
    return nr_nonnegative(atomic_load(&self->pins));
}

static PyObject *
ImageGate_get_pointer_results(ImageGate *self, void *Py_UNUSED(closure))
{
#ifndef Py_GIL_DISABLED
    return PyLong_FromSsize_t(nr_gate_prune_leases(self));
#else
    return nr_nonnegative(atomic_load(&self->leases));
#endif
}

static PyMethodDef ImageGate_methods[] = {
    {"retire", (PyCFunction)ImageGate_retire, METH_NOARGS,
     "retire()\n--\n\nStop admitting calls; fire on_drained now if nothing is in flight or held, else when "
     "the last goes. Call only after slot.current points elsewhere. Idempotent."},
    {"try_drain", (PyCFunction)ImageGate_try_drain, METH_NOARGS,
     "try_drain()\n--\n\nFire on_drained once, if retired and no call is in flight and no hold is left."},
    {"hold", (PyCFunction)ImageGate_hold, METH_NOARGS,
     "hold()\n--\n\nTake a hold: only while a call counted in on this gate is running."},
    {"release_hold", (PyCFunction)(void (*)(void))ImageGate_release_hold, METH_VARARGS | METH_KEYWORDS,
     "release_hold(deferred=False)\n--\n\nDrop a hold, then drain if it was the last (deferred: on the "
     "drain thread)."},
    {"lease", (PyCFunction)ImageGate_lease, METH_O,
     "lease(result)\n--\n\nHold the image while the returned cdata lives (only inside a call on this gate)."},
    {"try_pin", (PyCFunction)ImageGate_try_pin, METH_NOARGS,
     "try_pin()\n--\n\nAdmit a pin like a call: take a hold and return True, or False if retired or paused."},
    {"unpin", (PyCFunction)ImageGate_unpin, METH_NOARGS, "unpin()\n--\n\nRelease a pin taken by try_pin()."},
    {"pause", (PyCFunction)(void (*)(void))ImageGate_pause, METH_VARARGS | METH_KEYWORDS,
     "pause(resume, on_quiet)\n--\n\nMake new calls wait on resume.wait(); call on_quiet() whenever the "
     "last call in flight exits."},
    {"unpause", (PyCFunction)ImageGate_unpause, METH_NOARGS,
     "unpause()\n--\n\nAdmit calls again (set the resume event after this)."},
    {"wait_resumed", (PyCFunction)ImageGate_wait_resumed, METH_NOARGS,
     "wait_resumed()\n--\n\nIf paused, wait on the resume event."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef ImageGate_getset[] = {
    {"functions", (getter)ImageGate_get_functions, (setter)ImageGate_set_functions,
     "symbol -> function object; assigning a new mapping invalidates every Func's cached lookup.", NULL},
    {"retired", (getter)ImageGate_get_retired, NULL, "True once retire() was called.", NULL},
    {"paused", (getter)ImageGate_get_paused, NULL, "True between pause() and unpause().", NULL},
    {"drained", (getter)ImageGate_get_drained, NULL, "True once on_drained has been called.", NULL},
    {"in_flight", (getter)ImageGate_get_in_flight, NULL,
     "Calls that have entered and not yet left (a snapshot).", NULL},
    {"holds", (getter)ImageGate_get_holds, NULL,
     "Pins, bound handles and, on free-threaded builds, pointer results (a snapshot).", NULL},
    {"pins", (getter)ImageGate_get_pins, NULL, "Pins held (a snapshot).", NULL},
    {"pointer_results", (getter)ImageGate_get_pointer_results, NULL,
     "Leased pointer results still alive (a snapshot).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ImageGate_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "nativereload._gate.ImageGate",
    .tp_doc = "ImageGate(functions, on_drained)\n--\n\n"
              "In-flight accounting for one image; see nativereload.gate for the protocol.",
    .tp_basicsize = sizeof(ImageGate),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)ImageGate_init,
    .tp_dealloc = (destructor)ImageGate_dealloc,
    .tp_traverse = (traverseproc)ImageGate_traverse,
    .tp_clear = (inquiry)ImageGate_clear,
    .tp_methods = ImageGate_methods,
    .tp_getset = ImageGate_getset,
};

/* ------------------------------------------------------------------------ */
/* Slot                                                                     */
/* ------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    ImageGate *current;         /* guarded by mutex on free-threaded builds */
    NR_MUTEX_FIELD
} Slot;

static PyTypeObject Slot_Type;

/* A strong reference to slot.current, or NULL (no error) when there is none. */
static inline ImageGate *
nr_slot_get(Slot *slot)
{
    NR_LOCK(slot);
    ImageGate *gate = slot->current;
    Py_XINCREF(gate);
    NR_UNLOCK(slot);
    return gate;
}

static int
Slot_init(Slot *Py_UNUSED(self), PyObject *args, PyObject *kwds)
{
    if (PyTuple_GET_SIZE(args) != 0 || (kwds != NULL && PyDict_GET_SIZE(kwds) != 0)) {
        PyErr_SetString(PyExc_TypeError, "Slot() takes no arguments");
        return -1;
    }
    return 0;
}

static int
Slot_traverse(Slot *self, visitproc visit, void *arg)
{
    Py_VISIT(self->current);
    return 0;
}

static int
Slot_clear(Slot *self)
{
    Py_CLEAR(self->current);
    return 0;
}

static void
Slot_dealloc(Slot *self)
{
    PyObject_GC_UnTrack(self);
    Slot_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Slot_get_current(Slot *self, void *Py_UNUSED(closure))
{
    ImageGate *gate = nr_slot_get(self);
    if (gate == NULL)
        Py_RETURN_NONE;
    return (PyObject *)gate;
}

static int
Slot_set_current(Slot *self, PyObject *value, void *Py_UNUSED(closure))
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "Slot.current cannot be deleted; set it to None");
        return -1;
    }
    ImageGate *gate = NULL;
    if (value != Py_None) {
        if (!PyObject_TypeCheck(value, &ImageGate_Type)) {
            PyErr_Format(PyExc_TypeError, "Slot.current must be a nativereload._gate.ImageGate or None, not %.100s",
                         Py_TYPE(value)->tp_name);
            return -1;
        }
        gate = (ImageGate *)value;
        Py_INCREF(gate);
    }
    NR_LOCK(self);
    ImageGate *old = self->current;
#ifdef Py_GIL_DISABLED
    __atomic_store_n(&self->current, gate, __ATOMIC_RELEASE);   /* read without the lock by nr_cached_call */
#else
    self->current = gate;
#endif
    NR_UNLOCK(self);
    /* released outside the lock: the old gate's last reference may run arbitrary code */
    Py_XDECREF(old);
    return 0;
}

static PyGetSetDef Slot_getset[] = {
    {"current", (getter)Slot_get_current, (setter)Slot_set_current,
     "The ImageGate new calls go to, or None once the module is unloaded.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject Slot_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "nativereload._gate.Slot",
    .tp_doc = "Slot()\n--\n\nThe image a module's new calls go to (current), or None once unloaded.",
    .tp_basicsize = sizeof(Slot),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Slot_init,
    .tp_dealloc = (destructor)Slot_dealloc,
    .tp_traverse = (traverseproc)Slot_traverse,
    .tp_clear = (inquiry)Slot_clear,
    .tp_getset = Slot_getset,
};

/* ------------------------------------------------------------------------ */
/* CallPolicy                                                               */
/* ------------------------------------------------------------------------ */

/* Handle arguments beyond this many are not routed (they are bound by after()). */
#define NR_MAX_HANDLE_ARGS 32

typedef struct {
    PyObject_HEAD
    Py_ssize_t n_handle_args;
    Py_ssize_t handle_args[NR_MAX_HANDLE_ARGS];
    int pointer_result;
    int needs_after;
    int initialized;
    PyObject *handle_args_tuple;
    PyObject *after;            /* after(gate, args, result, unbound) -> result, or None */
    PyObject *table;            /* dict: cdata address -> ImageGate */
    PyObject *on_conflict;      /* on_conflict(gate_a, gate_b) -> exception */
    PyObject *on_released;      /* on_released(gate) -> exception */
} CallPolicy;

static PyTypeObject CallPolicy_Type;

static int
CallPolicy_init(CallPolicy *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"handle_args", "pointer_result", "needs_after", "after", "table", "on_conflict",
                             "on_released", NULL};
    PyObject *handle_args, *after, *table, *on_conflict, *on_released;
    int pointer_result, needs_after;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OppOO!OO:CallPolicy", kwlist, &handle_args, &pointer_result,
                                     &needs_after, &after, &PyDict_Type, &table, &on_conflict, &on_released))
        return -1;
    if (self->initialized) {
        PyErr_SetString(PyExc_TypeError, "CallPolicy.__init__() may be called only once");
        return -1;
    }
    if (!PyCallable_Check(on_conflict) || !PyCallable_Check(on_released) ||
        (after != Py_None && !PyCallable_Check(after))) {
        PyErr_SetString(PyExc_TypeError, "CallPolicy: after, on_conflict and on_released must be callable");
        return -1;
    }
    PyObject *indexes = PySequence_Tuple(handle_args);
    if (indexes == NULL)
        return -1;
    Py_ssize_t n = PyTuple_GET_SIZE(indexes);
    if (n > NR_MAX_HANDLE_ARGS)
        n = NR_MAX_HANDLE_ARGS;
    for (Py_ssize_t k = 0; k < n; k++) {
        Py_ssize_t index = PyLong_AsSsize_t(PyTuple_GET_ITEM(indexes, k));
        if (index < 0) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "CallPolicy: handle_args must be argument positions >= 0");
            Py_DECREF(indexes);
            return -1;
        }
        self->handle_args[k] = index;
    }
    self->n_handle_args = n;
    self->handle_args_tuple = indexes;
    self->pointer_result = pointer_result;
    self->needs_after = needs_after;
    self->after = Py_NewRef(after);
    self->table = Py_NewRef(table);
    self->on_conflict = Py_NewRef(on_conflict);
    self->on_released = Py_NewRef(on_released);
    self->initialized = 1;
    return 0;
}

static int
CallPolicy_traverse(CallPolicy *self, visitproc visit, void *arg)
{
    Py_VISIT(self->handle_args_tuple);
    Py_VISIT(self->after);
    Py_VISIT(self->table);
    Py_VISIT(self->on_conflict);
    Py_VISIT(self->on_released);
    return 0;
}

static int
CallPolicy_clear(CallPolicy *self)
{
    Py_CLEAR(self->handle_args_tuple);
    Py_CLEAR(self->after);
    Py_CLEAR(self->table);
    Py_CLEAR(self->on_conflict);
    Py_CLEAR(self->on_released);
    return 0;
}

static void
CallPolicy_dealloc(CallPolicy *self)
{
    PyObject_GC_UnTrack(self);
    CallPolicy_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
nr_or_none(PyObject *value)
{
    return Py_NewRef(value ? value : Py_None);
}

static PyObject *CallPolicy_get_handle_args(CallPolicy *s, void *c) { (void)c; return nr_or_none(s->handle_args_tuple); }
static PyObject *CallPolicy_get_pointer_result(CallPolicy *s, void *c) { (void)c; return PyBool_FromLong(s->pointer_result); }
static PyObject *CallPolicy_get_needs_after(CallPolicy *s, void *c) { (void)c; return PyBool_FromLong(s->needs_after); }
static PyObject *CallPolicy_get_after(CallPolicy *s, void *c) { (void)c; return nr_or_none(s->after); }
static PyObject *CallPolicy_get_table(CallPolicy *s, void *c) { (void)c; return nr_or_none(s->table); }

static PyGetSetDef CallPolicy_getset[] = {
    {"handle_args", (getter)CallPolicy_get_handle_args, NULL, "Argument positions that carry handles.", NULL},
    {"pointer_result", (getter)CallPolicy_get_pointer_result, NULL, "Whether the result is leased.", NULL},
    {"needs_after", (getter)CallPolicy_get_needs_after, NULL, "Whether after() runs on every call.", NULL},
    {"after", (getter)CallPolicy_get_after, NULL, "after(gate, args, result, unbound) -> result.", NULL},
    {"table", (getter)CallPolicy_get_table, NULL, "The bindings: cdata address -> ImageGate.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject CallPolicy_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "nativereload._gate.CallPolicy",
    .tp_doc = "CallPolicy(handle_args, pointer_result, needs_after, after, table, on_conflict, on_released)\n--\n\n"
              "What a call of one function does with the objects it takes and returns.",
    .tp_basicsize = sizeof(CallPolicy),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)CallPolicy_init,
    .tp_dealloc = (destructor)CallPolicy_dealloc,
    .tp_traverse = (traverseproc)CallPolicy_traverse,
    .tp_clear = (inquiry)CallPolicy_clear,
    .tp_getset = CallPolicy_getset,
};

/* ------------------------------------------------------------------------ */
/* Func                                                                     */
/* ------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    Slot *slot;
    PyObject *name;             /* "module.symbol" */
    PyObject *symbol;           /* exact str */
    PyObject *on_missing;       /* on_missing(gate_or_None) -> exception to raise */
    CallPolicy *policy;         /* NULL: a plain call; guarded by mutex on free-threaded builds */
    uint64_t uid;               /* process-unique, set by __init__: tells a Func from a later one at its address */
    uint64_t cache_serial;      /* serial of the gate cache_function came from; 0 = none */
    PyObject *cache_function;   /* both cache fields guarded by mutex on free-threaded builds */
    NR_MUTEX_FIELD
} Func;

static PyTypeObject Func_Type;

/* "get" and "wait", interned once at import (a lazy static would race on free-threaded builds) */
static PyObject *nr_str_get;

/* Raise `exc`, an exception instance or class (the same rules as Python's `raise`).
 * Steals `exc`; always returns NULL. */
static PyObject *
nr_raise(PyObject *exc, const char *what)
{
    if (exc == NULL)
        return NULL;
    if (PyExceptionInstance_Check(exc))
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
    else if (PyExceptionClass_Check(exc))
        PyErr_SetNone(exc);
    else
        PyErr_Format(PyExc_TypeError, "%s must return an exception, not %.100s", what, Py_TYPE(exc)->tp_name);
    Py_DECREF(exc);
    return NULL;
}

/* Raise the exception on_missing(gate_or_None) returns.  Always returns NULL. */
static PyObject *
nr_func_raise_missing(Func *self, PyObject *gate_or_none)
{
    return nr_raise(PyObject_CallOneArg(self->on_missing, gate_or_none), "on_missing");
}

/* The function object for self->symbol in gate: a new reference; NULL with
 * no exception set when the gate lacks it (missing or None); NULL with an
 * exception set when the lookup itself failed. */
static PyObject *
nr_func_lookup_serial(Func *self, ImageGate *gate, uint64_t *serial_out)
{
    PyObject *function = NULL;
    uint64_t serial = atomic_load(&gate->serial);
    *serial_out = serial;

    NR_LOCK(self);
    if (self->cache_serial == serial) {
        function = self->cache_function;
        Py_XINCREF(function);
    }
    NR_UNLOCK(self);
    if (function != NULL)
        return function;

    /* Miss: read the mapping and its serial together (the setter writes both under the same lock). */
    NR_LOCK(gate);
    PyObject *functions = gate->functions;
    Py_XINCREF(functions);
    serial = atomic_load(&gate->serial);
    *serial_out = serial;
    NR_UNLOCK(gate);
    if (functions == NULL)
        return NULL;

    if (PyDict_CheckExact(functions)) {
#if PY_VERSION_HEX >= 0x030D0000
        if (PyDict_GetItemRef(functions, self->symbol, &function) < 0)
            function = NULL;
#else
        function = PyDict_GetItemWithError(functions, self->symbol);
        Py_XINCREF(function);
#endif
    }
    else {
        /* any other mapping: exactly what the Python gate does */
        function = PyObject_CallMethodOneArg(functions, nr_str_get, self->symbol);
    }
    Py_DECREF(functions);
    if (function == NULL)
        return NULL;
    if (function == Py_None) {
        Py_DECREF(function);
        return NULL;
    }

    Py_INCREF(function);
    NR_LOCK(self);
    PyObject *old = self->cache_function;
    self->cache_function = function;
    self->cache_serial = serial;
    NR_UNLOCK(self);
    Py_XDECREF(old);
    return function;
}

static PyObject *
nr_func_lookup(Func *self, ImageGate *gate)
{
    uint64_t serial;
    return nr_func_lookup_serial(self, gate, &serial);
}

/* Run nr_gate_after_exit() at the end of a call, keeping `result` or the
 * pending exception unless it raises, in which case its exception wins with
 * the call's exception as __context__ (as a `finally:` would). */
static PyObject *
nr_after_exit_keeping(ImageGate *gate, int flags, PyObject *result)
{
    if (result != NULL) {
        if (nr_gate_after_exit(gate, flags) < 0)
            Py_CLEAR(result);
        return result;
    }
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *exc = PyErr_GetRaisedException();
    if (nr_gate_after_exit(gate, flags) < 0) {
        PyObject *new_exc = PyErr_GetRaisedException();
        PyException_SetContext(new_exc, exc);   /* steals exc */
        PyErr_SetRaisedException(new_exc);
    }
    else {
        PyErr_SetRaisedException(exc);
    }
#else
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL)
        PyException_SetTraceback(value, tb);
    if (nr_gate_after_exit(gate, flags) < 0) {
        PyObject *type2, *value2, *tb2;
        PyErr_Fetch(&type2, &value2, &tb2);
        PyErr_NormalizeException(&type2, &value2, &tb2);
        if (value2 != NULL && value != NULL)
            PyException_SetContext(value2, value);   /* steals value */
        else
            Py_XDECREF(value);
        Py_XDECREF(type);
        Py_XDECREF(tb);
        PyErr_Restore(type2, value2, tb2);
    }
    else {
        PyErr_Restore(type, value, tb);
    }
#endif
    return NULL;
}

/* Count a call out of `gate` (steals the reference to it) and return `result`. */
static PyObject *
nr_exit(ImageGate *gate, PyObject *result)
{
    NR_COUNT(NR_MY_STRIPE(gate)->exits);
    int flags = atomic_load(&gate->flags);
    if (flags)
        result = nr_after_exit_keeping(gate, flags, result);
    Py_DECREF(gate);
    return result;
}

/* Back out of a gate whose flags were set at admission: count the exit, drain
 * or notify, and wait while it is paused.  Steals the reference to `gate`. */
static int
nr_back_out(ImageGate *gate, int flags, int yield)
{
    NR_COUNT(NR_MY_STRIPE(gate)->exits);
    int status = nr_gate_after_exit(gate, flags);
    if (status == 0 && (flags & NR_PAUSED))
        status = nr_gate_wait_resumed(gate);
    else if (status == 0 && yield) {
        /* Retired again on a re-read: slot.current has not moved on yet (a
         * swap in progress, or a registry that retired before swapping).
         * Let the thread that will move it run, and stay interruptible. */
        Py_BEGIN_ALLOW_THREADS
        sched_yield();
        Py_END_ALLOW_THREADS
        status = PyErr_CheckSignals();
    }
    Py_DECREF(gate);
    return status;
}

/* Count a call into the module's current image: a strong reference to its
 * gate, or NULL with an exception set (no image, or waiting failed). */
static ImageGate *
nr_admit_current(Func *self)
{
    for (int retried = 0;; retried = 1) {
        ImageGate *gate = nr_slot_get(self->slot);
        if (gate == NULL) {
            nr_func_raise_missing(self, Py_None);
            return NULL;
        }
        NR_COUNT(NR_MY_STRIPE(gate)->enters);
        int flags = atomic_load(&gate->flags);
        if (!flags)
            return gate;
        /* lost a race with a reload, or paused: back out, close it if we were the last, and retry */
        if (nr_back_out(gate, flags, retried) < 0)
            return NULL;
    }
}

/* Call the gate's function for self->symbol (the call is counted in). */
static PyObject *
nr_call_in(Func *self, ImageGate *gate, PyObject *const *args, size_t nargsf)
{
    PyObject *function = nr_func_lookup(self, gate);
    if (function == NULL) {
        if (!PyErr_Occurred())
            nr_func_raise_missing(self, (PyObject *)gate);
        return NULL;
    }
    /* nargsf passes PY_VECTORCALL_ARGUMENTS_OFFSET on: our caller's args[-1] is the callee's too */
    PyObject *result = PyObject_Vectorcall(function, args, nargsf, NULL);
    Py_DECREF(function);
    return result;
}

/* A strong reference to the gate `value` is bound to in `table`; NULL with no
 * error when it is not bound, NULL with an error when the lookup failed. */
static ImageGate *
nr_bound_gate(PyObject *table, PyObject *value)
{
    PyObject *bound;
#if PY_VERSION_HEX >= 0x030D0000
    if (PyDict_GetItemRef(table, value, &bound) < 0)
        return NULL;
#else
    bound = PyDict_GetItemWithError(table, value);
    Py_XINCREF(bound);
#endif
    if (bound != NULL && !PyObject_TypeCheck(bound, &ImageGate_Type)) {
        PyErr_Format(PyExc_TypeError, "a binding must name a nativereload._gate.ImageGate, not %.100s",
                     Py_TYPE(bound)->tp_name);
        Py_DECREF(bound);
        return NULL;
    }
    return (ImageGate *)bound;
}

/* Where the handles among `args` are bound.  Sets *target (a strong reference,
 * or NULL: none bound) and *unbound (bit k: handle_args[k] is a handle not
 * bound yet).  Returns 0, or -1 with an exception (two generations in one
 * call, or a failed lookup). */
static int
nr_route(CallPolicy *policy, PyObject *const *args, Py_ssize_t nargs, ImageGate **target, unsigned long *unbound)
{
    *target = NULL;
    *unbound = 0;
    for (Py_ssize_t k = 0; k < policy->n_handle_args; k++) {
        Py_ssize_t index = policy->handle_args[k];
        if (index >= nargs)
            continue;
        PyObject *value = args[index];
        if (nr_cdata_type == NULL || !PyObject_TypeCheck(value, nr_cdata_type))
            continue;           /* None (NULL) or not a cdata: cffi will say what is wrong */
        int nonzero = PyObject_IsTrue(value);
        if (nonzero < 0)
            goto fail;
        if (!nonzero)
            continue;
        ImageGate *bound = nr_bound_gate(policy->table, value);
        if (bound == NULL) {
            if (PyErr_Occurred())
                goto fail;
            *unbound |= 1ul << k;
        }
        else if (*target == NULL) {
            *target = bound;
        }
        else if (bound != *target) {
            nr_raise(PyObject_CallFunctionObjArgs(policy->on_conflict, (PyObject *)*target, (PyObject *)bound,
                                                  NULL), "on_conflict");
            Py_DECREF(bound);
            goto fail;
        }
        else {
            Py_DECREF(bound);
        }
    }
    return 0;
fail:
    Py_CLEAR(*target);
    return -1;
}

/* A call of a function with a policy: route by its bound handles, lease a
 * pointer result, and let after() bind what the call made. */
static PyObject *
nr_policy_call(Func *self, CallPolicy *policy, PyObject *const *args, size_t nargsf)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    ImageGate *gate = NULL;
    unsigned long unbound = 0;

    for (;;) {
        ImageGate *target;
        if (nr_route(policy, args, nargs, &target, &unbound) < 0)
            return NULL;
        if (target == NULL) {
            gate = nr_admit_current(self);
            if (gate == NULL)
                return NULL;
            break;
        }
        NR_COUNT(NR_MY_STRIPE(target)->enters);
        int flags = atomic_load(&target->flags);
        if (!(flags & NR_PAUSED)) {
            /* A retired gate is fine: the binding holds it open, if it is still there.  With the GIL,
             * nothing ran between the lookup and the enter (dict lookups of cdata keys run no Python
             * code), so it is; without it, a destructor on another thread may have ended it: look again. */
#ifndef Py_GIL_DISABLED
            gate = target;
            break;
#endif
            ImageGate *again;
            unsigned long ignored;
            int status = nr_route(policy, args, nargs, &again, &ignored);
            if (status == 0 && again == target) {
                Py_DECREF(again);
                gate = target;
                break;
            }
            Py_XDECREF(again);
            PyObject *exc = status == 0 ? PyObject_CallOneArg(policy->on_released, (PyObject *)target) : NULL;
            if (status == 0 && exc == NULL)
                status = -1;
            NR_COUNT(NR_MY_STRIPE(target)->exits);
            if (exc != NULL) {
                int drained = nr_gate_after_exit(target, atomic_load(&target->flags));
                Py_DECREF(target);
                if (drained < 0) {
                    Py_DECREF(exc);
                    return NULL;
                }
                return nr_raise(exc, "on_released");
            }
            nr_after_exit_keeping(target, atomic_load(&target->flags), NULL);
            Py_DECREF(target);
            return NULL;
        }
        if (nr_back_out(target, flags, 0) < 0)
            return NULL;
    }

    PyObject *result = nr_call_in(self, gate, args, nargsf);
    if (result != NULL && policy->pointer_result)
        result = nr_gate_lease(gate, result);
    if (result != NULL && policy->after != Py_None && (policy->needs_after || unbound)) {
        PyObject *argtuple = PyTuple_New(nargs);
        PyObject *mask = PyLong_FromUnsignedLong(unbound);
        PyObject *replaced = NULL;
        if (argtuple != NULL && mask != NULL) {
            for (Py_ssize_t i = 0; i < nargs; i++)
                PyTuple_SET_ITEM(argtuple, i, Py_NewRef(args[i]));
            replaced = PyObject_CallFunctionObjArgs(policy->after, (PyObject *)gate, argtuple, result, mask, NULL);
        }
        Py_XDECREF(argtuple);
        Py_XDECREF(mask);
        Py_DECREF(result);
        result = replaced;
    }
    return nr_exit(gate, result);
}

#ifdef Py_GIL_DISABLED
/* The per-thread call cache (free-threaded builds only; see "Free-threaded
 * scaling" at the top of this file).  Each thread keeps, per Func it called,
 * its own strong references to the gate and the function object it called
 * last, and the gate's serial then.  A call whose Func's slot still holds
 * that very gate, with that serial, calls that function without taking a
 * lock or a reference: the thread's own references keep both alive.  The
 * gate pointer read from the slot is compared, never dereferenced, until it
 * has been found equal to the cached one (which cannot have been freed and
 * reused: this thread holds a reference to it).
 *
 * Only the owning thread touches its cache.  A call nested inside another on
 * the same thread (an argument's __index__, a callback) may evict the entry
 * the outer call is using: while a cached call is in progress (depth > 0),
 * evicted references go to the graveyard and are released when the outermost
 * call returns.  The cache is an object in the thread state's dict, so its
 * references are released when the thread's state is cleared at its exit. */
#define NR_TCACHE_SIZE 64

typedef struct {
    Func *func;                 /* the key: identity (borrowed, never dereferenced unless equal to the caller) */
    uint64_t func_uid;          /*   ... and uid, so a later Func at the same address misses */
    ImageGate *gate;            /* strong */
    uint64_t gate_serial;       /* the gate's serial when `function` was looked up in its mapping */
    PyObject *function;         /* strong */
} nr_tcache_entry;

typedef struct {
    PyObject_HEAD
    long depth;                 /* cached calls in progress on the owning thread */
    PyObject *graveyard;        /* a list of references evicted while depth > 0, or NULL */
    nr_tcache_entry entries[NR_TCACHE_SIZE];
} nr_tcache;

static __thread nr_tcache *nr_thread_cache;
static PyObject *nr_tcache_key;
static char nr_miss_sentinel;
#define NR_MISS ((PyObject *)&nr_miss_sentinel)

static void
nr_tcache_dealloc(nr_tcache *self)
{
    if (nr_thread_cache == self)        /* it may be cleared from another thread (after fork) */
        nr_thread_cache = NULL;
    for (int i = 0; i < NR_TCACHE_SIZE; i++) {
        Py_CLEAR(self->entries[i].gate);
        Py_CLEAR(self->entries[i].function);
    }
    Py_CLEAR(self->graveyard);
    PyObject_Free(self);
}

static PyTypeObject nr_tcache_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "nativereload._gate._ThreadCache",
    .tp_basicsize = sizeof(nr_tcache),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)nr_tcache_dealloc,
};

/* This thread's cache, made on first use; NULL (no error set) if there is none to be had. */
static nr_tcache *
nr_tcache_get(void)
{
    nr_tcache *tc = nr_thread_cache;
    if (tc != NULL)
        return tc;
    PyObject *dict = PyThreadState_GetDict();
    if (dict == NULL)
        return NULL;
    tc = PyObject_New(nr_tcache, &nr_tcache_Type);
    if (tc == NULL) {
        PyErr_Clear();
        return NULL;
    }
    tc->depth = 0;
    tc->graveyard = NULL;
    memset(tc->entries, 0, sizeof(tc->entries));
    int status = PyDict_SetItem(dict, nr_tcache_key, (PyObject *)tc);
    Py_DECREF(tc);              /* the thread state's dict holds it */
    if (status < 0) {
        PyErr_Clear();
        return NULL;
    }
    nr_thread_cache = tc;
    return tc;
}

/* Drop a reference the cache held: now, or (a cached call in progress) when the outermost returns. */
static void
nr_tcache_release(nr_tcache *tc, PyObject *object)
{
    if (object == NULL)
        return;
    if (tc->depth > 0) {
        if (tc->graveyard == NULL)
            tc->graveyard = PyList_New(0);
        if (tc->graveyard != NULL && PyList_Append(tc->graveyard, object) == 0) {
            Py_DECREF(object);
            return;
        }
        PyErr_Clear();
        return;                 /* could not defer: keep the reference (a leak beats a use after free) */
    }
    Py_DECREF(object);
}

static void
nr_tcache_leave(nr_tcache *tc)
{
    if (--tc->depth == 0 && tc->graveyard != NULL) {
        PyObject *graveyard = tc->graveyard;
        tc->graveyard = NULL;
        Py_DECREF(graveyard);
    }
}

static inline nr_tcache_entry *
nr_tcache_entry_for(nr_tcache *tc, Func *func)
{
    return &tc->entries[((uintptr_t)func >> 4) & (NR_TCACHE_SIZE - 1)];
}

static void
nr_tcache_remember(nr_tcache *tc, Func *func, ImageGate *gate, uint64_t serial, PyObject *function)
{
    nr_tcache_entry *entry = nr_tcache_entry_for(tc, func);
    ImageGate *old_gate = entry->gate;
    PyObject *old_function = entry->function;
    entry->func = func;
    entry->func_uid = func->uid;
    entry->gate = (ImageGate *)Py_NewRef(gate);
    entry->gate_serial = serial;
    entry->function = Py_NewRef(function);
    nr_tcache_release(tc, (PyObject *)old_gate);
    nr_tcache_release(tc, old_function);
}

/* A plain call (no policy) served from the thread's cache: NR_MISS if the
 * cache cannot serve it (then nothing was counted), else the result. */
static PyObject *
nr_cached_call(Func *self, nr_tcache *tc, PyObject *const *args, size_t nargsf)
{
    nr_tcache_entry *entry = nr_tcache_entry_for(tc, self);
    ImageGate *gate = __atomic_load_n(&self->slot->current, __ATOMIC_ACQUIRE);
    if (gate == NULL || entry->gate != gate || entry->func != self || entry->func_uid != self->uid
        || entry->gate_serial != atomic_load(&gate->serial))
        return NR_MISS;
    PyObject *function = entry->function;
    nr_stripe *stripe = NR_MY_STRIPE(gate);
    NR_COUNT(stripe->enters);
    int flags = atomic_load(&gate->flags);
    if (flags) {
        /* retired or paused: back out (drain or notify, as the uncached path would), then take that path */
        NR_COUNT(stripe->exits);
        tc->depth++;
        int status = nr_gate_after_exit(gate, flags);
        nr_tcache_leave(tc);
        return status < 0 ? NULL : NR_MISS;
    }
    tc->depth++;                /* from here until we leave, `gate` and `function` are not released */
    PyObject *result = PyObject_Vectorcall(function, args, nargsf, NULL);
    NR_COUNT(stripe->exits);
    flags = atomic_load(&gate->flags);
    if (flags)
        result = nr_after_exit_keeping(gate, flags, result);
    nr_tcache_leave(tc);
    return result;
}

/* The uncached path of a plain call, remembering what it called in the thread's cache. */
static PyObject *
nr_call_remembering(Func *self, nr_tcache *tc, PyObject *const *args, size_t nargsf)
{
    ImageGate *gate = nr_admit_current(self);
    if (gate == NULL)
        return NULL;
    uint64_t serial;
    PyObject *function = nr_func_lookup_serial(self, gate, &serial);
    if (function == NULL) {
        if (!PyErr_Occurred())
            nr_func_raise_missing(self, (PyObject *)gate);
        return nr_exit(gate, NULL);
    }
    tc->depth++;
    nr_tcache_remember(tc, self, gate, serial, function);
    PyObject *result = PyObject_Vectorcall(function, args, nargsf, NULL);
    Py_DECREF(function);
    result = nr_exit(gate, result);
    nr_tcache_leave(tc);
    return result;
}
#endif

static PyObject *
Func_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Func *self = (Func *)callable;

    if (self->slot == NULL) {
        PyErr_SetString(PyExc_TypeError, "Func.__init__() was not called");
        return NULL;
    }
    if (kwnames != NULL && PyTuple_GET_SIZE(kwnames) != 0) {
        PyErr_Format(PyExc_TypeError, "%S() takes no keyword arguments", self->name);
        return NULL;
    }
    if (NR_LOAD_PTR(self->policy) != NULL) {
        NR_LOCK(self);
        CallPolicy *policy = self->policy;
        Py_XINCREF(policy);
        NR_UNLOCK(self);
        if (policy != NULL) {
            PyObject *result = nr_policy_call(self, policy, args, nargsf);
            Py_DECREF(policy);
            return result;
        }
    }
#ifdef Py_GIL_DISABLED
    nr_tcache *tc = nr_tcache_get();
    if (tc != NULL) {
        PyObject *result = nr_cached_call(self, tc, args, nargsf);
        if (result != NR_MISS)
            return result;
        return nr_call_remembering(self, tc, args, nargsf);
    }
#endif
    ImageGate *gate = nr_admit_current(self);
    if (gate == NULL)
        return NULL;
    return nr_exit(gate, nr_call_in(self, gate, args, nargsf));
}

static int
Func_init(Func *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"slot", "qualname", "symbol", "on_missing", NULL};
    PyObject *slot, *qualname, *symbol, *on_missing;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!OUO:Func", kwlist, &Slot_Type, &slot, &qualname,
                                     &symbol, &on_missing))
        return -1;
    if (!PyCallable_Check(on_missing)) {
        PyErr_SetString(PyExc_TypeError, "Func: on_missing must be callable");
        return -1;
    }
    /* Once only: calls read slot, symbol and on_missing without a lock (they
     * never change after this), so replacing them under a call running on
     * another thread (free-threaded builds) would free what it is using. */
    if (self->slot != NULL) {
        PyErr_SetString(PyExc_TypeError, "Func.__init__() may be called only once");
        return -1;
    }
    /* an exact, interned str keeps the dict lookup on its fastest path */
    symbol = PyUnicode_FromObject(symbol);
    if (symbol == NULL)
        return -1;
    PyUnicode_InternInPlace(&symbol);
    Py_INCREF(qualname);
    Py_INCREF(on_missing);
    Py_XSETREF(self->name, qualname);
    Py_XSETREF(self->symbol, symbol);
    Py_XSETREF(self->on_missing, on_missing);
    self->uid = nr_serial_new();
    /* slot last: a non-NULL slot is what marks the Func initialized */
    Py_INCREF(slot);
    self->slot = (Slot *)slot;
    return 0;
}

static PyObject *
Func_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    Func *self = (Func *)PyType_GenericNew(type, args, kwds);
    if (self != NULL)
        self->vectorcall = Func_vectorcall;
    return (PyObject *)self;
}

static int
Func_traverse(Func *self, visitproc visit, void *arg)
{
    Py_VISIT(self->slot);
    Py_VISIT(self->name);
    Py_VISIT(self->symbol);
    Py_VISIT(self->on_missing);
    Py_VISIT(self->policy);
    Py_VISIT(self->cache_function);
    return 0;
}

static int
Func_clear(Func *self)
{
    Py_CLEAR(self->slot);
    Py_CLEAR(self->name);
    Py_CLEAR(self->symbol);
    Py_CLEAR(self->on_missing);
    Py_CLEAR(self->policy);
    self->cache_serial = 0;
    Py_CLEAR(self->cache_function);
    return 0;
}

static void
Func_dealloc(Func *self)
{
    PyObject_GC_UnTrack(self);
    Func_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Func_repr(Func *self)
{
    if (self->name == NULL)
        return PyUnicode_FromString("<nativereload.Func (uninitialized)>");
    return PyUnicode_FromFormat("<nativereload.Func %S>", self->name);
}

static PyObject *
Func_get_name(Func *self, void *Py_UNUSED(closure))
{
    return nr_or_none(self->name);
}

static PyObject *
Func_get_symbol(Func *self, void *Py_UNUSED(closure))
{
    return nr_or_none(self->symbol);
}

static PyObject *
Func_get_policy(Func *self, void *Py_UNUSED(closure))
{
    NR_LOCK(self);
    PyObject *policy = nr_or_none((PyObject *)self->policy);
    NR_UNLOCK(self);
    return policy;
}

static int
Func_set_policy(Func *self, PyObject *value, void *Py_UNUSED(closure))
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "Func.policy cannot be deleted; set it to None");
        return -1;
    }
    CallPolicy *policy = NULL;
    if (value != Py_None) {
        if (!PyObject_TypeCheck(value, &CallPolicy_Type) || !((CallPolicy *)value)->initialized) {
            PyErr_Format(PyExc_TypeError, "Func.policy must be an initialized nativereload._gate.CallPolicy "
                         "or None, not %.100s", Py_TYPE(value)->tp_name);
            return -1;
        }
        policy = (CallPolicy *)Py_NewRef(value);
    }
    NR_LOCK(self);
    CallPolicy *old = self->policy;
#ifdef Py_GIL_DISABLED
    __atomic_store_n(&self->policy, policy, __ATOMIC_RELEASE);
#else
    self->policy = policy;
#endif
    NR_UNLOCK(self);
    Py_XDECREF(old);
    return 0;
}

static PyGetSetDef Func_getset[] = {
    {"name", (getter)Func_get_name, NULL, "\"module.symbol\".", NULL},
    {"symbol", (getter)Func_get_symbol, NULL, "The C symbol.", NULL},
    {"policy", (getter)Func_get_policy, (setter)Func_set_policy,
     "None, or the CallPolicy of a function that takes or returns objects.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject Func_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "nativereload._gate.Func",
    .tp_doc = "Func(slot, qualname, symbol, on_missing)\n--\n\n"
              "A reload-safe handle on one C function: each call runs on the module's current image.",
    .tp_basicsize = sizeof(Func),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(Func, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_new = Func_new,
    .tp_init = (initproc)Func_init,
    .tp_dealloc = (destructor)Func_dealloc,
    .tp_traverse = (traverseproc)Func_traverse,
    .tp_clear = (inquiry)Func_clear,
    .tp_repr = (reprfunc)Func_repr,
    .tp_getset = Func_getset,
};

/* ------------------------------------------------------------------------ */
/* CompiledFunction: the compiled call path's entry for one symbol of one   */
/* image (nativereload/compiled/)                                           */
/* ------------------------------------------------------------------------ */

/* A compiled entry sits in an ImageGate's `functions` where the cffi ABI
 * function object of that symbol would be, so Func's admission, lookup cache,
 * routing, leases, pins and drain are the same code on both paths: only what
 * a call finally calls differs.
 *
 * `builtin` is a wrapper of a cffi API-mode extension generated for the
 * function's *shape* (its signature with every type that cffi does not share
 * between FFIs spelled `void *`): it takes the target address as an extra
 * first argument (uintptr_t) and calls it through a function pointer of that
 * shape.  Passing the address as an argument, rather than in a thread-local,
 * keeps a call re-entrant: converting an argument may run Python code (an
 * __index__) that calls another compiled function on the same thread.
 *
 * `abi` is the image's cffi ABI function object for the same symbol.  A call
 * the compiled wrapper could get subtly wrong goes there instead, so that it
 * behaves (and fails) exactly as on the gate path: a wrong number of
 * arguments or keywords (cffi's message names the real signature), and an
 * argument spelled `void *` in the shape that is not a cdata of exactly the
 * declared ctype (`checks`): cffi types structs per FFI, so the shape cannot
 * check them; we compare the cdata's ctype with the declared one instead.
 * A result spelled `void *` is cast back to the declared ctype (`result_type`).
 *
 * `fast`: the shape's fast entry, if its types allow one (codegen.py): it
 * converts exact ints, floats and bytes itself and calls the target with the
 * GIL released, skipping the argument tuple and cffi's generic conversions;
 * for any other argument it returns NULL with no exception, and the call
 * goes through the cffi wrapper, which behaves exactly as cffi does.
 *
 * The ctype of a cdata is read from cffi's CDataObject, whose head has been
 * { PyObject_HEAD; CTypeDescrObject *c_type; char *c_data; ... } since cffi
 * 0.x; configure_compiled() verifies that on a real cdata and, if it ever
 * changes, every checked argument takes the ABI path (correct, slower). */

typedef struct {
    PyObject_HEAD
    PyObject *c_type;
    char *c_data;
} nr_cdata_head;

static PyObject *nr_cast;               /* cffi's cast(ctype, value) */
static int nr_cdata_layout_ok;          /* nr_cdata_head verified on a real cdata */

#define NR_SMALL_ARGS 8

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *builtin;          /* the shape's API-mode wrapper: builtin(address, *args) */
    PyObject *address;          /* int: the image's function */
    PyObject *abi;              /* the image's cffi ABI function object (the exact fallback) */
    PyObject *checks;           /* NULL, or a tuple: per argument None or the ctype it must have */
    PyObject *result_type;      /* NULL, or the declared ctype of a result spelled void * */
    Py_ssize_t arity;
    PyObject *(*fast)(void *, PyObject *const *);  /* the shape's fast entry, or NULL */
    void *target;               /* the address, for the fast entry */
    PyCFunction meth;           /* builtin's C function when it is a METH_VARARGS or METH_O builtin, else NULL */
    PyObject *meth_self;        /* its self (borrowed: builtin holds it) */
    int meth_flags;
} CompiledFunction;

static PyTypeObject CompiledFunction_Type;

/* 1 if args[i] may go to the compiled wrapper, 0 if the call must take the ABI path. */
static int
nr_compiled_args_ok(CompiledFunction *self, PyObject *const *args)
{
    if (self->checks == NULL)
        return 1;
    if (!nr_cdata_layout_ok || nr_cdata_type == NULL)
        return 0;
    for (Py_ssize_t i = 0; i < self->arity; i++) {
        PyObject *expected = PyTuple_GET_ITEM(self->checks, i);
        if (expected == Py_None)
            continue;
        PyObject *arg = args[i];
        if (!PyObject_TypeCheck(arg, nr_cdata_type) || ((nr_cdata_head *)arg)->c_type != expected)
            return 0;
    }
    return 1;
}

static PyObject *
CompiledFunction_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    CompiledFunction *self = (CompiledFunction *)callable;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);

    if (nargs != self->arity || (kwnames != NULL && PyTuple_GET_SIZE(kwnames) != 0)
        || !nr_compiled_args_ok(self, args))
        return PyObject_Vectorcall(self->abi, args, nargsf, kwnames);

    PyObject *result;
    if (self->fast != NULL) {
        /* NULL with no exception: an argument it does not convert itself; the wrapper below will */
        result = self->fast(self->target, args);
        if (result != NULL || PyErr_Occurred())
            return result;
    }
    if (self->meth != NULL) {
        /* What calling the builtin would do, minus the generic call machinery: cffi's wrappers are
         * METH_VARARGS (they unpack a tuple) or, for one argument (the address), METH_O. */
        if (self->meth_flags == METH_O) {
            result = self->meth(self->meth_self, self->address);
        }
        else {
            PyObject *tuple = PyTuple_New(nargs + 1);
            if (tuple == NULL)
                return NULL;
#ifdef Py_GIL_DISABLED
            /* A fresh int per call: a reference to the shared one would be a write to its reference
             * count, a cache line every calling thread fights over. */
            PyObject *address = PyLong_FromVoidPtr(PyLong_AsVoidPtr(self->address));
            if (address == NULL) {
                Py_DECREF(tuple);
                return NULL;
            }
            PyTuple_SET_ITEM(tuple, 0, address);
#else
            PyTuple_SET_ITEM(tuple, 0, Py_NewRef(self->address));
#endif
            for (Py_ssize_t i = 0; i < nargs; i++)
                PyTuple_SET_ITEM(tuple, i + 1, Py_NewRef(args[i]));
            result = self->meth(self->meth_self, tuple);
            Py_DECREF(tuple);
        }
    }
    else if (nargsf & PY_VECTORCALL_ARGUMENTS_OFFSET) {
        /* PEP 590: we may use args[-1] for the call if we put it back */
        PyObject **slot = (PyObject **)args - 1;
        PyObject *saved = *slot;
        *slot = self->address;
        result = PyObject_Vectorcall(self->builtin, slot, (size_t)nargs + 1, NULL);
        *slot = saved;
    }
    else {
        PyObject *small[NR_SMALL_ARGS];
        PyObject **buffer = small;
        if (nargs + 1 > NR_SMALL_ARGS) {
            buffer = PyMem_Malloc(((size_t)nargs + 1) * sizeof(PyObject *));
            if (buffer == NULL)
                return PyErr_NoMemory();
        }
        buffer[0] = self->address;
        for (Py_ssize_t i = 0; i < nargs; i++)
            buffer[i + 1] = args[i];
        result = PyObject_Vectorcall(self->builtin, buffer, (size_t)nargs + 1, NULL);
        if (buffer != small)
            PyMem_Free(buffer);
    }
    if (result != NULL && self->result_type != NULL && nr_cast != NULL) {
        PyObject *typed = PyObject_CallFunctionObjArgs(nr_cast, self->result_type, result, NULL);
        Py_DECREF(result);
        result = typed;
    }
    return result;
}

/* The address of a cffi function cdata (the layout is verified), or NULL with an exception. */
static PyObject *
nr_function_address(PyObject *abi)
{
    if (!nr_cdata_layout_ok || nr_cdata_type == NULL || !PyObject_TypeCheck(abi, nr_cdata_type)) {
        PyErr_SetString(PyExc_TypeError, "CompiledFunction: pass address= (cannot read the cdata's address)");
        return NULL;
    }
    return PyLong_FromVoidPtr(((nr_cdata_head *)abi)->c_data);
}

static int
nr_compiled_fill(CompiledFunction *self, PyObject *builtin, PyObject *abi, Py_ssize_t arity, PyObject *checks,
                 PyObject *result_type, PyObject *address, PyObject *fast)
{
    void *fast_entry = NULL;
    if (fast != NULL && fast != Py_None) {
        fast_entry = PyLong_AsVoidPtr(fast);
        if (fast_entry == NULL) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "CompiledFunction: fast must be an address or None");
            return -1;
        }
    }
    if (!PyCallable_Check(builtin) || !PyCallable_Check(abi)) {
        PyErr_SetString(PyExc_TypeError, "CompiledFunction: builtin and abi must be callable");
        return -1;
    }
    if (arity < 0) {
        PyErr_SetString(PyExc_ValueError, "CompiledFunction: arity must be >= 0");
        return -1;
    }
    if (checks == Py_None)
        checks = NULL;
    if (checks != NULL && (!PyTuple_Check(checks) || PyTuple_GET_SIZE(checks) != arity)) {
        PyErr_SetString(PyExc_TypeError, "CompiledFunction: checks must be None or a tuple of arity items");
        return -1;
    }
    if (result_type == Py_None)
        result_type = NULL;
    if (address == NULL || address == Py_None) {
        address = nr_function_address(abi);
        if (address == NULL)
            return -1;
    }
    else {
        if (!PyLong_Check(address)) {
            PyErr_SetString(PyExc_TypeError, "CompiledFunction: address must be an int");
            return -1;
        }
        Py_INCREF(address);
    }
    self->builtin = Py_NewRef(builtin);
    self->abi = Py_NewRef(abi);
    self->checks = Py_XNewRef(checks);
    self->result_type = Py_XNewRef(result_type);
    self->address = address;
    self->arity = arity;
    self->target = PyLong_AsVoidPtr(address);
    if (self->target == NULL && PyErr_Occurred())
        return -1;
    /* a fast entry calls the target with the checked arguments only: never with checks or a cast result */
    self->fast = (checks == NULL && result_type == NULL) ? (PyObject *(*)(void *, PyObject *const *))fast_entry
                                                         : NULL;
    self->meth = NULL;
    self->meth_self = NULL;
    self->meth_flags = 0;
    if (PyCFunction_Check(builtin)) {
        int flags = PyCFunction_GET_FLAGS(builtin) & ~(METH_CLASS | METH_STATIC | METH_COEXIST);
        if ((flags == METH_VARARGS && arity + 1 > 1) || (flags == METH_O && arity == 0)) {
            self->meth = PyCFunction_GET_FUNCTION(builtin);
            self->meth_self = PyCFunction_GET_SELF(builtin);
            self->meth_flags = flags;
        }
    }
    self->vectorcall = CompiledFunction_vectorcall;
    return 0;
}

static PyObject *
CompiledFunction_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"builtin", "abi", "arity", "checks", "result_type", "address", "fast", NULL};
    PyObject *builtin, *abi, *checks = Py_None, *result_type = Py_None, *address = Py_None, *fast = Py_None;
    Py_ssize_t arity;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOn|OOOO:CompiledFunction", kwlist, &builtin, &abi, &arity,
                                     &checks, &result_type, &address, &fast))
        return NULL;
    CompiledFunction *self = (CompiledFunction *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    if (nr_compiled_fill(self, builtin, abi, arity, checks, result_type, address, fast) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static int
CompiledFunction_traverse(CompiledFunction *self, visitproc visit, void *arg)
{
    Py_VISIT(self->builtin);
    Py_VISIT(self->address);
    Py_VISIT(self->abi);
    Py_VISIT(self->checks);
    Py_VISIT(self->result_type);
    return 0;
}

static int
CompiledFunction_clear(CompiledFunction *self)
{
    Py_CLEAR(self->builtin);
    Py_CLEAR(self->address);
    Py_CLEAR(self->abi);
    Py_CLEAR(self->checks);
    Py_CLEAR(self->result_type);
    return 0;
}

static void
CompiledFunction_dealloc(CompiledFunction *self)
{
    PyObject_GC_UnTrack(self);
    CompiledFunction_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
CompiledFunction_repr(CompiledFunction *self)
{
    return PyUnicode_FromFormat("<nativereload compiled function at %S, falling back to %R>",
                                self->address ? self->address : Py_None, self->abi ? self->abi : Py_None);
}

static PyObject *CompiledFunction_get_abi(CompiledFunction *s, void *c) { (void)c; return nr_or_none(s->abi); }
static PyObject *CompiledFunction_get_address(CompiledFunction *s, void *c) { (void)c; return nr_or_none(s->address); }
static PyObject *CompiledFunction_get_builtin(CompiledFunction *s, void *c) { (void)c; return nr_or_none(s->builtin); }

static PyGetSetDef CompiledFunction_getset[] = {
    {"abi", (getter)CompiledFunction_get_abi, NULL, "The image's cffi ABI function object (the fallback).", NULL},
    {"address", (getter)CompiledFunction_get_address, NULL, "The address of the image's function.", NULL},
    {"builtin", (getter)CompiledFunction_get_builtin, NULL, "The shape's compiled wrapper.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject CompiledFunction_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "nativereload._gate.CompiledFunction",
    .tp_doc = "CompiledFunction(builtin, abi, arity, checks=None, result_type=None, address=None, fast=None)\n--\n\n"
              "One image's function called through a compiled wrapper (see nativereload.compiled).",
    .tp_basicsize = sizeof(CompiledFunction),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(CompiledFunction, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_new = CompiledFunction_new,
    .tp_dealloc = (destructor)CompiledFunction_dealloc,
    .tp_traverse = (traverseproc)CompiledFunction_traverse,
    .tp_clear = (inquiry)CompiledFunction_clear,
    .tp_repr = (reprfunc)CompiledFunction_repr,
    .tp_getset = CompiledFunction_getset,
};

/* compiled_functions(specs, functions) -> dict: for each symbol of `functions`
 * (the image's ABI function objects) with an entry (builtin, arity, checks,
 * result_type) in `specs`, a CompiledFunction; the others as they are.  One
 * C loop, so that attaching the compiled path adds little to a reload. */
static PyObject *
nr_compiled_functions(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *specs, *functions;
    if (!PyArg_ParseTuple(args, "O!O!:compiled_functions", &PyDict_Type, &specs, &PyDict_Type, &functions))
        return NULL;
    PyObject *table = PyDict_New();
    if (table == NULL)
        return NULL;
    Py_ssize_t pos = 0;
    PyObject *symbol, *abi;
    while (PyDict_Next(functions, &pos, &symbol, &abi)) {
        PyObject *spec = PyDict_GetItemWithError(specs, symbol);       /* borrowed */
        PyObject *entry;
        if (spec == NULL) {
            if (PyErr_Occurred())
                goto fail;
            entry = Py_NewRef(abi);
        }
        else {
            if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) != 5) {
                PyErr_SetString(PyExc_TypeError,
                                "compiled_functions: a spec is (builtin, arity, checks, result_type, fast)");
                goto fail;
            }
            Py_ssize_t arity = PyLong_AsSsize_t(PyTuple_GET_ITEM(spec, 1));
            if (arity == -1 && PyErr_Occurred())
                goto fail;
            CompiledFunction *compiled = PyObject_GC_New(CompiledFunction, &CompiledFunction_Type);
            if (compiled == NULL)
                goto fail;
            compiled->builtin = compiled->address = compiled->abi = compiled->checks = compiled->result_type = NULL;
            if (nr_compiled_fill(compiled, PyTuple_GET_ITEM(spec, 0), abi, arity, PyTuple_GET_ITEM(spec, 2),
                                 PyTuple_GET_ITEM(spec, 3), NULL, PyTuple_GET_ITEM(spec, 4)) < 0) {
                PyObject_GC_Track(compiled);
                Py_DECREF(compiled);
                goto fail;
            }
            PyObject_GC_Track(compiled);
            entry = (PyObject *)compiled;
        }
        int status = PyDict_SetItem(table, symbol, entry);
        Py_DECREF(entry);
        if (status < 0)
            goto fail;
    }
    return table;
fail:
    Py_DECREF(table);
    return NULL;
}

static PyObject *
nr_configure_compiled(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *cast, *sample, *sample_type;
    if (!PyArg_ParseTuple(args, "OOO:configure_compiled", &cast, &sample, &sample_type))
        return NULL;
    if (!PyCallable_Check(cast)) {
        PyErr_SetString(PyExc_TypeError, "configure_compiled: cast must be callable");
        return NULL;
    }
    Py_XSETREF(nr_cast, Py_NewRef(cast));
    /* the cdata head we read (see above), checked on a cdata whose ctype we know */
    nr_cdata_layout_ok = nr_cdata_type != NULL && PyObject_TypeCheck(sample, nr_cdata_type)
                         && ((nr_cdata_head *)sample)->c_type == sample_type;
    return PyBool_FromLong(nr_cdata_layout_ok);
}

/* ------------------------------------------------------------------------ */
/* module                                                                   */
/* ------------------------------------------------------------------------ */

static PyObject *
nr_configure(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *cdata_type, *gcp, *deferred, *recheck;
    if (!PyArg_ParseTuple(args, "O!OOO:configure", &PyType_Type, &cdata_type, &gcp, &deferred, &recheck))
        return NULL;
    if (!PyCallable_Check(gcp) || !PyCallable_Check(deferred) || !PyCallable_Check(recheck)) {
        PyErr_SetString(PyExc_TypeError, "configure: gcp, deferred_drain and recheck_later must be callable");
        return NULL;
    }
    /* Set once, at import (under the import lock); later calls replace them. */
    Py_XSETREF(nr_cdata_type, (PyTypeObject *)Py_NewRef(cdata_type));
    Py_XSETREF(nr_gcp, Py_NewRef(gcp));
    Py_XSETREF(nr_deferred_drain, Py_NewRef(deferred));
    Py_XSETREF(nr_recheck_later, Py_NewRef(recheck));
    Py_RETURN_NONE;
}

static PyObject *
nr_clear_thread_cache(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
#ifdef Py_GIL_DISABLED
    nr_tcache *tc = nr_thread_cache;
    if (tc != NULL && tc->depth == 0) {
        for (int i = 0; i < NR_TCACHE_SIZE; i++) {
            tc->entries[i].func = NULL;
            Py_CLEAR(tc->entries[i].gate);
            Py_CLEAR(tc->entries[i].function);
        }
    }
#endif
    Py_RETURN_NONE;
}

static PyMethodDef gate_functions[] = {
    {"clear_thread_cache", nr_clear_thread_cache, METH_NOARGS,
     "clear_thread_cache()\n--\n\n"
     "Free-threaded builds: drop the calling thread's cached references to gates and function objects "
     "(each thread keeps those of the last call of each Func, at most 64). A no-op with the GIL."},
    {"compiled_functions", nr_compiled_functions, METH_VARARGS,
     "compiled_functions(specs, functions)\n--\n\n"
     "A new functions mapping: CompiledFunction for each symbol with a spec (builtin, arity, checks, "
     "result_type, fast), the ABI function object for the others."},
    {"configure_compiled", nr_configure_compiled, METH_VARARGS,
     "configure_compiled(cast, sample_cdata, its_ctype)\n--\n\n"
     "cffi's cast, and a cdata to verify the cdata layout on; returns whether it was verified."},
    {"configure", nr_configure, METH_VARARGS,
     "configure(cdata_type, gcp, deferred_drain, recheck_later)\n--\n\n"
     "cffi's cdata base type and gcp (ffi.gc); the callables that drain a gate on another thread, soon or "
     "a little later."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef gate_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "nativereload._gate",
    .m_doc = "The in-flight gate in C; see nativereload.gate for the protocol and nativereload/_gate.pyi.",
    .m_size = -1,
    .m_methods = gate_functions,
};

PyMODINIT_FUNC
PyInit__gate(void)
{
    if (PyType_Ready(&ImageGate_Type) < 0 || PyType_Ready(&Slot_Type) < 0 || PyType_Ready(&Func_Type) < 0
        || PyType_Ready(&CallPolicy_Type) < 0 || PyType_Ready(&CompiledFunction_Type) < 0)
        return NULL;
    if (nr_str_get == NULL && (nr_str_get = PyUnicode_InternFromString("get")) == NULL)
        return NULL;
#ifdef Py_GIL_DISABLED
    if (PyType_Ready(&nr_tcache_Type) < 0)
        return NULL;
    if (nr_tcache_key == NULL && (nr_tcache_key = PyUnicode_InternFromString("nativereload._gate.thread_cache")) == NULL)
        return NULL;
#endif
    PyObject *module = PyModule_Create(&gate_module);
    if (module == NULL)
        return NULL;
#ifdef Py_GIL_DISABLED
    /* safe without the GIL: see the comment at the top of this file */
    PyUnstable_Module_SetGIL(module, Py_MOD_GIL_NOT_USED);
#endif
    if (PyModule_AddObjectRef(module, "ImageGate", (PyObject *)&ImageGate_Type) < 0
        || PyModule_AddObjectRef(module, "Slot", (PyObject *)&Slot_Type) < 0
        || PyModule_AddObjectRef(module, "Func", (PyObject *)&Func_Type) < 0
        || PyModule_AddObjectRef(module, "CallPolicy", (PyObject *)&CallPolicy_Type) < 0
        || PyModule_AddObjectRef(module, "CompiledFunction", (PyObject *)&CompiledFunction_Type) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
