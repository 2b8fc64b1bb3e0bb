"""Make a Registry that uses a chosen gate ("c" or "python"), and tell which gates are available.

A Registry picks its gate once, at construction, from
``nativereload.gate.implementation()``, which honours
``NATIVERELOAD_PURE_PYTHON``: set it around the constructor, then restore it.
"""

from __future__ import annotations

import os

import nativereload
from nativereload import gate

ENV = "NATIVERELOAD_PURE_PYTHON"


def available_gates() -> list[str]:
    """"c" first if the C gate is built, then "python"."""
    return (["c"] if gate.C is not None else []) + ["python"]


def make_registry(gate_name: str, path: str, tmpdir: str) -> nativereload.Registry:
    """A Registry searching ``path``, copying into ``tmpdir``, calling through the ``gate_name`` gate."""
    saved = os.environ.get(ENV)
    if gate_name == "python":
        os.environ[ENV] = "1"
    else:
        os.environ.pop(ENV, None)
    try:
        registry = nativereload.Registry(path=[path], tmpdir=tmpdir)
    finally:
        if saved is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = saved
    return registry


def func_gate(func) -> str:
    """Which gate a Func handle calls through: "c" or "python"."""
    return "c" if gate.C is not None and isinstance(func, gate.C.Func) else "python"
