"""The in-flight gate: which image a call runs on, and when a retired image may close.

Four objects, identical in the pure-Python gate below and in the C gate
(``nativereload._gate``, built from ``csrc/_gate.c`` when a compiler is there):

``ImageGate(functions, on_drained)``
    One per loaded image. ``functions`` maps symbol -> cffi function object.
    Counts the calls in flight (``in_flight``) and the *holds* on the image:
    pins (``pins``), pointer results (``pointer_results``) and bound handles
    (taken with ``hold()`` by the registry's bindings). Once ``retire()`` has
    been called and no call and no hold is left, it calls ``on_drained()``
    exactly once, on whichever thread saw it drain.

``Slot()``
    One per loaded module: ``slot.current`` is the ImageGate new calls go to,
    or None once the module is unloaded. The registry stores a new gate there
    and then retires the old one.

``Func(slot, qualname, symbol, on_missing)``
    A callable handle on ``symbol``. Each call goes to ``slot.current``. If
    there is no current image, or it lacks the symbol, it calls
    ``on_missing(gate_or_None)`` and raises the exception that returns.
    ``func.policy`` (None, or a CallPolicy) adds what a function that takes or
    returns objects needs; with None a call pays nothing for it.

``CallPolicy(handle_args, pointer_result, needs_after, after, table, on_conflict, on_released)``
    How one function's objects are treated (affinity.py builds them):
    ``handle_args`` are the argument positions that carry handles: a handle
    found in ``table`` (address -> ImageGate) routes the call to that image
    instead of the current one. ``pointer_result``: the result is leased
    (``ImageGate.lease``), so the image stays mapped while the returned cdata
    lives. ``after(gate, args, result, unbound)`` runs inside the call, before
    it counts itself out, when ``needs_after`` or when a handle argument was
    not bound yet (bit k of ``unbound`` for ``handle_args[k]``); it binds what
    the call made and returns the result to hand back.

The protocol (no lock on the call path). A call:
    1. reads ``gate = slot.current`` (or, routed, the gate its handle is bound to);
    2. counts itself in (``enters``);
    3. re-reads the gate's flags: if it is retired (a routed call: if its
       handle was released meanwhile) or paused, it counts itself out, tries
       to drain the gate, waits while paused, and starts again at 1;
    4. calls the function; takes a hold for each object the call returns or
       binds (still inside, so the image cannot drain in between); counts
       itself out (``exits``) in ``finally``;
    5. if the gate is retired, tries to drain it; if it is paused and now
       quiet, tells the pauser.
A hold is released by dropping it (``holds`` down) and then trying to drain.
A pin is admitted like a call (steps 1-3), takes a hold, and counts itself out.
Draining (off the call path) reads ``exits`` *first*, then ``enters``; if they
are equal, reads ``holds``; if that is zero, reads ``enters`` again; only if
it did not move does it fire ``on_drained`` (once: a compare-and-set).
Why it is safe: ``retired`` is set before the first drain attempt. If exits ==
enters, no call was inside the image when ``enters`` was read; a call counting
itself in afterwards sees ``retired`` at step 3 and backs out before touching
the image -- except a routed call, which does not back out of a retired image
because its handle's hold keeps it open: that hold is dropped only after the
binding is gone, and a routed call that counted itself in while the binding
existed is caught by the second read of ``enters``; one that came later finds
the binding gone at step 3 and backs out. Holds are only ever taken by a call
or pin that is counted in at that moment, so a drain that saw no call and no
hold cannot miss one being taken. The model in tools/model checks this.

On free-threaded builds the C gate stripes ``enters``/``exits`` per thread
(a call counts both on its thread's stripe) and a drain reads every stripe's
exits before any stripe's enters, comparing sums; csrc/_gate.c gives the
argument. An image's ``functions`` may hold compiled entries instead of cffi
function objects (nativereload/compiled/): the protocol does not change.

Counters of the Python gate are ``itertools.count`` (``next()`` is atomic
under the GIL and thread-safe on free-threaded CPython, gh-117657); a count
that goes down is a pair of them (up, down), read down first, so a snapshot
never shows fewer holds than there are. On a free-threaded build the plain
attribute stores and loads of the flags carry no ordering guarantee, so there
the gate takes a per-image lock around steps 2-3 and around the exit.
"""

