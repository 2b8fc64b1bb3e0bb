"""The life of a module's images: the reload transaction, init/fini hooks, rollback history, events.

The transaction: prepare, then commit or abort.

``Registry.prepare(name)`` does everything a reload does up to the switch --
copy, ELF check, interface check, dlopen, resolve -- and returns a
:class:`StagedReload`. While it waits, calls keep going to the serving image
(status() shows the new one as "prepared"). ``commit()`` switches new calls to
it; ``abort()`` closes it and deletes its copy, and the serving image never
noticed. ``Registry.reload()`` is ``prepare().commit()`` under one lock.

Why two steps: a fleet of processes can load a new build everywhere first and
switch only if every one of them could (the cluster reload), and a program can
look at what a reload would change (``interface_change``, ``unchanged_since``)
before it decides.

While a reload of a module is prepared, another reload, prepare or unload of
that module is refused with ReloadPending, never queued: a thread that holds a
prepared reload and then reloads again would otherwise wait for itself. A
prepared reload that is neither committed nor aborted is aborted, with a
warning, when its registry closes.

Hooks (:class:`Hooks`): the exports nativereload.h declares,
``nativereload_init``, ``nativereload_fini`` and ``nativereload_selftest``,
called through cffi on the image's own handle. ``init`` runs in prepare (or,
for an exclusive reload, while calls are paused at commit) with the state of
the image it replaces; ``fini`` runs when the image has drained, before it is
unmapped, told whether another image still holds its state.

History (:class:`History`): the files of the last N images a module served
(hard links of their private copies, in the registry's directory), for
``Registry.rollback()``.

Events (:class:`Events`): ``Registry.on_reload(callback)`` callbacks, run one
at a time on one daemon thread per registry, in the order the events
happened; an exception in a callback is logged and changes nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import queue
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

import cffi

from .errors import InitRefused

if TYPE_CHECKING:
    from .image import Image
    from .interface import Declarations, Diff
    from .module import Module, Objects
    from .registry import Registry

__all__ = ["Events", "Hooks", "History", "ReloadEvent", "StagedReload"]

logger = logging.getLogger(__name__.rpartition(".")[0])


class StagedReload:
    """A reload prepared up to the switch. Made by ``Registry.prepare()``; not created directly.

    Exactly one of :meth:`commit` and :meth:`abort` takes effect. Usable as a
    context manager: leaving the block without a commit aborts it.

    Attributes:
        module: the module's name.
        generation: the generation the module will have after commit().
        serving_generation: the generation serving meanwhile.
        state: "prepared", then "committed" or "aborted".
        interface_change: what the new image changes in the interface (a Diff
            of additions, or a change allowed with allow_interface_change), or None.
        unchanged_since: if the new file is byte-identical to the serving
            image's, the generation since which it has not changed; else None.
    """

    def __init__(self, registry: Registry, module: Module, image: Image, declarations: Declarations,
                 objects: Objects, interface_change: Diff | None, unchanged_since: int | None,
                 path: str, *, exclusive: bool = False, timeout: float | None = None,
                 started: float | None = None) -> None:
        """Internal: ``Registry.prepare()`` makes these."""
        self.module = module.name
        self.generation = image.generation
        self.serving_generation = module.generation
        self.state = "prepared"
        self.interface_change = interface_change
        self.unchanged_since = unchanged_since
        self._registry = registry
        self._module = module
        self._image = image
        self._declarations = declarations
        self._objects = objects
        self._path = path
        self._exclusive = exclusive
        self._timeout = timeout
        self._started = started if started is not None else time.perf_counter()

    def __repr__(self) -> str:
        return f"<nativereload.StagedReload '{self.module}' generation {self.generation} {self.state}>"

    def commit(self) -> Module:
        """Switch new calls to the prepared image; the serving one drains and closes as after a reload.

        Returns:
            the Module, its generation one higher.

        Raises:
            NativeReloadError: it was aborted (by abort(), or by the registry closing).
        """
        return self._registry._commit(self)

    def abort(self) -> None:
        """Close the prepared image and delete its copy; the serving image goes on. Idempotent.

        Raises:
            NativeReloadError: it was already committed.
        """
        self._registry._abort(self)

    def __enter__(self) -> "StagedReload":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.state == "prepared":
            self.abort()


# --------------------------------------------------------------------------- hooks

# The context struct and the hooks, as nativereload.h declares them (a test
# compiles the header and checks this layout against the compiler's).
CONTEXT_CDEF = """
typedef struct nativereload_context {
    unsigned int size;
    const char *module;
    unsigned long generation;
    unsigned long previous_generation;
    void *state;
    unsigned long state_version;
    int adopted;
    int reason;
    char error[256];
} nativereload_context;
"""
FINI_REPLACED, FINI_UNLOADED, FINI_ABORTED = 1, 2, 3

_ffi = cffi.FFI()
_ffi.cdef(CONTEXT_CDEF)
_INIT = _ffi.typeof("int(*)(nativereload_context *)")
_FINI = _ffi.typeof("void(*)(nativereload_context *)")
_SELFTEST = _ffi.typeof("int(*)(void)")


def _export(lib: Any, ctype: Any, name: str) -> Any:
    try:
        return lib.load_function(ctype, name)
    except AttributeError:        # dlsym() found nothing: the module does not have this hook
        return None


class Hooks:
    """The lifecycle hooks one image exports, and the context it keeps between init and fini.

    Attributes:
        state: the address this image's init left in ``ctx->state`` (0 for none).
        state_version: what it left in ``ctx->state_version``.
        initialized: init ran and accepted (or the image has no init: then True).
    """

    def __init__(self, lib: Any, module: str, generation: int) -> None:
        self.init = _export(lib, _INIT, "nativereload_init")
        self.fini = _export(lib, _FINI, "nativereload_fini")
        self.selftest = _export(lib, _SELFTEST, "nativereload_selftest")
        self.module = module
        self.generation = generation
        self.state = 0
        self.state_version = 0
        self.initialized = False
        self.finished = False
        self._name = _ffi.new("char[]", module.encode())
        self._context = None

    @property
    def any(self) -> bool:
        return self.init is not None or self.fini is not None

    def run_init(self, previous: "Hooks | None", refused: str) -> None:
        """Call nativereload_init with ``previous``'s state (none on a first load).

        Raises:
            InitRefused: it returned non-zero (with the module's own message).
        """
        context = _ffi.new("nativereload_context *")
        context.size = _ffi.sizeof("nativereload_context")
        context.module = self._name
        context.generation = self.generation
        if previous is not None:
            context.previous_generation = previous.generation
            context.state = _ffi.cast("void *", previous.state)
            context.state_version = previous.state_version
        self._context = context
        if self.init is None:
            self.initialized = True         # no state of its own: a predecessor's state stays its predecessor's
            return
        code = self.init(context)
        if code != 0:
            message = _ffi.string(context.error, len(context.error) - 1).decode(errors="replace")
            self.finished = True            # refused: closed without fini
            raise InitRefused(
                f"module '{self.module}': nativereload_init() of generation {self.generation} refused (returned "
                f"{code}){': ' + message if message else ''} ({refused}) — fix what it reports, then load or "
                "reload again", module=self.module, generation=self.generation, code=code, reason=message)
        self.state = int(_ffi.cast("uintptr_t", context.state))
        self.state_version = int(context.state_version)
        self.initialized = True

    def run_fini(self, reason: int, adopted: bool) -> None:
        """Call nativereload_fini once, if init ran and accepted (never raises: it runs during a close)."""
        if self.finished or not self.initialized:
            return
        self.finished = True
        if self.fini is None:
            return
        context = self._context if self._context is not None else _ffi.new("nativereload_context *")
        context.size = _ffi.sizeof("nativereload_context")
        context.module = self._name
        context.generation = self.generation
        context.state = _ffi.cast("void *", self.state)
        context.state_version = self.state_version
        context.adopted = 1 if adopted else 0
        context.reason = reason
        self.fini(context)

    def run_selftest(self) -> int | None:
        return None if self.selftest is None else int(self.selftest())


# --------------------------------------------------------------------------- history

class Kept:
    """One image's build kept for rollback: the bytes it was copied from.

    Attributes:
        generation: the generation that served it.
        data: the file's bytes, as the user built them.
    """

    def __init__(self, generation: int, data: bytes | bytearray, sha256: str | None = None) -> None:
        self.generation = generation
        self.data = data
        self._sha256 = sha256

    @property
    def sha256(self) -> str:
        """The first 12 hex digits of the SHA-256 of ``data``."""
        if self._sha256 is None:
            self._sha256 = hashlib.sha256(self.data).hexdigest()[:12]
        return self._sha256

    def __repr__(self) -> str:
        return f"<Kept generation {self.generation}, {len(self.data)} bytes>"


class History:
    """The builds of the last ``size`` images one module served, newest last.

    Kept in memory, not as files: the registry's directory holds the copies of
    open images and nothing else (every image's copy is deleted when it
    closes, and tools and tests may count on that), and no descriptor stays
    open for them. The cost is the modules' size times ``size``, and one
    read of the old copy (from the page cache) per reload.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.kept: list[Kept] = []

    def keep(self, image: Image) -> None:
        """Keep the bytes ``image`` was copied from (read from its private copy, the private soname undone)."""
        if self.size <= 0:
            return
        try:
            data = image.read_original()
        except OSError as exc:
            logger.warning("module '%s': cannot keep generation %d for rollback: %s", image.module,
                           image.generation, exc.strerror or exc)
            return
        self.kept.append(Kept(image.generation, data, image.cached_hash()))
        del self.kept[:-self.size]

    def find(self, generation: int | None) -> Kept | None:
        if generation is None:
            return self.kept[-1] if self.kept else None
        return next((kept for kept in self.kept if kept.generation == generation), None)

    def clear(self) -> None:
        self.kept.clear()


# --------------------------------------------------------------------------- events

@dataclasses.dataclass(frozen=True)
class ReloadEvent:
    """What happened to a module, as ``Registry.on_reload`` callbacks see it.

    Attributes:
        kind: "prepared" (a new image is loaded and waits for commit), "committed"
            (new calls go to it), "aborted" (a prepared one was dropped), "refused"
            (a reload or prepare failed; the old image serves), "drained" (an old
            image closed), or "unloaded".
        module: the module's name.
        generation: the image the event is about (for "refused": the one attempted).
        previous_generation: the image serving before (0 if none).
        seconds: how long the operation took (0 for "drained").
        error: for "refused", the exception.
        time: when it happened (time.time()).
    """

    kind: str
    module: str
    generation: int
    previous_generation: int = 0
    seconds: float = 0.0
    error: BaseException | None = None
    time: float = dataclasses.field(default_factory=time.time)


class Events:
    """A registry's on_reload callbacks and the thread that runs them."""

    def __init__(self) -> None:
        self._callbacks: list[Callable[[ReloadEvent], object]] = []
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pending = 0
        self._idle = threading.Condition(self._lock)

    def subscribe(self, callback: Callable[[ReloadEvent], object]) -> Callable[[], None]:
        if not callable(callback):
            raise TypeError(f"on_reload needs a callable, not {type(callback).__name__}")
        with self._lock:
            self._callbacks.append(callback)

        def remove() -> None:
            with self._lock:
                if callback in self._callbacks:
                    self._callbacks.remove(callback)

        return remove

    def emit(self, event: ReloadEvent) -> None:
        with self._lock:
            if not self._callbacks:
                return
            self._pending += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="nativereload-events", daemon=True)
                self._thread.start()
        self._queue.put(event)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every event emitted so far has been delivered; False if ``timeout`` passed first."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def _run(self) -> None:
        while True:
            event = self._queue.get()
            with self._lock:
                callbacks = list(self._callbacks)
            for callback in callbacks:
                try:
                    callback(event)
                except Exception:
                    logger.exception("on_reload callback %r failed on %s of '%s' (ignored)", callback, event.kind,
                                     event.module)
            with self._idle:
                self._pending -= 1
                self._idle.notify_all()
