"""Which call path a registry's images serve on, and the background upgrade to the compiled one.

``Registry(calls=...)`` (default: $NATIVERELOAD_CALLS, else "auto"):

``"gate"``
    Today's path: the C gate calls each image's cffi ABI function object.
``"compiled"``
    Before ``load``/``reload`` loads an image, the interface's compiled
    extension is taken from this process, from the on-disk cache, or
    compiled (cache.py); if that fails, the load or reload fails with
    CompileError and changes nothing. Every image then serves compiled.
``"auto"``
    Like "compiled" when the extension is already in this process or in the
    cache. Otherwise the image serves at once on the gate, the extension is
    compiled on a background thread, and when it is ready every live image
    of that interface is moved to it. Without a compiler (or if compiling
    fails), images stay on the gate, and the log says so once.

Moving an image to the compiled path is one assignment of its gate's
``functions`` (``Image.attach_calls``): the new mapping gets a new serial, so
every Func's cached lookup misses once and then finds the compiled entry; no
call takes a lock, and a call in flight finishes on what it had looked up.
The compiled path needs the C gate: with the pure-Python gate
(``NATIVERELOAD_PURE_PYTHON=1`` or no C gate built) every mode serves on it.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import weakref
from typing import Any, Callable, Iterable

from .. import gate as _gate
from ..errors import CompileError
from . import cache, codegen

__all__ = ["CALLS_ENV", "MODES", "CallPath"]

logger = logging.getLogger("nativereload")

CALLS_ENV = "NATIVERELOAD_CALLS"
MODES = ("auto", "compiled", "gate")

_said: set[str] = set()          # log lines said once per process
_said_lock = threading.Lock()


def _say_once(key: str, level: int, message: str, *args: Any) -> None:
    with _said_lock:
        if key in _said:
            return
        _said.add(key)
    logger.log(level, message, *args)


def _configure() -> bool:
    """Give the C gate cffi's cast, and verify the cdata layout it reads (once, at import)."""
    if _gate._c_gate is None:
        return False
    import _cffi_backend

    sample_type = _cffi_backend.new_pointer_type(_cffi_backend.new_primitive_type("char"))
    sample = _cffi_backend.cast(sample_type, 1)
    return bool(_gate._c_gate.configure_compiled(_cffi_backend.cast, sample, sample_type))


_LAYOUT_VERIFIED = _configure()