from __future__ import annotations

import abc
import inspect
import itertools
import logging
import os
import queue
import sys
import threading
import time
from typing import Any, Callable

import _cffi_backend

__all__ = ["CallPolicy", "Func", "ImageGate", "Slot", "implementation"]

logger = logging.getLogger(__name__.rpartition(".")[0])

_GIL_DISABLED = not getattr(sys, "_is_gil_enabled", lambda: True)()

_CData = _cffi_backend._CDataBase
_gcp = _cffi_backend.gcp


def _count_value(counter: itertools.count) -> int:
    # repr is "count(N)"; itertools.count has no other public way to read N
    # (its pickling support is gone in Python 3.14).
    text = repr(counter)
    return int(text[6:-1])


class _Tally:
    """A count that goes up and down, safely snapshot: ``value`` never shows less than the true count."""

    __slots__ = ("_up", "_down")

    def __init__(self) -> None:
        self._up = itertools.count()
        self._down = itertools.count()

    def up(self) -> None:
        next(self._up)

    def down(self) -> None:
        next(self._down)

    @property
    def value(self) -> int:
        down = _count_value(self._down)     # down first: see the module docstring
        return _count_value(self._up) - down


# -- deferred drains -----------------------------------------------------------------------------------------

class _DeferredDrains:
    """Drain attempts that must not run where they are triggered run here, on one daemon thread.

    A pointer result's lease may end inside the garbage collector, which can
    run on any thread at any allocation, including inside the registry's own
    locked sections: closing the image there could deadlock. Such a lease only
    counts itself out and queues the gate here. And a retired C gate whose
    pointer results are still alive asks to be tried again a little later
    (:meth:`later`): nothing tells it when the last one is freed.
    """

    RECHECK_SECONDS = 0.02
    # Held by the class: at interpreter exit the module's globals may already be None.
    _finalizing = staticmethod(sys.is_finalizing)

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._later: dict[int, tuple[float, Any]] = {}     # id(gate) -> (when, gate)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def submit(self, gate: Any) -> None:
        """Try to drain ``gate`` on the drain thread."""
        self.call(gate.try_drain)

    def later(self, gate: Any) -> None:
        """Try to drain ``gate`` again in RECHECK_SECONDS (once, however often this is asked meanwhile)."""
        with self._lock:
            self._later.setdefault(id(gate), (time.monotonic() + self.RECHECK_SECONDS, gate))
        self.call(None)

    def call(self, function: Callable[[], object] | None) -> None:
        """Run ``function()`` on the drain thread (started on first use; restarted in a forked child).

        Not at interpreter exit: a pin or pointer result freed by the final
        collection would start a thread there, and Thread.start() never
        returns during finalization (3.11; 3.12+ raise). The process is
        ending: the loader unmaps everything with it.
        """
        if self._finalizing():
            return
        if os.getpid() != self._pid:           # forked: the parent's thread does not exist here
            self.__init__()
        self._queue.put(function)
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="nativereload-drain", daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                due = min((when for when, _ in self._later.values()), default=None)
            timeout = None if due is None else max(0.0, due - time.monotonic())
            try:
                function = self._queue.get(timeout=timeout)
            except queue.Empty:
                function = None
            now = time.monotonic()
            with self._lock:
                ready = [gate for key, (when, gate) in list(self._later.items()) if when <= now
                         and self._later.pop(key)]
            for task in ([function] if function is not None else []) + [gate.try_drain for gate in ready]:
                try:
                    task()
                except Exception:
                    logger.exception("nativereload: closing a drained image failed")


deferred_drains = _DeferredDrains()


# -- the Python gate -----------------------------------------------------------------------------------------

