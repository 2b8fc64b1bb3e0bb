"""The in-flight gate: which image a call runs on, and when a retired image may close.

Three objects, identical in the pure-Python gate below and in the C gate
(``nativereload._gate``, built from ``csrc/_gate.c`` when a compiler is there):

``ImageGate(functions, on_drained)``
    One per loaded image. ``functions`` maps symbol -> cffi function object.
    Counts calls in flight (``in_flight``), and once ``retire()`` has been
    called and the count reaches zero, calls ``on_drained()`` exactly once,
    on whichever thread saw it drain (the retiring thread if it is idle).

``Slot()``
    One per loaded module: ``slot.current`` is the ImageGate new calls go to,
    or None once the module is unloaded. The registry stores a new gate there
    and then retires the old one.

``Func(slot, qualname, symbol, on_missing)``
    A callable handle on ``symbol``. Each call goes to ``slot.current``. If
    there is no current image, or it lacks the symbol, it calls
    ``on_missing(gate_or_None)`` and raises the exception that returns.

The protocol (no lock on the call path). A call:
    1. reads ``gate = slot.current``;
    2. counts itself in (``enters``);
    3. re-reads ``gate.retired``: if set, the image may be closing, so it
       counts itself out, tries to drain the gate, and starts again at 1;
    4. calls the function; counts itself out (``exits``) in ``finally``;
    5. if the gate is retired, tries to drain it.
Draining (under the gate's own lock, off the call path) reads ``exits``
*first*, then ``enters``, and fires ``on_drained`` only if they are equal.
Why it is safe: ``retired`` is set before the first drain attempt. If
exits == enters, no call was inside the image at the moment ``enters`` was
read; any call that counts itself in afterwards sees ``retired`` at step 3
and backs out before touching the image. A thread switch anywhere between
steps 1 and 3 only makes the drain attempt see enters > exits and leave the
image open; the switched thread then backs out and drains it itself (step 3),
so no image is left open for ever. Counters are ``itertools.count``: its
``next()`` is atomic under the GIL and thread-safe on free-threaded CPython
(gh-117657). On a free-threaded build the plain attribute stores and loads
of ``retired`` and ``current`` carry no ordering guarantee, so there the gate
takes a per-image lock around steps 2-3 and 4 instead.
"""

from __future__ import annotations

import abc
import inspect
import itertools
import os
import sys
import threading
from typing import Any, Callable

__all__ = ["Func", "ImageGate", "Slot", "implementation"]

_GIL_DISABLED = not getattr(sys, "_is_gil_enabled", lambda: True)()


def _count_value(counter: itertools.count) -> int:
    # repr is "count(N)"; itertools.count has no other public way to read N
    # (its pickling support is gone in Python 3.14).
    text = repr(counter)
    return int(text[6:-1])


class ImageGate:
    """In-flight accounting for one image. See the module docstring for the protocol."""

    __slots__ = ("functions", "retired", "_enters", "_exits", "_lock", "_on_drained", "_drained")

    def __init__(self, functions: dict[str, Any], on_drained: Callable[[], None]) -> None:
        self.functions = functions
        self.retired = False
        self._enters = itertools.count()
        self._exits = itertools.count()
        self._lock = threading.Lock()
        self._on_drained = on_drained
        self._drained = False

    @property
    def in_flight(self) -> int:
        """Calls that have entered and not yet left (a snapshot)."""
        exits = _count_value(self._exits)
        return max(0, _count_value(self._enters) - exits)

    @property
    def drained(self) -> bool:
        """True once ``on_drained`` has been called."""
        return self._drained

    def retire(self) -> None:
        """Stop admitting calls; fire ``on_drained`` now if none is in flight, else when the last returns.

        Call only after ``slot.current`` points elsewhere. Idempotent.
        """
        self.retired = True
        self.try_drain()

    def try_drain(self) -> None:
        """Fire ``on_drained`` once, if retired and no call is in flight."""
        if not self.retired or self._drained:
            return
        with self._lock:
            if self._drained:
                return
            exits = _count_value(self._exits)     # exits first: see the module docstring
            if exits != _count_value(self._enters):
                return
            self._drained = True
            # Taken, not kept: fires once, and breaks the cycle gate -> callback -> image -> gate.
            callback, self._on_drained = self._on_drained, None
        callback()


