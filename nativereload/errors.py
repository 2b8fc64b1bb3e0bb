"""The exceptions nativereload raises.

Every message names the module at fault and says what to do next. Each
exception also carries its facts as attributes (``.module``, ``.path``,
``.symbols``, ...), so callers never have to parse a message.

    NativeReloadError
     +-- ModuleNameError (also ValueError)   a name with '/', '..' or an empty part
     +-- ModuleNotFound                      no file for the name; lists every path searched
     +-- ModuleNotLoaded                     reload/unload/func of a module never loaded
     +-- ModuleConflict                      load() of a loaded module with another cdef/file
     +-- ReloadPending                       reload/prepare/unload while a prepared reload waits
     +-- LoadError                           copy, ELF check or dlopen failed
     |    +-- InitRefused                    the module's nativereload_init() returned non-zero
     |    +-- CanaryFailed                   the new build crashed or failed in the canary process
     +-- DrainTimeout (also TimeoutError)    an exclusive reload's old image did not drain in time
     +-- SymbolError (also AttributeError)   declared symbols missing from the image
     +-- InterfaceError                      the cdef is missing or does not parse, or an interface
     |                                       changed incompatibly (shows old and new declarations)
     +-- ModuleUnloaded                      a call through a handle of an unloaded module
     +-- HandleError (also ValueError)       handles of two images in one call, or one used after release
     +-- PinReleased                         a pin used after release()
     +-- ControlError                        the control socket cannot be served or reached
     |    +-- ProtocolError                  a request that is not valid JSON or not a valid operation
     +-- BuildError                          CMake configure or build failed (or CMake is missing)
     +-- CompileError                        calls="compiled" and the compiled call path could not be built
     +-- DemoError                           the demo module could not be compiled
     +-- ClusterReloadError                  a reload or unload across a Dask cluster refused, stopped
                                             or could not start (``.report`` says per worker)

This module imports nothing from the package.
"""

from __future__ import annotations

import os

__all__ = [
    "BuildError",
    "CanaryFailed",
    "ClusterReloadError",
    "CompileError",
    "ControlError",
    "DemoError",
    "DrainTimeout",
    "HandleError",
    "InitRefused",
    "InterfaceError",
    "LoadError",
    "ModuleConflict",
    "ModuleNameError",
    "ModuleNotFound",
    "ModuleNotLoaded",
    "ModuleUnloaded",
    "NativeReloadError",
    "PinReleased",
    "ProtocolError",
    "ReloadPending",
    "SymbolError",
]


class NativeReloadError(Exception):
    """Base class of every error nativereload raises on purpose.

    Attributes:
        module: the module name the error is about (None if there is none).
    """

    def __init__(self, message: str, *, module: str | None = None) -> None:
        super().__init__(message)
        self.module = module


class ModuleNameError(NativeReloadError, ValueError):
    """The module name cannot be a module name (it has '/', '..' or an empty part)."""


class ModuleNotFound(NativeReloadError):
    """No file exists for the module.

    Attributes:
        searched: every path that was tried, in order.
    """

    def __init__(self, message: str, *, module: str | None = None, searched: tuple[str, ...] = ()) -> None:
        super().__init__(message, module=module)
        self.searched = tuple(searched)


class ModuleNotLoaded(NativeReloadError):
    """reload(), unload() or func() named a module that is not loaded."""


class ModuleConflict(NativeReloadError):
    """load() of a module that is already loaded, with a different cdef or file."""


class ReloadPending(NativeReloadError):
    """A reload of the module is prepared (``Registry.prepare()``) and neither committed nor aborted yet."""


class LoadError(NativeReloadError):
    """The new image could not be loaded: copy, ELF validation or dlopen failed.

    Attributes:
        path: the file that was being loaded.
        reason: the loader's own words (``dlerror()`` text, the ELF defect, the OS error).
    """

    def __init__(self, message: str, *, module: str | None = None, path: str | None = None,
                 reason: str | None = None) -> None:
        super().__init__(message, module=module)
        self.path = path
        self.reason = reason


class InitRefused(LoadError):
    """The module's ``nativereload_init()`` returned non-zero: the image was closed, the old one serves.

    Attributes:
        generation: the refused image's generation.
        code: what init returned.
        reason: the message it wrote into ``ctx->error`` ("" if none).
    """

    def __init__(self, message: str, *, module: str | None = None, generation: int = 0, code: int = 0,
                 reason: str = "") -> None:
        super().__init__(message, module=module, reason=reason)
        self.generation = generation
        self.code = code


