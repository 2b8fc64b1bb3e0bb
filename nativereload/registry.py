"""The registry: module names -> their current image; load, call, reload, unload, status.

Threading contract:
  - Calls (``Func``, ``Module`` attributes, ``Registry.call``) take no lock:
    the gate (gate.py) routes each to the module's current image and counts
    it there, so a call that started on image N finishes on image N.
  - load/reload/unload/close are serialized by one lock per registry
    (``_admin``). Copying and dlopening happen under it, but no caller ever
    waits for it.
  - Bookkeeping shared with the threads that drain images (which image lists
    exist, what status() shows) sits behind a second, short lock
    (``_state``) that is never held across I/O or dlopen.

A reload loads and resolves the new image completely, then switches the
module's slot to it, then retires the old image (which closes when its last
call returns). Any failure before the switch changes nothing.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import threading
import time
import inspect
import typing
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Iterable, Mapping, NamedTuple

from . import affinity
from . import gate as _gate
from .affinity import Pin
from .compiled import CallPath
from .errors import (ModuleConflict, ModuleNameError, ModuleNotFound, ModuleNotLoaded,
                     ModuleUnloaded, NativeReloadError, SymbolError)
from .image import Image, Interface
from .workdir import Workdir, remove_stale, resolve_tmpdir

from .gate import Func

if TYPE_CHECKING:      # imported when used: serve() and watch_files() are optional
    from .control.server import Server
    from .watch import ModuleFileWatcher

__all__ = ["ImageStatus", "Module", "ModuleStatus", "Registry"]

logger = logging.getLogger(__name__.rpartition(".")[0])

PATH_ENV = "NATIVERELOAD_PATH"


class _Keep:
    """The default of reload()'s handles/destructors: keep what the module has."""

    def __repr__(self) -> str:
        return "<keep>"


_KEEP = _Keep()


class ImageStatus(NamedTuple):
    """One image of a module, as ``Registry.status()`` saw it.

    Attributes:
        generation: which load made it (1 for the first).
        state: "active" (new calls go here), "retired" (replaced; open while
            anything below holds it), or "leaked" (closed, but the dynamic
            loader kept it mapped).
        in_flight: calls inside it at that moment.
        copy_path: its private copy, the file that is mapped.
        pins: pins held on it (``Module.pin()``).
        handles: handles bound to it, by C type (``{"sqlite3 *": 2}``).
        pointer_results: pointer results it returned that are still alive.
        held_by: all of that in words, e.g. "0 calls, 2 handles (sqlite3 *), 1 pin".
    """

    generation: int
    state: str
    in_flight: int
    copy_path: str
    pins: int = 0
    handles: Mapping[str, int] = MappingProxyType({})
    pointer_results: int = 0
    held_by: str = ""


class ModuleStatus(NamedTuple):
    """A module, as ``Registry.status()`` saw it.

    Attributes:
        name: the module name.
        path: the file its images are copied from.
        generation: the current (or, once unloaded, the last) generation.
        images: its images not yet closed, oldest first.
        calls: how the current image's calls are made: "compiled", "compiling"
            (on the C gate until the compiled path is ready), "gate" (the C
            gate's cffi call) or "python" (the pure-Python gate).
        compiled: the functions the current image serves on the compiled path
            (the others stay on the gate: variadic, or a struct passed by value).
    """

    name: str
    path: str
    generation: int
    images: list[ImageStatus]
    calls: str = "gate"
    compiled: tuple[str, ...] = ()


def _check_name(name: object) -> str:
    """Return ``name`` if it can name a module, else raise ModuleNameError."""
    if not isinstance(name, str):
        raise ModuleNameError(f"module name must be a string, not {type(name).__name__}")
    bad = None
    if not name:
        bad = "it is empty"
    elif "/" in name or "\\" in name or "\0" in name:
        bad = "it contains a path separator"
    elif ".." in name:
        bad = "it contains '..'"
    elif any(not part for part in name.split(".")):
        bad = "it has an empty part"
    if bad:
        raise ModuleNameError(
            f"invalid module name {name!r}: {bad} — use NAME or PKG.NAME (resolved to DIR/PKG/NAME.so in the "
            "search path), or load(name, file=PATH) for a file elsewhere", module=name)
    return name


