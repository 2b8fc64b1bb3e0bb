/* nativereload._gate: the in-flight gate in C.
 *
 * Same three types, constructor signatures and semantics as the pure-Python
 * gate in nativereload/gate.py, whose module docstring states the protocol:
 *
 *   ImageGate(functions, on_drained)  per image: enter/exit counters, retired flag
 *   Slot()                            per module: .current, the gate new calls go to
 *   Func(slot, qualname, symbol, on_missing)
 *                                     a vectorcall (PEP 590) handle on one symbol
 *
 * A call: read slot.current and take a strong reference; count enter; if the
 * gate is retired, count exit, try to drain it and start again; look the
 * function object up (cached per Func); call it; count exit (also when it
 * raised); if the gate is retired, try to drain it.  Draining reads exits
 * *first*, then enters, and fires on_drained once if they are equal.
 *
 * Why it is safe without a lock on the call path: every counter and flag is a
 * C11 atomic accessed with sequentially consistent operations, so all of them
 * fall into one total order.  retire() stores retired=1 before its first drain
 * attempt.  A drain attempt that reads exits == E and then enters == E saw no
 * call inside the image at the moment it read exits (exits never exceeds
 * enters) and no enter between its two reads; any call that counts itself in
 * later also loads retired later than the store, sees 1, and backs out before
 * touching the image.  A compare-and-swap on `drained` makes on_drained fire
 * exactly once even when several threads see the gate drain together.
 *
 * Free-threaded CPython (Py_GIL_DISABLED): the counters need nothing more, but
 * three "read a pointer, then take a reference" steps would race with a writer
 * that replaces the pointer and drops the last reference to the old object:
 * Slot.current, ImageGate.functions and Func's lookup cache.  Each of those
 * objects carries a PyMutex held only around the read+incref or the swap
 * (the old value is released after unlocking).  With the GIL the same steps
 * run without releasing it, so the mutex macros compile to nothing.
 *
 * Func caches (serial, function object) of the last gate it called through.
 * Each gate gets a process-unique serial at creation and a new one whenever
 * its `functions` attribute is assigned (the registry may swap in {} after a
 * drain), so a cache hit can never come from a freed gate whose address was
 * reused, nor from a replaced dict.  Only hits are cached: a symbol added to
 * the dict later is still found.  The cached strong reference to a function
 * object of a retired image is never called (retired gates are backed out of
 * before the lookup) and is dropped on the next call through another image.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

/* Counting a call in or out.  Free-threaded: a sequentially consistent atomic
 * read-modify-write.  With the GIL: every access to the counters and flags
 * happens in C code holding the GIL, which is not released between the load
 * and the store, and GIL hand-offs order everything else; so a relaxed load
 * and store (no LOCK-prefixed instruction on x86: ~10 ns less per call)
 * count exactly as well. */
#ifdef Py_GIL_DISABLED
#define NR_COUNT(counter) atomic_fetch_add(&(counter), 1)
#else
#define NR_COUNT(counter) \
    atomic_store_explicit(&(counter), atomic_load_explicit(&(counter), memory_order_relaxed) + 1, \
                          memory_order_relaxed)
#endif

#ifdef Py_GIL_DISABLED
#define NR_MUTEX_FIELD PyMutex mutex;
#define NR_LOCK(obj) PyMutex_Lock(&(obj)->mutex)
#define NR_UNLOCK(obj) PyMutex_Unlock(&(obj)->mutex)
#else
#define NR_MUTEX_FIELD
#define NR_LOCK(obj) ((void)0)
#define NR_UNLOCK(obj) ((void)0)
#endif

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

typedef struct {
    PyObject_HEAD
    _Atomic(uint64_t) enters;
    _Atomic(uint64_t) exits;
    _Atomic(int) retired;
    _Atomic(int) drained;
    _Atomic(uint64_t) serial;   /* changes with every assignment of functions */
    PyObject *functions;        /* guarded by mutex on free-threaded builds */
    PyObject *on_drained;       /* taken (set to NULL) by the thread that fires it */
    NR_MUTEX_FIELD
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
    return 0;
}

static int
ImageGate_clear(ImageGate *self)
{
    Py_CLEAR(self->functions);
    Py_CLEAR(self->on_drained);
    return 0;
}

