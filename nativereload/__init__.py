"""nativereload: load C shared libraries through cffi and hot-reload them with zero downtime.

    reg = nativereload.Registry(path=["build/modules"])
    mod = reg.load("sample", cdef="long add(long, long);")
    mod.add(2, 3)
    reg.reload("sample")        # calls in flight finish on the old image

See README.md for the guarantees and their limits.
"""

from .affinity import Pin
from .errors import (BuildError, ControlError, DemoError, HandleError, InterfaceError, LoadError, ModuleConflict,
                     ModuleNameError, ModuleNotFound, ModuleNotLoaded, ModuleUnloaded, NativeReloadError,
                     PinReleased, ProtocolError, SymbolError)
from .gate import Func
from .registry import ImageStatus, Module, ModuleStatus, Registry

__version__ = "0.1.0"

__all__ = [
    "BuildError",
    "ControlError",
    "DemoError",
    "Func",
    "HandleError",
    "ImageStatus",
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
    "SymbolError",
]