class Module:
    """A loaded module: a live handle whose calls always go to its current image.

    Made by ``Registry.load()`` (and returned by ``reload()``); not created
    directly. ``module.SYMBOL`` is a :class:`Func` for a function the cdef declares
    (a name that collides with an attribute below needs ``module.func(name)``).
    After a reload the same object describes the new image; after unload its
    handles raise ModuleUnloaded.

    Attributes:
        name: the module name.
        path: the source file its images are copied from.
        generation: the current image's generation (1 after the first load).
    """

    def __init__(self, name: str, path: str, interface: Interface, gate: _gate.Implementation) -> None:
        """Internal: ``Registry.load()`` makes Modules."""
        self.name = name
        self.path = path
        self.generation = 0
        self._interface = interface
        self._impl = gate
        self._slot = gate.Slot()
        self._func_type = gate.Func
        self._funcs: dict[str, Any] = {}
        self._images: list[Image] = []      # not yet closed, oldest first; the active one is last
        self._active: Image | None = None
        self._unloaded = False
        self._lock = threading.Lock()
        self._bindings = affinity.Bindings(name)
        self._objects = _Objects(None, (), {}, {})

    @property
    def cdef(self) -> str:
        """The declarations the current image was loaded with."""
        return self._interface.cdef

    @property
    def ffi(self) -> Any:
        """The cffi FFI of the current declarations (for ffi.new, ffi.string, ...)."""
        return self._interface.ffi

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
            SymbolError: the current cdef does not declare ``symbol``.
        """
        existing = self._funcs.get(symbol)
        if existing is not None and symbol in self._interface.function_types:
            return existing
        signature = self._objects.signatures.get(symbol)
        if self._unloaded and not (signature and signature.handle_args and self._bindings.table):
            # After unload, only a function that can be routed by a handle still bound is of any use.
            raise ModuleUnloaded(
                f"module '{self.name}' was unloaded — load it again and take new handles from the new module",
                module=self.name)
        if symbol not in self._interface.function_types:
            declared = ", ".join(self._interface.functions) or "none"
            raise SymbolError(
                f"module '{self.name}': '{symbol}' is not a function its cdef declares (declared: {declared}) — "
                f"add it to the cdef and reload('{self.name}', cdef=...)", module=self.name, symbols=(symbol,))
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

    def _objects_for(self, interface: Interface, handles: Iterable[str] | None,
                     destructors: Iterable[str]) -> "_Objects":
        """The call policies for ``interface`` with these handle types and destructors.

        Raises:
            InterfaceError: a handle type or destructor the interface does not declare.
        """
        handles = None if handles is None else tuple(handles)
        destructors = tuple(destructors)
        signatures = affinity.signatures(interface.ffi, interface.function_types, handles=handles,
                                         destructors=destructors, module=self.name)
        policies = {name: affinity.make_policy(self._impl, name, signature, self._bindings, self._generation_of)
                    for name, signature in signatures.items()}
        return _Objects(handles, destructors, signatures, policies)

    def _apply_objects(self, objects: "_Objects") -> None:
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
        """Drop attribute shortcuts to symbols the current cdef no longer declares.

        Handles already taken stay valid objects; calling them raises SymbolError.
        """
        for symbol in list(self._funcs):       # func() may add one on another thread
            if symbol not in self._interface.function_types:
                self.__dict__.pop(symbol, None)

    def _missing(self, symbol: str, gate: Any) -> NativeReloadError:
        """The error for a call the gate cannot route: no image (unloaded), or no such symbol in it."""
        if gate is None:
            return ModuleUnloaded(
                f"module '{self.name}' was unloaded, so '{self.name}.{symbol}' can no longer be called — load "
                f"it again and take a new handle (reg.func('{self.name}.{symbol}'))", module=self.name)
        generation = self._generation_of(gate)
        return SymbolError(
            f"module '{self.name}': generation {generation if generation is not None else self.generation} has "
            f"no '{symbol}' (the cdef it was loaded with does not declare it) — reload with a cdef that "
            "declares it", module=self.name, symbols=(symbol,))


class _Objects(NamedTuple):
    """How a module treats the objects its functions take and return (affinity.py), for one interface."""

    handles: tuple[str, ...] | None
    destructors: tuple[str, ...]
    signatures: dict[str, affinity.Signature]
    policies: dict[str, Any]


class Registry:
    """Loads C shared libraries and reloads them while other threads call them.

    Args:
        path: directories searched for ``NAME.so`` then ``libNAME.so``
            (``PKG.NAME`` -> ``DIR/PKG/NAME.so``), before those in $NATIVERELOAD_PATH.
        tmpdir: where the private copies go; default $TMPDIR, else /tmp, read at each load.
        auto_reload: watch each module's file and reload it when it is replaced
            (see :meth:`watch_files`).
        held_warning: seconds after which a retired image still held open (by
            calls, pins, handles or pointer results) is logged as a WARNING,
            once per image, naming what holds it; None never warns.
        calls: how calls reach the C functions. "auto" (the default, or
            $NATIVERELOAD_CALLS): serve at once through the C gate, compile a
            faster call path for the module's declarations in the background
            (cached on disk: $NATIVERELOAD_CACHE_DIR, else
            $XDG_CACHE_HOME/nativereload), and switch every function and
            handle to it when it is ready; without a C compiler, stay on the
            gate. "compiled": compile (or take from the cache) during load,
            and fail with CompileError if that cannot be done. "gate": the C
            gate's cffi call only. ``status()`` shows which functions are compiled.

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, path: Iterable[str | os.PathLike] | str | os.PathLike = (),
                 tmpdir: str | os.PathLike | None = None, *, auto_reload: bool = False,
                 held_warning: float | None = 60.0, calls: str | None = None) -> None:
        if isinstance(path, (str, os.PathLike)):
            path = [path]
        self._path = [os.fspath(entry) for entry in path]
        self._tmpdir = tmpdir
        self._gate = _gate.implementation()
        self._calls = CallPath(calls, self._gate)
        self._admin = threading.Lock()
        self._state = threading.Condition(threading.Lock())
        self._modules: dict[str, Module] = {}
        self._unloaded: list[Module] = []      # unloaded, with images not yet closed
        self._interfaces: dict[str, Interface] = {}
        self._workdirs: dict[str, Workdir] = {}
        self._closers: list = []
        self._closed = False
        self._held_warning = held_warning
        self._calls.bind(self._admin, self._live_images)
        remove_stale(resolve_tmpdir(tmpdir))
        if auto_reload:
            self.watch_files()

    # -- finding and loading ------------------------------------------------------------------

    def search_path(self) -> list[str]:
        """The directories searched, in order: ``path``, then $NATIVERELOAD_PATH."""
        env = [entry for entry in os.environ.get(PATH_ENV, "").split(os.pathsep) if entry]
        return self._path + env

    def find(self, name: str) -> str:
        """The file module ``name`` resolves to.

        Raises:
            ModuleNameError: ``name`` cannot name a module.
            ModuleNotFound: listing every path tried.
        """
        parts = _check_name(name).split(".")
        searched = []
        for directory in self.search_path():
            for filename in (f"{parts[-1]}.so", f"lib{parts[-1]}.so"):
                candidate = os.path.abspath(os.path.join(directory, *parts[:-1], filename))
                searched.append(candidate)
                if os.path.isfile(candidate):
                    return candidate
        if not searched:
            raise ModuleNotFound(
                f"module '{name}' not found: the search path is empty — pass Registry(path=[DIR, ...]), set "
                f"{PATH_ENV}, or load('{name}', file=PATH)", module=name, searched=())
        raise ModuleNotFound(
            f"module '{name}' not found; searched: {', '.join(searched)} — build it, add its directory to "
            f"Registry(path=...) or {PATH_ENV}, or load('{name}', file=PATH)", module=name, searched=searched)

    def load(self, name: str, cdef: str | None = None, *, file: str | os.PathLike | None = None,
             handles: Iterable[str] | None = None, destructors: Iterable[str] = ()) -> Module:
        """Load module ``name`` (or return it unchanged if it is already loaded with the same cdef and file).

        Args:
            cdef: the C declarations of the functions to call (required, unless
                the module is already loaded: then it may be left out).
            file: load this file instead of searching the path.
            handles: the handle types whose objects stay with the image that
                made them. None (default): pointers to the structs and unions
                the cdef declares without a body (``sqlite3 *``); a list: those
                plus the C types named (``["z_stream *"]``); ``()``: none.
            destructors: functions that end the life of the handle they are
                given (``["sqlite3_close", "ZSTD_freeCCtx"]``); its binding, and
                the hold on its image, end when the call returns.

        Returns:
            the Module, a live handle (``module.SYMBOL`` is a Func).

        Raises:
            ModuleNameError, ModuleNotFound, LoadError, SymbolError, InterfaceError,
            ModuleConflict: already loaded with another cdef or file.
        """
        _check_name(name)
        no_cdef = cdef is None or (isinstance(cdef, str) and not cdef.strip())
        path = os.path.abspath(os.fspath(file)) if file is not None else None
        with self._admin:
            self._check_open()
            existing = self._modules.get(name)
            if no_cdef and existing is None:
                Interface(cdef, name)         # raises the InterfaceError that says a cdef is required
            if existing is not None:
                # Like require: a module already loaded is returned as it is;
                # asking for other declarations or another file is a mistake.
                other_cdef = not no_cdef and cdef != existing.cdef
                if other_cdef or (path is not None and path != existing.path):
                    what = "cdef" if other_cdef else f"file ({path}, loaded from {existing.path})"
                    raise ModuleConflict(
                        f"module '{name}' is already loaded (generation {existing.generation}) with a different "
                        f"{what} — to switch, call reload('{name}', cdef=...), or unload('{name}') first",
                        module=name)
                return existing
            if path is None:
                path = self.find(name)
            interface = self._interface(cdef, name)
            module = Module(name, path, interface, self._gate)
            objects = module._objects_for(interface, handles, destructors)
            self._calls.require(interface, name)
            try:
                image = self._load_image(module, 1, interface, "load refused")
            finally:
                self._release_idle_workdirs()
            image.objects = objects
            module._apply_objects(objects)
            with self._state:
                module._images.append(image)
                module._active = image
                module.generation = 1
                module._slot.current = image.gate
                self._modules[name] = module
        logger.info("loaded '%s' generation 1 from %s in %.2f ms", name, path, image.load_seconds * 1e3)
        return module

    def reload(self, name: str, cdef: str | None = None, *, handles: Iterable[str] | None | _Keep = _KEEP,
               destructors: Iterable[str] | _Keep = _KEEP) -> Module:
        """Load a fresh copy of the module's file and switch new calls to it.

        Calls in flight finish on the old image; objects it made (bound
        handles, pins, pointer results) keep using it; it closes when the last
        of them is gone. Always loads a new copy, even if the file did not change.

        Args:
            cdef: new declarations for the new image; default: the current ones.
            handles, destructors: as for :meth:`load`; default: the current ones.

        Returns:
            the Module, its generation one higher.

        Raises:
            ModuleNotLoaded, ModuleNotFound, LoadError, SymbolError, InterfaceError.
            On any error the old image keeps serving and the generation is unchanged.
        """
        _check_name(name)
        started = time.perf_counter()
        with self._admin:
            self._check_open()
            module = self._loaded(name)
            interface = self._interface(cdef, name) if cdef is not None else module._interface
            current = module._objects
            objects = current
            if interface is not module._interface or handles is not _KEEP or destructors is not _KEEP:
                objects = module._objects_for(interface, current.handles if handles is _KEEP else handles,
                                              current.destructors if destructors is _KEEP else destructors)
            serving = module.generation
            self._calls.require(interface, name)
            try:
                image = self._load_image(module, serving + 1, interface,
                                         f"reload refused; generation {serving} still serving")
            except BaseException:
                self._release_idle_workdirs()
                raise
            image.objects = objects
            module._apply_objects(objects)
            with self._state:
                old = module._active
                module._images.append(image)
                module._active = image
                module._interface = interface
                module._forget_undeclared()
                module.generation = serving + 1
                module._slot.current = image.gate     # from here on, new calls go to the new image
            self._retire(module, old)
            self._release_idle_workdirs()        # the old image's, if $TMPDIR changed since
        if old.state == "retired":
            outcome = f"generation {serving} draining, {self._held_by(module, old)}"
        else:
            outcome = f"generation {serving} {old.state}"
        logger.info("reloaded '%s' generation %d in %.2f ms (%s)", name, serving + 1,
                    (time.perf_counter() - started) * 1e3, outcome)
        return module

    def unload(self, name: str) -> None:
        """Unload the module: new calls raise ModuleUnloaded; calls in flight finish first.

        Raises:
            ModuleNotLoaded.
        """
        _check_name(name)
        with self._admin:
            self._unload(self._loaded(name))
            self._release_idle_workdirs()

    def _unload(self, module: Module) -> None:
        started = time.perf_counter()
        with self._state:
            del self._modules[module.name]
            module._unloaded = True
            module._slot.current = None
            active, module._active = module._active, None
            self._unloaded.append(module)
        self._retire(module, active)
        logger.info("unloaded '%s' generation %d in %.2f ms (%s)", module.name, module.generation,
                    (time.perf_counter() - started) * 1e3,
                    active.state if active.state != "retired" else f"draining, {self._held_by(module, active)}")

    # -- calling ------------------------------------------------------------------------------

    def func(self, qualname: str) -> Func:
        """The reload-safe handle on ``"module.symbol"`` (split at the last dot).

        The same Func object each time; it calls the module's current image,
        across reloads.

        Raises:
            ModuleNameError: ``qualname`` is not "module.symbol".
            ModuleNotLoaded: the module is not loaded.
            SymbolError: the module's cdef does not declare the symbol.
        """
        module_name, dot, symbol = qualname.rpartition(".") if isinstance(qualname, str) else ("", "", "")
        if not dot or not module_name or not symbol:
            raise ModuleNameError(f"{qualname!r} is not 'module.symbol' — e.g. reg.func('sample.add')")
        module = self._modules.get(module_name)
        if module is None:
            raise self._not_loaded(_check_name(module_name))
        return module.func(symbol)

    def call(self, qualname: str, *args: Any) -> Any:
        """Call ``"module.symbol"`` with ``args`` on the module's current image; return its result.

        Raises:
            ModuleNameError, ModuleNotLoaded, SymbolError: as :meth:`func`.
            ModuleUnloaded: the module was unloaded while the call was being made.
            HandleError: handles bound to two different images in one call.
            TypeError, OverflowError: cffi could not convert an argument.
        """
        return self.func(qualname)(*args)

    def pin(self, name: str) -> Pin:
        """``reg.pin("counter")`` is ``reg.load("counter").pin()``: hold the current image (see :meth:`Module.pin`).

        Raises:
            ModuleNotLoaded, ModuleNameError.
        """
        _check_name(name)
        module = self._modules.get(name)
        if module is None:
            raise self._not_loaded(name)
        return module.pin()

    def release(self, handle: Any) -> bool:
        """End the binding of a handle without calling its destructor; return False if it was not bound.

        Its image closes once nothing else holds it. For a handle whose C
        object was freed some other way, or that you hand over to code that
        will not call through nativereload again.
        """
        with self._state:
            modules = [*self._modules.values(), *self._unloaded]
        return any(module._bindings.unbind(handle) for module in modules)

    # -- status and draining -----------------------------------------------------------------

    def status(self) -> list[ModuleStatus]:
        """A snapshot of every module with images not yet closed: loaded modules first, by name.

        An unloaded module is listed until its last image has drained.
        """
        with self._state:
            modules = sorted(self._modules.values(), key=lambda m: m.name) + list(self._unloaded)
            images = [(module, list(module._images), module._active) for module in modules]
        return [ModuleStatus(module.name, module.path, module.generation,
                             [self._image_status(module, image) for image in module_images],
                             self._calls.state(active),
                             tuple(sorted(active.compiled)) if active is not None else ())
                for module, module_images, active in images]

    def _image_status(self, module: Module, image: Image) -> ImageStatus:
        gate = image.gate
        if image.state == "leaked":
            return ImageStatus(image.generation, "leaked", 0, image.copy_path, held_by="closed")
        handles = module._bindings.counts(gate)
        return ImageStatus(image.generation, _image_state(module, image), gate.in_flight, image.copy_path,
                           gate.pins, MappingProxyType(handles), gate.pointer_results,
                           _describe_holders(gate.in_flight, gate.pins, handles, gate.pointer_results))

    def _held_by(self, module: Module, image: Image) -> str:
        """What holds ``image`` open, in words ("1 call, 2 handles (sqlite3 *)")."""
        gate = image.gate
        return _describe_holders(gate.in_flight, gate.pins, module._bindings.counts(gate), gate.pointer_results)

    def wait_drained(self, timeout: float | None = None) -> bool:
        """Wait until no retired image is left open; return False if ``timeout`` seconds passed first.

        A "leaked" image counts as closed.
        """
        with self._state:
            return self._state.wait_for(self._drained, timeout)

    def _drained(self) -> bool:
        return not any(_image_state(module, image) == "retired"
                       for module in (*self._modules.values(), *self._unloaded) for image in module._images)

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self, timeout: float | None = None) -> bool:
        """Unload everything and wait up to ``timeout`` seconds for calls in flight to finish.

        An image still busy after the wait closes, and the registry's
        directory goes, when its last call returns. Idempotent.

        Returns:
            True if everything was closed before returning.
        """
        started = time.perf_counter()
        closers, self._closers = self._closers, []
        for closer in closers:
            try:
                closer()
            except Exception:
                logger.exception("error while stopping %r", closer)
        with self._admin:
            if not self._closed:
                self._closed = True
                for module in list(self._modules.values()):
                    self._unload(module)
        drained = self.wait_drained(timeout)
        self._remove_workdirs_if_drained()
        logger.info("closed the registry in %.2f ms (%s)", (time.perf_counter() - started) * 1e3,
                    "all images closed" if drained else "images still draining")
        return drained

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def serve(self, socket_path: str | os.PathLike | None = None, *, name: str | None = None) -> Server:
        """Answer the ``nativereload`` command line (status, reload, unload) on a Unix socket.

        Serves from a daemon thread until ``server.close()``, ``close()`` or
        interpreter exit, which remove the socket. The default path is
        ``$XDG_RUNTIME_DIR/nativereload/<pid>.sock``, else
        ``${TMPDIR:-/tmp}/nativereload-sockets-<uid>/<pid>.sock``, where the
        command line finds it by itself.

        Args:
            socket_path: serve at this path instead (its directory must be
                yours and writable by nobody else).
            name: what ``nativereload ... --name NAME`` and ``nativereload ps``
                call this process (default: the program's name).

        Returns:
            the Server (``.path``, ``.name``, ``.close()``).

        Raises:
            ControlError: the socket cannot be served there (unsafe directory,
                path too long, a live server already answers at ``socket_path``).
            ValueError: ``name`` is not 1-64 letters, digits and ``_.@:+-``.
        """
        from . import control

        return control.serve(self, socket_path, name=name)

    def watch_files(self) -> ModuleFileWatcher:
        """Reload each module by itself when its file is replaced by a complete new build.

        A daemon thread polls the loaded modules' files; a changed file is
        reloaded once it is stable (unchanged at two polls) and a complete
        ELF, so a library still being written is never loaded. A failed
        reload is logged and the old image keeps serving. ``close()`` stops
        it. Idempotent: the running watcher is returned.

        Returns:
            the watcher (``.close()`` stops it).
        """
        from . import watch

        return watch.watch_module_files(self)

    def _add_closer(self, closer: Any) -> None:
        """Have :meth:`close` call ``closer()`` first (servers and watchers stop before modules unload)."""
        self._closers.append(closer)

    # -- internals ------------------------------------------------------------------------------

    def _retire(self, module: Module, image: Image) -> None:
        """Retire ``image`` (it closes when nothing holds it); warn if it is still held after ``held_warning``."""
        image.retire()
        if image.state == "retired" and self._held_warning is not None:
            timer = threading.Timer(self._held_warning, self._warn_held, (module, image))
            timer.daemon = True
            image.held_timer = timer
            timer.start()

    def _warn_held(self, module: Module, image: Image) -> None:
        if image.state != "retired":
            return
        logger.warning("module '%s' generation %d was retired %.0f s ago and is still held open by %s — "
                       "let calls return, release() pins, pass handles to their destructor or reg.release(), "
                       "and drop pointer results", module.name, image.generation, self._held_warning,
                       self._held_by(module, image))

    def _check_open(self) -> None:
        if self._closed:
            raise NativeReloadError("this registry is closed — create a new Registry")

    def _not_loaded(self, name: str) -> ModuleNotLoaded:
        return ModuleNotLoaded(f"module '{name}' is not loaded — load it first: reg.load('{name}', cdef=...)",
                               module=name)

    def _loaded(self, name: str) -> Module:
        module = self._modules.get(name)
        if module is None:
            raise self._not_loaded(name)
        return module

    def _interface(self, cdef: str | None, name: str) -> Interface:
        """The parsed cdef, from the cache if this registry has seen the same text."""
        interface = self._interfaces.get(cdef) if isinstance(cdef, str) else None
        if interface is None:
            interface = Interface(cdef, name)
            self._interfaces[cdef] = interface
        return interface

    def _load_image(self, module: Module, generation: int, interface: Interface, refused: str) -> Image:
        image = Image.load(module=module.name, generation=generation, source=module.path,
                           directory=self._workdir(module.name).path, interface=interface,
                           gate_type=self._gate.ImageGate,
                           on_closed=functools.partial(self._image_closed, module), refused=refused)
        self._calls.prepare(image)        # compiled entries, before the image serves, if they are ready
        return image

    def _live_images(self) -> list[Image]:
        """Every image not yet closed, of loaded and unloaded modules (for the compiled path's upgrade)."""
        with self._state:
            return [image for module in (*self._modules.values(), *self._unloaded) for image in module._images]

    def _workdir(self, module: str) -> Workdir:
        """This registry's directory in the current tmpdir (made, after a stale-directory sweep, on first use)."""
        tmpdir = resolve_tmpdir(self._tmpdir)
        workdir = self._workdirs.get(tmpdir)
        if workdir is None or workdir.owner != os.getpid():     # none yet, or the parent's (we forked)
            remove_stale(tmpdir)
            workdir = Workdir(tmpdir, module)
            _open_workdirs.add(workdir)
            self._workdirs[tmpdir] = workdir
        return workdir

    def _image_closed(self, module: Module, image: Image) -> None:
        """Called by Image.close() on the thread that drained it."""
        timer = getattr(image, "held_timer", None)
        if timer is not None:
            timer.cancel()
        with self._state:
            if image.state == "closed":
                module._images.remove(image)
            if module._unloaded and not module._images and module in self._unloaded:
                self._unloaded.remove(module)
            self._state.notify_all()
        if self._closed:
            self._remove_workdirs_if_drained()

    def _remove_workdirs_if_drained(self) -> None:
        if self._closed:
            self._release_idle_workdirs()

    def _release_idle_workdirs(self) -> None:
        """Remove this registry's directories that no open image lives in (a leaked image's stays).

        Call with ``_admin`` held, or once the registry is closed: a load in
        progress must not see its directory vanish.
        """
        with self._state:
            busy = {os.path.dirname(image.copy_path)
                    for module in (*self._modules.values(), *self._unloaded) for image in module._images}
            for tmpdir, workdir in list(self._workdirs.items()):
                if workdir.path not in busy and workdir.remove():
                    del self._workdirs[tmpdir]
                    _open_workdirs.discard(workdir)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' * (count != 1)}"


