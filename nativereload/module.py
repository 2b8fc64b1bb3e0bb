"""Module: the live handle a caller holds; its functions always call the module's current image.

The registry (registry.py) loads, reloads and unloads; a Module is what it
hands out. It owns what stays the same across reloads: the Func handles (one
per symbol), the slot they read the current image from, the handle bindings
(affinity.py), and the declarations (one FFI that grows with additive
reloads). Everything here is read by callers without a lock; the registry
changes it under its own locks, in an order that keeps every read valid.
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
from typing import TYPE_CHECKING, Any, Iterable, NamedTuple

from . import affinity
from . import gate as _gate
from .affinity import Pin
from .errors import ModuleUnloaded, NativeReloadError, SymbolError
from .gate import Func
from .lifecycle import History

if TYPE_CHECKING:
    from .image import Image
    from .interface import Declarations, Diff

__all__ = ["Module"]


class Objects(NamedTuple):
    """How a module treats the objects its functions take and return (affinity.py), for one interface."""

    handles: tuple[str, ...] | None
    destructors: tuple[str, ...]
    signatures: dict[str, affinity.Signature]
    policies: dict[str, Any]


class Module:
    """A loaded module: a live handle whose calls always go to its current image.

    Made by ``Registry.load()`` (and returned by ``reload()``); not created
    directly. ``module.SYMBOL`` is a :class:`Func` for a function the module
    declares (a name that collides with an attribute below needs
    ``module.func(name)``). After a reload the same object describes the new
    image, and functions the reload added are there at once; after unload its
    handles raise ModuleUnloaded.

    Attributes:
        name: the module name.
        path: the source file its images are copied from.
        generation: the current image's generation (1 after the first load).
        unchanged_since: after a reload whose file was byte-identical to the
            serving image's, the generation since which it has not changed
            (did the build fail?); None when the last reload brought new bytes.
        interface_change: what the last reload changed in the interface
            (a Diff: additions, or a change accepted with allow_interface_change);
            None when it changed nothing.
    """

    def __init__(self, name: str, path: str, declarations: Declarations, gate: _gate.Implementation,
                 missing: str = "error") -> None:
        """Internal: ``Registry.load()`` makes Modules."""
        self.name = name
        self.path = path
        self.generation = 0
        self.unchanged_since: int | None = None
        self.interface_change: Diff | None = None
        self._declarations = declarations
        self._missing_mode = missing
        self._impl = gate
        self._slot = gate.Slot()
        self._func_type = gate.Func
        self._funcs: dict[str, Any] = {}
        self._images: list[Image] = []      # not yet closed, oldest first; the active one is last but a prepared one
        self._active: Image | None = None
        self._pending: Any = None            # the StagedReload prepared and not yet committed or aborted
        self._content_since = 0              # the first generation whose file had the current image's bytes
        self._unloaded = False
        self._lock = threading.Lock()
        self._bindings = affinity.Bindings(name)
        self._objects = Objects(None, (), {}, {})
        self._history = History(0)          # the files kept for rollback (the registry sets its size)

    @property
    def cdef(self) -> str:
        """The declarations of the current image (given as a cdef, or embedded in the module)."""
        return self._declarations.cdef

    @property
    def ffi(self) -> Any:
        """The module's cffi FFI (for ffi.new, ffi.string, ...); the same object across additive reloads."""
        return self._declarations.ffi

    @property
    def interface(self) -> Any:
        """The current interface, as data (an ``interface.Interface``: functions, types, digest)."""
        return self._declarations.interface

    @property
    def loaded(self) -> bool:
        """False once the module has been unloaded."""
        return not self._unloaded

    def __repr__(self) -> str:
        state = "unloaded" if self._unloaded else f"generation {self.generation}"
        return f"<nativereload.Module {self.name!r} {state} from {self.path!r}>"

    def func(self, symbol: str) -> Func:
        """The reload-safe handle on ``symbol`` (the same object each time); ``module.SYMBOL`` does the same.

        Raises:
            ModuleUnloaded: the module has been unloaded (unless ``symbol`` takes a
                handle and handles bound to its images remain: those calls still work).
            SymbolError: the module does not declare ``symbol``.
        """
        declared = self._declarations.function_types
        existing = self._funcs.get(symbol)
        if existing is not None and symbol in declared:
            return existing
        signature = self._objects.signatures.get(symbol)
        if self._unloaded and not (signature and signature.handle_args and self._bindings.table):
            # After unload, only a function that can be routed by a handle still bound is of any use.
            raise ModuleUnloaded(
                f"module '{self.name}' was unloaded — load it again and take new handles from the new module",
                module=self.name)
        if symbol not in declared:
            names = ", ".join(self._declarations.functions) or "none"
            raise SymbolError(
                f"module '{self.name}': '{symbol}' is not a function it declares (declared: {names}) — declare "
                f"it (in the header the module embeds, or the cdef) and reload('{self.name}')", module=self.name,
                symbols=(symbol,))
        with self._lock:
            func = self._funcs.get(symbol)
            if func is None:
                func = self._func_type(self._slot, f"{self.name}.{symbol}", symbol,
                                       functools.partial(self._missing, symbol))
                func.policy = self._objects.policies.get(symbol)
                self._funcs[symbol] = func
        return func

    def __getattr__(self, symbol: str) -> Any:
        if symbol.startswith("__"):
            raise AttributeError(symbol)
        func = self.func(symbol)
        self.__dict__[symbol] = func      # later lookups skip __getattr__
        return func

    def pin(self) -> Pin:
        """Hold the current image for a session of calls: ``with mod.pin() as m: m.f(...)``.

        Every function of the pin calls the image that was current when it was
        taken, even if reloads happen meanwhile; the image stays mapped until
        ``release()`` (see :class:`Pin`).

        Raises:
            ModuleUnloaded: the module has been unloaded.
        """
        while True:
            gate = self._slot.current
            if gate is None:
                raise ModuleUnloaded(
                    f"module '{self.name}' was unloaded, so it cannot be pinned — load it again first",
                    module=self.name)
            if gate.try_pin():
                break
            gate.wait_resumed()         # paused by an exclusive reload, or retired by one: try again
            time.sleep(0)
        image = self._image_of(gate)
        signatures = image.objects.signatures if image is not None else {}
        return Pin(self, gate, image.generation if image is not None else self.generation,
                   affinity.pinned_functions(gate, signatures, self._bindings, self._generation_of))

    # -- what the registry uses ---------------------------------------------------------------

    def _objects_for(self, declarations: Declarations, handles: Iterable[str] | None,
                     destructors: Iterable[str]) -> Objects:
        """The call policies for ``declarations`` with these handle types and destructors.

        Raises:
            InterfaceError: a handle type or destructor the declarations do not have.
        """
        handles = None if handles is None else tuple(handles)
        destructors = tuple(destructors)
        signatures = affinity.signatures(declarations.ffi, declarations.function_types, handles=handles,
                                         destructors=destructors, module=self.name)
        policies = {name: affinity.make_policy(self._impl, name, signature, self._bindings, self._generation_of)
                    for name, signature in signatures.items()}
        return Objects(handles, destructors, signatures, policies)

    def _apply_objects(self, objects: Objects) -> None:
        """Switch every handle to the call policies of ``objects`` (before the slot switches)."""
        self._objects = objects
        for symbol, func in list(self._funcs.items()):
            func.policy = objects.policies.get(symbol)

    def _image_of(self, gate: Any) -> Image | None:
        for image in list(self._images):
            if image.gate is gate:
                return image
        return None

    def _generation_of(self, gate: Any) -> int | None:
        image = self._image_of(gate)
        return None if image is None else image.generation

    def _forget_undeclared(self) -> None:
        """Drop attribute shortcuts to symbols the current declarations no longer have.

        Handles already taken stay valid objects; calling them raises SymbolError.
        """
        declared = self._declarations.function_types
        for symbol in list(self._funcs):       # func() may add one on another thread
            if symbol not in declared:
                self.__dict__.pop(symbol, None)

    def _missing(self, symbol: str, gate: Any) -> NativeReloadError:
        """The error for a call the gate cannot route: no image (unloaded), or no such symbol in it."""
        if gate is None:
            return ModuleUnloaded(
                f"module '{self.name}' was unloaded, so '{self.name}.{symbol}' can no longer be called — load "
                f"it again and take a new handle (reg.func('{self.name}.{symbol}'))", module=self.name)
        image = self._image_of(gate)
        generation = image.generation if image is not None else self.generation
        if image is not None and symbol in image.missing:
            return SymbolError(
                f"module '{self.name}': '{symbol}' is declared, but generation {generation} "
                f"({image.source}) does not export it (loaded with missing='lazy') — build the library with "
                "it, or do not call it", module=self.name, symbols=(symbol,))
        return SymbolError(
            f"module '{self.name}': generation {generation} has no '{symbol}' (its declarations do not have it) "
            "— reload with declarations that have it", module=self.name, symbols=(symbol,))


# help(Module) shows how to get one, not the registry's internal constructor arguments
# (pydoc omits a class's signature line when it is "()").
Module.__init__.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)])
