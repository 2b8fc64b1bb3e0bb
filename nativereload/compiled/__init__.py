"""Compiled call paths: a reloadable call that costs less than a plain cffi ABI call.

    codegen.py   declared functions -> call shapes -> the C of one cffi API-mode extension
    cache.py     the on-disk cache of those extensions (validated, shared between processes)
    upgrade.py   Registry(calls=...): which path images serve on, and the background upgrade

The C gate (csrc/_gate.c) stays the front door of every call; on the compiled
path an image's ``functions`` hold ``_gate.CompiledFunction`` entries instead
of cffi ABI function objects, so admission, drain, routing, leases and pins
are the same code on both paths.
"""

from .cache import CACHE_ENV, cache_dir
from .upgrade import CALLS_ENV, MODES, CallPath

__all__ = ["CACHE_ENV", "CALLS_ENV", "MODES", "CallPath", "cache_dir"]