class CanaryFailed(LoadError):
    """The new build failed in the canary process; the serving process never loaded it.

    Attributes:
        signal: the signal that killed the canary (e.g. "SIGSEGV"), or None.
        selftest: what ``nativereload_selftest()`` returned, if it ran and failed.
        error: the last line of a Python traceback in the canary, or None.
        timed_out: the canary did not finish in time.
        stderr: the tail of the canary's stderr.
    """

    def __init__(self, message: str, *, module: str | None = None, path: str | None = None,
                 signal: str | None = None, selftest: int | None = None, error: str | None = None,
                 timed_out: bool = False, stderr: str = "") -> None:
        super().__init__(message, module=module, path=path, reason=message)
        self.signal = signal
        self.selftest = selftest
        self.error = error
        self.timed_out = timed_out
        self.stderr = stderr


class DrainTimeout(NativeReloadError, TimeoutError):
    """An exclusive reload's old image still had calls in flight when its timeout ran out: refused."""


class SymbolError(NativeReloadError, AttributeError):
    """Symbols the module's cdef declares (or a handle needs) are missing.

    Attributes:
        symbols: the missing symbol names, sorted.
    """

    def __init__(self, message: str, *, module: str | None = None, symbols: tuple[str, ...] = ()) -> None:
        super().__init__(message, module=module)
        self.symbols = tuple(symbols)


class InterfaceError(NativeReloadError):
    """The cdef is missing or cffi cannot parse it, or a module's interface changed incompatibly.

    Attributes:
        path: the library or header concerned (None if there is none).
        function: the first function whose declaration changed or disappeared (None if none did).
        old, new: that declaration (or the first changed type's) before and after.
        diff: the whole difference (a ``nativereload.interface.Diff``), when there is one.
    """

    def __init__(self, message: str, *, module: str | None = None, path: str | os.PathLike | None = None,
                 function: str | None = None, old: str | None = None, new: str | None = None,
                 diff: object | None = None) -> None:
        super().__init__(message, module=module)
        self.path = None if path is None else str(path)
        self.function = function
        self.old = old
        self.new = new
        self.diff = diff


class ModuleUnloaded(NativeReloadError):
    """A Func handle was called after its module was unloaded."""


class HandleError(NativeReloadError, ValueError):
    """A call was given handles bound to two different images, or a handle whose binding ended as it started.

    Nothing was called.
    """


class PinReleased(NativeReloadError):
    """A pin was used after ``release()``."""


class ControlError(NativeReloadError):
    """The control socket could not be served, reached, or understood.

    Attributes:
        path: the socket path concerned (None if there is none).
        hint: what to try next, for the CLI's ``hint:`` line.
    """

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.hint = hint


class ProtocolError(ControlError):
    """A request that is not valid JSON, or not a valid operation (unknown op, wrong type, unknown field)."""


class BuildError(NativeReloadError):
    """Configuring or building failed (or CMake is not installed).

    Attributes:
        returncode: the failing command's exit status (None if it could not run).
        hint: what to try next, for the CLI's ``hint:`` line.
    """

    def __init__(self, message: str, *, returncode: int | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.hint = hint


class CompileError(NativeReloadError):
    """``Registry(calls="compiled")`` could not compile (or load) the compiled call path of an interface.

    Attributes:
        reason: what failed, in the compiler's or loader's own words where there are some.
        hint: what to try next, for the CLI's ``hint:`` line.
    """

    def __init__(self, message: str, *, module: str | None = None, reason: str | None = None,
                 hint: str | None = None) -> None:
        super().__init__(message, module=module)
        self.reason = reason
        self.hint = hint


class DemoError(NativeReloadError):
    """``nativereload demo`` could not compile its module (no compiler, or it failed).

    Attributes:
        hint: what to try next, for the CLI's ``hint:`` line.
    """

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, module="demo")
        self.hint = hint


class ClusterReloadError(NativeReloadError):
    """A reload or unload across a Dask cluster (``nativereload.dask``) was refused, stopped, or could not start.

    Attributes:
        report: what happened on each worker (a ``nativereload.dask.ClusterReport``; ``None`` if no worker
            was asked, e.g. another cluster reload of the module held the lock).
        hint: what to try next, for the CLI's ``hint:`` line.
    """

    def __init__(self, message: str, *, module: str | None = None, report: object | None = None,
                 hint: str | None = None) -> None:
        super().__init__(message, module=module)
        self.report = report
        self.hint = hint


for _cls in (NativeReloadError, ModuleNameError, ModuleNotFound, ModuleNotLoaded, ModuleConflict, ReloadPending,
             LoadError, SymbolError, InterfaceError, ModuleUnloaded, HandleError, PinReleased, ControlError,
             ProtocolError, BuildError, CompileError, DemoError, InitRefused, CanaryFailed, DrainTimeout,
             ClusterReloadError):
    # Tracebacks read "nativereload.LoadError", the name users import.
    _cls.__module__ = "nativereload"
del _cls
