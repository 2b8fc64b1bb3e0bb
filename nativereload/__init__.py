"""nativereload: load C shared libraries through cffi and hot-reload them with zero downtime.

    reg = nativereload.Registry(path=["build/modules"])
    mod = reg.load("sample", cdef="long add(long, long);")
    mod.add(2, 3)
    reg.reload("sample")        # calls in flight finish on the old image

A reload loads a private copy of the rebuilt file, resolves every declared
function, then switches new calls to it; calls in flight finish on the old
image, which closes when the last returns. A reload that fails changes
nothing: the old version keeps serving. ``help(nativereload.Registry)``
describes each operation.
"""

from .affinity import Pin
from .errors import (BuildError, CanaryFailed, ClusterReloadError, CompileError, ControlError, DemoError,
                     DrainTimeout, HandleError, InitRefused, InterfaceError, LoadError, ModuleConflict, ModuleNameError,
                     ModuleNotFound, ModuleNotLoaded, ModuleUnloaded, NativeReloadError, PinReleased, ProtocolError,
                     ReloadPending, SymbolError)
from .gate import Func
from .lifecycle import ReloadEvent, StagedReload
from .module import Module
from .registry import Registry
from .status import ImageStatus, ModuleStatus

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``%load_ext nativereload`` looks these up on the package: they come from
    # nativereload.ipython, imported only then (importing nativereload must not import IPython).
    if name in ("load_ipython_extension", "unload_ipython_extension"):
        from . import ipython

        return getattr(ipython, name)
    raise AttributeError(f"module 'nativereload' has no attribute {name!r}")


__all__ = [
    "BuildError",
    "CanaryFailed",
    "ClusterReloadError",
    "CompileError",
    "ControlError",
    "DemoError",
    "DrainTimeout",
    "Func",
    "HandleError",
    "ImageStatus",
    "InitRefused",
    "InterfaceError",
    "LoadError",
    "Module",
    "ModuleConflict",
    "ModuleNameError",
    "ModuleNotFound",
    "ModuleNotLoaded",
    "ModuleStatus",
    "ModuleUnloaded",
    "NativeReloadError",
    "Pin",
    "PinReleased",
    "ProtocolError",
    "Registry",
    "ReloadEvent",
    "ReloadPending",
    "StagedReload",
    "SymbolError",
]
