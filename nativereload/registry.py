"""The registry: module names -> their current image; load, call, reload, unload, status.

Threading contract:
  - Calls (``Func``, ``Module`` attributes, ``Registry.call``) take no lock:
    the gate (gate.py) routes each to the module's current image and counts
    it there, so a call that started on image N finishes on image N.
  - load/prepare/commit/abort/reload/unload/close are serialized by one lock
    per registry (``_admin``). Copying and dlopening happen under it, but no
    caller ever waits for it.
  - Bookkeeping shared with the threads that drain images (which image lists
    exist, what status() shows) sits behind a second, short lock
    (``_state``) that is never held across I/O or dlopen.

A reload copies the new file, reads the interface it embeds and checks it
against the serving one (before anything of the new image runs), loads and
resolves it completely (lifecycle.py: it is now "prepared"), then switches the
module's slot to it, then retires the old image (which closes when nothing
holds it any more). Any failure before the switch changes nothing. What a
reload may change of the interface is decided in contract.py; what status()
reports is built in status.py.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable

from . import gate as _gate
from .affinity import Pin
from . import canary as _canary
from . import contract
from .compiled import CallPath
from .errors import (DrainTimeout, LoadError, ModuleConflict, ModuleNameError, ModuleNotFound, ModuleNotLoaded,
                     NativeReloadError, ReloadPending)
from .gate import Func
from .image import Image
from .lifecycle import FINI_ABORTED, FINI_REPLACED, FINI_UNLOADED, Events, History, ReloadEvent, StagedReload
from .module import Module
from .status import ImageStatus, ModuleStatus, held_by, image_state, image_status
from .trust import Trust, TrustedHashes
from .workdir import Workdirs, remove_stale, resolve_tmpdir

if TYPE_CHECKING:      # imported when used: serve() and watch_files() are optional
    from .control.server import Server
    from .watch import ModuleFileWatcher

__all__ = ["ImageStatus", "Module", "ModuleStatus", "Registry", "ReloadEvent", "StagedReload"]

logger = logging.getLogger(__name__.rpartition(".")[0])

PATH_ENV = "NATIVERELOAD_PATH"
DEFAULT_EXCLUSIVE_TIMEOUT = 10.0
"""Seconds an exclusive reload waits for the old image's calls by default."""


class _Keep:
    """The default of reload()'s handles/destructors: keep what the module has."""

    def __repr__(self) -> str:
        return "<keep>"