class _Upgrader:
    """One daemon thread per process that builds extensions for "auto" registries, one plan at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: dict[str, list[Callable]] = {}
        self._failed: dict[str, CompileError] = {}
        self._thread: threading.Thread | None = None

    def pending(self, digest: str) -> bool:
        return digest in self._waiting

    def failed(self, digest: str) -> CompileError | None:
        return self._failed.get(digest)

    def request(self, plan: codegen.Plan, callback: Callable[[codegen.Plan, Any], None]) -> None:
        """Build ``plan`` in the background and call ``callback(plan, extension)`` when it is ready."""
        with self._lock:
            if self._pid != os.getpid():       # forked: the parent's thread and its work are not here
                self._reset()
            if plan.digest in self._failed:
                return
            waiting = self._waiting.setdefault(plan.digest, [])
            waiting.append(callback)
            if len(waiting) > 1:
                return
            self._queue.put(plan)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="nativereload-compile", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            plan = self._queue.get()
            extension, error = None, None
            try:
                extension = cache.build(plan)
            except CompileError as exc:
                error = exc
            except Exception as exc:           # a bug of ours must not kill the thread or the process
                error = CompileError(f"building the compiled call path failed: {exc!r}", reason=repr(exc))
                logger.exception("compiled calls: building %s failed", plan.module_name)
            with self._lock:
                callbacks = self._waiting.pop(plan.digest, [])
                if error is not None:
                    self._failed[plan.digest] = error
            if error is not None:
                _report_failure(error)
                continue
            for callback in callbacks:
                try:
                    callback(plan, extension)
                except Exception:
                    logger.exception("compiled calls: moving images to the compiled path failed")


_upgrader = _Upgrader()


def _report_failure(error: CompileError) -> None:
    if error.reason == "no compiler":
        _say_once("no compiler", logging.INFO, "compiled calls: %s; calls stay on the C gate — %s", error,
                  error.hint)
    else:
        _say_once(f"failed {error}", logging.WARNING, "compiled calls: %s; calls stay on the C gate", error)


class CallPath:
    """One registry's call path: the mode, each interface's plan, and attaching compiled entries to images.

    Args:
        mode: "auto", "compiled", "gate", or None for $NATIVERELOAD_CALLS (default "auto").
        impl: the registry's gate implementation (the compiled path needs the C gate).
    Raises:
        ValueError: an unknown mode.
    """

    def __init__(self, mode: str | None, impl: Any) -> None:
        if mode is None:
            mode = os.environ.get(CALLS_ENV) or "auto"
        if mode not in MODES:
            raise ValueError(f"calls={mode!r}: use one of {', '.join(map(repr, MODES))}")
        self.mode = mode
        self.python = impl is not _gate.C or _gate.C is None
        self.usable = mode != "gate" and not self.python
        if mode != "gate" and not self.usable:
            _say_once("pure python", logging.INFO, "compiled calls: the pure-Python gate serves (%s), so calls=%r "
                      "serves on it", "NATIVERELOAD_PURE_PYTHON=1" if _gate.C is not None else "the C gate is not "
                      "built", mode)
        # interface -> [its Plan, its specs: symbol -> (builtin, arity, checks, result_type, fast), once built]
        self._plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock: Any = None
        self._images: Callable[[], Iterable[Any]] = lambda: ()

    def bind(self, lock: Any, images: Callable[[], Iterable[Any]]) -> None:
        """Where the background upgrade finds the registry's live images, and the lock loads hold."""
        self._lock = lock
        self._images = images

    def plan(self, interface: Any) -> codegen.Plan:
        known = self._plans.get(interface)
        if known is not None:
            return known[0]
        the_plan = codegen.plan(interface.ffi, interface.function_types)
        self._plans[interface] = [the_plan, None]
        if the_plan.skipped and self.usable:
            logger.info("compiled calls: %d of %d functions compiled; on the gate: %s", len(the_plan.entries),
                        len(the_plan.entries) + len(the_plan.skipped),
                        "; ".join(f"{name} ({why})" for name, why in the_plan.skipped.items()))
        return the_plan

    def require(self, interface: Any, module: str) -> None:
        """Before an image of ``interface`` loads: have its extension ready ("compiled"), or on its way ("auto").

        Raises:
            CompileError: calls="compiled" and the extension cannot be had.
        """
        if not self.usable:
            return
        the_plan = self.plan(interface)
        if not the_plan.entries:
            return
        try:
            extension = cache.load_cached(the_plan) if self.mode == "auto" else cache.build(the_plan)
        except CompileError as exc:
            if self.mode == "compiled":
                raise CompileError(f"module '{module}': calls='compiled', but {exc} — {exc.hint or 'fix it'}, or "
                                   "use calls='auto' (serves on the gate meanwhile) or calls='gate'",
                                   module=module, reason=exc.reason, hint=exc.hint) from None
            _report_failure(exc)
            return
        if extension is None:
            if cache.compiler() is None:           # say so now, rather than "compiling" for a moment
                _report_failure(CompileError("no C compiler found (looked for $CC, cc, gcc and clang on PATH)",
                                             reason="no compiler",
                                             hint="install one (e.g. apt-get install gcc), or use calls='gate'"))
                return
            _upgrader.request(the_plan, self._ready)

    def prepare(self, image: Any) -> None:
        """Move a freshly loaded image to the compiled path if its extension is in this process."""
        if not self.usable:
            return
        the_plan = self.plan(image.declarations)
        extension = cache._loaded.get(the_plan.digest)
        if extension is not None and the_plan.entries:
            self._attach(image, the_plan, extension)

    def state(self, image: Any | None, compiled: frozenset = frozenset()) -> str:
        """What status() says of the image: "compiled", "compiling", "gate" or "python".

        ``compiled`` is ``image.compiled`` as the caller read it while the image was
        the module's current one: read here, an image that a reload closed meanwhile
        (its entries dropped) would say "gate".
        """
        if self.python:
            return "python"
        if image is None or not self.usable:
            return "gate"
        if compiled:
            return "compiled"
        known = self._plans.get(image.declarations)
        if known is not None and _upgrader.pending(known[0].digest):
            return "compiling"
        return "gate"

    def _attach(self, image: Any, the_plan: codegen.Plan, extension: Any) -> None:
        known = self._plans[image.declarations]
        specs = known[1]
        if specs is None:
            lib = extension.lib
            fast = [lib._nr_fast(index) for index in range(len(the_plan.shapes))]
            specs = {name: (getattr(lib, f"_nrw_{entry.index}"), entry.arity, entry.checks, entry.result_type,
                            fast[entry.index] or None)
                     for name, entry in the_plan.entries.items()}
            known[1] = specs
        abi = image.functions
        table = _gate._c_gate.compiled_functions(specs, abi)
        image.attach_calls(table, frozenset(name for name in specs if name in abi))

    def _ready(self, the_plan: codegen.Plan, extension: Any) -> None:
        """On the compile thread: move every live image of the plan's interfaces to the compiled path."""
        if self._lock is None:
            return
        with self._lock:        # no load or reload half-way meanwhile: each image is seen here or attaches itself
            moved = 0
            for image in list(self._images()):
                own = self.plan(image.declarations)      # same digest: same shapes, maybe other names
                if own.digest == the_plan.digest and own.entries and not image.compiled:
                    self._attach(image, own, extension)
                    moved += 1
        if moved:
            logger.info("compiled calls: %d image%s moved to the compiled path (%s)", moved, "s" * (moved != 1),
                        the_plan.module_name)