class ImageGate:
    """In-flight accounting for one image. See the module docstring for the protocol."""

    __slots__ = ("functions", "retired", "paused", "_enters", "_exits", "_holds", "_pins", "_leases", "_lock",
                 "_on_drained", "_drained", "_resume", "_on_quiet")

    # Held by the class: a lease that ends in the final collection at exit finds it even after the
    # module's globals were cleared.
    _deferred_drains = deferred_drains

    def __init__(self, functions: dict[str, Any], on_drained: Callable[[], None]) -> None:
        self.functions = functions
        self.retired = False
        self.paused = False
        self._enters = itertools.count()
        self._exits = itertools.count()
        self._holds = _Tally()
        self._pins = _Tally()
        self._leases = _Tally()
        self._lock = threading.Lock()
        self._on_drained = on_drained
        self._drained = False
        self._resume: Any = None
        self._on_quiet: Callable[[], object] | None = None

    @property
    def in_flight(self) -> int:
        """Calls that have entered and not yet left (a snapshot; pins and other holds not included)."""
        exits = _count_value(self._exits)
        return max(0, _count_value(self._enters) - exits)

    @property
    def holds(self) -> int:
        """Pins, pointer results and bound handles keeping this image open."""
        return self._holds.value

    @property
    def pins(self) -> int:
        return self._pins.value

    @property
    def pointer_results(self) -> int:
        return self._leases.value

    @property
    def drained(self) -> bool:
        """True once ``on_drained`` has been called."""
        return self._drained

    def retire(self) -> None:
        """Stop admitting calls; fire ``on_drained`` now if nothing is in flight or held, else when the last goes.

        Call only after ``slot.current`` points elsewhere. Idempotent.
        """
        self.retired = True
        self.try_drain()

    def try_drain(self) -> None:
        """Fire ``on_drained`` once, if retired and no call is in flight and no hold is left."""
        if not self.retired or self._drained:
            return
        with self._lock:
            if self._drained:
                return
            exits = _count_value(self._exits)     # exits first: see the module docstring
            enters = _count_value(self._enters)
            if exits != enters or self._holds.value != 0 or _count_value(self._enters) != enters:
                return
            self._drained = True
            # Taken, not kept: fires once, and breaks the cycle gate -> callback -> image -> gate.
            callback, self._on_drained = self._on_drained, None
        callback()

    # -- holds -------------------------------------------------------------------------------------

    def hold(self) -> None:
        """Take a hold: only while a call counted in on this gate is running (it keeps the image open)."""
        self._holds.up()

    def release_hold(self, deferred: bool = False) -> None:
        """Drop a hold, then drain if it was the last; ``deferred``: leave the drain to the drain thread."""
        self._holds.down()
        if self.retired:
            if deferred:
                self._deferred_drains.submit(self)
            else:
                self.try_drain()

    def lease(self, result: Any) -> Any:
        """Hold the image for as long as the returned cdata (which points to the same address) lives.

        Only while a call counted in on this gate is running; a NULL result is returned as it is.
        """
        if not isinstance(result, _CData) or not result:
            return result
        self._holds.up()
        self._leases.up()
        return _gcp(result, self._end_lease)

    def _end_lease(self, _cdata: Any) -> None:
        self._leases.down()
        self.release_hold(deferred=True)   # we may be inside the garbage collector

    def try_pin(self) -> bool:
        """Admit a pin like a call: take a hold and return True, or False if retired or paused (nothing taken)."""
        if not self._enter():
            self._exit()
            return False
        self._holds.up()
        self._pins.up()
        self._exit()
        return True

    def unpin(self) -> None:
        """Release a pin taken by :meth:`try_pin`."""
        self._pins.down()
        self.release_hold()

    # -- pausing (exclusive reloads) -----------------------------------------------------------------

    def pause(self, resume: Any, on_quiet: Callable[[], object]) -> None:
        """Make new calls wait on ``resume.wait()``; call ``on_quiet()`` whenever the last call in flight exits.

        ``on_quiet`` may run on a caller's thread: keep it short (e.g. Event.set).
        """
        self._resume = resume
        self._on_quiet = on_quiet
        self.paused = True

    def unpause(self) -> None:
        """Admit calls again (set the ``resume`` event after this to wake the waiting ones)."""
        self.paused = False
        self._on_quiet = None

    def wait_resumed(self) -> None:
        resume = self._resume
        if resume is not None and self.paused:
            resume.wait()

    # -- the steps of a call (the Python Funcs below use them) ---------------------------------------

    def _enter(self) -> bool:
        next(self._enters)
        return not (self.retired or self.paused)

    def _exit(self) -> None:
        next(self._exits)
        if self.retired:
            self.try_drain()
        elif self.paused:
            self._quiet_check()

    def _quiet_check(self) -> None:
        on_quiet = self._on_quiet
        if on_quiet is not None and self.in_flight == 0:
            on_quiet()