def _describe_holders(calls: int, pins: int, handles: Mapping[str, int], pointer_results: int) -> str:
    """e.g. "0 calls, 2 handles (sqlite3 *), 1 pin": calls always, the other holders when there are any."""
    parts = [_plural(calls, "call")]
    if handles:
        total = sum(handles.values())
        parts.append(f"{_plural(total, 'handle')} ({', '.join(sorted(handles))})")
    if pins:
        parts.append(_plural(pins, "pin"))
    if pointer_results:
        parts.append(_plural(pointer_results, "pointer result"))
    return ", ".join(parts)


def _image_state(module: Module, image: Image) -> str:
    """What status() reports: the module's current image is "active" (even in the instant before the old
    one is marked retired), a closed one still mapped "leaked", any other "retired"."""
    if image is module._active:
        return "active"
    return "leaked" if image.state == "leaked" else "retired"


_open_workdirs: set[Workdir] = set()


@atexit.register
def _remove_workdirs_at_exit() -> None:
    # The process is ending: no mapping outlives it, so every copy can go,
    # including leaked images' and those of registries never closed.
    for workdir in list(_open_workdirs):
        workdir.remove_at_exit()
    _open_workdirs.clear()


# help(Module) shows how to get one, not the registry's internal constructor arguments
# (pydoc omits a class's signature line when it is "()").
Module.__init__.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)])
# With ``from __future__ import annotations`` NamedTuple keeps its field types as
# strings, which help() shows as ForwardRef('str'): give it the real types.
for _status in (ImageStatus, ModuleStatus):
    _status.__annotations__ = _status.__new__.__annotations__ = typing.get_type_hints(_status)
del _status
