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
from typing import Any, Iterable, NamedTuple

from . import gate as _gate
from .errors import (ModuleConflict, ModuleNameError, ModuleNotFound, ModuleNotLoaded,
                     ModuleUnloaded, NativeReloadError, SymbolError)
from .image import Image, Interface
from .trust import Trust, TrustedHashes
from .workdir import Workdir, remove_stale, resolve_tmpdir

__all__ = ["ImageStatus", "Module", "ModuleStatus", "Registry"]

logger = logging.getLogger(__name__.rpartition(".")[0])

PATH_ENV = "NATIVERELOAD_PATH"


class ImageStatus(NamedTuple):
    """One image of a module, as status() saw it.

    state: "active" (new calls go here), "retired" (replaced, calls still in
    flight), or "leaked" (closed, but the dynamic loader kept it mapped).
    copy_deleted: its private copy is gone from disk (a tmp cleaner removed
    it); the image still runs from its mapping.
    """

    generation: int
    state: str
    in_flight: int
    copy_path: str
    copy_deleted: bool = False


class ModuleStatus(NamedTuple):
    """A module and its images that are not yet closed (oldest first)."""

    name: str
    path: str
    generation: int
    images: list[ImageStatus]


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

    ``module.SYMBOL`` is a :class:`Func` for a function the cdef declares
    (a name that collides with an attribute below needs ``module.func(name)``).
    After a reload the same object describes the new image; after unload its
    handles raise ModuleUnloaded.

    Attributes:
        name: the module name.
        path: the source file its images are copied from.
        generation: the current image's generation (1 after the first load).
    """

    def __init__(self, name: str, path: str, interface: Interface, gate: _gate.Implementation) -> None:
        self.name = name
        self.path = path
        self.generation = 0
        self._interface = interface
        self._slot = gate.Slot()
        self._func_type = gate.Func
        self._funcs: dict[str, Any] = {}
        self._images: list[Image] = []      # not yet closed, oldest first; the active one is last
        self._active: Image | None = None
        self._unloaded = False
        self._lock = threading.Lock()

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

    def func(self, symbol: str) -> Any:
        """The reload-safe handle on ``symbol`` (the same object each time).

        Raises:
            ModuleUnloaded: the module has been unloaded.
            SymbolError: the current cdef does not declare ``symbol``.
        """
        existing = self._funcs.get(symbol)
        if existing is not None and symbol in self._interface.function_types:
            return existing
        if self._unloaded:
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
                self._funcs[symbol] = func
        return func

    def __getattr__(self, symbol: str) -> Any:
        if symbol.startswith("__"):
            raise AttributeError(symbol)
        func = self.func(symbol)
        self.__dict__[symbol] = func      # later lookups skip __getattr__
        return func

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
        return SymbolError(
            f"module '{self.name}': generation {self.generation} has no '{symbol}' (the cdef it was reloaded "
            f"with does not declare it) — reload with a cdef that declares it", module=self.name,
            symbols=(symbol,))


class Registry:
    """Loads C shared libraries and reloads them while other threads call them.

    Args:
        path: directories searched for ``NAME.so`` then ``libNAME.so``
            (``PKG.NAME`` -> ``DIR/PKG/NAME.so``), before those in $NATIVERELOAD_PATH.
        tmpdir: where the private copies go; default $TMPDIR, else /tmp, read at each load.
        auto_reload: watch each module's file and reload it when it is replaced
            (see :meth:`watch_files`).
        trust_writable: load files that another user could have written (refused by default; see trust.py).
        trusted_hashes: the SHA-256 digests (hex) a loaded file may have, or a callable
            ``(path, digest) -> bool``; None allows any content.

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, path: Iterable[str | os.PathLike] | str | os.PathLike = (),
                 tmpdir: str | os.PathLike | None = None, *, auto_reload: bool = False,
                 trust_writable: bool = False, trusted_hashes: TrustedHashes = None) -> None:
        if isinstance(path, (str, os.PathLike)):
            path = [path]
        self._path = [os.fspath(entry) for entry in path]
        self._tmpdir = tmpdir
        self._trust = Trust(trust_writable, trusted_hashes)
        self._gate = _gate.implementation()
        self._admin = threading.Lock()
        self._state = threading.Condition(threading.Lock())
        self._modules: dict[str, Module] = {}
        self._unloaded: list[Module] = []      # unloaded, with images not yet closed
        self._interfaces: dict[str, Interface] = {}
        self._workdirs: dict[str, Workdir] = {}
        self._closers: list = []
        self._closed = False
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

    def load(self, name: str, cdef: str | None = None, *, file: str | os.PathLike | None = None) -> Module:
        """Load module ``name`` (or return it unchanged if it is already loaded with the same cdef and file).

        Args:
            cdef: the C declarations of the functions to call (required, unless
                the module is already loaded: then it may be left out).
            file: load this file instead of searching the path.

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
            try:
                image = self._load_image(module, 1, interface, "load refused")
            finally:
                self._release_idle_workdirs()
            with self._state:
                module._images.append(image)
                module._active = image
                module.generation = 1
                module._slot.current = image.gate
                self._modules[name] = module
        logger.info("loaded '%s' generation 1 from %s in %.2f ms", name, path, image.load_seconds * 1e3)
        return module

    def reload(self, name: str, cdef: str | None = None) -> Module:
        """Load a fresh copy of the module's file and switch new calls to it.

        Calls in flight finish on the old image, which closes when the last
        returns. Always loads a new copy, even if the file did not change.

        Args:
            cdef: new declarations for the new image; default: the current ones.

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
            serving = module.generation
            try:
                image = self._load_image(module, serving + 1, interface,
                                         f"reload refused; generation {serving} still serving")
            except BaseException:
                self._release_idle_workdirs()
                raise
            with self._state:
                old = module._active
                module._images.append(image)
                module._active = image
                module._interface = interface
                module._forget_undeclared()
                module.generation = serving + 1
                module._slot.current = image.gate     # from here on, new calls go to the new image
            old.retire()
            in_flight = old.gate.in_flight if old.state == "retired" else 0
            self._release_idle_workdirs()        # the old image's, if $TMPDIR changed since
        if old.state == "retired":
            outcome = f"generation {serving} draining, {in_flight} call{'s' * (in_flight != 1)} in flight"
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
        active.retire()
        logger.info("unloaded '%s' generation %d in %.2f ms (%s)", module.name, module.generation,
                    (time.perf_counter() - started) * 1e3,
                    active.state if active.state != "retired" else f"draining, {active.gate.in_flight} in flight")

    # -- calling ------------------------------------------------------------------------------

    def func(self, qualname: str) -> Any:
        """The reload-safe handle on ``"module.symbol"`` (split at the last dot).

        Raises:
            ModuleNotLoaded, SymbolError, ModuleNameError.
        """
        module_name, dot, symbol = qualname.rpartition(".") if isinstance(qualname, str) else ("", "", "")
        if not dot or not module_name or not symbol:
            raise ModuleNameError(f"{qualname!r} is not 'module.symbol' — e.g. reg.func('sample.add')")
        module = self._modules.get(module_name)
        if module is None:
            raise self._not_loaded(_check_name(module_name))
        return module.func(symbol)

    def call(self, qualname: str, *args: Any) -> Any:
        """Call ``"module.symbol"`` with ``args`` on the module's current image."""
        return self.func(qualname)(*args)

    # -- status and draining -----------------------------------------------------------------

    def status(self) -> list[ModuleStatus]:
        """A snapshot of every module with images not yet closed: loaded modules first, by name."""
        with self._state:
            modules = sorted(self._modules.values(), key=lambda m: m.name) + list(self._unloaded)
            snapshot = [ModuleStatus(module.name, module.path, module.generation,
                                     [ImageStatus(image.generation, _image_state(module, image),
                                                  image.gate.in_flight if image.state != "leaked" else 0,
                                                  image.copy_path)
                                      for image in module._images])
                        for module in modules]
        # Whether each copy is still on disk (a tmp cleaner may delete it): a stat, so outside _state.
        for module in snapshot:
            module.images[:] = [image._replace(copy_deleted=not os.path.lexists(image.copy_path))
                                for image in module.images]
        return snapshot

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

    def serve(self, socket_path: str | os.PathLike | None = None) -> Any:
        """Answer the ``nativereload`` command line on a Unix socket (see control.py); returns the Server."""
        from . import control

        return control.serve(self, socket_path)

    def watch_files(self) -> Any:
        """Reload each module when its file is replaced by a complete new build (see watch.py)."""
        from . import watch

        return watch.watch_module_files(self)

    def _add_closer(self, closer: Any) -> None:
        """Have :meth:`close` call ``closer()`` first (servers and watchers stop before modules unload)."""
        self._closers.append(closer)

    # -- internals ------------------------------------------------------------------------------

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
        return Image.load(module=module.name, generation=generation, source=module.path,
                          directory=self._workdir(module.name).path, interface=interface,
                          gate_type=self._gate.ImageGate,
                          on_closed=functools.partial(self._image_closed, module), refused=refused,
                          trust=self._trust)

    def _workdir(self, module: str) -> Workdir:
        """This registry's directory in the current tmpdir (made, after a stale-directory sweep, on first use)."""
        tmpdir = resolve_tmpdir(self._tmpdir)
        workdir = self._workdirs.get(tmpdir)
        if workdir is not None and workdir.owner == os.getpid() and not workdir.intact():
            # Deleted while we served (a tmp cleaner): images in it still run
            # from their mappings; new copies need a new directory.
            logger.warning("%s was deleted while in use; making a new one", workdir.path)
            workdir.remove()
            _open_workdirs.discard(workdir)
            workdir = None
        if workdir is None or workdir.owner != os.getpid():     # none yet, or the parent's (we forked)
            remove_stale(tmpdir)
            workdir = Workdir(tmpdir, module)
            _open_workdirs.add(workdir)
            self._workdirs[tmpdir] = workdir
        return workdir

    def _image_closed(self, module: Module, image: Image) -> None:
        """Called by Image.close() on the thread that drained it."""
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