class Slot:
    """The image a module's new calls go to (``current``), or None once unloaded."""

    __slots__ = ("current",)

    def __init__(self) -> None:
        self.current: ImageGate | None = None


class CallPolicy:
    """What a call of one function does with the objects it takes and returns (see the module docstring)."""

    __slots__ = ("handle_args", "pointer_result", "needs_after", "after", "table", "on_conflict", "on_released")

    def __init__(self, handle_args: tuple[int, ...], pointer_result: bool, needs_after: bool,
                 after: Callable[..., Any] | None, table: dict, on_conflict: Callable[[Any, Any], BaseException],
                 on_released: Callable[[Any], BaseException]) -> None:
        self.handle_args = tuple(int(i) for i in handle_args)
        self.pointer_result = bool(pointer_result)
        self.needs_after = bool(needs_after)
        self.after = after
        self.table = table
        self.on_conflict = on_conflict
        self.on_released = on_released


class Func(metaclass=abc.ABCMeta):
    """A reload-safe handle on one C function: each call runs on the module's current image.

    Made by ``Registry.func("module.symbol")``, ``Module.func(symbol)`` or
    ``module.SYMBOL``; not created directly. A call that started on an image
    finishes there even if a reload happens meanwhile; the next call goes to
    the new image.

    Attributes:
        name: "module.symbol".
        symbol: the C symbol.
        policy: None, or the CallPolicy of a function that takes or returns objects.
    """

    __slots__ = ("name", "symbol", "policy", "_slot", "_on_missing")

    def __init__(self, slot: Slot, qualname: str, symbol: str,
                 on_missing: Callable[[ImageGate | None], BaseException]) -> None:
        """Internal: the registry makes Funcs (``Registry.func()``, ``Module.func()``)."""
        self.name = qualname
        self.symbol = symbol
        self.policy: CallPolicy | None = None
        self._slot = slot
        self._on_missing = on_missing

    def __repr__(self) -> str:
        return f"<nativereload.Func {self.name}>"

    def __call__(self, *args: Any) -> Any:
        """Call the C function on the module's current image with ``args``; return its result (as cffi converts it).

        A call that passes a handle bound to an earlier image runs on that image.

        Raises:
            ModuleUnloaded: the module has been unloaded.
            SymbolError: the cdef of the current image does not declare this function.
            HandleError: handles bound to two different images in one call.
            TypeError, OverflowError: cffi could not convert an argument.
        """
        if self.policy is not None:
            return self._call_with_policy(args)
        slot = self._slot
        while True:
            gate = slot.current
            if gate is None:
                raise self._on_missing(None)
            next(gate._enters)
            if not (gate.retired or gate.paused):
                break
            next(gate._exits)           # lost a race with a reload (or paused): back out,
            gate.try_drain()            # close it if we were the last, and retry
            gate.wait_resumed()
        try:
            function = gate.functions.get(self.symbol)
            if function is None:
                raise self._on_missing(gate)
            return function(*args)
        finally:
            next(gate._exits)
            if gate.retired:
                gate.try_drain()
            elif gate.paused:
                gate._quiet_check()

    # -- functions that take or return objects -----------------------------------------------------

    def _route(self, policy: CallPolicy, args: tuple) -> tuple[Any, int]:
        """The gate the call's bound handles name (or None), and the bit mask of unbound handle arguments."""
        target = None
        unbound = 0
        table = policy.table
        for k, index in enumerate(policy.handle_args):
            if index >= len(args):
                continue
            value = args[index]
            if not isinstance(value, _CData) or not value:
                continue
            bound = table.get(value)
            if bound is None:
                unbound |= 1 << k
            elif target is None:
                target = bound
            elif bound is not target:
                raise policy.on_conflict(target, bound)
        return target, unbound

    def _admit(self, policy: CallPolicy, args: tuple) -> tuple[ImageGate, int]:
        """Count the call in on the gate it must run on; return that gate and the unbound mask."""
        while True:
            target, unbound = self._route(policy, args)
            if target is None:
                gate = self._slot.current
                if gate is None:
                    raise self._on_missing(None)
                if gate._enter():
                    return gate, unbound
            else:
                gate = target
                admitted = gate._enter()
                if admitted or not gate.paused:
                    # A retired gate is fine here: the binding holds it open, if it is still there.
                    if self._route(policy, args)[0] is gate:
                        return gate, unbound
                    gate._exit()
                    raise policy.on_released(gate)
            gate._exit()                # retired or paused: back out, and retry
            gate.wait_resumed()

    def _call_with_policy(self, args: tuple) -> Any:
        policy = self.policy
        gate, unbound = self._admit(policy, args)
        try:
            function = gate.functions.get(self.symbol)
            if function is None:
                raise self._on_missing(gate)
            result = function(*args)
            if policy.pointer_result:
                result = gate.lease(result)
            if policy.needs_after or unbound:
                result = policy.after(gate, args, result, unbound)
            return result
        finally:
            gate._exit()