_KEEP = _Keep()


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
        trust_writable: load files that another user could have written (refused by default).
        trusted_hashes: the SHA-256 digests (hex) a loaded file may have, or a callable
            ``(path, digest) -> bool``; None allows any content.
        history: how many earlier images of each module to keep (their files,
            in the registry's directory) for :meth:`rollback`; 0 keeps none.
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
                 held_warning: float | None = 60.0, trust_writable: bool = False,
                 trusted_hashes: TrustedHashes = None, history: int = 1, calls: str | None = None) -> None:
        if isinstance(path, (str, os.PathLike)):
            path = [path]
        self._path = [os.fspath(entry) for entry in path]
        self._trust = Trust(trust_writable, trusted_hashes)
        self._gate = _gate.implementation()
        self._calls = CallPath(calls, self._gate)
        self._admin = threading.Lock()
        self._state = threading.Condition(threading.Lock())
        self._modules: dict[str, Module] = {}
        self._unloaded: list[Module] = []      # unloaded, with images not yet closed
        self._workdirs = Workdirs(tmpdir)
        self._closers: list = []
        self._closed = False
        self._held_warning = held_warning
        if not isinstance(history, int) or history < 0:
            raise ValueError(f"history must be a number of images >= 0, not {history!r}")
        self._history_size = history
        self._events = Events()
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
             handles: Iterable[str] | None = None, destructors: Iterable[str] = (),
             missing: str = "error") -> Module:
        """Load module ``name`` (or return it unchanged if it is already loaded with the same cdef and file).

        The declarations come from the module itself when it embeds its
        interface (built with ``nativereload_add_module(... INTERFACE h)`` or
        ``nativereload embed``), or from ``cdef``. With both, ``cdef`` must
        agree with the embedded interface for everything it declares.

        Args:
            cdef: the C declarations of the functions to call; optional when the
                module embeds its interface or is already loaded.
            file: load this file instead of searching the path.
            handles: the handle types whose objects stay with the image that
                made them. None (default): pointers to the structs and unions
                declared without a body (``sqlite3 *``); a list: those plus the
                C types named (``["z_stream *"]``); ``()``: none.
            destructors: functions that end the life of the handle they are
                given (``["sqlite3_close", "ZSTD_freeCCtx"]``); its binding, and
                the hold on its image, end when the call returns.
            missing: "error" (default): a declared function the library does not
                export refuses the load; "lazy": it is allowed, and calling it
                raises SymbolError (for headers with compile-time options).

        Returns:
            the Module, a live handle (``module.SYMBOL`` is a Func).

        Raises:
            ModuleNameError, ModuleNotFound, LoadError, SymbolError,
            InterfaceError: no cdef and no embedded interface, a cdef that does
                not parse, or one that disagrees with the embedded interface.
            ModuleConflict: already loaded with another cdef or file.
        """
        _check_name(name)
        if missing not in ("error", "lazy"):
            raise ValueError(f"missing must be 'error' or 'lazy', not {missing!r}")
        no_cdef = cdef is None or (isinstance(cdef, str) and not cdef.strip())
        path = os.path.abspath(os.fspath(file)) if file is not None else None
        with self._admin:
            self._check_open()
            existing = self._modules.get(name)
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
            image = self._copy(name, 1, path, None, "load refused")
            try:
                embedded = image.read_interface()
                declarations, _ = contract.declarations_for(name, None, embedded, None if no_cdef else cdef, False,
                                                         path, "load refused")
                module = Module(name, path, declarations, self._gate, missing)
                objects = module._objects_for(declarations, handles, destructors)
                image.objects = objects
                self._calls.require(declarations, name)
                image.open(declarations, gate_type=self._gate.ImageGate, refused="load refused", missing=missing)
                self._calls.prepare(image)      # compiled entries, before the image serves, if they are ready
                image.on_closing = functools.partial(self._finish, module)
                image.hooks.run_init(None, "load refused")
            except BaseException:
                image.discard()
                self._release_idle_workdirs()
                raise
            image.on_closed = functools.partial(self._image_closed, module)
            module._history = History(self._history_size)
            module._apply_objects(objects)
            module._content_since = 1
            with self._state:
                module._images.append(image)
                module._active = image
                module.generation = 1
                module._slot.current = image.gate
                self._modules[name] = module
        logger.info("loaded '%s' generation 1 from %s in %.2f ms%s", name, path, image.load_seconds * 1e3,
                    f" ({len(image.missing)} declared function(s) not exported)" if image.missing else "")
        return module

    def prepare(self, name: str, cdef: str | None = None, *, file: str | os.PathLike | None = None,
                handles: Iterable[str] | None | _Keep = _KEEP, destructors: Iterable[str] | _Keep = _KEEP,
                allow_interface_change: bool = False, canary: bool | str = False,
                canary_timeout: float | None = None, exclusive: bool = False,
                timeout: float | None = None) -> StagedReload:
        """Do everything a reload does up to the switch; return the StagedReload to commit() or abort().

        Copies the file, checks the interface it embeds (or ``cdef``) against
        the serving one, runs the canary if asked, dlopens it, resolves every
        declared function and runs its ``nativereload_init`` (with the serving
        image's state; for an exclusive reload, init runs at commit instead).
        Calls keep going to the serving image until ``commit()``; status()
        shows the new image as "prepared". While it is pending, another
        reload, prepare or unload of this module raises ReloadPending; if the
        registry closes first, it is aborted (with a warning).

        Args: as for :meth:`reload`.

        Raises:
            as :meth:`reload`; ReloadPending: a reload of this module is already prepared.
            Nothing changes on any error.
        """
        _check_name(name)
        started = time.perf_counter()
        with self._admin:
            staged = self._prepare(name, cdef, file, handles, destructors, allow_interface_change, canary,
                                   canary_timeout, exclusive, timeout, started)
        logger.info("prepared '%s' generation %d in %.2f ms (generation %d serving)", name, staged.generation,
                    (time.perf_counter() - started) * 1e3, staged.serving_generation)
        return staged

    def reload(self, name: str, cdef: str | None = None, *, file: str | os.PathLike | None = None,
               handles: Iterable[str] | None | _Keep = _KEEP, destructors: Iterable[str] | _Keep = _KEEP,
               allow_interface_change: bool = False, canary: bool | str = False,
               canary_timeout: float | None = None, exclusive: bool = False,
               timeout: float | None = None) -> Module:
        """Load a fresh copy of the module's file and switch new calls to it: ``prepare(...).commit()``.

        Calls in flight finish on the old image; objects it made (bound
        handles, pins, pointer results) keep using it; it closes when the last
        of them is gone. Always loads a new copy, even if the file did not
        change (``module.unchanged_since`` then says so).

        The new interface (embedded in the new file, or ``cdef``) is compared
        with the serving one before anything of the new image runs: new
        functions and types are accepted (callable at once, and cdata made
        before stay valid); a changed or removed function, or a changed
        struct, union or enum, is refused unless ``allow_interface_change``.

        The order of events: new image loaded -> its ``nativereload_init``
        (sees the old image's state) -> switch -> old image drains -> its
        ``nativereload_fini`` (told whether its state was adopted) -> unmapped.

        Args:
            cdef: new declarations for the new image; default: the interface
                the new file embeds, else the current declarations.
            file: load this file instead (it becomes the module's path).
            handles, destructors: as for :meth:`load`; default: the current ones.
            allow_interface_change: accept an incompatible interface on purpose
                (logged, with what changed; cdata of the old declarations do not
                fit the new ones).
            canary: first load the new file in a separate process (constructors,
                init, ``nativereload_selftest``; a string "package.module:function"
                also calls that with the loaded module there): a crash, a
                failed selftest, an exception or a hang refuses the reload
                before this process loads the file.
            canary_timeout: seconds the canary may take (default 30).
            exclusive: new calls wait (they are not refused) while the calls in
                flight on the old image finish; then init runs with no call in
                either image, then the switch. Calls routed to the old image by
                its handles, and calls through pins, are not paused.
            timeout: for an exclusive reload, how long to wait for the old
                image's calls (default 10 s); then the reload is refused and
                the waiting calls go on to the old image.

        Returns:
            the Module, its generation one higher.

        Raises:
            ModuleNotLoaded, ModuleNotFound, LoadError, SymbolError,
            InterfaceError: an incompatible interface (showing old and new declarations),
            InitRefused: the module's init returned non-zero (with its message),
            CanaryFailed: the canary crashed or failed (signal, selftest, traceback),
            DrainTimeout: an exclusive reload's old image did not drain in time,
            ReloadPending: a reload of this module is prepared (prepare()) and pending.
            On any error the old image keeps serving and the generation is unchanged.
        """
        _check_name(name)
        started = time.perf_counter()
        with self._admin:
            staged = self._prepare(name, cdef, file, handles, destructors, allow_interface_change, canary,
                                   canary_timeout, exclusive, timeout, started)
            return self._commit_locked(staged)

    def rollback(self, name: str, generation: int | None = None, *, allow_interface_change: bool = False,
                 canary: bool | str = False, canary_timeout: float | None = None, exclusive: bool = False,
                 timeout: float | None = None) -> Module:
        """Reload the previous kept version of the module (or the one that served as ``generation``).

        The kept bytes load as a new generation (generations only grow), with
        the same checks, hooks and options as :meth:`reload`; the module's
        path stays what it was. ``Registry(history=N)`` says how many
        versions are kept (default 1).

        Raises:
            ModuleNotLoaded; NativeReloadError: no kept version (or none of that
            generation); and whatever :meth:`reload` raises.
        """
        _check_name(name)
        started = time.perf_counter()
        with self._admin:
            module = self._loaded(name)
            kept = module._history.find(generation)
            if kept is None:
                have = ", ".join(str(k.generation) for k in module._history.kept) or "none"
                why = ("Registry(history=0) keeps none" if self._history_size == 0 else f"kept: {have}")
                raise NativeReloadError(
                    f"module '{name}': no kept version {'of generation ' + str(generation) + ' ' if generation else ''}"
                    f"to roll back to ({why}) — rollback(name) takes the last one kept; Registry(history=N) keeps "
                    "more", module=name)
            staged = self._prepare(name, None, None, _KEEP, _KEEP, allow_interface_change, canary, canary_timeout,
                                   exclusive, timeout, started, kept=kept)
            module = self._commit_locked(staged)
        logger.info("rolled back '%s' to the build of generation %d, now generation %d", name, kept.generation,
                    module.generation)
        return module

    def on_reload(self, callback: Callable[[ReloadEvent], object]) -> Callable[[], None]:
        """Call ``callback(event)`` for every prepared, committed, aborted, refused, drained and unloaded event.

        Callbacks run one at a time, in the order the events happened, on a
        daemon thread of the registry (never on the thread that reloads or
        calls); an exception in one is logged and changes nothing. close()
        delivers the events so far before it returns.

        Returns:
            a function that removes the callback.
        """
        return self._events.subscribe(callback)

    def unload(self, name: str) -> None:
        """Unload the module: new calls raise ModuleUnloaded; calls in flight finish first.

        Raises:
            ModuleNotLoaded; ReloadPending: a prepared reload of it is pending.
        """
        _check_name(name)
        with self._admin:
            module = self._loaded(name)
            self._check_not_pending(module, "unload")
            self._unload(module)
            self._release_idle_workdirs()

    def _unload(self, module: Module) -> None:
        started = time.perf_counter()
        with self._state:
            del self._modules[module.name]
            module._unloaded = True
            module._slot.current = None
            active, module._active = module._active, None
            self._unloaded.append(module)
        module._history.clear()
        self._emit("unloaded", module, module.generation, module.generation, time.perf_counter() - started)
        self._retire(module, active)
        outcome = active.state if active.state != "retired" else f"draining, {held_by(module, active, 'count')}"
        logger.info("unloaded '%s' generation %d in %.2f ms (%s)", module.name, module.generation,
                    (time.perf_counter() - started) * 1e3, outcome)

    # -- the reload transaction (lifecycle.py) -------------------------------------------------

    def _prepare(self, name: str, cdef: str | None, file: str | os.PathLike | None, handles: Any,
                 destructors: Any, allow_change: bool, canary: bool | str, canary_timeout: float | None,
                 exclusive: bool, timeout: float | None, started: float, kept: Any = None) -> StagedReload:
        """prepare() with ``_admin`` held; ``kept``: load that kept file (a rollback), keeping the module's path."""
        self._check_open()
        module = self._loaded(name)
        self._check_not_pending(module, "reload")
        try:
            staged = self._stage(module, cdef, file, handles, destructors, allow_change, canary, canary_timeout,
                                 exclusive, timeout, started, kept)
        except BaseException as exc:
            self._emit("refused", module, module.generation + 1, module.generation, time.perf_counter() - started,
                       exc)
            raise
        self._emit("prepared", module, staged.generation, staged.serving_generation, time.perf_counter() - started)
        return staged

    def _stage(self, module: Module, cdef: str | None, file: str | os.PathLike | None, handles: Any,
               destructors: Any, allow_change: bool, canary: bool | str, canary_timeout: float | None,
               exclusive: bool, timeout: float | None, started: float, kept: Any) -> StagedReload:
        name = module.name
        serving = module._active
        refused = f"reload refused; generation {module.generation} still serving"
        if kept is not None:
            path, source = module.path, self._write_kept(name, kept, refused)
        else:
            path = source = os.path.abspath(os.fspath(file)) if file is not None else module.path
        try:
            image = self._copy(name, module.generation + 1, source, module, refused, trusted=kept is not None)
        finally:
            if kept is not None:
                os.unlink(source)           # the copy is made: the kept bytes' file has done its job
        try:
            embedded = image.read_interface(serving=module._declarations.interface)
            declarations, change = contract.declarations_for(name, module._declarations, embedded, cdef,
                                                          allow_change, source, refused)
            if canary:
                seconds = _canary.check(image.copy_path, module=name, cdef=None if embedded else declarations.cdef,
                                        missing=module._missing_mode, call=canary if isinstance(canary, str) else None,
                                        timeout=canary_timeout, refused=refused)
                logger.info("canary of '%s' generation %d passed in %.0f ms", name, image.generation, seconds * 1e3)
            objects = module._objects
            if declarations is not module._declarations or handles is not _KEEP or destructors is not _KEEP:
                objects = module._objects_for(declarations, objects.handles if handles is _KEEP else handles,
                                              objects.destructors if destructors is _KEEP else destructors)
            image.objects = objects
            self._calls.require(declarations, name)
            image.open(declarations, gate_type=self._gate.ImageGate, refused=refused, missing=module._missing_mode)
            self._calls.prepare(image)          # compiled entries, before the image serves, if they are ready
            image.on_closing = functools.partial(self._finish, module)
            contract.check_exports_kept(module, serving, image, allow_change, refused)
            if not exclusive:
                image.hooks.run_init(serving.hooks, refused)
        except BaseException:
            image.discard()
            self._release_idle_workdirs()
            raise
        unchanged = module._content_since if serving.same_content(image) else None
        staged = StagedReload(self, module, image, declarations, objects, change, unchanged, path,
                              exclusive=exclusive, timeout=timeout, started=started)
        with self._state:
            module._pending = staged
            module._images.append(image)
        return staged

    def _commit(self, staged: StagedReload) -> Module:
        with self._admin:
            return self._commit_locked(staged)

    def _commit_locked(self, staged: StagedReload) -> Module:
        if staged.state != "prepared":
            raise NativeReloadError(
                f"module '{staged.module}': the reload to generation {staged.generation} was {staged.state} — "
                f"prepare a new one", module=staged.module)
        module, image = staged._module, staged._image
        serving = module.generation
        old = module._active
        if staged._exclusive:
            resume = self._pause_for_exclusive(staged, old)      # the old image is quiet, new calls wait
        try:
            if staged._exclusive:
                image.hooks.run_init(old.hooks, f"reload refused; generation {serving} still serving")
            module._history.keep(old)
            module._apply_objects(staged._objects)
            with self._state:
                module._active = image
                module._pending = None
                module._declarations = staged._declarations
                module.path = staged._path
                module._forget_undeclared()
                module.generation = staged.generation
                module.unchanged_since = staged.unchanged_since
                module.interface_change = staged.interface_change
                if staged.unchanged_since is None:
                    module._content_since = staged.generation
                module._slot.current = image.gate     # from here on, new calls go to the new image
                staged.state = "committed"
            seconds = time.perf_counter() - staged._started
            self._emit("committed", module, staged.generation, serving, seconds)    # before the old drains
            self._retire(module, old)
        except BaseException as exc:
            # Only an exclusive reload can fail here (its init refused): nothing switched.
            self._abort_locked(staged)
            self._emit("refused", module, staged.generation, serving, time.perf_counter() - staged._started, exc)
            raise
        finally:
            if staged._exclusive:
                old.gate.unpause()
                resume.set()                          # the waiting calls go on (to the new image, if it switched)
        self._release_idle_workdirs()        # the old image's, if $TMPDIR changed since
        if old.state == "retired":
            outcome = f"generation {serving} draining, {held_by(module, old, 'calls')}"
        else:
            outcome = f"generation {serving} {old.state}"
        notes = []
        if staged.interface_change:
            notes.append(f"interface: {staged.interface_change.summary()}")
        if staged.unchanged_since is not None:
            notes.append(f"note: {os.path.basename(module.path)} is unchanged since generation "
                         f"{staged.unchanged_since} — did the build fail?")
        logger.info("reloaded '%s' generation %d in %.2f ms (%s)%s", module.name, staged.generation,
                    seconds * 1e3, outcome, "".join(f"; {n}" for n in notes))
        return module

    def _pause_for_exclusive(self, staged: StagedReload, old: Image) -> threading.Event:
        """Make new calls to ``old`` wait, and wait until none is in flight; return the event that resumes them.

        Raises:
            DrainTimeout: calls were still in flight when the timeout ran out
                (the staged reload is aborted, the waiting calls resume on ``old``).
        """
        gate = old.gate
        resume, quiet = threading.Event(), threading.Event()
        gate.pause(resume, quiet.set)
        timeout = DEFAULT_EXCLUSIVE_TIMEOUT if staged._timeout is None else staged._timeout
        deadline = time.monotonic() + timeout
        while gate.in_flight > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                gate.unpause()
                resume.set()
                calls = gate.in_flight
                self._abort_locked(staged)
                error = DrainTimeout(
                    f"module '{staged.module}': the exclusive reload to generation {staged.generation} waited "
                    f"{timeout:g} s and generation {staged.serving_generation} still has {calls} call(s) in flight "
                    f"(reload refused; generation {staged.serving_generation} still serving, the waiting calls go "
                    "on to it) — reload again when it is idle, or give a longer timeout", module=staged.module)
                self._emit("refused", staged._module, staged.generation, staged.serving_generation,
                           time.perf_counter() - staged._started, error)
                raise error
            quiet.wait(min(left, 0.05))      # on_quiet wakes us when the last call leaves
            quiet.clear()
        return resume

    def _abort(self, staged: StagedReload, why: str = "") -> None:
        with self._admin:
            self._abort_locked(staged, why)

    def _abort_locked(self, staged: StagedReload, why: str = "") -> None:
        if staged.state == "aborted":
            return
        if staged.state == "committed":
            raise NativeReloadError(
                f"module '{staged.module}': the reload to generation {staged.generation} was already committed — "
                f"reload again (or rollback) to go back", module=staged.module)
        module, image = staged._module, staged._image
        with self._state:
            staged.state = "aborted"
            module._pending = None
        image.fini_reason = FINI_ABORTED
        image.discard()                       # its fini runs first, if its init ran
        with self._state:
            if image in module._images:
                module._images.remove(image)
        self._release_idle_workdirs()
        self._emit("aborted", module, staged.generation, module.generation, time.perf_counter() - staged._started)
        log = logger.warning if why else logger.info
        log("aborted the prepared reload of '%s' to generation %d%s (generation %d still serving)", staged.module,
            staged.generation, f" {why}" if why else "", module.generation)

    def _finish(self, module: Module, image: Image) -> None:
        """Run ``image``'s fini (Image.close and discard call this, before the unmap).

        Its state is "adopted" when another image of the module that has not
        finished yet holds the same state pointer: the last image holding a
        state is the one told to free it.
        """
        hooks = image.hooks
        if hooks is None:
            return
        with self._state:
            reason = image.fini_reason or (FINI_UNLOADED if module._unloaded and image.generation == module.generation
                                           else FINI_REPLACED)
            adopted = bool(hooks.state) and any(other is not image and other.hooks is not None
                                                and not other.hooks.finished and other.hooks.state == hooks.state
                                                for other in module._images)
        hooks.run_fini(reason, adopted)

    def _emit(self, kind: str, module: Module, generation: int, previous: int, seconds: float = 0.0,
              error: BaseException | None = None) -> None:
        self._events.emit(ReloadEvent(kind, module.name, generation, previous, seconds, error))

    def _check_not_pending(self, module: Module, what: str) -> None:
        staged = module._pending
        if staged is not None:
            raise ReloadPending(
                f"module '{module.name}': a reload to generation {staged.generation} is prepared and pending "
                f"({what} refused; generation {module.generation} still serving) — commit() or abort() it first",
                module=module.name)

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
            # The current image's compiled set is read here, while it is current: a reload
            # may retire and close it (dropping its entries) before the list below is built.
            images = [(module, list(module._images), module._active,
                       module._active.compiled if module._active is not None else frozenset())
                      for module in modules]
        return [ModuleStatus(module.name, module.path, module.generation,
                             [image_status(module, image) for image in module_images],
                             [(kept.generation, kept.sha256) for kept in module._history.kept],
                             self._calls.state(active, compiled), tuple(sorted(compiled)))
                for module, module_images, active, compiled in images]

    def wait_drained(self, timeout: float | None = None) -> bool:
        """Wait until no retired image is left open; return False if ``timeout`` seconds passed first.

        A "leaked" image counts as closed.
        """
        with self._state:
            return self._state.wait_for(self._drained, timeout)

    def _drained(self) -> bool:
        return not any(image_state(module, image) == "retired"
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
                    if module._pending is not None:
                        self._abort_locked(module._pending, "because the registry closed before commit()")
                    self._unload(module)
        drained = self.wait_drained(timeout)
        self._remove_workdirs_if_drained()
        self._events.flush(timeout=5.0)
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
        logger.warning("module '%s' generation %d was retired %g s ago and is still held open by %s — "
                       "let calls return, release() pins, pass handles to their destructor or reg.release(), "
                       "and drop pointer results", module.name, image.generation, self._held_warning,
                       held_by(module, image))

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

    def _write_kept(self, name: str, kept: Any, refused: str) -> str:
        """A file in our directory holding a kept build's bytes, to copy from (rollback)."""
        fd, path = tempfile.mkstemp(prefix=f".{name}.kept-g{kept.generation}.", suffix=".so",
                                    dir=self._workdirs.current(name).path)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(kept.data)
        except OSError as exc:
            os.unlink(path)
            raise LoadError(f"module '{name}': cannot write the kept build of generation {kept.generation}: "
                            f"{exc.strerror or exc} ({refused})", module=name, path=path, reason=str(exc)) from None
        return path

    def _copy(self, name: str, generation: int, path: str, module: Module | None, refused: str, *,
              trusted: bool = False) -> Image:
        """Step 1 of a load: the private copy of ``path``, checked (nothing of it runs yet).

        ``trusted``: ``path`` is a kept build written into our own directory (rollback): the trust rules checked
        it when it was first loaded.
        """
        try:
            return Image.copy(module=name, generation=generation, source=path,
                              directory=self._workdirs.current(name).path,
                              on_closed=functools.partial(self._image_closed, module) if module else _no_module,
                              refused=refused, trust=None if trusted else self._trust)
        except BaseException:
            self._release_idle_workdirs()
            raise

    def _live_images(self) -> list[Image]:
        """Every image not yet closed, of loaded and unloaded modules (for the compiled path's upgrade)."""
        with self._state:
            return [image for module in (*self._modules.values(), *self._unloaded) for image in module._images]

    def _image_closed(self, module: Module, image: Image) -> None:
        """Called by Image.close() on the thread that drained it."""
        timer = getattr(image, "held_timer", None)
        if timer is not None:
            timer.cancel()
        self._emit("drained", module, image.generation, image.generation)
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
            modules = (*self._modules.values(), *self._unloaded)
            self._workdirs.release_idle({os.path.dirname(image.copy_path)
                                         for module in modules for image in module._images})


def _no_module(image: Image) -> None:
    """on_closed of an image discarded before it had a module (a refused first load)."""
