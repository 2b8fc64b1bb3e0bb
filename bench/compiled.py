"""The compiled call path (issue 12): reload cost with a cached interface, and the first compile.

Reload: two registries load the same 10-function library, one on the C gate
(calls="gate"), one on the compiled path (calls="compiled", its extension
already built); their reloads are timed round-robin in one loop. A compiled
reload swaps addresses into a new table (``_gate.compiled_functions``): the
ratio is what that adds.

First compile: the wall time of ``cache.build(plan)`` into an empty cache
directory (generate the C with cffi, run the compiler, write the entry,
import it) for an interface of N functions. Functions of one signature share
one wrapper, so an interface of N ``long f(long)`` compiles one shape; the
"distinct signatures" rows are the worst case, every function its own shape.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

from libs import funcs_cdef
from registries import make_registry
from timing import Stat, compare_ops

from nativereload.compiled import cache, codegen
from nativereload.interface import Declarations, parse

_TYPES = ("long", "int", "double", "char *", "unsigned int", "short", "float", "void *", "size_t", "int8_t")


def distinct_cdef(n: int) -> str:
    """``n`` functions, each with a signature of its own (two arguments drawn from _TYPES, then a third)."""
    lines = []
    for i in range(n):
        a, b, c = _TYPES[i % 10], _TYPES[(i // 10) % 10], _TYPES[(i // 100) % 10]
        lines.append(f"long g{i}({a}, {b}{', ' + c if i >= 100 else ''});")
    return "\n".join(lines) + "\n"


def reload_vs_gate(rows, *, libraries: dict, library_dir: str, tmpdir: str, repeats: int) -> float:
    """Reload of "small" (10 functions) on the compiled path vs on the C gate; returns the ratio."""
    cdef = funcs_cdef(10)
    compiled = make_registry("compiled", library_dir, tmpdir)
    plain = make_registry("c", library_dir, tmpdir)
    try:
        compiled.load("small", cdef=cdef)
        plain.load("small", cdef=cdef)
        assert compiled.status()[0].calls == "compiled" and plain.status()[0].calls == "gate"
        stats = compare_ops({"compiled": lambda: compiled.reload("small"), "gate": lambda: plain.reload("small")},
                            repeats)
    finally:
        compiled.close()
        plain.close()
    ratio = stats["compiled"].median / stats["gate"].median
    section = "7 compiled call path"
    rows.add(section, "small (10 functions): reg.reload(), compiled path (interface cached)", "us",
             stats["compiled"], ratio=ratio, ratio_of="reload on the C gate", key="compiled.reload")
    rows.add(section, "small (10 functions): reg.reload(), C gate", "us", stats["gate"], key="compiled.reload.gate")
    return ratio


def first_compile(rows, *, sizes: tuple[int, ...] = (10, 100), samples: int = 1) -> dict[str, float]:
    """Seconds to build the extension of each interface into an empty cache; returns key -> median seconds."""
    results = {}
    saved = os.environ.get(cache.CACHE_ENV)
    try:
        for label, make in (("same signature", funcs_cdef), ("distinct signatures", distinct_cdef)):
            for n in sizes:
                interface = Declarations.of(parse(make(n), module="bench"))
                plan = codegen.plan(interface.ffi, interface.function_types)
                times = []
                for _ in range(samples):
                    directory = tempfile.mkdtemp(prefix="nativereload-bench-cache-")
                    os.environ[cache.CACHE_ENV] = directory
                    cache.forget_loaded_for_tests()
                    started = time.perf_counter()
                    cache.build(plan)
                    times.append(time.perf_counter() - started)
                    shutil.rmtree(directory, ignore_errors=True)
                key = f"compiled.first.{'same' if label == 'same signature' else 'distinct'}.{n}"
                stat = Stat.of([t * 1e3 for t in times])
                rows.add("7 compiled call path", f"first compile, {n} functions, {label} ({len(plan.shapes)} "
                         f"shape{'s' * (len(plan.shapes) != 1)})", "ms", stat, key=key)
                results[key] = stat.median / 1e3
    finally:
        cache.forget_loaded_for_tests()
        if saved is None:
            os.environ.pop(cache.CACHE_ENV, None)
        else:
            os.environ[cache.CACHE_ENV] = saved
    return results