class _LockedFunc(Func):
    """Func for free-threaded CPython: the enter/flags check and the exit run under the gate's lock."""

    __slots__ = ()

    def __call__(self, *args: Any) -> Any:
        if self.policy is not None:
            return self._call_with_policy(args)
        slot = self._slot
        while True:
            gate = slot.current
            if gate is None:
                raise self._on_missing(None)
            if _LockedImageGate._enter(gate):
                break
            _LockedImageGate._exit(gate)
            gate.wait_resumed()
        try:
            function = gate.functions.get(self.symbol)
            if function is None:
                raise self._on_missing(gate)
            return function(*args)
        finally:
            _LockedImageGate._exit(gate)


class _LockedImageGate(ImageGate):
    """ImageGate for free-threaded CPython: admission and exit under the gate's lock."""

    __slots__ = ()

    def _enter(self) -> bool:
        with self._lock:
            next(self._enters)
            return not (self.retired or self.paused)

    def _exit(self) -> None:
        with self._lock:
            next(self._exits)
        if self.retired:
            self.try_drain()
        elif self.paused:
            self._quiet_check()

    def retire(self) -> None:
        with self._lock:
            self.retired = True
        self.try_drain()

    def pause(self, resume: Any, on_quiet: Callable[[], object]) -> None:
        with self._lock:
            super().pause(resume, on_quiet)

    def unpause(self) -> None:
        with self._lock:
            super().unpause()


class Implementation:
    """One gate implementation: the types a registry builds its modules from."""

    __slots__ = ("name", "Slot", "ImageGate", "Func", "CallPolicy")

    def __init__(self, name: str, slot: type, image_gate: type, func: type, call_policy: type) -> None:
        self.name = name
        self.Slot = slot
        self.ImageGate = image_gate
        self.Func = func
        self.CallPolicy = call_policy

    def __repr__(self) -> str:
        return f"<nativereload gate {self.name!r}>"


# The lock-based Python gate serves free-threaded builds; it is correct (and
# tested) with the GIL too.
LOCKED = Implementation("python-locked", Slot, _LockedImageGate, _LockedFunc, CallPolicy)
PYTHON = LOCKED if _GIL_DISABLED else Implementation("python", Slot, ImageGate, Func, CallPolicy)

try:
    from . import _gate as _c_gate
except ImportError:       # not built (no compiler at install time): the Python gate serves
    _c_gate = None
    C = None
else:
    _c_gate.configure(_CData, _gcp, deferred_drains.submit, deferred_drains.later)
    C = Implementation("c", _c_gate.Slot, _c_gate.ImageGate, _c_gate.Func, _c_gate.CallPolicy)
    Func.register(_c_gate.Func)


# help(Func) shows how to get one, not the registry's internal constructor arguments
# (pydoc omits a class's signature line when it is "()").
Func.__init__.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)])


def implementation() -> Implementation:
    """The gate a new Registry uses: the C gate if built, unless ``NATIVERELOAD_PURE_PYTHON=1``."""
    if C is None or os.environ.get("NATIVERELOAD_PURE_PYTHON", "") not in ("", "0"):
        return PYTHON
    return C