static void
ImageGate_dealloc(ImageGate *self)
{
    PyObject_GC_UnTrack(self);
    ImageGate_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Fire on_drained if the gate is retired and no call is in flight.
 * Returns 0, or -1 with an exception set if on_drained raised. */
static int
nr_gate_try_drain(ImageGate *self)
{
    if (!atomic_load(&self->retired) || atomic_load(&self->drained))
        return 0;
    /* exits first: see the comment at the top of this file */
    uint64_t exits = atomic_load(&self->exits);
    uint64_t enters = atomic_load(&self->enters);
    if (exits != enters)
        return 0;
    int expected = 0;
    if (!atomic_compare_exchange_strong(&self->drained, &expected, 1))
        return 0;               /* another thread saw it drain first and fires it */
    /* Only the CAS winner gets here, so only it takes the callback; dropping
     * it also breaks the usual cycle gate -> on_drained -> registry -> gate. */
    PyObject *callback = self->on_drained;
    self->on_drained = NULL;
    if (callback == NULL)
        return 0;
    PyObject *result = PyObject_CallNoArgs(callback);
    Py_DECREF(callback);
    if (result == NULL)
        return -1;
    Py_DECREF(result);
    return 0;
}

static PyObject *
ImageGate_retire(ImageGate *self, PyObject *Py_UNUSED(ignored))
{
    atomic_store(&self->retired, 1);
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
ImageGate_get_functions(ImageGate *self, void *Py_UNUSED(closure))
{
    NR_LOCK(self);
    PyObject *functions = self->functions;
    Py_XINCREF(functions);
    NR_UNLOCK(self);
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
    return PyBool_FromLong(atomic_load(&self->retired));
}

static PyObject *
ImageGate_get_drained(ImageGate *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(atomic_load(&self->drained));
}

static PyObject *
ImageGate_get_in_flight(ImageGate *self, void *Py_UNUSED(closure))
{
    uint64_t exits = atomic_load(&self->exits);
    uint64_t enters = atomic_load(&self->enters);
    return PyLong_FromUnsignedLongLong(enters > exits ? enters - exits : 0);
}

static PyMethodDef ImageGate_methods[] = {
    {"retire", (PyCFunction)ImageGate_retire, METH_NOARGS,
     "retire()\n--\n\nStop admitting calls; fire on_drained now if none is in flight, else when the "
     "last returns. Call only after slot.current points elsewhere. Idempotent."},
    {"try_drain", (PyCFunction)ImageGate_try_drain, METH_NOARGS,
     "try_drain()\n--\n\nFire on_drained once, if retired and no call is in flight."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef ImageGate_getset[] = {
    {"functions", (getter)ImageGate_get_functions, (setter)ImageGate_set_functions,
     "symbol -> function object; assigning a new mapping invalidates every Func's cached lookup.", NULL},
    {"retired", (getter)ImageGate_get_retired, NULL, "True once retire() was called.", NULL},
    {"drained", (getter)ImageGate_get_drained, NULL, "True once on_drained has been called.", NULL},
    {"in_flight", (getter)ImageGate_get_in_flight, NULL,
     "Calls that have entered and not yet left (a snapshot).", NULL},
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
    self->current = gate;
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
/* Func                                                                     */
/* ------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    Slot *slot;
    PyObject *name;             /* "module.symbol" */
    PyObject *symbol;           /* exact str */
    PyObject *on_missing;       /* on_missing(gate_or_None) -> exception to raise */
    uint64_t cache_serial;      /* serial of the gate cache_function came from; 0 = none */
    PyObject *cache_function;   /* both cache fields guarded by mutex on free-threaded builds */
    NR_MUTEX_FIELD
} Func;

static PyTypeObject Func_Type;

/* "get", interned once at import (a lazy static would race on free-threaded builds) */
static PyObject *nr_str_get;

/* Raise the exception on_missing(gate_or_None) returns.  Always returns NULL. */
static PyObject *
nr_func_raise_missing(Func *self, PyObject *gate_or_none)
{
    PyObject *exc = PyObject_CallOneArg(self->on_missing, gate_or_none);
    if (exc == NULL)
        return NULL;
    /* the same rules as Python's `raise exc` */
    if (PyExceptionInstance_Check(exc))
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
    else if (PyExceptionClass_Check(exc))
        PyErr_SetNone(exc);
    else
        PyErr_Format(PyExc_TypeError, "on_missing must return an exception, not %.100s", Py_TYPE(exc)->tp_name);
    Py_DECREF(exc);
    return NULL;
}

/* The function object for self->symbol in gate: a new reference; NULL with
 * no exception set when the gate lacks it (missing or None); NULL with an
 * exception set when the lookup itself failed. */
static PyObject *
nr_func_lookup(Func *self, ImageGate *gate)
{
    PyObject *function = NULL;
    uint64_t serial = atomic_load(&gate->serial);

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

/* After a call on a retired gate: try to drain it, keeping `result` or the
 * pending exception unless on_drained raises, in which case its exception
 * wins with the call's exception as __context__ (as a `finally:` would). */
static PyObject *
nr_func_drain_after(ImageGate *gate, PyObject *result)
{
    if (result != NULL) {
        if (nr_gate_try_drain(gate) < 0)
            Py_CLEAR(result);
        return result;
    }
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *exc = PyErr_GetRaisedException();
    if (nr_gate_try_drain(gate) < 0) {
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
    if (nr_gate_try_drain(gate) < 0) {
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

static PyObject *
Func_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Func *self = (Func *)callable;
    ImageGate *gate;

    if (self->slot == NULL) {
        PyErr_SetString(PyExc_TypeError, "Func.__init__() was not called");
        return NULL;
    }
    if (kwnames != NULL && PyTuple_GET_SIZE(kwnames) != 0) {
        PyErr_Format(PyExc_TypeError, "%S() takes no keyword arguments", self->name);
        return NULL;
    }
    for (int retried = 0;; retried = 1) {
        gate = nr_slot_get(self->slot);
        if (gate == NULL)
            return nr_func_raise_missing(self, Py_None);
        NR_COUNT(gate->enters);
        if (!atomic_load(&gate->retired))
            break;
        /* lost a race with a reload: back out, close it if we were the last, and retry */
        NR_COUNT(gate->exits);
        int status = nr_gate_try_drain(gate);
        Py_DECREF(gate);
        if (status < 0)
            return NULL;
        if (retried) {
            /* Retired again on a re-read: slot.current has not moved on yet (a
             * swap in progress, or a registry that retired before swapping).
             * The Python gate's loop lets other threads run here; so must we,
             * or the thread that will move slot.current never gets the GIL.
             * Stay interruptible too. */
            Py_BEGIN_ALLOW_THREADS
            sched_yield();
            Py_END_ALLOW_THREADS
            if (PyErr_CheckSignals() < 0)
                return NULL;
        }
    }

    PyObject *result = NULL;
    PyObject *function = nr_func_lookup(self, gate);
    if (function != NULL) {
        /* nargsf passes PY_VECTORCALL_ARGUMENTS_OFFSET on: our caller's args[-1] is the callee's too */
        result = PyObject_Vectorcall(function, args, nargsf, NULL);
        Py_DECREF(function);
    }
    else if (!PyErr_Occurred()) {
        nr_func_raise_missing(self, (PyObject *)gate);
    }
    NR_COUNT(gate->exits);
    if (atomic_load(&gate->retired))
        result = nr_func_drain_after(gate, result);
    Py_DECREF(gate);
    return result;
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
    PyObject *value = self->name ? self->name : Py_None;
    Py_INCREF(value);
    return value;
}

static PyObject *
Func_get_symbol(Func *self, void *Py_UNUSED(closure))
{
    PyObject *value = self->symbol ? self->symbol : Py_None;
    Py_INCREF(value);
    return value;
}

static PyGetSetDef Func_getset[] = {
    {"name", (getter)Func_get_name, NULL, "\"module.symbol\".", NULL},
    {"symbol", (getter)Func_get_symbol, NULL, "The C symbol.", NULL},
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
/* module                                                                   */
/* ------------------------------------------------------------------------ */

static struct PyModuleDef gate_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "nativereload._gate",
    .m_doc = "The in-flight gate in C; see nativereload.gate for the protocol and nativereload/_gate.pyi.",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__gate(void)
{
    if (PyType_Ready(&ImageGate_Type) < 0 || PyType_Ready(&Slot_Type) < 0 || PyType_Ready(&Func_Type) < 0)
        return NULL;
    if (nr_str_get == NULL && (nr_str_get = PyUnicode_InternFromString("get")) == NULL)
        return NULL;
    PyObject *module = PyModule_Create(&gate_module);
    if (module == NULL)
        return NULL;
#ifdef Py_GIL_DISABLED
    /* safe without the GIL: see the comment at the top of this file */
    PyUnstable_Module_SetGIL(module, Py_MOD_GIL_NOT_USED);
#endif
    if (PyModule_AddObjectRef(module, "ImageGate", (PyObject *)&ImageGate_Type) < 0
        || PyModule_AddObjectRef(module, "Slot", (PyObject *)&Slot_Type) < 0
        || PyModule_AddObjectRef(module, "Func", (PyObject *)&Func_Type) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