class Slot:
    """The image a module's new calls go to (``current``), or None once unloaded."""

    __slots__ = ("current",)

    def __init__(self) -> None:
        self.current: ImageGate | None = None


class Func(metaclass=abc.ABCMeta):
    """A reload-safe handle on one C function: each call runs on the module's current image.

    Made by ``Registry.func("module.symbol")``, ``Module.func(symbol)`` or
    ``module.SYMBOL``; not created directly. A call that started on an image
    finishes there even if a reload happens meanwhile; the next call goes to
    the new image.

    Attributes:
        name: "module.symbol".
        symbol: the C symbol.
    """

    __slots__ = ("name", "symbol", "_slot", "_on_missing")

    def __init__(self, slot: Slot, qualname: str, symbol: str,
                 on_missing: Callable[[ImageGate | None], BaseException]) -> None:
        """Internal: the registry makes Funcs (``Registry.func()``, ``Module.func()``)."""
        self.name = qualname
        self.symbol = symbol
        self._slot = slot
        self._on_missing = on_missing

    def __repr__(self) -> str:
        return f"<nativereload.Func {self.name}>"

    def __call__(self, *args: Any) -> Any:
        """Call the C function on the module's current image with ``args``; return its result (as cffi converts it).

        Raises:
            ModuleUnloaded: the module has been unloaded.
            SymbolError: the cdef of the current image does not declare this function.
            TypeError, OverflowError: cffi could not convert an argument.
        """
        slot = self._slot
        while True:
            gate = slot.current
            if gate is None:
                raise self._on_missing(None)
            next(gate._enters)
            if not gate.retired:
                break
            next(gate._exits)           # lost a race with a reload: back out,
            gate.try_drain()            # close it if we were the last, and retry
        try:
            function = gate.functions.get(self.symbol)
            if function is None:
                raise self._on_missing(gate)
            return function(*args)
        finally:
            next(gate._exits)
            if gate.retired:
                gate.try_drain()


class _LockedFunc(Func):
    """Func for free-threaded CPython: the enter/retired check and the exit run under the gate's lock."""

    __slots__ = ()

    def __call__(self, *args: Any) -> Any:
        slot = self._slot
        while True:
            gate = slot.current
            if gate is None:
                raise self._on_missing(None)
            with gate._lock:
                admitted = not gate.retired
                if admitted:
                    next(gate._enters)
            if admitted:
                break
        try:
            function = gate.functions.get(self.symbol)
            if function is None:
                raise self._on_missing(gate)
            return function(*args)
        finally:
            with gate._lock:
                next(gate._exits)
            if gate.retired:
                gate.try_drain()


class Implementation:
    """One gate implementation: the three types a registry builds its modules from."""

    __slots__ = ("name", "Slot", "ImageGate", "Func")

    def __init__(self, name: str, slot: type, image_gate: type, func: type) -> None:
        self.name = name
        self.Slot = slot
        self.ImageGate = image_gate
        self.Func = func


# The lock-based Python gate serves free-threaded builds; it is correct (and
# tested) with the GIL too.
LOCKED = Implementation("python-locked", Slot, ImageGate, _LockedFunc)
PYTHON = LOCKED if _GIL_DISABLED else Implementation("python", Slot, ImageGate, Func)

try:
    from . import _gate as _c_gate
except ImportError:       # not built (no compiler at install time): the Python gate serves
    _c_gate = None
    C = None
else:
    C = Implementation("c", _c_gate.Slot, _c_gate.ImageGate, _c_gate.Func)
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
