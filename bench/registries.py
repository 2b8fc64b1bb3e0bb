"""Make a Registry on a chosen call path ("c", "compiled" or "python"), and tell which are available.

A Registry picks its gate once, at construction, from
``nativereload.gate.implementation()``, which honours
``NATIVERELOAD_PURE_PYTHON``: set it around the constructor, then restore it.
"compiled" is the C gate with ``calls="compiled"`` (the compiled call path,
compiled during the first load or taken from the cache); "c" is the C gate
with ``calls="gate"``.
"""

from __future__ import annotations

import os

import nativereload
from nativereload import gate

ENV = "NATIVERELOAD_PURE_PYTHON"


def available_gates() -> list[str]:
    """"c" first if the C gate is built, then "compiled" if a C compiler is there too, then "python"."""
    from nativereload.compiled import cache

    if gate.C is None:
        return ["python"]
    return ["c"] + (["compiled"] if cache.compiler() is not None else []) + ["python"]


def make_registry(gate_name: str, path: str, tmpdir: str) -> nativereload.Registry:
    """A Registry searching ``path``, copying into ``tmpdir``, calling through the ``gate_name`` gate."""
    saved = os.environ.get(ENV)
    if gate_name == "python":
        os.environ[ENV] = "1"
    else:
        os.environ.pop(ENV, None)
    try:
        registry = nativereload.Registry(path=[path], tmpdir=tmpdir,
                                         calls="compiled" if gate_name == "compiled" else "gate")
    finally:
        if saved is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = saved
    return registry


def registry_path(registry: nativereload.Registry) -> str:
    """Which call path a registry's (first) module serves on: "c", "compiled" or "python"."""
    calls = registry.status()[0].calls
    return {"gate": "c"}.get(calls, calls)


def path_label(gate_name: str) -> str:
    """How the table names a call path: "c gate", "python gate" or "compiled path"."""
    return "compiled path" if gate_name == "compiled" else f"{gate_name} gate"
