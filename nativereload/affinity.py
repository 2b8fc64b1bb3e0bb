"""Objects that cross a reload: which image an object belongs to, and how long it keeps that image open.

The rule, Erlang's "a process keeps running the old code until it makes a
fully qualified call" brought to C objects: **an object made by generation N
is used with generation N's code for as long as it lives, and generation N
stays mapped until the last such object is gone**; new objects and stateless
calls move to the new code at once. Three mechanisms, all counted as *holds*
on the image's gate (gate.py):

Pins (:class:`Pin`)
    ``mod.pin()`` takes the current image and holds it until ``release()``;
    the pin's functions are that image's own cffi functions (no gate per call).

Handle bindings (:class:`Bindings`)
    A *handle type* is a pointer to a struct or union the cdef declares without
    a body (``sqlite3 *``, ``ZSTD_CCtx *``), plus any the user names
    (``handles=["z_stream *"]``). A handle value is *bound* to an image when a
    call on that image returns it, writes it through an out-parameter
    (``T **``), or receives it unbound (``deflateInit_(strm, ...)``). A call
    whose arguments include a bound handle runs on that image, even after it
    was replaced or unloaded; two handles bound to different images in one call
    are refused. A binding ends when the handle is passed to one of the
    module's *destructors* (after that call returns) or ``reg.release(handle)``.
    A handle whose cdata is garbage-collected without either stays bound: the C
    object may still exist, so keeping its image mapped is the safe default.

Pointer results
    Any other pointer a call returns (``const char *`` into static data, a
    function pointer) is leased: the returned cdata keeps its image mapped for
    as long as it lives (``ffi.gc`` under the hood). Functions that return no
    pointer and take no handle pay nothing: they keep today's call path.

This module decides which functions need what (:func:`signatures`), keeps the
bindings, and builds the gate's CallPolicy objects and pins; the gate does the
per-call work.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, Callable, Iterable, NamedTuple

import cffi

from . import gate as _gate
from .errors import HandleError, InterfaceError, PinReleased

__all__ = ["Bindings", "Pin", "Signature", "make_policy", "signatures"]

logger = logging.getLogger(__name__.rpartition(".")[0])

# Casting to void * gives a cdata that compares and hashes by address like the
# caller's, and does not own (keep alive) the memory: the binding table's keys.
_key_ffi = cffi.FFI()
_CData = _gate._CData


def _key(value: Any) -> Any:
    return _key_ffi.cast("void *", value)


class Signature(NamedTuple):
    """What a call of one function does with objects.

    handle_args: positions of arguments of a handle type; handle_names: their C types.
    out_args: (position, C type) of ``T **`` arguments through which a handle is returned.
    result: "plain", "pointer" (leased) or "handle" (bound).
    """

    handle_args: tuple[int, ...]
    handle_names: tuple[str, ...]
    out_args: tuple[tuple[int, str], ...]
    result: str
    result_name: str
    destructor: bool

    @property
    def needs_after(self) -> bool:
        return bool(self.out_args) or self.result == "handle" or self.destructor


def handle_types(ffi: Any, function_types: dict[str, Any], handles: Iterable[str] | None,
                 module: str) -> dict[Any, str]:
    """The handle ctypes of an interface -> their C names.

    ``handles``: None for the default (pointers to structs and unions declared
    without a body); an empty iterable for none at all; otherwise the default
    plus these C types (``"z_stream *"``, or ``"z_stream"`` meaning a pointer to it).

    Raises:
        InterfaceError: a named type the cdef does not declare.
    """
    found: dict[Any, str] = {}
    names = None if handles is None else list(handles)
    if names == []:
        return found
    for ctype in function_types.values():
        for candidate in (ctype.result, *ctype.args):
            if (candidate.kind == "pointer" and candidate.item.kind in ("struct", "union")
                    and candidate.item.fields is None):
                found[candidate] = candidate.cname
    for name in names or ():
        try:
            ctype = ffi.typeof(name)
        except Exception as exc:      # cffi raises CDefError, FFIError, pycparser's ParseError
            raise InterfaceError(
                f"module '{module}': handles={names!r}: {name!r} is not a type the cdef declares ({exc}) — "
                "name a pointer type such as 'z_stream *'", module=module) from None
        if ctype.kind != "pointer":
            ctype = ffi.typeof(ffi.getctype(ctype, "*"))
        if not any(ctype in (t.result, *t.args) or any(a.kind == "pointer" and a.item is ctype for a in t.args)
                   for t in function_types.values()):
            raise InterfaceError(
                f"module '{module}': handles={names!r}: no function the cdef declares takes or returns "
                f"'{ctype.cname}' — name the pointer type the functions use (e.g. 'z_stream *')", module=module)
        found[ctype] = ctype.cname
    return found


def signatures(ffi: Any, function_types: dict[str, Any], *, handles: Iterable[str] | None,
               destructors: Iterable[str], module: str) -> dict[str, Signature]:
    """The functions that take or return objects -> what their calls must do (plain ones are left out).

    Raises:
        InterfaceError: a destructor the cdef does not declare, or one that takes no handle.
    """
    types = handle_types(ffi, function_types, handles, module)
    destructors = set(destructors)
    unknown = sorted(destructors - set(function_types))
    if unknown:
        raise InterfaceError(
            f"module '{module}': destructors={sorted(destructors)!r}: {', '.join(map(repr, unknown))} "
            f"{'is' if len(unknown) == 1 else 'are'} not declared in the cdef — declare "
            f"{'it' if len(unknown) == 1 else 'them'}, or leave {'it' if len(unknown) == 1 else 'them'} out",
            module=module)
    found = {}
    for name, ctype in function_types.items():
        handle_args, handle_names, out_args = [], [], []
        for index, arg in enumerate(ctype.args):
            if arg in types:
                handle_args.append(index)
                handle_names.append(types[arg])
            elif arg.kind == "pointer" and arg.item in types:
                out_args.append((index, types[arg.item]))
        result, result_name = "plain", ""
        if ctype.result in types:
            result, result_name = "handle", types[ctype.result]
        elif ctype.result.kind in ("pointer", "function"):
            result = "pointer"
        if name in destructors and not handle_args:
            raise InterfaceError(
                f"module '{module}': destructor '{name}' takes no handle (its parameters are "
                f"{', '.join(a.cname for a in ctype.args) or 'none'}) — a destructor ends the binding of the "
                "handle it is given: name a function that takes one, or declare the type a handle "
                "(handles=[...])", module=module)
        if handle_args or out_args or result != "plain":
            found[name] = Signature(tuple(handle_args), tuple(handle_names), tuple(out_args), result, result_name,
                                    name in destructors)
    return found


class Bindings:
    """One module's handle bindings: handle address -> the gate of the image that made it.

    ``table`` is read by the gate without a lock on every call that takes a
    handle; changes happen under ``_lock``. A binding takes one hold on its
    gate; the hold is dropped only after the binding is gone from ``table``
    (the gate's protocol depends on that order).
    """

    def __init__(self, module: str) -> None:
        self.module = module
        self.table: dict[Any, Any] = {}
        self._types: dict[Any, str] = {}
        self._lock = threading.Lock()

    def bind(self, value: Any, gate: Any, type_name: str) -> None:
        """Bind ``value`` to ``gate``; only while a call or pin holds ``gate`` (the hold is taken here)."""
        key = _key(value)
        with self._lock:
            old = self.table.get(key)
            if old is gate:
                return
            gate.hold()
            self.table[key] = gate
            self._types[key] = type_name
        if old is not None:
            # The address was reused for a new object (the old one was freed without its destructor).
            old.release_hold()

    def unbind(self, value: Any) -> bool:
        """End the binding of ``value``; return False if it was not bound."""
        key = _key(value)
        with self._lock:
            gate = self.table.pop(key, None)
            self._types.pop(key, None)
        if gate is None:
            return False
        gate.release_hold()
        return True

    def counts(self, gate: Any) -> dict[str, int]:
        """The handles bound to ``gate``, by C type."""
        counts: dict[str, int] = {}
        with self._lock:
            for key, bound in self.table.items():
                if bound is gate:
                    name = self._types.get(key, "?")
                    counts[name] = counts.get(name, 0) + 1
        return counts

    def gate_of(self, value: Any) -> Any:
        """The gate ``value`` is bound to, or None."""
        if not isinstance(value, _CData) or not value:
            return None
        return self.table.get(value)


def _after(signature: Signature, bindings: Bindings) -> Callable[[Any, tuple, Any, int], Any]:
    """The CallPolicy ``after`` of one function: bind what the call made, end what its destructor ended."""

    def after(gate: Any, args: tuple, result: Any, unbound: int) -> Any:
        for k, index in enumerate(signature.handle_args):
            if unbound >> k & 1 and not signature.destructor:
                bindings.bind(args[index], gate, signature.handle_names[k])
        for index, type_name in signature.out_args:
            holder = args[index] if index < len(args) else None
            if isinstance(holder, _CData) and holder:
                value = holder[0]
                if value:
                    bindings.bind(value, gate, type_name)
        if signature.result == "handle" and isinstance(result, _CData) and result:
            bindings.bind(result, gate, signature.result_name)
        if signature.destructor:
            index = signature.handle_args[0]
            if index < len(args) and isinstance(args[index], _CData) and args[index]:
                bindings.unbind(args[index])
        return result

    return after


def _generation_of(gate: Any, generations: Callable[[Any], int | None]) -> str:
    generation = generations(gate)
    return f"generation {generation}" if generation is not None else "an image that has closed"


def make_policy(impl: _gate.Implementation, name: str, signature: Signature, bindings: Bindings,
                generations: Callable[[Any], int | None]) -> Any:
    """The gate's CallPolicy for function ``name`` of the module ``bindings`` belongs to.

    ``generations(gate)`` names a gate's generation in error messages.
    """
    module = bindings.module

    def on_conflict(first: Any, second: Any) -> HandleError:
        return HandleError(
            f"module '{module}': {name}() was given handles bound to two different images "
            f"({_generation_of(first, generations)} and {_generation_of(second, generations)}); nothing was "
            "called — an object made by one generation can only be used with that generation's objects: make "
            "them all after the same reload", module=module)

    def on_released(gate: Any) -> HandleError:
        return HandleError(
            f"module '{module}': {name}() was given a handle whose binding to "
            f"{_generation_of(gate, generations)} ended while the call started (its destructor or "
            "reg.release() ran on another thread); nothing was called — do not use a handle after its "
            "destructor", module=module)

    return impl.CallPolicy(signature.handle_args, signature.result == "pointer", signature.needs_after,
                           _after(signature, bindings), bindings.table, on_conflict, on_released)


class Pin:
    """A module held on one image: its functions call the image that was current when the pin was taken.

    Made by ``Module.pin()`` / ``Registry.pin(name)``. While held, the image
    stays mapped (status() counts it under ``pins``), even across reloads and
    unload. ``pin.NAME`` / ``pin.func(NAME)`` are that image's functions; a
    function that takes no handle and returns no pointer is the plain cffi
    function (no per-call gate). Functions taken from a pin are valid only
    while it is held. Use it as a context manager or call :meth:`release`
    (twice is harmless). A pin garbage-collected unreleased is released then,
    with a warning.

    Attributes:
        module: the module's name.
        generation: the pinned image's generation.
    """

    def __init__(self, module: Any, gate: Any, generation: int, functions: dict[str, Any]) -> None:
        self.module = module.name
        self.generation = generation
        self._owner = module
        self._gate = gate
        self._functions = functions
        self._released = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return f"<nativereload.Pin '{self.module}' generation {self.generation} {state}>"

    @property
    def released(self) -> bool:
        return self._released

    @property
    def ffi(self) -> Any:
        """The module's FFI (for ffi.new, ffi.string, ...)."""
        return self._owner.ffi

    def func(self, symbol: str) -> Any:
        """The pinned image's function ``symbol``.

        Raises:
            PinReleased: the pin was released.
            SymbolError: the image has no such function.
        """
        if self._released:
            raise PinReleased(
                f"module '{self.module}': this pin on generation {self.generation} was released — take a new "
                f"one (mod.pin()), or call through the module", module=self.module)
        function = self._functions.get(symbol)
        if function is None:
            raise self._owner._missing(symbol, self._gate)
        return function

    def __getattr__(self, symbol: str) -> Any:
        if symbol.startswith("__"):
            raise AttributeError(symbol)
        function = self.func(symbol)
        self.__dict__[symbol] = function      # later lookups skip __getattr__ until release()
        return function

    def release(self) -> None:
        """Let the image go (it closes once nothing else holds it). Idempotent."""
        with self._lock:
            if self._released:
                return
            self._released = True
        for name in [name for name in self.__dict__ if not name.startswith("_") and name != "module"
                     and name != "generation"]:
            del self.__dict__[name]
        self._gate.unpin()

    def __enter__(self) -> "Pin":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    # Held by the class: at interpreter exit the module's globals may already be None.
    _finalizing = staticmethod(sys.is_finalizing)

    def __del__(self) -> None:
        if getattr(self, "_released", True) or self._finalizing():
            return                  # (at interpreter exit the process ends anyway)
        self._released = True
        logger.warning("module '%s': a pin on generation %d was garbage-collected without release(); "
                       "releasing it now", self.module, self.generation)
        _gate.deferred_drains.call(self._gate.unpin)     # the collector may run inside our locks


def pinned_functions(gate: Any, signatures_: dict[str, Signature], bindings: Bindings,
                     generations: Callable[[Any], int | None]) -> dict[str, Any]:
    """A pinned image's functions: the plain cffi function, or a wrapper that leases and binds."""
    functions = {}
    for name, function in gate.functions.items():
        signature = signatures_.get(name)
        functions[name] = function if signature is None else _pinned_call(name, function, signature, gate,
                                                                           bindings, generations)
    return functions


def _pinned_call(name: str, function: Any, signature: Signature, gate: Any, bindings: Bindings,
                 generations: Callable[[Any], int | None]) -> Callable[..., Any]:
    after = _after(signature, bindings)
    module = bindings.module

    def call(*args: Any) -> Any:
        unbound = 0
        for k, index in enumerate(signature.handle_args):
            if index >= len(args):
                continue
            bound = bindings.gate_of(args[index])
            if bound is None:
                if isinstance(args[index], _CData) and args[index]:
                    unbound |= 1 << k
            elif bound is not gate:
                raise HandleError(
                    f"module '{module}': {name}() through a pin on {_generation_of(gate, generations)} was given "
                    f"a handle bound to {_generation_of(bound, generations)}; nothing was called — use that "
                    "handle outside the pin (calls route it to its own image)", module=module)
        result = function(*args)
        if signature.result == "pointer":
            result = gate.lease(result)
        if signature.needs_after or unbound:
            result = after(gate, args, result, unbound)
        return result

    call.__name__ = name
    call.__qualname__ = f"{module}.{name}"
    return call
